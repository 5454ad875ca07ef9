"""Loading and saving ONNX models with clear errors and atomic writes."""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Union

import onnx
from onnx import ModelProto

from ..errors import ModelError, OutputError

PathLike = Union[str, "os.PathLike[str]"]
# Protobuf cannot serialise a model above 2 GB in one message; such models keep
# their initializers in an external data file.
_PROTOBUF_LIMIT = 2 ** 31 - 1
# With external data, initializers of at least this size leave the .onnx (onnx's default).
EXTERNAL_DATA_MIN_BYTES = 1024


def load_model(path: PathLike) -> ModelProto:
    """Load an ONNX model (with external data) and check it; ModelError names the file."""
    p = Path(path)
    if not p.exists():
        raise ModelError(f"model file not found: {p}")
    if p.is_dir():
        raise ModelError(f"model path is a directory, not an ONNX file: {p}")
    try:
        model = onnx.load(str(p), load_external_data=False)
    except Exception as e:  # protobuf raises DecodeError and friends on junk
        raise ModelError(f"{p}: not a readable ONNX model ({type(e).__name__}: {e})") from None
    for location in sorted(_external_locations(model)):
        if not (p.parent / location).is_file():
            raise ModelError(f"{p}: external data file missing: {p.parent / location}")
    try:
        onnx.load_external_data_for_model(model, str(p.parent))
    except Exception as e:
        raise ModelError(f"{p}: cannot read its external data ({type(e).__name__}: {e})") from None
    if not model.graph.node:
        raise ModelError(f"{p}: not an ONNX model (no graph nodes)")
    try:
        if model.ByteSize() < _PROTOBUF_LIMIT:
            onnx.checker.check_model(model)
    except onnx.checker.ValidationError as e:
        first = str(e).strip().splitlines()[0]
        raise ModelError(f"{p}: invalid ONNX model: {first}") from None
    return model


def _tensors(graph: onnx.GraphProto):
    """Initializers and tensor attributes of a graph and its subgraphs."""
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            if attr.HasField("g"):
                yield from _tensors(attr.g)
            for sub in attr.graphs:
                yield from _tensors(sub)


def _external_locations(model: ModelProto) -> set:
    """The external data files a model refers to (relative to its folder)."""
    return {entry.value for tensor in _tensors(model.graph) if tensor.data_location == onnx.TensorProto.EXTERNAL
            for entry in tensor.external_data if entry.key == "location"}


def check_output_path(output: PathLike, input_path: PathLike = None) -> Path:
    """Fail before any work if the output cannot be written or would overwrite the input."""
    out = Path(output)
    if input_path is not None and out.resolve() == Path(input_path).resolve():
        raise OutputError(f"output path is the input model: {out}")
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise OutputError(f"output folder does not exist: {parent}")
    if not os.access(parent, os.W_OK):
        raise OutputError(f"output folder is not writable: {parent}")
    if out.is_dir():
        raise OutputError(f"output path is a directory: {out}")
    return out


def write_text_atomic(path: PathLike, text: str) -> None:
    """Write ``text`` under a temporary name beside ``path`` and rename: never a half-written file."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".pyquant-", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def save_model(model: ModelProto, path: PathLike, external_data: bool = False) -> None:
    """Write ``model`` to ``path`` so that a reader never sees a half-written model and a
    failed or interrupted run leaves nothing behind: everything is written in a temporary
    folder beside ``path`` and renamed into place only once complete.

    With ``external_data`` (always for a model above protobuf's 2 GB limit), every
    initializer of at least EXTERNAL_DATA_MIN_BYTES goes to ``<name>.data`` beside the
    model; that file is renamed into place first and the model last, so the model never
    refers to a missing or partial data file. ``model`` is left as it was."""
    out = check_output_path(path)
    external_data = external_data or model.ByteSize() >= _PROTOBUF_LIMIT
    data_name = out.name + ".data"
    try:
        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=str(out.parent)))
    except OSError as e:
        raise OutputError(f"cannot write in {out.parent}: {e.strerror or e}") from None
    placed_data = None
    try:
        if external_data:
            _write_with_external_data(model, staging / out.name, staging / data_name, data_name)
            placed_data = out.parent / data_name
            os.replace(staging / data_name, placed_data)
        else:
            with open(staging / out.name, "wb") as f:
                f.write(model.SerializeToString())
        os.replace(staging / out.name, out)
    except BaseException as e:
        if placed_data is not None:
            placed_data.unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise OutputError(f"cannot write {out}: {e.strerror or e}") from None
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _initializers(graph: onnx.GraphProto):
    """Initializers of a graph and its subgraphs."""
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("g"):
                yield from _initializers(attr.g)
            for sub in attr.graphs:
                yield from _initializers(sub)


def _write_tensor_data(data_file, raw: bytes) -> None:
    data_file.write(raw)


def _write_with_external_data(model: ModelProto, model_path: Path, data_path: Path, location: str) -> None:
    """Write ``model`` to model_path with the raw data of its large initializers in data_path,
    referred to as ``location`` (relative to the model's folder). Works on a copy of
    ``model`` (the caller's model keeps its data)."""
    header = ModelProto()
    header.CopyFrom(model)
    with open(data_path, "wb") as data_file:
        for tensor in _initializers(header.graph):
            if not tensor.HasField("raw_data") or len(tensor.raw_data) < EXTERNAL_DATA_MIN_BYTES:
                continue
            offset = data_file.tell()
            _write_tensor_data(data_file, tensor.raw_data)
            length = data_file.tell() - offset
            tensor.ClearField("raw_data")
            tensor.data_location = onnx.TensorProto.EXTERNAL
            for key, value in (("location", location), ("offset", offset), ("length", length)):
                entry = tensor.external_data.add()
                entry.key, entry.value = key, str(value)
        data_file.flush()
        os.fsync(data_file.fileno())  # on disk before the model that refers to it
    with open(model_path, "wb") as f:
        f.write(header.SerializeToString())
