"""The console's frame in a real browser (Debian's Chromium): first run, sign-in and sign-out,
the API's own error messages, the header at phone width, keyboard access, and no script error or
Content-Security-Policy violation on the way."""

from __future__ import annotations

import pytest

from tests.console.test_pages import ADMIN
from tests.gateway.conftest import base_config, running


@pytest.fixture
def gw(tmp_path, tiny_registry):
    with running(base_config(tmp_path, tiny_registry)) as gw:
        yield gw


def test_first_run_sign_in_and_out(gw, page):
    page.goto(f"{gw.url}/console")
    page.wait_for_url("**/console/overview")  # open access: no users or keys yet
    assert page.get_by_role("note").inner_text().startswith("Open access")
    page.goto(f"{gw.url}/console/setup")
    page.get_by_label("Email").fill(ADMIN["email"])
    page.get_by_label("Name").fill("Ada <b>Lovelace</b>")
    page.get_by_label("Password").fill("short")
    page.get_by_role("button", name="Create admin and sign in").click()
    error = page.locator("#setup-form .form-error")
    error.wait_for()
    assert "password must have 8..1024 characters (got 5)" in error.inner_text()

    page.get_by_label("Password").fill(ADMIN["password"])
    page.get_by_role("button", name="Create admin and sign in").click()
    page.wait_for_url("**/console/overview")
    who = page.get_by_test_id("who").inner_text()
    assert "Ada <b>Lovelace</b>" in who and "admin" in who  # markup shown as text
    assert page.get_by_role("note").count() == 0  # open access is over

    page.get_by_test_id("sign-out").click()
    page.wait_for_url("**/console/login")
    page.goto(f"{gw.url}/console/overview")
    page.wait_for_url("**/console/login?next=/console/overview")
    page.get_by_label("Email").fill(ADMIN["email"])
    page.get_by_label("Password").fill("wrong password")
    page.get_by_test_id("login-submit").click()
    error = page.locator("#login-form .form-error")
    error.wait_for()
    assert error.inner_text() == "wrong email or password"
    page.get_by_label("Password").fill(ADMIN["password"])
    page.get_by_test_id("login-submit").click()
    page.wait_for_url("**/console/overview")
    assert page.problems == []


def test_a_next_page_elsewhere_is_never_followed(gw, page):
    page.goto(f"{gw.url}/console/setup")
    page.get_by_label("Email").fill(ADMIN["email"])
    page.get_by_label("Name").fill("Ada")
    page.get_by_label("Password").fill(ADMIN["password"])
    page.get_by_role("button", name="Create admin and sign in").click()
    page.wait_for_url("**/console/overview")
    page.get_by_test_id("sign-out").click()
    page.wait_for_url("**/console/login")
    page.goto(f"{gw.url}/console/login?next=//example.org/console")
    page.get_by_label("Email").fill(ADMIN["email"])
    page.get_by_label("Password").fill(ADMIN["password"])
    page.get_by_test_id("login-submit").click()
    page.wait_for_url(f"{gw.url}/console/**")


def test_phone_width_and_keyboard(gw, page):
    page.set_viewport_size({"width": 390, "height": 844})
    page.goto(f"{gw.url}/console/overview")
    page.keyboard.press("Tab")  # the first stop skips the header
    assert page.evaluate("document.activeElement.textContent") == "Skip to content"
    nav = page.locator("#nav")
    assert not nav.is_visible()  # folded behind the menu button
    page.get_by_role("button", name="Menu").click()
    assert nav.is_visible()
    assert page.evaluate("document.documentElement.scrollWidth") <= 390  # nothing overflows
    assert page.problems == []
