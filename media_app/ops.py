"""Operations: what admins and periodic jobs do to items, and the small task-manager API.

Each action checks what it can say to an admin under the row lock, then asks
``media_app.lifecycle`` for the transition, which applies once however many clicks, admins or
watchdogs race on one item.
"""

from __future__ import annotations

import json
import logging
import os
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import date, datetime, time, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core import serializers
from django.core.files.storage import default_storage
from django.core.management.color import no_style
from django.db import connection, transaction
from django.utils import timezone

from media_app import lifecycle
from media_app.jobs import Queue
from media_app.models import MediaItem, MediaStatus, Rendition, StatusEvent
from media_app.services import media_item_remove_files

if TYPE_CHECKING:
    from django_celery_beat.models import PeriodicTask

logger = logging.getLogger("media_app.ops")


class OpsRefused(Exception):
    """An action that does not apply to this item. ``reason`` is short: admins see it grouped."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


@dataclass
class ActionReport:
    """What a bulk action did: the items it changed, and the others grouped by why they were skipped."""

    changed: list[str] = field(default_factory=list)
    skipped: dict[str, list[str]] = field(default_factory=dict)


def action_apply(*, items: Iterable[MediaItem], action: Callable[..., object]) -> ActionReport:
    """Run ``action(item_id=...)`` on each item, collecting refusals instead of stopping at the first."""
    report = ActionReport()
    for item in items:
        try:
            action(item_id=item.pk)
        except OpsRefused as exc:
            report.skipped.setdefault(exc.reason, []).append(item.original_name)
        else:
            report.changed.append(item.original_name)
    return report


# --- admin actions -------------------------------------------------------------------------------


def _locked(item_id: Any) -> MediaItem:
    # On PostgreSQL the row lock serialises racing actions; SQLite's IMMEDIATE transactions
    # already serialise every writer, which gives the same guarantee.
    item = MediaItem.objects.select_for_update().filter(pk=item_id).first()
    if item is None:
        raise OpsRefused("deleted meanwhile")
    return item


def _require_source(item: MediaItem) -> None:
    if not item.source_key or not default_storage.exists(item.source_key):
        raise OpsRefused("the uploaded file is gone")


def media_retry(*, item_id: Any) -> MediaItem:
    """Queue a Failed item again. Stages already done are skipped, so it resumes where it failed;
    the attempt counter starts afresh. A second click finds it Pending and changes nothing."""
    with transaction.atomic():
        item = _locked(item_id)
        if item.status != MediaStatus.FAILED:
            raise OpsRefused("already queued" if item.is_queued else f"not failed ({item.status})")
        _require_source(item)
        if not lifecycle.retried(item_id=item.pk, message="Retry requested by an administrator"):
            raise OpsRefused("already queued")  # pragma: no cover - the row lock above decides
    logger.info("retry queued item=%s", item_id)
    item.refresh_from_db()
    return item


def media_reprocess(*, item_id: Any) -> MediaItem:
    """Process a finished item from scratch with today's profiles: work files and outputs are dropped."""
    with transaction.atomic():
        item = _locked(item_id)
        if not item.is_final:
            raise OpsRefused(f"not finished ({item.status})")
        _require_source(item)
        media_item_remove_files(item, source=False)
        lifecycle.reprocessed(item_id=item.pk, message="Reprocess from scratch requested by an administrator")
    logger.info("reprocess queued item=%s", item_id)
    item.refresh_from_db()
    return item


def media_cancel(*, item_id: Any, message: str = "Cancelled by an administrator.") -> MediaItem:
    """Stop a Pending or Processing item: it ends Failed/cancelled, its task is killed with its ffmpeg.

    The status is saved first: a stage that escapes the kill still sees Failed at its next
    cancel check (once a second) and stops its ffmpeg itself; later links of the chain see a
    final item and do nothing.
    """
    if not lifecycle.cancelled(item_id=item_id, message=message):
        item = MediaItem.objects.filter(pk=item_id).first()
        raise OpsRefused("deleted meanwhile" if item is None else f"already finished ({item.status})")
    return MediaItem.objects.get(pk=item_id)


# --- task-manager API ----------------------------------------------------------------------------


@dataclass(frozen=True)
class ProcessingTask:
    task_id: str
    media_id: str
    title: str
    description: str
    status: str


def create_processing_task(media_id: Any, title: str, description: str = "") -> ProcessingTask:
    """Queue processing of an uploaded item, as the task manager asks, and note why in its history.

    A new upload starts; a Failed item resumes (like Retry); a Completed one starts from scratch
    (like Reprocess). An item already queued or processing is refused: one chain per item.
    """
    with transaction.atomic():
        item = _locked(media_id)
        if item.status == MediaStatus.FAILED:
            media_retry(item_id=item.pk)
        elif item.status == MediaStatus.COMPLETED:
            media_reprocess(item_id=item.pk)
        elif item.status == MediaStatus.PENDING and item.queued_at is None:
            _require_source(item)
            if item.upload_finished_at is None:
                lifecycle.finish_upload_and_queue(item_id=item.pk)
            else:
                lifecycle.queued(item_id=item.pk)
        else:
            raise OpsRefused("already queued or processing")
        note = f"Task: {title}" + (f" - {description}" if description else "")
        lifecycle.noted(item_id=item.pk, message=note)
        item.refresh_from_db()
    return ProcessingTask(str(item.task_id), str(item.pk), title, description, item.status)


PATTERNS = ("minutely", "hourly", "daily", "weekly", "monthly")


def schedule_recurring_job(
    name: str,
    description: str,
    pattern: str,
    interval: int = 1,
    *,
    task: str | None = None,
    at: time = time(3, 0),
    weekday: int = 0,
    day_of_month: int = 1,
    args: list[Any] | None = None,
    kwargs: dict[str, Any] | None = None,
    queue: str = Queue.DEFAULT,
    enabled: bool = True,
    expire_seconds: int | None = None,
) -> PeriodicTask:
    """Create or update the django-celery-beat job ``name``: every ``interval`` minutes, hours,
    days, weeks or months.

    Runs at ``at`` (UTC; hourly jobs at its minute); weekly on ``weekday`` (0 = Sunday, cron's
    numbering); monthly on ``day_of_month``. Every N minutes, days or weeks has no cron form, so
    it becomes an interval schedule (days and weeks starting at the next ``at``). ``task``
    defaults to ``name`` (a registered task name). A message beat sent that is still queued
    after ``expire_seconds`` is dropped (the next one will come). The schedule's own jobs are
    made with it (migration 0004). Admins see and edit the result under Periodic tasks.
    """
    from django_celery_beat.models import CrontabSchedule, IntervalSchedule, PeriodicTask

    if pattern not in PATTERNS:
        raise ValueError(f"pattern must be one of {', '.join(PATTERNS)}, not {pattern!r}")
    if interval < 1 or (pattern == "monthly" and interval > 12) or (pattern == "hourly" and interval > 23):
        raise ValueError(f"interval {interval} is out of range for a {pattern} job")
    schedule: dict[str, Any] = {"interval": None, "crontab": None, "start_time": None}
    cron = {"minute": str(at.minute), "hour": str(at.hour), "timezone": "UTC"}
    if pattern == "minutely":
        schedule["interval"], _ = IntervalSchedule.objects.get_or_create(
            every=interval * 60, period=IntervalSchedule.SECONDS
        )
    elif pattern == "hourly":
        hours = "*" if interval == 1 else f"*/{interval}"
        schedule["crontab"], _ = CrontabSchedule.objects.get_or_create(
            minute=str(at.minute), hour=hours, timezone="UTC", day_of_week="*", day_of_month="*", month_of_year="*"
        )
    elif pattern == "monthly":
        months = "*" if interval == 1 else f"*/{interval}"
        schedule["crontab"], _ = CrontabSchedule.objects.get_or_create(
            **cron, day_of_week="*", day_of_month=str(day_of_month), month_of_year=months
        )
    elif interval == 1:
        dow = str(weekday) if pattern == "weekly" else "*"
        schedule["crontab"], _ = CrontabSchedule.objects.get_or_create(
            **cron, day_of_week=dow, day_of_month="*", month_of_year="*"
        )
    else:
        days = interval * (7 if pattern == "weekly" else 1)
        schedule["interval"], _ = IntervalSchedule.objects.get_or_create(every=days, period=IntervalSchedule.DAYS)
        schedule["start_time"] = _next_run(at, weekday if pattern == "weekly" else None)
    job, _ = PeriodicTask.objects.update_or_create(
        name=name,
        defaults={
            **schedule,
            "task": task or name,
            "description": description,
            "args": json.dumps(args or []),
            "kwargs": json.dumps(kwargs or {}),
            "queue": queue,
            "enabled": enabled,
            "expire_seconds": expire_seconds,
        },
    )
    return job


def _next_run(at: time, weekday: int | None) -> datetime:
    now = timezone.now()
    run = now.replace(hour=at.hour, minute=at.minute, second=0, microsecond=0)
    while run <= now or (weekday is not None and int(run.strftime("%w")) != weekday):
        run += timedelta(days=1)
    return run


# --- backup and restore --------------------------------------------------------------------------

BACKUP_FORMAT = "cpc-media-backup/1"
_USER_FIELDS = (
    "username",
    "email",
    "password",
    "first_name",
    "last_name",
    "is_active",
    "is_staff",
    "is_superuser",
    "date_joined",
    "last_login",
)


def backup_path(day: date, directory: Path | None = None) -> Path:
    return Path(directory or settings.BACKUP_DIR) / f"media-{day:%Y-%m-%d}.json"


def backup_write(*, now: datetime | None = None, directory: Path | None = None) -> Path:
    """Write today's backup: items, outputs and history rows, their owners, and the files' manifest.

    One file per day (a second run the same day replaces it), written aside and renamed, so a
    crash never leaves half a backup under the real name. Owners carry password hashes, so the
    file is readable by its owner only. Older files beyond BACKUP_RETENTION_DAYS are removed.
    """
    now = now or timezone.now()
    target = backup_path(now.date(), directory)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.part")
    items = MediaItem.objects.order_by("created_at", "id")
    owners = get_user_model().objects.filter(pk__in=MediaItem.objects.values("owner_id")).order_by("pk")
    try:
        with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w", encoding="utf-8") as fh:
            fh.write(json.dumps({"format": BACKUP_FORMAT, "created_at": now.isoformat()})[:-1])
            for key, qs, opts in (
                ("users", owners, {"fields": _USER_FIELDS, "use_natural_primary_keys": True}),
                ("media_items", items, {"use_natural_foreign_keys": True}),
                ("renditions", Rendition.objects.order_by("pk"), {}),
                ("status_events", StatusEvent.objects.order_by("pk"), {}),
            ):
                fh.write(f', "{key}": ')
                serializers.serialize("json", qs.iterator(chunk_size=500), stream=fh, **opts)
            fh.write(', "manifest": [')
            for n, entry in enumerate(_manifest(items)):
                fh.write(("," if n else "") + "\n" + json.dumps(entry))
            fh.write("\n]}\n")
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    backups_prune(today=now.date(), directory=target.parent)
    logger.info("backup written path=%s", target)
    return target


def _manifest(items: Any) -> Iterable[dict[str, Any]]:
    """Every stored file the rows point at, with its size and whether storage has it now."""
    for item in items.iterator(chunk_size=500):
        if item.source_key:
            yield {"item": str(item.pk), "role": "source", "key": item.source_key, "bytes": item.size}
        for r in Rendition.objects.filter(item=item).order_by("pk"):
            yield {"item": str(item.pk), "role": r.role, "key": r.storage_key, "bytes": r.bytes}


def backups_prune(*, today: date, directory: Path | None = None, keep_days: int | None = None) -> list[Path]:
    """Remove daily backups older than ``keep_days`` (BACKUP_RETENTION_DAYS); today's is always kept."""
    keep = settings.BACKUP_RETENTION_DAYS if keep_days is None else keep_days
    oldest = today - timedelta(days=max(keep, 1) - 1)
    removed = []
    for path in Path(directory or settings.BACKUP_DIR).glob("media-*.json"):
        try:
            day = date.fromisoformat(path.stem.removeprefix("media-"))
        except ValueError:
            continue
        if day < oldest:
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def backup_restore(*, path: Path) -> dict[str, int]:
    """Load a backup into a database that has no media items yet; returns counts per kind of row.

    Owners are matched by username: an account that already exists (say the admin made at first
    start) is kept as it is. Rows are inserted as they were (ids, timestamps, history), in one
    transaction, so a failed restore leaves the database empty again.
    """
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    if data.get("format") != BACKUP_FORMAT:
        raise ValueError(f"{path} is not a cpc-media backup (format {data.get('format')!r})")
    if MediaItem.objects.exists():
        raise ValueError("the database already has media items; restore only into an empty one")
    user_model = get_user_model()
    counts = {"users": 0, "media_items": 0, "renditions": 0, "status_events": 0, "missing_files": 0}
    with transaction.atomic():
        for obj in serializers.deserialize("python", data["users"]):
            if not user_model.objects.filter(username=obj.object.username).exists():
                obj.object.pk = None
                obj.save()
                counts["users"] += 1
        restored: set[str] = set()
        for obj in serializers.deserialize("python", data["media_items"]):
            obj.save()
            restored.add(str(obj.object.pk))
        counts["media_items"] = len(restored)
        for key in ("renditions", "status_events"):
            for obj in serializers.deserialize("python", data[key]):
                # Saved raw, one by one: bulk_create would stamp created_at with today's date.
                if str(obj.object.item_id) in restored:
                    obj.save()
                    counts[key] += 1
        with connection.cursor() as cursor:
            # PostgreSQL: ids were inserted explicitly, so move the sequences past them.
            for sql in connection.ops.sequence_reset_sql(no_style(), [user_model, Rendition, StatusEvent]):
                cursor.execute(sql)
    counts["missing_files"] = sum(
        1 for e in data.get("manifest", []) if e["item"] in restored and not default_storage.exists(e["key"])
    )
    logger.info("backup restored path=%s counts=%s", path, counts)
    return counts
