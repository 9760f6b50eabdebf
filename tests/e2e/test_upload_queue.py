"""A camera roll at once: the page's upload queue in headless Chromium, against the live server.

A person picks 14 photos, a short video, a damaged JPEG and one more photo in a single go, while
9 uploads of an earlier visit are still unfinished on the server (its limit is 10). What they
should see: every file in line, at most 3 sent at a time, the server's "not now" waited out and
tried again (not a failed card), pause, resume and remove per file, then every photo and the
video Completed with thumbnails, the damaged JPEG failed with its reason and no Retry button,
and "Your media" a gallery of thumbnails, not a column of full-size pictures. The browser may
reach nothing but the site itself.
"""

from __future__ import annotations

import contextlib
import io
import random
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from PIL import Image, ImageDraw

from tests.conftest import AsgiServer
from tests.e2e.conftest import wait_in_page
from tests.e2e.test_graphiql import confine_to
from tests.e2e.test_upload_page import card
from tests.media import lavfi_video

sync_api = pytest.importorskip("playwright.sync_api")
expect, PlaywrightError = sync_api.expect, sync_api.Error
pytestmark = pytest.mark.worker

PHOTOS = 14
LEFTOVERS = 9  # unfinished uploads of an earlier visit: one short of the server's limit of 10
MAX_SENDING = 3


def photo(path: Path, n: int) -> Path:
    """A small camera-like JPEG: a gradient, a shape and a number, different for each n."""
    rng = random.Random(n)
    image = Image.new("RGB", (640, 480), (rng.randrange(256), rng.randrange(256), rng.randrange(256)))
    draw = ImageDraw.Draw(image)
    for y in range(0, 480, 8):
        draw.rectangle((0, y, 640, y + 8), fill=(y // 2, rng.randrange(256), 255 - y // 2))
    draw.ellipse((60 + n * 10, 80, 420 + n * 10, 380), fill=(255, (255 - n * 15) % 256, (n * 15) % 256))
    draw.text((40, 40), f"photo {n}", fill=(0, 0, 0))
    image.save(path, "JPEG", quality=85)
    return path


def damaged_jpeg(path: Path) -> Path:
    """Starts like a JPEG (the sniffer says image/jpeg), then garbage where the picture should be."""
    good = io.BytesIO()
    Image.new("RGB", (640, 480), (200, 30, 30)).save(good, "JPEG", quality=90)
    head = good.getvalue()[:400]  # SOI, JFIF, quantisation tables: a plausible start
    path.write_bytes(head + random.Random(7).randbytes(30_000))
    return path


@pytest.fixture
def leftovers(e2e_user: Any) -> list[str]:
    """Uploads begun on an earlier visit and never finished (they count against the limit)."""
    from media_app.uploads import upload_create

    return [str(upload_create(owner=e2e_user, file_name=f"left-{i}.mp4", size=5_000_000).pk) for i in range(LEFTOVERS)]


# Records the most cards the page showed as "uploading" at one moment, at every change of state.
COUNT_SENDING = """
(() => {
  window.__mostSending = 0;
  new MutationObserver(() => {
    const now = document.querySelectorAll('#uploads .card[data-state="uploading"]').length;
    window.__mostSending = Math.max(window.__mostSending, now);
  }).observe(document, { subtree: true, attributes: true, attributeFilter: ["data-state"], childList: true });
})();
"""


class InFlight:
    """The most tus requests of each kind the browser had open at once (creates; chunks)."""

    def __init__(self, page: Any) -> None:
        self.open: dict[str, set[Any]] = {"POST": set(), "PATCH": set()}
        self.most = {"POST": 0, "PATCH": 0}
        page.on("request", self.started)
        page.on("requestfinished", self.ended)
        page.on("requestfailed", self.ended)

    def started(self, request: Any) -> None:
        if urlsplit(request.url).path.startswith("/api/tus/") and request.method in self.open:
            self.open[request.method].add(request)
            self.most[request.method] = max(self.most[request.method], len(self.open[request.method]))

    def ended(self, request: Any) -> None:
        for requests in self.open.values():
            requests.discard(request)


def test_a_camera_roll_is_queued_sent_and_shown_as_a_gallery(
    leftovers, logged_in_page, asgi_server, shots, tmp_path, traffic
):
    page = logged_in_page
    elsewhere = confine_to(page, asgi_server.url)
    photos = [photo(tmp_path / f"IMG_{n:04d}.jpg", n) for n in range(1, PHOTOS + 1)]
    video = lavfi_video(tmp_path / "clip.mp4", seconds=1)
    damaged = damaged_jpeg(tmp_path / "damaged.jpg")
    extra = photo(tmp_path / "not-this-one.jpg", 99)
    in_flight = InFlight(page)
    page.evaluate(COUNT_SENDING)

    # The leftovers are in "Your media", Pending, each with a Cancel button.
    library = page.locator("#library")
    expect(library.locator(".card")).to_have_count(LEFTOVERS)

    # Hold every chunk at the door until the queue has been looked at.
    held: list[Any] = []
    gate = {"open": False}

    def hold(route: Any) -> None:
        if route.request.method == "PATCH" and not gate["open"]:
            held.append(route)
        else:
            route.continue_()

    page.route("**/api/tus/**", hold)
    page.set_input_files("#file-input", [str(p) for p in [*photos, video, damaged, extra]])

    uploads = page.locator("#uploads .card")
    expect(uploads).to_have_count(PHOTOS + 3)
    # The server takes one more unfinished upload: the first file's chunk waits at the door, the
    # next creates are answered 429 too_many_uploads, and the page waits instead of failing them.
    wait_in_page(page, lambda: held, timeout=30, what="the first chunk")
    # (The first files in line are tried again now and then; the later ones just wait.)
    expect(page.locator("#queue-held")).to_contain_text("The server asked to wait: You have 10 uploads in progress")
    expect(card(page, "IMG_0013.jpg").locator('[data-box="upload"] [data-text]')).to_contain_text(
        "Waiting for the server · trying again in"
    )
    expect(card(page, "clip.mp4").locator('[data-box="upload"] [data-text]')).to_contain_text("in line")
    states = page.eval_on_selector_all("#uploads .card", "cards => cards.map((c) => c.dataset.state)")
    assert states.count("queued") >= PHOTOS + 3 - MAX_SENDING and set(states) <= {"queued", "uploading"}, states
    assert not page.locator('#uploads .card[data-state="failed"]').count()
    shots.take(page, "queued-and-the-server-asks-to-wait")

    # Per file: pause one in line, remove another that was picked by mistake.
    card(page, "IMG_0014.jpg").get_by_role("button", name="Pause IMG_0014.jpg").click()
    expect(card(page, "IMG_0014.jpg").locator("[data-badge]")).to_have_text("Paused")
    card(page, "not-this-one.jpg").get_by_role("button", name="Remove not-this-one.jpg").click()
    expect(card(page, "not-this-one.jpg")).to_have_count(0)

    # The person clears the leftovers; the queue goes on by itself, three at a time.
    for item_id in leftovers:
        tile = library.locator(f'.card[data-item-id="{item_id}"]')
        tile.get_by_role("button", name="Cancel").click()
        # (Gone before the next click: new tiles from the queue going on must not shift it under the pointer.)
        gone = f"the tile of {item_id} (it read {tile.all_inner_texts()}) gone after Cancel"
        expect(tile, gone).to_have_count(0, timeout=15_000)
    # (Each goes for good: a status event of a deleted item arriving late brings no tile back.)
    expect(library.locator(".card"), f"tiles left: {library.locator('.card').all_inner_texts()}").to_have_count(0)
    gate["open"] = True
    for route in held:
        route.continue_()
    expect(card(page, "IMG_0003.jpg").locator("[data-badge]")).not_to_have_text("Queued", timeout=60_000)
    shots.take(page, "sending-three-at-a-time", full_page=False)

    card(page, "IMG_0014.jpg").get_by_role("button", name="Resume IMG_0014.jpg").click()
    for path in [*photos, video]:
        expect(card(page, path.name).locator("[data-badge]")).to_have_text("Completed", timeout=120_000)
    for path in [*photos, video]:
        thumb = card(page, path.name).locator(".card-thumb img")
        expect(thumb).to_be_visible()
        page.wait_for_function("i => i.complete && i.naturalWidth > 0", arg=thumb.element_handle())
    failed = card(page, damaged.name)
    expect(failed.locator("[data-badge]")).to_have_text("Failed", timeout=60_000)
    expect(failed.locator("[data-error]")).not_to_be_empty()
    expect(failed.get_by_role("button", name=f"Retry {damaged.name}")).to_be_hidden()
    reason = failed.locator("[data-error]").inner_text()
    expect(page.locator("#queue-summary")).to_contain_text(f"{PHOTOS + 2} of {PHOTOS + 2} sent")
    shots.take(page, "all-sent")
    assert page.evaluate("window.__mostSending") == MAX_SENDING
    assert max(in_flight.most.values()) <= MAX_SENDING, f"tus requests at once: {in_flight.most}"

    # "Your media" after a reload: a gallery of thumbnails, every picture bounded.
    page.reload()
    page.wait_for_selector("html[data-ready]")
    tiles = library.locator(".card")
    expect(tiles).to_have_count(PHOTOS + 2)
    for path in [*photos, video]:
        tile = card(page, path.name, "#library")
        tile.scroll_into_view_if_needed()
        expect(tile.locator("[data-badge]")).to_have_text("Completed")
        thumb = tile.locator(".card-thumb img")
        expect(thumb).to_be_visible()
        page.wait_for_function("i => i.complete && i.naturalWidth > 0", arg=thumb.element_handle())
    broken = card(page, damaged.name, "#library")
    expect(broken.locator("[data-error]")).to_have_text(reason)
    expect(broken.get_by_role("button", name=f"Retry {damaged.name}")).to_be_hidden()
    page.evaluate("window.scrollTo(0, 0)")
    shots.take(page, "your-media-gallery")
    sizes = page.evaluate("[...document.querySelectorAll('img')].map((i) => i.getBoundingClientRect().height)")
    assert max(sizes) <= 240, sizes
    assert page.evaluate("document.documentElement.scrollHeight") < 2500

    # A preview opens on demand, bounded, and the full size is one Download away.
    first = card(page, photos[0].name, "#library")
    first.locator("summary").click()
    picture = first.locator("picture img")
    page.wait_for_function("i => i.complete && i.naturalWidth > 0", arg=picture.element_handle())
    assert picture.evaluate("i => i.getBoundingClientRect().height") <= 320
    first.scroll_into_view_if_needed()
    shots.take(page, "a-preview-opened", full_page=False)

    assert elsewhere == [], f"requests to other hosts: {elsewhere}"
    assert traffic.hosts() == {"127.0.0.1"}
    assert traffic.errors == []


@pytest.fixture
def rate_limited_server(transactional_db: None, tmp_path: Path, monkeypatch: Any) -> Iterator[AsgiServer]:
    """A live server of this test's own whose create rate is 1 a second: a camera roll trips it."""
    monkeypatch.setenv("UPLOAD_CREATE_RATE", "1/second")
    server = AsgiServer(tmp_path / "asgi-rate.log")
    server.start()
    yield server
    server.stop()


def test_the_queue_waits_as_retry_after_says_when_creates_are_rate_limited(
    rate_limited_server, e2e_user, session_cookie, browser, celery_worker, shots, tmp_path
):
    server = rate_limited_server
    context = browser.new_context(viewport={"width": 1180, "height": 900}, base_url=server.url)
    context.add_cookies([{"name": "sessionid", "value": session_cookie, "url": server.url}])
    page = context.new_page()
    answers: list[tuple[float, int, str | None]] = []  # (when, status, Retry-After) of each create
    asked: list[float] = []  # when each create was sent

    def is_create(request: Any) -> bool:
        return bool(request.method == "POST" and urlsplit(request.url).path == "/api/tus/")

    def answered(response: Any) -> None:
        if is_create(response.request):
            answers.append((time.monotonic(), response.status, response.headers.get("retry-after")))

    page.on("request", lambda request: asked.append(time.monotonic()) if is_create(request) else None)
    page.on("response", answered)
    try:
        page.goto("/")
        page.wait_for_selector("html[data-ready]")
        photos = [photo(tmp_path / f"burst-{n}.jpg", n) for n in range(1, 7)]
        page.set_input_files("#file-input", [str(p) for p in photos])
        page.wait_for_function(
            "() => document.getElementById('queue-held').textContent.includes('Too many uploads started')",
            polling="raf",
            timeout=30_000,
        )
        shots.take(page, "rate-limited-waiting")
        for path in photos:
            expect(card(page, path.name).locator("[data-badge]")).to_have_text("Completed", timeout=120_000)
        assert not page.locator('#uploads .card[data-state="failed"]').count()
        shots.take(page, "rate-limited-all-completed")
    finally:
        context.close()

    refused = [(when, wait) for when, status, wait in answers if status == 429]
    assert refused and all(wait is not None for _, wait in refused), answers
    assert sum(status == 201 for _, status, _ in answers) == len(photos)
    # After each refusal, the next create was sent no sooner than Retry-After said.
    for when, wait in refused:
        later = [w for w in asked if w > when]
        assert later and later[0] - when >= int(wait) - 0.25, (answers, asked)
    log = server.log.read_bytes()
    assert b"Traceback" not in log and b"Exception in ASGI application" not in log


def test_pausing_an_upload_keeps_what_was_sent_and_resume_goes_on_from_there(logged_in_page, shots, tmp_path, traffic):
    page = logged_in_page
    big = tmp_path / "long-take.jpg"  # a real JPEG padded to three 8 MB chunks
    big.write_bytes(photo(tmp_path / "frame.jpg", 3).read_bytes().ljust(20 * 1024 * 1024, b"\0"))
    chunk = 8 * 1024 * 1024
    held: list[Any] = []
    gate = {"passes": 1}

    def hold(route: Any) -> None:
        if route.request.method == "PATCH" and gate["passes"] is not None:
            if gate["passes"] <= 0:
                held.append(route)
                return
            gate["passes"] -= 1
        route.continue_()

    page.route("**/api/tus/**", hold)
    page.set_input_files("#file-input", str(big))
    upload = card(page, big.name)
    wait_in_page(page, lambda: held, timeout=30, what="the second chunk")

    upload.get_by_role("button", name=f"Pause {big.name}").click()
    expect(upload.locator("[data-badge]")).to_have_text("Paused")
    expect(upload.locator('[data-box="upload"] [data-text]')).to_have_text("Paused at 8.0 MB of 20.0 MB")
    shots.take(page, "paused", full_page=False)
    for route in held:
        with contextlib.suppress(PlaywrightError):
            route.abort()  # the chunk the pause cut off
    held.clear()
    gate["passes"] = None
    paused_at = len(traffic.requests)

    upload.get_by_role("button", name=f"Resume {big.name}").click()
    expect(upload.locator("[data-badge]")).to_have_text("Completed", timeout=120_000)
    after = [r for r in traffic.requests[paused_at:] if urlsplit(r.url).path.startswith("/api/tus/")]
    assert [r.method for r in after][:2] == ["HEAD", "PATCH"], [r.method for r in after]
    assert int(after[1].headers["upload-offset"]) == chunk  # went on from what was stored
    assert not [r for r in after if r.method == "POST"]
    assert traffic.errors == []
