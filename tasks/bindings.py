"""The stage table: for each kind, its stages in order, each one entry (name, share of the
progress bar, queue, time limit, pipeline call). The chain, the progress spans, the per-task
limits and the dispatch are all built from it, so adding a stage is adding one line.
"""

from __future__ import annotations

import functools
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from django.conf import settings
from django.core.files import File
from django.core.files.storage import default_storage

from media_app.jobs import Queue
from media_app.services import output_key_for, rendition_put, renditions_replace
from pipelines import av, chunked, images
from pipelines.detect import Detected, detect
from pipelines.placeholder import thumbhash_file
from pipelines.profiles import Profiles
from pipelines.results import Output
from pipelines.sniff import Sniffed
from tasks import workspace

if TYPE_CHECKING:
    from media_app.models import MediaItem
    from tasks.stages import StageContext

MINUTE = 60


@dataclass(frozen=True)
class Stage:
    name: str
    weight: float  # share of the progress bar: encode dominates wall time, so it gets most
    queue: Queue
    # Hard limit of one delivery, in seconds (0: the ceiling); the soft limit, a clean timeout
    # error, is 90 % of it. Image steps take well under a second, so minutes mean something
    # hung; an encode of a four-hour film on a slow host needs hours, and its ceiling is
    # CELERY_TASK_TIME_LIMIT, which the broker's visibility timeout must exceed (checked in
    # config/celery.py).
    time_limit: int
    run: Callable[[StageContext], Any]
    # Milliseconds of work, too short for a watcher to follow (a plan, a link, an image's or a
    # sound's outputs copied into storage). Run fused, it is not announced on its own: its start
    # and end go with the next stage's start, or with the completion when it is the last stage.
    quick: bool = False


def _ceiling() -> int:
    return int(settings.CELERY_TASK_TIME_LIMIT)


@cache
def profiles() -> Profiles:
    return Profiles.from_overrides(settings.MEDIA_PROFILES)


def detect_item(item: MediaItem, prof: Profiles) -> Detected:
    """Kind, type and streams from the content: the sniff made when the upload finished, then
    (for audio/video) the one sandboxed probe of the upload."""
    from tasks.stages import StageContext

    path = StageContext(item, "detect", Path(), (0, 0)).source_path()
    sniffed = item.media_info.get("sniffed") if isinstance(item.media_info, dict) else None
    return detect(path, limits=prof.limits, sniffed=Sniffed(**sniffed) if sniffed else None)


@dataclass(frozen=True)
class StoreResult:
    keys: tuple[str, ...]


# --- bindings: one function per (kind, stage) --------------------------------------------------


def _limits() -> Any:
    return profiles().limits


def _demux(ctx: StageContext) -> Any:
    return av.demux(ctx.source_path(), ctx.out_dir, limits=_limits(), detected=ctx.detected())


def _decode(ctx: StageContext) -> Any:
    demuxed = ctx.result("demux", av.DemuxResult)
    return av.decode(demuxed, ctx.dir("demux"), ctx.out_dir, limits=_limits(), progress=ctx.progress)


def _normalize(ctx: StageContext) -> Any:
    demuxed = ctx.result("demux", av.DemuxResult)
    return av.normalize(
        demuxed,
        ctx.dir("demux"),
        ctx.out_dir,
        profiles=profiles(),
        limits=_limits(),
        progress=ctx.progress,
        decoded=ctx.result("decode", av.DecodeResult),  # packets' length; an earlier version's loudness
    )


def _filter(ctx: StageContext) -> Any:
    return av.build_filters(ctx.result("normalize", av.NormalizePlan), profiles=profiles())


def _encode(ctx: StageContext) -> Any:
    return av.encode(
        ctx.result("demux", av.DemuxResult),
        ctx.dir("demux"),
        ctx.result("filter", av.FilterSpec),
        ctx.result("normalize", av.NormalizePlan),
        ctx.out_dir,
        profiles=profiles(),
        limits=_limits(),
        progress=ctx.progress,
        cancel=ctx.cancelled,
    )


# --- split-and-stitch: the encode of a long video as chunks on any host (pipelines.chunked) ------

PLAN_STAGE, AUDIO_STAGE = "encode.plan", "encode.audio"


def part_stage(index: int) -> str:
    """A chunk's own stage folder (work/<item>/encode.part00003/…), done when its done.json is."""
    return f"encode.part{index:05d}"


def chunk_plan(ctx: StageContext) -> chunked.ChunkPlan | None:
    """The chunks of this item's encode, or None when it is encoded whole (not a video, chunking
    off, or not longer than one chunk)."""
    if ctx.item.kind != "video":
        return None
    vp = profiles().video
    plan = ctx.result("normalize", av.NormalizePlan)
    if plan.video is None or vp.chunk_seconds <= 0:
        return None
    split = functools.partial(
        chunked.split,
        duration=plan.duration,
        frame_rate=plan.video.frame_rate,
        segment_seconds=vp.segment_seconds,
        chunk_seconds=vp.chunk_seconds,
    )
    if len(split()) < 2:
        return None
    demuxed, filters = ctx.result("demux", av.DemuxResult), ctx.result("filter", av.FilterSpec)
    origin = chunked.first_frame_pts(demuxed, ctx.dir("demux"), filters, plan, ctx.out_dir, limits=_limits())
    ranges = split(origin=origin)
    per = chunked.segments_per_chunk(segment_seconds=vp.segment_seconds, chunk_seconds=vp.chunk_seconds)
    return chunked.ChunkPlan(plan.video.frame_rate, vp.segment_seconds, per, ranges, started=time.time())


def encode_part(ctx: StageContext, index: int) -> chunked.PartResult:
    return chunked.encode_part(
        ctx.result("demux", av.DemuxResult),
        ctx.dir("demux"),
        ctx.result("filter", av.FilterSpec),
        ctx.result("normalize", av.NormalizePlan),
        ctx.result(PLAN_STAGE, chunked.ChunkPlan),
        index,
        ctx.out_dir,
        profiles=profiles(),
        limits=_limits(),
        cancel=ctx.cancelled,
    )


def encode_audio(ctx: StageContext) -> chunked.AudioPart:
    return chunked.encode_audio(
        ctx.result("demux", av.DemuxResult),
        ctx.dir("demux"),
        ctx.result("filter", av.FilterSpec),
        ctx.result("normalize", av.NormalizePlan),
        ctx.out_dir,
        profiles=profiles(),
        limits=_limits(),
        cancel=ctx.cancelled,
    )


def join_parts(ctx: StageContext) -> av.EncodeResult:
    plan = ctx.result(PLAN_STAGE, chunked.ChunkPlan)
    parts = []
    for rng in plan.ranges:
        stage_name = part_stage(rng.index)
        part = ctx.result(stage_name, chunked.PartResult)
        parts.append((ctx.dir(stage_name) / part.file, part))
    audio = ctx.result(AUDIO_STAGE, chunked.AudioPart)
    audio_path = ctx.dir(AUDIO_STAGE) / audio.file if audio.file else None
    normalized = ctx.result("normalize", av.NormalizePlan)
    rungs = av.video_rungs(normalized.video, profiles()) if normalized.video is not None else ()
    aac = ctx.dir(AUDIO_STAGE) / audio.aac if audio.aac else None
    return chunked.join(parts, audio_path, normalized, plan, ctx.out_dir, limits=_limits(), rungs=rungs, aac=aac)


def _mux(ctx: StageContext) -> Any:
    return av.mux(ctx.result("encode", av.EncodeResult), ctx.dir("encode"), ctx.out_dir, limits=_limits())


def _chunk(ctx: StageContext) -> Any:
    """DASH from the WebM (the top rung, with the audio) and the ladder's other rungs, which the
    encode stage left beside its own file."""
    mux = ctx.result("mux", av.MuxResult)
    encoded = ctx.result("encode", av.EncodeResult)
    return av.chunk(
        mux,
        ctx.dir("mux"),
        ctx.out_dir,
        profiles=profiles(),
        limits=_limits(),
        encoded=encoded,
        encode_dir=ctx.dir("encode") if encoded.rungs[1:] else None,
    )


def _previews(ctx: StageContext) -> Any:
    """The thumbnail, taken right after demux and shown at once: the page has a picture within
    seconds of processing starting, not after the encode. ``store`` records it again with the
    rest, so the final outputs are one set. The storyboard, which decodes the whole video, is
    made beside the encode (``storyboard_part``), so it no longer holds the encode back."""
    demuxed = ctx.result("demux", av.DemuxResult)
    result = av.previews(demuxed, ctx.dir("demux"), ctx.out_dir, profiles=profiles(), limits=_limits())
    for out in result.outputs:
        if out.role == "thumbnail":
            key = output_key_for(ctx.item_id, out.file)
            _put(ctx.out_dir / out.file, key)
            rendition_put(item_id=ctx.item_id, rendition=_record(out, key, ctx.out_dir / out.file))
    return result


# The storyboard's folder of its own (work/<item>/encode.storyboard/…, done when its done.json
# is), like a chunk's: not a stage of the chain, so no status, history row or share of the bar.
# It decodes the whole video (a tenth of a 720p AV1 encode's wall time, all of it added to the
# chain's when it ran in the previews stage); the whole-file encode runs it on a thread beside
# its ffmpeg, a chunked encode as one more task of its fan-out, and ``store`` runs it itself if
# neither left it done (a failed thread, or an item whose previews stage made the storyboard).
STORYBOARD_STAGE = "encode.storyboard"


def storyboard_part(ctx: StageContext, cancel: Callable[[], bool]) -> av.PreviewResult:
    demuxed = ctx.result("demux", av.DemuxResult)
    board = av.storyboards(
        demuxed, ctx.dir("demux"), ctx.out_dir, profiles=profiles(), limits=_limits(), cancel=cancel
    )  # fmt: skip
    return av.PreviewResult(outputs=board)


def storyboard_wanted(ctx: StageContext) -> bool:
    """A video's store still needs the storyboard made: not done on its own, and not in the
    previews stage's outputs (where the version before the split put it)."""
    if ctx.item.kind != "video" or workspace.stage_done(ctx.item_id, STORYBOARD_STAGE):
        return False
    shown = ctx.result("previews", av.PreviewResult)
    return not any(out.role == "storyboard" for out in shown.outputs)


def _image_decode(ctx: StageContext) -> Any:
    return images.image_decode(ctx.source_path(), ctx.out_dir, limits=_limits())


def _image_normalize(ctx: StageContext) -> Any:
    return images.image_normalize(ctx.result("decode", images.ImageInfo), profiles=profiles())


def _image_encode(ctx: StageContext) -> Any:
    info = ctx.result("decode", images.ImageInfo)
    plan = ctx.result("normalize", images.ImagePlan)
    return images.image_encode(ctx.source_path(), info, plan, ctx.out_dir, profiles=profiles(), limits=_limits())


def _store(ctx: StageContext) -> StoreResult:
    return store(ctx)


# Which stages' results carry deliverables, and the folder each lands in under outputs/<item>/.
OUTPUT_STAGES: dict[str, list[tuple[str, type[Any], str]]] = {
    "video": [
        ("mux", av.MuxResult, ""),
        ("chunk", av.ChunkResult, "dash/"),
        ("previews", av.PreviewResult, ""),
        (STORYBOARD_STAGE, av.PreviewResult, ""),
    ],
    "audio": [("mux", av.MuxResult, "")],
    "image": [("encode", images.ImageEncodeResult, "")],
}


def store(ctx: StageContext) -> StoreResult:
    """Copy deliverables into storage under keys derived from the item, then record them."""
    records: list[dict[str, Any]] = []
    for stage, cls, prefix in OUTPUT_STAGES[ctx.item.kind]:
        if stage == STORYBOARD_STAGE and not workspace.stage_done(ctx.item_id, stage):
            continue  # made by the previews stage of the version before (``storyboard_wanted``)
        result = ctx.result(stage, cls)
        outputs: tuple[Output, ...] = result.outputs
        for out in outputs:
            key = output_key_for(ctx.item_id, prefix + out.file)
            _put(ctx.dir(stage) / out.file, key)
            records.append(_record(out, key, ctx.dir(stage) / out.file))
    renditions_replace(item_id=ctx.item_id, renditions=records)
    return StoreResult(tuple(r["storage_key"] for r in records))


# Outputs that get a ThumbHash placeholder: a video's poster, an image's WebP (Pillow reads it).
PLACEHOLDER_ROLES = ("thumbnail", "image_webp")


def _record(out: Output, key: str, path: Path | None = None) -> dict[str, Any]:
    """A rendition row as ``store`` and ``previews`` write it. A picture's ThumbHash is the one
    the image encode made from the picture it wrote, else taken from the file (``path``)."""
    placeholder = out.placeholder
    if not placeholder and path is not None and out.role in PLACEHOLDER_ROLES:
        placeholder = thumbhash_file(path)
    return {
        "placeholder": placeholder,
        "role": out.role,
        "storage_key": key,
        "content_type": out.content_type,
        "codec": out.codec,
        "width": out.width,
        "height": out.height,
        "duration": out.duration,
        "bytes": out.bytes,
    }


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


# --- the table ----------------------------------------------------------------------------------

_V, _D = Queue.VIDEO, Queue.DEFAULT
# Video weights are each stage's share of the wall time of a 20 s 720p clip (three runs of
# `manage.py process`, local storage: encode 72-82 %, demux 3-6, normalize 3-5, previews 2-5,
# mux 2-5, decode 2-4, chunk 1.4-2.7, store 0.9-1.5); store keeps a little more for S3,
# where it uploads every output. So the bar moves at an even pace, and the time left that the
# selectors derive from it (time worked so far, scaled by what is left of the bar) holds.
# Previews comes right after demux (it needs only the demuxed streams) and stores the thumbnail
# at once, so the page shows a picture while the encode runs; its weight moved with it. The
# storyboard runs beside the encode (STORYBOARD_STAGE), so previews is the thumbnail alone (1-2 %
# of the wall time) and the encode's share is what it was plus what the storyboard took.
PIPELINES: dict[str, tuple[Stage, ...]] = {
    "video": (
        Stage("demux", 5, _V, 20 * MINUTE, _demux),
        Stage("previews", 1, _V, 10 * MINUTE, _previews),
        Stage("decode", 6, _V, 40 * MINUTE, _decode),
        Stage("normalize", 1, _V, 40 * MINUTE, _normalize),
        Stage("filter", 1, _V, 1 * MINUTE, _filter),
        Stage("encode", 76, _V, 0, _encode),  # 0: the ceiling, CELERY_TASK_TIME_LIMIT
        Stage("mux", 4, _V, 20 * MINUTE, _mux),
        Stage("chunk", 3, _V, 20 * MINUTE, _chunk),
        Stage("store", 3, _V, 30 * MINUTE, _store),
    ),
    "audio": (
        Stage("demux", 2, _D, 10 * MINUTE, _demux, quick=True),
        # A sound is decoded once, by the encode: it refuses what the decode check refused, measures
        # the loudness in its own graph and writes the WebM mux links. Decode reads the header only.
        Stage("decode", 1, _D, 20 * MINUTE, _decode, quick=True),
        Stage("normalize", 1, _D, 20 * MINUTE, _normalize, quick=True),
        Stage("filter", 1, _D, 1 * MINUTE, _filter, quick=True),
        Stage("encode", 84, _D, 0, _encode),
        Stage("mux", 1, _D, 10 * MINUTE, _mux, quick=True),
        Stage("store", 10, _D, 10 * MINUTE, _store, quick=True),
    ),
    "image": (
        Stage("decode", 25, _D, 2 * MINUTE, _image_decode),
        Stage("normalize", 5, _D, 1 * MINUTE, _image_normalize, quick=True),
        Stage("encode", 55, _D, 5 * MINUTE, _image_encode),
        Stage("store", 15, _D, 5 * MINUTE, _store, quick=True),
    ),
}
# Every stage name of any kind: one Celery task each (media.stage.<name>).
ALL_STAGES: tuple[str, ...] = tuple(dict.fromkeys(st.name for stages in PIPELINES.values() for st in stages))


def stages_for(kind: str) -> list[str]:
    return [st.name for st in PIPELINES[kind]]


def is_quick(kind: str, name: str) -> bool:
    return stage(kind, name).quick


def stage(kind: str, name: str) -> Stage:
    found = next((st for st in PIPELINES.get(kind, ()) if st.name == name), None)
    if found is None:
        raise ValueError(f"no stage {name!r} for {kind!r} items")
    return found


def time_limits(st: Stage) -> tuple[int, int]:
    """(hard, soft) seconds for one delivery of ``st``, never past the global ceiling."""
    hard = min(st.time_limit or _ceiling(), _ceiling())
    return hard, int(hard * 0.9)


def progress_span(kind: str, name: str) -> tuple[float, float]:
    """The part of the 0-99 bar the stage fills (100 is Completed)."""
    stages = PIPELINES.get(kind) or PIPELINES["video"]
    total = sum(st.weight for st in stages)
    start = 0.0
    for st in stages:
        if st.name == name:
            return (99 * start / total, 99 * (start + st.weight) / total)
        start += st.weight
    return (0.0, 0.0)


def run(ctx: StageContext) -> Any:
    """Dispatch: the pipeline call of the item's kind for this stage."""
    return stage(ctx.item.kind, ctx.stage).run(ctx)
