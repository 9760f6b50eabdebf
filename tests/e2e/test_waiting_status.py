"""What the page says while a file waits for a worker, and when it is deleted in another tab.

Headless Chromium against the live server. The waiting test runs workers shaped like the
Procfile's (one slot for the video queue): two videos at once, and while one encodes the other
says "Waiting for a video worker · 1st in line" with a time left, instead of the name of a stage
that is over. The delete test has two tabs: what one deletes leaves the other, with no Retry.
"""

from __future__ import annotations

import pytest

from tests.e2e.conftest import wait_in_page
from tests.e2e.test_upload_page import card
from tests.media import lavfi_video

pytest_plugins = ["tests.procfile_workers"]
sync_api = pytest.importorskip("playwright.sync_api")
expect = sync_api.expect
pytestmark = pytest.mark.worker

PROCESS_TEXTS = """
() => Object.fromEntries([...document.querySelectorAll('#uploads .card')].map((c) => [
  c.querySelector('[data-name]').textContent,
  c.querySelector('[data-box="process"]').hidden ? '' : c.querySelector('[data-box="process"] [data-text]').textContent,
]))
"""

# Records every Retry button the page ever shows, however briefly.
WATCH_RETRY = """
() => {
  window.__retryShown = [];
  new MutationObserver(() => {
    for (const b of document.querySelectorAll('[data-action="retry"]')) {
      if (!b.hidden) window.__retryShown.push(b.getAttribute("aria-label"));
    }
  }).observe(document, { subtree: true, attributes: true, attributeFilter: ["hidden"], childList: true });
}
"""


def test_a_video_waiting_for_the_video_worker_says_so_with_its_place_and_time_left(
    logged_in_page, procfile_workers, shots, tmp_path, traffic
):
    # (procfile_workers after the page: the page's fixtures start the session's worker first.)
    page = logged_in_page
    longer = lavfi_video(tmp_path / "longer.mp4", seconds=12, size="1280x720")
    shorter = lavfi_video(tmp_path / "shorter.mp4", seconds=3)
    page.set_input_files("#file-input", [str(longer), str(shorter)])

    seen: list[dict[str, str]] = []

    def one_encodes_the_other_waits() -> dict[str, str] | None:
        texts = page.evaluate(PROCESS_TEXTS)
        if not seen or seen[-1] != texts:
            seen.append(texts)
        encoding = [n for n, t in texts.items() if t.startswith("Encoding")]
        waiting = [n for n, t in texts.items() if t.startswith("Waiting for a video worker · 1st in line · ")]
        return texts if encoding and waiting else None

    try:
        texts = wait_in_page(page, one_encodes_the_other_waits, timeout=180, what="one encoding, one waiting")
    except AssertionError:
        shots.take(page, "never-one-encoding-one-waiting")
        raise AssertionError("what the page said:\n" + "\n".join(map(str, seen))) from None
    shots.take(page, "one-encodes-one-waits")
    waiting_text = next(t for t in texts.values() if t.startswith("Waiting"))
    assert "%" in waiting_text, texts
    waiting_name = next(n for n, t in texts.items() if t.startswith("Waiting"))
    waiting_card = card(page, waiting_name)
    expect(waiting_card).to_have_attribute("data-waiting", "true")
    expect(waiting_card.locator("[data-badge]")).to_have_text("Processing")

    for path in (longer, shorter):
        expect(card(page, path.name).locator("[data-badge]")).to_have_text("Completed", timeout=180_000)
    shots.take(page, "both-completed")
    assert traffic.errors == []
    print(f"seen: {texts}")


def test_an_item_deleted_in_one_tab_leaves_the_other_tab_with_no_retry(logged_in_page, shots, tmp_path, traffic):
    first = logged_in_page
    clip = lavfi_video(tmp_path / "deleted-elsewhere.mp4", seconds=20, size="1280x720")
    second = first.context.new_page()
    second.goto("/")
    second.wait_for_selector("html[data-ready]")
    second.evaluate(WATCH_RETRY)

    first.set_input_files("#file-input", str(clip))
    there = card(second, clip.name, "#library")
    expect(there.locator("[data-badge]")).to_have_text("Processing", timeout=120_000)
    shots.take(second, "the-other-tab-sees-it-processing")

    card(first, clip.name).get_by_role("button", name=f"Cancel {clip.name}").click()
    expect(card(first, clip.name)).to_have_count(0)
    # The other tab is told it is gone: the tile leaves, and no Retry was ever offered on it.
    expect(there).to_have_count(0, timeout=30_000)
    shots.take(second, "the-other-tab-after-the-delete")
    assert second.evaluate("window.__retryShown") == []
    assert traffic.errors == []
