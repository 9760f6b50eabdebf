"""``python -m bench.image_steps [--reps N] [--only jpeg,heic]``: where a 12 MP photo's image time
goes, step by step.

Calls the steps of ``pipelines.images`` one at a time, in the order ``_encode_in_child`` runs them
(its private helpers), each the median of N runs, wall and CPU; then the whole encode stage, and
the bare Pillow script (``bench.images.bare_pillow``) for scale. A profiling aid: it follows the
module's internals and may need adjusting when they change.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from PIL import Image

from bench import inputs
from bench.harness import load, timed_cpu


def _measure(name: str, fn: Callable[[], Any], reps: int) -> Any:
    walls, cpus, out = [], [], None
    for _ in range(reps):
        wall, cpu, out = timed_cpu(fn)
        walls.append(wall * 1000)
        cpus.append(cpu * 1000)
    print(f"| {name} | {statistics.median(walls):.0f} | {statistics.median(cpus):.0f} |", flush=True)
    return out


def _steps(label: str, src: Path, pil_format: str, work: Path, reps: int) -> None:
    from bench.images import bare_pillow
    from pipelines import images as im
    from pipelines.profiles import Profiles
    from pipelines.sandbox import child_limits, run_isolated

    profiles = Profiles()
    limits, profile = profiles.limits, profiles.image
    print(f"\n### {label} ({src.name})\n\n| step | wall ms | CPU ms |\n|---|---|---|")
    _measure("fork + rlimits + reap, an empty child (paid by each sandboxed stage)",
             lambda: run_isolated(os.getpid, limits=child_limits(limits)), reps)  # fmt: skip
    info = _measure("decode stage (sandboxed; header only)", lambda: im.image_decode(src, work, limits=limits), reps)
    plan = im.image_normalize(info, profiles=profiles)
    target = im._upright_size(plan.width, plan.height, info.orientation)
    # Not im._harden: its malloc settings would also speed up the bare script measured below.

    def opened() -> Image.Image:
        picture = im._open(str(src), pil_format, limits)
        im._check_size(picture, pil_format, limits)
        return picture

    header = _measure("open + size check (header)", opened, reps)
    icc = header.info.get("icc_profile")
    if pil_format == "JPEG":
        source = _measure(
            f"turbo decode at the smallest M/8 covering {target}",
            lambda: im._jpeg_scaled(str(src), opened(), target), reps,
        )  # fmt: skip
    else:
        rows = _measure("decode into pillow-heif's buffer (what encode does)",
                        lambda: im._heif_rows(opened(), target), reps)  # fmt: skip

        def pillow_load() -> Image.Image:
            picture = opened()
            picture.load()
            return picture

        source = _measure("alternative: decode + copy all into Pillow's image (im.load())", pillow_load, reps)
    print(f"|   (decoded at {source.size} {source.mode}) | | |")
    to_srgb = im._srgb_converter(source.mode, icc)
    half = (target[0], target[1] // 2)
    box = (0, 0, source.width, source.height / 2)
    band = _measure(f"one band: resize to {half} (one thread)",
                    lambda: source.resize(half, im._RESAMPLE, box=box), reps)  # fmt: skip
    band = _measure("one band: ICC -> sRGB", lambda: to_srgb(band), reps)
    _measure("one band: turn upright", lambda: im._transpose(band, info.orientation), reps)
    with ThreadPoolExecutor(max_workers=2) as pool:
        if pil_format == "HEIF":
            _measure(
                "alternative: both bands from the copy in Pillow's image",
                lambda: im._resize_convert_turn(source, target, to_srgb, info.orientation, pool), reps,
            )  # fmt: skip
        upright = _measure(
            "both bands on two threads + paste (_resize_convert_turn, what encode does)",
            lambda: im._resize_convert_turn(rows if pil_format == "HEIF" else source, target, to_srgb,
                                            info.orientation, pool), reps,
        )  # fmt: skip
        pictures = im._same_mode([upright])
        _measure("AVIF save alone", lambda: im._write_avif([pictures[0].copy()], [0], work / "a.avif", profile), reps)
        _measure("WebP save alone", lambda: im._write_webp(pictures, [0], 0, work / "a.webp", profile), reps)

        def both() -> None:
            avif = pool.submit(im._write_avif, [pictures[0].copy()], [0], work / "a.avif", profile)
            im._write_webp(pictures, [0], 0, work / "a.webp", profile)
            avif.result()

        _measure("AVIF + WebP side by side (as encode runs them)", both, reps)
    walls: dict[str, list[float]] = {"encode": [], "bare": []}
    for index in range(reps):
        # Alternated, so a change in the machine's load falls on both alike.
        for side in ("encode", "bare") if index % 2 == 0 else ("bare", "encode"):
            if side == "encode":
                wall, _, _ = timed_cpu(lambda: im.image_encode(src, info, plan, work, profiles=profiles, limits=limits))
            else:
                wall, _, _ = timed_cpu(lambda: bare_pillow(src, work, profile))
            walls[side].append(wall * 1000)
    encode, bare = (statistics.median(walls[side]) for side in ("encode", "bare"))
    print(f"| encode stage (sandboxed: all of the above), alternated with the next row | {encode:.0f} | |")
    print(f"| bare Pillow script (bench.images.bare_pillow) | {bare:.0f} | |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--only", default="jpeg,heic")
    args = parser.parse_args(argv)
    from pipelines.profiles import Profiles

    profile = Profiles().image
    work = Path(tempfile.mkdtemp(prefix="bench-image-steps-"))
    print(f"load average {load()}; AVIF speed {profile.avif_speed} q{profile.avif_quality}, "
          f"WebP method {profile.webp_method} q{profile.webp_quality}")  # fmt: skip
    cases = {"jpeg": ("12 MP JPEG", inputs.jpeg_12mp(), "JPEG"), "heic": ("12 MP HEIC", inputs.heic(), "HEIF")}
    for key in args.only.split(","):
        _steps(*cases[key], work, args.reps)
    print(f"\nload average {load()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
