"""Training files: uploaded, validated by the trainer's own corpus reader, stored, listed, served
back and deleted — what OpenAI's `client.files.*` calls.

    project_id, limit = begin_upload(s, principal, project)     # files:write, before any byte
    spool = Spool(store.spool_dir, limit, spool_suffix(filename))
    for chunk in body: spool.write(chunk)           # TooLarge (413) past the limit, naming it
    check_form(purpose, filename)
    view = upload(db, store, principal, project_id=project_id, purpose=purpose, filename=filename,
                  spooled=spool.close())

An upload is validated before anything is stored (`aimass_common.corpus.scan_corpus`, the code
`aimass train` reads a corpus with): a binary file, bad UTF-8 or a malformed JSONL line is refused
with the reader's line-numbered message (400), as OpenAI's API refuses a bad file at upload.
A stored file is `processed`. Bytes live in a registry store under `files/<id>`: the folder
$AIMASS_HOME/files by default, the registry's bucket when the registry is on S3.

A request acts in one project (`project_scope`): a key's own; else the one named (id or name,
the `OpenAI-Project` header); else a person's only project; else, for the operator and the
open-access gateway, the project named "default" (created on first use).
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from sqlalchemy import and_, or_, select
from sqlalchemy.orm import Session

from aimass_common.corpus import SUFFIXES, DataError, scan_corpus
from aimass_common.settings import aimass_home
from controlplane import audit, identity, settings
from controlplane.access import Principal, authorize
from controlplane.db import Database
from controlplane.errors import Conflict, InvalidInput, NotFound, TooLarge
from controlplane.models import File, Job, Member, Project, new_id, utcnow
from registry.backends import LocalStore, Store
from registry.stores import open_store

PURPOSES = ("fine-tune",)
DEFAULT_PROJECT = "default"  # the operator's project when none is named
MAX_FILENAME = 255
MAX_LIST = 10_000  # OpenAI's bound on files.list's limit
ACTIVE_JOB_STATUSES = ("validating_files", "queued", "running")


@dataclass(frozen=True)
class FileView:
    id: str
    project_id: str
    filename: str
    purpose: str
    bytes: int
    sha256: str
    status: str  # processed (refused uploads are never stored)
    status_details: str | None
    created_at: datetime


def _view(f: File) -> FileView:
    return FileView(id=f.id, project_id=f.project_id, filename=f.filename, purpose=f.purpose,
                    bytes=f.bytes, sha256=f.sha256, status=f.status,
                    status_details=f.status_details, created_at=f.created_at)  # fmt: skip


def role_lookup(s: Session):
    return lambda project_id, user_id: identity.role_of(s, project_id, user_id)


# ── which project a request acts in ──


def project_scope(s: Session, principal: Principal, project: str | None) -> str:
    """The id of the project the request acts in (see the module docstring); NotFound for a
    project that does not exist or that `principal` is outside of."""
    if principal.kind == "key":
        if project and project not in (principal.project_id, _name_of(s, principal.project_id)):
            raise NotFound(f"no project {project!r}", "project")
        return principal.project_id or ""
    if project:
        row = s.get(Project, project) or identity.project_by_name(s, project)
        if row is None:
            raise NotFound(f"no project {project!r}", "project")
        return row.id
    if principal.kind == "user" and not principal.is_admin:
        mine = list(s.scalars(select(Member.project_id).where(Member.user_id == principal.id)))
        if len(mine) != 1:
            raise InvalidInput(
                f"you are a member of {len(mine)} projects: name one with the OpenAI-Project "
                "header (its id or name)",
                "project",
            )
        return mine[0]
    row = identity.project_by_name(s, DEFAULT_PROJECT)
    if row is not None:
        return row.id
    return identity.create_project(s, principal, DEFAULT_PROJECT).id


def _name_of(s: Session, project_id: str | None) -> str | None:
    row = s.get(Project, project_id) if project_id else None
    return row.name if row is not None else None


# ── where the bytes are ──


class FileStore:
    """Uploaded files' bytes in a registry store, at `files/<file id>`."""

    def __init__(self, store: Store, spool_dir: Path):
        self.store = store
        self.spool_dir = spool_dir  # uploads are streamed here, then validated, then stored

    @classmethod
    def open(cls, registry_uri: str, home: Path | None = None) -> FileStore:
        """The registry's bucket for an s3:// registry; the folder $AIMASS_HOME/files otherwise."""
        home = home or aimass_home()
        store = open_store(registry_uri) if registry_uri.startswith("s3://") else LocalStore(home)
        return cls(store, home / "files" / ".uploads")

    @staticmethod
    def key(file_id: str) -> str:
        return f"files/{file_id}"

    def uri(self, file_id: str) -> str:
        return f"{self.store.uri.rstrip('/')}/{self.key(file_id)}"

    def put(self, file_id: str, src: Path, sha256: str, size: int) -> None:
        self.store.upload_file(self.key(file_id), src, sha256, size)

    def chunks(self, file_id: str, size: int) -> Iterator[bytes]:
        return self.store.read_chunks(self.key(file_id), 0, size)

    def download(self, file_id: str, size: int, dest: Path) -> Path:
        """The file's bytes written to `dest` (a worker's local copy)."""
        dest.parent.mkdir(parents=True, exist_ok=True)
        with open(dest, "wb") as f:
            for chunk in self.chunks(file_id, size):
                f.write(chunk)
        return dest

    def delete(self, file_id: str) -> None:
        self.store.delete(self.key(file_id))


@dataclass(frozen=True)
class Spooled:
    path: Path
    bytes: int
    sha256: str


class Spool:
    """An upload's bytes streamed to a temporary file, hashed and counted as they come; more
    than `limit` bytes raise TooLarge (and remove the file)."""

    def __init__(self, spool_dir: Path, limit: int, suffix: str = ""):
        spool_dir.mkdir(parents=True, exist_ok=True)
        self.limit = limit
        self.path = spool_dir / f"upload-{secrets.token_hex(8)}{suffix}"
        self._file = open(self.path, "wb")  # noqa: SIM115 - closed by close() or discard()
        self._sha = hashlib.sha256()
        self.size = 0

    def write(self, chunk: bytes) -> None:
        self.size += len(chunk)
        if self.size > self.limit:
            self.discard()
            raise too_large(self.limit)
        self._sha.update(chunk)
        self._file.write(chunk)

    def close(self) -> Spooled:
        self._file.close()
        return Spooled(self.path, self.size, self._sha.hexdigest())

    def discard(self) -> None:
        self._file.close()
        self.path.unlink(missing_ok=True)


def too_large(limit: int) -> TooLarge:
    return TooLarge(
        f"the file exceeds the upload limit of {limit} bytes (setting upload_max_bytes)", "file"
    )


def upload_limit(s: Session) -> int:
    """The platform's upload limit (setting `upload_max_bytes`)."""
    return settings.get_all(s)["upload_max_bytes"]


# ── the service ──


def begin_upload(s: Session, principal: Principal, project: str | None) -> tuple[str, int]:
    """Before any byte is read: the project (files:write in it) and the upload limit."""
    project_id = project_scope(s, principal, project)
    authorize(principal, "files:write", project_id, role_lookup(s))
    return project_id, upload_limit(s)


def check_form(purpose: str, filename: str) -> None:
    """The form's fields: a known purpose, a file name with a corpus extension."""
    if purpose not in PURPOSES:
        raise InvalidInput(f"purpose {purpose!r} is not supported; use {', '.join(PURPOSES)}",
                           "purpose")  # fmt: skip
    check_filename(filename)


def check_filename(filename: str) -> str:
    if not filename or len(filename) > MAX_FILENAME or "/" in filename or "\\" in filename:
        raise InvalidInput(
            f"file name {filename[:300]!r} must be 1 to {MAX_FILENAME} characters, no slashes",
            "file",
        )
    suffix = Path(filename).suffix.lower()
    if suffix not in SUFFIXES:
        raise InvalidInput(
            f"file name {filename!r}: unsupported extension {suffix!r}; use {', '.join(SUFFIXES)}",
            "file",
        )
    return filename


def validate(spooled: Spooled, filename: str) -> None:
    """The trainer's corpus validation of the spooled bytes; InvalidInput naming the upload's
    file name and the line at fault."""
    try:
        scan_corpus(spooled.path)
    except DataError as e:
        where = filename if e.line is None else f"{filename}:{e.line}"
        raise InvalidInput(f"{where}: {e.reason}", "file") from None


def upload(
    db: Database,
    store: FileStore,
    principal: Principal,
    *,
    project_id: str,
    purpose: str,
    filename: str,
    spooled: Spooled,
) -> FileView:
    """Validate the spooled upload, store its bytes, then record it (audited); the spool file is
    removed whatever happens. Runs outside any transaction: validating 500 MB takes a while."""
    file_id = new_id("file", "-")
    try:
        validate(spooled, filename)
        store.put(file_id, spooled.path, spooled.sha256, spooled.bytes)
    finally:
        spooled.path.unlink(missing_ok=True)
    try:
        with db.session() as s:
            authorize(principal, "files:write", project_id, role_lookup(s))
            row = File(id=file_id, project_id=project_id, filename=filename, purpose=purpose,
                       bytes=spooled.bytes, sha256=spooled.sha256, status="processed",
                       status_details=None, storage_uri=store.uri(file_id),
                       created_by=principal.actor, created_at=utcnow())  # fmt: skip
            s.add(row)
            audit.record(s, principal, "file.create", file_id, project_id=project_id,
                         after={"filename": filename, "bytes": spooled.bytes,
                                "sha256": spooled.sha256})  # fmt: skip
            return _view(row)
    except BaseException:
        store.delete(file_id)
        raise


def project_thing(s: Session, principal: Principal, table, row_id: str, action: str,
                  missing: NotFound):  # fmt: skip
    """The row of `table` (a file, a job) if `principal` may `action` in its project; `missing`
    is raised otherwise, for another project's row as for an absent one."""
    row = s.get(table, row_id)
    if row is None:
        raise missing
    try:
        authorize(principal, action, row.project_id, role_lookup(s))
    except NotFound:
        raise missing from None
    return row


def file_row(s: Session, principal: Principal, file_id: str, action: str = "files:read") -> File:
    missing = NotFound(f"no file {file_id!r}", "file_id")
    return project_thing(s, principal, File, file_id, action, missing)


def retrieve(s: Session, principal: Principal, file_id: str) -> FileView:
    return _view(file_row(s, principal, file_id))


def list_files(
    s: Session,
    principal: Principal,
    *,
    project: str | None = None,
    purpose: str | None = None,
    order: str = "desc",
    limit: int = MAX_LIST,
    after: str | None = None,
) -> list[FileView]:
    """The project's files by creation time (`order` asc|desc), those after the file `after`."""
    project_id = project_scope(s, principal, project)
    authorize(principal, "files:read", project_id, role_lookup(s))
    check_limit(limit, MAX_LIST)
    if order not in ("asc", "desc"):
        raise InvalidInput(f"order {order!r} must be asc or desc", "order")
    query = select(File).where(File.project_id == project_id)
    if purpose is not None:
        query = query.where(File.purpose == purpose)
    if after is not None:
        cursor = file_row(s, principal, after)
        query = query.where(beyond(File, cursor.created_at, cursor.id, order))
    ordering = (File.created_at, File.id) if order == "asc" else (File.created_at.desc(),
                                                                   File.id.desc())  # fmt: skip
    return [_view(f) for f in s.scalars(query.order_by(*ordering).limit(limit))]


def beyond(table, created_at: datetime, row_id: str, order: str):
    """Rows strictly after (created_at, id) in `order`: the page after a cursor."""
    if order == "asc":
        return or_(table.created_at > created_at,
                   and_(table.created_at == created_at, table.id > row_id))  # fmt: skip
    return or_(table.created_at < created_at,
               and_(table.created_at == created_at, table.id < row_id))  # fmt: skip


def check_limit(limit: int, most: int) -> int:
    if not 1 <= limit <= most:
        raise InvalidInput(f"limit={limit} must be in 1..{most}", "limit")
    return limit


def content(s: Session, principal: Principal, store: FileStore, file_id: str) -> Iterator[bytes]:
    """The file's bytes, as uploaded."""
    row = file_row(s, principal, file_id)
    return store.chunks(row.id, row.bytes)


def delete(s: Session, principal: Principal, store: FileStore, file_id: str) -> FileView:
    """Remove the record and the bytes; refused (409) while a job that reads it is active."""
    row = file_row(s, principal, file_id, "files:write")
    active = s.scalar(
        select(Job.id).where(
            or_(Job.training_file == file_id, Job.validation_file == file_id),
            Job.status.in_(ACTIVE_JOB_STATUSES),
        )
    )
    if active is not None:
        raise Conflict(f"file {file_id} is used by job {active}, which has not finished", "file_id")
    view = _view(row)
    s.delete(row)
    audit.record(s, principal, "file.delete", file_id, project_id=row.project_id,
                 before={"filename": row.filename, "bytes": row.bytes})  # fmt: skip
    s.flush()
    store.delete(file_id)
    return view


def spool_suffix(filename: str) -> str:
    """The upload's extension, which decides how the corpus reader reads it; "" for any other
    (a name of any length or bytes must not reach the spool's path: check_form refuses it)."""
    suffix = Path(filename).suffix.lower()
    return suffix if suffix in SUFFIXES else ""
