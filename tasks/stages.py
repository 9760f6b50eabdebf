"""One Celery task per stage, and the entry task that builds an item's chain.

A stage task only sets up: it loads the item by id, counts the delivery, skips work already
done, calls one pipeline function through ``tasks.bindings`` and reports. Typed errors
propagate; the retry policy sits in ``StageTask``.
"""

from __future__ import annotations

import logging
import resource
import shutil
import time
from pathlib import Path
from typing import Any

from celery import Task, chain, shared_task
from celery.exceptions import Ignore
from django.conf import settings
from django.core.files.storage import default_storage

from media_app.models import MediaItem, MediaStatus
from media_app.services import media_progress_report, media_status_report
from pipelines.errors import MediaError
from tasks import bindings, workspace
from tasks.retry import RETRYABLE_ERRORS, classify

logger = logging.getLogger("tasks.stages")


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

    def on_failure(self, exc: BaseException, task_id: str, args: Any, kwargs: Any, einfo: Any) -> None:
        item_id = args[0] if args else kwargs.get("item_id")
        report = classify(exc)
        logger.warning("stage failed item=%s task=%s code=%s %s", item_id, self.name, report.code, report.detail[-500:])
        media_status_report(item_id=item_id, status=MediaStatus.FAILED, error=report, message=report.message)


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

    def dir(self, stage: str) -> Path:
        return workspace.stage_dir(self.item_id, stage)

    def result(self, stage: str, cls: type[Any]) -> Any:
        return workspace.load_result(self.item_id, stage, cls)

    def progress(self, fraction: float) -> None:
        fraction = max(0.0, min(fraction, 1.0))
        start, end = self._span
        media_progress_report(
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


def run_stage(task: Task, item_id: str, stage: str) -> dict[str, Any]:
    """The common body of every stage task."""
    item = MediaItem.objects.filter(pk=item_id).first()
    if item is None or item.is_final:
        # Deleted, cancelled or already done: stop this chain quietly.
        raise Ignore()
    attempts = item.attempts + 1 if (item.status == MediaStatus.PROCESSING and item.stage == stage) else 1
    span = bindings.progress_span(item.kind, stage)
    media_status_report(
        item_id=item_id,
        status=MediaStatus.PROCESSING,
        stage=stage,
        attempts=attempts,
        progress=int(span[0]),
        extra={"task_id": task.request.id or "", "eta_seconds": None},
        message=f"{stage} started" + (f" (attempt {attempts})" if attempts > 1 else ""),
    )
    if attempts > settings.MEDIA_MAX_ATTEMPTS:
        # Redelivered after its worker died each time: a poison file, not bad luck.
        raise MediaError(
            "Processing this file failed repeatedly and was stopped.",
            detail=f"stage {stage} delivered {attempts} times",
        )
    started = time.monotonic()
    if workspace.stage_done(item_id, stage):
        logger.info("stage skipped item=%s stage=%s (already done)", item_id, stage)
        media_status_report(
            item_id=item_id, progress=int(span[1]), message=f"{stage} skipped: already done", record=True
        )
        return {"stage": stage, "skipped": True}
    workspace.clear_tmp(item_id)
    tmp = workspace.new_tmp_dir(item_id, stage)
    ctx = StageContext(item, stage, tmp, span)
    try:
        result = bindings.run(ctx)
        workspace.commit_stage(item_id, stage, tmp, result)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    seconds = time.monotonic() - started
    # The largest child this worker process has reaped (decoders, ffmpeg): the item records it
    # so limits can be checked against what really ran.
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    logger.info(
        "stage done item=%s stage=%s seconds=%.3f attempt=%d peak_child_mb=%.0f",
        item_id,
        stage,
        seconds,
        attempts,
        peak / 2**20,
    )
    media_status_report(
        item_id=item_id,
        progress=int(span[1]),
        timing=(stage, seconds),
        extra={"peak_child_rss": max(item.peak_child_rss, peak)},
    )
    return {"stage": stage, "skipped": False, "seconds": seconds}


def _stage_task(stage: str) -> Task:
    def body(self: Task, item_id: str) -> dict[str, Any]:
        return run_stage(self, item_id, stage)

    body.__name__ = body.__qualname__ = f"stage_{stage}"
    return shared_task(bind=True, base=StageTask, name=f"media.stage.{stage}")(body)


STAGE_TASKS: dict[str, Task] = {stage: _stage_task(stage) for stage in bindings.ALL_STAGES}


@shared_task(bind=True, name="media.finish", acks_late=True)
def finish(self: Task, item_id: str) -> None:
    """The chain's last link: mark Completed and drop the work files."""
    item = MediaItem.objects.filter(pk=item_id).first()
    if item is None or item.is_final:
        return
    media_status_report(item_id=item_id, status=MediaStatus.COMPLETED, stage="", progress=100, message="Completed")
    workspace.clear(item_id)


def build_chain(item: MediaItem) -> Any:
    queue = bindings.queue_for(item.kind)
    links = [STAGE_TASKS[s].si(str(item.pk)).set(queue=queue) for s in bindings.stages_for(item.kind)]
    links.append(finish.si(str(item.pk)).set(queue=queue))
    return chain(*links)


@shared_task(bind=True, name="media.process", acks_late=True)
def process(self: Task, item_id: str) -> str | None:
    """Entry task: learn the item's kind from its content, then start its chain."""
    item = MediaItem.objects.filter(pk=item_id).first()
    if item is None or item.is_final:
        return None
    if not item.kind:
        try:
            kind, content_type, info = bindings.detect_item(item, bindings.profiles())
        except MediaError as exc:
            report = classify(exc)
            media_status_report(item_id=item_id, status=MediaStatus.FAILED, error=report, message=report.message)
            return None
        item = (
            media_status_report(item_id=item_id, extra={"kind": kind, "detected_content_type": content_type, **info})
            or item
        )
    result = build_chain(item).apply_async()
    return str(result.id)
