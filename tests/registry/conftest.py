"""Registry fixtures: a real S3 endpoint over HTTP (moto's standalone server) and a registry
on each backend, so one behaviour test runs against both."""

from __future__ import annotations

import os
import uuid

import pytest

BUCKET = "aimass-test"


@pytest.fixture(scope="session")
def s3_endpoint():
    """moto's server on a free port, with dummy credentials in the environment (so CLI
    subprocesses reach it too); yields the endpoint URL."""
    pytest.importorskip("moto.server")
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_SESSION_TOKEN": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_REGION": "us-east-1",  # these two win over the generic ones if a user set them
        "AWS_ENDPOINT_URL": f"http://{host}:{port}",
        "AWS_ENDPOINT_URL_S3": f"http://{host}:{port}",
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    boto3.client("s3").create_bucket(Bucket=BUCKET)
    yield env["AWS_ENDPOINT_URL"]
    server.stop()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="session")
def s3_client(s3_endpoint):
    """One client for the tests (building one loads botocore's service model: ~0.5 s)."""
    import boto3
    from botocore.config import Config

    return boto3.client("s3", config=Config(max_pool_connections=16))


@pytest.fixture(params=["local", "s3"])
def registry_uri(request, tmp_path) -> str:
    """A fresh, empty registry: a folder, or its own prefix in the test bucket."""
    if request.param == "local":
        return str(tmp_path / "registry")
    request.getfixturevalue("s3_client")
    return f"s3://{BUCKET}/{uuid.uuid4().hex[:12]}"


@pytest.fixture
def reg(request, registry_uri):
    """A Registry on each backend; S3 with 5 MiB parts (the least S3 allows) and 4 MiB ranged
    GETs, so multi-part uploads and downloads are tested with small files."""
    from registry.registry import Registry
    from registry.s3 import S3Store
    from registry.stores import open_store

    if registry_uri.startswith("s3://"):
        client = request.getfixturevalue("s3_client")
        store = S3Store.from_uri(registry_uri, client=client, part_size=5 << 20, range_size=4 << 20)
    else:
        store = open_store(registry_uri)
    return Registry(store, user="tester")
