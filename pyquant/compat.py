"""AMD Quark-compatible configuration API, translated into pyquant's typed QuantConfig.

    from pyquant import Config, ModelQuantizer, QuantizationConfig, get_default_config
    config = Config(global_quant_config=get_default_config("XINT8"))
    ModelQuantizer(config).quantize_model("model.onnx", "model_xint8.onnx", data_reader)

This module only translates: every default comes from pyquant.config (Quark's
``include_cle=True`` is the one default of Quark's own), and quantizing goes through
pyquant.api.quantize, the same entry point as the library and the CLI. An unknown key is
a ConfigError that names the valid keys; a key that has no meaning in pyquant is
accepted with a one-line notice saying why (never dropped silently).
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Any, Callable, Dict, Optional

from . import api
from .config import (CalibrateMethod, CLEOptions, FastFinetuneOptions, FinetuneAlgorithm, QuantConfig,
                     QuantType, get_preset)
from .errors import ConfigError

log = logging.getLogger(__name__)
_DEFAULTS = QuantConfig()
# Quark's AdaQuant learning rate is in units of the weights, AdaRound's in units of V.
ADAQUANT_LEARNING_RATE = 1e-5


def _algorithm(key: str, value: Any) -> Dict[str, Any]:
    names = {a.value: a for a in FinetuneAlgorithm}
    if not isinstance(value, str) or value.lower() not in names:
        raise ConfigError(f"FastFinetune[{key!r}] must be one of {sorted(names)}, got {value!r}")
    return {"algorithm": names[value.lower()]}


def _cpu(key: str, value: Any) -> Dict[str, Any]:
    if not isinstance(value, str) or value.lower() != "cpu":
        raise ConfigError(f"FastFinetune[{key!r}] = {value!r}: pyquant finetunes on the CPU only ('cpu')")
    return {}


def _beta_range(key: str, value: Any) -> Dict[str, Any]:
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise ConfigError(f"FastFinetune[{key!r}] must be (start, end), got {value!r}")
    return {"beta_range": (_number(key, value[0]), _number(key, value[1]))}


def _notice(why: str) -> Callable[[str, Any], Dict[str, Any]]:
    """A key accepted with a one-line notice: it means nothing in pyquant, for ``why``."""

    def accept(key: str, value: Any) -> Dict[str, Any]:
        _number(key, value)
        log.warning("FastFinetune[%r] = %r has no effect in pyquant: %s", key, value, why)
        return {}
    return accept


# Quark FastFinetune key -> function(key, value) returning FastFinetuneOptions fields.
FAST_FINETUNE_OPTIONS: Dict[str, Callable[[str, Any], Dict[str, Any]]] = {
    "OptimAlgorithm": _algorithm,
    "NumIterations": lambda k, v: {"iterations": _integer(k, v)},
    "LearningRate": lambda k, v: {"learning_rate": _number(k, v)},
    "RegParam": lambda k, v: {"reg_param": _number(k, v)},
    "BetaRange": _beta_range,
    "WarmStart": lambda k, v: {"warm_start": _number(k, v)},
    "EarlyStop": lambda k, v: {"early_stop": _bool(k, v)},
    "UpdateBias": lambda k, v: {"update_bias": _bool(k, v)},
    "DataSize": lambda k, v: {"data_size": _integer(k, v)},
    "NumBatches": lambda k, v: {"data_batches": _integer(k, v)},
    "OptimDevice": _cpu,
    "InferDevice": _cpu,
    "BatchSize": _notice("every iteration uses the Gram matrix of all calibration samples (no mini-batches)"),
    "FixedSeed": _notice("fast finetune draws no random numbers (it is deterministic)"),
    "LogPeriod": _notice("each layer's fit runs in C++ without intermediate logs; its result is logged"),
}


def fast_finetune_options(params: Any) -> FastFinetuneOptions:
    """Quark's extra_options['FastFinetune'] dict -> FastFinetuneOptions (ConfigError on an
    unknown key or a bad value)."""
    if not isinstance(params, dict):
        raise ConfigError(f"extra_options['FastFinetune'] must be a dict, got {type(params).__name__}")
    fields: Dict[str, Any] = {}
    for key, value in params.items():
        if key not in FAST_FINETUNE_OPTIONS:
            raise ConfigError(f"unknown FastFinetune key {key!r}; valid keys: {', '.join(sorted(FAST_FINETUNE_OPTIONS))}")
        fields.update(FAST_FINETUNE_OPTIONS[key](key, value))
    return FastFinetuneOptions(**fields)


def fast_finetune_params(options: FastFinetuneOptions) -> Dict[str, Any]:
    """FastFinetuneOptions -> Quark's FastFinetune dict (the keys with an effect)."""
    params: Dict[str, Any] = {
        "OptimAlgorithm": options.algorithm.value, "NumIterations": options.iterations,
        "LearningRate": options.learning_rate, "RegParam": options.reg_param,
        "BetaRange": tuple(options.beta_range), "WarmStart": options.warm_start,
        "EarlyStop": options.early_stop, "UpdateBias": options.update_bias,
    }
    if options.data_size is not None:
        params["DataSize"] = options.data_size
    if options.data_batches is not None:
        params["NumBatches"] = options.data_batches
    return params


# Quark's DEFAULT_ADAROUND_PARAMS / DEFAULT_ADAQUANT_PARAMS with pyquant's defaults
# (pyquant.config.FastFinetuneOptions), so that include_fast_ft=True, these dicts and
# --fast_finetune all quantize alike.
DEFAULT_ADAROUND_PARAMS: Dict[str, Any] = fast_finetune_params(FastFinetuneOptions())
DEFAULT_ADAQUANT_PARAMS: Dict[str, Any] = fast_finetune_params(
    FastFinetuneOptions(algorithm=FinetuneAlgorithm.AdaQuant, learning_rate=ADAQUANT_LEARNING_RATE))


def _bool(key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"extra_options[{key!r}] must be True or False, got {value!r}")
    return value


def _number(key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"extra_options[{key!r}] must be a number, got {value!r}")
    return float(value)


def _integer(key: str, value: Any) -> int:
    """An integer, or a float with an integral value (12.0); 12.7 is an error, not 12."""
    number = _number(key, value)
    if number != int(number):
        raise ConfigError(f"extra_options[{key!r}] must be a whole number, got {value!r}")
    return int(number)


def _weight_symmetric(key: str, value: Any) -> Dict[str, Any]:
    if not _bool(key, value):
        raise ConfigError("extra_options['WeightSymmetric'] = False is not supported: weights are symmetric int8")
    return {}


# Quark extra_options key -> function(key, value) returning QuantConfig fields.
EXTRA_OPTIONS: Dict[str, Callable[[str, Any], Dict[str, Any]]] = {
    "ActivationSymmetric": lambda k, v: {"activation_symmetric": _bool(k, v)},
    "WeightSymmetric": _weight_symmetric,
    "Percentile": lambda k, v: {"percentile": _number(k, v)},
    "NumBins": lambda k, v: {"num_bins": _integer(k, v)},
    "CalibDataBatchSize": lambda k, v: {"calib_batch_size": _integer(k, v)},
    # Cross-layer equalization (CLEOptions): sweeps, convergence tolerance on the scales,
    # Clip -> Relu replacement (changes the network), bias included in the first layer's range.
    "CLESteps": lambda k, v: {"cle.steps": _integer(k, v)},
    "CLETotalLayerDiffThreshold": lambda k, v: {"cle.tolerance": _number(k, v)},
    "ReplaceClip6Relu": lambda k, v: {"cle.replace_clip_with_relu": _bool(k, v)},
    "CLEScaleAppendBias": lambda k, v: {"cle.scale_append_bias": _bool(k, v)},
    # pyquant's own (not the reference's): activation-aware CLE scales (0 = data-free CLE).
    "CLEActivationWeight": lambda k, v: {"cle.activation_weight": _number(k, v)},
    "CLEActivationSamples": lambda k, v: {"cle.activation_samples": _integer(k, v)},
    # pyquant's own: QDQ pairs on model outputs and tensors read only by float ops.
    "QuantizeRegionOutputs": lambda k, v: {"quantize_region_outputs": _bool(k, v)},
    # Fast finetune (FastFinetuneOptions), a dict with the keys of FAST_FINETUNE_OPTIONS.
    "FastFinetune": lambda k, v: {"fast_finetune": fast_finetune_options(v)},
}


@dataclasses.dataclass
class QuantizationConfig:
    """Quark's QuantizationConfig fields that pyquant understands (same names, same meaning,
    same defaults: include_cle is True, as in Quark, so that a config ported from it keeps
    its cross-layer equalization).

    ``to_quant_config()`` translates into the typed QuantConfig and raises ConfigError for
    anything pyquant cannot honour.
    """

    calibrate_method: CalibrateMethod = _DEFAULTS.calibrate_method
    activation_type: QuantType = _DEFAULTS.activation_type
    weight_type: QuantType = _DEFAULTS.weight_type
    per_channel: bool = _DEFAULTS.per_channel
    enable_npu_cnn: bool = _DEFAULTS.enable_npu_cnn
    include_cle: bool = True  # Quark's default, not QuantConfig's
    include_fast_ft: bool = False
    extra_options: Dict[str, Any] = dataclasses.field(default_factory=dict)

    def to_quant_config(self) -> QuantConfig:
        if not isinstance(self.extra_options, dict):
            raise ConfigError(f"extra_options must be a dict, got {type(self.extra_options).__name__}")
        fields: Dict[str, Any] = {}
        for key, value in self.extra_options.items():
            if key not in EXTRA_OPTIONS:
                raise ConfigError(f"unknown extra_options key {key!r}; valid keys: {', '.join(sorted(EXTRA_OPTIONS))}")
            fields.update(EXTRA_OPTIONS[key](key, value))
        cle_fields = {k.split(".", 1)[1]: fields.pop(k) for k in list(fields) if k.startswith("cle.")}
        if self.include_fast_ft:
            fields.setdefault("fast_finetune", FastFinetuneOptions())
        elif "fast_finetune" in fields:
            raise ConfigError("extra_options['FastFinetune'] is given but include_fast_ft is False")
        return QuantConfig(activation_type=self.activation_type, weight_type=self.weight_type,
                           calibrate_method=self.calibrate_method, per_channel=self.per_channel,
                           enable_npu_cnn=self.enable_npu_cnn, cross_layer_equalization=self.include_cle,
                           cle=CLEOptions(**cle_fields), **fields)

    @classmethod
    def from_quant_config(cls, config: QuantConfig) -> "QuantizationConfig":
        extra: Dict[str, Any] = {"ActivationSymmetric": config.activation_symmetric}
        if config.percentile != _DEFAULTS.percentile:
            extra["Percentile"] = config.percentile
        if config.num_bins != _DEFAULTS.num_bins:
            extra["NumBins"] = config.num_bins
        if config.calib_batch_size is not None:
            extra["CalibDataBatchSize"] = config.calib_batch_size
        if config.cross_layer_equalization:
            extra.update(CLESteps=config.cle.steps, CLETotalLayerDiffThreshold=config.cle.tolerance,
                         ReplaceClip6Relu=config.cle.replace_clip_with_relu,
                         CLEScaleAppendBias=config.cle.scale_append_bias,
                         CLEActivationWeight=config.cle.activation_weight,
                         CLEActivationSamples=config.cle.activation_samples)
        if not config.quantize_region_outputs:
            extra["QuantizeRegionOutputs"] = False
        if config.fast_finetune is not None:
            extra["FastFinetune"] = fast_finetune_params(config.fast_finetune)
        result = cls(calibrate_method=config.calibrate_method, activation_type=config.activation_type,
                     weight_type=config.weight_type, per_channel=config.per_channel,
                     enable_npu_cnn=config.enable_npu_cnn, include_cle=config.cross_layer_equalization,
                     include_fast_ft=config.fast_finetune is not None, extra_options=extra)
        back = result.to_quant_config()
        lost = [f.name for f in dataclasses.fields(QuantConfig) if getattr(back, f.name) != getattr(config, f.name)]
        if lost:
            raise ConfigError(f"this QuantConfig has no Quark-style equivalent: {', '.join(lost)} cannot be "
                              "expressed with QuantizationConfig; use the QuantConfig itself")
        return result


@dataclasses.dataclass
class Config:
    """Quark's top-level Config: one global QuantizationConfig."""

    global_quant_config: QuantizationConfig


def get_default_config(name: str) -> QuantizationConfig:
    """The preset ``name`` (XINT8, INT8_CLE, INT8_CNN_ACCURATE, A8W8, U8S8) as a Quark-style
    QuantizationConfig."""
    return QuantizationConfig.from_quant_config(get_preset(name))


def resolve(config: Any) -> QuantConfig:
    """Any accepted form of configuration -> QuantConfig (pyquant.api.resolve_config:
    a preset name, a QuantConfig, a QuantizationConfig or Config)."""
    return api.resolve_config(config)


class ModelQuantizer:
    """Quark's ModelQuantizer: ``quantize_model(input, output, data_reader)`` returns the
    quantized ModelProto and writes it when ``output`` is a path."""

    def __init__(self, config: Any, progress: Optional[Callable[[int, Optional[int]], None]] = None) -> None:
        self.config = resolve(config)
        self.progress = progress

    def quantize_model(self, model_input, model_output, calibration_data_reader):
        return api.quantize_detailed(model_input, calibration_data_reader, self.config, model_output,
                                     progress=self.progress).model
