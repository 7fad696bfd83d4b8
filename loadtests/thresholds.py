"""SLO thresholds (loadtests/slo/*.json) and their check against a run's figures.

A threshold left out (or null) is not checked. Every check names the figure, its value and the
limit, so a violation reads as the reason the run failed.
"""

from __future__ import annotations

from pathlib import Path

import msgspec

DEFAULT = Path(__file__).resolve().parent / "slo" / "default.json"


class SLO(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    max_p95_ttft_ms: float | None = None  # p95 time to first token of the successful requests
    max_p95_itl_ms: float | None = None  # p95 gap between content chunks
    max_error_rate: float | None = None  # failed / ended, 0..1
    min_output_tokens_per_s: float | None = None  # the run's output tokens over its window
    # the requests sent over those the profile offers: below it the users or the server could
    # not keep up with the rate, and the latencies describe a lighter load than the one asked for
    min_sent_fraction: float | None = 0.9
    min_requests: int = 1  # fewer ended requests than this prove nothing: a violation


class Check(msgspec.Struct, kw_only=True):
    name: str  # the threshold, as in the SLO file
    value: float | int | None  # the run's figure; None when it has none (no successes)
    limit: float | int
    passed: bool

    def describe(self) -> str:
        op = "<=" if self.name.startswith("max_") else ">="
        return f"{self.name}: {self.value} (must be {op} {self.limit:g})"


def load(path: str | Path = DEFAULT) -> SLO:
    """Raises ValueError naming the file and the bad field."""
    try:
        slo = msgspec.json.decode(Path(path).read_bytes(), type=SLO)
    except OSError as e:
        raise ValueError(f"SLO file {path}: {e.strerror}") from None
    except msgspec.DecodeError as e:
        raise ValueError(f"SLO file {path}: {e}") from None
    for field in SLO.__struct_fields__:
        value = getattr(slo, field)
        if value is not None and value < 0:
            raise ValueError(f"SLO file {path}: {field}={value} must be >= 0")
    return slo


def check(slo: SLO, summary: dict, sent_fraction: float) -> list[Check]:
    """Each threshold the SLO sets, against the run's summary (metrics.summarize)."""
    figures = {
        "max_p95_ttft_ms": summary["ttft_ms"]["p95"],
        "max_p95_itl_ms": summary["itl_ms"]["p95"],
        "max_error_rate": summary["error_rate"],
        "min_output_tokens_per_s": summary["output_tokens_per_s"],
        "min_sent_fraction": round(sent_fraction, 4),
        "min_requests": summary["requests"],
    }
    checks = []
    for name, value in figures.items():
        limit = getattr(slo, name)
        if limit is None:
            continue
        if value is None:
            passed = False
        elif name.startswith("max_"):
            passed = value <= limit
        else:
            passed = value >= limit
        checks.append(Check(name=name, value=value, limit=limit, passed=passed))
    return checks
