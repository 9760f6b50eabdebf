"""The audio/video stages, checked the way a user would: by playing (probing, decoding) the outputs."""

from __future__ import annotations

import dataclasses
import itertools
import math
import os
import random
import shutil
import struct
import subprocess
import sys
import textwrap
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import pytest
from PIL import Image, ImageStat

from pipelines import av as stages
from pipelines import opus_gain
from pipelines.errors import InvalidInput, MediaError, TooLarge, UnsupportedCodec
from pipelines.profiles import Profiles
from pipelines.results import Output, from_json, to_json
from pipelines.runner import ffmpeg_exe
from pipelines.sniff import sniff

TESTDATA = Path(__file__).resolve().parents[3] / "shared" / "testdata"
ROOT = Path(__file__).resolve().parents[2]
MPD = "{urn:mpeg:dash:schema:mpd:2011}"
CUES, CLUSTER = b"\x1c\x53\xbb\x6b", b"\x1f\x43\xb6\x75"


@pytest.fixture(scope="module")
def video_run(
    media: Any,
    profiles: Profiles,
    stage_runner: Any,
    tmp_path_factory: pytest.TempPathFactory,
) -> Any:
    """One full run over a 6 s clip, shared by the tests that look at its outputs."""
    src = media.video(
        "six.mp4",
        seconds=6,
        extra=("-metadata", "title=secret title", "-metadata", "location=+48.85+002.35/"),
    )
    seen: list[float] = []
    run = stage_runner(src, tmp_path_factory.mktemp("video-run"), profiles, progress=seen.append)
    run.results["progress"] = seen
    return run


def _outputs(result: Any) -> dict[str, Output]:
    return {o.file: o for o in result.outputs}


# --- the video deliverable -----------------------------------------------------------------------


def test_video_becomes_av1_and_opus_in_webm(video_run: Any, looker: Callable[..., Any]) -> None:
    (out,) = video_run["mux"].outputs
    path = video_run.dir("mux") / out.file
    seen = looker(path)
    assert (seen.format, seen.video_codec, seen.audio_codec) == ("matroska,webm", "av1", "opus")
    assert (seen.width, seen.height) == (320, 240)
    assert seen.duration == pytest.approx(6.0, abs=0.1)
    assert seen.video_frames == 150 and seen.audio_seconds == pytest.approx(6.0, abs=0.1)
    assert seen.sample_rate == 48000
    assert out.role == "video" and out.content_type == "video/webm" and out.codec == "av1+opus"
    assert (out.width, out.height) == (320, 240) and out.duration == pytest.approx(6.0, abs=0.1)
    assert out.bytes == path.stat().st_size and sniff(path).mime == "video/webm"


def test_a_key_frame_starts_every_segment(video_run: Any, looker: Callable[..., Any]) -> None:
    seen = looker(video_run.dir("mux") / "media.webm")
    assert seen.keyframes == pytest.approx((0.0, 2.0, 4.0), abs=0.05)


def test_webm_is_seekable_with_cues_before_the_media(video_run: Any) -> None:
    import av

    path = video_run.dir("mux") / "media.webm"
    data = path.read_bytes()
    assert 0 < data.find(CUES) < data.find(CLUSTER), "the index must come before the first cluster"
    with av.open(str(path)) as ct:
        stream = ct.streams.video[0]
        ct.seek(int(4.0 / stream.time_base), stream=stream)
        frame = next(ct.decode(stream))
        assert float(frame.pts * stream.time_base) == pytest.approx(4.0, abs=0.05)


def test_user_metadata_is_stripped(video_run: Any) -> None:
    import av

    with av.open(str(video_run.dir("mux") / "media.webm")) as ct:
        tags = " ".join(f"{k}={v}" for k, v in ct.metadata.items())
        for s in ct.streams:
            tags += " ".join(f"{k}={v}" for k, v in s.metadata.items())
    assert "secret" not in tags and "48.85" not in tags


def test_dash_manifest_parses_and_segments_play_in_order(video_run: Any, looker: Callable[..., Any]) -> None:
    chunk_dir, result = video_run.dir("chunk"), video_run["chunk"]
    outputs = _outputs(result)
    assert outputs["manifest.mpd"].role == "manifest"
    assert outputs["manifest.mpd"].content_type == "application/dash+xml"
    mpd = ET.parse(chunk_dir / result.manifest).getroot()
    assert mpd.get("type") == "static"
    sets = {a.get("contentType"): a for a in mpd.iter(f"{MPD}AdaptationSet")}
    assert set(sets) == {"video", "audio"}
    video_rep = sets["video"].find(f"{MPD}Representation")
    audio_rep = sets["audio"].find(f"{MPD}Representation")
    assert video_rep is not None and audio_rep is not None
    assert video_rep.get("codecs", "").startswith("av01") and video_rep.get("mimeType") == "video/webm"
    assert audio_rep.get("codecs") == "opus" and audio_rep.get("mimeType") == "audio/webm"
    assert (video_rep.get("width"), video_rep.get("height")) == ("320", "240")
    for rep, expect in ((video_rep, "video/webm"), (audio_rep, "audio/webm")):
        rid = rep.get("id")
        segments = sorted(chunk_dir.glob(f"chunk-{rid}-*.webm"))
        timeline = rep.find(f"{MPD}SegmentTemplate/{MPD}SegmentTimeline")
        assert timeline is not None
        lengths = [int(s.get("d", 0)) for s in timeline for _ in range(int(s.get("r", 0)) + 1)]
        assert len(lengths) == len(segments)
        # 6 s in 2 s segments; Opus's 6.5 ms encoder delay may leave a few ms for a last one.
        assert lengths[:3] == pytest.approx([2000, 2000, 2000], abs=5) and sum(lengths[3:]) < 20
        for path in [chunk_dir / f"init-{rid}.webm", *segments]:
            assert outputs[path.name].role == "segment" and outputs[path.name].content_type == expect
            assert outputs[path.name].bytes == path.stat().st_size
        stream = b"".join(p.read_bytes() for p in [chunk_dir / f"init-{rid}.webm", *segments])
        seen = looker(stream, fmt="matroska")
        if expect == "video/webm":
            assert seen.video_frames == 150
            assert seen.keyframes == pytest.approx((0.0, 2.0, 4.0), abs=0.05)
        else:
            assert seen.audio_seconds == pytest.approx(6.0, abs=0.1)
    assert set(outputs) == {p.name for p in chunk_dir.iterdir()}


def test_thumbnail_is_a_webp_of_the_right_size(video_run: Any) -> None:
    (thumb,) = video_run["previews"].outputs
    assert (thumb.role, thumb.file, thumb.content_type) == ("thumbnail", "thumbnail.webp", "image/webp")
    with Image.open(video_run.dir("previews") / thumb.file) as img:
        assert img.format == "WEBP"
        assert img.size == (thumb.width, thumb.height) == (160, 120)
        assert ImageStat.Stat(img.convert("L")).mean[0] > 40


def test_progress_is_monotonic_and_finishes(video_run: Any) -> None:
    seen = video_run["progress"]
    assert seen and seen == sorted(seen) and seen[-1] == 1.0


def test_encode_reports_progress_while_it_runs(media: Any, profiles: Profiles, tmp_path: Path) -> None:
    """A user watching a long encode must see the bar move (ffmpeg reports twice a second)."""
    src = media.make(
        "noisy-20s.mp4",
        ["-f", "lavfi", "-i", "testsrc2=size=320x240:rate=25:duration=20,noise=alls=12:allf=t",
         "-c:v", "libx264", "-preset", "ultrafast"],
    )  # fmt: skip
    limits = profiles.limits
    dm = stages.demux(src, tmp_path / "demux", limits=limits)
    plan = stages.normalize(dm, tmp_path / "demux", tmp_path / "plan", profiles=profiles, limits=limits)
    filters = stages.build_filters(plan, profiles=profiles)
    seen: list[tuple[float, float]] = []
    clock = time.monotonic
    stages.encode(
        dm,
        tmp_path / "demux",
        filters,
        plan,
        tmp_path / "enc",
        profiles=profiles,
        limits=limits,
        progress=lambda f: seen.append((clock(), f)),
    )
    fractions = [f for _, f in seen]
    assert len(fractions) >= 3 and fractions == sorted(fractions) and fractions[-1] == 1.0
    assert 0 < fractions[0] < 0.7
    assert all(b - a <= 2.0 for (a, _), (b, _) in itertools.pairwise(seen))


def test_stages_write_only_in_their_directories_with_relative_names(video_run: Any) -> None:
    expected = {
        "demux": {"streams.mkv"},
        "decode": set(),
        "normalize": set(),
        # The top rung, and the ladder's other rungs beside it, each named in the result.
        "encode": {"encoded.mkv", *(r.file for r in video_run["encode"].rungs)},
        "mux": {"media.webm"},
        "previews": {"thumbnail.webp"},
    }
    assert len(expected["encode"]) == 3  # 320x240: AV1 at its size, VP9 at its size and half
    for stage, names in expected.items():
        found = {p.name for p in video_run.dir(stage).iterdir()} if video_run.dir(stage).exists() else set()
        assert found == names, stage
    assert {p.name for p in video_run.root.iterdir()} <= {*expected, "chunk"}
    for stage in ("mux", "chunk", "previews"):
        for output in video_run[stage].outputs:
            assert "/" not in output.file and not Path(output.file).is_absolute()


def test_a_renamed_stage_directory_still_works(video_run: Any, profiles: Profiles, tmp_path: Path) -> None:
    """The caller renames each stage's directory into place: results must not hold paths."""
    moved = tmp_path / "elsewhere"
    shutil.copytree(video_run.dir("mux"), moved)
    limits = profiles.limits
    result = stages.chunk(video_run["mux"], moved, tmp_path / "chunk", profiles=profiles, limits=limits)
    assert (tmp_path / "chunk" / result.manifest).exists()


# --- what normalize decides ----------------------------------------------------------------------


def test_large_video_is_scaled_into_the_box_without_audio(media: Any, pipeline: Any, looker: Any) -> None:
    src = media.video("wide.mp4", seconds=2, size="640x360", audio=False)
    run = pipeline(src)
    seen = looker(run.dir("mux") / "media.webm")
    assert (seen.width, seen.height) == (320, 180)
    assert seen.audio_codec is None and run["mux"].outputs[0].codec == "av1"
    mpd = ET.parse(run.dir("chunk") / "manifest.mpd").getroot()
    assert [a.get("contentType") for a in mpd.iter(f"{MPD}AdaptationSet")] == ["video"]


def test_rotated_video_comes_out_upright(rotated_clip: Path, pipeline: Any, looker: Any) -> None:
    run = pipeline(rotated_clip)
    plan = run["normalize"].video
    assert (plan.width, plan.height, abs(plan.rotation)) == (240, 320, 90)
    seen = looker(run.dir("mux") / "media.webm")
    assert (seen.width, seen.height, seen.rotation) == (240, 320, 0)
    (thumb,) = run["previews"].outputs
    assert thumb.height > thumb.width
    with Image.open(run.dir("previews") / thumb.file) as img:
        assert img.size == (thumb.width, thumb.height)


@pytest.mark.parametrize(
    ("source", "max_fps", "expected"),
    [
        ("30/1", 30.0, "30/1"),
        ("25/1", 30.0, "25/1"),
        ("60000/1001", 30.0, "30000/1001"),
        ("45000/1499", 30.0, "30/1"),  # a phone's 30.02 is 30
        ("50/1", 30.0, "25/1"),
        ("120/1", 30.0, "30/1"),
        ("90000/1", 30.0, "30/1"),  # a timebase posing as a rate
        (None, 24.0, "24/1"),
    ],
)
def test_frame_rate_is_capped_by_whole_divisions(source: str | None, max_fps: float, expected: str) -> None:
    assert stages._target_rate(source, max_fps) == Fraction(expected)


@pytest.mark.parametrize(
    ("rate", "expected", "frames"),
    [("60", 60.0, 60), ("50", 50.0, 50), ("60000/1001", 59.94, 60), ("120", 60.0, 60), ("30", 30.0, 30)],
)
def test_50_and_60_fps_are_kept(
    rate: str, expected: float, frames: int, media: Any, pipeline: Any, looker: Any
) -> None:
    """Sport, games and phones' 60 fps mode: the default keeps up to 60 (it was 30, halving them)."""
    assert Profiles().video.max_fps == 60
    src = media.video(f"rate-{rate.replace('/', '-')}.mp4", seconds=1, size="160x120", rate=rate, audio=False)
    run = pipeline(src)
    assert run["normalize"].video.fps == pytest.approx(expected, abs=0.01)
    (out,) = run["mux"].outputs
    seen = looker(run.dir("mux") / out.file)
    assert seen.video_frames == pytest.approx(frames, abs=1)
    with av.open(str(run.dir("mux") / out.file)) as ct:
        assert float(ct.streams.video[0].average_rate) == pytest.approx(expected, abs=0.01)


@pytest.mark.parametrize(
    ("integrated", "true_peak", "gain"),
    [
        (-21.0, -18.0, 5.0),  # reaches -16 LUFS
        (-20.0, -0.5, -1.0),  # capped by the -1.5 dBTP ceiling, even below zero gain
        (-70.0, float("-inf"), 0.0),  # silence stays silence
        (-50.0, -40.0, 20.0),  # at most +20 dB
    ],
)
def test_loudness_gain(integrated: float, true_peak: float, gain: float) -> None:
    measured = stages.Loudness(integrated=integrated, true_peak=true_peak, lra=3.0, threshold=integrated - 10)
    assert stages._gain(measured, -16.0, -1.5) == pytest.approx(gain, abs=0.01)


def test_ebur128_summary_is_parsed() -> None:
    stderr = textwrap.dedent(
        """
        [Parsed_ebur128_0 @ 0x1] Summary:

          Integrated loudness:
            I:         -18.8 LUFS
            Threshold: -28.8 LUFS

          Loudness range:
            LRA:         2.5 LU
            Threshold: -38.8 LUFS

          True peak:
            Peak:      -17.8 dBFS
        """
    )
    assert stages.parse_ebur128(stderr) == stages.Loudness(-18.8, -17.8, 2.5, -28.8)
    # The encode's graph measures the sample peak only: it stands for the true peak with an allowance.
    sampled = stderr.replace("True peak:", "Sample peak:")
    assert stages.parse_ebur128(sampled) == stages.Loudness(-18.8, -17.8 + stages.SAMPLE_PEAK_ALLOWANCE_DB, 2.5, -28.8)


def test_filters_apply_the_plan(video_run: Any, profiles: Profiles) -> None:
    spec = video_run["filter"]
    # The untagged SD clip is given BT.601 tags first, so the AV1 says how to show it.
    assert spec.video == (
        "setparams=colorspace=smpte170m:color_primaries=smpte170m:color_trc=smpte170m:range=tv,"
        "fps=25/1,scale=320:240,format=yuv420p,setsar=1"
    )
    # No gain in the graph: it ends in the measurement the encode turns into the Opus header's.
    assert spec.audio.startswith("aresample=48000") and "channel_layouts=mono" in spec.audio
    assert spec.audio.endswith("," + stages.ENCODE_LOUDNESS_FILTER) and "volume" not in spec.audio
    assert spec.loudness_in_encode
    # A plan that knows the loudness already (stored by an earlier version) applies its gain.
    plan = video_run["normalize"]
    known = stages.Loudness(integrated=-21.0, true_peak=-18.0, lra=3.0, threshold=-31.0)
    audio = dataclasses.replace(plan.audio, loudness=known, gain_db=5.0)
    planned = stages.build_filters(dataclasses.replace(plan, audio=audio), profiles=profiles)
    assert planned.audio is not None and planned.audio.endswith(",volume=5.0dB") and not planned.loudness_in_encode
    loudnorm = stages.build_filters(
        dataclasses.replace(plan, audio=audio), profiles=profiles, loudness_method="loudnorm"
    )
    assert loudnorm.audio is not None
    assert "measured_I=" in loudnorm.audio and "linear=true" in loudnorm.audio
    assert "volume" not in loudnorm.audio and "ebur128" not in loudnorm.audio


# --- audio ---------------------------------------------------------------------------------------


def test_audio_becomes_loudness_normalised_opus_webm(
    song: Path,
    pipeline: Any,
    looker: Any,
    measure_lufs: Any,
) -> None:
    run = pipeline(song)
    assert run["demux"].kind == "audio" and "chunk" not in run.results
    (out,) = run["mux"].outputs
    path = run.dir("mux") / out.file
    assert (out.role, out.content_type, out.codec) == ("audio", "audio/webm", "opus")
    seen = looker(path)
    assert (seen.audio_codec, seen.sample_rate, seen.video_codec) == ("opus", 48000, None)
    assert seen.duration == pytest.approx(3.0, abs=0.1) and out.duration == pytest.approx(3.0, abs=0.1)
    assert measure_lufs(path) == pytest.approx(-16.0, abs=1.0)
    data = path.read_bytes()
    assert 0 < data.find(CUES) < data.find(CLUSTER), "the index must come before the first cluster"


def test_an_audio_encode_stored_as_matroska_by_an_earlier_version_is_still_muxed(
    song: Path, pipeline: Any, profiles: Profiles, looker: Any, tmp_path: Path
) -> None:
    """An item whose encode an earlier version did (``encoded.mka``) when this one came: the mux
    stage copies it into the same cues-first WebM, with the same packets and the same gain."""
    run = pipeline(song)
    enc = run["encode"]
    old = tmp_path / "old-encode"
    old.mkdir()
    subprocess.run(
        [ffmpeg_exe(), "-v", "error", "-i", str(run.dir("encode") / enc.file), "-c", "copy", "-f", "matroska",
         str(old / "encoded.mka")],
        check=True, timeout=60,
    )  # fmt: skip
    muxed = stages.mux(dataclasses.replace(enc, file="encoded.mka"), old, tmp_path / "mux", limits=profiles.limits)
    path = tmp_path / "mux" / muxed.outputs[0].file
    data = path.read_bytes()
    assert 0 < data.find(CUES) < data.find(CLUSTER)
    assert opus_gain.read_gain(path) == pytest.approx(enc.gain_db, abs=1 / 256)
    assert looker(path).audio_seconds == pytest.approx(looker(run.dir("mux") / "media.webm").audio_seconds)
    # Probed (this path) or read from the WebM's Segment Info (the linked one): the same record,
    # but for a few bytes of header (the encode's muxer writes the track's DefaultDuration).
    copied, linked = muxed.outputs[0], run["mux"].outputs[0]
    assert dataclasses.replace(copied, bytes=0) == dataclasses.replace(linked, bytes=0)
    assert abs(copied.bytes - linked.bytes) < 64


def test_loudness_is_measured_in_the_encode_and_written_as_the_opus_gain(
    song: Path,
    pipeline: Any,
    profiles: Profiles,
    measure_lufs: Any,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """No pass before the encode measures the loudness (the decode check does not, normalize
    does not): the encode measures what it encodes and writes the gain the rule asks for into
    the Opus header, with the samples themselves left as they were."""

    def no_pass_of_its_own(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the loudness was measured in a pass of its own")

    monkeypatch.setattr(stages, "measure_loudness", no_pass_of_its_own)
    run = pipeline(song)
    assert run["decode"].loudness is None and run["normalize"].audio.loudness is None
    encoded = run["encode"]
    assert encoded.loudness is not None and math.isfinite(encoded.loudness.integrated)
    ap = profiles.audio
    assert encoded.gain_db == stages._gain(encoded.loudness, ap.loudness_i, ap.loudness_tp)
    assert encoded.gain_db > 3  # the tone is quiet: this test would not see a missing gain otherwise
    webm = run.dir("mux") / "media.webm"
    assert opus_gain.read_gain(webm) == pytest.approx(encoded.gain_db, abs=1 / 256)
    # ffmpeg's decoder applies the header's gain: the target is reached when played ...
    assert measure_lufs(webm) == pytest.approx(ap.loudness_i, abs=0.5)
    # ... from samples as loud as the measurement said: the gain is the header's alone.
    unity = tmp_path / "unity.webm"
    shutil.copyfile(webm, unity)
    opus_gain.write_gain(unity, 0.0)
    assert measure_lufs(unity) == pytest.approx(encoded.loudness.integrated, abs=0.5)


def test_a_quiet_sound_with_loud_peaks_is_raised_only_to_the_true_peak_ceiling(
    media: Any, pipeline: Any, profiles: Profiles, measure_lufs: Any, measure_true_peak: Any
) -> None:
    """The encode measures the sample peak, not the 4x oversampled true peak: played back, a
    quiet piece with loud clicks must still stay under the ceiling, and lose at most the
    allowance against a gain from the true peak."""
    peaky = media.make(
        "peaky.flac",
        ["-f", "lavfi", "-i", "aevalsrc='0.03*sin(2*PI*440*t)+if(lt(mod(t\\,1)\\,0.005)\\,0.5*sin(2*PI*3100*t)\\,0)'"
         ":s=44100:d=4", "-ac", "2", "-c:a", "flac"],
    )  # fmt: skip
    ap = profiles.audio
    exact = measure_true_peak(peaky)
    run = pipeline(peaky)
    webm = run.dir("mux") / "media.webm"
    gain = run["encode"].gain_db
    # The ceiling binds (the target loudness alone would ask for far more) ...
    assert ap.loudness_i - measure_lufs(peaky) > gain + 3
    # ... played, the peaks stay under it (give or take what the Opus encode moves them) ...
    assert measure_true_peak(webm) <= ap.loudness_tp + 0.3
    # ... and the gain is within the allowance of the one the true peak gives.
    assert ap.loudness_tp - exact - stages.SAMPLE_PEAK_ALLOWANCE_DB - 0.1 <= gain <= ap.loudness_tp - exact + 0.1


def test_the_gain_reaches_the_dash_audio_segments(video_run: Any, profiles: Profiles, measure_lufs: Any) -> None:
    """The DASH audio init segment is cut from the WebM: it carries the same header gain, and its
    segments play at the target loudness."""
    gain = video_run["encode"].gain_db
    assert gain is not None and gain != 0
    chunk_dir = video_run.dir("chunk")
    mpd = ET.parse(chunk_dir / video_run["chunk"].manifest).getroot()
    (audio,) = [a for a in mpd.iter(f"{MPD}AdaptationSet") if a.get("contentType") == "audio"]
    rep = audio.find(f"{MPD}Representation")
    assert rep is not None
    init = chunk_dir / f"init-{rep.get('id')}.webm"
    assert opus_gain.read_gain(init) == pytest.approx(gain, abs=1 / 256)
    joined = chunk_dir.parent / "audio-joined.webm"
    segments = sorted(chunk_dir.glob(f"chunk-{rep.get('id')}-*.webm"))
    joined.write_bytes(b"".join(p.read_bytes() for p in [init, *segments]))
    assert measure_lufs(joined) == pytest.approx(profiles.audio.loudness_i, abs=1.0)


def test_a_loudness_measured_by_an_earlier_version_is_applied_in_the_graph(
    song: Path, profiles: Profiles, tmp_path: Path, measure_lufs: Any
) -> None:
    """An item half-way through when this version came: its stored decode result has the
    loudness, so the plan's gain goes into the filter graph and the header keeps 0 dB."""
    limits = profiles.limits
    dm = stages.demux(song, tmp_path / "demux", limits=limits)
    stored = to_json(stages.decode(dm, tmp_path / "demux", tmp_path / "decode", limits=limits))
    assert stored["loudness"] is None
    measured = stages.measure_loudness(tmp_path / "demux" / dm.file, dm.ffmpeg_format, limits=limits)
    assert measured is not None
    old = from_json(stages.DecodeResult, {**stored, "loudness": to_json(measured)})
    plan = stages.normalize(dm, tmp_path / "demux", tmp_path / "plan", profiles=profiles, limits=limits, decoded=old)
    assert plan.audio is not None and plan.audio.loudness == measured and plan.audio.gain_db > 3
    spec = stages.build_filters(plan, profiles=profiles)
    assert not spec.loudness_in_encode
    enc = stages.encode(dm, tmp_path / "demux", spec, plan, tmp_path / "enc", profiles=profiles, limits=limits)
    assert enc.gain_db is None and opus_gain.read_gain(tmp_path / "enc" / enc.file) == 0.0
    assert measure_lufs(tmp_path / "enc" / enc.file) == pytest.approx(profiles.audio.loudness_i, abs=0.5)


def test_opus_gain_is_a_two_byte_patch_of_the_header(media: Any, tmp_path: Path) -> None:
    """RFC 7845: bytes 16-17 of OpusHead, signed Q7.8 dB, little endian; nothing else changes."""
    src = media.make("opus-tone.webm", ["-f", "lavfi", "-i", "sine=frequency=440:duration=1", "-c:a", "libopus"])
    before = src.read_bytes()
    patched = tmp_path / "patched.webm"
    for db, raw in ((6.0, b"\x00\x06"), (-7.5, b"\x80\xf8"), (0.0, b"\x00\x00")):
        patched.write_bytes(before)
        opus_gain.write_gain(patched, db)
        after = patched.read_bytes()
        head = after.index(b"OpusHead")
        assert after[head + 16 : head + 18] == raw and opus_gain.read_gain(patched) == db
        assert len(after) == len(before)
        assert after[: head + 16] + after[head + 18 :] == before[: head + 16] + before[head + 18 :]
    vorbis = media.make("vorbis.webm", ["-f", "lavfi", "-i", "sine=duration=1", "-c:a", "libvorbis"])
    with pytest.raises(MediaError):
        opus_gain.read_gain(vorbis)


def test_an_audio_upload_is_read_in_place_without_its_cover_art(
    media: Any, pipeline: Any, looker: Any, tmp_path: Path
) -> None:
    """An MP3 with a cover picture: no copy into Matroska (the upload is linked into the stage),
    and the picture is neither decoded nor carried into the output."""
    cover = media.make("cover.png", ["-f", "lavfi", "-i", "testsrc2=size=64x64", "-frames:v", "1"])
    tone = media.audio("for-cover.mp3", seconds=2)
    src = media.make(
        "with-cover.mp3",
        ["-i", str(tone), "-i", str(cover), "-map", "0", "-map", "1", "-c:a", "copy", "-c:v", "png",
         "-disposition:v", "attached_pic", "-id3v2_version", "3"],
    )  # fmt: skip
    run = pipeline(src)
    dm = run["demux"]
    assert (dm.kind, dm.in_place, dm.ffmpeg_format, dm.has_video) == ("audio", True, "mp3", False)
    assert [f.name for f in run.dir("demux").iterdir()] == [dm.file]
    assert (run.dir("demux") / dm.file).read_bytes() == src.read_bytes()
    assert run["decode"].video_frames == 0 and run["encode"].duration == pytest.approx(2.0, abs=0.1)
    seen = looker(run.dir("mux") / "media.webm")
    assert (seen.audio_codec, seen.video_codec) == ("opus", None)
    assert seen.duration == pytest.approx(2.0, abs=0.1)


def _webm_stating(src: Path, dst: Path, milliseconds: float) -> Path:
    """``src`` (a WebM with a 1 ms timecode scale) whose Segment Info says it lasts ``milliseconds``."""
    data = bytearray(src.read_bytes())
    at = data.index(b"\x44\x89\x88") + 3  # Duration, an 8-byte float
    data[at : at + 8] = struct.pack(">d", milliseconds)
    dst.write_bytes(bytes(data))
    return dst


@pytest.mark.parametrize("header", ["unstated", "understated"])
def test_an_audio_upload_longer_than_its_header_says_is_refused_past_the_limit(
    header: str, media: Any, pipeline: Any, profiles: Profiles, tmp_path: Path
) -> None:
    """Read in place, an upload is not cut at the longest length we accept: one whose header
    does not state its length (a WebM written live) or states less than there is passes the
    header check, and the encode, which is the decode check for a sound, refuses it once it has
    decoded past the limit; nothing is delivered. Within the limit, all of it is encoded."""
    six = ["-f", "lavfi", "-i", "sine=frequency=330:duration=6", "-c:a", "libopus"]
    if header == "unstated":
        src = media.make("live.webm", [*six, "-live", "1", "-f", "webm"])
    else:
        src = _webm_stating(media.make("six.webm", [*six, "-f", "webm"]), tmp_path / "says-1s.webm", 1000.0)
    limited = dataclasses.replace(profiles, limits=dataclasses.replace(profiles.limits, max_duration=4))
    dm = stages.demux(src, tmp_path / "demux", limits=limited.limits)
    assert dm.in_place and dm.duration == (None if header == "unstated" else pytest.approx(1.0))
    with pytest.raises(TooLarge) as caught:
        pipeline(src, profiles=limited)
    assert caught.value.message == "The file is longer than the 4 seconds we accept."
    assert not (tmp_path / "stages" / "mux").exists()
    shutil.rmtree(tmp_path / "stages")
    run = pipeline(src)
    assert run["encode"].duration == pytest.approx(6.0, abs=0.1)
    assert run["mux"].outputs[0].duration == pytest.approx(6.0, abs=0.1)


def test_a_recording_whose_header_states_no_length_reports_its_encode_progress(
    media: Any, profiles: Profiles, tmp_path: Path
) -> None:
    """A browser's recording (a WebM written live) says nothing of its length: the decode stage
    counts its packets, so the encode, which decodes it once, can say how far it is."""
    src = media.make(
        "memo-live.webm",
        ["-f", "lavfi", "-i", "sine=frequency=330:duration=30", "-c:a", "libopus", "-live", "1", "-f", "webm"],
    )  # fmt: skip
    limits = profiles.limits
    dm = stages.demux(src, tmp_path / "demux", limits=limits)
    assert dm.in_place and dm.duration is None
    decoded = stages.decode(dm, tmp_path / "demux", tmp_path / "decode", limits=limits)
    assert decoded.packets_duration == pytest.approx(30.0, abs=0.1)
    plan = stages.normalize(
        dm, tmp_path / "demux", tmp_path / "plan", profiles=profiles, limits=limits, decoded=decoded
    )
    assert plan.duration == pytest.approx(30.0, abs=0.1)
    seen: list[float] = []
    encoded = stages.encode(
        dm,
        tmp_path / "demux",
        stages.build_filters(plan, profiles=profiles),
        plan,
        tmp_path / "enc",
        profiles=profiles,
        limits=limits,
        progress=seen.append,
    )
    assert seen and seen == sorted(seen) and seen[-1] == 1.0
    assert encoded.duration == pytest.approx(30.0, abs=0.1)


@pytest.mark.parametrize("sample", ["wav_empty_header_only.wav", "flac-frames-garbled", "flac-no-frames"])
def test_a_sound_of_which_nothing_decodes_is_refused(sample: str, media: Any, pipeline: Any, tmp_path: Path) -> None:
    """A header with no sound behind it (a WAV header alone, FLAC frames overwritten, a FLAC
    of no samples) passes the demux's probe; the encode decodes nothing and refuses it with the
    decode check's words, before any gain is measured or any WebM delivered."""
    if sample.endswith(".wav"):
        src = TESTDATA / "hostile" / sample
    elif sample == "flac-no-frames":
        src = media.make("no-samples.flac", ["-f", "lavfi", "-i", "anullsrc=r=44100", "-t", "0", "-c:a", "flac"])
    else:
        flac = media.audio("for-garbling.flac", seconds=6, codec="flac").read_bytes()
        src = tmp_path / "garbled.flac"
        src.write_bytes(flac[:8192] + bytes(random.Random(7).randrange(256) for _ in range(len(flac) - 8192)))
    with pytest.raises(InvalidInput) as caught:
        pipeline(src)
    assert caught.value.message == "Nothing in the file could be decoded."
    assert not (tmp_path / "stages" / "mux").exists()


def test_audio_can_be_chunked_too(song: Path, pipeline: Any, profiles: Profiles, tmp_path: Path) -> None:
    run = pipeline(song)
    limits = profiles.limits
    result = stages.chunk(run["mux"], run.dir("mux"), tmp_path / "chunk", profiles=profiles, limits=limits)
    mpd = ET.parse(tmp_path / "chunk" / result.manifest).getroot()
    assert [a.get("contentType") for a in mpd.iter(f"{MPD}AdaptationSet")] == ["audio"]
    assert {o.content_type for o in result.outputs if o.role == "segment"} == {"audio/webm"}


def test_192khz_surround_flac_is_resampled_and_downmixed(
    hires_flac: Path,
    pipeline: Any,
    looker: Any,
) -> None:
    run = pipeline(hires_flac)
    plan = run["normalize"].audio
    assert (plan.source_sample_rate, plan.source_channels) == (192000, 6)
    assert (plan.sample_rate, plan.channels) == (48000, 2)
    seen = looker(run.dir("mux") / "media.webm")
    assert (seen.audio_codec, seen.sample_rate, seen.channels) == ("opus", 48000, 2)
    assert seen.audio_seconds == pytest.approx(2.0, abs=0.1)


def test_loudnorm_two_pass_variant_also_encodes(
    song: Path, pipeline: Any, profiles: Profiles, tmp_path: Path, measure_lufs: Any
) -> None:
    run = pipeline(song)
    measured = stages.measure_loudness(run.dir("demux") / run["demux"].file, None, limits=profiles.limits)
    plan = run["normalize"]
    plan = dataclasses.replace(plan, audio=dataclasses.replace(plan.audio, loudness=measured))
    spec = stages.build_filters(plan, profiles=profiles, loudness_method="loudnorm")
    enc = stages.encode(
        run["demux"],
        run.dir("demux"),
        spec,
        plan,
        tmp_path / "enc",
        profiles=profiles,
        limits=profiles.limits,
    )
    assert measure_lufs(tmp_path / "enc" / enc.file) == pytest.approx(-16.0, abs=1.0)


# --- previews ------------------------------------------------------------------------------------


def test_thumbnail_is_never_black(black_then_bright: Path, profiles: Profiles, tmp_path: Path) -> None:
    dm = stages.demux(black_then_bright, tmp_path / "demux", limits=profiles.limits)
    limits = profiles.limits
    result = stages.previews(dm, tmp_path / "demux", tmp_path / "previews", profiles=profiles, limits=limits)
    (thumb,) = result.outputs
    assert result.at is not None and result.at >= 3.0 and result.luma is not None and result.luma > 40
    with Image.open(tmp_path / "previews" / thumb.file) as img:
        assert img.format == "WEBP" and ImageStat.Stat(img.convert("L")).mean[0] > 40
    assert [p.name for p in (tmp_path / "previews").iterdir()] == ["thumbnail.webp"]


# --- damaged and refused input -------------------------------------------------------------------


def test_truncated_file_is_processed_as_far_as_it_decodes(media: Any, pipeline: Any, looker: Any) -> None:
    whole = media.video("faststart.mp4", seconds=4, extra=("-movflags", "+faststart"))
    cut = whole.with_name("cut-faststart.mp4")
    cut.write_bytes(whole.read_bytes()[: int(whole.stat().st_size * 0.6)])
    run = pipeline(cut)
    assert run["decode"].expected_duration == pytest.approx(4.0, abs=0.1)
    seen = looker(run.dir("mux") / "media.webm")
    assert 1.0 < seen.duration < 3.8
    assert seen.video_frames > 25


def test_file_cut_before_its_index_is_refused(media: Any, profiles: Profiles, tmp_path: Path) -> None:
    whole = media.video("moov-at-end.mp4", seconds=2)
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    with pytest.raises(InvalidInput):
        stages.demux(cut, tmp_path / "demux", limits=profiles.limits)


def test_codec_off_the_allow_list_is_named(media: Any, profiles: Profiles, tmp_path: Path) -> None:
    src = media.make("ffv1.mkv", ["-f", "lavfi", "-i", "testsrc2=size=160x120:duration=1", "-c:v", "ffv1"])
    with pytest.raises(UnsupportedCodec) as caught:
        stages.demux(src, tmp_path / "demux", limits=profiles.limits)
    assert "ffv1" in caught.value.message


def test_garbage_after_a_valid_header_decodes_nothing(media: Any, pipeline: Any, tmp_path: Path) -> None:
    song = media.audio("for-garbage.mp3", seconds=2)
    data = song.read_bytes()
    bad = tmp_path / "bad.mp3"
    bad.write_bytes(data[:64] + os.urandom(len(data) - 64))
    with pytest.raises(MediaError):
        pipeline(bad)
    assert not (tmp_path / "stages" / "mux").exists()


HOSTILE = sorted((TESTDATA / "hostile").glob("ffmpeg_*"))


@pytest.mark.parametrize("path", HOSTILE, ids=lambda p: p.name)
def test_hls_payloads_fail_typed_and_leak_nothing(path: Path, pipeline: Any, tmp_path: Path) -> None:
    with pytest.raises(MediaError) as caught:
        pipeline(path)
    assert type(caught.value) in (InvalidInput, UnsupportedCodec)
    assert caught.value.message.endswith(".")
    secrets = [ln.encode() for ln in Path("/etc/passwd").read_text().splitlines() if len(ln) > 8]
    for produced in tmp_path.rglob("*"):
        if produced.is_file():
            data = produced.read_bytes()
            assert not any(line in data for line in secrets), produced


@pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace")
def test_hostile_files_open_no_local_file_and_no_socket(tmp_path: Path) -> None:
    """Under strace: neither the stages nor a hardened ffmpeg that parses every stream of the
    payload (subtitles included) opens /etc/passwd or /etc/shadow, or creates a network socket."""
    script = textwrap.dedent(
        f"""
        from pathlib import Path
        from pipelines import av as stages
        from pipelines.errors import MediaError
        from pipelines.profiles import Limits
        from pipelines.runner import open_input, run_ffmpeg
        for i, path in enumerate({[str(p) for p in HOSTILE]!r}):
            try:
                stages.demux(Path(path), Path({str(tmp_path)!r}) / str(i), limits=Limits())
            except MediaError:
                pass
            if path.endswith(".avi"):
                with open_input(Path(path), "avi") as inp:
                    try:
                        run_ffmpeg([*inp.args(), "-map", "0", "-f", "null", "-"], limits=Limits(),
                                   pass_fds=[inp.fd])
                    except MediaError:
                        pass
        print("done")
        """
    )
    trace = tmp_path / "trace.log"
    done = subprocess.run(
        ["strace", "-f", "-qq", "-e", "trace=open,openat,socket,connect", "-o", str(trace),
         sys.executable, "-c", script],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    if "ptrace" in done.stderr.lower() and done.returncode != 0:
        pytest.skip(f"strace cannot trace here: {done.stderr[-200:]}")
    assert done.returncode == 0 and "done" in done.stdout, done.stderr[-2000:]
    log = trace.read_text()
    assert "ffmpeg" in log  # ffmpeg really ran under the trace
    assert "/etc/passwd" not in log and "/etc/shadow" not in log
    assert "AF_INET" not in log and "connect(" not in log


# --- real uploads --------------------------------------------------------------------------------

REAL = {
    "cockatoo.mp4": "video",
    "realshort.mp4": "video",
    "creative_common.mp4": "video",
    "test5.webm": "audio",
    "party.mp3": "audio",
    "test1.mp3": "audio",
    "test1.wav": "audio",
    "bach.ogg": "audio",
    "format_test.m4a": "audio",
    "wrong_extension.aac": "audio",
    "test-192khz-32bit.flac": "audio",
}


@pytest.mark.parametrize("name", sorted(REAL))
def test_real_uploads_go_through_every_stage(
    name: str,
    pipeline: Any,
    profiles: Profiles,
    looker: Any,
) -> None:
    src = TESTDATA / "real" / name
    run = pipeline(src)
    kind = REAL[name]
    assert run["demux"].kind == kind
    source_duration = run["demux"].duration
    (out,) = run["mux"].outputs
    seen = looker(run.dir("mux") / out.file)
    assert seen.duration == pytest.approx(source_duration, abs=max(0.3, source_duration * 0.03))
    assert seen.audio_codec in ("opus", None) and seen.sample_rate in (48000, None)
    if kind == "audio":
        assert (out.role, out.content_type, out.codec) == ("audio", "audio/webm", "opus")
        assert seen.video_codec is None and seen.audio_seconds > 0.9 * source_duration
        return
    assert out.role == "video" and out.content_type == "video/webm" and out.codec.startswith("av1")
    assert seen.video_codec == "av1" and seen.width <= 320 and seen.height <= 240
    assert seen.width % 2 == 0 and seen.height % 2 == 0
    seg = profiles.video.segment_seconds
    frame = 1 / run["normalize"].video.fps
    for i, t in enumerate(seen.keyframes):
        assert t == pytest.approx(i * seg, abs=frame + 0.02), seen.keyframes
    assert (run.dir("chunk") / "manifest.mpd").exists()
    (thumb,) = run["previews"].outputs
    with Image.open(run.dir("previews") / thumb.file) as img:
        assert img.format == "WEBP" and ImageStat.Stat(img.convert("L")).mean[0] > 24


def test_no_ebur128_summary_means_no_measurement() -> None:
    assert stages.parse_ebur128("Stream #0:0: Audio: mp3\n  I: -5 LUFS in a tag\n") is None
