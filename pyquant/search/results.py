"""The results of a search, for people: a terminal table, CSV and a self-contained HTML
page with the objective plotted against each trial's cost (quantization time)."""
from __future__ import annotations

import csv
import dataclasses
import html
import io
import json
import math
from typing import Any, Dict, List, Optional

from ..graph.model_io import write_text_atomic
from ..layer_report import figure, figure_html, pyplot

COLUMNS = ("index", "trial_id", "score", "npu_legal", "feasible", "quantize_seconds", "eval_seconds", "size_mb",
           "params", "error")


@dataclasses.dataclass
class SearchResult:
    objective: str
    higher_is_better: bool
    float_score: float
    records: List[Dict[str, Any]]  # one per trial of this search, in trial order
    best: Optional[Dict[str, Any]]
    dropped: Dict[str, int]
    ran: int  # trials run by this invocation (the others came from the journal)
    seconds: float
    executor: str

    def summary(self) -> List[str]:
        """The lines above the table: objective, float model's score, trials, points not tried."""
        arrow = "higher is better" if self.higher_is_better else "lower is better"
        lines = [f"objective {self.objective} ({arrow}); float model: {_fmt(self.float_score)}",
                 f"{len(self.records)} trials ({self.ran} run now on {self.executor}, "
                 f"{len(self.records) - self.ran} from the journal) in {self.seconds:.1f} s"]
        skipped = ", ".join(f"{n} {why}" for why, n in self.dropped.items() if n)
        if skipped:
            lines.append(f"points not tried: {skipped}")
        return lines

    def to_text(self) -> str:
        lines = self.summary()
        header = ["#", "score", "NPU", "ok", "quant s", "eval s", "MB", "configuration"]
        table = [header]
        for r in self.records:
            mark = "*" if self.best is not None and r["trial_id"] == self.best["trial_id"] else ""
            table.append([f"{r['index']}{mark}", _fmt(r.get("score")), "yes" if r["npu_legal"] else "no",
                          "yes" if r.get("feasible") else ("error" if r.get("error") else "no"),
                          _fmt(r.get("quantize_seconds"), 1), _fmt(r.get("eval_seconds"), 1),
                          _fmt(r.get("size_mb"), 2), describe(r["params"]) + _why(r)])
        widths = [max(len(row[i]) for row in table) for i in range(len(header))]
        for i, row in enumerate(table):
            lines.append("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())
            if i == 0:
                lines.append("  ".join("-" * w for w in widths))
        if self.best is not None:
            lines.append(f"best (*): trial {self.best['index']}, {self.objective} {_fmt(self.best['score'])}: "
                         f"{describe(self.best['params'])}")
        else:
            lines.append("no trial met the constraints")
        return "\n".join(lines)

    def to_csv(self) -> str:
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(COLUMNS)
        for r in self.records:
            writer.writerow([json.dumps(r.get(c), sort_keys=True) if c == "params" else r.get(c, "")
                             for c in COLUMNS])
        return out.getvalue()

    def write_csv(self, path) -> None:
        write_text_atomic(path, self.to_csv())

    def plot(self):
        """The objective against quantization time, one point per trial; NPU-legal trials
        filled, the best one circled."""
        plt = pyplot()
        fig, ax = plt.subplots(figsize=(7, 4))
        for legal, style in ((True, dict(marker="o", label="NPU-legal")),
                             (False, dict(marker="s", facecolors="none", label="not NPU-legal"))):
            pts = [(r["quantize_seconds"], r["score"]) for r in self.records
                   if r.get("score") is not None and r["npu_legal"] == legal]
            if pts:
                ax.scatter(*zip(*pts), edgecolors="C0", **style)
        for r in self.records:
            if r.get("score") is not None:
                ax.annotate(str(r["index"]), (r["quantize_seconds"], r["score"]), fontsize=7,
                            xytext=(3, 3), textcoords="offset points")
        if self.best is not None:
            ax.scatter([self.best["quantize_seconds"]], [self.best["score"]], s=200, facecolors="none",
                       edgecolors="red", label="best")
        if math.isfinite(self.float_score):
            ax.axhline(self.float_score, color="gray", linestyle="--", linewidth=1, label="float model")
        ax.set_xlabel("quantization time of the trial (s)")
        ax.set_ylabel(self.objective)
        ax.grid(alpha=0.3)
        ax.legend(loc="best", fontsize=8)
        return figure(fig, f"{self.objective} against cost", "each point is a trial (its number beside it)")

    def write_html(self, path) -> None:
        head = ["#", "score", "NPU-legal", "feasible", "quantize s", "eval s", "MB", "configuration", "error"]
        rows = []
        for r in self.records:
            best = self.best is not None and r["trial_id"] == self.best["trial_id"]
            cells = [str(r["index"]) + (" (best)" if best else ""), _fmt(r.get("score")),
                     str(r["npu_legal"]), str(r.get("feasible")), _fmt(r.get("quantize_seconds"), 1),
                     _fmt(r.get("eval_seconds"), 1), _fmt(r.get("size_mb"), 2), describe(r["params"]),
                     r.get("error") or "; ".join(r.get("violations", []))]
            rows.append("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>")
        title = f"pyquant search: {self.objective}"
        page = ("<!DOCTYPE html><html><head><meta charset='utf-8'>"
                f"<title>{html.escape(title)}</title><style>body{{font-family:sans-serif;margin:2em}}"
                "table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;padding:2px 6px}"
                "img{max-width:100%}</style></head><body>"
                f"<h1>{html.escape(title)}</h1>"
                + "".join(f"<p>{html.escape(line)}</p>" for line in self.summary())
                + figure_html(self.plot())
                + "<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr>"
                + "".join(rows) + "</table></body></html>\n")
        write_text_atomic(path, page)


def describe(params: Dict[str, Any]) -> str:
    return ", ".join(f"{k}={json.dumps(v)}" for k, v in params.items())


def _why(record: Dict[str, Any]) -> str:
    if record.get("error"):
        return f"  [{record['error']}]"
    if record.get("violations"):
        return f"  [{'; '.join(record['violations'])}]"
    return ""


def _fmt(value, digits: Optional[int] = None) -> str:
    """Fixed decimals when given (times, sizes), else 5 significant digits (scores: a KL
    of 0.00012 and a top-1 of 0.882 both readable)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}f}" if digits is not None else f"{value:.5g}"
