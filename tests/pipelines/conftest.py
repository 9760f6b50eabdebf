"""Shared fixtures for the pipeline tests: media made on the spot with ffmpeg's lavfi sources,
fast profiles, a stage-sequence runner and a prober that looks at outputs as a player would."""

from __future__ import annotations

import dataclasses
import io
import os
import select
import signal
import socket
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import av
import pytest

from pipelines.profiles import Limits, Profiles, ThumbnailProfile, VideoProfile
from pipelines.runner import ffmpeg_exe

TESTDATA = Path(__file__).resolve().parents[3] / "shared" / "testdata"
REAL = TESTDATA / "real"
HOSTILE = TESTDATA / "hostile"


# --- making media ------------------------------------------------------------------------------


class MediaFactory:
    """Writes test media once per session into a cache directory, by name."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def make(self, name: str, args: list[str]) -> Path:
        path = self.root / name
        if not path.exists():
            tmp = path.with_name(f".{path.name}")
            subprocess.run([ffmpeg_exe(), "-v", "error", "-y", *args, str(tmp)], check=True, timeout=120)
            tmp.rename(path)
        return path

    def video(
        self,
        name: str = "clip.mp4",
        *,
        seconds: float = 4,
        size: str = "320x240",
        rate: str = "25",
        audio: bool = True,
        source: str = "testsrc2",
        extra: tuple[str, ...] = (),
        keyint: int = 50,
    ) -> Path:
        args = ["-f", "lavfi", "-i", f"{source}=size={size}:rate={rate}:duration={seconds}"]
        if audio:
            args += ["-f", "lavfi", "-i", f"sine=frequency=440:sample_rate=44100:duration={seconds}"]
        args += ["-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p", "-g", str(keyint)]
        if audio:
            args += ["-c:a", "aac", "-shortest"]
        return self.make(name, [*args, *extra])

    def audio(
        self,
        name: str,
        *,
        seconds: float = 3,
        rate: int = 44100,
        codec: str = "libmp3lame",
        layout: str = "mono",
        extra: tuple[str, ...] = (),
    ) -> Path:
        src = f"sine=frequency=330:sample_rate={rate}:duration={seconds}"
        if layout != "mono":
            src += f",aformat=channel_layouts={layout}"
        return self.make(name, ["-f", "lavfi", "-i", src, "-c:a", codec, *extra])


@pytest.fixture(scope="session")
def media(tmp_path_factory: pytest.TempPathFactory) -> MediaFactory:
    return MediaFactory(tmp_path_factory.mktemp("media"))


@pytest.fixture(scope="session")
def clip(media: MediaFactory) -> Path:
    """4 s of 320x240 testsrc2 at 25 fps with a 440 Hz tone: H.264 + AAC in MP4."""
    return media.video()


@pytest.fixture(scope="session")
def rotated_clip(media: MediaFactory) -> Path:
    """A 320x240 clip whose display matrix says: show it turned 90 degrees (a phone held upright)."""
    plain = media.video("plain-for-rotation.mp4", seconds=2)
    return media.make("rotated.mp4", ["-display_rotation:v:0", "90", "-i", str(plain), "-c", "copy"])


@pytest.fixture(scope="session")
def song(media: MediaFactory) -> Path:
    return media.audio("song.mp3", seconds=3)


@pytest.fixture(scope="session")
def hires_flac(media: MediaFactory) -> Path:
    """192 kHz, 32-bit, 5.1 FLAC: Opus needs 48 kHz and (here) at most two channels."""
    s32 = ("-sample_fmt", "s32")
    return media.audio("hires.flac", seconds=2, rate=192000, codec="flac", layout="5.1", extra=s32)


@pytest.fixture(scope="session")
def black_then_bright(media: MediaFactory) -> Path:
    """3 s of black, then 3 s of colour bars, one key frame only: a first frame is black."""
    return media.make(
        "black-then-bright.mp4",
        ["-f", "lavfi", "-i", "color=c=black:size=320x240:rate=25:duration=3",
         "-f", "lavfi", "-i", "smptebars=size=320x240:rate=25:duration=3",
         "-filter_complex", "[0:v][1:v]concat=n=2:v=1:a=0[v]", "-map", "[v]",
         "-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p",
         "-g", "1000", "-sc_threshold", "0"],
    )  # fmt: skip


# --- profiles ----------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def profiles() -> Profiles:
    """Fast settings for tests: preset 12, a small box, 2 s segments so short clips get several."""
    return Profiles(
        video=VideoProfile(preset=12, crf=45, max_width=320, max_height=240, segment_seconds=2.0),
        thumbnail=ThumbnailProfile(width=160),
        limits=Limits(wall_seconds=300.0),
    )


@pytest.fixture(scope="session")
def limits(profiles: Profiles) -> Limits:
    return profiles.limits


# --- running the stage sequence ---------------------------------------------------------------


@dataclass
class Pipeline:
    """Every stage's result and directory, as the chain would leave them."""

    root: Path
    results: dict[str, Any] = field(default_factory=dict)

    def dir(self, stage: str) -> Path:
        return self.root / stage

    def __getitem__(self, stage: str) -> Any:
        return self.results[stage]


def run_stages(
    src: Path, root: Path, profiles: Profiles, *, progress: Callable[[float], None] | None = None
) -> Pipeline:
    """demux → decode → normalize → filter → encode → mux → (chunk → previews for video).

    Each result goes through JSON on the way to the next stage, as it does between tasks.
    """
    from pipelines import av as stages
    from pipelines.results import from_json, to_json

    def hop(value: Any) -> Any:
        return from_json(type(value), to_json(value))

    limits = profiles.limits
    p = Pipeline(root)
    p.results["demux"] = dm = hop(stages.demux(src, p.dir("demux"), limits=limits))
    p.results["decode"] = decoded = hop(stages.decode(dm, p.dir("demux"), p.dir("decode"), limits=limits))
    p.results["normalize"] = plan = hop(
        stages.normalize(dm, p.dir("demux"), p.dir("normalize"), profiles=profiles, limits=limits, decoded=decoded)
    )
    p.results["filter"] = filters = hop(stages.build_filters(plan, profiles=profiles))
    p.results["encode"] = enc = hop(
        stages.encode(
            dm,
            p.dir("demux"),
            filters,
            plan,
            p.dir("encode"),
            profiles=profiles,
            limits=limits,
            progress=progress,
        )
    )
    p.results["mux"] = muxed = hop(stages.mux(enc, p.dir("encode"), p.dir("mux"), limits=limits))
    if dm.kind == "video":
        chunked = stages.chunk(muxed, p.dir("mux"), p.dir("chunk"), profiles=profiles, limits=limits)
        p.results["chunk"] = hop(chunked)
        p.results["previews"] = hop(
            stages.previews(dm, p.dir("demux"), p.dir("previews"), profiles=profiles, limits=limits)
        )
    return p


@pytest.fixture
def pipeline(tmp_path: Path, profiles: Profiles) -> Callable[..., Pipeline]:
    def run(src: Path, **kwargs: Any) -> Pipeline:
        return run_stages(src, tmp_path / "stages", kwargs.pop("profiles", profiles), **kwargs)

    return run


# --- looking at outputs ------------------------------------------------------------------------


@dataclass(frozen=True)
class Looked:
    """What a player sees in a file: container, codecs, sizes, times, key frames."""

    format: str
    duration: float | None
    video_codec: str | None = None
    width: int | None = None
    height: int | None = None
    rotation: int = 0
    audio_codec: str | None = None
    sample_rate: int | None = None
    channels: int | None = None
    keyframes: tuple[float, ...] = ()
    video_frames: int = 0
    audio_seconds: float = 0.0


def look(source: Path | bytes, *, fmt: str | None = None) -> Looked:
    """Demux every packet and decode every frame (test media is small)."""
    handle: Any = io.BytesIO(source) if isinstance(source, bytes) else str(source)
    with av.open(handle, format=fmt) as ct:
        video = ct.streams.video[0] if ct.streams.video else None
        audio = ct.streams.audio[0] if ct.streams.audio else None
        found: dict[str, Any] = {
            "format": ct.format.name,
            "duration": ct.duration / 1_000_000 if ct.duration else None,
        }
        keyframes: list[float] = []
        frames = 0
        samples = 0
        rotation = 0
        for packet in ct.demux():
            if packet.stream is video and packet.is_keyframe and packet.pts is not None:
                keyframes.append(round(float(packet.pts * packet.time_base), 3))
            for frame in packet.decode():
                if isinstance(frame, av.VideoFrame):
                    rotation = rotation or int(frame.rotation or 0)
                    frames += 1
                elif isinstance(frame, av.AudioFrame):
                    samples += frame.samples
        if video is not None:
            vc = video.codec_context
            found.update(video_codec=vc.codec.canonical_name, width=vc.width, height=vc.height)
        if audio is not None:
            ac = audio.codec_context
            found.update(
                audio_codec=ac.codec.canonical_name,
                sample_rate=ac.sample_rate,
                channels=ac.layout.nb_channels,
            )
        return Looked(
            **found,
            rotation=rotation,
            keyframes=tuple(keyframes),
            video_frames=frames,
            audio_seconds=samples / audio.codec_context.sample_rate if audio is not None else 0.0,
        )


def _ebur128_summary(path: Path, options: str = "") -> str:
    """The summary ffmpeg's ``ebur128`` prints for a file's audio as played (decoders apply the
    Opus header gain), measured independently of the stages."""
    out = subprocess.run(
        [ffmpeg_exe(), "-hide_banner", "-nostats", "-i", str(path), "-vn", "-af", f"ebur128=framelog=quiet{options}",
         "-f", "null", "-"],
        capture_output=True, text=True, check=True,
    ).stderr  # fmt: skip
    found, _, summary = out.rpartition("Summary:")
    if not found:
        raise AssertionError(f"no loudness in: {out[-500:]}")
    return summary


def loudness(path: Path) -> float:
    """Integrated loudness (LUFS) of a file's audio."""
    return float(_ebur128_summary(path).split("I:")[1].split()[0])


def true_peak(path: Path) -> float:
    """True peak (dBTP, 4x oversampled) of a file's audio."""
    return float(_ebur128_summary(path, ":peak=true").rpartition("True peak:")[2].split("Peak:")[1].split()[0])


def replace_profile(profiles: Profiles, **sections: dict[str, Any]) -> Profiles:
    return dataclasses.replace(
        profiles,
        **{name: dataclasses.replace(getattr(profiles, name), **values) for name, values in sections.items()},
    )


@pytest.fixture(scope="session")
def looker() -> Callable[..., Looked]:
    """``look(path_or_bytes)``: what a player sees in a file (helpers as fixtures, so test modules
    need not import this conftest by name)."""
    return look


@pytest.fixture(scope="session")
def measure_lufs() -> Callable[[Path], float]:
    return loudness


@pytest.fixture(scope="session")
def measure_true_peak() -> Callable[[Path], float]:
    return true_peak


@pytest.fixture(scope="session")
def stage_runner() -> Callable[..., Pipeline]:
    """``run_stages(src, root, profiles)`` for fixtures wider than a test (``pipeline`` is per test)."""
    return run_stages


# --- processes ---------------------------------------------------------------------------------


def exited(pid: int, seconds: float = 10) -> bool:
    """Wait, up to ``seconds``, for process ``pid`` (ours or not) to end: its pidfd turns readable
    when it exits. True once it has (a zombie awaiting its reaper counts), False on the deadline."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True  # ended and reaped already
    try:
        return bool(select.select([fd], [], [], seconds)[0])
    finally:
        os.close(fd)


def tell_pid_and_hang(address: str) -> None:
    """A hung decoder that first says who it is: its pid, over the Unix socket at ``address`` (a
    path, so it works from a child without network), then waits for a signal that never comes."""
    with socket.socket(socket.AF_UNIX) as sock:
        sock.connect(address)
        sock.sendall(str(os.getpid()).encode())
    signal.pause()


def pid_told(listener: socket.socket, seconds: float = 30) -> int | None:
    """The pid a ``tell_pid_and_hang`` child sent to ``listener``; None if none connected in time."""
    listener.settimeout(seconds)
    try:
        conn, _ = listener.accept()
    except TimeoutError:
        return None
    with conn:
        conn.settimeout(seconds)
        return int(conn.recv(32))
