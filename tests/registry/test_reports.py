"""Reports attached to a version after its push, each test on both backends (a folder and S3)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import msgspec
import pytest

from registry import gates
from registry.cache import pull
from registry.errors import GateFailed, NotFound, RegistryError, ReportConflict
from registry.layout import report_key
from registry.manifest import Reports, decode
from tests.registry.helpers import tree, write_package

PASSED_LOAD_TEST = {"passed": True, "p95_ttft_s": 0.2, "error_rate": 0.0}


def test_attached_reports_merge_into_the_manifest_and_leave_its_bytes(reg, tmp_path):
    pkg = write_package(tmp_path / "pkg", ppl=10.0, eval_report={"perplexity": 10.0})
    reg.push(pkg, "tiny")
    stored = reg.manifest_bytes("tiny", 1)
    assert reg.reports("tiny", 1) == {}

    reg.attach_report("tiny", 1, "eval", {"perplexity": 9.5, "dataset": "prod-sample"})
    reg.attach_report("tiny", 1, "load_test", PASSED_LOAD_TEST)
    reg.attach_report("tiny", 1, "canary", {"watched_s": 600, "error_rate": 0.001})

    assert reg.reports("tiny", 1) == {
        "canary": {"watched_s": 600, "error_rate": 0.001},
        "eval": {"perplexity": 9.5, "dataset": "prod-sample"},
        "load_test": PASSED_LOAD_TEST,
    }
    m = reg.manifest("tiny", 1)
    assert m.reports.eval == {"perplexity": 9.5, "dataset": "prod-sample"}  # replaced
    assert m.reports.load_test == PASSED_LOAD_TEST
    assert m.reports.benchmark is None
    assert m.reports.attached == {"canary": {"watched_s": 600, "error_rate": 0.001}}
    assert m.reports.parity["onnx-fp32"].passed  # the manifest's own reports stay
    # the stored manifest, the package's hashes and a pull are what was pushed
    assert reg.manifest_bytes("tiny", 1) == stored == (pkg / "manifest.json").read_bytes()
    assert decode(stored).reports.eval == {"perplexity": 10.0}
    assert tree(pull(reg, "tiny:1", cache_dir=tmp_path / "cache")) == tree(pkg)


def test_a_report_is_replaced_by_compare_and_swap_and_each_write_is_an_event(reg, tmp_path):
    reg.push(write_package(tmp_path / "pkg"), "tiny")
    reg.attach_report("tiny", 1, "pipeline", {"step": "eval"}, expect_absent=True)
    reg.attach_report("tiny", 1, "pipeline", {"step": "load_test"})
    assert reg.reports("tiny", 1) == {"pipeline": {"step": "load_test"}}
    with pytest.raises(ReportConflict, match="tiny:1 already has a pipeline report"):
        reg.attach_report("tiny", 1, "pipeline", {"step": "again"}, expect_absent=True)
    assert reg.reports("tiny", 1) == {"pipeline": {"step": "load_test"}}
    events = [(e.action, e.version, e.kind, e.detail) for e in reg.events("tiny")]
    assert events[1:] == [
        ("report", 1, "pipeline", "attached"),
        ("report", 1, "pipeline", "replaced the earlier report"),
    ]


def test_a_writer_that_lost_the_race_changes_nothing(reg, tmp_path, monkeypatch):
    reg.push(write_package(tmp_path / "pkg"), "tiny")
    reg.attach_report("tiny", 1, "eval", {"perplexity": 1.0})
    real_get = reg.store.get

    def get_then_overwritten(key):
        got = real_get(key)
        if key == report_key("tiny", 1, "eval"):  # another writer lands after our read
            reg.store.put_if_match(key, b'{"perplexity":2.0}', got[1])
        return got

    monkeypatch.setattr(reg.store, "get", get_then_overwritten)
    with pytest.raises(ReportConflict, match="written by another writer"):
        reg.attach_report("tiny", 1, "eval", {"perplexity": 3.0})
    monkeypatch.undo()
    assert reg.reports("tiny", 1) == {"eval": {"perplexity": 2.0}}
    assert [e.action for e in reg.events("tiny")] == ["push", "report"]


def test_a_first_report_that_lost_the_race_changes_nothing(reg, tmp_path, monkeypatch):
    reg.push(write_package(tmp_path / "pkg"), "tiny")
    real_get = reg.store.get

    def absent_then_created(key):
        if key == report_key("tiny", 1, "canary"):
            reg.store.put_new(key, b'{"by":"other"}')
            raise NotFound(key)  # what our read saw, just before the other write
        return real_get(key)

    monkeypatch.setattr(reg.store, "get", absent_then_created)
    with pytest.raises(ReportConflict):
        reg.attach_report("tiny", 1, "canary", {"by": "us"})
    monkeypatch.undo()
    assert reg.reports("tiny", 1) == {"canary": {"by": "other"}}


def test_bad_reports_are_refused_naming_what_is_wrong(reg, tmp_path):
    reg.push(write_package(tmp_path / "pkg"), "tiny")
    with pytest.raises(NotFound, match="tiny:7 does not exist"):
        reg.attach_report("tiny", 7, "eval", {})
    with pytest.raises(NotFound, match="tiny:7 does not exist"):
        reg.reports("tiny", 7)
    with pytest.raises(RegistryError, match="report kind '../x' must not contain '/'"):
        reg.attach_report("tiny", 1, "../x", {})
    with pytest.raises(RegistryError, match="must be a JSON object, not list"):
        reg.attach_report("tiny", 1, "eval", [1, 2])  # type: ignore[arg-type]
    with pytest.raises(RegistryError, match="cannot be stored as JSON"):
        reg.attach_report("tiny", 1, "eval", {"x": object()})
    assert reg.reports("tiny", 1) == {}
    assert [e.action for e in reg.events("tiny")] == ["push"]


def test_promotion_gates_read_attached_reports(reg, tmp_path):
    reg.push(write_package(tmp_path / "v1", ppl=10.0), "tiny")
    reg.push(write_package(tmp_path / "v2", ppl=10.0, weights=b"two"), "tiny")
    reg.set_alias("tiny", "production", 1)
    policy = gates.GatePolicy(require_loadtest=True)
    with pytest.raises(GateFailed, match="loadtest"):
        reg.promote("tiny", 2, "production", policy=policy)
    reg.attach_report("tiny", 2, "load_test", PASSED_LOAD_TEST)
    move = reg.promote("tiny", 2, "production", policy=policy)
    assert move.changed and all(r.passed for r in move.gates)
    # a worse perplexity measured after the push is what the gate compares
    reg.attach_report("tiny", 2, "eval", {"perplexity": 10.0})
    reg.push(write_package(tmp_path / "v3", ppl=10.0, weights=b"three"), "tiny")
    reg.attach_report("tiny", 3, "eval", {"perplexity": 13.0})
    with pytest.raises(GateFailed, match="perplexity"):
        reg.promote("tiny", 3, "production")


def test_gc_keeps_reports_with_their_version_and_deletes_them_with_it(reg, tmp_path):
    for i in (1, 2):
        reg.push(write_package(tmp_path / f"v{i}", weights=bytes([i]) * 100), "tiny")
        reg.attach_report("tiny", i, "eval", {"perplexity": float(i)})
    reg.set_alias("tiny", "production", 2)
    # reports left under a version that is gone (attached while a gc deleted it)
    reg.store.put_new(report_key("tiny", 9, "canary"), b"{}")
    future = datetime.now(UTC) + timedelta(days=8)
    report = reg.gc(timedelta(days=7), now=future)
    assert report.versions == ["tiny:1"]
    assert report_key("tiny", 9, "canary") in report.other
    assert reg.reports("tiny", 2) == {"eval": {"perplexity": 2.0}}
    assert list(reg.store.list("models/tiny/versions/000001/")) == []
    assert list(reg.store.list("models/tiny/versions/000009/")) == []


def test_a_manifest_written_before_attached_reports_existed_decodes(tmp_path):
    pkg = write_package(tmp_path / "pkg")
    raw = msgspec.json.decode((pkg / "manifest.json").read_bytes())
    del raw["reports"]["attached"]
    m = decode(msgspec.json.encode(raw))
    assert m.reports.attached == {} and isinstance(m.reports, Reports)
