"""The operator's H.264/AAC fallback (issue 18, ``video.h264_fallback``) on the page's player, in
Chromium: an item processed with it on plays its avc1 rungs when the browser refuses both AV1
and VP9 (``isTypeSupported`` patched, as on a browser that decodes neither), and, with nothing
refused, the player still picks AV1, and VP9 where only AV1 is refused: the fallback is there for
those browsers only."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Worker
from tests.e2e.player import finished_video, open_player, refusing

sync_api = pytest.importorskip("playwright.sync_api")
expect = sync_api.expect
pytestmark = pytest.mark.worker

FALLBACK_ON = json.dumps({"video": {"h264_fallback": True}})


@pytest.fixture(scope="module")
def _fallback_session(_worker_session: Worker, django_db_blocker: Any) -> Iterator[Worker]:
    """The test run's worker, restarted with the fallback on in its profile (the operator's
    ``MEDIA_PROFILES``) once for this module's tests, which all want it (not stopped and started
    twice per test); put back as it was afterwards (the next test's ``celery_worker`` starts it
    again)."""
    with django_db_blocker.unblock():
        _worker_session.stop()
        _worker_session.env = {**_worker_session.env, "MEDIA_PROFILES": FALLBACK_ON}
        _worker_session.start()
    try:
        yield _worker_session
    finally:
        _worker_session.stop()
        _worker_session.env = {k: v for k, v in _worker_session.env.items() if k != "MEDIA_PROFILES"}


@pytest.fixture
def fallback_worker(_fallback_session: Worker, celery_worker: Worker) -> Worker:
    """The worker with the fallback on, running (``celery_worker`` starts it again, fallback and
    all, if a test stopped it)."""
    assert celery_worker is _fallback_session
    assert celery_worker.env.get("MEDIA_PROFILES") == FALLBACK_ON
    return celery_worker


@pytest.fixture
def fallback_video(e2e_user: Any, make_item: Any, fallback_worker: Worker, tmp_path: Path) -> str:
    """A finished 4 s 640x360 video processed with the fallback on: AV1 at 360 lines, VP9 at 360
    and 234, H.264 at 360; Opus and AAC."""
    return finished_video(make_item, e2e_user, tmp_path / "fallback.mp4", seconds=4, size="640x360")


def _playing(page: Any, video: Any) -> None:
    """currentTime moves on from where it is now, the video not paused: frames are decoded."""
    at = video.evaluate("v => v.currentTime")
    page.wait_for_function(
        "([v, t]) => v.currentTime > t + 0.5 && !v.paused && !v.error", arg=[video.element_handle(), at], timeout=30_000
    )


def _in_use(video: Any) -> dict[str, str]:
    """The codecs of the representations dash.js is playing now, video and audio."""
    return dict(
        video.evaluate(
            """v => {
              const p = v._player;
              const codecs = (type) => { const r = p.getCurrentRepresentationForType(type); return r ? r.codecs : ""; };
              return { video: codecs("video"), audio: codecs("audio") };
            }"""
        )
    )


def test_with_the_fallback_on_each_browser_plays_the_first_set_it_decodes(
    fallback_video: str, logged_in_page: Any, shots: Any
) -> None:
    """One finished video (a worker's run of it per test before) seen by four browsers in turn,
    each refusing more (the page's init scripts add up): AV1 where it can, then VP9, then
    H.264 with Opus, then H.264 with AAC."""
    page = logged_in_page
    card = open_player(page, fallback_video)
    video = card.locator("video")
    expect(video).to_have_attribute("data-codec", "av01", timeout=30_000)
    _playing(page, video)
    # The menu lists the playing set's rungs: the AV1 one, not the VP9 or H.264 ones.
    expect(card.locator("[data-quality] option")).to_have_text(["Auto", re.compile("^360p")])
    in_use = _in_use(video)
    assert in_use["video"].startswith("av01.") and in_use["audio"] == "opus", in_use
    expect(card.locator("figcaption")).to_contain_text("DASH stream (dash.js) · AV1 + Opus")
    shots.take(page, "av1-playing")

    # Without AV1, VP9 comes before H.264 (the royalty-free fallback first).
    page.add_init_script(refusing("av01"))
    page.reload()
    card = open_player(page, fallback_video)
    video = card.locator("video")
    expect(video).to_have_attribute("data-codec", "vp09", timeout=30_000)
    _playing(page, video)
    expect(card.locator("[data-quality] option")).to_have_text(["Auto", re.compile("^360p"), re.compile("^234p")])
    in_use = _in_use(video)
    assert in_use["video"].startswith("vp09.") and in_use["audio"] == "opus", in_use
    expect(card.locator("figcaption")).to_contain_text("DASH stream (dash.js) · VP9 + Opus")
    shots.take(page, "vp9-playing")

    # A browser that decodes neither AV1 nor VP9: the H.264 fallback plays.
    page.add_init_script(refusing("av01", "vp09"))
    page.reload()
    card = open_player(page, fallback_video)
    video = card.locator("video")
    expect(video).to_have_attribute("data-codec", "avc1", timeout=30_000)
    expect(video).to_have_attribute("data-representation", "640x360")
    _playing(page, video)
    expect(card.locator("[data-quality] option")).to_have_text(["Auto", re.compile("^360p")])
    in_use = _in_use(video)
    assert in_use["video"].startswith("avc1."), in_use
    # Chromium decodes Opus, the first audio set: dash.js keeps it beside the H.264 video.
    assert in_use["audio"] == "opus", in_use
    expect(card.locator("figcaption")).to_contain_text("DASH stream (dash.js) · H.264 + Opus")
    shots.take(page, "h264-opus-playing")

    # A browser that decodes neither AV1, VP9 nor Opus (as Safari's Media Source long did not):
    # the AAC set plays.
    page.add_init_script(refusing("av01", "vp09", "opus"))
    page.reload()
    card = open_player(page, fallback_video)
    video = card.locator("video")
    expect(video).to_have_attribute("data-codec", "avc1", timeout=30_000)
    _playing(page, video)
    in_use = _in_use(video)
    assert in_use["video"].startswith("avc1."), in_use
    assert in_use["audio"].startswith("mp4a."), in_use
    expect(card.locator("figcaption")).to_contain_text("DASH stream (dash.js) · H.264 + AAC")
    shots.take(page, "h264-aac-playing")
