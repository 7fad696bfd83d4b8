"""Files written whole or not at all: what survives a failure at each step."""

from __future__ import annotations

import hashlib
import os
import stat
import threading

import pytest

from aimass_common import files
from aimass_common.files import (
    atomic_write,
    fsync_tree,
    publish_dir,
    publish_file,
    sha256_file,
    staged_dir,
    write_temp,
)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_sha256_matches_hashlib_across_chunk_boundaries(tmp_path):
    data = os.urandom(3 * (1 << 20) + 7)
    path = tmp_path / "blob"
    path.write_bytes(data)
    assert sha256_file(path) == hashlib.sha256(data).hexdigest()
    (tmp_path / "empty").write_bytes(b"")
    assert sha256_file(tmp_path / "empty") == hashlib.sha256(b"").hexdigest()


def test_atomic_write_replaces_bytes_and_text(tmp_path):
    path = tmp_path / "f.json"
    atomic_write(path, b"old")
    atomic_write(path, "new \u00e9")
    assert path.read_text(encoding="utf-8") == "new \u00e9"
    assert [p.name for p in tmp_path.iterdir()] == ["f.json"]


def test_an_atomic_write_whose_rename_fails_keeps_the_old_content(tmp_path, monkeypatch):
    path = tmp_path / "f.txt"
    path.write_text("previous")

    def refuse(src, dst):
        raise OSError("disk gone")

    monkeypatch.setattr(files.os, "replace", refuse)
    with pytest.raises(OSError, match="disk gone"):
        atomic_write(path, "half-written replacement")
    assert path.read_text() == "previous"
    assert [p.name for p in tmp_path.iterdir()] == ["f.txt"]  # no temporary file behind


def test_a_failing_source_leaves_no_temporary_file(tmp_path):
    def chunks():
        yield b"first"
        raise RuntimeError("source broke")

    with pytest.raises(RuntimeError, match="source broke"):
        write_temp(tmp_path / "f", chunks())
    assert list(tmp_path.iterdir()) == []


def test_publish_file_renames_a_finished_file_over_the_old_one(tmp_path):
    final = tmp_path / "blob"
    final.write_bytes(b"old")
    tmp = write_temp(final, [b"new ", b"bytes"], fsync=False)
    assert tmp.parent == tmp_path and tmp.name.startswith(".tmp-")
    publish_file(tmp, final)
    assert final.read_bytes() == b"new bytes" and not tmp.exists()


def build(folder, text: str) -> None:
    (folder / "sub").mkdir()
    (folder / "sub" / "a.txt").write_text(text)
    (folder / "b.bin").write_bytes(b"\x00\x01")


def test_staged_dir_publishes_the_whole_folder_on_success(tmp_path):
    final = tmp_path / "out" / "pkg"
    with staged_dir(final) as staging:
        assert staging.parent == final.parent and staging.name.startswith(".pkg.staging-")
        build(staging, "v1")
        assert not final.exists()  # nothing under the real name until the block ends
    assert (final / "sub" / "a.txt").read_text() == "v1"
    assert [p.name for p in final.parent.iterdir()] == ["pkg"]


def test_staged_dir_removes_everything_when_the_build_fails(tmp_path):
    final = tmp_path / "pkg"
    with pytest.raises(KeyboardInterrupt), staged_dir(final) as staging:
        build(staging, "v1")
        raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


def test_publishing_over_a_full_folder_needs_replace(tmp_path):
    final = tmp_path / "pkg"
    with staged_dir(final) as staging:
        build(staging, "v1")
    with pytest.raises(OSError), staged_dir(final) as staging:
        build(staging, "v2")
    assert (final / "sub" / "a.txt").read_text() == "v1"
    with staged_dir(final, replace=True) as staging:
        build(staging, "v2")
    assert (final / "sub" / "a.txt").read_text() == "v2"
    assert [p.name for p in tmp_path.iterdir()] == ["pkg"]  # the old folder is gone


def test_an_empty_folder_is_replaced_without_replace(tmp_path):
    final = tmp_path / "pkg"
    final.mkdir()
    staging = tmp_path / ".pkg.staging"
    staging.mkdir()
    build(staging, "v1")
    publish_dir(staging, final)
    assert (final / "b.bin").read_bytes() == b"\x00\x01" and not staging.exists()


def test_a_failed_swap_puts_the_old_folder_back(tmp_path, monkeypatch):
    final = tmp_path / "pkg"
    with staged_dir(final) as staging:
        build(staging, "v1")
    real_replace = os.replace

    def second_rename_fails(src, dst):
        if ".staging-" in str(src):
            raise OSError("rename refused")
        real_replace(src, dst)

    monkeypatch.setattr(files.os, "replace", second_rename_fails)
    with pytest.raises(OSError, match="rename refused"), staged_dir(final, replace=True) as staging:
        build(staging, "v2")
    assert (final / "sub" / "a.txt").read_text() == "v1"
    assert [p.name for p in tmp_path.iterdir()] == ["pkg"]


def test_fsync_tree_widens_private_modes_only_and_keeps_the_umask(tmp_path):
    root = tmp_path / "root"
    root.mkdir(mode=0o700)
    (root / "private").write_bytes(b"x")
    os.chmod(root / "private", 0o600)
    (root / "blob").write_bytes(b"y")
    os.chmod(root / "blob", 0o444)
    (root / "link").symlink_to("private")
    previous = os.umask(0o027)  # the test sets a umask; fsync_tree must only read it
    try:
        fsync_tree(root)
        assert os.umask(0o027) == 0o027  # unchanged by fsync_tree
    finally:
        os.umask(previous)
    assert mode(root) == 0o750
    assert mode(root / "private") == 0o640
    assert mode(root / "blob") == 0o444  # a mode set on purpose stays
    assert sorted(p.name for p in root.iterdir()) == ["blob", "link", "private"]  # no probe left


def test_fsync_tree_never_sets_the_process_umask(tmp_path, monkeypatch):
    (tmp_path / "f").write_bytes(b"x")
    calls = []
    monkeypatch.setattr(files.os, "umask", lambda *a: calls.append(a))
    threads = [threading.Thread(target=fsync_tree, args=(tmp_path,)) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert calls == []
