"""A real Chromium drives the admin against a real worker and a real localtei instance."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from instances.models import Instance

CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(
        not os.access(CHROMIUM, os.X_OK),
        reason=f"{CHROMIUM} is not installed (apt-get install chromium, or `make chromium`)",
    ),
]


@pytest.fixture
def browser_page(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    # Playwright's sync API keeps an event loop on this thread; the test's own ORM calls
    # stay synchronous and on this thread, so Django's async-safety guard does not apply.
    monkeypatch.setenv("DJANGO_ALLOW_ASYNC_UNSAFE", "true")

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True
        )
        try:
            yield browser.new_page(viewport={"width": 1400, "height": 900})
        finally:
            browser.close()


@pytest.mark.django_db(transaction=True)
def test_it_stops_the_running_instance_and_redraws_its_badge_without_a_reload(
    live_server: Any,
    running_instance: Callable[..., Instance],
    django_user_model: Any,
    browser_page: Any,
) -> None:
    from playwright.sync_api import expect

    ARTIFACTS.mkdir(exist_ok=True)
    instance = running_instance("minilm")
    assert instance.status == "running", instance.last_error
    django_user_model.objects.create_superuser("operator", password="operator-pw")
    page = browser_page
    page.set_default_timeout(30_000)
    failures: list[str] = []
    page.on("pageerror", lambda error: failures.append(f"script error: {error}"))
    page.on(
        "response",
        lambda r: failures.append(f"{r.status} {r.url}") if r.status >= 400 else None,
    )

    page.goto(f"{live_server.url}/admin/login/")
    page.fill("#id_username", "operator")
    page.fill("#id_password", "operator-pw")
    page.click("input[type=submit]")
    expect(page.locator("#tei-fleet")).to_be_visible()
    expect(page.locator('[data-status-count="running"]')).to_have_text("1")
    page.wait_for_function("document.getElementById('tei-live').dataset.refreshed")
    page.screenshot(path=ARTIFACTS / "admin-index.png", full_page=True)

    page.goto(f"{live_server.url}/admin/instances/instance/{instance.pk}/change/")
    expect(page.locator("#tei-log")).to_contain_text("Ready")
    expect(page.locator("#tei-live-status")).to_contain_text("Live: refreshed")
    page.screenshot(path=ARTIFACTS / "admin-instance-page.png", full_page=True)

    page.goto(f"{live_server.url}/admin/instances/instance/")
    badge = page.locator('[data-instance="minilm"][data-field="status"]')
    expect(badge).to_have_text("running")
    page.screenshot(path=ARTIFACTS / "admin-list-running.png", full_page=True)

    page.check(f'input[name="_selected_action"][value="{instance.pk}"]')
    page.select_option('select[name="action"]', "stop_selected")
    page.click('button[name="index"]')
    expect(page.locator(".messagelist")).to_contain_text("Stopping 1 instance: minilm.")
    page.screenshot(path=ARTIFACTS / "admin-list-stop-requested.png", full_page=True)

    # From here on the page must not reload: a marker on window would not survive one.
    page.evaluate("window.teiNoReload = true")
    expect(badge).to_have_text("stopped", timeout=60_000)
    expect(badge).to_have_class("tei-badge tei-badge--stopped")
    assert page.evaluate("window.teiNoReload") is True
    page.screenshot(path=ARTIFACTS / "admin-list-stopped.png", full_page=True)
    assert Instance.objects.get(pk=instance.pk).status == "stopped"
    assert failures == []
