"""What a run reports: metrics.jsonl, PNG charts and a progress line.

metrics.jsonl holds one JSON object per logged step: `step`, `train_loss`, `lr`, `tokens_per_s`,
`tokens_seen`, `elapsed_s`, `ts`, and at evaluations `val_loss` and `val_ppl`. It is the source
the charts are drawn from, so a resumed run's charts cover the whole run.
"""

from __future__ import annotations

import io
import json
import math
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from aimass_common.files import atomic_write


class MetricsLog:
    def __init__(self, path: Path):
        self.path = path

    def truncate_after(self, step: int) -> None:
        """Drops lines logged after `step`: a resumed run re-logs what followed its checkpoint."""
        if not self.path.exists():
            return
        kept = [line for line in self.read() if line["step"] <= step]
        atomic_write(self.path, "".join(json.dumps(line) + "\n" for line in kept))

    def write(self, record: dict[str, Any]) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    def read(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        return [
            json.loads(line) for line in self.path.read_text(encoding="utf-8").splitlines() if line
        ]


def draw_charts(records: list[dict[str, Any]], out_dir: Path) -> list[Path]:
    """loss.png (train and validation), lr.png and throughput.png from the metric records."""
    if not records:
        return []
    import matplotlib  # deferred: matplotlib takes a second to import, and only charts need it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # matplotlib: after choosing the backend

    def series(key):
        pts = [
            (r["step"], r[key]) for r in records if r.get(key) is not None and math.isfinite(r[key])
        ]
        return [p[0] for p in pts], [p[1] for p in pts]

    charts = [
        ("loss.png", "loss", [("train_loss", "train"), ("val_loss", "validation")]),
        ("lr.png", "learning rate", [("lr", "lr")]),
        ("throughput.png", "tokens/s", [("tokens_per_s", "tokens/s")]),
    ]
    written = []
    for name, ylabel, keys in charts:
        fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
        for key, label in keys:
            xs, ys = series(key)
            if xs:
                ax.plot(
                    xs, ys, marker="o" if key == "val_loss" else None, markersize=3, label=label
                )
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        if len(keys) > 1:
            ax.legend()
        fig.tight_layout()
        png = io.BytesIO()
        fig.savefig(png, format="png")
        plt.close(fig)
        atomic_write(out_dir / name, png.getvalue())
        written.append(out_dir / name)
    return written


class Progress:
    """One status line: step, loss, tokens/s and ETA. Redrawn in place on a terminal; on a pipe
    (CI logs) printed only every `plain_every` updates so logs stay readable."""

    def __init__(
        self, total: int, start: int = 0, stream: TextIO = sys.stderr, plain_every: int = 10
    ):
        self.total, self.start = total, start
        self.stream = stream
        self.tty = stream.isatty()
        self.plain_every = plain_every
        self.updates = 0
        self.t0 = time.perf_counter()

    def update(self, step: int, loss: float, tokens_per_s: float, extra: str = "") -> None:
        self.updates += 1
        done = step - self.start
        elapsed = time.perf_counter() - self.t0
        eta = elapsed / done * (self.total - step) if done > 0 else float("nan")
        width = 24
        filled = int(width * step / max(self.total, 1))
        line = (
            f"[{'#' * filled}{'.' * (width - filled)}] step {step}/{self.total} "
            f"loss {loss:.4f} {tokens_per_s:,.0f} tok/s ETA {_fmt_seconds(eta)}{extra}"
        )
        if self.tty:
            self.stream.write("\r" + line.ljust(100))
        elif self.updates % self.plain_every == 0 or extra or step == self.total:
            self.stream.write(line + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()


def _fmt_seconds(s: float) -> str:
    if not math.isfinite(s):
        return "--:--"
    s = int(s)
    return (
        f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"
    )
