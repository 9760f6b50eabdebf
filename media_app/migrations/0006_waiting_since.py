"""An item between stages says so: it waits for a worker of its next stage's queue."""

from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [("media_app", "0005_lifecycle_fields")]

    operations = [
        migrations.AddField(
            model_name="mediaitem", name="waiting_since", field=models.DateTimeField(blank=True, null=True)
        ),
    ]
