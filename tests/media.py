"""Test media made on the spot: ffmpeg lavfi sources and Pillow drawings."""

from __future__ import annotations

import subprocess
from pathlib import Path

from PIL import Image, ImageDraw

from pipelines.runner import ffmpeg_exe


def lavfi_video(path: Path, *, seconds: float = 3, size: str = "320x240", rate: int = 25, audio: bool = True) -> Path:
    args = [
        ffmpeg_exe(),
        "-v",
        "error",
        "-y",
        "-f",
        "lavfi",
        "-i",
        f"testsrc2=size={size}:rate={rate}:duration={seconds}",
    ]
    if audio:
        args += ["-f", "lavfi", "-i", f"sine=frequency=440:sample_rate=44100:duration={seconds}"]
    args += ["-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p"]
    if audio:
        args += ["-c:a", "aac", "-shortest"]
    subprocess.run([*args, str(path)], check=True)
    return path


def lavfi_audio(path: Path, *, seconds: float = 3, codec: str = "libmp3lame") -> Path:
    subprocess.run(
        [
            ffmpeg_exe(),
            "-v",
            "error",
            "-y",
            "-f",
            "lavfi",
            "-i",
            f"sine=frequency=330:duration={seconds}",
            "-c:a",
            codec,
            str(path),
        ],
        check=True,
    )
    return path


def drawn_image(path: Path, *, size: tuple[int, int] = (640, 480), fmt: str = "JPEG") -> Path:
    img = Image.new("RGB", size, (30, 90, 200))
    draw = ImageDraw.Draw(img)
    draw.rectangle((0, 0, size[0] // 4, size[1] // 4), fill=(250, 20, 20))
    draw.ellipse((size[0] // 3, size[1] // 3, size[0] // 2, size[1] // 2), fill=(20, 220, 40))
    img.save(path, fmt)
    return path


def make_media(path: Path, args: list[str]) -> Path:
    """Run the static ffmpeg with ``args`` (inputs, codecs, format) to write ``path``."""
    subprocess.run([ffmpeg_exe(), "-v", "error", "-y", *args, str(path)], check=True, timeout=120)
    return path


def id3v2_tag(padding: int = 0) -> bytes:
    """An ID3v2.4 tag with a title frame and ``padding`` zero bytes (cover art makes tags this long)."""

    def syncsafe(n: int) -> bytes:
        return bytes((n >> shift) & 0x7F for shift in (21, 14, 7, 0))

    text = b"\x03" + b"A tagged song"
    frames = b"TIT2" + syncsafe(len(text)) + b"\x00\x00" + text + b"\x00" * padding
    return b"ID3\x04\x00\x00" + syncsafe(len(frames)) + frames


def with_id3(src: Path, dst: Path, *, padding: int = 0) -> Path:
    """``src`` with an ID3v2 tag in front, as taggers write it before FLAC or ADTS AAC."""
    dst.write_bytes(id3v2_tag(padding) + src.read_bytes())
    return dst


def quicktime_without_ftyp(src: Path, dst: Path, *, first: str) -> Path:
    """A MOV from ffmpeg (``ftyp``, ``wide``, ``mdat``, ``moov``) rewritten to start with ``first``
    ("mdat" or "wide"), as older cameras write it. Sample offsets are absolute, so the rewrite
    keeps every byte after the boxes it replaces where it was."""
    data = bytearray(src.read_bytes())
    ftyp = int.from_bytes(data[:4], "big")
    assert data[4:8] == b"ftyp" and data[ftyp + 4 : ftyp + 8] == b"wide" and data[ftyp + 12 : ftyp + 16] == b"mdat"
    head = ftyp + 8  # ftyp + wide: what comes before mdat
    mdat = int.from_bytes(data[head : head + 4], "big")
    if first == "mdat":
        # One mdat from byte 0: the old boxes become unused bytes inside it.
        data[0:8] = (mdat + head).to_bytes(4, "big") + b"mdat"
    elif first == "wide":
        # A wide box, then a free box over the rest of the old ftyp + wide.
        data[0:head] = b"\x00\x00\x00\x08wide" + (head - 8).to_bytes(4, "big") + b"free" + bytes(head - 16)
    else:
        raise ValueError(first)
    dst.write_bytes(bytes(data))
    return dst
