"""Detection by content: one row of the accepted-formats table per test, each with a file made
here (ffmpeg or Pillow) or taken from shared/testdata, sniffed from the first 4096 bytes as the
web does, probed as the worker does, then demuxed and decoded to prove it is readable.

What a person owns comes in many containers: camcorder M2TS with AC-3, broadcast TS, DVD VOB,
MPEG-1 system streams, QuickTime files without an ``ftyp`` box, AIFF, WavPack, raw AC-3, FLV,
3GP from old phones, audio behind ID3 tags. A refused file gets a sentence naming what it is.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from pipelines import av as stages
from pipelines.detect import detect
from pipelines.errors import InvalidInput, UnsupportedCodec
from pipelines.profiles import Limits, Profiles
from pipelines.results import to_json
from pipelines.runner import ALLOWED_DEMUXERS
from pipelines.sniff import ACCEPTED_MIMES, FORMATS, HEAD_BYTES, TAGGED, Sniffed, sniff, sniff_bytes
from tests.media import drawn_image, id3v2_tag, quicktime_without_ftyp, with_id3

REAL = Path(__file__).resolve().parents[3] / "shared" / "testdata" / "real"

_V = ["-f", "lavfi", "-i", "testsrc2=size=160x120:rate=25:duration=1"]
_A = ["-f", "lavfi", "-i", "sine=frequency=440:sample_rate=48000:duration=1"]
_A8K = ["-f", "lavfi", "-i", "sine=frequency=440:sample_rate=8000:duration=1"]
_H264 = ["-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p"]


@dataclass(frozen=True)
class Row:
    name: str
    args: list[str]  # ffmpeg arguments that make it (inputs, codecs, format)
    container: str
    mime: str
    kind: str  # after the probe
    codecs: tuple[str, ...]  # video and/or audio codec, as the probe names them


ROWS = [
    Row("fmt-clip.mp4", [*_V, *_A, *_H264, "-c:a", "aac"], "mp4", "video/mp4", "video", ("h264", "aac")),
    Row("fmt-clip.mov", [*_V, *_A, *_H264, "-c:a", "aac", "-f", "mov"], "mov", "video/quicktime", "video",
        ("h264", "aac")),
    Row("fmt-phone.3gp", [*_A8K, "-f", "lavfi", "-i", "testsrc2=size=176x144:rate=15:duration=1",
                          "-map", "1", "-map", "0", "-c:v", "h263",
                          "-c:a", "libopencore_amrnb", "-ar", "8000", "-ac", "1", "-b:a", "12.2k"],
        "mp4", "video/mp4", "video", ("h263", "amr_nb")),
    Row("fmt-clip.3g2", [*_V, *_A8K, *_H264, "-c:a", "aac", "-f", "3g2"], "mp4", "video/mp4", "video", ("h264", "aac")),
    Row("fmt-clip.mkv", [*_V, *_A, *_H264, "-c:a", "flac"], "matroska", "video/x-matroska", "video", ("h264", "flac")),
    Row("fmt-clip.webm", [*_V, *_A, "-c:v", "libvpx-vp9", "-deadline", "realtime", "-cpu-used", "8", "-c:a", "libopus"],
        "webm", "video/webm", "video", ("vp9", "opus")),
    Row("fmt-camera.avi", [*_V, *_A, "-c:v", "mjpeg", "-c:a", "adpcm_ima_wav"], "avi", "video/x-msvideo", "video",
        ("mjpeg", "adpcm_ima_wav")),
    Row("fmt-camcorder.m2ts", [*_V, *_A, *_H264, "-c:a", "ac3", "-f", "mpegts", "-mpegts_m2ts_mode", "1"],
        "mpegts", "video/mp2t", "video", ("h264", "ac3")),
    Row("fmt-broadcast.ts", [*_V, *_A, "-c:v", "mpeg2video", "-c:a", "mp2", "-f", "mpegts"], "mpegts", "video/mp2t",
        "video", ("mpeg2video", "mp2")),
    Row("fmt-dvd.vob", [*_V, *_A, "-c:v", "mpeg2video", "-c:a", "ac3", "-f", "vob"], "mpeg", "video/mpeg", "video",
        ("mpeg2video", "ac3")),
    Row("fmt-system.mpg", [*_V, *_A, "-c:v", "mpeg1video", "-c:a", "mp2", "-f", "mpeg"], "mpeg", "video/mpeg", "video",
        ("mpeg1video", "mp2")),
    Row("fmt-elementary.m2v", [*_V, "-c:v", "mpeg2video", "-f", "mpeg2video"], "mpegvideo", "video/mpeg", "video",
        ("mpeg2video",)),
    Row("fmt-flash.flv", [*_V, *_A, "-c:v", "flv", "-c:a", "libmp3lame", "-ar", "44100"], "flv", "video/x-flv", "video",
        ("flv1", "mp3")),
    Row("fmt-flash-h264.flv", [*_V, *_A, *_H264, "-c:a", "aac"], "flv", "video/x-flv", "video", ("h264", "aac")),
    Row("fmt-studio.mxf", [*_V, *_A, "-c:v", "mpeg2video", "-c:a", "pcm_s16le", "-f", "mxf"], "mxf", "application/mxf",
        "video", ("mpeg2video", "pcm_s16le")),
    Row("fmt-prores.mov", [*_V, "-c:v", "prores_ks", "-profile:v", "0", "-f", "mov"], "mov", "video/quicktime", "video",
        ("prores",)),
    Row("fmt-song.mp3", [*_A, "-c:a", "libmp3lame"], "mp3", "audio/mpeg", "audio", ("mp3",)),
    Row("fmt-song.aac", [*_A, "-c:a", "aac", "-f", "adts"], "aac", "audio/aac", "audio", ("aac",)),
    Row("fmt-song.m4a", [*_A, "-c:a", "aac", "-f", "ipod"], "mp4", "audio/mp4", "audio", ("aac",)),
    Row("fmt-lossless.m4a", [*_A, "-c:a", "alac", "-f", "ipod"], "mp4", "audio/mp4", "audio", ("alac",)),
    Row("fmt-song.flac", [*_A, "-c:a", "flac"], "flac", "audio/flac", "audio", ("flac",)),
    Row("fmt-song.opus", [*_A, "-c:a", "libopus"], "ogg", "audio/ogg", "audio", ("opus",)),
    Row("fmt-song.ogg", [*_A, "-c:a", "libvorbis"], "ogg", "audio/ogg", "audio", ("vorbis",)),
    Row("fmt-take.wav", [*_A, "-c:a", "pcm_s24le"], "wav", "audio/wav", "audio", ("pcm_s24le",)),
    Row("fmt-long.rf64.wav", [*_A, "-c:a", "pcm_s16le", "-rf64", "always", "-f", "wav"], "wav", "audio/wav", "audio",
        ("pcm_s16le",)),
    Row("fmt-take.w64", [*_A, "-c:a", "pcm_s16le", "-f", "w64"], "w64", "audio/x-w64", "audio", ("pcm_s16le",)),
    Row("fmt-take.aiff", [*_A, "-c:a", "pcm_s16be", "-f", "aiff"], "aiff", "audio/aiff", "audio", ("pcm_s16be",)),
    Row("fmt-take.aifc", [*_A, "-c:a", "pcm_s16le", "-f", "aiff"], "aiff", "audio/aiff", "audio", ("pcm_s16le",)),
    Row("fmt-take.caf", [*_A, "-c:a", "alac", "-f", "caf"], "caf", "audio/x-caf", "audio", ("alac",)),
    Row("fmt-take.wv", [*_A, "-c:a", "wavpack"], "wavpack", "audio/x-wavpack", "audio", ("wavpack",)),
    Row("fmt-movie.ac3", [*_A, "-c:a", "ac3"], "ac3", "audio/ac3", "audio", ("ac3",)),
    Row("fmt-movie.eac3", [*_A, "-c:a", "eac3"], "eac3", "audio/eac3", "audio", ("eac3",)),
    Row("fmt-memo.amr", [*_A8K, "-c:a", "libopencore_amrnb", "-ar", "8000", "-ac", "1"], "amr", "audio/amr", "audio",
        ("amr_nb",)),
    Row("fmt-sound-only.mkv", [*_A, "-c:a", "libopus"], "matroska", "video/x-matroska", "audio", ("opus",)),
]  # fmt: skip


def _head(path: Path) -> bytes:
    with open(path, "rb") as fh:
        return fh.read(HEAD_BYTES)


def _codecs(info: Any) -> tuple[str, ...]:
    return tuple(s.codec for s in (info.video, info.audio) if s is not None)


def _readable(path: Path, tmp: Path, limits: Limits, sniffed: Sniffed) -> None:
    """Detect as the entry task does, then demux and decode with what it found: a video's
    decode check decodes, a sound's is its encode (the decode stage reads the header only)."""
    detected = detect(path, limits=limits, sniffed=Sniffed(**to_json(sniffed)))
    demuxed = stages.demux(path, tmp / "demux", limits=limits, detected=detected)
    decoded = stages.decode(demuxed, tmp / "demux", tmp / "decode", limits=limits)
    if demuxed.has_video:
        assert decoded.decoded_duration == pytest.approx(1.0, abs=0.15)
        assert decoded.video_frames >= 1
        return
    assert decoded.header_only
    profiles = Profiles(limits=limits)
    plan = stages.normalize(demuxed, tmp / "demux", tmp / "plan", profiles=profiles, limits=limits, decoded=decoded)
    filters = stages.build_filters(plan, profiles=profiles)
    encoded = stages.encode(demuxed, tmp / "demux", filters, plan, tmp / "encode", profiles=profiles, limits=limits)
    assert encoded.duration == pytest.approx(1.0, abs=0.15)


@pytest.mark.parametrize("row", ROWS, ids=[r.name for r in ROWS])
def test_each_accepted_format_is_recognised_and_read(row: Row, media: Any, limits: Limits, tmp_path: Path) -> None:
    path = media.make(row.name, row.args)
    sniffed = sniff_bytes(_head(path))
    assert (sniffed.container, sniffed.mime) == (row.container, row.mime)
    assert sniff(path) == sniffed
    assert sniffed.mime in ACCEPTED_MIMES and sniffed.ffmpeg_format
    detected = detect(path, limits=limits, sniffed=sniffed)
    assert detected.kind == row.kind
    assert _codecs(detected.info) == row.codecs
    _readable(path, tmp_path, limits, sniffed)


@pytest.mark.parametrize("first", ["mdat", "wide"])
def test_quicktime_without_ftyp_is_a_movie(first: str, media: Any, limits: Limits, tmp_path: Path) -> None:
    """Older cameras start a .mov with its media data (or a ``wide`` box), no ``ftyp``."""
    mov = media.make("fmt-for-rewrite.mov", [*_V, *_A, *_H264, "-c:a", "aac", "-f", "mov"])
    path = quicktime_without_ftyp(mov, tmp_path / f"{first}-first.mov", first=first)
    assert _head(path)[4:8] == first.encode()
    sniffed = sniff_bytes(_head(path))
    assert (sniffed.container, sniffed.mime) == ("mov", "video/quicktime")
    _readable(path, tmp_path, limits, sniffed)


@pytest.mark.parametrize(
    ("source", "container", "codec"),
    [("song.flac", "flac", "flac"), ("song.aac", "aac", "aac"), ("song.mp3", "mp3", "mp3")],
)
@pytest.mark.parametrize("padding", [0, 20_000], ids=["short-tag", "tag-longer-than-the-head"])
def test_audio_behind_an_id3_tag_is_what_follows_the_tag(
    source: str, container: str, codec: str, padding: int, media: Any, limits: Limits, tmp_path: Path
) -> None:
    """An ID3v2 tag does not make a file MP3: taggers put it before FLAC and ADTS AAC too."""
    row = next(r for r in ROWS if r.name == "fmt-" + source)
    path = with_id3(media.make(row.name, row.args), tmp_path / f"tagged-{source}", padding=padding)
    head = sniffed = sniff_bytes(_head(path))
    if padding:
        # The web sees 4096 bytes, all tag: it says so, and the worker reads past the tag.
        assert (head.container, head.kind, head.ffmpeg_format) == (TAGGED, "audio", None)
        assert head.mime in ACCEPTED_MIMES
    else:
        assert head.container == container
    sniffed = sniff(path)
    assert sniffed.container == container
    detected = detect(path, limits=limits, sniffed=head)
    assert detected.sniffed is not None and detected.sniffed.container == container
    assert _codecs(detected.info) == (codec,)
    _readable(path, tmp_path, limits, head)


def test_a_tag_in_front_of_a_format_that_cannot_carry_one_is_named(media: Any, tmp_path: Path) -> None:
    row = next(r for r in ROWS if r.name == "fmt-take.wav")
    path = with_id3(media.make(row.name, row.args), tmp_path / "tagged.wav")
    with pytest.raises(UnsupportedCodec) as caught:
        sniff(path)
    assert caught.value.message == "WAV audio with an ID3 tag in front is not supported."


def test_a_tag_in_front_of_no_audio_is_refused(tmp_path: Path, limits: Limits) -> None:
    path = tmp_path / "playlist.mp3"
    path.write_bytes(id3v2_tag(6000) + b"#EXTM3U\n#EXTINF:1,\nfile:///etc/passwd\n")
    assert sniff_bytes(_head(path)).container == TAGGED
    with pytest.raises(InvalidInput) as caught:
        detect(path, limits=limits, sniffed=sniff_bytes(_head(path)))
    assert "no audio" in caught.value.message


def test_images_are_recognised(tmp_path: Path) -> None:
    for fmt, container, mime in [
        ("JPEG", "jpeg", "image/jpeg"),
        ("PNG", "png", "image/png"),
        ("GIF", "gif", "image/gif"),
        ("WEBP", "webp", "image/webp"),
        ("AVIF", "heif", "image/heic"),
    ]:
        path = drawn_image(tmp_path / f"picture.{fmt.lower()}", size=(64, 48), fmt=fmt)
        assert (sniff(path).container, sniff(path).mime, sniff(path).kind) == (container, mime, "image")
    for real in ("pug.heic", "xiaomi.heic", "cat.hif"):
        assert sniff(REAL / real).container == "heif"


def test_flash_video_with_a_codec_we_do_not_decode_is_named(media: Any, limits: Limits, tmp_path: Path) -> None:
    path = media.make("fmt-nellymoser.flv", [*_V, *_A, "-c:v", "flv", "-c:a", "nellymoser", "-ar", "44100"])
    sniffed = sniff(path)
    assert sniffed.container == "flv" and sniffed.label == "Flash Video (FLV)"
    with pytest.raises(UnsupportedCodec) as caught:
        stages.demux(path, tmp_path, limits=limits)
    assert caught.value.message == (
        "The audio in this Flash Video (FLV) file is encoded with nellymoser, which we do not support."
    )


@pytest.mark.parametrize(
    ("head", "sentence"),
    [
        (b"\x30\x26\xb2\x75\x8e\x66\xcf\x11\xa6\xd9\x00\xaa\x00\x62\xce\x6c",
         "Windows Media (WMV/WMA/ASF) files are not supported."),
        (b"\x00\x00\x00\x18ftypcrx \x00\x00\x00\x01crx isom", "Canon raw photo (CR3) files are not supported."),
        (b"II*\x00\x08\x00\x00\x00", "TIFF or camera raw image files are not supported."),
        (b"\x00\x00\x00\x0cJXL \r\n\x87\n", "JPEG XL image files are not supported."),
        (b"MAC \x96\x0f\x00\x00", "Monkey's Audio (APE) files are not supported."),
        (b"CWS\x0a\x00\x00\x00\x00", "Flash animation (SWF) files are not supported."),
    ],
)  # fmt: skip
def test_a_refused_format_is_named(head: bytes, sentence: str) -> None:
    with pytest.raises(UnsupportedCodec) as caught:
        sniff_bytes(head + bytes(200))
    assert caught.value.message == sentence


@pytest.mark.parametrize(
    "head",
    [
        b"<svg xmlns='http://www.w3.org/2000/svg'/>",
        b"#EXTM3U\n",
        b"<?php echo 1; ?>",
        b"<html><body>" + b"Lorem ipsum dolor sit amet. " * 150,
        bytes(4096),
    ],
)
def test_text_and_noise_are_not_media(head: bytes) -> None:
    with pytest.raises(InvalidInput) as caught:
        sniff_bytes(head)
    assert caught.value.message == "The file is not a video, audio or image file we can read."


def test_one_table_feeds_the_demuxer_allow_list_and_the_content_types() -> None:
    for f in FORMATS:
        if f.ffmpeg_format:
            assert set(f.ffmpeg_format.split(",")) <= set(ALLOWED_DEMUXERS)
        assert f.mime in ACCEPTED_MIMES
    for banned in ("hls", "concat", "subfile", "image2", "tee", "data", "srt", "ass", "asf", "rm", "swf"):
        assert banned not in ALLOWED_DEMUXERS


def test_the_table_names_extensions_and_browser_types_for_the_upload_page() -> None:
    """The page's first filter (media_app.views) can be built from the same table: every accepted
    type has its file name endings, and nothing the page lets through today is lost."""
    from pipelines.sniff import ALIASES_BY_MIME, EXTENSIONS_BY_MIME

    assert set(EXTENSIONS_BY_MIME) == set(ACCEPTED_MIMES)
    assert all(EXTENSIONS_BY_MIME[m] for m in ACCEPTED_MIMES)
    # fmt: off
    today = {".mp4", ".m4v", ".mov", ".qt", ".avi", ".mkv", ".webm", ".mp3", ".wav", ".flac", ".ogg", ".oga",
             ".opus", ".m4a", ".aac", ".jpg", ".jpeg", ".jfif", ".png", ".gif", ".webp", ".heic", ".heif", ".hif"}
    # fmt: on
    table = {e for exts in EXTENSIONS_BY_MIME.values() for e in exts}
    assert today <= table
    assert {".mts", ".m2ts", ".ts", ".vob", ".mpg", ".3gp", ".flv", ".aiff", ".wv", ".ac3", ".amr"} <= table
    assert "video/vnd.dlna.mpeg-tts" in ALIASES_BY_MIME["video/mp2t"]  # what Windows calls .m2ts
