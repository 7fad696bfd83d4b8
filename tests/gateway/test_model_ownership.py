"""A fine-tuned model is its project's from the instant it exists: the worker writes the name's
owner row, then pushes the model; another project's key that asks for it right after — while
the gateway's ownership cache (5 s) still holds a read from before — gets the 404 of a name the
registry lacks, whether it is the first to load the model or the owner was. The clock is fake
and never moves: the cache's bound is not what closes the window."""

from __future__ import annotations

import openai
import pytest

from controlplane import identity
from controlplane.access import CLI
from controlplane.db import Database
from registry.registry import Registry
from tests.gateway.conftest import base_config, http, make_key, openai_client, running
from tests.gateway.fakes import FakeClock, FakeLoader


def _job_succeeded(config, registry: Registry, package, project: str, name: str) -> None:
    """A fine-tuning job's last steps, in the worker's order (worker/worker.py): the model
    name's owner row, then the registry push."""
    db = Database.open(config.database)
    try:
        with db.session() as s:
            identity.own_model(s, CLI, identity.project_by_name(s, project).id, name)
    finally:
        db.close()
    registry.push(package, name)
    registry.set_alias(name, "staging", 1)  # listed by /v1/models as NAME@staging


def _ids(client: openai.OpenAI) -> set[str]:
    return {m.id for m in client.models.list()}


def _complete(client: openai.OpenAI, model: str):
    return client.completions.create(model=model, prompt="x", max_tokens=1)


def test_a_new_model_is_absent_to_other_projects_at_once(tmp_path, tiny_package):
    registry = Registry.open(str(tmp_path / "registry"))
    registry.push(tiny_package, "tiny")
    registry.set_alias("tiny", "production", 1)
    config = base_config(tmp_path, tmp_path / "registry")
    _, key_a = make_key(config.database, "alpha", ["inference"])
    _, key_b = make_key(config.database, "beta", ["inference"])
    with running(config, loader=FakeLoader(), clock=FakeClock()) as gw:
        a, b = openai_client(gw, key_a), openai_client(gw, key_b)
        assert _complete(b, "tiny").model == "tiny"  # the ownership cache is read now
        assert _ids(b) == {"tiny", "tiny@production"}
        assert not gw.state.model_owners.exists(["tiny"])  # known shared: no read again

        # another project asks first, and would be the one to load it
        _job_succeeded(config, registry, tiny_package, "alpha", "ft-first")
        with pytest.raises(openai.NotFoundError, match="ft-first:1 does not exist"):
            _complete(b, "ft-first:1")
        assert "ft-first@staging" not in _ids(b)
        with http(gw, authorization=f"Bearer {key_b}") as h:
            r = h.post("/v1/tokenize", json={"model": "ft-first:1", "prompt": "x"})
            assert r.status_code == 404, r.text
        assert _complete(a, "ft-first:1").model == "ft-first:1"

        # the owner loads it first; then another project asks
        _job_succeeded(config, registry, tiny_package, "alpha", "ft-second")
        assert _complete(a, "ft-second:1").model == "ft-second:1"
        with pytest.raises(openai.NotFoundError, match="ft-second:1 does not exist"):
            _complete(b, "ft-second:1")
        assert _ids(a) >= {"ft-first@staging", "ft-second@staging"}
        assert _ids(b) == {"tiny", "tiny@production"}
