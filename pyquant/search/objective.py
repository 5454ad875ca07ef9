"""What a search maximises (or minimises): one number per quantized model.

  * Top1Objective: top-1 accuracy of a classifier on a labelled image folder;
  * FloatComparisonObjective: how close the quantized model's first output stays to the
    float model's on unlabelled held-out data: "agreement" (fraction of samples with the
    same argmax), "kl" (mean KL divergence of the softmaxes, lower is better) or "cosine"
    (mean cosine similarity per sample);
  * UserObjective: a user's ``module:function`` called with the quantized ModelProto.

An objective is a small frozen value (it travels to Ray workers); ``prepare`` runs once on
the driver (the float model's outputs or score), ``score`` once per trial, wherever the
trial runs. ``fingerprint`` is what an experiment records to refuse a changed objective.
"""
from __future__ import annotations

import dataclasses
import importlib
import os
import re
import sys
from typing import Any, Callable, Dict, Optional, Tuple

import numpy as np
from onnx import ModelProto

from ..datasource import DataSource, describe_source
from ..errors import ConfigError, DataError
from ..evaluation import evaluate, mean_kl_divergence
from ..runtime import make_provider_session


def model_outputs(model: ModelProto, source: DataSource) -> np.ndarray:
    """The model's first output over every sample of ``source``, concatenated [N, ...]."""
    session = make_provider_session(model)
    reader = source.reader()
    name = session.get_outputs()[0].name
    parts = []
    while True:
        feed = reader.get_next()
        if feed is None:
            break
        parts.append(np.asarray(session.run([name], feed)[0], dtype=np.float32))
    if not parts:
        raise DataError("the held-out data produced no batch")
    return np.concatenate(parts)


def _class_axis_last(outputs: np.ndarray) -> np.ndarray:
    """[N, C, ...] -> [N * ..., C]: the class (channel) axis last, one row per position."""
    if outputs.ndim < 2:
        raise DataError(f"comparing with the float model needs outputs [N, C, ...], got shape {outputs.shape}")
    return np.moveaxis(outputs, 1, -1).reshape(-1, outputs.shape[1])


def _agreement(reference: np.ndarray, outputs: np.ndarray) -> float:
    return float(np.mean(_class_axis_last(reference).argmax(axis=1) == _class_axis_last(outputs).argmax(axis=1)))


def _kl(reference: np.ndarray, outputs: np.ndarray) -> float:
    return mean_kl_divergence(_class_axis_last(reference), _class_axis_last(outputs))


def _cosine(reference: np.ndarray, outputs: np.ndarray) -> float:
    a = reference.reshape(len(reference), -1).astype(np.float64)
    b = outputs.reshape(len(outputs), -1).astype(np.float64)
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return float(np.mean(np.where(norms > 0, np.sum(a * b, axis=1) / np.where(norms > 0, norms, 1), 1.0)))


# metric -> (function of (float outputs, quantized outputs), higher is better)
FLOAT_COMPARISONS: Dict[str, Tuple[Callable[[np.ndarray, np.ndarray], float], bool]] = {
    "agreement": (_agreement, True),
    "kl": (_kl, False),
    "cosine": (_cosine, True),
}


@dataclasses.dataclass(frozen=True)
class Top1Objective:
    """Top-1 accuracy on a labelled source (an ImageFolderSource with class sub-folders)."""

    data: DataSource
    name = "top1"
    higher_is_better = True

    def fingerprint(self) -> Dict[str, Any]:
        return {"kind": self.name, "data": describe_source(self.data)}

    def prepare(self, float_model: ModelProto) -> Dict[str, Any]:
        return {"float_score": self.score(float_model, None)}

    def score(self, model: ModelProto, prepared: Any) -> float:
        return evaluate(model, self.data.reader()).top1


@dataclasses.dataclass(frozen=True)
class FloatComparisonObjective:
    """Agreement, KL or cosine of the first output against the float model's on ``data``."""

    data: DataSource
    metric: str = "agreement"

    def __post_init__(self) -> None:
        if self.metric not in FLOAT_COMPARISONS:
            raise ConfigError(f"float comparison metric must be one of {', '.join(FLOAT_COMPARISONS)}, "
                              f"got {self.metric!r}")

    @property
    def name(self) -> str:
        return self.metric

    @property
    def higher_is_better(self) -> bool:
        return FLOAT_COMPARISONS[self.metric][1]

    def fingerprint(self) -> Dict[str, Any]:
        return {"kind": self.metric, "data": describe_source(self.data)}

    def prepare(self, float_model: ModelProto) -> Dict[str, Any]:
        reference = model_outputs(float_model, self.data)
        return {"reference": reference, "float_score": FLOAT_COMPARISONS[self.metric][0](reference, reference)}

    def score(self, model: ModelProto, prepared: Any) -> float:
        return FLOAT_COMPARISONS[self.metric][0](prepared["reference"], model_outputs(model, self.data))


@dataclasses.dataclass(frozen=True)
class UserObjective:
    """``module:function``: function(model: onnx.ModelProto) -> float, imported where the
    trial runs (with ``folder``, the driver's working directory, on sys.path)."""

    spec: str
    higher_is_better: bool = True
    folder: str = dataclasses.field(default_factory=os.getcwd)
    name = "user"

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*", self.spec):
            raise ConfigError(f"a user objective is module:function, got {self.spec!r}")

    def fingerprint(self) -> Dict[str, Any]:
        return {"kind": self.name, "function": self.spec, "higher_is_better": self.higher_is_better}

    def function(self) -> Callable[[ModelProto], float]:
        module_name, _, function_name = self.spec.partition(":")
        sys.path.insert(0, self.folder)
        try:
            function = getattr(importlib.import_module(module_name), function_name)
        except (ImportError, AttributeError) as e:
            raise ConfigError(f"objective {self.spec!r}: cannot import {function_name!r} from {module_name!r} "
                              f"({e})") from None
        finally:
            sys.path.remove(self.folder)
        if not callable(function):
            raise ConfigError(f"objective {self.spec!r}: {function_name} is not callable")
        return function

    def prepare(self, float_model: ModelProto) -> Dict[str, Any]:
        return {"float_score": self.score(float_model, None)}

    def score(self, model: ModelProto, prepared: Any) -> float:
        value = self.function()(model)
        try:
            value = float(value)
        except (TypeError, ValueError):
            raise DataError(f"objective {self.spec!r} returned {value!r}, not a number") from None
        if not np.isfinite(value):
            raise DataError(f"objective {self.spec!r} returned {value}")
        return value


Objective = Any  # Top1Objective | FloatComparisonObjective | UserObjective


def better(objective: Objective, a: float, b: Optional[float]) -> bool:
    """Whether score ``a`` beats ``b`` (None: no score yet)."""
    if b is None:
        return True
    return a > b if objective.higher_is_better else a < b
