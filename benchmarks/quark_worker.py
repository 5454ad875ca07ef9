"""Run one AMD Quark ONNX configuration; executed by compare_quark.py with the Python of a
separate environment that has amd-quark (it pins its own onnx). Standalone: imports
neither pyquant nor anything from this repository. Prints one JSON line."""
import argparse
import json
import resource
import time
from pathlib import Path

import numpy as np
from PIL import Image

# EfficientNet-Lite0 preprocessing (../shared/models/README.md), as pyquant's benchmark.
SIZE, RESIZE, MEAN, STD = 224, 256, 0.5, 0.5


def load(path):
    with Image.open(path) as img:
        img = img.convert("RGB")
        w, h = img.size
        s = RESIZE / min(w, h)
        img = img.resize((max(SIZE, round(w * s)), max(SIZE, round(h * s))), Image.BILINEAR)
        left, top = (img.size[0] - SIZE) // 2, (img.size[1] - SIZE) // 2
        x = np.asarray(img.crop((left, top, left + SIZE, top + SIZE)), np.float32)
    return ((x / 255.0 - MEAN) / STD).transpose(2, 0, 1)[None]


class Reader:
    """onnxruntime CalibrationDataReader: one image per batch, as in the Ryzen AI tutorial."""

    def __init__(self, folder):
        self.files = sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in (".jpeg", ".jpg", ".png"))
        self.pos = 0

    def get_next(self):
        if self.pos >= len(self.files):
            return None
        self.pos += 1
        return {"input": load(self.files[self.pos - 1])}

    def rewind(self):
        self.pos = 0


def config(name):
    from quark.onnx.quantization.config import Config, get_default_config

    if name == "INT8_CLE":  # not a Quark preset: the Ryzen AI tutorial's custom config
        from quark.onnx import PowerOfTwoMethod, QuantizationConfig, QuantType

        cfg = QuantizationConfig(calibrate_method=PowerOfTwoMethod.MinMSE, activation_type=QuantType.QUInt8,
                                 weight_type=QuantType.QInt8, enable_npu_cnn=True, include_cle=True,
                                 extra_options={"ActivationSymmetric": True})
    elif name == "XINT8_NO_CLE":
        cfg = get_default_config("XINT8")
        cfg.include_cle = False
    else:
        cfg = get_default_config(name)
    return Config(global_quant_config=cfg)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--calib", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--config", required=True)
    args = p.parse_args()
    from quark.onnx import ModelQuantizer

    quantizer = ModelQuantizer(config(args.config))
    start = time.perf_counter()
    quantizer.quantize_model(args.model, args.out, Reader(args.calib))
    seconds = time.perf_counter() - start
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    print(json.dumps({"seconds": seconds, "rss": rss}))


if __name__ == "__main__":
    main()
