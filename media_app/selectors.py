"""Reads: what the API, the websocket and the CLI show about an item."""

from __future__ import annotations

from typing import Any

from django.core.files.storage import default_storage
from django.db.models import QuerySet

from media_app.models import MediaItem, Rendition


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
        "size": item.size,
        "created_at": item.created_at.isoformat() if item.created_at else None,
        "started_at": item.started_at.isoformat() if item.started_at else None,
        "finished_at": item.finished_at.isoformat() if item.finished_at else None,
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
