"""Projects, their members and API keys over HTTP: handlers of a few lines over
controlplane/identity.py and keys.py, run in a worker thread. A project the caller is not in
answers 404, as one that does not exist.

    POST   /v1/projects                                      authenticated   a person creates one, owns it
    GET    /v1/projects                                      authenticated   those the caller may see
    GET    /v1/projects/{project_id}                         project:read
    PATCH  /v1/projects/{project_id}                         project:write   its name (quotas: …/quotas)
    DELETE /v1/projects/{project_id}                         project:delete  owners
    GET    /v1/projects/{project_id}/members                 members:read
    POST   /v1/projects/{project_id}/members                 members:manage  by email, with a role
    PATCH  /v1/projects/{project_id}/members/{user_id}       members:manage  a new role
    DELETE /v1/projects/{project_id}/members/{user_id}       members:manage  (or leave: oneself)
    POST   /v1/projects/{project_id}/api_keys                keys:create     the plaintext, once
    GET    /v1/projects/{project_id}/api_keys                keys:manage
    GET    /v1/projects/{project_id}/api_keys/{key_id}       keys:manage
    DELETE /v1/projects/{project_id}/api_keys/{key_id}       keys:manage     revoke (also POST …/revoke)
"""

from __future__ import annotations

import asyncio
from datetime import timedelta

from litestar import Request, delete, get, patch, post
from litestar.di import NamedDependency
from litestar.params import FromPath, JSONBody

from controlplane import identity, keys
from controlplane.access import Principal
from controlplane.models import utcnow
from gateway.control import schemas as api
from gateway.control.schemas import ts
from gateway.control.transaction import in_transaction
from gateway.errors import error_responses

READ_ERRORS = error_responses(400, 401, 403, 404)
WRITE_ERRORS = error_responses(400, 401, 403, 404, 409)
PROJECT = "/v1/projects/{project_id:str}"
KEY = PROJECT + "/api_keys/{key_id:str}"
Me = NamedDependency[Principal]
Id = FromPath[str]


def _db(request: Request):
    return request.app.state.db


def _project(p: identity.ProjectView) -> api.Project:
    return api.Project(id=p.id, name=p.name, created_at=ts(p.created_at), role=p.role,
                       tokens_per_day=p.tokens_per_day, tokens_per_month=p.tokens_per_month)  # fmt: skip


def _member(m: identity.MemberView) -> api.Member:
    return api.Member(user_id=m.user_id, email=m.email, display_name=m.display_name, role=m.role,
                      created_at=ts(m.created_at))  # fmt: skip


def _key(k: keys.KeyRecord) -> dict:
    return {"id": k.key_id, "project_id": k.project_id, "name": k.name, "scopes": list(k.scopes),
            "role": k.role, "created_at": ts(k.created_at), "created_by": k.created_by,
            "expires_at": ts(k.expires_at), "last_used_at": ts(k.last_used_at),
            "revoked_at": ts(k.revoked_at), "requests_per_minute": k.requests_per_minute,
            "tokens_per_minute": k.tokens_per_minute}  # fmt: skip


# ── projects ──


@post("/v1/projects", opt={"action": "authenticated"}, summary="Create a project; its creator owns it",
      responses=WRITE_ERRORS)  # fmt: skip
async def create_project(
    request: Request, principal: Me, data: JSONBody[api.NewProject]
) -> api.Project:
    return _project(
        await in_transaction(_db(request), identity.create_project, principal, data.name)
    )


@get("/v1/projects", opt={"action": "authenticated"}, summary="The projects the caller may see",
     responses=error_responses(400, 401))  # fmt: skip
async def list_projects(request: Request, principal: Me) -> api.ProjectList:
    found = await in_transaction(_db(request), identity.list_projects, principal)
    return api.ProjectList(data=[_project(p) for p in found])


@get(PROJECT, opt={"action": "project:read"}, summary="A project", responses=READ_ERRORS)
async def get_project(request: Request, principal: Me, project_id: Id) -> api.Project:
    return _project(await in_transaction(_db(request), identity.get_project, principal, project_id))


@patch(PROJECT, opt={"action": "project:write"}, summary="Rename a project", responses=WRITE_ERRORS)
async def rename_project(
    request: Request, principal: Me, project_id: Id, data: JSONBody[api.ProjectChange]
) -> api.Project:
    renamed = await in_transaction(_db(request), identity.rename_project, principal, project_id,
                                   data.name)  # fmt: skip
    return _project(renamed)


@delete(PROJECT, opt={"action": "project:delete"}, status_code=200,
        summary="Delete a project with its members, keys, files and jobs",
        responses=READ_ERRORS)  # fmt: skip
async def delete_project(request: Request, principal: Me, project_id: Id) -> api.Deleted:
    await in_transaction(_db(request), identity.delete_project, principal, project_id)
    return api.Deleted(id=project_id, object="project")


# ── members ──


@get(PROJECT + "/members", opt={"action": "members:read"}, summary="A project's members",
     responses=READ_ERRORS)  # fmt: skip
async def list_members(request: Request, principal: Me, project_id: Id) -> api.MemberList:
    found = await in_transaction(_db(request), identity.list_members, principal, project_id)
    return api.MemberList(data=[_member(m) for m in found])


@post(PROJECT + "/members", opt={"action": "members:manage"},
      summary="Add a person by email, with a role", responses=WRITE_ERRORS)  # fmt: skip
async def add_member(
    request: Request, principal: Me, project_id: Id, data: JSONBody[api.NewMember]
) -> api.Member:
    added = await in_transaction(_db(request), identity.add_member, principal, project_id,
                                 data.email, data.role)  # fmt: skip
    return _member(added)


@patch(PROJECT + "/members/{user_id:str}", opt={"action": "members:manage"},
       summary="Change a member's role", responses=WRITE_ERRORS)  # fmt: skip
async def set_role(
    request: Request, principal: Me, project_id: Id, user_id: Id, data: JSONBody[api.RoleChange]
) -> api.Member:
    changed = await in_transaction(_db(request), identity.set_role, principal, project_id,
                                   user_id, data.role)  # fmt: skip
    return _member(changed)


@delete(PROJECT + "/members/{user_id:str}", opt={"action": "members:manage"}, status_code=200,
        summary="Remove a member (or leave)", responses=WRITE_ERRORS)  # fmt: skip
async def remove_member(
    request: Request, principal: Me, project_id: Id, user_id: Id
) -> api.Deleted:
    await in_transaction(_db(request), identity.remove_member, principal, project_id, user_id)
    return api.Deleted(id=user_id, object="project.member")


# ── API keys ──


@post(PROJECT + "/api_keys", opt={"action": "keys:create"},
      summary="Create an API key: its plaintext is in this answer only",
      responses=WRITE_ERRORS)  # fmt: skip
async def create_key(
    request: Request, principal: Me, project_id: Id, data: JSONBody[api.NewApiKey]
) -> api.CreatedApiKey:
    expires = None
    if data.expires_in_days is not None:
        expires = utcnow() + timedelta(days=data.expires_in_days)
    record, plaintext = await in_transaction(
        _db(request), keys.create_key, principal, project_id, data.scopes, role=data.role,
        name=data.name, expires_at=expires, rpm=data.requests_per_minute,
        tpm=data.tokens_per_minute,
    )  # fmt: skip
    return api.CreatedApiKey(**_key(record), key=plaintext)


@get(PROJECT + "/api_keys", opt={"action": "keys:manage"},
     summary="A project's API keys, active and revoked; never a secret",
     responses=READ_ERRORS)  # fmt: skip
async def list_keys(request: Request, principal: Me, project_id: Id) -> api.ApiKeyList:
    found = await in_transaction(_db(request), keys.list_keys, principal, project_id)
    return api.ApiKeyList(data=[api.ApiKey(**_key(k)) for k in found])


@get(KEY, opt={"action": "keys:manage"}, summary="An API key", responses=READ_ERRORS)
async def get_key(request: Request, principal: Me, project_id: Id, key_id: Id) -> api.ApiKey:
    found = await in_transaction(_db(request), keys.get_key, principal, project_id, key_id)
    return api.ApiKey(**_key(found))


@delete(KEY, opt={"action": "keys:manage"}, status_code=200,
        summary="Revoke an API key, for good", responses=READ_ERRORS)  # fmt: skip
async def revoke_key(request: Request, principal: Me, project_id: Id, key_id: Id) -> api.ApiKey:
    return await _revoke(request, principal, project_id, key_id)


@post(KEY + "/revoke", opt={"action": "keys:manage"}, status_code=200,
      summary="Revoke an API key, for good (as DELETE)", responses=READ_ERRORS)  # fmt: skip
async def revoke_key_by_post(
    request: Request, principal: Me, project_id: Id, key_id: Id
) -> api.ApiKey:
    return await _revoke(request, principal, project_id, key_id)


async def _revoke(request: Request, principal: Principal, project_id: str, key_id: str):
    """Revoked, and forgotten by this replica's key cache at once (others: within 5 s)."""
    authenticator = request.app.state.authenticator
    revoked = await asyncio.to_thread(authenticator.revoke, principal, project_id, key_id)
    return api.ApiKey(**_key(revoked))


ROUTES = [create_project, list_projects, get_project, rename_project, delete_project,
          list_members, add_member, set_role, remove_member,
          create_key, list_keys, get_key, revoke_key, revoke_key_by_post]  # fmt: skip
