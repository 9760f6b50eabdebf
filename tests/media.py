"""Test media made on the spot: ffmpeg lavfi sources and Pillow drawings."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

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


# --- comparing pictures as a viewer would ---------------------------------------------------------


def source_frame(path: Path, at: float, *, matrix: str | None = None) -> Image.Image:
    """The source's frame shown at ``at`` seconds, decoded by PyAV from the start (no seek, so no
    decoder state is missed), turned upright and converted to RGB with ``matrix`` ("bt709" or
    "bt601"; default: the file's own, else BT.709 for HD and BT.601 below) and the file's range."""
    import av

    with av.open(str(path), metadata_errors="replace") as ct:
        best = None
        for frame in ct.decode(ct.streams.video[0]):
            if best is None or abs(frame.time - at) < abs(best.time - at):
                best = frame
            if frame.time > at + 1:
                break
    assert best is not None, "no frame decoded"
    return _upright_rgb(best, matrix)


def best_matching_frame(path: Path, picture: Image.Image, *, most: int = 900) -> tuple[float, float, float]:
    """(time, SSIM, colour difference) of the source frame most like ``picture``: every frame (up to
    ``most``) ranked by colour difference, the closest few by SSIM."""
    import av

    ranked: list[tuple[float, float, Image.Image]] = []
    with av.open(str(path), metadata_errors="replace") as ct:
        for n, frame in enumerate(ct.decode(ct.streams.video[0])):
            if n >= most:
                break
            rgb = _upright_rgb(frame, None, size=picture.size)
            ranked.append((colour_difference(picture, rgb), frame.time, rgb))
    ranked.sort(key=lambda r: r[0])
    scored = [(ssim(picture, rgb), t, cast) for cast, t, rgb in ranked[:5]]
    score, at, cast = max(scored)
    return at, score, cast


def _upright_rgb(frame: Any, matrix: str | None, *, size: tuple[int, int] | None = None) -> Image.Image:
    """``size``: the upright picture's, scaled to in the same conversion (area filter)."""
    tagged = {1: "bt709", 5: "bt601", 6: "bt601", 9: "bt2020"}.get(int(frame.colorspace))
    hd = frame.width > 1024 or frame.height > 576
    matrix = matrix or tagged or ("bt709" if hd else "bt601")
    space = {"bt709": "ITU709", "bt601": "ITU601", "bt2020": "BT2020"}[matrix]
    full = int(frame.color_range) == 2 or frame.format.name.startswith("yuvj")
    turns = {90: Image.Transpose.ROTATE_90, -90: Image.Transpose.ROTATE_270, 180: Image.Transpose.ROTATE_180,
             -180: Image.Transpose.ROTATE_180}  # fmt: skip
    turn = turns.get(int(frame.rotation or 0))
    width, height = size if size else (None, None)
    if size and abs(int(frame.rotation or 0)) == 90:
        width, height = height, width
    rgb = frame.reformat(width=width, height=height, format="rgb24", src_colorspace=space, dst_colorspace=space,
                         src_color_range="JPEG" if full else "MPEG", dst_color_range="JPEG",
                         interpolation="AREA")  # fmt: skip
    picture = rgb.to_image()
    return picture.transpose(turn) if turn is not None else picture


def ssim(a: Image.Image, b: Image.Image, *, block: int = 8) -> float:
    """Structural similarity of two pictures' luma, mean over ``block``-pixel windows (stride half a
    window), after resizing ``b`` to ``a``'s size. 1.0 is identical; a different frame of moving
    video scores ~0.3-0.6, another picture altogether ~0. (Every window at once with numpy: the
    same sums as a loop over the windows, ~100x sooner on a 640-pixel thumbnail.)"""
    import numpy as np
    from numpy.lib.stride_tricks import sliding_window_view

    w, h = a.size
    la = np.asarray(a.convert("L"), dtype=np.float64)
    lb = np.asarray(b.convert("L").resize(a.size, Image.Resampling.BOX), dtype=np.float64)
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    step = max(1, block // 2)
    shape = (min(block, h), min(block, w))
    pa = sliding_window_view(la, shape)[::step, ::step]
    pb = sliding_window_view(lb, shape)[::step, ::step]
    ma, mb = pa.mean(axis=(2, 3)), pb.mean(axis=(2, 3))
    da, db = pa - ma[..., None, None], pb - mb[..., None, None]
    va, vb = (da * da).mean(axis=(2, 3)), (db * db).mean(axis=(2, 3))
    cov = (da * db).mean(axis=(2, 3))
    scores = ((2 * ma * mb + c1) * (2 * cov + c2)) / ((ma * ma + mb * mb + c1) * (va + vb + c2))
    return float(scores.mean())


def colour_difference(a: Image.Image, b: Image.Image, *, blocks: tuple[int, int] = (16, 9)) -> float:
    """The largest per-channel mean difference (0-255) between two pictures averaged over
    ``blocks`` areas: what an eye sees as a colour cast, not what compression leaves in edges."""
    from PIL import ImageChops, ImageStat

    small_a = a.convert("RGB").resize(blocks, Image.Resampling.BOX)
    small_b = b.convert("RGB").resize(blocks, Image.Resampling.BOX)
    return max(ImageStat.Stat(ImageChops.difference(small_a, small_b)).mean)


# Immich's default tone-mapping, written out apart from the pipeline: linear light with 100 nits as
# 1.0, BT.709 primaries, Hable's curve without desaturation, full-range RGB out.
TONE_MAP = (
    "zscale=t=linear:npl=100,format=gbrpf32le,zscale=p=709,tonemap=tonemap=hable:desat=0{peak},"
    "zscale=t=709:m=709:r=full,format=rgb24"
)


def tone_mapped_frame(src: Path, at: float, out_dir: Path, *, peak: str = ":peak=10") -> Image.Image:
    """The HDR source's frame at ``at`` seconds tone-mapped to SDR by ffmpeg (``TONE_MAP``)."""
    out = out_dir / f"tone-mapped-{src.stem}-{at:.3f}.png"
    select = f"select=gte(t\\,{at - 0.001}),"
    make_media(out, ["-i", str(src), "-vf", select + TONE_MAP.format(peak=peak), "-frames:v", "1"])
    with Image.open(out) as img:
        return img.convert("RGB")


def hdr_clip_args(transfer: str, *, seconds: float = 2, size: str = "320x240", x265: str = "") -> list[str]:
    """ffmpeg arguments for testsrc2 graded into 10-bit HEVC BT.2020 with ``transfer`` ("smpte2084"
    or "arib-std-b67"), SDR white at 100 nits; ``x265``: more x265 parameters (HDR10 metadata)."""
    grade = (
        "format=gbrpf32le,setparams=color_primaries=bt709:color_trc=bt709:colorspace=gbr:range=pc,"
        f"zscale=t=linear:npl=100,zscale=p=2020,zscale=t={transfer}:m=2020_ncl:r=limited:npl=100,format=yuv420p10le"
    )
    params = f"log-level=error:keyint=25:colorprim=bt2020:colormatrix=bt2020nc:transfer={transfer}"
    return ["-f", "lavfi", "-i", f"testsrc2=size={size}:rate=25:duration={seconds}", "-vf", grade,
            "-c:v", "libx265", "-tag:v", "hvc1", "-x265-params", params + (f":{x265}" if x265 else "")]  # fmt: skip
