"""The adaptive ladder, checked as a DASH player would: the manifest's sets and rungs, every
representation's init segment plus each of its media segments decoding, and segment boundaries
shared by every video representation, so a switch at any boundary plays on."""

from __future__ import annotations

import io
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import av
import pytest

from pipelines import av as stages
from pipelines.ladder import plan_ladder
from pipelines.profiles import Profiles, VideoProfile
from tests.pipelines.chunks import encode_chunks

MPD = "{urn:mpeg:dash:schema:mpd:2011}"

# Fast encoder settings (the ladder's shape is the profile's default): 1 s segments, 2 s clips.
FAST = Profiles(video=VideoProfile(preset=12, crf=45, segment_seconds=1.0, vp9_cpu_used=8, vp9_crf=45))


def _ladder_run(src: Path, root: Path, profiles: Profiles = FAST) -> tuple[Path, Any]:
    limits = profiles.limits
    dm = stages.demux(src, root / "demux", limits=limits)
    plan = stages.normalize(dm, root / "demux", root / "normalize", profiles=profiles, limits=limits)
    filters = stages.build_filters(plan, profiles=profiles)
    enc = stages.encode(dm, root / "demux", filters, plan, root / "encode", profiles=profiles, limits=limits)
    muxed = stages.mux(enc, root / "encode", root / "mux", limits=limits)
    result = stages.chunk(
        muxed, root / "mux", root / "chunk", profiles=profiles, limits=limits, encoded=enc, encode_dir=root / "encode"
    )
    return root / "chunk", result


def _sets(manifest: Path) -> dict[str, list[ET.Element]]:
    """Representations by codec family (av01, vp09, opus), in manifest order."""
    found: dict[str, list[ET.Element]] = {}
    for aset in ET.parse(manifest).getroot().iter(f"{MPD}AdaptationSet"):
        reps = list(aset.iter(f"{MPD}Representation"))
        families = {r.get("codecs", "").split(".")[0] for r in reps}
        assert len(families) == 1, f"one codec per adaptation set, got {families}"
        (family,) = families
        assert family not in found, f"one adaptation set per codec, {family} twice"
        found[family] = reps
    return found


def _segments(chunk_dir: Path, rep: ET.Element) -> list[Path]:
    rid = rep.get("id")
    timeline = rep.find(f"{MPD}SegmentTemplate/{MPD}SegmentTimeline")
    assert timeline is not None
    count = sum(1 + int(s.get("r", 0)) for s in timeline)
    return [chunk_dir / f"init-{rid}.webm"] + [chunk_dir / f"chunk-{rid}-{n:05d}.webm" for n in range(1, count + 1)]


def _boundaries(rep: ET.Element) -> list[int]:
    """Segment start times (ms) from the SegmentTimeline."""
    timeline = rep.find(f"{MPD}SegmentTemplate/{MPD}SegmentTimeline")
    assert timeline is not None
    times: list[int] = []
    t = 0
    for s in timeline:
        t = int(s.get("t", t))
        for _ in range(int(s.get("r", 0)) + 1):
            times.append(t)
            t += int(s.get("d", 0))
    return times


def _decode_each_segment(paths: list[Path]) -> tuple[int, list[float]]:
    """Decode init + segment 1, init + segments 1..2, ...: each media segment must decode when a
    player appends it. Returns the frames of the whole run and each segment's first frame time."""
    init, media = paths[0].read_bytes(), paths[1:]
    firsts: list[float] = []
    frames = 0
    for seg in media:
        with av.open(io.BytesIO(init + seg.read_bytes()), format="matroska") as ct:
            decoded = list(ct.decode(ct.streams[0]))
        assert decoded, f"{seg.name} decodes to nothing"
        firsts.append(round(float(decoded[0].time or 0.0), 3))
        frames += len(decoded)
    return frames, firsts


CLIPS = {
    # name: (size, rate), the AV1 rungs' short edges expected, VP9's (240 lines: 234 keeps 16:9 exactly)
    "1080p25": (("1920x1080", "25"), [1080, 720, 486, 360], [360, 234]),
    "720p60": (("1280x720", "60"), [720, 486, 360], [360, 234]),
    "portrait": (("1080x1920", "30"), [1080, 720, 486, 360], [360, 234]),
    "360p": (("640x360", "25"), [360], [360, 234]),
}


@pytest.mark.parametrize("name", list(CLIPS))
def test_manifest_has_the_ladder_up_to_the_source_and_every_segment_decodes(
    name: str, media: Any, tmp_path: Path
) -> None:
    (size, rate), av1_lines, vp9_lines = CLIPS[name]
    src = media.video(f"ladder-{name}.mp4", seconds=2, size=size, rate=rate, keyint=1000)
    chunk_dir, result = _ladder_run(src, tmp_path)
    sets = _sets(chunk_dir / result.manifest)
    assert set(sets) == {"av01", "vp09", "opus"}
    assert len(sets["opus"]) == 1
    width, height = (int(x) for x in size.split("x"))
    for family, expected in (("av01", av1_lines), ("vp09", vp9_lines)):
        reps = sets[family]
        sizes = [(int(r.get("width", 0)), int(r.get("height", 0))) for r in reps]
        assert sorted((min(s) for s in sizes), reverse=True) == expected
        for w, h in sizes:
            assert w <= width and h <= height, "no rung above the source"
            assert w * height == h * width, "every rung keeps the source's shape"
        # Bigger rungs get more bits (the manifest's bandwidth and the bytes written).
        by_size = sorted(reps, key=lambda r: int(r.get("width", 0)) * int(r.get("height", 0)))
        bandwidths = [int(r.get("bandwidth", 0)) for r in by_size]
        assert bandwidths == sorted(bandwidths) and len(set(bandwidths)) == len(bandwidths), bandwidths
    video_reps = sets["av01"] + sets["vp09"]
    # Every video representation has the same segments (and so the same switch points) ...
    timelines = {tuple(_boundaries(r)) for r in video_reps}
    assert len(timelines) == 1, timelines
    (timeline,) = timelines
    assert len(timeline) >= 2
    fps = float(rate)
    expected_frames = round(2 * fps)
    for rep in video_reps:
        frames, firsts = _decode_each_segment(_segments(chunk_dir, rep))
        # ... each decoding alone after its init segment, starting where the manifest says.
        assert firsts == pytest.approx([t / 1000 for t in timeline], abs=1.5 / fps)
        assert frames == pytest.approx(expected_frames, abs=1)
    (audio,) = sets["opus"]
    _decode_each_segment(_segments(chunk_dir, audio))
    # The top AV1 rung is the progressive download's own video.
    top = max(sets["av01"], key=lambda r: int(r.get("width", 0)))
    assert (top.get("width"), top.get("height")) == tuple(size.split("x"))


def test_a_tiny_source_gets_one_av1_rung_and_the_minimum_vp9_rungs() -> None:
    rungs = plan_ladder(160, 120, 0, VideoProfile())
    assert [(r.codec, r.width, r.height) for r in rungs] == [("av1", 160, 120), ("vp9", 160, 120), ("vp9", 80, 60)]


def test_no_rung_exceeds_the_source_bitrate_cap() -> None:
    rungs = plan_ladder(1920, 1080, 900_000, VideoProfile())
    assert all(0 < r.max_bitrate <= 900_000 for r in rungs)
    assert [r.max_bitrate for r in rungs if r.codec == "av1"] == [900_000, 900_000, 900_000, 700_000]


def test_an_aspect_without_an_exact_smaller_size_keeps_only_the_top() -> None:
    """1918x1080 (959:540) has no even size near 720 lines with exactly its shape: the DASH muxer
    would refuse mixed shapes in one set, so the ladder has the top alone, not a broken set."""
    rungs = plan_ladder(1918, 1080, 0, VideoProfile())
    assert [(r.codec, r.lines) for r in rungs] == [("av1", 1080), ("vp9", 1080)]


def _packets(path: Path) -> tuple[list[float], list[int]]:
    """Video frame times and key frame numbers, from the packets."""
    times, keys = [], []
    with av.open(str(path)) as ct:
        for n, packet in enumerate(p for p in ct.demux(ct.streams.video[0]) if p.pts is not None):
            times.append(round(float(packet.pts * packet.time_base), 3))
            if packet.is_keyframe:
                keys.append(n)
    return sorted(times), keys


def test_split_and_stitch_encodes_every_rung_per_chunk_and_joins_each(media: Any, tmp_path: Path) -> None:
    """Chunks encode all rungs of their range in one run; the join concatenates per rung: each
    joined rung has the whole-file rung's frames, times and key frames, and DASH cuts them all
    on the same boundaries."""
    from pipelines import chunked

    profiles = FAST
    limits = profiles.limits
    src = media.video("ladder-chunked.mp4", seconds=6, size="320x180", rate="25", keyint=25)
    dm = stages.demux(src, tmp_path / "demux", limits=limits)
    plan = stages.normalize(dm, tmp_path / "demux", tmp_path / "norm", profiles=profiles, limits=limits)
    filters = stages.build_filters(plan, profiles=profiles)
    whole = stages.encode(dm, tmp_path / "demux", filters, plan, tmp_path / "whole", profiles=profiles, limits=limits)
    assert plan.video is not None and len(whole.rungs) == 3  # AV1 320x180, VP9 320x180 and 160x90
    ranges = chunked.split(duration=plan.duration, frame_rate=plan.video.frame_rate, segment_seconds=1.0,
                           chunk_seconds=3)  # fmt: skip
    assert len(ranges) == 2
    chunks = chunked.ChunkPlan(plan.video.frame_rate, 1.0, 3, ranges)
    parts, audio = encode_chunks(dm, plan, filters, chunks, tmp_path, profiles=profiles, limits=limits)
    for path, part in parts:
        assert len(part.rung_files) == 2 and all((path.parent / f).stat().st_size for f in part.rung_files)
    assert audio.file
    joined = chunked.join(parts, tmp_path / "audio" / audio.file, plan, chunks, tmp_path / "joined", limits=limits,
                          rungs=stages.video_rungs(plan.video, profiles))  # fmt: skip
    assert joined.rungs == whole.rungs
    for rung in joined.rungs:
        w_times, w_keys = _packets(tmp_path / "whole" / rung.file)
        j_times, j_keys = _packets(tmp_path / "joined" / rung.file)
        assert len(j_times) == len(w_times) == 150, rung
        assert j_times == w_times and j_keys == w_keys == list(range(0, 150, 25)), rung
    muxed = stages.mux(joined, tmp_path / "joined", tmp_path / "mux", limits=limits)
    result = stages.chunk(muxed, tmp_path / "mux", tmp_path / "chunk", profiles=profiles, limits=limits,
                          encoded=joined, encode_dir=tmp_path / "joined")  # fmt: skip
    sets = _sets(tmp_path / "chunk" / result.manifest)
    assert [len(sets[f]) for f in ("av01", "vp09", "opus")] == [1, 2, 1]
    assert len({tuple(_boundaries(r)) for r in sets["av01"] + sets["vp09"]}) == 1
