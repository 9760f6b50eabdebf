"""One Celery task per stage, and the entry task that builds an item's chain.

A stage task only sets up: it asks the lifecycle to start the stage (which refuses when the item
is cancelled or finished), skips work already done, calls one pipeline function through the
stage table in ``tasks.bindings`` and reports. Typed errors propagate; the retry policy sits in
``StageTask``.
"""

from __future__ import annotations

import json
import logging
import resource
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

from celery import Task, chain, chord, shared_task
from celery.exceptions import Ignore
from celery.utils.time import get_exponential_backoff_interval
from django.conf import settings
from django.core.files.storage import default_storage

from media_app import lifecycle
from media_app.models import MediaItem, MediaStatus
from media_app.services import storage_delete_tree
from pipelines.detect import Detected
from pipelines.errors import MediaError
from pipelines.probe import MediaInfo
from pipelines.results import from_json, to_json
from pipelines.sniff import Sniffed
from tasks import bindings, workspace
from tasks.retry import RETRYABLE_ERRORS, classify

logger = logging.getLogger("tasks.stages")


def log_stage(item_id: Any, stage: str, attempt: int, seconds: float, outcome: str, **more: Any) -> None:
    """The stage log line: one JSON object, so a log pipeline can filter and sum it."""
    record = {
        "item": str(item_id),
        "stage": stage,
        "attempt": attempt,
        "seconds": round(seconds, 3),
        "outcome": outcome,
    }
    logger.info(json.dumps({**record, **more}))


class StageTask(Task):
    # Expected failures (bad input, limits) are logged as a line, not as a traceback.
    throws = (MediaError,)
    autoretry_for = RETRYABLE_ERRORS
    max_retries = settings.MEDIA_MAX_ATTEMPTS - 1
    retry_backoff = settings.MEDIA_RETRY_BACKOFF
    retry_backoff_max = 120
    retry_jitter = True
    acks_late = True
    reject_on_worker_lost = True
    ignore_result = True

    def on_failure(self, exc: BaseException, task_id: str, args: Any, kwargs: Any, einfo: Any) -> None:
        item_id = args[0] if args else kwargs.get("item_id")
        report = classify(exc)
        logger.warning("stage failed item=%s task=%s code=%s %s", item_id, self.name, report.code, report.detail[-500:])
        lifecycle.failed(item_id=item_id, error=report)


class StageContext:
    """What a binding needs: the item's files, earlier results, and ways to report and stop."""

    def __init__(self, item: MediaItem, stage: str, out_dir: Path, span: tuple[float, float]) -> None:
        self.item = item
        self.item_id = item.pk
        self.stage = stage
        self.out_dir = out_dir
        self._span = span
        self._last_cancel_check = 0.0
        self._cancelled = False
        self._started = time.monotonic()

    def source_path(self) -> Path:
        """The upload as a local file: in place on local storage, fetched once from S3."""
        try:
            return Path(default_storage.path(self.item.source_key))
        except NotImplementedError:
            local = workspace.item_dir(self.item_id) / "source"
            if not local.exists():
                local.parent.mkdir(parents=True, exist_ok=True)
                tmp = local.with_suffix(".part")
                with default_storage.open(self.item.source_key, "rb") as src, open(tmp, "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
                tmp.rename(local)
            return local

    def detected(self) -> Detected | None:
        """What the entry task's sniff and probe found, saved on the item: not measured again."""
        return detected_from(self.item.media_info)

    def dir(self, stage: str) -> Path:
        """An earlier stage's folder on this host (fetched from storage after a hop)."""
        return workspace.local_stage(self.item_id, stage)

    def result(self, stage: str, cls: type[Any]) -> Any:
        return workspace.load_result(self.item_id, stage, cls)

    def progress(self, fraction: float) -> None:
        fraction = max(0.0, min(fraction, 1.0))
        start, end = self._span
        lifecycle.progressed(
            item_id=self.item_id, progress=int(start + (end - start) * fraction), eta_seconds=self._eta(fraction)
        )

    def _eta(self, fraction: float) -> float | None:
        """Time left from the speed measured so far in this stage, plus the stages after it."""
        elapsed = time.monotonic() - self._started
        if fraction < 0.02 or elapsed < 1.0:
            return None
        stage_total = elapsed / fraction
        start, end = self._span
        # Later stages take their share of the bar at the pace this one set.
        rest = stage_total * (99 - end) / max(end - start, 1.0)
        return round(stage_total - elapsed + rest, 1)

    def cancelled(self) -> bool:
        # Polled by the ffmpeg runner; one query a second at most.
        now = time.monotonic()
        if not self._cancelled and now - self._last_cancel_check >= 1.0:
            self._last_cancel_check = now
            self._cancelled = MediaItem.objects.filter(pk=self.item_id, status=MediaStatus.FAILED).exists()
        return self._cancelled


def detected_from(media_info: Any) -> Detected | None:
    if not isinstance(media_info, dict) or "probe" not in media_info or "sniffed" not in media_info:
        return None
    info = from_json(MediaInfo, media_info["probe"]) if media_info["probe"] else None
    kind = "video" if info and info.video else "audio"
    sniffed = Sniffed(**media_info["sniffed"])
    return Detected(kind, sniffed.mime, info.media_duration if info else None, {}, sniffed, info)


@dataclass(frozen=True)
class StageRun:
    """What one stage's work did: its seconds (None: skipped, done already), the bytes it wrote
    to storage, and the peak memory of the children this process has reaped."""

    seconds: float | None
    stored: int = 0
    peak: int = 0


def run_stage(task: Task, item_id: str, stage: str) -> dict[str, Any]:
    """The common body of every stage task."""
    item = MediaItem.objects.filter(pk=item_id).first()
    if item is None:
        raise Ignore()
    span = bindings.progress_span(item.kind, stage)
    attempt = lifecycle.stage_started(
        item_id=item_id, stage=stage, task_id=task.request.id or "", progress=int(span[0])
    )
    if attempt is None:
        # Deleted, cancelled or already done: stop this chain quietly.
        raise Ignore()
    item.refresh_from_db()
    ran = work_stage(task, item, stage, attempt)
    applied = lifecycle.stage_finished(
        item_id=item_id, stage=stage, progress=int(span[1]), seconds=ran.seconds, peak_child_rss=ran.peak
    )
    log_run(task, item_id, stage, attempt, ran, applied)
    if not applied:
        raise Ignore()  # cancelled while it ran: its result stays on disk, the chain stops here
    if ran.seconds is None:
        return {"stage": stage, "skipped": True}
    return {"stage": stage, "skipped": False, "seconds": ran.seconds}


def work_stage(task: Task, item: MediaItem, stage: str, attempt: int) -> StageRun:
    """A started stage's work: skipped if storage has it, else run and written through."""
    if attempt > settings.MEDIA_MAX_ATTEMPTS:
        # Redelivered after its worker died each time: a poison file, not bad luck.
        raise MediaError(
            "Processing this file failed repeatedly and was stopped.",
            detail=f"stage {stage} delivered {attempt} times",
        )
    item_id = item.pk
    started = time.monotonic()
    if workspace.stage_done(item_id, stage):
        return StageRun(None)
    workspace.clear_tmp(item_id)
    tmp = workspace.new_tmp_dir(item_id, stage)
    ctx = StageContext(item, stage, tmp, bindings.progress_span(item.kind, stage))
    beside: _Beside | None = None
    if stage == ENCODE:
        chunks = _stored_plan(item_id) or bindings.chunk_plan(ctx)
        if chunks is not None:
            shutil.rmtree(tmp, ignore_errors=True)
            fan_out(task, item, chunks)  # raises: the chord takes this task's place in the chain
        if item.kind == "video":
            # Both read the demuxed streams: on a host that lacks them, one fetch from storage
            # here, not two at once (one per thread) of what may be the whole upload.
            ctx.dir("demux")
            beside = _Beside(item)
    try:
        if stage == STORE and bindings.storyboard_wanted(ctx):
            run_storyboard(item, ctx.cancelled)
        result = bindings.run(ctx)
        stored = workspace.commit_stage(item_id, stage, tmp, result)
    except BaseException:
        if beside is not None:
            beside.stop.set()  # the encode failed or was stopped: so is its storyboard
        raise
    finally:
        if beside is not None:
            beside.wait(ctx.cancelled)
        shutil.rmtree(tmp, ignore_errors=True)
    # The largest child this worker process has reaped (decoders, ffmpeg): the item records it
    # so limits can be checked against what really ran.
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    return StageRun(time.monotonic() - started, stored, peak)


def run_storyboard(item: MediaItem, cancel: Callable[[], bool]) -> None:
    """Make and write through a video's storyboard (``bindings.STORYBOARD_STAGE``), unless storage
    has it already."""
    stage = bindings.STORYBOARD_STAGE
    if workspace.stage_done(item.pk, stage):
        return
    started = time.monotonic()
    tmp = workspace.new_tmp_dir(item.pk, stage)
    try:
        result = bindings.storyboard_part(StageContext(item, stage, tmp, (0.0, 0.0)), cancel)
        stored = workspace.commit_stage(item.pk, stage, tmp, result)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log_stage(item.pk, stage, 1, time.monotonic() - started, "done", stored_bytes=stored)


class _Beside:
    """A whole-file encode's storyboard on a thread of its own, while the encode's ffmpeg runs:
    the encoder leaves some of the cores idle, and the storyboard decodes the whole video (on a
    60 s 720p clip, 3.9 s serial; beside the encode it added 1-3 s). The thread touches storage
    only, not the database. If it fails, the store stage makes the storyboard itself, where an
    error counts as it did in the previews stage."""

    def __init__(self, item: MediaItem) -> None:
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(item,), name=f"storyboard-{item.pk}", daemon=True)
        self.thread.start()

    def wait(self, cancelled: Callable[[], bool]) -> None:
        """Until the storyboard ends; a cancel seen meanwhile (the encode may finish first) stops
        it. The item is read here, on the task's thread: the storyboard's has no database."""
        while self.thread.is_alive():
            self.thread.join(0.5)
            if not self.stop.is_set() and cancelled():
                self.stop.set()

    def _run(self, item: MediaItem) -> None:
        try:
            run_storyboard(item, self.stop.is_set)
        except Exception as exc:  # noqa: BLE001 - the store stage makes it again, and reports
            outcome = "stopped" if self.stop.is_set() else f"failed: {exc!r}"
            log_stage(item.pk, bindings.STORYBOARD_STAGE, 1, 0.0, outcome)


def log_run(task: Task, item_id: Any, stage: str, attempt: int, ran: StageRun, applied: bool) -> None:
    if ran.seconds is None:
        log_stage(item_id, stage, attempt, 0.0, "skipped")
        return
    log_stage(
        item_id,
        stage,
        attempt,
        ran.seconds,
        "done" if applied else "stopped",
        peak_child_mb=round(ran.peak / 2**20),
        stored_bytes=ran.stored,
        worker=task.request.hostname or "",
        task=task.name,
    )


def _stage_task(stage: str) -> Task:
    def body(self: Task, item_id: str) -> dict[str, Any]:
        return run_stage(self, item_id, stage)

    body.__name__ = body.__qualname__ = f"stage_{stage}"
    return shared_task(bind=True, base=StageTask, name=f"media.stage.{stage}")(body)


STAGE_TASKS: dict[str, Task] = {stage: _stage_task(stage) for stage in bindings.ALL_STAGES}


# --- a small item's whole chain in one task ----------------------------------------------------
#
# An image's four stages take ~30-130 ms of media work each; as four tasks (and a finish), every
# hand-off through the broker, and the item waiting between them, cost more than the work. Kinds
# in FUSED_KINDS run their stages one after the other in one delivery of ``media.stage.fused``,
# each still started and finished through the lifecycle (same stage names, progress, history
# rows, attempt counts, cancel checks) and still written through to storage, so a retry or a
# redelivery on another host resumes from the first stage not done, as a chain would.
# Audio too: its encode is a second or two per minute of sound, and its other stages are
# milliseconds each, so the hops of a chain of seven tasks were a sixth of a song's time.
# Video stays a chain, even when its encode is planned whole. Fused, a video held its worker
# slot for all its stages: a second video waited at 0 % with no thumbnail and no time left
# until the first was done, where as a chain its demux and previews run between the first
# one's stages (tests/e2e/test_waiting_status.py), and a chain's stages move between hosts.
# Fusing saved about 0.2 s of a 20 s encode (pipeline/plain 1.11 -> 1.08).

FUSED_KINDS = frozenset({"image", "audio"})


def fused_limit(kind: str) -> int:
    """Hard seconds for one delivery running every stage of ``kind``: the sum of theirs, never
    past the ceiling."""
    return min(sum(bindings.time_limits(st)[0] for st in bindings.PIPELINES[kind]), _ceiling_seconds())


def runs_fused(item: MediaItem) -> bool:
    """Whether the item's stages run in one task (its kind is in FUSED_KINDS)."""
    return item.kind in FUSED_KINDS


def run_fused(
    task: Task,
    item_id: str,
    *,
    entry_task_id: str | None = None,
    item: MediaItem | None = None,
    detected: dict[str, Any] | None = None,
) -> None:
    """Every stage of the item, from the first not done, in this delivery. ``entry_task_id``:
    called by the entry task itself, whose id the item must still be queued under; it passes the
    ``item`` it read, and what it ``detected`` (saved as the first stage starts)."""
    item = item or MediaItem.objects.filter(pk=item_id).first()
    if item is None:
        raise Ignore()
    stages = bindings.stages_for(item.kind)
    # Stages already done in storage (by an earlier delivery, on any host) are not announced
    # again: starting them would reset the stalled stage's delivery count, and a file that kills
    # its worker every time would then be redelivered forever.
    # Every stage done already (a delivery after the last one, or a retry of an item cancelled
    # just after its store): the last one is started again, found done and skipped, so the
    # item goes through Processing to Completed rather than stay queued.
    start = next((n for n, st in enumerate(stages) if not workspace.stage_done(item_id, st)), len(stages) - 1)
    todo = stages[start:]
    task_id = task.request.id or ""
    attempt = lifecycle.stage_started(
        item_id=item_id,
        stage=todo[0],
        task_id=task_id,
        progress=int(bindings.progress_span(item.kind, todo[0])[0]),
        entry_task_id=entry_task_id,
        detected=detected,
    )
    if attempt is None:
        raise Ignore()  # deleted, cancelled or finished
    # ``item`` was read after the entry task committed its kind and media info, which no stage
    # changes: no reload per stage.
    n = 0
    while n < len(todo):
        stage = todo[n]
        try:
            ran = work_stage(task, item, stage, attempt)
        except RETRYABLE_ERRORS as exc:
            retry_stage(task, item_id, stage, attempt, exc)
        # Quick stages after it (a plan, a link, the store: milliseconds) run now, and go into
        # the write of the next stage's start, or of the completion when the last one is among
        # them: a watcher could not see them, the history still does.
        passed: list[tuple[str, StageRun]] = []
        rest = todo[n + 1 :]
        if rest and all(bindings.is_quick(item.kind, st) for st in rest) and not _still_at(item_id, stage):
            # Cancelled (or failed) while it ran, and only quick stages are left: no write would
            # tell them so before the store copied the outputs of an item nobody wants. A read.
            log_run(task, item_id, stage, attempt, ran, False)
            raise Ignore()
        while n + 1 < len(todo) and bindings.is_quick(item.kind, todo[n + 1]):
            quick = todo[n + 1]
            try:
                passed.append((quick, work_stage(task, item, quick, 1)))
            except RETRYABLE_ERRORS as exc:
                # Announced before the retry: its redeliveries then count from this first try.
                if _advance(item, stage, ran, passed, to=quick, task_id=task_id) is None:
                    raise Ignore() from exc
                retry_stage(task, item_id, quick, 1, exc)
            n += 1
        if n + 1 < len(todo):
            next_attempt = _advance(item, stage, ran, passed, to=todo[n + 1], task_id=task_id)
        else:
            # The last stage's end (or the last quick stage's) is the item's completion: one write.
            done = lifecycle.completed(
                item_id=item_id,
                stage=stage,
                seconds=ran.seconds,
                peak_child_rss=max([ran.peak, *(q.peak for _, q in passed)]),
                passed=[(quick, q.seconds) for quick, q in passed],
                progress=int(bindings.progress_span(item.kind, stage)[1]),
            )
            next_attempt = attempt if done else None
        log_run(task, item_id, stage, attempt, ran, next_attempt is not None)
        for quick, quick_ran in passed:
            log_run(task, item_id, quick, 1, quick_ran, next_attempt is not None)
        if next_attempt is None:
            raise Ignore()  # cancelled while it ran: its result stays in storage
        attempt = next_attempt
        n += 1
    clear_work(item_id)


def _still_at(item_id: Any, stage: str) -> bool:
    """Whether the item is still Processing at ``stage`` (not cancelled, failed or gone)."""
    return MediaItem.objects.filter(pk=item_id, status=MediaStatus.PROCESSING, stage=stage).exists()


def _advance(
    item: MediaItem, stage: str, ran: StageRun, passed: list[tuple[str, StageRun]], *, to: str, task_id: str
) -> int | None:
    """``stage``'s end, the quick stages ``passed`` since, and ``to``'s start: one write, one
    broadcast (``lifecycle.stage_advanced``)."""
    done = passed[-1][0] if passed else stage
    return lifecycle.stage_advanced(
        item_id=item.pk,
        stage=stage,
        progress=int(bindings.progress_span(item.kind, done)[1]),
        seconds=ran.seconds,
        peak_child_rss=max([ran.peak, *(q.peak for _, q in passed)]),
        next_stage=to,
        task_id=task_id,
        next_progress=int(bindings.progress_span(item.kind, to)[0]),
        passed=[(quick, q.seconds) for quick, q in passed],
    )


def retry_stage(task: Task, item_id: str, stage: str, attempt: int, exc: BaseException) -> NoReturn:
    """A retryable error in a fused run: each stage gets MEDIA_MAX_ATTEMPTS, as in a chain (not
    the task's all together, so a blink in demux leaves a video's encode its three tries); the
    retried delivery resumes at this stage, after the same back-off as a stage task's."""
    if attempt < settings.MEDIA_MAX_ATTEMPTS:
        countdown = get_exponential_backoff_interval(
            factor=int(task.retry_backoff),
            retries=attempt - 1,
            maximum=task.retry_backoff_max,
            full_jitter=task.retry_jitter,
        )
        raise task.retry(exc=exc, countdown=countdown, max_retries=None)
    report = classify(exc)
    logger.warning("stage failed item=%s task=%s code=%s %s", item_id, task.name, report.code, report.detail[-500:])
    lifecycle.failed(item_id=item_id, error=report)
    raise Ignore()


@shared_task(bind=True, base=StageTask, name="media.stage.fused")
def fused(self: Task, item_id: str) -> None:
    """Every stage of an item that ``runs_fused`` (an image, a sound), then its finish, in one
    delivery."""
    run_fused(self, item_id)


# --- split-and-stitch: a long video's encode as a chord of chunk tasks ------------------------------
#
# The encode task of a video longer than ``video.chunk_seconds`` stores the chunk plan, then
# replaces itself (Task.replace) with a chord: one task per chunk and one for the audio, on the
# video queue, each on whatever host takes it, then the join, after which the rest of the chain
# (mux, chunk, store, finish) goes on. A chunk's result is a stage folder of its own in storage
# (work/<item>/encode.part00003/…, done.json last), so a chunk already done is never encoded again
# and a failed one is retried alone. Chunk tasks never write the item's state except progress
# (lifecycle.progressed, which applies only while Processing): a cancelled item stays cancelled,
# and its chunks stop at their next cancel check.

ENCODE, STORE = "encode", "store"


def _stored_plan(item_id: Any) -> Any:
    """The plan of an earlier fan-out of this item (a redelivery or a resume): the same chunks."""
    if not workspace.stage_done(item_id, bindings.PLAN_STAGE):
        return None
    return workspace.load_result(item_id, bindings.PLAN_STAGE, bindings.chunked.ChunkPlan)


def fan_out(task: Task, item: MediaItem, chunks: Any) -> None:
    item_id = str(item.pk)
    if not workspace.stage_done(item_id, bindings.PLAN_STAGE):
        tmp = workspace.new_tmp_dir(item_id, bindings.PLAN_STAGE)
        try:
            workspace.commit_stage(item_id, bindings.PLAN_STAGE, tmp, chunks)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        chunks = workspace.load_result(item_id, bindings.PLAN_STAGE, bindings.chunked.ChunkPlan)
    st = bindings.stage(item.kind, ENCODE)
    hard, soft = bindings.time_limits(st)
    opts = {"queue": str(st.queue), "time_limit": hard, "soft_time_limit": soft}
    header = [encode_part.si(item_id, rng.index).set(**opts) for rng in chunks.ranges]
    header.append(encode_audio.si(item_id).set(**opts))
    header.append(encode_storyboard.si(item_id).set(**opts))
    logger.info(json.dumps({"item": item_id, "stage": ENCODE, "chunks": len(chunks.ranges), "outcome": "fan-out"}))
    task.replace(chord(header, encode_join.si(item_id).set(**opts)))
    raise Ignore()  # replace() raises this itself; never fall through to a whole-file encode


def run_part(task: Task, item_id: str, stage: str, work: Any) -> dict[str, Any]:
    """A chunk or the audio of a chunked encode: skip it if storage has it, else do it, write it
    through to storage, and move the item's progress by the share of chunks now done."""
    item = MediaItem.objects.filter(pk=item_id).first()
    if item is None or item.status != MediaStatus.PROCESSING:
        raise Ignore()  # deleted, cancelled or finished: nothing to do
    started = time.monotonic()
    attempt = task.request.retries + 1
    stored = 0
    if workspace.stage_done(item_id, stage):
        outcome = "skipped"
    else:
        tmp = workspace.new_tmp_dir(item_id, stage)
        ctx = StageContext(item, stage, tmp, bindings.progress_span(item.kind, ENCODE))
        try:
            result = work(ctx)
            if ctx.cancelled():
                raise Ignore()
            stored = workspace.commit_stage(item_id, stage, tmp, result)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        outcome = "done"
    seconds = time.monotonic() - started
    log_stage(item_id, stage, attempt, seconds, outcome, stored_bytes=stored, worker=task.request.hostname or "")
    _chunks_progress(item)
    return {"stage": stage, "seconds": round(seconds, 3)}


def _chunks_progress(item: MediaItem) -> None:
    """Progress of the encode as the share of its chunks done, on any host; the time left from
    the pace since the fan-out, plus the later stages' share of the bar at that pace."""
    plan = workspace.load_result(item.pk, bindings.PLAN_STAGE, bindings.chunked.ChunkPlan)
    stages = [bindings.part_stage(rng.index) for rng in plan.ranges] + [bindings.AUDIO_STAGE]
    done = sum(1 for name in stages if workspace.stage_done(item.pk, name))
    fraction = done / len(stages)
    start, end = bindings.progress_span(item.kind, ENCODE)
    elapsed = max(time.time() - plan.started, 0.0)
    eta = None
    if 0 < fraction < 1:
        left = elapsed / fraction - elapsed
        eta = round(left + (elapsed / fraction) * (99 - end) / max(end - start, 1.0), 1)
    lifecycle.progressed(item_id=item.pk, progress=int(start + (end - start) * fraction), eta_seconds=eta)


@shared_task(bind=True, base=StageTask, name="media.stage.encode_part", ignore_result=False)
def encode_part(self: Task, item_id: str, index: int) -> dict[str, Any]:
    return run_part(self, item_id, bindings.part_stage(index), lambda ctx: bindings.encode_part(ctx, index))


@shared_task(bind=True, base=StageTask, name="media.stage.encode_audio", ignore_result=False)
def encode_audio(self: Task, item_id: str) -> dict[str, Any]:
    return run_part(self, item_id, bindings.AUDIO_STAGE, bindings.encode_audio)


@shared_task(bind=True, base=StageTask, name="media.stage.encode_storyboard", ignore_result=False)
def encode_storyboard(self: Task, item_id: str) -> dict[str, Any]:
    """A chunked encode's storyboard: one more task of its fan-out, beside the chunks."""
    return run_part(self, item_id, bindings.STORYBOARD_STAGE, lambda ctx: bindings.storyboard_part(ctx, ctx.cancelled))


@shared_task(bind=True, base=StageTask, name="media.stage.encode_join")
def encode_join(self: Task, item_id: str) -> dict[str, Any]:
    """The chord's body: the chunks and the audio joined by stream copy; the encode stage is done."""
    item = MediaItem.objects.filter(pk=item_id).first()
    if item is None or item.status != MediaStatus.PROCESSING or item.stage != ENCODE:
        raise Ignore()  # cancelled (or already past the encode): a late join resurrects nothing
    span = bindings.progress_span(item.kind, ENCODE)
    started = time.monotonic()
    stored = 0
    if not workspace.stage_done(item_id, ENCODE):
        tmp = workspace.new_tmp_dir(item_id, ENCODE)
        try:
            result = bindings.join_parts(StageContext(item, ENCODE, tmp, span))
            stored = workspace.commit_stage(item_id, ENCODE, tmp, result)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    plan = workspace.load_result(item_id, bindings.PLAN_STAGE, bindings.chunked.ChunkPlan)
    seconds = max(time.time() - plan.started, 0.0)
    applied = lifecycle.stage_finished(item_id=item_id, stage=ENCODE, progress=int(span[1]), seconds=seconds)
    log_stage(
        item_id,
        "encode.join",
        self.request.retries + 1,
        time.monotonic() - started,
        "done" if applied else "stopped",
        stored_bytes=stored,
        encode_seconds=round(seconds, 3),
        worker=self.request.hostname or "",
    )
    if not applied:
        raise Ignore()
    return {"stage": ENCODE, "skipped": False, "seconds": seconds}


@shared_task(bind=True, name="media.finish", acks_late=True, ignore_result=True, time_limit=60, soft_time_limit=50)
def finish(self: Task, item_id: str) -> None:
    """The chain's last link: mark Completed and drop the work files."""
    finish_item(item_id)


def finish_item(item_id: str) -> None:
    if lifecycle.completed(item_id=item_id):
        clear_work(item_id)


def clear_work(item_id: str) -> None:
    """A completed item's stage files, on this host and in storage: nothing reads them again."""
    workspace.clear(item_id)
    storage_delete_tree(workspace.stored_prefix(item_id))


def chain_links(item: MediaItem) -> list[Any]:
    """The item's chain, from the stage table: each link on its stage's queue, with its limits."""
    links = []
    for st in bindings.PIPELINES[item.kind]:
        hard, soft = bindings.time_limits(st)
        links.append(
            STAGE_TASKS[st.name].si(str(item.pk)).set(queue=str(st.queue), time_limit=hard, soft_time_limit=soft)
        )
    last_queue = str(bindings.PIPELINES[item.kind][-1].queue)
    links.append(finish.si(str(item.pk)).set(queue=last_queue))
    return links


def process_links(item: MediaItem) -> list[Any]:
    """What the entry task queues: the chain of stage tasks, or for an item that ``runs_fused``
    one task that runs them all (limited by the sum of their limits)."""
    if not runs_fused(item):
        return chain_links(item)
    hard = fused_limit(item.kind)
    opts = {"queue": str(fused_queue(item.kind)), "time_limit": hard, "soft_time_limit": int(hard * 0.9)}
    return [fused.si(str(item.pk)).set(**opts)]


def fused_queue(kind: str) -> str:
    return str(bindings.PIPELINES[kind][0].queue)


def _ceiling_seconds() -> int:
    return int(settings.CELERY_TASK_TIME_LIMIT)


def build_chain(item: MediaItem) -> Any:
    return chain(*process_links(item))


# --- the entry task ---------------------------------------------------------------------------
#
# It learns the item's kind (the one probe of the upload) and hands over to the item's chain or
# fused task. For an image, one more task was a third of the queue's cost per item (a broker
# round trip, a delivery, a second task set-up): so when the item runs fused and its stages'
# queue is the very queue this delivery came from, the entry task runs the stages itself, one
# task per image. Everything else is as in ``media.stage.fused``: the same ``run_fused``, the
# same retry policy (``StageTask``), the item's task id is this task's, so a cancel kills it, and
# a redelivery or retry of this same task resumes at the first stage not done. It inlines only
# when the stages' summed time limit fits in its own beside the detection's budget: images, whose
# steps are seconds at most; an audio file's encode may take up to the ceiling, so audio (and
# a video, a chain) is handed over.

ENTRY_SECONDS = 300  # the entry task's own work: one sandboxed probe of the upload


def _entry_limit() -> int:
    return min(ENTRY_SECONDS + fused_limit("image"), _ceiling_seconds())


def runs_inline(task: Task, item: MediaItem) -> bool:
    """Whether this delivery of the entry task runs the item's stages itself."""
    if not runs_fused(item):
        return False
    request = task.request
    if not request.is_eager:
        routing = (request.delivery_info or {}).get("routing_key")
        if routing != fused_queue(item.kind):
            return False  # its stages belong to workers of another queue
    hard = (request.timelimit or (None, None))[0] or task.time_limit or _ceiling_seconds()
    return fused_limit(item.kind) + ENTRY_SECONDS <= hard


# Its return value (the id of the task that runs the first stage) is for in-process callers
# (``manage.py process``); none reads it from the result backend, so it is not stored there.
@shared_task(
    bind=True,
    base=StageTask,
    name="media.process",
    time_limit=_entry_limit(),
    soft_time_limit=int(_entry_limit() * 0.9),
)
def process(self: Task, item_id: str) -> str | None:
    """Entry task: learn the item's kind and streams from its content (the one probe of the
    upload), then run its stages here (``runs_inline``) or hand over to its chain. A delivery
    whose id is not the one the item was queued under (a duplicate, or one the watchdog
    replaced) starts nothing."""
    item = MediaItem.objects.filter(pk=item_id).first()
    if item is None or item.task_id != self.request.id:
        return None
    if item.status == MediaStatus.PROCESSING:
        # This very task started the stages itself, then was retried or redelivered (its worker
        # died): on from the first stage not done, the stalled stage's delivery counted.
        if runs_inline(self, item):
            run_fused(self, item_id, entry_task_id=self.request.id, item=item)
            return self.request.id
        return None
    if not item.is_queued:
        return None
    detected: dict[str, Any] = {}
    if not item.kind or (item.kind != "image" and "probe" not in (item.media_info or {})):
        try:
            found = bindings.detect_item(item, bindings.profiles())
        except MediaError as exc:
            lifecycle.failed(item_id=item_id, error=classify(exc))
            return None
        media_info = {
            **found.summary,
            "sniffed": to_json(found.sniffed) if found.sniffed else None,
            "probe": to_json(found.info) if found.info else None,
        }
        detected = {
            "kind": found.kind,
            "detected_content_type": found.mime,
            "duration": found.duration,
            "media_info": media_info,
        }
        item.kind, item.duration, item.media_info = found.kind, found.duration, media_info
    if runs_inline(self, item):
        # The first stage starts only while the item is still queued under this task's id, and
        # the same write saves what was learnt of it.
        run_fused(self, item_id, entry_task_id=self.request.id, item=item, detected=detected)
        return self.request.id
    links = process_links(item)
    first_id = links[0].freeze().id
    if not lifecycle.chain_started(
        item_id=item_id, entry_task_id=self.request.id, first_task_id=first_id, detected=detected
    ):
        return None
    chain(*links).apply_async()
    return str(first_id)
