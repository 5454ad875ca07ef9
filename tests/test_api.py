"""The library surface: pyquant.quantize / evaluate and the Quark-compatible layer."""
import dataclasses
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import pyquant
from pyquant.evaluation import mean_kl_divergence
from pyquant import (CalibrationMethod, Config, ConfigError, DataError, ModelQuantizer, OutputError, PowerOfTwoMethod,
                     QuantizationConfig, QuantType, get_default_config, get_preset)
from pyquant.compat import resolve


@pytest.mark.parametrize("name", list(pyquant.PRESETS))
def test_default_configs_round_trip_to_the_presets(name):
    assert resolve(Config(global_quant_config=get_default_config(name))) == get_preset(name)


@pytest.mark.parametrize("key,value,field,expected", [
    ("ActivationSymmetric", True, "activation_symmetric", True),
    ("Percentile", 99.9999, "percentile", 99.9999),
    ("NumBins", 4096, "num_bins", 4096),
    ("CalibDataBatchSize", 4, "calib_batch_size", 4),
    ("CLESteps", 7, "cle.steps", 7),
    ("CLETotalLayerDiffThreshold", 0.01, "cle.tolerance", 0.01),
    ("ReplaceClip6Relu", True, "cle.replace_clip_with_relu", True),
    ("CLEScaleAppendBias", True, "cle.scale_append_bias", True),
    ("CLEActivationWeight", 0.0, "cle.activation_weight", 0.0),
    ("CLEActivationSamples", 16, "cle.activation_samples", 16),
    ("QuantizeRegionOutputs", False, "quantize_region_outputs", False),
])
def test_every_extra_option_maps_to_the_typed_config(key, value, field, expected):
    cfg = QuantizationConfig(calibrate_method=CalibrationMethod.Percentile, include_cle=True,
                             extra_options={key: value}).to_quant_config()
    for part in field.split("."):
        cfg = getattr(cfg, part)
    assert cfg == expected


def test_include_cle_defaults_to_true_as_in_quark():
    assert QuantizationConfig().to_quant_config().cross_layer_equalization
    assert not QuantizationConfig(include_cle=False).to_quant_config().cross_layer_equalization


def test_unknown_extra_option_is_an_error_listing_valid_keys():
    with pytest.raises(ConfigError, match="unknown extra_options key 'Percentil'.*valid keys: ActivationSymmetric"):
        QuantizationConfig(extra_options={"Percentil": 99.9}).to_quant_config()


@pytest.mark.parametrize("kwargs,message", [
    ({"extra_options": {"WeightSymmetric": False}}, "WeightSymmetric"),
    ({"extra_options": {"ActivationSymmetric": "yes"}}, "True or False"),
    ({"include_cle": True, "extra_options": {"CLESteps": 0}}, "CLE steps"),
    ({"extra_options": {"FastFinetune": {"NumIterations": 5}}}, "include_fast_ft"),
    ({"calibrate_method": PowerOfTwoMethod.MinMSE, "per_channel": True}, "per_channel"),
    ({"weight_type": QuantType.QUInt8}, "weight_type"),
])
def test_contradictions_and_unavailable_options_are_errors(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        QuantizationConfig(**kwargs).to_quant_config()


def test_unknown_preset_names_the_valid_ones():
    with pytest.raises(ConfigError, match="valid presets: XINT8, INT8_CLE, INT8_CNN_ACCURATE, A8W8, U8S8"):
        get_default_config("XINT9")


def test_quantize_accepts_proto_array_dict_iterable_and_reader(tiny_model, tiny_data):
    results = []
    for data in (tiny_data, {"x": tiny_data}, ({"x": tiny_data[i:i + 8]} for i in range(0, 64, 8)),
                 pyquant.data.ArrayReader(tiny_data, "x", 8)):
        q = pyquant.quantize(tiny_model, data, "U8S8")
        onnx.checker.check_model(q)
        results.append({t.name: numpy_helper.to_array(t).tobytes() for t in q.graph.initializer})
    assert all(r == results[0] for r in results[1:])  # same data, same model, whatever the form


def test_model_quantizer_writes_file(tmp_path, tiny_model_path, tiny_data):
    out = tmp_path / "q.onnx"
    ModelQuantizer(Config(global_quant_config=get_default_config("XINT8"))).quantize_model(
        str(tiny_model_path), str(out), pyquant.data.ArrayReader(tiny_data, "x", 16))
    onnx.checker.check_model(onnx.load(out))


def test_evaluate_arrays_with_labels(tiny_model, tiny_data):
    labels = pyquant.evaluate(tiny_model, tiny_data, labels=np.zeros(64, int)).predictions
    result = pyquant.evaluate(tiny_model, tiny_data, labels=labels)
    assert result.top1 == 1.0 and result.n == 64


def test_evaluate_keeps_logits_and_kl_divergence(tiny_model, tiny_data):
    labels = np.zeros(64, int)
    result = pyquant.evaluate(tiny_model, tiny_data, labels=labels, batch_size=10, keep_logits=True)
    assert pyquant.evaluate(tiny_model, tiny_data, labels=labels).logits is None
    assert result.logits.shape[0] == 64 and np.array_equal(result.logits.argmax(axis=1), result.predictions)
    assert mean_kl_divergence(result.logits, result.logits) == pytest.approx(0.0, abs=1e-12)
    assert mean_kl_divergence(result.logits, result.logits + 5.0) == pytest.approx(0.0, abs=1e-9)  # shift-free
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(7, 5)) * 3, rng.normal(size=(7, 5)) * 3
    p = np.exp(a) / np.exp(a).sum(axis=1, keepdims=True)
    q = np.exp(b) / np.exp(b).sum(axis=1, keepdims=True)
    assert mean_kl_divergence(a, b) == pytest.approx(np.mean(np.sum(p * np.log(p / q), axis=1)), rel=1e-9)
    assert mean_kl_divergence(a, b) > 0
    with pytest.raises(ValueError, match="one shape"):
        mean_kl_divergence(a, b[:, :4])


@pytest.mark.parametrize("feed,message", [
    ({"y": np.zeros((2, 3, 16, 16), np.float32)}, "do not match the model inputs"),
    ({"x": np.zeros((2, 3, 16), np.float32)}, "rank 3"),
    ({"x": np.zeros((2, 3, 16, 16), np.float64)}, "dtype float64"),
])
def test_reader_feed_mismatch_names_the_problem(tiny_model, feed, message):
    with pytest.raises(DataError, match=message):
        pyquant.quantize(tiny_model, [feed], "U8S8")


def test_missing_external_data_is_a_model_error(tmp_path, tiny_model):
    path = tmp_path / "ext.onnx"
    onnx.save_model(tiny_model, path, save_as_external_data=True, all_tensors_to_one_file=True,
                    location="ext.onnx.data", size_threshold=0)
    (tmp_path / "ext.onnx.data").unlink()
    with pytest.raises(pyquant.ModelError, match="ext.onnx"):
        pyquant.quantize(path, np.zeros((1, 3, 16, 16), np.float32))


def test_external_data_model_quantizes(tmp_path, tiny_model, tiny_data):
    path = tmp_path / "ext.onnx"
    onnx.save_model(tiny_model, path, save_as_external_data=True, all_tensors_to_one_file=True,
                    location="ext.onnx.data", size_threshold=0)
    onnx.checker.check_model(pyquant.quantize(path, tiny_data, "A8W8"))


def test_unwritable_output_is_an_output_error_and_leaves_nothing(tmp_path, tiny_model, tiny_data):
    with pytest.raises(OutputError, match="/proc"):
        pyquant.quantize(tiny_model, tiny_data, "U8S8", output="/proc/pyquant-test.onnx")


def test_ctrl_c_during_calibration_exits_promptly_and_leaves_no_file(tmp_path, tiny_model_path):
    out = tmp_path / "q.onnx"
    script = textwrap.dedent(f"""
        import sys, time, numpy as np
        import pyquant.data
        class Slow(pyquant.data.ArrayReader):
            def get_next(self):
                time.sleep(0.05)
                return super().get_next()
        pyquant.data.ArrayReader = Slow  # the CLI builds its reader from this class
        np.save({str(tmp_path / 'calib.npy')!r}, np.zeros((100000, 3, 16, 16), np.float32))
        from pyquant.cli import main
        print("ready", flush=True)
        sys.exit(main(["quantize", "--model_input", {str(tiny_model_path)!r}, "--model_output", {str(out)!r},
                       "--calib_data", {str(tmp_path / 'calib.npy')!r}, "--quiet", "--batch_size", "1"]))
    """)
    # cwd: outside the source tree, so that the installed (compiled) package is imported
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=tmp_path)
    assert proc.stdout.readline().strip() == "ready"
    time.sleep(2.0)
    start = time.monotonic()
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    assert time.monotonic() - start < 10
    assert proc.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".q.onnx")]


def test_a_list_of_feeds_can_be_read_twice_for_fast_finetune(tiny_model, tiny_data):
    feeds = [{"x": tiny_data[i:i + 16]} for i in range(0, 64, 16)]
    config = dataclasses.replace(get_preset("XINT8"), fast_finetune=pyquant.config.FastFinetuneOptions(iterations=5))
    onnx.checker.check_model(pyquant.quantize(tiny_model, feeds, config))
    with pytest.raises(DataError, match="rewind"):
        pyquant.quantize(tiny_model, iter(feeds), config)
