"""What kind of item an upload is, decided from its content before any chain is built.

The kind picks the chain (and the queue), so it must be known first: magic bytes say image or
"audio/video container", and a sandboxed probe tells video from audio (an MKV or MP4 may hold
only sound; an MP3's cover art is not a video).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipelines.errors import InvalidInput
from pipelines.probe import MediaInfo, check_limits, probe
from pipelines.profiles import Limits
from pipelines.results import to_json
from pipelines.sniff import TAGGED, Kind, Sniffed, sniff


@dataclass(frozen=True)
class Detected:
    kind: Kind
    mime: str
    duration: float | None
    summary: dict[str, Any]
    # What later stages need so that they neither sniff nor probe the upload again.
    sniffed: Sniffed | None = None
    info: MediaInfo | None = None


def detect(path: Path, *, limits: Limits, sniffed: Sniffed | None = None) -> Detected:
    """Sniff (unless the caller already did, on the same bytes) and probe the upload, once."""
    if sniffed is None or sniffed.container == TAGGED:
        # Not sniffed yet, or the web's head ended inside a tag: read past it, in the file itself.
        sniffed = sniff(path)
    if sniffed.kind == "image":
        return Detected("image", sniffed.mime, None, {"container": sniffed.container}, sniffed)
    info = probe(path, limits=limits, ffmpeg_format=sniffed.ffmpeg_format)
    check_limits(info, limits)
    if info.video is not None:
        kind: Kind = "video"
    elif info.audio is not None:
        kind = "audio"
    else:
        raise InvalidInput("The file has no video or audio we can read.")
    mime = sniffed.mime
    if kind == "audio" and mime.startswith("video/"):
        mime = "audio/" + mime.split("/", 1)[1]
    summary = {"container": info.container, "streams": to_json(info.streams)}
    return Detected(kind, mime, info.media_duration, summary, sniffed, info)
