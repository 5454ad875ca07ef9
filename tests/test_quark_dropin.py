"""pyquant.quark as a drop-in for AMD Quark's ONNX API: Quark's import lines, onnxruntime's
enums, every QuantizationConfig field and extra_options key honoured, noticed or refused,
Quark's presets by Quark's names, and data readers as Quark users write them."""
from __future__ import annotations

import dataclasses
import logging
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.quantization.calibrate import CalibrationDataReader
from onnxruntime.quantization.calibrate import CalibrationMethod as OrtCalibrationMethod
from onnxruntime.quantization.quant_utils import QuantFormat
from onnxruntime.quantization.quant_utils import QuantType as OrtQuantType

import pyquant
from pyquant import compat, runtime
from pyquant.config import CalibrationMethod, FastFinetuneOptions, PowerOfTwoMethod, QuantType, get_preset
from pyquant.errors import ConfigError, DataError
from pyquant.graph.view import GraphView
from pyquant.preparation import prepare_graph

README = Path(__file__).resolve().parents[1] / "README.md"


# ---- the modules and names a Quark script imports ------------------------------------------------

def test_quark_import_lines_work_with_only_the_package_name_changed():
    namespace: dict = {}
    exec("\n".join([  # the tutorial's import lines and those of Quark's documented examples, edited
        "from pyquant.quark import ModelQuantizer, PowerOfTwoMethod, QuantType, QuantFormat, CalibrationMethod",
        "from pyquant.quark import CalibrationDataReader, VitisQuantType, VitisQuantFormat, quantize_static",
        "from pyquant.quark.quantization.config import Config, get_default_config",
        "from pyquant.quark.quantization.config.config import Config, QuantizationConfig",
        "from pyquant.quark.quantization.config.custom_config import get_default_config, DEFAULT_ADAROUND_PARAMS",
        "from pyquant.quark.quantization.config.custom_config import DEFAULT_ADAQUANT_PARAMS",
        "from pyquant.quark.quant_utils import PowerOfTwoMethod, VitisQuantType, VitisQuantFormat",
        "from pyquant.quark.quantization.quant_utils import ExtendedQuantType, ExtendedQuantFormat",
        "from pyquant.quark.quantization.api import ModelQuantizer",
        "from pyquant.quark.quantization import ModelQuantizer, Config, QuantizationConfig",
    ]), namespace)
    # as in Quark, onnxruntime's enums are re-exported unchanged, and one class per name
    assert namespace["QuantType"] is OrtQuantType and namespace["QuantFormat"] is QuantFormat
    assert namespace["CalibrationMethod"] is OrtCalibrationMethod
    assert namespace["CalibrationDataReader"] is CalibrationDataReader
    assert namespace["ModelQuantizer"] is pyquant.ModelQuantizer and namespace["PowerOfTwoMethod"] is PowerOfTwoMethod
    assert namespace["QuantizationConfig"] is pyquant.QuantizationConfig
    assert namespace["get_default_config"] is compat.quark_default_config


# ---- enums ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("given,expected", [
    (OrtQuantType.QInt8, QuantType.QInt8), (OrtQuantType.QUInt8, QuantType.QUInt8),
    (compat.VitisQuantType.QUInt8, QuantType.QUInt8), (QuantType.QInt8, QuantType.QInt8),
    (OrtQuantType.QInt16, QuantType.QInt16), (OrtQuantType.QUInt16, QuantType.QUInt16),
    (compat.VitisQuantType.QInt16, QuantType.QInt16), (compat.ExtendedQuantType.QUInt16, QuantType.QUInt16),
    (QuantType.QInt16, QuantType.QInt16), (QuantType.QUInt16, QuantType.QUInt16),
])
def test_quant_types_of_onnxruntime_and_quark_are_accepted(given, expected):
    config = pyquant.QuantizationConfig(activation_type=given, weight_type=OrtQuantType.QInt8).to_quant_config()
    assert config.activation_type is expected and config.weight_type is QuantType.QInt8


def activation_zero_points(model: onnx.ModelProto):
    """{activation tensor: onnx dtype of its zero point} of a quantized model."""
    suffix = "_QuantizeLinear_Output_zero_point"
    return {t.name[:-len(suffix)]: t.data_type for t in model.graph.initializer if t.name.endswith(suffix)}


def opset(model: onnx.ModelProto) -> int:
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


@pytest.mark.parametrize("given,dtype", [(OrtQuantType.QUInt16, TensorProto.UINT16),
                                         (compat.VitisQuantType.QInt16, TensorProto.INT16)])
def test_16_bit_activations_write_standard_16_bit_qdq(given, dtype, tiny_model, tiny_data):
    model = pyquant.ModelQuantizer(pyquant.Config(global_quant_config=pyquant.QuantizationConfig(
        activation_type=given, include_cle=False))).quantize_model(tiny_model, None, OrtReader(tiny_data))
    onnx.checker.check_model(model)
    assert opset(model) == 21 and set(activation_zero_points(model).values()) == {dtype}
    weights = [t for t in model.graph.initializer if t.name.endswith("_quantized") and len(t.dims) == 4]
    assert weights and all(t.data_type == TensorProto.INT8 for t in weights)


@pytest.mark.parametrize("given,expected", [
    (OrtCalibrationMethod.MinMax, CalibrationMethod.MinMax), (OrtCalibrationMethod.Entropy, CalibrationMethod.Entropy),
    (OrtCalibrationMethod.Percentile, CalibrationMethod.Percentile), (PowerOfTwoMethod.MinMSE, PowerOfTwoMethod.MinMSE),
    (CalibrationMethod.MSE, CalibrationMethod.MSE),
])
def test_calibration_methods_of_onnxruntime_are_accepted(given, expected):
    assert pyquant.QuantizationConfig(calibrate_method=given).to_quant_config().calibrate_method is expected


@pytest.mark.parametrize("kwargs,message", [
    ({"calibrate_method": OrtCalibrationMethod.Distribution}, "calibrate_method.*not supported; use"),
    ({"weight_type": OrtQuantType.QInt16}, "weight_type.*weights are int8, uint8 or bfloat16 \\(16-bit integer "
                                           "types are for activations"),
    ({"weight_type": compat.VitisQuantType.QUInt16}, "weights are int8, uint8 or bfloat16"),
    ({"activation_type": compat.VitisQuantType.QInt32}, "32-bit tensors are not supported.*QInt16 or QUInt16 for "
                                                        "activations"),
    ({"activation_type": compat.VitisQuantType.QBFloat16}, "bfloat16 is for activations and weights together"),
    ({"activation_type": OrtQuantType.QFLOAT8E4M3FN}, "float8"),
    ({"weight_type": OrtQuantType.QUInt8}, "symmetric uint8 weights.*set extra_options\\['WeightSymmetric'\\]=False"),
    ({"extra_options": {"WeightSymmetric": False}}, "False with int8 weights is not supported.*use weight_type=QUInt8"),
    ({"weight_type": OrtQuantType.QInt4}, "4-bit"),
    ({"quant_format": QuantFormat.QOperator}, "QOperator.*use QuantFormat.QDQ"),
    ({"quant_format": compat.VitisQuantFormat.FixNeuron}, "FixNeuron"),
    ({"quant_format": "QDQ"}, "not a quantization format"),
])
def test_types_and_formats_pyquant_does_not_write_are_refused(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        pyquant.QuantizationConfig(**kwargs).to_quant_config()


def test_vitis_qdq_format_is_accepted_with_a_notice(caplog):
    with caplog.at_level(logging.WARNING, logger="pyquant"):
        config = pyquant.QuantizationConfig(quant_format=compat.VitisQuantFormat.QDQ).to_quant_config()
    assert config == pyquant.QuantizationConfig().to_quant_config()
    assert "standard QuantizeLinear/DequantizeLinear" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="pyquant"):
        pyquant.QuantizationConfig(quant_format=QuantFormat.QDQ).to_quant_config()
    assert caplog.text == ""


# ---- every field: honoured, noticed or refused ------------------------------------------------------

# QuantizationConfig's fields as Quark documents them (quark.onnx.quantization.config).
QUARK_FIELDS = [
    "calibrate_method", "quant_format", "activation_type", "weight_type", "input_nodes", "output_nodes",
    "op_types_to_quantize", "nodes_to_quantize", "extra_op_types_to_quantize", "nodes_to_exclude",
    "subgraphs_to_exclude", "specific_tensor_precision", "execution_providers", "per_channel", "reduce_range",
    "optimize_model", "use_dynamic_quant", "use_external_data_format", "convert_fp16_to_fp32", "convert_nchw_to_nhwc",
    "include_sq", "include_rotation", "include_cle", "include_auto_mp", "include_fast_ft", "enable_npu_cnn",
    "enable_npu_transformer", "debug_mode", "crypto_mode", "print_summary", "ignore_warnings", "log_severity_level",
    "extra_options",
]


def readme_rows(section: str, cells: int):
    text = README.read_text().split(f"### {section}", 1)[1].split("\n#", 1)[0]
    rows = {}
    for line in text.splitlines():
        parts = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(parts) == cells and parts[0].startswith("`"):
            rows[(parts[0].strip("`"), parts[1])] = parts[2:]
    return rows


def test_quark_fields_are_all_handled_and_documented():
    fields = [f.name for f in dataclasses.fields(pyquant.QuantizationConfig)]
    assert fields == QUARK_FIELDS  # Quark's names, in Quark's order
    assert set(compat.FIELDS) == set(fields) - {"extra_options"}
    documented = {key for key, where in readme_rows("Quark-compatible keys", 4) if where == "QuantizationConfig"}
    assert documented == set(fields) - {"extra_options"}


def test_refused_keys_and_presets_are_documented():
    rows = readme_rows("Refused Quark options", 3)
    assert {k for k, where in rows if where == "extra_options"} == set(compat.REFUSED_EXTRA_OPTIONS)
    assert {k for k, where in rows if where == "FastFinetune"} == set(compat.REFUSED_FAST_FINETUNE_OPTIONS)
    presets = {k for k, where in readme_rows("Presets by Quark's names", 4)}
    assert set(compat.QUARK_PRESETS) | {"INT8_CNN_ACCURATE"} <= presets
    assert all(any(name == row or name.startswith(row.rstrip("*")) and row.endswith("*") for row in presets)
               for name in compat.QUARK_UNSUPPORTED_PRESETS)


@pytest.mark.parametrize("kwargs,field,expected", [
    ({"per_channel": True}, "per_channel", True),
    ({"enable_npu_cnn": True}, "enable_npu_cnn", True),
    ({"include_cle": False}, "cross_layer_equalization", False),
    ({"include_fast_ft": True}, "fast_finetune", FastFinetuneOptions()),
    ({"calibrate_method": PowerOfTwoMethod.NonOverflow}, "calibrate_method", PowerOfTwoMethod.NonOverflow),
    ({"activation_type": OrtQuantType.QUInt8}, "activation_type", QuantType.QUInt8),
])
def test_quantization_fields_map_to_the_typed_config(kwargs, field, expected):
    # (tests/test_options.py checks that each QuantConfig field changes the model)
    base = pyquant.QuantizationConfig().to_quant_config()
    config = pyquant.QuantizationConfig(**kwargs).to_quant_config()
    assert getattr(config, field) == expected != getattr(base, field)
    assert {f.name for f in dataclasses.fields(config) if getattr(config, f.name) != getattr(base, f.name)} == {field}


def test_quark_defaults():
    config = pyquant.QuantizationConfig().to_quant_config()
    assert config.activation_type is QuantType.QInt8  # Quark's default, not QuantConfig's
    assert config.cross_layer_equalization  # Quark's default, not QuantConfig's
    assert config.calibrate_method is CalibrationMethod.MinMax and not config.per_channel


@pytest.mark.parametrize("field,value,message", [
    ("nodes_to_exclude", "Conv_0", "must be a list of names"),  # not a list of letters
    ("op_types_to_quantize", "Conv", "must be a list of names"),
    ("nodes_to_exclude", ["(.*"], "not a regular expression"),
    ("subgraphs_to_exclude", [(["a"],)], "list of \\(start nodes, end nodes\\) pairs"),
    ("subgraphs_to_exclude", [([], ["b"])], "at least one start and one end node"),
    ("specific_tensor_precision", True, "=True lists no tensors: give extra_options\\['MixedPrecisionTensor'\\]"),
    ("reduce_range", True, "full int8 range"),
    ("use_dynamic_quant", True, "quantize_dynamic"),
    ("convert_fp16_to_fp32", True, "float32 first"),
    ("convert_nchw_to_nhwc", True, "layout"),
    ("include_sq", True, "SmoothQuant"),
    ("include_rotation", True, "rotation"),
    ("include_auto_mp", True, "mixed precision"),
    ("enable_npu_transformer", True, "for CNNs"),
    ("crypto_mode", True, "encrypted"),
    ("log_severity_level", 7, "one of"),
    ("print_summary", "yes", "True or False"),
    ("execution_providers", "CPUExecutionProvider", "list"),
])
def test_fields_pyquant_cannot_honour_are_refused_with_what_to_do(field, value, message):
    with pytest.raises(ConfigError, match=f"{field}.*{message}"):
        pyquant.QuantizationConfig(**{field: value}).translate()
    pyquant.QuantizationConfig(**{field: getattr(pyquant.QuantizationConfig(), field)}).translate()  # the default


@pytest.mark.parametrize("field,value,notice", [
    ("execution_providers", ["CUDAExecutionProvider", "CPUExecutionProvider"], "CPUExecutionProvider"),
    ("optimize_model", False, "always prepares the graph"),
])
def test_fields_without_effect_here_are_accepted_with_a_notice(field, value, notice, caplog):
    with caplog.at_level(logging.WARNING, logger="pyquant"):
        config = pyquant.QuantizationConfig(**{field: value}).to_quant_config()
    assert config == pyquant.QuantizationConfig().to_quant_config()
    assert field in caplog.text and notice in caplog.text


@pytest.mark.parametrize("key,value,message", [
    ("CalibDataSize", 10, "limit the reader"),
    ("Int32Bias", False, "int32"),
    ("QuantizeBias", False, "int32"),
    ("FoldRelu", False, "always fused"),
    ("CalibMovingAverage", True, "Percentile"),
    ("UseRandomData", True, "data reader"),
    ("WeightsOnly", True, "activations and weights"),
])
def test_extra_options_pyquant_cannot_honour_are_refused(key, value, message):
    with pytest.raises(ConfigError, match=f"{key}.*not supported: .*{message}"):
        pyquant.QuantizationConfig(extra_options={key: value}).to_quant_config()


@pytest.mark.parametrize("params,message", [
    ({"EarlyStop": True}, "runs all NumIterations"),  # Quark's EarlyStop ends iterations early
    ({"LRAdjust": (1.0, 0.2)}, "learning rate"),
    ({"TargetOpType": ["Conv"]}, "Conv, Gemm and MatMul; choosing which ones is not available"),
    ({"SelectiveUpdate": True}, "FallbackToNearest"),
    ({"DropRatio": 0.5}, "quantized network"),
])
def test_fast_finetune_keys_that_mean_something_else_are_refused(params, message):
    with pytest.raises(ConfigError, match=message):
        pyquant.QuantizationConfig(include_fast_ft=True, extra_options={"FastFinetune": params}).to_quant_config()


def test_fast_finetune_keys_with_pyquant_meaning():
    finetune = pyquant.QuantizationConfig(include_fast_ft=True, extra_options={"FastFinetune": {
        "EarlyStop": False, "FallbackToNearest": False, "DataBatches": 2}}).to_quant_config().fast_finetune
    assert finetune == FastFinetuneOptions(early_stop=False, data_batches=2)


# ---- Quark's presets -------------------------------------------------------------------------------

def test_quark_xint8_includes_cle_as_in_quark():
    xint8 = compat.quark_default_config("XINT8")
    assert xint8.include_cle and xint8.to_quant_config() == get_preset("INT8_CLE")
    assert not compat.get_default_config("XINT8").include_cle  # pyquant's own XINT8 has none


@pytest.mark.parametrize("name", list(compat.QUARK_PRESETS))
def test_every_quark_preset_translates(name):
    config = compat.quark_default_config(name)
    typed = config.to_quant_config()
    assert typed.cross_layer_equalization  # Quark's QuantizationConfig default
    assert (typed.fast_finetune is not None) == name.endswith(("_ADAROUND", "_ADAQUANT"))
    if name.endswith("_ADAQUANT"):
        assert typed.fast_finetune.algorithm.value == "adaquant"
    expected = {"XINT8": QuantType.QUInt8, "U8": QuantType.QUInt8, "INT8": QuantType.QUInt8, "A8": QuantType.QInt8,
                "S8": QuantType.QInt8, "A16": QuantType.QInt16, "S16": QuantType.QInt16, "U16": QuantType.QUInt16,
                "BF16": QuantType.BFloat16}
    assert typed.activation_type is next(t for prefix, t in expected.items() if name.startswith(prefix))
    weights = {"U8U8": QuantType.QUInt8, "BF16": QuantType.BFloat16}
    assert typed.weight_type is next((t for prefix, t in weights.items() if name.startswith(prefix)), QuantType.QInt8)
    assert typed.activation_symmetric is ("AAW" not in name and not name.startswith(("INT8", "BF16")))
    config.extra_options["Percentile"] = 50.5  # a new object each call: the tutorial edits extra_options
    assert compat.quark_default_config(name).extra_options.get("Percentile") != 50.5


@pytest.mark.parametrize("name,message", [
    ("INT16_CNN_DEFAULT", "weights are int16 and pyquant's weights are int8.*use U16S8_AAWS"),
    ("INT16_CNN_ACCURATE", "weights are int16.*use U16S8_AAWS_ADAROUND"),
    ("INT16_TRANSFORMER_DEFAULT", "weights are int16.*NPU transformer rules"),
    ("S16S16_MIXED_S8S8", "weights are int16.*automatic mixed precision.*use S16S8_ASWS"),
    ("BF16_ADAQUANT", "bfloat16 weights have no rounding grid.*use BF16"),
    ("FP16", "integer QDQ models and bfloat16 Cast pairs only.*use BF16"),
    ("VINT8", "random data"),
    ("XINT9", "unknown preset 'XINT9'; Quark presets: XINT8"),
])
def test_quark_presets_out_of_reach_are_clear_errors(name, message):
    with pytest.raises(ConfigError, match=message):
        compat.quark_default_config(name)


@pytest.mark.parametrize("name,calibration,dtype,symmetric", [
    ("A16W8", CalibrationMethod.MinMax, TensorProto.INT16, True),
    ("S16S8_ASWS", CalibrationMethod.Percentile, TensorProto.INT16, True),
    ("U16S8_AAWS", CalibrationMethod.Percentile, TensorProto.UINT16, False),
])
def test_quark_16_bit_presets_write_16_bit_activations(name, calibration, dtype, symmetric, tiny_model, tiny_data):
    config = compat.quark_default_config(name)
    assert config.to_quant_config().calibrate_method is calibration
    model = pyquant.ModelQuantizer(pyquant.Config(global_quant_config=config)).quantize_model(
        tiny_model, None, OrtReader(tiny_data))
    onnx.checker.check_model(model)
    assert opset(model) == 21 and set(activation_zero_points(model).values()) == {dtype}
    zero_points = {int(numpy_helper.to_array(t)) for t in model.graph.initializer
                   if t.name.endswith("_QuantizeLinear_Output_zero_point")}
    assert (zero_points == {0}) is symmetric
    # 16 bits lose less than 8: the same preset with 8-bit activations is further from float
    eight_bit = dataclasses.replace(config, activation_type=QuantType.QInt8 if symmetric else QuantType.QUInt8)
    model_8 = pyquant.ModelQuantizer(pyquant.Config(global_quant_config=eight_bit)).quantize_model(
        tiny_model, None, OrtReader(tiny_data))
    assert output_error(tiny_model, model, tiny_data) < 0.8 * output_error(tiny_model, model_8, tiny_data)


def output_error(model, quantized, x) -> float:
    """RMS error of the quantized model's output relative to the float model's RMS."""
    def run(m):
        return ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    reference = run(model)
    return float(np.sqrt(np.mean((run(quantized) - reference) ** 2)) / np.sqrt(np.mean(reference ** 2)))


def test_pyquant_presets_remain_reachable_by_their_names():
    assert compat.quark_default_config("INT8_CNN_ACCURATE").to_quant_config() == get_preset("INT8_CNN_ACCURATE")
    assert compat.quark_default_config("U8S8").to_quant_config() == get_preset("U8S8")


# ---- data readers ----------------------------------------------------------------------------------

class OrtReader(CalibrationDataReader):
    """As Quark users write them: onnxruntime's base class (its __len__ raises
    NotImplementedError), no rewind()."""

    def __init__(self, data: np.ndarray, batch: int = 8) -> None:
        self.batches = [{"x": data[i:i + batch]} for i in range(0, len(data), batch)]
        self.position = 0

    def get_next(self):
        if self.position >= len(self.batches):
            return None
        self.position += 1
        return self.batches[self.position - 1]


class RewindableOrtReader(OrtReader):
    def rewind(self) -> None:
        self.position = 0


def xint8(**kwargs) -> pyquant.Config:
    kwargs.setdefault("extra_options", {"ActivationSymmetric": True})
    return pyquant.Config(global_quant_config=pyquant.QuantizationConfig(
        calibrate_method=PowerOfTwoMethod.MinMSE, activation_type=OrtQuantType.QUInt8, enable_npu_cnn=True,
        include_cle=False, **kwargs))


def test_onnxruntime_reader_without_length_reports_progress_without_total(tiny_model, tiny_data):
    with pytest.raises(NotImplementedError):
        len(OrtReader(tiny_data))
    seen = []
    model = pyquant.ModelQuantizer(xint8(), progress=lambda done, total: seen.append((done, total))).quantize_model(
        tiny_model, None, OrtReader(tiny_data))
    onnx.checker.check_model(model)
    assert seen == [(i, None) for i in range(1, 9)]


def finetune_config(**finetune) -> pyquant.Config:
    return xint8(include_fast_ft=True, extra_options={"ActivationSymmetric": True,
                                                      "FastFinetune": {"NumIterations": 5, **finetune}})


def test_fast_finetune_without_rewind_replays_kept_batches(tiny_model, tiny_data):
    replayed = pyquant.ModelQuantizer(finetune_config()).quantize_model(tiny_model, None, OrtReader(tiny_data))
    rewound = pyquant.ModelQuantizer(finetune_config()).quantize_model(tiny_model, None, RewindableOrtReader(tiny_data))
    assert replayed.SerializeToString() == rewound.SerializeToString()
    plain = pyquant.ModelQuantizer(xint8()).quantize_model(tiny_model, None, OrtReader(tiny_data))
    assert plain.SerializeToString() != rewound.SerializeToString()  # fast finetune did act
    with pytest.raises(DataError, match="rewind"):  # pyquant.quantize itself still asks for rewind()
        pyquant.quantize(tiny_model, OrtReader(tiny_data), finetune_config())


def test_reader_without_rewind_is_replayed_from_the_file_copy_only(tiny_model, tiny_data, monkeypatch):
    # ModelQuantizer keeps no batch of a reader without rewind(): the pipeline's file copy
    # (runtime.SpillingReader) serves the second pass; reading the source again is an error
    reader = compat.ReplayReader(OrtReader(tiny_data), "fast_finetune")
    first = [reader.get_next() for _ in range(9)]
    assert first[-1] is None and all(b is not None for b in first[:-1])
    reader.rewind()
    with pytest.raises(DataError, match="fast_finetune reads the calibration data twice.*rewind\\(\\) method"):
        reader.get_next()
    kept = []
    original = compat.ReplayReader.__init__

    def spy(self, *args, **kwargs):
        original(self, *args, **kwargs)
        kept.append(self)
    monkeypatch.setattr(compat.ReplayReader, "__init__", spy)
    replayed = pyquant.ModelQuantizer(finetune_config()).quantize_model(tiny_model, None, OrtReader(tiny_data))
    assert len(kept) == 1 and not kept[0]._rewound and not hasattr(kept[0], "_kept")
    rewound = pyquant.ModelQuantizer(finetune_config()).quantize_model(tiny_model, None, RewindableOrtReader(tiny_data))
    assert replayed.SerializeToString() == rewound.SerializeToString()
    # the file copy over its budget: the second pass would read the source again
    batch_bytes = 8 * 3 * 16 * 16 * 4
    monkeypatch.setattr(runtime, "SPILL_MAX_BYTES", 3 * batch_bytes)
    with pytest.raises(DataError, match="fast_finetune reads the calibration data twice.*temporary file"):
        pyquant.ModelQuantizer(finetune_config()).quantize_model(tiny_model, None, OrtReader(tiny_data))
    pyquant.ModelQuantizer(finetune_config()).quantize_model(tiny_model, None, RewindableOrtReader(tiny_data))


def test_calibration_data_path_and_missing_data(tmp_path, tiny_model, tiny_data):
    np.save(tmp_path / "calib.npy", tiny_data)
    quantizer = pyquant.ModelQuantizer(xint8())
    from_path = quantizer.quantize_model(tiny_model, calibration_data_path=str(tmp_path / "calib.npy"))
    from_reader = quantizer.quantize_model(tiny_model, None, OrtReader(tiny_data))
    assert from_path.SerializeToString() == from_reader.SerializeToString()
    with pytest.raises(ConfigError, match="calibrates on real data"):
        quantizer.quantize_model(tiny_model, None, None)
    with pytest.raises(ConfigError, match="one of them"):
        quantizer.quantize_model(tiny_model, None, OrtReader(tiny_data), str(tmp_path / "calib.npy"))


# ---- what ModelQuantizer does around a run ----------------------------------------------------------

def test_quantize_model_returns_the_model_and_writes_it_when_given_a_path(tmp_path, tiny_model_path, tiny_data):
    quantizer = pyquant.ModelQuantizer(xint8())
    returned = quantizer.quantize_model(str(tiny_model_path), None, OrtReader(tiny_data))
    assert isinstance(returned, onnx.ModelProto) and not list(tmp_path.glob("*_q.onnx"))
    written = quantizer.quantize_model(str(tiny_model_path), str(tmp_path / "tiny_q.onnx"), OrtReader(tiny_data))
    assert written.SerializeToString() == returned.SerializeToString() == onnx.load(tmp_path / "tiny_q.onnx") \
        .SerializeToString()
    assert compat.quantize_static(str(tiny_model_path), None, OrtReader(tiny_data), calibrate_method=PowerOfTwoMethod
                                  .MinMSE, activation_type=OrtQuantType.QUInt8, enable_npu_cnn=True, include_cle=False,
                                  extra_options={"ActivationSymmetric": True}).SerializeToString() == \
        returned.SerializeToString()


def wide_model() -> onnx.ModelProto:
    """Conv 3->64 -> Sigmoid -> Conv 64->64 3x3 (37 KB of int8 weights: external data)."""
    rng = np.random.default_rng(1)
    init = [numpy_helper.from_array((rng.standard_normal((64, 3, 1, 1)) * 0.3).astype(np.float32), "w1"),
            numpy_helper.from_array((rng.standard_normal((64, 64, 3, 3)) * 0.05).astype(np.float32), "w2")]
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv1"),
             helper.make_node("Sigmoid", ["c1"], ["s1"], name="sigmoid"),
             helper.make_node("Conv", ["s1", "w2"], ["y"], name="conv2", pads=[1, 1, 1, 1])]
    graph = helper.make_graph(nodes, "wide", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 16, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 64, 16, 16])], init)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def u8s8(**kwargs) -> pyquant.Config:
    return pyquant.Config(global_quant_config=pyquant.QuantizationConfig(
        calibrate_method=OrtCalibrationMethod.Percentile, activation_type=OrtQuantType.QUInt8, include_cle=False,
        **kwargs))


def test_use_external_data_format_writes_the_weights_beside_the_model(tmp_path, tiny_data):
    inline, external = tmp_path / "inline.onnx", tmp_path / "external.onnx"
    pyquant.ModelQuantizer(u8s8()).quantize_model(wide_model(), str(inline), OrtReader(tiny_data))
    model = pyquant.ModelQuantizer(u8s8(use_external_data_format=True)).quantize_model(
        wide_model(), str(external), OrtReader(tiny_data))
    assert not (tmp_path / "inline.onnx.data").exists()
    assert (tmp_path / "external.onnx.data").stat().st_size >= 64 * 64 * 9
    assert external.stat().st_size < inline.stat().st_size / 4
    assert onnx.load(str(inline)).SerializeToString() == model.SerializeToString()
    loaded = onnx.load(str(external))
    assert loaded.graph.node == model.graph.node
    assert {t.name: numpy_helper.to_array(t).tobytes() for t in loaded.graph.initializer} == \
        {t.name: numpy_helper.to_array(t).tobytes() for t in model.graph.initializer}


def run_logged(caplog, config: pyquant.Config, data):
    """pyquant's log records of one run (everything is captured: the run sets the level)."""
    caplog.clear()
    with caplog.at_level(logging.DEBUG):
        pyquant.ModelQuantizer(config).quantize_model(wide_model(), None, OrtReader(data))
    return [r for r in caplog.records if r.name.startswith("pyquant")]


def text(records) -> str:
    return "\n".join(r.getMessage() for r in records)


def test_print_summary_debug_mode_and_log_severity_level(caplog, tiny_data):
    level = logging.getLogger("pyquant").level
    records = run_logged(caplog, u8s8(), tiny_data)
    summary = text(records)
    assert "quantization summary" in summary and "Conv: 2 quantized, 0 in float" in summary
    assert "Sigmoid: 0 quantized, 1 in float" in summary and "1 float node(s): elementwise op" in summary
    assert min(r.levelno for r in records) == logging.INFO and "float node sigmoid" not in summary
    assert "quantization summary" not in text(run_logged(caplog, u8s8(print_summary=False), tiny_data))
    records = run_logged(caplog, u8s8(debug_mode=True), tiny_data)
    assert "float node sigmoid: elementwise op" in text(records) and min(r.levelno for r in records) == logging.DEBUG
    assert run_logged(caplog, u8s8(log_severity_level=3), tiny_data) == []
    assert logging.getLogger("pyquant").level == level  # restored after the run


class WarningReader(OrtReader):
    def get_next(self):
        warnings.warn("the reader warns", UserWarning)
        return super().get_next()


@pytest.mark.parametrize("ignore", [True, False])
def test_ignore_warnings(ignore, tiny_model, tiny_data):
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        pyquant.ModelQuantizer(xint8(ignore_warnings=ignore)).quantize_model(tiny_model, None, WarningReader(tiny_data))
        warnings.warn("after the run", UserWarning)
    messages = [str(w.message) for w in seen]
    assert ("the reader warns" in messages) is not ignore and "after the run" in messages


def test_layer_options_outside_model_quantizer_are_an_error(tiny_model, tiny_data):
    config = pyquant.QuantizationConfig(print_summary=False, use_external_data_format=True)
    with pytest.raises(ConfigError, match="use_external_data_format, print_summary: carried out by ModelQuantizer"):
        pyquant.quantize(tiny_model, tiny_data, config)


NODE_CHOICES = ["nodes_to_exclude", "op_types_to_quantize", "extra_op_types_to_quantize", "nodes_to_quantize",
                "subgraphs_to_exclude", "input_nodes", "output_nodes"]


def test_readme_says_node_choices_are_honoured():
    rows = readme_rows("Quark-compatible keys", 4)
    assert all(rows[(key, "QuantizationConfig")][1].startswith("honoured") for key in NODE_CHOICES)
    assert rows[("OpTypesToQuantize", "extra_options")][1].startswith("honoured")
    drop_in = README.read_text().split("### Quark drop-in", 1)[1].split("\n#", 1)[0]
    assert "hook" not in drop_in and all(f"`{key}`" in drop_in for key in NODE_CHOICES)


# ---- mixed precision ----------------------------------------------------------------------------------

MIXED = {"MixedPrecisionTensor": {OrtQuantType.QInt16: ["r1"]}}


def test_mixed_precision_tensor_gives_the_listed_tensors_their_type(tiny_model, tiny_data, caplog):
    before = activation_zero_points(quantize_tiny(tiny_model, tiny_data))
    assert set(before.values()) == {TensorProto.UINT8} and "r1" in before
    model = quantize_tiny(tiny_model, tiny_data, specific_tensor_precision=True, extra_options=MIXED)
    onnx.checker.check_model(model)
    after = activation_zero_points(model)
    assert after.pop("r1") == TensorProto.INT16 and set(after.values()) == {TensorProto.UINT8}
    assert opset(model) == 21 and set(after) == set(before) - {"r1"}
    with caplog.at_level(logging.WARNING, logger="pyquant"):  # without the flag: applied, with a notice
        alone = quantize_tiny(tiny_model, tiny_data, extra_options=MIXED)
    assert alone.SerializeToString() == model.SerializeToString()
    assert "MixedPrecisionTensor'] is applied without QuantizationConfig.specific_tensor_precision=True" in caplog.text
    with pytest.raises(ConfigError, match="tensor_types names tensors that are not quantized activations: w1"):
        quantize_tiny(tiny_model, tiny_data, specific_tensor_precision=True,
                      extra_options={"MixedPrecisionTensor": {QuantType.QInt16: ["w1"]}})  # a weight


def test_mixed_precision_translates_and_round_trips():
    config = pyquant.QuantizationConfig(specific_tensor_precision=True, extra_options={"MixedPrecisionTensor": {
        OrtQuantType.QInt16: ["r1", "a1"], compat.VitisQuantType.QUInt16: ["cat"], QuantType.QInt8: ["y"]}})
    typed = config.to_quant_config()
    assert dict(typed.tensor_types) == {"r1": QuantType.QInt16, "a1": QuantType.QInt16, "cat": QuantType.QUInt16,
                                        "y": QuantType.QInt8}
    back = pyquant.QuantizationConfig.from_quant_config(typed)
    assert back.specific_tensor_precision and back.to_quant_config() == typed
    assert back.extra_options["MixedPrecisionTensor"] == {QuantType.QInt16: ["a1", "r1"], QuantType.QUInt16: ["cat"],
                                                          QuantType.QInt8: ["y"]}
    rows = readme_rows("Quark-compatible keys", 4)
    assert rows[("specific_tensor_precision", "QuantizationConfig")][1].startswith("honoured")
    assert rows[("MixedPrecisionTensor", "extra_options")][1].startswith("honoured")


@pytest.mark.parametrize("value,message", [
    ({OrtQuantType.QInt16: "r1"}, "\\['QInt16'\\] must be a list of names, got 'r1'"),
    ({"int16": ["r1"]}, "key='int16': not a quantization type"),
    ({compat.VitisQuantType.QBFloat16: ["r1"]}, "bfloat16 is for whole models.*QInt16 or QUInt16"),
    ({OrtQuantType.QInt16: ["r1"], OrtQuantType.QUInt8: ["r1"]}, "'r1' is given two types, QInt16 and QUInt8"),
    (["r1"], "must be a dict \\{QuantType: \\[tensor names\\]\\}"),
])
def test_mixed_precision_tensor_values_are_checked(value, message):
    with pytest.raises(ConfigError, match=f"extra_options\\['MixedPrecisionTensor'\\].*{message}"):
        pyquant.QuantizationConfig(specific_tensor_precision=True,
                                   extra_options={"MixedPrecisionTensor": value}).to_quant_config()


# ---- choosing nodes -----------------------------------------------------------------------------------

def quantize_tiny(model, data, **fields) -> onnx.ModelProto:
    return pyquant.ModelQuantizer(u8s8(**fields)).quantize_model(model, None, OrtReader(data))


def layers(model: onnx.ModelProto):
    """{output of each Conv/Gemm: (its activation input is quantized, its weight is)}; a
    model output quantized after its layer is written <name>_float by the layer."""
    dequantized = {n.output[0] for n in model.graph.node if n.op_type == "DequantizeLinear"}
    return {n.output[0].removesuffix("_float"): (n.input[0] in dequantized, n.input[1] in dequantized)
            for n in model.graph.node if n.op_type in ("Conv", "Gemm")}


def float_layers(model: onnx.ModelProto):
    return {name for name, (activation, weight) in layers(model).items() if not activation and not weight}


def left_in_float(model: onnx.ModelProto, **fields):
    """The node names a QuantizationConfig's node selection resolves to on ``model``."""
    return compat.QuantizationConfig(**fields).translate()[1].selection.resolve(model)


def test_nodes_to_exclude_leaves_those_nodes_in_float(tiny_model, tiny_data):
    # tiny_cnn's nodes are unnamed: OpType(first output); its Conv(c1) -> BatchNormalization(bn1)
    # become one Conv(bn1) in graph preparation, which either name stands for
    assert float_layers(quantize_tiny(tiny_model, tiny_data)) == set()
    excluded = quantize_tiny(tiny_model, tiny_data, nodes_to_exclude=["Conv(c3)", "BatchNormalization(bn1)"])
    assert float_layers(excluded) == {"c3", "bn1"} and layers(excluded)["c2"] == (True, True)
    assert float_layers(quantize_tiny(tiny_model, tiny_data, nodes_to_exclude=["Conv(c1)"])) == {"bn1"}
    by_pattern = quantize_tiny(tiny_model, tiny_data, nodes_to_exclude=["Conv\\(c.*"])  # Quark's regular expressions
    assert float_layers(by_pattern) == {"bn1", "c2", "c3"}
    # without a model (pyquant.quantize, the CLI) exact names go to QuantConfig.nodes_to_exclude
    assert pyquant.QuantizationConfig(nodes_to_exclude=["Conv(c3)"]).to_quant_config().nodes_to_exclude == {"Conv(c3)"}


def test_op_types_to_quantize_field_extra_option_and_extra_types(tiny_model, tiny_data, caplog):
    only_conv = quantize_tiny(tiny_model, tiny_data, op_types_to_quantize=["Conv"])
    assert float_layers(only_conv) == {"y"} and layers(only_conv)["c3"] == (True, True)
    option = quantize_tiny(tiny_model, tiny_data, extra_options={"OpTypesToQuantize": ["Conv"]})
    assert option.SerializeToString() == only_conv.SerializeToString()
    both = quantize_tiny(tiny_model, tiny_data, op_types_to_quantize=["Conv"],
                         extra_options={"OpTypesToQuantize": ["Conv"]})
    assert both.SerializeToString() == only_conv.SerializeToString()
    with pytest.raises(ConfigError, match="op_types_to_quantize \\['Conv'\\] and .*\\['Gemm'\\] differ"):
        pyquant.QuantizationConfig(op_types_to_quantize=["Conv"], extra_options={"OpTypesToQuantize": ["Gemm"]}) \
            .to_quant_config()
    with_gemm = quantize_tiny(tiny_model, tiny_data, op_types_to_quantize=["Conv"], extra_op_types_to_quantize=["Gemm"])
    assert float_layers(with_gemm) == set() and with_gemm.SerializeToString() != only_conv.SerializeToString()
    assert pyquant.QuantizationConfig(op_types_to_quantize=["Conv"], extra_op_types_to_quantize=["Gemm"]) \
        .to_quant_config().op_types_to_quantize == {"Conv", "Gemm"}
    with caplog.at_level(logging.WARNING, logger="pyquant"):  # alone, a check only: everything is quantized anyway
        config = pyquant.QuantizationConfig(extra_op_types_to_quantize=["Gemm", "Einsum"]).to_quant_config()
    assert config == pyquant.QuantizationConfig().to_quant_config()
    assert "extra_op_types_to_quantize" in caplog.text and "Einsum: no rule, left in float" in caplog.text


def test_subgraphs_to_exclude_leave_the_nodes_between_in_float(tiny_model, tiny_model_path, tiny_data):
    between = {"Conv(c2)", "Clip(r2)", "Conv(c3)", "Add(a1)"}  # Relu(r1) also feeds Add(a1), from before Conv(c2)
    assert left_in_float(tiny_model, subgraphs_to_exclude=[(["Conv(c2)"], ["Add(a1)"])]) == between
    assert left_in_float(tiny_model, subgraphs_to_exclude=[("Conv(c2)", "Add(a1)")]) == between
    assert left_in_float(tiny_model, subgraphs_to_exclude=[(["Conv(c2)"], ["Clip(r2)"]), (["Gemm(y)"], ["Gemm(y)"])]) \
        == {"Conv(c2)", "Clip(r2)", "Gemm(y)"}
    model = quantize_tiny(tiny_model, tiny_data, subgraphs_to_exclude=[(["Conv(c2)"], ["Add(a1)"])])
    assert float_layers(model) == {"c2", "c3"} and layers(model)["bn1"] == layers(model)["y"] == (True, True)
    from_path = quantize_tiny(str(tiny_model_path), tiny_data, subgraphs_to_exclude=[(["Conv(c2)"], ["Add(a1)"])])
    assert from_path.SerializeToString() == model.SerializeToString()
    with pytest.raises(ConfigError, match="subgraphs_to_exclude\\[0\\]: 'Add\\(a1\\)', 'Conv\\(c2\\)' are on no path "
                                          ".*swapped"):
        left_in_float(tiny_model, subgraphs_to_exclude=[(["Add(a1)"], ["Conv(c2)"])])


def test_input_and_output_nodes_bound_the_quantized_part(tiny_model, tiny_data):
    after = {"MaxPool(p1)", "AveragePool(p2)", "Concat(cat)", "GlobalAveragePool(gap)", "Flatten(flat)", "Gemm(y)"}
    assert left_in_float(tiny_model, input_nodes=["Conv(c2)"]) == {"Conv(bn1)", "Relu(r1)"}
    assert left_in_float(tiny_model, output_nodes=["Add(a1)"]) == after
    model = quantize_tiny(tiny_model, tiny_data, input_nodes=["Conv(c2)"], output_nodes=["Add(a1)"])
    assert float_layers(model) == {"bn1", "y"} and layers(model)["c3"] == (True, True)
    with pytest.raises(ConfigError, match="'Gemm\\(y\\)', 'Conv\\(c2\\)' are on no path"):
        left_in_float(tiny_model, input_nodes=["Gemm(y)"], output_nodes=["Conv(c2)"])


def test_nodes_to_quantize_leaves_every_other_node_in_float(tiny_model, tiny_data):
    prepared = prepare_graph(tiny_model)[0]
    every = {GraphView(prepared).node_name(n) for n in prepared.graph.node}
    chosen = {"Conv(c2)", "Gemm(y)"}
    assert left_in_float(tiny_model, nodes_to_quantize=sorted(chosen)) == every - chosen
    assert left_in_float(tiny_model, nodes_to_quantize=sorted(chosen), nodes_to_exclude=["Gemm(y)"]) \
        == every - {"Conv(c2)"}  # exclusions win
    model = quantize_tiny(tiny_model, tiny_data, nodes_to_quantize=sorted(chosen))
    assert {name for name, (_, weight) in layers(model).items() if weight} == {"c2", "y"}


@pytest.mark.parametrize("fields,message", [
    ({"nodes_to_exclude": ["Conv_0"]}, "nodes_to_exclude: 'Conv_0' names no node of the model"),
    ({"nodes_to_exclude": ["^/layer0/.*"]}, "regular expression '\\^/layer0/\\.\\*' matches no node name"),
    ({"nodes_to_quantize": ["Conv(c2)", "Conv_0"]}, "nodes_to_quantize: 'Conv_0' names no node"),
    ({"subgraphs_to_exclude": [(["Conv(c2)"], ["Add_9"])]}, "subgraphs_to_exclude\\[0\\]: 'Add_9' names no node"),
    ({"input_nodes": ["Conv_0"]}, "input_nodes: 'Conv_0' names no node"),
    ({"output_nodes": ["Gemm_0"]}, "output_nodes: 'Gemm_0' names no node"),
])
def test_names_that_match_no_node_are_errors(fields, message, tiny_model, tiny_data):
    with pytest.raises(ConfigError, match=message):
        quantize_tiny(tiny_model, tiny_data, **fields)


@pytest.mark.parametrize("field,value", [
    ("nodes_to_quantize", ["Conv(c2)"]), ("subgraphs_to_exclude", [(["Conv(c2)"], ["Add(a1)"])]),
    ("input_nodes", ["Conv(c2)"]), ("output_nodes", ["Add(a1)"]), ("nodes_to_exclude", ["Conv.*"]),
])
def test_choices_that_need_the_model_are_errors_without_it(field, value, tiny_model, tiny_data):
    with pytest.raises(ConfigError, match=f"{field}.*use ModelQuantizer.*or nodes_to_exclude with the exact names"):
        pyquant.quantize(tiny_model, tiny_data, u8s8(**{field: value}))
