"""The one way the web side and the lifecycle talk to Celery: queue names, send by name, revoke.

Work is always sent by task *name*, never by importing the task: web processes do not need the
worker's code paths (pipelines, ffmpeg) loaded, and a worker may be on another machine.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from enum import StrEnum
from typing import Any

logger = logging.getLogger("media_app.jobs")

PROCESS_TASK = "media.process"


class Queue(StrEnum):
    """Broker queues. Video encodes use every core they get, so they have a queue (and workers)
    of their own: images and audio never wait behind a long encode."""

    DEFAULT = "default"
    VIDEO = "video"


def queue_for(kind: str) -> Queue:
    return Queue.VIDEO if kind == "video" else Queue.DEFAULT


def send(task_name: str, item_id: Any, *, task_id: str, queue: Queue = Queue.DEFAULT, **options: Any) -> None:
    """Queue ``task_name(item_id)`` with a task id chosen (and saved) by the caller beforehand."""
    from celery import current_app

    current_app.send_task(task_name, args=[str(item_id)], task_id=task_id, queue=str(queue), **options)


def revoke(task_ids: str | Iterable[str]) -> None:
    """Revoke tasks; a running one has its pool process SIGKILLed (its ffmpeg dies with it:
    PDEATHSIG).

    SIGKILL rather than SIGTERM: a hung process may not act on SIGTERM, and Celery acknowledges a
    task it terminated on revoke, so it is not redelivered. Best effort: the saved state is the
    truth, and a stage that escapes the kill sees its item final at its next cancel check.
    """
    from celery import current_app

    ids = [task_ids] if isinstance(task_ids, str) else [t for t in task_ids if t]
    if not ids:
        return
    for task_id in ids:
        try:
            current_app.control.revoke(task_id, terminate=True, signal="SIGKILL")
        except Exception:  # a broker hiccup must not undo the saved state
            logger.warning("revoke failed task=%s", task_id, exc_info=True)
