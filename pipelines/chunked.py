"""Split-and-stitch: a long video's AV1 encode as chunks that any host may encode, joined
without re-encoding.

Chunks are cut by *frame index* on the filtered stream, never by where an input seek lands: the
encode's graph ends in ``fps=R`` (constant rate), so output frame ``n`` has the timestamp
``n / R`` and its pts, in the graph's 1/R time base, is ``n``. A chunk decodes from a little
before its first frame (an input seek lands on an earlier key frame; ``-copyts
-start_at_zero`` keeps the whole file's clock, so the fps filter lays the same grid), and
``trim=start_pts:end_pts`` keeps exactly its frames. A chunk is a whole number of GOPs (and so
of DASH segments), every chunk starts with a key frame and has one every GOP, so the joined
file has a key frame at every segment boundary, as the whole-file encode does.

The audio is encoded once, on its own, as the whole-file encode would (same graph, same clock).
The join concatenates the chunks with the concat demuxer (stream copy) and adds the audio:
no frame is decoded again. Each chunk's length in the concat list is its frame count / R, so the
chunks follow one another on the frame grid, whatever the container's rounding.
"""

from __future__ import annotations

import math
import shutil
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

from pipelines import h264
from pipelines.av import (
    MATROSKA,
    DemuxResult,
    EncodeResult,
    FilterSpec,
    NormalizePlan,
    VideoPlan,
    apply_loudness,
    audio_codec_args,
    decoder_args,
    ladder_graph,
    rung_codec_args,
    video_rungs,
)
from pipelines.errors import MediaError
from pipelines.ladder import Rung
from pipelines.profiles import Limits, Profiles
from pipelines.runner import open_input, run_ffmpeg

# Decode from this long before a chunk's first frame: an input seek lands on a key frame at or
# before its target, and the fps filter needs the source frames around the first slot.
SEEK_MARGIN = 2.0


@dataclass(frozen=True)
class ChunkRange:
    """Output frames [start, end) by pts on the 1/R grid (None: from the first / to the last);
    ``keys``: the frames, counted from the chunk's first, where it forces a key frame."""

    index: int
    start: int | None
    end: int | None
    keys: tuple[int, ...] = (0,)


@dataclass(frozen=True)
class ChunkPlan:
    frame_rate: str  # R, as the fps filter has it
    segment_seconds: float
    segments_per_chunk: int
    ranges: tuple[ChunkRange, ...]
    started: float = 0.0  # wall clock of the fan-out (epoch seconds), for the time left


@dataclass(frozen=True)
class PartResult:
    index: int
    file: str
    frames: int
    first_pts: int  # on the 1/R grid
    seconds: float
    bytes: int
    # The ladder's other rungs of this chunk (``av.video_rungs`` order, after the top), same frames.
    rung_files: tuple[str, ...] = ()


@dataclass(frozen=True)
class AudioPart:
    file: str | None  # None: the video has no audio
    seconds: float
    aac: str = ""  # the H.264 fallback's AAC track (``h264.AAC_FILE``), when the profile has it


# --- split (pure) ---------------------------------------------------------------------------------


def segments_per_chunk(*, segment_seconds: float, chunk_seconds: float) -> int:
    """Whole DASH segments (= GOPs) per chunk, the number nearest ``chunk_seconds`` (at least 1)."""
    return max(1, round(chunk_seconds / segment_seconds))


def key_frame_offset(segment: int, *, segment_seconds: float, frame_rate: str) -> int:
    """Frames from the video's first frame to segment ``segment``'s key frame, as the whole-file
    encode places it: ffmpeg forces a key frame on the first frame whose time since the first
    frame, ``j * av_q2d(1/R)`` in doubles, is at least ``n * segment`` (``gte(t, n_forced *
    segment)``). Computed with the same double arithmetic, so the chunks agree to the frame."""
    rate = Fraction(frame_rate)
    step = rate.denominator / rate.numerator  # av_q2d of the encoder's time base 1/R
    target = segment * float(segment_seconds)
    j = max(0, math.floor(target / step) - 2)
    while j * step < target:
        j += 1
    return j


def split(
    *,
    duration: float | None,
    frame_rate: str,
    segment_seconds: float,
    chunk_seconds: float,
    origin: int = 0,
) -> tuple[ChunkRange, ...]:
    """The chunks of a video of ``duration`` seconds at ``frame_rate`` whose first output frame
    has pts ``origin`` on the 1/R grid: one range when chunking is off (``chunk_seconds`` 0) or
    the video is not longer than a chunk.

    Each chunk is a whole number of DASH segments and begins on the frame where the whole-file
    encode forces that segment's key frame; inside, it forces the same frames the whole-file
    encode would. The first range is open at its start and the last at its end, so no frame is
    left out whatever the header's duration says; a tail shorter than half a chunk joins the
    last chunk rather than make a tiny one.
    """
    rate = Fraction(frame_rate)
    if chunk_seconds <= 0 or not duration or duration <= chunk_seconds or rate <= 0:
        return (ChunkRange(0, None, None, _keys(0, _segments(duration, segment_seconds), segment_seconds, frame_rate)),)
    per = segments_per_chunk(segment_seconds=segment_seconds, chunk_seconds=chunk_seconds)
    count = max(1, math.floor(duration / (per * segment_seconds) + 0.5))
    total = max(_segments(duration, segment_seconds), count * per)
    ranges = []
    for i in range(count):
        first = i * per
        last = total if i == count - 1 else first + per
        start = None if i == 0 else origin + _offset(first, segment_seconds, frame_rate)
        end = None if i == count - 1 else origin + _offset(last, segment_seconds, frame_rate)
        ranges.append(ChunkRange(i, start, end, _keys(first, last, segment_seconds, frame_rate)))
    return tuple(ranges)


def _offset(segment: int, segment_seconds: float, frame_rate: str) -> int:
    return key_frame_offset(segment, segment_seconds=segment_seconds, frame_rate=frame_rate)


def _segments(duration: float | None, segment_seconds: float) -> int:
    """Segments in ``duration``, plus two: the duration is a header's word."""
    return math.ceil((duration or 0) / segment_seconds) + 2


def _keys(first: int, last: int, segment_seconds: float, frame_rate: str) -> tuple[int, ...]:
    base = key_frame_offset(first, segment_seconds=segment_seconds, frame_rate=frame_rate)
    return tuple(
        key_frame_offset(m, segment_seconds=segment_seconds, frame_rate=frame_rate) - base for m in range(first, last)
    )


def trim_filter(rng: ChunkRange) -> str:
    """The trim that keeps a chunk's frames (pts on the 1/R grid of the fps filter's output)."""
    parts = []
    if rng.start is not None:
        parts.append(f"start_pts={rng.start}")
    if rng.end is not None:
        parts.append(f"end_pts={rng.end}")
    return "trim=" + ":".join(parts) if parts else "null"


def key_frame_expr(rng: ChunkRange) -> str:
    """Key frames on the chunk's own frame numbers (``n`` counts from its first frame)."""
    return "expr:" + "+".join(f"eq(n,{k})" for k in rng.keys)


def seek_seconds(rng: ChunkRange, frame_rate: str) -> float | None:
    """Where the chunk's decode starts (None: at the start)."""
    if rng.start is None:
        return None
    at = float(rng.start / Fraction(frame_rate)) - SEEK_MARGIN
    return at if at > 0 else None


def concat_list(parts: Sequence[tuple[str, int]], frame_rate: str) -> str:
    """The concat demuxer's script: each chunk file with its exact length (frames / R)."""
    rate = Fraction(frame_rate)
    lines = ["ffconcat version 1.0"]
    for path, frames in parts:
        quoted = path.replace("'", "'\\''")
        lines += [f"file '{quoted}'", f"duration {float(frames / rate):.9f}"]
    return "\n".join(lines) + "\n"


# --- chunk encode ---------------------------------------------------------------------------------


def encode_part(
    demuxed: DemuxResult,
    demux_dir: Path,
    filters: FilterSpec,
    plan: NormalizePlan,
    chunks: ChunkPlan,
    index: int,
    out_dir: Path,
    *,
    profiles: Profiles,
    limits: Limits,
    progress: Callable[[float], None] | None = None,
    cancel: Callable[[], bool] | None = None,
) -> PartResult:
    """Encode one chunk's frames, video only, with the whole-file encode's options: every rung
    of the ladder from the one decode, as the whole-file encode does."""
    video = _video(plan, filters)
    rng = chunks.ranges[index]
    out_dir.mkdir(parents=True, exist_ok=True)
    name = f"part-{index:05d}.mkv"
    extra = [*decoder_args(video.x264_build)]
    at = seek_seconds(rng, chunks.frame_rate)
    if at is not None:
        extra += ["-ss", f"{at:.6f}"]
    rungs = video_rungs(video, profiles)
    graph, labels = ladder_graph(f"{filters.video},{trim_filter(rng)}", rungs)
    keys = key_frame_expr(rng)
    rung_files = tuple(f"part-{index:05d}-{r.file}" for r in rungs[1:])
    outputs: list[str] = []
    for rung, label, file in zip(rungs, labels, (name, *rung_files), strict=True):
        outputs += ["-map", label, *rung_codec_args(rung, video, profiles, keys),
                    "-an", "-sn", "-dn", "-map_metadata", "-1", "-map_chapters", "-1",
                    "-f", "matroska", str(out_dir / file)]  # fmt: skip
    rate = Fraction(chunks.frame_rate)
    length = None
    if rng.end is not None:
        length = float((rng.end - (rng.start or 0)) / rate)
    with open_input(demux_dir / demuxed.file, demuxed.ffmpeg_format) as inp:
        result = run_ffmpeg(
            [*inp.args(*extra), "-copyts", "-start_at_zero", "-filter_complex", graph, *outputs],
            limits=limits, duration=length, progress=progress, cancel=cancel, pass_fds=[inp.fd],
        )  # fmt: skip
    frames, first = count_frames(out_dir / name, limits=limits)
    first_pts = round(first * rate) if first is not None else rng.start or 0
    return PartResult(
        index=index,
        file=name,
        frames=frames,
        first_pts=first_pts,
        seconds=round(result.seconds, 3),
        bytes=sum((out_dir / f).stat().st_size for f in (name, *rung_files)),
        rung_files=rung_files,
    )


def first_frame_pts(
    demuxed: DemuxResult, demux_dir: Path, filters: FilterSpec, plan: NormalizePlan, work_dir: Path, *, limits: Limits
) -> int:
    """The pts, on the 1/R grid, of the first frame the encode's graph puts out (0 unless the
    picture starts after the sound): where the chunks' grid starts. One frame is decoded."""
    video = _video(plan, filters)
    work_dir.mkdir(parents=True, exist_ok=True)
    crc = work_dir / f".first-frame-{uuid.uuid4().hex[:8]}.framecrc"
    try:
        with open_input(demux_dir / demuxed.file, demuxed.ffmpeg_format) as inp:
            run_ffmpeg(
                [*inp.args(*decoder_args(video.x264_build)), "-copyts", "-start_at_zero", "-map", "0:v:0",
                 "-vf", filters.video or "null", "-frames:v", "1", "-an", "-f", "framecrc", str(crc)],
                limits=limits, pass_fds=[inp.fd],
            )  # fmt: skip
        _, first = parse_framecrc(crc.read_text())
    finally:
        crc.unlink(missing_ok=True)
    return round((first or 0.0) * Fraction(video.frame_rate))


def count_frames(path: Path, *, limits: Limits) -> tuple[int, float | None]:
    """Frames (AV1 in Matroska: one temporal unit per block) and the first one's time, read from
    the packets without decoding."""
    crc = path.with_name(f".{path.name}.framecrc")
    with open_input(path, MATROSKA) as inp:
        run_ffmpeg(
            [*inp.args(), "-copyts", "-map", "0:v:0", "-c", "copy", "-f", "framecrc", str(crc)],
            limits=limits, pass_fds=[inp.fd],
        )  # fmt: skip
    try:
        return parse_framecrc(crc.read_text())
    finally:
        crc.unlink(missing_ok=True)


def parse_framecrc(text: str) -> tuple[int, float | None]:
    """(packets, first pts in seconds) from ffmpeg's framecrc listing of one stream."""
    base = Fraction(1, 1000)
    frames, first = 0, None
    for line in text.splitlines():
        if line.startswith("#tb"):
            base = Fraction(line.split(":", 1)[1].strip())
        elif line and not line.startswith("#"):
            fields = [f.strip() for f in line.split(",")]
            if first is None:
                first = float(int(fields[2]) * base)  # stream, dts, pts, duration, size, crc
            frames += 1
    return frames, first


def encode_audio(
    demuxed: DemuxResult,
    demux_dir: Path,
    filters: FilterSpec,
    plan: NormalizePlan,
    out_dir: Path,
    *,
    profiles: Profiles,
    limits: Limits,
    cancel: Callable[[], bool] | None = None,
) -> AudioPart:
    """The audio, once, as the whole-file encode would write it (same graph, same clock), and
    the H.264 fallback's AAC track beside it when the profile has one (same run)."""
    if plan.audio is None or filters.audio is None:
        return AudioPart(file=None, seconds=0.0)
    out_dir.mkdir(parents=True, exist_ok=True)
    name = "audio.mka"
    aac = h264.AAC_FILE if plan.video and any(r.codec == "h264" for r in video_rungs(plan.video, profiles)) else ""
    fallback: list[str] = []
    if aac:
        fallback = ["-map", "0:a:0", "-af", filters.audio, *h264.aac_args(plan.audio, profiles), "-vn", "-sn", "-dn",
                    "-map_metadata", "-1", "-map_chapters", "-1", "-f", "matroska", str(out_dir / aac)]  # fmt: skip
    with open_input(demux_dir / demuxed.file, demuxed.ffmpeg_format) as inp:
        result = run_ffmpeg(
            [*inp.args(), "-map", "0:a:0", "-af", filters.audio, *audio_codec_args(plan.audio, profiles),
             "-vn", "-sn", "-dn", "-map_metadata", "-1", "-map_chapters", "-1", "-f", "matroska",
             str(out_dir / name), *fallback],
            limits=limits, duration=plan.duration, cancel=cancel, pass_fds=[inp.fd],
        )  # fmt: skip
    apply_loudness(out_dir / name, filters, result.stderr, profiles)  # the join copies the header along
    return AudioPart(file=name, seconds=round(result.seconds, 3), aac=aac)


# --- join -----------------------------------------------------------------------------------------


def join(
    parts: Sequence[tuple[Path, PartResult]],
    audio: Path | None,
    plan: NormalizePlan,
    chunks: ChunkPlan,
    out_dir: Path,
    *,
    limits: Limits,
    rungs: tuple[Rung, ...] = (),
    aac: Path | None = None,
) -> EncodeResult:
    """The chunks one after another, and the audio, into one Matroska file: stream copy only;
    each other rung of the ``rungs`` ladder likewise into its own file (video only); the H.264
    fallback's ``aac`` track (``encode_audio``'s) copied beside them.

    The concat demuxer opens the chunk files by name (``-protocol_whitelist file``): they are
    our own encoder's output in this stage's folders, not the upload.
    """
    video = plan.video
    if video is None or not parts:
        raise MediaError("Nothing to join.", detail="no video chunks")
    out_dir.mkdir(parents=True, exist_ok=True)
    ordered = sorted(parts, key=lambda p: p[1].index)
    if [p.index for _, p in ordered] != list(range(len(chunks.ranges))):
        raise MediaError("A chunk of the video is missing.", detail=str([p.index for _, p in ordered]))
    listing = out_dir / "parts.ffconcat"
    listing.write_text(
        concat_list([(str(path.resolve()), p.frames) for path, p in ordered if p.frames], chunks.frame_rate)
    )
    rate = Fraction(chunks.frame_rate)
    # The concat demuxer starts the first chunk at zero: put it back where the grid has it.
    offset = float(ordered[0][1].first_pts / rate)
    name = "encoded.mkv"
    args = ["-f", "concat", "-safe", "0", "-protocol_whitelist", "file",
            "-itsoffset", f"{offset:.9f}", "-i", str(listing)]  # fmt: skip
    maps = ["-map", "0:v:0"]
    if audio is not None:
        args += ["-f", "matroska", "-protocol_whitelist", "file", "-i", str(audio)]
        maps += ["-map", "1:a:0"]
    outputs = [*maps, "-c", "copy", "-map_metadata", "-1", "-map_chapters", "-1", "-f", "matroska", str(out_dir / name)]
    for i, rung in enumerate(rungs[1:]):
        if any(len(p.rung_files) != len(rungs) - 1 for _, p in ordered):
            raise MediaError("A chunk of the video lacks a rung of the ladder.", detail=rung.file)
        rung_list = out_dir / f"parts-{i}.ffconcat"
        rung_list.write_text(
            concat_list(
                [(str((path.parent / p.rung_files[i]).resolve()), p.frames) for path, p in ordered if p.frames],
                chunks.frame_rate,
            )
        )
        n = (2 if audio is not None else 1) + i  # the input index of this rung's listing
        args += ["-f", "concat", "-safe", "0", "-protocol_whitelist", "file",
                 "-itsoffset", f"{offset:.9f}", "-i", str(rung_list)]  # fmt: skip
        outputs += ["-map", f"{n}:v:0", "-c", "copy", "-map_metadata", "-1", "-map_chapters", "-1",
                    "-f", "matroska", str(out_dir / rung.file)]  # fmt: skip
    result = run_ffmpeg([*args, *outputs], limits=limits)
    for listed in out_dir.glob("parts*.ffconcat"):
        listed.unlink(missing_ok=True)
    frames = sum(p.frames for _, p in ordered)
    if aac is not None:
        shutil.copyfile(aac, out_dir / h264.AAC_FILE)
    return EncodeResult(
        kind="video",
        file=name,
        codec="av1+opus" if audio is not None else "av1",
        width=video.width,
        height=video.height,
        duration=round(float(frames / rate), 3) if result.returncode == 0 else plan.duration,
        seconds=round(sum(p.seconds for _, p in ordered) + result.seconds, 3),
        rungs=rungs,
        aac=h264.AAC_FILE if aac is not None else "",
    )


def _video(plan: NormalizePlan, filters: FilterSpec) -> VideoPlan:
    if plan.video is None or filters.video is None:
        raise MediaError("Only a video is encoded in chunks.", detail="no video plan")
    return plan.video
