"""People, sessions, projects and members, on SQLite and PostgreSQL: argon2id passwords, one
answer for every wrong sign-in, session expiry and logout, who sees which project, the owner
rules, the audit trail, and which models a principal may see."""

from __future__ import annotations

import argparse
import io
from datetime import timedelta
from pathlib import Path

import pytest
from argon2 import PasswordHasher
from sqlalchemy import select

from controlplane import cli as controlplane_cli
from controlplane import identity
from controlplane.access import ACTIONS, CLI, ROLE_ACTIONS, ROLES, SCOPES, Principal
from controlplane.errors import Conflict, Forbidden, InvalidInput, NotFound, Unauthenticated
from controlplane.models import AuditEntry, ModelOwner, User, utcnow
from controlplane.models import Session as SessionRow

PASSWORD = "correct horse battery"


@pytest.fixture(autouse=True)
def fast_hashing(monkeypatch):
    """argon2id still, with the cheapest parameters: a test makes many users."""
    monkeypatch.setattr(
        identity, "_HASHER", PasswordHasher(time_cost=1, memory_cost=64, parallelism=1)
    )


def person(db, email: str, *, admin: bool = False) -> Principal:
    with db.session() as s:
        user = identity.create_user(s, CLI, email, email.split("@")[0], PASSWORD, is_admin=admin)
    return Principal("user", user.id, is_admin=admin)


def project_of(db, owner: Principal, name: str = "acme") -> str:
    with db.session() as s:
        return identity.create_project(s, owner, name).id


def test_users_are_created_by_admins_with_argon2id_passwords(db):
    with db.session() as s:
        user = identity.create_user(s, CLI, "  Alice@Example.ORG ", "Alice", PASSWORD)
        stored = s.get(User, user.id).password_hash
    assert user.email == "alice@example.org" and not user.is_admin
    assert stored.startswith("$argon2id$") and PASSWORD not in stored
    assert "password" not in str(user)
    with db.session() as s, pytest.raises(Conflict, match="alice@example.org"):
        identity.create_user(s, CLI, "ALICE@example.org", "Twin", PASSWORD)
    alice = Principal("user", user.id)
    with db.session() as s, pytest.raises(Forbidden, match="users:manage needs a platform admin"):
        identity.create_user(s, alice, "bob@example.org", "Bob", PASSWORD)


@pytest.mark.parametrize(
    ("email", "password", "message"),
    [
        ("not-an-email", PASSWORD, "email 'not-an-email' must be an address"),
        ("a@b.org", "short", r"password must have 8\.\.1024 characters \(got 5\)"),
        ("a@b.org", "x" * 1025, r"got 1025"),
    ],
)
def test_bad_user_input_names_the_field(db, email, password, message):
    with db.session() as s, pytest.raises(InvalidInput, match=message):
        identity.create_user(s, CLI, email, "A", password)


def test_a_wrong_sign_in_never_says_which_part_was_wrong(db):
    person(db, "alice@example.org")
    disabled = person(db, "bob@example.org")
    with db.session() as s:
        identity.disable_user(s, CLI, disabled.id)
    messages = set()
    for email, password in (("alice@example.org", "wrong password"),
                            ("nobody@example.org", PASSWORD),
                            ("bob@example.org", PASSWORD)):  # fmt: skip
        with db.session() as s, pytest.raises(Unauthenticated) as e:
            identity.login(s, email, password)
        messages.add(str(e.value))
    assert messages == {"wrong email or password"}


def test_sessions_store_a_hash_expire_and_end_at_logout(db):
    person(db, "alice@example.org")
    now = utcnow()
    with db.session() as s:
        signed_in, token = identity.login(s, "Alice@example.org", PASSWORD, now=now,
                                          ttl=timedelta(hours=1))  # fmt: skip
    with db.session() as s:
        rows = s.scalars(select(SessionRow)).all()
        assert [r.token_sha256 for r in rows] != [token] and len(rows) == 1
        principal, again = identity.session_of(s, token, now=now + timedelta(minutes=59))
    assert principal.kind == "user" and again.csrf_token == signed_in.csrf_token
    with db.session() as s, pytest.raises(Unauthenticated, match="the session expired at"):
        identity.session_of(s, token, now=now + timedelta(hours=1))
    with db.session() as s:
        identity.logout(s, token)
    with db.session() as s, pytest.raises(Unauthenticated, match="ended"):
        identity.session_of(s, token)
    assert identity.csrf_matches(signed_in.csrf_token, signed_in.csrf_token)
    assert not identity.csrf_matches(signed_in.csrf_token, None)
    assert not identity.csrf_matches(signed_in.csrf_token, signed_in.csrf_token[:-1])


def test_disabling_a_user_ends_their_sessions(db):
    alice = person(db, "alice@example.org")
    with db.session() as s:
        _, token = identity.login(s, "alice@example.org", PASSWORD)
    with db.session() as s:
        identity.disable_user(s, CLI, alice.id)
    with db.session() as s, pytest.raises(Unauthenticated):
        identity.session_of(s, token)


def test_projects_are_seen_by_their_members_admins_and_keys(db):
    alice, bob = person(db, "alice@example.org"), person(db, "bob@example.org")
    admin = person(db, "root@example.org", admin=True)
    a, b = project_of(db, alice, "a"), project_of(db, bob, "b")
    key = Principal("key", "k1", project_id=b, role="viewer", scopes=("admin",))
    with db.session() as s:
        assert [(p.name, p.role) for p in identity.list_projects(s, alice)] == [("a", "owner")]
        assert [p.name for p in identity.list_projects(s, admin)] == ["a", "b"]
        assert [(p.name, p.role) for p in identity.list_projects(s, key)] == [("b", "viewer")]
        with pytest.raises(NotFound, match=f"no project '{b}'"):
            identity.get_project(s, alice, b)
        with pytest.raises(NotFound):
            identity.get_project(s, key, a)
        with pytest.raises(Forbidden, match="may not create projects"):
            identity.create_project(s, key, "c")
        with pytest.raises(Conflict, match="'a' exists already"):
            identity.create_project(s, bob, "a")


def test_rename_and_delete_follow_the_roles(db):
    alice, bob = person(db, "alice@example.org"), person(db, "bob@example.org")
    p = project_of(db, alice)
    with db.session() as s:
        identity.add_member(s, alice, p, "bob@example.org", "admin")
    with db.session() as s:
        assert identity.rename_project(s, bob, p, "acme2").name == "acme2"
        with pytest.raises(Forbidden, match="admin may not project:delete"):
            identity.delete_project(s, bob, p)
    with db.session() as s:
        identity.delete_project(s, alice, p)
    with db.session() as s:
        assert identity.list_projects(s, alice) == []
        actions = s.scalars(select(AuditEntry.action).where(AuditEntry.target == p)).all()
    assert actions == ["project.create", "project.rename", "project.delete"]


def test_owner_rules(db):
    alice, bob = person(db, "alice@example.org"), person(db, "bob@example.org")
    person(db, "carol@example.org")
    p = project_of(db, alice)
    with db.session() as s:
        identity.add_member(s, alice, p, "bob@example.org", "admin")
    with db.session() as s:
        with pytest.raises(Forbidden, match="members:owner"):  # only owners make owners
            identity.add_member(s, bob, p, "carol@example.org", "owner")
        with pytest.raises(Forbidden, match="members:owner"):  # ... or unmake them
            identity.set_role(s, bob, p, alice.id, "viewer")
        with pytest.raises(Conflict, match="cannot demote the last owner"):
            identity.set_role(s, alice, p, alice.id, "admin")
        with pytest.raises(Conflict, match="cannot remove the last owner"):
            identity.remove_member(s, alice, p, alice.id)
        carol = identity.add_member(s, bob, p, "carol@example.org", "viewer")
        with pytest.raises(Conflict, match="is a member already"):
            identity.add_member(s, bob, p, "carol@example.org", "viewer")
        with pytest.raises(NotFound, match="no user with the email"):
            identity.add_member(s, bob, p, "dave@example.org", "viewer")
        with pytest.raises(InvalidInput, match="'boss' is not a role"):
            identity.add_member(s, bob, p, "carol@example.org", "boss")
    with db.session() as s:
        identity.set_role(s, alice, p, bob.id, "owner")
        identity.remove_member(s, alice, p, alice.id)  # a second owner exists: alice may leave
        viewer = Principal("user", carol.user_id)
        identity.remove_member(s, viewer, p, carol.user_id)  # anyone may leave
        assert [(m.email, m.role) for m in identity.list_members(s, bob, p)] == [
            ("bob@example.org", "owner")
        ]
        entry = s.scalars(select(AuditEntry).where(AuditEntry.action == "member.role")).one()
    assert (entry.before["role"], entry.after["role"]) == ("admin", "owner")
    assert entry.actor == f"user:{alice.id}"


def test_a_model_of_a_project_is_absent_to_everyone_else(db):
    alice, bob = person(db, "alice@example.org"), person(db, "bob@example.org")
    a, b = project_of(db, alice, "a"), project_of(db, bob, "b")
    with db.session() as s:
        identity.own_model(s, alice, a, "secret-model")
        with pytest.raises(Conflict, match="taken"):
            identity.own_model(s, bob, b, "secret-model")
    with db.session() as s:
        owners = identity.model_owners(s)
        assert owners == {"secret-model": a}
        assert s.get(ModelOwner, "secret-model").project_id == a
        assert identity.may_see_model(s, alice, a)
        assert not identity.may_see_model(s, bob, a)
        assert identity.may_see_model(s, bob, None)  # an unowned name: everyone's
        assert identity.may_see_model(s, CLI, a)
        key_b = Principal("key", "k", project_id=b, role="owner", scopes=("inference",))
        assert not identity.may_see_model(s, key_b, a)


def test_the_roles_table_in_docs_is_the_code():
    """docs/platform.md's roles table: one row per action, ticks and scopes as access.py has."""
    text = (Path(__file__).parents[2] / "docs" / "platform.md").read_text()
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 6 and cells[0].strip("`") in ACTIONS:
            rows[cells[0].strip("`")] = cells[1:]
    assert set(rows) == set(ACTIONS)
    for action, cells in rows.items():
        assert [r for r, c in zip(ROLES, cells[:4], strict=True) if c == "✓"] == [
            r for r in ROLES if action in ROLE_ACTIONS[r]
        ], action
        named = {s.strip("` ") for s in cells[4].split(",")} - {"—"}
        assert named == {s for s, (_, acts) in SCOPES.items() if action in acts}, action


# ── the CLI: `aimass users|projects|members`, as `aimass` builds its parser ──


@pytest.fixture
def cli(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("AIMASS_HOME", str(tmp_path / "home"))
    parser = argparse.ArgumentParser(prog="aimass")
    controlplane_cli.register(parser.add_subparsers(dest="command", required=True))
    url = f"sqlite:///{tmp_path / 'aimass.db'}"

    def run(*argv: str, stdin: str = "") -> tuple[int, str, str]:
        monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
        args = parser.parse_args([*argv, "--database", url])
        code = args.func(args)
        out, err = capsys.readouterr()
        return code, out, err

    return run


def test_cli_bootstraps_an_admin_and_manages_members(cli):
    code, out, _ = cli("users", "create", "--email", "Root@Example.org", "--name", "Root",
                       "--admin", "--password-stdin", "--json", stdin=PASSWORD + "\n")  # fmt: skip
    assert code == 0 and '"email":"root@example.org"' in out and '"is_admin":true' in out
    assert PASSWORD not in out and "argon2" not in out
    assert cli("users", "create", "--email", "bob@example.org", "--name", "Bob",
               "--password-stdin", stdin=PASSWORD + "\n")[0] == 0  # fmt: skip
    assert cli("projects", "create", "acme", "--owner", "root@example.org")[0] == 0
    assert cli("members", "add", "acme", "bob@example.org", "developer")[0] == 0
    code, out, _ = cli("members", "list", "acme")
    assert "bob@example.org  developer" in out and "root@example.org  owner" in out
    code, _, err = cli("members", "set-role", "acme", "root@example.org", "admin")
    assert code == 2 and err.startswith("aimass: error: cannot demote the last owner")
    assert cli("members", "set-role", "acme", "bob@example.org", "owner")[0] == 0
    assert cli("members", "remove", "acme", "root@example.org")[0] == 0
    code, out, _ = cli("users", "disable", "bob@example.org")
    assert code == 0 and "disabled" in out
    assert cli("projects", "delete", "acme")[0] == 0
    assert cli("projects", "list")[1] == ""


@pytest.mark.parametrize(
    ("argv", "stdin", "message"),
    [
        (["users", "create", "--email", "a@b.org", "--name", "A"], "", "pass --password-stdin"),
        (["users", "create", "--email", "a@b.org", "--name", "A", "--password-stdin"], "short\n",
         "password must have 8..1024 characters"),
        (["users", "create", "--email", "nope", "--name", "A", "--password-stdin"], PASSWORD,
         "email 'nope' must be an address"),
        (["users", "disable", "nobody@b.org"], "", "no user with the email 'nobody@b.org'"),
        (["members", "list", "ghost"], "", "no project named 'ghost'"),
        (["projects", "create", " spaced"], "", "surrounding spaces"),
    ],
)  # fmt: skip
def test_cli_bad_input_is_one_line_and_exit_2(cli, argv, stdin, message):
    code, out, err = cli(*argv, stdin=stdin)
    assert (code, out, err.count("\n")) == (2, "", 1)
    assert err.startswith("aimass: error: ") and message in err


def test_the_first_admin_is_made_once_even_by_two_requests_at_once(db):
    """Two first-run requests together (threads, each its own transaction): one admin, one
    Conflict, on SQLite and on PostgreSQL (an advisory lock there)."""
    import threading

    results = []

    def first_run(email: str) -> None:
        try:
            with db.session() as s:
                identity.create_first_admin(s, email, "First", "a long password")
            results.append("made")
        except Conflict:
            results.append("conflict")
        except Exception as e:  # SQLite's busy writer, at worst: still never a second admin
            results.append(type(e).__name__)

    threads = [threading.Thread(target=first_run, args=(f"a{i}@example.org",)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert results.count("made") == 1, results
    with db.session() as s:
        assert [u.is_admin for u in identity.list_users(s, CLI)] == [True]
