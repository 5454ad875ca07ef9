"""Every option has an observable effect, or is refused; every default is defined once.

EFFECTS is the table: each field of QuantConfig, CLEOptions and FastFinetuneOptions, a
non-default value, the configuration it is tried on, and what must change (the model's
bytes, the number of calibration batches, the kernels' thread count) or that it is
refused. A field added to the configuration without a row here fails
test_every_option_is_in_the_effect_table.
"""
from __future__ import annotations

import dataclasses
import logging
import re
from pathlib import Path
from typing import Any, Dict, NamedTuple

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import pyquant
from pyquant import Config, ModelQuantizer, QuantizationConfig, get_default_config, kernels, threads
from pyquant.api import quantize_detailed
from pyquant.cli import main
from pyquant.compat import DEFAULT_ADAROUND_PARAMS, EXTRA_OPTIONS, FAST_FINETUNE_OPTIONS, fast_finetune_options
from pyquant.config import (CalibrationMethod, CLEOptions, FastFinetuneOptions, FinetuneAlgorithm, QuantConfig,
                            QuantType, get_preset)
from pyquant.errors import ConfigError
from pyquant.techniques import Callbacks

U8S8 = get_preset("U8S8")
INT8_CLE = get_preset("INT8_CLE")
FINETUNE = dataclasses.replace(get_preset("XINT8"), fast_finetune=FastFinetuneOptions(iterations=60))


class Run(NamedTuple):
    model: bytes
    batches: int
    kernel_threads: int


def run(model, data, config: QuantConfig) -> Run:
    seen = {"batches": 0, "threads": 0}

    def progress(done, total):
        seen["batches"], seen["threads"] = done, kernels.get_num_threads()

    result = quantize_detailed(model, data, config, progress=Callbacks(calibration=progress))
    return Run(result.model.SerializeToString(), seen["batches"], seen["threads"])


def biased_pair():
    """Conv (1x1, biases far above its weights) -> Relu -> Conv 1x1: every channel of the
    activation stays above zero, so high-bias absorption and a bias-aware CLE range act."""
    rng = np.random.default_rng(0)
    init = [numpy_helper.from_array((rng.standard_normal((8, 3, 1, 1)) * 0.3).astype(np.float32), "w1"),
            numpy_helper.from_array(rng.uniform(3, 6, 8).astype(np.float32), "b1"),
            numpy_helper.from_array((rng.standard_normal((4, 8, 1, 1)) * 0.3).astype(np.float32), "w2")]
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"]), helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("Conv", ["r1", "w2"], ["y"])]
    graph = helper.make_graph(nodes, "biased", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 16, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 16, 16])], init)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _cle(**kw) -> QuantConfig:
    return dataclasses.replace(INT8_CLE, cle=CLEOptions(**kw))


def _ft(**kw) -> QuantConfig:
    return dataclasses.replace(FINETUNE, fast_finetune=dataclasses.replace(FINETUNE.fast_finetune, **kw))


# path -> (base config, value, what must change[, model builder (default: tiny_cnn)]);
# "cle.x" / "fast_finetune.x" are sub-options.
EFFECTS: Dict[str, tuple] = {
    "activation_type": (U8S8, QuantType.QInt8, "model"),
    "weight_type": (U8S8, QuantType.QUInt8, "model"),
    "calibrate_method": (U8S8, CalibrationMethod.MinMax, "model"),
    "activation_symmetric": (U8S8, True, "model"),
    "per_channel": (U8S8, True, "model"),
    "enable_npu_cnn": (U8S8, True, "model"),
    "quantize_region_outputs": (U8S8, True, "model"),
    "percentile": (U8S8, 99.0, "model"),
    "num_bins": (U8S8, 256, "model"),
    "calib_batch_size": (U8S8, 5, "batches"),
    "threads": (U8S8, threads.available_cpus() + 1, "kernel_threads"),
    "weight_scale_mse": (U8S8, False, "model"),
    "bias_correction": (U8S8, False, "model"),
    "empirical_bias_correction": (U8S8, 1, "model"),
    "cross_layer_equalization": (U8S8, True, "model"),
    "fast_finetune": (U8S8, FastFinetuneOptions(iterations=60), "model"),
    "nodes_to_exclude": (U8S8, frozenset({"Conv(c3)"}), "model"),
    "op_types_to_quantize": (U8S8, frozenset({"Conv"}), "model"),
    "tensor_types": (U8S8, {"r1": QuantType.QInt16}, "model"),
    # (percentile 99: the tiny data has too few values for 99.999 to clip anything)
    "unclipped_output_layers": (dataclasses.replace(U8S8, percentile=99.0, unclipped_output_layers=None,
                                                    clipped_input_layers=None), 3, "model"),
    "clipped_input_layers": (dataclasses.replace(U8S8, percentile=99.0, clipped_input_layers=None), 1, "model"),
    "int32_bias": (get_preset("XINT8"), False, "model"),  # int8 biases with their own power-of-two scale
    "cle.steps": (_cle(), 1, "model"),
    "cle.tolerance": (_cle(), 0.9, "model"),
    "cle.activation_weight": (_cle(), 0.0, "model"),
    "cle.activation_samples": (_cle(), 8, "model"),
    "cle.high_bias_absorption": (_cle(), True, "model", biased_pair),
    "cle.replace_clip_with_relu": (_cle(), True, "model"),
    "cle.scale_append_bias": (_cle(), True, "model", biased_pair),
    "fast_finetune.algorithm": (_ft(), FinetuneAlgorithm.AdaQuant, "model"),
    "fast_finetune.iterations": (_ft(), 3, "model"),
    "fast_finetune.learning_rate": (_ft(), 0.5, "model"),
    "fast_finetune.reg_param": (_ft(), 0.5, "model"),
    "fast_finetune.beta_range": (_ft(), (4.0, 2.0), "model"),
    "fast_finetune.warm_start": (_ft(), 0.8, "model"),
    "fast_finetune.early_stop": (_ft(), False, "model"),
    "fast_finetune.update_bias": (_ft(), False, "model"),
    "fast_finetune.data_size": (_ft(), 16, "model"),
    "fast_finetune.data_batches": (_ft(), 1, "model"),
}


def with_option(config: QuantConfig, path: str, value: Any) -> QuantConfig:
    head, _, rest = path.partition(".")
    if not rest:
        return dataclasses.replace(config, **{head: value})
    return dataclasses.replace(config, **{head: dataclasses.replace(getattr(config, head), **{rest: value})})


def test_every_option_is_in_the_effect_table():
    fields = {f.name for f in dataclasses.fields(QuantConfig)} - {"cle"}
    fields |= {f"cle.{f.name}" for f in dataclasses.fields(CLEOptions)}
    fields |= {f"fast_finetune.{f.name}" for f in dataclasses.fields(FastFinetuneOptions)}
    assert fields == set(EFFECTS)


@pytest.mark.parametrize("path", list(EFFECTS))
def test_every_option_changes_what_it_says(path, tiny_model, tiny_data):
    base, value, observe, *builder = EFFECTS[path]
    if builder:
        tiny_model = builder[0]()
    head, _, rest = path.partition(".")
    current = getattr(getattr(base, head), rest) if rest else getattr(base, head)
    assert current != value, f"{path}: the tried value is the base config's own"
    if observe == "refused":
        with pytest.raises(ConfigError):
            with_option(base, path, value)
        return
    before = run(tiny_model, tiny_data, base)
    after = run(tiny_model, tiny_data, with_option(base, path, value))
    assert getattr(before, observe) != getattr(after, observe), f"{path}={value!r} changed no {observe}"
    if observe == "kernel_threads":
        assert after.kernel_threads == value


def test_thread_budget_is_restored_after_a_run(tiny_model, tiny_data):
    before = kernels.get_num_threads()
    run(tiny_model, tiny_data, dataclasses.replace(U8S8, threads=1))
    assert kernels.get_num_threads() == before


# ---- the Quark-compatible keys: the README's table is the list ------------------------

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_key_table():
    """{key: (kind, pyquant field, status)} from the README's "Quark-compatible keys" table."""
    text = README.read_text()
    section = text.split("### Quark-compatible keys", 1)[1].split("\n#", 1)[0]
    rows = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 4 and cells[0].startswith("`"):
            rows[cells[0].strip("`")] = (cells[1], cells[2].strip("`"), cells[3])
    return rows


def test_the_readme_documents_exactly_the_accepted_keys():
    rows = readme_key_table()
    extra = {k for k, (kind, _, _) in rows.items() if kind == "extra_options"}
    finetune = {k for k, (kind, _, _) in rows.items() if kind == "FastFinetune"}
    assert extra == set(EXTRA_OPTIONS)
    assert finetune == set(FAST_FINETUNE_OPTIONS)


# A value for each key that differs from the default, to see where it lands.
KEY_VALUES = {
    "ActivationSymmetric": True, "WeightSymmetric": True, "Percentile": 99.0, "NumBins": 256, "CalibDataBatchSize": 5,
    "CLESteps": 1, "CLETotalLayerDiffThreshold": 0.9, "ReplaceClip6Relu": True, "CLEScaleAppendBias": True,
    "CLEActivationWeight": 0.0, "CLEActivationSamples": 8, "QuantizeRegionOutputs": False,
    "UnclippedOutputLayers": 3, "ClippedInputLayers": 1,
    "FastFinetune": {"NumIterations": 3}, "OpTypesToQuantize": ["Conv"],
    "MixedPrecisionTensor": {QuantType.QInt16: ["r1"]},
    "OptimAlgorithm": "adaquant", "NumIterations": 3, "LearningRate": 0.5, "RegParam": 0.5, "BetaRange": (4, 2),
    "WarmStart": 0.8, "EarlyStop": False, "UpdateBias": False, "DataSize": 16, "NumBatches": 1, "OptimDevice": "cpu",
    "InferDevice": "cpu", "BatchSize": 4, "FixedSeed": 7, "LogPeriod": 10,
    "DataBatches": 1, "FallbackToNearest": False, "SelectiveUpdate": False, "OutputQDQ": False, "DropRatio": 1,
    # Quark's preset keys: the value Quark's presets use (or, where that is pyquant's own
    # behaviour, the other one, which logs a notice)
    "ForceQuantizeNoInputCheck": True, "Int32Bias": True, "Int16Bias": False, "QuantizeBias": True, "FoldRelu": True,
    "AlignConcat": True, "AlignSlice": False, "AlignEltwiseQuantType": True, "CalibMovingAverage": False,
    "UseRandomData": False, "WeightsOnly": False, "QuantizeAllOpTypes": False, "ConvertSigmoidToHardSigmoid": False,
    "UseMatMulNBits": False, "ConvertBNToConv": True, "ConvertClipToRelu": True, "ConvertSplitToSlice": True,
    "SplitLargeKernelPool": True, "ConvertReduceMeanToGlobalAvgPool": True, "RemoveQDQConvRelu": False,
    "RemoveQDQConvClip": False, "RemoveQDQConvLeakyRelu": True, "RemoveQDQConvPRelu": True, "DedicatedQDQPair": True,
    "DedicateDQNode": True, "BF16QDQToCast": True,
}


# Keys that only act beside another one: it is given on both sides of the comparison.
KEY_COMPANIONS = {"ClippedInputLayers": {"UnclippedOutputLayers": 3}}


def changed_paths(a: QuantConfig, b: QuantConfig):
    paths = set()
    for f in dataclasses.fields(QuantConfig):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if dataclasses.is_dataclass(x) and dataclasses.is_dataclass(y):
            paths |= {f"{f.name}.{g.name}" for g in dataclasses.fields(x) if getattr(x, g.name) != getattr(y, g.name)}
        elif x != y:
            paths.add(f.name)
    return paths


@pytest.mark.parametrize("key", sorted(set(EXTRA_OPTIONS) | set(FAST_FINETUNE_OPTIONS)))
def test_each_documented_key_does_what_the_readme_says(key, caplog):
    kind, field, status = readme_key_table()[key]
    base = QuantizationConfig(calibrate_method=CalibrationMethod.Percentile, include_cle=True, include_fast_ft=True)
    options = {key: KEY_VALUES[key]}
    if kind == "FastFinetune":
        options = {"FastFinetune": options}
    base = dataclasses.replace(base, extra_options=dict(KEY_COMPANIONS.get(key, {})))
    with caplog.at_level(logging.WARNING, logger="pyquant"):
        changed = changed_paths(base.to_quant_config(),
                                dataclasses.replace(base, extra_options={**base.extra_options, **options})
                                .to_quant_config())
    if status.startswith("honoured"):
        assert changed and all(p == field or p.startswith(field + ".") for p in changed), \
            f"{key} changed {changed}, the README says {field}"
        assert field in EFFECTS  # and so the field's effect is tested above
    elif status.startswith("notice"):
        assert not changed and key in caplog.text, f"{key}: no notice was logged"
    else:  # "same as pyquant": the value the README gives is what pyquant does anyway
        assert status.startswith("pyquant's behaviour") and not changed


# ---- one request, one model: the CLI, the typed API and the Quark layer ------------------

def test_cli_typed_api_and_quark_layer_give_the_same_model(tmp_path, tiny_model_path, tiny_data):
    np.save(tmp_path / "calib.npy", tiny_data)
    out = tmp_path / "cli.onnx"
    assert main(["quantize", "--model_input", str(tiny_model_path), "--model_output", str(out), "--calib_data",
                 str(tmp_path / "calib.npy"), "--config", "XINT8", "--fast_finetune", "--quiet"]) == 0
    typed = dataclasses.replace(get_preset("XINT8"), fast_finetune=FastFinetuneOptions())
    from_api = pyquant.quantize(str(tiny_model_path), tiny_data, typed)
    xint8 = get_default_config("XINT8")
    quark = QuantizationConfig(calibrate_method=xint8.calibrate_method, activation_type=xint8.activation_type,
                               weight_type=xint8.weight_type, enable_npu_cnn=xint8.enable_npu_cnn,
                               include_cle=False, include_fast_ft=True, extra_options=dict(xint8.extra_options))
    from_quark = ModelQuantizer(Config(global_quant_config=quark)).quantize_model(
        str(tiny_model_path), None, pyquant.api.as_reader(tiny_data, from_api))
    assert onnx.load(out).SerializeToString() == from_api.SerializeToString() == from_quark.SerializeToString()


def test_default_adaround_params_are_the_typed_defaults():
    assert fast_finetune_options(DEFAULT_ADAROUND_PARAMS) == FastFinetuneOptions()
    assert QuantizationConfig(include_fast_ft=True).to_quant_config().fast_finetune == FastFinetuneOptions()


def test_cli_help_states_each_default_once(capsys):
    with pytest.raises(SystemExit):
        main(["quantize", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for option in re.findall(r"--\w+", text):
        entry = text.split(option, 1)[1].split(" --", 1)[0]
        assert entry.count("default") <= 1, f"{option}: {entry}"
    assert "(default: None)" not in text
