"""Writes: every change to a MediaItem goes through here.

Status flows one way: a stage calls ``media_status_report`` (or the throttled
``media_progress_report``), which saves first and broadcasts second, so a watcher never sees a
state the database does not hold.
"""

from __future__ import annotations

import logging
import shutil
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from typing import IO, Any

from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from django.conf import settings
from django.core.files import File
from django.core.files.storage import default_storage
from django.db import transaction
from django.db.models import F
from django.utils import timezone

from media_app.models import FINAL_STATUSES, MediaItem, MediaStatus, Rendition, StatusEvent
from media_app.selectors import media_item_payload

logger = logging.getLogger(__name__)

PROCESS_TASK = "media.process"


@dataclass(frozen=True)
class ErrorReport:
    code: str
    message: str
    detail: str = ""


def item_group(item_id: Any) -> str:
    return f"media.{item_id}"


def owner_group(owner_id: Any) -> str:
    return f"media.owner.{owner_id}"


def source_key_for(item_id: Any) -> str:
    # Generated, never derived from the uploaded name: no traversal, no collisions.
    return f"uploads/{item_id}/source"


def output_key_for(item_id: Any, name: str) -> str:
    return f"outputs/{item_id}/{name}"


def media_item_create(*, owner: Any, original_name: str, size: int = 0, declared_content_type: str = "") -> MediaItem:
    item = MediaItem(owner=owner, original_name=original_name[:1024], size=size)
    item.declared_content_type = declared_content_type[:255]
    item.source_key = source_key_for(item.pk)
    item.save()
    StatusEvent.objects.create(item=item, status=item.status, message="Created")
    return item


def media_item_store_source(*, item: MediaItem, fileobj: IO[bytes]) -> MediaItem:
    """Stream ``fileobj`` into storage under the item's generated key (replacing any earlier bytes)."""
    if default_storage.exists(item.source_key):
        default_storage.delete(item.source_key)
    saved = default_storage.save(item.source_key, File(fileobj))
    item.source_key = saved
    item.size = default_storage.size(saved)
    item.save(update_fields=["source_key", "size", "updated_at"])
    return item


def media_processing_start(*, item: MediaItem, kind: str = "", content_type: str = "") -> bool:
    """Queue the processing chain once, after the transaction commits; False if already queued."""
    task_id = str(uuid.uuid4())
    fields: dict[str, Any] = {"task_id": task_id}
    if kind:
        fields["kind"] = kind
    if content_type:
        fields["detected_content_type"] = content_type
    # The conditional update is the lock: of two concurrent completes, one wins.
    won = MediaItem.objects.filter(pk=item.pk, status=MediaStatus.PENDING, task_id="").update(**fields)
    if not won:
        return False
    transaction.on_commit(lambda: _send_process(item.pk, task_id))
    return True


def _send_process(item_id: Any, task_id: str) -> None:
    from celery import current_app

    current_app.send_task(PROCESS_TASK, args=[str(item_id)], task_id=task_id, queue="default")


def media_status_report(
    *,
    item_id: Any,
    status: str | None = None,
    stage: str | None = None,
    progress: int | None = None,
    attempts: int | None = None,
    error: ErrorReport | None = None,
    message: str = "",
    timing: tuple[str, float] | None = None,
    extra: dict[str, Any] | None = None,
    record: bool = False,
) -> MediaItem | None:
    """Save a state change, record it in the history, then broadcast it. None if the item is gone."""
    with transaction.atomic():
        item = MediaItem.objects.select_for_update().filter(pk=item_id).first()
        if item is None:
            return None
        transition = (
            record
            or (status is not None and status != item.status)
            or (stage is not None and stage != item.stage)
            or (attempts is not None and attempts != item.attempts)
        )
        now = timezone.now()
        if status is not None:
            if status == MediaStatus.PROCESSING and item.started_at is None:
                item.started_at = now
            if status in FINAL_STATUSES:
                item.finished_at = now
            if status in (MediaStatus.PENDING, MediaStatus.PROCESSING):
                item.finished_at = None
            item.status = status
        if stage is not None:
            item.stage = stage
        if progress is not None:
            # Monotonic within a run; 100 is reserved for Completed.
            ceiling = 100 if item.status == MediaStatus.COMPLETED else 99
            item.progress = max(item.progress, min(int(progress), ceiling))
        if item.status == MediaStatus.COMPLETED:
            item.progress = 100
        if attempts is not None:
            item.attempts = attempts
        if error is not None:
            item.error_code, item.error_message, item.error_detail = error.code, error.message, error.detail[-20000:]
        if timing is not None:
            item.timings = {**item.timings, timing[0]: round(timing[1], 3)}
        for key, value in (extra or {}).items():
            setattr(item, key, value)
        item.event_seq += 1
        item.save()
        if transition or error is not None:
            StatusEvent.objects.create(
                item=item,
                status=item.status,
                stage=item.stage,
                progress=item.progress,
                attempt=item.attempts,
                error_code=error.code if error else "",
                message=message or (error.message if error else ""),
            )
    media_broadcast(item)
    return item


def media_run_reset(*, item_id: Any, message: str, from_scratch: bool = False) -> MediaItem | None:
    """Back to Pending for a new run (retry, reprocess): error cleared, attempts and progress from zero.

    A retry keeps the stage timings of the stages it will skip; a run from scratch forgets them."""
    extra: dict[str, Any] = {
        "error_code": "",
        "error_message": "",
        "error_detail": "",
        "task_id": "",
        "progress": 0,
        "eta_seconds": None,
    }
    if from_scratch:
        extra |= {"timings": {}, "started_at": None}
    return media_status_report(
        item_id=item_id, status=MediaStatus.PENDING, stage="", attempts=0, message=message, record=True, extra=extra
    )


_last_progress: dict[str, float] = {}


def media_progress_report(*, item_id: Any, progress: int, eta_seconds: float | None = None) -> None:
    """Throttled progress: at most MEDIA_PROGRESS_PER_SECOND saves+broadcasts per item."""
    key = str(item_id)
    now = time.monotonic()
    if now - _last_progress.get(key, 0.0) < 1.0 / settings.MEDIA_PROGRESS_PER_SECOND:
        return
    _last_progress[key] = now
    progress = min(int(progress), 99)
    updated = MediaItem.objects.filter(pk=item_id, progress__lt=progress, status=MediaStatus.PROCESSING).update(
        progress=progress, eta_seconds=eta_seconds, event_seq=F("event_seq") + 1, updated_at=timezone.now()
    )
    if updated:
        item = MediaItem.objects.filter(pk=item_id).first()
        if item is not None:
            media_broadcast(item)


def media_broadcast(item: MediaItem) -> None:
    """Send the item's state to its watchers. Best effort: the saved state is the truth."""
    layer = get_channel_layer()
    if layer is None:
        return
    event = {"type": "media.status", "item": media_item_payload(item)}
    try:
        # One trip into the event loop for both groups: each async_to_sync call from a worker
        # starts a loop and a Redis connection of its own (a third of the worker's Python CPU).
        async_to_sync(_group_send_all)(layer, (item_group(item.pk), owner_group(item.owner_id)), event)
    except Exception:
        logger.warning("broadcast failed for %s", item.pk, exc_info=True)


async def _group_send_all(layer: Any, groups: Iterable[str], event: dict[str, Any]) -> None:
    for group in groups:
        await layer.group_send(group, event)


def renditions_replace(*, item_id: Any, renditions: Iterable[dict[str, Any]]) -> list[Rendition]:
    """Replace an item's outputs in one transaction, so a rerun never leaves two sets."""
    with transaction.atomic():
        Rendition.objects.filter(item_id=item_id).delete()
        return [Rendition.objects.create(item_id=item_id, **r) for r in renditions]


def storage_delete_tree(prefix: str) -> None:
    """Delete every stored object under ``prefix`` (S3 has no folders to remove; disk does)."""
    try:
        dirs, files = default_storage.listdir(prefix)
    except (FileNotFoundError, NotADirectoryError):
        return
    for name in files:
        default_storage.delete(f"{prefix}/{name}")
    for name in dirs:
        storage_delete_tree(f"{prefix}/{name}")
    try:
        path = default_storage.path(prefix)
    except NotImplementedError:
        return
    shutil.rmtree(path, ignore_errors=True)
