"""Files that are whole or absent: hashing, atomic writes, and folders published by one rename.

Every writer here follows one rule: the bytes go to a temporary name in the destination's own
folder, are flushed to disk (fsync), and only then take the real name by a rename, which POSIX
makes atomic; the folder is flushed after, so the new name itself survives a power cut. A crash
at any point leaves under the real name either the old content or all of the new, never a mix.
What a crash can leave is a hidden temporary name, which no reader takes for the real thing:

    atomic_write  NAME    ◄─ os.replace ─ .tmp-<hex>-NAME      ◄─ write, fsync
    staged_dir    NAME/   ◄─ os.replace ─ .NAME.staging-<hex>/ ◄─ build, fsync_tree
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import stat
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path


def sha256_file(path: str | Path) -> str:
    """The hex sha256 of a file's bytes, read in chunks (never all of it in memory)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def fsync_dir(path: str | Path) -> None:
    """Flushes a folder's entries, so that names created or renamed in it survive a power cut."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temp_path(final: str | Path) -> Path:
    """A fresh hidden name beside `final`: in the same folder, hence on the same filesystem where
    a rename is atomic, and starting with ".tmp-" so that listings and cleanups can skip it."""
    final = Path(final)
    return final.with_name(f".tmp-{uuid.uuid4().hex}-{final.name}")


def write_temp(final: str | Path, chunks: Iterable[bytes], *, fsync: bool = True) -> Path:
    """Writes `chunks` to a fresh temp_path(final) and returns that path, its bytes on disk when
    `fsync`. A failure while writing (or in `chunks`) removes the temporary file."""
    tmp = temp_path(final)
    try:
        with open(tmp, "wb") as f:
            for data in chunks:
                f.write(data)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def publish_file(tmp: str | Path, final: str | Path, *, fsync: bool = True) -> None:
    """Renames the finished file `tmp` (in `final`'s folder) over `final`. With `fsync`, its bytes
    reach the disk before the rename and the folder after it, so after a crash `final` holds its
    old bytes or all of the new ones."""
    tmp, final = Path(tmp), Path(final)
    if fsync:
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
    os.replace(tmp, final)
    if fsync:
        fsync_dir(final.parent)


def atomic_write(path: str | Path, data: bytes | str, *, fsync: bool = True) -> None:
    """Replaces the file at `path` with `data` (a str is written as UTF-8); its folder must exist.
    Readers see the old content or the new, never part of it. If anything fails, the rename
    included, `path` keeps its old content and no temporary file is left."""
    path = Path(path)
    tmp = write_temp(path, [data.encode() if isinstance(data, str) else data], fsync=fsync)
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if fsync:
        fsync_dir(path.parent)


def fsync_tree(root: str | Path) -> None:
    """Flushes every file and folder under `root` (symlinks are left as they are), and gives each
    private one (no group or other bits: mkdtemp makes 0700 folders, tempfile, safetensors and
    onnx write some files 0600) the mode a plain mkdir or open would have given it, so that a
    published folder is readable by whoever may read its neighbours. Modes set on purpose
    (a read-only 0444 blob) are kept."""
    root = Path(root)
    dir_mode, file_mode = _plain_modes(root)
    for dirpath, _dirs, names in os.walk(root):
        _widen_private(dirpath, dir_mode)
        for name in names:
            path = os.path.join(dirpath, name)
            if stat.S_ISLNK(os.lstat(path).st_mode):
                continue
            _widen_private(path, file_mode)
            with open(path, "rb") as f:
                os.fsync(f.fileno())
        fsync_dir(dirpath)


def publish_dir(staging: str | Path, final: str | Path, *, replace: bool = False) -> None:
    """Publishes the finished folder `staging` (a sibling of `final`) as `final` by one rename,
    after fsync_tree; the parent folder is flushed after it.

    `final` may be missing or an empty folder; any other raises OSError and `staging` stays as it
    was. With `replace`, an existing `final` is renamed aside, `staging` renamed in and the old
    folder deleted: a crash between the two renames leaves the old folder whole under
    `.NAME.old-*` and no `final`, never a mix of the two.
    """
    staging, final = Path(staging), Path(final)
    fsync_tree(staging)
    if replace and final.exists():
        old = final.with_name(f".{final.name}.old-{uuid.uuid4().hex[:12]}")
        os.replace(final, old)
        try:
            os.replace(staging, final)
        except BaseException:
            os.replace(old, final)
            raise
        fsync_dir(final.parent)
        shutil.rmtree(old, ignore_errors=True)
        return
    os.replace(staging, final)
    fsync_dir(final.parent)


@contextlib.contextmanager
def staged_dir(final: str | Path, *, replace: bool = False) -> Iterator[Path]:
    """A fresh empty folder beside `final` to build it in. When the block ends normally the folder
    is published as `final` (publish_dir, with `replace`); when the block (or the publication)
    raises, it is deleted and `final` is as it was before."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = final.with_name(f".{final.name}.staging-{uuid.uuid4().hex[:12]}")
    staging.mkdir()
    try:
        yield staging
        publish_dir(staging, final, replace=replace)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _plain_modes(folder: Path) -> tuple[int, int]:
    """(folder mode, file mode) that mkdir and open give in `folder`, learnt from a probe folder:
    os.umask can only read the umask by setting it, which races with any thread creating a file
    meanwhile. A folder gets 0777 less the umask, a file 0666 less it: the same bits but x."""
    probe = folder / f".mode-probe-{uuid.uuid4().hex}"
    probe.mkdir()
    try:
        dir_mode = stat.S_IMODE(probe.stat().st_mode) & 0o777
    finally:
        probe.rmdir()
    return dir_mode, dir_mode & 0o666


def _widen_private(path: str, mode: int) -> None:
    if stat.S_IMODE(os.stat(path).st_mode) & 0o077 == 0:
        os.chmod(path, mode)
