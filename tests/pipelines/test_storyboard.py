"""Storyboards as a player uses them: the WebVTT cues cover the whole video, each points at a
tile of the sheet, and that tile is the video's frame at the cue's start (SSIM against the
source's own frame, and better than against the next tile's time)."""

from __future__ import annotations

import itertools
import re
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from pipelines import av as stages
from pipelines.profiles import Profiles, StoryboardProfile
from pipelines.storyboard import layout
from tests.media import source_frame, ssim

_CUE = re.compile(r"^(\d\d):(\d\d):(\d\d)\.(\d{3}) --> (\d\d):(\d\d):(\d\d)\.(\d{3})$")
_XYWH = re.compile(r"^storyboard\.webp#xywh=(\d+),(\d+),(\d+),(\d+)$")


def _seconds(h: str, m: str, s: str, ms: str) -> float:
    return int(h) * 3600 + int(m) * 60 + int(s) + int(ms) / 1000


def _cues(text: str) -> list[tuple[float, float, tuple[int, int, int, int]]]:
    lines = text.splitlines()
    assert lines[0] == "WEBVTT"
    cues = []
    for i, line in enumerate(lines):
        m = _CUE.match(line)
        if m:
            target = _XYWH.match(lines[i + 1])
            assert target, lines[i + 1]
            x, y, w, h = (int(v) for v in target.groups())
            cues.append((_seconds(*m.groups()[:4]), _seconds(*m.groups()[4:]), (x, y, w, h)))
    return cues


def _ssim(sheet: Path, box: tuple[int, int, int, int], src: Path, at: float) -> float:
    """SSIM of the sheet's tile at ``box`` against the source frame at ``at`` (decoded from the
    start by PyAV: no seek that could land elsewhere, no parsing of ffmpeg's log)."""
    x, y, w, h = box
    with Image.open(sheet) as img:
        tile = img.convert("RGB").crop((x, y, x + w, y + h))
    return ssim(tile, source_frame(src, at))


def test_sheet_tiles_are_the_frames_their_cues_name(media: Any, tmp_path: Path) -> None:
    # Scrolling 1 % of the width a frame: a tile taken at the wrong time shows it.
    src = media.make("storyboard.mp4", ["-f", "lavfi", "-i", "testsrc2=size=320x240:rate=25:duration=6,scroll=h=0.01",
                                        "-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p"])  # fmt: skip
    profiles = Profiles()
    dm = stages.demux(src, tmp_path / "demux", limits=profiles.limits)
    outputs = {o.role: o for o in stages.storyboards(dm, tmp_path / "demux", tmp_path / "sb", profiles=profiles,
                                                    limits=profiles.limits)}  # fmt: skip
    assert set(outputs) == {"storyboard", "storyboard_vtt"}
    sheet = tmp_path / "sb" / outputs["storyboard"].file
    assert outputs["storyboard"].content_type == "image/webp" and outputs["storyboard_vtt"].content_type == "text/vtt"
    with Image.open(sheet) as img:
        assert img.format == "WEBP"
        assert img.size == (outputs["storyboard"].width, outputs["storyboard"].height) == (6 * 160, 120)
    cues = _cues((tmp_path / "sb" / outputs["storyboard_vtt"].file).read_text())
    # The cues cover 0..duration, one after another without gap or overlap.
    assert len(cues) == 6 and cues[0][0] == 0.0
    assert all(a[1] == b[0] for a, b in itertools.pairwise(cues))
    assert cues[-1][1] == pytest.approx(6.0, abs=0.05)
    for i, (start, _, box) in enumerate(cues):
        assert box == (160 * i, 0, 160, 120)
        same = _ssim(sheet, box, src, start)
        assert same > 0.75, (i, same)
        if i + 1 < len(cues):
            assert same > _ssim(sheet, box, src, start + 0.5) + 0.2, i  # half a tile's time later


@pytest.mark.parametrize(
    ("duration", "interval", "count"),
    [(3.0, 1.0, 3), (59.5, 1.0, 60), (600.0, 6.0, 100), (3600.0, 36.0, 100), (7201.0, 72.1, 100)],
)
def test_the_interval_grows_so_a_sheet_holds_at_most_100_tiles(duration: float, interval: float, count: int) -> None:
    lay = layout(duration, 1920, 1080, StoryboardProfile())
    assert (lay.interval, lay.count) == (pytest.approx(interval), count)
    assert (lay.tile_width, lay.tile_height) == (160, 90) and lay.columns * lay.rows >= lay.count
