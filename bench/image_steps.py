"""``python -m bench.image_steps``: where the 12 MP JPEG's image time goes, step by step.

Calls the steps of ``pipelines.images`` one at a time (the encode stage's private helpers, in the
order ``_encode_in_child`` runs them), each the median of N runs, wall and CPU. A profiling aid:
it follows the module's internals and may need adjusting when they change.
"""

from __future__ import annotations

import argparse
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--reps", type=int, default=7)
    args = parser.parse_args(argv)
    from pipelines import images as im
    from pipelines.profiles import Profiles

    profiles = Profiles()
    limits, profile = profiles.limits, profiles.image
    src = inputs.jpeg_12mp()
    work = Path(tempfile.mkdtemp(prefix="bench-image-steps-"))
    reps = args.reps
    print(f"load average {load()}; AVIF speed {profile.avif_speed}, WebP method {profile.webp_method}\n")
    print("| step | wall ms | CPU ms |\n|---|---|---|")
    info = _measure("decode stage (sandboxed)", lambda: im.image_decode(src, work, limits=limits), reps)
    plan = im.image_normalize(info, profiles=profiles)
    target = im._upright_size(plan.width, plan.height, info.orientation)

    def load_at(size: tuple[int, int]) -> Image.Image:
        picture = Image.open(src, formats=["JPEG"])
        picture.draft(None, size)
        picture.load()
        return picture

    def turbo_at(size: tuple[int, int]) -> Image.Image:
        with Image.open(src, formats=["JPEG"]) as picture:
            scaled = im._jpeg_scaled(str(src), picture, size)
        assert scaled is not None
        return scaled

    pillow = _measure(f"Pillow: open + draft to {target} + load", lambda: load_at(target), reps)
    print(f"|   (decoded at {pillow.size}) | | |")
    source = _measure(
        f"turbo at the smallest M/8 that covers {target} (what encode does)", lambda: turbo_at(target), reps
    )
    print(f"|   (decoded at {source.size}) | | |")
    icc = pillow.info.get("icc_profile")
    with ThreadPoolExecutor(max_workers=2) as pool:
        working = im._to_working_mode(source)
        resized = _measure("resize to the target", lambda: im._resize(working, target, pool), reps)
        srgb = _measure("ICC -> sRGB", lambda: im._srgb_converter(resized.mode, icc)(resized), reps)
        upright = _measure("rotation", lambda: im._transpose(srgb, info.orientation), reps)
        pictures = im._same_mode([upright.copy()])
        _measure("AVIF save", lambda: im._write_avif([pictures[0].copy()], [0], work / "a.avif", profile), reps)
        _measure("WebP save", lambda: im._write_webp(pictures, [0], 0, work / "a.webp", profile), reps)
        full = im._to_working_mode(pillow)
        _measure("alternative: resize Pillow's full-size decode instead", lambda: im._resize(full, target, pool), reps)
    _measure(
        "encode stage (sandboxed, all of the above)",
        lambda: im.image_encode(src, info, plan, work, profiles=profiles, limits=limits),
        reps,
    )
    print(f"\nload average {load()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
