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
}


@dataclasses.dataclass
class QuantizationConfig:
    """Quark's QuantizationConfig fields that pyquant understands (same names, same meaning).

    ``to_quant_config()`` translates into the typed QuantConfig and raises ConfigError for
    anything pyquant cannot honour.
    """

    calibrate_method: CalibrateMethod = CalibrationMethod.MinMax
    activation_type: QuantType = QuantType.QUInt8
    weight_type: QuantType = QuantType.QInt8
    per_channel: bool = False
    enable_npu_cnn: bool = False
    include_cle: bool = False
    include_fast_ft: bool = False
    extra_options: Dict[str, Any] = dataclasses.field(default_factory=dict)

    def to_quant_config(self) -> QuantConfig:
        if self.include_fast_ft:
            raise ConfigError("include_fast_ft: fast finetune is not available in this version of pyquant")
        if not isinstance(self.extra_options, dict):
            raise ConfigError(f"extra_options must be a dict, got {type(self.extra_options).__name__}")
        fields: Dict[str, Any] = {}
        for key, value in self.extra_options.items():
            if key not in EXTRA_OPTIONS:
                raise ConfigError(f"unknown extra_options key {key!r}; valid keys: {', '.join(sorted(EXTRA_OPTIONS))}")
            fields.update(EXTRA_OPTIONS[key](key, value))
        cle_fields = {k.split(".", 1)[1]: fields.pop(k) for k in list(fields) if k.startswith("cle.")}
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
                         CLEScaleAppendBias=config.cle.scale_append_bias)
        return cls(calibrate_method=config.calibrate_method, activation_type=config.activation_type,
                   weight_type=config.weight_type, per_channel=config.per_channel,
                   enable_npu_cnn=config.enable_npu_cnn, include_cle=config.cross_layer_equalization,
                   extra_options=extra)


@dataclasses.dataclass
class Config:
    """Quark's top-level Config: one global QuantizationConfig."""

    global_quant_config: QuantizationConfig


def get_default_config(name: str) -> QuantizationConfig:
    """The preset ``name`` (XINT8, A8W8, U8S8) as a Quark-style QuantizationConfig."""
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
