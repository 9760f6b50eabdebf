"""Video, audio and thumbnails: the whole stack against plain ffmpeg commands run back to back."""

from __future__ import annotations

import json
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import inputs, stack
from bench.harness import Report, Row, check, ffmpeg, median, ratio, run, spread, timed, timed_cpu

REALTIME_VIDEO = 3.0  # issue 3: >= 3x realtime end to end, 720p, default profile
PLAIN_RATIO = 1.15  # issue 3: pipeline wall time within 1.15x of plain ffmpeg
REALTIME_AUDIO = 20.0  # issue 3: >= 20x realtime
THUMB_MS = 300.0  # issue 3: a thumbnail in under 300 ms
# Ours, not an issue's: the default profile scores ~86 on the grainy 720p pan; a preset or crf
# change that costs more than a few points should fail loudly, not pass as "faster".
VMAF_GUARD = 80.0


def _profiles() -> Any:
    from tasks.bindings import profiles

    return profiles()


def plain_video(src: Path, work: Path, duration: float) -> dict[str, float]:
    """The same deliverables by the same ffmpeg commands, back to back in one process: the ladder
    encode (every rung, the VP9 fallback, Opus, one run), the WebM, the DASH packaging and the
    previews (thumbnail, storyboard, placeholder).

    What the pipeline adds is what this leaves out: the demux copy, the decode check, the
    loudness pass, the queue, the database and the stage files in storage. So the ratio is the
    pipeline's own cost, whatever the ladder costs. The plan (probe, loudness, filters) is made
    before the clock starts, since a hand-written command would have it typed in.
    """
    from pipelines import av as pav

    p = _profiles()
    shutil.rmtree(work, ignore_errors=True)
    demux_dir = work / "demux"
    demuxed = pav.demux(src, demux_dir, limits=p.limits)
    plan = pav.normalize(demuxed, demux_dir, work / "plan", profiles=p, limits=p.limits)
    filters = pav.build_filters(plan, profiles=p)
    enc_dir, mux_dir = work / "encode", work / "mux"
    encode, encoded = timed(lambda: pav.encode(demuxed, demux_dir, filters, plan, enc_dir, profiles=p, limits=p.limits))
    webm, muxed = timed(lambda: pav.mux(encoded, enc_dir, mux_dir, limits=p.limits))
    dash, _ = timed(
        lambda: pav.chunk(
            muxed, mux_dir, work / "dash", profiles=p, limits=p.limits, encoded=encoded,
            encode_dir=enc_dir if encoded.rungs[1:] else None,
        )
    )  # fmt: skip
    previews, _ = timed(lambda: _plain_previews(pav, demuxed, demux_dir, work / "previews", p))
    total = encode + webm + dash + previews
    return {"encode": encode, "webm": webm, "dash": dash, "previews": previews, "total": total}


def _plain_previews(pav: Any, demuxed: Any, demux_dir: Path, out: Path, p: Any) -> None:
    """What the pipeline's previews stage makes: the thumbnail with its placeholder, and the
    storyboard (which decodes the whole video: leaving it out charged the pipeline ~3 s of a 60 s
    720p run that the plain side never did)."""
    from pipelines.placeholder import thumbhash_file

    shown = pav.previews(demuxed, demux_dir, out, profiles=p, limits=p.limits)
    for o in shown.outputs:
        if o.role == "thumbnail":
            thumbhash_file(out / o.file)
    pav.storyboards(demuxed, demux_dir, out, profiles=p, limits=p.limits)


def plain_thumbnail_args(src: Path, dst: Path, at: float, width: int, quality: int) -> list[str]:
    return [
        ffmpeg(), "-hide_banner", "-nostdin", "-v", "error", "-y", "-ss", f"{at:.3f}", "-i", str(src),
        "-frames:v", "1", "-vf", f"scale={width}:-2", "-c:v", "libwebp", "-quality", str(quality), "-f", "webp",
        str(dst),
    ]  # fmt: skip


def vmaf(
    distorted: Path, reference: Path, size: tuple[int, int], *, fps: int, subsample: int, work: Path
) -> dict[str, float]:
    """VMAF (libvmaf's default model) of every ``subsample``-th frame, the upload scaled to the output's size.

    Frames are paired by index, not by timestamp: WebM stores milliseconds, so at 30 fps every
    third frame's time rounds down below the source's and libvmaf's timestamp sync would pair it
    with the previous source frame (a one-frame shift that scores ~40 instead of ~88).
    """
    log = work / "vmaf.json"
    index = f"settb=1/{fps},setpts=N"
    graph = (
        f"[0:v]{index}[d];[1:v]scale={size[0]}:{size[1]}:flags=bicubic,{index}[r];"
        f"[d][r]libvmaf=n_threads=2:n_subsample={subsample}:log_fmt=json:log_path={log}"
    )
    run([ffmpeg(), "-hide_banner", "-nostdin", "-i", str(distorted), "-i", str(reference),
         "-lavfi", graph, "-f", "null", "-"])  # fmt: skip
    pooled = json.loads(log.read_text())["pooled_metrics"]["vmaf"]
    return {"mean": pooled["mean"], "min": pooled["min"], "harmonic_mean": pooled["harmonic_mean"]}


def _stage_line(runs: list[stack.Run]) -> dict[str, float]:
    stages = {s: median([r.stages.get(s, 0.0) for r in runs]) for s in runs[0].stages}
    stages["overhead"] = median([r.overhead_seconds for r in runs])
    return {k: round(v, 3) for k, v in stages.items()}


def video_section(report: Report, owner: Any, *, height: int, reps: int, vmaf_subsample: int | None) -> None:
    src = inputs.video(height)
    duration = float(inputs.VIDEO_SECONDS)
    work = Path(tempfile.mkdtemp(prefix=f"bench-video{height}-"))
    runs: list[stack.Run] = []
    plains: list[dict[str, float]] = []
    try:
        for i in range(reps):
            # Alternate the order so a drift in the machine's load hits both sides alike.
            for side in ("pipeline", "plain") if i % 2 == 0 else ("plain", "pipeline"):
                if side == "pipeline":
                    runs.append(stack.process(src, owner))
                    print(f"   pipeline {runs[-1].seconds:.2f} s  stages {_stage_line(runs[-1:])}", flush=True)
                else:
                    plains.append(plain_video(src, work / "plain", duration))
                    print(f"   plain    {plains[-1]['total']:.2f} s  {_round(plains[-1])}", flush=True)
        pipe = [r.seconds for r in runs]
        plain = [p["total"] for p in plains]
        rt_pipe, rt_plain = duration / median(pipe), duration / median(plain)
        tag = f"video {height}p {duration:.0f} s → WebM+DASH+thumb"
        # Issue 3 sets the realtime target for 720p; 1080p is reported beside it.
        target, meets = (
            (f"≥ {REALTIME_VIDEO:g}x (value)", check(rt_pipe, ">=", REALTIME_VIDEO)) if height == 720 else ("", None)
        )
        report.add(
            Row(f"{tag}: realtime", rt_pipe, "x realtime", rt_plain, ratio(rt_pipe, rt_plain), target, meets,
                spread([duration / t for t in pipe]), reps, "baseline: the same ffmpeg commands, plain")
        )  # fmt: skip
        # Each pipeline run sits next to a plain run: the median of the pairs' ratios follows the
        # machine's drifting load far better than the ratio of the two medians.
        pairs = [a / b for a, b in zip(pipe, plain, strict=True)]
        wall_ratio = median(pairs)
        report.add(
            Row(f"{tag}: wall pipeline/plain", median(pipe), "s", median(plain), wall_ratio,
                f"≤ {PLAIN_RATIO:g} (ratio)", check(wall_ratio, "<=", PLAIN_RATIO), spread(pairs), reps,
                "ratio: median of adjacent pairs' ratios; spread: the pairs' ratios")
        )  # fmt: skip
        report.extra.setdefault("video", {})[f"{height}p"] = {
            "pipeline_seconds": pipe,
            "plain_seconds": plains,
            "stages_median": _stage_line(runs),
            "output_bytes": runs[-1].item.renditions.get(role="video").bytes,
        }
        if vmaf_subsample:
            out = runs[-1].item.renditions.get(role="video")
            score = vmaf(
                stack.output_path(runs[-1].item, "video"),
                src,
                (out.width, out.height),
                fps=inputs.VIDEO_FPS,
                subsample=vmaf_subsample,
                work=work,
            )
            kbps = out.bytes * 8 / duration / 1000
            report.add(
                Row(f"video {height}p quality: VMAF of default profile", score["mean"], "VMAF", None, None,
                    f"≥ {VMAF_GUARD:g} (guard, ours)", check(score["mean"], ">=", VMAF_GUARD),
                    f"min {score['min']:.1f}", 1, f"1 frame in {vmaf_subsample} vs the upload; {kbps:.0f} kb/s")
            )  # fmt: skip
            report.extra["video"][f"{height}p"]["vmaf"] = score
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _round(d: dict[str, float]) -> dict[str, float]:
    return {k: round(v, 2) for k, v in d.items()}


def audio_section(report: Report, owner: Any, *, reps: int) -> None:
    src = inputs.song()
    duration = float(inputs.SONG_SECONDS)
    ap = _profiles().audio
    work = Path(tempfile.mkdtemp(prefix="bench-audio-"))
    runs: list[stack.Run] = []
    plain: list[float] = []
    try:
        for i in range(reps):
            for side in ("pipeline", "plain") if i % 2 == 0 else ("plain", "pipeline"):
                if side == "pipeline":
                    runs.append(stack.process(src, owner))
                else:
                    seconds, _ = timed(
                        lambda: run(
                            [ffmpeg(), "-hide_banner", "-nostdin", "-v", "error", "-y", "-i", str(src),
                             "-map", "0:a:0", "-c:a", ap.codec, "-b:a", ap.bitrate, "-ar", str(ap.sample_rate),
                             "-f", "webm", str(work / "song.webm")]
                        )
                    )  # fmt: skip
                    plain.append(seconds)
        pipe = [r.seconds for r in runs]
        rt_pipe, rt_plain = duration / median(pipe), duration / median(plain)
        report.add(
            Row(f"audio {duration:.0f} s song → Opus WebM: realtime", rt_pipe, "x realtime", rt_plain,
                ratio(rt_pipe, rt_plain), f"≥ {REALTIME_AUDIO:g}x (value)", check(rt_pipe, ">=", REALTIME_AUDIO),
                spread([duration / t for t in pipe], "{:.1f}"), reps, "baseline: one plain ffmpeg command")
        )  # fmt: skip
        report.add(
            Row("audio: wall pipeline/plain", median(pipe), "s", median(plain),
                median([a / b for a, b in zip(pipe, plain, strict=True)]), "", None, spread(pipe), reps,
                f"ratio: median of adjacent pairs; stages {_stage_line(runs)}")
        )  # fmt: skip
        report.extra["audio"] = {"pipeline_seconds": pipe, "plain_seconds": plain, "stages_median": _stage_line(runs)}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def thumbnail_section(report: Report, *, heights: list[int], reps: int) -> None:
    """``previews`` in-process on the demuxed upload (what the stage runs) vs one ffmpeg command."""
    from pipelines import av

    prof = _profiles()
    for height in heights:
        src = inputs.video(height)
        work = Path(tempfile.mkdtemp(prefix="bench-thumb-"))
        try:
            demuxed = av.demux(src, work / "demux", limits=prof.limits)
            at = (demuxed.duration or 0) / 3
            pipe, plain, pipe_cpu, plain_cpu = [], [], [], []
            for _ in range(reps):
                seconds, cpu, _ = timed_cpu(
                    lambda d=demuxed, w=work: av.previews(d, w / "demux", w / "prev", profiles=prof, limits=prof.limits)
                )
                pipe.append(seconds * 1000)
                pipe_cpu.append(cpu * 1000)
                args = plain_thumbnail_args(src, work / "plain.webp", at, prof.thumbnail.width, prof.thumbnail.quality)
                seconds, cpu, _ = timed_cpu(lambda a=args: run(a))
                plain.append(seconds * 1000)
                plain_cpu.append(cpu * 1000)
                time.sleep(0.05)
            value = median(pipe)
            report.add(
                Row(f"thumbnail from {height}p video", value, "ms", median(plain), ratio(value, median(plain)),
                    f"< {THUMB_MS:g} ms (value)", check(value, "<", THUMB_MS), spread(pipe, "{:.0f}"), reps,
                    f"previews() in-process vs ffmpeg -ss -frames:v 1; CPU ms {median(pipe_cpu):.0f} vs "
                    f"{median(plain_cpu):.0f}")
            )  # fmt: skip
        finally:
            shutil.rmtree(work, ignore_errors=True)


def vmaf_available() -> bool:
    out = run([ffmpeg(), "-hide_banner", "-filters"]).stdout
    return re.search(r"\blibvmaf\b", out) is not None
