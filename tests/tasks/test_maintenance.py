"""Recurring jobs: they exist after `migrate`, the backup restores, and the cleanups keep what Retry needs."""

from __future__ import annotations

import importlib
import json
import os
import sqlite3
import subprocess
import sys
from datetime import UTC, datetime, time, timedelta
from pathlib import Path
from typing import Any

import pytest
from django.conf import settings
from django.core.files.base import ContentFile
from django.core.files.storage import default_storage
from django.utils import timezone
from django_celery_beat.models import PeriodicTask

from config.celery import app as celery_app
from media_app.models import MediaItem, StatusEvent
from media_app.ops import OpsRefused, backup_path, create_processing_task, schedule_recurring_job
from media_app.services import ErrorReport, media_item_create, renditions_replace
from tasks import maintenance
from tests.env_plugin import ROOT
from tests.states import set_state

pytestmark = [pytest.mark.django_db, pytest.mark.postgres]


def _manage(*args: str, db: Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "DATABASE_URL": f"sqlite:///{db}",
        "DATA_DIR": str(db.parent / "data"),
        "MEDIA_ROOT": str(settings.MEDIA_ROOT),
    }
    return subprocess.run(
        [sys.executable, "manage.py", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=check,
        timeout=300,
    )


def _completed_item(owner: Any, name: str) -> MediaItem:
    item = media_item_create(owner=owner, original_name=name, size=3)
    default_storage.save(item.source_key, ContentFile(b"src"))
    key = f"outputs/{item.pk}/{name}.webp"
    default_storage.save(key, ContentFile(b"webp"))
    set_state(item_id=item.pk, status="Processing", stage="encode", extra={"kind": "image"})
    renditions_replace(
        item_id=item.pk, renditions=[{"role": "image_webp", "storage_key": key, "content_type": "image/webp"}]
    )
    set_state(item_id=item.pk, status="Completed", stage="", timing=("encode", 1.5))
    return item


def test_jobs_exist_after_migrate_and_the_backup_restores_into_an_empty_database(make_user, tmp_path, settings):
    settings.BACKUP_DIR = tmp_path / "backups"
    alice, bob = make_user("alice"), make_user("bob")
    done = _completed_item(alice, "photo.jpg")
    failed = media_item_create(owner=bob, original_name="clip.mp4", size=9)
    set_state(
        item_id=failed.pk,
        status="Failed",
        error=ErrorReport("invalid_input", "The file is damaged.", "moov atom not found"),
    )

    path = Path(maintenance.backup())  # what beat runs daily

    assert path == backup_path(timezone.now().date(), settings.BACKUP_DIR)
    assert path.stat().st_mode & 0o077 == 0  # holds password hashes: owner-only
    data = json.loads(path.read_text())
    assert {e["key"] for e in data["manifest"]} >= {
        done.source_key,
        *done.renditions.values_list("storage_key", flat=True),
    }

    second = tmp_path / "empty.sqlite3"
    _manage("migrate", "--noinput", db=second)
    with sqlite3.connect(second) as db:
        jobs = dict(db.execute("select task, enabled from django_celery_beat_periodictask"))
    for task in ("backup", "expire_uploads", "cleanup_work", "watchdog"):
        assert jobs.get(f"media.maintenance.{task}") == 1, jobs

    out = _manage("restore_backup", str(path), db=second).stdout
    assert "restored 2 items, 1 outputs" in out

    with sqlite3.connect(second) as db:
        rows = db.execute(
            "select i.id, i.status, i.error_code, i.error_detail, i.created_at, u.username from media_app_mediaitem i "
            "join auth_user u on u.id = i.owner_id order by u.username"
        ).fetchall()
        events = db.execute("select count(*) from media_app_statusevent").fetchone()[0]
        keys = [r[0] for r in db.execute("select storage_key from media_app_rendition")]
    assert [(r[1], r[2], r[5]) for r in rows] == [("Completed", "", "alice"), ("Failed", "invalid_input", "bob")]
    assert rows[1][3] == "moov atom not found"
    assert rows[0][4].startswith(done.created_at.strftime("%Y-%m-%d %H:%M:%S"))  # history keeps its times
    assert events == StatusEvent.objects.count()
    assert keys == list(done.renditions.values_list("storage_key", flat=True))

    again = _manage("restore_backup", str(path), db=second, check=False)
    assert again.returncode != 0 and "already has media items" in again.stderr


def test_one_backup_file_per_day_and_old_ones_are_pruned(make_user, tmp_path, settings):
    settings.BACKUP_DIR = tmp_path
    settings.BACKUP_RETENTION_DAYS = 3
    _completed_item(make_user(), "a.jpg")
    old = tmp_path / "media-2020-01-01.json"
    old.write_text("{}")
    unrelated = tmp_path / "notes.txt"
    unrelated.write_text("keep me")
    start = datetime(2030, 5, 1, 3, 30, tzinfo=UTC)

    written = [maintenance.backup_write(now=start + timedelta(days=n)) for n in range(5)]
    maintenance.backup_write(now=start + timedelta(days=4, hours=5))  # a second run the same day

    assert sorted(p.name for p in tmp_path.glob("media-*.json")) == [p.name for p in written[2:]]
    assert unrelated.exists() and not old.exists()
    assert not list(tmp_path.glob(".*.part"))


def test_cleanup_removes_work_files_of_gone_and_completed_items_and_keeps_recent_failures(
    make_user, tmp_path, settings
):
    settings.WORK_ROOT = tmp_path
    settings.WORK_FAILED_KEEP_SECONDS = 3600
    owner = make_user()

    def item_in(status: str, finished_ago: timedelta | None = None) -> str:
        item = media_item_create(owner=owner, original_name=f"{status}.mp4")
        extra = {"finished_at": timezone.now() - finished_ago} if finished_ago else None
        set_state(item_id=item.pk, status=status, extra=extra)
        (tmp_path / str(item.pk) / "demux").mkdir(parents=True)
        return str(item.pk)

    processing, done = item_in("Processing"), item_in("Completed")
    failed_recent, failed_old = item_in("Failed", timedelta(minutes=5)), item_in("Failed", timedelta(hours=2))
    orphan = tmp_path / "0b7e8a32-3f0e-4d7c-9c59-5e7d1e0c2a11"
    (orphan / "encode").mkdir(parents=True)
    os.utime(orphan, (0, 0))
    fresh_orphan = tmp_path / "1b7e8a32-3f0e-4d7c-9c59-5e7d1e0c2a11"
    fresh_orphan.mkdir()

    removed = maintenance.cleanup_work()

    assert sorted(removed) == sorted([done, failed_old, orphan.name])
    assert {p.name for p in tmp_path.iterdir()} == {processing, failed_recent, fresh_orphan.name}


def test_expire_uploads_job_removes_abandoned_uploads(make_user, settings):
    item = media_item_create(owner=make_user(), original_name="half.mp4", size=100)
    MediaItem.objects.filter(pk=item.pk).update(updated_at=timezone.now() - timedelta(days=2))

    assert maintenance.expire_uploads() == 1
    assert not MediaItem.objects.filter(pk=item.pk).exists()


def test_schedule_recurring_job_daily_weekly_and_monthly():
    daily = schedule_recurring_job("Nightly backup", "db rows", "daily", task="media.maintenance.backup", at=time(2, 5))
    assert (daily.crontab.hour, daily.crontab.minute, daily.crontab.day_of_month) == ("2", "5", "*")
    weekly = schedule_recurring_job("media.maintenance.cleanup_work", "work dirs", "weekly", weekday=0)
    assert weekly.task == "media.maintenance.cleanup_work" and weekly.crontab.day_of_week == "0"
    monthly = schedule_recurring_job("Quarterly", "every 3 months", "monthly", 3, task="media.maintenance.backup")
    assert (monthly.crontab.day_of_month, monthly.crontab.month_of_year) == ("1", "*/3")
    fortnightly = schedule_recurring_job("Fortnightly", "", "weekly", 2, task="media.maintenance.backup", weekday=3)
    assert (fortnightly.interval.every, fortnightly.interval.period, fortnightly.crontab) == (14, "days", None)

    assert fortnightly.start_time > timezone.now() and fortnightly.start_time.strftime("%w %H:%M") == "3 03:00"

    again = schedule_recurring_job("Nightly backup", "db rows, later", "daily", task="media.maintenance.backup")
    assert again.pk == daily.pk and again.description == "db rows, later"
    assert PeriodicTask.objects.filter(name="Nightly backup").count() == 1
    with pytest.raises(ValueError, match="pattern"):
        schedule_recurring_job("x", "", "yearly")


def test_schedule_recurring_job_every_few_minutes_or_hours_and_the_schedule_is_made_with_it():
    every_5 = schedule_recurring_job("Sweep", "", "minutely", 5, task="media.maintenance.watchdog", expire_seconds=60)
    assert (every_5.interval.every, every_5.interval.period, every_5.expire_seconds) == (300, "seconds", 60)
    six_hourly = schedule_recurring_job("Tidy", "", "hourly", 6, task="media.maintenance.cleanup_work", at=time(0, 7))
    assert (six_hourly.crontab.minute, six_hourly.crontab.hour) == ("7", "*/6")
    with pytest.raises(ValueError, match="out of range"):
        schedule_recurring_job("Bad", "", "hourly", 24, task="media.maintenance.backup")
    # The product's own jobs (migration 0004) are what schedule_recurring_job makes of its table.
    from django.apps import apps

    recurring = importlib.import_module("media_app.migrations.0004_recurring_jobs")
    PeriodicTask.objects.filter(name__in=[job[0] for job in recurring.JOBS]).delete()
    recurring.create_jobs(apps, None)
    jobs = {t.name: t for t in PeriodicTask.objects.filter(name__in=[job[0] for job in recurring.JOBS])}
    assert str(jobs["Daily backup"].crontab).startswith("30 3 * * *")
    assert str(jobs["Expire abandoned uploads"].crontab).startswith("15 * * * *")
    assert (jobs["Watchdog"].interval.every, jobs["Watchdog"].interval.period) == (60, "seconds")
    assert {t.task for t in jobs.values()} == {job[1] for job in recurring.JOBS}


def test_create_processing_task_queues_once_and_notes_why(make_user, monkeypatch, django_capture_on_commit_callbacks):
    sent: list[Any] = []
    monkeypatch.setattr(celery_app, "send_task", lambda *a, **k: sent.append((a, k)))
    item = media_item_create(owner=make_user(), original_name="talk.mp3", size=3)
    default_storage.save(item.source_key, ContentFile(b"mp3"))

    with django_capture_on_commit_callbacks(execute=True):
        task = create_processing_task(item.pk, "Transcode talk", "for the conference page")
    with pytest.raises(OpsRefused, match="already queued"):
        create_processing_task(item.pk, "Again", "")

    assert (task.media_id, task.title, task.status) == (str(item.pk), "Transcode talk", "Pending")
    assert [k["task_id"] for _, k in sent] == [task.task_id]
    assert StatusEvent.objects.filter(item=item, message="Task: Transcode talk - for the conference page").exists()
