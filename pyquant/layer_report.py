"""Per-tensor comparisons of one network run several ways, for people: where error enters
and where it grows. Used by the sensitivity analysis (float vs quantized, one layer at a
time) and by the NPU target (float vs onnxruntime's CPU QDQ vs the NPU emulator), so both
print the same table and write the same self-contained HTML.

The statistics are sums (signal, noise, products) that merge across batches and across
workers, so a report over a large set holds one ``ErrorStats`` per tensor and series,
never the tensors themselves. Plots need matplotlib (``pip install 'pyquant[report]'``);
the terminal table and the JSON do not.
"""
from __future__ import annotations

import base64
import dataclasses
import html
import io
import json
import math
import os
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import numpy as np
from onnx import ModelProto

from .errors import ConfigError, DataError
from .graph.model_io import write_text_atomic
from .graph.view import node_name
from .runtime import Feed, make_session

# A way to run the network: a feed in, the values of the tensors it knows out.
TensorSource = Callable[[Feed], Mapping[str, np.ndarray]]
# Metrics where a larger number is a worse result (the others: SQNR, cosine).
HIGHER_IS_WORSE = frozenset({"rmse", "max_abs_error", "kl", "kl_divergence"})


@dataclasses.dataclass
class ErrorStats:
    """Error of a test tensor against a reference over any number of batches, as sums in
    float64 (mergeable: ``a.merge(b)`` equals one pass over both sets)."""

    count: int = 0
    signal: float = 0.0  # sum ref^2
    noise: float = 0.0  # sum (test - ref)^2
    dot: float = 0.0  # sum ref * test
    test_energy: float = 0.0  # sum test^2
    max_abs_error: float = 0.0

    def update(self, reference: np.ndarray, test: np.ndarray) -> "ErrorStats":
        ref = np.asarray(reference, dtype=np.float64)
        got = np.asarray(test, dtype=np.float64)
        if ref.shape != got.shape:
            raise DataError(f"cannot compare a tensor of shape {got.shape} with its reference of shape {ref.shape}")
        diff = got - ref
        self.count += ref.size
        self.signal += float(np.sum(ref * ref))
        self.noise += float(np.sum(diff * diff))
        self.dot += float(np.sum(ref * got))
        self.test_energy += float(np.sum(got * got))
        if diff.size:
            self.max_abs_error = max(self.max_abs_error, float(np.max(np.abs(diff))))
        return self

    def merge(self, other: "ErrorStats") -> "ErrorStats":
        return ErrorStats(self.count + other.count, self.signal + other.signal, self.noise + other.noise,
                          self.dot + other.dot, self.test_energy + other.test_energy,
                          max(self.max_abs_error, other.max_abs_error))

    @property
    def sqnr_db(self) -> float:
        """10 log10(signal / noise); +inf when identical, nan for an all-zero reference."""
        if self.noise == 0.0:
            return math.inf if self.signal > 0 or self.count else math.nan
        if self.signal == 0.0:
            return -math.inf
        return 10.0 * math.log10(self.signal / self.noise)

    @property
    def cosine(self) -> float:
        norm = math.sqrt(self.signal * self.test_energy)
        if norm == 0.0:
            return 1.0 if self.signal == self.test_energy else 0.0
        return self.dot / norm

    @property
    def rmse(self) -> float:
        return math.sqrt(self.noise / self.count) if self.count else 0.0

    def metrics(self) -> Dict[str, float]:
        return {"sqnr_db": self.sqnr_db, "cosine": self.cosine, "rmse": self.rmse,
                "max_abs_error": self.max_abs_error}


@dataclasses.dataclass
class LayerRow:
    """One tensor of the network: where it is (position in topological order, producing
    node) and, per series (e.g. "cpu", "npu-sim", "only this layer quantized"), its error."""

    tensor: str
    node: str
    op_type: str
    position: int
    errors: Dict[str, ErrorStats] = dataclasses.field(default_factory=dict)
    values: Dict[str, float] = dataclasses.field(default_factory=dict)  # other numbers (e.g. KL, pos moved)
    notes: List[str] = dataclasses.field(default_factory=list)

    def metric(self, series: str, name: str = "sqnr_db") -> float:
        """``name`` (an ErrorStats property) of ``series``; nan if the row lacks the series."""
        stats = self.errors.get(series)
        return getattr(stats, name) if stats is not None else math.nan


@dataclasses.dataclass
class Figure:
    title: str
    png: bytes
    caption: str = ""


@dataclasses.dataclass
class LayerReport:
    title: str
    rows: List[LayerRow]
    series: List[str]  # the error series, in display order
    summary: List[str] = dataclasses.field(default_factory=list)  # lines shown above the table

    def row(self, tensor: str) -> LayerRow:
        for r in self.rows:
            if r.tensor == tensor:
                return r
        raise KeyError(tensor)

    def ranked(self, series: str, metric: str = "sqnr_db") -> List[LayerRow]:
        """Worst first: lowest SQNR / cosine, highest error; rows without the series last.
        ``series=""`` ranks by ``row.values[metric]`` (e.g. a KL computed elsewhere)."""
        worse_is_higher = metric in HIGHER_IS_WORSE

        def key(r: LayerRow) -> Tuple[int, float]:
            v = r.metric(series, metric) if series else r.values.get(metric, math.nan)
            if math.isnan(v):
                return (1, 0.0)
            return (0, -v if worse_is_higher else v)
        return sorted(self.rows, key=key)

    def first_divergence(self, series: str, min_sqnr_db: float) -> Optional[LayerRow]:
        """The first tensor in network order whose SQNR under ``series`` is below the bound."""
        for r in sorted(self.rows, key=lambda r: r.position):
            if r.metric(series) < min_sqnr_db:
                return r
        return None

    # ---- output -------------------------------------------------------------------------

    def to_text(self, sort_by: Optional[str] = None, limit: Optional[int] = 20,
                metrics: Sequence[str] = ("sqnr_db", "cosine")) -> str:
        rows = self.ranked(sort_by) if sort_by else sorted(self.rows, key=lambda r: r.position)
        if limit is not None:
            rows = rows[:limit]
        extra = sorted({k for r in self.rows for k in r.values})
        header = ["#", "tensor", "op"] + [f"{s} {m}" for s in self.series for m in metrics] + extra + ["notes"]
        table = [header]
        for r in rows:
            cells = [str(r.position), _shorten(r.tensor, 40), r.op_type]
            cells += [_fmt(r.metric(s, m)) for s in self.series for m in metrics]
            cells += [_fmt(r.values.get(k, math.nan)) for k in extra]
            cells.append("; ".join(r.notes))
            table.append(cells)
        widths = [max(len(row[i]) for row in table) for i in range(len(header))]
        lines = [self.title] + self.summary
        for i, row in enumerate(table):
            lines.append("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())
            if i == 0:
                lines.append("  ".join("-" * w for w in widths))
        return "\n".join(lines)

    def as_dict(self) -> Dict[str, Any]:
        return {"title": self.title, "series": self.series, "summary": self.summary,
                "rows": [{"tensor": r.tensor, "node": r.node, "op_type": r.op_type, "position": r.position,
                          "errors": {s: _finite(e.metrics()) for s, e in r.errors.items()},
                          "values": _finite(r.values), "notes": r.notes} for r in self.rows]}

    def write_json(self, path: "os.PathLike[str] | str") -> None:
        write_text_atomic(path, json.dumps(self.as_dict(), indent=2) + "\n")

    def write_html(self, path: "os.PathLike[str] | str", figures: Sequence[Figure] = (),
                   sort_by: Optional[str] = None, appendix: Sequence["LayerReport"] = ()) -> None:
        """One self-contained file: the summary, the figures as embedded PNGs, the table;
        then each report of ``appendix`` (its title, summary and table)."""
        parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(self.title)}</title>",
                 "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;font-size:13px}"
                 "td,th{border:1px solid #ccc;padding:2px 6px;text-align:right}td.l{text-align:left}"
                 "img{max-width:100%}figure{margin:1em 0}</style></head><body>",
                 f"<h1>{html.escape(self.title)}</h1>"]
        parts += [f"<p>{html.escape(line)}</p>" for line in self.summary]
        parts += [figure_html(fig) for fig in figures]
        parts.append(self._html_table(sort_by))
        for report in appendix:
            parts.append(f"<h2>{html.escape(report.title)}</h2>")
            parts += [f"<p>{html.escape(line)}</p>" for line in report.summary]
            parts.append(report._html_table(None))
        parts.append("</body></html>\n")
        write_text_atomic(path, "".join(parts))

    def _html_table(self, sort_by: Optional[str]) -> str:
        rows = self.ranked(sort_by) if sort_by else sorted(self.rows, key=lambda r: r.position)
        extra = sorted({k for r in self.rows for k in r.values})
        head = ["#", "tensor", "node", "op"] + [f"{s} SQNR dB" for s in self.series] + \
            [f"{s} cosine" for s in self.series] + extra + ["notes"]
        parts = ["<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr>"]
        for r in rows:
            cells = [f"<td>{r.position}</td>"]
            cells += [f"<td class='l'>{html.escape(x)}</td>" for x in (r.tensor, r.node, r.op_type)]
            cells += [f"<td>{_fmt(r.metric(s))}</td>" for s in self.series]
            cells += [f"<td>{_fmt(r.metric(s, 'cosine'))}</td>" for s in self.series]
            cells += [f"<td>{_fmt(r.values.get(k, math.nan))}</td>" for k in extra]
            cells.append(f"<td class='l'>{html.escape('; '.join(r.notes))}</td>")
            parts.append("<tr>" + "".join(cells) + "</tr>")
        parts.append("</table>")
        return "".join(parts)


# ---- running networks for a comparison ------------------------------------------------------

def topological_tensors(model: ModelProto) -> List[Tuple[str, str, str]]:
    """(tensor, producing node, op type) for every float node output of the main graph, in
    node order (ONNX requires topological order)."""
    out = []
    for node in model.graph.node:
        for name in node.output:
            if name:
                out.append((name, node_name(node), node.op_type))
    return out


def onnx_source(model: ModelProto, tensors: Mapping[str, str]) -> TensorSource:
    """Runs ``model`` on onnxruntime's CPU provider and returns, for each key of ``tensors``,
    the value of the model's tensor named by the mapping's value (e.g. a float tensor's
    dequantized twin in a QDQ model)."""
    wanted = sorted(set(tensors.values()))
    present = {o for n in model.graph.node for o in n.output} | {i.name for i in model.graph.input}
    missing = [t for t in wanted if t not in present]
    if missing:
        raise ConfigError(f"the model has no tensor(s) {', '.join(missing[:5])}")
    session = make_session(model, wanted)

    def run(feed: Feed) -> Dict[str, np.ndarray]:
        values = dict(zip(wanted, session.run(wanted, feed)))
        return {key: values[name] for key, name in tensors.items()}
    return run


def compare(title: str, model: ModelProto, reference: TensorSource, candidates: Mapping[str, TensorSource],
            feeds: Iterable[Feed], tensors: Optional[Sequence[str]] = None) -> LayerReport:
    """Runs ``reference`` and each candidate on every feed and accumulates, per tensor of
    ``model`` (the float model: it names and orders the rows), the candidate's error
    against the reference. Tensors a source does not return are left out of its series."""
    order = topological_tensors(model)
    keep = set(tensors) if tensors is not None else None
    rows = {name: LayerRow(name, node, op, i) for i, (name, node, op) in enumerate(order)
            if keep is None or name in keep}
    seen = 0
    for feed in feeds:
        seen += 1
        ref = reference(feed)
        for series, source in candidates.items():
            got = source(feed)
            for name, value in got.items():
                if name in rows and name in ref:
                    rows[name].errors.setdefault(series, ErrorStats()).update(ref[name], value)
    if not seen:
        raise DataError("no batches to compare on")
    present = [r for r in rows.values() if r.errors]
    return LayerReport(title, sorted(present, key=lambda r: r.position), list(candidates))


# ---- figures (matplotlib) ---------------------------------------------------------------

def pyplot():
    """matplotlib's pyplot on the non-interactive Agg backend, or a ConfigError saying how to get it."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise ConfigError("plots in the HTML report need matplotlib: pip install 'pyquant[report]'") from e
    return plt


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    pyplot().close(fig)
    return buf.getvalue()


def figure(fig, title: str, caption: str = "") -> Figure:
    """A Figure from a matplotlib figure (which is closed): for plots made elsewhere."""
    return Figure(title, _png(fig), caption)


def figure_html(fig: Figure) -> str:
    """The figure as an HTML <figure> with its PNG embedded (the page stays one file)."""
    data = base64.b64encode(fig.png).decode("ascii")
    return (f"<figure><h3>{html.escape(fig.title)}</h3><img alt='{html.escape(fig.title)}' "
            f"src='data:image/png;base64,{data}'><figcaption>{html.escape(fig.caption)}</figcaption></figure>")


def plot_along_network(report: LayerReport, metric: str = "sqnr_db", title: str = "",
                       caption: str = "") -> Figure:
    """The metric of every series against the position of the tensor in the network."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(10, 3.5))
    for series in report.series:
        pts = [(r.position, r.metric(series, metric)) for r in report.rows]
        pts = [(x, y) for x, y in pts if math.isfinite(y)]
        if pts:
            ax.plot(*zip(*pts), marker=".", linewidth=1, label=series)
    ax.set_xlabel("tensor position in the network")
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    return Figure(title or f"{metric} along the network", _png(fig), caption or
                  "each point is one tensor; a drop marks where error enters, a downward slope where it grows")


def plot_worst_layers(report: LayerReport, series: str, metric: str = "sqnr_db", count: int = 12) -> Figure:
    """The ``count`` worst tensors under ``series`` (bars), every series beside them."""
    plt = pyplot()
    rows = [r for r in report.ranked(series, metric)[:count] if not math.isnan(r.metric(series, metric))]
    fig, ax = plt.subplots(figsize=(10, 0.35 * max(len(rows), 1) + 1.2))
    height = 0.8 / max(len(report.series), 1)
    for i, s in enumerate(report.series):
        values = [r.metric(s, metric) for r in rows]
        values = [v if math.isfinite(v) else np.nan for v in values]
        ax.barh([j + i * height for j in range(len(rows))], values, height=height, label=s)
    ax.set_yticks([j + 0.4 - height / 2 for j in range(len(rows))])
    ax.set_yticklabels([f"{_shorten(r.tensor, 36)} ({r.op_type})" for r in rows], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel(metric)
    ax.grid(alpha=0.3, axis="x")
    ax.legend(loc="best", fontsize=8)
    return Figure(f"the {len(rows)} worst tensors under {series}", _png(fig),
                  f"ranked by {metric} of {series}; each series beside (an infinite value, identical tensors, is left blank)")


def plot_histogram(tensor: str, counts: np.ndarray, edges: np.ndarray,
                   clip: Optional[Tuple[float, float]] = None) -> Figure:
    """A calibration histogram (log counts) with the chosen clipping range marked."""
    plt = pyplot()
    counts, edges = np.asarray(counts, dtype=np.float64), np.asarray(edges, dtype=np.float64)
    fig, ax = plt.subplots(figsize=(6, 2.8))
    ax.stairs(np.maximum(counts, 0.5), edges, fill=True, alpha=0.6)
    ax.set_yscale("log")
    if clip is not None:
        for x in clip:
            ax.axvline(x, color="red", linestyle="--", linewidth=1)
    ax.set_xlabel("value")
    ax.set_ylabel("count")
    caption = "" if clip is None else f"clipping range [{clip[0]:.4g}, {clip[1]:.4g}] (red)"
    return Figure(f"histogram of {tensor}", _png(fig), caption)


def plot_channel_ranges(weight: str, weights: np.ndarray, axis: int = 0) -> Figure:
    """Per-output-channel min and max of a weight: channels far outside the others are
    what a per-tensor scale pays for."""
    plt = pyplot()
    w = np.moveaxis(np.asarray(weights, dtype=np.float64), axis, 0).reshape(np.shape(weights)[axis], -1)
    fig, ax = plt.subplots(figsize=(6, 2.8))
    idx = np.arange(len(w))
    ax.vlines(idx, w.min(axis=1), w.max(axis=1), linewidth=1)
    ax.set_xlabel("output channel")
    ax.set_ylabel("weight range")
    return Figure(f"weight ranges per channel of {weight}", _png(fig), "one line per channel, min to max")


# ---- helpers -------------------------------------------------------------------------

def _fmt(v: float) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if math.isinf(v):
        return "inf" if v > 0 else "-inf"
    return f"{v:.4f}" if abs(v) < 10 else f"{v:.1f}"


def _shorten(text: str, width: int) -> str:
    return text if len(text) <= width else "..." + text[-(width - 3):]


def _finite(values: Mapping[str, float]) -> Dict[str, Optional[float]]:
    """JSON has no inf/nan: they become strings that say what they are."""
    return {k: (v if isinstance(v, (int, float)) and math.isfinite(v) else str(v)) for k, v in values.items()}
