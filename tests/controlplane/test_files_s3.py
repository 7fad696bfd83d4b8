"""Training files when the registry is on S3 (moto's standalone server over HTTP, the registry
tests' fixture): an upload's bytes go to the registry's bucket under files/<id>, come back as
uploaded (the content route's way and a worker's download), are deleted with the record, and a
refused upload leaves nothing in the bucket; a worker trains from a file stored there."""

from __future__ import annotations

import json
import uuid

import pytest

from controlplane import files, jobs
from controlplane.access import CLI
from controlplane.db import Database
from controlplane.errors import InvalidInput
from controlplane.identity import create_project
from registry.registry import Registry
from tests.conftest import DEMO_CORPUS
from tests.registry.conftest import BUCKET, s3_client, s3_endpoint  # noqa: F401 (fixtures)

TEXT_JSONL = b'{"text": "The cat sat on the mat."}\n{"text": "A dog barked."}\n'


@pytest.fixture
def registry_uri(s3_client) -> str:  # noqa: F811 (the fixture imported above)
    """A registry of its own in the test bucket."""
    return f"s3://{BUCKET}/{uuid.uuid4().hex[:12]}"


@pytest.fixture
def store(registry_uri, tmp_path) -> files.FileStore:
    return files.FileStore.open(registry_uri, home=tmp_path / "home")


def _upload(db, store, data: bytes, filename: str = "corpus.jsonl") -> files.FileView:
    with db.session() as s:
        project_id, limit = files.begin_upload(s, CLI, None)
    spool = files.Spool(store.spool_dir, limit, files.spool_suffix(filename))
    for i in range(0, len(data), 16):  # in pieces, as a stream arrives
        spool.write(data[i : i + 16])
    return files.upload(db, store, CLI, project_id=project_id, purpose="fine-tune",
                        filename=filename, spooled=spool.close())  # fmt: skip


def _objects(s3, registry_uri: str) -> list[str]:
    """The keys under the registry's files/ prefix in the bucket."""
    prefix = registry_uri.removeprefix(f"s3://{BUCKET}/") + "/files/"
    listed = s3.list_objects_v2(Bucket=BUCKET, Prefix=prefix)
    return [o["Key"].removeprefix(prefix) for o in listed.get("Contents", [])]


def test_an_upload_is_stored_in_the_bucket_and_served_back(db, store, registry_uri, s3_client):  # noqa: F811
    view = _upload(db, store, TEXT_JSONL)
    assert _objects(s3_client, registry_uri) == [view.id]
    with db.session() as s:
        row = files.file_row(s, CLI, view.id)
        assert row.storage_uri == f"{registry_uri}/files/{view.id}"
        assert b"".join(files.content(s, CLI, store, view.id)) == TEXT_JSONL
    copy = store.download(view.id, view.bytes, store.spool_dir.parent / "copy.jsonl")
    assert copy.read_bytes() == TEXT_JSONL
    assert list(store.spool_dir.iterdir()) == []  # the spool file is gone once stored

    with db.session() as s:
        files.delete(s, CLI, store, view.id)
    assert _objects(s3_client, registry_uri) == []
    with db.session() as s:
        assert files.list_files(s, CLI) == []


def test_a_refused_upload_leaves_nothing_in_the_bucket(db, store, registry_uri, s3_client):  # noqa: F811
    with pytest.raises(InvalidInput, match=r"corpus\.jsonl:2"):
        _upload(db, store, b'{"text": "fine"}\n{"text": \n')
    assert _objects(s3_client, registry_uri) == []
    with db.session() as s:
        assert files.list_files(s, CLI) == []


@pytest.mark.slow
def test_a_worker_trains_from_a_file_in_the_bucket(tmp_path, store, registry_uri):
    from worker.worker import Worker, WorkerConfig  # deferred: torch (the trainer)

    db = Database.open(f"sqlite:///{tmp_path / 'aimass.db'}")
    db.upgrade()
    text = DEMO_CORPUS.read_text(encoding="utf-8")[:20_000]
    corpus = "".join(json.dumps({"text": p}) + "\n" for p in text.split("\n\n") if p.strip())
    with db.session() as s:
        create_project(s, CLI, files.DEFAULT_PROJECT)
    view = _upload(db, store, corpus.encode())
    fast = {"max_steps": 3, "batch_size": 4, "block_size": 32, "eval_interval": 3}
    with db.session() as s:
        job_id = jobs.create(s, CLI, training_file=view.id, model="tiny", seed=5,
                             hyperparameters=fast).id  # fmt: skip
    registry = Registry.open(registry_uri)
    worker = Worker(db, registry, store, tmp_path / "jobs", WorkerConfig(), "w-s3")
    try:
        assert worker.run_one() == job_id
        with db.session() as s:
            job = jobs.retrieve(s, CLI, job_id)
        assert job.status == "succeeded", job
        # the worker's copy of the training file, downloaded from the bucket, is the upload
        copies = list((tmp_path / "jobs").rglob(f"{view.id}.jsonl"))
        assert [c.read_bytes() for c in copies] == [corpus.encode()]
        name, version = job.fine_tuned_model.split(":")
        manifest = registry.manifest(name, int(version))
        assert manifest.lineage.training_file_sha256 == view.sha256
    finally:
        db.close()
