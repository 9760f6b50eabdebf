"""HDR video (PQ/HDR10 and HLG, BT.2020, 10-bit) comes out as SDR BT.709 that looks like the
source tone-mapped, and says so: an 8-bit output never carries PQ or HLG tags (the old output
kept them on 8-bit pictures that were never converted, and played washed out)."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import av
import pytest
from PIL import Image

from pipelines.runner import ffmpeg_exe
from tests.media import colour_difference, hdr_clip_args, source_frame, ssim, tone_mapped_frame

HDR = {
    # no mastering metadata (phones' HDR10 clips often carry none)
    "pq": ("smpte2084", ""),
    # HDR10 metadata: a 1000-nit mastering display, MaxCLL 1000
    "pq-metadata": (
        "smpte2084",
        "hdr10=1:max-cll=1000,400:master-display=G(13250,34500)B(7500,3000)R(34000,16000)WP(15635,16450)L(10000000,1)",
    ),
    # HLG, as every recent iPhone records by default
    "hlg": ("arib-std-b67", ""),
}
_SDR_TO_LINEAR = (
    "format=gbrpf32le,setparams=color_primaries=bt709:color_trc=bt709:colorspace=gbr:range=pc,"
    "zscale=t=linear:npl=100,zscale=p=2020,"
)


def _hdr_source(media: Any, name: str) -> Path:
    transfer, x265 = HDR[name]
    return media.make(f"hdr-{name}.mp4", hdr_clip_args(transfer, x265=x265))


def _tone_mapped_reference(src: Path, at: float, tmp: Path, *, peak: str) -> Image.Image:
    return tone_mapped_frame(src, at, tmp, peak=peak)


@pytest.mark.parametrize("name", sorted(HDR))
def test_hdr_becomes_sdr_bt709_that_looks_tone_mapped(name: str, media: Any, pipeline: Any, tmp_path: Path) -> None:
    src = _hdr_source(media, name)
    with av.open(str(src)) as ct:
        cc = ct.streams.video[0].codec_context
        assert (cc.color_primaries, cc.colorspace, cc.pix_fmt) == (9, 9, "yuv420p10le")
        assert cc.color_trc == (18 if name == "hlg" else 16)
    run = pipeline(src)
    assert run["normalize"].video.dynamic_range == ("hlg" if name == "hlg" else "pq")
    (out,) = run["mux"].outputs
    video = run.dir("mux") / out.file
    with av.open(str(video)) as ct:
        cc = ct.streams.video[0].codec_context
        # 8-bit BT.709 SDR, and tagged so: no PQ (16) or HLG (18) transfer on 8-bit pictures.
        assert (cc.pix_fmt, cc.color_primaries, cc.color_trc, cc.colorspace, cc.color_range) == ("yuv420p", 1, 1, 1, 1)
    # Without metadata the pipeline assumes a 1000-nit peak; with it, the metadata says 1000 nits.
    peak = ":peak=10" if name != "pq-metadata" else ""
    for at in (0.4, 1.4):
        reference = _tone_mapped_reference(src, at, tmp_path, peak=peak)
        got = source_frame(video, at)
        assert ssim(got, reference) >= 0.9
        assert colour_difference(got, reference) <= 6, at
    (thumb,) = run["previews"].outputs
    with Image.open(run.dir("previews") / thumb.file) as img:
        picture = img.convert("RGB")
    reference = _tone_mapped_reference(src, run["previews"].at, tmp_path, peak=peak)
    assert ssim(picture, reference) >= 0.85 and colour_difference(picture, reference) <= 8


def test_wide_gamut_sdr_is_converted_to_bt709(media: Any, pipeline: Any, tmp_path: Path) -> None:
    """BT.2020 primaries with an SDR transfer (10-bit SDR from some cameras): converted, not
    shown with BT.709 primaries as if nothing differed."""
    src = media.make(
        "wide-gamut.mp4",
        ["-f", "lavfi", "-i", "testsrc2=size=320x240:rate=25:duration=1",
         "-vf", _SDR_TO_LINEAR + "zscale=t=709:m=2020_ncl:r=limited,format=yuv420p10le",
         "-c:v", "libx265", "-x265-params", "log-level=error:colorprim=bt2020:colormatrix=bt2020nc:transfer=bt709"],
    )  # fmt: skip
    run = pipeline(src)
    assert run["normalize"].video.dynamic_range == "wide"
    (out,) = run["mux"].outputs
    video = run.dir("mux") / out.file
    with av.open(str(video)) as ct:
        cc = ct.streams.video[0].codec_context
        assert (cc.color_primaries, cc.color_trc, cc.colorspace) == (1, 1, 1)
    # ffmpeg's own conversion of the source to BT.709 is the reference (10 from testsrc2's PNG: the
    # 4:2:0 BT.2020 source loses that much); showing it without converting the gamut is 68 off.
    reference = tmp_path / "reference.png"
    subprocess.run([ffmpeg_exe(), "-v", "error", "-y", "-i", str(src), "-vf", "zscale=p=709:t=709:m=709:r=full,"
                    "format=rgb24", "-frames:v", "1", str(reference)], check=True)  # fmt: skip
    with Image.open(reference) as img:
        expected = img.convert("RGB")
    got = source_frame(video, 0.0)
    assert ssim(got, expected) >= 0.9 and colour_difference(got, expected) <= 4
