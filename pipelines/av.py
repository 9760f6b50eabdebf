"""The audio and video stages: demux, decode, normalize, filter, encode, mux, chunk, previews.

Each stage reads the previous stage's files, writes only inside its own ``out_dir`` and returns
a frozen result that round-trips through JSON (``pipelines.results``); file names in results are
relative to the stage's directory, which the caller renames into place afterwards.

Where the time goes (60 s of 720p on two cores): the AV1 encode is nearly all of it, so every
other pass is built to be cheap. Demux, mux and chunk only copy packets (an audio-only upload
is not even copied: it is read in place); the decode check decodes key frames, not every video
frame. The audio's loudness is measured (``ebur128``) in the encode's own filter graph and
applied as the Opus header's output gain (``pipelines.opus_gain``), which every decoder
applies: no pass of its own before the encode, and no gain baked into the samples.

Audio alone is one ffmpeg run: its decode stage reads what the header said (no pass), and the
encode, which decodes every sample anyway, refuses what the decode check refused (nothing
decodable, longer than the limit whatever the header said) and writes the WebM itself, which
the mux stage only links (``encode``, ``mux``). The encode of a 60 s song was a third of the
pipeline's passes' time beside a decode pass and a copy into WebM.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import re
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Literal

import ffmpeg

from pipelines import h264, opus_gain
from pipelines.detect import Detected
from pipelines.errors import Cancelled, InvalidInput, MediaError, TooLarge, UnsupportedCodec
from pipelines.ladder import TOP, Rung, plan_ladder
from pipelines.probe import MediaInfo, StreamInfo, check_limits, codec_allowed, probe
from pipelines.profiles import AudioProfile, Limits, Profiles
from pipelines.results import Output
from pipelines.runner import RunResult, ffmpeg_exe, open_input, run_ffmpeg
from pipelines.sniff import TAGGED, sniff
from pipelines.storyboard import storyboard

log = logging.getLogger(__name__)

AvKind = Literal["video", "audio"]
Progress = Callable[[float], None]


MATROSKA = "matroska,webm"
_STANDARD_RATES = (
    Fraction(24000, 1001),
    Fraction(24),
    Fraction(25),
    Fraction(30000, 1001),
    Fraction(30),
    Fraction(48),
    Fraction(50),
    Fraction(60000, 1001),
    Fraction(60),
)
_SILENT_LUFS = -60.0  # below this a track is (near) silence: amplifying it would only raise noise
_MAX_GAIN_DB = 20.0
_BLACK_LUMA = 24.0  # mean luma (0-255) under which a thumbnail counts as black


# --- results ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class DemuxResult:
    kind: AvKind
    container: str  # what the upload was, by its bytes: mp4, matroska, avi, mp3, ...
    mime: str
    file: str  # streams.mkv or audio.mka: the first video and first audio stream, copied
    info: MediaInfo  # the upload's probe
    has_video: bool
    has_audio: bool
    # Of the copied streams: shorter than the upload's header says when the upload was cut off.
    duration: float | None
    ffmpeg_format: str = MATROSKA  # the demuxer for ``file``
    # ``file`` is the upload itself (audio only, ``_READ_IN_PLACE``): later passes take its first
    # audio stream and nothing else, and the encode bounds its length (``audio_refusal``).
    in_place: bool = False


@dataclass(frozen=True)
class DecodeResult:
    kind: AvKind
    expected_duration: float | None  # what the upload's header claims
    decoded_duration: float  # how far decoding got, in seconds (to the last key frame if not full_video)
    video_frames: int  # frames decoded (key frames only unless ``full_video``)
    full_video: bool
    seconds: float
    # EBU R128 of the first audio stream, which the decode check measured in an earlier version
    # (a result stored then still plans a ``volume`` gain); now None: the encode measures.
    loudness: Loudness | None = None
    # Nothing was decoded here, only the header read (audio): the encode decodes and refuses
    # what this check would have (``audio_refusal``); ``decoded_duration`` is then 0.
    header_only: bool = False
    # Audio whose header states no length (a WebM a browser recorded): how long its packets
    # last, counted without decoding them, so the encode can report how far it is.
    packets_duration: float | None = None


@dataclass(frozen=True)
class VideoPlan:
    width: int
    height: int
    frame_rate: str  # exact rational for the fps filter, e.g. "30000/1001"
    fps: float
    gop: int  # frames between key frames: one DASH segment
    pix_fmt: str
    color_range: str
    source_width: int
    source_height: int
    rotation: int
    # Filters that come first in every graph reading the video (encode, thumbnail): colour tags
    # for an untagged source, so that each conversion after them (and the player) agrees.
    colour: tuple[str, ...] = ()
    x264_build: int | None = None  # see StreamInfo.x264_build
    # Resize and bring to 8-bit SDR (tone-mapped from HDR): ``picture_steps``.
    picture: tuple[str, ...] = ()
    dynamic_range: str = "sdr"  # of the source: sdr, wide (BT.2020 SDR), pq or hlg
    max_bitrate: int = 0  # bits per second for capped CRF (0: plain CRF), see ``video_max_bitrate``


@dataclass(frozen=True)
class Loudness:
    """EBU R128 measurement of the source audio (integrated, true peak, range, gate threshold)."""

    integrated: float
    true_peak: float
    lra: float
    threshold: float


@dataclass(frozen=True)
class AudioPlan:
    sample_rate: int
    channels: int
    channel_layout: str
    source_sample_rate: int | None
    source_channels: int | None
    loudness: Loudness | None
    gain_db: float  # linear gain reaching the loudness target without passing the true-peak ceiling
    bitrate: int = 0  # Opus bits per second (0: the profile's), see ``opus_bitrate``
    # Capped by a lossy source's bitrate: then constrained VBR, which keeps to the rate (free VBR
    # went 27 % over it on test1.mp3 and made the file bigger than its source again).
    capped: bool = False


@dataclass(frozen=True)
class NormalizePlan:
    kind: AvKind
    duration: float | None
    video: VideoPlan | None
    audio: AudioPlan | None


@dataclass(frozen=True)
class FilterSpec:
    video: str | None  # -vf graph, or None for audio-only
    audio: str | None  # -af graph, or None when there is no audio
    # The audio graph ends in ``ENCODE_LOUDNESS_FILTER``: the encode reads its summary and writes the
    # gain into the Opus header (``apply_loudness``). False: a gain is in the graph, or none.
    loudness_in_encode: bool = False


@dataclass(frozen=True)
class EncodeResult:
    kind: AvKind
    file: str
    codec: str  # "av1+opus", "av1" or "opus"
    width: int | None
    height: int | None
    duration: float | None
    seconds: float
    # Every rung of the video's ladder (the first is ``file`` itself); () for audio.
    rungs: tuple[Rung, ...] = ()
    # What the encode measured of the audio it encoded, and the Opus output gain it wrote from
    # that (None: the filter graph applied the plan's gain, or there is no audio).
    loudness: Loudness | None = None
    gain_db: float | None = None
    aac: str = ""  # the H.264 fallback's AAC track (``h264.AAC_FILE``), when the profile has it


@dataclass(frozen=True)
class MuxResult:
    kind: AvKind
    file: str
    outputs: tuple[Output, ...]


@dataclass(frozen=True)
class ChunkResult:
    manifest: str
    segment_seconds: float
    outputs: tuple[Output, ...]


@dataclass(frozen=True)
class PreviewResult:
    outputs: tuple[Output, ...]
    at: float | None = None  # the time the thumbnail was taken from
    luma: float | None = None  # its mean luma, 0-255


# --- demux -----------------------------------------------------------------------------------


def demux(src: Path, out_dir: Path, *, limits: Limits, detected: Detected | None = None) -> DemuxResult:
    """Check what the upload is, then copy its first video and audio stream into Matroska.

    Copying costs almost nothing and leaves later stages a file whose demuxer we choose,
    without subtitles, data streams, attachments, chapters or metadata (GPS tags included).
    An audio-only upload in a container of ``_READ_IN_PLACE`` is linked, not copied.
    ``detected``: the sniff and probe made when the item was queued, so they are not repeated.
    """
    with _timed("demux", src=src.name):
        size = src.stat().st_size
        if size > limits.max_file_bytes:
            most = limits.max_file_bytes / 1e9
            raise TooLarge(f"The file is {size / 1e9:.1f} GB; we accept at most {most:.1f} GB.")
        sniffed = detected.sniffed if detected and detected.sniffed else None
        if sniffed is None or sniffed.container == TAGGED:
            sniffed = sniff(src)
        if sniffed.kind == "image" or not sniffed.ffmpeg_format:
            raise InvalidInput("The file is an image, not a video or audio file.")
        if detected is not None and detected.info is not None:
            info = detected.info
        else:
            info = probe(src, limits=limits, ffmpeg_format=sniffed.ffmpeg_format)
        video, audio = info.video, info.audio
        if video is not None:
            kind: AvKind = "video"
        elif audio is not None:
            kind = "audio"
        else:
            raise InvalidInput("The file has no video or audio we can read.")
        for stream in (video, audio):
            if stream is not None and not codec_allowed(stream):
                codec = _codec_name(stream.codec)
                raise UnsupportedCodec(
                    f"The {stream.kind} in this {sniffed.label} file is encoded with {codec}, which we do not support."
                )
        check_limits(info, limits)

        out_dir.mkdir(parents=True, exist_ok=True)
        mime = sniffed.mime
        if kind == "audio" and mime.startswith("video/"):  # a WebM or MP4 holding only sound
            mime = "audio/" + mime.split("/", 1)[1]
        if kind == "audio" and sniffed.container in _READ_IN_PLACE:
            _link_or_copy(src, out_dir / UPLOAD)
            return DemuxResult(
                kind=kind,
                container=sniffed.container,
                mime=mime,
                file=UPLOAD,
                info=info,
                has_video=False,
                has_audio=True,
                duration=info.media_duration,
                ffmpeg_format=sniffed.ffmpeg_format,
                in_place=True,
            )
        name = "streams.mkv" if kind == "video" else "audio.mka"
        maps: list[str] = []
        for stream in (video, audio):
            if stream is not None:
                maps += ["-map", f"0:{stream.index}"]
        # Containers whose packets may lack timestamps, which Matroska needs on every packet.
        extra = ("-fflags", "+genpts") if sniffed.container in ("avi", "mpeg", "mpegvideo") else ()
        # Audio is copied a little past the limit, so that its encode refuses a longer file
        # (``audio_refusal``) as it refuses one read in place, rather than cutting it.
        bound = audio_bound(limits) if kind == "audio" else ("-t", f"{limits.max_duration:.0f}")
        with open_input(src, sniffed.ffmpeg_format) as inp:
            run_ffmpeg(
                [*inp.args(*extra), *maps, "-c", "copy", "-map_metadata", "-1", "-map_chapters", "-1",
                 *bound, "-f", "matroska", str(out_dir / name)],
                limits=limits, pass_fds=[inp.fd],
            )  # fmt: skip
        copied = probe(out_dir / name, limits=limits, ffmpeg_format=MATROSKA)
        if copied.video is None and copied.audio is None:
            raise InvalidInput("The file has no video or audio we can read.")
        return DemuxResult(
            kind=kind,
            container=sniffed.container,
            mime=mime,
            file=name,
            info=info,
            has_video=video is not None,
            has_audio=audio is not None,
            duration=copied.media_duration or info.media_duration,
        )


UPLOAD = "upload"
# Audio containers whose packets carry the timestamps decoding needs: an audio-only upload in
# one of them is read as it is. Copying it into Matroska first (a pass, then a probe of the copy)
# cost 0.12 s of a 60 s song's 2.25 s and bought nothing the later passes do not do themselves:
# they map the first audio stream only (no cover art, no other stream), the encode drops the
# metadata, and the encode bounds the length the copy's ``-t`` bounded (``audio_bound``). AVI
# and MPEG streams, whose packets may lack timestamps (``+genpts``), are still copied.
_READ_IN_PLACE = frozenset(
    {"mp4", "mov", "webm", "matroska", "mp3", "aac", "flac", "ogg", "wav", "w64", "aiff", "caf", "wavpack",
     "ac3", "eac3", "amr"}
)  # fmt: skip


def _link_or_copy(src: Path, dst: Path) -> None:
    """The upload into the stage's folder: a hard link where the disk allows one, else a copy."""
    try:
        os.link(src, dst, follow_symlinks=False)
    except OSError:
        shutil.copyfile(src, dst, follow_symlinks=False)


def _codec_name(codec: str) -> str:
    return "an unknown codec" if codec in ("", "unknown", "none") else codec


# --- decode ----------------------------------------------------------------------------------


def decode(
    demuxed: DemuxResult,
    demux_dir: Path,
    out_dir: Path,
    *,
    limits: Limits,
    progress: Progress | None = None,
    full_video: bool = False,
) -> DecodeResult:
    """Prove the streams decode before an encode spends minutes on them.

    Video, unless ``full_video``, is decoded only at its key frames, dropped to key packets
    before the decoder (a bitstream filter, so it works for every codec). A full decode of 60 s
    of 720p H.264 costs ~4.5 s on two cores, a quarter of the encode, while key frames catch
    what fails in practice (wrong codec, broken headers, garbage) and the encode tolerates a
    damaged frame here and there the same way a full decode would.

    Audio alone is not decoded here: its encode takes about four times a decode pass, not
    minutes, and decodes every sample itself, so a pass before it only cost time (0.14 s of a
    60 s song's 0.79 s). The stage keeps its place and its name and records what the header
    said (the demux's probe has found a stream of a codec we allow, within the limits the header
    states); the encode refuses, in this check's words, what it would have refused
    (``audio_refusal``). A header that states no length (a browser's recording) gets its
    packets counted instead, a copy pass that decodes nothing (``_packets_duration``): the
    encode then reports its progress, and a recording past the limit is refused here.
    """
    with _timed("decode", kind=demuxed.kind):
        out_dir.mkdir(parents=True, exist_ok=True)
        if not demuxed.has_video:
            started = time.monotonic()
            counted = None if demuxed.duration else _packets_duration(demuxed, demux_dir, limits)
            if counted is not None and counted > limits.max_duration + 0.5:
                raise TooLarge(f"The file is longer than the {_minutes(limits.max_duration)} we accept.")
            return DecodeResult(
                kind=demuxed.kind,
                expected_duration=demuxed.info.media_duration,
                decoded_duration=0.0,
                video_frames=0,
                full_video=False,
                seconds=round(time.monotonic() - started, 3),
                header_only=True,
                packets_duration=counted,
            )
        keyframes_only = demuxed.has_video and not full_video
        result = _decode_pass(demuxed, demux_dir, limits, progress, keyframes_only=keyframes_only)
        if keyframes_only and result.frames == 0:
            # No packet flagged as a key frame (some muxers forget): judge by a full decode.
            keyframes_only = False
            result = _decode_pass(demuxed, demux_dir, limits, progress, keyframes_only=False)
        decoded = result.out_time or 0.0
        if decoded <= 0 and result.frames == 0:
            raise InvalidInput(NOTHING_DECODED, detail=_tail(result))
        if result.frames == 0:
            raise InvalidInput("The video in the file could not be decoded.", detail=_tail(result))
        return DecodeResult(
            kind=demuxed.kind,
            expected_duration=demuxed.info.media_duration,
            decoded_duration=round(decoded, 3),
            video_frames=result.frames,
            full_video=not keyframes_only,
            seconds=round(result.seconds, 3),
        )


NOTHING_DECODED = "Nothing in the file could be decoded."


def _minutes(seconds: float) -> str:
    minutes = seconds / 60
    return f"{minutes:.0f} minutes" if minutes >= 2 else f"{seconds:.0f} seconds"


def _decode_pass(
    demuxed: DemuxResult, demux_dir: Path, limits: Limits, progress: Progress | None, *, keyframes_only: bool
) -> RunResult:
    extra: tuple[str, ...] = ("-bsf:v", "noise=drop=not(key)") if keyframes_only else ()
    if demuxed.info.video is not None:
        extra += decoder_args(demuxed.info.video.x264_build)
    with open_input(demux_dir / demuxed.file, demuxed.ffmpeg_format) as inp:
        return run_ffmpeg(
            [*inp.args(*extra), "-map", "0:v:0?", "-map", "0:a:0?", "-f", "null", "-"],
            limits=limits, duration=demuxed.duration, progress=progress, pass_fds=[inp.fd],
        )  # fmt: skip


def _packets_duration(demuxed: DemuxResult, demux_dir: Path, limits: Limits) -> float | None:
    """Seconds of the first audio stream's packets, read a little past the limit and copied to
    nowhere: nothing is decoded (0.2-0.3 s for ten minutes of Opus, against ~6 s to encode it).
    None when none could be read."""
    with open_input(demux_dir / demuxed.file, demuxed.ffmpeg_format) as inp:
        result = run_ffmpeg(
            [*inp.args(), "-map", "0:a:0", "-c", "copy", *audio_bound(limits), "-f", "null", "-"],
            limits=limits, pass_fds=[inp.fd],
        )  # fmt: skip
    return round(result.out_time, 3) if result.out_time else None


def audio_bound(limits: Limits) -> tuple[str, str]:
    """The output option that stops reading audio a little past the longest length we accept:
    enough to know a file is longer (``audio_refusal``) without decoding hours of it."""
    return ("-t", f"{limits.max_duration + 1:.0f}")


def audio_refusal(decoded: float | None, limits: Limits, result: RunResult) -> MediaError | None:
    """What the audio decode check refused, judged on the encode's own run (``decoded``: the
    seconds it wrote, bounded by ``audio_bound``): no sample decoded, or more decoded than the
    limit, which a header that understated the length (``check_limits`` trusted it) hid."""
    if not decoded or decoded <= 0:
        return InvalidInput(NOTHING_DECODED, detail=_tail(result))
    if decoded > limits.max_duration + 0.5:
        return TooLarge(f"The file is longer than the {_minutes(limits.max_duration)} we accept.")
    return None


# --- normalize -------------------------------------------------------------------------------


def normalize(
    demuxed: DemuxResult,
    demux_dir: Path,
    out_dir: Path,
    *,
    profiles: Profiles,
    limits: Limits,
    progress: Progress | None = None,
    decoded: DecodeResult | None = None,
) -> NormalizePlan:
    """Decide the output's size, rate, format and, when it must be known before the encode,
    the loudness gain.

    Normally it need not: the encode measures the audio it encodes and writes the gain into the
    Opus header (``apply_loudness``), and the plan's ``loudness`` stays None. A decode result
    stored by an earlier version brings its measurement, which is used. Only the H.264
    fallback's AAC track, whose format has no gain a player applies, needs the gain in the
    samples, so only then is the loudness measured here, in a pass of its own.
    """
    with _timed("normalize", kind=demuxed.kind):
        out_dir.mkdir(parents=True, exist_ok=True)
        info = demuxed.info
        duration = demuxed.duration
        if demuxed.in_place and decoded is not None and decoded.decoded_duration > 0:
            duration = decoded.decoded_duration  # the upload's header may claim more than there is
        if duration is None and decoded is not None and decoded.packets_duration:
            duration = decoded.packets_duration  # the header did not say: its packets did
        video_plan = _video_plan(info.video, profiles) if demuxed.has_video and info.video else None
        audio_plan = None
        if demuxed.has_audio and info.audio is not None:
            loudness = decoded.loudness if decoded is not None else None
            if loudness is None and _gain_in_samples(video_plan, profiles):
                loudness = measure_loudness(
                    demux_dir / demuxed.file,
                    demuxed.ffmpeg_format,
                    limits=limits,
                    duration=duration,
                    progress=progress,
                )
            audio_plan = _audio_plan(info.audio, loudness, profiles)
        return NormalizePlan(kind=demuxed.kind, duration=duration, video=video_plan, audio=audio_plan)


def _gain_in_samples(video: VideoPlan | None, profiles: Profiles) -> bool:
    """Whether an output of the audio cannot carry the gain in a header: the AAC track of the
    H.264 fallback (``h264``), encoded from the same audio graph as the Opus."""
    return video is not None and any(r.codec == "h264" for r in video_rungs(video, profiles))


def _video_plan(video: StreamInfo, profiles: Profiles) -> VideoPlan:
    vp = profiles.video
    size = video.display_size
    if size is None:
        raise InvalidInput("The video does not say how large its pictures are.")
    width, height = size
    # Fit the long edge in the long side of the box and the short edge in the short side, so a
    # portrait phone video keeps 1080x1920 instead of shrinking to 608x1080. Never upscale.
    long_max, short_max = max(vp.max_width, vp.max_height), min(vp.max_width, vp.max_height)
    scale = min(1.0, long_max / max(width, height), short_max / min(width, height))
    rate = _target_rate(video.frame_rate, vp.max_fps)
    return VideoPlan(
        width=_even(width * scale),
        height=_even(height * scale),
        frame_rate=f"{rate.numerator}/{rate.denominator}",
        fps=round(float(rate), 3),
        gop=max(1, round(float(rate) * vp.segment_seconds)),
        pix_fmt=vp.pix_fmt,
        color_range="tv",
        source_width=video.width or 0,
        source_height=video.height or 0,
        rotation=video.rotation,
        colour=tuple(colour_chain(video)),
        x264_build=video.x264_build,
        picture=tuple(picture_steps(video, _even(width * scale), _even(height * scale), vp.pix_fmt)),
        dynamic_range=dynamic_range(video),
        max_bitrate=video_max_bitrate(video, vp.source_bitrate_share),
    )


def video_max_bitrate(video: StreamInfo, share: float) -> int:
    """The cap for SVT-AV1's capped CRF: ``share`` of the source's video bitrate, when known.

    CRF alone sizes the output by the picture, not by the source: cockatoo.mp4 (H.264, 387 kb/s)
    came out 23 % larger. Capped at 0.8x its bitrate it is 20 % smaller, at SSIM 0.948 against
    the source (0.978 uncapped). A large source (a phone's 4K at 20 Mb/s) never meets the cap.
    """
    if not video.bit_rate or share <= 0:
        return 0
    return max(100_000, int(video.bit_rate * share)) // 1000 * 1000


# zscale's names for the source's colour description, from ffmpeg's.
_ZSCALE_TRC = {
    "smpte2084": "smpte2084", "arib-std-b67": "arib-std-b67", "bt709": "709", "smpte170m": "601",
    "bt2020-10": "2020_10", "bt2020-12": "2020_12", "linear": "linear", "iec61966-2-1": "iec61966-2-1",
}  # fmt: skip
_ZSCALE_PRIMARIES = {"bt2020": "2020", "bt709": "709", "smpte170m": "170m", "bt470bg": "470bg", "smpte432": "smpte432"}
_ZSCALE_MATRIX = {"bt2020nc": "2020_ncl", "bt2020c": "2020_cl", "bt709": "709", "smpte170m": "170m", "bt470bg": "470bg"}


def dynamic_range(video: StreamInfo) -> str:
    """pq (HDR10), hlg, wide (BT.2020 primaries, SDR transfer) or sdr, from the stream's tags."""
    if video.color_trc == "smpte2084":
        return "pq"
    if video.color_trc == "arib-std-b67":
        return "hlg"
    if video.color_primaries == "bt2020" or video.color_space in ("bt2020nc", "bt2020c"):
        return "wide"
    return "sdr"


def picture_steps(video: StreamInfo, width: int, height: int, pix_fmt: str = "yuv420p") -> list[str]:
    """Filters that resize to ``width`` x ``height`` and give 8-bit SDR in limited range.

    HDR (PQ, HLG) is tone-mapped to BT.709 as Immich does by default: linear light with 100 nits
    as 1.0, BT.709 primaries, Hable's curve without desaturation. The resize happens first, in
    zscale, so the float work is done at the output size, not on a 4K source. Without mastering
    metadata the peak is taken as 1000 nits (``peak=10``), what consumer HDR is graded to; ffmpeg
    would assume 10,000 for PQ and make the picture far too dark. The frames leave tagged BT.709,
    so the encode writes BT.709, never PQ or HLG, into an 8-bit AV1.
    """
    kind = dynamic_range(video)
    if kind == "sdr":
        # ``out_range=tv`` only when the frames are not limited range already: given it, scale
        # converts even at the same size and range (1.3 s of the filter thread's CPU for 20 s of
        # 1080p, every encode of an upload already at the planned size), without it, it passes
        # the frames through.
        limited = video.color_range == "tv" or any(step.endswith("range=tv") for step in colour_chain(video))
        return [f"scale={width}:{height}" + ("" if limited else ":out_range=tv"), f"format={pix_fmt}"]
    source = ":".join(
        f"{key}={value}"
        for key, value in (
            ("tin", _ZSCALE_TRC.get(video.color_trc or "")),
            ("pin", _ZSCALE_PRIMARIES.get(video.color_primaries or "", "2020")),
            ("min", _ZSCALE_MATRIX.get(video.color_space or "", "2020_ncl")),
            ("rin", "full" if video.color_range == "pc" else "limited"),
        )
        if value
    )
    if kind == "wide":
        return [f"zscale=w={width}:h={height}:{source}:p=709:t=709:m=709:r=limited", f"format={pix_fmt}"]
    peak = "" if video.hdr_metadata else ":peak=10"
    return [
        f"zscale=w={width}:h={height}:{source}:t=linear:npl=100",
        "format=gbrpf32le",
        "zscale=p=709",
        f"tonemap=tonemap=hable:desat=0{peak}",
        "zscale=t=709:m=709:r=limited",
        f"format={pix_fmt}",
    ]


def colour_chain(video: StreamInfo) -> list[str]:
    """Filters that give every frame its colour description before anything converts it.

    A file that does not say how its YUV maps to RGB is read as players read it: BT.709 when
    it is HD (wider than 1024 or taller than 576, mpv's rule), BT.601 below; full range only for
    the JPEG formats (MJPEG). The encode then writes these tags into the AV1, so no player has
    to guess, and the thumbnail converts with the same matrix as the video plays with.
    """
    fmt = video.pix_fmt or ""
    if not fmt.startswith(("yuv", "nv", "p0", "p2", "ayuv", "uyvy", "yuyv", "v210")):
        return []  # RGB, grey, palette: no matrix to choose
    hd = (video.width or 0) > 1024 or (video.height or 0) > 576
    standard = "bt709" if hd else "smpte170m"
    params = {}
    if video.color_space is None:
        params["colorspace"] = standard
    if video.color_primaries is None:
        params["color_primaries"] = standard
    if video.color_trc is None:
        params["color_trc"] = standard
    if video.color_range is None:
        params["range"] = "pc" if fmt.startswith("yuvj") else "tv"
    return ["setparams=" + ":".join(f"{k}={v}" for k, v in params.items())] if params else []


def decoder_args(x264_build: int | None) -> tuple[str, ...]:
    """Input options for every run that decodes the video (see StreamInfo.x264_build)."""
    return ("-x264_build", str(x264_build)) if x264_build is not None else ()


def _even(x: float) -> int:
    return max(2, int(x + 0.5) // 2 * 2)


def _target_rate(frame_rate: str | None, max_fps: float) -> Fraction:
    """The source rate, snapped to a standard one if within 1 %, divided down to ``max_fps``.

    Dividing by a whole number (59.94 → 29.97, 50 → 25, 120 → 30) drops frames evenly instead
    of the judder of 59.94 → 30.
    """
    cap = Fraction(max_fps).limit_denominator(1001)
    try:
        source = Fraction(frame_rate) if frame_rate else Fraction(0)
    except (ValueError, ZeroDivisionError):
        source = Fraction(0)
    if source <= 0 or source > 1000:  # unknown, or a timebase posing as a rate
        return cap
    nearest = min(_STANDARD_RATES, key=lambda standard: abs(source - standard))
    rate = nearest if abs(source - nearest) / nearest < 0.01 else source
    if rate > cap:
        rate = rate / math.ceil(rate / cap)
    return rate.limit_denominator(100_000)


def _audio_plan(audio: StreamInfo, loudness: Loudness | None, profiles: Profiles) -> AudioPlan:
    ap = profiles.audio
    channels = max(1, min(audio.channels or 2, ap.max_channels, 2))  # Opus in WebM: mono or stereo
    return AudioPlan(
        sample_rate=ap.sample_rate,
        channels=channels,
        channel_layout="mono" if channels == 1 else "stereo",
        source_sample_rate=audio.sample_rate,
        source_channels=audio.channels,
        loudness=loudness,
        gain_db=_gain(loudness, ap.loudness_i, ap.loudness_tp),
        bitrate=opus_bitrate(audio, channels, ap),
        capped=opus_bitrate(audio, channels, ap) < _bits(ap.bitrate) * channels // 2,
    )


_LOW_BITRATE = 32_000
_LOSSLESS = re.compile(r"^(flac|alac|wavpack|truehd|mlp|tta|ape|pcm_.*)$")


def opus_bitrate(audio: StreamInfo, channels: int, ap: AudioProfile) -> int:
    """Bits per second for the Opus encode: the profile's (per stereo pair; mono half), and from
    a lossy source never more than ``lossy_source_share`` of the source's own bitrate, so that a
    64 kb/s MP3 memo does not come out as a 128 kb/s Opus twice its size for no gain."""
    target = _bits(ap.bitrate) * channels // 2
    if audio.bit_rate and not _LOSSLESS.match(audio.codec):
        target = min(target, int(audio.bit_rate * ap.lossy_source_share))
    return max(_bits(ap.min_bitrate), target) // 1000 * 1000


def _bits(rate: str) -> int:
    """ "128k" -> 128000, "1.5M" -> 1500000, "96000" -> 96000."""
    units = {"k": 1_000, "m": 1_000_000}
    rate = rate.strip().lower()
    return int(float(rate[:-1]) * units[rate[-1]]) if rate[-1:] in units else int(rate)


def _gain(loudness: Loudness | None, target_i: float, target_tp: float) -> float:
    if loudness is None or not math.isfinite(loudness.integrated) or loudness.integrated <= _SILENT_LUFS:
        return 0.0
    gain = target_i - loudness.integrated
    if math.isfinite(loudness.true_peak):
        gain = min(gain, target_tp - loudness.true_peak)
    return round(max(-_MAX_GAIN_DB, min(_MAX_GAIN_DB, gain)), 2)


# True peak (4x oversampled, what the -1.5 dBTP ceiling is defined on), the summary only.
LOUDNESS_FILTER = "ebur128=peak=true:framelog=quiet"
# In the encode's own graph: the sample peak, which ``parse_ebur128`` raises by
# SAMPLE_PEAK_ALLOWANCE_DB to stand for the true peak. The 4x oversampling of ``peak=true`` was a
# fifth of a sound's encode (0.68 -> 0.54 s for a minute of stereo), and on music the two differ
# by 0.0-0.2 dB (11 real files), less than the Opus encode itself moves the peak (docs/decisions.md).
ENCODE_LOUDNESS_FILTER = "ebur128=peak=sample:framelog=quiet"
SAMPLE_PEAK_ALLOWANCE_DB = 0.5


def measure_loudness(
    path: Path,
    ffmpeg_format: str | None,
    *,
    limits: Limits,
    duration: float | None = None,
    progress: Progress | None = None,
) -> Loudness | None:
    """EBU R128 integrated loudness, true peak, range and gate of the first audio stream.

    ``ebur128`` measures the same quantities as a ``loudnorm`` first pass at ~5x the speed
    (0.5 s vs 2.5 s for a minute of stereo here): loudnorm runs its whole dynamic processor
    at 192 kHz even when asked only to print its measurement.
    """
    with open_input(path, ffmpeg_format) as inp:
        result = run_ffmpeg(
            [*inp.args(), "-map", "0:a:0", "-vn", "-sn", "-dn", "-af", LOUDNESS_FILTER, "-f", "null", "-"],
            limits=limits, duration=duration, progress=progress, pass_fds=[inp.fd],
        )  # fmt: skip
    return parse_ebur128(result.stderr)


def parse_ebur128(stderr: str) -> Loudness | None:
    """Read the ``Summary:`` block ebur128 prints at the end. A block with a sample peak only
    (``ENCODE_LOUDNESS_FILTER``) gives that peak plus SAMPLE_PEAK_ALLOWANCE_DB as the true peak."""
    _, found, summary = stderr.rpartition("Summary:")
    if not found:
        return None

    def value(pattern: str) -> float | None:
        m = re.search(pattern + r":\s*(-?inf|-?nan|-?[0-9.]+)", summary)
        return float(m.group(1)) if m else None

    integrated = value(r"\bI")
    lra = value(r"\bLRA")
    threshold = value(r"Threshold")
    peak = value(r"Peak")
    if integrated is None:
        return None
    if peak is not None and "True peak:" not in summary and "Sample peak:" in summary:
        peak += SAMPLE_PEAK_ALLOWANCE_DB
    return Loudness(
        integrated=integrated,
        true_peak=peak if peak is not None else float("-inf"),
        lra=lra or 0.0,
        threshold=threshold if threshold is not None else integrated - 10,
    )


# --- filter ----------------------------------------------------------------------------------


def build_filters(
    plan: NormalizePlan, *, profiles: Profiles, loudness_method: Literal["gain", "loudnorm"] = "gain"
) -> FilterSpec:
    """The filter graphs that apply the plan (the ``filter`` stage: pure, no I/O).

    Loudness, by default, is a single linear gain that reaches the target or stops at the
    true-peak ceiling, i.e. what ``loudnorm`` does in ``linear=true`` mode minus its fallback to
    dynamic compression. With no measurement in the plan, the graph ends in ``ebur128`` and the
    encode writes that gain into the Opus header (``apply_loudness``); with one (an AAC track
    to make, a plan stored by an earlier version) the graph applies it (``volume``).
    ``loudness_method="loudnorm"`` gives the two-pass loudnorm graph (it needs the plan's
    measurement); it costs ~2.7 s per minute of audio (it processes at 192 kHz), which alone
    would break the 20x realtime target for audio.
    """
    video = None
    if plan.video is not None:
        v = plan.video
        # ffmpeg has already rotated the frames (autorotate) when they reach this graph.
        video = ",".join(
            [
                *v.colour,
                f"fps={v.frame_rate}",
                *(v.picture or (f"scale={v.width}:{v.height}:out_range={v.color_range}", f"format={v.pix_fmt}")),
                "setsar=1",
            ]
        )
    audio = None
    in_encode = False
    if plan.audio is not None:
        a = plan.audio
        ap = profiles.audio
        steps = []
        if loudness_method == "loudnorm" and a.loudness is not None and math.isfinite(a.loudness.true_peak):
            m = a.loudness
            steps.append(
                f"loudnorm=I={ap.loudness_i}:TP={ap.loudness_tp}:LRA={ap.loudness_lra}:measured_I={m.integrated}"
                f":measured_TP={m.true_peak}:measured_LRA={m.lra}:measured_thresh={m.threshold}:linear=true"
            )
        steps += [
            f"aresample={a.sample_rate}:async=1",
            f"aformat=sample_fmts=flt:sample_rates={a.sample_rate}:channel_layouts={a.channel_layout}",
        ]
        if loudness_method == "gain" and a.loudness is None:
            # Last, so it measures what the encoder is given: resampled, downmixed.
            steps.append(ENCODE_LOUDNESS_FILTER)
            in_encode = True
        elif loudness_method == "gain" and a.gain_db:
            steps.append(f"volume={a.gain_db}dB")
        audio = ",".join(steps)
    return FilterSpec(video=video, audio=audio, loudness_in_encode=in_encode)


# --- encode ----------------------------------------------------------------------------------


def encode(
    demuxed: DemuxResult,
    demux_dir: Path,
    filters: FilterSpec,
    plan: NormalizePlan,
    out_dir: Path,
    *,
    profiles: Profiles,
    limits: Limits,
    progress: Progress | None = None,
    cancel: Callable[[], bool] | None = None,
) -> EncodeResult:
    """AV1 (SVT-AV1) + Opus, or Opus alone, with a key frame starting every DASH segment; for a
    video, every rung of the ladder (``pipelines.ladder``) from the same decode in the same run.

    Audio alone is written as the deliverable WebM itself (``AUDIO_WEBM``, the cues at the
    front), which the mux stage links instead of copying, and this run does the decode check's
    work (``audio_refusal``): read a little past the longest length we accept, it refuses a
    file that decoded to nothing or to more than the limit, before the gain is written."""
    with _timed("encode", kind=demuxed.kind):
        out_dir.mkdir(parents=True, exist_ok=True)
        vp = profiles.video
        args: list[str] = []
        codecs = []
        rungs: tuple[Rung, ...] = ()
        extra_outputs: list[str] = []
        aac = ""
        if plan.video is not None and filters.video is not None:
            seg = vp.segment_seconds
            # SVT-AV1's own GOP is ~5 s; DASH cuts segments at key frames, so force one at every
            # segment boundary (by time, robust to odd rates) and make the GOP the same length.
            keys = f"expr:gte(t,n_forced*{seg:g})"
            rungs = video_rungs(plan.video, profiles)
            graph, labels = ladder_graph(filters.video, rungs)
            args += [
                "-filter_complex",
                graph,
                "-map",
                labels[0],
                *rung_codec_args(rungs[0], plan.video, profiles, keys),
            ]
            for rung, label in zip(rungs[1:], labels[1:], strict=True):
                extra_outputs += ["-map", label, *rung_codec_args(rung, plan.video, profiles, keys),
                                  "-an", *_CLEAN, "-f", "matroska", str(out_dir / rung.file)]  # fmt: skip
            codecs.append("av1")
        else:
            args += ["-vn"]
        if plan.audio is not None and filters.audio is not None:
            args += ["-map", "0:a:0", "-af", filters.audio, *audio_codec_args(plan.audio, profiles)]
            codecs.append("opus")
            if any(r.codec == "h264" for r in rungs):  # its own output of the same decoded audio
                aac = h264.AAC_FILE
                extra_outputs += ["-map", "0:a:0", "-af", filters.audio, *h264.aac_args(plan.audio, profiles),
                                  "-vn", *_CLEAN, "-f", "matroska", str(out_dir / h264.AAC_FILE)]  # fmt: skip
        else:
            args += ["-an"]
        if demuxed.kind == "video":
            name = "encoded.mkv"
            args += [*_CLEAN, "-f", "matroska", str(out_dir / name), *extra_outputs]
        else:
            # The cues-first WebM ``mux`` made by copying this run's Matroska, byte for byte: without
            # the encoder's name on the track, which the copy's -map_metadata -1 dropped.
            name = AUDIO_WEBM
            args += [*audio_bound(limits), *_CLEAN, "-metadata:s:a:0", "encoder=", "-f", "webm",
                     "-cues_to_front", "1", str(out_dir / name)]  # fmt: skip
        decoding = decoder_args(plan.video.x264_build) if plan.video is not None else ()
        with open_input(demux_dir / demuxed.file, demuxed.ffmpeg_format) as inp:
            result = run_ffmpeg(
                [*inp.args(*decoding), *args], limits=limits, duration=plan.duration, progress=progress,
                cancel=cancel, pass_fds=[inp.fd],
            )  # fmt: skip
        if demuxed.kind == "audio":
            refused = audio_refusal(result.out_time, limits, result)
            if refused is not None:
                raise refused
        loudness, gain = apply_loudness(out_dir / name, filters, result.stderr, profiles)
        return EncodeResult(
            kind=demuxed.kind,
            file=name,
            codec="+".join(codecs),
            width=plan.video.width if plan.video else None,
            height=plan.video.height if plan.video else None,
            duration=round(result.out_time, 3) if result.out_time else plan.duration,
            seconds=round(result.seconds, 3),
            rungs=rungs,
            loudness=loudness,
            gain_db=gain,
            aac=aac,
        )


def apply_loudness(
    encoded: Path, filters: FilterSpec, stderr: str, profiles: Profiles
) -> tuple[Loudness | None, float | None]:
    """After an encode whose audio graph measured (``FilterSpec.loudness_in_encode``): the gain
    that reaches the profile's target without passing its true-peak ceiling (the rule of
    ``_gain``), written into the Opus header of ``encoded`` (``pipelines.opus_gain``), which
    decoders apply to every sample. Returns the measurement and the gain written.

    The header holds the gain to 1/256 dB; a file is changed in two bytes, keeping its size.
    """
    if not filters.loudness_in_encode:
        return None, None
    loudness = parse_ebur128(stderr)
    if loudness is None:
        # The summary is ffmpeg's last words: without it the encode did not end as it should.
        raise MediaError("The audio could not be measured for its loudness.", detail=stderr[-2000:])
    ap = profiles.audio
    gain = _gain(loudness, ap.loudness_i, ap.loudness_tp)
    opus_gain.write_gain(encoded, gain)
    return loudness, gain


_CLEAN = ("-sn", "-dn", "-map_metadata", "-1", "-map_chapters", "-1")
AUDIO_WEBM = "media.webm"  # what the encode of audio alone writes, and the mux stage delivers


def video_rungs(video: VideoPlan, profiles: Profiles) -> tuple[Rung, ...]:
    """The ladder for this plan: the top AV1 rung at the planned size first."""
    return plan_ladder(video.width, video.height, video.max_bitrate, profiles.video)


def ladder_graph(video_filter: str, rungs: tuple[Rung, ...], *, source: str = "[0:v:0]") -> tuple[str, list[str]]:
    """One ``-filter_complex`` graph: the video filter once, then a cascade of scales, each size
    made once from the next larger one (1080 -> 720 -> 486 -> 360 -> 234) and ``split`` to the
    rungs of that size (the AV1 and VP9 360s share one). The graph runs on one thread while the
    encoders wait for it: five scales each from 1080p cost 5.7 s of CPU for 20 s of 1080p, the
    cascade 2.2 s. Returns the graph and the output label of each rung, in order."""
    if len(rungs) == 1:
        return f"{source}{video_filter}[r0]", ["[r0]"]
    sizes: list[tuple[int, int]] = []
    for rung in sorted(rungs, key=lambda r: -(r.width * r.height)):
        if (rung.width, rung.height) not in sizes:
            sizes.append((rung.width, rung.height))
    parts: list[str] = []
    head = f"{source}{video_filter}"
    for k, (w, h) in enumerate(sizes):
        if k:
            head = f"[c{k}]scale={w}:{h},setsar=1"  # rungs keep the aspect exactly (ladder)
        outs = [f"[r{i}]" for i, r in enumerate(rungs) if (r.width, r.height) == (w, h)]
        if k + 1 < len(sizes):
            outs.append(f"[c{k + 1}]")
        parts.append(f"{head},split={len(outs)}{''.join(outs)}" if len(outs) > 1 else f"{head}{outs[0]}")
    return ";".join(parts), [f"[r{i}]" for i in range(len(rungs))]


def rung_codec_args(rung: Rung, video: VideoPlan, profiles: Profiles, key_frames: str) -> list[str]:
    """The encoder's options for one rung: AV1 as ``video_codec_args`` with the rung's cap, or
    VP9 (libvpx-vp9, constrained quality, the same GOP and forced key frames), or H.264."""
    vp = profiles.video
    if rung.codec == "h264":
        return h264.codec_args(rung, video, profiles, key_frames)
    if rung.codec == "av1":
        if rung.file != TOP and vp.ladder_preset_step:
            faster = dataclasses.replace(vp, preset=min(13, vp.preset + vp.ladder_preset_step))
            profiles = dataclasses.replace(profiles, video=faster)
        return video_codec_args(dataclasses.replace(video, max_bitrate=rung.max_bitrate), profiles, key_frames)
    args = [
        "-c:v", "libvpx-vp9", "-deadline", vp.vp9_deadline, "-cpu-used", str(vp.vp9_cpu_used), "-row-mt", "1",
        "-crf", str(vp.vp9_crf), "-b:v", str(rung.max_bitrate), "-pix_fmt", vp.pix_fmt,
        "-color_range", video.color_range, "-g", str(video.gop), "-force_key_frames", key_frames,
    ]  # fmt: skip
    if vp.threads > 0:
        args += ["-threads", str(vp.threads)]
    return args


def audio_codec_args(a: AudioPlan, profiles: Profiles) -> list[str]:
    """The Opus encoder's options (the whole-file encode's, and the chunked path's audio task)."""
    ap = profiles.audio
    args = ["-c:a", ap.codec, "-b:a", str(a.bitrate or ap.bitrate)]
    if a.capped and ap.codec == "libopus":
        args += ["-vbr", "constrained"]
        if a.bitrate < _LOW_BITRATE:
            # 60 ms frames: a third of the per-packet overhead, which at 10 kb/s is 15 %.
            args += ["-frame_duration", "60"]
    return args


def video_codec_args(video: VideoPlan, profiles: Profiles, key_frames: str) -> list[str]:
    """The AV1 encoder's options, shared by the whole-file encode and the chunk encodes (so a
    chunk is encoded exactly as its stretch of the whole file would be)."""
    vp = profiles.video
    args = [
        "-c:v", vp.codec, "-preset", str(vp.preset), "-crf", str(vp.crf), "-pix_fmt", vp.pix_fmt,
        "-color_range", video.color_range, "-g", str(video.gop), "-force_key_frames", key_frames,
    ]  # fmt: skip
    if vp.threads > 0 and vp.codec == "libsvtav1":
        # SVT-AV1 ignores -threads; lp= bounds the cores it uses, so workers x threads = cores.
        args += ["-svtav1-params", f"lp={vp.threads}"]
    if video.max_bitrate:
        cap = video.max_bitrate
        args += ["-maxrate", str(cap), "-bufsize", str(2 * cap)]
    return args


# --- mux -------------------------------------------------------------------------------------


def mux(encoded: EncodeResult, encode_dir: Path, out_dir: Path, *, limits: Limits) -> MuxResult:
    """Copy into WebM with the cues (the seek index) at the front, so players seek at once.

    An encode that wrote that WebM itself (audio, ``AUDIO_WEBM``) is linked, not copied: the
    copy was a pass of its own (0.05 s of a 60 s song's 0.79 s) that changed no byte a player
    reads. Nor is it probed: it is one Opus track the encode has just written, refused if it
    held no sound, and its length is the Segment's (``opus_gain.read_duration``, what the probe
    reported); the probe, in a child forked from the worker, was 0.01-0.03 s more. A Matroska
    encode stored by an earlier version is copied and probed as before."""
    with _timed("mux", kind=encoded.kind):
        out_dir.mkdir(parents=True, exist_ok=True)
        dst = out_dir / "media.webm"
        if encoded.file.endswith(".webm"):
            dst.unlink(missing_ok=True)
            _link_or_copy(encode_dir / encoded.file, dst)
            duration = opus_gain.read_duration(dst) if encoded.kind == "audio" else None
            if duration:
                output = Output(role="audio", file=dst.name, content_type="audio/webm", codec=encoded.codec,
                                duration=round(duration, 3), bytes=dst.stat().st_size)  # fmt: skip
                return MuxResult(kind=encoded.kind, file=dst.name, outputs=(output,))
        else:
            with open_input(encode_dir / encoded.file, MATROSKA) as inp:
                cmd = (
                    ffmpeg.input("fd:", **inp.options)
                    .output(str(dst), c="copy", f="webm", cues_to_front=1, map_metadata=-1, **{"map": "0"})
                    .compile(cmd=ffmpeg_exe())
                )
                run_ffmpeg(cmd, limits=limits, pass_fds=[inp.fd])
        info = probe(dst, limits=limits, ffmpeg_format=MATROSKA)
        video, audio = info.video, info.audio
        if video is None and audio is None:
            raise MediaError("The converted file came out empty.")
        is_video = video is not None
        codec = "+".join(c for c in (video.codec if video else "", audio.codec if audio else "") if c)
        output = Output(
            role="video" if is_video else "audio",
            file=dst.name,
            content_type="video/webm" if is_video else "audio/webm",
            codec=codec,
            width=video.width if video else None,
            height=video.height if video else None,
            duration=round(info.media_duration, 3) if info.media_duration else None,
            bytes=dst.stat().st_size,
        )
        return MuxResult(kind=encoded.kind, file=dst.name, outputs=(output,))


# --- chunk -----------------------------------------------------------------------------------


def chunk(
    muxed: MuxResult,
    mux_dir: Path,
    out_dir: Path,
    *,
    profiles: Profiles,
    limits: Limits,
    encoded: EncodeResult | None = None,
    encode_dir: Path | None = None,
) -> ChunkResult:
    """Cut the WebM, and the ladder's other rungs from the encode, into DASH segments (copy, no
    re-encode) at the key frames the encode placed, all rungs on the same ones.

    Adaptation sets: the AV1 rungs (the WebM's video first), the VP9 rungs, the Opus audio, so
    a player picks the codec it can decode and then switches between that set's rungs; with the
    profile's H.264 fallback, also its H.264 rungs and AAC audio in MP4 segments (``h264``).
    """
    with _timed("chunk", kind=muxed.kind):
        out_dir.mkdir(parents=True, exist_ok=True)
        seg = profiles.video.segment_seconds
        main = muxed.outputs[0]
        has_video = main.role == "video"
        has_audio = main.role == "audio" or "opus" in main.codec
        others = list(encoded.rungs[1:]) if encoded and encode_dir and has_video else []
        aac = encoded.aac if encoded and encode_dir and has_video else ""
        # Input order: the WebM, the other rungs, the fallback's AAC; each output's stream order:
        # video rungs, audio last. The H.264/AAC fallback (MP4 segments) is a second output.
        files = [mux_dir / muxed.file, *[encode_dir / f for f in [r.file for r in others] + [aac] if f and encode_dir]]
        maps: list[str] = []
        mp4_maps: list[str] = []
        codec_of: list[str] = []
        mp4_codecs: list[str] = []
        if has_video:
            maps += ["-map", "0:v:0"]
            codec_of.append("av1")
        for i, rung in enumerate(others, start=1):
            (mp4_maps if rung.codec == "h264" else maps).extend(["-map", f"{i}:v:0"])
            (mp4_codecs if rung.codec == "h264" else codec_of).append(rung.codec)
        if has_audio:
            maps += ["-map", "0:a:0"]
            codec_of.append("opus")
        if aac:
            mp4_maps += ["-map", f"{len(others) + 1}:a:0"]
            mp4_codecs.append("aac")
        manifest = out_dir / "manifest.mpd"
        fallback = out_dir / "fallback"
        dash = [*_dash_args(codec_of, "webm", seg), str(manifest)]
        if mp4_maps:
            shutil.rmtree(fallback, ignore_errors=True)
            fallback.mkdir()
            dash += [*mp4_maps, *_dash_args(mp4_codecs, "mp4", seg), str(fallback / manifest.name)]
        with contextlib.ExitStack() as stack:
            inputs = [stack.enter_context(open_input(f, MATROSKA)) for f in files]
            run_ffmpeg([*[a for inp in inputs for a in inp.args()], *maps, *dash], limits=limits,
                       pass_fds=[inp.fd for inp in inputs])  # fmt: skip
        if mp4_maps:
            h264.merge_manifest(manifest, fallback, first_id=len(codec_of))
            codec_of += mp4_codecs
        outputs = [
            Output(
                role="manifest",
                file=manifest.name,
                content_type="application/dash+xml",
                bytes=manifest.stat().st_size,
            )
        ]
        segments = [*out_dir.glob("*.webm"), *out_dir.glob("*.m4s")]
        for path in sorted(segments, key=_segment_order):
            rep = path.stem.split("-")[1]
            codec = codec_of[int(rep)] if rep.isdigit() and int(rep) < len(codec_of) else "opus"
            kind = "audio" if codec in ("opus", "aac") else "video"
            outputs.append(
                Output(
                    role="segment",
                    file=path.name,
                    content_type=f"{kind}/{'mp4' if path.suffix == '.m4s' else 'webm'}",
                    codec=codec,
                    bytes=path.stat().st_size,
                )
            )
        return ChunkResult(manifest=manifest.name, segment_seconds=seg, outputs=tuple(outputs))


def _dash_args(codecs: list[str], segment_type: str, seg: float) -> list[str]:
    """One dash output's options: an adaptation set per codec (in ladder order), the stage's
    segment names (``$ext$``: webm, or m4s for MP4 segments)."""
    sets: list[str] = []
    for codec in ("av1", "vp9", "h264", "opus", "aac"):
        ids = [str(i) for i, c in enumerate(codecs) if c == codec]
        if ids:
            sets.append(f"id={len(sets)},streams={','.join(ids)}")
    return ["-c", "copy", "-f", "dash", "-dash_segment_type", segment_type,
            "-seg_duration", f"{seg:g}", "-use_template", "1", "-use_timeline", "1",
            "-adaptation_sets", " ".join(sets),
            "-init_seg_name", "init-$RepresentationID$.$ext$",
            "-media_seg_name", "chunk-$RepresentationID$-$Number%05d$.$ext$"]  # fmt: skip


def _segment_order(path: Path) -> tuple[str, int, int]:
    # init-<rep>.webm first, then chunk-<rep>-<n>.webm in number order (.m4s likewise).
    parts = path.stem.split("-")
    number = int(parts[2]) if len(parts) > 2 and parts[2].isdigit() else -1
    return (parts[1] if len(parts) > 1 else "", 0 if parts[0] == "init" else 1, number)


# --- previews --------------------------------------------------------------------------------


def previews(
    demuxed: DemuxResult, demux_dir: Path, out_dir: Path, *, profiles: Profiles, limits: Limits
) -> PreviewResult:
    """A WebP thumbnail that is a frame of the video, never a black one when any other exists.

    The first try decodes only key frames from a third of the way in and lets ffmpeg's
    ``thumbnail`` filter pick the most typical of a few: that costs a handful of frame decodes,
    whatever the length. Black results fall back to decoding a second of every frame at other
    points; the brightest candidate wins if all are dark. A picture shorter than two seconds (a
    short clip, one still frame over a podcast's audio) is taken from its start, and so is the
    last resort: the first frame that decodes. A thumbnail never fails the item: with no frame
    at all (the decode stage has proved there is one) the video simply has none.

    The frame passes through the same colour chain as the encode (``colour_chain``), and is
    converted to WebP's BT.601 with the matrix that chain set, so it shows what the video shows.
    ``at`` is the chosen frame's own time, read from ``showinfo``.
    """
    with _timed("previews", kind=demuxed.kind):
        video = demuxed.info.video
        if demuxed.kind != "video" or video is None or video.display_size is None:
            return PreviewResult(outputs=())
        out_dir.mkdir(parents=True, exist_ok=True)
        tp = profiles.thumbnail
        dw, dh = video.display_size
        width = _even(min(tp.width, dw))
        height = _even(dh * width / dw)
        span = _picture_span(video, demuxed.duration)
        dst = out_dir / "thumbnail.webp"
        fps = video.fps if video.fps and 0 < video.fps <= 240 else 25.0
        window = max(2, min(round(fps), 60))  # about a second of frames for the full-decode tries
        tries: list[tuple[float | None, bool]] = []
        if span >= _SHORT_PICTURE:
            tries += [(span / 3, True)]
            tries += [(span * f, False) for f in (1 / 3, 1 / 2, 2 / 3, 0.1, 0.9)]
        tries.append((None, False))  # from the start: short pictures, and the last resort
        best: tuple[float, float, bytes] | None = None
        shot = _Shot(
            chain=",".join([*colour_chain(video), ""]),
            picture=",".join(picture_steps(video, width, height)),
            decoding=decoder_args(video.x264_build),
            quality=tp.quality,
        )
        for at, keyframes in tries:
            got = _thumbnail_at(demuxed, demux_dir, out_dir, shot, at=at, keyframes_only=keyframes,
                                frames=3 if keyframes else window, limits=limits)  # fmt: skip
            if got is None:
                continue
            if best is None or got[1] > best[1]:
                best = got
            if got[1] >= _BLACK_LUMA:
                break
        if best is None:
            log.warning("previews: no frame of %s could be decoded for a thumbnail", demuxed.file)
            return PreviewResult(outputs=())
        frame_time, luma, data = best
        dst.write_bytes(data)
        output = Output(
            role="thumbnail",
            file=dst.name,
            content_type="image/webp",
            codec="webp",
            width=width,
            height=height,
            bytes=len(data),
        )
        return PreviewResult(outputs=(output,), at=round(frame_time, 3), luma=round(luma, 1))


def storyboards(
    demuxed: DemuxResult,
    demux_dir: Path,
    out_dir: Path,
    *,
    profiles: Profiles,
    limits: Limits,
    cancel: Callable[[], bool] | None = None,
) -> tuple[Output, ...]:
    """The storyboard sheet and its WebVTT index (``pipelines.storyboard``), through the same
    colour chain and picture steps as the thumbnail; none for audio or a picture-less file.
    Apart from ``previews``: it decodes the whole video, so the worker runs it beside the encode
    while the thumbnail is shown at once."""
    video = demuxed.info.video
    if demuxed.kind != "video" or video is None or video.display_size is None:
        return ()
    dw, dh = video.display_size
    return storyboard(
        demux_dir / demuxed.file,
        demuxed.ffmpeg_format,
        out_dir,
        duration=_picture_span(video, demuxed.duration),
        width=dw,
        height=dh,
        prelude=",".join([*colour_chain(video), ""]),
        picture=lambda w, h: ",".join(picture_steps(video, w, h)),
        decoding=decoder_args(video.x264_build),
        sp=profiles.storyboard,
        limits=limits,
        cancel=cancel,
    )


_SHORT_PICTURE = 2.0  # seconds of picture under which a thumbnail is taken from the start
_SHOWINFO_TIME = re.compile(r"Parsed_showinfo.*\bpts_time:\s*(-?[0-9.]+)")


@dataclass(frozen=True)
class _Shot:
    chain: str  # the colour chain, each filter followed by a comma ("" for none)
    picture: str  # picture_steps at the thumbnail's size: resized, SDR, limited range
    decoding: tuple[str, ...]  # decoder options
    quality: int


def _picture_span(video: StreamInfo, duration: float | None) -> float:
    """How long the picture lasts: the video stream's own duration when the file says, since a
    podcast's one still frame sits in a file as long as its audio."""
    known = [d for d in (video.duration, duration) if d]
    return min(known) if known else 0.0


def _thumbnail_at(
    demuxed: DemuxResult,
    demux_dir: Path,
    out_dir: Path,
    shot: _Shot,
    *,
    at: float | None,
    keyframes_only: bool,
    frames: int,
    limits: Limits,
) -> tuple[float, float, bytes] | None:
    """One ffmpeg run: the most typical of ``frames`` frames from ``at`` (None: the start), as
    WebP and as 32x32 grey for its luma. Returns (frame time, luma, WebP) or None."""
    webp, grey = out_dir / ".candidate.webp", out_dir / ".candidate.grey"
    for p in (webp, grey):
        p.unlink(missing_ok=True)
    # -copyts: frame times stay the file's own, so showinfo tells which frame this is.
    extra = [*shot.decoding, "-copyts"]
    if at is not None:
        extra += ["-ss", f"{at:.3f}"]
    if keyframes_only:
        extra = ["-bsf:v", "noise=drop=not(key)", *extra]
    graph = (
        f"[0:v:0]{shot.chain}thumbnail=n={frames}:log=quiet,showinfo,{shot.picture},split=2[t][g];"
        # WebP stores BT.601 limited-range YUV: convert to it from what the frames are tagged as.
        f"[t]scale=out_color_matrix=bt601:out_range=tv,setsar=1,format=yuv420p[thumb];"
        f"[g]scale=32:32,format=gray[grey]"
    )
    try:
        with open_input(demux_dir / demuxed.file, demuxed.ffmpeg_format) as inp:
            result = run_ffmpeg(
                [*inp.args(*extra), "-filter_complex", graph, "-an", "-sn",
                 "-map", "[thumb]", "-frames:v", "1", "-c:v", "libwebp", "-quality", str(shot.quality),
                 "-compression_level", "4", "-f", "webp", str(webp),
                 "-map", "[grey]", "-frames:v", "1", "-f", "rawvideo", str(grey)],
                limits=limits, timeout=min(limits.wall_seconds, 120.0), pass_fds=[inp.fd],
            )  # fmt: skip
        data, pixels = webp.read_bytes(), grey.read_bytes()
    except MediaError as exc:
        if exc.retryable or isinstance(exc, (TooLarge, Cancelled)):
            raise
        return None  # nothing decodes here (past the last frame, a damaged stretch): try elsewhere
    except FileNotFoundError:
        return None
    finally:
        for p in (webp, grey):
            p.unlink(missing_ok=True)
    if not data or not pixels:
        return None
    times = _SHOWINFO_TIME.findall(result.stderr)
    frame_time = float(times[0]) if times else (at or 0.0)
    return frame_time, sum(pixels) / len(pixels), data


# --- helpers ---------------------------------------------------------------------------------


def _tail(result: RunResult, lines: int = 20) -> str:
    return "\n".join(result.stderr.splitlines()[-lines:])


@contextmanager
def _timed(stage: str, **fields: object) -> Iterator[None]:
    """One structured log line per stage, with its wall time and outcome."""
    started = time.monotonic()
    outcome = "ok"
    try:
        yield
    except MediaError as exc:
        outcome = exc.code
        raise
    except BaseException:
        outcome = "crash"
        raise
    finally:
        log.info(
            "stage %s %s in %.2f s",
            stage,
            outcome,
            time.monotonic() - started,
            extra={
                "stage": stage,
                "outcome": outcome,
                "seconds": round(time.monotonic() - started, 3),
                **fields,
            },
        )
