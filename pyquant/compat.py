"""AMD Quark-compatible configuration API, translated into pyquant's typed QuantConfig.

    from pyquant import Config, ModelQuantizer, QuantizationConfig, get_default_config
    config = Config(global_quant_config=get_default_config("XINT8"))
    ModelQuantizer(config).quantize_model("model.onnx", "model_xint8.onnx", data_reader)

``pyquant.quark`` re-exports these names in Quark's own module layout (replace
``quark.onnx`` with ``pyquant.quark`` in import lines); its ``get_default_config`` gives
Quark's presets by Quark's names (QUARK_PRESETS), this module's gives pyquant's own.

This module only translates: every QuantConfig default comes from pyquant.config, and
quantizing goes through pyquant.api.quantize_detailed, the same entry point as the library
and the CLI. QuantizationConfig has Quark's fields and Quark's defaults. Every field and
key is honoured, accepted with a one-line notice saying why it has no effect here, or
refused with a ConfigError saying what to do instead (README, "Quark drop-in"); an unknown
key is a ConfigError that names the valid ones. Quark's enums (onnxruntime's QuantType,
CalibrationMethod and QuantFormat, VitisQuantType/VitisQuantFormat) are accepted where
they mean what pyquant does.

ModelQuantizer itself carries out the fields that act around a run rather than on the
quantization (print_summary, debug_mode, log_severity_level, ignore_warnings,
use_external_data_format: LayerOptions), resolves the nodes chosen by name against the model
(nodes_to_exclude, nodes_to_quantize, subgraphs_to_exclude, input_nodes, output_nodes:
NodeSelection) into QuantConfig.nodes_to_exclude, and makes a reader without rewind() usable
by a technique that reads the data twice (ReplayReader).
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import enum
import logging
import re
import sys
import tempfile
import warnings
from typing import Any, Callable, Dict, FrozenSet, Iterator, List, Optional, Sequence, Set, Tuple

import numpy as np
from onnx import ModelProto, NodeProto
from onnxruntime.quantization.calibrate import CalibrationMethod as OrtCalibrationMethod
from onnxruntime.quantization.quant_utils import QuantFormat
from onnxruntime.quantization.quant_utils import QuantType as OrtQuantType

from . import api, kernels, runtime
from .config import (CalibrationMethod, CLEOptions, FastFinetuneOptions, FinetuneAlgorithm, PowerOfTwoMethod,
                     QuantConfig, QuantType, get_preset)
from .errors import ConfigError, DataError
from .graph.model_io import check_output_path, load_model, save_model
from .graph.plan import OP_RULES, WEIGHT_ONLY
from .graph.rewrites.opset import MIN_OPSET
from .graph.view import GraphView
from .preparation import prepare_graph
from .techniques import techniques_for

log = logging.getLogger(__name__)
_DEFAULTS = QuantConfig()
# Quark's AdaQuant learning rate is in units of the weights, AdaRound's in units of V.
ADAQUANT_LEARNING_RATE = 1e-5


class VitisQuantType(enum.Enum):
    """Quark's extended quantization types (quark.onnx.quant_utils). pyquant writes the
    8- and 16-bit integer ones (QInt8, QUInt8; QInt16, QUInt16 for activations) and
    QBFloat16 (activations and weights together); the others are refused with the reason."""

    QInt8 = "int8"
    QUInt8 = "uint8"
    QInt16 = "int16"
    QUInt16 = "uint16"
    QInt32 = "int32"
    QUInt32 = "uint32"
    QFloat16 = "float16"
    QBFloat16 = "bfloat16"
    QBFP = "bfp"
    QMX = "mx"


class VitisQuantFormat(enum.Enum):
    """Quark's extended formats. QDQ (Quark's own QuantizeLinear ops) is accepted: pyquant
    writes onnx's standard QuantizeLinear/DequantizeLinear, the same integer arithmetic
    (16-bit types at opset 21)."""

    QDQ = "qdq"
    FixNeuron = "fixneuron"
    BFPFixNeuron = "bfpfixneuron"
    MXFixNeuron = "mxfixneuron"


ExtendedQuantType = VitisQuantType  # Quark's newer names for the same enums
ExtendedQuantFormat = VitisQuantFormat

# ---- values of Quark's enums -> pyquant's ---------------------------------------------------

_QUANT_TYPES: Dict[Any, QuantType] = {  # by member name, for pyquant's, onnxruntime's and Quark's enums
    member: pyquant for enum_class in (QuantType, OrtQuantType, VitisQuantType)
    for member in enum_class for pyquant in QuantType if member.name == pyquant.name
}
_QUANT_TYPES[VitisQuantType.QBFloat16] = QuantType.BFloat16
_INTEGER_TYPES = "use QuantType.QInt8 or QUInt8 (QInt16 or QUInt16 for activations)"
_UNSUPPORTED_TYPES = {  # by member name, for onnxruntime's and Quark's enums alike
    "QInt32": f"32-bit tensors are not supported (only biases are int32); {_INTEGER_TYPES}",
    "QUInt32": f"32-bit tensors are not supported (only biases are int32); {_INTEGER_TYPES}",
    "QInt4": f"4-bit types are not supported; {_INTEGER_TYPES}",
    "QUInt4": f"4-bit types are not supported; {_INTEGER_TYPES}",
    "QFloat16": "pyquant writes integer QDQ models only; keep the float model for float16",
    "QFLOAT8E4M3FN": f"float8 is not supported: pyquant writes integer QDQ models only; {_INTEGER_TYPES}",
    "QBFP": f"block floating point is not supported; {_INTEGER_TYPES}",
    "QMX": f"microscaling (MX) types are not supported; {_INTEGER_TYPES}",
}
_CALIBRATION_METHODS: Dict[Any, Any] = {
    **{m: m for m in CalibrationMethod}, **{m: m for m in PowerOfTwoMethod},
    OrtCalibrationMethod.MinMax: CalibrationMethod.MinMax, OrtCalibrationMethod.Entropy: CalibrationMethod.Entropy,
    OrtCalibrationMethod.Percentile: CalibrationMethod.Percentile,
}
_FORMAT_NOTICES = {
    QuantFormat.QDQ: None,
    VitisQuantFormat.QDQ: "pyquant writes onnx's standard QuantizeLinear/DequantizeLinear (the same integer "
                          "arithmetic; 16-bit types at opset 21), not Quark's custom QDQ ops",
}
_REFUSED_FORMATS = {
    QuantFormat.QOperator: "pyquant writes QDQ models (QuantizeLinear/DequantizeLinear around float ops), not "
                           "QOperator (QLinearConv ...); use QuantFormat.QDQ (onnxruntime fuses it into integer "
                           "kernels)",
    VitisQuantFormat.FixNeuron: "FixNeuron is Quark's experimental, non-deployable op; use QuantFormat.QDQ",
    VitisQuantFormat.BFPFixNeuron: "block floating point is not supported; use QuantFormat.QDQ with an integer type",
    VitisQuantFormat.MXFixNeuron: "microscaling (MX) is not supported; use QuantFormat.QDQ with an integer type",
}


def quant_type(field: str, value: Any) -> QuantType:
    """pyquant's QuantType for a QuantType of pyquant, onnxruntime or Quark: QInt8, QUInt8,
    QInt16, QUInt16 (ConfigError saying what is missing for the others)."""
    if isinstance(value, enum.Enum) and value in _QUANT_TYPES:
        return _QUANT_TYPES[value]
    why = _UNSUPPORTED_TYPES.get(getattr(value, "name", None), "not a quantization type")
    raise ConfigError(f"{field}={value!r}: {why}")


def weight_type(field: str, value: Any) -> QuantType:
    """QuantType.QInt8 (symmetric) or QUInt8 (asymmetric), of pyquant, onnxruntime or Quark."""
    qtype = quant_type(field, value)
    if qtype not in (QuantType.QInt8, QuantType.QUInt8, QuantType.BFloat16):
        raise ConfigError(f"{field}={value!r}: pyquant's weights are int8, uint8 or bfloat16 (16-bit integer types "
                          "are for activations: activation_type QInt16 or QUInt16); use QuantType.QInt8")
    return qtype


def _check_weight_symmetry(weight_type: QuantType, symmetric: bool) -> None:
    """Quark's WeightSymmetric must say what pyquant does with the weight type: int8
    weights are symmetric, uint8 weights asymmetric (Quark's U8U8_AAWA)."""
    if weight_type is QuantType.QUInt8 and symmetric:
        raise ConfigError("weight_type=QUInt8 with extra_options['WeightSymmetric']=True (Quark's default) would be "
                          "symmetric uint8 weights (zero point 128), which pyquant does not write: its uint8 weights "
                          "are asymmetric; set extra_options['WeightSymmetric']=False, or use weight_type=QInt8")
    if weight_type is QuantType.BFloat16 and not symmetric:
        raise ConfigError("extra_options['WeightSymmetric']=False means nothing for bfloat16 weights (no zero "
                          "point); remove it")
    if weight_type is QuantType.QInt8 and not symmetric:
        raise ConfigError("extra_options['WeightSymmetric']=False with int8 weights is not supported: pyquant's "
                          "asymmetric weights are uint8; use weight_type=QUInt8, or WeightSymmetric=True")


def calibrate_method(value: Any):
    """pyquant's calibration method for one of pyquant, onnxruntime (MinMax, Entropy,
    Percentile) or Quark (PowerOfTwoMethod)."""
    if isinstance(value, enum.Enum) and value in _CALIBRATION_METHODS:
        return _CALIBRATION_METHODS[value]
    raise ConfigError(f"calibrate_method={value!r} is not supported; use CalibrationMethod.MinMax, Entropy or "
                      "Percentile (onnxruntime's or pyquant's), pyquant's CalibrationMethod.MSE, or "
                      "PowerOfTwoMethod.NonOverflow / MinMSE")


# ---- value checks and the three kinds of handling ---------------------------------------------

def _where(place: str, key: str) -> str:
    return f"QuantizationConfig.{key}" if place == "field" else f"{place}[{key!r}]"


def _bool(key: str, value: Any, place: str = "extra_options") -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise ConfigError(f"{_where(place, key)} must be True or False, got {value!r}")
    return bool(value)


def _number(key: str, value: Any, place: str = "extra_options") -> float:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ConfigError(f"{_where(place, key)} must be a number, got {value!r}")
    return float(value)


def _integer(key: str, value: Any, place: str = "extra_options") -> int:
    """An integer, or a float with an integral value (12.0); 12.7 is an error, not 12."""
    number = _number(key, value, place)
    if number != int(number):
        raise ConfigError(f"{_where(place, key)} must be a whole number, got {value!r}")
    return int(number)


def _integer_or_none(key: str, value: Any, place: str = "extra_options") -> Optional[int]:
    return None if value is None else _integer(key, value, place)


def _names(key: str, value: Any, place: str = "field") -> Tuple[str, ...]:
    """A list of node names or op types (None or empty: none); a bare string is an error,
    not a list of its letters."""
    if value is None:
        return ()
    if isinstance(value, str) or not isinstance(value, (list, tuple, set, frozenset)) or \
            not all(isinstance(v, str) and v for v in value):
        raise ConfigError(f"{_where(place, key)} must be a list of names, got {value!r}")
    return tuple(value)


def _op_types(key: str, value: Any, place: str = "field") -> Optional[FrozenSet[str]]:
    """Op types to quantize; None or empty: every op type pyquant has a rule for."""
    return frozenset(_names(key, value, place)) or None


def _check_like(expected: Any) -> Callable[..., Any]:
    return _bool if isinstance(expected, bool) else _number


Handler = Callable[[str, Any], Dict[str, Any]]


def notice(why: str, place: str = "extra_options", check: Callable[..., Any] = _bool) -> Handler:
    """A key accepted with a one-line notice: it has no effect in pyquant, for ``why``."""

    def accept(key: str, value: Any) -> Dict[str, Any]:
        check(key, value, place)
        log.warning("%s = %r has no effect in pyquant: %s", _where(place, key), value, why)
        return {}
    return accept


def same_as_pyquant(expected: Any, *, refuse: Optional[str] = None, notice_why: Optional[str] = None,
                    place: str = "extra_options") -> Handler:
    """A key whose value ``expected`` is what pyquant does anyway; another value is refused
    (``refuse``: why, and what to do instead) or accepted with a notice (``notice_why``)."""
    check = _check_like(expected)

    def accept(key: str, value: Any) -> Dict[str, Any]:
        check(key, value, place)
        if value == expected:
            return {}
        if refuse is not None:
            raise ConfigError(f"{_where(place, key)} = {value!r} is not supported: {refuse}")
        log.warning("%s = %r has no effect in pyquant: %s", _where(place, key), value, notice_why)
        return {}
    return accept


def _mapped(field: str, check: Callable[..., Any], place: str = "extra_options") -> Handler:
    return lambda k, v: {field: check(k, v, place)}


# ---- FastFinetune keys -------------------------------------------------------------------------

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
    return {"beta_range": (_number(key, value[0], "FastFinetune"), _number(key, value[1], "FastFinetune"))}


_FT = "FastFinetune"
# Quark FastFinetune key -> function(key, value) returning FastFinetuneOptions fields.
FAST_FINETUNE_OPTIONS: Dict[str, Handler] = {
    "OptimAlgorithm": _algorithm,
    "NumIterations": _mapped("iterations", _integer, _FT),
    "LearningRate": _mapped("learning_rate", _number, _FT),
    "RegParam": _mapped("reg_param", _number, _FT),
    "BetaRange": _beta_range,
    "WarmStart": _mapped("warm_start", _number, _FT),
    "UpdateBias": _mapped("update_bias", _bool, _FT),
    "DataSize": _mapped("data_size", _integer, _FT),
    # pyquant's own: at most this many calibration batches; per output channel, nearest
    # rounding kept where the learned one does not lower the layer's output error.
    "DataBatches": _mapped("data_batches", _integer, _FT),
    "FallbackToNearest": _mapped("early_stop", _bool, _FT),
    "OptimDevice": _cpu,
    "InferDevice": _cpu,
    # Quark's EarlyStop ends a layer's iterations once the mean loss over a window of
    # NumBatches iterations stops falling; pyquant runs every iteration.
    "EarlyStop": same_as_pyquant(False, place=_FT, refuse="pyquant runs all NumIterations of every layer (Quark "
                                 "ends a layer once its windowed mean loss stops falling); remove the key or set "
                                 "it False, and lower NumIterations to save time"),
    "NumBatches": notice("each iteration uses the Gram matrix of all calibration samples: no mini-batches, no "
                         "early-stop window (pyquant's DataBatches limits the batches read)", _FT, _number),
    "BatchSize": notice("every iteration uses the Gram matrix of all calibration samples (no mini-batches)", _FT,
                        _number),
    "FixedSeed": notice("fast finetune draws no random numbers (it is deterministic)", _FT, _number),
    "LogPeriod": notice("each layer's fit runs in C++ without intermediate logs; its result is logged", _FT, _number),
    "SelectiveUpdate": same_as_pyquant(False, place=_FT, refuse="pyquant does not re-evaluate the whole model after "
                                       "each layer; its FallbackToNearest keeps nearest rounding per channel where "
                                       "the learned rounding does not help"),
    "OutputQDQ": same_as_pyquant(False, place=_FT, refuse="pyquant fits each layer's output before its activation "
                                 "quantizer; remove the key"),
    "DropRatio": same_as_pyquant(1, place=_FT, refuse="pyquant fits on the inputs the quantized network produces "
                                 "(DropRatio 1); float inputs measured worse (README, fast finetune)"),
}
REFUSED_FAST_FINETUNE_OPTIONS: Dict[str, str] = {
    "LRAdjust": "no per-layer learning rate; set LearningRate for all layers",
    "TargetOpType": "pyquant fine-tunes every quantized Conv, Gemm and MatMul; choosing which ones is not available "
                    "(a layer left in float by nodes_to_exclude or op_types_to_quantize is not fine-tuned)",
}


def fast_finetune_options(params: Any) -> FastFinetuneOptions:
    """Quark's extra_options['FastFinetune'] dict -> FastFinetuneOptions (ConfigError on an
    unknown or refused key or a bad value)."""
    if not isinstance(params, dict):
        raise ConfigError(f"extra_options['FastFinetune'] must be a dict, got {type(params).__name__}")
    fields: Dict[str, Any] = {}
    for key, value in params.items():
        if key in REFUSED_FAST_FINETUNE_OPTIONS:
            raise ConfigError(f"FastFinetune[{key!r}] is not supported: {REFUSED_FAST_FINETUNE_OPTIONS[key]}")
        if key not in FAST_FINETUNE_OPTIONS:
            raise ConfigError(f"unknown FastFinetune key {key!r}; valid keys: "
                              f"{', '.join(sorted(FAST_FINETUNE_OPTIONS))}")
        fields.update(FAST_FINETUNE_OPTIONS[key](key, value))
    return FastFinetuneOptions(**fields)


def fast_finetune_params(options: FastFinetuneOptions) -> Dict[str, Any]:
    """FastFinetuneOptions -> Quark-style FastFinetune dict (the keys with an effect)."""
    params: Dict[str, Any] = {
        "OptimAlgorithm": options.algorithm.value, "NumIterations": options.iterations,
        "LearningRate": options.learning_rate, "RegParam": options.reg_param,
        "BetaRange": tuple(options.beta_range), "WarmStart": options.warm_start,
        "FallbackToNearest": options.early_stop, "UpdateBias": options.update_bias,
    }
    if options.data_size is not None:
        params["DataSize"] = options.data_size
    if options.data_batches is not None:
        params["DataBatches"] = options.data_batches
    return params


# Quark's DEFAULT_ADAROUND_PARAMS / DEFAULT_ADAQUANT_PARAMS with pyquant's defaults
# (pyquant.config.FastFinetuneOptions), so that include_fast_ft=True, these dicts and
# --fast_finetune all quantize alike.
DEFAULT_ADAROUND_PARAMS: Dict[str, Any] = fast_finetune_params(FastFinetuneOptions())
DEFAULT_ADAQUANT_PARAMS: Dict[str, Any] = fast_finetune_params(
    FastFinetuneOptions(algorithm=FinetuneAlgorithm.AdaQuant, learning_rate=ADAQUANT_LEARNING_RATE))

# ---- extra_options keys --------------------------------------------------------------------------

_MIXED = "extra_options['MixedPrecisionTensor']"


def _mixed_precision(key: str, value: Any) -> Dict[str, Any]:
    """Quark's {QuantType: [tensor names]} -> QuantConfig.tensor_types {name: QuantType}
    (activation tensors; the run checks that each name is a quantized activation)."""
    if not isinstance(value, dict):
        raise ConfigError(f"{_MIXED} must be a dict {{QuantType: [tensor names]}}, got {value!r}")
    types: Dict[str, QuantType] = {}
    for given, names in value.items():
        qtype = quant_type(f"{_MIXED} key", given)
        if qtype.is_float:
            raise ConfigError(f"{_MIXED} key {given!r}: bfloat16 is for whole models (the BF16 preset); tensors "
                              "raised to more precision take QInt16 or QUInt16")
        for name in _names(getattr(given, "name", str(given)), names, _MIXED):
            if types.setdefault(name, qtype) is not qtype:
                raise ConfigError(f"{_MIXED}: tensor {name!r} is given two types, {types[name].name} and "
                                  f"{qtype.name}; list it under one")
    return {"tensor_types": types}


_DATA_MOVEMENT = ("pyquant quantizes a data-movement op (MaxPool, Reshape, Slice, ...) when a quantized op reads its "
                  "output, with enable_npu_cnn also when one produces its input")

# Quark extra_options key -> function(key, value) returning QuantConfig fields.
EXTRA_OPTIONS: Dict[str, Handler] = {
    "ActivationSymmetric": _mapped("activation_symmetric", _bool),
    # checked against weight_type in QuantizationConfig.translate: int8 weights are
    # symmetric, uint8 weights asymmetric
    "WeightSymmetric": _mapped("check.weight_symmetric", _bool),
    "Percentile": _mapped("percentile", _number),
    "NumBins": _mapped("num_bins", _integer),
    "CalibDataBatchSize": _mapped("calib_batch_size", _integer),
    # Cross-layer equalization (CLEOptions): sweeps, convergence tolerance on the scales,
    # Clip -> Relu replacement (changes the network), bias included in the first layer's range.
    "CLESteps": _mapped("cle.steps", _integer),
    "CLETotalLayerDiffThreshold": _mapped("cle.tolerance", _number),
    "ReplaceClip6Relu": _mapped("cle.replace_clip_with_relu", _bool),
    "CLEScaleAppendBias": _mapped("cle.scale_append_bias", _bool),
    # pyquant's own (not the reference's): activation-aware CLE scales (0 = data-free CLE).
    "CLEActivationWeight": _mapped("cle.activation_weight", _number),
    "CLEActivationSamples": _mapped("cle.activation_samples", _integer),
    # pyquant's own: QDQ pairs on model outputs and tensors read only by float ops.
    "QuantizeRegionOutputs": _mapped("quantize_region_outputs", _bool),
    # pyquant's own: whole activation ranges near the outputs, except near the inputs (None: off).
    "UnclippedOutputLayers": _mapped("unclipped_output_layers", _integer_or_none),
    "ClippedInputLayers": _mapped("clipped_input_layers", _integer_or_none),
    # Per-tensor activation types ({QuantType: [tensor names]}), with specific_tensor_precision=True.
    "MixedPrecisionTensor": _mixed_precision,
    # Quark's extra_options form of QuantizationConfig.op_types_to_quantize (both given: they must agree).
    "OpTypesToQuantize": lambda k, v: {"select.op_types_option": _op_types(k, v, "extra_options")},
    # Fast finetune (FastFinetuneOptions), a dict with the keys of FAST_FINETUNE_OPTIONS.
    "FastFinetune": lambda k, v: {"fast_finetune": fast_finetune_options(v)},
    # Keys Quark's presets set, with what they mean here.
    "ForceQuantizeNoInputCheck": notice(_DATA_MOVEMENT),
    "Int32Bias": same_as_pyquant(True, refuse="through this layer a quantized layer's bias is int32 with scale = "
                                 "input scale x weight scale; remove the key (int8 NPU biases: pyquant's "
                                 "QuantConfig(int32_bias=False))"),
    "Int16Bias": same_as_pyquant(False, refuse="a quantized layer's bias is int32; remove the key"),
    "QuantizeBias": same_as_pyquant(True, refuse="a quantized layer's bias is always int32; remove the key"),
    "FoldRelu": same_as_pyquant(True, refuse="Relu/Clip after Conv/Gemm/MatMul/Add is always fused with it (no QDQ "
                                "pair between them); remove the key"),
    "AlignConcat": notice("Concat inputs and output share one scale exactly when enable_npu_cnn is on"),
    "AlignSlice": same_as_pyquant(True, notice_why="Slice, a data-movement op, always keeps its input's scale"),
    "AlignEltwiseQuantType": notice("a constant operand of an elementwise op, when quantized, already takes the "
                                    "activation type (16-bit ones too)"),
    "CalibMovingAverage": same_as_pyquant(False, refuse="MinMax takes the extremes over all calibration data; for "
                                          "ranges robust to outliers use CalibrationMethod.Percentile"),
    "UseRandomData": same_as_pyquant(False, refuse="calibrating on random inputs gives meaningless ranges; pass a "
                                     "data reader or calibration_data_path"),
    "WeightsOnly": same_as_pyquant(False, refuse="pyquant quantizes activations and weights; for weight-only "
                                   "quantization use onnxruntime.quantization"),
    "BF16QDQToCast": notice("bfloat16 is always written as Cast pairs (float -> bfloat16 -> float), which "
                            "onnxruntime runs without Quark's custom ops"),
    "QuantizeAllOpTypes": same_as_pyquant(False, refuse="ops without a quantized form in pyquant stay float (the "
                                          "run report names them); remove the key"),
    "ConvertSigmoidToHardSigmoid": same_as_pyquant(False, refuse="it changes the network's function; pyquant "
                                                   "keeps Sigmoid"),
    "UseMatMulNBits": same_as_pyquant(False, refuse="weight-only MatMulNBits is onnxruntime's "
                                      "(onnxruntime.quantization.matmul_nbits_quantizer)"),
    "ConvertBNToConv": notice("pyquant folds BatchNormalization into the neighbouring Conv/Gemm where exact; "
                              "one it cannot fold stays float"),
    "ConvertClipToRelu": notice("pyquant keeps Clip (fused with its layer); only ReplaceClip6Relu changes it, for CLE"),
    "ConvertSplitToSlice": notice("Split is a data-movement op: its outputs keep its input's scale"),
    "SplitLargeKernelPool": notice("pooling kernels are left as they are (an NPU compiler's concern)"),
    "ConvertReduceMeanToGlobalAvgPool": notice("ReduceMean is left as it is (computed in float)"),
    "RemoveQDQConvRelu": same_as_pyquant(True, notice_why="Relu after a layer is always fused with it"),
    "RemoveQDQConvClip": same_as_pyquant(True, notice_why="Clip after a layer is always fused with it"),
    "RemoveQDQConvLeakyRelu": notice("LeakyRelu is not fused: it stays float between quantized layers, or has its "
                                     "own QDQ pair with enable_npu_cnn"),
    "RemoveQDQConvPRelu": notice("PRelu is not fused: it stays float between quantized layers, or has its own QDQ "
                                 "pair with enable_npu_cnn"),
    "DedicatedQDQPair": same_as_pyquant(False, notice_why="one QDQ pair per tensor, shared by its readers (the "
                                        "same values as dedicated pairs)"),
    "DedicateDQNode": same_as_pyquant(False, notice_why="one DequantizeLinear per tensor, shared by its readers"),
}
REFUSED_EXTRA_OPTIONS: Dict[str, str] = {
    "CalibDataSize": "pyquant calibrates on every sample the data reader gives; limit the reader instead (e.g. the "
                     "tutorial ImageDataReader's data_size)",
    "AutoMixprecision": "Quark's automatic mixed precision settings are not translated; pyquant's runs separately: "
                        "pyquant.analysis.auto_mixed_precision (CLI: pyquant mixed_precision) with a target",
    "BFPAttributes": "block floating point is not supported; use an integer type (8 or 16 bits)",
    "MXAttributes": "microscaling (MX) types are not supported; use an integer type (8 or 16 bits)",
    "MatMulNBitsParams": "weight-only MatMulNBits is onnxruntime's (onnxruntime.quantization.matmul_nbits_quantizer)",
}


def _extra_options(extra: Any) -> Dict[str, Any]:
    if not isinstance(extra, dict):
        raise ConfigError(f"extra_options must be a dict, got {type(extra).__name__}")
    fields: Dict[str, Any] = {}
    for key, value in extra.items():
        if key in REFUSED_EXTRA_OPTIONS:
            raise ConfigError(f"extra_options[{key!r}] is not supported: {REFUSED_EXTRA_OPTIONS[key]}")
        if key not in EXTRA_OPTIONS:
            raise ConfigError(f"unknown extra_options key {key!r}; valid keys: {', '.join(sorted(EXTRA_OPTIONS))}")
        fields.update(EXTRA_OPTIONS[key](key, value))
    return fields


# ---- node selection ----------------------------------------------------------------------------------

# An entry of nodes_to_exclude that names no node and contains this is a regular expression
# (as in Quark: "^/layer0/.*"), matched against whole node names.
_PATTERN_MARK = ".*"


def nodes_between(view: GraphView, starts: Optional[Sequence[NodeProto]],
                  ends: Optional[Sequence[NodeProto]]) -> List[NodeProto]:
    """The nodes on a path from a node of ``starts`` to a node of ``ends``, both included,
    in graph order; ``starts`` None: from anywhere, ``ends`` None: to anywhere."""
    every = {id(n) for n in view.graph.node}
    downstream = every if starts is None else _reachable(view, starts, forward=True)
    upstream = every if ends is None else _reachable(view, ends, forward=False)
    return [n for n in view.graph.node if id(n) in downstream and id(n) in upstream]


def _reachable(view: GraphView, nodes: Sequence[NodeProto], forward: bool) -> Set[int]:
    """ids of ``nodes`` and of every node after them (forward) or before them."""
    seen = {id(n) for n in nodes}
    pending = list(nodes)
    while pending:
        node = pending.pop()
        if forward:
            nxt = [reader for out in node.output for reader in view.consumers.get(out, [])]
        else:
            nxt = [view.producer[name] for name in node.input if name in view.producer]
        for other in nxt:
            if id(other) not in seen:
                seen.add(id(other))
                pending.append(other)
    return seen


class ModelNodes:
    """The node names of a user's model, resolved to the nodes of the graph pyquant
    quantizes: the model after graph preparation (pyquant.preparation), whose rewrites
    merge some nodes into others. A name may be one of the prepared graph or of the model
    as given; a node preparation merged into another (a BatchNormalization into its Conv, a
    constant Mul into its layer, the parts of a written-out hard-swish) stands for the node
    that now computes its output. Unnamed nodes are named OpType(first output)."""

    def __init__(self, model: ModelProto, min_opset: int = MIN_OPSET) -> None:
        self.original = GraphView(model)
        with _quiet():  # the run prepares the model again (the same way), and reports it then
            self.prepared = GraphView(prepare_graph(model, (), min_opset)[0])
        self._prepared = _by_name(self.prepared)
        self._given = _by_name(self.original)

    def find(self, field: str, name: str) -> Optional[NodeProto]:
        """The prepared node ``name`` stands for (None for a Constant, which preparation
        turns into an initializer); ConfigError if no node has that name."""
        if name in self._prepared:
            return self._prepared[name]
        if name not in self._given:
            raise ConfigError(f"QuantizationConfig.{field}: {name!r} names no node of the model")
        return self._counterpart(self._given[name])

    def endpoint(self, field: str, name: str) -> NodeProto:
        node = self.find(field, name)
        if node is None:
            raise ConfigError(f"QuantizationConfig.{field}: {name!r} is a Constant node (graph preparation makes it "
                              "an initializer); name a node that computes")
        return node

    def select(self, field: str, entry: str) -> List[NodeProto]:
        """The prepared nodes an entry of ``field`` stands for: a name, or a regular
        expression (an entry with '.*' that names no node)."""
        if _PATTERN_MARK in entry and entry not in self._prepared and entry not in self._given:
            return self._matching(field, entry)
        node = self.find(field, entry)
        return [] if node is None else [node]

    def _matching(self, field: str, pattern: str) -> List[NodeProto]:
        """The prepared nodes whose name, or whose original node's name, matches ``pattern``."""
        regex = re.compile(pattern)
        found = {id(n): n for name, n in self._prepared.items() if regex.fullmatch(name)}
        for name, node in self._given.items():
            counterpart = self._counterpart(node) if regex.fullmatch(name) else None
            if counterpart is not None:
                found[id(counterpart)] = counterpart
        if not found:
            raise ConfigError(f"QuantizationConfig.{field}: the regular expression {pattern!r} matches no node name "
                              "of the model")
        return list(found.values())

    def _counterpart(self, node: NodeProto) -> Optional[NodeProto]:
        """The prepared node that computes the first of ``node``'s outputs, or of its
        readers' outputs, still produced by a node."""
        if node.op_type == "Constant":
            return None
        pending, seen = list(node.output), set()
        while pending:
            tensor = pending.pop(0)
            if tensor in self.prepared.producer:
                return self.prepared.producer[tensor]
            seen.add(tensor)
            pending += [out for reader in self.original.consumers.get(tensor, []) for out in reader.output
                        if out and out not in seen]
        return None


def _by_name(view: GraphView) -> Dict[str, NodeProto]:
    names = {view.node_name(n): n for n in view.graph.node}
    names.update({n.name: n for n in view.graph.node if n.name})
    return names


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """pyquant's INFO and DEBUG messages off (warnings stay)."""
    logger = logging.getLogger("pyquant")
    saved = logger.level
    logger.setLevel(max(logger.getEffectiveLevel(), logging.WARNING))
    try:
        yield
    finally:
        logger.setLevel(saved)


@dataclasses.dataclass(frozen=True)
class NodeSelection:
    """Quark's choice of nodes by name, which needs the model: ModelQuantizer resolves it
    (ModelNodes) into QuantConfig.nodes_to_exclude.

    Attributes:
        nodes_to_exclude: names, or regular expressions (entries with '.*', matched against
            whole names), of nodes left in float.
        nodes_to_quantize: when given, only these nodes are quantized.
        subgraphs_to_exclude: (start names, end names) pairs: the nodes on a path from a start
            to an end node, both included, are left in float.
        input_nodes / output_nodes: when given, only the nodes on a path from an input node
            (from anywhere, if none) to an output node (to anywhere, if none) are quantized.
    Exclusions win over nodes_to_quantize and the input/output region.
    """

    nodes_to_exclude: Tuple[str, ...] = ()
    nodes_to_quantize: Tuple[str, ...] = ()
    subgraphs_to_exclude: Tuple[Tuple[Tuple[str, ...], Tuple[str, ...]], ...] = ()
    input_nodes: Tuple[str, ...] = ()
    output_nodes: Tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return any(getattr(self, f.name) for f in dataclasses.fields(self))

    @property
    def names(self) -> FrozenSet[str]:
        """The entries of nodes_to_exclude that are plain names (all the core takes)."""
        return frozenset(n for n in self.nodes_to_exclude if _PATTERN_MARK not in n)

    @property
    def fields_needing_model(self) -> List[str]:
        """The fields that only resolve against a model."""
        fields = [f.name for f in dataclasses.fields(self) if f.name != "nodes_to_exclude" and getattr(self, f.name)]
        if self.names != frozenset(self.nodes_to_exclude):
            fields.insert(0, "nodes_to_exclude (regular expressions)")
        return fields

    def resolve(self, model: ModelProto, min_opset: int = MIN_OPSET) -> FrozenSet[str]:
        """The names, in the graph prepared at ``min_opset`` (QuantConfig.min_opset, as the
        run prepares it), of the nodes this selection leaves in float; ConfigError for a name
        that matches no node, or a region without a path."""
        nodes = ModelNodes(model, min_opset)
        view = nodes.prepared
        excluded = [n for entry in self.nodes_to_exclude for n in nodes.select("nodes_to_exclude", entry)]
        for i, (starts, ends) in enumerate(self.subgraphs_to_exclude):
            field = f"subgraphs_to_exclude[{i}]"
            excluded += _region(view, [nodes.endpoint(field, n) for n in starts],
                                [nodes.endpoint(field, n) for n in ends], f"QuantizationConfig.{field}")
        kept: List[Set[int]] = []
        if self.nodes_to_quantize:
            kept.append({id(nodes.find("nodes_to_quantize", n)) for n in self.nodes_to_quantize})
        if self.input_nodes or self.output_nodes:
            starts = [nodes.endpoint("input_nodes", n) for n in self.input_nodes] or None
            ends = [nodes.endpoint("output_nodes", n) for n in self.output_nodes] or None
            kept.append({id(n) for n in _region(view, starts, ends, "QuantizationConfig.input_nodes/output_nodes")})
        excluded += [n for n in view.graph.node if any(id(n) not in region for region in kept)]
        return frozenset(view.node_name(n) for n in excluded)


def _region(view: GraphView, starts: Optional[List[NodeProto]], ends: Optional[List[NodeProto]],
            where: str) -> List[NodeProto]:
    """nodes_between, where every start and end node must be on a path from a start to an end."""
    region = nodes_between(view, starts, ends)
    inside = {id(n) for n in region}
    stray = [view.node_name(n) for n in (starts or []) + (ends or []) if id(n) not in inside]
    if stray:
        raise ConfigError(f"{where}: {', '.join(map(repr, stray))} {'is' if len(stray) == 1 else 'are'} on no path "
                          "from the start nodes "
                          f"{[view.node_name(n) for n in starts or []]} to the end nodes "
                          f"{[view.node_name(n) for n in ends or []]} (are starts and ends swapped?)")
    return region


# ---- QuantizationConfig fields ------------------------------------------------------------------

SEVERITY_LEVELS = {0: logging.DEBUG, 1: logging.INFO, 2: logging.WARNING, 3: logging.ERROR, 4: logging.CRITICAL}


@dataclasses.dataclass(frozen=True)
class LayerOptions:
    """What ModelQuantizer does around a run (QuantizationConfig fields that are not
    quantization settings), with Quark's defaults.

    Attributes:
        use_external_data_format: write the initializers to ``<output>.data`` beside the model.
        print_summary: log a summary of the quantized model (nodes per op type, quantized or
            float, and why) at INFO when the run ends.
        debug_mode: log pyquant's DEBUG messages too, and list each float node in the summary.
        ignore_warnings: Python warnings raised during the run are not shown.
        log_severity_level: pyquant's messages from this level on are shown (0 DEBUG, 1 INFO,
            2 WARNING, 3 ERROR, 4 CRITICAL): the "pyquant" logger's level for the run, and, when
            the application has not set up logging, a handler printing them on stderr.
        selection: the nodes chosen by name, resolved against the model into
            QuantConfig.nodes_to_exclude (NodeSelection).
    """

    use_external_data_format: bool = False
    print_summary: bool = True
    debug_mode: bool = False
    ignore_warnings: bool = True
    log_severity_level: int = 1
    selection: NodeSelection = NodeSelection()


_LAYER = LayerOptions()


def _layer_bool(name: str) -> Handler:
    return lambda k, v: {f"layer.{name}": _bool(k, v, "field")}


def _log_level(key: str, value: Any) -> Dict[str, Any]:
    if isinstance(value, bool) or value not in SEVERITY_LEVELS:
        raise ConfigError(f"QuantizationConfig.{key} must be one of {sorted(SEVERITY_LEVELS)}, got {value!r}")
    return {f"layer.{key}": int(value)}


def _quant_format(key: str, value: Any) -> Dict[str, Any]:
    if isinstance(value, enum.Enum) and value in _REFUSED_FORMATS:
        raise ConfigError(f"quant_format={value!r} is not supported: {_REFUSED_FORMATS[value]}")
    if not isinstance(value, enum.Enum) or value not in _FORMAT_NOTICES:
        raise ConfigError(f"quant_format={value!r} is not a quantization format; use QuantFormat.QDQ")
    if _FORMAT_NOTICES[value] is not None:
        log.warning("QuantizationConfig.quant_format = %r: %s", value, _FORMAT_NOTICES[value])
    return {}


def _subgraphs(key: str, value: Any) -> Dict[str, Any]:
    """[(start node names, end node names), ...]; a name alone stands for a list of one."""
    if value is not None and not isinstance(value, (list, tuple)):
        raise ConfigError(f"QuantizationConfig.{key} must be a list of (start nodes, end nodes) pairs, got {value!r}")
    pairs = []
    for pair in value or ():
        if not isinstance(pair, (list, tuple)) or len(pair) != 2:
            raise ConfigError(f"QuantizationConfig.{key} must be a list of (start nodes, end nodes) pairs, got "
                              f"{pair!r} in it")
        sides = tuple(_names(key, [side] if isinstance(side, str) else side) for side in pair)
        if not all(sides):
            raise ConfigError(f"QuantizationConfig.{key}: {pair!r} needs at least one start and one end node")
        pairs.append(sides)
    return {f"select.{key}": tuple(pairs)}


def _node_names(key: str, value: Any) -> Dict[str, Any]:
    return {f"select.{key}": _names(key, value)}


def _names_to_exclude(key: str, value: Any) -> Dict[str, Any]:
    """Node names, or regular expressions (entries with '.*')."""
    names = _names(key, value)
    for name in names:
        if _PATTERN_MARK in name:
            try:
                re.compile(name)
            except re.error as e:
                raise ConfigError(f"QuantizationConfig.{key}: {name!r} is not a regular expression ({e})") from None
    return {f"select.{key}": names}


def _execution_providers(key: str, value: Any) -> Dict[str, Any]:
    if value is None or (isinstance(value, (list, tuple)) and all(isinstance(p, str) for p in value)):
        if value and list(value) != ["CPUExecutionProvider"]:
            log.warning("QuantizationConfig.%s = %r has no effect in pyquant: calibration runs on onnxruntime's "
                        "CPUExecutionProvider", key, value)
        return {}
    raise ConfigError(f"QuantizationConfig.{key} must be a list of onnxruntime provider names, got {value!r}")


def _field(name: str, check: Callable[..., Any] = _bool) -> Handler:
    return lambda k, v: {name: check(k, v, "field")}


# QuantizationConfig field -> function(name, value) returning QuantConfig fields ("layer.x":
# LayerOptions fields). extra_options, include_cle and include_fast_ft are handled after.
FIELDS: Dict[str, Handler] = {
    "calibrate_method": lambda k, v: {"calibrate_method": calibrate_method(v)},
    "quant_format": _quant_format,
    "activation_type": lambda k, v: {"activation_type": quant_type(k, v)},
    "weight_type": lambda k, v: {"weight_type": weight_type(k, v)},
    # Node selection (NodeSelection): names are resolved against the model by ModelQuantizer.
    "input_nodes": _node_names,
    "output_nodes": _node_names,
    "op_types_to_quantize": lambda k, v: {"select.op_types": _op_types(k, v)},
    "nodes_to_quantize": _node_names,
    "extra_op_types_to_quantize": lambda k, v: {"select.extra_op_types": frozenset(_names(k, v))},
    "nodes_to_exclude": _names_to_exclude,
    "subgraphs_to_exclude": _subgraphs,
    # Turns on extra_options['MixedPrecisionTensor'] (checked with it in QuantizationConfig.translate).
    "specific_tensor_precision": lambda k, v: {"specific_tensor_precision": _bool(k, v, "field")},
    "execution_providers": _execution_providers,
    "per_channel": _field("per_channel"),
    "reduce_range": same_as_pyquant(False, place="field", refuse="weights use the full int8 range; 7-bit weights "
                                    "are for x86 CPUs without VNNI, remove it"),
    "optimize_model": same_as_pyquant(True, place="field", notice_why="pyquant always prepares the graph (opset "
                                      "upgrade, BatchNormalization and constant folding, each checked to keep the "
                                      "outputs)"),
    "use_dynamic_quant": same_as_pyquant(False, place="field", refuse="pyquant quantizes statically (calibrated "
                                         "activations); use onnxruntime.quantization.quantize_dynamic"),
    "use_external_data_format": _layer_bool("use_external_data_format"),
    "convert_fp16_to_fp32": same_as_pyquant(False, place="field", refuse="pyquant takes float32 models; convert the "
                                            "model to float32 first"),
    "convert_nchw_to_nhwc": same_as_pyquant(False, place="field", refuse="pyquant keeps the model's layout"),
    "include_sq": same_as_pyquant(False, place="field", refuse="SmoothQuant is not available; for CNNs use "
                                  "include_cle"),
    "include_rotation": same_as_pyquant(False, place="field", refuse="rotation (QuaRot) is not available"),
    "include_cle": _field("cross_layer_equalization"),
    "include_auto_mp": same_as_pyquant(False, place="field", refuse="Quark's automatic mixed precision is not translated; use "
                                    "pyquant.analysis.auto_mixed_precision (CLI: pyquant mixed_precision)"),
    "include_fast_ft": lambda k, v: {"include_fast_ft": _bool(k, v, "field")},
    "enable_npu_cnn": _field("enable_npu_cnn"),
    "enable_npu_transformer": same_as_pyquant(False, place="field", refuse="pyquant's NPU rules are for CNNs "
                                              "(enable_npu_cnn)"),
    "debug_mode": _layer_bool("debug_mode"),
    "crypto_mode": same_as_pyquant(False, place="field", refuse="pyquant has no encrypted mode"),
    "print_summary": _layer_bool("print_summary"),
    "ignore_warnings": _layer_bool("ignore_warnings"),
    "log_severity_level": _log_level,
}


def _selected_op_types(field: Optional[FrozenSet[str]], option: Optional[FrozenSet[str]],
                       extra: FrozenSet[str]) -> Optional[FrozenSet[str]]:
    """QuantConfig.op_types_to_quantize from the field, extra_options['OpTypesToQuantize']
    (the same, if both are given) and extra_op_types_to_quantize (added to them)."""
    if field is not None and option is not None and field != option:
        raise ConfigError(f"QuantizationConfig.op_types_to_quantize {sorted(field)} and "
                          f"extra_options['OpTypesToQuantize'] {sorted(option)} differ; give one of them")
    chosen = field if field is not None else option
    if chosen is not None:
        return chosen | extra
    if extra:
        no_rule = sorted(extra - set(OP_RULES) - set(WEIGHT_ONLY))
        log.warning("QuantizationConfig.extra_op_types_to_quantize = %s has no effect in pyquant: every op type "
                    "pyquant has a rule for is quantized already%s", sorted(extra),
                    f" ({', '.join(no_rule)}: no rule, left in float)" if no_rule else "")
    return None


def _check_mixed_precision(flag: bool, types: Optional[Dict[str, QuantType]]) -> None:
    """specific_tensor_precision=True needs tensors in MixedPrecisionTensor; tensors given
    without the flag are applied, with a notice (Quark's QuantizationConfig needs the flag)."""
    if flag and not types:
        raise ConfigError("QuantizationConfig.specific_tensor_precision=True lists no tensors: give "
                          f"{_MIXED} = {{QuantType.QInt16: ['tensor name', ...]}} (activation tensors quantized to "
                          "that type instead of activation_type), or set specific_tensor_precision=False")
    if types and not flag:
        log.warning("%s is applied without QuantizationConfig.specific_tensor_precision=True; Quark applies it only "
                    "with the flag: set specific_tensor_precision=True so that the script means the same on both",
                    _MIXED)


@dataclasses.dataclass
class QuantizationConfig:
    """Quark's QuantizationConfig: the same fields with Quark's defaults (include_cle is
    True and activation_type QInt8 as in Quark; per_channel False, MinMax calibration), so
    that a config ported from Quark means the same. ``to_quant_config()`` translates into
    the typed QuantConfig; ModelQuantizer also carries out the LayerOptions fields.
    specific_tensor_precision=True with extra_options['MixedPrecisionTensor'] ({QuantType:
    [activation tensor names]}) gives those tensors their own types (QuantConfig.tensor_types)."""

    calibrate_method: Any = CalibrationMethod.MinMax
    quant_format: Any = QuantFormat.QDQ
    activation_type: Any = QuantType.QInt8  # Quark's default
    weight_type: Any = QuantType.QInt8
    input_nodes: List[str] = dataclasses.field(default_factory=list)
    output_nodes: List[str] = dataclasses.field(default_factory=list)
    op_types_to_quantize: List[str] = dataclasses.field(default_factory=list)
    nodes_to_quantize: List[str] = dataclasses.field(default_factory=list)
    extra_op_types_to_quantize: List[str] = dataclasses.field(default_factory=list)
    nodes_to_exclude: List[str] = dataclasses.field(default_factory=list)
    subgraphs_to_exclude: List[Any] = dataclasses.field(default_factory=list)
    specific_tensor_precision: bool = False
    execution_providers: List[str] = dataclasses.field(default_factory=lambda: ["CPUExecutionProvider"])
    per_channel: bool = _DEFAULTS.per_channel
    reduce_range: bool = False
    optimize_model: bool = True
    use_dynamic_quant: bool = False
    use_external_data_format: bool = _LAYER.use_external_data_format
    convert_fp16_to_fp32: bool = False
    convert_nchw_to_nhwc: bool = False
    include_sq: bool = False
    include_rotation: bool = False
    include_cle: bool = True  # Quark's default, not QuantConfig's
    include_auto_mp: bool = False
    include_fast_ft: bool = False
    enable_npu_cnn: bool = _DEFAULTS.enable_npu_cnn
    enable_npu_transformer: bool = False
    debug_mode: bool = _LAYER.debug_mode
    crypto_mode: bool = False
    print_summary: bool = _LAYER.print_summary
    ignore_warnings: bool = _LAYER.ignore_warnings
    log_severity_level: int = _LAYER.log_severity_level
    extra_options: Dict[str, Any] = dataclasses.field(default_factory=dict)

    def translate(self) -> Tuple[QuantConfig, LayerOptions]:
        """The typed QuantConfig and what ModelQuantizer does around the run; ConfigError for
        anything pyquant cannot honour, a one-line notice for what has no effect here."""
        fields: Dict[str, Any] = {}
        for f in dataclasses.fields(self):
            if f.name != "extra_options":
                fields.update(FIELDS[f.name](f.name, getattr(self, f.name)))
        fields.update(_extra_options(self.extra_options))
        layer = {k.split(".", 1)[1]: fields.pop(k) for k in list(fields) if k.startswith("layer.")}
        cle = {k.split(".", 1)[1]: fields.pop(k) for k in list(fields) if k.startswith("cle.")}
        select = {k.split(".", 1)[1]: fields.pop(k) for k in list(fields) if k.startswith("select.")}
        if fields.pop("include_fast_ft"):
            fields.setdefault("fast_finetune", FastFinetuneOptions())
        elif "fast_finetune" in fields:
            raise ConfigError("extra_options['FastFinetune'] is given but include_fast_ft is False")
        _check_mixed_precision(fields.pop("specific_tensor_precision"), fields.get("tensor_types"))
        _check_weight_symmetry(fields["weight_type"], fields.pop("check.weight_symmetric", True))
        op_types = _selected_op_types(select.pop("op_types"), select.pop("op_types_option", None),
                                      select.pop("extra_op_types"))
        selection = NodeSelection(**select)
        config = QuantConfig(cle=CLEOptions(**cle), nodes_to_exclude=selection.names, op_types_to_quantize=op_types,
                             **fields)
        return config, LayerOptions(selection=selection, **layer)

    def to_quant_config(self) -> QuantConfig:
        """The typed QuantConfig (what pyquant.quantize and the CLI take). The LayerOptions
        fields are carried out by ModelQuantizer only: a non-default one is an error here."""
        config, layer = self.translate()
        need_model = layer.selection.fields_needing_model
        if need_model:
            raise ConfigError(f"QuantizationConfig.{', '.join(need_model)}: node names are resolved against the model "
                              "by ModelQuantizer.quantize_model, not by pyquant.quantize; use "
                              "ModelQuantizer(Config(global_quant_config=...)), or nodes_to_exclude with the exact "
                              "names of the nodes to leave in float")
        moved = [f.name for f in dataclasses.fields(LayerOptions)
                 if f.name != "selection" and getattr(layer, f.name) != getattr(_LAYER, f.name)]
        if moved:
            raise ConfigError(f"{', '.join(moved)}: carried out by ModelQuantizer.quantize_model, not by "
                              "pyquant.quantize; use ModelQuantizer(Config(global_quant_config=...))")
        return config

    @classmethod
    def from_quant_config(cls, config: QuantConfig) -> "QuantizationConfig":
        extra: Dict[str, Any] = {"ActivationSymmetric": config.activation_symmetric}
        if config.weight_type is QuantType.QUInt8:
            extra["WeightSymmetric"] = False
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
        if config.unclipped_output_layers is not None:
            extra["UnclippedOutputLayers"] = config.unclipped_output_layers
        if config.clipped_input_layers is not None:
            extra["ClippedInputLayers"] = config.clipped_input_layers
        if config.fast_finetune is not None:
            extra["FastFinetune"] = fast_finetune_params(config.fast_finetune)
        if config.tensor_types:
            by_type: Dict[QuantType, List[str]] = collections.defaultdict(list)
            for name, qtype in sorted(config.tensor_types.items()):
                by_type[qtype].append(name)
            extra["MixedPrecisionTensor"] = dict(by_type)
        result = cls(calibrate_method=config.calibrate_method, activation_type=config.activation_type,
                     weight_type=config.weight_type, per_channel=config.per_channel,
                     specific_tensor_precision=bool(config.tensor_types),
                     enable_npu_cnn=config.enable_npu_cnn, include_cle=config.cross_layer_equalization,
                     include_fast_ft=config.fast_finetune is not None, extra_options=extra,
                     nodes_to_exclude=sorted(config.nodes_to_exclude),
                     op_types_to_quantize=sorted(config.op_types_to_quantize or ()))
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
    """pyquant's preset ``name`` (XINT8, INT8_CLE, INT8_CNN_ACCURATE, A8W8, U8S8) as a
    Quark-style QuantizationConfig (pyquant.quark's get_default_config gives Quark's)."""
    return QuantizationConfig.from_quant_config(get_preset(name))


# ---- Quark's presets by Quark's names ----------------------------------------------------------

def _preset(method, activations: QuantType, extra: Dict[str, Any], finetune: Optional[Dict[str, Any]] = None,
            weights: QuantType = QuantType.QInt8, **fields) -> Callable[[], QuantizationConfig]:
    """A Quark preset as Quark defines it (include_cle left at Quark's default, True)."""
    def make() -> QuantizationConfig:
        options = dict(extra, **({"FastFinetune": dict(finetune)} if finetune is not None else {}))
        return QuantizationConfig(calibrate_method=method, activation_type=activations, weight_type=weights,
                                  include_fast_ft=finetune is not None, extra_options=options, **fields)
    return make


def _with_finetune(name: str, make_args: tuple, fields: Dict[str, Any]) -> Dict[str, Callable[[], QuantizationConfig]]:
    return {name: _preset(*make_args, **fields),
            f"{name}_ADAROUND": _preset(*make_args, DEFAULT_ADAROUND_PARAMS, **fields),
            f"{name}_ADAQUANT": _preset(*make_args, DEFAULT_ADAQUANT_PARAMS, **fields)}


_SYMMETRIC = {"ActivationSymmetric": True}
# Quark preset name -> its QuantizationConfig (a new one per call), with Quark's fields and
# the keys that have an effect here; README "Quark drop-in" compares each with Quark's.
QUARK_PRESETS: Dict[str, Callable[[], QuantizationConfig]] = {
    **_with_finetune("XINT8", (PowerOfTwoMethod.MinMSE, QuantType.QUInt8, _SYMMETRIC), {"enable_npu_cnn": True}),
    **_with_finetune("A8W8", (CalibrationMethod.MinMax, QuantType.QInt8, _SYMMETRIC), {}),
    **_with_finetune("S8S8_AAWS", (CalibrationMethod.Percentile, QuantType.QInt8, {"Percentile": 99.9999}), {}),
    **_with_finetune("U8S8_AAWS", (CalibrationMethod.Percentile, QuantType.QUInt8, {}), {}),
    # 16-bit activations, int8 weights (standard int16/uint16 QDQ, at opset 21)
    **_with_finetune("A16W8", (CalibrationMethod.MinMax, QuantType.QInt16, _SYMMETRIC), {}),
    **_with_finetune("S16S8_ASWS", (CalibrationMethod.Percentile, QuantType.QInt16, _SYMMETRIC), {}),
    **_with_finetune("U16S8_AAWS", (CalibrationMethod.Percentile, QuantType.QUInt16, {}), {}),
    "INT8_CNN_DEFAULT": _preset(CalibrationMethod.MinMax, QuantType.QUInt8, {}),
    # bfloat16 activations and weights (Cast pairs)
    "BF16": _preset(CalibrationMethod.MinMax, QuantType.BFloat16, {}, weights=QuantType.BFloat16),
    # asymmetric uint8 activations and weights
    "U8U8_AAWA": _preset(CalibrationMethod.Percentile, QuantType.QUInt8, {"WeightSymmetric": False},
                         weights=QuantType.QUInt8),
}


def _int16_weights(instead: str, also: str = "") -> str:
    return (f"its weights are int16 and pyquant's weights are int8 (QuantConfig.weight_type QInt8 only){also}; for "
            f"16-bit activations with int8 weights use {instead}")


_FLOAT = ("pyquant writes integer QDQ models and bfloat16 Cast pairs only (no float16, block-float or microscaling "
          "types); use BF16, XINT8 or A8W8")
_NPU_TRANSFORMER = ", and it needs NPU transformer rules (enable_npu_transformer), which pyquant does not have"
QUARK_UNSUPPORTED_PRESETS: Dict[str, str] = {
    "INT16_CNN_DEFAULT": _int16_weights("U16S8_AAWS (Percentile) or A16W8 (MinMax)"),
    "INT16_CNN_ACCURATE": _int16_weights("U16S8_AAWS_ADAROUND"),
    "INT16_TRANSFORMER_DEFAULT": _int16_weights("U16S8_AAWS", _NPU_TRANSFORMER),
    "INT16_TRANSFORMER_ACCURATE": _int16_weights("U16S8_AAWS_ADAROUND", _NPU_TRANSFORMER),
    "S16S16_MIXED_S8S8": _int16_weights("S16S8_ASWS, or an 8-bit preset with specific_tensor_precision=True and "
                                        f"{_MIXED} raising chosen tensors to QInt16",
                                        ", and it needs automatic mixed precision (include_auto_mp), which pyquant "
                                        "does not have"),
    "BF16_ADAQUANT": "fast finetune fits integer weights; bfloat16 weights have no rounding grid to fit: use BF16",
    **{name: _FLOAT for name in ("FP16", "FP16_ADAQUANT", "BFP16", "BFP16_ADAQUANT",
                                 "MX4", "MX6", "MX9", "MXINT8", "BF16_MIXED_BFP16", "BF16_MIXED_MXINT8",
                                 "BF16_BFP16", "BF16_MXINT8", "MX9_INT8")},
    "UINT8_DYNAMIC_QUANT": "pyquant quantizes statically; use onnxruntime.quantization.quantize_dynamic",
    "VINT8": "VINT8 calibrates on random data and writes int8 biases; use XINT8",
    "XINT8_WEIGHTSONLY_ADAROUND": "pyquant quantizes activations and weights; use XINT8_ADAROUND",
    "INT8_TRANSFORMER_DEFAULT": "pyquant's NPU rules are for CNNs (no enable_npu_transformer); use U8S8_AAWS",
    "INT8_TRANSFORMER_ACCURATE": "pyquant's NPU rules are for CNNs (no enable_npu_transformer); use U8S8_AAWS_ADAROUND",
    "MATMUL_NBITS": "weight-only MatMulNBits is onnxruntime's (onnxruntime.quantization.matmul_nbits_quantizer)",
}


def quark_default_config(name: str) -> QuantizationConfig:
    """Quark's preset ``name`` (QUARK_PRESETS), or pyquant's own preset of that name when
    Quark has none (INT8_CLE, INT8_CNN_ACCURATE, U8S8); ConfigError saying what is missing
    for Quark's presets pyquant cannot express (INT16_*, U8U8_AAWA, BF16, ...)."""
    if not isinstance(name, str):
        raise ConfigError(f"a preset name is a string, got {name!r}")
    if name in QUARK_PRESETS:
        return QUARK_PRESETS[name]()
    if name in QUARK_UNSUPPORTED_PRESETS:
        raise ConfigError(f"preset {name!r} is not available: {QUARK_UNSUPPORTED_PRESETS[name]}")
    try:
        return get_default_config(name)
    except ConfigError:
        raise ConfigError(f"unknown preset {name!r}; Quark presets: {', '.join(QUARK_PRESETS)}; pyquant's own: "
                          "INT8_CLE, INT8_CNN_ACCURATE, U8S8") from None


# ---- readers -------------------------------------------------------------------------------------

class ReplayReader:
    """A reader without rewind() made usable by a technique that reads the data twice. The
    second pass is served by the pipeline's temporary-file copy of the first one
    (runtime.SpillingReader), so no batch is kept here; rewind() only records that a second
    pass began. If that copy could not be made (its budget, a full or unwritable temporary
    folder) the pipeline reads the source again, and that raises DataError naming
    ``needed_by`` and what to do."""

    def __init__(self, reader, needed_by: str) -> None:
        self.reader, self.needed_by = reader, needed_by
        self._rewound = False

    def __len__(self) -> int:
        return len(self.reader)

    def rewind(self) -> None:
        self._rewound = True

    def get_next(self) -> Optional[Dict[str, np.ndarray]]:
        if self._rewound:
            raise DataError(f"{self.needed_by} reads the calibration data twice and the data reader has no "
                            "rewind(): pyquant replays the first pass from a temporary file, which could not be "
                            f"made (it is limited to {runtime.SPILL_MAX_BYTES >> 30} GiB and a quarter of the free "
                            f"space in {tempfile.gettempdir()}); give the reader a rewind() method, or free space "
                            "there (TMPDIR chooses the folder)")
        return self.reader.get_next()


def replayable(reader, config: QuantConfig):
    """``reader``, or a ReplayReader over it when a technique of ``config`` reads the data
    twice and the reader cannot rewind()."""
    rereaders = [t.name for t in techniques_for(config) if t.rereads_data]
    if not rereaders or not hasattr(reader, "get_next") or callable(getattr(reader, "rewind", None)):
        return reader
    log.info("the data reader has no rewind(): %s reads the data twice, the second pass replays the first "
             "from a temporary file", " and ".join(rereaders))
    return ReplayReader(reader, " and ".join(rereaders))


# ---- the run -----------------------------------------------------------------------------------------

@contextlib.contextmanager
def _run_context(options: LayerOptions) -> Iterator[None]:
    """pyquant's log level (and, if the application set up no logging, a stderr handler)
    and Python's warning filter for the duration of a run."""
    logger = logging.getLogger("pyquant")
    level = logging.DEBUG if options.debug_mode else SEVERITY_LEVELS[options.log_severity_level]
    saved = logger.level
    handler = None
    if not logging.getLogger().handlers and not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("pyquant: %(levelname)s: %(message)s"))
        logger.addHandler(handler)
    logger.setLevel(level)
    try:
        with warnings.catch_warnings():
            if options.ignore_warnings:
                warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(saved)
        if handler is not None:
            logger.removeHandler(handler)


def summary_lines(result: "api.QuantizeResult", per_node: bool = False) -> List[str]:
    """The summary of a run: nodes per op type of the quantized model, quantized or left in
    float (with the reasons; ``per_node``: every float node and its reason)."""
    float_nodes = result.report.float_nodes
    counts: Dict[str, List[int]] = collections.defaultdict(lambda: [0, 0])
    for node in result.model.graph.node:
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            name = node.name or f"{node.op_type}({node.output[0]})"
            counts[node.op_type][name in float_nodes] += 1
    lines = [f"quantization summary: {result.report.activations} activations, {result.report.weights} weights, "
             f"{result.report.biases} biases quantized; {len(float_nodes)} nodes left in float"]
    lines += [f"  {op}: {q} quantized, {f} in float" for op, (q, f) in sorted(counts.items())]
    if per_node:
        lines += [f"  float node {name}: {reason}" for name, reason in float_nodes.items()]
    else:
        lines += [f"  {count} float node(s): {reason}" for reason, count in result.report.reasons.items()]
    return lines


def resolve(config: Any) -> QuantConfig:
    """Any accepted form of configuration -> QuantConfig (pyquant.api.resolve_config:
    a preset name, a QuantConfig, a QuantizationConfig or Config)."""
    return api.resolve_config(config)


def _translate(config: Any) -> Tuple[QuantConfig, LayerOptions]:
    inner = getattr(config, "global_quant_config", config)
    if isinstance(inner, QuantizationConfig):
        return inner.translate()
    return resolve(config), LayerOptions()


class ModelQuantizer:
    """Quark's ModelQuantizer: ``quantize_model(input, output, data_reader)`` returns the
    quantized ModelProto and writes it when ``output`` is a path. The nodes a
    QuantizationConfig chooses by name (NodeSelection) are resolved against that model."""

    def __init__(self, config: Any, progress: Optional[Callable[[int, Optional[int]], None]] = None) -> None:
        self.config, self.options = _translate(config)
        self.progress = progress

    def quantize_model(self, model_input, model_output=None, calibration_data_reader=None,
                       calibration_data_path=None) -> ModelProto:
        """Quantize ``model_input`` (path or ModelProto) with batches from
        ``calibration_data_reader`` (get_next(); rewind() optional) or the data at
        ``calibration_data_path`` (image folder, .npy/.npz file or folder); write it to
        ``model_output`` if given; return the ModelProto."""
        if (calibration_data_reader is None) == (calibration_data_path is None):
            raise ConfigError("give calibration_data_reader or calibration_data_path (one of them): pyquant "
                              "calibrates on real data")
        data = calibration_data_path if calibration_data_reader is None else \
            replayable(calibration_data_reader, self.config)
        external = self.options.use_external_data_format
        if model_output is not None:
            check_output_path(model_output, model_input if not isinstance(model_input, ModelProto) else None)
        elif external:
            log.warning("use_external_data_format has no effect without model_output: the model is returned")
        with _run_context(self.options):
            config = self.config
            if self.options.selection:
                model_input = model_input if isinstance(model_input, ModelProto) else load_model(model_input)
                excluded = self.options.selection.resolve(model_input, config.min_opset)
                config = dataclasses.replace(config, nodes_to_exclude=excluded)
                log.debug("nodes left in float by the node selection: %s", ", ".join(sorted(config.nodes_to_exclude)))
            result = api.quantize_detailed(model_input, data, config, None if external else model_output,
                                           progress=self.progress)
            if model_output is not None and external:
                save_model(result.model, model_output, external_data=True)
            if self.options.print_summary:
                for line in summary_lines(result, per_node=self.options.debug_mode):
                    log.info("%s", line)
        return result.model


def quantize_static(model_input, model_output=None, calibration_data_reader=None, calibration_data_path=None,
                    **fields) -> ModelProto:
    """Quark's quantize_static: the QuantizationConfig ``fields`` as keyword arguments."""
    return ModelQuantizer(QuantizationConfig(**fields)).quantize_model(
        model_input, model_output, calibration_data_reader, calibration_data_path)



def get_library_path(device: str = "cpu") -> str:
    """Quark's get_library_path: the custom-op library to register with onnxruntime before
    running a Quark BF16 model. pyquant's models use standard ops only (bfloat16 as Cast
    pairs), so this is a library that registers none (csrc/no_custom_ops.cc): a script that
    registers it runs unchanged."""
    if device != "cpu":
        raise ConfigError(f"get_library_path(device={device!r}): pyquant's models need no custom operators on any "
                          "device; its library is built for the CPU: use device='cpu'")
    return kernels.no_custom_ops_library()
