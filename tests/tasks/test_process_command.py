"""``manage.py process`` on every real sample: each ends Completed with outputs a user can check."""

from __future__ import annotations

import io
import xml.etree.ElementTree as ET
from pathlib import Path

import av
import pillow_heif
import pytest
from PIL import Image, ImageOps, ImageStat

from tests.conftest import TESTDATA, run_process_command

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

    if report["kind"] == "video":
        (video,) = _outputs(report, "video")
        fmt, codecs = _streams(video["path"])
        assert "webm" in fmt and codecs in (["libdav1d", "opus"], ["av1", "opus"], ["libdav1d", "libopus"])
        (thumb,) = _outputs(report, "thumbnail")
        with Image.open(thumb["path"]) as img:
            assert img.format == "WEBP"
            assert ImageStat.Stat(img.convert("L")).mean[0] > 16, "thumbnail is black"
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
