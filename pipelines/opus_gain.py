"""The output gain of an Opus track in Matroska or WebM: read it, and write it as a byte patch.

RFC 7845 gives every Opus stream a header (``OpusHead``) whose bytes 16-17 are an output gain in
dB (signed Q7.8, little endian) that a decoder applies to everything it decodes. Matroska keeps
that header as the track's ``CodecPrivate``, and every later copy (the WebM, the DASH audio init
segment) takes it along. Loudness normalisation is then a header value, written after the encode
has measured the audio in its own pass, not a gain baked into the samples by a pass before it.

The walk follows the EBML structure (Segment, Tracks, TrackEntry, CodecPrivate) rather than
searching for the magic bytes, so that a patch can never land in the audio data. The same walk
reads the Segment's duration (``read_duration``), which is all the mux stage needs to know of a
WebM the encode has just written, without a probe in a child process of its own.
"""

from __future__ import annotations

import math
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from pipelines.errors import MediaError

_EBML, _SEGMENT, _TRACKS, _TRACK_ENTRY = 0x1A45DFA3, 0x18538067, 0x1654AE6B, 0xAE
_CODEC_ID, _CODEC_PRIVATE, _CLUSTER = 0x86, 0x63A2, 0x1F43B675
_INFO, _TIMECODE_SCALE, _DURATION = 0x1549A966, 0x2AD7B1, 0x4489
_DEFAULT_TIMECODE_SCALE = 1_000_000  # nanoseconds per tick: milliseconds, Matroska's default
_MAGIC = b"OpusHead"
_GAIN_OFFSET = 16
_MAX_Q78 = 0x7FFF
_HEAD_LIMIT = 1 << 20  # the tracks sit before the first cluster, in a few hundred bytes


@dataclass(frozen=True)
class _Element:
    ident: int
    start: int  # of its data
    size: int | None  # None: unknown (a live stream's segment), to the end of its parent


def gain_q78(db: float) -> int:
    """``db`` as the header stores it: 1/256 dB steps, within what 16 signed bits hold."""
    if not math.isfinite(db):
        raise ValueError(f"not a gain: {db}")
    return max(-_MAX_Q78 - 1, min(_MAX_Q78, round(db * 256)))


def read_gain(path: Path) -> float:
    """The output gain, in dB, of the file's Opus track."""
    with open(path, "rb") as fh:
        offset = _gain_offset(fh.read(_HEAD_LIMIT), path)
        fh.seek(offset)
        return int.from_bytes(fh.read(2), "little", signed=True) / 256


def write_gain(path: Path, db: float) -> None:
    """Set the output gain of the file's Opus track to ``db`` (rounded to 1/256 dB), in place.
    The file keeps its size and every other byte."""
    with open(path, "r+b") as fh:
        offset = _gain_offset(fh.read(_HEAD_LIMIT), path)
        fh.seek(offset)
        fh.write(gain_q78(db).to_bytes(2, "little", signed=True))
        fh.flush()
        os.fsync(fh.fileno())


def read_duration(path: Path) -> float | None:
    """The Segment's duration in seconds, as its Info says (what a probe reports as the
    container's), or None when the Info has none (a file written live)."""
    with open(path, "rb") as fh:
        data = fh.read(_HEAD_LIMIT)
    for top in _segment_heads(data):
        if top.ident != _INFO or top.size is None or top.start + top.size > len(data):
            continue
        scale, ticks = _DEFAULT_TIMECODE_SCALE, None
        for el in _children(data, top.start, top.start + top.size):
            raw = data[el.start : el.start + (el.size or 0)]
            if el.ident == _TIMECODE_SCALE and 0 < len(raw) <= 8:
                scale = int.from_bytes(raw, "big")
            elif el.ident == _DURATION and len(raw) in (4, 8):
                ticks = struct.unpack(">f" if len(raw) == 4 else ">d", raw)[0]
        if ticks is None or not math.isfinite(ticks) or ticks < 0 or scale <= 0:
            return None
        return float(ticks * scale / 1e9)
    return None


def _segment_heads(data: bytes) -> Iterator[_Element]:
    """The first Segment's top-level elements before its first Cluster (Info, Tracks, Cues...)."""
    for segment in _children(data, 0, len(data)):
        if segment.ident != _SEGMENT:
            continue
        end = len(data) if segment.size is None else min(len(data), segment.start + segment.size)
        for top in _children(data, segment.start, end):
            if top.ident == _CLUSTER:
                return
            yield top
        return


def _gain_offset(data: bytes, path: Path) -> int:
    """Where in the file the Opus track's gain bytes are."""
    found: list[int] = []
    for top in _segment_heads(data):
        if top.ident != _TRACKS or top.size is None:
            continue
        for entry in _children(data, top.start, top.start + top.size):
            if entry.ident == _TRACK_ENTRY and entry.size is not None:
                found += _opus_head(data, entry)
    if len(found) != 1:
        raise MediaError("The converted audio has no Opus header.", detail=f"{path.name}: {len(found)} Opus tracks")
    return found[0] + _GAIN_OFFSET


def _opus_head(data: bytes, entry: _Element) -> list[int]:
    assert entry.size is not None
    codec, private = b"", None
    for el in _children(data, entry.start, entry.start + entry.size):
        if el.size is None:
            break
        if el.ident == _CODEC_ID:
            codec = data[el.start : el.start + el.size]
        elif el.ident == _CODEC_PRIVATE:
            private = el
    if codec.rstrip(b"\0") != b"A_OPUS" or private is None or private.size is None:
        return []
    head = data[private.start : private.start + private.size]
    if private.size < 19 or not head.startswith(_MAGIC):
        return []
    return [private.start]


def _children(data: bytes, start: int, end: int) -> list[_Element]:
    """The elements from ``start`` to ``end`` at one level (an element cut off by ``end`` last)."""
    out = []
    pos = start
    while pos < end:
        ident, pos = _vint(data, pos, keep_marker=True)
        size, pos = _vint(data, pos, keep_marker=False)
        if ident is None or pos > end:
            break
        out.append(_Element(ident, pos, size))
        if size is None:
            break
        pos += size
    return out


def _vint(data: bytes, pos: int, *, keep_marker: bool) -> tuple[int | None, int]:
    """An EBML variable-length integer: an element ID (with its length marker) or a size (None
    when all its value bits are set: unknown)."""
    if pos >= len(data) or data[pos] == 0:
        return None, len(data) + 1
    first = data[pos]
    length = 8 - first.bit_length() + 1
    if pos + length > len(data):
        return None, len(data) + 1
    value = int.from_bytes(data[pos : pos + length], "big")
    if keep_marker:
        return value, pos + length
    value &= (1 << (7 * length)) - 1
    if value == (1 << (7 * length)) - 1:
        return None, pos + length
    return value, pos + length
