"""Data that a worker can open by itself: a description (a folder and its preprocessing,
or arrays) instead of a reader object, cut into shards of whole batches.

A reader holds open files and threads and cannot be sent to another process; a source
is a small frozen value, and ``source.reader(start, stop)`` opens samples [start, stop)
where the work runs. Shards start on multiples of the batch size, so that every batch of a
sharded pass is the batch a single pass over the whole source would read.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Dict, List, Mapping, Optional, Tuple, Union

import numpy as np

from .config import DEFAULT_CALIB_BATCH_SIZE
from .data import ImageFolderReader, Preprocess, image_labels, list_images
from .errors import ConfigError, DataError


@dataclasses.dataclass(frozen=True)
class ImageFolderSource:
    """Images of a folder (class sub-folders allowed; ``labels_file``: LOC_synset_mapping.txt),
    sorted by path as ImageFolderReader reads them; ``limit``: the first N only."""

    folder: str
    input_name: str
    preprocess: Preprocess
    batch_size: int = DEFAULT_CALIB_BATCH_SIZE
    labels_file: Optional[str] = None
    limit: Optional[int] = None

    def __len__(self) -> int:
        return len(list_images(self.folder)[:self.limit])

    def reader(self, start: int = 0, stop: Optional[int] = None) -> ImageFolderReader:
        reader = ImageFolderReader(self.folder, self.input_name, self.preprocess, self.batch_size, self.limit,
                                   labels_file=self.labels_file, workers=1)
        reader.files = reader.files[start:stop]
        reader.labels = reader.labels[start:stop]
        if not reader.files:
            raise DataError(f"{self.folder}: no images in samples [{start}, {stop})")
        return reader

    def labels(self) -> np.ndarray:
        files = list_images(self.folder)[:self.limit]
        return np.asarray(image_labels(files, self.folder, self.labels_file))


class ArraySource:
    """Samples held in arrays {input name: [N, ...]}, with optional ``labels`` [N]. Not
    frozen (arrays are not hashable), but never changed after construction."""

    def __init__(self, arrays: Union[np.ndarray, Mapping[str, np.ndarray]], input_name: Optional[str] = None,
                 batch_size: int = DEFAULT_CALIB_BATCH_SIZE, labels: Optional[np.ndarray] = None) -> None:
        if isinstance(arrays, np.ndarray):
            if input_name is None:
                raise ConfigError("an array source of one array needs the model's input name")
            arrays = {input_name: arrays}
        self.arrays: Dict[str, np.ndarray] = {k: np.asarray(v) for k, v in arrays.items()}
        lengths = {len(v) for v in self.arrays.values()}
        if len(lengths) != 1:
            raise DataError(f"arrays of different lengths: {sorted(lengths)}")
        self.n = lengths.pop()
        if self.n == 0:
            raise DataError("the data arrays are empty")
        if labels is not None and len(labels) != self.n:
            raise DataError(f"{len(labels)} labels for {self.n} samples")
        if batch_size < 1:
            raise ConfigError(f"batch_size must be positive, got {batch_size}")
        self.batch_size = batch_size
        self.label_array = None if labels is None else np.asarray(labels)

    def __len__(self) -> int:
        return self.n

    def reader(self, start: int = 0, stop: Optional[int] = None) -> "ArraySliceReader":
        return ArraySliceReader(self, start, self.n if stop is None else min(stop, self.n))

    def labels(self) -> np.ndarray:
        if self.label_array is None:
            raise DataError("this array source has no labels")
        return self.label_array


class ArraySliceReader:
    """get_next() / next_labeled() over samples [start, stop) of an ArraySource."""

    def __init__(self, source: ArraySource, start: int, stop: int) -> None:
        self.source, self.start, self.stop, self.pos = source, start, stop, start
        self.batch_size = source.batch_size
        self.skipped: List[str] = []

    def __len__(self) -> int:
        return (self.stop - self.start + self.batch_size - 1) // self.batch_size

    def rewind(self) -> None:
        self.pos = self.start

    def get_next(self) -> Optional[Dict[str, np.ndarray]]:
        if self.pos >= self.stop:
            return None
        end = min(self.pos + self.batch_size, self.stop)
        feed = {k: np.ascontiguousarray(v[self.pos:end]) for k, v in self.source.arrays.items()}
        self.pos = end
        return feed

    def next_labeled(self) -> Optional[Tuple[np.ndarray, np.ndarray]]:
        if len(self.source.arrays) != 1:
            raise DataError("labelled evaluation needs a one-input model")
        start = self.pos
        feed = self.get_next()
        if feed is None:
            return None
        return next(iter(feed.values())), self.source.labels()[start:self.pos]


DataSource = Union[ImageFolderSource, ArraySource]


def shard_ranges(samples: int, batch_size: int, shards: int) -> List[Tuple[int, int]]:
    """[start, stop) sample ranges of at most ``shards`` contiguous shards, each a whole
    number of batches (the last may end in the short last batch), as even as batches allow."""
    if isinstance(shards, bool) or not isinstance(shards, int) or shards < 1:
        raise ConfigError(f"shards must be a positive integer, got {shards!r}")
    batches = (samples + batch_size - 1) // batch_size
    shards = min(shards, max(1, batches))
    bounds = [round(i * batches / shards) for i in range(shards + 1)]
    return [(bounds[i] * batch_size, min(bounds[i + 1] * batch_size, samples)) for i in range(shards)
            if bounds[i + 1] > bounds[i]]


def image_folder_source(folder: "os.PathLike[str] | str", input_name: str, preprocess: Preprocess,
                        batch_size: int = DEFAULT_CALIB_BATCH_SIZE, labels_file=None,
                        limit: Optional[int] = None) -> ImageFolderSource:
    """An ImageFolderSource with absolute paths (a worker may start in another folder)."""
    return ImageFolderSource(os.path.abspath(folder), input_name, preprocess, batch_size,
                             None if labels_file is None else os.path.abspath(labels_file), limit)


def describe_source(source: DataSource) -> Dict[str, object]:
    """What identifies a source's data (an experiment records it to notice a change)."""
    if isinstance(source, ImageFolderSource):
        return {"folder": source.folder, "limit": source.limit, "labels": source.labels_file,
                "preprocess": repr(source.preprocess), "batch_size": source.batch_size}
    digest = {k: [list(v.shape), str(v.dtype), float(np.asarray(v, np.float64).sum())]
              for k, v in source.arrays.items()}
    return {"arrays": digest, "batch_size": source.batch_size,
            "labels": None if source.label_array is None else int(np.asarray(source.label_array).sum())}
