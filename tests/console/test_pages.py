"""The console's shells over a real server: who gets which page, the first-run admin, the
security headers, and the rules every template and asset keeps (no inline script or style, no
asset from another origin, every referenced file present)."""

from __future__ import annotations

import re
from pathlib import Path

import httpx
import pytest

from gateway.console import routes as console
from tests.gateway.conftest import assert_openai_error, base_config, running

CONSOLE = Path(console.__file__).parent
ADMIN = {"email": "ada@example.org", "display_name": "Ada", "password": "correct horse battery"}


@pytest.fixture
def gw(tmp_path, tiny_registry):
    with running(base_config(tmp_path, tiny_registry)) as gw:
        yield gw


def client(gw, **kw) -> httpx.Client:
    return httpx.Client(base_url=gw.url, timeout=15, follow_redirects=False, **kw)


def concrete(path: str) -> str:
    return re.sub(r"\{([a-z_]+)(:[a-z]+)?\}", "x", path)


def test_first_run_creates_the_admin_then_pages_need_a_session(gw):
    with client(gw) as c:
        # open access (no users, no keys, loopback): pages render, and say so
        assert c.get("/console").headers["location"] == "/console/overview"
        page = c.get("/console/overview")
        assert page.status_code == 200 and "Open access" in page.text
        assert c.get("/console/login").headers["location"] == "/console/setup"
        assert 'id="setup-form"' in c.get("/console/setup").text

        made = c.post("/v1/auth/setup", json=ADMIN)
        assert made.status_code == 200, made.text
        assert made.json()["user"]["is_admin"] is True
        assert "aimass_session" in made.headers["set-cookie"]
        assert "httponly" in made.headers["set-cookie"].lower()
        again = c.post("/v1/auth/setup", json=ADMIN | {"email": "eve@example.org"})
        assert_openai_error(again, 409)
        # the setup page is gone now, and open access is over
        assert c.get("/console/setup").headers["location"] == "/console/login"

    with client(gw) as anonymous:
        r = anonymous.get("/console/overview")
        assert r.status_code in (302, 303, 307)
        assert r.headers["location"] == "/console/login?next=/console/overview"
        assert anonymous.get("/v1/projects").status_code == 401

    with client(gw) as c:
        signed = c.post("/v1/auth/login", json={k: ADMIN[k] for k in ("email", "password")})
        csrf = signed.json()["csrf_token"]
        for page in console.PAGES:
            r = c.get(console.PREFIX + concrete(page.path))
            assert r.status_code == 200, (page.name, r.status_code)
            assert f'<meta name="csrf-token" content="{csrf}">' in r.text
            assert r.headers["content-security-policy"] == console.CSP


def test_the_first_admin_only_from_the_machine_itself(gw):
    with client(gw) as c:
        proxied = c.post("/v1/auth/setup", json=ADMIN, headers={"X-Forwarded-For": "203.0.113.9"})
        assert_openai_error(proxied, 403)
        assert "loopback" in proxied.json()["error"]["message"]
        # a page of another site can post a simple (text/plain) body without CORS: refused
        simple = c.post(
            "/v1/auth/setup", content=httpx.Request("POST", "/", json=ADMIN).content,
            headers={"Content-Type": "text/plain"},
        )  # fmt: skip
        assert simple.status_code == 400
        short = c.post("/v1/auth/setup", json=ADMIN | {"password": "short"})
        assert_openai_error(short, 400)
        assert "password" in short.json()["error"]["message"]
        assert c.get("/console/setup").status_code == 200  # nothing was created


def test_a_name_holding_markup_is_shown_as_text(gw):
    with client(gw) as c:
        c.post("/v1/auth/setup", json=ADMIN | {"display_name": "<script>alert(1)</script>"})
        page = c.get("/console/overview").text
    assert "<script>alert(1)</script>" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page


def test_assets_are_local_and_carry_the_policy(gw):
    with client(gw) as c:
        for path in sorted((CONSOLE / "static").rglob("*.*")):
            url = "/console/static/" + path.relative_to(CONSOLE / "static").as_posix()
            r = c.get(url)
            assert r.status_code == 200, url
            assert r.headers["content-security-policy"] == console.CSP
            assert r.headers["x-content-type-options"] == "nosniff"
            if path.suffix == ".js":
                assert "javascript" in r.headers["content-type"]
        assert c.get("/console/static/../routes.py").status_code == 404


INLINE_SCRIPT = re.compile(r"<script(?![^>]*\bsrc=)[^>]*>", re.I)
INLINE_HANDLER = re.compile(r"\son[a-z]+\s*=", re.I)
INLINE_STYLE = re.compile(r"<style|\sstyle\s*=", re.I)
ASSET = re.compile(r"""(?:src|href)="(/console/static/[^"]+)\"""")


@pytest.mark.parametrize("template", sorted(p.name for p in (CONSOLE / "templates").glob("*.html")))
def test_templates_keep_the_content_security_policy(template):
    text = (CONSOLE / "templates" / template).read_text()
    assert not INLINE_SCRIPT.search(text), "an inline <script> (CSP forbids it)"
    assert not INLINE_HANDLER.search(text), "an inline event handler (CSP forbids it)"
    assert not INLINE_STYLE.search(text), "an inline style (CSP forbids it)"
    assert "|safe" not in text, "|safe turns off escaping"
    for asset in ASSET.findall(text):
        assert (CONSOLE / "static" / asset.removeprefix("/console/static/")).is_file(), asset


def test_assets_name_no_other_origin_and_parse_no_html():
    for path in (CONSOLE / "static").rglob("*.js"):
        text = path.read_text()
        assert not re.search(r"https?://(?!www\.w3\.org/2000/svg)", text), path.name
        assert "innerHTML" not in text and "outerHTML" not in text, path.name
        assert "insertAdjacentHTML" not in text and "eval(" not in text, path.name
        for module in re.findall(r"""from\s+"(\.{1,2}/[^"]+)\"""", text):
            assert (path.parent / module).resolve().is_file(), (path.name, module)


def test_every_page_has_its_template():
    for page in console.PAGES:
        assert (CONSOLE / "templates" / f"{page.name}.html").is_file(), page.name


def test_loopback_trust_needs_a_loopback_name_and_page(gw):
    """A site whose name was made to resolve to 127.0.0.1 (DNS rebinding) reaches the gateway
    from loopback, but names itself in Host and Origin: no open access, no first admin."""
    with client(gw) as c:
        assert c.get("/v1/models").status_code == 200  # open access, addressed as 127.0.0.1
        assert c.get("/v1/models", headers={"Host": "localhost"}).status_code == 200
        rebound = {"Host": "evil.example:8000"}
        assert_openai_error(c.get("/v1/models", headers=rebound), 401)
        assert c.get("/console/overview", headers=rebound).status_code in (302, 303, 307)
        page = {"Origin": "http://evil.example"}
        assert_openai_error(c.get("/v1/models", headers=page), 401)
        for headers in (rebound, page):
            refused = c.post("/v1/auth/setup", json=ADMIN, headers=headers)
            assert_openai_error(refused, 403)
        assert c.get("/console/setup").status_code == 200  # still nobody


def test_open_access_ends_when_a_key_is_made_through_the_cli(tmp_path, tiny_registry):
    from tests.gateway.conftest import make_key
    from tests.gateway.fakes import FakeClock

    clock = FakeClock()
    config = base_config(tmp_path, tiny_registry)
    with running(config, clock=clock) as gw, client(gw) as c:
        assert c.get("/v1/models").status_code == 200
        make_key(config.database, "cli-made", ["inference"])  # the database, not this gateway
        clock.advance(5.0)  # the gateway looks again this often
        assert_openai_error(c.get("/v1/models"), 401)
        assert c.get("/console/overview").headers["location"] == "/console/setup"
