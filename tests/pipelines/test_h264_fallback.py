"""The operator's H.264/AAC fallback (``VideoProfile.h264_fallback``), checked as a DASH player
would: with it on, the manifest has an avc1 set and an mp4a set beside the AV1, VP9 and Opus
ones, every H.264 representation's init segment plus each of its media segments decodes, and
its segments start where the AV1 ones do; with the default profile there is no trace of it."""

from __future__ import annotations

import dataclasses
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

# Fast settings, 1 s segments; the fallback's ladder and preset are the profile's defaults.
FAST = Profiles(video=VideoProfile(preset=12, crf=45, segment_seconds=1.0, vp9_crf=45))
ON = dataclasses.replace(FAST, video=dataclasses.replace(FAST.video, h264_fallback=True))
SECONDS, RATE = 2, 25


def _run(src: Path, root: Path, profiles: Profiles) -> tuple[Path, Any, Any]:
    limits = profiles.limits
    dm = stages.demux(src, root / "demux", limits=limits)
    plan = stages.normalize(dm, root / "demux", root / "normalize", profiles=profiles, limits=limits)
    filters = stages.build_filters(plan, profiles=profiles)
    enc = stages.encode(dm, root / "demux", filters, plan, root / "encode", profiles=profiles, limits=limits)
    muxed = stages.mux(enc, root / "encode", root / "mux", limits=limits)
    result = stages.chunk(
        muxed, root / "mux", root / "chunk", profiles=profiles, limits=limits, encoded=enc, encode_dir=root / "encode"
    )
    return root / "chunk", result, enc


def _sets(manifest: Path) -> dict[str, list[ET.Element]]:
    """Representations by codec family (av01, vp09, avc1, opus, mp4a): one set per family."""
    found: dict[str, list[ET.Element]] = {}
    for aset in ET.parse(manifest).getroot().iter(f"{MPD}AdaptationSet"):
        reps = list(aset.iter(f"{MPD}Representation"))
        families = {r.get("codecs", "").split(".")[0] for r in reps}
        assert len(families) == 1, f"one codec per adaptation set, got {families}"
        (family,) = families
        assert family not in found, f"one adaptation set per codec, {family} twice"
        found[family] = reps
    return found


def _template(rep: ET.Element) -> ET.Element:
    template = rep.find(f"{MPD}SegmentTemplate")
    assert template is not None
    return template


def _boundaries(rep: ET.Element) -> list[float]:
    """Segment start times in seconds, from the SegmentTimeline and its timescale."""
    template = _template(rep)
    scale = int(template.get("timescale", "1"))
    times: list[float] = []
    t = 0
    for s in template.iter(f"{MPD}S"):
        t = int(s.get("t", t))
        for _ in range(int(s.get("r", 0)) + 1):
            times.append(t / scale)
            t += int(s.get("d", 0))
    return times


def _files(chunk_dir: Path, rep: ET.Element) -> list[Path]:
    """The init segment and each media segment, named as a player resolves the template."""
    template, rid = _template(rep), rep.get("id", "")
    init = template.get("initialization", "").replace("$RepresentationID$", rid)
    media = template.get("media", "").replace("$RepresentationID$", rid).replace("$Number%05d$", "{:05d}")
    count = len(_boundaries(rep))
    return [chunk_dir / init] + [chunk_dir / media.format(n) for n in range(1, count + 1)]


def _decode_each_segment(paths: list[Path], fmt: str) -> tuple[int, list[float]]:
    """Decode init + segment 1, init + segment 2, ...: each media segment must decode when a
    player appends it. Returns the frames (or audio frames) of the whole run and each segment's
    first frame time."""
    init, media = paths[0].read_bytes(), paths[1:]
    frames, firsts = 0, []
    for seg in media:
        with av.open(io.BytesIO(init + seg.read_bytes()), format=fmt) as ct:
            decoded = list(ct.decode(ct.streams[0]))
        assert decoded, f"{seg.name} decodes to nothing"
        firsts.append(float(min(f.time or 0.0 for f in decoded)))
        frames += len(decoded)
    return frames, firsts


def test_the_fallback_adds_h264_and_aac_sets_that_decode_on_the_av1_boundaries(media: Any, tmp_path: Path) -> None:
    src = media.video("fallback-720p.mp4", seconds=SECONDS, size="1280x720", rate=str(RATE), keyint=1000)
    chunk_dir, result, _ = _run(src, tmp_path, ON)
    sets = _sets(chunk_dir / result.manifest)
    assert set(sets) == {"av01", "vp09", "opus", "avc1", "mp4a"}
    assert len(sets["mp4a"]) == 1 and len(sets["opus"]) == 1
    h264 = sets["avc1"]
    # The default fallback ladder: 720 and 360 lines, for a 720p source; more bits to the bigger.
    assert sorted((int(r.get("width", 0)), int(r.get("height", 0))) for r in h264) == [(640, 360), (1280, 720)]
    by_size = sorted(h264, key=lambda r: int(r.get("width", 0)))
    assert int(by_size[0].get("bandwidth", 0)) < int(by_size[1].get("bandwidth", 0))
    assert {r.get("mimeType") for r in h264} == {"video/mp4"}
    av1_times = {tuple(_boundaries(r)) for r in sets["av01"]}
    assert len(av1_times) == 1
    (av1_timeline,) = av1_times
    assert len(av1_timeline) == SECONDS  # 1 s segments
    for rep in h264:
        # Segment boundaries as the AV1 rungs' (within a frame: WebM counts in ms, MP4 in ticks).
        assert _boundaries(rep) == pytest.approx(av1_timeline, abs=0.5 / RATE)
        frames, firsts = _decode_each_segment(_files(chunk_dir, rep), "mp4")
        assert frames == SECONDS * RATE
        assert firsts == pytest.approx(av1_timeline, abs=1.5 / RATE)
    (aac,) = sets["mp4a"]
    assert aac.get("mimeType") == "audio/mp4"
    _decode_each_segment(_files(chunk_dir, aac), "mp4")
    # The stage reports every file the player fetches, typed by its container.
    reported = {o.file: o for o in result.outputs}
    for rep in [*h264, aac]:
        for path in _files(chunk_dir, rep):
            out = reported[path.name]
            assert out.content_type in ("video/mp4", "audio/mp4") and out.codec in ("h264", "aac")


def test_the_default_profile_has_no_h264_at_all(media: Any, tmp_path: Path) -> None:
    src = media.video("fallback-720p.mp4", seconds=SECONDS, size="1280x720", rate=str(RATE), keyint=1000)
    chunk_dir, result, enc = _run(src, tmp_path, FAST)
    assert "avc1" not in (chunk_dir / result.manifest).read_text()
    assert set(_sets(chunk_dir / result.manifest)) == {"av01", "vp09", "opus"}
    assert not list(chunk_dir.glob("*.m4s")) and not enc.aac
    assert all(r.codec != "h264" for r in enc.rungs)
    assert sorted(p.name for p in (tmp_path / "encode").iterdir() if "h264" in p.name or "aac" in p.name) == []


def test_a_source_smaller_than_the_fallback_ladder_gets_one_h264_rung_at_its_size() -> None:
    rungs = plan_ladder(320, 180, 0, dataclasses.replace(VideoProfile(), h264_fallback=True))
    assert [(r.width, r.height) for r in rungs if r.codec == "h264"] == [(320, 180)]
    assert all(r.codec != "h264" for r in plan_ladder(1920, 1080, 0, VideoProfile()))


def test_split_and_stitch_carries_the_fallback_through_the_join(media: Any, tmp_path: Path) -> None:
    """With issue 12's chunk tasks, each chunk encodes the H.264 rungs with the others and the
    audio task writes the AAC beside the Opus; the joined encode gives DASH the same sets."""
    from pipelines import chunked

    limits = ON.limits
    src = media.video("fallback-chunked.mp4", seconds=4, size="320x180", rate=str(RATE), keyint=RATE)
    dm = stages.demux(src, tmp_path / "demux", limits=limits)
    plan = stages.normalize(dm, tmp_path / "demux", tmp_path / "norm", profiles=ON, limits=limits)
    filters = stages.build_filters(plan, profiles=ON)
    assert plan.video is not None
    ranges = chunked.split(duration=plan.duration, frame_rate=plan.video.frame_rate, segment_seconds=1.0,
                           chunk_seconds=2)  # fmt: skip
    assert len(ranges) == 2
    chunks = chunked.ChunkPlan(plan.video.frame_rate, 1.0, 2, ranges)
    parts, audio = encode_chunks(dm, plan, filters, chunks, tmp_path, profiles=ON, limits=limits)
    assert audio.file and audio.aac
    joined = chunked.join(parts, tmp_path / "audio" / audio.file, plan, chunks, tmp_path / "joined", limits=limits,
                          rungs=stages.video_rungs(plan.video, ON), aac=tmp_path / "audio" / audio.aac)  # fmt: skip
    assert [r.codec for r in joined.rungs].count("h264") == 1 and joined.aac
    muxed = stages.mux(joined, tmp_path / "joined", tmp_path / "mux", limits=limits)
    result = stages.chunk(muxed, tmp_path / "mux", tmp_path / "chunk", profiles=ON, limits=limits,
                          encoded=joined, encode_dir=tmp_path / "joined")  # fmt: skip
    chunk_dir = tmp_path / "chunk"
    sets = _sets(chunk_dir / result.manifest)
    assert set(sets) == {"av01", "vp09", "opus", "avc1", "mp4a"}
    (av1,) = sets["av01"]
    (rep,) = sets["avc1"]
    assert _boundaries(rep) == pytest.approx(_boundaries(av1), abs=0.5 / RATE)
    frames, firsts = _decode_each_segment(_files(chunk_dir, rep), "mp4")
    assert frames == 4 * RATE and firsts == pytest.approx(_boundaries(av1), abs=1.5 / RATE)
    _decode_each_segment(_files(chunk_dir, sets["mp4a"][0]), "mp4")
