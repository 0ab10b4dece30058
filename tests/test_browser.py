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


@pytest.mark.django_db(transaction=True)
def test_the_instance_page_charts_real_traffic_without_a_reload(
    live_server: Any, django_user_model: Any, browser_page: Any
) -> None:
    """Real calls through a real multiplexer to a real localtei: the instance page's charts
    draw them, the list's columns show them, the index draws the fleet."""
    from playwright.sync_api import expect
    from tei.v1 import tei_pb2
    from tei_multiplexer.v1 import multiplexer_pb2 as mux
    from tei_multiplexer.v1 import multiplexer_pb2_grpc

    from multiplexer.server import BackgroundMultiplexer, ServerOptions
    from telemetry.models import TrafficSample
    from tests.conftest import wait_until
    from tests.http_client import add_row, request
    from tests.localtei_fixtures import MINILM_ID, start_localtei

    ARTIFACTS.mkdir(exist_ok=True)
    django_user_model.objects.create_superuser("operator", password="operator-pw")
    options = ServerOptions(host="127.0.0.1", port=0, http_port=0, rollup_interval_secs=1)
    with start_localtei(MINILM_ID) as minilm, BackgroundMultiplexer(options) as background:
        instance = add_row("charted", MINILM_ID, minilm.port)
        assert background.server is not None
        router = background.server.router
        wait_until(lambda: "charted" in router.table.by_name, 10, "charted routable")
        target = mux.Target(instance_name="charted")
        with grpc_channel(background.server.port) as channel:
            stub = multiplexer_pb2_grpc.TeiMultiplexerStub(channel)
            for index in range(40):
                text = f"sentence number {index} about embeddings"
                stub.Embed(
                    mux.EmbedRequest(target=target, request=tei_pb2.EmbedRequest(inputs=text))
                )
        http = f"http://127.0.0.1:{background.server.http_port}/instances/charted/embed"
        assert request(http, {"inputs": ["one", "two", "three"]}).status == 200

        def rolled_up() -> int:
            return sum(
                TrafficSample.objects.filter(instance="charted").values_list("calls", flat=True)
            )

        wait_until(lambda: rolled_up() == 41, 20, "the calls rolled up")
        steady = SteadyTraffic(background.server.port, target)

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

        page.goto(f"{live_server.url}/admin/instances/instance/{instance.pk}/change/")
        calls = page.locator('#tei-charts-15m [data-chart="calls"]')
        expect(calls.locator("canvas")).to_have_count(1)
        page.wait_for_function(
            "Number(document.querySelector('#tei-charts-15m [data-chart=\"calls\"]')"
            ".dataset.nonzero) > 0"
        )
        for chart in ("latency", "tokens", "queue"):
            expect(page.locator(f'#tei-charts-15m [data-chart="{chart}"] canvas')).to_have_count(1)
            expect(page.locator(f'#tei-charts-24h [data-chart="{chart}"] canvas')).to_have_count(1)
        assert int(calls.get_attribute("data-points") or 0) > 0
        # The page stays, and the charts redraw on their own as new windows come in.
        page.evaluate("window.teiNoReload = true")
        refreshed = page.evaluate("document.getElementById('tei-charts-15m').dataset.refreshed")
        page.wait_for_function(
            f"document.getElementById('tei-charts-15m').dataset.refreshed !== '{refreshed}'"
        )
        assert page.evaluate("window.teiNoReload") is True
        page.locator("#tei-traffic-module").scroll_into_view_if_needed()
        page.screenshot(path=ARTIFACTS / "admin-instance-traffic.png", full_page=True)

        page.goto(f"{live_server.url}/admin/instances/instance/")
        # The columns are the newest 10-second sample: live.js redraws them as calls come.
        with steady:
            p50 = page.locator('[data-instance="charted"][data-field="p50_ms"]')
            expect(p50).to_contain_text(" ms")
            rate = page.locator('[data-instance="charted"][data-field="calls_per_sec"]')
            page.wait_for_function("e => Number(e.textContent) > 0", arg=rate.element_handle())
            page.screenshot(path=ARTIFACTS / "admin-list-traffic.png", full_page=True)

        page.goto(f"{live_server.url}/admin/")
        fleet = page.locator('#tei-fleet-charts-15m [data-chart="fleet-calls"]')
        expect(fleet.locator("canvas")).to_have_count(1)
        page.wait_for_function(
            "Number(document.querySelector('#tei-fleet-charts-15m [data-chart=\"fleet-calls\"]')"
            ".dataset.nonzero) > 0"
        )
        page.screenshot(path=ARTIFACTS / "admin-index-fleet.png", full_page=True)
        assert failures == []


def grpc_channel(port: int) -> Any:
    import grpc

    return grpc.insecure_channel(f"127.0.0.1:{port}")


class SteadyTraffic:
    """Embed calls, one every 50 ms, from a thread, for as long as the block lasts."""

    def __init__(self, port: int, target: Any) -> None:
        import threading

        self.port, self.target = port, target
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> SteadyTraffic:
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop.set()
        self.thread.join(30)

    def _run(self) -> None:
        from tei.v1 import tei_pb2
        from tei_multiplexer.v1 import multiplexer_pb2 as mux
        from tei_multiplexer.v1 import multiplexer_pb2_grpc

        with grpc_channel(self.port) as channel:
            stub = multiplexer_pb2_grpc.TeiMultiplexerStub(channel)
            call = mux.EmbedRequest(target=self.target, request=tei_pb2.EmbedRequest(inputs="hi"))
            while not self.stop.wait(0.05):
                stub.Embed(call, timeout=30)
