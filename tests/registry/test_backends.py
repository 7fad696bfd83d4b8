"""The stores underneath: conditional writes, multipart uploads, URIs, names and references."""

from __future__ import annotations

import hashlib
import os
from datetime import UTC, datetime, timedelta

import pytest

from registry.backends import LocalStore
from registry.errors import AlreadyExists, IntegrityError, RegistryError, StorageError
from registry.names import Ref, parse_ref
from registry.stores import open_store


def _store(reg):
    return reg.store


def test_create_only_writes(reg):
    store = _store(reg)
    store.put_new("a/b.json", b"first")
    with pytest.raises(AlreadyExists):
        store.put_new("a/b.json", b"second")
    assert store.get("a/b.json")[0] == b"first"
    assert [i.key for i in store.list("a/")] == ["a/b.json"]
    assert store.list_dirs("") == ["a"]


def test_blob_upload_checks_the_hash_and_stores_nothing_on_a_mismatch(reg, tmp_path):
    store = _store(reg)
    data = os.urandom(11 << 20)  # over the test multipart threshold on S3
    src = tmp_path / "blob"
    src.write_bytes(data)
    sha = hashlib.sha256(data).hexdigest()
    with pytest.raises(IntegrityError):
        store.upload_file("blobs/sha256/wrong", src, "0" * 64, len(data))
    assert store.stat("blobs/sha256/wrong") is None
    assert store.upload_file(f"blobs/sha256/{sha}", src, sha, len(data)) is True
    assert store.upload_file(f"blobs/sha256/{sha}", src, sha, len(data)) is False  # stored once
    got = b"".join(store.read_chunks(f"blobs/sha256/{sha}", 0, len(data)))
    assert got == data
    assert b"".join(store.read_chunks(f"blobs/sha256/{sha}", 7 << 20, len(data))) == data[7 << 20 :]


@pytest.mark.parametrize("registry_uri", ["s3"], indirect=True)
def test_multipart_completion_is_create_only(reg, tmp_path, monkeypatch):
    store = _store(reg)
    data = os.urandom(6 << 20)
    src = tmp_path / "blob"
    src.write_bytes(data)
    sha = hashlib.sha256(data).hexdigest()
    key = f"blobs/sha256/{sha}"
    # a racing push finishes the same blob between our existence check and our completion
    monkeypatch.setattr(store, "stat", lambda k: None)
    store.client.put_object(Bucket=store.bucket, Key=store._k(key), Body=data)
    with pytest.raises(AlreadyExists):  # 412 on CompleteMultipartUpload If-None-Match
        store._upload_parts(key, src, sha, len(data))
    uploads = store.client.list_multipart_uploads(Bucket=store.bucket, Prefix=store.prefix)
    assert uploads.get("Uploads", []) == []  # and the losing upload was aborted


@pytest.mark.parametrize("registry_uri", ["s3"], indirect=True)
def test_cleanup_aborts_stale_multipart_uploads(reg):
    store = _store(reg)
    store.client.create_multipart_upload(Bucket=store.bucket, Key=store._k("blobs/sha256/x"))
    assert store.cleanup(datetime.now(UTC) + timedelta(days=1)) == ["upload of blobs/sha256/x"]


def test_local_cleanup_removes_old_temporary_files(tmp_path):
    store = LocalStore(tmp_path)
    (tmp_path / "blobs").mkdir()
    (tmp_path / "blobs" / ".tmp-abc-x").write_bytes(b"half")
    assert store.cleanup(datetime.now(UTC) - timedelta(days=1)) == []
    assert store.cleanup(datetime.now(UTC) + timedelta(days=1)) == ["blobs/.tmp-abc-x"]
    assert list(store.list("")) == []


def test_uris(tmp_path, s3_endpoint):
    assert open_store(str(tmp_path)).root == tmp_path
    assert open_store(f"file://{tmp_path}").root == tmp_path
    s3 = open_store("s3://bucket/some/prefix/")
    assert (s3.bucket, s3.prefix, s3.uri) == ("bucket", "some/prefix/", "s3://bucket/some/prefix")
    assert open_store("s3://bucket").prefix == ""
    with pytest.raises(RegistryError, match="scheme 'gs' is not supported"):
        open_store("gs://bucket")
    with pytest.raises(RegistryError, match="names a host"):
        open_store("file://host/path")


def test_a_missing_bucket_is_a_storage_error(s3_endpoint):
    from registry.registry import Registry

    with pytest.raises(StorageError, match="NoSuchBucket"):
        Registry.open("s3://no-such-bucket/x").versions("tiny")


def test_references():
    assert parse_ref("tiny") == Ref("tiny")
    assert parse_ref("tiny:3") == parse_ref("tiny:v3") == Ref("tiny", version=3)
    assert parse_ref("tiny@production") == Ref("tiny", alias="production")
    with pytest.raises(RegistryError, match="not a version number"):
        parse_ref("tiny:latest")
    with pytest.raises(RegistryError, match="alias"):
        parse_ref("tiny@../x")
