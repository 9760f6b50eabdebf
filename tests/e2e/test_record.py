"""Record from the camera on the upload page: Chromium's fake camera and microphone published
over WHIP with the browser's own WebRTC, to the live server and the real worker."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import pytest

from tests.e2e.conftest import CHROMIUM, CHROMIUM_ARGS

sync_api = pytest.importorskip("playwright.sync_api")  # requirements-dev.txt; `make test` installs it
expect = sync_api.expect
pytestmark = pytest.mark.worker

# A camera and a microphone that need no device and no one to click "Allow".
FAKE_MEDIA = ["--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream"]


@pytest.fixture
def browser(asgi_server: Any, celery_worker: Any, e2e_user: Any, session_cookie: str) -> Iterator[Any]:
    """conftest's browser, with the fake camera."""
    if not CHROMIUM.exists():
        pytest.skip("Debian's chromium is not installed (make test installs it)")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=[*CHROMIUM_ARGS, *FAKE_MEDIA])
        try:
            yield browser
        finally:
            browser.close()


def test_record_five_seconds_from_the_camera_stop_and_watch_it_play(logged_in_page, shots, traffic):
    page = logged_in_page
    page.get_by_role("button", name="Record", exact=True).click()
    preview = page.get_by_label("Camera preview")
    expect(preview).to_be_visible()
    page.wait_for_function("v => v.readyState >= 2 && v.videoWidth > 0", arg=preview.element_handle())
    elapsed = page.locator("#record-elapsed")
    expect(elapsed).to_have_text("0:01", timeout=15_000)  # connected: the clock runs
    card = page.locator("#uploads .card").first
    expect(card.locator("[data-badge]")).to_have_text("Recording")
    expect(elapsed).to_have_text("0:05", timeout=10_000)
    expect(card.locator('[data-box="upload"] [data-text]')).to_have_text(re.compile(r"Recording · 0:0[45]"))
    shots.take(page, "recording")
    page.get_by_role("button", name="Stop").click()

    expect(preview).to_be_hidden()
    expect(card.locator('[data-box="upload"] [data-text]')).to_have_text(re.compile(r"Recorded 0:0[56]"))
    expect(card.locator("[data-badge]")).to_have_text("Completed", timeout=120_000)
    expect(card.locator('[data-box="process"] [data-text]')).to_contain_text("Done")
    whip = [r for r in traffic.requests if urlsplit(r.url).path.startswith("/api/whip/")]
    assert [r.method for r in whip] == ["POST", "DELETE"]
    item_id = urlsplit(whip[1].url).path.rsplit("/", 1)[1]
    assert card.get_attribute("data-item-id") == item_id

    # What was recorded is what was sent: about 5 s of the camera and the microphone.
    detail = page.request.get(f"/api/media/{item_id}").json()
    outputs = {o["role"]: o for o in detail["outputs"]}
    assert detail["kind"] == "video" and detail["status"] == "Completed"
    assert 4.0 <= outputs["video"]["duration"] <= 6.5, outputs["video"]
    assert outputs["video"]["codec"] == "av1+opus"  # the microphone's sound came through too

    # It plays, like any upload.
    card.locator("summary").click()
    video = card.locator("video")
    handle = video.element_handle()
    page.wait_for_function("v => v.readyState >= 2", arg=handle, timeout=30_000)
    video.evaluate("v => { v.muted = true; return v.play(); }")
    page.wait_for_function("v => v.currentTime > 0.5", arg=handle, timeout=30_000)
    assert video.evaluate("v => { v.pause(); return v.currentTime; }") > 0.5
    assert not traffic.errors, traffic.errors
    assert traffic.hosts() == {"127.0.0.1"}  # nothing from anywhere else (no STUN by default)
    shots.take(page, "recorded-and-playing")

    # The recorder fits a phone's width too.
    page.set_viewport_size({"width": 375, "height": 812})
    assert page.evaluate("document.documentElement.scrollWidth") <= 375


def test_record_the_screen(logged_in_page, shots):
    """The screen (here headless Chromium's own) with the fake microphone."""
    page = logged_in_page
    page.get_by_role("button", name="Record screen").click()
    expect(page.get_by_label("Screen preview")).to_be_visible()
    card = page.locator("#uploads .card").first
    expect(card.locator("[data-name]")).to_have_text("Screen recording")
    expect(page.locator("#record-elapsed")).to_have_text("0:03", timeout=20_000)
    page.get_by_role("button", name="Stop").click()
    expect(card.locator("[data-badge]")).to_have_text("Completed", timeout=120_000)
    item_id = card.get_attribute("data-item-id")
    detail = page.request.get(f"/api/media/{item_id}").json()
    video = {o["role"]: o for o in detail["outputs"]}["video"]
    assert 2.0 <= video["duration"] <= 4.5 and video["codec"] == "av1+opus", video
    shots.take(page, "screen-recorded")
