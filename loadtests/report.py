"""A run's report: report.json (what a registry version's `reports.load_test` holds), three PNG
charts and report.html, which embeds them (no file or network fetch needed to read it)."""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path

from loadtests.metrics import __doc__ as DEFINITIONS

CHARTS = ("latency", "throughput", "errors")


def write(report: dict, out: Path) -> dict[str, Path]:
    """Writes report.json, the charts and report.html into `out`; returns them by name."""
    out.mkdir(parents=True, exist_ok=True)
    files = {"json": out / "report.json"}
    files["json"].write_text(json.dumps(report, indent=2) + "\n")
    files |= draw(report["timeseries"], out, title=_title(report))
    files["html"] = out / "report.html"
    files["html"].write_text(render_html(report, {k: files[k] for k in CHARTS}))
    return files


def _title(report: dict) -> str:
    return (
        f"{report['scenario']} at {report['offered_rate']:g} req/s on {', '.join(report['models'])}"
    )


def draw(rows: list[dict], out: Path, title: str) -> dict[str, Path]:
    """latency.png (TTFT, ITL and E2E percentiles per bucket), throughput.png (req/s and
    output tokens/s) and errors.png (failed and succeeded requests per bucket)."""
    import matplotlib  # deferred: matplotlib (~0.3 s), only when a report is drawn

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # deferred: matplotlib, as above

    t = [r["t_s"] for r in rows]

    def series(key: str) -> list[float]:
        return [float("nan") if r[key] is None else r[key] for r in rows]

    paths = {name: out / f"{name}.png" for name in CHARTS}

    fig, axes = plt.subplots(3, 1, figsize=(9, 8), sharex=True)
    for ax, metric, label in zip(axes, ("ttft", "itl", "e2e"), ("TTFT", "ITL", "E2E"), strict=True):
        ax.plot(t, series(f"{metric}_p50_ms"), marker=".", label=f"{label} p50")
        ax.plot(t, series(f"{metric}_p95_ms"), marker=".", label=f"{label} p95")
        ax.set_ylabel("ms")
        ax.legend(loc="upper left")
        ax.grid(alpha=0.3)
    axes[0].set_title(f"Latency percentiles by send time: {title}")
    axes[-1].set_xlabel("seconds into the run")
    fig.tight_layout()
    fig.savefig(paths["latency"], dpi=90)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(9, 3.5))
    ax.plot(t, [r["rps"] for r in rows], marker=".", color="tab:blue", label="requests/s")
    ax.set_ylabel("successful requests/s")
    other = ax.twinx()
    other.plot(t, [r["output_tokens_per_s"] for r in rows], marker=".", color="tab:green",
               label="output tokens/s")  # fmt: skip
    other.set_ylabel("output tokens/s")
    ax.set_title(f"Throughput by end time: {title}")
    ax.set_xlabel("seconds into the run")
    lines = ax.get_lines() + other.get_lines()
    ax.legend(lines, [line.get_label() for line in lines], loc="upper left")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(paths["throughput"], dpi=90)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(9, 3))
    width = (t[1] - t[0]) * 0.8 if len(t) > 1 else 0.8
    ax.bar(t, [r["succeeded"] for r in rows], width=width, color="tab:blue", label="succeeded")
    ax.bar(t, [r["failed"] for r in rows], width=width, bottom=[r["succeeded"] for r in rows],
           color="tab:red", label="failed")  # fmt: skip
    ax.set_ylabel("requests ended")
    ax.set_xlabel("seconds into the run")
    ax.set_title(f"Errors by end time: {title}")
    ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(paths["errors"], dpi=90)
    plt.close(fig)
    return paths


def _data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def render_html(report: dict, charts: dict[str, Path]) -> str:
    """One self-contained page: verdict, SLO checks, figures, charts, errors, definitions.
    Every value from the run is escaped (model names and error messages come from outside)."""
    e = html.escape
    s = report["summary"]
    verdict = "PASSED" if report["passed"] else "FAILED"
    checks = "".join(
        f"<tr class={'ok' if c['passed'] else 'bad'}><td>{e(c['name'])}</td>"
        f"<td>{e(str(c['value']))}</td><td>{e(str(c['limit']))}</td>"
        f"<td>{'met' if c['passed'] else 'VIOLATED'}</td></tr>"
        for c in report["checks"]
    )
    dist_rows = "".join(
        f"<tr><td>{e(name)}</td>"
        + "".join(f"<td>{e(str(s[key][col]))}</td>" for col in ("count", "p50", "p90", "p95", "p99", "max"))
        + "</tr>"
        for name, key in (("TTFT ms", "ttft_ms"), ("ITL ms", "itl_ms"), ("E2E ms", "e2e_ms"),
                          ("decode tokens/s per request", "decode_tokens_per_s"))
    )  # fmt: skip
    errors = "".join(f"<tr><td>{n}</td><td>{e(msg)}</td></tr>" for msg, n in s["errors"].items())
    figures = (
        ("host", report["host"]), ("scenario", report["scenario"]),
        ("models", ", ".join(report["models"])), ("offered rate (req/s)", report["offered_rate"]),
        ("users", report["users"]), ("requests sent / offered", f"{s['requests']} / {report['offered_requests']}"),
        ("succeeded", s["succeeded"]), ("failed", s["failed"]), ("error rate", s["error_rate"]),
        ("window (s)", s["duration_s"]), ("successful req/s", s["rps"]),
        ("output tokens/s", s["output_tokens_per_s"]), ("started", report["started_at"]),
    )  # fmt: skip
    facts = "".join(f"<tr><th>{e(k)}</th><td>{e(str(v))}</td></tr>" for k, v in figures)
    images = "".join(
        f'<img alt="{e(name)} chart" src="{_data_uri(path)}">' for name, path in charts.items()
    )
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Load test: {e(verdict)}</title>
<style>
body{{font-family:system-ui,sans-serif;margin:2rem;max-width:60rem;color:#222}}
table{{border-collapse:collapse;margin:.5rem 0 1.5rem}}td,th{{border:1px solid #ccc;padding:.25rem .6rem;text-align:left}}
.ok td:last-child{{color:#176117}}.bad td{{color:#a31515;font-weight:600}}
.verdict{{font-size:1.4rem;font-weight:700;color:{"#176117" if report["passed"] else "#a31515"}}}
img{{max-width:100%;display:block;margin:1rem 0}}pre{{white-space:pre-wrap;background:#f6f6f6;padding:1rem}}
</style></head><body>
<h1>Load test</h1>
<p class="verdict">{e(verdict)}</p>
<table>{facts}</table>
<h2>SLO</h2>
<table><tr><th>threshold</th><th>value</th><th>limit</th><th></th></tr>{checks}</table>
<h2>Distributions</h2>
<table><tr><th></th><th>count</th><th>p50</th><th>p90</th><th>p95</th><th>p99</th><th>max</th></tr>{dist_rows}</table>
<h2>Over time</h2>
{images}
<h2>Errors</h2>
<table><tr><th>count</th><th>error</th></tr>{errors or "<tr><td>0</td><td>none</td></tr>"}</table>
<h2>Definitions</h2>
<pre>{e(DEFINITIONS or "")}</pre>
</body></html>
"""
