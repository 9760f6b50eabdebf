"""Storyboards: a sprite sheet of frames every N seconds and a WebVTT index of it, for the
previews a player shows while the pointer hovers its seek bar (Mux's and Bunny's shape).

N grows with the duration so a sheet never holds more than ``max_tiles`` tiles (a 10-minute
video: one every 6 s), and never falls under ``min_interval``. One ffmpeg run takes them all:
``fps=1/N`` keeps the frame nearest each mark, each tile is scaled to ``tile_width`` and
``tile`` lays them on one WebP. The frames pass through the encode's colour chain and picture
steps (tone-mapped when HDR), so the tiles look like the video.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pipelines.errors import Cancelled, MediaError, TooLarge
from pipelines.profiles import Limits, StoryboardProfile
from pipelines.results import Output
from pipelines.runner import open_input, run_ffmpeg

SHEET, INDEX = "storyboard.webp", "storyboard.vtt"


@dataclass(frozen=True)
class Layout:
    interval: float  # seconds between tiles
    count: int
    columns: int
    rows: int
    tile_width: int
    tile_height: int


def layout(duration: float, width: int, height: int, sp: StoryboardProfile) -> Layout:
    """How many tiles, how far apart, and how they sit on the sheet."""
    interval = max(sp.min_interval, math.ceil(duration / sp.max_tiles * 10) / 10)
    count = max(1, math.ceil(duration / interval - 1e-6))
    columns = min(sp.columns, count)
    tile_width = _even(min(sp.tile_width, width))
    tile_height = _even(height * tile_width / width)
    return Layout(interval, count, columns, math.ceil(count / columns), tile_width, tile_height)


def vtt(lay: Layout, duration: float, sheet: str = SHEET) -> str:
    """WebVTT cues covering 0..duration, each pointing at its tile by ``#xywh=``."""
    lines = ["WEBVTT", ""]
    for i in range(lay.count):
        start, end = i * lay.interval, min((i + 1) * lay.interval, duration)
        if i == lay.count - 1:
            end = duration
        x, y = (i % lay.columns) * lay.tile_width, (i // lay.columns) * lay.tile_height
        lines += [f"{_ts(start)} --> {_ts(end)}", f"{sheet}#xywh={x},{y},{lay.tile_width},{lay.tile_height}", ""]
    return "\n".join(lines)


def storyboard(
    src: Path,
    ffmpeg_format: str | None,
    out_dir: Path,
    *,
    duration: float | None,
    width: int,
    height: int,
    prelude: str,
    picture: Callable[[int, int], str],
    decoding: tuple[str, ...],
    sp: StoryboardProfile,
    limits: Limits,
    cancel: Callable[[], bool] | None = None,
) -> tuple[Output, ...]:
    """The sheet and its index as outputs (roles ``storyboard`` and ``storyboard_vtt``), or none
    for a video too short or without frames. ``prelude``: the colour chain, each filter followed
    by a comma; ``picture(w, h)``: the filter chain that resizes to a tile (``width`` x ``height``:
    the display size). ``cancel``: polled while ffmpeg runs (it runs beside the encode, which
    may stop first)."""
    if not duration or duration <= 0 or width <= 0 or height <= 0:
        return ()
    lay = layout(duration, width, height, sp)
    out_dir.mkdir(parents=True, exist_ok=True)
    sheet = out_dir / SHEET
    graph = (
        f"[0:v:0]{prelude}fps=1/{lay.interval:g}:round=up,{picture(lay.tile_width, lay.tile_height)},setsar=1,"
        # WebP stores BT.601 limited-range YUV, as the thumbnail (av.previews).
        f"scale=out_color_matrix=bt601:out_range=tv,format=yuv420p,"
        f"tile={lay.columns}x{lay.rows}[sheet]"
    )
    try:
        with open_input(src, ffmpeg_format) as inp:
            run_ffmpeg(
                [*inp.args(*decoding), "-filter_complex", graph, "-map", "[sheet]", "-an", "-sn", "-frames:v", "1",
                 "-c:v", "libwebp", "-quality", str(sp.quality), "-compression_level", "4", "-f", "webp", str(sheet)],
                limits=limits, duration=duration, cancel=cancel, pass_fds=[inp.fd],
            )  # fmt: skip
    except MediaError as exc:
        if exc.retryable or isinstance(exc, (TooLarge, Cancelled)):
            raise
        return ()  # like the thumbnail, a storyboard never fails the item
    if not sheet.exists() or not sheet.stat().st_size:
        return ()
    index = out_dir / INDEX
    index.write_text(vtt(lay, duration))
    return (
        Output(
            role="storyboard",
            file=SHEET,
            content_type="image/webp",
            codec="webp",
            width=lay.columns * lay.tile_width,
            height=lay.rows * lay.tile_height,
            duration=round(lay.interval, 3),
            bytes=sheet.stat().st_size,
        ),
        Output(role="storyboard_vtt", file=INDEX, content_type="text/vtt", bytes=index.stat().st_size),
    )


def _ts(seconds: float) -> str:
    ms = round(seconds * 1000)
    return f"{ms // 3_600_000:02d}:{ms // 60_000 % 60:02d}:{ms // 1000 % 60:02d}.{ms % 1000:03d}"


def _even(x: float) -> int:
    return max(2, int(x + 0.5) // 2 * 2)
