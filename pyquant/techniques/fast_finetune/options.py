"""Options of fast finetune (pyquant.techniques.fast_finetune.finetune)."""
from __future__ import annotations

import dataclasses
import enum
from typing import Optional, Tuple

from ...errors import ConfigError


class FinetuneAlgorithm(enum.Enum):
    """AdaRound learns up/down rounding of each weight (scales fixed); AdaQuant learns the
    weights themselves through the quantizer (straight-through gradient)."""

    AdaRound = "adaround"
    AdaQuant = "adaquant"


class FinetuneTarget(enum.Enum):
    """What each quantized layer W~ x_q is fitted to. Quantized: W x_q, the float weights
    on the same quantized inputs (only the weights' rounding error counts). Unquantized:
    W x_u, where x_u is the layer's input in the quantized network before its own
    activation quantizer, so the layer also absorbs what quantizing its input costs, but
    not the errors of the layers upstream (which they fit themselves). Costs a second Gram
    matrix per layer (E[x_q x_u^T]), about twice the accumulation time. Measured in one-off
    runs on EfficientNet-Lite0 (val top-1, not benchmark rows; one image is 0.2 points):
    XINT8 + data-free CLE 85.8 -> 86.6 %, XINT8 + activation-aware CLE 87.4 -> 87.6 % (KL to
    float 0.0061 -> 0.0060), INT8_CNN_ACCURATE before it included CLE 87.6 -> 87.0 %, with
    CLE KL 0.0051 -> 0.0054; so Quantized stays the default."""

    Quantized = "quantized"
    Unquantized = "unquantized"


@dataclasses.dataclass(frozen=True)
class FastFinetuneOptions:
    """How each Conv/Gemm/MatMul layer's integer weights are fitted.

    Attributes:
        algorithm: AdaRound or AdaQuant.
        iterations: Adam steps per layer. Each step uses the whole calibration set (through
            the layer's Gram matrices), not a mini-batch of 2 as the reference's 1000 steps:
            300 measured enough on EfficientNet-Lite0 (benchmarks/imagenet_sample.py).
        learning_rate: Adam step size: in units of the AdaRound parameter V, or of the
            weights for AdaQuant (the reference's conventions).
        reg_param: weight of AdaRound's rounding regulariser sum(1 - |2h - 1|^beta).
        beta_range: beta annealed (cosine) from the first value to the second.
        warm_start: fraction of the iterations before the regulariser is switched on.
        early_stop: per output channel, keep nearest rounding where the learned rounding
            does not lower the layer's output error on the calibration data.
        update_bias: refit each layer's bias in closed form (the mean output shift between
            the float layer and the quantized layer on their real inputs); this also makes
            the fit blind to constant offsets, which the bias absorbs.
        data_size: use at most this many calibration samples (None: all).
        target: what each layer is fitted to (FinetuneTarget).
        passes: passes over the calibration data to collect the layers' inputs. Layers are
            fitted in this many consecutive stages; a stage sees the inputs produced by the
            finetuned layers of earlier stages and the nearest-rounded layers of its own
            stage. More passes: closer to strictly sequential, slower; 1 measured enough on
            EfficientNet-Lite0 (the loss only uses each layer's own quantized inputs). One-off
            runs with 4 passes (KL to float on val, 1 -> 4 passes): XINT8 0.0206 -> 0.0199,
            INT8_CLE 0.0061 -> 0.0061, INT8_CNN_ACCURATE 0.0049 -> 0.0049, for about 25 s
            more inference; top-1 moved by one to three images either way.
    """

    algorithm: FinetuneAlgorithm = FinetuneAlgorithm.AdaRound
    iterations: int = 300
    learning_rate: float = 0.1
    reg_param: float = 0.01
    beta_range: Tuple[float, float] = (20.0, 2.0)
    warm_start: float = 0.2
    early_stop: bool = True
    update_bias: bool = True
    data_size: Optional[int] = None
    passes: int = 1
    target: FinetuneTarget = FinetuneTarget.Quantized

    def __post_init__(self) -> None:
        if not isinstance(self.algorithm, FinetuneAlgorithm):
            raise ConfigError(f"fast finetune algorithm must be a FinetuneAlgorithm, got {self.algorithm!r}")
        if self.iterations < 0:
            raise ConfigError(f"fast finetune iterations must be >= 0, got {self.iterations}")
        if not self.learning_rate > 0:
            raise ConfigError(f"fast finetune learning rate must be positive, got {self.learning_rate}")
        if self.reg_param < 0:
            raise ConfigError(f"fast finetune reg_param must be >= 0, got {self.reg_param}")
        if len(self.beta_range) != 2 or not all(b >= 1 for b in self.beta_range):
            raise ConfigError(f"fast finetune beta_range must be two values >= 1, got {self.beta_range}")
        if not 0 <= self.warm_start < 1:
            raise ConfigError(f"fast finetune warm_start must be in [0, 1), got {self.warm_start}")
        if self.data_size is not None and self.data_size < 1:
            raise ConfigError(f"fast finetune data_size must be at least 1, got {self.data_size}")
        if self.passes < 1:
            raise ConfigError(f"fast finetune passes must be at least 1, got {self.passes}")
