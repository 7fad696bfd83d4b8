"""The Model Library pages in a real browser (Debian's Chromium): the list, a model's aliases,
versions and reports, a promotion whose gates are shown first (refused, then passed), a canary
weight, a rollback and the history that names who; a viewer gets no controls, and the pages fit
a phone's width. No script error or Content-Security-Policy violation on the way."""

from __future__ import annotations

import pytest

from controlplane import identity
from controlplane.access import CLI
from controlplane.db import Database
from registry.registry import Registry
from tests.console.conftest import PASSWORD, add_people
from tests.gateway.conftest import base_config, running
from tests.registry.helpers import write_package


@pytest.fixture
def library(tmp_path):
    """A registry holding `lib` (shared; v1 and v2 pass their parity, v3 fails it; production
    on v1) and `owned` (project alpha's)."""
    registry = Registry.open(str(tmp_path / "registry"), user="pusher")
    good = write_package(tmp_path / "good")
    bad = write_package(tmp_path / "bad", parity_passed=False, weights=b"bad" * 40)
    for package in (good, good, bad):
        registry.push(package, "lib")
    registry.set_alias("lib", "production", 1)
    return registry


def _goto_model(tab, url: str, name: str) -> None:
    """From the list to the model's page, by its link."""
    tab.goto(f"{url}/console/models")
    tab.locator(f'[data-testid="model-row"][data-model="{name}"] a').click()
    tab.wait_for_url(f"**/console/models/{name}")
    tab.get_by_test_id("alias-production").wait_for()


def test_promote_after_seeing_the_gates_canary_rollback_and_history(tmp_path, library, page):
    with running(base_config(tmp_path, tmp_path / "registry")) as gw:  # open access: an admin
        page.goto(f"{gw.url}/console/models")
        row = page.locator('[data-testid="model-row"][data-model="lib"]')
        assert row.get_by_test_id("models-alias-production").inner_text() == "v1"
        _goto_model(page, gw.url, "lib")
        assert page.get_by_test_id("alias-production").inner_text() == "v1"
        assert page.get_by_test_id("version-row").count() == 3
        page.locator("#compare table").wait_for()  # v3 against production's v1
        assert "Parity: onnx-fp32" in page.get_by_test_id("compare").inner_text()

        gates = page.get_by_test_id("gates")
        page.get_by_test_id("promote-version").select_option("3")
        page.locator('#gates li[data-gate="parity"][data-passed="false"]').wait_for()
        assert "greedy tokens diverged" in gates.inner_text()
        page.get_by_test_id("promote-button").click()
        error = page.locator("#promote-form .form-error")
        error.wait_for()
        assert "refused by gate parity" in error.inner_text()
        assert page.get_by_test_id("alias-production").inner_text() == "v1"

        page.get_by_test_id("promote-version").select_option("2")
        page.locator('#gates li[data-gate="parity"][data-passed="true"]').wait_for()
        page.get_by_test_id("promote-button").click()
        page.locator('[data-testid="alias-production"]:text-is("v2")').wait_for()

        page.get_by_test_id("canary-version").select_option("1")
        page.get_by_test_id("canary-weight").fill("0.25")
        page.get_by_test_id("canary-button").click()
        page.get_by_test_id("alias-canary").wait_for()
        assert page.get_by_test_id("alias-canary").inner_text() == "v1"
        assert page.get_by_test_id("alias-canary-weight").inner_text() == "25%"

        page.get_by_test_id("rollback-alias").select_option("production")
        page.get_by_test_id("rollback-button").click()
        page.locator('[data-testid="alias-production"]:text-is("v1")').wait_for()
        events = page.get_by_test_id("events")
        events.locator('td:text-is("rollback")').wait_for()
        text = events.inner_text()
        assert "promote" in text and "local" in text and "pusher" in text
    assert library.alias("lib", "production")[0].version == 1
    assert library.alias("lib", "canary")[0].weight == 0.25
    assert page.problems == []


def test_a_viewer_reads_without_controls_at_phone_width(tmp_path, library, page, cheap_hashing):
    config = base_config(tmp_path, tmp_path / "registry")
    add_people(config.database, ("vi@example.org", "Vi", False))
    db = Database.open(config.database)
    with db.session() as s:
        alpha = identity.create_project(s, CLI, "alpha")
        identity.add_member(s, CLI, alpha.id, "vi@example.org", "viewer")
        identity.own_model(s, CLI, alpha.id, "owned")
    db.close()
    library.push(write_package(tmp_path / "owned"), "owned")
    library.set_alias("owned", "production", 1)
    with running(config) as gw:
        page.set_viewport_size({"width": 390, "height": 844})
        page.goto(f"{gw.url}/console/login")
        page.get_by_label("Email").fill("vi@example.org")
        page.get_by_label("Password").fill(PASSWORD)
        page.get_by_test_id("login-submit").click()
        page.wait_for_url("**/console/overview")
        _goto_model(page, gw.url, "owned")
        assert page.get_by_test_id("promote-button").count() == 0
        assert page.get_by_test_id("rollback-button").count() == 0
        assert page.get_by_test_id("canary-weight").count() == 0
        page.locator('[data-testid="model-owner"]:text-is("project alpha")').wait_for()
        page.get_by_test_id("events").locator("table").wait_for()
        wide = page.evaluate("document.documentElement.scrollWidth")
        assert wide <= 390, f"the page is {wide} px wide at 390"
        page.goto(f"{gw.url}/console/models/nope")  # the API's own words
        page.locator("#model-error:has-text(\"no model named 'nope'\")").wait_for()
    assert page.problems == []
