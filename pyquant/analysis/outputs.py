"""A model's outputs against the float model's on a small held-out set: the measurement
both the sensitivity analysis and automatic mixed precision repeat for every variant."""
from __future__ import annotations

import dataclasses
import logging
import math
import os
from typing import Any, List, Optional

import numpy as np
from onnx import ModelProto

from ..api import as_reader
from ..config import DEFAULT_CALIB_BATCH_SIZE
from ..data import Preprocess
from ..errors import DataError
from ..layer_report import ErrorStats
from ..runtime import Feed, batch_samples, check_feed, make_session

log = logging.getLogger(__name__)

# Samples of held-out data the analyses run every variant on: each variant is one pass over
# them, so this bounds the analysis time (EfficientNet-Lite0: ~120 variants).
DEFAULT_HELD_OUT_SAMPLES = 32


def read_feeds(data: Any, model: ModelProto, limit: Optional[int], batch_size: Optional[int] = None,
               preprocess: Optional[Preprocess] = None) -> List[Feed]:
    """At most ``limit`` samples of ``data`` (anything pyquant.api.as_reader accepts) as a
    list of feeds, to be run many times. A reader given as an object is read from where it
    stands and rewound afterwards when it can be."""
    reader = as_reader(data, model, batch_size or DEFAULT_CALIB_BATCH_SIZE, preprocess, limit)
    feeds: List[Feed] = []
    samples = 0
    while limit is None or samples < limit:
        feed = reader.get_next()
        if feed is None:
            break
        n = batch_samples(feed)
        if limit is not None and samples + n > limit:
            feed = {k: v[:limit - samples] for k, v in feed.items()}
            n = limit - samples
        feeds.append(feed)
        samples += n
    if callable(getattr(reader, "rewind", None)):
        reader.rewind()
    if not feeds:
        raise DataError("the held-out data has no samples")
    return feeds


def rereadable(data: Any) -> bool:
    """Whether ``data`` can be read twice (a path, an array, a dict of arrays, a list or tuple
    of feeds, a reader with rewind()); a generator or a reader without rewind() cannot."""
    if hasattr(data, "get_next"):
        return callable(getattr(data, "rewind", None))
    return isinstance(data, (str, os.PathLike, np.ndarray, dict, list, tuple))


@dataclasses.dataclass
class OutputError:
    """Error of every float output of a model against the float model's, over the held-out
    feeds: SQNR and cosine of all outputs together (ErrorStats), and the mean KL divergence
    of the softmax over each output's last axis (meaningful for logits; nan when every
    output has a last axis of 1)."""

    stats: ErrorStats
    kl: float

    @property
    def sqnr_db(self) -> float:
        return self.stats.sqnr_db

    @property
    def cosine(self) -> float:
        return self.stats.cosine

    def as_dict(self) -> dict:
        return {"sqnr_db": self.sqnr_db, "cosine": self.cosine, "kl": self.kl}


class OutputComparison:
    """The float model's outputs on ``feeds``, computed once; ``error(model)`` runs another
    model on the same feeds and measures its outputs against them."""

    def __init__(self, float_model: ModelProto, feeds: List[Feed]) -> None:
        self.feeds = feeds
        self.names = [o.name for o in float_model.graph.output]
        session = make_session(float_model)
        try:
            for i, feed in enumerate(feeds):
                check_feed(session, feed, i)
        except DataError as e:
            raise DataError(f"held-out data: {e}") from None
        self.reference = [session.run(self.names, feed) for feed in feeds]

    def error(self, model: ModelProto) -> OutputError:
        session = make_session(model)
        stats = ErrorStats()
        kl_sum, kl_rows = 0.0, 0
        for feed, reference in zip(self.feeds, self.reference):
            for ref, got in zip(reference, session.run(self.names, feed)):
                if not np.issubdtype(np.asarray(ref).dtype, np.floating):
                    continue
                stats.update(ref, got)
                divergence = _row_kl(ref, got)
                if divergence is not None:
                    kl_sum += float(divergence.sum())
                    kl_rows += divergence.size
        return OutputError(stats, kl_sum / kl_rows if kl_rows else math.nan)


def _row_kl(reference: np.ndarray, test: np.ndarray) -> Optional[np.ndarray]:
    """KL(softmax(reference) || softmax(test)) per row of the last axis, in nats."""
    if reference.ndim == 0 or reference.shape[-1] < 2:
        return None
    p = _log_softmax(np.asarray(reference, np.float64).reshape(-1, reference.shape[-1]))
    q = _log_softmax(np.asarray(test, np.float64).reshape(-1, reference.shape[-1]))
    return np.sum(np.exp(p) * (p - q), axis=1)


def _log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.sum(np.exp(z), axis=1, keepdims=True))
