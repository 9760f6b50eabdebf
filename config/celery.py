"""The Celery app: JSON only, late acks, one task at a time per process, bounded run time."""

from __future__ import annotations

import logging
import os
from typing import Any

from celery import Celery
from celery.signals import setup_logging
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from kombu import Queue

from media_app.jobs import Queue as MediaQueue

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")

app = Celery("cpc_media")
app.config_from_object("django.conf:settings", namespace="CELERY")


@setup_logging.connect
def _django_logging(**_: Any) -> None:
    """Workers and beat log through Django's LOGGING (one format and level, LOG_LEVEL, for every
    process); connecting this signal stops Celery from installing handlers of its own."""
    import logging.config

    logging.config.dictConfig(settings.LOGGING)


def _check_visibility_timeout() -> None:
    """Refuse a broker whose redelivery would start a second copy of a task still running."""
    if settings.CELERY_VISIBILITY_TIMEOUT <= settings.CELERY_TASK_TIME_LIMIT:
        raise ImproperlyConfigured(
            f"CELERY_VISIBILITY_TIMEOUT ({settings.CELERY_VISIBILITY_TIMEOUT} s) must be longer than "
            f"CELERY_TASK_TIME_LIMIT ({settings.CELERY_TASK_TIME_LIMIT} s), or Redis hands a running "
            "task to a second worker."
        )


_check_visibility_timeout()


def _survive_a_closing_redis_channel() -> None:
    """Keep the worker alive when Redis goes away while it holds unacknowledged messages.

    On a lost broker connection Celery closes the connection, and kombu's Redis channel puts
    its unacknowledged messages back (``restore_unacked``). When the transport has already let
    go of its connection settings and the channel has no pool yet, kombu tries to build a pool
    from nothing and raises ``AttributeError``, which Celery treats as unrecoverable: the worker
    exits, and nothing is processed until someone restarts it (a CI run saw 13 of 20 items wait
    forever after a Redis restart). Those messages cannot be put back over a connection that does
    not exist anyway; they stay in Redis's unacknowledged set, which kombu restores after the
    visibility timeout, and the watchdog resumes their items long before.
    """
    from kombu.transport import redis as kombu_redis

    original = kombu_redis.QoS.restore_unacked
    if getattr(original, "survives_closing", False):
        return
    logger = logging.getLogger("config.celery")

    def restore_unacked(self: Any, client: Any = None) -> Any:
        channel = self.channel
        if client is None and channel._pool is None and getattr(channel.connection, "client", None) is None:
            logger.warning(
                "%d unacknowledged message(s) left in Redis: the broker connection closed first; "
                "the watchdog resumes their items",
                len(self._delivered),
            )
            self._delivered.clear()
            return None
        return original(self, client)

    restore_unacked.survives_closing = True  # type: ignore[attr-defined]
    kombu_redis.QoS.restore_unacked = restore_unacked


_survive_a_closing_redis_channel()

_TASK_EVENTS = os.environ.get("CELERY_TASK_EVENTS", "").lower() in ("1", "true", "yes", "on")

app.conf.update(
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    # A stage is idempotent (output keyed by item and stage, skipped when present), so it is
    # safe to acknowledge only after it ran and to requeue it when its worker dies.
    task_acks_late=True,
    task_reject_on_worker_lost=True,
    worker_prefetch_multiplier=1,
    task_time_limit=settings.CELERY_TASK_TIME_LIMIT,
    task_soft_time_limit=settings.CELERY_TASK_SOFT_TIME_LIMIT,
    task_track_started=True,
    result_expires=24 * 3600,
    broker_transport_options={"visibility_timeout": settings.CELERY_VISIBILITY_TIMEOUT},
    result_backend_transport_options={"visibility_timeout": settings.CELERY_VISIBILITY_TIMEOUT},
    broker_connection_retry_on_startup=True,
    task_default_queue=str(MediaQueue.DEFAULT),
    # Video encodes use both cores: they get their own queue, served one at a time, so images
    # and audio never wait behind a long encode.
    task_queues=tuple(Queue(str(q)) for q in MediaQueue),
    # Task events (for Flower and ``celery events``) are one more Redis publish per task state
    # change (sent, received, started, succeeded) of every task; off unless asked for
    # (CELERY_TASK_EVENTS=1, or ``celery worker -E``). The lifecycle's history and broadcasts
    # are how this project watches items.
    worker_send_task_events=_TASK_EVENTS,
    task_send_sent_event=_TASK_EVENTS,
    beat_scheduler="django_celery_beat.schedulers:DatabaseScheduler",
    task_always_eager=settings.CELERY_TASK_ALWAYS_EAGER,
    task_eager_propagates=False,
)
app.autodiscover_tasks(["tasks"], related_name="stages")
# The recurring jobs celery beat sends (schedules live in django-celery-beat).
app.autodiscover_tasks(["tasks"], related_name="maintenance")
