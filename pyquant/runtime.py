"""Running models on onnxruntime: sessions, feed checks, reusable output buffers, and
the calibration data readers' plumbing (lengths, rewinding, read-ahead, re-batching).

Every onnxruntime session of the package is made here, under the thread budget
(pyquant.threads). Calibration, the techniques and evaluation sit above this module.
"""
from __future__ import annotations

import logging
import os
import queue
import shutil
import tempfile
import threading
from typing import Dict, Iterable, Iterator, List, Optional, Sequence

import numpy as np
import onnx
import onnxruntime as ort
from onnx import ModelProto

from . import threads
from .errors import ConfigError, DataError

log = logging.getLogger(__name__)

Feed = Dict[str, np.ndarray]
ORT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
             "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(uint8)": np.uint8,
             "tensor(int8)": np.int8, "tensor(bool)": np.bool_}


def session_options(optimize: bool = True) -> ort.SessionOptions:
    """Options under the current thread budget, without spin-waiting: between runs the
    kernels and the image decoders need the cores that spinning workers would hold.
    ``optimize=False``: no graph optimizations (onnxruntime's fusions change float
    rounding, which a check of our own rewrites must not count)."""
    options = ort.SessionOptions()
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    options.intra_op_num_threads = threads.current().onnxruntime
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    return options


def make_session(model: ModelProto, outputs: Sequence[str] = (), providers=None,
                 optimize: bool = True, output_types: Optional[Dict[str, int]] = None) -> ort.InferenceSession:
    """An onnxruntime session of ``model`` that also returns the tensors ``outputs`` (float
    unless ``output_types`` gives their element type)."""
    if outputs:
        extended = ModelProto()
        extended.CopyFrom(model)
        existing = {o.name for o in extended.graph.output}
        types = output_types or {}
        extended.graph.output.extend(
            onnx.helper.make_tensor_value_info(name, types.get(name, onnx.TensorProto.FLOAT), None)
            for name in outputs if name not in existing)
        model = extended
    return ort.InferenceSession(model.SerializeToString(), session_options(optimize),
                                providers=providers or ["CPUExecutionProvider"])


def make_provider_session(model, provider: str = "CPUExecutionProvider",
                          provider_options: Optional[dict] = None) -> ort.InferenceSession:
    """A session of ``model`` (ModelProto or path) on ``provider`` with the CPU as fallback;
    ConfigError naming the available providers if onnxruntime lacks it."""
    available = ort.get_available_providers()
    if provider not in available:
        raise ConfigError(f"execution provider {provider!r} is not available in this onnxruntime "
                          f"({ort.__version__}); available: {', '.join(available)}")
    source = model.SerializeToString() if isinstance(model, ModelProto) else str(model)
    providers: List = [(provider, provider_options or {})]
    if provider != "CPUExecutionProvider":
        providers.append("CPUExecutionProvider")
    return ort.InferenceSession(source, session_options(), providers=providers)


def save_basic_optimized(source: "os.PathLike[str] | str", destination: "os.PathLike[str] | str") -> None:
    """Write ``source`` as onnxruntime's basic graph optimizations leave it (constant
    folding, e.g. of an exporter's same-padding subgraphs into Conv pads)."""
    options = session_options()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.optimized_model_filepath = str(destination)
    ort.InferenceSession(str(source), options, providers=["CPUExecutionProvider"])


def check_feed(session: ort.InferenceSession, feed: Feed, batch_index: int) -> Feed:
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
        want_dtype = ORT_TYPES.get(spec.type)
        if want_dtype is not None and value.dtype != want_dtype:
            raise DataError(f"batch {batch_index}: input {name!r} has dtype {value.dtype}, the model expects "
                            f"{np.dtype(want_dtype)}")
    return feed


class BoundRunner:
    """session.run for the requested outputs, writing into buffers that are reused from
    one batch to the next while the input shapes stay the same (onnxruntime IOBinding).
    Allocating ~28 MB of fresh outputs per image on every run costs page faults that are
    a large part of a calibration pass. The returned arrays are overwritten by the next run."""

    def __init__(self, session: ort.InferenceSession, names: List[str]) -> None:
        self.session, self.names = session, names
        self.shapes_key = None
        self.buffers: List[np.ndarray] = []
        self.binding = None

    def run(self, feed: Feed) -> List[np.ndarray]:
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


def tensors_over(model: ModelProto, names: List[str], feeds: Iterable[Feed]) -> Iterator[List[np.ndarray]]:
    """For each feed, the values of the tensors ``names`` of ``model`` (a few batches held in
    memory, e.g. those a transform looks at before calibration)."""
    session = make_session(model, names)
    for feed in feeds:
        yield session.run(names, feed)


# ---- readers -------------------------------------------------------------------------

def batch_samples(feed: Feed) -> int:
    """Samples in a batch: the leading dimension of its first input (1 for an empty feed)."""
    return int(np.shape(next(iter(feed.values())))[0]) if feed else 1


def batch_count(reader) -> Optional[int]:
    """The number of batches of ``reader``, None for a reader without a length (including
    onnxruntime's CalibrationDataReader, whose __len__ raises NotImplementedError)."""
    try:
        return len(reader)
    except (TypeError, NotImplementedError):
        return None


def require_rewind(reader, why: str) -> None:
    """DataError unless ``reader`` can be read again; ``why`` names what needs it."""
    if not callable(getattr(reader, "rewind", None)):
        raise DataError(f"{why} reads the calibration data more than once: the data reader needs a rewind() method")


def prefetch(reader, depth: int = 2) -> Iterator[Feed]:
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


class RebatchedReader:
    """The batches of ``reader`` re-cut to ``batch_size`` samples along axis 0 (the last
    batch may be smaller), so that a configured calibration batch size holds whatever
    batches the data comes in. Holds at most one batch's worth of pending samples."""

    def __init__(self, reader, batch_size: int) -> None:
        self.reader, self.batch_size = reader, batch_size
        self._pending: List[Feed] = []
        self._pending_samples = 0
        self._exhausted = False

    def __len__(self) -> int:
        raise TypeError("the number of re-batched batches is not known in advance")

    def rewind(self) -> None:
        require_rewind(self.reader, "re-batching")
        self.reader.rewind()
        self._pending, self._pending_samples, self._exhausted = [], 0, False

    def get_next(self) -> Optional[Feed]:
        while self._pending_samples < self.batch_size and not self._exhausted:
            feed = self.reader.get_next()
            if feed is None:
                self._exhausted = True
                break
            if not isinstance(feed, dict) or not feed:
                raise DataError(f"data reader returned {type(feed).__name__}, expected a non-empty dict "
                                "{input name: array}")
            self._pending.append({k: np.asarray(v) for k, v in feed.items()})
            self._pending_samples += batch_samples(feed)
        if not self._pending:
            return None
        names = list(self._pending[0])
        try:
            merged = {k: np.concatenate([f[k] for f in self._pending]) for k in names}
        except (KeyError, ValueError) as e:
            raise DataError(f"calib_batch_size {self.batch_size}: the reader's batches cannot be joined along "
                            f"axis 0 ({e}); leave calib_batch_size unset to use them as they come") from None
        head = {k: np.ascontiguousarray(v[:self.batch_size]) for k, v in merged.items()}
        rest = {k: v[self.batch_size:] for k, v in merged.items()}
        left = batch_samples(rest)
        self._pending, self._pending_samples = ([rest], left) if left else ([], 0)
        return head


class PeekedReader:
    """A reader whose first batches (at least ``samples`` samples, or all there are) were
    read ahead, to look at real data before calibration; they are replayed first."""

    def __init__(self, reader, samples: int = 1) -> None:
        self.reader = reader
        self.peeked: List[Feed] = []
        count = 0
        while count < samples and (batch := reader.get_next()) is not None:
            self.peeked.append(batch)
            count += batch_samples(batch)
        self._pending = list(self.peeked)

    def __len__(self) -> int:
        return len(self.reader)

    def rewind(self) -> None:
        require_rewind(self.reader, "this run")
        self._pending = []
        self.reader.rewind()

    def get_next(self) -> Optional[Feed]:
        if self._pending:
            return self._pending.pop(0)
        return self.reader.get_next()


# Spilled batches are kept up to this many bytes (and a quarter of the temporary folder's
# free space); beyond it the second pass reads the source again.
SPILL_MAX_BYTES = 4 << 30


class SpillingReader:
    """The batches of ``reader``, copied to an anonymous temporary file as they are read.
    After one complete pass, rewind() replays them from that file instead of reading the
    source again: a second pass (fast finetune) then costs a file read (page cache) instead
    of decoding every image again (about 2.5 s of CPU for 500 ImageNet JPEGs). The copy
    stops, and rewind() falls back to the source's rewind(), when a pass ends early or the
    batches would exceed ``max_bytes`` (and a quarter of the free space of the temporary
    folder). Only an index of (name, dtype, shape, offset) per batch stays in memory."""

    def __init__(self, reader, max_bytes: Optional[int] = None) -> None:
        self.reader = reader
        self._index: Optional[List[List[tuple]]] = []  # per batch: (name, dtype, shape, offset); None: gave up
        try:  # a copy that cannot be written is no error: the source is read again instead
            self._file = tempfile.TemporaryFile(prefix="pyquant-batches-")  # no name: gone when closed
            free = shutil.disk_usage(tempfile.gettempdir()).free
        except OSError as e:
            log.info("calibration batches are not copied for a second pass (%s): the reader is read again", e)
            self._file, self._index, free = None, None, 0
        self.max_bytes = min(SPILL_MAX_BYTES if max_bytes is None else max_bytes, free // 4)
        self._size = 0
        self._complete = False
        self._replay: Optional[int] = None  # next batch to replay, None while reading the source

    def __len__(self) -> int:
        return len(self.reader)

    @property
    def replaying(self) -> bool:
        return self._replay is not None

    def close(self) -> None:
        if self._file is not None:
            self._file.close()

    def _give_up(self) -> None:
        self._index = None
        if self._file is not None:
            self._file.truncate(0)

    def _spill(self, feed: Feed) -> None:
        entry = []
        for name, value in feed.items():
            array = np.asarray(value)  # (ascontiguousarray would make a scalar 1-D)
            if not array.flags.c_contiguous:
                array = array.copy(order="C")
            if array.dtype.hasobject or self._size + array.nbytes > self.max_bytes:
                self._give_up()
                return
            entry.append((name, array.dtype, array.shape, self._size))
            try:
                self._file.write(array.reshape(-1).view(np.uint8).data)
            except OSError as e:  # e.g. the disk filled up: read the source again instead
                log.info("the copy of the calibration batches stopped (%s): the reader is read again", e)
                self._give_up()
                return
            self._size += array.nbytes
        self._index.append(entry)

    def _read_into(self, buffer: np.ndarray, offset: int) -> None:
        done = 0
        while done < buffer.size:  # (one read returns at most about 2 GB)
            got = os.preadv(self._file.fileno(), [buffer[done:].data], offset + done)
            if got <= 0:
                raise DataError("the temporary copy of the calibration batches was cut short")
            done += got

    def rewind(self) -> None:
        if self._index is not None and self._complete:
            try:
                self._file.flush()
                self._replay = 0
                return
            except OSError as e:
                log.info("the copy of the calibration batches could not be completed (%s): the reader is read again", e)
        require_rewind(self.reader, "this run")
        self._give_up()  # a pass that ended early: the copy is incomplete
        self._replay = None
        self.reader.rewind()

    def get_next(self) -> Optional[Feed]:
        if self._replay is not None:
            if self._replay == len(self._index):
                return None
            entry = self._index[self._replay]
            self._replay += 1
            feed = {}
            for name, dtype, shape, offset in entry:
                array = np.empty(shape, dtype)
                self._read_into(array.reshape(-1).view(np.uint8), offset)
                feed[name] = array
            return feed
        feed = self.reader.get_next()
        if self._index is not None and not self._complete:
            if feed is None:
                self._complete = True
            else:
                self._spill(feed)
        return feed
