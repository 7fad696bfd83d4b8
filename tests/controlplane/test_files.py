"""Training files on SQLite and PostgreSQL: uploads validated by the trainer's corpus reader
(bad ones refused with its line-numbered message and nothing stored), the size limit, storage
under files/<id>, listing (purpose, order, paging), content, delete, and isolation."""

from __future__ import annotations

import json

import pytest

from controlplane import files
from controlplane.access import CLI, Principal
from controlplane.errors import Conflict, Forbidden, InvalidInput, NotFound, TooLarge
from controlplane.identity import create_project
from controlplane.models import AuditEntry, Member, User, utcnow

TEXT_JSONL = b'{"text": "The cat sat on the mat."}\n{"text": "A dog barked."}\n'
CHAT_JSONL = (
    json.dumps({"messages": [{"role": "user", "content": "hi"},
                             {"role": "assistant", "content": "hello"}]}) + "\n"
).encode()  # fmt: skip


def project(db, name: str = "acme") -> str:
    with db.session() as s:
        return create_project(s, CLI, name).id


def member(db, project_id: str, role: str) -> Principal:
    user_id = f"user_{role}_{project_id[-4:]}"
    with db.session() as s:
        s.add(User(id=user_id, email=f"{user_id}@x.org", display_name=role, password_hash="-",
                   is_admin=False, created_at=utcnow()))  # fmt: skip
        s.flush()
        s.add(Member(project_id=project_id, user_id=user_id, role=role, created_at=utcnow()))
    return Principal("user", user_id)


def key_of(project_id: str, role: str = "developer") -> Principal:
    return Principal("key", "k" + project_id[-6:], project_id=project_id, role=role,
                     scopes=("train",))  # fmt: skip


@pytest.fixture
def store(tmp_path):
    return files.FileStore.open(str(tmp_path / "registry"), home=tmp_path / "home")


def upload(db, store, principal, data: bytes, filename="corpus.jsonl", project=None, limit=1 << 20):
    with db.session() as s:
        project_id, _ = files.begin_upload(s, principal, project)
    files.check_form("fine-tune", filename)
    spool = files.Spool(store.spool_dir, limit, files.spool_suffix(filename))
    for i in range(0, len(data), 7):  # in pieces, as a stream arrives
        spool.write(data[i : i + 7])
    return files.upload(db, store, principal, project_id=project_id, purpose="fine-tune",
                        filename=filename, spooled=spool.close())  # fmt: skip


def stored(store) -> list[str]:
    root = store.store.root / "files"
    return sorted(p.name for p in root.iterdir() if p.is_file()) if root.exists() else []


def test_upload_is_validated_stored_and_served_back(db, store):
    p = project(db)
    dev = member(db, p, "developer")
    view = upload(db, store, dev, TEXT_JSONL)
    assert view.status == "processed" and view.bytes == len(TEXT_JSONL)
    assert view.id.startswith("file-") and view.project_id == p
    assert stored(store) == [view.id]
    with db.session() as s:
        assert files.retrieve(s, dev, view.id) == view
        assert b"".join(files.content(s, dev, store, view.id)) == TEXT_JSONL
        entry = s.query(AuditEntry).filter_by(action="file.create").one()
        assert entry.target == view.id and entry.actor == dev.actor
    assert list(store.spool_dir.iterdir()) == []  # the spool file is gone


def test_chat_messages_are_accepted(db, store):
    p = project(db)
    assert upload(db, store, key_of(p), CHAT_JSONL).status == "processed"


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"\x89PNG\r\n\x1a\n\0\0", "bad.jsonl: binary file: this looks like a PNG image"),
        (b'{"text": "ok"}\n{"text": "caf\xe9"}\n', "bad.jsonl:2: not valid UTF-8: byte 0xe9"),
        (b'{"text": "ok"}\n{"text": \n', "bad.jsonl:2: malformed JSON"),
        (b'{"text": "ok"}\n{"prompt": "x"}\n', 'bad.jsonl:2: missing field "text"'),
    ],
)
def test_a_bad_upload_is_refused_with_the_line_and_nothing_is_stored(db, store, data, message):
    p = project(db)
    with pytest.raises(InvalidInput) as err:
        upload(db, store, key_of(p), data, filename="bad.jsonl")
    assert str(err.value).startswith(message) and err.value.param == "file"
    assert stored(store) == [] and list(store.spool_dir.iterdir()) == []
    with db.session() as s:
        assert files.list_files(s, key_of(p)) == []


def test_an_upload_over_the_limit_is_refused_naming_the_limit(db, store):
    p = project(db)
    with pytest.raises(TooLarge, match="upload limit of 20 bytes"):
        upload(db, store, key_of(p), TEXT_JSONL, limit=20)
    assert list(store.spool_dir.iterdir()) == []
    with db.session() as s:
        assert files.upload_limit(s) == 512 << 20  # the platform setting's default


def test_fields_are_checked_before_any_byte(db):
    p = project(db)
    with db.session() as s:
        assert files.begin_upload(s, key_of(p), None) == (p, 512 << 20)
    with pytest.raises(InvalidInput, match="purpose 'assistants' is not supported"):
        files.check_form("assistants", "a.jsonl")
    with pytest.raises(InvalidInput, match=r"unsupported extension '\.pdf'"):
        files.check_form("fine-tune", "a.pdf")


def test_list_filters_orders_and_pages(db, store):
    p = project(db)
    k = key_of(p)
    ids = [upload(db, store, k, TEXT_JSONL, filename=f"f{i}.jsonl").id for i in range(3)]
    with db.session() as s:
        newest_first = [f.id for f in files.list_files(s, k)]
        assert newest_first == ids[::-1]
        assert [f.id for f in files.list_files(s, k, order="asc")] == ids
        assert [f.id for f in files.list_files(s, k, order="asc", after=ids[0], limit=1)] == [
            ids[1]
        ]
        assert files.list_files(s, k, purpose="batch") == []
        with pytest.raises(InvalidInput, match=r"limit=0 must be in 1\.\.10000"):
            files.list_files(s, k, limit=0)


def test_delete_removes_the_bytes_unless_a_job_reads_the_file(db, store):
    from controlplane import jobs

    p = project(db)
    k = key_of(p)
    used, free = (upload(db, store, k, TEXT_JSONL).id for _ in range(2))
    with db.session() as s:
        jobs.create(s, k, model="tiny", training_file=used)
    with db.session() as s:
        files.delete(s, k, store, free)
    assert stored(store) == [used]
    with db.session() as s, pytest.raises(Conflict, match="is used by job ftjob-"):
        files.delete(s, k, store, used)
    with db.session() as s, pytest.raises(NotFound):
        files.retrieve(s, k, free)


def test_another_projects_file_is_absent_and_a_viewer_cannot_upload(db, store):
    a, b = project(db, "a"), project(db, "b")
    view = upload(db, store, key_of(a), TEXT_JSONL)
    with db.session() as s:
        with pytest.raises(NotFound, match=f"no file '{view.id}'"):
            files.retrieve(s, key_of(b), view.id)
        with pytest.raises(NotFound):
            files.retrieve(s, member(db, b, "owner"), view.id)
        with pytest.raises(Forbidden):
            files.begin_upload(s, member(db, a, "viewer"), None)
        with pytest.raises(NotFound, match="no project 'b'"):
            files.begin_upload(s, key_of(a), "b")


def test_the_operator_acts_in_the_default_project(db, store):
    view = upload(db, store, CLI, TEXT_JSONL)
    with db.session() as s:
        assert files.project_scope(s, CLI, None) == view.project_id
        assert files.project_scope(s, CLI, "default") == view.project_id
