"""The pull cache: resumable downloads, verification before use, materialising elsewhere, and
the record of verified files that spares a load from hashing them again."""

from __future__ import annotations

import os

import pytest

from registry.cache import pull
from registry.errors import RegistryError
from registry.manifest import check_files
from registry.registry import Registry
from registry.stores import open_store
from registry.verified import record_path, unverified
from tests.registry.helpers import tree, write_package


def _big_blob(reg, size):
    return next(e.sha256 for e in reg.manifest("tiny", 1).files() if e.size == size)


def _record_offsets(reg, monkeypatch) -> list[int]:
    offsets, real = [], reg.store.read_chunks

    def recording(key, offset, size):
        offsets.append(offset)
        return real(key, offset, size)

    monkeypatch.setattr(reg.store, "read_chunks", recording)
    return offsets


def test_an_interrupted_pull_resumes_where_it_stopped(reg, tmp_path, monkeypatch):
    weights = os.urandom(6 << 20)
    pkg = write_package(tmp_path / "pkg", weights=weights)
    reg.push(pkg, "tiny")
    sha, cache = _big_blob(reg, len(weights)), tmp_path / "cache"
    partial = cache / "blobs" / "sha256" / f"{sha}.partial"
    partial.parent.mkdir(parents=True)
    partial.write_bytes(weights[: 4 << 20])  # what a killed pull had written
    offsets = _record_offsets(reg, monkeypatch)
    assert tree(pull(reg, "tiny", cache_dir=cache)) == tree(pkg)
    assert (4 << 20) in offsets and 0 in offsets  # the big blob resumed; the small ones began


def test_a_bad_partial_download_is_fetched_again_from_the_start(reg, tmp_path, monkeypatch):
    weights = os.urandom(1 << 20)
    pkg = write_package(tmp_path / "pkg", weights=weights)
    reg.push(pkg, "tiny")
    sha, cache = _big_blob(reg, len(weights)), tmp_path / "cache"
    partial = cache / "blobs" / "sha256" / f"{sha}.partial"
    partial.parent.mkdir(parents=True)
    partial.write_bytes(b"\0" * 1000)  # garbage left by a crash
    offsets = _record_offsets(reg, monkeypatch)
    assert tree(pull(reg, "tiny", cache_dir=cache)) == tree(pkg)
    assert offsets.count(1000) == 1 and offsets.count(0) >= 1


def test_a_cached_file_damaged_on_disk_is_fetched_again(reg, tmp_path, monkeypatch):
    pkg = write_package(tmp_path / "pkg", weights=b"q" * 4000)
    reg.push(pkg, "tiny")
    cache = tmp_path / "cache"
    first = pull(reg, "tiny", cache_dir=cache)
    blob = cache / "blobs" / "sha256" / _big_blob(reg, 4000)
    os.chmod(blob, 0o644)
    blob.write_bytes(b"r" * 4000)  # same size: only hashing notices
    assert pull(reg, "tiny", cache_dir=cache) == first  # a cache hit does not re-hash...
    assert tree(pull(reg, "tiny", cache_dir=cache, verify=True)) == tree(pkg)  # --verify does


def test_pull_to_a_folder_copies_and_refuses_a_non_empty_one(reg, tmp_path):
    pkg = write_package(tmp_path / "pkg")
    reg.push(pkg, "tiny")
    reg.set_alias("tiny", "production", 1)
    (tmp_path / "empty").mkdir()
    out = pull(reg, "tiny@production", cache_dir=tmp_path / "cache", to=tmp_path / "empty")
    assert tree(out) == tree(pkg)
    (out / "tokenizer.json").write_text("edited")  # a copy: the cache is untouched
    assert tree(pull(reg, "tiny", cache_dir=tmp_path / "cache")) == tree(pkg)
    with pytest.raises(RegistryError, match="not an empty folder"):
        pull(reg, "tiny", cache_dir=tmp_path / "cache", to=out)


def test_unlisted_files_are_reported_and_not_stored(reg, tmp_path):
    pkg = write_package(tmp_path / "pkg", extra={"notes.txt": b"scratch"})
    result = reg.push(pkg, "tiny")
    assert result.unlisted == ["notes.txt"]
    pulled = tree(pull(reg, "tiny", cache_dir=tmp_path / "cache"))
    assert "notes.txt" not in pulled and len(pulled) == 4


def _damage(path, offset: int = 0) -> None:
    """Flips one byte of a cached (read-only) file in place: same size, same inode."""
    os.chmod(path, 0o644)
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    with open(path, "r+b") as f:
        f.write(data)


def test_a_pull_records_its_verified_files_and_any_changed_since_is_hashed_again(reg, tmp_path):
    pkg = write_package(tmp_path / "pkg", weights=b"w" * 5000)
    reg.push(pkg, "tiny")
    reg.push(write_package(tmp_path / "pkg2", weights=b"v" * 5000), "other")
    cache = tmp_path / "cache"
    package = pull(reg, "tiny", cache_dir=cache)
    entries = reg.manifest("tiny", 1).files()
    assert record_path(package).is_file() and unverified(package, entries) == []
    # a copy holds new inodes and no record: every file is hashed by its reader
    copy = pull(reg, "tiny", cache_dir=cache, to=tmp_path / "copy")
    assert unverified(copy, entries) == entries
    # another package linking the same blobs (all but the weights) changes their change time:
    # those files are no longer vouched for (hashed again at the next load), the weights are
    pull(reg, "other", cache_dir=cache)
    assert unverified(package, entries) == [e for e in entries if e.size != 5000]
    # a file edited in place, same size: not vouched for, and the hash refuses it
    graph = next(e for e in entries if e.path.endswith("model.onnx"))
    _damage(package / graph.path)
    assert graph in unverified(package, entries)
    assert check_files(package, unverified(package, entries)) == [
        f"{graph.path} does not match its sha256 (modified or corrupt)"
    ]
    # --verify hashes every file again, fetches the bad one and records the package anew
    package = pull(reg, "tiny", cache_dir=cache, verify=True)
    assert unverified(package, entries) == [] and tree(package) == tree(pkg)


def test_a_forged_or_stale_record_vouches_for_nothing(reg, tmp_path):
    reg.push(write_package(tmp_path / "pkg"), "tiny")
    package = pull(reg, "tiny", cache_dir=tmp_path / "cache")
    entries = reg.manifest("tiny", 1).files()
    original = record_path(package).read_bytes()
    record_path(package).write_bytes(original.replace(entries[0].sha256.encode(), b"0" * 64))
    assert unverified(package, entries) == [entries[0]]  # a record for other bytes
    record_path(package).write_bytes(b"{not json")
    assert unverified(package, entries) == entries
    record_path(package).unlink()
    assert unverified(package, entries) == entries


def test_a_pulled_package_loads_without_hashing_again_and_a_damaged_one_is_refused(
    tiny_package, tmp_path, monkeypatch
):
    from engine import loader  # deferred: onnxruntime, for this test only

    reg = Registry(open_store(str(tmp_path / "registry")), user="tester")
    reg.push(tiny_package, "tiny")
    package = pull(reg, "tiny", cache_dir=tmp_path / "cache")
    hashed: list[str] = []

    def recording(package_dir, entries):
        hashed.extend(e.path for e in entries)
        return check_files(package_dir, entries)

    monkeypatch.setattr(loader, "check_files", recording)
    config = loader.EngineConfig(target="onnx-fp32", n_slots=1)
    loader.open_core(package, config)
    assert hashed == []  # every file vouched for by the pull's record
    graph = next(package.glob("onnx-fp32/*.onnx"))
    _damage(graph, offset=graph.stat().st_size // 2)
    with pytest.raises(loader.LoadError, match="is damaged: onnx-fp32/model.onnx does not match"):
        loader.open_core(package, config)
    assert hashed == ["onnx-fp32/model.onnx"]
