"""No needless growth: a lossy source never comes out bigger than it went in. Opus is not given
more bits than the source had (a 64 kb/s MP3 memo of 240 KB came out as a 538 KB Opus), and the
AV1 of a small, already efficient video is capped by the source's bitrate."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import av
import pytest

from pipelines.profiles import Profiles

# Speech-like: pink noise under 3.5 kHz with a syllable rhythm, so Opus has work to do (a pure
# tone would come out small at any bitrate and prove nothing).
_VOICE = (
    "anoisesrc=color=pink:amplitude=0.25:sample_rate={rate}:duration={seconds},lowpass=f=3500,"
    "volume='0.6+0.4*sin(2*PI*3*t)':eval=frame"
)


def _voice(media: Any, name: str, codec: list[str], *, seconds: int = 20, rate: int = 44100, mono: bool = True) -> Path:
    layout = ["-ac", "1"] if mono else ["-ac", "2"]
    return media.make(name, ["-f", "lavfi", "-i", _VOICE.format(rate=rate, seconds=seconds), *layout, *codec])


def _opus(path: Path) -> tuple[int, int, float]:
    with av.open(str(path)) as ct:
        stream = ct.streams.audio[0]
        samples = sum(f.samples for f in ct.decode(stream))
        return stream.codec_context.layout.nb_channels, stream.codec_context.sample_rate, samples / 48000


def test_a_64k_mp3_voice_memo_comes_out_smaller_and_mono(media: Any, pipeline: Any) -> None:
    src = _voice(media, "memo-64k.mp3", ["-c:a", "libmp3lame", "-b:a", "64k"])
    run = pipeline(src)
    plan = run["normalize"].audio
    assert plan.channels == 1 and plan.bitrate <= 64_000
    (out,) = run["mux"].outputs
    channels, rate, seconds = _opus(run.dir("mux") / out.file)
    assert (channels, rate) == (1, 48000) and seconds == pytest.approx(20.0, abs=0.1)
    assert out.bytes * 8 / seconds <= 64_000  # the Opus, container included, under the MP3's rate
    assert out.bytes <= src.stat().st_size, (out.bytes, src.stat().st_size)


@pytest.mark.parametrize(
    ("name", "codec", "mono"),
    [
        ("stereo-96k.mp3", ["-c:a", "libmp3lame", "-b:a", "96k"], False),
        ("stereo-96k.m4a", ["-c:a", "aac", "-b:a", "96k"], False),
        ("voice-32k.opus", ["-c:a", "libopus", "-b:a", "32k"], True),
        ("voice-12k.amr", ["-c:a", "libopencore_amrnb", "-ar", "8000", "-b:a", "12.2k"], True),
    ],
)
def test_lossy_audio_never_grows(name: str, codec: list[str], mono: bool, media: Any, pipeline: Any) -> None:
    src = _voice(media, name, codec, rate=8000 if name.endswith(".amr") else 44100, mono=mono)
    run = pipeline(src)
    (out,) = run["mux"].outputs
    assert out.bytes <= src.stat().st_size, (out.bytes, src.stat().st_size)
    assert _opus(run.dir("mux") / out.file)[0] == (1 if mono else 2)


def test_lossless_audio_gets_the_full_bitrate(media: Any, pipeline: Any) -> None:
    src = _voice(media, "voice.flac", ["-c:a", "flac"], seconds=4)
    run = pipeline(src)
    plan = run["normalize"].audio
    assert (plan.channels, plan.bitrate, plan.capped) == (1, 64_000, False)  # 128k per stereo pair


def test_a_small_efficient_video_is_capped_by_its_own_bitrate(
    media: Any, profiles: Profiles, stage_runner: Any, tmp_path: Path
) -> None:
    src = media.make(
        "efficient.mp4",
        ["-f", "lavfi", "-i", "testsrc2=size=320x240:rate=25:duration=4", "-c:v", "libx264", "-preset", "medium",
         "-crf", "28", "-pix_fmt", "yuv420p"],
    )  # fmt: skip
    with av.open(str(src)) as ct:
        source_rate = ct.streams.video[0].bit_rate
    # A CRF that spends more than the source did: what a high-quality profile does to a small file.
    generous = dataclasses.replace(profiles, video=dataclasses.replace(profiles.video, crf=22))
    uncapped = dataclasses.replace(generous, video=dataclasses.replace(generous.video, source_bitrate_share=0.0))
    free = stage_runner(src, tmp_path / "free", uncapped)
    capped = stage_runner(src, tmp_path / "capped", generous)
    assert capped["normalize"].video.max_bitrate == int(source_rate * 0.8) // 1000 * 1000
    size = src.stat().st_size
    assert free["mux"].outputs[0].bytes > size  # the growth the cap prevents
    assert capped["mux"].outputs[0].bytes <= size, (capped["mux"].outputs[0].bytes, size)
