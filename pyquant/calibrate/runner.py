"""Run the float model over calibration data and stream every planned activation into
its collector. One batch of activations is alive at a time: onnxruntime returns the
batch's tensors, the kernels absorb them, and they are dropped before the next run."""
from __future__ import annotations

import dataclasses
import logging
import queue
import threading
from types import MappingProxyType
from typing import Callable, Dict, Iterable, Iterator, List, Mapping, Optional

import numpy as np
import onnx
import onnxruntime as ort
from onnx import ModelProto

from ..config import QuantConfig
from ..errors import CalibrationError, DataError
from ..graph.plan import QuantPlan
from ..graph.view import GraphView
from .collector import ChannelMeanCollector, NonFiniteValues, TensorCollector

log = logging.getLogger(__name__)

ProgressCallback = Callable[[int, Optional[int]], None]  # (batches done, total or None)
_ORT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
              "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(uint8)": np.uint8,
              "tensor(int8)": np.int8, "tensor(bool)": np.bool_}


def make_session(model: ModelProto, outputs: List[str] = (), providers=None) -> ort.InferenceSession:
    """An onnxruntime session of ``model`` that also returns the tensors ``outputs``."""
    if outputs:
        extended = ModelProto()
        extended.CopyFrom(model)
        existing = {o.name for o in extended.graph.output}
        extended.graph.output.extend(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None)
                                     for name in outputs if name not in existing)
        model = extended
    options = ort.SessionOptions()
    options.log_severity_level = 3
    # Between runs the calibration kernels and the image decoder need the cores;
    # onnxruntime's worker threads would otherwise spin-wait on them.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(model.SerializeToString(), options,
                                providers=providers or ["CPUExecutionProvider"])


def check_feed(session: ort.InferenceSession, feed: Dict[str, np.ndarray], batch_index: int) -> Dict[str, np.ndarray]:
    """DataError naming the input if the feed does not match the model's inputs."""
    if not isinstance(feed, dict):
        raise DataError(f"batch {batch_index}: data reader returned {type(feed).__name__}, expected a dict "
                        "{input name: array}")
    inputs = {i.name: i for i in session.get_inputs()}
    missing, extra = set(inputs) - set(feed), set(feed) - set(inputs)
    if missing or extra:
        raise DataError(f"batch {batch_index}: feed names {sorted(feed)} do not match the model inputs "
                        f"{sorted(inputs)}")
    for name, value in feed.items():
        spec = inputs[name]
        value = np.asarray(value)
        if value.ndim != len(spec.shape):
            raise DataError(f"batch {batch_index}: input {name!r} has rank {value.ndim} (shape {value.shape}), "
                            f"the model expects rank {len(spec.shape)} {spec.shape}")
        for axis, (got, want) in enumerate(zip(value.shape, spec.shape)):
            if isinstance(want, int) and want > 0 and got != want:
                raise DataError(f"batch {batch_index}: input {name!r} has shape {value.shape}, the model "
                                f"expects {spec.shape} (axis {axis})")
        want_dtype = _ORT_TYPES.get(spec.type)
        if want_dtype is not None and value.dtype != want_dtype:
            raise DataError(f"batch {batch_index}: input {name!r} has dtype {value.dtype}, the model expects "
                            f"{np.dtype(want_dtype)}")
    return feed


class _BoundRunner:
    """session.run for the requested outputs, writing into buffers that are reused from
    one batch to the next while the input shapes stay the same (onnxruntime IOBinding).
    Allocating ~28 MB of fresh outputs per image on every run costs page faults that are
    a large part of a calibration pass. The returned arrays are overwritten by the next run."""

    def __init__(self, session: ort.InferenceSession, names: List[str]) -> None:
        self.session, self.names = session, names
        self.shapes_key = None
        self.buffers: List[np.ndarray] = []
        self.binding = None

    def run(self, feed: Dict[str, np.ndarray]) -> List[np.ndarray]:
        key = tuple(sorted((k, np.shape(v)) for k, v in feed.items()))
        if key != self.shapes_key:  # first batch, or a new shape (e.g. a short last batch)
            self.buffers, self.binding = [], None  # free the old outputs before allocating new ones
            values = self.session.run(self.names, feed)
            self.shapes_key, self.buffers = key, values
            self.binding = self.session.io_binding()
            for name, buf in zip(self.names, values):
                if buf.dtype != np.float32 or not buf.flags.c_contiguous:
                    self.binding = None
                    break
                self.binding.bind_output(name, "cpu", 0, np.float32, list(buf.shape), buf.ctypes.data)
            return values
        if self.binding is None:
            return self.session.run(self.names, feed)
        for name, value in feed.items():
            self.binding.bind_cpu_input(name, np.ascontiguousarray(value))
        self.session.run_with_iobinding(self.binding)
        return self.buffers


def tensors_over(model: ModelProto, names: List[str], feeds: Iterable[Dict[str, np.ndarray]]
                 ) -> Iterator[List[np.ndarray]]:
    """For each feed, the values of the tensors ``names`` of ``model`` (a few batches held in
    memory, e.g. those a transform looks at before calibration)."""
    session = make_session(model, names)
    for feed in feeds:
        yield session.run(names, feed)


def batch_samples(feed: Dict[str, np.ndarray]) -> int:
    """Samples in a batch: the leading dimension of its first input (1 for an empty feed)."""
    return int(np.shape(next(iter(feed.values())))[0]) if feed else 1


def batch_count(reader) -> Optional[int]:
    """The number of batches of ``reader``, None for a reader without a length."""
    try:
        return len(reader)
    except TypeError:
        return None


def _prefetch(reader, depth: int = 2):
    """Yield the reader's batches, reading ahead in a thread so that image decoding
    overlaps with inference. Errors in the reader are re-raised here."""
    q: "queue.Queue" = queue.Queue(maxsize=depth)
    stop = threading.Event()
    done = object()

    def work() -> None:
        try:
            while not stop.is_set():
                item = reader.get_next()
                q.put(done if item is None else item)
                if item is None:
                    return
        except BaseException as e:  # handed to the consumer
            q.put(e)

    thread = threading.Thread(target=work, daemon=True, name="pyquant-prefetch")
    thread.start()
    try:
        while True:
            item = q.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        while thread.is_alive():  # unblock a producer waiting on a full queue
            try:
                q.get_nowait()
            except queue.Empty:
                thread.join(timeout=0.05)


@dataclasses.dataclass
class Statistics:
    ranges: Dict[str, TensorCollector]  # every planned activation
    channel_means: Dict[str, ChannelMeanCollector]  # the tensors asked for
    batches: int


def collect(model: ModelProto, plan: QuantPlan, reader, config: QuantConfig,
            progress: Optional[ProgressCallback] = None,
            channel_means: Mapping[str, int] = MappingProxyType({})) -> Statistics:
    """Statistics of every planned activation over all batches of ``reader``, and the
    per-channel means of the tensors in ``channel_means`` ({name: channel axis}; each must
    be a planned activation)."""
    view = GraphView(model)
    histogram = config.needs_histogram
    collectors = {name: TensorCollector(config.num_bins, histogram) for name in plan.activations}
    means = {name: ChannelMeanCollector(axis) for name, axis in channel_means.items()}
    missing = set(means) - set(collectors)
    if missing:
        raise ValueError(f"channel means asked for tensors that are not calibrated: {sorted(missing)}")
    for name in plan.constant_activations:
        collectors[name].update(view.constant_value(name))
    constants = set(plan.constant_activations)
    inputs = set(view.graph_inputs)
    fed = [n for n in plan.activations if n in inputs]  # read from the feed, not the session
    names = [n for n in plan.activations if n not in constants and n not in inputs]
    session = make_session(model, names)
    runner = _BoundRunner(session, names)
    total = batch_count(reader)
    batches = 0
    for feed in _prefetch(reader):
        feed = check_feed(session, feed, batches)
        # Graph inputs first, then in graph order: a NaN is reported where it first appears.
        # (a model whose only quantized activations are its inputs needs no inference)
        values = [feed[n] for n in fed] + (runner.run(feed) if names else [])
        for name, value in zip(fed + names, values):
            try:
                collectors[name].update(value)
            except NonFiniteValues as e:
                raise CalibrationError(f"tensor {name!r} has {e} in calibration batch {batches}") from None
            if name in means:
                means[name].update(value)
        del values
        batches += 1
        if progress is not None:
            progress(batches, total)
    if batches == 0:
        raise DataError("the calibration data reader produced no batch")
    return Statistics(collectors, means, batches)
