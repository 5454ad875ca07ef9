"""AMD Quark-compatible configuration API, translated into pyquant's typed QuantConfig.

    from pyquant import Config, ModelQuantizer, QuantizationConfig, get_default_config
    config = Config(global_quant_config=get_default_config("XINT8"))
    ModelQuantizer(config).quantize_model("model.onnx", "model_xint8.onnx", data_reader)

Only what pyquant implements is accepted: an unknown ``extra_options`` key, or an
option whose technique is not available yet, is a ConfigError that names the valid keys.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict, Optional

from .config import PRESETS, CalibrateMethod, CalibrationMethod, QuantConfig, QuantType, get_preset
from .errors import ConfigError
from .techniques.cle import CLEOptions
from .techniques.fast_finetune.options import FastFinetuneOptions, FinetuneAlgorithm

# The reference's defaults, same keys (quark.onnx ... custom_config). BatchSize, FixedSeed
# and NumBatches are accepted and have no effect: every pyquant iteration uses the whole
# calibration set through the layer's Gram matrices, with no sampling.
DEFAULT_ADAROUND_PARAMS: Dict[str, Any] = {
    "DataSize": 1000, "FixedSeed": 1705472343, "BatchSize": 2, "NumIterations": 1000, "LearningRate": 0.1,
    "OptimAlgorithm": "adaround", "OptimDevice": "cpu", "InferDevice": "cpu", "EarlyStop": True,
}
DEFAULT_ADAQUANT_PARAMS: Dict[str, Any] = {
    "DataSize": 1000, "FixedSeed": 1705472343, "BatchSize": 2, "NumIterations": 1000, "LearningRate": 0.00001,
    "OptimAlgorithm": "adaquant", "OptimDevice": "cpu", "InferDevice": "cpu", "EarlyStop": True,
}


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


# Quark FastFinetune key -> function(key, value) returning FastFinetuneOptions fields.
FAST_FINETUNE_OPTIONS: Dict[str, Callable[[str, Any], Dict[str, Any]]] = {
    "OptimAlgorithm": _algorithm,
    "NumIterations": lambda k, v: {"iterations": int(_number(k, v))},
    "LearningRate": lambda k, v: {"learning_rate": _number(k, v)},
    "RegParam": lambda k, v: {"reg_param": _number(k, v)},
    "BetaRange": _beta_range,
    "WarmStart": lambda k, v: {"warm_start": _number(k, v)},
    "EarlyStop": lambda k, v: {"early_stop": _bool(k, v)},
    "UpdateBias": lambda k, v: {"update_bias": _bool(k, v)},
    "DataSize": lambda k, v: {"data_size": int(_number(k, v))},
    "OptimDevice": _cpu,
    "InferDevice": _cpu,
    "BatchSize": lambda k, v: (_number(k, v), {})[1],
    "NumBatches": lambda k, v: (_number(k, v), {})[1],
    "FixedSeed": lambda k, v: (_number(k, v), {})[1],
    "LogPeriod": lambda k, v: (_number(k, v), {})[1],
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
    return params


def _bool(key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"extra_options[{key!r}] must be True or False, got {value!r}")
    return value


def _number(key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"extra_options[{key!r}] must be a number, got {value!r}")
    return float(value)


def _weight_symmetric(key: str, value: Any) -> Dict[str, Any]:
    if not _bool(key, value):
        raise ConfigError("extra_options['WeightSymmetric'] = False is not supported: weights are symmetric int8")
    return {}


# Quark extra_options key -> function(key, value) returning QuantConfig fields.
EXTRA_OPTIONS: Dict[str, Callable[[str, Any], Dict[str, Any]]] = {
    "ActivationSymmetric": lambda k, v: {"activation_symmetric": _bool(k, v)},
    "WeightSymmetric": _weight_symmetric,
    "Percentile": lambda k, v: {"percentile": _number(k, v)},
    "NumBins": lambda k, v: {"num_bins": int(_number(k, v))},
    "CalibDataBatchSize": lambda k, v: {"calib_batch_size": int(_number(k, v))},
    # Cross-layer equalization (CLEOptions): sweeps, convergence tolerance on the scales,
    # Clip -> Relu replacement (changes the network), bias included in the first layer's range.
    "CLESteps": lambda k, v: {"cle.steps": int(_number(k, v))},
    "CLETotalLayerDiffThreshold": lambda k, v: {"cle.tolerance": _number(k, v)},
    "ReplaceClip6Relu": lambda k, v: {"cle.replace_clip_with_relu": _bool(k, v)},
    "CLEScaleAppendBias": lambda k, v: {"cle.scale_append_bias": _bool(k, v)},
    # pyquant's own (not the reference's): activation-aware CLE scales (0 = data-free CLE).
    "CLEActivationWeight": lambda k, v: {"cle.activation_weight": _number(k, v)},
    "CLEActivationSamples": lambda k, v: {"cle.activation_samples": int(_number(k, v))},
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

    calibrate_method: CalibrateMethod = CalibrationMethod.MinMax
    activation_type: QuantType = QuantType.QUInt8
    weight_type: QuantType = QuantType.QInt8
    per_channel: bool = False
    enable_npu_cnn: bool = False
    include_cle: bool = True
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
            fields.setdefault("fast_finetune", fast_finetune_options(DEFAULT_ADAROUND_PARAMS))
        elif "fast_finetune" in fields:
            raise ConfigError("extra_options['FastFinetune'] is given but include_fast_ft is False")
        return QuantConfig(activation_type=self.activation_type, weight_type=self.weight_type,
                           calibrate_method=self.calibrate_method, per_channel=self.per_channel,
                           enable_npu_cnn=self.enable_npu_cnn, cross_layer_equalization=self.include_cle,
                           cle=CLEOptions(**cle_fields), **fields)

    @classmethod
    def from_quant_config(cls, config: QuantConfig) -> "QuantizationConfig":
        extra: Dict[str, Any] = {"ActivationSymmetric": config.activation_symmetric}
        if config.calibrate_method is CalibrationMethod.Percentile:
            extra["Percentile"] = config.percentile
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
        return cls(calibrate_method=config.calibrate_method, activation_type=config.activation_type,
                   weight_type=config.weight_type, per_channel=config.per_channel,
                   enable_npu_cnn=config.enable_npu_cnn, include_cle=config.cross_layer_equalization,
                   include_fast_ft=config.fast_finetune is not None, extra_options=extra)


@dataclasses.dataclass
class Config:
    """Quark's top-level Config: one global QuantizationConfig."""

    global_quant_config: QuantizationConfig


def get_default_config(name: str) -> QuantizationConfig:
    """The preset ``name`` (XINT8, INT8_CLE, INT8_CNN_ACCURATE, A8W8, U8S8) as a Quark-style
    QuantizationConfig."""
    return QuantizationConfig.from_quant_config(get_preset(name))


def resolve(config: Any) -> QuantConfig:
    """Any accepted form of configuration -> QuantConfig: a preset name, a QuantConfig,
    a Quark-style QuantizationConfig or Config."""
    if isinstance(config, QuantConfig):
        return config
    if isinstance(config, str):
        return get_preset(config)
    if isinstance(config, Config):
        config = config.global_quant_config
    if isinstance(config, QuantizationConfig):
        return config.to_quant_config()
    raise ConfigError(f"expected a preset name ({', '.join(PRESETS)}), QuantConfig, QuantizationConfig or Config; "
                      f"got {type(config).__name__}")


class ModelQuantizer:
    """Quark's ModelQuantizer: ``quantize_model(input_path, output_path, data_reader)``."""

    def __init__(self, config: Any, progress: Optional[Callable[[int, Optional[int]], None]] = None) -> None:
        self.config = resolve(config)
        self.progress = progress

    def quantize_model(self, model_input, model_output, calibration_data_reader) -> None:
        from .api import quantize

        quantize(model_input, calibration_data_reader, self.config, output=model_output, progress=self.progress)
