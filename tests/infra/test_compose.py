"""infra/compose.yaml, checked without Docker: it parses, every service it names exists, the
aimass services share one image built from infra/docker/Dockerfile, every file it mounts exists,
and the settings the services must agree on (database credentials, bucket, hosts) agree."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit

import yaml

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "infra" / "compose.yaml"
AIMASS = ("bootstrap", "gateway", "worker")


def load() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def test_services_and_their_dependencies_exist():
    services = load()["services"]
    assert {"postgres", "redis", "minio", "minio-init", *AIMASS} <= set(services)
    for name, service in services.items():
        for dependency in service.get("depends_on", {}):
            assert dependency in services, f"{name} depends on unknown service {dependency}"


def test_aimass_services_share_the_image_built_from_the_repository():
    services = load()["services"]
    for name in AIMASS:
        service = services[name]
        assert service["image"] == "aimass:cpu", name
        context = (COMPOSE.parent / service["build"]["context"]).resolve()
        assert context == ROOT, name
        assert (context / service["build"]["dockerfile"]).is_file(), name
    assert services["bootstrap"]["entrypoint"] == ["aimass-bootstrap-admin"]
    # the gateway's health check is the image's; the worker has no port to probe
    assert "healthcheck" not in services["gateway"]
    assert services["worker"]["healthcheck"] == {"disable": True}


def test_mounted_files_exist():
    for name, service in load()["services"].items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (COMPOSE.parent / source).exists(), f"{name} mounts missing {source}"


def test_settings_agree_across_services():
    services = load()["services"]
    env = services["gateway"]["environment"]
    for name in AIMASS:
        assert services[name]["environment"]["AIMASS_DATABASE"] == env["AIMASS_DATABASE"]

    database = urlsplit(env["AIMASS_DATABASE"])
    postgres = services["postgres"]["environment"]
    assert database.hostname in services
    assert (database.username, database.password, database.path.lstrip("/")) == (
        postgres["POSTGRES_USER"], postgres["POSTGRES_PASSWORD"], postgres["POSTGRES_DB"]
    )  # fmt: skip

    registry = urlsplit(env["AIMASS_REGISTRY"])
    assert registry.scheme == "s3"
    assert f"local/{registry.hostname}" in services["minio-init"]["command"][0]
    minio = services["minio"]["environment"]
    assert (env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"]) == (
        minio["MINIO_ROOT_USER"], minio["MINIO_ROOT_PASSWORD"]
    )  # fmt: skip
    assert urlsplit(env["AWS_ENDPOINT_URL"]).hostname in services

    command = services["gateway"]["command"]
    redis = urlsplit(command[command.index("--redis") + 1])
    assert redis.hostname in services
    assert command[command.index("--host") + 1] == "0.0.0.0"
    port = command[command.index("--port") + 1]
    assert f"{port}:{port}" in services["gateway"]["ports"]
