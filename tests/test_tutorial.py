"""The Ryzen AI tutorial's Quark scripts (../shared/ryzenai-tutorial, as published) run on
pyquant with their import lines changed from ``quark.onnx`` to ``pyquant.quark`` by sed.

Opt-in (marker ``tutorial``: skipped unless ``-m tutorial`` is given); the scripts import
torchvision and timm, which the ``tutorial`` extra installs:

    python -m venv /tmp/pyquant-tutorial && . /tmp/pyquant-tutorial/bin/activate
    pip install -e '.[tutorial,test]'      # about 5 GB: PyPI's torch is its CUDA build (run on the CPU)
    pytest -m tutorial -s tests/test_tutorial.py   # about 7 minutes on 2 cores

What is adapted in the temporary copy, besides the import lines, and why (the test checks
that nothing else changed):
  * data paths: calibration from ../shared/data/imagenet-sample/calib (a command-line
    argument), evaluation on val/ instead of the calibration folder;
  * the normalisation constants: the shared EfficientNet-Lite0 takes (x - 0.5) / 0.5, the
    tutorial's models ImageNet's mean and std;
  * labels: torchvision's ImageFolder numbers the classes by their sorted sub-folders, and
    val/ holds only the 500 odd ImageNet classes; the test lays out all 1000 class folders
    (the 500 others empty, the val images linked) and lets ImageFolder accept empty ones
    (``allow_empty=True``), so that class i is ImageNet's class i.
The tutorial's "NPU" evaluation runs on onnxruntime's CPU provider here (onnxruntime falls
back to it when VitisAIExecutionProvider is missing).
"""
from __future__ import annotations

import difflib
import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import onnx
import pytest

from conftest import SHARED

pytestmark = pytest.mark.tutorial

TUTORIAL = SHARED / "ryzenai-tutorial" / "quark_quantization"
SCRIPTS = ("advanced_quark_quantize.py", "quark_quantize.py", "utils.py")
MODEL = SHARED / "models" / "efficientnet_lite0.onnx"
DATA = SHARED / "data" / "imagenet-sample"
IMAGENET_MEAN, IMAGENET_STD, MODEL_NORM = "[0.485, 0.456, 0.406]", "[0.229, 0.224, 0.225]", "[0.5, 0.5, 0.5]"
# mode -> (the tutorial's flags, top-1 target on val)
MODES = {
    "xint8": ([], 0.80),
    "fast_finetune": (["--fast_finetune"], 0.87),
    "cross_layer_equalization": (["--cross_layer_equalization"], 0.87),
}
TIMEOUT_S = 3600


@pytest.fixture(autouse=True, scope="module")
def opted_in(request):
    if "tutorial" not in (request.config.getoption("markexpr") or ""):
        pytest.skip("opt-in: pytest -m tutorial (needs the 'tutorial' extra)")
    missing = [m for m in ("torch", "torchvision", "timm") if importlib.util.find_spec(m) is None]
    if missing:
        pytest.fail(f"{', '.join(missing)} not installed: pip install -e '.[tutorial,test]' (this file's docstring)")


def sed(expression: str, path: Path) -> None:
    subprocess.run(["sed", "-E", "-i", expression, str(path)], check=True)


def labelled_val_tree(root: Path) -> Path:
    """All 1000 ImageNet class folders, sorted order = class index; val/ images linked."""
    wnids = [line.split()[0] for line in (DATA / "LOC_synset_mapping.txt").read_text().splitlines() if line.strip()]
    assert len(wnids) == 1000 and wnids == sorted(wnids), "class i must be the i-th sorted folder"
    tree = root / "val_1000_classes"
    for wnid in wnids:
        (tree / wnid).mkdir(parents=True)
        source = DATA / "val" / wnid
        for image in sorted(source.iterdir()) if source.is_dir() else ():
            (tree / wnid / image.name).symlink_to(image)
    assert sum(1 for _ in tree.glob("*/*")) == 500
    return tree


@pytest.fixture(scope="module")
def tutorial(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("tutorial")
    for name in SCRIPTS:
        shutil.copy(TUTORIAL / name, work / name)
        os.chmod(work / name, 0o644)
    val = labelled_val_tree(work)
    for name in SCRIPTS:  # the one edit a Quark user makes
        sed(r"/^[[:space:]]*(from|import)[[:space:]]/ s/quark\.onnx/pyquant.quark/g", work / name)
    for constant in (IMAGENET_MEAN, IMAGENET_STD):  # the shared model's normalisation
        sed(f"s/{re.escape(constant)}/{MODEL_NORM}/g", work / "utils.py")
    for name in SCRIPTS[:2]:  # both scripts evaluate on the calibration folder
        sed(f"s|imagenet_data_path=calibration_dataset_path|imagenet_data_path='{val}'|g", work / name)
    sed("s/ImageFolder\\(root=imagenet_data_path, transform=preprocess\\)/"
        "ImageFolder(root=imagenet_data_path, transform=preprocess, allow_empty=True)/", work / "utils.py")
    for name in SCRIPTS:
        check_only_adaptations(TUTORIAL / name, work / name)
    return work


def check_only_adaptations(original: Path, adapted: Path) -> None:
    before, after = original.read_text().splitlines(), adapted.read_text().splitlines()
    changed = [line for line in difflib.unified_diff(before, after, lineterm="", n=0)
               if line.startswith("+") and not line.startswith("+++")]
    for line in changed:
        text = line[1:].strip()
        assert ((text.startswith(("from ", "import ")) and "pyquant.quark" in text) or MODEL_NORM in text
                or "imagenet_data_path='" in text or "allow_empty=True" in text), f"{adapted.name}: {line}"
    assert not any(re.match(r"\s*(from|import)\s.*quark\.onnx", line) for line in after)
    if adapted.name == "utils.py":
        assert IMAGENET_MEAN not in adapted.read_text() and "allow_empty=True" in adapted.read_text()


def run_script(tutorial: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=tutorial, capture_output=True, text=True, timeout=TIMEOUT_S)


def accuracy(output: str, label: str) -> float:
    found = re.findall(rf"{re.escape(label)}: Top1 ([0-9.]+)", output)
    assert found, f"no '{label}' line in the output:\n{output[-3000:]}"
    return float(found[0])


@pytest.mark.parametrize("mode", list(MODES))
def test_advanced_quark_quantize(tutorial, mode):
    flags, target = MODES[mode]
    out = tutorial / f"efficientnet_lite0_{mode}.onnx"
    result = run_script(tutorial, "advanced_quark_quantize.py", "--model_input", str(MODEL), "--model_output",
                        str(out), "--calib_data", str(DATA / "calib"), *flags)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-5000:]
    float_top1 = accuracy(output, "Float32 model accuracy")
    top1 = accuracy(output, "XINT8 quantized model accuracy")
    print(f"\ntutorial {mode}: float top-1 {float_top1:.3f}, quantized top-1 {top1:.3f} (target {target:.2f})")
    assert float_top1 == pytest.approx(0.882, abs=0.01)  # the labels line up with the model's classes
    assert top1 >= target


CONFIG_TARGETS = {"A16W8": 0.87, "BF16": 0.87}


@pytest.mark.parametrize("config", list(CONFIG_TARGETS))
def test_quark_quantize_config(tutorial, config):
    """``quark_quantize.py --config A16W8|BF16``: Quark's A16W8 preset (int16 activations,
    int8 weights, CLE) or BF16 (bfloat16 activations and weights, CLE); the script evaluates
    the written model on the "NPU" (onnxruntime's CPU provider here). The BF16 model's name
    says BF16, so the script's utils.py registers pyquant.quark.get_library_path() first,
    as it does Quark's custom-op library."""
    out = tutorial / f"efficientnet_lite0_{config}.onnx"
    result = run_script(tutorial, "quark_quantize.py", "--model_input", str(MODEL), "--model_output", str(out),
                        "--calib_data", str(DATA / "calib"), "--config", config, "--quantize", "--evaluate")
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-5000:]
    model = onnx.load(str(out))
    if config == "A16W8":
        zero_points = [t for t in model.graph.initializer if t.name.endswith("_QuantizeLinear_Output_zero_point")]
        assert zero_points and all(t.data_type == onnx.TensorProto.INT16 for t in zero_points)
    else:
        assert any(t.data_type == onnx.TensorProto.BFLOAT16 for t in model.graph.initializer)
    float_top1 = accuracy(output, "Float32 model accuracy")
    top1 = accuracy(output, f"{config} quantized model accuracy (NPU)")
    target = CONFIG_TARGETS[config]
    print(f"\ntutorial {config}: float top-1 {float_top1:.3f}, quantized top-1 {top1:.3f} (target {target:.2f})")
    assert float_top1 == pytest.approx(0.882, abs=0.01)
    assert top1 >= target
