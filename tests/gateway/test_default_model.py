"""The model "default", through a real server and the openai client: it is served by the model
the `default_model` platform setting names, read at request time (a change applies within the
settings cache's bound: a fake clock moves past it); the response names the NAME:VERSION that
answered, usage is metered under the real name, and /v1/models lists "default" only while the
setting is set."""

from __future__ import annotations

import openai
import pytest
from sqlalchemy import select

from controlplane import identity
from controlplane.access import CLI
from controlplane.db import Database
from controlplane.models import Usage
from controlplane.settings import set_value
from tests.gateway.conftest import base_config, make_key, openai_client, running
from tests.gateway.fakes import FakeCatalog, FakeClock, FakeLoader

SETTINGS_TTL_S = 5.0  # controlplane.settings.SettingsCache's bound


@pytest.fixture
def config(tmp_path):
    return base_config(tmp_path, tmp_path / "registry", usage_flush_s=3600)


def _set_default(config, value: str | None) -> None:
    """What PATCH /v1/config does, made on another replica: this gateway learns it from the
    database, within the settings cache's bound."""
    db = Database.open(config.database)
    try:
        with db.session() as s:
            set_value(s, CLI, "default_model", value)
    finally:
        db.close()


def _usage_by_model(config) -> dict[str, int]:
    db = Database.open(config.database)
    try:
        with db.session() as s:  # summed: the requests may straddle a minute's rows
            totals: dict[str, int] = {}
            for u in s.scalars(select(Usage)):
                totals[u.model] = totals.get(u.model, 0) + u.requests
            return totals
    finally:
        db.close()


def _ids(client: openai.OpenAI) -> list[str]:
    return [m.id for m in client.models.list()]


def test_default_is_the_model_the_setting_names_at_request_time(config):
    _, key = make_key(config.database, "alpha", ["inference"])
    clock = FakeClock()
    catalog = FakeCatalog({"tiny": 2, "other": 2}, production=2)
    with running(config, catalog=catalog, loader=FakeLoader(), clock=clock) as gw:
        client = openai_client(gw, key)
        with pytest.raises(openai.NotFoundError, match="no default model is set"):
            client.completions.create(model="default", prompt="x", max_tokens=1)
        assert "default" not in _ids(client)

        _set_default(config, "other")
        clock.advance(SETTINGS_TTL_S)
        done = client.completions.create(model="default", prompt="The cat", max_tokens=2)
        assert done.model == "other:2"  # the version that answered, not "default"
        chat = client.chat.completions.create(
            model="default", messages=[{"role": "user", "content": "Hi"}], max_tokens=2
        )
        assert chat.model == "other:2" and chat.choices[0].message.content
        chunks = list(client.completions.create(model="default", prompt="ab", max_tokens=2,
                                                stream=True))  # fmt: skip
        assert {c.model for c in chunks} == {"other:2"}
        assert _ids(client)[0] == "default" and "other" in _ids(client)

        _set_default(config, "tiny@production")
        assert client.completions.create(model="default", prompt="x", max_tokens=1).model == (
            "other:2"  # within the cache's bound: the setting read before still holds
        )
        clock.advance(SETTINGS_TTL_S)
        assert client.completions.create(model="default", prompt="x", max_tokens=1).model == (
            "tiny:2"
        )
        # a name that is not the bare word "default" is never the setting
        assert client.completions.create(model="tiny:1", prompt="x", max_tokens=1).model == (
            "tiny:1"
        )

        _set_default(config, None)
        clock.advance(SETTINGS_TTL_S)
        assert "default" not in _ids(client)
        with pytest.raises(openai.NotFoundError, match="no default model is set"):
            client.completions.create(model="default", prompt="x", max_tokens=1)
    # metered under the real names the setting gave, never under "default"
    assert _usage_by_model(config) == {"other": 4, "tiny@production": 1, "tiny:1": 1}


def test_default_names_a_model_a_key_may_not_see_as_absent(config):
    """The setting is no way around a project's ownership of a model."""
    _, key = make_key(config.database, "alpha", ["inference"])
    _, beta_key = make_key(config.database, "beta", ["inference"])
    db = Database.open(config.database)
    with db.session() as s:
        identity.own_model(s, CLI, identity.project_by_name(s, "beta").id, "other")
        set_value(s, CLI, "default_model", "other")
    db.close()
    catalog = FakeCatalog({"tiny": 1, "other": 1}, production=1)
    with running(config, catalog=catalog, loader=FakeLoader()) as gw:
        client = openai_client(gw, key)
        with pytest.raises(openai.NotFoundError, match="'other'"):
            client.completions.create(model="default", prompt="x", max_tokens=1)
        assert "default" not in _ids(client) and "other" not in _ids(client)
        beta = openai_client(gw, beta_key)
        assert beta.completions.create(model="default", prompt="x", max_tokens=1).model == (
            "other:1"
        )
        assert "default" in _ids(beta)
