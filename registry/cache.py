"""Pulling a version into the local cache, verified before anything uses it.

    $AIMASS_HOME/cache/
      blobs/sha256/<hex>            a file whose bytes matched <hex>; read-only, shared by every
                                    version (of any registry) that holds the same bytes
      blobs/sha256/<hex>.partial    a download in progress: the bytes so far, in order, so an
                                    interrupted pull continues from its length
      packages/<manifest sha256>/   manifest.json + every listed file at its path (hard links to
                                    the blobs); complete once manifest.json is there
      packages/<manifest sha256>.verified   which of its files are verified blobs, by identity,
                                    so that the engine's load does not hash them again
                                    (registry/verified.py)
      locks/                        flock files: one per package, one per blob

Several processes may pull at once: a package is built under its lock, a blob is downloaded
under its own (two versions may share it), and both appear by rename only when whole. A
download that does not match its sha256 is deleted and raises IntegrityError; a resumed one
that fails is retried once from the start, since the bytes kept from before may be the bad ones.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

from aimass_common.files import publish_file, sha256_file, staged_dir
from aimass_common.settings import aimass_home
from registry.backends import BackgroundHash, file_lock
from registry.errors import IntegrityError, RegistryError
from registry.manifest import MANIFEST, Manifest, decode, path_problem
from registry.names import Ref
from registry.registry import Registry, blob_key
from registry.verified import forget, record

READ = 8 << 20


def default_cache_dir() -> Path:
    return aimass_home() / "cache"


def pull(
    registry: Registry,
    ref: Ref | str,
    *,
    cache_dir: str | Path | None = None,
    to: str | Path | None = None,
    verify: bool = False,
) -> Path:
    """The folder of the package `ref` names, in the cache (or copied to `to`, which must be
    new or empty). Downloads only what the cache lacks. `verify`: hash cached files again."""
    name, version = registry.resolve(ref)
    data = registry.manifest_bytes(name, version)
    manifest = decode(data)
    for e in manifest.files():  # the manifest decides where files land: never outside
        if problem := path_problem(e.path):
            raise RegistryError(f"{name}:{version} lists an unsafe path: {problem}")
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    digest = hashlib.sha256(data).hexdigest()
    package = cache / "packages" / digest
    with file_lock(cache / "locks" / f"package-{digest}.lock"):
        if not _usable(package, manifest, cache, verify):
            sizes = {e.sha256: e.size for e in manifest.files()}
            for sha, size in sizes.items():
                fetch_blob(registry, sha, size, cache)
            _materialise(package, manifest, data, cache, link=True)
            record(package, manifest.files())  # hard links to verified blobs, linked now
        elif verify:  # every file hashed again just now
            record(package, manifest.files())
    if to is None:
        return package
    _materialise(Path(to), manifest, data, cache, link=False)
    return Path(to)


def fetch_blob(registry: Registry, sha: str, size: int, cache: Path) -> Path:
    """The cached, verified file with these bytes, downloaded (or resumed) if missing."""
    final = cache / "blobs" / "sha256" / sha
    if final.is_file() and final.stat().st_size == size:
        return final
    with file_lock(cache / "locks" / f"blob-{sha}.lock"):
        if final.is_file() and final.stat().st_size == size:
            return final  # another process fetched it while this one waited
        final.parent.mkdir(parents=True, exist_ok=True)
        partial = final.with_name(f"{sha}.partial")
        while True:
            offset = partial.stat().st_size if partial.exists() else 0
            if offset > size:
                partial.unlink()
                offset = 0
            if _download(registry, sha, size, partial, offset) == sha:
                os.chmod(partial, 0o444)  # shared by hard links: nobody edits a cached file
                publish_file(partial, final)
                return final
            partial.unlink()
            if offset == 0:
                raise IntegrityError(
                    f"blob {sha} in {registry.store.uri} does not match its sha256: "
                    "the stored bytes are corrupt or were replaced; nothing was kept"
                )


def _download(registry: Registry, sha: str, size: int, partial: Path, offset: int) -> str:
    """Appends the blob from `offset` to `partial`; returns the sha256 of the whole file."""
    h = BackgroundHash()
    try:
        if offset:
            with open(partial, "rb") as f:
                while data := f.read(READ):
                    h.update(data)
        with open(partial, "ab") as f:
            for data in registry.store.read_chunks(blob_key(sha), offset, size):
                h.update(data)
                f.write(data)
        digest = h.hexdigest()
    finally:
        h.close()
    return digest if partial.stat().st_size == size else ""


def _usable(package: Path, manifest: Manifest, cache: Path, verify: bool) -> bool:
    """Whether the cached package is whole; files found bad are removed, to be fetched again."""
    if not (package / MANIFEST).is_file():
        return False
    bad = []
    for e in manifest.files():
        path = package / e.path
        if (
            not path.is_file()
            or path.stat().st_size != e.size
            or verify
            and sha256_file(path) != e.sha256
        ):
            bad.append(e)
    if not bad:
        return True
    forget(package)
    shutil.rmtree(package)
    for e in bad:
        (cache / "blobs" / "sha256" / e.sha256).unlink(missing_ok=True)
    return False


def _materialise(dest: Path, manifest: Manifest, data: bytes, cache: Path, *, link: bool) -> None:
    """Builds the package folder beside `dest` and renames it into place, manifest last."""
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise RegistryError(f"{dest} exists and is not an empty folder")
    with staged_dir(dest) as tmp:
        for e in manifest.files():
            target = tmp / e.path
            target.parent.mkdir(parents=True, exist_ok=True)
            blob = cache / "blobs" / "sha256" / e.sha256
            if link:
                try:
                    os.link(blob, target)
                    continue
                except OSError:
                    pass  # another filesystem, or no hard links: copy instead
            shutil.copyfile(blob, target)
        (tmp / MANIFEST).write_bytes(data)
