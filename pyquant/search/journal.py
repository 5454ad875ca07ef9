"""The experiment folder: what was asked (experiment.json), what finished (journal.jsonl,
one JSON line per trial) and each trial's model (trials/ID.onnx).

Resuming: rerunning the same command reads the journal and runs only the trials that have
no line. A line is appended in one write(2) on a file opened with O_APPEND and synced, after
the trial's model is in place, so an interruption leaves whole lines (at worst a last line
cut short by a crash, which is ignored and its trial run again). A changed model, data,
space, objective or constraint is refused: the folder's results would mix two experiments.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Dict, List, Mapping

from onnx import ModelProto

from ..errors import ConfigError, OutputError
from ..graph.model_io import load_model, save_model, write_text_atomic

log = logging.getLogger(__name__)

EXPERIMENT_FILE = "experiment.json"
JOURNAL_FILE = "journal.jsonl"
TRIALS_FOLDER = "trials"


class Experiment:
    def __init__(self, folder: "os.PathLike[str] | str") -> None:
        self.folder = Path(folder)
        if self.folder.exists() and not self.folder.is_dir():
            raise OutputError(f"experiment path is not a folder: {self.folder}")
        try:
            (self.folder / TRIALS_FOLDER).mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise OutputError(f"cannot create experiment folder {self.folder}: {e.strerror or e}") from None

    def start(self, description: Mapping[str, Any]) -> bool:
        """Record ``description``, or check it against the recorded one. True if resuming."""
        path = self.folder / EXPERIMENT_FILE
        text = json.dumps(description, indent=2, sort_keys=True) + "\n"
        if not path.exists():
            write_text_atomic(path, text)
            return False
        try:
            recorded = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            raise ConfigError(f"{path} is unreadable ({e}): use a new --experiment folder") from None
        current = json.loads(text)
        changed = sorted(k for k in set(recorded) | set(current) if recorded.get(k) != current.get(k))
        if changed:
            raise ConfigError(f"experiment {self.folder} was started with a different {', '.join(changed)}; "
                              "rerun it as it was, or use a new --experiment folder")
        return True

    def finished(self) -> Dict[str, Dict[str, Any]]:
        """trial id -> record of every whole line of the journal."""
        path = self.folder / JOURNAL_FILE
        records: Dict[str, Dict[str, Any]] = {}
        if not path.exists():
            return records
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(keepends=True), 1):
            try:
                if not line.endswith("\n"):
                    raise ValueError("no end of line")
                record = json.loads(line)
            except ValueError:
                log.warning("%s line %d is incomplete (an interrupted write): its trial runs again", path, number)
                continue
            if record.get("error") is None and not self.model_path(record["trial_id"]).exists():
                log.warning("trial %s has no model in %s: it runs again", record["trial_id"], self.folder)
                continue
            records[record["trial_id"]] = record
        return records

    def model_path(self, trial_id: str) -> Path:
        return self.folder / TRIALS_FOLDER / f"{trial_id}.onnx"

    def record(self, record: Mapping[str, Any], model: ModelProto = None) -> None:
        """The trial's model (atomically), then its journal line (one appended write)."""
        if model is not None:
            save_model(model, self.model_path(record["trial_id"]))
        line = (json.dumps(record, sort_keys=True) + "\n").encode("utf-8")
        fd = os.open(self.folder / JOURNAL_FILE, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            size = os.fstat(fd).st_size
            if size and os.pread(fd, 1, size - 1) != b"\n":  # after a line cut short: start a new one
                line = b"\n" + line
            os.write(fd, line)
            os.fsync(fd)
        finally:
            os.close(fd)

    def load_model(self, trial_id: str) -> ModelProto:
        return load_model(self.model_path(trial_id))

    def records_in_order(self, trial_ids: List[str]) -> List[Dict[str, Any]]:
        finished = self.finished()
        return [finished[t] for t in trial_ids if t in finished]
