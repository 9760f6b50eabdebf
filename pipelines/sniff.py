"""Decide what a file is from its first bytes, never from its name or declared type.

``FORMATS`` is the one table of what we accept: the sniffer returns only its rows, the ffmpeg
demuxer allow-list (``pipelines.runner.ALLOWED_DEMUXERS``) and the upload content types
(``ACCEPTED_MIMES``) are read from it, so a format is either accepted end to end or refused.
A recognised format outside it is ``unsupported_codec`` with a sentence that names it; anything
unrecognised, including text such as SVG, MVG, HTML, PHP or an HLS playlist, is ``invalid_input``.

The web process sees only the first ``HEAD_BYTES`` of an upload, so every rule decides from
those. The one thing that can push the real header further is a tag in front of the audio
(ID3v2 with cover art runs to megabytes): ``sniff_bytes`` then answers "audio behind a tag"
(``container == TAGGED``), which the worker resolves with ``sniff`` on the whole file.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Literal

from pipelines.errors import InvalidInput, UnsupportedCodec

Kind = Literal["video", "audio", "image"]

HEAD_BYTES = 4096  # what the web process reads (media_app.uploads.SNIFF_BYTES)

HEIF_BRANDS = {b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"mif1", b"msf1", b"avif", b"avis"}
AUDIO_MP4_BRANDS = {b"M4A ", b"M4B ", b"M4P ", b"F4A "}
_MOV = "mov,mp4,m4a,3gp,3g2,mj2"
# Top-level QuickTime boxes that may come first when a camera writes no ``ftyp`` box.
_QT_FIRST_BOXES = {b"moov", b"mdat", b"wide", b"free", b"skip", b"pnot", b"junk", b"uuid"}
_W64_RIFF = b"riff\x2e\x91\xcf\x11\xa5\xd6\x28\xdb\x04\xc1\x00\x00"
_W64_WAVE = b"wave\xf3\xac\xd3\x11\x8c\xd1\x00\xc0\x4f\x8e\xdb\x8a"
_MXF_PARTITION = b"\x06\x0e\x2b\x34\x02\x05\x01\x01\x0d\x01\x02\x01\x01\x02"
_TS_STRIDES = (188, 192, 204)  # plain TS, M2TS/MTS (4-byte timestamp first), TS with FEC
TAGGED = "tagged"
_TAGGABLE = {"mp3", "aac", "flac"}  # what may follow an ID3v2/APEv2 tag at the front


@dataclass(frozen=True)
class Sniffed:
    container: str  # our name for the container: mp4, matroska, avi, ogg, mp3, ...
    kind: Kind  # best guess from the bytes; a probe refines video vs audio
    mime: str
    # ffmpeg demuxer to force, so ffmpeg never guesses (and never picks a playlist demuxer).
    ffmpeg_format: str | None = None

    @property
    def label(self) -> str:
        """What a person calls the format, for sentences ("Flash Video (FLV)")."""
        return label(self.container)


@dataclass(frozen=True)
class Format:
    """One accepted format: what ``sniff_bytes`` returns for it, and how to name it."""

    container: str
    kind: Kind
    mime: str
    label: str
    ffmpeg_format: str | None = None  # None: an image, read by Pillow
    # For the upload page's first filter (a browser's type is often empty or its own name): the
    # file name endings and the other types browsers report for this format. The bytes decide.
    extensions: tuple[str, ...] = ()
    aliases: tuple[str, ...] = ()


FORMATS: tuple[Format, ...] = (
    # Video containers (a probe may find only sound in them: then the item is audio).
    Format("mp4", "video", "video/mp4", "MP4 video", _MOV,  # also 3GP/3G2 and brandless ISO files
           (".mp4", ".m4v", ".3gp", ".3g2", ".3gpp"), ("video/3gpp", "video/3gpp2", "video/x-m4v")),
    Format("mov", "video", "video/quicktime", "QuickTime movie (MOV)", _MOV, (".mov", ".qt")),
    Format("webm", "video", "video/webm", "WebM video", "matroska,webm", (".webm",)),
    Format("matroska", "video", "video/x-matroska", "Matroska video (MKV)", "matroska,webm", (".mkv",)),
    Format("avi", "video", "video/x-msvideo", "AVI video", "avi", (".avi",), ("video/avi", "video/msvideo")),
    Format("mpegts", "video", "video/mp2t", "MPEG transport stream (TS/MTS/M2TS)", "mpegts",
           (".ts", ".mts", ".m2ts", ".m2t", ".tod"), ("video/vnd.dlna.mpeg-tts", "video/mp2ts")),
    Format("mpeg", "video", "video/mpeg", "MPEG program stream (MPG/VOB)", "mpeg",
           (".mpg", ".mpeg", ".vob", ".mod", ".m1v", ".m2v", ".mpv"), ("video/x-ms-vob", "video/dvd")),
    Format("mpegvideo", "video", "video/mpeg", "MPEG video stream", "mpegvideo", (".m1v", ".m2v")),
    Format("flv", "video", "video/x-flv", "Flash Video (FLV)", "flv", (".flv", ".f4v")),
    Format("mxf", "video", "application/mxf", "MXF video", "mxf", (".mxf",)),
    # Audio.
    Format("mp4", "audio", "audio/mp4", "MP4 audio (M4A)", _MOV, (".m4a", ".m4b"), ("audio/x-m4a", "audio/m4a")),
    Format("mp3", "audio", "audio/mpeg", "MP3 audio", "mp3", (".mp3",), ("audio/mp3",)),
    Format("aac", "audio", "audio/aac", "AAC audio (ADTS)", "aac", (".aac",), ("audio/x-aac", "audio/aacp")),
    Format("flac", "audio", "audio/flac", "FLAC audio", "flac", (".flac",), ("audio/x-flac",)),
    Format("ogg", "audio", "audio/ogg", "Ogg audio", "ogg", (".ogg", ".oga", ".opus"), ("audio/opus",)),
    Format("wav", "audio", "audio/wav", "WAV audio", "wav",  # RIFF, RIFX, RF64 and BW64
           (".wav", ".wave", ".bwf", ".rf64"), ("audio/x-wav", "audio/wave", "audio/vnd.wave")),
    Format("w64", "audio", "audio/x-w64", "Wave64 audio", "w64", (".w64",)),
    Format("aiff", "audio", "audio/aiff", "AIFF audio", "aiff", (".aif", ".aiff", ".aifc"), ("audio/x-aiff",)),
    Format("caf", "audio", "audio/x-caf", "Core Audio (CAF)", "caf", (".caf",)),
    Format("wavpack", "audio", "audio/x-wavpack", "WavPack audio", "wv", (".wv",), ("audio/wavpack",)),
    Format("ac3", "audio", "audio/ac3", "AC-3 audio", "ac3", (".ac3",), ("audio/x-ac3", "audio/vnd.dolby.dd-raw")),
    Format("eac3", "audio", "audio/eac3", "E-AC-3 audio", "eac3", (".eac3", ".ec3")),
    Format("amr", "audio", "audio/amr", "AMR audio", "amr", (".amr",), ("audio/3gpp",)),
    # Images (AVIF is sniffed as HEIF: same container; pipelines.images tells them apart).
    Format("jpeg", "image", "image/jpeg", "JPEG image", None, (".jpg", ".jpeg", ".jfif")),
    Format("png", "image", "image/png", "PNG image", None, (".png", ".apng"), ("image/apng",)),
    Format("gif", "image", "image/gif", "GIF image", None, (".gif",)),
    Format("webp", "image", "image/webp", "WebP image", None, (".webp",)),
    Format("heif", "image", "image/heic", "HEIF image", None, (".heic", ".heif", ".hif", ".avif"),
           ("image/heif", "image/heic-sequence", "image/heif-sequence", "image/avif")),
)  # fmt: skip
ACCEPTED_MIMES: frozenset[str] = frozenset(f.mime for f in FORMATS)
# For the upload page, by the type the sniffer answers: file name endings, and browsers' names.
EXTENSIONS_BY_MIME: dict[str, tuple[str, ...]] = {
    mime: tuple(dict.fromkeys(e for f in FORMATS if f.mime == mime for e in f.extensions)) for mime in ACCEPTED_MIMES
}
ALIASES_BY_MIME: dict[str, tuple[str, ...]] = {
    mime: tuple(dict.fromkeys(a for f in FORMATS if f.mime == mime for a in f.aliases)) for mime in ACCEPTED_MIMES
}
_BY_KEY = {(f.container, f.kind): f for f in FORMATS}
_LABELS = {f.container: f.label for f in reversed(FORMATS)} | {TAGGED: "audio behind a tag"}


def label(container: str) -> str:
    """A format's name for a sentence; the container name itself if it is not in the table."""
    return _LABELS.get(container, container)


def _found(container: str, kind: Kind) -> Sniffed:
    f = _BY_KEY[(container, kind)]
    return Sniffed(f.container, f.kind, f.mime, f.ffmpeg_format)


# Formats we recognise and refuse by name, so the message says what the file is. Public: the
# upload page refuses the same files with the same sentences before sending a byte.
REFUSED_SIGNATURES = [
    (b"II*\x00", "TIFF or camera raw image"),
    (b"MM\x00*", "TIFF or camera raw image"),
    (b"8BPS", "Photoshop document"),
    (b"BM", "BMP image"),
    (b"DDS ", "DDS texture"),
    (b"\x00\x00\x01\x00", "Windows icon"),
    (b"\x00\x00\x00\x0cjP  \r\n\x87\n", "JPEG 2000 image"),
    (b"\xff\x4f\xff\x51", "JPEG 2000 image"),
    (b"\x00\x00\x00\x0cJXL \r\n\x87\n", "JPEG XL image"),
    (b"\xff\x0a", "JPEG XL image"),
    (b"\x01\xda", "SGI image"),
    (b"\x30\x26\xb2\x75\x8e\x66\xcf\x11", "Windows Media (WMV/WMA/ASF)"),
    (b".RMF", "RealMedia"),
    (b"FWS", "Flash animation (SWF)"),
    (b"CWS", "Flash animation (SWF)"),
    (b"ZWS", "Flash animation (SWF)"),
    (b"MAC ", "Monkey's Audio (APE)"),
    (b"MPCK", "Musepack audio"),
    (b"MP+", "Musepack audio"),
    (b"MThd", "MIDI"),
    (b"PK\x03\x04", "ZIP archive"),
    (b"%PDF", "PDF document"),
    (b"\x1f\x8b", "gzip archive"),
    (b"Rar!", "RAR archive"),
    (b"7z\xbc\xaf", "7-Zip archive"),
    (b"\x7fELF", "program"),
    (b"MZ", "Windows program"),
]
REFUSED_BRANDS = {b"crx ": "Canon raw photo (CR3)", b"jpx ": "JPEG 2000 image", b"jp2 ": "JPEG 2000 image"}


def sniff_bytes(head: bytes) -> Sniffed:
    """Classify by magic bytes; ``head`` is the file's first ``HEAD_BYTES`` (or all of a shorter file).

    Behind an ID3v2 or APEv2 tag that ends beyond ``head`` the answer is provisional:
    ``container == TAGGED``, no demuxer; ``sniff`` on the file reads past the tag.
    """
    if not head:
        raise InvalidInput("The file is empty.")
    return _classify(head, tagged=False)


def sniff_file(fh: BinaryIO) -> Sniffed:
    """Sniff an open, seekable file: its head and, behind long tags, the head after them.

    Reads one ``HEAD_BYTES`` block per tag that does not end within the block before (one or
    two in practice, eight at most), whatever the tags' sizes.
    """
    head = fh.read(HEAD_BYTES)
    found = sniff_bytes(head)
    offset = 0
    for _ in range(8):
        if found.container != TAGGED:
            return found
        offset += _tags_end(head)
        fh.seek(offset)
        head = fh.read(HEAD_BYTES)
        found = _classify(head, tagged=True)
    raise InvalidInput("The file has an audio tag but no audio we can read behind it.")


def sniff(path: Path) -> Sniffed:
    with open(path, "rb") as fh:
        return sniff_file(fh)


def _classify(head: bytes, *, tagged: bool) -> Sniffed:
    if tagged:
        head = head.lstrip(b"\x00")  # taggers pad past the size they declare
    start = _tags_end(head)
    if start and start + 16 > len(head):
        # Mostly MP3 (whose type this is until the worker reads past the tag), but FLAC and AAC
        # carry ID3 tags too: no demuxer is chosen from the tag alone.
        return Sniffed(TAGGED, "audio", "audio/mpeg", None)
    if start or tagged:
        return _behind_tag(head[start:])
    return _sniff_head(head)


def _behind_tag(head: bytes) -> Sniffed:
    """What an audio tag stands in front of. Taggers write ID3v2 before MP3, AAC and FLAC, and
    ffmpeg's demuxers for those skip it; the others fail on it, so they are refused by name."""
    found = None
    if head:
        try:
            found = _sniff_head(head)
        except InvalidInput:
            found = None
    if found is None or found.kind != "audio":
        raise InvalidInput("The file has an audio tag but no audio we can read behind it.")
    if found.container not in _TAGGABLE:
        raise UnsupportedCodec(f"{found.label} with an ID3 tag in front is not supported.")
    return found


def _tags_end(head: bytes) -> int:
    """Where the audio starts behind ID3v2 and APEv2 tags at the front (0 if there is none).

    The result may lie beyond ``head``: the tags' own size fields say where they end.
    """
    pos = 0
    for _ in range(8):  # a few tags in a row at most; more is not a real file
        block = head[pos : pos + 32]
        if block[:3] == b"ID3" and len(block) >= 10 and block[3] < 0xFF and all(b < 0x80 for b in block[6:10]):
            size = (block[6] << 21) | (block[7] << 14) | (block[8] << 7) | block[9]
            pos += 10 + size + (10 if block[5] & 0x10 else 0)  # header, frames, optional footer
        elif block[:8] == b"APETAGEX" and len(block) >= 32:
            pos += 32 + int.from_bytes(block[12:16], "little")  # header + (items + footer)
        else:
            break
        if pos >= len(head):
            break
    return pos


def _sniff_head(head: bytes) -> Sniffed:
    if head.startswith(b"\xff\xd8\xff"):
        return _found("jpeg", "image")
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return _found("png", "image")
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return _found("gif", "image")
    riff = head[:4]
    if riff == b"RIFF" and head[8:12] == b"WEBP":
        return _found("webp", "image")
    if riff in (b"RIFF", b"RIFX", b"RF64", b"BW64") and head[8:12] == b"WAVE":
        return _found("wav", "audio")
    if riff == b"RIFF" and head[8:12] == b"AVI ":
        return _found("avi", "video")
    if head[:16] == _W64_RIFF and head[24:40] == _W64_WAVE:
        return _found("w64", "audio")
    if head[4:8] == b"ftyp":
        return _sniff_ftyp(head)
    if _quicktime_without_ftyp(head):
        return _found("mov", "video")
    if head.startswith(b"\x1a\x45\xdf\xa3"):
        return _found("webm" if b"webm" in head[:64] else "matroska", "video")
    if head.startswith(b"OggS"):
        return _found("ogg", "audio")
    if head.startswith(b"fLaC"):
        return _found("flac", "audio")
    if head[:4] == b"FORM" and head[8:12] in (b"AIFF", b"AIFC"):
        return _found("aiff", "audio")
    if head.startswith(b"caff"):
        return _found("caf", "audio")
    if head.startswith(b"wvpk"):
        return _found("wavpack", "audio")
    if head.startswith((b"#!AMR\n", b"#!AMR-WB\n")):
        return _found("amr", "audio")
    if head.startswith(b"FLV\x01"):
        return _found("flv", "video")
    if head.startswith(_MXF_PARTITION):
        return _found("mxf", "video")
    if head.startswith(b"\x00\x00\x01\xba"):  # pack header: MPEG-1 system stream, MPEG-2 PS, VOB
        return _found("mpeg", "video")
    if head.startswith(b"\x00\x00\x01\xb3"):  # sequence header: MPEG-1/2 video without a system layer
        return _found("mpegvideo", "video")
    if _is_transport_stream(head):
        return _found("mpegts", "video")
    ac3 = _ac3_kind(head)
    if ac3:
        return _found(ac3, "audio")
    if len(head) >= 2 and head[0] == 0xFF and head[1] & 0xE0 == 0xE0 and head[1] & 0x06 != 0:
        return _found("mp3", "audio")
    if len(head) >= 2 and head[0] == 0xFF and head[1] & 0xF6 == 0xF0:
        return _found("aac", "audio")
    for magic, name in REFUSED_SIGNATURES:
        if head.startswith(magic):
            raise UnsupportedCodec(f"{name[0].upper()}{name[1:]} files are not supported.")
    raise InvalidInput("The file is not a video, audio or image file we can read.")


def _sniff_ftyp(head: bytes) -> Sniffed:
    major = head[8:12]
    brands = {head[i : i + 4] for i in range(16, min(len(head), int.from_bytes(head[:4], "big")), 4)}
    brands.add(major)
    if major in REFUSED_BRANDS:
        raise UnsupportedCodec(f"{REFUSED_BRANDS[major]} files are not supported.")
    if major in HEIF_BRANDS or (brands & HEIF_BRANDS and not brands & {b"isom", b"mp41", b"mp42"}):
        return _found("heif", "image")
    if major in AUDIO_MP4_BRANDS:
        return _found("mp4", "audio")
    if major == b"qt  ":
        return _found("mov", "video")
    return _found("mp4", "video")


def _quicktime_without_ftyp(head: bytes) -> bool:
    """A QuickTime file that starts straight with a box (older cameras write no ``ftyp``):
    a known first box of a plausible size, followed by a box header if the head reaches it."""
    if len(head) < 8 or head[4:8] not in _QT_FIRST_BOXES:
        return False
    size = int.from_bytes(head[:4], "big")
    if size == 1 and len(head) >= 16:  # 64-bit size follows the type
        size = int.from_bytes(head[8:16], "big")
        return size >= 16
    if size == 0:  # the box runs to the end of the file
        return head[4:8] == b"mdat"
    if size < 8:
        return False
    if size + 8 <= len(head):
        following = head[size + 4 : size + 8]
        return following.isalnum() or following in _QT_FIRST_BOXES
    return True


def _is_transport_stream(head: bytes) -> bool:
    """MPEG-TS: the 0x47 sync byte repeats at a packet stride (188, or 192 for camcorder M2TS,
    whose packets start with a 4-byte timestamp). Every packet in the head must show it (one
    miss in ten allowed for a damaged capture), and at least three, so text never passes."""
    for stride in _TS_STRIDES:
        for start in range(min(stride, len(head))):
            if head[start] != 0x47:
                continue
            positions = range(start, len(head), stride)
            hits = sum(1 for p in positions if head[p] == 0x47)
            if hits >= 3 and hits >= len(positions) - len(positions) // 10:
                return True
    return False


def _ac3_kind(head: bytes) -> str | None:
    """AC-3 or E-AC-3 from the sync word and the bitstream id (AC-3 up to 10, E-AC-3 11 to 16)."""
    if len(head) < 6 or head[:2] != b"\x0b\x77":
        return None
    bsid = head[5] >> 3
    if bsid <= 10:
        return "ac3" if head[4] >> 6 != 3 else None  # fscod 3 is reserved
    return "eac3" if bsid <= 16 else None
