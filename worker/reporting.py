"""A running job's events, written to the control-plane database for list_events and the live
stream: its log lines, a metric point per logged step (read from the run's metrics.jsonl as the
trainer appends it) and a row per checkpoint the trainer writes. Buffered and written at most
every `every_s`, so a fast model's steps do not each cost a transaction."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from controlplane import jobs
from controlplane.db import Database


class Reporter:
    def __init__(self, db: Database, job_id: str, every_s: float = 0.5):
        self.db, self.job_id, self.every_s = db, job_id, every_s
        with db.session() as s:
            self.last_step = jobs.last_metrics_step(s, job_id)  # a resumed run repeats none
        self._messages: list[tuple[str, str]] = []
        self._points: list[dict[str, Any]] = []
        self._checkpoints: list[tuple[int, dict[str, Any]]] = []
        self._offset = 0
        self._checkpoint: Path | None = None
        self._written = time.monotonic()

    def message(self, text: str, level: str = "info") -> None:
        self._messages.append((level, text))
        self._maybe_flush()

    def on_step(self, trainer) -> None:
        """The trainer's on_step hook: new metric lines, and a new checkpoint if one was written."""
        self._read_metrics(trainer.metrics.path, trainer.cfg.max_steps)
        latest = trainer.run_dir / "checkpoint"
        target = latest.resolve() if latest.exists() else None
        if target is not None and target != self._checkpoint:
            self._checkpoint = target
            point = next((p for p in reversed(self._points) if p["step"] == trainer.step), {})
            self._checkpoints.append((trainer.step, point))
        self._maybe_flush()

    def _read_metrics(self, path: Path, total_steps: int) -> None:
        if not path.exists():
            return
        if path.stat().st_size < self._offset:
            self._offset = 0  # a resume truncated it
        with open(path, encoding="utf-8") as f:
            f.seek(self._offset)
            lines = f.readlines()
            if lines and not lines[-1].endswith("\n"):
                lines.pop()  # half-written: read it next time
            self._offset += sum(len(line.encode()) for line in lines)
        for line in lines:
            record = json.loads(line)
            if record["step"] <= self.last_step:
                continue
            self.last_step = record["step"]
            self._points.append(_point(record, total_steps))

    def _maybe_flush(self) -> None:
        if time.monotonic() - self._written >= self.every_s:
            self.flush()

    def flush(self) -> None:
        messages, points, checkpoints = self._messages, self._points, self._checkpoints
        if not (messages or points or checkpoints):
            return
        with self.db.session() as s:
            for level, text in messages:
                jobs.add_event(s, self.job_id, text, level=level)
            for point in points:
                jobs.add_event(s, self.job_id, _describe(point), data=point)
            for step, metrics in checkpoints:
                jobs.add_checkpoint(s, self.job_id, step, metrics)
        self._messages, self._points, self._checkpoints = [], [], []
        self._written = time.monotonic()


def _point(record: dict[str, Any], total_steps: int) -> dict[str, Any]:
    point = {"step": record["step"], "total_steps": total_steps,
             "train_loss": record["train_loss"], "lr": record["lr"],
             "tokens_per_s": record["tokens_per_s"]}  # fmt: skip
    if record.get("val_loss") is not None:
        point["valid_loss"] = record["val_loss"]
    return point


def _describe(point: dict[str, Any]) -> str:
    text = f"step {point['step']}/{point['total_steps']}: training loss {point['train_loss']:.4f}"
    if "valid_loss" in point:
        text += f", validation loss {point['valid_loss']:.4f}"
    return text + f", lr {point['lr']:.3g}, {point['tokens_per_s']:.0f} tokens/s"
