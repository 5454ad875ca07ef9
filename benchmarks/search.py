"""Accuracy-driven search on EfficientNet-Lite0 with the ImageNet sample in ../shared, on
a local Ray cluster of two worker nodes started with ``ray start`` on this machine.

    python benchmarks/search.py [--shared ../shared] [--trials 12] [--timing-trials 8]
    python benchmarks/search.py --sharded [--shards 2]

Prints two tables:
  1. the search: XINT8 without CLE as the starting point, NPU-legal points only, top-1 on
     val/ (500 images) as the objective, calibration on calib/ (500 images), at most
     ``--trials`` trials on the cluster; each trial's top-1, and the best configuration
     against the float model (target: within 0.2 points, NPU-legal);
  2. wall time of the first ``--timing-trials`` trials of the same space run one after
     another in this process (each trial with every CPU) against on the cluster (one CPU
     per trial, one trial per node at a time), in one run, with the machine's load.

With ``--sharded`` it prints instead calibration and evaluation on the same cluster in
shards (pyquant.sharded) against one pass in this process: times, top-1, and whether the
sharded model is byte-identical to the one-shard in-process run (and to pyquant.quantize's).

The cluster: ``ray start --head --num-cpus=1`` and ``ray start --address=... --num-cpus=1``
under a temporary folder of this run; its processes are ended by process id at the end.
Needs ``pip install '.[distributed]'``. Not collected by pytest.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MEAN = STD = (0.5, 0.5, 0.5)  # EfficientNet-Lite0 preprocessing (see ../shared/models/README.md)
PORT = 6391
SPACE = {
    # the grid's first point is the starting point: XINT8 without CLE
    "dimensions": {
        "preset": ["XINT8"],
        "cross_layer_equalization": [False, True],
        "cle.activation_weight": [0.25, 0.0, 0.5],
        "cle.high_bias_absorption": [False, True],
        "calibrate_method": ["MinMSE", "NonOverflow"],
    },
    "strategy": "grid",
}


def load() -> str:
    return "load average %.2f %.2f %.2f" % os.getloadavg()


def ray_start(temp_dir: str, *extra: str) -> None:
    ray = str(Path(sys.executable).with_name("ray"))
    subprocess.run([ray, "start", "--num-cpus=1", f"--temp-dir={temp_dir}", "--disable-usage-stats", *extra],
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                   env={**os.environ, "RAY_AUTH_MODE": "disabled"})


def stop_cluster(temp_dir: str) -> None:
    """End the processes of this run's cluster (their command lines name its temporary
    folder) and their children, by process id; nothing else on the machine."""
    ours = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if temp_dir.encode() in (entry / "cmdline").read_bytes():
                    ours.add(int(entry.name))
            except OSError:
                pass
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            if parent in ours:
                ours.add(int(entry.name))
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in ours:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        time.sleep(3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared", default=str(REPO.parent / "shared"))
    parser.add_argument("--trials", type=int, default=12)
    parser.add_argument("--timing-trials", type=int, default=8)
    parser.add_argument("--sharded", action="store_true", help="the sharded calibration/evaluation table instead")
    parser.add_argument("--shards", type=int, default=2)
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    from pyquant.data import Preprocess
    from pyquant.datasource import image_folder_source
    from pyquant.distributed import LocalExecutor, RayExecutor
    from pyquant.search import Constraints, SearchSpace, Top1Objective, run_search

    shared = Path(args.shared)
    data = shared / "data" / "imagenet-sample"
    model = str(shared / "models" / "efficientnet_lite0.onnx")
    preprocess = Preprocess(224, 256, MEAN, STD)
    calib = image_folder_source(data / "calib", "input", preprocess, 8)
    objective = Top1Objective(image_folder_source(data / "val", "input", preprocess, 25,
                                                  data / "LOC_synset_mapping.txt"))
    work = Path(tempfile.mkdtemp(prefix="pyquant-search-bench-"))
    ray_dir = tempfile.mkdtemp(prefix="pqray-", dir="/tmp")  # short: Ray's socket paths must fit
    print(f"{load()} before starting the cluster", flush=True)
    try:
        ray_start(ray_dir, "--head", f"--port={PORT}", "--include-dashboard=false")
        ray_start(ray_dir, f"--address=127.0.0.1:{PORT}")
        cluster = RayExecutor(address=f"127.0.0.1:{PORT}", cpus_per_task=1)
        import ray
        print(f"cluster: {len(ray.nodes())} nodes, {int(ray.cluster_resources()['CPU'])} CPUs", flush=True)
        if args.sharded:
            sharded_part(model, calib, objective.data, cluster, args.shards)
            cluster.close()
            return

        # ---- 1. the search ------------------------------------------------------------------
        space = SearchSpace.from_dict({**SPACE, "max_trials": args.trials})
        print(f"\n## Search: {args.trials} trials, NPU-legal, top-1 on val (500), on the cluster", flush=True)
        print(f"space: {json.dumps(SPACE['dimensions'])}")
        t0 = time.perf_counter()
        result = run_search(model, calib, space, objective, work / "search", output=work / "best.onnx",
                            constraints=Constraints(npu_legal=True), executor=cluster)
        print(f"({time.perf_counter() - t0:.0f} s, {load()})\n")
        print(result.to_text())
        start, best = result.records[0], result.best
        drop = 100 * (result.float_score - best["score"])
        print(f"\n| model | top-1 % | NPU-legal | points below float |")
        print("|---|---|---|---|")
        print(f"| float | {100 * result.float_score:.1f} | | |")
        print(f"| starting point (trial 0: XINT8, no CLE) | {100 * start['score']:.1f} | {start['npu_legal']} | "
              f"{100 * (result.float_score - start['score']):.1f} |")
        print(f"| best of {len(result.records)} (trial {best['index']}: "
              f"{', '.join(f'{k}={v}' for k, v in best['params'].items())}) | {100 * best['score']:.1f} | "
              f"{best['npu_legal']} | {drop:.1f} (target <= 0.2: {'met' if drop <= 0.2 + 1e-9 else 'not met'}) |",
              flush=True)

        # ---- 2. sequential against the cluster --------------------------------------------
        n = args.timing_trials
        space = SearchSpace.from_dict({**SPACE, "max_trials": n})
        print(f"\n## Wall time of {n} trials: in-process one after another vs the 2-node cluster", flush=True)
        rows = []
        for name, executor in (("sequential, in-process (each trial: 2 threads)", LocalExecutor()),
                               ("local Ray cluster, 2 nodes x 1 CPU (each trial: 1 thread)", cluster)):
            before = load()
            t0 = time.perf_counter()
            timed = run_search(model, calib, space, objective, work / name.split(",")[0].replace(" ", "_"),
                               constraints=Constraints(npu_legal=True), executor=executor)
            rows.append((name, time.perf_counter() - t0, before, load(), timed))
        base = rows[0][1]
        print("| mode | trials | wall s | / sequential | load before | load after |")
        print("|---|---|---|---|---|---|")
        for name, seconds, before, after, timed in rows:
            print(f"| {name} | {len(timed.records)} | {seconds:.0f} | {seconds / base:.2f} | "
                  f"{before.split('average ')[1]} | {after.split('average ')[1]} |")
        same = [a["score"] for a in rows[0][4].records] == [b["score"] for b in rows[1][4].records]
        print(f"same top-1 in every trial both ways: {same}")
        cluster.close()
    finally:
        stop_cluster(ray_dir)
        shutil.rmtree(ray_dir, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)


def sharded_part(model: str, calib, val, cluster, shards: int) -> None:
    import pyquant
    from pyquant.distributed import LocalExecutor
    from pyquant.sharded import evaluate_sharded, quantize_sharded

    print(f"\n## Calibration and evaluation in {shards} shards on the cluster vs one pass in this process")
    print("| what | where | wall s | top-1 % | model bytes equal to |")
    print("|---|---|---|---|---|")
    for preset in ("XINT8", "U8S8"):
        t0 = time.perf_counter()
        plain = pyquant.quantize(model, calib.reader(), preset)
        t_plain = time.perf_counter() - t0
        one = quantize_sharded(model, calib, preset, shards=1, executor=LocalExecutor()).model
        t0 = time.perf_counter()
        sharded = quantize_sharded(model, calib, preset, shards=shards, executor=cluster).model
        t_sharded = time.perf_counter() - t0
        top1 = {name: pyquant.evaluate(m, val.reader()).top1 for name, m in (("plain", plain), ("sharded", sharded))}
        same_one = sharded.SerializeToString() == one.SerializeToString()
        same_plain = sharded.SerializeToString() == plain.SerializeToString()
        print(f"| quantize {preset} | pyquant.quantize, in-process | {t_plain:.0f} | {100 * top1['plain']:.1f} | |")
        print(f"| quantize {preset} | quantize_sharded, {shards} shards on the cluster | {t_sharded:.0f} | "
              f"{100 * top1['sharded']:.1f} | 1 shard in-process: {same_one}; pyquant.quantize: {same_plain} |",
              flush=True)
    t0 = time.perf_counter()
    whole = pyquant.evaluate(model, val.reader())
    t_whole = time.perf_counter() - t0
    t0 = time.perf_counter()
    parts = evaluate_sharded(model, val, shards=shards, executor=cluster)
    t_parts = time.perf_counter() - t0
    print(f"| evaluate float model on val | pyquant.evaluate, in-process | {t_whole:.0f} | {100 * whole.top1:.1f} | |")
    print(f"| evaluate float model on val | evaluate_sharded, {shards} shards on the cluster | {t_parts:.0f} | "
          f"{100 * parts.top1:.1f} | predictions equal: {bool((parts.predictions == whole.predictions).all())} |")
    print(load())


if __name__ == "__main__":
    main()
