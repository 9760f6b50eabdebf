"""Input serializers (validation only: the services do the work) and output shapes for the schema."""

from __future__ import annotations

from typing import Any

from django.core.validators import ProhibitNullCharactersValidator
from rest_framework import serializers

from media_app.models import MediaKind, MediaStatus


class DisplayNameField(serializers.CharField):
    """Any text is accepted as a name, NUL included: the service cleans it for display."""

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("trim_whitespace", False)
        super().__init__(**kwargs)
        self.validators = [v for v in self.validators if not isinstance(v, ProhibitNullCharactersValidator)]


class MediaCreateInput(serializers.Serializer):
    file_name = DisplayNameField(max_length=4096)
    size = serializers.IntegerField(min_value=1, help_text="Exact size of the file in bytes.")
    content_type = DisplayNameField(max_length=255, required=False, allow_blank=True, default="")


class MediaListFilter(serializers.Serializer):
    status = serializers.ChoiceField(choices=MediaStatus.choices, required=False)
    kind = serializers.ChoiceField(choices=MediaKind.choices, required=False)


# --- output shapes (documentation for the OpenAPI schema) ------------------------------------


class ErrorDetailOutput(serializers.Serializer):
    code = serializers.CharField()
    message = serializers.CharField()


class ErrorOutput(serializers.Serializer):
    error = ErrorDetailOutput()


class OutputFileOutput(serializers.Serializer):
    role = serializers.CharField()
    key = serializers.CharField()
    content_type = serializers.CharField()
    codec = serializers.CharField()
    width = serializers.IntegerField(allow_null=True)
    height = serializers.IntegerField(allow_null=True)
    duration = serializers.FloatField(allow_null=True)
    bytes = serializers.IntegerField()
    url = serializers.URLField()
    url_expires_at = serializers.DateTimeField()


class UploadTargetOutput(serializers.Serializer):
    method = serializers.CharField()
    url = serializers.URLField(help_text="Presigned PUT URL: S3's own with S3 storage, ours otherwise.")
    expires_at = serializers.DateTimeField()
    size = serializers.IntegerField()
    tus_url = serializers.URLField(help_text="tus 1.0 upload URL of this item (HEAD, PATCH, DELETE).")
    complete_url = serializers.URLField()


class MediaItemOutput(serializers.Serializer):
    id = serializers.UUIDField()
    seq = serializers.IntegerField()
    file_name = serializers.CharField()
    kind = serializers.CharField()
    status = serializers.ChoiceField(choices=MediaStatus.choices)
    stage = serializers.CharField()
    progress = serializers.IntegerField()
    attempts = serializers.IntegerField()
    error = ErrorDetailOutput(allow_null=True)
    size = serializers.IntegerField()
    created_at = serializers.DateTimeField()
    started_at = serializers.DateTimeField(allow_null=True)
    finished_at = serializers.DateTimeField(allow_null=True)
    outputs = OutputFileOutput(many=True, required=False)


class MediaCreatedOutput(MediaItemOutput):
    upload = UploadTargetOutput()
