"""The adaptive ladder's price: a whole 1080p item through the worker (the AV1 ladder, the VP9
fallback, the storyboard, the thumbnail, DASH) against one plain 1080p AV1 encode of the same
clip, side by side in one run (issue 18: at most 2.5x), and the VMAF of every rung.

The clip is the video benchmark's photo pan with grain (bench/inputs.py) at 1080p, 20 s: long
enough for five 4 s segments, short enough to run both sides twice. Each rung's VMAF is taken on
its DASH representation as a player fetches it (init segment + media segments), against the
upload scaled to the rung's size.
"""

from __future__ import annotations

import shutil
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

from bench import inputs, stack
from bench.av import vmaf
from bench.harness import Report, Row, check, ffmpeg, median, run, spread, timed

SECONDS = 20
FPS = 30
TARGET = 2.5  # issue 18: the whole item in at most 2.5x one plain 1080p AV1 encode
MPD = "{urn:mpeg:dash:schema:mpd:2011}"


def clip_1080p() -> Path:
    """The video benchmark's photo pan with grain at 1080p, SECONDS long."""
    return inputs.video(1080, seconds=SECONDS, fps=FPS)


def plain_av1(src: Path, dst: Path) -> float:
    """One plain AV1 + Opus WebM at the default preset and CRF, key frames every segment."""
    from tasks.bindings import profiles

    vp, ap = profiles().video, profiles().audio
    gop = round(FPS * vp.segment_seconds)
    seconds, _ = timed(
        lambda: run(
            [ffmpeg(), "-hide_banner", "-nostdin", "-v", "error", "-y", "-i", str(src),
             "-c:v", vp.codec, "-preset", str(vp.preset), "-crf", str(vp.crf), "-g", str(gop),
             "-force_key_frames", f"expr:gte(t,n_forced*{vp.segment_seconds:g})",
             "-c:a", ap.codec, "-b:a", ap.bitrate, "-f", "webm", str(dst)]
        )
    )  # fmt: skip
    return seconds


def representations(manifest: Path, work: Path) -> list[dict[str, Any]]:
    """Each video representation as one file (init + segments, as a player appends them)."""
    reps = []
    for aset in ET.parse(manifest).getroot().iter(f"{MPD}AdaptationSet"):
        if aset.get("contentType") != "video":
            continue
        for rep in aset.iter(f"{MPD}Representation"):
            rid = rep.get("id", "")
            template = rep.find(f"{MPD}SegmentTemplate")
            timeline = rep.find(f"{MPD}SegmentTemplate/{MPD}SegmentTimeline")
            assert template is not None and timeline is not None
            count = sum(1 + int(s.get("r", 0)) for s in timeline)
            # Named as a player resolves the template: WebM for AV1/VP9, MP4 (.m4s) for the
            # operator's H.264 fallback when MEDIA_PROFILES turns it on.
            init = template.get("initialization", "").replace("$RepresentationID$", rid)
            media = template.get("media", "").replace("$RepresentationID$", rid).replace("$Number%05d$", "{:05d}")
            parts = [manifest.parent / init]
            parts += [manifest.parent / media.format(n) for n in range(1, count + 1)]
            out = work / f"rep-{rid}{Path(init).suffix}"
            out.write_bytes(b"".join(p.read_bytes() for p in parts))
            reps.append({
                "file": out,
                "codec": rep.get("codecs", "").split(".")[0],
                "width": int(rep.get("width", 0)),
                "height": int(rep.get("height", 0)),
                "kbps": int(rep.get("bandwidth", 0)) / 1000,
            })  # fmt: skip
    return reps


def ladder_section(report: Report, owner: Any, *, reps: int, vmaf_subsample: int | None) -> None:
    src = clip_1080p()
    work = Path(tempfile.mkdtemp(prefix="bench-ladder-"))
    runs: list[stack.Run] = []
    plains: list[float] = []
    try:
        for i in range(reps):
            for side in ("pipeline", "plain") if i % 2 == 0 else ("plain", "pipeline"):
                if side == "pipeline":
                    runs.append(stack.process(src, owner))
                    stages = {k: round(v, 2) for k, v in runs[-1].stages.items()}
                    print(f"   ladder item {runs[-1].seconds:.2f} s  stages {stages}", flush=True)
                else:
                    plains.append(plain_av1(src, work / "plain.webm"))
                    print(f"   plain AV1 1080p {plains[-1]:.2f} s", flush=True)
        pairs = [a / b for a, b in zip([r.seconds for r in runs], plains, strict=True)]
        wall = median(pairs)
        from tasks.bindings import profiles

        # An operator's MEDIA_PROFILES reaches the worker too (the bench's environment is its own).
        h264 = " + H.264/AAC fallback" if profiles().video.h264_fallback else ""
        report.add(
            Row(f"ladder 1080p {SECONDS} s: whole item / one plain 1080p AV1 encode", median([r.seconds for r in runs]),
                "s", median(plains), wall, f"≤ {TARGET:g} (ratio)", check(wall, "<=", TARGET), spread(pairs), reps,
                f"item: AV1 ladder + VP9 fallback{h264} + storyboard + thumbnail + DASH, through the worker; "
                "ratio: median of adjacent pairs")
        )  # fmt: skip
        last = runs[-1].item
        details: dict[str, Any] = {
            "item_seconds": [r.seconds for r in runs],
            "plain_seconds": plains,
            "stages": runs[-1].stages,
            "rungs": [],
        }
        manifest = stack.output_path(last, "manifest")
        for rep in representations(manifest, work):
            row = {k: rep[k] for k in ("codec", "width", "height", "kbps")}
            if vmaf_subsample:
                score = vmaf(rep["file"], src, (rep["width"], rep["height"]), fps=FPS, subsample=vmaf_subsample,
                             work=work)  # fmt: skip
                row["vmaf"] = score
                report.add(
                    Row(f"ladder rung {rep['codec']} {rep['width']}x{rep['height']}: VMAF", score["mean"], "VMAF",
                        None, None, "", None, f"min {score['min']:.1f}", 1,
                        f"{rep['kbps']:.0f} kb/s; 1 frame in {vmaf_subsample} vs the upload scaled to the rung")
                )  # fmt: skip
            details["rungs"].append(row)
        report.extra["ladder"] = details
    finally:
        shutil.rmtree(work, ignore_errors=True)
