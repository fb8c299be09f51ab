"""The console as a person uses it: Playwright driving Debian's chromium against the real app
served by uvicorn on a loopback port, real Redis behind it. Screenshots land in
.artifacts/web/ (test artefacts). Skips when chromium or Playwright is missing."""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from conftest import RUN_ID
from detect_helpers import TENANT
from web_helpers import (
    OPERATOR_TOKEN,
    SCRIPT_NAME,
    VIEWER_TOKEN,
    Served,
    populate,
    settings_for,
    write_alerts,
)

from monitor.model.schema import MACHINE
from monitor.redis_conn import delete_prefix
from monitor.web import create_app

CHROMIUM = os.environ.get("MDE_MONITOR_CHROMIUM", "/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parent.parent / ".artifacts" / "web"

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
if not (Path(CHROMIUM).is_file() or shutil.which(CHROMIUM)):
    pytest.skip(
        f"chromium not found at {CHROMIUM} (apt-get install chromium, or `make browser`)",
        allow_module_level=True,
    )


@pytest.fixture(scope="module")
def site(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    prefix = f"mdetest-{RUN_ID}-webui"
    client = redis.Redis.from_url(redis_url)
    alerts = write_alerts(tmp_path_factory.mktemp("alerts"))
    settings = settings_for(redis_url, prefix, alerts, tokens=True)
    populate(client, settings)
    served = Served(create_app(settings, host="127.0.0.1"))
    try:
        yield {"url": served.url, "client": client, "prefix": prefix}
    finally:
        served.stop()
        delete_prefix(client, prefix)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_api.sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            yield b
        finally:
            b.close()


class Page:
    """A fresh browser context and page that records console errors."""

    def __init__(self, browser: Any, base: str) -> None:
        self.context = browser.new_context(base_url=base)
        self.page = self.context.new_page()
        self.page.set_default_timeout(15_000)
        self.errors: list[str] = []
        self.page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))

    def shot(self, name: str) -> None:
        self.page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)

    def sign_in(self, token: str) -> None:
        self.page.goto("/")
        self.page.wait_for_url(re.compile(r"/login"))
        self.page.fill("#token", token)
        self.page.click("#login-token")
        self.page.wait_for_selector("#whoami")

    def close(self) -> None:
        self.context.close()


@pytest.fixture
def operator(browser: Any, site: dict[str, Any]) -> Iterator[Page]:
    p = Page(browser, site["url"])
    p.sign_in(OPERATOR_TOKEN)
    yield p
    p.close()


def test_overview_change_to_entity_and_graph(operator: Page) -> None:
    page = operator.page
    page.goto("/")
    assert "1 tenant" in page.inner_text("#fleet-health")
    assert page.locator("svg.plot").count() >= 3
    operator.shot("overview")
    page.click("nav >> text=Changes")
    link = page.locator("#changes a.entity-link", has_text=SCRIPT_NAME).first
    assert link.inner_text() == SCRIPT_NAME  # a machine named <script> shows as text
    operator.shot("changes")
    link.click()
    page.wait_for_url(re.compile(r"/entities/"))
    assert page.inner_text("h1") == SCRIPT_NAME
    assert "riskScore" in page.inner_text("#field-history")
    page.wait_for_selector("body[data-graph-ready='1']")
    nodes = page.evaluate("document.querySelectorAll('#graph canvas').length")
    assert nodes > 0
    assert "nodes" in page.inner_text("#graph-note")
    operator.shot("entity")
    assert operator.errors == [], operator.errors


def test_run_a_query(operator: Page) -> None:
    page = operator.page
    page.goto("/explore")
    page.fill("#query", "FIND microsoft_defender_machine WITH riskScore = 'High'")
    page.click("#run-query")
    page.wait_for_selector("#results")
    assert "2 results" in page.inner_text("#result-count")
    assert MACHINE.key("m00") in page.inner_text("#results")
    page.click("[data-view=graph]")
    page.wait_for_selector("body[data-graph-ready='1']")
    operator.shot("explore-graph")
    page.click("[data-view=json]")
    assert '"type"' in page.inner_text("#result-json")
    assert operator.errors == [], operator.errors


def test_create_and_expire_a_silence(operator: Page, site: dict[str, Any]) -> None:
    page = operator.page
    page.goto(f"/entities/{MACHINE.key('m01')}?tenant={TENANT}")
    page.click("#silence-entity")  # prefilled from the entity: "silence this machine for 8 h"
    page.wait_for_url(re.compile(r"/alerts"))
    assert f"subject={MACHINE.key('m01')}" in page.input_value("#silence-matchers")
    page.fill("#silence-comment", "rebuild of m01")
    page.click("#silence-create")
    row = page.locator("#silences-table tr", has_text="rebuild of m01")
    assert row.locator(".silence-state").inner_text() == "active"
    operator.shot("silence-created")
    row.locator("button", has_text="Expire").click()
    row = page.locator("#silences-table tr", has_text="rebuild of m01")
    assert row.locator(".silence-state").inner_text() == "expired"
    assert "silence.expire" in page.inner_text("#audit")
    operator.shot("silence-expired")
    assert operator.errors == [], operator.errors


def test_retry_a_dead_letter(operator: Page) -> None:
    page = operator.page
    page.goto("/alerts#dead")
    button = page.locator("#dead-table button", has_text="Retry").first
    button.click()
    page.wait_for_url(re.compile(r"/alerts"))
    statuses = page.locator("#deliveries-table tr", has_text="hook").all_inner_texts()
    assert any("queued" in s for s in statuses)
    assert "delivery.retry" in page.inner_text("#audit")
    operator.shot("dead-letter-retried")


def test_viewer_is_refused_and_signs_out(browser: Any, site: dict[str, Any]) -> None:
    p = Page(browser, site["url"])
    try:
        p.sign_in(VIEWER_TOKEN)
        page = p.page
        assert page.inner_text("#whoami") == "alice (viewer)"
        page.goto("/alerts")
        page.fill("#silence-matchers", "subject=anything")
        page.click("#silence-create")
        assert "operator role" in page.inner_text("#error")
        p.shot("viewer-refused")
        page.goto("/")
        page.click("#logout")
        page.wait_for_url(re.compile(r"/login"))
        page.goto("/alerts")
        page.wait_for_url(re.compile(r"/login\?next="))
        p.shot("signed-out")
    finally:
        p.close()
