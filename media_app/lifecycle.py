"""The life of a MediaItem: every transition of its state, and the only code that writes it.

Each transition is one conditional ``UPDATE … WHERE <the states it may start from>``: it applies
or changes nothing, and says which. When it applies it writes its history row and broadcasts the
new state through ``transaction.on_commit``, so a watcher never sees a state that is then rolled
back, and work it queues is sent only once the state that explains it is committed. No other
module writes ``status``, ``stage``, ``progress``, ``attempts``, ``queued_at``, ``waiting_since``,
``upload_finished_at`` or the error fields (``tests/media_app/test_lifecycle_ownership.py``
checks).

The state table (``docs/decisions.md`` gives the race each guard closes)::

    transition        applies from                                  to
    upload_finished   Pending, upload open                          Pending, upload finished
    queued            Pending, upload finished, not queued          Pending, queued; task sent after commit
    chain_started     Pending, queued under this very task id       Pending, task id of the chain's first link
    stage_started     Pending queued, or Processing (under the      Processing at the stage, attempt n, not waiting
                      entry task's id, when it runs them inline)
    stage_finished    Processing at that stage                      progress at the stage's end, waiting since now
    stage_advanced    Processing at that stage                      Processing at the next stage, attempt 1 (fused)
    progressed        Processing, below that progress               that progress (no history row)
    completed         Processing (at the last stage, fused)         Completed, 100 %
    failed            Pending or Processing                         Failed with a reason
    cancelled         Pending or Processing                         Failed/cancelled; its task killed after commit
    reset             Failed (retry), Completed or Failed (reprocess)  Pending, upload finished, not queued
    requeued          Pending queued or Processing, unchanged       same state, new task id; sent after commit

An item *waits for a worker* while it is Pending and queued, or Processing between two stages
(``waiting_since`` set by ``stage_finished``, cleared by ``stage_started``): its next task sits in
a broker queue. ``media_app.selectors`` tells its place in that line; when an item leaves a line
(its stage starts), the first ``LINE_NOTIFY`` still waiting there are told their new place.
A deleted item's last event says so (``deleted``), so no watcher offers to retry it.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from django.conf import settings
from django.db import NotSupportedError, connections, transaction
from django.db.models import Case, DateTimeField, F, Func, JSONField, Q, Value, When
from django.db.models.functions import Coalesce, Greatest
from django.db.models.sql import UpdateQuery
from django.utils import timezone

from media_app import jobs
from media_app.models import FINAL_STATUSES, MediaItem, MediaStatus, StatusEvent

logger = logging.getLogger("media_app.lifecycle")

PENDING, PROCESSING, COMPLETED, FAILED = (
    MediaStatus.PENDING,
    MediaStatus.PROCESSING,
    MediaStatus.COMPLETED,
    MediaStatus.FAILED,
)
NOT_FINAL = Q(status__in=(PENDING, PROCESSING))
QUEUED = Q(status=PENDING, queued_at__isnull=False)


@dataclass(frozen=True)
class ErrorReport:
    code: str
    message: str
    detail: str = ""


# --- broadcast ------------------------------------------------------------------------------------


def item_group(item_id: Any) -> str:
    return f"media.{item_id}"


def owner_group(owner_id: Any) -> str:
    return f"media.owner.{owner_id}"


def broadcast(item: MediaItem, *, deleted: bool = False) -> None:
    """Send the item's state to its watchers. Best effort: the saved state is the truth.
    ``deleted``: the item is being removed, and the event says so (nothing left to retry)."""
    broadcast_many([item], deleted=deleted)


def broadcast_many(
    items: Iterable[MediaItem], *, deleted: bool = False, positions: dict[Any, int] | None = None
) -> None:
    """``broadcast`` for several items in one trip: each async_to_sync call from a worker starts
    a loop and a Redis connection of its own (a third of the worker's Python CPU).
    ``positions``: places in line the caller has just read, by item id (not counted again)."""
    import json

    from media_app.selectors import media_item_payload

    layer = get_channel_layer()
    if layer is None:
        return
    items = list(items)
    sends = []
    for item in items:
        place = positions.get(item.pk) if positions else None
        payload = media_item_payload(item, with_outputs=not deleted, deleted=deleted, queue_position=place)
        # "text": the websocket message itself, serialised once here rather than once per socket.
        text = json.dumps({"type": "media.status", "seq": payload["seq"], "item": payload})
        event = {"type": "media.status", "item": payload, "text": text}
        sends += [(item_group(item.pk), event), (owner_group(item.owner_id), event)]
    if not sends:
        return
    try:
        send_soon = getattr(layer, "group_send_soon", None)
        if send_soon is not None:
            # One publish per group on a long-lived connection, no event loop, from the layer's
            # sender thread: the caller does not wait for Redis, except for a last event
            # (Completed, Failed, deleted), so that none is left unsent when a process ends after it.
            send_soon(sends, wait=deleted or any(item.is_final for item in items))
        else:
            async_to_sync(_group_send_all)(layer, sends)
    except Exception:
        logger.warning("broadcast failed for %s", [str(s[1]["item"]["id"]) for s in sends[::2]], exc_info=True)


async def _group_send_all(layer: Any, sends: Iterable[tuple[str, dict[str, Any]]]) -> None:
    for group, event in sends:
        await layer.group_send(group, event)


# --- the one way to change an item --------------------------------------------------------------


def _apply(
    item_id: Any,
    where: Q,
    changes: dict[str, Any],
    *,
    message: str = "",
    error_code: str = "",
    history: bool = True,
    after_commit: Callable[[MediaItem], None] | None = None,
    deleted: bool = False,
    announce: bool = True,
) -> MediaItem | None:
    """One conditional UPDATE; on success a history row and, after commit, ``after_commit`` and
    the broadcast (``announce=False``: none, for a change no watcher sees). Returns the item as
    updated, or None when the item is not in a state ``where`` allows (or is gone)."""
    # No savepoint of its own: a caller's transaction around it fails or commits as a whole.
    with transaction.atomic(savepoint=False):
        updated = _update_returning(
            MediaItem.objects.filter(Q(pk=item_id) & where),
            {**changes, "event_seq": F("event_seq") + 1, "updated_at": timezone.now()},
        )
        if not updated:
            return None
        (item,) = updated
        if history:
            StatusEvent.objects.create(
                item=item,
                status=item.status,
                stage=item.stage,
                progress=item.progress,
                attempt=item.attempts,
                error_code=error_code,
                message=message,
            )
        if after_commit is not None:
            transaction.on_commit(lambda: after_commit(item))
        if announce:
            transaction.on_commit(lambda: broadcast(item, deleted=deleted))
    return item


def _update_returning(rows: Any, changes: dict[str, Any]) -> list[MediaItem]:
    """``rows.update(**changes)``, and the rows as updated, in one statement (``UPDATE …
    RETURNING``, SQLite 3.35+ and PostgreSQL) rather than an update and a read: a transition is
    on every stage's path, and on SQLite every statement is held under the one write lock that
    the other worker processes wait for."""
    connection = connections[rows.db]
    if connection.vendor not in ("sqlite", "postgresql"):
        # An update then a read would lose the guard: the row may change between the two.
        raise NotSupportedError(f"transitions need UPDATE … RETURNING: SQLite or PostgreSQL, not {connection.vendor}")
    query = rows.query.chain(UpdateQuery)
    query.add_update_values(changes)
    sql, params = query.get_compiler(rows.db).as_sql()
    columns, attnames, converters = _returning(connection)
    with connection.cursor() as cursor:
        cursor.execute(f"{sql} RETURNING {columns}", params)
        found = cursor.fetchall()
    items = []
    for row in found:
        values = list(row)
        for n, col, convert_all in converters:
            for convert in convert_all:
                values[n] = convert(values[n], col, connection)
        items.append(MediaItem.from_db(rows.db, attnames, values))
    return items


_RETURNING: dict[str, tuple[str, list[str], list[tuple[int, Any, tuple[Any, ...]]]]] = {}


def _returning(connection: Any) -> tuple[str, list[str], list[tuple[int, Any, tuple[Any, ...]]]]:
    """The RETURNING list of a MediaItem row, its attribute names, and the database converters of
    the columns that have any, built once per database: rebuilt for every transition, they were
    a tenth of its Python time (each of 40 columns' converters looked up each time)."""
    key = f"{connection.alias}:{connection.vendor}"
    found = _RETURNING.get(key)
    if found is None:
        fields = MediaItem._meta.concrete_fields
        columns = ", ".join(connection.ops.quote_name(f.column) for f in fields)
        converters = []
        for n, field in enumerate(fields):
            col = field.get_col(MediaItem._meta.db_table)
            convert_all = (*connection.ops.get_db_converters(col), *col.get_db_converters(connection))
            if convert_all:
                converters.append((n, col, convert_all))
        found = _RETURNING[key] = (columns, [f.attname for f in fields], converters)
    return found


class _JsonSet(Func):
    """``field`` with the keys of ``values`` set, merged by the database: no read of the row
    before its update (``stage_advanced`` and ``completed`` add a stage's seconds to ``timings``)."""

    output_field = JSONField()

    def __init__(self, field: str, values: dict[str, Any]) -> None:
        super().__init__(F(field))
        self.values = json.dumps(values)

    def as_sqlite(self, compiler: Any, connection: Any, **extra: Any) -> tuple[str, tuple[Any, ...]]:
        sql, params = compiler.compile(self.source_expressions[0])
        return f"json_patch(COALESCE({sql}, '{{}}'), %s)", (*params, self.values)

    def as_postgresql(self, compiler: Any, connection: Any, **extra: Any) -> tuple[str, tuple[Any, ...]]:
        sql, params = compiler.compile(self.source_expressions[0])
        return f"(COALESCE({sql}, '{{}}'::jsonb) || %s::jsonb)", (*params, self.values)

    def as_sql(self, compiler: Any, connection: Any, *args: Any, **extra: Any) -> Any:
        raise NotSupportedError(f"timings are merged by SQLite and PostgreSQL only, not {connection.vendor}")


def _now_if_unset(field: str) -> Coalesce:
    return Coalesce(F(field), Value(timezone.now(), output_field=DateTimeField()))


# --- upload --------------------------------------------------------------------------------------


def created(
    *, owner: Any, original_name: str, size: int, declared_content_type: str, source_key: Callable[[Any], str]
) -> MediaItem:
    """A new Pending item with an open upload (its state is the model's defaults), and the first
    line of its history. ``source_key(item_id)`` names where its bytes will be stored."""
    item = MediaItem(owner=owner, original_name=original_name, size=size)
    item.declared_content_type = declared_content_type
    item.source_key = source_key(item.pk)
    with transaction.atomic():
        item.save()
        StatusEvent.objects.create(item=item, status=item.status, message="Created")
    return item


def upload_finished(
    *, item_id: Any, kind: str = "", content_type: str = "", info: dict[str, Any] | None = None
) -> bool:
    """The last byte is stored and its type checked; from now on no byte may arrive."""
    changes: dict[str, Any] = {"upload_finished_at": timezone.now()}
    if kind:
        changes["kind"] = kind
    if content_type:
        changes["detected_content_type"] = content_type
    if info:
        changes["media_info"] = info
    where = Q(status=PENDING, upload_finished_at__isnull=True)
    return _apply(item_id, where, changes, message="Upload finished") is not None


def queued(*, item_id: Any, message: str = "Queued", send: bool = True) -> str | None:
    """Queue processing once: the entry task's id is saved, then the task is sent after commit
    (``send=False``: the caller runs it itself, as ``manage.py process`` does, in process).
    Returns that id, or None if the item was not waiting to be queued (already queued, say)."""
    task_id = str(uuid.uuid4())
    where = Q(status=PENDING, upload_finished_at__isnull=False, queued_at__isnull=True)
    item = _apply(
        item_id,
        where,
        {"queued_at": timezone.now(), "task_id": task_id},
        message=message,
        after_commit=(lambda it: jobs.send(jobs.PROCESS_TASK, it.pk, task_id=task_id)) if send else None,
    )
    return task_id if item is not None else None


def finish_upload_and_queue(
    *, item_id: Any, kind: str = "", content_type: str = "", info: dict[str, Any] | None = None
) -> bool:
    """Upload finished and queued, in one transaction: of two concurrent completes one wins."""
    with transaction.atomic():
        if not upload_finished(item_id=item_id, kind=kind, content_type=content_type, info=info):
            return False
        return queued(item_id=item_id) is not None


# --- processing ----------------------------------------------------------------------------------


def chain_started(*, item_id: Any, entry_task_id: str, first_task_id: str, detected: dict[str, Any]) -> bool:
    """The entry task, delivered under the id the item was queued with, hands over to its chain.

    A second delivery of the entry task (or an old one the watchdog replaced) does not match the
    saved id and starts nothing: one chain per run. Watchers hear of it only when the entry task
    learnt something they see (the kind): a new task id alone changes nothing they are shown.
    """
    where = Q(status=PENDING, queued_at__isnull=False, task_id=entry_task_id)
    changes = {"task_id": first_task_id, **detected}
    return _apply(item_id, where, changes, history=False, announce=bool(detected)) is not None


def stage_started(
    *,
    item_id: Any,
    stage: str,
    task_id: str,
    progress: int,
    entry_task_id: str | None = None,
    detected: dict[str, Any] | None = None,
) -> int | None:
    """A stage task begins: Processing at ``stage``. Returns the delivery number of this stage
    (counted in the database, so a delivery whose worker was SIGKILLed still counts), or None
    when the item is final (cancelled, failed, completed) or gone: the stage must not run.
    ``entry_task_id``: the entry task runs the stages itself (a fused kind), and it applies only
    while the item is still queued (or processing) under that very id, as ``chain_started``
    would: a delivery the watchdog replaced meanwhile starts nothing; ``detected`` is then what
    it learnt of the item (kind, type, streams), saved by this same write."""
    now = timezone.now()
    changes = {
        "attempts": Case(When(Q(status=PROCESSING, stage=stage), then=F("attempts") + 1), default=Value(1)),
        "status": PROCESSING,
        "stage": stage,
        "progress": Greatest(F("progress"), Value(min(progress, 99))),
        "task_id": task_id,
        "eta_seconds": None,
        "queued_at": None,
        "waiting_since": None,
        "started_at": Coalesce(F("started_at"), Value(now, output_field=DateTimeField())),
        "finished_at": None,
        **(detected or {}),
    }
    with transaction.atomic():
        # The message needs the attempt number, known only after the update: written below.
        where = QUEUED | Q(status=PROCESSING)
        if entry_task_id is not None:
            where &= Q(task_id=entry_task_id)
        item = _apply(item_id, where, changes, history=False)
        if item is None:
            return None
        # It left its line: those behind it moved up (in this transaction: one write lock).
        line_moved(kind=item.kind)
        attempt = item.attempts
        StatusEvent.objects.create(
            item=item,
            status=item.status,
            stage=stage,
            progress=item.progress,
            attempt=attempt,
            message=f"{stage} started" + (f" (attempt {attempt})" if attempt > 1 else ""),
        )
    return attempt


def stage_finished(
    *,
    item_id: Any,
    stage: str,
    progress: int,
    seconds: float | None = None,
    peak_child_rss: int = 0,
) -> bool:
    """A stage's result is committed: progress moves to its end. False if the item was cancelled
    (or finished) meanwhile: the chain must stop."""
    changes: dict[str, Any] = {
        "progress": Greatest(F("progress"), Value(min(progress, 99))),
        "peak_child_rss": Greatest(F("peak_child_rss"), Value(peak_child_rss)),
        # Its next stage is queued now (or the chain's last link): it waits for a worker.
        "waiting_since": timezone.now(),
    }
    if seconds is not None:
        changes["timings"] = _JsonSet("timings", {stage: round(seconds, 3)})
    message = "" if seconds is not None else f"{stage} skipped: already done"
    item = _apply(
        item_id,
        Q(status=PROCESSING, stage=stage),
        changes,
        message=message,
        history=seconds is None,
    )
    return item is not None


def stage_advanced(
    *,
    item_id: Any,
    stage: str,
    progress: int,
    seconds: float | None,
    peak_child_rss: int,
    next_stage: str,
    task_id: str,
    next_progress: int,
    passed: Sequence[tuple[str, float | None]] = (),
) -> int | None:
    """``stage_finished`` then ``stage_started`` of the next stage, as one write: the two stages
    run one after the other in one task (a fused chain), so no worker is waited for between them.
    Same rows as the two would write (a skipped stage's line, then "<next> started"), one
    broadcast. ``passed``: quick stages (name, seconds) run in between, started and finished
    within this write, with their rows and timings as if each had been written. Returns the next
    stage's delivery number (1: the item moved to a new stage), or None if the item was
    cancelled or finished meanwhile: the task must stop."""
    with transaction.atomic():
        skipped_attempts = 0
        if seconds is None:  # its history line names the delivery that found it done
            found = MediaItem.objects.filter(pk=item_id, status=PROCESSING, stage=stage).values("attempts").first()
            if found is None:
                return None
            skipped_attempts = found["attempts"]
        changes: dict[str, Any] = {
            "attempts": 1,
            "stage": next_stage,
            "progress": Greatest(F("progress"), Value(min(max(progress, next_progress), 99))),
            "peak_child_rss": Greatest(F("peak_child_rss"), Value(peak_child_rss)),
            "task_id": task_id,
            "eta_seconds": None,
            "waiting_since": None,
        }
        timings = {st: round(sec, 3) for st, sec in ((stage, seconds), *passed) if sec is not None}
        if timings:
            changes["timings"] = _JsonSet("timings", timings)
        item = _apply(item_id, Q(status=PROCESSING, stage=stage), changes, history=False)
        if item is None:  # cancelled or finished meanwhile
            return None
        rows = []
        if seconds is None:
            rows.append((stage, skipped_attempts, f"{stage} skipped: already done"))
        for st, sec in passed:
            rows.append((st, 1, f"{st} started"))
            if sec is None:
                rows.append((st, 1, f"{st} skipped: already done"))
        rows.append((next_stage, 1, f"{next_stage} started"))
        StatusEvent.objects.bulk_create(
            StatusEvent(item=item, status=item.status, stage=st, progress=item.progress, attempt=n, message=m)
            for st, n, m in rows
        )
    return 1


_last_progress: dict[str, float] = {}


def progressed(*, item_id: Any, progress: int, eta_seconds: float | None = None) -> bool:
    """Progress within a stage, throttled to MEDIA_PROGRESS_PER_SECOND saves+broadcasts per item;
    never backwards, never 100 (that is Completed)."""
    key = str(item_id)
    now = time.monotonic()
    if now - _last_progress.get(key, 0.0) < 1.0 / settings.MEDIA_PROGRESS_PER_SECOND:
        return False
    _last_progress[key] = now
    progress = min(int(progress), 99)
    where = Q(status=PROCESSING, progress__lt=progress)
    return _apply(item_id, where, {"progress": progress, "eta_seconds": eta_seconds}, history=False) is not None


def completed(
    *,
    item_id: Any,
    stage: str = "",
    seconds: float | None = None,
    peak_child_rss: int = 0,
    passed: Sequence[tuple[str, float | None]] = (),
    progress: int = 99,
) -> bool:
    """The chain's last link: Completed, 100 %. Never over a cancel or a failure.
    ``stage``: the last stage ran in the same task (a fused chain) and is finished by this same
    write (its ``seconds`` and peak recorded as ``stage_finished`` would): it applies only while
    the item is Processing at that stage. ``passed``: quick stages (name, seconds) run after it,
    the last of the item's stages among them, started and finished within this write, with their
    history rows (at ``progress``, where the bar stood) and timings, as in ``stage_advanced``."""
    changes: dict[str, Any] = {
        "status": COMPLETED,
        "stage": "",
        "progress": 100,
        "eta_seconds": None,
        "waiting_since": None,
        "finished_at": timezone.now(),
    }
    if not stage:
        return _apply(item_id, Q(status=PROCESSING), changes, message="Completed") is not None
    changes["peak_child_rss"] = Greatest(F("peak_child_rss"), Value(peak_child_rss))
    timings = {st: round(sec, 3) for st, sec in ((stage, seconds), *passed) if sec is not None}
    if timings:
        changes["timings"] = _JsonSet("timings", timings)
    if not passed:
        return _apply(item_id, Q(status=PROCESSING, stage=stage), changes, message="Completed") is not None
    with transaction.atomic():
        item = _apply(item_id, Q(status=PROCESSING, stage=stage), changes, history=False)
        if item is None:  # cancelled or failed meanwhile
            return False
        rows = []
        for st, sec in passed:
            rows.append((PROCESSING, st, progress, 1, f"{st} started"))
            if sec is None:
                rows.append((PROCESSING, st, progress, 1, f"{st} skipped: already done"))
        rows.append((item.status, item.stage, item.progress, item.attempts, "Completed"))
        StatusEvent.objects.bulk_create(
            StatusEvent(item=item, status=status, stage=st, progress=pr, attempt=n, message=m)
            for status, st, pr, n, m in rows
        )
    return True


def failed(*, item_id: Any, error: ErrorReport, message: str = "", source_gone: bool = False) -> bool:
    """Failed with a reason a person can read. Never over a cancel, a completion or an earlier
    failure: the first reason stands. ``source_gone``: the upload's bytes were dropped."""
    changes: dict[str, Any] = {
        "status": FAILED,
        "error_code": error.code,
        "error_message": error.message,
        "error_detail": error.detail[-20000:],
        "eta_seconds": None,
        "queued_at": None,
        "waiting_since": None,
        "finished_at": timezone.now(),
    }
    if source_gone:
        changes["source_key"] = ""
    item = _apply(item_id, NOT_FINAL, changes, message=message or error.message, error_code=error.code)
    return item is not None


def cancelled(*, item_id: Any, message: str, code: str = "cancelled", deleted: bool = False) -> bool:
    """Stop a Pending or Processing item: Failed/cancelled, and after commit its current task is
    revoked with SIGKILL (its ffmpeg dies with it). ``deleted``: the item is being removed; its
    watchers are told so, and offered no retry.

    The row lock orders this against ``stage_started``: either the stage starts first, saves its
    task id and that id is the one killed, or the cancel commits first and the stage never runs.
    """
    with transaction.atomic():
        row = MediaItem.objects.select_for_update().filter(Q(pk=item_id) & NOT_FINAL).values("task_id").first()
        if row is None:
            return False
        task_id = row["task_id"]
        changes = {
            "status": FAILED,
            "error_code": code,
            "error_message": message,
            "error_detail": "",
            "eta_seconds": None,
            "queued_at": None,
            "waiting_since": None,
            "finished_at": timezone.now(),
        }
        item = _apply(
            item_id,
            NOT_FINAL,
            changes,
            message=message,
            error_code=code,
            after_commit=lambda _it: jobs.revoke(task_id),
            deleted=deleted,
        )
    logger.info("cancelled item=%s task=%s", item_id, task_id)
    return item is not None


def _reset(item_id: Any, from_statuses: Iterable[str], *, message: str, from_scratch: bool) -> bool:
    changes: dict[str, Any] = {
        "status": PENDING,
        "stage": "",
        "progress": 0,
        "attempts": 0,
        "error_code": "",
        "error_message": "",
        "error_detail": "",
        "eta_seconds": None,
        "task_id": "",
        "queued_at": None,
        "waiting_since": None,
        "finished_at": None,
        # An upload refused half-way has no finished time; a retry needs its bytes anyway.
        "upload_finished_at": _now_if_unset("upload_finished_at"),
    }
    if from_scratch:
        changes |= {"timings": {}, "started_at": None, "peak_child_rss": 0}
    return _apply(item_id, Q(status__in=tuple(from_statuses)), changes, message=message) is not None


def retried(*, item_id: Any, message: str = "Retry requested") -> bool:
    """A Failed item back to Pending and queued, resuming after its finished stages. Of two
    concurrent retries one applies: the other finds it Pending, and nothing is queued twice."""
    with transaction.atomic():
        if not _reset(item_id, (FAILED,), message=message, from_scratch=False):
            return False
        return queued(item_id=item_id) is not None


def reprocessed(*, item_id: Any, message: str) -> bool:
    """A finished item (Completed or Failed) queued again from scratch, stage timings forgotten."""
    with transaction.atomic():
        if not _reset(item_id, FINAL_STATUSES, message=message, from_scratch=True):
            return False
        return queued(item_id=item_id) is not None


def requeued(
    *,
    item_id: Any,
    seen_updated_at: datetime,
    reason: str,
    kill: Iterable[str] = (),
    send: Callable[[MediaItem, str], None] | None = None,
) -> str:
    """The watchdog's action on a stalled or lost item: queued again, or failed ``stalled`` once
    its stage had every attempt. Applies only if the item did not move since the watchdog looked
    (``seen_updated_at``): a late stage finish wins over a requeue, and the requeue then does
    nothing. The ``kill`` tasks (a hung stage) are revoked first, after commit; then
    ``send(item, task_id)`` queues the work (default: ``media.process``). Returns requeued,
    failed or moved."""
    kill = tuple(kill)
    with transaction.atomic():
        item = MediaItem.objects.select_for_update().filter(pk=item_id).first()
        if item is None or item.is_final or item.updated_at != seen_updated_at:
            return "moved"
        if item.status == PROCESSING and item.attempts >= settings.MEDIA_MAX_ATTEMPTS:
            report = ErrorReport(
                "stalled",
                "Processing stopped making progress and was given up after several attempts.",
                f"watchdog: {reason}; stage {item.stage} had {item.attempts} attempts",
            )
            failed(item_id=item_id, error=report)
            transaction.on_commit(lambda: jobs.revoke(kill))
            logger.warning("watchdog failed item=%s stage=%s: %s", item_id, item.stage, reason)
            return "failed"
        task_id = str(uuid.uuid4())
        resend = send or (lambda it, tid: jobs.send(jobs.PROCESS_TASK, it.pk, task_id=tid))
        where = NOT_FINAL & Q(updated_at=seen_updated_at)
        changes: dict[str, Any] = {"task_id": task_id}
        if item.status == PENDING:
            changes["queued_at"] = timezone.now()
        else:
            changes["waiting_since"] = timezone.now()  # its stage goes to the back of the line

        def after_commit(it: MediaItem) -> None:
            jobs.revoke(kill)  # the hung copy first, then the new one
            resend(it, task_id)

        applied = _apply(
            item_id, where, changes, message=f"Watchdog: {reason}; queued again", after_commit=after_commit
        )
    if applied is None:  # pragma: no cover - the row lock above makes this impossible
        return "moved"
    logger.warning("watchdog requeued item=%s stage=%s: %s", item_id, item.stage, reason)
    return "requeued"


def noted(*, item_id: Any, message: str) -> bool:
    """A line in the item's history (why it was queued, say) without a change of state."""
    return _apply(item_id, Q(), {}, message=message) is not None


def deleted(*, item: MediaItem) -> None:
    """The item's row is gone (deleted with its files): its watchers get a last event that says
    so, after commit, with nothing to retry. ``item`` is the row as it was last read."""
    item.event_seq += 1  # after every event the row sent; the row is gone, nothing is saved
    transaction.on_commit(lambda: broadcast(item, deleted=True))


# --- the line ------------------------------------------------------------------------------------

# Waiting items told their new place when their line moves: the first ones, whose place matters
# and changes most. The page says "10 or more ahead" beyond that, which stays true.
LINE_NOTIFY = 10
_last_line_notice: dict[str, float] = {}


def line_moved(*, kind: str) -> None:
    """An item of ``kind`` left its queue's line (its stage started): the item now first in line
    is told it is next, every time; the first LINE_NOTIFY are told their new place (and wait) at
    most once a second per queue and process, so a long line of quick steps (a camera roll's
    images) costs a few broadcasts a second, not ten per step. Called inside the transaction
    of the start that moved the line; they are told once it commits."""
    from media_app.selectors import _waiting_since, media_item_waiting, media_items_waiting_in

    queue = jobs.queue_for(kind)
    now = time.monotonic()
    told = 1
    if now - _last_line_notice.get(str(queue), 0.0) >= 1.0:
        _last_line_notice[str(queue)] = now
        told = LINE_NOTIFY
    try:
        # A new number for each, as for every event: a watcher drops a number it has seen. Not
        # ``updated_at``: the item itself did not move (the watchdog and the time left read it).
        # One statement: it picks the head of the line, numbers it and returns it. SKIP LOCKED
        # (PostgreSQL; SQLite has one write lock): a row another worker has locked is an item
        # starting right now, leaving the line; waiting for it while holding our own start's
        # row would deadlock two starts that each tell the other's item.
        head = media_items_waiting_in(queue).select_for_update(skip_locked=True).values("pk")[:told]
        with transaction.atomic():  # a savepoint: the start stands without its notice
            told_items = _update_returning(MediaItem.objects.filter(pk__in=head), {"event_seq": F("event_seq") + 1})
    except Exception:  # best effort, as every broadcast: the saved state is the truth
        logger.warning("line notice failed for queue %s", queue, exc_info=True)
        return
    # A row whose item left the line after the head was read (a start that committed meanwhile)
    # is numbered too, harmlessly; it is not told a place.
    told_items = sorted(
        (it for it in told_items if media_item_waiting(it) and _waiting_since(it) is not None),
        key=lambda it: (_waiting_since(it), str(it.pk)),
    )
    # They are the head of the line, in order (none can have joined ahead of them): their places
    # need no count each, a query over the whole line per item.
    positions = {item.pk: n for n, item in enumerate(told_items, 1)}
    transaction.on_commit(lambda: broadcast_many(told_items, positions=positions))
