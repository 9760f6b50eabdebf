"""Reads: what the API, the websocket and the CLI show about an item."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from django.core.files.storage import default_storage
from django.db.models import F, Q, QuerySet
from django.db.models.functions import Coalesce
from django.utils import timezone

from media_app.jobs import Queue, queue_for
from media_app.models import MediaItem, MediaKind, MediaStatus, Rendition
from pipelines.errors import file_error_codes

_FILE_ERRORS = file_error_codes()

# Kinds whose thumbnail is stored while they are still processing (a video's previews stage):
# only their Processing events look for it; an image's or a sound's would query for nothing, once
# per stage (tests/tasks/test_entry_inline.py checks this agrees with the stage table).
EARLY_THUMBNAIL_KINDS = frozenset({"video"})


def media_item_get(*, item_id: Any) -> MediaItem | None:
    return MediaItem.objects.filter(pk=item_id).first()


def media_items_for_user(*, user: Any) -> QuerySet[MediaItem]:
    qs = MediaItem.objects.select_related("owner")
    return qs if user.is_staff else qs.filter(owner=user)


def media_item_placeholder(*, item_id: Any) -> str | None:
    """The item's ThumbHash (its poster's or its image's), or None before a picture is taken."""
    found = (
        Rendition.objects.filter(item_id=item_id)
        .exclude(placeholder="")
        .order_by("role")
        .values_list("placeholder", flat=True)
        .first()
    )
    return found or None


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
        "placeholder": rendition.placeholder,
    }


def media_item_payload(
    item: MediaItem, *, with_outputs: bool = True, deleted: bool = False, queue_position: int | None = None
) -> dict[str, Any]:
    """The one shape of an item's state, shared by broadcasts, the REST detail and the CLI.
    ``deleted``: the last event of an item being removed says so, and offers no retry.
    ``queue_position``: its place in line when the caller has just read the line (not counted again)."""
    waiting = media_item_waiting(item)
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
        "retryable": media_item_retryable(item) and not deleted,
        "waiting": waiting,
        "queue": str(queue_for(item.kind)) if waiting else None,
        "queue_position": queue_position if waiting and queue_position else media_item_queue_position(item),
        "eta_seconds": media_item_eta_seconds(item),
        "size": item.size,
        "created_at": item.created_at.isoformat() if item.created_at else None,
        "started_at": item.started_at.isoformat() if item.started_at else None,
        "finished_at": item.finished_at.isoformat() if item.finished_at else None,
        "updated_at": item.updated_at.isoformat() if item.updated_at else None,
    }
    if with_outputs and item.status == "Completed":
        payload["outputs"] = [rendition_payload(r) for r in item.renditions.exclude(role="segment")]
    elif with_outputs and item.status == "Processing":
        # The thumbnail is stored as soon as it is taken, before the encode: show it meanwhile.
        early = item.kind in EARLY_THUMBNAIL_KINDS
        payload["outputs"] = [rendition_payload(r) for r in item.renditions.filter(role="thumbnail")] if early else []
    if with_outputs:
        payload["placeholder"] = next((o["placeholder"] for o in payload.get("outputs", []) if o["placeholder"]), None)
    if deleted:
        payload["deleted"] = True
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


# --- waiting for a worker --------------------------------------------------------------------
#
# An item waits while its next task sits in a broker queue: Pending and queued (its first stage,
# or the entry task before it), or Processing between two stages (``waiting_since``). Every stage
# of a kind runs on ``queue_for(kind)`` (tests/media_app/test_waiting_status.py checks the stage
# table agrees), and a queue serves its messages in the order they were sent, which is the order
# the items began to wait.

_WAITING = Q(status=MediaStatus.PENDING, queued_at__isnull=False) | Q(
    status=MediaStatus.PROCESSING, waiting_since__isnull=False
)
_RUNNING = Q(status=MediaStatus.PROCESSING, waiting_since__isnull=True)


def media_item_waiting(item: MediaItem) -> bool:
    """Whether the item waits for a worker (rather than being worked on, or done)."""
    return item.is_queued or (item.status == MediaStatus.PROCESSING and item.waiting_since is not None)


def _kinds_of(queue: Queue) -> list[str]:
    return [kind for kind in ("", *MediaKind.values) if queue_for(kind) == queue]


def _waiting_since(item: MediaItem) -> datetime | None:
    return item.waiting_since if item.status == MediaStatus.PROCESSING else item.queued_at


def media_items_waiting_in(queue: Queue) -> QuerySet[MediaItem]:
    """The line of ``queue``: its waiting items, first in line first."""
    return (
        MediaItem.objects.filter(_WAITING, kind__in=_kinds_of(queue))
        .annotate(since=Coalesce(F("waiting_since"), F("queued_at")))
        .order_by("since", "pk")
    )


def _ahead_of(item: MediaItem) -> QuerySet[MediaItem]:
    since = _waiting_since(item)
    return media_items_waiting_in(queue_for(item.kind)).filter(Q(since__lt=since) | Q(since=since, pk__lt=item.pk))


def media_item_queue_position(item: MediaItem) -> int | None:
    """1 for the next item its queue will take; None unless the item waits for a worker."""
    if not media_item_waiting(item) or _waiting_since(item) is None:
        return None
    return _ahead_of(item).count() + 1


def media_item_work_left(item: MediaItem, *, now: datetime | None = None) -> float | None:
    """Seconds of work the item still needs, not counting any wait: the running stage's own
    estimate (encode speed) when it gave one, else the time it has spent at work so far (its
    stage timings, plus the running stage's time) scaled by what is left of the bar (the stage
    weights make the bar proportional to time). None when too little is known."""
    if item.status != MediaStatus.PROCESSING:
        return None
    now = now or timezone.now()
    waiting = item.waiting_since is not None
    if not waiting and item.eta_seconds is not None and item.updated_at:
        return round(max(0.0, item.eta_seconds - (now - item.updated_at).total_seconds()), 1)
    if item.progress < 5:
        return None
    timings = item.timings if isinstance(item.timings, dict) else {}
    if timings:
        worked = sum(float(v) for v in timings.values())
        if not waiting and item.updated_at:  # the running stage, since it started
            worked += max(0.0, (now - item.updated_at).total_seconds())
    elif item.started_at:
        worked = (now - item.started_at).total_seconds()
    else:
        return None
    return round(worked * (100 - item.progress) / item.progress, 1)


def media_item_wait_seconds(item: MediaItem, *, now: datetime | None = None) -> float | None:
    """Seconds until a worker takes the item: the work left of every item running in its queue
    and of every item ahead of it in line, as if the queue had one worker slot (the video queue
    has: ``Procfile``); with more it is an upper bound. None when one of them has no estimate."""
    now = now or timezone.now()
    kinds = _kinds_of(queue_for(item.kind))
    others = [*MediaItem.objects.filter(_RUNNING, kind__in=kinds).exclude(pk=item.pk), *_ahead_of(item)]
    total = 0.0
    for other in others:
        left = media_item_work_left(other, now=now)
        if left is None:
            return None
        total += left
    return round(total, 1)


def media_item_eta_seconds(item: MediaItem) -> float | None:
    """Seconds left of a Processing item: its own work left, plus, while it waits for a worker,
    the wait (``media_item_wait_seconds``). None rather than a number that is not known."""
    if item.status != MediaStatus.PROCESSING:
        return None
    now = timezone.now()
    left = media_item_work_left(item, now=now)
    if left is None or not media_item_waiting(item):
        return left
    wait = media_item_wait_seconds(item, now=now)
    return None if wait is None else round(wait + left, 1)
