"""Accuracy, size, quantize time and peak memory on EfficientNet-Lite0 with the ImageNet
sample in ../shared (calib/ to calibrate, val/ to evaluate). Prints one markdown table.

    python benchmarks/imagenet_sample.py [--shared ../shared] [--rows xint8,u8s8_pc,...]

Every row runs in a fresh subprocess so that its peak RSS (ru_maxrss, read right after
quantization) is its own. onnxruntime.quantization.quantize_static runs in the same
script as a baseline. "KL to float" is the mean KL divergence (nats) of each row's output
distribution from the float model's on val: it counts every change of the outputs, not only
those that flip the top class, so it tells close rows apart where top-1 on 500 images
cannot (one image is 0.2 points). Not collected by pytest.

The floor is float inference over calib/ through the same image reader, with decoding in
two threads reading ahead while onnxruntime runs (row "floor"); "floor_serial" is the
previous definition (decode a batch, then run it). On a shared machine the load moves
during a run, so the floor rows are measured again after every other row, and each row's
"x floor" divides its time by the mean of the floors measured just before and just after
it; the floor rows show the median of all their runs. The 1-minute load average after
each row is printed with it.
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
    "floor": "float inference over calib/, decoding in 2 threads overlapping inference (the floor)",
    "floor_serial": "float inference over calib/, decode then infer each batch (the previous floor)",
    "xint8": "pyquant XINT8",
    "xint8_nobc": "pyquant XINT8 without bias correction",
    "xint8_ebc": "pyquant XINT8 + empirical bias correction (1 pass)",
    "xint8_4x": "pyquant XINT8, calib/ repeated 4x (2000 images)",
    "float_cle": "float model after pyquant CLE (must equal float; time = CLE transform)",
    "int8_cle": "pyquant INT8_CLE (XINT8 + CLE + bias correction)",
    "int8_cle_datafree": "pyquant INT8_CLE with data-free CLE (weights-only scales, activation_weight 0)",
    "int8_cle_hba": "pyquant INT8_CLE + high-bias absorption",
    "int8_cle_nobc": "pyquant XINT8 + CLE without bias correction",
    "int8_cle_ebc": "pyquant INT8_CLE + empirical bias correction (1 pass)",
    "int8_cle_relu": "pyquant XINT8 + CLE, ReLU6 replaced by ReLU (reference behaviour)",
    "xint8_ft": "pyquant XINT8 + fast finetune (AdaRound)",
    "int8_cnn_accurate": "pyquant INT8_CNN_ACCURATE (CLE + Percentile 99.9999 + AdaRound)",
    "u8s8_pc_ft": "pyquant U8S8 per-channel + fast finetune",
    "int8_cle_ft": "pyquant INT8_CLE + fast finetune (XINT8 + CLE + AdaRound)",
    "int8_cle_ft_float_logits": "pyquant INT8_CLE + fast finetune, logits left in float (--no-quantize_region_outputs)",
    "a8w8": "pyquant A8W8",
    "u8s8": "pyquant U8S8 per-tensor",
    "u8s8_pc": "pyquant U8S8 per-channel",
    "u8s8_pc_ebc": "pyquant U8S8 per-channel + empirical bias correction (1 pass)",
    "u8s8_pc_minmax": "pyquant U8S8 per-channel, MinMax activation ranges",
    "u8s8_pc_minmax_ebc": "pyquant U8S8 per-channel, MinMax activation ranges + empirical bias correction (1 pass)",
    "u8s8_pc_unclipped6": "pyquant U8S8 per-channel, whole activation range within 6 weighted layers of the output, "
                          "inputs' side included",
    "u8s8_clipped": "pyquant U8S8 per-tensor, Percentile ranges everywhere (the preset before 2026-11-30)",
    "u8s8_pc_clipped": "pyquant U8S8 per-channel, Percentile ranges everywhere (the preset before 2026-11-30)",
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
    from pyquant.config import CalibrationMethod, CLEOptions, FastFinetuneOptions, QuantType, get_preset
    from pyquant.graph.model_io import load_model, save_model
    from pyquant.pipeline import quantize_model

    ft = FastFinetuneOptions()
    # row -> (preset, the fields it replaces)
    configs = {
        "xint8": ("XINT8", {}),
        "xint8_nobc": ("XINT8", {"bias_correction": False}),
        "xint8_ebc": ("XINT8", {"empirical_bias_correction": 1}),
        "xint8_4x": ("XINT8", {}),
        "int8_cle": ("INT8_CLE", {}),
        "int8_cle_datafree": ("INT8_CLE", {"cle": CLEOptions(activation_weight=0.0)}),
        "int8_cle_hba": ("INT8_CLE", {"cle": CLEOptions(high_bias_absorption=True)}),
        "int8_cle_nobc": ("INT8_CLE", {"bias_correction": False}),
        "int8_cle_ebc": ("INT8_CLE", {"empirical_bias_correction": 1}),
        "int8_cle_relu": ("INT8_CLE", {"cle": CLEOptions(replace_clip_with_relu=True)}),
        "xint8_ft": ("XINT8", {"fast_finetune": ft}),
        "int8_cnn_accurate": ("INT8_CNN_ACCURATE", {}),
        "u8s8_pc_ft": ("U8S8", {"per_channel": True, "fast_finetune": ft}),
        "int8_cle_ft": ("INT8_CLE", {"fast_finetune": ft}),
        "int8_cle_ft_float_logits": ("INT8_CLE", {"fast_finetune": ft, "quantize_region_outputs": False}),
        "a8w8": ("A8W8", {}),
        "u8s8": ("U8S8", {}),
        "u8s8_pc": ("U8S8", {"per_channel": True}),
        "u8s8_pc_ebc": ("U8S8", {"per_channel": True, "empirical_bias_correction": 1}),
        "u8s8_pc_minmax": ("U8S8", {"per_channel": True, "calibrate_method": CalibrationMethod.MinMax}),
        "u8s8_pc_minmax_ebc": ("U8S8", {"per_channel": True, "calibrate_method": CalibrationMethod.MinMax,
                                        "empirical_bias_correction": 1}),
        "u8s8_pc_unclipped6": ("U8S8", {"per_channel": True, "unclipped_output_layers": 6,
                                        "clipped_input_layers": None}),
        "u8s8_clipped": ("U8S8", {"unclipped_output_layers": None, "clipped_input_layers": None}),
        "u8s8_pc_clipped": ("U8S8", {"per_channel": True, "unclipped_output_layers": None,
                                     "clipped_input_layers": None}),
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


FLOORS = ("floor", "floor_serial")


def floor_seconds(row: str, shared: Path, model_path: Path) -> float:
    """Decode, preprocess and run the float model over calib/ (onnxruntime's default session
    options but for spin-waiting, which beside other load cost this loop 1.5-1.8x: 17.5 and
    16.6 s against 11.5 and 9.3 s on 120 images at load average 16). "floor": two decoding
    threads read ahead of inference (pyquant.runtime.prefetch); "floor_serial": each batch
    decoded, then run."""
    import onnxruntime as ort
    from pyquant.runtime import prefetch

    options = ort.SessionOptions()
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
    calib = reader(shared, "calib")
    if row == "floor":
        calib.workers = 2
    start = time.perf_counter()
    for feed in (prefetch(calib) if row == "floor" else iter(calib.get_next, None)):
        session.run(None, feed)
    return time.perf_counter() - start


def worker(row: str, shared: Path, model_path: Path, logits_out: Optional[Path] = None) -> dict:
    """Run one row; print its JSON result. ``logits_out``: where to save the val logits (.npy)."""
    from pyquant.evaluation import evaluate

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        out = tmp / "quantized.onnx"
        result = {"row": row}
        if row == "float":
            evaluated = model_path
        elif row in FLOORS:
            return {"row": row, "seconds": floor_seconds(row, shared, model_path), "rss": peak_rss_mb()}
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
    sys.stderr.write(proc.stderr)  # the worker's warnings and fast finetune's summary
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
    floors = [r for r in rows if r in FLOORS]
    results, floor_runs, loads = {}, {r: [] for r in floors}, {}
    start_load = os.getloadavg()[0]

    def run(row: str, logits_dir: Path) -> Optional[dict]:
        try:
            result = run_worker(row, args.shared, logits_dir)
        except RuntimeError as e:
            print(e, file=sys.stderr)
            return None
        loads[row] = os.getloadavg()[0]
        print(f"done: {row} {result.get('seconds', 0):.1f} s (load average {loads[row]:.2f})", file=sys.stderr)
        return result

    def measure_floors(logits_dir: Path) -> None:
        for f in floors:
            result = run(f, logits_dir)
            if result is not None:
                results.setdefault(f, result)
                floor_runs[f].append(result["seconds"])

    ratios = {}  # row -> {floor row: time / mean of the floors before and after it}
    with tempfile.TemporaryDirectory() as logits_dir:
        measure_floors(Path(logits_dir))
        for row in rows:
            if row in FLOORS:
                continue
            before = {f: runs[-1] for f, runs in floor_runs.items() if runs}
            result = run(row, Path(logits_dir))
            if result is None:
                continue
            results[row] = result
            if "seconds" in result and floors:
                measure_floors(Path(logits_dir))
                ratios[row] = {f: result["seconds"] / ((before[f] + floor_runs[f][-1]) / 2)
                               for f in floors if f in before}
    for f in floors:
        if floor_runs[f]:
            results[f]["seconds"] = float(np.median(floor_runs[f]))
    float_pred = results["float"]["predictions"]
    serial = "floor_serial" in floors
    print("| configuration | top-1 % | top-5 % | top-1 agreement with float % | KL to float | size MB | quantize s "
          "| x floor |" + (" x serial floor |" if serial else "") + " finetune s | peak RSS MB | load |")
    print("|---|---|---|---|---|---|---|---|" + ("---|" if serial else "") + "---|---|---|")
    order = ["float"] + floors + [r for r in results if r not in floors and r != "float"]
    for row in order:
        if row not in results:
            continue
        r = results[row]
        if row in FLOORS:
            ones = " 1.0 |" if row == "floor" else " |"
            ones += (" 1.0 |" if row == "floor_serial" else " |") if serial else ""
            runs = ", ".join(f"{x:.2f}" for x in floor_runs[row])
            print(f"| {ROWS[row]} (median of {len(floor_runs[row])}: {runs}) | | | | | | {r['seconds']:.1f} |{ones} "
                  f"| {r['rss']:.0f} | {loads.get(row, 0):.1f} |")
            continue
        agree = 100 * sum(a == b for a, b in zip(r["predictions"], float_pred)) / len(float_pred)
        secs = f"{r['seconds']:.1f}" if "seconds" in r else ""
        ratio = f"{ratios[row]['floor']:.2f}" if "floor" in ratios.get(row, {}) else ""
        ratio_serial = f" {ratios[row]['floor_serial']:.2f} |" if "floor_serial" in ratios.get(row, {}) else " |"
        rss = f"{r['rss']:.0f}" if "seconds" in r else ""
        ft = f"{r['finetune_seconds']:.1f}" if r.get("finetune_seconds") is not None else ""
        kl = kl_to_float(r, results["float"])
        print(f"| {ROWS[row]} | {100 * r['top1']:.1f} | {100 * r['top5']:.1f} | {agree:.1f} | {kl} | {r['size_mb']:.2f} "
              f"| {secs} | {ratio} |{ratio_serial if serial else ''} {ft} | {rss} | {loads.get(row, 0):.1f} |")
    print(f"\nLoad average (1 min) at the start {start_load:.2f}; after each row in the last column "
          f"({os.cpu_count()} CPUs). x floor: the row's time over the mean of the floors measured just "
          "before and after it.")


if __name__ == "__main__":
    main()
