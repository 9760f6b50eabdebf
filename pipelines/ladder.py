"""The adaptive ladder: which renditions a video gets, decided from its planned size alone.

One decode feeds every rung (``split`` in the encode's graph), and every rung is encoded on the
same frame grid with the same forced key frames, so all representations share their segment
boundaries and a player may switch at any of them. The top AV1 rung is the planned size (the
progressive WebM download); lower AV1 rungs come from the profile's ladder, never above the
top. VP9 is the fallback for browsers without AV1 decoding: its own rungs, at least
``vp9_min_rungs`` of them, so even a tiny source gets a choice. H.264 rungs come last, only when
the operator turns ``h264_fallback`` on.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from pipelines.profiles import VideoProfile

TOP = "encoded.mkv"  # the top AV1 rung: the whole-file encode's own output (video + audio)


@dataclass(frozen=True)
class Rung:
    codec: str  # "av1", "vp9" or "h264"
    width: int
    height: int
    max_bitrate: int  # bits per second (0: uncapped CRF)
    file: str  # the encode stage's file holding this rung's video

    @property
    def lines(self) -> int:
        """The short edge: a portrait 1080x1920 is a 1080 rung, as players label it."""
        return min(self.width, self.height)


def plan_ladder(width: int, height: int, source_cap: int, vp: VideoProfile) -> tuple[Rung, ...]:
    """The rungs for a video planned at ``width`` x ``height`` (the top rung), largest first
    per codec, AV1, then VP9, then H.264 (if on). ``source_cap``: the source-derived bitrate cap (0: none), which
    no rung exceeds."""
    short = min(width, height)
    av1 = _pairs(vp.ladder)
    rungs = [Rung("av1", width, height, _cap(_cap_for(short, av1), source_cap), TOP)]
    for lines, kbps in av1:
        size = _scaled(width, height, lines) if lines < short else None
        if size is not None and min(size) < short:
            rungs.append(Rung("av1", *size, _cap(kbps * 1000, source_cap), f"av1-{lines}.mkv"))
    vp9: list[Rung] = []
    for lines, kbps in _pairs(vp.vp9_ladder):
        size = _scaled(width, height, lines) if lines <= short else None
        if size is not None:
            vp9.append(Rung("vp9", *size, _cap(kbps * 1000, source_cap), f"vp9-{lines}.mkv"))
    # A source smaller than the VP9 ladder: its own size, then halves, to the minimum count.
    lines, kbps = short, _cap_for(short, _pairs(vp.vp9_ladder))
    while len(vp9) < vp.vp9_min_rungs and lines >= 16:
        size = _scaled(width, height, lines)
        if size is not None and all(r.lines != min(size) for r in vp9):
            vp9.append(Rung("vp9", *size, _cap(kbps, source_cap), f"vp9-{min(size)}.mkv"))
        lines, kbps = _even(lines / 2), kbps // 2
    vp9.sort(key=lambda r: -r.lines)
    return (*rungs, *vp9, *_h264(width, height, source_cap, vp))


def _h264(width: int, height: int, source_cap: int, vp: VideoProfile) -> list[Rung]:
    """The operator's H.264 fallback (``h264_fallback``; none by default): the ladder's rungs not
    above the planned size, or the planned size alone when the source is smaller than them all."""
    if not vp.h264_fallback:
        return []
    short, ladder = min(width, height), _pairs(vp.h264_ladder)
    rungs: list[Rung] = []
    for lines, kbps in ladder:
        size = _scaled(width, height, lines) if lines <= short else None
        if size is not None and all(r.lines != min(size) for r in rungs):
            rungs.append(Rung("h264", *size, _cap(kbps * 1000, source_cap), f"h264-{min(size)}.mkv"))
    if not rungs:
        rungs.append(Rung("h264", width, height, _cap(_cap_for(short, ladder), source_cap), f"h264-{short}.mkv"))
    return rungs


def _pairs(ladder: Iterable[Sequence[int]]) -> list[tuple[int, int]]:
    """(lines, kb/s) pairs, largest first (a setting may give lists, from JSON)."""
    return sorted(((int(p[0]), int(p[1])) for p in ladder), reverse=True)


def _cap_for(short: int, ladder: list[tuple[int, int]]) -> int:
    """bits/s for a rung of ``short`` lines: the cap of the smallest ladder rung at least that
    tall, or the top rung's for a larger picture (0 with no ladder)."""
    fitting = [kbps for lines, kbps in ladder if lines >= short]
    if fitting:
        return fitting[-1] * 1000
    return ladder[0][1] * 1000 if ladder else 0


def _cap(rung: int, source: int) -> int:
    caps = [c for c in (rung, source) if c > 0]
    return min(caps) if caps else 0


def _scaled(width: int, height: int, lines: int) -> tuple[int, int] | None:
    """The size nearest ``lines`` on its short edge with exactly the top rung's aspect, even on
    both edges (4:2:0), or None when no such size is within 10 % of ``lines``.

    Exact, because the DASH muxer (and players) allow one picture shape per adaptation set:
    1280x720 gives 864x486 for the 480 rung, not 852x480 (a sample aspect cannot make up the
    difference: the muxer compares the coded sizes).
    """
    short = min(width, height)
    if lines >= short:
        return width, height
    g = math.gcd(width, height)
    a, b = width // g, height // g
    unit = 2 if a % 2 or b % 2 else 1  # both edges even
    step = min(a, b) * unit
    k = round(lines / step)
    if k < 1 or abs(k * step - lines) > 0.1 * lines:
        return None
    return a * unit * k, b * unit * k


def _even(x: float) -> int:
    return max(2, int(x + 0.5) // 2 * 2)
