"""The NPU target on EfficientNet-Lite0 with the ImageNet sample in ../shared: for every
XINT8-based configuration, top-1/top-5 on val under onnxruntime's CPU QDQ kernels and under
npu-sim (the NPU's integer arithmetic, pyquant.npu.emulator) side by side, as the
reference reports "INT8 (CPU)" and "INT8 (NPU)"; the NPU rules the solver kept (rules the
calibration-optimal positions broke, the node-at-a-time repair's loss and the joint
solver's, positions moved) and the violations the independent validator of the tests
(tests/npu_validator.py) finds in the exported model; int32 and int8 biases.

A second table runs the solver under stricter, hypothetical rule sets (the rules are data:
pyquant.npu.rules) on the same model, where the real limits are never reached, to compare
the joint solver with the node-at-a-time repair where they have work to do.

    python benchmarks/npu.py [--shared ../shared] [--rows xint8,int8_cle,...] [--npu phoenix] [--no-stress]

Prints the machine load (os.getloadavg()) before and after; times are of this run only.
Not collected by pytest.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # the independent validator lives with the tests

import npu_validator  # noqa: E402
from pyquant.config import FastFinetuneOptions, get_preset  # noqa: E402
from pyquant.data import ImageFolderReader, Preprocess  # noqa: E402
from pyquant.evaluation import agreement, evaluate, evaluate_npu_sim  # noqa: E402
from pyquant.graph.model_io import load_model  # noqa: E402
from pyquant.npu.rules import PHOENIX, generation  # noqa: E402
from pyquant.pipeline import quantize_model  # noqa: E402
from pyquant.techniques import npu_positions  # noqa: E402

MEAN = STD = (0.5, 0.5, 0.5)  # EfficientNet-Lite0 preprocessing (see ../shared/models/README.md)

ROWS = {
    "xint8": ("XINT8", "pyquant XINT8", {}),
    "xint8_int8bias": ("XINT8", "pyquant XINT8, int8 bias", {"int32_bias": False}),
    "int8_cle": ("INT8_CLE", "pyquant INT8_CLE (XINT8 + CLE)", {}),
    "int8_cle_int8bias": ("INT8_CLE", "pyquant INT8_CLE, int8 bias", {"int32_bias": False}),
    "int8_cle_ft": ("INT8_CLE", "pyquant XINT8 + CLE + fast finetune", {"fast_finetune": FastFinetuneOptions()}),
    "int8_cle_ft_int8bias": ("INT8_CLE", "pyquant XINT8 + CLE + fast finetune, int8 bias",
                             {"fast_finetune": FastFinetuneOptions(), "int32_bias": False}),
}

# Hypothetical stricter generations for the solver comparison (not real hardware), by id.
# On EfficientNet-Lite0 XINT8 the calibration-optimal shift_cut lies in [2, 11], the int8
# shift_bias in [3, 10] and Add position differences in [0, 1]: the first three sets break
# nothing but shift_bias <= 4, the last two break shift_cut, Add and shift_bias rules.
STRESS = {
    "cut12": ("shift_cut in [0, 12]", dict(shift_cut=(0, 12))),
    "cut12_add2": ("shift_cut in [2, 12], Add difference <= 2", dict(shift_cut=(2, 12), add_position_difference=2)),
    "bias4": ("shift_bias <= 4 (int8 bias)", dict(shift_bias_max=4)),
    "cut8": ("shift_cut in [4, 8]", dict(shift_cut=(4, 8))),
    "cut8_add0_bias6": ("shift_cut in [4, 8], Add difference 0, shift_bias <= 6",
                        dict(shift_cut=(4, 8), add_position_difference=0, shift_bias_max=6)),
}


def reader(shared: Path, split: str, batch_size: int = 8):
    data = shared / "data" / "imagenet-sample"
    return ImageFolderReader(data / split, "input", Preprocess(224, 256, MEAN, STD), batch_size,
                             labels_file=data / "LOC_synset_mapping.txt")


def load() -> str:
    return "load average " + " / ".join(f"{x:.2f}" for x in os.getloadavg()) + f" (1/5/15 min; {os.cpu_count()} CPUs)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared", type=Path, default=REPO.parent / "shared")
    parser.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated subset of {','.join(ROWS)}")
    parser.add_argument("--npu", default="phoenix", help="NPU generation of npu-sim")
    parser.add_argument("--no-stress", action="store_true", help="skip the stricter-rules table")
    parser.add_argument("--stress-only", action="store_true", help="only the stricter-rules table")
    parser.add_argument("--stress-sets", default=",".join(STRESS), help=f"comma-separated subset of {','.join(STRESS)}")
    args = parser.parse_args()
    rules = generation(args.npu)
    model_path = args.shared / "models" / "efficientnet_lite0.onnx"
    print(load(), file=sys.stderr)
    print(f"before: {load()}")
    rows = [] if args.stress_only else [r for r in args.rows.split(",") if r]
    if rows:
        main_table(args, rules, model_path, rows)
    if not args.no_stress:
        stress_table(args, model_path, [s for s in args.stress_sets.split(",") if s])
    print(f"\nafter: {load()}")


def main_table(args, rules, model_path: Path, rows) -> None:
    float_eval = evaluate(model_path, reader(args.shared, "val", 25))
    print(f"\nfloat model: top-1 {100 * float_eval.top1:.1f} %, top-5 {100 * float_eval.top5:.1f} % "
          f"(n {float_eval.n})\n")
    header = ("| configuration | CPU top-1 % | CPU top-5 % | npu-sim top-1 % | npu-sim top-5 % | npu-sim - CPU "
              "top-1 | top-1 agreement CPU / npu-sim % | rules broken at calibration | node-at-a-time loss | "
              "joint loss | positions moved | validator violations | npu-sim s / CPU s |")
    print(f"npu-sim: {rules.name}, rounding {rules.rounding.value}\n")
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for row in rows:
        preset, label, fields = ROWS[row]
        config = dataclasses.replace(get_preset(preset), **fields)
        result = quantize_model(load_model(model_path), reader(args.shared, "calib"), config)
        report = result.reports["npu_positions"]
        violations = npu_validator.violations(result.model, PHOENIX)
        t0 = time.perf_counter()
        cpu = evaluate(result.model, reader(args.shared, "val", 25))
        t1 = time.perf_counter()
        npu = evaluate_npu_sim(result.model, reader(args.shared, "val", 25), args.npu)
        t2 = time.perf_counter()
        if not npu.provider.endswith("every node in NPU integer arithmetic"):
            print(f"note: {npu.provider}", file=sys.stderr)
        moved = len(report.moves) + len(report.bias_moves)
        print(f"| {label} | {100 * cpu.top1:.1f} | {100 * cpu.top5:.1f} | {100 * npu.top1:.1f} | {100 * npu.top5:.1f} "
              f"| {100 * (npu.top1 - cpu.top1):+.1f} | {100 * agreement(cpu.predictions, npu.predictions):.1f} "
              f"| {report.violations_at_calibration} | {report.node_at_a_time_loss:.4g} | {report.joint_loss:.4g} "
              f"| {moved} | {len(violations)} | {(t2 - t1) / (t1 - t0):.1f} |", flush=True)


def stress_table(args, model_path: Path, sets) -> None:
    print("\nSolver under stricter hypothetical rule sets (XINT8, int8 bias; loss: sum over tensors of the "
          "MSE increase over the calibration-optimal position / the tensor's mean square)\n")
    print("| rule set | rules broken at calibration | node-at-a-time loss | joint loss | joint / node-at-a-time "
          "| positions moved | validator violations (same rules) | CPU top-1 % |")
    print("|---|---|---|---|---|---|---|---|")
    config = dataclasses.replace(get_preset("XINT8"), int32_bias=False)
    for key in sets:
        name, fields = STRESS[key]
        strict = dataclasses.replace(PHOENIX, name=name, **fields)
        npu_positions.RULES = strict
        try:
            result = quantize_model(load_model(model_path), reader(args.shared, "calib"), config)
        finally:
            npu_positions.RULES = PHOENIX
        r = result.reports["npu_positions"]
        ratio = f"{r.joint_loss / r.node_at_a_time_loss:.3f}" if r.node_at_a_time_loss else "-"
        cpu = evaluate(result.model, reader(args.shared, "val", 25))
        print(f"| {name} | {r.violations_at_calibration} | {r.node_at_a_time_loss:.4g} | {r.joint_loss:.4g} "
              f"| {ratio} | {len(r.moves) + len(r.bias_moves)} "
              f"| {len(npu_validator.violations(result.model, strict))} | {100 * cpu.top1:.1f} |", flush=True)


if __name__ == "__main__":
    main()
