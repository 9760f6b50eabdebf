"""Images: the pipeline's stages against a bare Pillow script doing the same job.

"The same job": read the file, apply the EXIF orientation, convert a non-sRGB ICC profile to
sRGB, fit the long edge in the profile's size, write AVIF and WebP at the profile's settings with
no metadata. The bare script does it the way the Pillow docs suggest (``thumbnail``, which uses
JPEG draft mode, then ``exif_transpose``, then two saves one after the other).

Quality is SSIM on luma (ffmpeg's ``ssim`` filter, Y plane) against the source decoded at full
size, made upright and sRGB, and resized with Lanczos to the output's size.
"""

from __future__ import annotations

import io
import re
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pillow_heif
from PIL import Image, ImageCms, ImageOps

from bench import inputs, stack
from bench.harness import Report, Row, check, cpu_now, ffmpeg, median, ratio, run, spread, timed_cpu

IMAGE_MS = 400.0  # issue 3: a 12-megapixel JPEG -> AVIF + WebP in under 400 ms

pillow_heif.register_heif_opener()


@dataclass
class Outputs:
    avif: Path
    webp: Path


def pipeline_image(src: Path, out_dir: Path, profiles: Any) -> Outputs:
    """What the worker's decode, normalize and encode stages call, in this process."""
    from pipelines import images

    limits = profiles.limits
    info = images.image_decode(src, out_dir, limits=limits)
    plan = images.image_normalize(info, profiles=profiles)
    images.image_encode(src, info, plan, out_dir, profiles=profiles, limits=limits)
    return Outputs(out_dir / "image.avif", out_dir / "image.webp")


def timed_pipeline(src: Path, out_dir: Path, profiles: Any) -> tuple[float, float, Outputs]:
    """(wall seconds, CPU seconds, outputs) of ``pipeline_image``. The encode's child is reaped by
    a thread after its result is in (pipelines.sandbox), so its CPU time is counted once that
    thread is done, after the wall clock has stopped."""
    cpu, started = cpu_now(), time.perf_counter()
    outs = pipeline_image(src, out_dir, profiles)
    wall = time.perf_counter() - started
    for thread in threading.enumerate():
        if thread.name.startswith("reap-"):
            thread.join(10)
    return wall, cpu_now() - cpu, outs


def _srgb(im: Image.Image) -> Image.Image:
    icc = im.info.get("icc_profile")
    im = im.convert("RGB")
    if icc:
        source = ImageCms.ImageCmsProfile(io.BytesIO(icc))
        if "srgb" not in (ImageCms.getProfileDescription(source) or "").lower():
            converted = ImageCms.profileToProfile(im, source, ImageCms.createProfile("sRGB"), outputMode="RGB")
            assert converted is not None
            return converted
    return im


def bare_pillow(src: Path, out_dir: Path, profile: Any) -> Outputs:
    out_dir.mkdir(parents=True, exist_ok=True)
    with Image.open(src) as im:
        im.thumbnail((profile.long_edge, profile.long_edge))
        icc = im.info.get("icc_profile")
        im = ImageOps.exif_transpose(im)
        im.info["icc_profile"] = icc
        im = _srgb(im)
    outs = Outputs(out_dir / "bare.avif", out_dir / "bare.webp")
    strip = {"exif": b"", "xmp": b"", "icc_profile": b""}
    im.save(outs.avif, "AVIF", quality=profile.avif_quality, speed=profile.avif_speed, **strip)
    im.save(outs.webp, "WEBP", quality=profile.webp_quality, method=profile.webp_method, **strip)
    return outs


def reference(src: Path, size: tuple[int, int]) -> Image.Image:
    with Image.open(src) as im:
        icc = im.info.get("icc_profile")
        im = ImageOps.exif_transpose(im)
        im.info["icc_profile"] = icc
        return _srgb(im).resize(size, Image.Resampling.LANCZOS)


def ssim_y(a: Image.Image, b: Image.Image, work: Path) -> float:
    """SSIM of the luma planes (ffmpeg's ``ssim`` filter), images of one size."""
    work.mkdir(parents=True, exist_ok=True)
    raw = []
    for name, im in (("a", a), ("b", b)):
        path = work / f"{name}.rgb"
        path.write_bytes(im.convert("RGB").tobytes())
        raw += ["-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{im.width}x{im.height}", "-i", str(path)]
    out = run(
        [ffmpeg(), "-hide_banner", "-nostdin", *raw, "-lavfi", "[0]format=yuv444p[x];[1]format=yuv444p[y];[x][y]ssim",
         "-f", "null", "-"]
    )  # fmt: skip
    found = re.search(r"SSIM Y:([0-9.]+)", out.stderr)
    if not found:
        raise RuntimeError(out.stderr[-500:])
    return float(found.group(1))


def quality(path: Path, ref: Image.Image, work: Path) -> tuple[float, float]:
    """(kilobytes, SSIM) of an output against the reference at the output's size."""
    with Image.open(path) as im:
        im.load()
        score = ssim_y(im, ref if ref.size == im.size else ref.resize(im.size, Image.Resampling.LANCZOS), work)
    return path.stat().st_size / 1024, score


def image_section(report: Report, owner: Any, *, reps: int, worker_reps: int) -> None:
    from pipelines import sandbox
    from tasks.bindings import profiles as current

    profiles = current()
    # A worker's pool process starts its decoders' fork server when it starts; so does this one,
    # before the clock runs (with --only images nothing has started it yet).
    sandbox.fork_server()
    cases = [("12 MP JPEG", inputs.jpeg_12mp(), True), ("12 MP HEIC", inputs.heic(), False)]
    for label, src, has_target in cases:
        work = Path(tempfile.mkdtemp(prefix="bench-image-"))
        try:
            pipe_ms, bare_ms, pipe_cpu, bare_cpu = [], [], [], []
            for i in range(reps):
                # Fresh folders, alternating order; a short pause lets the other side's threads finish.
                for side in ("pipe", "bare") if i % 2 == 0 else ("bare", "pipe"):
                    out = work / f"{side}{i}"
                    out.mkdir()
                    if side == "pipe":
                        seconds, cpu, pipe_out = timed_pipeline(src, out, profiles)
                        pipe_ms.append(seconds * 1000)
                        pipe_cpu.append(cpu * 1000)
                    else:
                        seconds, cpu, bare_out = timed_cpu(lambda o=out, s=src: bare_pillow(s, o, profiles.image))
                        bare_ms.append(seconds * 1000)
                        bare_cpu.append(cpu * 1000)
                    time.sleep(0.05)
            value = median(pipe_ms)
            target = f"< {IMAGE_MS:g} ms (value)" if has_target else ""
            report.add(
                Row(f"image {label} → AVIF+WebP", value, "ms", median(bare_ms), ratio(value, median(bare_ms)),
                    target, check(value, "<", IMAGE_MS) if has_target else None, spread(pipe_ms, "{:.0f}"), reps,
                    f"CPU ms {median(pipe_cpu):.0f} vs bare {median(bare_cpu):.0f}; "
                    f"bare wall {spread(bare_ms, '{:.0f}')}; fastest runs {min(pipe_ms):.0f} vs bare "
                    f"{min(bare_ms):.0f} ({min(pipe_ms) / min(bare_ms):.2f}x, the nearest to a quiet machine)")
            )  # fmt: skip
            with Image.open(pipe_out.avif) as im:
                ref = reference(src, im.size)
            for fmt_name in ("avif", "webp"):
                kb, score = quality(getattr(pipe_out, fmt_name), ref, work / "q")
                bare_kb, bare_score = quality(getattr(bare_out, fmt_name), ref, work / "q")
                report.add(
                    Row(f"  {label} {fmt_name.upper()} size", kb, "KB", bare_kb, ratio(kb, bare_kb), "", None, "",
                        1, f"{ref.width}x{ref.height}")
                )  # fmt: skip
                report.add(
                    Row(f"  {label} {fmt_name.upper()} SSIM (Y) vs source", score, "SSIM", bare_score,
                        ratio(score, bare_score), "", None, "", 1, "")
                )  # fmt: skip
            if has_target and worker_reps:
                stack.process(src, owner)  # warm-up: the pool process's first image pays for lazy set-up
                runs = [stack.process(src, owner) for _ in range(worker_reps)]
                e2e = [r.seconds * 1000 for r in runs]
                stages = {s: round(median([r.stages[s] for r in runs]) * 1000) for s in runs[0].stages}
                report.add(
                    Row(f"image {label} via worker: enqueue→Completed", median(e2e), "ms", value,
                        ratio(median(e2e), value), "", None, spread(e2e, "{:.0f}"), worker_reps,
                        f"baseline: stages in-process; stage ms {stages}")
                )  # fmt: skip
        finally:
            shutil.rmtree(work, ignore_errors=True)
