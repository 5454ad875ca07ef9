"""Loading and saving ONNX models with clear errors and atomic writes."""
from __future__ import annotations

import os
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


def save_model(model: ModelProto, path: PathLike) -> None:
    """Write to a temporary file in the target folder, then rename: a reader never sees a
    half-written model and an interrupted run leaves nothing behind."""
    out = check_output_path(path)
    large = model.ByteSize() >= _PROTOBUF_LIMIT
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=str(out.parent))
    except OSError as e:
        raise OutputError(f"cannot write in {out.parent}: {e.strerror or e}") from None
    os.close(fd)
    data_name = out.name + ".data"
    try:
        if large:
            onnx.save_model(model, tmp, save_as_external_data=True, all_tensors_to_one_file=True,
                            location=data_name)
        else:
            onnx.save_model(model, tmp)
        os.replace(tmp, out)
    except BaseException as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(e, OSError):
            raise OutputError(f"cannot write {out}: {e.strerror or e}") from None
        raise
