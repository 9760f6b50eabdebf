"""The recurring jobs, queued exactly as celery beat queues them, run on the real worker.

Beat reads the schedule from django-celery-beat's table (``DatabaseScheduler``), wraps each row in
a ``ModelEntry`` and sends it with the scheduler's own ``apply_async``, which hands the entry's
options to the task's ``apply_async``: the task's own limits meet the global ones there (a hard
limit below the global soft limit, with no soft limit of its own, is refused at that point, and
beat logs "Couldn't apply scheduled task …"). Calling the task function directly, as the other
maintenance tests do, goes around all of that; these tests do not.
"""

from __future__ import annotations

import importlib
import time
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
from celery.result import AsyncResult
from celery.signals import before_task_publish
from django.apps import apps
from django.conf import settings as django_settings
from django.core.files.base import ContentFile
from django.core.files.storage import default_storage
from django.utils import timezone
from django_celery_beat.models import PeriodicTask
from django_celery_beat.schedulers import DatabaseScheduler, ModelEntry

from config.celery import app as celery_app
from media_app.models import MediaItem
from media_app.uploads import UploadRefused, upload_create
from tests.conftest import wait_for

pytestmark = pytest.mark.postgres

# The schedule as the migration makes it: (name, task, schedule, description, expire seconds).
RECURRING = importlib.import_module("media_app.migrations.0004_recurring_jobs")
JOB_NAMES = [job[0] for job in RECURRING.JOBS]
MB = 1024 * 1024


@pytest.fixture
def schedule(transactional_db: None) -> dict[str, PeriodicTask]:
    """The PeriodicTask rows of the schedule. A transactional test empties every table when it
    ends, migration data too, so the rows are made again by the migration's own function (it
    gets or creates, so on a fresh database it changes nothing)."""
    RECURRING.create_jobs(apps, None)
    return {row.name: row for row in PeriodicTask.objects.filter(name__in=JOB_NAMES)}


@pytest.fixture
def published() -> Iterator[dict[str, dict[str, Any]]]:
    """The headers of every message this process publishes, by task id: what the worker gets."""
    seen: dict[str, dict[str, Any]] = {}

    def record(headers: dict[str, Any] | None = None, **_: Any) -> None:
        if headers:
            seen[headers["id"]] = dict(headers)

    before_task_publish.connect(record, weak=False)
    try:
        yield seen
    finally:
        before_task_publish.disconnect(record)


def beat_send(scheduler: DatabaseScheduler, row: PeriodicTask) -> AsyncResult:
    """Queue one row as beat does on its tick: a ModelEntry sent by the scheduler's apply_async
    (``advance=False``, as ``Scheduler.apply_entry`` calls it). A refusal raises SchedulingError
    here, where beat would only log it."""
    return scheduler.apply_async(ModelEntry(row, app=celery_app), advance=False)


@pytest.fixture
def scheduler() -> Iterator[DatabaseScheduler]:
    """Beat's scheduler, after beat's own start-up (``Beat.init_loader``): the task modules are
    imported, so an entry is sent through its task's ``apply_async`` (where the limits are
    checked), not by name."""
    celery_app.loader.init_worker()
    celery_app.finalize()
    sched = DatabaseScheduler(app=celery_app, lazy=True)
    try:
        yield sched
    finally:
        sched._finalize.cancel()  # nothing was reserved: no last-run times to write back at exit


def test_every_recurring_job_is_queued_as_beat_queues_it_and_runs_once_on_the_worker(
    celery_worker: Any, schedule: dict[str, PeriodicTask], scheduler: DatabaseScheduler, published: dict[str, Any]
) -> None:
    assert sorted(schedule) == sorted(JOB_NAMES)
    assert all(row.task in celery_app.tasks for row in schedule.values())
    started = time.monotonic()

    sent = {name: beat_send(scheduler, schedule[name]) for name in JOB_NAMES}

    hard_ceiling = django_settings.CELERY_TASK_TIME_LIMIT
    for name, result in sent.items():
        headers = published[result.id]
        assert headers["task"] == schedule[name].task
        assert headers.get("periodic_task_name") == name
        # What the worker will enforce: the message's limits, else the task's own (each falling
        # back to the global one): a soft limit (a clean error) before the hard one (a kill),
        # neither past the global ceiling.
        task = celery_app.tasks[schedule[name].task]
        sent_hard, sent_soft = headers.get("timelimit") or (None, None)
        hard, soft = sent_hard or task.time_limit, sent_soft or task.soft_time_limit
        assert hard and soft and soft < hard <= hard_ceiling, (name, hard, soft)
    for name, result in sent.items():
        wait_for(result.ready, timeout=120, what=f"{name!r} to run on the worker")
        assert result.successful(), f"{name}: {result.state}\n{result.traceback}"
    print(f"all {len(sent)} recurring jobs ran in {time.monotonic() - started:.1f} s")


def test_abandoned_uploads_expire_through_beat_and_stop_counting_against_the_limits(
    celery_worker: Any,
    schedule: dict[str, PeriodicTask],
    scheduler: DatabaseScheduler,
    make_user: Any,
    settings: Any,
) -> None:
    """Ten uploads started and left: they hold the user's unfinished slots and bytes until the
    hourly job removes them, with their partial bytes; then the user can start again."""
    settings.UPLOAD_QUOTA_BYTES = 60 * MB  # in this process, where create checks it
    user = make_user()
    left = [upload_create(owner=user, file_name=f"left-{n}.mp4", size=5 * MB) for n in range(10)]
    for item in left[:3]:  # a megabyte in, as a tus PATCH leaves it: in storage, counted
        default_storage.save(item.source_key, ContentFile(b"\0" * MB))
        MediaItem.objects.filter(pk=item.pk).update(upload_received=MB)
    with pytest.raises(UploadRefused) as refused:
        upload_create(owner=user, file_name="new.mp4", size=MB)
    assert refused.value.code == "too_many_uploads"

    # A day and an hour later: nothing more arrived.
    idle_since = timezone.now() - timedelta(seconds=django_settings.UPLOAD_EXPIRY_SECONDS + 3600)
    MediaItem.objects.filter(pk__in=[i.pk for i in left]).update(updated_at=idle_since)
    with pytest.raises(UploadRefused) as refused:
        upload_create(owner=user, file_name="big.mp4", size=15 * MB)
    assert refused.value.code == "quota_exceeded"  # their announced bytes still count

    result = beat_send(scheduler, schedule["Expire abandoned uploads"])
    wait_for(result.ready, timeout=120, what="the expiry job to run on the worker")

    assert result.successful(), result.traceback
    assert result.result >= 10
    assert not MediaItem.objects.filter(pk__in=[i.pk for i in left]).exists()
    assert not any(default_storage.exists(i.source_key) for i in left)
    again = [upload_create(owner=user, file_name=f"again-{n}.mp4", size=MB) for n in range(9)]
    big = upload_create(owner=user, file_name="big.mp4", size=15 * MB)
    assert len(again) == 9 and big.status == "Pending"
