"""Helpers of the player tests (issue 18): a finished video to play, its card opened and playing,
and an init script that makes the page's browser refuse some codecs."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from media_app.models import MediaItem
from media_app.services import media_processing_start
from tests.conftest import wait_for
from tests.media import lavfi_video


def finished_video(make_item: Any, owner: Any, path: Path, *, seconds: int, size: str, timeout: float = 180) -> str:
    """A clip made with ffmpeg, processed by the real worker for ``owner``; its name on the page."""
    item = make_item(lavfi_video(path, seconds=seconds, size=size), owner=owner)
    media_processing_start(item=item)
    final = wait_for(
        lambda: MediaItem.objects.filter(pk=item.pk, status__in=("Completed", "Failed")).first(),
        timeout=timeout,
        what="the video to finish",
    )
    assert final.status == "Completed", final.error_message
    return str(item.original_name)


def open_player(page: Any, name: str) -> Any:
    """The library card of ``name``, opened, its DASH player started (muted); the card."""
    from playwright.sync_api import expect

    card = page.locator(f'#library .card:has([data-name]:text-is("{name}"))')
    expect(card).to_have_count(1, timeout=30_000)
    card.locator("summary").click()
    video = card.locator("video")
    expect(video).to_have_attribute("data-source", "dash")
    # dash.js may attach its source just after the card says "dash", which interrupts a play()
    # begun before it (AbortError): play again once that load has begun, for up to 10 s.
    video.evaluate(PLAY)
    return card


PLAY = """async (v) => {
  v.muted = true;
  for (let tries = 0; ; tries++) {
    try { await v.play(); return; } catch (e) {
      if (e.name !== "AbortError" || tries >= 40) throw e;
      await new Promise((done) => setTimeout(done, 250));
    }
  }
}"""


def refusing(*codecs: str) -> str:
    """An init script: Media Source and Media Capabilities (which dash.js 5 asks first) refuse
    any type naming one of ``codecs``, as a browser without those decoders does."""
    pattern = "|".join(re.escape(c) for c in codecs)
    return f"""(() => {{
  const refused = /{pattern}/i;
  const original = MediaSource.isTypeSupported.bind(MediaSource);
  MediaSource.isTypeSupported = (type) => !refused.test(type) && original(type);
  const caps = navigator.mediaCapabilities;
  if (caps && caps.decodingInfo) {{
    const decodingInfo = caps.decodingInfo.bind(caps);
    caps.decodingInfo = (config) => {{
      const types = [config.video, config.audio].filter(Boolean).map((c) => c.contentType || "");
      const no = {{ supported: false, smooth: false, powerEfficient: false }};
      return types.some((t) => refused.test(t)) ? Promise.resolve(no) : decodingInfo(config);
    }};
  }}
}})();"""
