"""``manage.py process`` on every real sample, and on files made here of every kind people have
(issue 15): each ends Completed with outputs a user can check, or refused with a sentence that
names the format."""

from __future__ import annotations

import io
import xml.etree.ElementTree as ET
from pathlib import Path

import av
import pillow_heif
import pytest
from PIL import Image, ImageOps

from tests.conftest import TESTDATA, run_process_command, wait_for
from tests.media import (
    best_matching_frame,
    colour_difference,
    hdr_clip_args,
    make_media,
    quicktime_without_ftyp,
    source_frame,
    ssim,
    tone_mapped_frame,
    with_id3,
)

pillow_heif.register_heif_opener()
REAL = sorted((TESTDATA / "real").iterdir())
MPD = "{urn:mpeg:dash:schema:mpd:2011}"


@pytest.fixture(scope="module")
def reports(tmp_path_factory) -> dict[str, dict]:
    data = tmp_path_factory.mktemp("cli-data")
    proc, by_name = run_process_command(REAL, data)
    failed = [r for r in by_name.values() if r["status"] != "Completed"]
    assert proc.returncode == 0, (proc.returncode, failed, proc.stderr[-3000:])
    return by_name


def _outputs(report: dict, role: str) -> list[dict]:
    return [o for o in report["outputs"] if o["role"] == role]


def _streams(path: str) -> tuple[str, list[str]]:
    with av.open(path) as container:
        return container.format.name, sorted(s.codec_context.codec.name for s in container.streams)


@pytest.mark.parametrize("sample", [p.name for p in REAL])
def test_every_real_sample_completes_with_valid_outputs(reports, sample):
    report = reports[sample]
    assert report["status"] == "Completed" and report["error"] is None
    src = TESTDATA / "real" / sample
    for out in report["outputs"]:
        assert Path(out["path"]).stat().st_size == out["bytes"] > 0

    if report["kind"] in ("video", "audio"):
        # No needless growth: every real sample comes out smaller than it went in (lossy sources
        # included: a 64 kb/s MP3 became twice its size at 128 kb/s Opus, cockatoo.mp4 1.23x).
        (main,) = _outputs(report, report["kind"])
        assert main["bytes"] <= src.stat().st_size, (main["bytes"], src.stat().st_size)
    if report["kind"] == "video":
        (video,) = _outputs(report, "video")
        fmt, codecs = _streams(video["path"])
        assert "webm" in fmt and codecs in (["libdav1d", "opus"], ["av1", "opus"], ["libdav1d", "libopus"])
        (thumb,) = _outputs(report, "thumbnail")
        with Image.open(thumb["path"]) as img:
            assert img.format == "WEBP"
            # A frame of the source, with its colours (cockatoo.mp4's was solid green).
            at, score, cast = best_matching_frame(src, img.convert("RGB"))
            assert score >= 0.85 and cast <= 8, (at, score, cast)
        _check_dash(_outputs(report, "manifest")[0]["path"], video["duration"])
    elif report["kind"] == "audio":
        (audio,) = _outputs(report, "audio")
        fmt, codecs = _streams(audio["path"])
        assert "webm" in fmt and codecs in (["opus"], ["libopus"])
        assert audio["content_type"] == "audio/webm"
    else:
        assert report["kind"] == "image"
        with Image.open(src) as original:
            upright = ImageOps.exif_transpose(original).size
        for role, fmt in (("image_avif", "AVIF"), ("image_webp", "WEBP")):
            (out,) = _outputs(report, role)
            with Image.open(out["path"]) as img:
                assert img.format == fmt
                # Orientation applied: the output has the upright aspect of the source.
                assert (img.width >= img.height) == (upright[0] >= upright[1])
                exif = img.getexif()
                assert 0x8825 not in exif, "GPS info leaked into the output"
                assert not img.info.get("xmp")


def test_wrong_extension_is_recognised_by_content(reports):
    assert reports["wrong_extension.aac"]["kind"] == "audio"


def _check_dash(manifest: str, duration: float) -> None:
    """The manifest's segments, fetched in order after their init segment, decode end to end."""
    root = ET.parse(manifest).getroot()
    base = Path(manifest).parent
    for rep in root.iter(f"{MPD}Representation"):
        template = rep.find(f"{MPD}SegmentTemplate")
        count = sum(1 + int(s.get("r", 0)) for s in template.iter(f"{MPD}S"))
        rid = rep.get("id")
        init = base / template.get("initialization").replace("$RepresentationID$", rid)
        media = template.get("media").replace("$RepresentationID$", rid)
        parts = [init] + [
            base / media.replace("$Number%05d$", f"{n:05d}") for n in range(int(template.get("startNumber")), count + 1)
        ]
        blob = b"".join(p.read_bytes() for p in parts)
        with av.open(io.BytesIO(blob)) as container:
            stream = container.streams[0]
            last = 0.0
            for frame in container.decode(stream):
                assert frame.time >= last - 0.001, "segments out of order"
                last = frame.time
        assert last == pytest.approx(duration, abs=max(1.0, duration * 0.05))


# --- files made here: the classes of issue 15 ------------------------------------------------------

_V = ["-f", "lavfi", "-i", "testsrc2=size=160x120:rate=25:duration=2"]
_A = ["-f", "lavfi", "-i", "sine=frequency=440:sample_rate=48000:duration=2"]
_H264 = ["-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p"]
# name: ffmpeg arguments, expected kind, expected duration
MADE: dict[str, tuple[list[str], str, float]] = {
    "camcorder.m2ts": ([*_V, *_A, *_H264, "-c:a", "ac3", "-f", "mpegts", "-mpegts_m2ts_mode", "1"], "video", 2.0),
    "broadcast.ts": ([*_V, *_A, "-c:v", "mpeg2video", "-c:a", "mp2", "-f", "mpegts"], "video", 2.0),
    "dvd.vob": ([*_V, *_A, "-c:v", "mpeg2video", "-c:a", "ac3", "-f", "vob"], "video", 2.0),
    "system.mpg": ([*_V, *_A, "-c:v", "mpeg1video", "-c:a", "mp2", "-f", "mpeg"], "video", 2.0),
    "phone.3gp": (["-f", "lavfi", "-i", "testsrc2=size=176x144:rate=15:duration=2",
                   "-f", "lavfi", "-i", "sine=frequency=440:sample_rate=8000:duration=2",
                   "-c:v", "h263", "-c:a", "libopencore_amrnb", "-ar", "8000", "-ac", "1"], "video", 2.0),
    "flash.flv": ([*_V, *_A, "-c:v", "flv", "-c:a", "libmp3lame", "-ar", "44100"], "video", 2.0),
    "take.aiff": ([*_A, "-c:a", "pcm_s16be", "-f", "aiff"], "audio", 2.0),
    "take.wv": ([*_A, "-c:a", "wavpack"], "audio", 2.0),
    "movie.ac3": ([*_A, "-c:a", "ac3"], "audio", 2.0),
    "memo.mp3": (["-f", "lavfi", "-i", "anoisesrc=color=pink:amplitude=0.25:duration=10,lowpass=f=3500,"
                  "volume='0.6+0.4*sin(2*PI*3*t)':eval=frame", "-ac", "1", "-c:a", "libmp3lame", "-b:a", "64k"],
                 "audio", 10.0),
}  # fmt: skip
REFUSED: dict[str, tuple[list[str], str, str]] = {
    "nellymoser.flv": (
        [*_V, *_A, "-c:v", "flv", "-c:a", "nellymoser", "-ar", "44100"],
        "unsupported_codec",
        "The audio in this Flash Video (FLV) file is encoded with nellymoser, which we do not support.",
    ),
}


def _made_files(root: Path) -> dict[str, Path]:
    files = {name: make_media(root / name, args) for name, (args, _, _) in MADE.items()}
    files |= {name: make_media(root / name, args) for name, (args, _, _) in REFUSED.items()}
    mov = make_media(root / "plain.mov", [*_V, *_A, *_H264, "-c:a", "aac", "-f", "mov"])
    for first in ("mdat", "wide"):
        name = f"{first}-first.mov"
        files[name] = quicktime_without_ftyp(mov, root / name, first=first)
    flac = make_media(root / "plain.flac", [*_A, "-c:a", "flac"])
    adts = make_media(root / "plain.aac", [*_A, "-c:a", "aac", "-f", "adts"])
    # Tags longer than the 4096 bytes the web sniffs, as cover art makes them.
    files["tagged.flac"] = with_id3(flac, root / "tagged.flac", padding=30_000)
    files["tagged.aac"] = with_id3(adts, root / "tagged.aac", padding=30_000)
    # One still picture over a podcast's sound; a clip shorter than a second.
    cover = make_media(root / "cover.png", ["-f", "lavfi", "-i", "smptebars=size=320x240", "-frames:v", "1"])
    files["podcast.mp4"] = make_media(
        root / "podcast.mp4",
        ["-i", str(cover), "-f", "lavfi", "-i", "sine=duration=12", "-map", "0:v", "-map", "1:a",
         "-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p", "-c:a", "aac"],
    )  # fmt: skip
    files["blink.mp4"] = make_media(
        root / "blink.mp4",
        ["-f", "lavfi", "-i", "testsrc2=size=160x120:rate=25:duration=0.4", "-f", "lavfi", "-i", "sine=duration=0.4",
         "-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p", "-c:a", "aac"],
    )  # fmt: skip
    # 60 fps, a phone held upright (a rotation matrix), HDR10 and HLG, a WebM cut off mid-upload.
    files["sixty.mp4"] = make_media(
        root / "sixty.mp4",
        ["-f", "lavfi", "-i", "testsrc2=size=160x120:rate=60:duration=2", *_A, *_H264, "-c:a", "aac"],
    )
    plain = make_media(root / "landscape.mp4", [*_V, *_A, *_H264, "-c:a", "aac"])
    files["portrait.mp4"] = make_media(
        root / "portrait.mp4", ["-display_rotation:v:0", "90", "-i", str(plain), "-c", "copy"]
    )
    for name, transfer in (("hdr10.mp4", "smpte2084"), ("hlg.mp4", "arib-std-b67")):
        hdr = make_media(root / f"video-{name}", hdr_clip_args(transfer, size="320x180"))
        files[name] = make_media(root / name, ["-i", str(hdr), *_A, "-map", "0:v", "-map", "1:a", "-c:v", "copy",
                                               "-c:a", "aac"])  # fmt: skip
    whole = make_media(
        root / "whole.webm",
        ["-f", "lavfi", "-i", "testsrc2=size=160x120:rate=25:duration=4", "-f", "lavfi", "-i", "sine=duration=4",
         "-c:v", "libvpx-vp9", "-deadline", "realtime", "-cpu-used", "8", "-g", "25", "-c:a", "libopus"],
    )  # fmt: skip
    files["cut-off.webm"] = root / "cut-off.webm"
    files["cut-off.webm"].write_bytes(whole.read_bytes()[: whole.stat().st_size * 6 // 10])
    # A HEIF image sequence with no primary image (a burst): its first picture is the image.
    files["burst.heic"] = make_media(
        root / "burst.heic",
        ["-f", "lavfi", "-i", "testsrc2=size=128x96:rate=5:duration=1", "-c:v", "libx265", "-x265-params",
         "log-level=error", "-pix_fmt", "yuv420p", "-tag:v", "hvc1", "-brand", "msf1", "-f", "mp4"],
    )  # fmt: skip
    return files


EXPECTED_MADE = {n: (kind, seconds) for n, (_, kind, seconds) in MADE.items()} | {
    "mdat-first.mov": ("video", 2.0),
    "wide-first.mov": ("video", 2.0),
    "tagged.flac": ("audio", 2.0),
    "tagged.aac": ("audio", 2.0),
    "burst.heic": ("image", 0.0),
    "podcast.mp4": ("video", 12.0),
    "blink.mp4": ("video", 0.4),
    "sixty.mp4": ("video", 2.0),
    "portrait.mp4": ("video", 2.0),
    "hdr10.mp4": ("video", 2.0),
    "hlg.mp4": ("video", 2.0),
    "cut-off.webm": ("video", 0.0),  # as far as it decodes: checked below
}
# What a viewer would notice, per file: frame rate, width x height as shown, colour signalling.
FPS = {"sixty.mp4": 60.0, "phone.3gp": 15.0}
SHOWN = {"portrait.mp4": (120, 160), "hdr10.mp4": (320, 180), "hlg.mp4": (320, 180)}
HDR_SOURCES = {"hdr10.mp4", "hlg.mp4"}


# Session-wide, not module-wide: pytest-django runs the worker test (transactional) among the
# other modules' transactional tests and this module's others later, so a module fixture was
# torn down in between and the files made and processed twice (~15 s). Nothing here is changed
# by a test: the files are read, the reports compared.
@pytest.fixture(scope="session")
def made(tmp_path_factory) -> tuple[dict[str, Path], dict[str, dict]]:
    root = tmp_path_factory.mktemp("made")
    files = _made_files(root)
    _, by_name = run_process_command(list(files.values()), tmp_path_factory.mktemp("made-data"))
    return files, by_name


def _decoded(path: str) -> dict:
    """What a player gets from an output: codecs, rate, size, duration, by decoding every frame."""
    with av.open(path) as ct:
        found: dict = {"duration": ct.duration / 1e6 if ct.duration else None}
        if ct.streams.video:
            vs = ct.streams.video[0]
            frames = [f.time for f in ct.decode(vs)]
            cc = vs.codec_context
            found.update(video=cc.codec.canonical_name, frames=len(frames), width=cc.width, height=cc.height,
                         fps=float(vs.average_rate or vs.guessed_rate or 0), last=max(frames),
                         colour=(cc.color_primaries, cc.color_trc, cc.colorspace, cc.color_range))  # fmt: skip
    with av.open(path) as ct:
        if ct.streams.audio:
            ac = ct.streams.audio[0].codec_context
            samples = sum(f.samples for f in ct.decode(audio=0))
            found.update(
                audio=ac.codec.canonical_name, channels=ac.layout.nb_channels, seconds=samples / ac.sample_rate
            )
    return found


@pytest.mark.parametrize("name", sorted(EXPECTED_MADE))
def test_every_kind_of_file_people_have_completes(made, name):
    files, reports = made
    _check_made(files, name, reports[name])


@pytest.mark.worker
def test_the_worker_converts_every_kind_of_file_as_the_command_does(made, celery_worker, make_item):
    """The same files through the real worker (Celery tasks on both queues, the stage files in
    storage): the same outcome per file, checked the same way."""
    from django.core.files.storage import default_storage

    from media_app.services import media_processing_start

    files, _ = made
    items = {name: make_item(files[name]) for name in [*EXPECTED_MADE, *REFUSED]}
    for item in items.values():
        assert media_processing_start(item=item)

    def all_final() -> bool:
        for item in items.values():
            item.refresh_from_db()
        return all(item.is_final for item in items.values())

    wait_for(all_final, timeout=300, what="every made file to finish on the worker")
    problems = {}
    for name, item in items.items():
        report = {
            "status": item.status,
            "kind": item.kind,
            "error": {"code": item.error_code, "message": item.error_message} if item.error_code else None,
            "outputs": [
                {"role": r.role, "path": default_storage.path(r.storage_key), "bytes": r.bytes}
                for r in item.renditions.all()
            ],
        }
        try:
            if name in REFUSED:
                assert (report["status"], report["error"]) == (
                    "Failed",
                    {"code": REFUSED[name][1], "message": REFUSED[name][2]},
                )
            else:
                _check_made(files, name, report)
        except AssertionError as exc:
            problems[name] = f"{report['status']} {report['error']}: {exc}"
    assert not problems, problems


def _check_made(files: dict[str, Path], name: str, report: dict) -> None:
    """What a viewer would check of one made file's outputs (``report``: status, error, kind and
    outputs with their paths, as ``manage.py process --json`` prints them)."""
    kind, duration = EXPECTED_MADE[name]
    assert (report["status"], report["error"], report["kind"]) == ("Completed", None, kind)
    if kind == "image":
        for role in ("image_avif", "image_webp"):
            (out,) = _outputs(report, role)
            with Image.open(out["path"]) as img:
                assert img.size == (128, 96) and getattr(img, "n_frames", 1) == 1
        return
    (main,) = _outputs(report, kind)
    got = _decoded(main["path"])
    if name == "cut-off.webm":  # processed as far as it decodes, sound and picture alike
        assert 1.0 <= got["last"] <= 4.0 and got["seconds"] == pytest.approx(got["last"], abs=0.3)
        duration = got["seconds"]
    if kind == "video":
        assert got["video"] == "av1" and got["audio"] == "opus"
        assert got["fps"] == pytest.approx(FPS.get(name, 25.0), abs=0.01)
        if name != "podcast.mp4":  # one picture, shown for all of the sound
            assert got["frames"] >= duration * FPS.get(name, 25.0) - 2
            assert got["last"] == pytest.approx(duration, abs=0.2)
        assert (got["width"], got["height"]) == SHOWN.get(name, (got["width"], got["height"]))
        # 8-bit BT.709 (or BT.601 for SD) SDR, said in the file: never PQ (16) or HLG (18).
        assert got["colour"] in ((1, 1, 1, 1), (6, 6, 6, 1)), got["colour"]
        (thumb,) = _outputs(report, "thumbnail")
        with Image.open(thumb["path"]) as img:
            picture = img.convert("RGB")
        assert (picture.width < picture.height) == (got["width"] < got["height"])
        if name in HDR_SOURCES:
            # Compared with the source tone-mapped by ffmpeg apart from the pipeline, at 1 s.
            reference = tone_mapped_frame(files[name], 1.0, files[name].parent)
            assert ssim(source_frame(Path(main["path"]), 1.0), reference) >= 0.9
            assert colour_difference(source_frame(Path(main["path"]), 1.0), reference) <= 8
        else:
            at, score, cast = best_matching_frame(files[name], picture)
            assert score >= 0.85 and cast <= 8, (at, score, cast)
    else:
        assert "video" not in got and got["audio"] == "opus"
    if name == "memo.mp3":  # a 64 kb/s mono voice memo: mono, and not bigger
        assert got["channels"] == 1 and main["bytes"] <= files[name].stat().st_size
    assert got["seconds"] == pytest.approx(duration, abs=0.1)


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_a_refused_file_is_named(made, name):
    _, reports = made
    _, code, sentence = REFUSED[name]
    assert reports[name]["status"] == "Failed"
    assert reports[name]["error"] == {"code": code, "message": sentence}
