"""Accuracy, size, quantize time and peak memory on EfficientNet-Lite0 with the ImageNet
sample in ../shared (calib/ to calibrate, val/ to evaluate). Prints one markdown table.

    python benchmarks/imagenet_sample.py [--shared ../shared] [--rows xint8,u8s8_pc,...]

Every row runs in a fresh subprocess so that its peak RSS (ru_maxrss, read right after
quantization) is its own. onnxruntime.quantization.quantize_static runs in the same
script as a baseline. "KL to float" is the mean KL divergence (nats) of each row's output
distribution from the float model's on val: it counts every change of the outputs, not only
those that flip the top class, so it tells close rows apart where top-1 on 500 images
cannot (one image is 0.2 points). Not collected by pytest.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import numpy as np

REPO = Path(__file__).resolve().parents[1]
MEAN = STD = (0.5, 0.5, 0.5)  # EfficientNet-Lite0 preprocessing (see ../shared/models/README.md)
# onnxruntime keeps ~52.6 MB of activations per image for Percentile, and its histogram
# collector fails on a short last batch: a multiple of the batch size (8).
ORT_PERCENTILE_IMAGES = 96

ROWS = {
    "float": "float model",
    "floor": "float inference over calib/ (the floor for calibration)",
    "xint8": "pyquant XINT8",
    "xint8_nobc": "pyquant XINT8 without bias correction",
    "xint8_4x": "pyquant XINT8, calib/ repeated 4x (2000 images)",
    "float_cle": "float model after pyquant CLE (must equal float; time = CLE transform)",
    "int8_cle": "pyquant INT8_CLE (XINT8 + CLE + bias correction)",
    "int8_cle_datafree": "pyquant INT8_CLE with data-free CLE (weights-only scales, activation_weight 0)",
    "int8_cle_hba": "pyquant INT8_CLE + high-bias absorption",
    "int8_cle_nobc": "pyquant XINT8 + CLE without bias correction",
    "int8_cle_relu": "pyquant XINT8 + CLE, ReLU6 replaced by ReLU (reference behaviour)",
    "xint8_ft": "pyquant XINT8 + fast finetune (AdaRound)",
    "int8_cnn_accurate": "pyquant INT8_CNN_ACCURATE (CLE + Percentile 99.9999 + AdaRound)",
    "u8s8_pc_ft": "pyquant U8S8 per-channel + fast finetune",
    "int8_cle_ft": "pyquant INT8_CLE + fast finetune (XINT8 + CLE + AdaRound)",
    "int8_cle_ft_float_logits": "pyquant INT8_CLE + fast finetune, logits left in float (--no-quantize_region_outputs)",
    "a8w8": "pyquant A8W8",
    "u8s8": "pyquant U8S8 per-tensor",
    "u8s8_pc": "pyquant U8S8 per-channel",
    "u8s8_pc_uint8_logits": "pyquant U8S8 per-channel, logits rounded to uint8 too (--quantize_region_outputs)",
    "u8u8": "pyquant U8S8 with asymmetric uint8 weights (Quark's U8U8_AAWA), per-tensor",
    "u8u8_pc": "pyquant U8S8 with asymmetric uint8 weights, per-channel",
    "bf16": "pyquant BF16 (bfloat16 activations and weights, Cast pairs)",
    "ort_minmax": "onnxruntime quantize_static MinMax per-tensor (QDQ U8S8)",
    "ort_minmax_pc": "onnxruntime quantize_static MinMax per-channel (QDQ U8S8)",
    "ort_percentile": f"onnxruntime quantize_static Percentile 99.999 per-channel, first {ORT_PERCENTILE_IMAGES} calib images only (memory)",
}


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def reader(shared: Path, split: str, limit=None, folder=None, batch_size=8):
    from pyquant.data import ImageFolderReader, Preprocess

    data = shared / "data" / "imagenet-sample"
    return ImageFolderReader(folder or data / split, "input", Preprocess(224, 256, MEAN, STD), batch_size, limit,
                             labels_file=data / "LOC_synset_mapping.txt")


def repeated_folder(src: Path, times: int, tmp: Path) -> Path:
    """calib/ repeated ``times`` times through symlinks (no image is copied)."""
    root = tmp / f"calib_x{times}"
    for k in range(times):
        for cls in src.iterdir():
            dst = root / cls.name
            dst.mkdir(parents=True, exist_ok=True)
            for img in cls.iterdir():
                os.symlink(img, dst / f"r{k}_{img.name}")
    return root


def quantize_row(row: str, shared: Path, model_path: Path, out: Path, tmp: Path) -> float:
    from pyquant.config import CLEOptions, FastFinetuneOptions, QuantType, get_preset
    from pyquant.graph.model_io import load_model, save_model
    from pyquant.pipeline import quantize_model

    ft = FastFinetuneOptions()
    # row -> (preset, the fields it replaces)
    configs = {
        "xint8": ("XINT8", {}),
        "xint8_nobc": ("XINT8", {"bias_correction": False}),
        "xint8_4x": ("XINT8", {}),
        "int8_cle": ("INT8_CLE", {}),
        "int8_cle_datafree": ("INT8_CLE", {"cle": CLEOptions(activation_weight=0.0)}),
        "int8_cle_hba": ("INT8_CLE", {"cle": CLEOptions(high_bias_absorption=True)}),
        "int8_cle_nobc": ("INT8_CLE", {"bias_correction": False}),
        "int8_cle_relu": ("INT8_CLE", {"cle": CLEOptions(replace_clip_with_relu=True)}),
        "xint8_ft": ("XINT8", {"fast_finetune": ft}),
        "int8_cnn_accurate": ("INT8_CNN_ACCURATE", {}),
        "u8s8_pc_ft": ("U8S8", {"per_channel": True, "fast_finetune": ft}),
        "int8_cle_ft": ("INT8_CLE", {"fast_finetune": ft}),
        "int8_cle_ft_float_logits": ("INT8_CLE", {"fast_finetune": ft, "quantize_region_outputs": False}),
        "a8w8": ("A8W8", {}),
        "u8s8": ("U8S8", {}),
        "u8s8_pc": ("U8S8", {"per_channel": True}),
        "u8s8_pc_uint8_logits": ("U8S8", {"per_channel": True, "quantize_region_outputs": True}),
        "u8u8": ("U8S8", {"weight_type": QuantType.QUInt8}),
        "u8u8_pc": ("U8S8", {"weight_type": QuantType.QUInt8, "per_channel": True}),
        "bf16": ("BF16", {}),
    }
    preset, fields = configs[row]
    config = dataclasses.replace(get_preset(preset), **fields)
    folder = repeated_folder(shared / "data/imagenet-sample/calib", 4, tmp) if row == "xint8_4x" else None
    calib = reader(shared, "calib", folder=folder)
    start = time.perf_counter()
    result = quantize_model(load_model(model_path), calib, config)
    save_model(result.model, out)
    seconds = time.perf_counter() - start
    ft = result.reports.get("fast_finetune")
    if ft is not None:
        print(ft.summary(), file=sys.stderr)
        return seconds, ft.seconds_inference + ft.seconds_gram + ft.seconds_fit
    return seconds, None


def ort_row(row: str, shared: Path, model_path: Path, out: Path) -> float:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    limit = ORT_PERCENTILE_IMAGES if row == "ort_percentile" else None
    method = CalibrationMethod.Percentile if row == "ort_percentile" else CalibrationMethod.MinMax
    start = time.perf_counter()
    quantize_static(str(model_path), str(out), reader(shared, "calib", limit), quant_format=QuantFormat.QDQ,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    per_channel=row != "ort_minmax", calibrate_method=method,
                    extra_options={"CalibPercentile": 99.999} if method is CalibrationMethod.Percentile else {})
    return time.perf_counter() - start


def worker(row: str, shared: Path, model_path: Path, logits_out: Optional[Path] = None) -> dict:
    """Run one row; print its JSON result. ``logits_out``: where to save the val logits (.npy)."""
    import onnxruntime as ort
    from pyquant.evaluation import evaluate

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        out = tmp / "quantized.onnx"
        result = {"row": row}
        if row == "float":
            evaluated = model_path
        elif row == "floor":  # onnxruntime's default session options: its best plain inference
            session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
            calib = reader(shared, "calib")
            start = time.perf_counter()
            while (feed := calib.get_next()) is not None:
                session.run(None, feed)
            return {"row": row, "seconds": time.perf_counter() - start, "rss": peak_rss_mb()}
        elif row == "float_cle":
            from pyquant.graph.model_io import load_model, save_model
            from pyquant.config import CLEOptions
            from pyquant.pipeline import prepare
            from pyquant.techniques import cle

            model = prepare(load_model(model_path))
            calib = reader(shared, "calib", limit=CLEOptions().activation_samples)
            feeds = list(iter(calib.get_next, None))
            start = time.perf_counter()  # measuring the activation ranges is part of the transform
            cle.equalize(model, feeds=feeds)
            result["seconds"] = time.perf_counter() - start
            save_model(model, out)
            evaluated = out
        elif row.startswith("ort_"):
            result["seconds"] = ort_row(row, shared, model_path, out)
            evaluated = out
        else:
            result["seconds"], result["finetune_seconds"] = quantize_row(row, shared, model_path, out, tmp)
            evaluated = out
        result["rss"] = peak_rss_mb()
        ev = evaluate(evaluated, reader(shared, "val", batch_size=25), keep_logits=logits_out is not None)
        result.update(top1=ev.top1, top5=ev.top5, size_mb=ev.size_mb, predictions=ev.predictions.tolist())
        if logits_out is not None:
            np.save(logits_out, ev.logits)
        return result


def run_worker(row: str, shared: Path, logits_dir: Path) -> dict:
    """One row in a fresh subprocess (its own peak RSS); its val logits are read back as "logits"."""
    logits = logits_dir / f"{row}.npy"
    proc = subprocess.run([sys.executable, __file__, "--shared", str(shared), "--worker", row,
                           "--logits-out", str(logits)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"row {row} failed:\n{proc.stderr[-2000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    if logits.exists():
        result["logits"] = np.load(logits)
    return result


def kl_to_float(result: dict, float_result: dict) -> str:
    """The table cell: mean KL(float || row) over val, in nats."""
    if "logits" not in result or "logits" not in float_result:
        return ""
    from pyquant.evaluation import mean_kl_divergence

    return f"{mean_kl_divergence(float_result['logits'], result['logits']):.4f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared", type=Path, default=REPO.parent / "shared")
    parser.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated subset of {','.join(ROWS)}")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--logits-out", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    model_path = args.shared / "models" / "efficientnet_lite0.onnx"
    if args.worker:
        print(json.dumps(worker(args.worker, args.shared, model_path, args.logits_out)))
        return
    rows = [r for r in args.rows.split(",") if r]
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        parser.error(f"unknown rows {unknown}; valid: {', '.join(ROWS)}")
    if "float" not in rows:
        rows.insert(0, "float")
    results = {}
    with tempfile.TemporaryDirectory() as logits_dir:
        for row in rows:
            try:
                results[row] = run_worker(row, args.shared, Path(logits_dir))
            except RuntimeError as e:
                print(e, file=sys.stderr)
                continue
            print(f"done: {row}", file=sys.stderr)
    float_pred = results["float"]["predictions"]
    floor = results.get("floor", {}).get("seconds")
    print("| configuration | top-1 % | top-5 % | top-1 agreement with float % | KL to float | size MB | quantize s "
          "| x floor | finetune s | peak RSS MB |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for row, r in results.items():
        if row == "floor":
            print(f"| {ROWS[row]} | | | | | | {r['seconds']:.1f} | 1.0 | | {r['rss']:.0f} |")
            continue
        agree = 100 * sum(a == b for a, b in zip(r["predictions"], float_pred)) / len(float_pred)
        secs = f"{r['seconds']:.1f}" if "seconds" in r else ""
        ratio = f"{r['seconds'] / floor:.1f}" if "seconds" in r and floor else ""
        rss = f"{r['rss']:.0f}" if "seconds" in r else ""
        ft = f"{r['finetune_seconds']:.1f}" if r.get("finetune_seconds") is not None else ""
        kl = kl_to_float(r, results["float"])
        print(f"| {ROWS[row]} | {100 * r['top1']:.1f} | {100 * r['top5']:.1f} | {agree:.1f} | {kl} | {r['size_mb']:.2f} "
              f"| {secs} | {ratio} | {ft} | {rss} |")


if __name__ == "__main__":
    main()
