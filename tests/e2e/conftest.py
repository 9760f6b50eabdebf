"""Browser tests: Debian's Chromium, driven by Playwright, against the live ASGI server and worker.

Playwright's sync API keeps an asyncio loop running in this thread, and Django refuses ORM
calls while one runs; so everything that touches the database (the user, the session cookie)
is made by fixtures that run before the browser starts, and the tests ask the server, not the
ORM, what happened.

Screenshots go to ``test-artifacts/screenshots/<test>/`` (gitignored), one per step.
"""

from __future__ import annotations

import re
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from tests.env_plugin import ROOT

CHROMIUM = Path("/usr/bin/chromium")
# Closed network: without the background-networking flags Chromium keeps trying Google's hosts.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SCREENSHOTS = ROOT / "test-artifacts" / "screenshots"
PASSWORD = "pw-e2e-123456"

# Records every value the page gives a <progress>, so a test can tell that a bar moved even
# when it moved faster than a poll could see.
RECORD_BARS = """
(() => {
  const desc = Object.getOwnPropertyDescriptor(HTMLProgressElement.prototype, "value");
  window.__bars = [];
  Object.defineProperty(HTMLProgressElement.prototype, "value", {
    configurable: true,
    get() { return desc.get.call(this); },
    set(v) {
      const card = this.closest("[data-card]");
      const name = card ? card.querySelector("[data-name]").textContent : null;
      window.__bars.push({ file: name, bar: this.dataset.bar, value: Number(v) });
      desc.set.call(this, v);
    },
  });
})();
"""


def wait_in_page(page: Any, predicate: Callable[[], Any], *, timeout: float, what: str) -> Any:
    """``wait_for`` for browser tests: polls through Playwright, whose event handlers (routes,
    requests) run only while one of its calls is waiting, never during a plain ``time.sleep``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        page.wait_for_timeout(100)


@dataclass
class Shots:
    folder: Path
    count: int = 0

    def take(self, page: Any, name: str, *, full_page: bool = True) -> Path:
        self.count += 1
        path = self.folder / f"{self.count:02d}-{name}.png"
        page.screenshot(path=str(path), full_page=full_page)
        return path


@dataclass
class Traffic:
    requests: list[Any] = field(default_factory=list)
    responses: list[Any] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def paths(self, method: str = "GET") -> list[str]:
        return [urlsplit(r.url).path for r in self.requests if r.method == method]

    def hosts(self) -> set[str]:
        return {urlsplit(r.url).hostname or "" for r in self.requests if r.url.startswith("http")}


# What must never appear in the web server's log while a person uses the site.
INCIDENTS = re.compile(rb"Traceback|Exception in ASGI application| ERROR ")


@pytest.fixture(autouse=True)
def web_log_stays_clean(asgi_server: Any) -> Iterator[None]:
    """Every browser test ends by reading the web server's log of its own span: no traceback."""
    start = asgi_server.log.stat().st_size
    yield
    with open(asgi_server.log, "rb") as fh:
        fh.seek(start)
        text = fh.read()
    found = INCIDENTS.search(text)
    assert found is None, f"the web log has an error:\n{text[max(0, found.start() - 2000) :].decode(errors='replace')}"


@pytest.fixture
def shots(request: pytest.FixtureRequest) -> Shots:
    folder = SCREENSHOTS / re.sub(r"[^A-Za-z0-9_.-]+", "_", request.node.name)
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    return Shots(folder)


@pytest.fixture
def e2e_user(make_user: Any) -> Any:
    return make_user(password=PASSWORD)


@pytest.fixture
def session_cookie(e2e_user: Any) -> str:
    from django.test import Client

    client = Client()
    client.force_login(e2e_user)
    return str(client.cookies["sessionid"].value)


@pytest.fixture
def browser(asgi_server: Any, celery_worker: Any, e2e_user: Any, session_cookie: str) -> Iterator[Any]:
    if not CHROMIUM.exists():
        pytest.skip("Debian's chromium is not installed (make test installs it)")
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture
def traffic() -> Traffic:
    return Traffic()


@pytest.fixture
def page(browser: Any, asgi_server: Any, traffic: Traffic) -> Iterator[Any]:
    context = browser.new_context(viewport={"width": 1180, "height": 900}, base_url=asgi_server.url)
    context.set_default_timeout(30_000)
    page = context.new_page()
    page.add_init_script(RECORD_BARS)
    page.on("request", lambda request: traffic.requests.append(request))
    page.on("response", lambda response: traffic.responses.append(response))
    page.on("pageerror", lambda exc: traffic.errors.append(str(exc)))
    try:
        yield page
    finally:
        context.close()


@pytest.fixture
def logged_in_page(page: Any, asgi_server: Any, session_cookie: str) -> Any:
    """The page with the user's session cookie (the form login is tested on its own)."""
    page.context.add_cookies([{"name": "sessionid", "value": session_cookie, "url": asgi_server.url}])
    page.goto("/")
    page.wait_for_selector("html[data-ready]")
    return page
