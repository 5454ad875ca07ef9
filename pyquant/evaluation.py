"""Top-1 / top-5 accuracy and model size of a classifier on a labelled image folder."""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple, Union

import numpy as np
from onnx import ModelProto

from .errors import DataError
from .graph.model_io import load_model
from .npu.emulator import emulate
from .npu.rules import DEFAULT_GENERATION, Rounding
from .runtime import make_provider_session

ProgressCallback = Callable[[int, Optional[int]], None]


@dataclasses.dataclass(frozen=True)
class EvalResult:
    top1: float  # fractions in [0, 1]
    top5: float
    n: int
    size_mb: float
    provider: str
    predictions: np.ndarray  # argmax per image, in reader order
    logits: Optional[np.ndarray] = None  # [n, classes], in reader order, when asked for (keep_logits)

    def as_dict(self) -> dict:
        return {"top1": self.top1, "top5": self.top5, "n": self.n, "size_mb": self.size_mb,
                "provider": self.provider}


def model_size_mb(model: Union[ModelProto, os.PathLike, str]) -> float:
    if isinstance(model, ModelProto):
        return model.ByteSize() / 1e6
    p = Path(model)
    data = [q for q in p.parent.glob(p.name + ".data")]
    return (p.stat().st_size + sum(q.stat().st_size for q in data)) / 1e6


def evaluate(model: Union[ModelProto, os.PathLike, str], reader, provider: str = "CPUExecutionProvider",
             provider_options: Optional[dict] = None, progress: Optional[ProgressCallback] = None,
             keep_logits: bool = False) -> EvalResult:
    """Accuracy of ``model`` over ``reader`` (an ImageFolderReader: ``next_labeled()``);
    with ``keep_logits`` the result also holds every image's logits (n x classes floats)."""
    session = make_provider_session(model, provider, provider_options)
    input_name = session.get_inputs()[0].name
    correct1 = correct5 = n = 0
    predictions: List[np.ndarray] = []
    kept: List[np.ndarray] = []
    total = len(reader) if hasattr(reader, "__len__") else None
    batches = 0
    reader.rewind()
    while True:
        item = reader.next_labeled()
        if item is None:
            break
        images, labels = item
        logits = session.run(None, {input_name: images})[0]
        top1, hits1, hits5 = top5_hits(logits, labels)
        correct1 += hits1
        correct5 += hits5
        n += len(labels)
        predictions.append(top1)
        if keep_logits:
            kept.append(np.asarray(logits, dtype=np.float32))
        batches += 1
        if progress is not None:
            progress(batches, total)
    if n == 0:
        raise DataError("no images to evaluate")
    return EvalResult(correct1 / n, correct5 / n, n, model_size_mb(model), session.get_providers()[0],
                      np.concatenate(predictions), np.concatenate(kept) if keep_logits else None)


def evaluate_npu_sim(model: Union[ModelProto, os.PathLike, str], reader, generation: str = DEFAULT_GENERATION,
                     rounding: Optional[Rounding] = None, progress: Optional[ProgressCallback] = None,
                     keep_logits: bool = False) -> EvalResult:
    """Accuracy of a QDQ model with power-of-two scales computed in the NPU's integer
    arithmetic (pyquant.npu.emulator) on onnxruntime's CPU provider. ``provider`` of the
    result says which generation and rounding, and which nodes ran in float if any."""
    proto = model if isinstance(model, ModelProto) else load_model(model)
    emulation = emulate(proto, generation, rounding)
    result = evaluate(emulation.model, reader, progress=progress, keep_logits=keep_logits)
    return dataclasses.replace(result, size_mb=model_size_mb(model), provider=emulation.describe())


def top5_hits(logits: np.ndarray, labels: np.ndarray) -> Tuple[np.ndarray, int, int]:
    """(top-1 class per sample, top-1 hits, top-5 hits) of a batch of [N, classes] logits."""
    if logits.ndim != 2:
        raise DataError(f"model output has shape {logits.shape}; evaluation needs [N, classes] logits")
    top5 = np.argsort(-logits, axis=1)[:, :5]
    return top5[:, 0], int((top5[:, 0] == labels).sum()), int((top5 == labels[:, None]).any(axis=1).sum())


def agreement(a: Sequence[int], b: Sequence[int]) -> float:
    """Fraction of images on which two models predict the same top-1 class."""
    a, b = np.asarray(a), np.asarray(b)
    return float((a == b).mean()) if a.size else 0.0


def mean_kl_divergence(reference_logits: np.ndarray, logits: np.ndarray) -> float:
    """Mean over images of KL(softmax(reference) || softmax(logits)), in nats. Unlike top-1
    accuracy it counts every change of the output distribution, not only those that flip the
    top class, so it separates two close models on a few hundred images."""
    ref = np.asarray(reference_logits, dtype=np.float64)
    other = np.asarray(logits, dtype=np.float64)
    if ref.shape != other.shape or ref.ndim != 2:
        raise ValueError(f"logits must be two [n, classes] arrays of one shape, got {ref.shape} and {other.shape}")
    if ref.size == 0:
        return 0.0
    log_p, log_q = _log_softmax(ref), _log_softmax(other)
    return float(np.mean(np.sum(np.exp(log_p) * (log_p - log_q), axis=1)))


def _log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))
