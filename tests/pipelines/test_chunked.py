"""Split-and-stitch (pipelines.chunked): the split is pure arithmetic, checked on its own; the
chunk encodes and the join are checked against the whole-file encode of the same clip, by
decoding both: the same frames at the same times, key frames in the same places, the same
sound."""

from __future__ import annotations

import hashlib
import itertools
from pathlib import Path

import av as pyav
import pytest

from pipelines import av, chunked
from pipelines.profiles import Profiles
from tests.pipelines.chunks import encode_chunks

# --- split (pure) ---------------------------------------------------------------------------------


def test_a_two_minute_clip_at_25_fps_splits_into_whole_segments() -> None:
    ranges = chunked.split(duration=120.0, frame_rate="25/1", segment_seconds=4.0, chunk_seconds=20)
    assert [(r.start, r.end) for r in ranges] == [
        (None, 500), (500, 1000), (1000, 1500), (1500, 2000), (2000, 2500), (2500, None),
    ]  # fmt: skip
    assert all(r.keys[:5] == (0, 100, 200, 300, 400) for r in ranges)
    assert len(ranges[-1].keys) >= 5  # the last chunk is open: keys past the header's end too


def test_chunks_start_where_the_whole_file_encode_puts_a_segment_key_frame() -> None:
    """29.97 fps: a 4 s segment is 119.88 frames, so key frames fall 120 or 119 frames apart,
    on the first frame at or after each 4 s; the chunks begin on those frames."""
    ranges = chunked.split(duration=50.0, frame_rate="30000/1001", segment_seconds=4.0, chunk_seconds=12)
    assert [r.start for r in ranges] == [None, 360, 720, 1079]
    assert [r.end for r in ranges] == [360, 720, 1079, None]
    assert ranges[3].keys[:3] == (0, 120, 240)
    assert chunked.key_frame_offset(9, segment_seconds=4.0, frame_rate="30000/1001") == 1079


def test_a_picture_starting_late_moves_the_grid() -> None:
    ranges = chunked.split(duration=40.0, frame_rate="25", segment_seconds=4.0, chunk_seconds=12, origin=13)
    assert [(r.start, r.end) for r in ranges] == [(None, 313), (313, 613), (613, None)]


@pytest.mark.parametrize(
    ("duration", "chunk_seconds", "count"),
    [(120.0, 0, 1), (20.0, 20, 1), (None, 20, 1), (29.0, 20, 1), (31.0, 20, 2), (49.0, 20, 2), (51.0, 20, 3)],
)
def test_chunk_count_off_short_and_tails(duration: float | None, chunk_seconds: float, count: int) -> None:
    """0 turns chunking off; a video no longer than a chunk is one; a tail under half a chunk joins
    the last chunk."""
    ranges = chunked.split(duration=duration, frame_rate="25", segment_seconds=4.0, chunk_seconds=chunk_seconds)
    assert len(ranges) == count
    assert ranges[0].start is None and ranges[-1].end is None
    assert all(a.end == b.start for a, b in itertools.pairwise(ranges))


def test_chunk_length_is_a_whole_number_of_segments() -> None:
    assert chunked.segments_per_chunk(segment_seconds=4.0, chunk_seconds=60) == 15
    assert chunked.segments_per_chunk(segment_seconds=4.0, chunk_seconds=10) == 2  # 10 s -> 8 s
    assert chunked.segments_per_chunk(segment_seconds=4.0, chunk_seconds=1) == 1


def test_trim_key_frames_concat_and_framecrc_text() -> None:
    assert chunked.trim_filter(chunked.ChunkRange(0, None, 500)) == "trim=end_pts=500"
    assert chunked.trim_filter(chunked.ChunkRange(1, 500, None)) == "trim=start_pts=500"
    assert chunked.key_frame_expr(chunked.ChunkRange(1, 500, 1000, (0, 100))) == "expr:eq(n,0)+eq(n,100)"
    assert chunked.seek_seconds(chunked.ChunkRange(1, 500, None), "25") == 18.0
    assert chunked.seek_seconds(chunked.ChunkRange(1, 25, None), "25") is None
    text = chunked.concat_list([("/w/a.mkv", 500), ("/w/it's.mkv", 120)], "30000/1001")
    assert text.splitlines() == [
        "ffconcat version 1.0", "file '/w/a.mkv'", "duration 16.683333333",
        "file '/w/it'\\''s.mkv'", "duration 4.004000000",
    ]  # fmt: skip
    crc = "#tb 0: 1/1000\n#media_type 0: video\n0, 520, 520, 40, 100, 0x1\n0, 560, 560, 40, 90, 0x2\n"
    assert chunked.parse_framecrc(crc) == (2, 0.52)


# --- chunks and join against the whole-file encode ------------------------------------------------


def _frames(path: Path) -> tuple[list[float], list[int], list[str], float]:
    """Video packet times, key frame numbers, an MD5 per decoded frame, and the audio's end."""
    times, keys, digests, audio_end = [], [], [], 0.0
    with pyav.open(str(path)) as ct:
        for n, frame in enumerate(ct.decode(ct.streams.video[0])):
            times.append(round(float(frame.time), 3))
            if frame.key_frame:
                keys.append(n)
            digests.append(hashlib.md5(frame.to_image().tobytes()).hexdigest())
    with pyav.open(str(path)) as ct:
        for packet in ct.demux(ct.streams.audio[0]):
            if packet.pts is not None:
                audio_end = max(audio_end, float((packet.pts + (packet.duration or 0)) * packet.time_base))
    return times, keys, digests, audio_end


@pytest.mark.parametrize(
    ("name", "rate", "late"),
    [("chunk-25.mp4", "25", 0.0), ("chunk-2997-late.mkv", "30000/1001", 0.5)],
)
def test_chunks_joined_are_the_whole_file_encode(
    name: str, rate: str, late: float, media, profiles: Profiles, tmp_path: Path
) -> None:
    """25 fps, and 29.97 fps with the picture starting half a second after the sound: same frame
    count, same times, same key frames (every segment boundary), and the same sound. At 25 fps
    every decoded frame is bit for bit the whole-file encode's."""
    extra = ("-itsoffset", str(late)) if late else ()
    src = media.video(name, seconds=26, size="320x180", rate=rate, keyint=25)
    if late:
        src = media.make(f"late-{name}", [*extra, "-i", str(src), "-i", str(src), "-map", "0:v", "-map", "1:a",
                                           "-c", "copy"])  # fmt: skip
    limits = profiles.limits
    dm = av.demux(src, tmp_path / "demux", limits=limits)
    plan = av.normalize(dm, tmp_path / "demux", tmp_path / "norm", profiles=profiles, limits=limits)
    filters = av.build_filters(plan, profiles=profiles)
    whole = av.encode(dm, tmp_path / "demux", filters, plan, tmp_path / "whole", profiles=profiles, limits=limits)

    assert plan.video is not None
    origin = chunked.first_frame_pts(dm, tmp_path / "demux", filters, plan, tmp_path / "w", limits=limits)
    assert origin == round(late * float(plan.video.fps))
    ranges = chunked.split(
        duration=plan.duration, frame_rate=plan.video.frame_rate, segment_seconds=2.0, chunk_seconds=8, origin=origin
    )
    assert len(ranges) == 3
    chunks = chunked.ChunkPlan(plan.video.frame_rate, 2.0, 4, ranges)
    # In any order, as hosts take them.
    parts, audio = encode_chunks(dm, plan, filters, chunks, tmp_path, profiles=profiles, limits=limits,
                                 ranges=reversed(ranges))  # fmt: skip
    assert audio.file
    joined = chunked.join(parts, tmp_path / "audio" / audio.file, plan, chunks, tmp_path / "joined", limits=limits)

    w_times, w_keys, w_frames, w_audio = _frames(tmp_path / "whole" / whole.file)
    j_times, j_keys, j_frames, j_audio = _frames(tmp_path / "joined" / joined.file)
    assert len(j_frames) == len(w_frames) == sum(p.frames for _, p in parts)
    assert j_times == w_times and all(b > a for a, b in itertools.pairwise(j_times))
    assert j_keys == w_keys and len(j_keys) == 13  # a key frame every 2 s segment
    assert abs(j_audio - w_audio) < 0.001  # the sound is the whole-file encode's, at the same place
    if not late:
        assert abs(j_audio - (j_times[-1] + 1 / plan.video.fps)) <= 1 / plan.video.fps
        assert j_frames == w_frames


def test_video_threads_bound_svt_av1_and_chunk_seconds_come_from_the_setting() -> None:
    """video.threads is SVT-AV1's lp= (it ignores -threads), so workers x threads = cores; both
    knobs are set through MEDIA_PROFILES."""
    prof = Profiles.from_overrides({"video": {"threads": 1, "chunk_seconds": 0}})
    assert prof.video.chunk_seconds == 0 and Profiles().video.chunk_seconds == 60
    video = av.VideoPlan(320, 180, "25", 25.0, 100, "yuv420p", "tv", 320, 180, 0)
    args = av.video_codec_args(video, prof, "expr:eq(n,0)")
    assert args[args.index("-svtav1-params") + 1] == "lp=1"
    assert "-svtav1-params" not in av.video_codec_args(video, Profiles(), "expr:eq(n,0)")
