"""The player of a finished video (issue 18), in Chromium: the quality menu lists Auto and every
rung and choosing one plays that rung; a page whose browser refuses AV1 (``isTypeSupported``
patched, as on a machine without an AV1 decoder) plays the VP9 fallback; hovering the seek strip
shows the storyboard tile of that time; the placeholder is painted until the poster loads."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.player import finished_video, open_player, refusing

sync_api = pytest.importorskip("playwright.sync_api")
expect = sync_api.expect
pytestmark = pytest.mark.worker

# A browser without an AV1 decoder.
NO_AV1 = refusing("av01")
TIMES = "\N{MULTIPLICATION SIGN}"  # as the page writes a size


@pytest.fixture
def ladder_video(e2e_user: Any, make_item: Any, celery_worker: Any, tmp_path: Path) -> str:
    """A finished 6 s 640x360 video of the e2e user: AV1 at 360 lines, VP9 at 360 and 234."""
    return finished_video(make_item, e2e_user, tmp_path / "ladder.mp4", seconds=6, size="640x360")


def test_quality_menu_storyboard_placeholder_and_without_av1_the_vp9_fallback(
    ladder_video: str, logged_in_page: Any, shots: Any
) -> None:
    """One finished video for both looks at it (it took ~10 s of the worker's per test): the page
    as it is, then reloaded as a browser without an AV1 decoder sees it."""
    page = logged_in_page
    card = open_player(page, ladder_video)
    video = card.locator("video")
    expect(video).to_have_attribute("data-codec", "av01", timeout=30_000)
    menu = card.locator("[data-quality]")
    expect(menu.locator("option")).to_have_text(["Auto", re.compile(r"^360p · \d+ kb/s$")], timeout=30_000)
    # The gallery tile had its placeholder painted, then cleared once the thumbnail loaded.
    expect(card.locator(".card-thumb img")).to_have_attribute("data-placeholder", "cleared", timeout=30_000)
    strip = card.locator("[data-storyboard-strip]")
    expect(strip).to_have_attribute("data-cues", "6")  # 6 s, a tile a second
    strip.scroll_into_view_if_needed()
    box = strip.bounding_box()
    assert box is not None
    strip.hover(position={"x": box["width"] * 0.75, "y": box["height"] / 2})
    tile = card.locator("[data-storyboard-tile]")
    expect(tile).to_be_visible()
    start = float(tile.get_attribute("data-cue-start") or "nan")
    assert 3.0 <= start <= 5.0, start  # 75 % of 6 s lies in the cue starting at 4 s
    assert "url(" in tile.evaluate("t => getComputedStyle(t).backgroundImage")
    shots.take(page, "storyboard-hover")

    # Without AV1, the VP9 fallback plays.
    page.add_init_script(NO_AV1)
    page.reload()
    card = open_player(page, ladder_video)
    video = card.locator("video")
    expect(video).to_have_attribute("data-codec", "vp09", timeout=30_000)
    page.wait_for_function("v => v.currentTime > 0.5 && !v.paused", arg=video.element_handle(), timeout=30_000)
    expect(card.locator("[data-quality] option")).to_have_text(["Auto", re.compile("^360p"), re.compile("^234p")])
    shots.take(page, "vp9-playing")


@pytest.fixture
def ladder_video_720(e2e_user: Any, make_item: Any, celery_worker: Any, tmp_path: Path) -> str:
    """A finished 12 s 1280x720 video: AV1 at 720, 486 and 360 lines (three 4 s segments)."""
    return finished_video(make_item, e2e_user, tmp_path / "ladder720.mp4", seconds=12, size="1280x720", timeout=300)


def test_a_throttled_network_switches_down_and_playback_goes_on(
    ladder_video_720: str, logged_in_page: Any, shots: Any
) -> None:
    page = logged_in_page
    cdp = page.context.new_cdp_session(page)
    cdp.send("Network.enable")
    # About 1 Mb/s from the start: well below the top rung's bitrate (~1.7 Mb/s: 0.85 MB per 4 s
    # segment of this clip), above the 486p rung's (~0.5 Mb/s), so the buffer fills slowly at
    # 720p and playback can go on below it. (It was 600 kb/s: the same switch, but each 720p
    # segment took 11 s to arrive instead of 7.)
    cdp.send(
        "Network.emulateNetworkConditions",
        {"offline": False, "latency": 50, "downloadThroughput": 125_000, "uploadThroughput": 125_000},
    )
    card = open_player(page, ladder_video_720)
    video = card.locator("video")
    menu = card.locator("[data-quality]")
    expect(menu.locator("option")).to_have_count(4, timeout=60_000)  # Auto, 720p, 486p, 360p
    menu.select_option(index=1)  # the top rung, by hand
    expect(video).to_have_attribute("data-representation", "1280x720", timeout=60_000)
    caption = card.locator("figcaption")
    expect(caption).to_contain_text(f"· 1280{TIMES}720")
    menu.select_option("auto")  # dash.js's rules, which see the slow downloads, take over
    expect(video).not_to_have_attribute("data-representation", "1280x720", timeout=60_000)
    # The caption names the rung that plays now, not the download's size.
    playing = (video.get_attribute("data-representation") or "").replace("x", TIMES)
    expect(caption).to_contain_text(f"· {playing}")
    expect(caption).not_to_contain_text(f"1280{TIMES}720")
    at = video.evaluate("v => v.currentTime")
    page.wait_for_function("([v, t]) => v.currentTime > t + 0.5", arg=[video.element_handle(), at], timeout=60_000)
    shots.take(page, "switched-down")
