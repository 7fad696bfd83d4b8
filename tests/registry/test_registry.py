"""Registry behaviour, each test on both backends (a folder and S3 over HTTP via moto)."""

from __future__ import annotations

import os
import re
from datetime import UTC, datetime, timedelta

import pytest

from registry.cache import pull
from registry.errors import AliasConflict, GateFailed, IntegrityError, NotFound, RegistryError
from registry.registry import Registry, blob_key
from tests.registry.helpers import tree, write_package


def test_push_ls_show_pull_round_trip_identical_bytes(reg, tmp_path):
    pkg = write_package(tmp_path / "pkg", weights=os.urandom(12 << 20))  # 12 MB: 3 S3 parts
    result = reg.push(pkg, "tiny")
    assert result.version == 1 and result.uploaded_bytes > 12 << 20
    assert reg.models() == ["tiny"]
    assert [v.version for v in reg.versions("tiny")] == [1]
    assert reg.manifest_bytes("tiny", 1) == (pkg / "manifest.json").read_bytes()
    assert reg.resolve("tiny") == ("tiny", 1)

    out = pull(reg, "tiny:1", cache_dir=tmp_path / "cache", to=tmp_path / "out")
    assert tree(out) == tree(pkg)
    cached = pull(reg, "tiny", cache_dir=tmp_path / "cache")
    assert tree(cached) == tree(pkg)


def test_versions_count_up_and_identical_files_are_stored_once(reg, tmp_path):
    pkg = write_package(tmp_path / "pkg")
    first = reg.push(pkg, "tiny")
    second = reg.push(pkg, "tiny")
    other = reg.push(pkg, "other")
    assert (first.version, second.version, other.version) == (1, 2, 1)
    assert second.uploaded_bytes == 0 and second.reused_bytes == first.uploaded_bytes
    assert [v.version for v in reg.versions("tiny")] == [1, 2]
    assert reg.models() == ["other", "tiny"]


def test_a_version_is_never_overwritten(reg, tmp_path):
    reg.push(write_package(tmp_path / "a", weights=b"a" * 100), "tiny")
    before = reg.manifest_bytes("tiny", 1)
    from registry.errors import AlreadyExists
    from registry.registry import version_key

    with pytest.raises(AlreadyExists):
        reg.store.put_new(version_key("tiny", 1), b"{}")
    assert reg.manifest_bytes("tiny", 1) == before


def test_a_taken_version_number_makes_the_push_take_the_next(reg, tmp_path, monkeypatch):
    pkg = write_package(tmp_path / "pkg")
    reg.push(pkg, "tiny")
    reg.push(pkg, "tiny")
    monkeypatch.setattr(reg, "versions", lambda name: [])  # as if another push won meanwhile
    assert reg.push(pkg, "tiny").version == 3  # 412 on 1 and 2, created at 3
    monkeypatch.undo()
    assert [v.version for v in reg.versions("tiny")] == [1, 2, 3]


def test_interrupted_push_leaves_no_visible_version(reg, tmp_path, monkeypatch):
    pkg = write_package(tmp_path / "pkg", weights=os.urandom(11 << 20))
    store = reg.store
    if hasattr(store, "_put_part"):  # S3: fail the second part of the multipart upload
        real, calls = store._put_part, []

        def flaky(k, upload_id, number, data):
            calls.append(number)
            if number == 2:
                raise ConnectionError("network lost mid-upload")
            return real(k, upload_id, number, data)

        monkeypatch.setattr(store, "_put_part", flaky)
    else:  # a folder: fail while copying the big file
        real_upload = store.upload_file

        def flaky_upload(key, src, sha256, size):
            if size > 1 << 20:
                raise ConnectionError("disk went away mid-upload")
            return real_upload(key, src, sha256, size)

        monkeypatch.setattr(store, "upload_file", flaky_upload)
    with pytest.raises(ConnectionError):
        reg.push(pkg, "tiny")
    assert reg.versions("tiny") == []
    assert list(store.list("models/tiny/uploads/")) == []
    with pytest.raises(NotFound):
        reg.resolve("tiny")
    if hasattr(store, "client"):  # the aborted multipart upload left no parts behind
        uploads = store.client.list_multipart_uploads(Bucket=store.bucket, Prefix=store.prefix)
        assert uploads.get("Uploads", []) == []
    monkeypatch.undo()
    assert reg.push(pkg, "tiny").version == 1  # and the next push works


def test_push_refuses_files_that_do_not_match_the_manifest(reg, tmp_path):
    pkg = write_package(tmp_path / "pkg", weights=b"x" * 1000)
    (pkg / "onnx-fp32" / "model.onnx.data").write_bytes(b"y" * 1000)  # same size, other bytes
    with pytest.raises(IntegrityError, match="does not match the manifest"):
        reg.push(pkg, "tiny")
    assert reg.versions("tiny") == []
    (pkg / "onnx-fp32" / "model.onnx.data").write_bytes(b"y" * 10)
    with pytest.raises(RegistryError, match="has 10 bytes, the manifest lists 1000"):
        reg.push(pkg, "tiny")


def test_corrupted_artifact_is_detected_on_pull(reg, tmp_path):
    pkg = write_package(tmp_path / "pkg", weights=b"w" * 5000)
    reg.push(pkg, "tiny")
    sha = next(e.sha256 for e in reg.manifest("tiny", 1).files() if e.size == 5000)
    if hasattr(reg.store, "client"):
        reg.store.client.put_object(
            Bucket=reg.store.bucket, Key=reg.store._k(blob_key(sha)), Body=b"v" * 5000
        )
    else:
        (reg.store.root / blob_key(sha)).write_bytes(b"v" * 5000)
    cache = tmp_path / "cache"
    with pytest.raises(IntegrityError, match=sha):
        pull(reg, "tiny", cache_dir=cache, to=tmp_path / "out")
    assert not (cache / "blobs" / "sha256" / sha).exists()
    assert not (cache / "blobs" / "sha256" / f"{sha}.partial").exists()
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "bad, rule",
    [
        ("../x", "must not contain '/'"),
        ("", "must not be empty"),
        ("a" * 101, "101 characters long; the limit is 100"),
        ("bad\x07name", "control character U+0007"),
        ("zero\u200bwidth", "control character U+200B"),
        (".hidden", "starting with a letter or a digit"),
        ("sp ace", "may contain only letters"),
    ],
)
def test_bad_names_are_refused_naming_the_rule(reg, tmp_path, bad, rule):
    pkg = write_package(tmp_path / "pkg")
    with pytest.raises(RegistryError, match=re.escape(rule)):
        reg.push(pkg, bad)
    reg.push(pkg, "ok")
    with pytest.raises(RegistryError, match=re.escape(rule)):
        reg.set_alias("ok", bad, 1)
    assert reg.models() == ["ok"]


def test_alias_moves_by_compare_and_swap(reg, tmp_path):
    pkg = write_package(tmp_path / "pkg")
    for _ in range(3):
        reg.push(pkg, "tiny")
    move = reg.set_alias("tiny", "production", 1, expect=0)  # create: If-None-Match
    assert (move.from_version, move.version, move.changed) == (None, 1, True)
    assert reg.set_alias("tiny", "production", 2, expect=1).version == 2  # If-Match
    with pytest.raises(AliasConflict, match="points to 2; --expect said it would point to 1"):
        reg.set_alias("tiny", "production", 3, expect=1)
    with pytest.raises(AliasConflict, match="--expect said it would not exist"):
        reg.set_alias("tiny", "production", 3, expect=0)
    assert reg.resolve("tiny@production") == ("tiny", 2)
    with pytest.raises(NotFound):
        reg.set_alias("tiny", "production", 9)
    assert not reg.set_alias("tiny", "production", 2).changed


def _interleave(reg, monkeypatch, other_move):
    """Makes every alias read by `reg` be followed by `other_move` (another writer wins)."""
    real = Registry.alias

    def read_then_lose(self, name, alias):
        got = real(self, name, alias)
        other_move()
        return got

    monkeypatch.setattr(reg, "alias", read_then_lose.__get__(reg))


def test_lost_race_is_reported_not_overwritten(reg, tmp_path, monkeypatch):
    pkg = write_package(tmp_path / "pkg")
    for _ in range(3):
        reg.push(pkg, "tiny")
    other = Registry(reg.store, user="other-ci")
    # 412 on If-None-Match: the alias is created by someone else between our read and write
    _interleave(reg, monkeypatch, lambda: other.set_alias("tiny", "staging", 2))
    with pytest.raises(AliasConflict, match="moved while this alias"):
        reg.set_alias("tiny", "staging", 1)
    # 412 on If-Match: it moves between our read and write
    _interleave(reg, monkeypatch, lambda: other.set_alias("tiny", "staging", 3))
    with pytest.raises(AliasConflict):
        reg.promote("tiny", 1, "staging")
    monkeypatch.undo()
    assert reg.resolve("tiny@staging") == ("tiny", 3)
    assert [(e.who, e.version) for e in reg.events("tiny") if e.alias] == [
        ("other-ci", 2),
        ("other-ci", 3),
    ]


def test_compare_and_swap_on_a_deleted_alias_loses(reg, tmp_path):
    from registry.errors import PreconditionFailed

    etag = reg.store.put_if_match("models/x/aliases/a.json", b"1", None)
    with pytest.raises(PreconditionFailed):
        reg.store.put_if_match("models/x/aliases/a.json", b"2", None)  # 412: exists
    with pytest.raises(PreconditionFailed):
        reg.store.put_if_match("models/x/aliases/a.json", b"2", '"stale"')  # 412: moved
    reg.store.delete("models/x/aliases/a.json")
    with pytest.raises(PreconditionFailed):
        reg.store.put_if_match("models/x/aliases/a.json", b"2", etag)  # 404: gone


def test_promote_gates(reg, tmp_path):
    reg.push(write_package(tmp_path / "v1", ppl=10.0), "tiny")
    reg.push(write_package(tmp_path / "v2", ppl=10.1, weights=b"2"), "tiny")  # +1%: passes
    reg.push(write_package(tmp_path / "v3", ppl=10.5, weights=b"3"), "tiny")  # +5%: fails
    reg.push(write_package(tmp_path / "v4", parity_passed=False, weights=b"4"), "tiny")
    loadtest = {"passed": True, "p95_ms": 120.0, "error_rate": 0.0, "rps": 50.0}
    reg.push(write_package(tmp_path / "v5", load_test=loadtest, weights=b"5"), "tiny")

    first = reg.promote("tiny", 1, "production")
    assert [(g.gate, g.passed) for g in first.gates] == [("parity", True), ("perplexity", True)]
    assert reg.promote("tiny", 2, "production").version == 2
    with pytest.raises(
        GateFailed, match=r"refused by gate perplexity \(.*\+3\.96%, limit \+2\.00%"
    ):
        reg.promote("tiny", 3, "production")
    with pytest.raises(GateFailed, match="refused by gate parity .*greedy tokens diverged"):
        reg.promote("tiny", 4, "production")
    with pytest.raises(GateFailed, match="refused by gate loadtest .*no load-test report"):
        reg.promote("tiny", 1, "canary", policy=_policy(require_loadtest=True))
    with pytest.raises(GateFailed, match="p95_ms 120.0 \\(must be <= 100"):
        reg.promote("tiny", 5, "canary", policy=_policy(loadtest_max_p95_ms=100))
    assert reg.promote("tiny", 5, "canary", policy=_policy(loadtest_max_p95_ms=200)).changed

    forced = reg.promote("tiny", 3, "production", force=True)
    assert forced.version == 3 and not forced.gates[1].passed
    last = reg.events("tiny")[-1]
    assert (last.action, last.forced, last.from_version, last.version) == ("promote", True, 2, 3)
    assert [(g.gate, g.passed) for g in last.gates] == [("parity", True), ("perplexity", False)]
    assert reg.resolve("tiny@production") == ("tiny", 3)


def _policy(**kw):
    from registry.gates import GatePolicy

    return GatePolicy(**kw)


def test_gates_config_lives_in_the_registry(reg, tmp_path):
    reg.push(write_package(tmp_path / "v1"), "tiny")
    reg.set_gates_config(b'{"production": {"require_loadtest": true}}')
    assert reg.promote("tiny", 1, "staging").changed  # "*" absent: the defaults
    with pytest.raises(GateFailed, match="loadtest"):
        reg.promote("tiny", 1, "production")
    with pytest.raises(RegistryError, match="invalid gates config"):
        reg.set_gates_config(b'{"production": {"require_load_test": true}}')


def test_rollback_walks_back_through_the_alias_history(reg, tmp_path):
    pkg = write_package(tmp_path / "pkg")
    for _ in range(3):
        reg.push(pkg, "tiny")
    with pytest.raises(NotFound):
        reg.rollback("tiny", "production")
    for v in (1, 2, 3):
        reg.set_alias("tiny", "production", v)
    assert (
        reg.rollback("tiny", "production").version,
        reg.rollback("tiny", "production").version,
    ) == (2, 1)
    with pytest.raises(RegistryError, match="no earlier target"):
        reg.rollback("tiny", "production")
    events = [(e.action, e.from_version, e.version) for e in reg.events("tiny") if e.alias]
    assert events[-2:] == [("rollback", 3, 2), ("rollback", 2, 1)]


def test_gc_keeps_aliased_versions_and_their_history(reg, tmp_path):
    for i in range(1, 6):
        reg.push(write_package(tmp_path / f"v{i}", weights=bytes([i]) * 1000), "tiny")
    reg.set_alias("tiny", "production", 2)
    reg.set_alias("tiny", "production", 3)  # 2 stays: rollback's target
    reg.set_alias("tiny", "staging", 5)
    assert reg.gc(timedelta(days=7)).versions == []  # all younger than the retention
    future = datetime.now(UTC) + timedelta(days=8)
    dry = reg.gc(timedelta(days=7), dry_run=True, now=future)
    assert dry.versions == ["tiny:1", "tiny:4"] and len(dry.blobs) == 2
    assert [v.version for v in reg.versions("tiny")] == [1, 2, 3, 4, 5]
    report = reg.gc(timedelta(days=7), now=future)
    assert report.versions == ["tiny:1", "tiny:4"]
    assert len(report.blobs) == 2  # the big file of v1 and of v4; shared files stay
    assert [v.version for v in reg.versions("tiny")] == [2, 3, 5]
    for v in (2, 3, 5):
        assert tree(pull(reg, f"tiny:{v}", cache_dir=tmp_path / "cache")) == tree(
            tmp_path / f"v{v}"
        )
    gc_events = [e.version for e in reg.events("tiny") if e.action == "gc"]
    assert gc_events == [1, 4]


def test_gc_removes_what_an_interrupted_push_left(reg, tmp_path, monkeypatch):
    pkg = write_package(tmp_path / "pkg", weights=b"z" * 3000)
    real = reg._allocate
    monkeypatch.setattr(reg, "_allocate", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        reg.push(pkg, "tiny")
    monkeypatch.setattr(reg, "_allocate", real)
    assert len(list(reg.store.list("blobs/"))) == 3  # uploaded, but no version names them
    report = reg.gc(timedelta(0), now=datetime.now(UTC) + timedelta(seconds=1))
    assert len(report.blobs) == 3 and list(reg.store.list("blobs/")) == []


def test_every_change_appends_an_event(reg, tmp_path, monkeypatch):
    monkeypatch.setenv("AIMASS_USER", "alice")
    reg = Registry(reg.store)  # who: from AIMASS_USER
    pkg = write_package(tmp_path / "pkg")
    reg.push(pkg, "tiny")
    reg.push(pkg, "tiny")
    reg.set_alias("tiny", "production", 1)
    reg.promote("tiny", 2, "production")
    reg.rollback("tiny", "production")
    events = reg.events("tiny")
    assert [(e.action, e.from_version, e.version, e.alias) for e in events] == [
        ("push", None, 1, None),
        ("push", None, 2, None),
        ("alias", None, 1, "production"),
        ("promote", 1, 2, "production"),
        ("rollback", 2, 1, "production"),
    ]
    assert {e.who for e in events} == {"alice"}
    assert all(e.at.tzinfo is not None and e.host for e in events)
    assert [e.seq for e in events if e.alias] == [1, 2, 3]
