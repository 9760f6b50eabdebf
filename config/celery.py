"""The Celery app: JSON only, late acks, one task at a time per process, bounded run time."""

from __future__ import annotations

import logging
import os
from typing import Any

from celery import Celery
from celery.fixups.django import DjangoFixup, DjangoWorkerFixup
from celery.signals import setup_logging
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from kombu import Queue

from media_app.jobs import Queue as MediaQueue

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")


class _WorkerFixup(DjangoWorkerFixup):
    """Celery's Django worker fix-up, except that a worker process keeps its database connection
    from one task to the next.

    Celery's closes every connection before and after each task (``conn.close()``, whatever
    ``CONN_MAX_AGE`` says): each task connected again, 0.65 ms of CPU on SQLite, ~5 ms and a new
    server process on PostgreSQL (issue 17: a small image is six tasks). Here a task's start and
    end do what Django does at a request's: close only a connection that is unusable (an error
    since the last commit that a ``SELECT 1`` confirms, autocommit left off) or older than
    ``WORKER_DB_CONN_MAX_AGE``. With health checks on, a connection the server dropped between
    tasks (a PostgreSQL restart, an idle timeout) is found dead at the task's first query and
    replaced, so the task does not fail.

    Only worker processes get this: ``install`` runs at ``worker_init``, in the worker's main
    process before the pool forks. The web keeps ``CONN_MAX_AGE`` 0: under ASGI each request's
    synchronous code runs in a thread of its own, and a connection kept per thread outlives
    the request (Django advises against persistent connections in async mode). A pool process
    still drops what it inherited from the main process when it starts (``_close_database``).
    """

    def install(self) -> _WorkerFixup:
        for alias in self._db.connections:
            # The same dict every connection wrapper of this alias reads when it connects.
            self._db.connections.settings[alias].update(
                CONN_MAX_AGE=settings.WORKER_DB_CONN_MAX_AGE, CONN_HEALTH_CHECKS=True
            )
        super().install()
        self._close_database()  # the main process's own (it forks the pool next): closed, as before
        return self

    def close_database(self, **kwargs: Any) -> None:
        for conn in self._db.connections.all(initialized_only=True):
            try:
                conn.close_if_unusable_or_obsolete()
            except self.interface_errors:
                pass
            except self.DatabaseError as exc:  # as Celery's: a connection already gone is no error
                if "closed" not in str(exc) and "not connected" not in str(exc):
                    raise


class _Fixup(DjangoFixup):
    @property
    def worker_fixup(self) -> DjangoWorkerFixup:
        if self._worker_fixup is None:
            self._worker_fixup = _WorkerFixup(self.app)
        return self._worker_fixup

    @worker_fixup.setter
    def worker_fixup(self, value: DjangoWorkerFixup) -> None:
        self._worker_fixup = value


def django_fixup(app: Celery) -> DjangoFixup:
    """Celery's Django fix-up (``celery.fixups.django:fixup``) with the worker part above."""
    return _Fixup(app).install()


app = Celery("cpc_media", fixups=["config.celery:django_fixup"])
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
