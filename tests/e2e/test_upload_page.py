"""The upload page in headless Chromium, against the live server and the real Celery worker.

What a person would check: they log in, drop or pick real files, watch the bars move, see
Completed, watch the video (streamed through dash.js from the DASH manifest) and the image,
read why a bad file failed, and reload in the middle of an upload without starting again.
"""

from __future__ import annotations

import base64
import contextlib
import itertools
import re
import shutil
from typing import Any
from urllib.parse import urlsplit

import pytest

from tests.conftest import TESTDATA
from tests.e2e.conftest import PASSWORD, wait_in_page

sync_api = pytest.importorskip("playwright.sync_api")  # requirements-dev.txt; `make test` installs it
expect, PlaywrightError = sync_api.expect, sync_api.Error
pytestmark = pytest.mark.worker
REAL = TESTDATA / "real"
HOSTILE = TESTDATA / "hostile"
MB = 1024 * 1024

MAKE_DATA_TRANSFER = """([name, type, b64]) => {
  const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
  const transfer = new DataTransfer();
  transfer.items.add(new File([bytes], name, { type }));
  return transfer;
}"""


def card(page: Any, name: str, where: str = "#uploads") -> Any:
    return page.locator(f'{where} .card:has([data-name]:text-is("{name}"))')


def bar_values(page: Any, name: str, bar: str) -> list[float]:
    script = "([f, b]) => window.__bars.filter((x) => x.file === f && x.bar === b).map((x) => x.value)"
    return page.evaluate(script, [name, bar])


def moved(values: list[float]) -> bool:
    return any(later > earlier for earlier, later in itertools.pairwise(values))


def test_log_in_drop_a_video_pick_an_image_and_watch_both_play(page, asgi_server, e2e_user, shots, traffic):
    page.goto("/")
    assert urlsplit(page.url).path == "/accounts/login/"
    shots.take(page, "login-form")
    page.get_by_label("Username").fill(e2e_user.username)
    page.get_by_label("Password").fill(PASSWORD)
    page.get_by_role("button", name="Log in").click()
    expect(page.get_by_role("heading", name="Upload media")).to_be_visible()
    assert urlsplit(page.url).path == "/"
    page.wait_for_selector("html[data-ready]")
    expect(page.locator("#connection")).to_have_text("Live updates: on")
    expect(page.locator("#limits-hint")).to_contain_text("per file")
    shots.take(page, "logged-in-empty")

    # A real drag and drop: a DataTransfer carrying the file, dispatched on the drop zone.
    video_name = "realshort.mp4"
    transfer = page.evaluate_handle(
        MAKE_DATA_TRANSFER, [video_name, "video/mp4", base64.b64encode((REAL / video_name).read_bytes()).decode()]
    )
    page.dispatch_event("#dropzone", "dragenter", {"dataTransfer": transfer})
    page.dispatch_event("#dropzone", "dragover", {"dataTransfer": transfer})
    expect(page.locator("#dropzone")).to_have_class(re.compile(r"\bis-over\b"))
    shots.take(page, "dragging-over-the-drop-zone", full_page=False)
    page.dispatch_event("#dropzone", "drop", {"dataTransfer": transfer})
    # And one through the file input, as the "Choose files…" button fills it.
    image_name = "wood.jpg"
    page.set_input_files("#file-input", str(REAL / image_name))

    video_card, image_card = card(page, video_name), card(page, image_name)
    expect(video_card).to_have_count(1)
    expect(image_card).to_have_count(1)
    shots.take(page, "uploading")
    try:
        expect(video_card).to_have_attribute("data-state", "processing", timeout=60_000)
        shots.take(page, "processing")
    except AssertionError:
        pass  # processing can finish between two looks; the bars below are the real check
    expect(video_card.locator("[data-badge]")).to_have_text("Completed", timeout=180_000)
    expect(image_card.locator("[data-badge]")).to_have_text("Completed", timeout=60_000)

    for name in (video_name, image_name):
        upload, process = bar_values(page, name, "upload"), bar_values(page, name, "process")
        assert moved(upload) and upload[-1] == 100, f"upload bar of {name}: {upload}"
        assert moved(process) and process[-1] == 100, f"processing bar of {name}: {process}"
    expect(video_card.locator('[data-box="upload"] [data-text]')).to_contain_text("Uploaded")
    expect(video_card.locator('[data-box="process"] [data-text]')).to_contain_text("Done")

    # Results open on demand, in a bounded preview; the thumbnail shows at once.
    expect(video_card.locator(".card-thumb img")).to_be_visible()
    video_card.locator("summary").click()
    # The video plays from the DASH manifest through dash.js (Media Source: a blob: source).
    video = video_card.locator("video")
    expect(video).to_have_attribute("data-source", "dash")
    expect(video_card.locator("figcaption")).to_contain_text("DASH stream (dash.js)")
    handle = video.element_handle()
    page.wait_for_function("v => v.readyState >= 2", arg=handle, timeout=30_000)
    video.evaluate("v => { v.muted = true; return v.play(); }")
    page.wait_for_function("v => v.currentTime > 0.3", arg=handle, timeout=30_000)
    played = video.evaluate("v => { v.pause(); return { t: v.currentTime, src: v.currentSrc }; }")
    assert played["t"] > 0.3 and played["src"].startswith("blob:")
    dash = [r for r in traffic.responses if urlsplit(r.url).path.startswith("/api/dash/")]
    manifests = [r for r in dash if r.url.endswith("/manifest.mpd")]
    assert manifests and manifests[0].headers["content-type"] == "application/dash+xml"
    segments = [r for r in dash if "/chunk-0-" in r.url and r.status in (200, 206)]
    assert segments and segments[0].headers["content-type"] == "video/webm"
    assert not [r for r in traffic.responses if "/api/files/" in r.url and "video/webm" in r.headers["content-type"]]
    expect(video_card.locator(".sizes")).to_contain_text("Original upload")
    expect(video_card.locator(".sizes")).to_contain_text("WebM video")
    expect(video_card.locator(".card-thumb")).to_be_visible()
    shots.take(page, "completed-video-playing")

    # The image: AVIF (WebP fallback) through a signed URL, actually decoded, and bounded.
    expect(image_card.locator(".card-thumb img")).to_be_visible()
    image_card.locator("summary").click()
    img = image_card.locator("picture img")
    page.wait_for_function("i => i.complete && i.naturalWidth > 0", arg=img.element_handle(), timeout=30_000)
    current = img.evaluate("i => i.currentSrc")
    assert urlsplit(current).path.startswith("/api/files/")
    served = [r for r in traffic.responses if r.url == current]
    assert served and served[0].headers["content-type"] == "image/avif"
    expect(image_card.locator(".sizes")).to_contain_text("AVIF image")
    expect(image_card.locator(".sizes")).to_contain_text("WebP image")
    assert img.evaluate("i => i.getBoundingClientRect().height") <= 320
    image_card.scroll_into_view_if_needed()
    shots.take(page, "completed-image", full_page=False)

    # Labelled controls and a live region; nothing fetched from anywhere but this server.
    problems = page.evaluate(
        """() => {
          const out = [];
          for (const b of document.querySelectorAll('button'))
            if (!(b.getAttribute('aria-label') || b.textContent.trim())) out.push('a button has no name');
          for (const p of document.querySelectorAll('progress'))
            if (!p.labels.length) out.push('a progress bar has no label');
          for (const m of document.querySelectorAll('video, audio'))
            if (!m.getAttribute('aria-label')) out.push('a player has no label');
          for (const i of document.querySelectorAll('img'))
            if (!i.hasAttribute('alt')) out.push('an image has no alt');
          return out;
        }"""
    )
    assert problems == []
    expect(page.locator("#announcer")).to_have_attribute("aria-live", "polite")
    expect(page.get_by_role("button", name=f"Delete {video_name}")).to_be_visible()
    assert traffic.hosts() == {"127.0.0.1"}
    assert traffic.errors == []

    # Readable at phone width: nothing wider than the screen.
    page.set_viewport_size({"width": 375, "height": 812})
    assert page.evaluate("document.documentElement.scrollWidth") <= 375
    shots.take(page, "phone-375px")


def test_hostile_files_show_why_they_failed_and_the_list_updates_live(logged_in_page, shots, tmp_path, traffic):
    page = logged_in_page
    # The server's refusal: in a browser without WebAssembly, whose page sends what it cannot probe
    # (with it, ffmpeg.wasm refuses such a file before sending: tests/e2e/test_wasm.py).
    page.context.add_init_script("delete window.WebAssembly")
    page.reload()
    page.wait_for_selector("html[data-ready]")
    expect(page.get_by_label("Edit before upload")).to_be_disabled()
    # A second tab: its list of earlier items is fed by the same websocket.
    watcher = page.context.new_page()
    watcher.goto("/")
    watcher.wait_for_selector("html[data-ready]")
    expect(watcher.locator("#library-empty")).to_be_visible()
    page.bring_to_front()  # a file chooser opens only from the focused tab

    disguised = tmp_path / "holiday.jpg"  # a PHP script named like a photo
    shutil.copyfile(HOSTILE / "php_shell.jpg.php", disguised)
    svg = HOSTILE / "imagemagick_local_file.svg"

    # Keyboard only: Tab to "Choose files…", Enter opens the file chooser. (Listening early:
    # Playwright turns on file-chooser interception asynchronously when the first listener comes.)
    page.on("filechooser", lambda chooser: None)
    for _ in range(6):
        page.keyboard.press("Tab")
        if page.evaluate("document.activeElement.id") == "pick":
            break
    assert page.evaluate("document.activeElement.id") == "pick"
    with page.expect_file_chooser() as chooser:
        page.keyboard.press("Enter")
    chooser.value.set_files([str(disguised), str(svg)])

    svg_card = card(page, svg.name)
    expect(svg_card.locator("[data-badge]")).to_have_text("Not sent")
    expect(svg_card.locator("[data-error]")).to_contain_text("image/svg+xml files are not accepted")
    php_card = card(page, "holiday.jpg")
    expect(php_card.locator("[data-badge]")).to_have_text("Failed", timeout=30_000)
    reason = "The file is not a video, audio or image file we can read."
    expect(php_card.locator("[data-error]")).to_have_text(reason)
    # A retry cannot change what the file is: the server says so (retryable: false), no button.
    expect(php_card.get_by_role("button", name="Retry holiday.jpg")).to_be_hidden()
    assert traffic.paths("POST").count("/api/tus/") == 1  # the SVG was refused before sending
    shots.take(page, "hostile-files-refused")

    row = card(watcher, "holiday.jpg", "#library")
    expect(row.locator("[data-badge]")).to_have_text("Failed")
    expect(row.locator("[data-error]")).to_have_text(reason)
    shots.take(watcher, "other-tab-list-updated-live")

    expect(row.get_by_role("button", name="Retry holiday.jpg")).to_be_hidden()
    item_id = php_card.get_attribute("data-item-id")
    php_card.get_by_role("button", name=re.compile(r"^(Delete|Remove) holiday\.jpg$")).click()
    expect(php_card).to_have_count(0)
    assert page.request.get(f"/api/media/{item_id}").status == 404
    assert traffic.errors == []


def test_a_reload_in_the_middle_of_an_upload_resumes_at_the_stored_offset(logged_in_page, shots, tmp_path, traffic):
    page = logged_in_page
    # A real JPEG padded to several 8 MB chunks (decoders stop at the image's end marker).
    big = tmp_path / "wood-large.jpg"
    data = (REAL / "wood.jpg").read_bytes()
    big.write_bytes(data + bytes(20 * MB - len(data)))
    chunk = 8 * MB

    # Let the first chunk through, then hold the second: the reload happens with 8 MB stored.
    # (The route stays installed until after the reload: removing it would release the held
    # request to the server.)
    held: list[Any] = []
    gate_state = {"passes": 1}

    def gate(route: Any) -> None:
        if route.request.method == "PATCH" and gate_state["passes"] is not None:
            if gate_state["passes"] <= 0:
                held.append(route)
                return
            gate_state["passes"] -= 1
        route.continue_()

    page.route("**/api/tus/**", gate)
    page.set_input_files("#file-input", str(big))
    upload_card = card(page, big.name)
    wait_in_page(page, lambda: held, timeout=30, what="the second chunk")
    item_id = upload_card.get_attribute("data-item-id")
    assert item_id
    before = bar_values(page, big.name, "upload")
    assert moved(before), before
    shots.take(page, "mid-upload-before-reload")

    page.reload()
    page.wait_for_selector("html[data-ready]")
    for route in held:
        with contextlib.suppress(PlaywrightError):
            route.abort()  # the request of the page that is gone; never to reach the server
    held.clear()
    gate_state["passes"] = 0  # and the resumed upload's first chunk waits while its note is read
    unfinished = page.locator("#unfinished")
    expect(unfinished).to_be_visible()
    expect(unfinished).to_contain_text(f"{big.name} — 8.0 MB of 20.0 MB sent")
    shots.take(page, "after-reload-unfinished-upload-listed")

    # "Resume…" on the row opens the file chooser; the same file picked there continues.
    reloaded_at = len(traffic.requests)
    with page.expect_file_chooser() as chooser:
        unfinished.get_by_role("button", name=f"Resume the upload of {big.name}: pick the file again").click()
    expect(unfinished).to_contain_text(f"Pick {big.name} (20.0 MB)")
    chooser.value.set_files(str(big))
    upload_card = card(page, big.name)
    expect(upload_card).to_have_attribute("data-resumed-offset", str(chunk))
    note = upload_card.locator("[data-note]")
    expect(note).to_contain_text("Resumed at 8.0 MB of 20.0 MB")
    expect(unfinished).to_be_hidden()
    shots.take(page, "resuming")
    wait_in_page(page, lambda: held, timeout=30, what="the resumed upload's first chunk")
    gate_state["passes"] = None
    for route in held:
        route.continue_()
    expect(upload_card.locator("[data-badge]")).to_have_text("Completed", timeout=120_000)
    expect(note).to_be_hidden()  # the note was about the upload, which is done
    shots.take(page, "resumed-and-completed")

    after = traffic.requests[reloaded_at:]
    assert not [r for r in after if r.method == "POST" and urlsplit(r.url).path == "/api/tus/"], "a new upload began"
    patches = [r for r in after if r.method == "PATCH"]
    assert urlsplit(patches[0].url).path == f"/api/tus/{item_id}"
    assert int(patches[0].headers["upload-offset"]) == chunk  # continued, not restarted
    assert moved(bar_values(page, big.name, "upload"))
    upload_card.locator("summary").click()
    expect(upload_card.locator(".sizes")).to_contain_text("20.0 MB")

    # Cancel: the item and its files are gone.
    upload_card.get_by_role("button", name=f"Delete {big.name}").click()
    expect(upload_card).to_have_count(0)
    assert page.request.get(f"/api/media/{item_id}").status == 404
    assert traffic.errors == []
