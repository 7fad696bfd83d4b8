"""The registry's errors: one closed set. Library code raises them; only the CLI exits.

    error                 meaning                                              CLI exit
    RegistryError         bad input: a name, a reference, a package            2
    NotFound              no such model, version, alias or object              2
    StorageError          the store failed (network, permissions, bucket)      1
    AliasConflict         compare-and-swap lost: the alias moved meanwhile     3
    ReportConflict        (an AliasConflict) a report changed meanwhile, or    3
                          exists where expect_absent said there was none
    GateFailed            promotion refused; names the failed gates            4
    IntegrityError        bytes do not match their sha256                      5

`AlreadyExists` and `PreconditionFailed` are the store's answers to a create-only or a
compare-and-swap write; the operations turn them into a next version number or an
`AliasConflict`, so they reach a user only through a bug.
"""

from __future__ import annotations


class RegistryError(Exception):
    """Base of every registry error; on its own: bad input (a name, a reference, a package)."""


class NotFound(RegistryError):
    """No such model, version, alias or stored object."""


class StorageError(RegistryError):
    """The backend failed: unreachable endpoint, missing bucket, denied access."""


class AlreadyExists(RegistryError):
    """A create-only write found the key there (S3 412 on If-None-Match, or the file exists)."""


class PreconditionFailed(RegistryError):
    """A compare-and-swap write found another version of the object (S3 412/409 or 404)."""


class AliasConflict(RegistryError):
    """An alias moved between our read and our write, or is not where --expect said."""


class ReportConflict(AliasConflict):
    """An attached report was written by someone else between our read and our write, or is
    there where the writer expected none; a lost compare-and-swap like AliasConflict's."""


class GateFailed(RegistryError):
    """A promotion gate refused the version; `failed` holds the gates' results."""

    def __init__(self, message: str, failed: list | None = None):
        super().__init__(message)
        self.failed = failed or []


class IntegrityError(RegistryError):
    """Bytes read (a blob, a pulled file, a package being pushed) do not match their sha256."""
