"""Reads: what the API, the websocket and the CLI show about an item."""

from __future__ import annotations

from typing import Any

from django.core.files.storage import default_storage
from django.db.models import QuerySet
from django.utils import timezone

from media_app.models import MediaItem, MediaKind, MediaStatus, Rendition
from pipelines.errors import file_error_codes

_FILE_ERRORS = file_error_codes()


def media_item_get(*, item_id: Any) -> MediaItem | None:
    return MediaItem.objects.filter(pk=item_id).first()


def media_items_for_user(*, user: Any) -> QuerySet[MediaItem]:
    qs = MediaItem.objects.select_related("owner")
    return qs if user.is_staff else qs.filter(owner=user)


def rendition_payload(rendition: Rendition) -> dict[str, Any]:
    return {
        "role": rendition.role,
        "key": rendition.storage_key,
        "content_type": rendition.content_type,
        "codec": rendition.codec,
        "width": rendition.width,
        "height": rendition.height,
        "duration": rendition.duration,
        "bytes": rendition.bytes,
    }


def media_item_payload(item: MediaItem, *, with_outputs: bool = True) -> dict[str, Any]:
    """The one shape of an item's state, shared by broadcasts, the REST detail and the CLI."""
    payload: dict[str, Any] = {
        "id": str(item.pk),
        "seq": item.event_seq,
        "file_name": item.original_name,
        "kind": item.kind,
        "status": item.status,
        "stage": item.stage,
        "progress": item.progress,
        "attempts": item.attempts,
        "error": {"code": item.error_code, "message": item.error_message} if item.error_code else None,
        "retryable": media_item_retryable(item),
        "queue_position": media_item_queue_position(item),
        "eta_seconds": media_item_eta_seconds(item),
        "size": item.size,
        "created_at": item.created_at.isoformat() if item.created_at else None,
        "started_at": item.started_at.isoformat() if item.started_at else None,
        "finished_at": item.finished_at.isoformat() if item.finished_at else None,
        "updated_at": item.updated_at.isoformat() if item.updated_at else None,
    }
    if with_outputs and item.status == "Completed":
        payload["outputs"] = [rendition_payload(r) for r in item.renditions.exclude(role="segment")]
    return payload


def rendition_local_path(rendition: Rendition) -> str | None:
    """Path on disk when storage is local (the CLI prints it), else None."""
    try:
        return default_storage.path(rendition.storage_key)
    except NotImplementedError:
        return None


def media_item_retryable(item: MediaItem) -> bool:
    """Whether Retry can change the outcome: Failed, its upload still there, and not for a fault
    of the file itself (a damaged JPEG fails the same way every time)."""
    return item.status == MediaStatus.FAILED and bool(item.source_key) and item.error_code not in _FILE_ERRORS


def media_item_queue_position(item: MediaItem) -> int | None:
    """1 for the next item its queue will take; None unless the item waits in a queue."""
    if not item.is_queued or item.queued_at is None:
        return None
    # Videos have a queue of their own (one encode at a time); everything else shares one.
    same_queue = (
        MediaItem.objects.filter(kind=MediaKind.VIDEO)
        if item.kind == MediaKind.VIDEO
        else MediaItem.objects.exclude(kind=MediaKind.VIDEO)
    )
    ahead = same_queue.filter(status=MediaStatus.PENDING, queued_at__lt=item.queued_at)
    return ahead.count() + 1


def media_item_eta_seconds(item: MediaItem) -> float | None:
    """Seconds left: the stage's own estimate (encode speed) when it gave one, else the overall pace."""
    if item.status != MediaStatus.PROCESSING:
        return None
    now = timezone.now()
    if item.eta_seconds is not None and item.updated_at:
        return round(max(0.0, item.eta_seconds - (now - item.updated_at).total_seconds()), 1)
    if item.started_at and item.progress >= 5:
        elapsed = (now - item.started_at).total_seconds()
        return round(elapsed * (100 - item.progress) / item.progress, 1)
    return None
