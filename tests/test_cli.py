"""The command line: the main path, and one clear error (no traceback, no output file)
for each kind of bad input."""
import json
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from PIL import Image

from pyquant.cli import build_parser, main, quant_config_from_args


@pytest.fixture
def image_folder(tmp_path):
    rng = np.random.default_rng(0)
    root = tmp_path / "images"
    for cls in ("n001", "n002"):
        (root / cls).mkdir(parents=True)
        for i in range(5):
            Image.fromarray(rng.integers(0, 255, (24, 20, 3), dtype=np.uint8)).save(root / cls / f"{i}.png")
    return root


def quantize_args(model, out, data, *extra):
    return ["quantize", "--model_input", str(model), "--model_output", str(out), "--calib_data", str(data),
            "--quiet", *extra]


def expect_error(capsys, argv, code, *fragments):
    assert main(argv) == code
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith("pyquant: error:"), err
    assert "Traceback" not in "\n".join(err)
    for f in fragments:
        assert f in err[-1], err[-1]


@pytest.mark.parametrize("preset", ["XINT8", "A8W8", "U8S8"])
def test_quantize_then_eval_json(tmp_path, tiny_model_path, image_folder, capsys, preset):
    out = tmp_path / "q.onnx"
    assert main(quantize_args(tiny_model_path, out, image_folder, "--config", preset)) == 0
    onnx.checker.check_model(onnx.load(out))
    capsys.readouterr()
    assert main(["eval", "--model", str(out), "--data", str(image_folder), "--json", "--quiet"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["n"] == 10 and 0 <= result["top1"] <= result["top5"] <= 1 and result["size_mb"] > 0


def test_quantize_from_npy(tmp_path, tiny_model_path, tiny_data):
    np.save(tmp_path / "calib.npy", tiny_data)
    out = tmp_path / "q.onnx"
    assert main(quantize_args(tiny_model_path, out, tmp_path / "calib.npy", "--config", "U8S8",
                              "--per_channel")) == 0
    assert out.exists()


@pytest.mark.parametrize("flag,rounded", [(None, True), ("--no-quantize_region_outputs", False),
                                          ("--quantize_region_outputs", True)])
def test_quantize_region_outputs_flag_overrides_the_preset(tmp_path, tiny_model_path, tiny_data, flag, rounded):
    np.save(tmp_path / "calib.npy", tiny_data)
    out = tmp_path / "q.onnx"
    assert main(quantize_args(tiny_model_path, out, tmp_path / "calib.npy", "--config", "XINT8",
                              *([flag] if flag else []))) == 0
    producer = {o: n.op_type for n in onnx.load(out).graph.node for o in n.output}
    assert producer["y"] == ("DequantizeLinear" if rounded else "Gemm")


def test_empirical_bias_correction_flag_reaches_the_config(tmp_path, tiny_model_path, tiny_data, caplog):
    np.save(tmp_path / "calib.npy", tiny_data)
    out = tmp_path / "q.onnx"
    caplog.set_level("INFO", logger="pyquant.techniques.empirical_bias_correction")
    assert main(quantize_args(tiny_model_path, out, tmp_path / "calib.npy", "--config", "U8S8",
                              "--empirical_bias_correction", "2")) == 0
    assert "empirical bias correction:" in caplog.text and "2 passes" in caplog.text


def test_negative_empirical_bias_correction_is_a_usage_error(tmp_path, tiny_model_path, tiny_data, capsys):
    np.save(tmp_path / "calib.npy", tiny_data)
    expect_error(capsys, quantize_args(tiny_model_path, tmp_path / "q.onnx", tmp_path / "calib.npy",
                                       "--empirical_bias_correction", "-1"), 2, "empirical_bias_correction")
    assert not (tmp_path / "q.onnx").exists()


def test_unclipped_output_layers_flag_reaches_the_config(tmp_path, tiny_model_path, tiny_data, capsys):
    args = build_parser().parse_args(quantize_args(tiny_model_path, tmp_path / "q.onnx", tmp_path / "calib.npy",
                                                   "--config", "U8S8", "--unclipped_output_layers", "4"))
    assert quant_config_from_args(args).unclipped_output_layers == 4
    args = build_parser().parse_args(quantize_args(tiny_model_path, tmp_path / "q.onnx", tmp_path / "calib.npy",
                                                   "--config", "U8S8"))
    config = quant_config_from_args(args)
    assert (config.unclipped_output_layers, config.clipped_input_layers) == (4, 4)  # the preset's
    args = build_parser().parse_args(quantize_args(tiny_model_path, tmp_path / "q.onnx", tmp_path / "calib.npy",
                                                   "--config", "U8S8", "--unclipped_output_layers", "none"))
    config = quant_config_from_args(args)
    assert (config.unclipped_output_layers, config.clipped_input_layers) == (None, None)  # nothing left to limit
    args = build_parser().parse_args(quantize_args(tiny_model_path, tmp_path / "q.onnx", tmp_path / "calib.npy",
                                                   "--config", "U8S8", "--clipped_input_layers", "NONE",
                                                   "--unclipped_output_layers", "6"))
    config = quant_config_from_args(args)
    assert (config.unclipped_output_layers, config.clipped_input_layers) == (6, None)
    np.save(tmp_path / "calib.npy", tiny_data)
    expect_error(capsys, quantize_args(tiny_model_path, tmp_path / "q.onnx", tmp_path / "calib.npy",
                                       "--unclipped_output_layers", "-1"), 2, "unclipped_output_layers")
    expect_error(capsys, quantize_args(tiny_model_path, tmp_path / "q.onnx", tmp_path / "calib.npy", "--config",
                                       "U8S8", "--unclipped_output_layers", "none", "--clipped_input_layers", "2"),
                 2, "clipped_input_layers=2 limits unclipped_output_layers, which is None")
    with pytest.raises(SystemExit) as exit_info:  # argparse's usage error
        build_parser().parse_args(quantize_args(tiny_model_path, tmp_path / "q.onnx", tmp_path / "calib.npy",
                                                "--clipped_input_layers", "few"))
    assert exit_info.value.code == 2
    assert "--clipped_input_layers: expected an integer or 'none', got 'few'" in capsys.readouterr().err
    assert not (tmp_path / "q.onnx").exists()


def test_corrupt_image_is_skipped_with_a_count(tmp_path, tiny_model_path, image_folder, caplog):
    (image_folder / "n001" / "broken.jpg").write_bytes(b"not a jpeg")
    out = tmp_path / "q.onnx"
    assert main(quantize_args(tiny_model_path, out, image_folder)) == 0
    assert out.exists()
    assert "skipped 1 unreadable calibration image" in caplog.text


def test_missing_model(tmp_path, image_folder, capsys):
    expect_error(capsys, quantize_args(tmp_path / "nope.onnx", tmp_path / "q.onnx", image_folder), 1,
                 "model file not found", "nope.onnx")
    assert not (tmp_path / "q.onnx").exists()


def test_model_is_directory(tmp_path, image_folder, capsys):
    expect_error(capsys, quantize_args(tmp_path, tmp_path / "q.onnx", image_folder), 1, "is a directory")


@pytest.mark.parametrize("content", [b"garbage, not protobuf \x00\xff" * 10, "truncated"])
def test_not_onnx_or_truncated(tmp_path, tiny_model_path, image_folder, capsys, content):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(tiny_model_path.read_bytes()[:200] if content == "truncated" else content)
    expect_error(capsys, quantize_args(bad, tmp_path / "q.onnx", image_folder), 1, "bad.onnx")
    assert not (tmp_path / "q.onnx").exists()


def test_missing_external_data(tmp_path, tiny_model, image_folder, capsys):
    model = tmp_path / "ext.onnx"
    onnx.save_model(tiny_model, model, save_as_external_data=True, all_tensors_to_one_file=True,
                    location="ext.onnx.data", size_threshold=0)
    (tmp_path / "ext.onnx.data").unlink()
    expect_error(capsys, quantize_args(model, tmp_path / "q.onnx", image_folder), 1, "ext.onnx", "external data")
    assert not (tmp_path / "q.onnx").exists()


def test_unwritable_output_folder(tiny_model_path, image_folder, capsys):
    expect_error(capsys, quantize_args(tiny_model_path, "/proc/pyquant-q.onnx", image_folder), 1, "cannot write",
                 "/proc")


def test_missing_and_empty_calibration_folder(tmp_path, tiny_model_path, capsys):
    expect_error(capsys, quantize_args(tiny_model_path, tmp_path / "q.onnx", tmp_path / "none"), 1, "not found")
    (tmp_path / "empty").mkdir()
    expect_error(capsys, quantize_args(tiny_model_path, tmp_path / "q.onnx", tmp_path / "empty"), 1, "no images")


def test_folder_without_a_readable_image(tmp_path, tiny_model_path, capsys):
    folder = tmp_path / "broken"
    folder.mkdir()
    for i in range(3):
        (folder / f"{i}.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    expect_error(capsys, quantize_args(tiny_model_path, tmp_path / "q.onnx", folder), 1,
                 "no readable image", "3 unreadable")
    assert not (tmp_path / "q.onnx").exists()


def test_unknown_preset_and_contradiction_are_usage_errors(tmp_path, tiny_model_path, image_folder, capsys):
    expect_error(capsys, quantize_args(tiny_model_path, tmp_path / "q.onnx", image_folder, "--config", "INT3"), 2,
                 "unknown preset 'INT3'", "XINT8")
    expect_error(capsys, quantize_args(tiny_model_path, tmp_path / "q.onnx", image_folder, "--per_channel"), 2,
                 "--per_channel", "XINT8")


def test_bad_output_paths(tmp_path, tiny_model_path, image_folder, capsys):
    expect_error(capsys, quantize_args(tiny_model_path, tmp_path / "no" / "q.onnx", image_folder), 1,
                 "output folder does not exist")
    expect_error(capsys, quantize_args(tiny_model_path, tiny_model_path, image_folder), 1, "is the input model")


def test_nan_activation_names_tensor_and_batch(tmp_path, tiny_model_path, tiny_data, capsys):
    data = tiny_data.copy()
    data[20, 0, 0, 0] = np.nan
    np.save(tmp_path / "calib.npy", data)
    expect_error(capsys, quantize_args(tiny_model_path, tmp_path / "q.onnx", tmp_path / "calib.npy",
                                       "--batch_size", "8"), 1, "NaN", "'x'", "batch 2")
    assert not (tmp_path / "q.onnx").exists()


def test_npy_with_wrong_shape_names_the_input(tmp_path, tiny_model_path, capsys):
    np.save(tmp_path / "calib.npy", np.zeros((4, 3, 8, 8), np.float32))
    expect_error(capsys, quantize_args(tiny_model_path, tmp_path / "q.onnx", tmp_path / "calib.npy"), 1,
                 "input 'x'", "(4, 3, 8, 8)")


def test_unavailable_provider(tiny_model_path, image_folder, capsys):
    expect_error(capsys, ["eval", "--model", str(tiny_model_path), "--data", str(image_folder), "--quiet",
                          "--provider", "TensorrtExecutionProvider"], 2, "TensorrtExecutionProvider", "not available")


def test_eval_on_the_npu_target_says_what_ran(tmp_path, tiny_model_path, image_folder, capsys, caplog):
    out = tmp_path / "q.onnx"
    assert main(quantize_args(tiny_model_path, out, image_folder, "--config", "XINT8")) == 0
    capsys.readouterr()
    eval_args = ["eval", "--model", str(out), "--data", str(image_folder), "--json", "--quiet"]
    assert main(eval_args + ["--target", "npu-sim", "--npu", "strix"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["n"] == 10 and result["provider"].startswith("npu-sim (strix, rounding half-even)")
    if "VitisAIExecutionProvider" not in ort.get_available_providers():
        assert main(eval_args + ["--provider", "VitisAIExecutionProvider"]) == 0
        assert json.loads(capsys.readouterr().out)["provider"].startswith("npu-sim (phoenix, rounding half-up)")
        assert "npu-sim" in caplog.text and "stands in" in caplog.text
    expect_error(capsys, ["eval", "--model", str(tiny_model_path), "--data", str(image_folder), "--quiet",
                          "--target", "npu-sim"], 1, "quantized (QDQ) model")


def test_npu_report_writes_a_table_and_an_html_file(tmp_path, tiny_model_path, image_folder, capsys):
    pytest.importorskip("matplotlib")
    out = tmp_path / "q.onnx"
    assert main(quantize_args(tiny_model_path, out, image_folder, "--config", "XINT8")) == 0
    capsys.readouterr()
    html, table = tmp_path / "npu.html", tmp_path / "npu.json"
    assert main(["npu-report", "--model_input", str(tiny_model_path), "--quantized", str(out), "--calib_data",
                 str(image_folder), "--output", str(html), "--json", str(table), "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "npu-sim vs cpu sqnr_db" in text and "first tensor where npu-sim and CPU differ" in text
    assert html.read_text().count("data:image/png;base64,") == 2
    rows = json.loads(table.read_text())["rows"]
    assert rows and all({"cpu", "npu-sim", "npu-sim vs cpu"} <= set(r["errors"]) for r in rows)


def test_console_script_help_lists_options(tmp_path):
    out = subprocess.run([sys.executable, "-m", "pyquant.cli", "quantize", "--help"], capture_output=True,
                         text=True, check=True, cwd=tmp_path).stdout
    for option in ("--model_input", "--calib_data", "--config", "--per_channel", "--num_calib", "--mean",
                   "--input_size", "--resize", "--quantize_region_outputs"):
        assert option in out
