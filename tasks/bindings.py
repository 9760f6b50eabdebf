"""The map from (kind, stage) to the one pipeline call that does the work.

Kept apart from the task bodies so that the chain's shape (which stages, which queue, how much
of the progress bar each takes) reads in one place.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from django.conf import settings
from django.core.files import File
from django.core.files.storage import default_storage

from media_app.services import output_key_for, renditions_replace
from pipelines import av, images
from pipelines.detect import detect
from pipelines.profiles import Profiles
from pipelines.results import Output

if TYPE_CHECKING:
    from media_app.models import MediaItem
    from tasks.stages import StageContext

# Stage name -> share of the progress bar. Encode dominates wall time, so it gets most of it.
WEIGHTS: dict[str, dict[str, float]] = {
    "video": {
        "demux": 2,
        "decode": 6,
        "normalize": 5,
        "filter": 1,
        "encode": 72,
        "mux": 2,
        "chunk": 2,
        "previews": 3,
        "store": 7,
    },
    "audio": {"demux": 3, "decode": 8, "normalize": 14, "filter": 1, "encode": 60, "mux": 4, "store": 10},
    "image": {"decode": 25, "normalize": 5, "encode": 55, "store": 15},
}
ALL_STAGES = ("demux", "decode", "normalize", "filter", "encode", "mux", "chunk", "previews", "store")


def stages_for(kind: str) -> list[str]:
    return list(WEIGHTS[kind])


def queue_for(kind: str) -> str:
    return "video" if kind == "video" else "default"


def progress_span(kind: str, stage: str) -> tuple[float, float]:
    weights = WEIGHTS.get(kind) or WEIGHTS["video"]
    total = sum(weights.values())
    start = 0.0
    for name, weight in weights.items():
        if name == stage:
            return (99 * start / total, 99 * (start + weight) / total)
        start += weight
    return (0.0, 0.0)


@cache
def profiles() -> Profiles:
    return Profiles.from_overrides(settings.MEDIA_PROFILES)


def detect_item(item: MediaItem, prof: Profiles) -> tuple[str, str, dict[str, Any]]:
    """Kind and type from the content: magic bytes, then (for audio/video) a sandboxed probe."""
    from tasks.stages import StageContext

    path = StageContext(item, "detect", Path(), (0, 0)).source_path()
    found = detect(path, limits=prof.limits)
    return found.kind, found.mime, {"duration": found.duration, "media_info": found.summary}


# --- bindings: one function per (kind, stage) --------------------------------------------------


@dataclass(frozen=True)
class StoreResult:
    keys: tuple[str, ...]


def run(ctx: StageContext) -> Any:
    kind, stage = ctx.item.kind, ctx.stage
    prof, limits = profiles(), profiles().limits
    if stage == "store":
        return _store(ctx)
    if kind == "image":
        return _image(ctx, stage, prof)
    if stage == "demux":
        return av.demux(ctx.source_path(), ctx.out_dir, limits=limits)
    demuxed = ctx.result("demux", av.DemuxResult)
    if stage == "decode":
        return av.decode(demuxed, ctx.dir("demux"), ctx.out_dir, limits=limits, progress=ctx.progress)
    if stage == "normalize":
        return av.normalize(demuxed, ctx.dir("demux"), ctx.out_dir, profiles=prof, limits=limits, progress=ctx.progress)
    plan = ctx.result("normalize", av.NormalizePlan)
    if stage == "filter":
        return av.build_filters(plan, profiles=prof)
    if stage == "encode":
        return av.encode(
            demuxed,
            ctx.dir("demux"),
            ctx.result("filter", av.FilterSpec),
            plan,
            ctx.out_dir,
            profiles=prof,
            limits=limits,
            progress=ctx.progress,
            cancel=ctx.cancelled,
        )
    if stage == "mux":
        return av.mux(ctx.result("encode", av.EncodeResult), ctx.dir("encode"), ctx.out_dir, limits=limits)
    if stage == "chunk":
        return av.chunk(ctx.result("mux", av.MuxResult), ctx.dir("mux"), ctx.out_dir, profiles=prof, limits=limits)
    if stage == "previews":
        return av.previews(demuxed, ctx.dir("demux"), ctx.out_dir, profiles=prof, limits=limits)
    raise ValueError(f"no binding for {kind}/{stage}")


def _image(ctx: StageContext, stage: str, prof: Profiles) -> Any:
    if stage == "decode":
        return images.image_decode(ctx.source_path(), ctx.out_dir, limits=prof.limits)
    info = ctx.result("decode", images.ImageInfo)
    if stage == "normalize":
        return images.image_normalize(info, profiles=prof)
    if stage == "encode":
        plan = ctx.result("normalize", images.ImagePlan)
        return images.image_encode(ctx.source_path(), info, plan, ctx.out_dir, profiles=prof, limits=prof.limits)
    raise ValueError(f"no binding for image/{stage}")


# Which stages' results carry deliverables, and the folder each lands in under outputs/<item>/.
OUTPUT_STAGES: dict[str, list[tuple[str, type[Any], str]]] = {
    "video": [("mux", av.MuxResult, ""), ("chunk", av.ChunkResult, "dash/"), ("previews", av.PreviewResult, "")],
    "audio": [("mux", av.MuxResult, "")],
    "image": [("encode", images.ImageEncodeResult, "")],
}


def _store(ctx: StageContext) -> StoreResult:
    """Copy deliverables into storage under keys derived from the item, then record them."""
    records: list[dict[str, Any]] = []
    for stage, cls, prefix in OUTPUT_STAGES[ctx.item.kind]:
        result = ctx.result(stage, cls)
        outputs: tuple[Output, ...] = result.outputs
        for out in outputs:
            key = output_key_for(ctx.item_id, prefix + out.file)
            _put(ctx.dir(stage) / out.file, key)
            records.append(
                {
                    "role": out.role,
                    "storage_key": key,
                    "content_type": out.content_type,
                    "codec": out.codec,
                    "width": out.width,
                    "height": out.height,
                    "duration": out.duration,
                    "bytes": out.bytes,
                }
            )
    renditions_replace(item_id=ctx.item_id, renditions=records)
    return StoreResult(tuple(r["storage_key"] for r in records))


def _put(path: Path, key: str) -> None:
    # Same key every time: a rerun overwrites rather than piling up copies.
    if default_storage.exists(key):
        default_storage.delete(key)
    try:
        target = Path(default_storage.path(key))
    except NotImplementedError:
        with open(path, "rb") as fh:
            default_storage.save(key, File(fh, name=key))
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.part")
    shutil.copyfile(path, tmp)
    tmp.replace(target)
