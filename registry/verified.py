"""What the local cache has hashed already: a pulled package's record of the files it verified,
so that loading the package need not hash them again.

    $AIMASS_HOME/cache/packages/<manifest sha256>/           the package (registry/cache.py)
    $AIMASS_HOME/cache/packages/<manifest sha256>.verified   its record: each file's sha256 and
                                                             identity when the cache checked it

A pull writes the record once every file of the package is a hard link to a blob whose bytes
matched its sha256 (registry/cache.py). A file is vouched for only while its identity is the
one recorded: device and inode, size, modification time and change time. The change time moves
on any write, chmod, rename or new hard link, and no call sets it back, so a file edited in
place or replaced, a copied folder, or a blob linked into another package since (the record is
then stale for that one file) is hashed again by its reader, as without a record. The record
sits beside the folder, not in it: the folder stays byte-identical to the package.

What it does not catch, no more than a cache hit does: bytes that rot on the disk under an
unchanged inode, or a write within the same clock tick (a few ms) as the record on a filesystem
with coarse timestamps (`pull --verify` hashes everything again and rewrites the record).
"""

from __future__ import annotations

import os
from pathlib import Path

import msgspec

from aimass_common.files import atomic_write
from registry.manifest import FileEntry, path_problem

SUFFIX = ".verified"


class _Identity(msgspec.Struct, array_like=True, frozen=True):
    """A file's bytes (sha256) and who it was when they were hashed."""

    sha256: str
    device: int
    inode: int
    size: int
    mtime_ns: int
    ctime_ns: int


def record_path(package_dir: str | Path) -> Path:
    """Where the record of `package_dir` lives: `<folder>.verified` beside it."""
    package_dir = Path(package_dir)
    return package_dir.with_name(package_dir.name + SUFFIX)


def record(package_dir: str | Path, entries: list[FileEntry]) -> None:
    """Records `entries` as verified in their current state. Call it only when their bytes
    were just checked against their sha256 (or are hard links to blobs that were)."""
    files = {e.path: _identity(Path(package_dir) / e.path, e.sha256) for e in entries}
    atomic_write(record_path(package_dir), msgspec.json.encode(files))


def forget(package_dir: str | Path) -> None:
    """Removes the record (before the folder is rebuilt or removed)."""
    record_path(package_dir).unlink(missing_ok=True)


def unverified(package_dir: str | Path, entries: list[FileEntry]) -> list[FileEntry]:
    """The entries the record does not vouch for: all of them without a readable record, else
    those whose path is unsafe, resolves outside the folder, or whose file is not the one
    recorded with the listed sha256 and size. The caller hashes these."""
    root = Path(package_dir)
    try:
        files = msgspec.json.decode(record_path(root).read_bytes(), type=dict[str, _Identity])
    except (OSError, msgspec.DecodeError):  # none, or unreadable: hash everything
        return list(entries)
    base = root.resolve()
    return [e for e in entries if not _vouched(root, base, e, files.get(e.path))]


def _vouched(root: Path, base: Path, entry: FileEntry, known: _Identity | None) -> bool:
    if known is None or (known.sha256, known.size) != (entry.sha256, entry.size):
        return False
    if path_problem(entry.path) is not None:
        return False
    full = root / entry.path
    try:
        return full.resolve().is_relative_to(base) and _identity(full, entry.sha256) == known
    except OSError:  # missing or unreadable: the hash check says what is wrong
        return False


def _identity(path: Path, sha256: str) -> _Identity:
    st = os.stat(path)
    return _Identity(sha256, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
