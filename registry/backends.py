"""Where registry objects live: a local folder (the default) or S3 (registry/s3.py).

Both backends store the same keys holding the same bytes (see registry/registry.py for the
layout), and answer the two conditional writes the registry is built on:

    put_new(key, data)             create-only: AlreadyExists when the key is there
    put_if_match(key, data, etag)  compare-and-swap: PreconditionFailed unless the object's
                                   current etag is `etag` (None: unless it does not exist)

On S3 these are PutObject with If-None-Match: * and If-Match: <etag>. On disk, a create-only
write is a hard link of a fully written temporary file onto the final name (link(2) fails with
EEXIST, atomically, and readers never see a half-written file); a compare-and-swap holds an
exclusive lock file (flock(2)) while it compares the current content's digest and renames a
temporary file over the object. Blobs are uploaded with their sha256 checked on the way:
a mismatch raises IntegrityError and leaves nothing at the final key.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Protocol

from aimass_common.files import atomic_write, fsync_dir, sha256_file, write_temp
from registry.errors import (
    AlreadyExists,
    IntegrityError,
    NotFound,
    PreconditionFailed,
)

CHUNK = 8 << 20  # bytes per read; large enough that hashing and copying run at memory speed


@dataclass(frozen=True)
class ObjectInfo:
    key: str  # relative to the registry root, "/"-separated
    size: int  # bytes
    modified: datetime  # UTC: S3 LastModified, or the file's mtime


class Store(Protocol):
    uri: str

    def get(self, key: str) -> tuple[bytes, str]:
        """(data, etag); NotFound when missing."""

    def stat(self, key: str) -> ObjectInfo | None: ...

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        """Every object under `prefix` (a folder ending in "/"), recursively, in no set order."""

    def list_dirs(self, prefix: str) -> list[str]:
        """The names of the folders directly under `prefix`."""

    def put_new(self, key: str, data: bytes) -> str: ...

    def put_if_match(self, key: str, data: bytes, etag: str | None) -> str: ...

    def delete(self, key: str) -> None: ...

    def upload_file(self, key: str, src: Path, sha256: str, size: int) -> bool:
        """Stores `src` at `key` unless an object of that size is there; True if it uploaded.

        Raises IntegrityError (storing nothing) when `src` does not match `sha256` and `size`."""

    def read_chunks(self, key: str, offset: int, size: int) -> Iterator[bytes]:
        """The object's bytes from `offset` to `size`, in order."""

    def cleanup(self, before: datetime) -> list[str]:
        """Removes what interrupted writes left behind before `before`; returns what it removed."""


class BackgroundHash:
    """sha256 computed on a thread while the caller reads, writes or sends the next chunk
    (hashlib releases the GIL); chunks are hashed in the order given, at most two behind."""

    def __init__(self) -> None:
        self._h = hashlib.sha256()
        self._pool = ThreadPoolExecutor(1)
        self._pending: deque[Future] = deque()

    def update(self, data: bytes) -> None:
        self._pending.append(self._pool.submit(self._h.update, data))
        while len(self._pending) > 2:  # bounds the chunks held in memory
            self._pending.popleft().result()

    def hexdigest(self) -> str:
        while self._pending:
            self._pending.popleft().result()
        self._pool.shutdown()
        return self._h.hexdigest()

    def close(self) -> None:
        """Stops the thread without waiting (a caller that gave up halfway)."""
        self._pool.shutdown(wait=False, cancel_futures=True)


def verified_chunks(src: Path, sha256: str, size: int, chunk: int = CHUNK) -> Iterator[bytes]:
    """`src` in chunks, hashed on the way; raises IntegrityError after the last on a mismatch.

    One read serves both the upload and the check, so pushing costs no second pass."""
    h, n = BackgroundHash(), 0
    try:
        with open(src, "rb") as f:
            while data := f.read(chunk):
                h.update(data)
                n += len(data)
                yield data
        digest = h.hexdigest()
    finally:
        h.close()
    if n != size or digest != sha256:
        raise IntegrityError(
            f"{src} does not match the manifest: {n} bytes with sha256 {digest[:12]}..., "
            f"listed as {size} bytes with sha256 {sha256[:12]}..."
        )


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive flock(2) on `path` (created if needed), released on exit or process death."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


class LocalStore:
    """A folder: key "a/b/c" is the file ROOT/a/b/c. Hidden names (".tmp-*", ".locks") are ours."""

    def __init__(self, root: str | Path, *, fsync: bool = True):
        self.root = Path(root).expanduser().absolute()
        self.uri = str(self.root)
        self.fsync = fsync  # flush files before they become visible: a crash keeps them whole

    def _path(self, key: str) -> Path:
        return self.root / key

    def get(self, key: str) -> tuple[bytes, str]:
        try:
            data = self._path(key).read_bytes()
        except FileNotFoundError:
            raise NotFound(f"{key} not found in {self.uri}") from None
        return data, hashlib.sha256(data).hexdigest()

    def stat(self, key: str) -> ObjectInfo | None:
        try:
            st = self._path(key).stat()
        except FileNotFoundError:
            return None
        return ObjectInfo(key, st.st_size, datetime.fromtimestamp(st.st_mtime, UTC))

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        base = self._path(prefix)
        for dirpath, dirnames, filenames in os.walk(base):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            for name in filenames:
                if name.startswith("."):
                    continue
                key = Path(dirpath, name).relative_to(self.root).as_posix()
                if info := self.stat(key):
                    yield info

    def list_dirs(self, prefix: str) -> list[str]:
        try:
            entries = list(os.scandir(self._path(prefix)))
        except FileNotFoundError:
            return []
        return [e.name for e in entries if e.is_dir() and not e.name.startswith(".")]

    def _write_tmp(self, final: Path, chunks) -> Path:
        final.parent.mkdir(parents=True, exist_ok=True)
        return write_temp(final, chunks, fsync=self.fsync)

    def _link_new(self, tmp: Path, final: Path) -> None:
        """Publishes `tmp` as `final` unless `final` exists (AlreadyExists); removes `tmp`."""
        try:
            os.link(tmp, final)
        except FileExistsError:
            raise AlreadyExists(f"{final} exists") from None
        except OSError as e:  # a filesystem without hard links: create-only under a lock instead
            if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EXDEV):
                raise
            with file_lock(self._lock_path(final)):
                if final.exists():
                    raise AlreadyExists(f"{final} exists") from None
                os.replace(tmp, final)
        finally:
            tmp.unlink(missing_ok=True)
        if self.fsync:
            fsync_dir(final.parent)

    def _lock_path(self, final: Path) -> Path:
        return self.root / ".locks" / (final.relative_to(self.root).as_posix() + ".lock")

    def put_new(self, key: str, data: bytes) -> str:
        final = self._path(key)
        self._link_new(self._write_tmp(final, [data]), final)
        return hashlib.sha256(data).hexdigest()

    def put_if_match(self, key: str, data: bytes, etag: str | None) -> str:
        final = self._path(key)
        final.parent.mkdir(parents=True, exist_ok=True)
        with file_lock(self._lock_path(final)):
            try:
                current = sha256_file(final)
            except FileNotFoundError:
                current = None
            if current != etag:
                raise PreconditionFailed(f"{key} changed: expected {etag}, found {current}")
            atomic_write(final, data, fsync=self.fsync)
        return hashlib.sha256(data).hexdigest()

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def upload_file(self, key: str, src: Path, sha256: str, size: int) -> bool:
        final = self._path(key)
        if (info := self.stat(key)) and info.size == size:
            return False
        tmp = self._write_tmp(final, verified_chunks(src, sha256, size))
        try:
            self._link_new(tmp, final)
        except AlreadyExists:
            return False  # another push stored the same bytes meanwhile
        return True

    def read_chunks(self, key: str, offset: int, size: int) -> Iterator[bytes]:
        path = self._path(key)
        if not path.is_file():
            raise NotFound(f"{key} not found in {self.uri}")
        with open(path, "rb") as f:
            f.seek(offset)
            remaining = size - offset
            while remaining > 0 and (data := f.read(min(CHUNK, remaining))):
                remaining -= len(data)
                yield data

    def cleanup(self, before: datetime) -> list[str]:
        removed = []
        for dirpath, dirnames, filenames in os.walk(self.root):
            dirnames[:] = [d for d in dirnames if d != ".locks"]
            for name in filenames:
                path = Path(dirpath, name)
                with contextlib.suppress(FileNotFoundError):
                    if name.startswith(".tmp-") and path.stat().st_mtime < before.timestamp():
                        path.unlink()
                        removed.append(path.relative_to(self.root).as_posix())
        return removed
