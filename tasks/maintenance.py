"""Recurring jobs run by celery beat (schedules in django-celery-beat, made by a migration).

The watchdog is the part that needs care. Celery on Redis loses work in two ways the chain
cannot see: a worker killed as a whole leaves its task unacknowledged until the visibility
timeout (over an hour), and a Redis restart without persistence drops every queued message.
Either way an item sits in Processing (or Pending with a task id) with nothing to run it. The
watchdog asks the workers what they hold (control API, short timeout) and reads the broker's
queues and its unacknowledged set; an item found nowhere for WATCHDOG_LOST_SECONDS, or held
but silent for WATCHDOG_STALL_SECONDS, is queued again (or failed ``stalled`` after its last
attempt). Redelivering an old message is harmless: stages skip finished work, outputs are
replaced, not added, and every stage stops on a final item.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import shutil
import time
from base64 import b64decode
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from celery import chain, current_app, shared_task
from django.conf import settings
from django.core.files.storage import default_storage
from django.db.models import Q
from django.utils import timezone
from kombu.utils import json as kombu_json

from media_app import jobs, lifecycle
from media_app.jobs import PROCESS_TASK
from media_app.models import MediaItem, MediaStatus
from media_app.ops import backup_write
from media_app.services import storage_delete_tree
from media_app.uploads import uploads_expire
from tasks import bindings, workspace
from tasks.stages import chain_links

logger = logging.getLogger("tasks.maintenance")

# Tasks whose first argument is an item id: the ones that make up an item's processing.
_ITEM_TASK = re.compile(r"^media\.(process|finish|stage\.\w+)$")
_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


@shared_task(name="media.maintenance.backup", time_limit=1800, soft_time_limit=1700)
def backup() -> str:
    """Daily: write today's backup file and drop those past retention."""
    return str(backup_write())


# Every periodic task names both limits: a hard limit alone below the global soft limit is
# refused when beat queues the task ("soft_time_limit must be less than or equal to time_limit").
@shared_task(name="media.maintenance.expire_uploads", time_limit=600, soft_time_limit=540)
def expire_uploads() -> int:
    """Remove uploads abandoned before their last byte arrived."""
    return uploads_expire()


@shared_task(name="media.maintenance.cleanup_work", time_limit=600, soft_time_limit=540)
def cleanup_work() -> list[str]:
    """Remove work directories nothing will read again."""
    return work_dirs_cleanup()


@shared_task(name="media.maintenance.watchdog", time_limit=120, soft_time_limit=100)
def watchdog() -> dict[str, list[str]]:
    """Requeue items that stalled or whose message was lost."""
    return watchdog_run()


# --- work files ----------------------------------------------------------------------------------


def work_dirs_cleanup(*, now: datetime | None = None) -> list[str]:
    """Remove the stage files (in storage, and this host's cache in WORK_ROOT) of items that are
    gone or Completed, and of items Failed long ago.

    A Failed item keeps its stage files for WORK_FAILED_KEEP_SECONDS, so Retry can resume at the
    failed stage instead of starting over; after that its storage is worth more. Every worker
    host runs this job's queue, so each host's cache is swept by the beat that reaches it.
    """
    now = now or timezone.now()
    keep_failed_after = now - timedelta(seconds=settings.WORK_FAILED_KEEP_SECONDS)

    def stale(item_id: str, orphan_since: float | None) -> bool:
        item = MediaItem.objects.filter(pk=item_id).values("status", "finished_at", "updated_at").first()
        if item is None:
            # A cache folder may be made a moment before its item row is visible here: only old
            # orphans go. Stored stage files exist only for items that ran a stage.
            return orphan_since is None or orphan_since < (now - timedelta(hours=1)).timestamp()
        if item["status"] == MediaStatus.COMPLETED:
            return True
        if item["status"] == MediaStatus.FAILED:
            return bool((item["finished_at"] or item["updated_at"]) < keep_failed_after)
        return False

    removed: set[str] = set()
    root = Path(settings.WORK_ROOT)
    for path in root.iterdir() if root.is_dir() else ():
        if path.is_dir() and _UUID.fullmatch(path.name) and stale(path.name, path.stat().st_mtime):
            shutil.rmtree(path, ignore_errors=True)
            removed.add(path.name)
    try:
        stored, _ = default_storage.listdir(workspace.WORK_PREFIX)
    except (FileNotFoundError, NotADirectoryError):
        stored = []
    for name in stored:
        if _UUID.fullmatch(name) and (name in removed or stale(name, None)):
            storage_delete_tree(workspace.stored_prefix(name))
            removed.add(name)
    if removed:
        logger.info("work files removed items=%d", len(removed))
    return sorted(removed)


# --- watchdog ------------------------------------------------------------------------------------


@dataclass
class Snapshot:
    """Where each item's work is right now, as far as workers and broker tell."""

    replied: bool = False  # at least one worker answered: "held by no worker" means something
    held: dict[str, list[str]] = field(default_factory=dict)  # item -> task ids active/reserved/scheduled
    queued: set[str] | None = None  # items with a message waiting in a queue; None: broker unreadable
    unacked: dict[str, list[str]] = field(default_factory=dict)  # item -> broker delivery tags


def take_snapshot(app: Any = None, *, timeout: float | None = None) -> Snapshot:
    """Ask the workers what they hold, then read the broker (in that order: a message moving from
    queue to worker is then seen in the unacknowledged set, not missed in between)."""
    app = app or current_app
    timeout = settings.WATCHDOG_INSPECT_TIMEOUT if timeout is None else timeout
    snap = Snapshot()
    try:
        names = _ping(app, timeout)
        if names:
            inspect = app.control.inspect(destination=names, timeout=timeout, limit=len(names))
            for method in (inspect.active, inspect.reserved, inspect.scheduled):
                for worker, tasks in (method() or {}).items():
                    snap.replied = snap.replied or worker in names
                    for task in tasks:
                        request = task.get("request", task)  # scheduled entries wrap the request
                        item = _item_of(request.get("name", ""), request.get("args"))
                        if item:
                            snap.held.setdefault(item, []).append(request.get("id", ""))
    except Exception:  # no answer is treated as "cannot judge", never as "lost"
        logger.warning("watchdog: the control API failed", exc_info=True)
        snap.replied = False
    snap.queued, snap.unacked = _broker_messages(app)
    return snap


class _EveryoneAnswered(Exception):
    """Ends the wait for ping replies: every worker that heard the ping has answered."""


def _ping(app: Any, timeout: float) -> list[str]:
    """The names of the workers that answer a ping, as soon as every worker that heard it did.

    Celery's ping collects replies until none came for ``timeout`` seconds: a full second per
    snapshot (two in a pass that settles), though workers answer in milliseconds. On Redis a
    broadcast is a PUBLISH, and Redis replies with the number of subscribers it reached: the
    workers whose connection is alive now (a dead worker's subscription ends with its socket,
    so it is not counted and not waited for). Once that many answered, no one else will. A
    worker that heard the ping but does not answer (hung, overloaded) still costs the full
    timeout and is left out, as before; so does any other broker, which gives no such count.
    """
    heard: list[int] = []  # receivers per PUBLISH of the ping (one topic: one number)
    names: list[str] = []

    def on_reply(reply: dict[str, Any]) -> None:
        names.extend(reply)  # {hostname: {"ok": "pong"}}
        if heard and len(names) >= sum(heard):
            raise _EveryoneAnswered

    with app.connection_for_write() as conn:
        channel = conn.default_channel
        mailbox = app.control.mailbox(conn)  # what app.control.ping uses, bound to this connection
        if conn.transport.driver_type == "redis":
            channel._put_fanout = _counting_put_fanout(channel, heard)
            mailbox.producer_pool = None  # publish on this channel, not a pooled producer's
        with contextlib.suppress(_EveryoneAnswered):
            mailbox.multi_call("ping", timeout=timeout, callback=on_reply, channel=channel)
    return names


def _counting_put_fanout(channel: Any, heard: list[int]) -> Callable[..., None]:
    """kombu's Redis ``Channel._put_fanout`` (one PUBLISH per topic), keeping what PUBLISH returns."""

    def put_fanout(exchange: str, message: Any, routing_key: str, **kwargs: Any) -> None:
        payload = kombu_json.dumps(message)
        with channel.conn_or_acquire() as client:
            for topic in channel._get_publish_topics(exchange, routing_key):
                heard.append(int(client.publish(topic, payload)))

    return put_fanout


def _item_of(name: str, args: Any) -> str | None:
    if not _ITEM_TASK.match(name or ""):
        return None
    if isinstance(args, list | tuple) and args:
        return str(args[0])
    found = _UUID.search(str(args or ""))
    return found.group(0) if found else None


def _broker_messages(app: Any) -> tuple[set[str] | None, dict[str, list[str]]]:
    """Items with messages in the Redis queues, and those held unacknowledged (by delivery tag).

    Reads kombu's Redis layout: a list per queue and priority step, and the ``unacked`` hash of
    messages delivered but not acknowledged. Other brokers: (None, {}), and the watchdog then
    handles hung tasks only.
    """
    queued: set[str] = set()
    unacked: dict[str, list[str]] = {}
    try:
        with app.connection_for_read() as conn:
            if conn.transport.driver_type != "redis":
                return None, {}
            channel = conn.default_channel
            prefix = channel.global_keyprefix  # LRANGE and HGETALL are not prefixed by kombu's client
            names = {q.name for q in app.conf.task_queues or ()} | {app.conf.task_default_queue}
            with channel.conn_or_acquire() as client:
                for name in names:
                    for step in channel.priority_steps:
                        key = f"{name}{channel.sep}{step}" if step else name
                        for raw in client.lrange(prefix + key, 0, -1):
                            item = _message_item(json.loads(raw))
                            if item:
                                queued.add(item)
                for tag, raw in client.hgetall(prefix + channel.unacked_key).items():
                    item = _message_item(json.loads(raw)[0])
                    if item:
                        unacked.setdefault(item, []).append(tag.decode() if isinstance(tag, bytes) else tag)
    except Exception:  # unreadable broker: judge by time only
        logger.warning("watchdog: the broker could not be read", exc_info=True)
        return None, {}
    return queued, unacked


def _message_item(message: dict[str, Any]) -> str | None:
    headers = message.get("headers") or {}
    args: Any = headers.get("argsrepr")
    if args is None:
        try:
            args = json.loads(b64decode(message.get("body", "")))[0]
        except (ValueError, TypeError, IndexError):
            return None
    return _item_of(headers.get("task", ""), args)


def _drop_unacked(app: Any, tags: list[str]) -> None:
    """Forget a dead worker's unacknowledged copy, so it is not redelivered after the visibility
    timeout on top of the new chain (it would be harmless, but it would repeat work)."""
    with app.connection_for_write() as conn:
        qos = conn.default_channel.qos
        for tag in tags:
            qos._remove_from_indices(tag).execute()


def resume_chain(item: MediaItem, task_id: str) -> None:
    """Queue the rest of an item's chain from its first unfinished stage.

    Starting there, rather than at the first stage, keeps the stalled stage's delivery count: a
    file that takes its whole worker down every time is stopped after MEDIA_MAX_ATTEMPTS instead
    of being resumed forever. An item with no stage yet starts over with ``media.process``.
    """
    stages = bindings.stages_for(item.kind) if item.kind in bindings.PIPELINES else []
    if item.status != MediaStatus.PROCESSING or not stages:
        jobs.send(PROCESS_TASK, item.pk, task_id=task_id)
        return
    start = next((n for n, stage in enumerate(stages) if not workspace.stage_done(item.pk, stage)), len(stages))
    links = chain_links(item)[start:]
    links[0] = links[0].clone().set(task_id=task_id)
    chain(*links).apply_async()


@dataclass(frozen=True)
class Verdict:
    item_id: str
    updated_at: datetime
    reason: str
    kill: tuple[str, ...] = ()  # task ids to terminate first
    drop: tuple[str, ...] = ()  # unacked delivery tags to forget


def _judge(item: MediaItem, snap: Snapshot, *, stall_before: datetime, lost_before: datetime) -> Verdict | None:
    key = str(item.pk)
    quiet = timezone.localtime(item.updated_at).strftime("%H:%M:%S")
    if key in snap.held:
        if item.updated_at <= stall_before:
            reason = f"no progress since {quiet} (over {settings.WATCHDOG_STALL_SECONDS} s)"
            return Verdict(key, item.updated_at, reason, kill=tuple(snap.held[key]))
        return None
    if snap.queued is not None and key in snap.queued:
        return None  # waiting for its turn
    if not snap.replied:
        return None  # no worker answered: nothing could run it now anyway
    if snap.queued is None:
        return None  # waiting or lost cannot be told apart; RabbitMQ redelivers a dead worker's tasks itself
    if item.updated_at <= lost_before:
        where = "held unacknowledged for a worker that is gone" if key in snap.unacked else "in no queue"
        reason = f"its task is on no worker and {where} (last change {quiet})"
        return Verdict(key, item.updated_at, reason, drop=tuple(snap.unacked.get(key, ())))
    return None


def watchdog_run(
    *, now: datetime | None = None, snapshot: Callable[[], Snapshot] | None = None, settle: float = 2.0
) -> dict[str, list[str]]:
    """One watchdog pass; returns item ids per outcome (requeued, failed, moved).

    An item judged lost is judged again after ``settle`` seconds on a fresh snapshot: a message
    between queue and worker is, for an instant, in neither place.
    """
    now = now or timezone.now()
    snapshot = snapshot or take_snapshot
    stall_before = now - timedelta(seconds=settings.WATCHDOG_STALL_SECONDS)
    lost_before = now - timedelta(seconds=settings.WATCHDOG_LOST_SECONDS)
    quiet_before = max(stall_before, lost_before)
    candidates = list(
        MediaItem.objects.filter(updated_at__lte=quiet_before).filter(
            Q(status=MediaStatus.PROCESSING) | Q(status=MediaStatus.PENDING, queued_at__isnull=False)
        )
    )
    outcome: dict[str, list[str]] = {"requeued": [], "failed": [], "moved": []}
    if not candidates:
        return outcome
    snap = snapshot()
    judge = {"stall_before": stall_before, "lost_before": lost_before}
    verdicts = [v for item in candidates if (v := _judge(item, snap, **judge))]
    if settle and any(not v.kill for v in verdicts):
        time.sleep(settle)
        again = snapshot()
        by_id = {str(i.pk): i for i in candidates}
        rejudged = [v if v.kill else _judge(by_id[v.item_id], again, **judge) for v in verdicts]
        verdicts = [v for v in rejudged if v]
    for v in verdicts:
        result = lifecycle.requeued(
            item_id=v.item_id, seen_updated_at=v.updated_at, reason=v.reason, kill=v.kill, send=resume_chain
        )
        outcome[result].append(v.item_id)
        if v.drop and result != "moved":
            try:
                _drop_unacked(current_app, list(v.drop))
            except Exception:  # a later redelivery is harmless, only wasteful
                logger.warning("watchdog: could not drop unacked copy of %s", v.item_id, exc_info=True)
    if verdicts:
        logger.warning("watchdog pass: %s", {k: len(v) for k, v in outcome.items()})
    return outcome
