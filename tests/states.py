"""Put an item in a given state for a test, the way a finished run would have left it.

Tests set up states directly (a Completed item with outputs, a Failed one with a reason): the
application moves items only through ``media_app.lifecycle``, whose transitions are what the
tests then exercise. This writes the row and a history line; it broadcasts nothing.
"""

from __future__ import annotations

from typing import Any

from django.utils import timezone

from media_app.lifecycle import ErrorReport
from media_app.models import FINAL_STATUSES, MediaItem, MediaStatus, StatusEvent


def set_state(
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
) -> MediaItem:
    item = MediaItem.objects.get(pk=item_id)
    now = timezone.now()
    if status is not None:
        item.status = status
        if status != MediaStatus.PENDING and item.upload_finished_at is None:
            item.upload_finished_at = now
        if status == MediaStatus.PROCESSING:
            item.started_at = item.started_at or now
            item.queued_at = None
        if status in FINAL_STATUSES:
            item.finished_at = now
            item.queued_at = None
    if stage is not None:
        item.stage = stage
    if progress is not None:
        item.progress = min(int(progress), 100 if item.status == MediaStatus.COMPLETED else 99)
    if item.status == MediaStatus.COMPLETED:
        item.progress = 100
    if attempts is not None:
        item.attempts = attempts
    if error is not None:
        item.error_code, item.error_message, item.error_detail = error.code, error.message, error.detail
    if timing is not None:
        item.timings = {**item.timings, timing[0]: round(timing[1], 3)}
    for key, value in (extra or {}).items():
        setattr(item, key, value)
    if extra and extra.get("task_id") and item.status == MediaStatus.PENDING:
        item.upload_finished_at = item.upload_finished_at or now
        item.queued_at = item.queued_at or now
    item.event_seq += 1
    item.save()
    StatusEvent.objects.create(
        item=item,
        status=item.status,
        stage=item.stage,
        progress=item.progress,
        attempt=item.attempts,
        error_code=error.code if error else "",
        message=message,
    )
    return item
