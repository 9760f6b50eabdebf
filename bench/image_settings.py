"""``python -m bench.image_settings [--reps N]``: AVIF speed and WebP method, time against size and SSIM.

Each encoder runs alone on the picture the pipeline would hand it (upright, sRGB, long edge
fitted), so its wall and CPU time are its own; then the whole image pipeline (decode, normalize,
encode, as the worker runs it) is timed for a few pairs of settings, round-robin so that a change
in the machine's load hits every pair alike. Writes ``bench/results/image-settings.md``.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from PIL import Image

from bench import images, inputs
from bench.harness import RESULTS, load, median, spread, timed_cpu

SPEEDS = (8, 9, 10)
METHODS = (2, 3, 4)
PAIRS = ((8, 4), (9, 4), (8, 2), (9, 2), (9, 3), (10, 2), (10, 3))


def _picture(src: Path, long_edge: int) -> Image.Image:
    """What the pipeline encodes: long edge fitted (Hamming, as the pipeline), upright, sRGB."""
    with Image.open(src) as im:
        icc = im.info.get("icc_profile")
        exif = im.getexif()
        scale = long_edge / max(im.size)
        size = (round(im.width * scale), round(im.height * scale))
        if im.format == "JPEG":
            im.draft("RGB", size)
        picture = im.convert("RGB").resize(size, Image.Resampling.HAMMING, reducing_gap=3.0)
    picture.info["icc_profile"] = icc
    picture = images._srgb(picture)
    picture.info = {}
    return picture.transpose(Image.Transpose.ROTATE_270) if exif.get(0x0112) == 6 else picture


def _encode(picture: Image.Image, fmt: str, **options: Any) -> tuple[float, float, bytes]:
    buf = io.BytesIO()
    wall, cpu = time.perf_counter(), time.process_time()
    picture.save(buf, fmt, **options)
    return time.perf_counter() - wall, time.process_time() - cpu, buf.getvalue()


def _ssim(data: bytes, ref: Image.Image, work: Path) -> float:
    with Image.open(io.BytesIO(data)) as im:
        im.load()
        return images.ssim_y(im, ref, work)


def encoders(src: Path, profile: Any, reps: int, work: Path) -> list[str]:
    picture = _picture(src, profile.long_edge)
    ref = images.reference(src, picture.size)
    lines = [
        "| encoder | setting | wall ms (median, spread) | CPU ms | KB | SSIM (Y) |",
        "|---|---|---|---|---|---|",
    ]
    cases = [("AVIF", "speed", s, {"quality": profile.avif_quality, "speed": s}) for s in SPEEDS]
    cases += [("WEBP", "method", m, {"quality": profile.webp_quality, "method": m}) for m in METHODS]
    for fmt, knob, setting, options in cases:
        walls, cpus, data = [], [], b""
        for _ in range(reps):
            wall, cpu, data = _encode(picture, fmt, **options)
            walls.append(wall * 1000)
            cpus.append(cpu * 1000)
        line = (
            f"| {fmt} q{options['quality']} | {knob} {setting} | {median(walls):.0f} ({spread(walls, '{:.0f}')}) | "
            f"{median(cpus):.0f} | {len(data) / 1024:.0f} | {_ssim(data, ref, work):.4f} |"
        )
        print(line, flush=True)
        lines.append(line)
    return lines


def pipelines(src: Path, profiles: Any, reps: int, work: Path) -> list[str]:
    lines = [
        "| avif speed, webp method | pipeline wall ms (median, spread) | CPU ms | AVIF KB | WebP KB |",
        "|---|---|---|---|---|",
    ]
    times: dict[tuple[int, int], list[float]] = {pair: [] for pair in PAIRS}
    cpus: dict[tuple[int, int], list[float]] = {pair: [] for pair in PAIRS}
    sizes: dict[tuple[int, int], tuple[float, float]] = {}
    for i in range(reps):
        for pair in PAIRS if i % 2 == 0 else reversed(PAIRS):
            variant = dataclasses.replace(
                profiles, image=dataclasses.replace(profiles.image, avif_speed=pair[0], webp_method=pair[1])
            )
            out = work / f"p{pair[0]}{pair[1]}-{i}"
            out.mkdir(parents=True)
            wall, cpu, outs = timed_cpu(lambda o=out, v=variant: images.pipeline_image(src, o, v))
            times[pair].append(wall * 1000)
            cpus[pair].append(cpu * 1000)
            sizes[pair] = (outs.avif.stat().st_size / 1024, outs.webp.stat().st_size / 1024)
            shutil.rmtree(out)
    default = (profiles.image.avif_speed, profiles.image.webp_method)
    for pair in PAIRS:
        ms = times[pair]
        tag = " (default)" if pair == default else ""
        line = (
            f"| {pair[0]}, {pair[1]}{tag} | {median(ms):.0f} ({spread(ms, '{:.0f}')}) | {median(cpus[pair]):.0f}"
            f" | {sizes[pair][0]:.0f} | {sizes[pair][1]:.0f} |"
        )
        print(line, flush=True)
        lines.append(line)
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--reps", type=int, default=7)
    args = parser.parse_args(argv)
    from pipelines.profiles import Profiles

    profiles = Profiles()
    start = load()
    out = [
        "# Image encoder settings: time against size and quality",
        "",
        f"- machine: {os.cpu_count()} cores; load average at start {start}",
        f"- {args.reps} repetitions per figure; picture: long edge {profiles.image.long_edge}, "
        f"AVIF quality {profiles.image.avif_quality}, WebP quality {profiles.image.webp_quality}",
        "",
    ]
    work = Path(tempfile.mkdtemp(prefix="bench-image-settings-"))
    try:
        for label, src in (("12 MP JPEG", inputs.jpeg_12mp()), ("12 MP HEIC", inputs.heic())):
            print(f"\n{label}: each encoder alone", flush=True)
            out += [f"## {label}", "", "Each encoder alone:", "", *encoders(src, profiles.image, args.reps, work)]
            print(f"\n{label}: the whole image pipeline (decode, normalize, encode both)", flush=True)
            out += ["", "The whole pipeline:", "", *pipelines(src, profiles, args.reps, work), ""]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    out.append(f"- load average at end {load()}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "image-settings.md").write_text("\n".join(out) + "\n")
    print(f"\nload average: start {start}, end {load()}; wrote {RESULTS / 'image-settings.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
