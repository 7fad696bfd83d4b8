"""The S3 backend: s3://bucket/prefix on AWS or any S3-compatible store (MinIO, R2, Ceph).

The endpoint, region and credentials come from the usual AWS settings (AWS_ENDPOINT_URL or
AWS_ENDPOINT_URL_S3, AWS_REGION, AWS_PROFILE, ~/.aws/config, instance roles), read by boto3.

Conditional writes carry the registry's guarantees (AWS S3 conditional writes, Aug/Nov 2024):
    create-only       PutObject / CompleteMultipartUpload with If-None-Match: *  → 412 if there
    compare-and-swap  PutObject with If-Match: <etag>                            → 412 if moved,
                                                                                   404 if gone
A 409 ConditionalRequestConflict (a racing write in flight) counts as losing the race.
boto3's managed transfers cannot send If-None-Match (s3transfer refuses the argument), so large
files go up by a multipart upload driven here: the parts in parallel, the file hashed as it is
read, and the completion create-only. An upload that fails or does not match its sha256 is
aborted, so nothing appears at the key.
"""

from __future__ import annotations

import contextlib
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from registry.backends import ObjectInfo, verified_chunks
from registry.errors import AlreadyExists, NotFound, PreconditionFailed, StorageError


@contextlib.contextmanager
def _errors(what: str, conflict: type[Exception] = StorageError) -> Iterator[None]:
    """Turns boto errors into ours; `conflict` is raised for 412 and 409 (a lost condition)."""
    try:
        yield
    except ClientError as e:
        code = e.response.get("Error", {}).get("Code", "")
        status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        if code in ("PreconditionFailed", "ConditionalRequestConflict") or status in (409, 412):
            raise conflict(f"{what}: {code or status}") from None
        if code in ("NoSuchKey", "NotFound") or (status == 404 and code != "NoSuchBucket"):
            raise NotFound(f"{what}: not found") from None
        message = e.response.get("Error", {}).get("Message", "")
        raise StorageError(f"{what}: {code or status} {message}".strip()) from None
    except BotoCoreError as e:
        raise StorageError(f"{what}: {e}") from None


class S3Store:
    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        client=None,
        part_size: int = 8 << 20,  # bytes per uploaded part (s3transfer's default too)
        multipart_threshold: int | None = None,  # files from this size go up in parts
        # (default: part_size, so any file of two parts or more is sent in parallel)
        range_size: int = 16 << 20,  # bytes per ranged GET (fewer, larger requests measured
        # faster against moto; S3 serves either at full speed)
        workers: int = 10,  # requests in flight, up or down
    ):
        self.bucket = bucket
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self.uri = f"s3://{bucket}/{self.prefix}".rstrip("/")
        self.part_size = part_size
        self.multipart_threshold = multipart_threshold or part_size
        self.range_size = range_size
        self.workers = workers
        config = Config(max_pool_connections=2 * workers, retries={"mode": "standard"})
        self.client = client or boto3.session.Session().client("s3", config=config)

    @classmethod
    def from_uri(cls, uri: str, **kw) -> S3Store:
        bucket, _, prefix = uri.removeprefix("s3://").partition("/")
        if not bucket:
            raise StorageError(f"{uri!r} names no bucket: use s3://bucket/prefix")
        return cls(bucket, prefix, **kw)

    def _k(self, key: str) -> str:
        return self.prefix + key

    def get(self, key: str) -> tuple[bytes, str]:
        with _errors(f"{self.uri}/{key}"):
            r = self.client.get_object(Bucket=self.bucket, Key=self._k(key))
            return r["Body"].read(), r["ETag"]

    def stat(self, key: str) -> ObjectInfo | None:
        try:
            with _errors(f"{self.uri}/{key}"):
                r = self.client.head_object(Bucket=self.bucket, Key=self._k(key))
        except NotFound:
            return None
        return ObjectInfo(key, r["ContentLength"], r["LastModified"])

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        pages = self.client.get_paginator("list_objects_v2")
        with _errors(f"listing {self.uri}/{prefix}"):
            for page in pages.paginate(Bucket=self.bucket, Prefix=self._k(prefix)):
                for o in page.get("Contents", []):
                    key = o["Key"][len(self.prefix) :]
                    yield ObjectInfo(key, o["Size"], o["LastModified"])

    def list_dirs(self, prefix: str) -> list[str]:
        pages = self.client.get_paginator("list_objects_v2")
        full, names = self._k(prefix), []
        with _errors(f"listing {self.uri}/{prefix}"):
            for page in pages.paginate(Bucket=self.bucket, Prefix=full, Delimiter="/"):
                names += [
                    p["Prefix"][len(full) :].rstrip("/") for p in page.get("CommonPrefixes", [])
                ]
        return names

    def put_new(self, key: str, data: bytes) -> str:
        with _errors(f"{self.uri}/{key}", AlreadyExists):
            r = self.client.put_object(
                Bucket=self.bucket, Key=self._k(key), Body=data, IfNoneMatch="*"
            )
        return r["ETag"]

    def put_if_match(self, key: str, data: bytes, etag: str | None) -> str:
        condition = {"IfNoneMatch": "*"} if etag is None else {"IfMatch": etag}
        try:
            with _errors(f"{self.uri}/{key}", PreconditionFailed):
                r = self.client.put_object(
                    Bucket=self.bucket, Key=self._k(key), Body=data, **condition
                )
        except NotFound:  # If-Match on a key deleted meanwhile: the race is lost all the same
            raise PreconditionFailed(f"{self.uri}/{key}: gone") from None
        return r["ETag"]

    def delete(self, key: str) -> None:
        with _errors(f"{self.uri}/{key}"):
            self.client.delete_object(Bucket=self.bucket, Key=self._k(key))

    def upload_file(self, key: str, src: Path, sha256: str, size: int) -> bool:
        for _ in range(3):  # a 409 means a racing upload of the same bytes, which may fail
            if (info := self.stat(key)) and info.size == size:
                return False
            try:
                if size < self.multipart_threshold:
                    self.put_new(key, b"".join(verified_chunks(src, sha256, size)))
                else:
                    self._upload_parts(key, src, sha256, size)
                return True
            except AlreadyExists:
                continue
        return False

    def _upload_parts(self, key: str, src: Path, sha256: str, size: int) -> None:
        k = self._k(key)
        with _errors(f"{self.uri}/{key}"):  # CRC32 per part, checked by S3, as s3transfer does
            r = self.client.create_multipart_upload(
                Bucket=self.bucket, Key=k, ChecksumAlgorithm="CRC32"
            )
            upload_id = r["UploadId"]
        try:
            parts, pending = [], deque()
            # S3 allows 10,000 parts: past 80 GB the parts grow (in whole MiB)
            part_size = max(self.part_size, -(-size // (10_000 << 20)) << 20)
            with ThreadPoolExecutor(self.workers) as pool:
                chunks = verified_chunks(src, sha256, size, part_size)
                for number, data in enumerate(chunks, 1):
                    pending.append(
                        (number, pool.submit(self._put_part, k, upload_id, number, data))
                    )
                    while len(pending) >= self.workers:  # at most `workers` parts in memory
                        parts.append(pending.popleft()[1].result())
                parts += [f.result() for _, f in pending]
            with _errors(f"{self.uri}/{key}", AlreadyExists):
                self.client.complete_multipart_upload(
                    Bucket=self.bucket,
                    Key=k,
                    UploadId=upload_id,
                    MultipartUpload={"Parts": parts},
                    IfNoneMatch="*",
                )
        except BaseException:
            with contextlib.suppress(ClientError, BotoCoreError):
                self.client.abort_multipart_upload(Bucket=self.bucket, Key=k, UploadId=upload_id)
            raise

    def _put_part(self, k: str, upload_id: str, number: int, data: bytes) -> dict:
        with _errors(f"{self.uri}/{k} part {number}"):
            r = self.client.upload_part(
                Bucket=self.bucket,
                Key=k,
                UploadId=upload_id,
                PartNumber=number,
                Body=data,
                ChecksumAlgorithm="CRC32",
            )
        return {"PartNumber": number, "ETag": r["ETag"], "ChecksumCRC32": r["ChecksumCRC32"]}

    def _get_range(self, key: str, start: int, end: int) -> bytes:
        with _errors(f"{self.uri}/{key}"):
            r = self.client.get_object(
                Bucket=self.bucket, Key=self._k(key), Range=f"bytes={start}-{end - 1}"
            )
            return r["Body"].read()

    def read_chunks(self, key: str, offset: int, size: int) -> Iterator[bytes]:
        """Ranged GETs, `workers` at a time, yielded in order (so the caller hashes and appends
        as they come, and an interrupted pull resumes from the length it wrote)."""
        if offset >= size:
            if size == 0 and self.stat(key) is None:
                raise NotFound(f"{self.uri}/{key}: not found")
            return
        step = self.range_size
        ranges = iter([(s, min(s + step, size)) for s in range(offset, size, step)])
        pool = ThreadPoolExecutor(self.workers)
        try:
            pending = deque(
                pool.submit(self._get_range, key, s, e) for s, e in _take(ranges, self.workers)
            )
            while pending:
                data = pending.popleft().result()
                for s, e in _take(ranges, 1):
                    pending.append(pool.submit(self._get_range, key, s, e))
                yield data
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    def cleanup(self, before: datetime) -> list[str]:
        """Aborts multipart uploads started before `before` (interrupted pushes' parts)."""
        removed = []
        pages = self.client.get_paginator("list_multipart_uploads")
        with _errors(f"listing uploads in {self.uri}"):
            for page in pages.paginate(Bucket=self.bucket, Prefix=self.prefix):
                for u in page.get("Uploads", []):
                    if u["Initiated"] < before:
                        self.client.abort_multipart_upload(
                            Bucket=self.bucket, Key=u["Key"], UploadId=u["UploadId"]
                        )
                        removed.append(f"upload of {u['Key'][len(self.prefix) :]}")
        return removed


def _take(it, n: int) -> list:
    return [x for _, x in zip(range(n), it, strict=False)]
