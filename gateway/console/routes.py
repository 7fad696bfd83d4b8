"""The console: the three platforms in the browser, served by the gateway at /console.

Each page is an HTML shell (a Jinja template: headings, labelled forms, empty tables) and an ES
module that fetches the same /v1 API a script calls, with the person's session cookie and its
CSRF token: the console is a client of the API, so every permission is the API's. The pages
themselves carry no data beyond who is signed in, so they check only that someone is:

    no user exists yet          → /console/setup (the first admin; loopback only)
    no valid session            → /console/login?next=<the page>
    signed in (or open access)  → the page

Every console response carries a strict Content-Security-Policy: scripts and styles only from
this origin, no inline script or style, no framing. Assets are files of this package (no CDN).
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

from litestar import Request, Response, get
from litestar.plugins.jinja import JinjaTemplateEngine
from litestar.response import Redirect, Template
from litestar.static_files import create_static_files_router
from litestar.template.config import TemplateConfig

from controlplane.access import LOCAL
from controlplane.errors import Unauthenticated
from controlplane.identity import users_exist
from gateway.auth.service import (
    SESSION_COOKIE,
    is_loopback,
    serves_openly,
    session_principal,
)

HERE = Path(__file__).parent
PREFIX = "/console"

CSP = "; ".join([
    "default-src 'self'",
    "script-src 'self'",
    "style-src 'self'",
    "img-src 'self' data:",
    "connect-src 'self'",
    "font-src 'self'",
    "object-src 'none'",
    "base-uri 'none'",
    "form-action 'self'",
    "frame-ancestors 'none'",
])  # fmt: skip
SECURITY_HEADERS = {
    "content-security-policy": CSP,
    "x-content-type-options": "nosniff",
    "referrer-policy": "same-origin",
    "x-frame-options": "DENY",
    "cache-control": "no-cache",  # assets revalidate (ETag): an upgrade is seen at once
}


@dataclass(frozen=True)
class Page:
    name: str  # the template is templates/<name>.html, its script static/js/pages/<name>.js
    path: str  # under /console; {params} reach the template by name
    title: str
    nav: bool = True  # listed in the header's navigation
    admin_only: bool = False  # listed for platform admins only (the API refuses others anyway)


# The navigation's order. A page's data and actions are the API's; this table only says where
# its shell lives.
PAGES = [
    Page("overview", "/overview", "Overview"),
    Page("models", "/models", "Models"),
    Page("model", "/models/{model_name:str}", "Model", nav=False),
    Page("datasets", "/datasets", "Datasets"),
    Page("training", "/training", "Training"),
    Page("job", "/training/{job_id:str}", "Training job", nav=False),
    Page("playground", "/playground", "Playground"),
    Page("usage", "/usage", "Usage"),
    Page("projects", "/projects", "Projects"),
    Page("members", "/members", "Members & keys"),
    Page("settings", "/settings", "Settings", admin_only=True),
]


# ── rendering ──


async def _principal(request: Request):
    """(principal, its session) of the signed-in person, (LOCAL, None) under open access, or
    None."""
    state = request.app.state
    if await serves_openly(state, request.headers):
        return LOCAL, None
    token = request.cookies.get(SESSION_COOKIE)
    if not token:
        return None
    try:
        principal, signed_in = await session_principal(state.db, token)
    except Unauthenticated:
        return None
    return principal, signed_in


async def _no_users(request: Request) -> bool:
    def read() -> bool:
        with request.app.state.db.session() as s:
            return not users_exist(s)

    return await asyncio.to_thread(read)


def _me(principal, signed_in) -> dict:
    if signed_in:
        u = signed_in.user
        return {"kind": "user", "id": u.id, "email": u.email, "display_name": u.display_name,
                "is_admin": u.is_admin}  # fmt: skip
    return {"kind": principal.kind, "id": principal.id, "email": "", "display_name": "local",
            "is_admin": principal.is_admin}  # fmt: skip


def _nav(is_admin: bool) -> list[dict]:
    return [{"name": p.name, "href": PREFIX + p.path, "title": p.title}
            for p in PAGES if p.nav and "{" not in p.path and (is_admin or not p.admin_only)]  # fmt: skip


def _page_handler(page: Page):
    async def handler(request: Request) -> Response:
        who = await _principal(request)
        if who is None:
            if await _no_users(request):
                return Redirect(f"{PREFIX}/setup")
            return Redirect(f"{PREFIX}/login?next={quote(request.url.path)}")
        principal, signed_in = who
        me = _me(principal, signed_in)
        context = {
            "page": page.name,
            "title": page.title,
            "me": me,
            "me_json": json.dumps(me),
            "csrf_token": signed_in.csrf_token if signed_in else "",
            "nav": _nav(me["is_admin"]),
            "open_access": principal is LOCAL,
            **request.path_params,
        }
        return Template(f"{page.name}.html", context=context, headers=SECURITY_HEADERS)

    handler.__name__ = f"console_{page.name}"
    return get(PREFIX + page.path, name=f"console:{page.name}", include_in_schema=False)(handler)


@get(PREFIX, include_in_schema=False)
async def console_home() -> Redirect:
    return Redirect(PREFIX + PAGES[0].path)


@get(PREFIX + "/login", include_in_schema=False)
async def login_page(request: Request) -> Response:
    if await _no_users(request):
        return Redirect(f"{PREFIX}/setup")
    return Template("login.html", context={"title": "Sign in", "page": "login", "nav": [],
                                           "me": None}, headers=SECURITY_HEADERS)  # fmt: skip


@get(PREFIX + "/setup", include_in_schema=False)
async def setup_page(request: Request) -> Response:
    if not await _no_users(request):
        return Redirect(f"{PREFIX}/login")
    client = request.client.host if request.client else ""
    context = {"title": "First run", "page": "setup", "nav": [], "me": None,
               "allowed": is_loopback(client)}  # fmt: skip
    return Template("setup.html", context=context, headers=SECURITY_HEADERS)


def routes() -> list:
    """The console's route handlers (the page table is read when the app is built)."""
    static = create_static_files_router(
        path=PREFIX + "/static",
        directories=[HERE / "static"],
        include_in_schema=False,
        name="console:static",
    )
    return [console_home, login_page, setup_page, *(_page_handler(p) for p in PAGES), static]


def template_config() -> TemplateConfig:
    return TemplateConfig(directory=HERE / "templates", engine=JinjaTemplateEngine)


def static_security_headers(app):
    """Raw ASGI: the console's assets carry the same headers as its pages."""

    async def middleware(scope, receive, send):
        if scope["type"] != "http" or not scope["path"].startswith(PREFIX + "/static/"):
            await app(scope, receive, send)
            return

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                extra = [(k.encode(), v.encode()) for k, v in SECURITY_HEADERS.items()]
                message["headers"] = [*message.get("headers", []), *extra]
            await send(message)

        await app(scope, receive, send_with_headers)

    return middleware
