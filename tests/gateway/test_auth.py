"""A request's credentials: the Bearer header, the fast refusal of a key that can never do a
route's action, and `aimass keys`, through a parser built as `aimass` builds its own."""

from __future__ import annotations

import argparse

import pytest

from controlplane import cli as controlplane_cli
from controlplane.access import ROLE_ACTIONS, SCOPES, Principal
from controlplane.db import Database
from controlplane.errors import Forbidden
from controlplane.keys import InvalidKey, KeyAuthenticator
from gateway.auth.errors import MissingKey, PermissionDenied
from gateway.auth.service import AUTHENTICATED, parse_bearer, require_action
from tests.controlplane.test_keys import legacy_file


def test_parse_bearer():
    assert parse_bearer("Bearer aim_abc") == "aim_abc"
    assert parse_bearer("bearer  aim_abc ") == "aim_abc"
    for value in (None, "", "   ", "Bearer", "Bearer   "):
        with pytest.raises(MissingKey):
            parse_bearer(value)
    with pytest.raises(MissingKey, match="Bearer scheme") as e:
        parse_bearer("Basic c2VjcmV0")
    assert "c2VjcmV0" not in str(e.value)


def key(*scopes: str, role: str = "owner") -> Principal:
    return Principal("key", "k1", project_id="proj_a", role=role, scopes=scopes)


@pytest.mark.parametrize("scope", list(SCOPES))
@pytest.mark.parametrize("action", sorted(ROLE_ACTIONS["owner"]))
def test_a_key_is_refused_an_action_no_scope_of_it_grants(scope, action):
    if action in SCOPES[scope][1]:
        require_action(key(scope), action)
        return
    with pytest.raises(PermissionDenied, match=f"lacks a scope for {action}") as e:
        require_action(key(scope), action)
    assert e.value.scope == "" or action in SCOPES[e.value.scope][1]


def test_a_key_is_refused_what_its_role_does_not_allow():
    require_action(key("inference", role="developer"), "inference")
    with pytest.raises(Forbidden, match="role viewer, which may not inference"):
        require_action(key("inference", role="viewer"), "inference")


def test_people_and_any_principal_pass_to_the_service():
    require_action(Principal("user", "user_1"), "members:manage")  # the service decides
    require_action(key("inference"), AUTHENTICATED)
    with pytest.raises(ValueError, match="unknown action 'inferense'"):
        require_action(key("inference"), "inferense")


# ── `aimass keys`: the operator's CLI ──


@pytest.fixture
def keys_cli(tmp_path, monkeypatch):
    monkeypatch.setenv("AIMASS_HOME", str(tmp_path / "home"))
    url = f"sqlite:///{tmp_path / 'aimass.db'}"
    parser = argparse.ArgumentParser(prog="aimass")
    controlplane_cli.register(parser.add_subparsers(dest="command", required=True))

    def run(*argv: str) -> int:
        args = parser.parse_args(["keys", *argv, "--database", url])
        return args.func(args)

    run.url = url
    return run


def authenticator(url: str) -> KeyAuthenticator:
    return KeyAuthenticator(Database.open(url), cache_ttl_s=0)


def test_cli_create_list_revoke(keys_cli, capsys):
    assert keys_cli("create", "--project", "acme", "--scopes", "inference, models:read") == 0
    out, err = capsys.readouterr()
    key = out.strip()
    assert key.startswith("aim_") and "will not be shown again" in err and key not in err
    assert "created project 'acme'" in err  # the operator's key names its project
    record = authenticator(keys_cli.url).authenticate(key)
    assert (record.scopes, record.role) == (("inference", "models:read"), "developer")

    assert keys_cli("list", "--project", "acme") == 0
    out, _ = capsys.readouterr()
    assert record.key_id in out and "active" in out and key.split("_", 2)[2] not in out
    assert keys_cli("list", "--json") == 0
    assert key.split("_", 2)[2] not in capsys.readouterr().out

    assert keys_cli("revoke", key) == 0  # a pasted whole key: revoked by its id
    _, err = capsys.readouterr()
    assert record.key_id in err and key.split("_", 2)[2] not in err
    with pytest.raises(InvalidKey, match="revoked"):
        authenticator(keys_cli.url).authenticate(key)


def test_cli_role_and_expiry(keys_cli, capsys):
    assert keys_cli("create", "--project", "acme", "--scopes", "admin", "--json",
                    "--role", "viewer", "--expires-in", "1") == 0  # fmt: skip
    out = capsys.readouterr().out
    assert '"role":"viewer"' in out and '"expires_at":"20' in out and '"key":"aim_' in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["create", "--project", "acme", "--scopes", "inference,root"], "unknown scope 'root'"),
        (["create", "--project", "acme", "--scopes", "inference", "--rpm", "0"], "rpm must be"),
        (["create", "--project", "", "--scopes", "inference"], "name must be a non-empty"),
        (["create", "--project", "a", "--scopes", "admin", "--role", "boss"], "'boss' is not"),
        (["create", "--project", "a", "--scopes", "admin", "--expires-in", "0"], "--expires-in"),
        (["revoke", "nokey123"], "no API key with id 'nokey123'"),
        (["list", "--project", "nope"], "no project named 'nope'"),
    ],
)
def test_cli_bad_input_is_one_line_and_exit_2(keys_cli, capsys, argv, message):
    assert keys_cli(*argv) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1
    assert err.startswith("aimass: error: ") and message in err


def test_cli_unreachable_database_is_exit_1(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("AIMASS_HOME", str(tmp_path / "home"))
    parser = argparse.ArgumentParser(prog="aimass")
    controlplane_cli.register(parser.add_subparsers(dest="command", required=True))
    url = "postgresql://nobody@127.0.0.1:1/none"
    args = parser.parse_args(["keys", "list", "--database", url])
    assert args.func(args) == 1
    err = capsys.readouterr().err
    assert err.startswith("aimass: error: database: ") and err.count("\n") == 1


def test_cli_imports_the_former_key_file_once(keys_cli, tmp_path, capsys):
    home = tmp_path / "home"
    home.mkdir()
    legacy_file(home / "gateway.db", [("aaaaaaaa", "acme", ["inference"], False, None)])
    assert keys_cli("list") == 0
    out, err = capsys.readouterr()
    assert "imported 1 API keys from the former gateway.db" in err
    assert out.startswith("aaaaaaaa  acme  inference  developer")
    assert keys_cli("list") == 0
    assert "imported" not in capsys.readouterr().err  # once
