"""infra/observability: the Grafana dashboard asks only for metrics the gateway exports
(gateway/metrics/prometheus.py), and the Prometheus configurations parse."""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

from gateway.metrics.prometheus import GatewayMetrics

ROOT = Path(__file__).resolve().parents[2]
OBSERVABILITY = ROOT / "infra" / "observability"
DASHBOARD = OBSERVABILITY / "grafana" / "dashboards" / "aimass-gateway.json"
# the series name a family exposes, by its type (Prometheus text format)
SUFFIXES = {
    "counter": ("_total",),
    "gauge": ("",),
    "histogram": ("_bucket", "_sum", "_count"),
    "summary": ("", "_sum", "_count"),
}
# words of PromQL and label names, which are not metric names
PROMQL = {"sum", "by", "rate", "histogram_quantile", "le", "max", "namespace", "model", "status",
          "endpoint", "reason", "kind", "job", "version", "pod"}  # fmt: skip


def exported_series() -> set[str]:
    names = set()
    for family in GatewayMetrics().registry.collect():
        names |= {family.name + suffix for suffix in SUFFIXES[family.type]}
    return names


def metric_names(expr: str) -> set[str]:
    """The metric names an expression selects (identifiers outside strings, braces and
    brackets, that are not PromQL words)."""
    bare = re.sub(r'"[^"]*"|\{[^}]*\}|\[[^\]]*\]', " ", expr)
    bare = re.sub(r"\b(by|without)\s*\([^)]*\)", " ", bare)
    return set(re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*", bare)) - PROMQL


def test_exported_series_are_what_the_gateway_renders():
    """The suffix table above is how prometheus_client names samples: checked on a render."""
    metrics = GatewayMetrics()
    metrics.observe_request("m", "/v1/completions", 200, 0.01)
    rendered = metrics.render()[0].decode()
    for name in ("aimass_requests_total", "aimass_request_duration_seconds_bucket",
                 "aimass_request_duration_seconds_sum", "process_cpu_seconds_total"):  # fmt: skip
        assert re.search(rf"^{name}[{{ ]", rendered, re.M), name
        assert name in exported_series()


def test_dashboard_queries_name_only_exported_metrics():
    dashboard = json.loads(DASHBOARD.read_text())
    exported = exported_series()
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    assert len(exprs) >= 10
    unknown = {(name, e) for e in exprs for name in metric_names(e) if name not in exported}
    assert not unknown, "dashboard queries name metrics the gateway does not export:\n" + (
        "\n".join(f"{n}  in  {e}" for n, e in sorted(unknown))
    )
    # every family of the gateway's own has a panel
    families = {f.name for f in GatewayMetrics().registry.collect() if f.name.startswith("aimass_")}
    used = {name for e in exprs for name in metric_names(e)}
    unshown = {f for f in families if not any(u.startswith(f) for u in used)}
    assert not unshown, f"metrics without a panel: {sorted(unshown)}"
    for variable in dashboard["templating"]["list"][1:]:
        assert metric_names(variable["definition"].replace("label_values", "")) <= exported


def test_metric_name_extraction():
    assert metric_names('sum by (le, model) (rate(aimass_x_bucket{model=~"a(b)"}[5m]))') == {
        "aimass_x_bucket"
    }
    assert metric_names("aimass_a / aimass_b") == {"aimass_a", "aimass_b"}


def test_prometheus_configs_parse():
    for name in ("prometheus.yml", "prometheus-compose.yml"):
        config = yaml.safe_load((OBSERVABILITY / name).read_text())
        jobs = [j["job_name"] for j in config["scrape_configs"]]
        assert jobs == ["aimass-gateway"], name
    compose = yaml.safe_load((OBSERVABILITY / "prometheus-compose.yml").read_text())
    assert compose["scrape_configs"][0]["static_configs"][0]["targets"] == ["gateway:8000"]
    datasource = yaml.safe_load(
        (OBSERVABILITY / "grafana" / "provisioning" / "datasources" / "prometheus.yaml").read_text()
    )["datasources"][0]
    assert datasource["url"] == "http://prometheus:9090"
