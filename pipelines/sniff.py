"""Decide what a file is from its first bytes, never from its name or declared type.

Only containers on the allow-list pass. A recognised format outside it is
``unsupported_codec`` (we know what it is and say so); anything unrecognised, including text
such as SVG, MVG, HTML, PHP or an HLS playlist, is ``invalid_input``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pipelines.errors import InvalidInput, UnsupportedCodec

Kind = Literal["video", "audio", "image"]

HEIF_BRANDS = {b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"mif1", b"msf1", b"avif", b"avis"}
AUDIO_MP4_BRANDS = {b"M4A ", b"M4B ", b"M4P ", b"F4A "}


@dataclass(frozen=True)
class Sniffed:
    container: str  # our name for the container: mp4, matroska, avi, ogg, mp3, ...
    kind: Kind  # best guess from the bytes; a probe refines video vs audio
    mime: str
    # ffmpeg demuxer to force, so ffmpeg never guesses (and never picks a playlist demuxer).
    ffmpeg_format: str | None = None


# Formats we recognise and refuse by name, so the message says what the file is.
_REFUSED = [
    (b"II*\x00", "TIFF image"),
    (b"MM\x00*", "TIFF image"),
    (b"8BPS", "Photoshop document"),
    (b"BM", "BMP image"),
    (b"DDS ", "DDS texture"),
    (b"\x00\x00\x01\x00", "Windows icon"),
    (b"\x00\x00\x00\x0cjP  \r\n\x87\n", "JPEG 2000 image"),
    (b"\xff\x4f\xff\x51", "JPEG 2000 image"),
    (b"\x01\xda", "SGI image"),
    (b"PK\x03\x04", "ZIP archive"),
    (b"%PDF", "PDF document"),
    (b"\x1f\x8b", "gzip archive"),
    (b"Rar!", "RAR archive"),
    (b"7z\xbc\xaf", "7-Zip archive"),
    (b"\x7fELF", "program"),
    (b"MZ", "Windows program"),
]


def sniff_bytes(head: bytes) -> Sniffed:
    """Classify by magic bytes; ``head`` should be the first 64 bytes or more."""
    if not head:
        raise InvalidInput("The file is empty.")
    if head.startswith(b"\xff\xd8\xff"):
        return Sniffed("jpeg", "image", "image/jpeg")
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return Sniffed("png", "image", "image/png")
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return Sniffed("gif", "image", "image/gif")
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return Sniffed("webp", "image", "image/webp")
    if head[:4] == b"RIFF" and head[8:12] == b"WAVE":
        return Sniffed("wav", "audio", "audio/wav", "wav")
    if head[:4] == b"RIFF" and head[8:12] == b"AVI ":
        return Sniffed("avi", "video", "video/x-msvideo", "avi")
    if head[4:8] == b"ftyp":
        major = head[8:12]
        brands = {head[i : i + 4] for i in range(16, min(len(head), int.from_bytes(head[:4], "big")), 4)}
        brands.add(major)
        if major in HEIF_BRANDS or (brands & HEIF_BRANDS and not brands & {b"isom", b"mp41", b"mp42"}):
            return Sniffed("heif", "image", "image/heic")
        if major in AUDIO_MP4_BRANDS:
            return Sniffed("mp4", "audio", "audio/mp4", "mov,mp4,m4a,3gp,3g2,mj2")
        if major == b"qt  ":
            return Sniffed("mov", "video", "video/quicktime", "mov,mp4,m4a,3gp,3g2,mj2")
        return Sniffed("mp4", "video", "video/mp4", "mov,mp4,m4a,3gp,3g2,mj2")
    if head.startswith(b"\x1a\x45\xdf\xa3"):
        if b"webm" in head[:64]:
            return Sniffed("webm", "video", "video/webm", "matroska,webm")
        return Sniffed("matroska", "video", "video/x-matroska", "matroska,webm")
    if head.startswith(b"OggS"):
        return Sniffed("ogg", "audio", "audio/ogg", "ogg")
    if head.startswith(b"fLaC"):
        return Sniffed("flac", "audio", "audio/flac", "flac")
    if head.startswith(b"ID3") or (head[0] == 0xFF and head[1] & 0xE0 == 0xE0 and head[1] & 0x06 != 0):
        return Sniffed("mp3", "audio", "audio/mpeg", "mp3")
    if head[0] == 0xFF and head[1] & 0xF6 == 0xF0:
        return Sniffed("aac", "audio", "audio/aac", "aac")
    for magic, name in _REFUSED:
        if head.startswith(magic):
            raise UnsupportedCodec(f"{name[0].upper()}{name[1:]} files are not supported.")
    raise InvalidInput("The file is not a video, audio or image file we can read.")


def sniff(path: Path) -> Sniffed:
    with open(path, "rb") as fh:
        head = fh.read(256)
    return sniff_bytes(head)
