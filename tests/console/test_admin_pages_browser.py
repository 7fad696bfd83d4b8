"""Overview, Projects, Members & keys and Settings in a real browser (Debian's Chromium) over a
real gateway: each action goes through the /v1 API and its result shows on the page; the API's
own error messages are shown; a viewer sees the lists without the controls; no script error or
Content-Security-Policy violation on the way."""

from __future__ import annotations

import re

import httpx
import openai
import pytest

from controlplane import identity
from controlplane.access import CLI
from controlplane.db import Database
from controlplane.keys import create_key
from tests.console.conftest import PASSWORD, add_people, open_page
from tests.gateway.conftest import TIMEOUT, base_config, running

sync_api = pytest.importorskip(
    "playwright.sync_api", reason="Playwright's Python package is not installed (make venv)"
)
expect = sync_api.expect


@pytest.fixture
def gw(tmp_path, tiny_registry, cheap_hashing):
    """A gateway whose database holds a platform admin (root) and a person (vera)."""
    config = base_config(tmp_path, tiny_registry, usage_flush_s=0.1)
    add_people(
        config.database, ("root@example.org", "Root", True), ("vera@example.org", "Vera", False)
    )
    with running(config) as gw:
        yield gw


@pytest.fixture
def root(chromium, gw):
    page = open_page(chromium, url=gw.url, email="root@example.org")
    yield page
    page.context.close()


def test_projects_members_keys_and_the_overview(gw, root):
    page = root
    page.goto(f"{gw.url}/console/projects")
    page.get_by_test_id("project-name").fill("alpha")
    page.get_by_test_id("create-project-button").click()
    row = page.get_by_test_id("project-row").filter(has_text="alpha")
    expect(row).to_have_count(1)
    project_id = row.get_attribute("data-project-id")
    expect(page.get_by_test_id("project-switcher")).to_have_value(project_id)

    page.goto(f"{gw.url}/console/members")
    expect(page.get_by_test_id("member-row")).to_have_count(1)  # root, the owner
    page.get_by_test_id("member-email").fill("nobody@example.org")
    page.get_by_test_id("add-member-button").click()
    error = page.locator("#member-form .form-error")
    expect(error).to_contain_text("nobody@example.org")  # the API's own message
    page.get_by_test_id("member-email").fill("vera@example.org")
    page.get_by_test_id("member-role").select_option("viewer")
    page.get_by_test_id("add-member-button").click()
    expect(page.get_by_test_id("member-row")).to_have_count(2)
    expect(page.get_by_test_id("member-row").filter(has_text="vera@example.org")).to_have_count(1)

    page.get_by_test_id("key-name").fill("ci")
    page.get_by_test_id("key-scope-train").check()
    page.get_by_test_id("create-key-button").click()
    shown = page.get_by_test_id("new-key")
    expect(shown).to_have_text(re.compile(r"^aim_\w+_\S+$"))
    key = shown.inner_text()
    rows = page.get_by_test_id("key-row")
    expect(rows).to_have_count(1)
    expect(rows.first).to_contain_text("inference, train")
    assert key not in rows.first.inner_text()  # the list never shows the secret

    client = openai.OpenAI(base_url=f"{gw.url}/v1", api_key=key, timeout=TIMEOUT, max_retries=0)
    client.completions.create(model="tiny", prompt="The cat", max_tokens=4)

    page.goto(f"{gw.url}/console/overview")
    expect(page.get_by_test_id("ov-models")).to_have_text("1")
    expect(page.get_by_test_id("ov-ttft-p50")).not_to_have_text("—")
    expect(page.get_by_test_id("ov-ttft-p95")).not_to_have_text("—")
    expect(page.get_by_test_id("ov-jobs")).to_have_text("0 · 0")
    # the usage table is written every 0.1 s; the page re-reads every 10 s
    expect(page.get_by_test_id("ov-error-rate")).to_have_text("0 %", timeout=25_000)
    chart = page.locator("#ov-requests-chart svg")
    assert chart.get_attribute("data-points") == "120"  # requests and errors, 60 minutes each
    expect(page.get_by_test_id("ov-models-table")).to_contain_text("tiny")

    page.goto(f"{gw.url}/console/members")
    page.once("dialog", lambda d: d.accept())
    page.get_by_test_id("revoke-key").click()
    expect(page.get_by_test_id("key-row").first).to_contain_text("revoked")
    expect(page.get_by_test_id("revoke-key")).to_have_count(0)
    with pytest.raises(openai.AuthenticationError):
        client.completions.create(model="tiny", prompt="The cat", max_tokens=4)
    assert page.problems == []


def test_a_viewer_sees_the_lists_without_the_controls(chromium, gw):
    db = Database.open(gw.config.database)
    with db.session() as s:
        project = identity.create_project(s, CLI, "alpha").id
        identity.add_member(s, CLI, project, "root@example.org", "owner")
        identity.add_member(s, CLI, project, "vera@example.org", "viewer")
    db.close()
    page = open_page(chromium, url=gw.url, email="vera@example.org", width=390)
    try:
        page.goto(f"{gw.url}/console/members")
        expect(page.get_by_test_id("member-row")).to_have_count(2)
        expect(page.locator("#members-scope")).to_have_text("Project alpha.")
        expect(page.locator("#member-form")).to_be_hidden()
        expect(page.locator("#key-form")).to_be_hidden()
        expect(page.get_by_test_id("keys")).to_contain_text("needs a project admin or owner")
        assert page.get_by_test_id("member-role-select").count() == 0
        assert page.get_by_test_id("remove-member").count() == 0
        # a phone's width: tables scroll inside their box, the page itself does not
        assert page.evaluate("document.documentElement.scrollWidth") <= 390

        page.goto(f"{gw.url}/console/projects")
        expect(page.get_by_test_id("project-row")).to_have_count(1)
        assert page.get_by_test_id("delete-project-button").count() == 0
        assert page.get_by_test_id("rename-project-button").count() == 0

        assert page.locator("#nav a", has_text="Settings").count() == 0
        page.goto(f"{gw.url}/console/settings")
        expect(page.locator("main")).to_contain_text("for platform admins")
        assert page.get_by_test_id("save-settings").count() == 0
        assert page.problems == []
    finally:
        page.context.close()


def test_settings_quotas_and_people(gw, root):
    page = root
    db = Database.open(gw.config.database)
    with db.session() as s:
        project = identity.create_project(s, CLI, "alpha").id
    db.close()
    page.goto(f"{gw.url}/console/settings")
    field = page.get_by_test_id("setting-requests_per_minute")
    expect(field).to_be_visible()
    expect(page.get_by_test_id("settings")).to_contain_text("Bounds: 1")
    field.fill("0")
    page.get_by_test_id("save-settings").click()
    error = page.locator("#settings-form .form-error")
    expect(error).to_contain_text("requests_per_minute = 0 is out of bounds: 1..1000000")
    field.fill("1000")
    page.get_by_test_id("save-settings").click()
    expect(error).to_be_hidden()
    with httpx.Client(base_url=gw.url, timeout=TIMEOUT) as h:
        h.post("/v1/auth/login", json={"email": "root@example.org", "password": PASSWORD})
        expect(page.locator("#notices")).to_contain_text("Saved: requests_per_minute")
        values = {s["key"]: s["value"] for s in h.get("/v1/config").json()["data"]}
        assert values["requests_per_minute"] == 1000

        expect(page.get_by_test_id("quota-project")).to_have_value(project)
        page.get_by_test_id("quota-tokens-per-day").fill("5000")
        page.get_by_test_id("save-quotas").click()
        expect(page.locator("#notices")).to_contain_text("Quotas saved")
        assert h.get(f"/v1/projects/{project}/quotas").json()["tokens_per_day"] == 5000

    page.get_by_test_id("user-email").fill("new@example.org")
    page.get_by_test_id("user-name").fill("New <b>person</b>")
    page.get_by_test_id("user-password").fill("short")
    page.get_by_test_id("create-user-button").click()
    expect(page.locator("#user-form .form-error")).to_contain_text("password")
    page.get_by_test_id("user-password").fill(PASSWORD)
    page.get_by_test_id("create-user-button").click()
    row = page.get_by_test_id("user-row").filter(has_text="new@example.org")
    expect(row).to_contain_text("New <b>person</b>")  # markup shown as text
    page.once("dialog", lambda d: d.accept())
    row.get_by_test_id("disable-user").click()
    expect(row).to_contain_text("disabled")
    assert page.problems == []


def test_long_key_lists_come_in_pages_of_20(gw, root):
    db = Database.open(gw.config.database)
    with db.session() as s:
        project = identity.create_project(s, CLI, "alpha").id
        identity.add_member(s, CLI, project, "root@example.org", "owner")
        for i in range(25):
            create_key(s, CLI, project, ["inference"], name=f"key {i:02d}")
    db.close()
    page = root
    page.goto(f"{gw.url}/console/members")
    rows = page.get_by_test_id("key-row")
    expect(rows).to_have_count(20)
    expect(rows.first).to_contain_text("key 24")  # newest first
    expect(page.locator("#keys .pages")).to_contain_text("Page 1 of 2 (25)")
    page.locator("#keys .pages").get_by_role("button", name="Next").click()
    expect(rows).to_have_count(5)
    expect(rows.last).to_contain_text("key 00")
    assert page.problems == []
