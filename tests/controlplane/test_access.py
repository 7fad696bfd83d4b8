"""The permission table: the docstring's table is the code's, and `authorize` follows it."""

from __future__ import annotations

import pytest

import controlplane.access as access
from controlplane.access import CLI, ROLE_ACTIONS, ROLES, SCOPES, Principal, authorize
from controlplane.errors import Forbidden, NotFound


def _doc_table() -> dict[str, tuple[set[str], set[str]]]:
    """action -> (roles with a tick, scopes named) as the module docstring draws them."""
    rows = {}
    for line in access.__doc__.splitlines():
        parts = line.split()
        if parts and parts[0] in access.ACTIONS:
            ticks = line[len("    action          ") :][:34]
            roles = {r for r, col in zip(ROLES, (0, 8, 19, 26), strict=True)
                     if ticks[col : col + 8].strip().startswith("✓")}  # fmt: skip
            scopes = set(line[len("    action          ") + 34 :].replace(",", " ").split())
            rows[parts[0]] = (roles, scopes)
    return rows


def test_docstring_table_is_the_code():
    table = _doc_table()
    assert set(table) == set(access.ACTIONS)
    for action, (roles, scopes) in table.items():
        assert roles == {r for r in ROLES if action in ROLE_ACTIONS[r]}, action
        assert scopes == {s for s, (_, acts) in SCOPES.items() if action in acts}, action


def test_roles_are_nested():
    for lower, higher in zip(ROLES, ROLES[1:], strict=False):
        assert ROLE_ACTIONS[lower] < ROLE_ACTIONS[higher]


def _members(table):
    return lambda project, user: table.get((project, user))


@pytest.mark.parametrize("role", ROLES)
@pytest.mark.parametrize("action", sorted(access.ACTIONS))
def test_members_get_their_roles_actions(role, action):
    user = Principal("user", "user_a")
    role_of = _members({("proj_a", "user_a"): role})
    if action in ROLE_ACTIONS[role]:
        authorize(user, action, "proj_a", role_of)
    else:
        with pytest.raises(Forbidden, match=f"a project {role} may not {action}"):
            authorize(user, action, "proj_a", role_of)


def test_outsiders_see_nothing():
    role_of = _members({("proj_a", "user_a"): "owner"})
    with pytest.raises(NotFound, match="proj_b"):
        authorize(Principal("user", "user_a"), "files:read", "proj_b", role_of)
    key = Principal("key", "k1", project_id="proj_a", role="owner", scopes=("train",))
    with pytest.raises(NotFound):
        authorize(key, "files:read", "proj_b", role_of)


def test_a_key_needs_both_its_role_and_a_scope():
    role_of = _members({})
    viewer_key = Principal("key", "k1", project_id="p", role="viewer", scopes=("train",))
    authorize(viewer_key, "jobs:read", "p", role_of)
    with pytest.raises(Forbidden, match="role is viewer"):
        authorize(viewer_key, "jobs:write", "p", role_of)
    dev_key = Principal("key", "k2", project_id="p", role="developer", scopes=("inference",))
    authorize(dev_key, "inference", "p", role_of)
    with pytest.raises(Forbidden, match="scopes are inference"):
        authorize(dev_key, "jobs:write", "p", role_of)


def test_platform_actions_need_an_admin():
    authorize(CLI, "settings:write", None, _members({}))
    authorize(Principal("user", "u", is_admin=True), "users:manage", None, _members({}))
    with pytest.raises(Forbidden, match="platform admin"):
        authorize(Principal("user", "u"), "settings:write", None, _members({}))


def test_unknown_action_is_a_bug():
    with pytest.raises(ValueError, match="unknown action"):
        authorize(CLI, "files:wirte", "p", _members({}))
