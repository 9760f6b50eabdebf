"""Thumbnails are a frame of the video: compared with the source frame at the same time, decoded
independently by PyAV (structural similarity of the luma at thumbnail size, and the colour cast
over 16x9 areas), for every real sample, every common pixel format, and the shapes that used to
fail the item: one still frame over long audio, a single frame, a clip shorter than a second."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from pipelines import av as stages
from pipelines.profiles import Profiles
from tests.media import colour_difference, source_frame, ssim

REAL = Path(__file__).resolve().parents[3] / "shared" / "testdata" / "real"

# Measured: the right frame scores SSIM 0.95-0.99 and a colour difference of 1-4 after WebP;
# the neighbouring frames of moving video score under 0.7; cockatoo's solid green one 0.45 and 104.
MIN_SSIM = 0.85
MAX_COLOUR = 8.0


def _thumbnail(src: Path, tmp: Path, profiles: Profiles) -> tuple[stages.PreviewResult, Image.Image]:
    demuxed = stages.demux(src, tmp / "demux", limits=profiles.limits)
    result = stages.previews(demuxed, tmp / "demux", tmp / "previews", profiles=profiles, limits=profiles.limits)
    (out,) = result.outputs
    with Image.open(tmp / "previews" / out.file) as img:
        assert img.format == "WEBP" and img.size == (out.width, out.height)
        return result, img.convert("RGB")


def _assert_is_the_frame(src: Path, result: stages.PreviewResult, thumb: Image.Image) -> None:
    assert result.at is not None
    reference = source_frame(src, result.at)
    assert (thumb.width >= thumb.height) == (reference.width >= reference.height), "orientation"
    score, cast = ssim(thumb, reference), colour_difference(thumb, reference)
    assert score >= MIN_SSIM and cast <= MAX_COLOUR, (result.at, score, cast)


@pytest.mark.parametrize("name", ["cockatoo.mp4", "realshort.mp4", "creative_common.mp4"])  # test5.webm: sound only
def test_every_real_video_gets_a_frame_of_itself(name: str, profiles: Profiles, tmp_path: Path) -> None:
    """cockatoo.mp4 is H.264 4:4:4 from x264 142: decoded after a seek without the x264 version
    from its first frame's SEI, FFmpeg skips its 4:4:4 workaround and paints the frame green."""
    src = REAL / name
    result, thumb = _thumbnail(src, tmp_path, profiles)
    _assert_is_the_frame(src, result, thumb)


_SRC = ["-f", "lavfi", "-i", "testsrc2=size=320x240:rate=25:duration=3"]
_X264 = ["-c:v", "libx264", "-preset", "ultrafast", "-g", "25"]
_BT709 = "scale=out_color_matrix=bt709:out_range=tv,setparams=colorspace=bt709:color_primaries=bt709:color_trc=bt709"
PIXEL_FORMATS = {
    "yuv420p": [*_SRC, *_X264, "-pix_fmt", "yuv420p"],
    "yuv422p": [*_SRC, *_X264, "-pix_fmt", "yuv422p"],
    "yuv444p": [*_SRC, *_X264, "-pix_fmt", "yuv444p"],
    "yuv420p10-hevc": [*_SRC, "-c:v", "libx265", "-x265-params", "log-level=error:keyint=25", "-pix_fmt",
                       "yuv420p10le"],
    "yuv422p10-prores": [*_SRC, "-c:v", "prores_ks", "-profile:v", "2", "-pix_fmt", "yuv422p10le", "-f", "mov"],
    "full-range-mjpeg": [*_SRC, "-c:v", "mjpeg", "-pix_fmt", "yuvj420p", "-q:v", "3", "-f", "avi"],
    "bt709-tagged": [*_SRC, "-vf", _BT709, *_X264, "-pix_fmt", "yuv420p"],
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(PIXEL_FORMATS))
def test_thumbnail_of_every_pixel_format_is_the_frame(
    name: str, media: Any, profiles: Profiles, tmp_path: Path
) -> None:
    src = media.make(f"thumb-{name}.mkv", PIXEL_FORMATS[name])
    result, thumb = _thumbnail(src, tmp_path, profiles)
    assert thumb.size == (160, 120)
    _assert_is_the_frame(src, result, thumb)


def test_thumbnail_of_a_portrait_phone_video_is_upright(rotated_clip: Path, profiles: Profiles, tmp_path: Path) -> None:
    result, thumb = _thumbnail(rotated_clip, tmp_path, profiles)
    assert thumb.size == (160, 212)  # 320x240 shown turned: 240x320, scaled to the thumbnail's width
    _assert_is_the_frame(rotated_clip, result, thumb)


def test_one_still_frame_over_long_audio_gets_that_frame(media: Any, profiles: Profiles, tmp_path: Path) -> None:
    """A podcast: one picture, then 12 s of sound. Every try a third of the way in found no frame."""
    cover = media.make("thumb-cover.png", ["-f", "lavfi", "-i", "smptebars=size=320x240", "-frames:v", "1"])
    podcast = media.make(
        "thumb-podcast.mp4",
        ["-i", str(cover), "-f", "lavfi", "-i", "sine=duration=12", "-map", "0:v", "-map", "1:a",
         "-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p", "-c:a", "aac"],
    )  # fmt: skip
    result, thumb = _thumbnail(podcast, tmp_path, profiles)
    assert result.at == 0.0
    _assert_is_the_frame(podcast, result, thumb)
    with Image.open(cover) as original:
        assert ssim(thumb, original.convert("RGB")) >= MIN_SSIM


@pytest.mark.parametrize("frames", [1, 2, 7])
def test_very_short_clips_get_a_thumbnail(frames: int, media: Any, profiles: Profiles, tmp_path: Path) -> None:
    src = media.make(
        f"thumb-{frames}-frames.mp4",
        ["-f", "lavfi", "-i", "testsrc2=size=320x240:rate=25", "-frames:v", str(frames),
         "-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p"],
    )  # fmt: skip
    result, thumb = _thumbnail(src, tmp_path, profiles)
    _assert_is_the_frame(src, result, thumb)


def test_no_decodable_frame_means_no_thumbnail_not_a_failed_item(
    media: Any, profiles: Profiles, tmp_path: Path
) -> None:
    """The thumbnail is the least of the outputs: without one the video still plays."""
    clip = media.make("thumb-to-break.mkv", [*_SRC, *_X264, "-pix_fmt", "yuv420p"])
    demuxed = stages.demux(clip, tmp_path / "demux", limits=profiles.limits)
    streams = tmp_path / "demux" / demuxed.file
    # The headers stay, every picture goes (as if the disk had lost them since decode checked).
    streams.write_bytes(streams.read_bytes()[:600])
    result = stages.previews(demuxed, tmp_path / "demux", tmp_path / "previews", profiles=profiles,
                             limits=profiles.limits)  # fmt: skip
    assert result.outputs == ()
