"""The stable entry points for other tools: ``pyquant.quantize`` and ``pyquant.evaluate``.

Models may be paths or onnx.ModelProto. Calibration data may be a reader with
onnxruntime's ``get_next()`` protocol, a numpy array [N, ...] (one-input models), a dict
{input name: array [N, ...]}, an iterable of feed dicts, or a path (image folder, .npy
file or folder of .npy batches).
"""
from __future__ import annotations

import dataclasses
import importlib
import os
import re
import sys
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Iterator, Optional, Tuple, Union

import numpy as np
from onnx import ModelProto, helper

from . import threads as thread_budget
from .config import DEFAULT_CALIB_BATCH_SIZE, PRESETS, QuantConfig, get_preset
from .data import ArrayReader, FeedReader, ImageFolderReader, Preprocess, is_npy_source, is_npz_source
from .errors import ConfigError, DataError
from .evaluation import EvalResult
from .evaluation import evaluate as _evaluate
from .graph.model_io import check_output_path, load_model, save_model
from .graph.view import GraphView, image_input
from .pipeline import QuantizeResult, quantize_model
from .techniques import Callbacks

ModelLike = Union[str, "os.PathLike[str]", ModelProto]
ProgressCallback = Callable[[int, Optional[int]], None]
Progress = Union[None, ProgressCallback, Callbacks]


class _IterableReader:
    """get_next() over an iterable of feed dicts (a one-shot iterator, e.g. a generator)."""

    def __init__(self, feeds: Iterable[Dict[str, np.ndarray]]) -> None:
        self._iter: Iterator = iter(feeds)

    def get_next(self) -> Optional[Dict[str, np.ndarray]]:
        return next(self._iter, None)


class _SequenceReader(_IterableReader):
    """A list or tuple of feed dicts: it can be read again (fast finetune rereads it)."""

    def __init__(self, feeds) -> None:
        self.feeds = feeds
        super().__init__(feeds)

    def __len__(self) -> int:
        return len(self.feeds)

    def rewind(self) -> None:
        self._iter = iter(self.feeds)


class _DictReader:
    """Batches from {input name: array [N, ...]} (all arrays with the same N)."""

    def __init__(self, arrays: Dict[str, np.ndarray], batch_size: int) -> None:
        lengths = {k: len(v) for k, v in arrays.items()}
        if len(set(lengths.values())) != 1:
            raise DataError(f"calibration arrays have different lengths: {lengths}")
        self.arrays, self.batch_size, self.n, self.pos = arrays, batch_size, next(iter(lengths.values())), 0

    def __len__(self) -> int:
        return (self.n + self.batch_size - 1) // self.batch_size

    def get_next(self) -> Optional[Dict[str, np.ndarray]]:
        if self.pos >= self.n:
            return None
        feed = {k: np.ascontiguousarray(v[self.pos:self.pos + self.batch_size]) for k, v in self.arrays.items()}
        self.pos += self.batch_size
        return feed


def model_inputs(model: ModelProto) -> Dict[str, Tuple[int, np.dtype]]:
    """{input name: (rank, numpy dtype)} of the model's graph inputs."""
    view = GraphView(model)
    out = {}
    for vi in model.graph.input:
        if vi.name in view.graph_inputs:
            t = vi.type.tensor_type
            out[vi.name] = (len(t.shape.dim), helper.tensor_dtype_to_np_dtype(t.elem_type))
    return out


def _python_source(spec: str):
    """The object a ``module:function`` spec names, called: an iterable of feed dicts or a reader."""
    module_name, _, function_name = spec.partition(":")
    try:
        sys.path.insert(0, os.getcwd())
        try:
            function = getattr(importlib.import_module(module_name), function_name)
        finally:
            sys.path.pop(0)
    except (ImportError, AttributeError) as e:
        raise DataError(f"calibration data {spec!r}: cannot import {function_name!r} from {module_name!r} ({e})") \
            from None
    if not callable(function):
        raise DataError(f"calibration data {spec!r}: {function_name} is not callable")
    return function()


def is_python_source(data: Any) -> bool:
    """``module:function`` (not a path that exists, not a Windows drive)."""
    return isinstance(data, str) and not os.path.exists(data) and \
        re.fullmatch(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*", data) is not None


def as_reader(data: Any, model: ModelProto, batch_size: int = DEFAULT_CALIB_BATCH_SIZE,
              preprocess: Optional[Preprocess] = None, limit: Optional[int] = None):
    """A get_next() reader for any accepted form of calibration data: a reader, an array
    (one-input models), a dict {input: array [N, ...]}, an iterable of feed dicts, or a
    path: .npy file or folder (one-input models), .npz file or folder (any inputs), image
    folder (image models); or ``module:function`` returning any of these."""
    if hasattr(data, "get_next"):
        return data
    if is_python_source(data):
        return as_reader(_python_source(data), model, batch_size, preprocess, limit)
    names = GraphView(model).graph_inputs
    if isinstance(data, (str, os.PathLike)):
        if is_npz_source(data):
            return FeedReader(data, model_inputs(model), batch_size, limit)
        if is_npy_source(data):
            if len(names) != 1:
                raise DataError(f".npy data needs a one-input model; this one has inputs {names}: use .npz "
                                "(one array per input name)")
            return ArrayReader(data, names[0], batch_size, limit)
        spec = image_input(model)
        if preprocess is None:
            if spec.size is None:
                raise DataError("the model input has no static size: pass preprocess=Preprocess(input_size=...)")
            preprocess = Preprocess(input_size=spec.size, layout=spec.layout)
        return ImageFolderReader(data, spec.name, preprocess, batch_size, limit)
    if isinstance(data, np.ndarray):
        if len(names) != 1:
            raise DataError(f"a single array needs a one-input model; this one has inputs {names}: pass a dict")
        return ArrayReader(data, names[0], batch_size, limit)
    if isinstance(data, dict):
        return _DictReader({k: np.asarray(v)[:limit] for k, v in data.items()}, batch_size)
    if isinstance(data, (list, tuple)):
        return _SequenceReader(data)
    if isinstance(data, Iterable):
        return _IterableReader(data)
    raise DataError(f"unsupported calibration data of type {type(data).__name__}")


def resolve_config(config: Any) -> QuantConfig:
    """A preset name, a QuantConfig, or a Quark-style QuantizationConfig/Config (anything
    with ``to_quant_config()``, or ``global_quant_config`` holding one) -> QuantConfig."""
    if isinstance(config, QuantConfig):
        return config
    if isinstance(config, str):
        return get_preset(config)
    inner = getattr(config, "global_quant_config", config)
    if callable(getattr(inner, "to_quant_config", None)):
        return inner.to_quant_config()
    raise ConfigError(f"expected a preset name ({', '.join(PRESETS)}), QuantConfig, QuantizationConfig or Config; "
                      f"got {type(config).__name__}")


def _callbacks(progress: Progress) -> Callbacks:
    if progress is None or isinstance(progress, Callbacks):
        return progress or Callbacks()
    if callable(progress):
        return Callbacks(calibration=progress)
    raise ConfigError(f"progress must be a callable (done, total) or pyquant.techniques.Callbacks, "
                      f"got {type(progress).__name__}")


def quantize_detailed(model: ModelLike, data: Any, config: Any = "XINT8", output: Optional[ModelLike] = None,
                      *, batch_size: Optional[int] = None, threads: Optional[int] = None,
                      preprocess: Optional[Preprocess] = None, progress: Progress = None,
                      keep_float_model: bool = False) -> QuantizeResult:
    """The one entry point of quantization (``quantize``, ``ModelQuantizer`` and the CLI
    call it): the full result (model, plan, parameter table, technique reports, times;
    with ``keep_float_model`` the float model the QDQ model was written from).

    ``batch_size`` and ``threads`` override the config's calib_batch_size and threads.
    With ``output`` the model is also written there, atomically; the path is checked
    before any work."""
    quant_config = resolve_config(config)
    overrides = {k: v for k, v in (("calib_batch_size", batch_size), ("threads", threads)) if v is not None}
    if overrides:
        quant_config = dataclasses.replace(quant_config, **overrides)
    if output is not None:
        check_output_path(output, model if not isinstance(model, ModelProto) else None)
    proto = model if isinstance(model, ModelProto) else load_model(model)
    reader = as_reader(data, proto, quant_config.calib_batch_size or DEFAULT_CALIB_BATCH_SIZE, preprocess)
    result = quantize_model(proto, reader, quant_config, _callbacks(progress), keep_float_model=keep_float_model)
    if output is not None:
        save_model(result.model, output)
    return result


def quantize(model: ModelLike, data: Any, config: Any = "XINT8", output: Optional[ModelLike] = None,
             *, batch_size: Optional[int] = None, threads: Optional[int] = None,
             preprocess: Optional[Preprocess] = None, progress: Progress = None):
    """Quantize ``model`` with calibration ``data`` under ``config`` (a preset name,
    QuantConfig, or Quark-style QuantizationConfig/Config).

    Returns the quantized onnx.ModelProto, or, when ``output`` is a path, writes it there
    (atomically) and returns the path. ``batch_size``: calibration samples per inference
    (overrides config.calib_batch_size); ``threads``: the thread budget (overrides
    config.threads; default: the CPUs this process may use)."""
    result = quantize_detailed(model, data, config, output, batch_size=batch_size, threads=threads,
                               preprocess=preprocess, progress=progress)
    return result.model if output is None else Path(output)


def evaluate(model: ModelLike, data: Any, labels: Any = None, provider: str = "CPUExecutionProvider",
             preprocess: Optional[Preprocess] = None, batch_size: int = 25,
             progress: Optional[ProgressCallback] = None, keep_logits: bool = False,
             threads: Optional[int] = None) -> EvalResult:
    """Top-1/top-5 of a classifier. ``data``: an image folder (``labels``: an optional
    LOC_synset_mapping.txt), an ImageFolderReader, or an array [N, ...] with ``labels`` [N].
    ``keep_logits``: the result also holds the logits (compare two models with
    pyquant.evaluation.mean_kl_divergence). ``threads``: the thread budget."""
    proto = model if isinstance(model, ModelProto) else load_model(model)
    if isinstance(data, (str, os.PathLike)):
        spec = image_input(proto)
        if preprocess is None:
            preprocess = Preprocess(input_size=spec.size or 224, layout=spec.layout)
        data = ImageFolderReader(data, spec.name, preprocess, batch_size, labels_file=labels)
    elif isinstance(data, np.ndarray):
        if labels is None or len(labels) != len(data):
            raise DataError("an array of inputs needs labels of the same length")
        data = _LabelledArrays(data, np.asarray(labels), batch_size)
    with thread_budget.budget(threads):
        return _evaluate(model, data, provider, progress=progress, keep_logits=keep_logits)


class _LabelledArrays:
    def __init__(self, x: np.ndarray, y: np.ndarray, batch_size: int) -> None:
        self.x, self.y, self.batch_size, self.pos = x, y, batch_size, 0

    def __len__(self) -> int:
        return (len(self.x) + self.batch_size - 1) // self.batch_size

    def rewind(self) -> None:
        self.pos = 0

    def next_labeled(self):
        if self.pos >= len(self.x):
            return None
        s = slice(self.pos, self.pos + self.batch_size)
        self.pos += self.batch_size
        return np.ascontiguousarray(self.x[s]), self.y[s]
