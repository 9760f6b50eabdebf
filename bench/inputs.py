"""Benchmark inputs, made from the real samples in ``../shared/testdata/real`` and cached.

* Video: a 60 s pan across a real photo (``rommel.jpg``) with temporal film grain, 30 fps, H.264
  (x264 ultrafast, crf 20 capped at 8 / 16 Mb/s, like a phone) + AAC. Grain
  matters: it is what makes real footage expensive for an AV1 encoder; a test pattern is not.
* Song: ``party.mp3`` looped to 60 s, MP3 192 kb/s 44.1 kHz stereo.
* 12 MP JPEG: the 4032x3024 iPhone photo ``pug.heic`` as the JPEG a phone writes (quality 90, its
  Display P3 ICC profile, EXIF, stored sideways with orientation 6), so colour conversion and
  rotation cost what they cost on real uploads.
* HEIC: ``pug.heic`` itself (12 MP, Display P3).
* Small images: 800x600 JPEG crops of the real photos (the throughput and status runs).
"""

from __future__ import annotations

import io
from pathlib import Path

from bench.harness import CACHE, REAL, ffmpeg, run

SONG_SECONDS = 60
VIDEO_SECONDS = 60
VIDEO_FPS = 30
# (scaled photo size, window, peak bitrate) per output height: the window pans across the photo;
# the bitrate is capped near what phones write (grain at crf 20 alone would reach ~25 Mb/s at 720p).
_PAN = {720: ("1920:1440", "1280:720", "8M"), 1080: ("3072:2304", "1920:1080", "16M")}


def _cached(name: str) -> tuple[Path, bool]:
    CACHE.mkdir(parents=True, exist_ok=True)
    path = CACHE / name
    return path, path.exists() and path.stat().st_size > 0


def video(height: int, *, seconds: int = VIDEO_SECONDS, fps: int = VIDEO_FPS) -> Path:
    """The pan at ``height`` lines (720 or 1080), ``seconds`` long at ``fps``."""
    rate = "" if fps == VIDEO_FPS else f"-{fps}fps"
    path, ok = _cached(f"pan-{height}p-{seconds}s{rate}.mp4")
    if ok:
        return path
    scaled, window, peak = _PAN[height]
    print(f"   generating {path.name} (once; cached in {CACHE})", flush=True)
    # The photo is decoded and scaled once, then repeated by `loop`; only crop + grain run per frame.
    graph = (
        f"[0:v]scale={scaled},loop=loop=-1:size=1:start=0,fps={fps},"
        f"crop={window}:x='(iw-ow)*t/{seconds}':y='(ih-oh)*(0.5+0.4*sin(t/7))',"
        "noise=alls=5:allf=t,format=yuv420p[v]"
    )
    tmp = path.with_suffix(".part.mp4")
    run(
        [ffmpeg(), "-hide_banner", "-v", "error", "-y", "-i", str(REAL / "rommel.jpg"),
         "-stream_loop", "-1", "-i", str(REAL / "party.mp3"), "-filter_complex", graph,
         "-map", "[v]", "-map", "1:a", "-t", str(seconds),
         "-c:v", "libx264", "-preset", "ultrafast", "-crf", "20", "-maxrate", peak, "-bufsize", peak, "-g", "60",
         "-c:a", "aac", "-b:a", "160k", "-movflags", "+faststart", str(tmp)]
    )  # fmt: skip
    tmp.rename(path)
    return path


def song() -> Path:
    path, ok = _cached(f"song-{SONG_SECONDS}s.mp3")
    if not ok:
        tmp = path.with_suffix(".part.mp3")
        run(
            [ffmpeg(), "-hide_banner", "-v", "error", "-y", "-stream_loop", "-1", "-i", str(REAL / "party.mp3"),
             "-t", str(SONG_SECONDS), "-c:a", "libmp3lame", "-b:a", "192k", "-ar", "44100", "-ac", "2", str(tmp)]
        )  # fmt: skip
        tmp.rename(path)
    return path


def heic() -> Path:
    return REAL / "pug.heic"


def jpeg_12mp() -> Path:
    path, ok = _cached("photo-12mp.jpg")
    if ok:
        return path
    import pillow_heif
    from PIL import Image

    pillow_heif.register_heif_opener()
    with Image.open(heic()) as im:
        icc = im.info.get("icc_profile")
        exif = im.getexif()
        exif[0x0112] = 6  # "rotate 90 clockwise to show": a phone held upright
        sideways = im.convert("RGB").transpose(Image.Transpose.ROTATE_90)
    buf = io.BytesIO()
    sideways.save(buf, "JPEG", quality=90, icc_profile=icc, exif=exif.tobytes())
    path.write_bytes(buf.getvalue())
    return path


def small_images(count: int) -> list[Path]:
    """``count`` distinct 800x600 JPEG crops of the real photos."""
    from PIL import Image

    folder = CACHE / "small"
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"small-{i:03d}.jpg" for i in range(count)]
    if all(p.exists() for p in paths):
        return paths
    sources = []
    for name in ("rommel.jpg", "kodim03.png", "chelsea.png", "wood.jpg"):
        with Image.open(REAL / name) as im:
            sources.append(im.convert("RGB"))
    big = sources[0]
    for i, p in enumerate(paths):
        if p.exists():
            continue
        if i % 4 == 0 or big.width < 800:
            im = sources[i // 4 % len(sources)].resize((800, 600))
        else:
            x = (i * 97) % (big.width - 800)
            y = (i * 61) % (big.height - 600)
            im = big.crop((x, y, x + 800, y + 600))
        im.save(p, "JPEG", quality=85)
    return paths
