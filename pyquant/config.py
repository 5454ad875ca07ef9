"""Typed quantization configuration and the named presets.

The names (QuantType, CalibrationMethod, PowerOfTwoMethod, XINT8, A8W8, U8S8) follow
AMD Quark's ONNX quantizer so that its users find the same vocabulary; the types here
are the real configuration, and each default is defined once, in this file.

A leaf module: it imports no technique, graph or calibration module, so that every other
module (techniques included) can import its types. Technique options live here too.
"""
from __future__ import annotations

import dataclasses
import enum
from types import MappingProxyType
from typing import Dict, FrozenSet, Mapping, Optional, Tuple, Union

import numpy as np
from onnx import TensorProto

from .errors import ConfigError


class QuantType(enum.Enum):
    """Type of a quantized tensor. Integer types: 16-bit ones are for activations (A16W8):
    standard QDQ needs opset 21 for them, and the model is upgraded to it. BFloat16 is a
    float type (no scale, no calibrated range): activations and weights together, written
    as Cast pairs that onnxruntime runs (the reference's BF16)."""

    QInt8 = "int8"
    QUInt8 = "uint8"
    QInt16 = "int16"
    QUInt16 = "uint16"
    BFloat16 = "bfloat16"

    @property
    def bits(self) -> int:
        return _QUANT_TYPES[self][0]

    @property
    def signed(self) -> bool:
        return _QUANT_TYPES[self][1]

    @property
    def is_float(self) -> bool:
        return self is QuantType.BFloat16

    @property
    def qmin(self) -> int:
        self._integer_only("qmin")
        return -(1 << (self.bits - 1)) if self.signed else 0

    @property
    def qmax(self) -> int:
        self._integer_only("qmax")
        return (1 << (self.bits - 1)) - 1 if self.signed else (1 << self.bits) - 1

    def _integer_only(self, what: str) -> None:
        if self.is_float:
            raise ConfigError(f"{self.name} is a float type: it has no {what}")

    @property
    def numpy_dtype(self) -> type:
        return _QUANT_TYPES[self][2]

    @property
    def onnx_dtype(self) -> int:
        return _QUANT_TYPES[self][3]

    @classmethod
    def of(cls, dtype) -> "QuantType":
        """The type whose numpy dtype is ``dtype`` (e.g. of a zero point)."""
        for member, (_, _, numpy_dtype, _) in _QUANT_TYPES.items():
            if not member.is_float and np.dtype(dtype) == np.dtype(numpy_dtype):
                return member
        raise ConfigError(f"no quantized type has dtype {np.dtype(dtype)}")


# member -> (bits, signed, numpy dtype, onnx dtype)
_QUANT_TYPES = {
    QuantType.QInt8: (8, True, np.int8, TensorProto.INT8),
    QuantType.QUInt8: (8, False, np.uint8, TensorProto.UINT8),
    QuantType.QInt16: (16, True, np.int16, TensorProto.INT16),
    QuantType.QUInt16: (16, False, np.uint16, TensorProto.UINT16),
    # numpy has no bfloat16: the values are float32 rounded to bfloat16 (qparams.round_to_bfloat16)
    QuantType.BFloat16: (16, True, np.float32, TensorProto.BFLOAT16),
}


class CalibrationMethod(enum.Enum):
    """Float-scale calibration: how the clipping range of an activation is chosen."""

    MinMax = "minmax"
    Percentile = "percentile"
    Entropy = "entropy"
    MSE = "mse"


class PowerOfTwoMethod(enum.Enum):
    """Power-of-two-scale calibration (scales 2^k, as NPUs require)."""

    NonOverflow = "nonoverflow"
    MinMSE = "minmse"


CalibrateMethod = Union[CalibrationMethod, PowerOfTwoMethod]


@dataclasses.dataclass(frozen=True)
class CLEOptions:
    """Cross-layer equalization (pyquant.techniques.cle).

    Attributes:
        steps: at most this many sweeps over all pairs.
        tolerance: stop when every scale of a sweep is within (1 +- tolerance).
        activation_weight: how much the measured channel ranges of the activation between
            two layers count in their scales (0: the paper's data-free CLE, weights only;
            see pyquant.techniques.cle). 0.25 measured best on EfficientNet-Lite0 (README).
        activation_samples: calibration samples those ranges are measured on (and the
            statistics of high-bias absorption).
        high_bias_absorption: after equalization, move the part of each ReLU channel that
            stays above zero into the next layer's bias (pyquant.techniques.bias_absorption);
            off by default: it cost 0.8 points of top-1 on EfficientNet-Lite0 (README).
        replace_clip_with_relu: replace Clip by Relu before equalizing (the reference
            tool's ReplaceClip6Relu; changes the function, measured -25 points on
            EfficientNet-Lite0).
        scale_append_bias: count the first layer's bias in its output-channel range.
    """

    steps: int = 100
    tolerance: float = 1e-3
    activation_weight: float = 0.25
    activation_samples: int = 64
    high_bias_absorption: bool = False
    replace_clip_with_relu: bool = False
    scale_append_bias: bool = False

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ConfigError(f"CLE steps must be at least 1, got {self.steps}")
        if not self.tolerance > 0:
            raise ConfigError(f"CLE tolerance must be positive, got {self.tolerance}")
        if not 0 <= self.activation_weight <= 1:
            raise ConfigError(f"CLE activation_weight must be in [0, 1], got {self.activation_weight}")
        if self.activation_samples < 1:
            raise ConfigError(f"CLE activation_samples must be at least 1, got {self.activation_samples}")


class FinetuneAlgorithm(enum.Enum):
    """AdaRound learns up/down rounding of each weight (scales fixed); AdaQuant learns the
    weights themselves through the quantizer (straight-through gradient)."""

    AdaRound = "adaround"
    AdaQuant = "adaquant"


@dataclasses.dataclass(frozen=True)
class FastFinetuneOptions:
    """How each Conv/Gemm/MatMul layer's integer weights are fitted
    (pyquant.techniques.fast_finetune).

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
        data_batches: use at most this many calibration batches (None: all); with
            data_size, whichever limit comes first.
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
    data_batches: Optional[int] = None

    def __post_init__(self) -> None:
        if not isinstance(self.algorithm, FinetuneAlgorithm):
            raise ConfigError(f"fast finetune algorithm must be a FinetuneAlgorithm, got {self.algorithm!r}")
        for name in ("iterations", "data_size", "data_batches"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, np.integer))):
                raise ConfigError(f"fast finetune {name} must be an integer, got {value!r}")
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
        if self.data_batches is not None and self.data_batches < 1:
            raise ConfigError(f"fast finetune data_batches must be at least 1, got {self.data_batches}")



# Histogram bins per activation tensor; the entropy (KL) method needs more bins than its
# ENTROPY_QUANT_BINS target levels, and 2**20 bins (8 MB per tensor) is far past useful.
DEFAULT_NUM_BINS = 2048
ENTROPY_QUANT_BINS = 128
MIN_NUM_BINS = ENTROPY_QUANT_BINS
MAX_NUM_BINS = 2 ** 20
# Cross-layer equalization scales are clamped to [1 / CLE_MAX_SCALE, CLE_MAX_SCALE], so
# that a dead channel (range ~0 in one layer) cannot blow up the other.
CLE_MAX_SCALE = 1e4
# Batch size for calibration data given as arrays or folders, when calib_batch_size is None.
DEFAULT_CALIB_BATCH_SIZE = 8


@dataclasses.dataclass(frozen=True)
class QuantConfig:
    """What to quantize and how. Frozen: derive variants with ``dataclasses.replace``.

    Attributes:
        activation_type: integer type of activations.
        weight_type: integer type of Conv/Gemm/MatMul weights: QInt8, symmetric (zero point
            0), or QUInt8, asymmetric (scale and zero point from each tensor's or channel's
            min and max, as the reference's U8U8_AAWA; not with power-of-two scales or
            fast finetune).
        calibrate_method: activation calibration; a PowerOfTwoMethod also makes every
            scale (activations, weights, bias) a power of two.
        activation_symmetric: symmetric activation ranges. For uint8 a non-negative
            tensor then uses zero point 0 and one with negatives zero point 128.
        per_channel: one weight scale per output channel (not with power-of-two scales
            on NPUs, which take one scale per tensor).
        enable_npu_cnn: apply the NPU CNN scale rules (see pyquant.graph.plan).
        quantize_region_outputs: also give a QDQ pair to the tensors that leave the
            quantized part of the graph: model outputs, and tensors read only by ops left
            in float. On by default, as in the reference, and in the presets with NPU
            rules (XINT8, INT8_CLE): an NPU computes the last layer in integers and hands
            over integer data. Off in the float-scale presets: the pair only adds rounding,
            and the last layer (a classifier's Gemm) computes on quantized inputs and
            weights and returns float. Rounding a classifier's logits to uint8 ties and
            swaps classes whose scores are within one step (on EfficientNet-Lite0 0.064 for
            U8S8 and 0.125 for XINT8; 7 and 15 of the 500 val images have their top two
            float logits that close). Measured: README, section Results.
        percentile: the percentile (in %) kept by CalibrationMethod.Percentile.
        num_bins: histogram bins per activation tensor.
        calib_batch_size: samples per onnxruntime run during calibration (bounds peak
            memory): the calibration data is re-batched to this size (the last batch may be
            smaller). None: as the data comes (a reader's own batches; arrays and folders in
            batches of DEFAULT_CALIB_BATCH_SIZE).
        threads: the thread budget of the whole run (onnxruntime, the C++ kernels and the
            image decoders share it; see pyquant.threads). None: the CPUs this process may
            run on (its affinity mask), not the machine's count.
        weight_scale_mse: symmetric float per-tensor weight scales clip the abs max to the ratio in
            [0.3, 1] with the least squared rounding error, instead of abs max / 127
            (per-channel scales stay abs max, which measured better; power-of-two weight
            scales follow calibrate_method instead). Not with fast_finetune, which needs
            every weight within one rounding step.
        bias_correction: correct each Conv/Gemm bias for the mean output shift caused by
            weight rounding (pyquant.techniques.bias_correction); on in every preset.
        empirical_bias_correction: passes of empirical bias correction
            (pyquant.techniques.empirical_bias_correction): run the QDQ model on the
            calibration data and move each Conv/Gemm bias by its per-channel output mean,
            float minus quantized, which also removes the mean shift that activation
            clipping and rounding build up; each pass is one more inference pass over the
            calibration data (the first also runs the float model). 0: off.
        cross_layer_equalization: equalize weight ranges of consecutive layers before
            calibration (pyquant.techniques.cle), with ``cle`` options.
        fast_finetune: fit each layer's integer weights (AdaRound/AdaQuant) to reproduce
            the float layer's output on the calibration data
            (pyquant.techniques.fast_finetune); None: nearest rounding.
        nodes_to_exclude: names of nodes left in float (their inputs, outputs and weights
            are not quantized for them); a name that matches no node is an error.
        op_types_to_quantize: when given, only nodes of these op types are quantized;
            every other node is left in float. An op type pyquant cannot quantize is an error.
        tensor_types: {activation tensor: QuantType} overriding activation_type for those
            tensors (mixed precision: e.g. QInt16 where 8 bits lose too much); tensors that
            share a scale take the widest type among them. A name that is not a quantized
            activation is an error.
        unclipped_output_layers: activations at most this many weighted layers
            (Conv/ConvTranspose/Gemm/MatMul) from a model output keep their whole calibrated range, min to
            max (PowerOfTwoMethod: the non-overflowing exponent), whatever calibrate_method
            clips elsewhere (0: the tensors after the last layers; None: off). Near the
            output the largest values are the network's strongest evidence (a detector's
            objects), which the last layers map almost linearly into the outputs; clipping
            them shrinks exactly the responses that decide (YOLOv8n under U8S8 per-channel:
            Percentile clipping the detection head's activations lowered the class logit of
            every anchor above score 0.1 by 0.2 on average). Measured: README, Presets.
        clipped_input_layers: a limit on unclipped_output_layers (refused without it):
            activations at most this many weighted layers from a model input (a graph input
            is 0, the first Conv's output 1; pyquant.graph.depth) keep calibrate_method's
            range even when they are near an output. Near the input the largest values are
            the raw signal's rare peaks (a spectrum's loudest bin, the brightest edges), and
            clipping them buys resolution for the bulk; in a network of few layers every
            tensor is near both ends. None: no limit.
        int32_bias: a Conv/Gemm bias is int32 with scale = input scale x weight scale (exact
            on any hardware). False (power-of-two scales only): int8 with its own power-of-two
            position, as an NPU stores it, chosen within the NPU's shift_bias limits
            (pyquant.npu); costs accuracy (README, NPU target).
    """

    activation_type: QuantType = QuantType.QUInt8
    weight_type: QuantType = QuantType.QInt8
    calibrate_method: CalibrateMethod = CalibrationMethod.MinMax
    activation_symmetric: bool = False
    per_channel: bool = False
    enable_npu_cnn: bool = False
    quantize_region_outputs: bool = True
    percentile: float = 99.999
    num_bins: int = DEFAULT_NUM_BINS
    calib_batch_size: Optional[int] = None
    threads: Optional[int] = None
    weight_scale_mse: bool = True
    bias_correction: bool = True
    empirical_bias_correction: int = 0
    cross_layer_equalization: bool = False
    cle: CLEOptions = CLEOptions()
    fast_finetune: Optional[FastFinetuneOptions] = None
    nodes_to_exclude: FrozenSet[str] = frozenset()
    op_types_to_quantize: Optional[FrozenSet[str]] = None
    tensor_types: Mapping[str, QuantType] = dataclasses.field(default_factory=dict)
    unclipped_output_layers: Optional[int] = None
    clipped_input_layers: Optional[int] = None
    int32_bias: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.tensor_types, Mapping) or not all(
                isinstance(k, str) and isinstance(v, QuantType) for k, v in self.tensor_types.items()):
            raise ConfigError(f"tensor_types must map tensor names to QuantType members, got {self.tensor_types!r}")
        object.__setattr__(self, "tensor_types", MappingProxyType(dict(self.tensor_types)))
        for name in ("nodes_to_exclude", "op_types_to_quantize"):
            value = getattr(self, name)
            if value is None and name == "op_types_to_quantize":
                continue
            if isinstance(value, str) or not all(isinstance(v, str) for v in value):
                raise ConfigError(f"{name} must be a collection of names, got {value!r}")
            object.__setattr__(self, name, frozenset(value))
        if not isinstance(self.activation_type, QuantType) or not isinstance(self.weight_type, QuantType):
            raise ConfigError("activation_type and weight_type must be QuantType members")
        self._check_bfloat16()
        if self.weight_type not in (QuantType.QInt8, QuantType.QUInt8, QuantType.BFloat16):
            raise ConfigError("weight_type must be QuantType.QInt8 (symmetric) or QuantType.QUInt8 (asymmetric); "
                              f"got {self.weight_type.name}: 16-bit weights are not supported")
        if self.weight_type is QuantType.QUInt8 and self.power_of_two:
            raise ConfigError("uint8 (asymmetric) weights cannot have power-of-two scales: NPUs take symmetric int8 "
                              "weights; use weight_type=QuantType.QInt8")
        if self.weight_type is QuantType.QUInt8 and self.fast_finetune is not None:
            raise ConfigError("fast finetune fits int8 weights (the AdaRound kernel's grid is [-128, 127]); with "
                              "uint8 (asymmetric) weights use fast_finetune=None, or weight_type=QuantType.QInt8")
        if not isinstance(self.calibrate_method, (CalibrationMethod, PowerOfTwoMethod)):
            raise ConfigError(
                f"calibrate_method must be a CalibrationMethod or PowerOfTwoMethod, got {self.calibrate_method!r}")
        if self.power_of_two and self.per_channel:
            raise ConfigError("per_channel cannot be combined with power-of-two scales "
                              f"({self.calibrate_method.name}): NPUs take one power-of-two scale per tensor")
        if not 50.0 < self.percentile <= 100.0:
            raise ConfigError(f"percentile must be in (50, 100], got {self.percentile}")
        if not MIN_NUM_BINS <= self.num_bins <= MAX_NUM_BINS:
            raise ConfigError(f"num_bins must be in [{MIN_NUM_BINS}, {MAX_NUM_BINS}], got {self.num_bins}")
        if self.fast_finetune is not None and not isinstance(self.fast_finetune, FastFinetuneOptions):
            raise ConfigError(f"fast_finetune must be FastFinetuneOptions or None, got {self.fast_finetune!r}")
        for name in ("calib_batch_size", "threads", "num_bins", "empirical_bias_correction", "unclipped_output_layers",
                     "clipped_input_layers"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, np.integer))):
                raise ConfigError(f"{name} must be an integer, got {value!r}")
        if self.calib_batch_size is not None and self.calib_batch_size < 1:
            raise ConfigError(f"calib_batch_size must be at least 1, got {self.calib_batch_size}")
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"threads must be at least 1, got {self.threads}")
        if self.unclipped_output_layers is not None and self.unclipped_output_layers < 0:
            raise ConfigError(f"unclipped_output_layers must be >= 0 or None, got {self.unclipped_output_layers}")
        if self.clipped_input_layers is not None and self.clipped_input_layers < 0:
            raise ConfigError(f"clipped_input_layers must be >= 0 or None, got {self.clipped_input_layers}")
        if self.clipped_input_layers is not None and self.unclipped_output_layers is None:
            raise ConfigError(f"clipped_input_layers={self.clipped_input_layers} limits unclipped_output_layers, "
                              "which is None (no whole ranges to limit): set clipped_input_layers=None too, or "
                              "give unclipped_output_layers")
        if self.empirical_bias_correction < 0:
            raise ConfigError(f"empirical_bias_correction (passes) must be >= 0, got {self.empirical_bias_correction}")
        if not self.int32_bias and not self.power_of_two:
            raise ConfigError("int32_bias=False (int8 biases with their own power-of-two position) needs "
                              f"power-of-two scales; calibrate_method is {self.calibrate_method.name}")
        if not isinstance(self.cle, CLEOptions):
            raise ConfigError(f"cle must be CLEOptions, got {self.cle!r}")

    def _check_bfloat16(self) -> None:
        """bfloat16 is one float type for activations and weights together: nothing to
        calibrate, no scale, no integer grid; the options that shape scales are refused."""
        floats = [t.is_float for t in (self.activation_type, self.weight_type)]
        if not any(floats) and not any(t.is_float for t in self.tensor_types.values()):
            return
        if not all(floats):
            raise ConfigError("bfloat16 is for activations and weights together: set both activation_type and "
                              "weight_type to QuantType.BFloat16 (the reference's BF16), or neither")
        refused = {"per_channel": self.per_channel, "enable_npu_cnn": self.enable_npu_cnn,
                   "fast_finetune": self.fast_finetune is not None, "tensor_types": bool(self.tensor_types),
                   "calibrate_method": self.calibrate_method is not CalibrationMethod.MinMax}
        given = [name for name, set_ in refused.items() if set_]
        if given:
            raise ConfigError(f"{', '.join(given)}: not with bfloat16, which has no scales to calibrate, search or "
                              "fine-tune (leave them at their defaults: calibrate_method MinMax, per_channel False, "
                              "enable_npu_cnn False, fast_finetune None, no tensor_types)")

    @property
    def min_opset(self) -> int:
        """The opset the quantized model needs: 21 for 16-bit integer QDQ, else 13 (per-axis
        QDQ; Cast to bfloat16)."""
        wide = any(t.bits > 8 and not t.is_float for t in (self.activation_type, *self.tensor_types.values()))
        return 21 if wide else 13

    @property
    def power_of_two(self) -> bool:
        return isinstance(self.calibrate_method, PowerOfTwoMethod)

    @property
    def needs_histogram(self) -> bool:
        return self.calibrate_method is not CalibrationMethod.MinMax


_XINT8 = QuantConfig(
    activation_type=QuantType.QUInt8,
    calibrate_method=PowerOfTwoMethod.MinMSE,
    activation_symmetric=True,
    enable_npu_cnn=True,
)

PRESETS: Dict[str, QuantConfig] = {
    # Power-of-two symmetric scales, per-tensor int8 weights, uint8 activations, NPU rules.
    "XINT8": _XINT8,
    # As the reference defines it: power-of-two MinMSE, uint8 activations, int8 weights,
    # NPU CNN rules, symmetric activations, cross-layer equalization: XINT8 + CLE.
    "INT8_CLE": dataclasses.replace(_XINT8, cross_layer_equalization=True),
    # As the reference defines it: Percentile 99.9999 calibration, uint8 activations, int8
    # per-tensor weights, fast finetune with AdaRound, and cross-layer equalization (the
    # reference's QuantizationConfig has include_cle=True by default, so its preset has it).
    # On EfficientNet-Lite0 CLE halves the mean KL divergence from the float model on val
    # (0.0122 -> 0.0051). With CLE, 600 AdaRound iterations measured KL 0.0049 against
    # 0.0051 at 300 and 1000 (one-off runs; top-1 87.4 / 88.2 / 88.0 %, within the 500
    # images' noise); without CLE more iterations cost (XINT8 + fast finetune: KL 0.021 at
    # 300, 0.030 at 600), so the generic default stays 300.
    "INT8_CNN_ACCURATE": QuantConfig(
        activation_type=QuantType.QUInt8,
        calibrate_method=CalibrationMethod.Percentile,
        percentile=99.9999,
        cross_layer_equalization=True,
        fast_finetune=FastFinetuneOptions(iterations=600),
        quantize_region_outputs=False,
    ),
    # int8 symmetric activations and weights with float scales. Percentile 99.99 measured
    # best of MinMax/MSE/Percentile on EfficientNet-Lite0 (benchmarks/imagenet_sample.py).
    "A8W8": QuantConfig(
        activation_type=QuantType.QInt8,
        calibrate_method=CalibrationMethod.Percentile,
        percentile=99.99,
        activation_symmetric=True,
        quantize_region_outputs=False,
    ),
    # uint8 asymmetric activations, int8 symmetric weights. Percentile 99.999: KL to float
    # on EfficientNet-Lite0 per tensor 0.054 -> 0.052, per channel 0.0046 -> 0.0029 against
    # 99.99 (99.9999 and MSE lie between; benchmarks/imagenet_sample.py). Whole ranges within
    # 4 weighted layers of an output, except within 4 of an input: the strongest responses
    # near the output are a detector's objects (YOLOv8n per-channel detection F1 0.893 ->
    # 0.912 on 500 photos), while near the input clipping buys resolution (silero-vad's
    # spectrum, MTCNN's shallow nets: unchanged). Its cost: ppocr-rec per-channel reads 2 of
    # 96 lines differently (SQNR 17.9 -> 18.3 dB). README, Results, Real models.
    "U8S8": QuantConfig(
        activation_type=QuantType.QUInt8,
        calibrate_method=CalibrationMethod.Percentile,
        percentile=99.999,
        activation_symmetric=False,
        quantize_region_outputs=False,
        unclipped_output_layers=4,
        clipped_input_layers=4,
    ),
    # int16 symmetric activations, int8 weights: what 8-bit activations lose, for a model that
    # runs on onnxruntime's CPU (int16 QDQ needs opset 21; the model is upgraded). With 65535
    # levels no clipping search is needed: MinMax.
    "A16W8": QuantConfig(
        activation_type=QuantType.QInt16,
        calibrate_method=CalibrationMethod.MinMax,
        activation_symmetric=True,
        quantize_region_outputs=False,
    ),
    # bfloat16 activations and weights (the reference's BF16): float32's range with 8
    # significant bits, nothing to calibrate; Cast pairs that onnxruntime's CPU runs. The
    # logits stay float32 as in the float-scale presets.
    "BF16": QuantConfig(
        activation_type=QuantType.BFloat16,
        weight_type=QuantType.BFloat16,
        quantize_region_outputs=False,
    ),
}


def get_preset(name: str) -> QuantConfig:
    """The preset called ``name`` (case-insensitive); ConfigError names the valid ones."""
    try:
        return PRESETS[name.upper()]
    except KeyError:
        raise ConfigError(f"unknown preset {name!r}; valid presets: {', '.join(PRESETS)}") from None
