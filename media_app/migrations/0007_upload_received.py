"""A tus upload's offset and S3 multipart state live in the database, not on one web machine's disk."""

from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [("media_app", "0006_waiting_since")]

    operations = [
        migrations.AddField(model_name="mediaitem", name="upload_received", field=models.BigIntegerField(default=0)),
        migrations.AddField(
            model_name="mediaitem", name="upload_parts", field=models.JSONField(blank=True, default=dict)
        ),
    ]
