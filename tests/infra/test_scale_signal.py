"""The signal that wakes the engine servers from zero (infra/k8s/base/engine.yaml): with none
running, a gateway answers a request for the model 503 with Retry-After and counts it under the
model's name in the two series the KEDA triggers query. (Coming back once an engine server
answers again is tests/gateway/test_lifecycle.py's.)"""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import replace
from pathlib import Path

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.gateway.conftest import (  # noqa: F401 (tiny_registry: a fixture, used by name)
    assert_openai_error,
    base_config,
    free_port,
    metric,
    running,
    tiny_registry,
)

ROOT = Path(__file__).resolve().parents[2]


def scaler_queries() -> list[str]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed: the base cannot be rendered")
    out = subprocess.run([kubectl, "kustomize", str(ROOT / "infra" / "k8s" / "base")],
                         capture_output=True, text=True, timeout=60, check=True).stdout  # fmt: skip
    scaled = next(d for d in yaml.safe_load_all(out) if d and d["kind"] == "ScaledObject")
    return [t["metadata"]["query"] for t in scaled["spec"]["triggers"]]


@pytest.mark.slow  # the tiny package is trained and exported once per session
def test_requests_for_a_model_with_no_engine_server_are_counted_under_its_name(
    tmp_path,
    tiny_registry,  # noqa: F811 (the imported fixture)
):
    queries = scaler_queries()
    config = base_config(tmp_path, tiny_registry)
    nobody = f"127.0.0.1:{free_port()}"  # the StatefulSet at zero: nothing listens
    config = replace(config, models=replace(config.models, remote={"tiny": [nobody]}))
    with running(config) as gw, httpx.Client(base_url=gw.url, timeout=15) as h:
        for model in ("tiny", "tiny@production", "tiny:1"):
            body = {"model": model, "prompt": "The function", "max_tokens": 3}
            r = h.post("/v1/completions", json=body)
            assert_openai_error(r, 503, "engine_unavailable")
            assert int(r.headers["retry-after"]) >= 1
        text = h.get("/metrics").text

    for query in queries:
        series = re.search(r"rate\((\w+)\{", query).group(1)
        matcher = re.search(r'model=~"([^"]+)"', query).group(1)
        # the trigger's matcher, with the model's name in place of the manifest's
        name = re.match(r"[\w.-]+", matcher).group(0)
        pattern = re.compile(matcher.replace(name, "tiny", 1))
        samples = [
            (labels, value)
            for labels, value in _samples(text, series)
            if pattern.fullmatch(labels.get("model", ""))
        ]
        assert samples, f"{series}: no sample the trigger's matcher selects"
        assert {labels["model"] for labels, _ in samples} == {"tiny", "tiny@production", "tiny:1"}
        assert sum(value for _, value in samples) > 0, f"{series} stays 0: nothing would wake"
    assert metric(text, "aimass_requests_total", model="tiny", status="503") >= 1


def _samples(text: str, name: str):
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                yield sample.labels, sample.value
