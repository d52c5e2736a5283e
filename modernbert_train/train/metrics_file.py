"""The run's metrics.jsonl (contract 5 in docs/CONTRACTS.md) and its one writer.

Every line is a JSON object with a "step". Step records (one per optimizer step, from MetricsJsonl), live
evaluation records and event records ({"event": ...}: spike-guard skips and rollbacks) all go through
`MetricsFile.append` on rank 0, so there is one place that knows the file's rules:
- a resume cuts step records back to the checkpoint's step (no step appears twice);
- event records are never cut: a rollback to an earlier step keeps the record of every rollback before it.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

METRICS_FILE = "metrics.jsonl"


class MetricsFile:
    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def append(self, record: dict[str, Any], *, unique: bool = False) -> None:
        """Append one record (rank 0 only: callers check). Non-finite floats become null (valid JSON).
        `unique`: skip a record already in the file (an event re-announced after a restart)."""
        record = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        line = json.dumps(record)
        if unique and self.path.is_file() and line in self.path.read_text().splitlines():
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as f:
            f.write(line + "\n")

    def truncate_after(self, last_step: int) -> None:
        """Drop step and evaluation records past `last_step` (work after the checkpoint we resume from); keep
        every event record and drop lines cut short by a kill mid-write."""
        if not self.path.is_file():
            return
        kept = []
        for line in self.path.read_text().splitlines():
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                step = int(record["step"])
            except (ValueError, KeyError, TypeError):
                continue
            if step <= last_step or "event" in record:
                kept.append(line)
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, self.path)
