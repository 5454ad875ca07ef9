"""Loop/Scan bodies quantized with calibration that steps them (pyquant.calibrate.loops)
against the same body left float (nodes_to_exclude=[the node]), in one process on the
same data. Prints a markdown table per preset, one row per model x trip count:

- QDQ pairs: QuantizeLinear nodes inside the body;
- SQNR stepped / float body: 10 log10(sum f^2 / sum (f - q)^2) of the model's output
  against the float model over the held-out feeds, with the body quantized and with the
  body left float (the main graph quantized in both; inf: equal to the float model, the
  Scan model having nothing to quantize outside its body);
- calibration s: the calibration pass's wall time (QuantizeResult.seconds_calibration)
  with the body stepped and with it left float, and their ratio (the cost of stepping);
- peak RSS MB: in a fresh interpreter (a subprocess per row) that has built the model
  and the data, the peak resident memory while it quantizes with the body stepped, less
  the resident memory before (Linux: the peak mark is reset through
  /proc/self/clear_refs): it must not grow with the trip count.

The models: a Loop whose body is a residual 3x3 Conv block on [1, C, 28, 28]
(h = h + Relu(Conv(Relu(Conv(h)))): the carried state stays float, the body's inner
tensors are quantized), with a constant trip count and with a condition on the data
(max(h) < limit, the trip count varying per sample); and a Scan running a recurrent cell
(MatMul, Relu, Tanh) over a sequence of T steps.

    python benchmarks/loops.py [--samples 32] [--trips 1,4,16,64] [--presets U8S8,XINT8]

Not collected by pytest.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import subprocess
import sys
from typing import Callable, Dict, List, Tuple

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

import pyquant
from pyquant.api import quantize_detailed
from pyquant.config import get_preset

CHANNELS, SIZE = 16, 28
HELD_OUT = 8
LIMIT = 8.0  # the data-dependent Loop stops once max(h) reaches this (3 to 10 trips on the data)


def const(name, array, dtype=np.float32):
    return numpy_helper.from_array(np.asarray(array, dtype=dtype), name)


def conv_loop(trips: int, limit: float = 0.0) -> onnx.ModelProto:
    """A Loop of ``trips`` residual Conv blocks; with ``limit`` > 0 it stops once max(h) >= limit."""
    rng = np.random.default_rng(0)
    c = CHANNELS
    nodes = [helper.make_node("Conv", ["h_in", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c2"], ["r2"]),
             helper.make_node("Add", ["h_in", "r2"], ["h_out"])]
    if limit:
        nodes += [helper.make_node("ReduceMax", ["h_out"], ["peak"], keepdims=0),
                  helper.make_node("Less", ["peak", "limit"], ["cond_out"])]
    else:
        nodes.append(helper.make_node("Identity", ["cond_in"], ["cond_out"]))
    body = helper.make_graph(nodes, "block", [
        helper.make_tensor_value_info("i", TensorProto.INT64, []),
        helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
        helper.make_tensor_value_info("h_in", TensorProto.FLOAT, [1, c, SIZE, SIZE])], [
        helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
        helper.make_tensor_value_info("h_out", TensorProto.FLOAT, [1, c, SIZE, SIZE])])
    init = [const("w0", rng.normal(size=(c, 3, 3, 3)) * 0.3),
            const("w1", rng.normal(size=(c, c, 3, 3)) * (0.5 / np.sqrt(9 * c))),
            const("b1", rng.normal(size=c) * 0.05),
            const("w2", rng.normal(size=(c, c, 3, 3)) * (0.5 / np.sqrt(9 * c))),
            const("b2", rng.normal(size=c) * 0.05),
            const("w_head", rng.normal(size=(10, c)) * 0.3), const("trips", trips, np.int64)]
    if limit:
        init += [const("limit", limit), const("go", True, np.bool_)]
    graph = helper.make_graph([
        helper.make_node("Conv", ["x", "w0"], ["c0"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c0"], ["h0"]),
        helper.make_node("Loop", ["trips", "go" if limit else "", "h0"], ["h_final"], name="blocks", body=body),
        helper.make_node("GlobalAveragePool", ["h_final"], ["pooled"]),
        helper.make_node("Flatten", ["pooled"], ["flat"]),
        helper.make_node("Gemm", ["flat", "w_head"], ["y"], transB=1)], "conv_loop",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, SIZE, SIZE])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 10])], init)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model, full_check=True)
    return model


def rnn_scan(steps: int) -> onnx.ModelProto:
    """h = tanh(Relu(x_t Wx) + h Wh); y_t = Relu(x_t Wx) Wy over ``steps`` steps of [1, 64]."""
    rng = np.random.default_rng(1)
    body = helper.make_graph([
        helper.make_node("MatMul", ["x_t", "wx"], ["m"]),
        helper.make_node("Relu", ["m"], ["r"]),
        helper.make_node("MatMul", ["h_in", "wh"], ["hw"]),
        helper.make_node("Add", ["r", "hw"], ["s"]),
        helper.make_node("Tanh", ["s"], ["h_out"]),
        helper.make_node("MatMul", ["r", "wy"], ["y_t"])], "cell", [
        helper.make_tensor_value_info("h_in", TensorProto.FLOAT, [1, 128]),
        helper.make_tensor_value_info("x_t", TensorProto.FLOAT, [1, 64])], [
        helper.make_tensor_value_info("h_out", TensorProto.FLOAT, [1, 128]),
        helper.make_tensor_value_info("y_t", TensorProto.FLOAT, [1, 32])])
    graph = helper.make_graph(
        [helper.make_node("Scan", ["h0", "seq"], ["h_last", "ys"], name="cell_scan", num_scan_inputs=1, body=body)],
        "rnn_scan", [helper.make_tensor_value_info("seq", TensorProto.FLOAT, [steps, 1, 64]),
                     helper.make_tensor_value_info("h0", TensorProto.FLOAT, [1, 128])],
        [helper.make_tensor_value_info("h_last", TensorProto.FLOAT, [1, 128]),
         helper.make_tensor_value_info("ys", TensorProto.FLOAT, [steps, 1, 32])],
        [const("wx", rng.normal(size=(64, 128)) * 0.15), const("wh", rng.normal(size=(128, 128)) * 0.08),
         const("wy", rng.normal(size=(128, 32)) * 0.1)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model, full_check=True)
    return model


def image_feeds(n: int, seed: int) -> List[Dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.normal(size=(1, 3, SIZE, SIZE)).astype(np.float32)} for _ in range(n)]


def sequence_feeds(steps: int) -> Callable[[int, int], List[Dict[str, np.ndarray]]]:
    def feeds(n: int, seed: int):
        rng = np.random.default_rng(seed)
        return [{"seq": rng.normal(size=(steps, 1, 64)).astype(np.float32),
                 "h0": np.zeros((1, 128), np.float32)} for _ in range(n)]
    return feeds


def outputs(model: onnx.ModelProto, feeds) -> List[np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return [np.concatenate([np.ravel(o) for o in session.run(None, f)]) for f in feeds]


def sqnr_db(reference: List[np.ndarray], values: List[np.ndarray]) -> float:
    f = np.concatenate(reference).astype(np.float64)
    q = np.concatenate(values).astype(np.float64)
    error = np.sum((f - q) ** 2)
    return float(10 * np.log10(np.sum(f * f) / error)) if error else float("inf")


def body_pairs(model: onnx.ModelProto, node: str) -> int:
    loop = next(n for n in model.graph.node if n.name == node)
    return sum(n.op_type == "QuantizeLinear" for n in loop.attribute[0].g.node)


def trip_counts(model: onnx.ModelProto, feeds) -> Tuple[int, int]:
    """(min, max) iterations of the Loop over ``feeds``: a copy whose body also emits its
    iteration number as a scan output, whose length is the trip count."""
    counting = onnx.ModelProto()
    counting.CopyFrom(model)
    loop = next(n for n in counting.graph.node if n.op_type == "Loop")
    body = loop.attribute[0].g
    body.node.append(helper.make_node("Identity", [body.input[0].name], ["iteration"]))
    body.output.append(helper.make_tensor_value_info("iteration", TensorProto.INT64, []))
    loop.output.append("iterations")
    counting.graph.output.append(helper.make_tensor_value_info("iterations", TensorProto.INT64, None))
    session = ort.InferenceSession(counting.SerializeToString(), providers=["CPUExecutionProvider"])
    counts = [len(session.run(["iterations"], feed)[0]) for feed in feeds]
    return min(counts), max(counts)


MODELS = {"loop": lambda trips: (conv_loop(trips), "blocks", image_feeds),
          "loop-dependent": lambda trips: (conv_loop(trips, limit=LIMIT), "blocks", image_feeds),
          "scan": lambda trips: (rnn_scan(trips), "cell_scan", sequence_feeds(trips))}


def status_mb(key: str) -> float:
    """A memory figure of this process from /proc/self/status (VmRSS, VmHWM), in MB."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key + ":")) / 1024


def peak_rss_mb(kind: str, trips: int, samples: int, preset: str) -> float:
    """The growth of resident memory while a fresh interpreter quantizes the model."""
    out = subprocess.run([sys.executable, __file__, "--probe", f"{kind},{trips},{samples},{preset}"],
                         check=True, capture_output=True, text=True).stdout
    return float(out.split()[-1])


def probe(spec: str) -> None:
    """Build the model and data, reset the peak-RSS mark (Linux: clear_refs 5), quantize,
    print the peak less the resident memory before."""
    kind, trips, samples, preset = spec.split(",")
    model, _, make_feeds = MODELS[kind](int(trips))
    calibration = make_feeds(int(samples), 0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = status_mb("VmRSS")
    quantize_detailed(model, calibration, get_preset(preset))
    print(status_mb("VmHWM") - before)


def row(label: str, kind: str, trips: int, samples: int, preset: str) -> str:
    model, node, make_feeds = MODELS[kind](trips)
    calibration, held_out = make_feeds(samples, 0), make_feeds(HELD_OUT, 1)
    config = get_preset(preset)
    stepped = quantize_detailed(model, calibration, config)
    left = quantize_detailed(model, calibration, dataclasses.replace(config, nodes_to_exclude=frozenset({node})))
    reference = outputs(model, held_out)
    a, b = stepped.seconds_calibration, left.seconds_calibration
    return (f"| {label} | {body_pairs(stepped.model, node)} | {sqnr_db(reference, outputs(stepped.model, held_out)):.1f} "
            f"| {sqnr_db(reference, outputs(left.model, held_out)):.1f} | {a:.2f} | {b:.2f} | {a / b:.1f} "
            f"| {peak_rss_mb(kind, trips, samples, preset):.1f} |")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--trips", default="1,4,16,64")
    parser.add_argument("--presets", default="U8S8,XINT8")
    parser.add_argument("--probe", help=argparse.SUPPRESS)  # internal: one peak-memory measurement
    args = parser.parse_args(argv)
    if args.probe:
        probe(args.probe)
        return
    trips = [int(t) for t in args.trips.split(",")]
    print(f"pyquant {pyquant.__version__}, onnxruntime {ort.__version__}, {args.samples} calibration samples "
          f"(batch 1), {HELD_OUT} held out; load before: {os.getloadavg()}")
    for preset in args.presets.split(","):
        print()
        print(f"{preset}:")
        print()
        print("| model | QDQ pairs in body | SQNR dB stepped | SQNR dB float body | calibration s stepped "
              "| calibration s float body | ratio | peak RSS MB (stepped) |")
        print("|---|---|---|---|---|---|---|---|")
        for t in trips:
            print(row(f"Loop, conv block, {t} trips", "loop", t, args.samples, preset), flush=True)
        model, _, make_feeds = MODELS["loop-dependent"](max(trips))
        low, high = trip_counts(model, make_feeds(args.samples, 0))
        print(row(f"Loop, conv block, at most {max(trips)} trips while max(h) < {LIMIT:g} ({low}-{high} trips)",
                  "loop-dependent", max(trips), args.samples, preset), flush=True)
        for t in trips:
            print(row(f"Scan, recurrent cell, {t} steps", "scan", t, args.samples, preset), flush=True)
    print()
    print(f"load after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
