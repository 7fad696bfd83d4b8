"""A registry URI to its store: a folder path, file:///path, or s3://bucket/prefix.

Its own module because it names both backends: registry/s3.py builds on registry/backends.py, so
choosing between them cannot live in either.
"""

from __future__ import annotations

from urllib.parse import unquote, urlparse

from registry.backends import LocalStore, Store
from registry.errors import RegistryError


def open_store(uri: str) -> Store:
    """A folder path, file:///path, or s3://bucket/prefix."""
    if uri.startswith("s3://"):
        # boto3 is imported only by S3 users
        from registry.s3 import S3Store

        return S3Store.from_uri(uri)
    if uri.startswith("file://"):
        parsed = urlparse(uri)
        if parsed.netloc not in ("", "localhost"):
            raise RegistryError(f"file:// URI {uri!r} names a host; use file:///absolute/path")
        return LocalStore(unquote(parsed.path))
    if "://" in uri:
        scheme = uri.split("://", 1)[0]
        raise RegistryError(
            f"registry URI scheme {scheme!r} is not supported (a folder, file://, s3://)"
        )
    return LocalStore(uri)
