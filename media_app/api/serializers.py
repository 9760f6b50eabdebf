"""Input serializers (validation only: the services do the work) and output shapes for the schema."""

from __future__ import annotations

from typing import Any

from django.core.validators import ProhibitNullCharactersValidator
from rest_framework import serializers

from media_app.models import MediaKind, MediaStatus


class StrictCharField(serializers.CharField):
    """Text only: DRF would turn ``0`` or ``1.5`` into a string, which the schema (and a typed
    client) calls an error, so a number here is refused as the schema says."""

    default_error_messages = {"invalid": "Must be a string."}

    def to_internal_value(self, data: Any) -> str:
        if not isinstance(data, str):
            self.fail("invalid")
        return str(super().to_internal_value(data))


class DisplayNameField(StrictCharField):
    """Any text is accepted as a name, NUL included: the service cleans it for display."""

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("trim_whitespace", False)
        super().__init__(**kwargs)
        self.validators = [v for v in self.validators if not isinstance(v, ProhibitNullCharactersValidator)]


class StrictIntegerField(serializers.IntegerField):
    """A JSON integer only: DRF would also take ``"12"``, ``12.0`` and ``"12.0"``, which the schema's
    ``integer`` refuses. In a query string every value is text, so there only ASCII digits count."""

    default_error_messages = {"invalid": "Must be an integer."}

    def __init__(self, *, query: bool = False, **kwargs: Any) -> None:
        self.query = query
        super().__init__(**kwargs)

    def to_internal_value(self, data: Any) -> int:
        if self.query and isinstance(data, str) and data.isascii() and data.isdigit() and len(data) <= 30:
            return int(data)  # (a longer one is over any maximum: refused as not an integer)
        if self.query or isinstance(data, bool) or not isinstance(data, int):
            self.fail("invalid")
        return int(data)


class MediaCreateInput(serializers.Serializer):
    file_name = DisplayNameField(min_length=1, max_length=4096, help_text="Shown to people; never used as a path.")
    # The largest size accepted (UPLOAD_MAX_BYTES) is the service's to check: over it is 413.
    size = StrictIntegerField(min_value=1, help_text="Exact size of the file in bytes.")
    content_type = DisplayNameField(max_length=255, required=False, allow_blank=True, default="")


class MediaListFilter(serializers.Serializer):
    """The list's query: filters and page. A value the schema refuses is a 400, not ignored."""

    status = serializers.ChoiceField(choices=MediaStatus.choices, required=False)
    kind = serializers.ChoiceField(choices=MediaKind.choices, required=False)
    page = StrictIntegerField(query=True, min_value=1, max_value=10**9, required=False, help_text="From 1.")
    page_size = StrictIntegerField(query=True, min_value=1, max_value=100, required=False, help_text="Default 20.")

    def to_internal_value(self, data: Any) -> Any:
        getlist = getattr(data, "getlist", None)
        if getlist is not None:
            repeated = [name for name in self.fields if len(getlist(name)) > 1]
            if repeated:
                raise serializers.ValidationError({name: ["Give this parameter once."] for name in repeated})
            # A plain dict: from a QueryDict DRF would read `?status=` as no filter at all.
            data = {name: data[name] for name in self.fields if name in data}
        return super().to_internal_value(data)


# --- output shapes (documentation for the OpenAPI schema) ------------------------------------
# What the views really send (media_app.selectors.media_item_payload and the views' additions);
# tests/media_app/test_api_contract.py checks every answer against them.


class ErrorDetailOutput(serializers.Serializer):
    code = serializers.CharField(help_text="Stable, for programs: `not_found`, `too_large`, `rate_limited`…")
    message = serializers.CharField(help_text="A sentence for people.")


class ErrorBodyOutput(ErrorDetailOutput):
    fields = serializers.DictField(
        child=serializers.ListField(child=serializers.CharField()),
        required=False,
        help_text="With code `invalid`: what is wrong with each field of the request.",
    )


class ErrorOutput(serializers.Serializer):
    error = ErrorBodyOutput()


class OutputFileOutput(serializers.Serializer):
    role = serializers.CharField()
    key = serializers.CharField()
    content_type = serializers.CharField()
    codec = serializers.CharField()
    width = serializers.IntegerField(allow_null=True)
    height = serializers.IntegerField(allow_null=True)
    duration = serializers.FloatField(allow_null=True)
    bytes = serializers.IntegerField()
    placeholder = serializers.CharField(
        allow_blank=True, help_text="ThumbHash (base64) of a picture output (thumbnail, image WebP); empty otherwise."
    )
    url = serializers.URLField(help_text="Signed and expiring, no credentials needed (a DASH manifest: its folder).")
    url_expires_at = serializers.DateTimeField()


class UploadTargetOutput(serializers.Serializer):
    method = serializers.ChoiceField(choices=["PUT"])
    url = serializers.URLField(help_text="Presigned PUT URL: S3's own with S3 storage, ours otherwise.")
    expires_at = serializers.DateTimeField()
    size = serializers.IntegerField()
    tus_url = serializers.URLField(help_text="tus 1.0 upload URL of this item (HEAD, PATCH, DELETE).")
    complete_url = serializers.URLField()


class OpenUploadOutput(serializers.Serializer):
    offset = serializers.IntegerField(help_text="Bytes received so far: resume a tus upload from here.")
    expires_at = serializers.DateTimeField(help_text="Without activity the upload is removed at this time.")
    tus_url = serializers.URLField()


STATUS_HELP = "Pending (waiting for its bytes, or queued), Processing, Completed or Failed."


class MediaItemOutput(serializers.Serializer):
    id = serializers.UUIDField()
    seq = serializers.IntegerField(help_text="Grows with every change; live events carry it too.")
    file_name = serializers.CharField()
    kind = serializers.ChoiceField(choices=["", *MediaKind.values], help_text="Empty until the content tells.")
    status = serializers.ChoiceField(choices=MediaStatus.values, help_text=STATUS_HELP)
    stage = serializers.CharField(allow_blank=True)
    progress = serializers.IntegerField(min_value=0, max_value=100)
    attempts = serializers.IntegerField()
    error = ErrorDetailOutput(allow_null=True)
    retryable = serializers.BooleanField(help_text="Whether a retry can change the outcome.")
    waiting = serializers.BooleanField(help_text="Waiting for a worker: queued, or between two stages.")
    queue = serializers.ChoiceField(
        choices=["video", "default"], allow_null=True, help_text="The queue it waits in; null unless waiting."
    )
    queue_position = serializers.IntegerField(
        allow_null=True, help_text="1 = next; null unless waiting for a worker (queued or between stages)."
    )
    eta_seconds = serializers.FloatField(
        allow_null=True, help_text="Seconds left while processing, a wait for a worker included; null when not known."
    )
    size = serializers.IntegerField()
    created_at = serializers.DateTimeField()
    started_at = serializers.DateTimeField(allow_null=True)
    finished_at = serializers.DateTimeField(allow_null=True)
    updated_at = serializers.DateTimeField()


class MediaItemDetailOutput(MediaItemOutput):
    outputs = OutputFileOutput(many=True, required=False, help_text="Once Completed.")
    placeholder = serializers.CharField(
        allow_null=True,
        required=False,
        help_text="ThumbHash (base64) to paint until the poster or image loads; null until one is taken.",
    )
    upload = OpenUploadOutput(required=False, help_text="While the upload is open.")


class MediaCreatedOutput(MediaItemOutput):
    upload = UploadTargetOutput()


class MediaPageOutput(serializers.Serializer):
    count = serializers.IntegerField()
    next = serializers.URLField(allow_null=True)
    previous = serializers.URLField(allow_null=True)
    results = MediaItemOutput(many=True)


class UploadStoredOutput(serializers.Serializer):
    id = serializers.UUIDField()
    size = serializers.IntegerField()
    stored = serializers.BooleanField()
