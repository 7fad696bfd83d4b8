"""The pull cache: resumable downloads, verification before use, materialising elsewhere."""

from __future__ import annotations

import os

import pytest

from registry.cache import pull
from registry.errors import RegistryError
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
