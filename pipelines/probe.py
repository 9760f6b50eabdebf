"""Read what a media file holds (streams, sizes, rates, rotation) without trusting it.

There is no ffprobe in the static ffmpeg we ship, so probing uses PyAV's own FFmpeg, in a
forked child under rlimits (``sandbox.run_isolated``): a demuxer bug or a header that asks for
gigabytes kills the child, not the worker. The child reads through a Python file object and
forbids every protocol, so a playlist hidden in the file cannot open anything.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from fractions import Fraction
from pathlib import Path
from typing import Any, Literal

import av

from pipelines.errors import InvalidInput, MediaError, TooLarge, UnsupportedCodec
from pipelines.profiles import Limits
from pipelines.runner import FORMAT_WHITELIST
from pipelines.sandbox import child_limits, run_isolated

StreamKind = Literal["video", "audio", "other"]

# Codecs we decode. Everything else, even if this ffmpeg could decode it, is refused by name:
# fewer decoders reachable from an upload means fewer decoder bugs reachable too.
# Browsers play few of them; the rest are converted (old phones: H.263 + AMR; Flash: Sorenson
# Spark, "flv1", an H.263 variant; camcorders: DV, MPEG-2, AC-3, Blu-ray/DVD LPCM; old cameras:
# MJPEG with IMA ADPCM).
VIDEO_CODECS = frozenset(
    {"h264", "hevc", "vp8", "vp9", "av1", "mpeg4", "msmpeg4v3", "mpeg2video", "mpeg1video", "mjpeg", "prores",
     "theora", "h263", "flv1", "vc1", "dnxhd", "dvvideo"}
)  # fmt: skip
AUDIO_CODECS = frozenset(
    {"aac", "mp3", "mp2", "mp1", "opus", "vorbis", "flac", "alac", "ac3", "eac3", "dts", "wavpack", "amr_nb",
     "amr_wb", "pcm_bluray", "pcm_dvd", "adpcm_ima_qt", "adpcm_ima_wav", "adpcm_ms"}
)  # fmt: skip
_PCM = re.compile(r"^pcm_(s8|u8|s16le|s16be|s24le|s24be|s32le|s32be|f32le|f32be|f64le|f64be|alaw|mulaw)$")


# How far the child reads to find the first video frame (for its display-matrix rotation).
_ROTATION_PACKETS = 64
_X264_SEI = re.compile(rb"x264 - core (\d{1,4})")
# AVColorSpace, AVColorPrimaries, AVColorTransferCharacteristic values -> ffmpeg's option names.
_COLOR_SPACES = {0: "gbr", 1: "bt709", 4: "fcc", 5: "bt470bg", 6: "smpte170m", 7: "smpte240m", 8: "ycgco",
                 9: "bt2020nc", 10: "bt2020c", 14: "ictcp"}  # fmt: skip
_COLOR_PRIMARIES = {1: "bt709", 4: "bt470m", 5: "bt470bg", 6: "smpte170m", 7: "smpte240m", 8: "film",
                    9: "bt2020", 10: "smpte428", 11: "smpte431", 12: "smpte432", 22: "jedec-p22"}  # fmt: skip
_COLOR_TRCS = {1: "bt709", 4: "gamma22", 5: "gamma28", 6: "smpte170m", 7: "smpte240m", 8: "linear",
               9: "log100", 10: "log316", 11: "iec61966-2-4", 12: "bt1361e", 13: "iec61966-2-1", 14: "bt2020-10",
               15: "bt2020-12", 16: "smpte2084", 17: "smpte428", 18: "arib-std-b67"}  # fmt: skip


@dataclass(frozen=True)
class StreamInfo:
    index: int  # the stream's index in the file, as ffmpeg's ``-map 0:<index>`` counts
    kind: StreamKind
    codec: str
    width: int | None = None
    height: int | None = None
    fps: float | None = None
    frame_rate: str | None = None  # exact, as "30000/1001", for ffmpeg's fps filter
    # Degrees counter-clockwise from the display matrix; ffmpeg autorotates by it on decode.
    rotation: int = 0
    sample_aspect: float = 1.0
    pix_fmt: str | None = None
    color_range: str | None = None  # "tv", "pc" or None when the file does not say
    # ffmpeg's names ("bt709", "bt2020nc", "smpte2084", "arib-std-b67"), None when unspecified.
    color_space: str | None = None
    color_primaries: str | None = None
    color_trc: str | None = None
    # The x264 version in the first frame's SEI. FFmpeg works around old x264 bugs (4:4:4 before
    # build 151) only when it has seen that SEI, so a decode that starts after a seek must be told.
    x264_build: int | None = None
    # HDR mastering display or content light level metadata on the first frame: tone-mapping then
    # knows the real peak instead of assuming one.
    hdr_metadata: bool = False
    sample_rate: int | None = None
    channels: int | None = None
    channel_layout: str | None = None
    bit_rate: int | None = None  # the stream's; for a lone audio stream, the file's if need be
    duration: float | None = None
    # Cover art (an MP3's or M4A's picture) is stored as a one-frame video stream: not a video.
    attached_pic: bool = False

    @property
    def display_size(self) -> tuple[int, int] | None:
        """Width and height as shown: sample aspect ratio applied, then rotation."""
        if not self.width or not self.height:
            return None
        w, h = round(self.width * self.sample_aspect), self.height
        return (h, w) if self.rotation % 180 else (w, h)


@dataclass(frozen=True)
class MediaInfo:
    container: str  # ffmpeg's demuxer name
    duration: float | None
    bit_rate: int | None
    streams: tuple[StreamInfo, ...] = ()

    @property
    def video(self) -> StreamInfo | None:
        """The first real video stream (not cover art), or None."""
        return next((s for s in self.streams if s.kind == "video" and not s.attached_pic), None)

    @property
    def audio(self) -> StreamInfo | None:
        return next((s for s in self.streams if s.kind == "audio"), None)

    @property
    def media_duration(self) -> float | None:
        """The best duration we know: the container's, else the longest stream's."""
        if self.duration:
            return self.duration
        lengths = [s.duration for s in self.streams if s.duration]
        return max(lengths) if lengths else None


def codec_allowed(stream: StreamInfo) -> bool:
    if stream.kind == "video":
        return stream.codec in VIDEO_CODECS
    if stream.kind == "audio":
        return stream.codec in AUDIO_CODECS or bool(_PCM.match(stream.codec))
    return False


def probe(path: Path, *, limits: Limits, ffmpeg_format: str | None = None) -> MediaInfo:
    """Probe ``path`` in a sandboxed child with ``ffmpeg_format`` forced (as sniffing named it)."""
    return run_isolated(
        _probe_in_child,
        str(path),
        ffmpeg_format,
        limits,
        limits=child_limits(limits, wall_seconds=limits.probe_wall_seconds),
    )


def _probe_in_child(path: str, ffmpeg_format: str | None, limits: Limits) -> MediaInfo:
    options = {
        # The file comes in through a Python file object, so no protocol is needed at all; "fd"
        # without an fd option can open nothing, and an empty list would mean "anything".
        "protocol_whitelist": "fd",
        "format_whitelist": FORMAT_WHITELIST,
    }
    try:
        with open(path, "rb") as fh, _open_container(fh, ffmpeg_format, options) as ct:
            streams = tuple(_stream_info(ct, s) for s in ct.streams)
            video = next((s for s in streams if s.kind == "video" and not s.attached_pic), None)
            # Decode one frame (for its rotation) only with a decoder we would use anyway, and only
            # when the header's size is within limits; check_limits refuses the rest afterwards.
            if video is not None and codec_allowed(video) and _decodable_size(video, limits):
                rotation, x264_build, hdr_metadata = _first_frame_facts(ct, video.index)
                found = replace(
                    video,
                    rotation=((rotation + 180) % 360) - 180,
                    x264_build=x264_build,
                    hdr_metadata=hdr_metadata,
                )
                streams = tuple(found if s is video else s for s in streams)
            duration = ct.duration / 1_000_000 if ct.duration and ct.duration > 0 else None
            media = [s for s in streams if s.kind != "other" and not s.attached_pic]
            if len(media) == 1 and media[0].kind == "audio" and media[0].bit_rate is None and ct.bit_rate:
                # Opus or Vorbis alone in Ogg/WebM: no stream bitrate, but the file's is the sound's.
                streams = tuple(replace(s, bit_rate=int(ct.bit_rate)) if s is media[0] else s for s in streams)
            return MediaInfo(
                container=ct.format.name,
                duration=duration,
                bit_rate=int(ct.bit_rate) if ct.bit_rate else None,
                streams=streams,
            )
    except MediaError:
        raise
    except (av.error.PermissionError, av.error.ProtocolNotFoundError) as exc:  # a nested open was refused
        raise InvalidInput(
            "The file tries to read other files or addresses, which we do not allow.", detail=str(exc)
        ) from None
    except av.error.DecoderNotFoundError as exc:
        raise UnsupportedCodec("The file uses a codec we do not support.", detail=str(exc)) from None
    except (av.error.MemoryError, MemoryError) as exc:
        raise TooLarge("The file needs more memory to read than we allow.", detail=str(exc)) from None
    except (av.error.FFmpegError, UnicodeDecodeError, ValueError, OverflowError) as exc:
        raise InvalidInput("The file is damaged or not a media file we can read.", detail=str(exc)) from None


def _open_container(fh: Any, ffmpeg_format: str | None, options: dict[str, str]) -> Any:
    # Tags are the uploader's text in any encoding: replace what is not UTF-8 rather than fail.
    return av.open(fh, "r", format=ffmpeg_format, container_options=options, metadata_errors="replace")


def _stream_info(container: Any, stream: Any) -> StreamInfo:
    cc = stream.codec_context
    # The codec's own name ("mp3"), not the decoder's ("mp3float").
    codec = (cc.codec.canonical_name if cc is not None and cc.codec is not None else None) or "unknown"
    duration = None
    if stream.duration is not None and stream.time_base is not None and stream.duration > 0:
        duration = float(stream.duration * stream.time_base)
    if stream.type == "video":
        rate = stream.average_rate or stream.guessed_rate or stream.base_rate
        rate = Fraction(rate) if rate else None
        sar = stream.sample_aspect_ratio or (cc.sample_aspect_ratio if cc is not None else None)
        return StreamInfo(
            index=stream.index,
            kind="video",
            codec=codec,
            width=cc.width or None,
            height=cc.height or None,
            fps=float(rate) if rate else None,
            frame_rate=f"{rate.numerator}/{rate.denominator}" if rate else None,
            sample_aspect=float(sar) if sar and sar > 0 else 1.0,
            bit_rate=int(stream.bit_rate or cc.bit_rate or 0) or None,
            pix_fmt=cc.pix_fmt,
            color_range={1: "tv", 2: "pc"}.get(int(cc.color_range or 0)),
            color_space=_COLOR_SPACES.get(int(cc.colorspace or 2)),
            color_primaries=_COLOR_PRIMARIES.get(int(cc.color_primaries or 2)),
            color_trc=_COLOR_TRCS.get(int(cc.color_trc or 2)),
            duration=duration,
            attached_pic=bool(stream.disposition & av.stream.Disposition.attached_pic),
        )
    if stream.type == "audio":
        layout = cc.layout
        return StreamInfo(
            index=stream.index,
            kind="audio",
            codec=codec,
            sample_rate=cc.sample_rate or None,
            channels=(layout.nb_channels if layout is not None else None) or None,
            channel_layout=layout.name if layout is not None else None,
            bit_rate=int(stream.bit_rate or cc.bit_rate or 0) or None,
            duration=duration,
        )
    return StreamInfo(index=stream.index, kind="other", codec=codec, duration=duration)


def _decodable_size(video: StreamInfo, limits: Limits) -> bool:
    return bool(video.width and video.height and video.width * video.height <= limits.max_video_pixels)


def _first_frame_facts(container: Any, index: int) -> tuple[int, int | None, bool]:
    """Rotation from the first decoded frame's display matrix (PyAV exposes it only on frames),
    and the x264 build from the SEI in the packets before it.

    FFmpeg attaches the stream's display matrix to every decoded frame, whatever the container
    stored it as (mov ``tkhd`` matrix, Matroska projection). A frame that fails to decode says
    nothing about rotation; the decode stage judges decodability.
    """
    stream = container.streams[index]
    x264_build: int | None = None
    try:
        for n, packet in enumerate(container.demux(stream)):
            if x264_build is None and stream.codec_context.name == "h264":
                found = _X264_SEI.search(bytes(packet))
                x264_build = int(found.group(1)) if found else None
            for frame in packet.decode():
                return int(frame.rotation or 0), x264_build, _has_hdr_metadata(frame)
            if n >= _ROTATION_PACKETS:
                break
        for frame in stream.codec_context.decode(None):  # flush: decoders that buffer frames
            return int(frame.rotation or 0), x264_build, _has_hdr_metadata(frame)
    except av.error.FFmpegError:
        pass
    return 0, x264_build, False


def _has_hdr_metadata(frame: Any) -> bool:
    kinds = {sd.type.name for sd in frame.side_data}
    return bool(kinds & {"MASTERING_DISPLAY_METADATA", "CONTENT_LIGHT_LEVEL"})


def check_limits(info: MediaInfo, limits: Limits) -> None:
    """Refuse, from the headers alone, what would exceed the operator's limits."""
    video, audio = info.video, info.audio
    if video is not None and video.width and video.height:
        pixels = video.width * video.height
        if pixels > limits.max_video_pixels:
            raise TooLarge(
                f"The video is {video.width}x{video.height} pixels ({pixels / 1e6:.1f} megapixels); "
                f"we accept at most {limits.max_video_pixels / 1e6:.1f} megapixels per frame."
            )
        if video.fps and pixels * video.fps > limits.max_video_pixel_rate:
            raise TooLarge(
                f"The video is {video.width}x{video.height} at {video.fps:.0f} frames per second, "
                "more pixels per second than we accept "
                f"(at most {limits.max_video_pixel_rate / 1e6:.0f} million)."
            )
    duration = info.media_duration
    if duration is not None and duration > limits.max_duration:
        raise TooLarge(f"The file is {_hms(duration)} long; we accept at most {_hms(limits.max_duration)}.")
    if audio is not None:
        if audio.channels and audio.channels > limits.max_audio_channels:
            most = limits.max_audio_channels
            raise TooLarge(f"The audio has {audio.channels} channels; we accept at most {most}.")
        if audio.sample_rate and audio.sample_rate > limits.max_sample_rate:
            raise TooLarge(
                f"The audio is sampled at {audio.sample_rate / 1000:g} kHz; "
                f"we accept at most {limits.max_sample_rate / 1000:g} kHz."
            )


def _hms(seconds: float) -> str:
    s = round(seconds)
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h} h {m:02d} min" if h else f"{m} min {s:02d} s"
