"""Who may do what: roles of project members, scopes of API keys, and the one check every
service runs before it reads or changes anything.

A person acts through their membership of a project: their role's actions (`ROLE_ACTIONS`). A
program acts through an API key of one project: the actions both its role (its creator's role
when it was made: a viewer's key stays a viewer's) and its scopes allow. A platform admin
(`users.is_admin`), the local CLI and the open-access gateway on loopback (no users or keys
exist yet) may do everything.

    action          viewer  developer  admin  owner   key scope that grants it
    project:read      ✓        ✓         ✓      ✓     admin
    members:read      ✓        ✓         ✓      ✓     admin
    models:read       ✓        ✓         ✓      ✓     inference, models:read, models:write, train
    files:read        ✓        ✓         ✓      ✓     train
    jobs:read         ✓        ✓         ✓      ✓     train
    usage:read        ✓        ✓         ✓      ✓     admin
    inference                  ✓         ✓      ✓     inference
    files:write                ✓         ✓      ✓     train
    jobs:write                 ✓         ✓      ✓     train
    keys:create                ✓         ✓      ✓     admin
    models:write                         ✓      ✓     models:write
    keys:manage                          ✓      ✓     admin
    members:manage                       ✓      ✓     admin
    audit:read                           ✓      ✓     admin
    project:write                        ✓      ✓     admin
    project:delete                              ✓
    members:owner                               ✓

`keys:create` lets a developer make keys (at most their own role); `keys:manage` lists and
revokes every key of the project. Only an owner makes or unmakes owners (`members:owner`).
Platform-wide actions (`PLATFORM_ACTIONS`: users, settings, creating projects for others) belong
to platform admins; any signed-in person may create a project, and owns it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from controlplane.errors import Forbidden, InvalidInput, NotFound

ROLES = ("viewer", "developer", "admin", "owner")  # each holds everything of the ones before

_VIEWER = frozenset(
    {"project:read", "members:read", "models:read", "files:read", "jobs:read", "usage:read"}
)
_DEVELOPER = _VIEWER | {"inference", "files:write", "jobs:write", "keys:create"}
_ADMIN = _DEVELOPER | {"models:write", "keys:manage", "members:manage", "audit:read",
                       "project:write"}  # fmt: skip
ROLE_ACTIONS: dict[str, frozenset[str]] = {
    "viewer": _VIEWER,
    "developer": _DEVELOPER,
    "admin": _ADMIN,
    "owner": _ADMIN | {"project:delete", "members:owner"},
}
ACTIONS = ROLE_ACTIONS["owner"]

# A key's scopes, each with what it is for and the actions it grants.
SCOPES: dict[str, tuple[str, frozenset[str]]] = {
    # a program that generates must be able to list what it may call (/v1/models), as with OpenAI
    "inference": (
        "generate text and list the models: /v1/completions, /v1/chat/completions, /v1/models",
        frozenset({"inference", "models:read"}),
    ),
    "models:read": ("list and describe models: /v1/models", frozenset({"models:read"})),
    "models:write": (
        "change what is served: load, unload, aliases, canary splits",
        frozenset({"models:read", "models:write"}),
    ),
    "train": (
        "upload files and run fine-tuning jobs: /v1/files, /v1/fine_tuning",
        frozenset({"models:read", "files:read", "files:write", "jobs:read", "jobs:write"}),
    ),
    "admin": (
        "manage the project: members, keys, usage, audit, quotas",
        frozenset(
            {
                "project:read",
                "project:write",
                "members:read",
                "members:manage",
                "keys:create",
                "keys:manage",
                "usage:read",
                "audit:read",
            }
        ),  # fmt: skip
    ),
}

PLATFORM_ACTIONS = frozenset({"users:manage", "settings:write", "projects:manage"})


@dataclass(frozen=True)
class Principal:
    """Who is asking: a person (`user`), a program (`key`), or the operator (`cli`, `local`)."""

    kind: str  # "user" | "key" | "cli" | "local"
    id: str = ""  # the user id or key id
    is_admin: bool = False  # a platform admin (always true for cli and local)
    project_id: str | None = None  # a key's project
    role: str | None = None  # a key's role
    scopes: tuple[str, ...] = ()  # a key's scopes

    @property
    def actor(self) -> str:
        """How the audit log names this principal: "user:<id>", "key:<id>", "cli", "local"."""
        return f"{self.kind}:{self.id}" if self.id else self.kind

    def key_actions(self) -> frozenset[str]:
        granted = frozenset().union(*(SCOPES[s][1] for s in self.scopes if s in SCOPES))
        return granted & ROLE_ACTIONS.get(self.role or "", frozenset())


CLI = Principal("cli", is_admin=True)
LOCAL = Principal("local", is_admin=True)


def authorize(
    principal: Principal,
    action: str,
    project_id: str | None,
    role_of: Callable[[str, str], str | None],
) -> None:
    """Raise unless `principal` may do `action` in `project_id` (None: a platform action).

    `role_of(project_id, user_id)` is the member's role, or None for a non-member. A key of
    another project, or a person outside the project, gets `NotFound` naming the project: what
    they ask for must look absent to them."""
    if action not in ACTIONS and action not in PLATFORM_ACTIONS:
        raise ValueError(f"unknown action {action!r}")  # a typo in a caller: fail loudly
    if principal.is_admin:
        return
    if project_id is None or action in PLATFORM_ACTIONS:
        raise Forbidden(f"{action} needs a platform admin; {principal.actor} is not one")
    if principal.kind == "key":
        if principal.project_id != project_id:
            raise NotFound(f"no project {project_id!r}")
        if action not in principal.key_actions():
            scopes = ", ".join(principal.scopes) or "none"
            raise Forbidden(
                f"API key {principal.id} may not {action}: its role is {principal.role} and "
                f"its scopes are {scopes}"
            )
        return
    role = role_of(project_id, principal.id)
    if role is None:
        raise NotFound(f"no project {project_id!r}")
    if action not in ROLE_ACTIONS[role]:
        raise Forbidden(f"a project {role} may not {action}; ask a project admin")


def check_role(role: str, field: str = "role") -> str:
    if role not in ROLES:
        raise InvalidInput(f"{field} {role!r} is not a role; roles: {', '.join(ROLES)}", field)
    return role
