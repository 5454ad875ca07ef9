"""Calibration and evaluation data.

Readers follow onnxruntime's CalibrationDataReader protocol: ``get_next()`` returns one
feed dict ``{input_name: batch}`` or None when exhausted; ``rewind()`` starts over.
"""
from __future__ import annotations

import dataclasses
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from . import threads
from .errors import ConfigError, DataError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".webp", ".tif", ".tiff")
# Standard ImageNet evaluation resizes the shorter side to input_size / 0.875 (256 for 224).
DEFAULT_CROP_FRACTION = 0.875


@dataclasses.dataclass(frozen=True)
class Preprocess:
    """Resize the shorter side to ``resize`` (bilinear), center-crop ``input_size``, then
    x = (pixel / 255 - mean) / std per channel, RGB, in ``layout`` (NCHW or NHWC)."""

    input_size: int = 224
    resize: Optional[int] = None
    mean: Tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: Tuple[float, float, float] = (0.229, 0.224, 0.225)
    layout: str = "NCHW"

    def __post_init__(self) -> None:
        if self.input_size < 1:
            raise ConfigError(f"input_size must be positive, got {self.input_size}")
        if self.resize is not None and self.resize < self.input_size:
            raise ConfigError(f"resize ({self.resize}) must be at least input_size ({self.input_size})")
        if len(self.mean) != 3 or len(self.std) != 3 or any(s <= 0 for s in self.std):
            raise ConfigError(f"mean and std need 3 values each, std positive; got {self.mean}, {self.std}")
        if self.layout not in ("NCHW", "NHWC"):
            raise ConfigError(f"layout must be NCHW or NHWC, got {self.layout!r}")

    @property
    def resize_to(self) -> int:
        return self.resize or int(round(self.input_size / DEFAULT_CROP_FRACTION))

    def load(self, path: Path) -> np.ndarray:
        """One image as float32 [3, H, W] or [H, W, 3]. Raises OSError/ValueError if unreadable."""
        from PIL import Image

        with Image.open(path) as img:
            img = img.convert("RGB")
            w, h = img.size
            scale = self.resize_to / min(w, h)
            new_w, new_h = max(self.input_size, round(w * scale)), max(self.input_size, round(h * scale))
            img = img.resize((new_w, new_h), Image.BILINEAR)
            left, top = (new_w - self.input_size) // 2, (new_h - self.input_size) // 2
            img = img.crop((left, top, left + self.input_size, top + self.input_size))
            x = np.asarray(img, dtype=np.float32)
        x = (x / 255.0 - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
        return np.ascontiguousarray(x.transpose(2, 0, 1) if self.layout == "NCHW" else x)


def list_images(folder: os.PathLike) -> List[Path]:
    """Image files under ``folder`` (recursively), sorted; DataError if there are none."""
    root = Path(folder)
    if not root.exists():
        raise DataError(f"data folder not found: {root}")
    if not root.is_dir():
        raise DataError(f"data path is not a folder: {root}")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if not files:
        raise DataError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found in {root}")
    return files


def read_synset_mapping(path: os.PathLike) -> Dict[str, int]:
    """LOC_synset_mapping.txt: line i is 'wnid name...' for class index i."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"labels file not found: {p}")
    mapping = {}
    for i, line in enumerate(p.read_text().splitlines()):
        if line.strip():
            mapping[line.split()[0]] = i
    return mapping


def image_labels(files: Sequence[Path], root: os.PathLike, labels_file: Optional[os.PathLike]) -> List[int]:
    """Class index of each image from its class sub-folder: by the synset mapping when
    given, else by the sorted sub-folder names. -1 where an image has no class folder."""
    root = Path(root)
    folders = [f.parent.name if f.parent != root else None for f in files]
    if labels_file is not None:
        mapping = read_synset_mapping(labels_file)
        unknown = sorted({d for d in folders if d is not None and d not in mapping})
        if unknown:
            raise DataError(f"class folders not in {labels_file}: {', '.join(unknown[:5])}"
                            + (" ..." if len(unknown) > 5 else ""))
        return [mapping[d] if d is not None else -1 for d in folders]
    names = sorted({d for d in folders if d is not None})
    index = {d: i for i, d in enumerate(names)}
    return [index[d] if d is not None else -1 for d in folders]


class ImageFolderReader:
    """Batches of preprocessed images from a folder (ImageNet layout or flat).

    Images are decoded by a small thread pool (PIL releases the GIL while decoding) of
    ``workers`` threads, by default the thread budget's share for decoders (pyquant.threads).
    Unreadable images are skipped with a warning; ``skipped`` counts them.
    """

    def __init__(self, folder: os.PathLike, input_name: str, preprocess: Preprocess,
                 batch_size: int = 8, limit: Optional[int] = None,
                 labels_file: Optional[os.PathLike] = None, workers: Optional[int] = None) -> None:
        if batch_size < 1:
            raise ConfigError(f"batch_size must be positive, got {batch_size}")
        if limit is not None and limit < 1:
            raise ConfigError(f"number of images must be positive, got {limit}")
        self.folder = Path(folder)
        self.files = list_images(folder)[:limit]
        self.labels = image_labels(self.files, self.folder, labels_file)
        self.input_name = input_name
        self.preprocess = preprocess
        self.batch_size = batch_size
        self.skipped: List[Path] = []
        if workers is not None and workers < 1:
            raise ConfigError(f"workers must be positive, got {workers}")
        self.workers = workers  # None: the thread budget's decoders, read when decoding starts
        self._pool: Optional[ThreadPoolExecutor] = None
        self._pos = 0
        self._last_labels: List[int] = []

    def __len__(self) -> int:
        return (len(self.files) + self.batch_size - 1) // self.batch_size

    def rewind(self) -> None:
        self._pos = 0
        self.skipped = []

    def _load(self, path: Path) -> Optional[np.ndarray]:
        try:
            return self.preprocess.load(path)
        except Exception as e:  # PIL raises many types for corrupt files
            log.warning("skipping unreadable image %s (%s)", path, e)
            return None

    def next_labeled(self) -> Optional[Tuple[np.ndarray, np.ndarray]]:
        """The next (batch, labels), or None when done. Empty batches (all skipped) are passed over."""
        while self._pos < len(self.files):
            paths = self.files[self._pos:self._pos + self.batch_size]
            labels = self.labels[self._pos:self._pos + self.batch_size]
            self._pos += len(paths)
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=self.workers or threads.current().decoders,
                                                thread_name_prefix="pyquant-decode")
            images = list(self._pool.map(self._load, paths))
            keep = [i for i, x in enumerate(images) if x is not None]
            self.skipped.extend(p for p, x in zip(paths, images) if x is None)
            if keep:
                return np.stack([images[i] for i in keep]), np.array([labels[i] for i in keep])
        if self.skipped and len(self.skipped) == len(self.files):
            raise DataError(f"no readable image in {self.folder} ({len(self.skipped)} unreadable)")
        return None

    def get_next(self) -> Optional[Dict[str, np.ndarray]]:
        item = self.next_labeled()
        return None if item is None else {self.input_name: item[0]}


class ArrayReader:
    """Batches from an array [N, ...] (or a .npy file, or a folder of .npy batch files)
    for a model with one input."""

    def __init__(self, data, input_name: str, batch_size: int = 8, limit: Optional[int] = None) -> None:
        self.input_name = input_name
        self.batch_size = batch_size
        if isinstance(data, (str, os.PathLike)):
            data = _load_npy(Path(data))
        self.data = np.asarray(data)[:limit]
        if self.data.shape[0] == 0:
            raise DataError("calibration array is empty")
        self._pos = 0
        self.skipped: List[Path] = []

    def __len__(self) -> int:
        return (self.data.shape[0] + self.batch_size - 1) // self.batch_size

    def rewind(self) -> None:
        self._pos = 0

    def get_next(self) -> Optional[Dict[str, np.ndarray]]:
        if self._pos >= self.data.shape[0]:
            return None
        batch = self.data[self._pos:self._pos + self.batch_size]
        self._pos += self.batch_size
        return {self.input_name: np.ascontiguousarray(batch)}


def _load_npy(path: Path) -> np.ndarray:
    """A .npy file [N, ...], or a folder of .npy files each holding a batch [n, ...]."""
    files = sorted(path.glob("*.npy")) if path.is_dir() else [path]
    if not files or not files[0].is_file():
        raise DataError(f"calibration data not found: {path}" + (" (no .npy files)" if path.is_dir() else ""))
    arrays = []
    for f in files:
        try:
            arrays.append(np.load(f))
        except Exception as e:
            raise DataError(f"{f}: not a readable .npy file ({e})") from None
    shapes = {a.shape[1:] for a in arrays}
    if len(shapes) > 1:
        raise DataError(f"{path}: .npy files have different sample shapes {sorted(shapes)}")
    return np.concatenate(arrays)


def is_npy_source(path: os.PathLike) -> bool:
    p = Path(path)
    return p.suffix == ".npy" or (p.is_dir() and any(p.glob("*.npy")) and not any(
        q.suffix.lower() in IMAGE_EXTENSIONS for q in p.iterdir()))


def is_npz_source(path: os.PathLike) -> bool:
    p = Path(path)
    return p.suffix == ".npz" or (p.is_dir() and any(p.glob("*.npz")))


def _load_npz(path: Path) -> Dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as npz:
            return {k: npz[k] for k in npz.files}
    except Exception as e:
        raise DataError(f"{path}: not a readable .npz file ({e})") from None


class FeedReader:
    """Feeds for a model with any inputs (names, dtypes, ranks) from .npz data.

    A ``.npz`` file holds one array per input name, [N, ...] each, read in batches of
    ``batch_size``. A folder of ``.npz`` files holds one feed per file (sorted by name):
    an array whose rank is one less than its input's is one sample and gets a batch axis,
    so files of different sequence lengths are fine. Arrays are cast to the input's dtype
    only where that is lossless (an int64 token array read as int32, say), else DataError."""

    def __init__(self, path: os.PathLike, inputs: Dict[str, Tuple[int, np.dtype]], batch_size: int = 8,
                 limit: Optional[int] = None) -> None:
        self.path, self.inputs, self.batch_size = Path(path), inputs, batch_size
        if not self.path.exists():
            raise DataError(f"calibration data not found: {self.path}")
        self.files = sorted(self.path.glob("*.npz")) if self.path.is_dir() else [self.path]
        if not self.files:
            raise DataError(f"{self.path}: no .npz files")
        self.arrays = None if self.path.is_dir() else self._checked(_load_npz(self.path), self.path, batched=True)
        self.limit = limit
        self.skipped: List[Path] = []
        self._pos = 0

    def __len__(self) -> int:
        if self.arrays is None:
            return len(self.files) if self.limit is None else min(len(self.files), self.limit)
        n = len(next(iter(self.arrays.values())))
        n = n if self.limit is None else min(n, self.limit)
        return (n + self.batch_size - 1) // self.batch_size

    def rewind(self) -> None:
        self._pos = 0

    def _checked(self, arrays: Dict[str, np.ndarray], source: Path, batched: bool) -> Dict[str, np.ndarray]:
        missing, extra = set(self.inputs) - set(arrays), set(arrays) - set(self.inputs)
        if missing or extra:
            raise DataError(f"{source}: arrays {sorted(arrays)} do not match the model inputs {sorted(self.inputs)}")
        out = {}
        for name, value in arrays.items():
            rank, dtype = self.inputs[name]
            if not batched and value.ndim == rank - 1:
                value = value[None]
            if value.ndim != rank:
                raise DataError(f"{source}: array {name!r} has shape {value.shape}; the model input has rank {rank}")
            if value.dtype != dtype:
                if not np.can_cast(value.dtype, dtype, casting="safe") and not (
                        value.dtype.kind in "iu" and np.dtype(dtype).kind in "iu"
                        and np.array_equal(value.astype(dtype).astype(value.dtype), value)):
                    raise DataError(f"{source}: array {name!r} is {value.dtype}, the model input is {np.dtype(dtype)} "
                                    "and the conversion would lose values")
                value = value.astype(dtype)
            out[name] = np.ascontiguousarray(value)
        if batched and len({len(v) for v in out.values()}) > 1:
            raise DataError(f"{source}: arrays have different lengths {[len(v) for v in out.values()]}")
        return out

    def get_next(self) -> Optional[Dict[str, np.ndarray]]:
        if self.arrays is None:
            if self._pos >= len(self):
                return None
            path = self.files[self._pos]
            self._pos += 1
            return self._checked(_load_npz(path), path, batched=False)
        n = len(self) and len(next(iter(self.arrays.values())))
        end = n if self.limit is None else min(n, self.limit)
        if self._pos >= end:
            return None
        feed = {k: v[self._pos:min(self._pos + self.batch_size, end)] for k, v in self.arrays.items()}
        self._pos += self.batch_size
        return feed
