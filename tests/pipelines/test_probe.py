"""Probing: what the headers say, cover art is not video, rotation, limits in plain words."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from pipelines.errors import InvalidInput, TooLarge
from pipelines.probe import MediaInfo, StreamInfo, check_limits, probe
from pipelines.profiles import Limits
from pipelines.results import from_json, to_json
from pipelines.sniff import sniff

MP4 = "mov,mp4,m4a,3gp,3g2,mj2"
TESTDATA = Path(__file__).resolve().parents[3] / "shared" / "testdata"


def test_probe_reads_streams_of_a_clip(clip: Path, limits: Limits) -> None:
    info = probe(clip, limits=limits, ffmpeg_format=MP4)
    assert info.container == MP4
    assert info.duration == pytest.approx(4.0, abs=0.1)
    video, audio = info.video, info.audio
    assert video is not None and audio is not None
    assert (video.codec, video.width, video.height, video.fps, video.frame_rate) == (
        "h264",
        320,
        240,
        25.0,
        "25/1",
    )
    assert video.pix_fmt == "yuv420p" and video.rotation == 0 and not video.attached_pic
    assert (audio.codec, audio.sample_rate, audio.channels, audio.channel_layout) == ("aac", 44100, 1, "mono")
    assert from_json(MediaInfo, to_json(info)) == info  # results carry MediaInfo through JSON


def test_rotation_comes_from_the_display_matrix(rotated_clip: Path, limits: Limits) -> None:
    video = probe(rotated_clip, limits=limits, ffmpeg_format=MP4).video
    assert video is not None
    assert (video.width, video.height) == (320, 240)
    assert abs(video.rotation) == 90
    assert video.display_size == (240, 320)


def test_cover_art_is_not_a_video_stream(media: Any, limits: Limits) -> None:
    cover = media.make("cover.png", ["-f", "lavfi", "-i", "smptebars=size=200x200", "-frames:v", "1"])
    song = media.make(
        "with-cover.mp3",
        ["-f", "lavfi", "-i", "sine=duration=2", "-i", str(cover), "-map", "0", "-map", "1",
         "-c:a", "libmp3lame", "-c:v", "png", "-disposition:v", "attached_pic", "-id3v2_version", "3"],
    )  # fmt: skip
    info = probe(song, limits=limits, ffmpeg_format="mp3")
    assert any(s.kind == "video" and s.attached_pic for s in info.streams)
    assert info.video is None
    assert info.audio is not None and info.audio.codec == "mp3"


@pytest.mark.parametrize(
    ("name", "codec", "rate"),
    [
        ("test-192khz-32bit.flac", "flac", 192000),
        ("party.mp3", "mp3", 44100),
        ("wrong_extension.aac", "aac", 44100),
        ("bach.ogg", "flac", 44100),
    ],
)
def test_probe_real_audio(name: str, codec: str, rate: int, limits: Limits) -> None:
    path = TESTDATA / "real" / name
    info = probe(path, limits=limits, ffmpeg_format=sniff(path).ffmpeg_format)
    assert info.video is None
    assert info.audio is not None and (info.audio.codec, info.audio.sample_rate) == (codec, rate)


def test_garbage_is_invalid_input(tmp_path: Path, limits: Limits) -> None:
    junk = tmp_path / "junk.mkv"
    junk.write_bytes(b"\x1a\x45\xdf\xa3" + bytes(range(256)) * 40)
    with pytest.raises(InvalidInput) as caught:
        probe(junk, limits=limits, ffmpeg_format="matroska,webm")
    assert "damaged" in caught.value.message


def test_hls_payload_in_an_avi_shows_no_media_stream(limits: Limits) -> None:
    path = TESTDATA / "hostile" / "ffmpeg_hls_read_passwd.avi"
    info = probe(path, limits=limits, ffmpeg_format="avi")
    assert info.video is None and info.audio is None


def _info(duration: float = 60.0, **video: Any) -> MediaInfo:
    base = StreamInfo(index=0, kind="video", codec="h264", width=1920, height=1080, fps=30.0)
    stream = replace(base, **video)
    audio = StreamInfo(index=1, kind="audio", codec="aac", sample_rate=48000, channels=2)
    return MediaInfo(container=MP4, duration=duration, bit_rate=None, streams=(stream, audio))


def test_limits_pass_an_ordinary_file() -> None:
    check_limits(_info(), Limits())


@pytest.mark.parametrize(
    ("info", "words"),
    [
        (_info(width=8000, height=6000), "8000x6000 pixels"),
        (_info(width=3840, height=2160, fps=120.0), "frames per second"),
        (_info(duration=5 * 3600.0), "5 h 00 min long"),
        (MediaInfo(MP4, 10.0, None, (StreamInfo(0, "audio", "pcm_s16le", channels=32, sample_rate=48000),)),
         "32 channels"),
        (MediaInfo(MP4, 10.0, None, (StreamInfo(0, "audio", "pcm_s16le", channels=2, sample_rate=768000),)),
         "768 kHz"),
    ],
)  # fmt: skip
def test_limits_refuse_with_a_sentence(info: MediaInfo, words: str) -> None:
    with pytest.raises(TooLarge) as caught:
        check_limits(info, Limits())
    assert words in caught.value.message
    assert caught.value.message.endswith(".")


def test_cover_art_size_does_not_count_as_video_pixels() -> None:
    art = StreamInfo(0, "video", "mjpeg", width=10000, height=10000, attached_pic=True)
    audio = StreamInfo(1, "audio", "mp3", sample_rate=44100, channels=2)
    check_limits(MediaInfo("mp3", 100.0, None, (art, audio)), Limits())


def test_probe_runs_in_a_child_under_the_wall_limit(clip: Path) -> None:
    """A probe must not be able to hang the worker: the child is killed at probe_wall_seconds."""
    from pipelines.errors import ProcessingTimeout

    with pytest.raises(ProcessingTimeout):
        probe(clip, limits=Limits(probe_wall_seconds=0.0001), ffmpeg_format=MP4)
