"""The recurring jobs exist from the first `migrate`, so admins see and edit them at once."""

from datetime import time

from django.conf import settings
from django.db import migrations

# name, task, pattern, interval, at, description, expire_seconds (a beat message older than this
# is dropped: the next one comes soon enough)
JOBS = [
    (
        "Daily backup",
        "media.maintenance.backup",
        "daily",
        1,
        time(3, 30),
        "Writes today's backup of media items, outputs and history (BACKUP_DIR, kept BACKUP_RETENTION_DAYS days).",
        None,
    ),
    (
        "Expire abandoned uploads",
        "media.maintenance.expire_uploads",
        "hourly",
        1,
        time(0, 15),
        "Removes uploads idle for UPLOAD_EXPIRY_SECONDS before their last byte arrived.",
        3000,
    ),
    (
        "Clean up work files",
        "media.maintenance.cleanup_work",
        "hourly",
        1,
        time(0, 45),
        "Removes stage work files of deleted and Completed items, and of items Failed long ago.",
        3000,
    ),
    (
        "Watchdog",
        "media.maintenance.watchdog",
        "minutely",
        max(1, getattr(settings, "WATCHDOG_INTERVAL_SECONDS", 60) // 60),
        time(0, 0),
        "Requeues items that stalled or whose task was lost (worker killed, broker restarted).",
        50,
    ),
]


def create_jobs(apps, schema_editor):
    """Made with the task manager's own ``schedule_recurring_job``, as an operator's jobs are.

    It uses the current beat models, which this migration may: it depends on the last migration
    of django_celery_beat, and on none of ours that its tables would need."""
    from media_app.ops import schedule_recurring_job

    for name, task, pattern, interval, at, description, expire_seconds in JOBS:
        if apps.get_model("django_celery_beat", "PeriodicTask").objects.filter(name=name).exists():
            continue  # an operator's edits of an existing job are kept
        schedule_recurring_job(
            name, description, pattern, interval, task=task, at=at, expire_seconds=expire_seconds
        )


def remove_jobs(apps, schema_editor):
    PeriodicTask = apps.get_model("django_celery_beat", "PeriodicTask")
    PeriodicTask.objects.filter(name__in=[job[0] for job in JOBS]).delete()


class Migration(migrations.Migration):
    dependencies = [
        ("media_app", "0003_peak_child_rss"),
        ("django_celery_beat", "0019_alter_periodictasks_options"),
    ]

    operations = [migrations.RunPython(create_jobs, remove_jobs)]
