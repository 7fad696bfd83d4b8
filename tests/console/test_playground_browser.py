"""The playground and usage pages in a real browser (Debian's Chromium) over a real gateway:
a streamed chat whose history is resent, Stop, the "View code" commands run as printed, the
project a person must choose, and usage charts, totals and CSV export of what was generated."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from tests.console.test_pages import ADMIN
from tests.gateway.conftest import base_config, running, wait_for
from tests.gateway.fakes import FakeCatalog, FakeLoader

expect = pytest.importorskip("playwright.sync_api", reason="Playwright is not installed").expect


@pytest.fixture
def gw(tmp_path, tiny_registry):
    with running(base_config(tmp_path, tiny_registry, usage_flush_s=0.1)) as gw:
        yield gw


def _ask(page, text: str) -> None:
    before = page.locator(".pg-msg-assistant").count()
    page.get_by_test_id("pg-input").fill(text)
    page.get_by_test_id("pg-send").click()
    expect(page.locator(".pg-msg-assistant")).to_have_count(before + 1)
    expect(page.get_by_test_id("pg-stop")).to_be_disabled()  # the answer ended


def test_a_streamed_chat_continues_and_its_code_runs(gw, page):
    chats: list[dict] = []
    page.on("request", lambda r: r.url.endswith("/v1/chat/completions")
            and chats.append(json.loads(r.post_data)))  # fmt: skip
    page.goto(f"{gw.url}/console/playground?model=tiny")
    expect(page.get_by_test_id("pg-model")).to_have_value("tiny")
    page.get_by_test_id("pg-system").fill("It's a test: answer briefly.")
    page.get_by_test_id("pg-temperature").fill("0")
    page.get_by_test_id("pg-max-tokens").fill("6")

    _ask(page, "The cat")
    expect(page.get_by_test_id("pg-ttft")).to_contain_text("ms")
    expect(page.get_by_test_id("pg-tps")).to_contain_text("tokens/s")
    first = page.get_by_test_id("pg-output").inner_text()
    assert first.strip()
    _ask(page, "and then?")
    assert page.get_by_test_id("pg-output").count() == 1  # the last answer only
    assert [m["role"] for m in chats[1]["messages"]] == ["system", "user", "assistant", "user"]
    assert chats[1]["messages"][2]["content"] == first
    assert chats[1] | {"messages": None} == {
        "model": "tiny", "messages": None, "temperature": 0, "top_p": 1, "max_tokens": 6,
        "stream": True, "stream_options": {"include_usage": True},
    }  # fmt: skip

    page.get_by_test_id("pg-input").fill("Say 'hi'")
    page.get_by_test_id("pg-view-code").click()
    curl = page.get_by_test_id("pg-code-curl").inner_text()
    python = page.get_by_test_id("pg-code-python").inner_text()
    assert curl.startswith(f"curl -N '{gw.url}/v1/chat/completions'")
    assert "$AIMASS_API_KEY" in curl and "It'\\''s a test" in curl
    assert f'base_url="{gw.url}/v1"' in python and 'os.environ["AIMASS_API_KEY"]' in python
    # both run as printed (open access: any key will do), and send what the page would send
    env = os.environ | {"AIMASS_API_KEY": "none"}
    streamed = subprocess.run(["bash", "-c", curl], env=env, capture_output=True, text=True,
                              timeout=60, check=True).stdout  # fmt: skip
    assert streamed.rstrip().endswith("data: [DONE]") and '"completion_tokens":6' in streamed
    printed = subprocess.run([sys.executable, "-c", python], env=env, capture_output=True,
                             text=True, timeout=60, check=True).stdout  # fmt: skip
    assert printed.endswith("6 completion tokens\n")

    page.get_by_test_id("pg-clear").click()
    expect(page.locator(".pg-msg")).to_have_count(0)
    assert page.problems == []


def test_a_version_named_in_the_url_is_the_one_asked(gw, page):
    chats: list[dict] = []
    page.on("request", lambda r: r.url.endswith("/v1/chat/completions")
            and chats.append(json.loads(r.post_data)))  # fmt: skip
    page.goto(f"{gw.url}/console/playground?model=tiny:1")  # not among /v1/models
    expect(page.get_by_test_id("pg-model")).to_have_value("tiny:1")
    page.get_by_test_id("pg-max-tokens").fill("3")
    _ask(page, "The cat")
    assert page.get_by_test_id("pg-output").inner_text().strip()
    assert [c["model"] for c in chats] == ["tiny:1"]
    assert page.problems == []


def test_out_of_bounds_settings_are_named_before_sending(gw, page):
    page.goto(f"{gw.url}/console/playground")
    expect(page.get_by_test_id("pg-model")).to_have_value("tiny")
    page.get_by_test_id("pg-temperature").fill("3")
    page.get_by_test_id("pg-input").fill("The cat")
    page.get_by_test_id("pg-send").click()
    expect(page.get_by_test_id("pg-error")).to_have_text(
        "Temperature 3 is out of bounds: at least 0, at most 2"
    )
    expect(page.locator(".pg-msg")).to_have_count(0)
    # what only the API knows, it says: its own message, shown as is
    page.get_by_test_id("pg-temperature").fill("1")
    page.get_by_test_id("pg-max-tokens").fill("100000")
    page.get_by_test_id("pg-send").click()
    expect(page.get_by_test_id("pg-error")).to_contain_text("max_tokens = 100000 exceeds")
    expect(page.get_by_test_id("pg-input")).to_have_value("The cat")  # kept for another try
    assert page.problems == []


def test_stop_aborts_the_answer(tmp_path, tiny_registry, page):
    loader = FakeLoader()
    config = base_config(tmp_path, tiny_registry)
    with running(config, catalog=FakeCatalog({"tiny": 1}, production=1), loader=loader) as gw:
        page.goto(f"{gw.url}/console/playground")
        expect(page.get_by_test_id("pg-model")).to_have_value("tiny")
        page.get_by_test_id("pg-max-tokens").fill("8")
        _ask(page, "hello")
        engine = loader.engines["tiny:1"]
        engine.pause()  # the next answer waits before its first token
        page.get_by_test_id("pg-input").fill("never answered")
        page.get_by_test_id("pg-send").click()
        expect(page.get_by_test_id("pg-stop")).to_be_enabled()
        wait_for(lambda: engine.in_flight == 1)
        page.get_by_test_id("pg-stop").click()
        expect(page.get_by_test_id("pg-stop")).to_be_disabled()
        wait_for(lambda: engine.in_flight == 0)  # the gateway saw the hang-up: aborted
        engine.resume()
        # nothing came back: the question returns to the box, the first turn stays
        expect(page.get_by_test_id("pg-input")).to_have_value("never answered")
        expect(page.locator(".pg-msg")).to_have_count(2)
    assert page.problems == []


def _sign_up(gw, page) -> None:
    page.goto(f"{gw.url}/console/setup")
    page.get_by_label("Email").fill(ADMIN["email"])
    page.get_by_label("Name").fill("Ada")
    page.get_by_label("Password").fill(ADMIN["password"])
    page.get_by_role("button", name="Create admin and sign in").click()
    page.wait_for_url("**/console/overview")


def test_a_person_chats_in_a_project_and_sees_its_usage(gw, page):
    _sign_up(gw, page)  # no project yet: the playground says to choose one
    page.goto(f"{gw.url}/console/playground")
    expect(page.get_by_test_id("pg-project-note")).to_contain_text("Choose a project")
    expect(page.get_by_test_id("pg-send")).to_be_disabled()
    csrf = page.locator("meta[name=csrf-token]").get_attribute("content")
    made = page.request.post(f"{gw.url}/v1/projects", data={"name": "alpha"},
                             headers={"X-CSRF-Token": csrf})  # fmt: skip
    assert made.ok, made.text()
    page.reload()  # the header's switcher picks the new project
    expect(page.get_by_test_id("pg-project-note")).to_be_hidden()
    expect(page.get_by_test_id("pg-model")).to_have_value("tiny")
    page.get_by_test_id("pg-max-tokens").fill("4")
    _ask(page, "The cat")
    _ask(page, "The dog")

    page.goto(f"{gw.url}/console/usage")
    expect(page.get_by_test_id("usage-project")).to_have_text("alpha")
    page.get_by_test_id("usage-range").select_option("hour")
    expect(page.get_by_test_id("usage-group")).to_have_value("minute")

    def counted():
        page.get_by_test_id("usage-refresh").click()
        return "2 requests" in page.get_by_test_id("usage-span").inner_text()

    wait_for(counted, timeout=10, every=0.3)
    tokens = page.locator("[data-testid=usage-chart-tokens] svg")
    assert int(tokens.get_attribute("data-points")) >= 60  # every minute of the hour, 0 or not
    rows = page.locator("[data-testid=usage-table] tbody tr")
    expect(rows).to_have_count(2)  # tiny, then the total
    cells = rows.nth(0).locator("td")
    assert [cells.nth(i).inner_text() for i in (0, 1, 2)] == ["tiny", "People (signed in)", "2"]

    page.get_by_test_id("usage-series").select_option("key")  # a line per key
    legend = page.locator("[data-testid=usage-chart-requests] .chart-legend li")
    expect(legend).to_have_text(["People (signed in)"])
    page.get_by_test_id("usage-model").select_option("tiny")
    expect(page.get_by_test_id("usage-csv")).to_have_attribute("href", re.compile("model=tiny"))
    href = page.get_by_test_id("usage-csv").get_attribute("href")
    assert "format=csv" in href and "group_by=minute" in href and "project_id=proj" in href
    csv = page.request.get(gw.url + href)
    assert csv.headers["content-type"].startswith("text/csv")
    lines = csv.text().splitlines()
    assert lines[0].startswith('"start_time","end_time"') and ',"tiny",2,' in lines[1]

    # a range with nothing in it says so
    page.get_by_test_id("usage-range").select_option("custom")
    page.get_by_test_id("usage-from").fill("2030-01-01T00:00")
    page.get_by_test_id("usage-to").fill("2030-01-02T00:00")
    page.get_by_test_id("usage-to").dispatch_event("change")
    expect(page.get_by_test_id("usage-empty")).to_be_visible()
    expect(page.get_by_test_id("usage-table")).to_contain_text("No requests in this range.")
    expect(page.get_by_test_id("usage-group")).to_have_value("hour")
    assert page.problems == []
