"""What an upload is, what became of it, and everything that happened on the way."""

from __future__ import annotations

import uuid

from django.conf import settings
from django.db import models


class MediaKind(models.TextChoices):
    VIDEO = "video", "Video"
    AUDIO = "audio", "Audio"
    IMAGE = "image", "Image"


class MediaStatus(models.TextChoices):
    # These four words are the product's vocabulary: API, websocket, admin and page all use them.
    PENDING = "Pending", "Pending"
    PROCESSING = "Processing", "Processing"
    COMPLETED = "Completed", "Completed"
    FAILED = "Failed", "Failed"


FINAL_STATUSES = (MediaStatus.COMPLETED, MediaStatus.FAILED)


class MediaItem(models.Model):
    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    owner = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="media_items")
    # Shown to people only; never used as a path. The stored name is generated from the id.
    original_name = models.CharField(max_length=1024)
    source_key = models.CharField(max_length=512, blank=True)
    declared_content_type = models.CharField(max_length=255, blank=True)
    detected_content_type = models.CharField(max_length=255, blank=True)
    size = models.BigIntegerField(default=0, help_text="Bytes of the uploaded source.")
    kind = models.CharField(max_length=16, choices=MediaKind.choices, blank=True)

    status = models.CharField(max_length=16, choices=MediaStatus.choices, default=MediaStatus.PENDING, db_index=True)
    stage = models.CharField(max_length=32, blank=True)
    progress = models.PositiveSmallIntegerField(default=0)
    error_code = models.CharField(max_length=32, blank=True, db_index=True)
    error_message = models.TextField(blank=True)
    error_detail = models.TextField(blank=True, help_text="Technical detail for admins (e.g. ffmpeg output).")
    attempts = models.PositiveIntegerField(default=0, help_text="Deliveries of the current stage.")
    # Each broadcast carries the next number, so a watcher can tell a gap or a duplicate.
    event_seq = models.BigIntegerField(default=0)
    # The moment the last byte was stored and checked: from then on no byte may arrive.
    upload_finished_at = models.DateTimeField(null=True, blank=True)
    # A tus upload under way (upload bookkeeping, not item state; media_app/uploads.py writes it
    # under the upload's lock): the bytes committed so far, which is the Upload-Offset, and on S3
    # the multipart upload they are in (id, parts, tail object), so any web process can go on.
    upload_received = models.BigIntegerField(default=0)
    upload_parts = models.JSONField(default=dict, blank=True)
    # When the current run was queued (None while the upload is open and after a reset).
    queued_at = models.DateTimeField(null=True, blank=True)
    # Processing between stages: when the last stage finished, so its next one waits for a worker
    # of its queue since then. None while a stage runs (and in every other state).
    waiting_since = models.DateTimeField(null=True, blank=True)
    # Only for revoking: the task that runs (or was last sent for) this item right now.
    task_id = models.CharField(max_length=64, blank=True)
    duration = models.FloatField(null=True, blank=True, help_text="Seconds of audio/video in the source.")
    # Seconds left as estimated at ``updated_at`` from the encode speed measured so far.
    eta_seconds = models.FloatField(null=True, blank=True)
    media_info = models.JSONField(default=dict, blank=True)
    # Largest resident memory of any decoder/ffmpeg child so far (bytes), against Limits.memory_bytes.
    peak_child_rss = models.BigIntegerField(default=0)
    # Seconds spent in each finished stage, for the CLI summary, the admin and the benchmarks.
    timings = models.JSONField(default=dict, blank=True)

    created_at = models.DateTimeField(auto_now_add=True, db_index=True)
    updated_at = models.DateTimeField(auto_now=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ("-created_at",)
        indexes = [models.Index(fields=("owner", "-created_at"))]

    def __str__(self) -> str:
        return f"{self.original_name} ({self.status})"

    @property
    def is_final(self) -> bool:
        return self.status in FINAL_STATUSES

    @property
    def upload_open(self) -> bool:
        """Bytes may still arrive: Pending and the upload not yet finished."""
        return self.status == MediaStatus.PENDING and self.upload_finished_at is None

    @property
    def is_queued(self) -> bool:
        """Waiting in a queue for its first stage to start."""
        return self.status == MediaStatus.PENDING and self.queued_at is not None


class Rendition(models.Model):
    """One output file of an item: the WebM, an image format, the thumbnail, a DASH part."""

    item = models.ForeignKey(MediaItem, on_delete=models.CASCADE, related_name="renditions")
    role = models.CharField(max_length=32)
    storage_key = models.CharField(max_length=512)
    content_type = models.CharField(max_length=255)
    codec = models.CharField(max_length=64, blank=True)
    width = models.PositiveIntegerField(null=True, blank=True)
    height = models.PositiveIntegerField(null=True, blank=True)
    duration = models.FloatField(null=True, blank=True)
    bytes = models.BigIntegerField(default=0)
    # A ThumbHash (base64) of a picture output (the thumbnail, an image's WebP): the page paints
    # it until the picture loads.
    placeholder = models.CharField(max_length=64, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ("role", "storage_key")
        constraints = [models.UniqueConstraint(fields=("item", "storage_key"), name="rendition_unique_key")]

    def __str__(self) -> str:
        return f"{self.role}: {self.storage_key}"


class StatusEvent(models.Model):
    """Every transition (status or stage), so admins and users can see what happened and when."""

    item = models.ForeignKey(MediaItem, on_delete=models.CASCADE, related_name="events")
    created_at = models.DateTimeField(auto_now_add=True)
    status = models.CharField(max_length=16, choices=MediaStatus.choices)
    stage = models.CharField(max_length=32, blank=True)
    progress = models.PositiveSmallIntegerField(default=0)
    attempt = models.PositiveIntegerField(default=0)
    error_code = models.CharField(max_length=32, blank=True)
    message = models.TextField(blank=True)

    class Meta:
        ordering = ("created_at", "id")

    def __str__(self) -> str:
        return f"{self.created_at:%H:%M:%S} {self.status} {self.stage}"
