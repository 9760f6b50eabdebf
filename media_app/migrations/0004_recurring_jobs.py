"""The recurring jobs exist from the first `migrate`, so admins see and edit them at once."""

from django.conf import settings
from django.db import migrations

# name, task, schedule, description, expire_seconds (a beat message older than this is dropped)
JOBS = [
    (
        "Daily backup",
        "media.maintenance.backup",
        {"crontab": {"minute": "30", "hour": "3"}},
        "Writes today's backup of media items, outputs and history (BACKUP_DIR, kept BACKUP_RETENTION_DAYS days).",
        None,
    ),
    (
        "Expire abandoned uploads",
        "media.maintenance.expire_uploads",
        {"crontab": {"minute": "15", "hour": "*"}},
        "Removes uploads idle for UPLOAD_EXPIRY_SECONDS before their last byte arrived.",
        3000,
    ),
    (
        "Clean up work files",
        "media.maintenance.cleanup_work",
        {"crontab": {"minute": "45", "hour": "*"}},
        "Removes stage work directories of deleted and Completed items, and of items Failed long ago.",
        3000,
    ),
    (
        "Watchdog",
        "media.maintenance.watchdog",
        {"interval": {"every": getattr(settings, "WATCHDOG_INTERVAL_SECONDS", 60), "period": "seconds"}},
        "Requeues items that stalled or whose task was lost (worker killed, broker restarted).",
        50,
    ),
]


def create_jobs(apps, schema_editor):
    CrontabSchedule = apps.get_model("django_celery_beat", "CrontabSchedule")
    IntervalSchedule = apps.get_model("django_celery_beat", "IntervalSchedule")
    PeriodicTask = apps.get_model("django_celery_beat", "PeriodicTask")
    for name, task, schedule, description, expire_seconds in JOBS:
        if "crontab" in schedule:
            cron = {"day_of_week": "*", "day_of_month": "*", "month_of_year": "*", **schedule["crontab"]}
            found = CrontabSchedule.objects.filter(**cron, timezone="UTC").first()
            kwargs = {"crontab": found or CrontabSchedule.objects.create(**cron, timezone="UTC")}
        else:
            kwargs = {"interval": IntervalSchedule.objects.get_or_create(**schedule["interval"])[0]}
        PeriodicTask.objects.get_or_create(
            name=name,
            defaults={
                "task": task,
                "description": description,
                "queue": "default",
                "expire_seconds": expire_seconds,
                **kwargs,
            },
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
