"""The console end to end in a real browser (Debian's Chromium), against `aimass serve` as
`make run` starts it (SQLite, the local registry, one training worker):

sign in as the first admin → create a project → add a member → create a key → upload a corpus →
start a `tiny` training job → watch it finish with the loss chart drawn → open the new version →
chat with it in the playground (streamed text appears) → promote it → roll back. Then as a
viewer: no admin controls, and a forged form post is refused.

Every page is photographed at 1280 and 390 pixels wide on the way: into $AIMASS_SCREENSHOTS
(`make screenshots` sets docs/console/), else a temporary folder."""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import httpx
import pytest

from tests.console.conftest import WIDTHS, aimass_serve, open_page
from tests.gateway.test_training_api import corpus

expect = pytest.importorskip(
    "playwright.sync_api", reason="Playwright's Python package is not installed (make venv)"
).expect

ADMIN = {"email": "lead@example.org", "name": "Lena Lead", "password": "a long admin password"}
VIEWER = {"email": "viewer@example.org", "name": "Vic Viewer", "password": "a long viewer password"}
# a tiny model from scratch in a few seconds: short blocks, few steps
FAST = {"max_steps": "20", "batch_size": "4", "block_size": "32"}
JOB_TIMEOUT_MS = 240_000


class Camera:
    """Full-page screenshots of each page at both widths."""

    def __init__(self, folder: Path):
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.taken: list[Path] = []

    def shoot(self, page, name: str) -> None:
        for label, (width, height) in WIDTHS.items():
            page.set_viewport_size({"width": width, "height": height})
            page.wait_for_timeout(300)  # charts re-lay out at the new width
            path = self.folder / f"{name}-{label}.png"
            page.screenshot(path=str(path), full_page=True)
            self.taken.append(path)
        page.set_viewport_size({"width": WIDTHS["desktop"][0], "height": WIDTHS["desktop"][1]})


@pytest.fixture
def camera(tmp_path) -> Camera:
    target = os.environ.get("AIMASS_SCREENSHOTS")
    return Camera(Path(target) if target else tmp_path / "screenshots")


def sign_in(page, url: str, who: dict) -> None:
    page.goto(f"{url}/console/login")
    page.get_by_label("Email").fill(who["email"])
    page.get_by_label("Password").fill(who["password"])
    page.get_by_test_id("login-submit").click()
    page.wait_for_url("**/console/overview")


def wait_for_job(page) -> str:
    status = page.get_by_test_id("job-status")
    deadline = time.monotonic() + JOB_TIMEOUT_MS / 1000
    while (text := status.inner_text().strip().lower()) not in ("succeeded", "failed", "cancelled"):
        assert time.monotonic() < deadline, f"the job is still {text}"
        page.wait_for_timeout(500)
    return text


def start_job(page, url: str, file_id: str, steps: str) -> None:
    page.goto(f"{url}/console/training")
    page.get_by_test_id("job-model").select_option("tiny")
    page.get_by_test_id("job-training-file").select_option(file_id)
    # held-out data: the promotion gate compares versions' perplexities on the same file
    page.get_by_test_id("job-validation-file").select_option(file_id)
    page.get_by_test_id("job-suffix").fill("e2e")
    for name, value in (FAST | {"max_steps": steps}).items():
        page.get_by_test_id(f"hp-{name}").fill(value)
    page.get_by_test_id("create-job-button").click()
    page.wait_for_url("**/console/training/ftjob-*")


def test_the_console_end_to_end(chromium, tmp_path, camera):
    with aimass_serve(tmp_path / "home") as platform:
        url = platform.url
        page = open_page(chromium, timeout_ms=20_000)

        # ── first run: the first admin, signed in at once ──
        page.goto(f"{url}/console/setup")
        camera.shoot(page, "setup")
        page.get_by_label("Email").fill(ADMIN["email"])
        page.get_by_label("Name").fill(ADMIN["name"])
        page.get_by_label("Password").fill(ADMIN["password"])
        page.get_by_test_id("setup-submit").click()
        page.wait_for_url("**/console/overview")

        # ── a project, a person, a member, a key ──
        page.goto(f"{url}/console/projects")
        page.get_by_test_id("project-name").fill("research")
        page.get_by_test_id("create-project-button").click()
        page.get_by_test_id("project-row").first.wait_for()
        expect(page.locator("#project-switcher option:checked")).to_have_text("research")
        camera.shoot(page, "projects")

        page.goto(f"{url}/console/settings")
        page.get_by_test_id("user-email").fill(VIEWER["email"])
        page.get_by_test_id("user-name").fill(VIEWER["name"])
        page.get_by_test_id("user-password").fill(VIEWER["password"])
        page.get_by_test_id("create-user-button").click()
        page.get_by_text(VIEWER["email"]).first.wait_for()
        camera.shoot(page, "settings")

        page.goto(f"{url}/console/members")
        page.get_by_test_id("member-email").fill(VIEWER["email"])
        page.get_by_test_id("member-role").select_option("viewer")
        page.get_by_test_id("add-member-button").click()
        page.get_by_test_id("member-row").filter(has_text=VIEWER["email"]).wait_for()
        page.get_by_test_id("key-name").fill("ci")
        page.get_by_test_id("key-scope-train").check()
        page.get_by_test_id("create-key-button").click()
        expect(page.get_by_test_id("new-key")).to_have_text(re.compile(r"^\s*aim_\w+_\S+\s*$"))
        key = page.get_by_test_id("new-key").inner_text().strip()
        page.get_by_test_id("key-row").first.wait_for()
        camera.shoot(page, "members")

        # ── a corpus, uploaded with its progress shown, validated ──
        path = corpus(tmp_path / "corpus.jsonl", 40_000)
        page.goto(f"{url}/console/datasets")
        page.get_by_test_id("upload-input").set_input_files(str(path))
        page.get_by_test_id("upload-button").click()
        row = page.get_by_test_id("file-row").filter(has_text="corpus.jsonl")
        row.wait_for()
        assert "processed" in row.inner_text()
        assert page.get_by_test_id("upload-progress").evaluate("e => e.value") == 1
        file_id = httpx.get(f"{url}/v1/files", headers={"Authorization": f"Bearer {key}"}).json()[
            "data"
        ][0]["id"]
        camera.shoot(page, "datasets")

        # ── a tiny training job, watched to its end with its charts ──
        start_job(page, url, file_id, FAST["max_steps"])
        assert wait_for_job(page) == "succeeded"
        chart = page.get_by_test_id("loss-chart").locator("svg")
        assert int(chart.get_attribute("data-points")) >= 2
        assert "step 20/20" in page.get_by_test_id("job-log").inner_text()
        camera.shoot(page, "job")
        page.goto(f"{url}/console/training")
        camera.shoot(page, "training")

        page.goto(f"{url}/console/training")
        page.get_by_role("link", name="e2e:1").first.click()
        page.wait_for_url("**/console/training/ftjob-*")
        page.get_by_test_id("job-result-link").click()
        page.wait_for_url("**/console/models/e2e**")

        # ── the new version answers in the playground, streamed ──
        page.goto(f"{url}/console/playground?model=e2e:1")
        page.get_by_test_id("pg-max-tokens").fill("24")
        page.get_by_test_id("pg-input").fill("Return the")
        page.get_by_test_id("pg-send").click()
        expect(page.get_by_test_id("pg-ttft")).to_have_text(re.compile(r"\d"), timeout=60_000)
        assert page.get_by_test_id("pg-output").last.inner_text().strip()
        page.get_by_test_id("pg-view-code").click()
        assert "curl" in page.get_by_test_id("pg-code-curl").inner_text()
        camera.shoot(page, "playground")

        # ── promote it; a second version; promote that; roll back to the first ──
        page.goto(f"{url}/console/models/e2e")
        promote(page, "1", "production")
        assert page.get_by_test_id("alias-production").inner_text().strip().endswith("1")
        second = train_by_api(url, key, file_id)
        assert second == "e2e:2"
        page.reload()
        promote(page, "2", "production")
        assert page.get_by_test_id("alias-production").inner_text().strip().endswith("2")
        page.get_by_test_id("rollback-button").first.click()
        expect(page.get_by_test_id("alias-production")).to_have_text(re.compile(r"1\s*$"))
        expect(page.get_by_test_id("events")).to_contain_text("rollback")
        expect(page.get_by_test_id("events")).to_contain_text("promote")
        camera.shoot(page, "model")
        page.goto(f"{url}/console/models")
        camera.shoot(page, "models")
        page.goto(f"{url}/console/usage")
        page.get_by_test_id("usage-table").wait_for()
        camera.shoot(page, "usage")
        page.goto(f"{url}/console/overview")
        page.get_by_test_id("ov-models").wait_for()
        camera.shoot(page, "overview")
        assert page.problems == []

        # ── a viewer: no admin controls, and the API refuses a forged post anyway ──
        viewer = open_page(chromium, timeout_ms=20_000)
        viewer.goto(f"{url}/console/login")
        camera.shoot(viewer, "login")
        sign_in(viewer, url, VIEWER)
        viewer.goto(f"{url}/console/models/e2e")
        viewer.get_by_test_id("alias-production").wait_for()
        expect(viewer.get_by_test_id("promote-button")).to_be_hidden()
        expect(viewer.get_by_test_id("rollback-button")).to_be_hidden()
        viewer.goto(f"{url}/console/members")
        viewer.get_by_test_id("member-row").first.wait_for()
        expect(viewer.get_by_test_id("add-member-button")).to_be_hidden()
        expect(viewer.get_by_test_id("revoke-key")).to_be_hidden()
        assert "Settings" not in viewer.locator("#nav").inner_text()
        project = viewer.evaluate("JSON.parse(localStorage.getItem('aimass.project'))")
        members = f"{url}/v1/projects/{project['id']}/members"
        form = {"email": VIEWER["email"], "role": "owner"}
        forged = viewer.request.post(members, form=form)  # the cookie, no CSRF token
        assert forged.status == 403 and "CSRF" in forged.json()["error"]["message"]
        token = viewer.locator("meta[name=csrf-token]").get_attribute("content")
        as_viewer = viewer.request.post(
            members, data=json.dumps(form), headers={"X-CSRF-Token": token,
                                                     "Content-Type": "application/json"},
        )  # fmt: skip
        assert as_viewer.status == 403  # signed in, token right: the role does not allow it
        assert viewer.problems == []
    assert len(camera.taken) == 2 * 13


def promote(page, version: str, alias: str) -> None:
    page.get_by_test_id("promote-version").select_option(version)
    page.get_by_test_id("promote-alias").fill(alias)
    page.get_by_test_id("promote-button").click()
    try:
        expect(page.get_by_test_id(f"alias-{alias}")).to_have_text(re.compile(rf"{version}\s*$"))
    except AssertionError as e:
        gates = page.get_by_test_id("gates").inner_text()
        error = page.locator("#promote-form .form-error").inner_text()
        raise AssertionError(f"{alias} not moved to {version}: {error} / gates: {gates}") from e


def train_by_api(url: str, key: str, file_id: str) -> str:
    """A second version of the same model, through the API with the key made in the console."""
    headers = {"Authorization": f"Bearer {key}"}
    hp = {k: int(v) for k, v in FAST.items()} | {"max_steps": 40}
    job = httpx.post(f"{url}/v1/fine_tuning/jobs", headers=headers, timeout=30, json={
        "model": "tiny", "training_file": file_id, "validation_file": file_id, "suffix": "e2e",
        "hyperparameters": hp,
    }).json()  # fmt: skip
    deadline = time.monotonic() + JOB_TIMEOUT_MS / 1000
    while (got := httpx.get(f"{url}/v1/fine_tuning/jobs/{job['id']}", headers=headers).json())[
        "status"
    ] not in ("succeeded", "failed", "cancelled"):
        assert time.monotonic() < deadline, got["status"]
        time.sleep(0.5)
    assert got["status"] == "succeeded", got["error"]
    return got["fine_tuned_model"]
