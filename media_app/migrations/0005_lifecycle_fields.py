"""Explicit fields for what ``task_id`` used to mean: upload finished, queued."""

from django.db import migrations, models
from django.db.models import F, Q


def backfill(apps, schema_editor):
    MediaItem = apps.get_model("media_app", "MediaItem")
    # A non-empty task id, or any status past Pending, meant "the upload is finished".
    MediaItem.objects.filter(~Q(task_id="") | ~Q(status="Pending")).update(upload_finished_at=F("updated_at"))
    MediaItem.objects.filter(status="Pending").exclude(task_id="").update(queued_at=F("updated_at"))


class Migration(migrations.Migration):
    dependencies = [("media_app", "0004_recurring_jobs")]

    operations = [
        migrations.AddField(
            model_name="mediaitem", name="upload_finished_at", field=models.DateTimeField(blank=True, null=True)
        ),
        migrations.AddField(model_name="mediaitem", name="queued_at", field=models.DateTimeField(blank=True, null=True)),
        migrations.RunPython(backfill, migrations.RunPython.noop),
    ]
