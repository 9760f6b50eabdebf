"""Output profiles and input limits: every knob an operator may turn, in one place.

They are frozen dataclasses so a stage cannot change them behind another stage's back; an
operator overrides fields through ``settings.MEDIA_PROFILES`` (see ``Profiles.from_overrides``).
The figures behind the defaults are in ``docs/decisions.md``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class VideoProfile:
    codec: str = "libsvtav1"
    crf: int = 38
    preset: int = 10
    max_width: int = 1920
    max_height: int = 1080
    max_fps: float = 60.0
    # Capped CRF: at most this share of the source's video bitrate, so that a small, already
    # efficient upload does not come out bigger (0 turns the cap off).
    source_bitrate_share: float = 0.8
    pix_fmt: str = "yuv420p"
    # DASH segments are cut on keyframes, so the GOP is the segment length.
    segment_seconds: float = 4.0
    # Split-and-stitch: a video longer than this is encoded in chunks of about this length (a
    # whole number of segments), each a task on any video worker, joined without re-encoding.
    # 0 turns it off. The default is measured in docs/decisions.md.
    chunk_seconds: float = 60.0
    # The encoder's threads (SVT-AV1 lp=); 0 lets it use every core. Set it so that a host's
    # video workers x threads = its cores.
    threads: int = 0
    # The adaptive ladder: (short edge in lines, bitrate cap in kb/s) per AV1 rung. The top rung
    # is the planned size (the WebM download); the others are those below it. Caps are CRF's
    # ceiling (capped CRF), never above the source-derived cap.
    ladder: tuple[tuple[int, int], ...] = ((1080, 4500), (720, 2500), (480, 1200), (360, 700))
    # The VP9 fallback (libvpx-vp9) for browsers without AV1: its rungs (those not above the
    # planned size; a smaller source gets its own size and halves, to ``vp9_min_rungs``), its
    # CRF and speed. Measured in docs/decisions.md.
    vp9_ladder: tuple[tuple[int, int], ...] = ((360, 800), (240, 400))
    # The AV1 rungs below the top at a faster SVT-AV1 preset (preset + this, at most 13): they
    # are the fallback for slow networks, and the ladder must cost little more than its pixels.
    ladder_preset_step: int = 2
    vp9_min_rungs: int = 2
    vp9_crf: int = 40
    vp9_deadline: str = "realtime"
    vp9_cpu_used: int = 8
    # An H.264/AAC fallback (libx264 and ffmpeg's aac, in MP4 segments) for players that decode
    # neither AV1 nor VP9: its own adaptation sets in the same manifest, from the same decode and
    # on the same key frames. Off: H.264 and AAC are patent-licensed codecs, and the product
    # promises royalty-free formats (README). Its rungs follow ``vp9_ladder``'s rule (none above
    # the planned size; a smaller source gets its own size); capped CRF like the others.
    h264_fallback: bool = False
    h264_ladder: tuple[tuple[int, int], ...] = ((720, 3000), (360, 900))
    h264_crf: int = 23
    h264_preset: str = "veryfast"


@dataclass(frozen=True)
class AudioProfile:
    codec: str = "libopus"
    bitrate: str = "128k"  # for stereo; mono gets half
    # From a lossy source, at most this share of the source's bitrate: Opus sounds at least as
    # good as MP3/AAC at fewer bits, and more bits would only make the file bigger.
    lossy_source_share: float = 0.85
    min_bitrate: str = "8k"  # never below (AMR voice memos run at 4.75 to 12.2 kb/s)
    sample_rate: int = 48000  # Opus only runs at 48 kHz (or its divisors)
    max_channels: int = 2
    aac_bitrate: str = "128k"  # the H.264 fallback's AAC track (``VideoProfile.h264_fallback``), stereo; mono half
    # EBU R128 loudness normalisation targets (integrated, true peak, range).
    loudness_i: float = -16.0
    loudness_tp: float = -1.5
    loudness_lra: float = 11.0


@dataclass(frozen=True)
class ImageProfile:
    long_edge: int = 2048
    avif_quality: int = 60
    avif_speed: int = 9
    webp_quality: int = 80
    webp_method: int = 2


@dataclass(frozen=True)
class ThumbnailProfile:
    width: int = 640
    quality: int = 80


@dataclass(frozen=True)
class StoryboardProfile:
    """The seek-bar preview sheet: at most ``max_tiles`` tiles (a tile every duration/max_tiles
    seconds, never closer than ``min_interval``), ``columns`` to a row, ``tile_width`` wide."""

    tile_width: int = 160
    max_tiles: int = 100
    columns: int = 10
    min_interval: float = 1.0
    quality: int = 70


@dataclass(frozen=True)
class Limits:
    """Ceilings checked from the headers before a decoder runs, and enforced while it runs."""

    max_image_pixels: int = 100_000_000
    max_animation_frames: int = 2_000
    max_video_pixels: int = 4096 * 2304
    max_video_pixel_rate: int = 3840 * 2160 * 60  # width x height x frame rate
    max_duration: float = 4 * 3600.0
    max_audio_channels: int = 16
    max_sample_rate: int = 384_000
    max_file_bytes: int = 8 * 1024**3
    # Per child process (decoder or ffmpeg): address space, CPU seconds, wall seconds.
    memory_bytes: int = 3 * 1024**3
    cpu_seconds: int = 3600
    wall_seconds: float = 3600.0
    probe_wall_seconds: float = 30.0
    max_open_files: int = 256


@dataclass(frozen=True)
class Profiles:
    video: VideoProfile = field(default_factory=VideoProfile)
    audio: AudioProfile = field(default_factory=AudioProfile)
    image: ImageProfile = field(default_factory=ImageProfile)
    thumbnail: ThumbnailProfile = field(default_factory=ThumbnailProfile)
    storyboard: StoryboardProfile = field(default_factory=StoryboardProfile)
    limits: Limits = field(default_factory=Limits)

    @classmethod
    def from_overrides(cls, overrides: dict[str, dict[str, Any]] | None) -> Profiles:
        """Build profiles from ``{"video": {"crf": 32}, "limits": {...}}``; unknown keys fail loudly."""
        overrides = overrides or {}
        unknown = set(overrides) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown profile sections: {sorted(unknown)}")
        parts = {}
        for f in dataclasses.fields(cls):
            default = getattr(cls(), f.name)
            parts[f.name] = dataclasses.replace(default, **overrides.get(f.name, {}))
        return cls(**parts)
