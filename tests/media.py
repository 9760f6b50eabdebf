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
