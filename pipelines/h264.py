"""The optional H.264/AAC fallback (``VideoProfile.h264_fallback``, off by default).

For players that decode neither AV1 nor VP9. Its rungs are planned with the others
(``pipelines.ladder``) and encoded in the encode's one ffmpeg run from the same decode, with the
same GOP and forced key frames; its AAC track is a second output of the same audio filter. DASH
carries them in MP4 (CMAF) segments, which ffmpeg's dash muxer writes only for a whole output,
so ``chunk`` gives them an output of their own and ``merge_manifest`` adds that output's
adaptation sets to the WebM manifest: the AV1, VP9 and Opus segments stay exactly as they are.
"""

from __future__ import annotations

import re
import shutil
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import TYPE_CHECKING

from pipelines.ladder import Rung
from pipelines.profiles import Profiles

if TYPE_CHECKING:
    from pipelines.av import AudioPlan, VideoPlan

AAC_FILE = "aac.mka"  # the encode stage's AAC track, beside the rungs
MPD_NS = "urn:mpeg:dash:schema:mpd:2011"
_SEGMENT = re.compile(r"^(init|chunk)-(\d+)(.*)$")


def codec_args(rung: Rung, video: VideoPlan, profiles: Profiles, key_frames: str) -> list[str]:
    """libx264 at capped CRF, the ladder's GOP and forced key frames (IDR: x264's GOPs are
    closed by default, so every segment starts one a decoder can start at)."""
    vp = profiles.video
    args = [
        "-c:v", "libx264", "-preset", vp.h264_preset, "-crf", str(vp.h264_crf), "-pix_fmt", vp.pix_fmt,
        "-color_range", video.color_range, "-g", str(video.gop), "-force_key_frames", key_frames,
    ]  # fmt: skip
    if rung.max_bitrate:
        args += ["-maxrate", str(rung.max_bitrate), "-bufsize", str(2 * rung.max_bitrate)]
    if vp.threads > 0:
        args += ["-threads", str(vp.threads)]
    return args


def aac_args(audio: AudioPlan, profiles: Profiles) -> list[str]:
    """ffmpeg's native AAC-LC at the profile's rate (half for mono), never more than stereo."""
    rate = profiles.audio.aac_bitrate
    bits = int(float(rate[:-1]) * 1000) if rate[-1:].lower() == "k" else int(rate)
    if audio.channels < 2:
        bits //= 2
    return ["-c:a", "aac", "-b:a", str(bits)]


def merge_manifest(manifest: Path, fallback_dir: Path, first_id: int) -> list[Path]:
    """Move the fallback output's segments next to ``manifest``, its representations numbered
    from ``first_id`` on, and add its adaptation sets to the manifest's period. Returns the
    moved files.

    The WebM manifest's text is kept as ffmpeg wrote it; the added sets are serialized by
    ElementTree (each declares the MPD namespace again, which XML allows).
    """
    fallback = ET.parse(fallback_dir / "manifest.mpd").getroot()
    text = manifest.read_text()
    set_ids = [int(m) for m in re.findall(r'<AdaptationSet id="(\d+)"', text)]
    next_set = max(set_ids, default=-1) + 1
    ET.register_namespace("", MPD_NS)
    added: list[str] = []
    for aset in fallback.iter(f"{{{MPD_NS}}}AdaptationSet"):
        aset.set("id", str(next_set))
        next_set += 1
        for rep in aset.iter(f"{{{MPD_NS}}}Representation"):
            rep.set("id", str(first_id + int(rep.get("id", "0"))))
        added.append(ET.tostring(aset, encoding="unicode").strip())
    if not added:
        raise ValueError(f"{fallback_dir / 'manifest.mpd'} has no adaptation set")
    head, sep, tail = text.rpartition("</Period>")
    if not sep:
        raise ValueError(f"{manifest} has no period")
    manifest.write_text(head.rstrip() + "\n\t\t" + "\n\t\t".join(added) + "\n\t" + sep + tail)
    moved = []
    for path in sorted(fallback_dir.iterdir()):
        m = _SEGMENT.match(path.name)
        if m is None:
            continue
        dst = manifest.parent / f"{m.group(1)}-{first_id + int(m.group(2))}{m.group(3)}"
        shutil.move(path, dst)
        moved.append(dst)
    shutil.rmtree(fallback_dir)
    return moved
