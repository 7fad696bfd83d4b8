"""Signing in and people over HTTP: handlers of a few lines over controlplane/identity.py, run
in a worker thread (the services are synchronous).

    POST /v1/auth/login               public          email + password (JSON or a form) → the
                                                      session cookie and its CSRF token
    POST /v1/auth/setup               public          first run: the first admin (loopback, no
                                                      user yet), signed in as for login
    POST /v1/auth/logout              authenticated   ends the session, clears the cookie
    GET  /v1/auth/me                  authenticated   who is asking: a person, a key, or local
    POST /v1/users                    users:manage    create a person (platform admins)
    GET  /v1/users                    users:manage    every person
    POST /v1/users/{user_id}/disable  users:manage    no more sign-in; sessions end

The cookie is HttpOnly (scripts cannot read it), SameSite=Lax (other sites' posts do not carry
it), Path=/, Secure when the request came over https, and lives as long as the session.
"""

from __future__ import annotations

from datetime import timedelta

import msgspec
from litestar import Request, Response, get, post
from litestar.datastructures import Cookie
from litestar.di import NamedDependency
from litestar.params import FromPath, JSONBody

from controlplane import identity
from controlplane.access import Principal
from controlplane.errors import Forbidden, InvalidInput
from gateway.auth.service import SESSION_COOKIE, addressed_to_loopback, is_loopback
from gateway.control import schemas as api
from gateway.control.schemas import ts
from gateway.control.transaction import in_transaction
from gateway.errors import error_responses

Me = NamedDependency[Principal]
FORM = ("application/x-www-form-urlencoded", "multipart/form-data")


def user(u: identity.UserView) -> api.User:
    return api.User(id=u.id, email=u.email, display_name=u.display_name, is_admin=u.is_admin,
                    created_at=ts(u.created_at), disabled_at=ts(u.disabled_at))  # fmt: skip


@post("/v1/auth/login", status_code=200, summary="Sign in: sets the session cookie",
      responses=error_responses(400, 401, 413))  # fmt: skip
async def login(request: Request) -> Response[api.SignedIn]:
    if request.headers.get("content-type", "").startswith(FORM):
        form = await request.form()
        body = msgspec.convert({k: form.get(k) for k in ("email", "password")}, api.Login)
    else:
        body = msgspec.json.decode(await request.body(), type=api.Login)
    return await _sign_in(request, body.email, body.password)


@post("/v1/auth/setup", status_code=200,
      summary="First run: create the first platform admin and sign in (loopback, no user yet)",
      responses=error_responses(400, 403, 409, 413))  # fmt: skip
async def setup(request: Request, data: JSONBody[api.FirstAdmin]) -> Response[api.SignedIn]:
    # Only a person at the gateway's own machine may claim a fresh platform: a loopback peer
    # that no proxy forwarded, addressing it by a loopback name from a loopback page (not a
    # site rebound to 127.0.0.1). JSON only: another site's page cannot send it without CORS.
    client = request.client.host if request.client else ""
    forwarded = "x-forwarded-for" in request.headers or "forwarded" in request.headers
    named = addressed_to_loopback(request.headers.get("host"), request.headers.get("origin"))
    if not is_loopback(client) or forwarded or not named:
        why = "through a proxy" if forwarded else "" if named else "naming another host"
        raise Forbidden(
            f"the first admin can be created only from the gateway's own machine, at a loopback "
            f"address (this request came from {client or 'an unknown address'}"
            f"{' ' + why if why else ''}): run `aimass users create --admin` there"
        )
    if not request.headers.get("content-type", "").startswith("application/json"):
        raise InvalidInput("the first-run request must be JSON (Content-Type: application/json)")
    await in_transaction(_db(request), identity.create_first_admin, data.email, data.display_name,
                         data.password)  # fmt: skip
    request.app.state.open_access = False  # a person exists now: sign-in is needed
    return await _sign_in(request, data.email, data.password)


async def _sign_in(request: Request, email: str, password: str) -> Response[api.SignedIn]:
    ttl = timedelta(seconds=request.app.state.config.session_ttl_s)
    signed_in, token = await in_transaction(_db(request), identity.login, email, password, ttl=ttl)
    cookie = Cookie(key=SESSION_COOKIE, value=token, max_age=int(ttl.total_seconds()), path="/", httponly=True,
                    samesite="lax", secure=request.url.scheme == "https")  # fmt: skip
    answer = api.SignedIn(user=user(signed_in.user), csrf_token=signed_in.csrf_token,
                          expires_at=ts(signed_in.expires_at))  # fmt: skip
    return Response(answer, cookies=[cookie])


@post("/v1/auth/logout", opt={"action": "authenticated"}, status_code=200,
      summary="Sign out: the session ends", responses=error_responses(400, 401, 403))  # fmt: skip
async def logout(request: Request) -> Response[dict]:
    token = request.cookies.get(SESSION_COOKIE)
    if token and "session" in request.state:
        await in_transaction(_db(request), identity.logout, token)
    cookie = Cookie(key=SESSION_COOKIE, value="", max_age=0, path="/", httponly=True,
                    samesite="lax", secure=request.url.scheme == "https")  # fmt: skip
    return Response({"signed_out": True}, cookies=[cookie])


@get("/v1/auth/me", opt={"action": "authenticated"}, summary="Who is asking",
     responses=error_responses(400, 401))  # fmt: skip
async def me(request: Request, principal: Me) -> api.Me:
    signed_in = request.state.get("session")
    return api.Me(kind=principal.kind, id=principal.id, is_admin=principal.is_admin,
                  user=user(signed_in.user) if signed_in else None,
                  project_id=principal.project_id, role=principal.role,
                  scopes=list(principal.scopes) if principal.kind == "key" else None)  # fmt: skip


@post("/v1/users", opt={"action": "users:manage"}, summary="Create a person",
      responses=error_responses(400, 401, 403, 409))  # fmt: skip
async def create_user(request: Request, principal: Me, data: JSONBody[api.NewUser]) -> api.User:
    created = await in_transaction(_db(request), identity.create_user, principal, data.email,
                                   data.display_name, data.password, is_admin=data.is_admin)  # fmt: skip
    return user(created)


@get("/v1/users", opt={"action": "users:manage"}, summary="Every person",
     responses=error_responses(400, 401, 403))  # fmt: skip
async def list_users(request: Request, principal: Me) -> api.UserList:
    found = await in_transaction(_db(request), identity.list_users, principal)
    return api.UserList(data=[user(u) for u in found])


@post("/v1/users/{user_id:str}/disable", opt={"action": "users:manage"}, status_code=200,
      summary="Disable a person: no more sign-in, sessions end",
      responses=error_responses(400, 401, 403, 404))  # fmt: skip
async def disable_user(request: Request, principal: Me, user_id: FromPath[str]) -> api.User:
    return user(await in_transaction(_db(request), identity.disable_user, principal, user_id))


def _db(request: Request):
    return request.app.state.db


ROUTES = [login, setup, logout, me, create_user, list_users, disable_user]
