"""The admin: find items, see what happened to them, and retry, reprocess or cancel them.

Everything here is display and dispatch; the actions are services in ``media_app.ops``, which
lock the row and decide whether an item qualifies, so the admin only reports what they said.
"""

from __future__ import annotations

import uuid
from typing import Any

from django.contrib import admin, messages
from django.core.files.storage import default_storage
from django.db.models import QuerySet
from django.http import FileResponse, Http404, HttpRequest, HttpResponseRedirect
from django.http.response import HttpResponseBase
from django.template.defaultfilters import filesizeformat
from django.urls import URLPattern, path, reverse
from django.utils.html import format_html, format_html_join
from django.utils.timesince import timesince

from media_app import ops
from media_app.models import MediaItem, Rendition, StatusEvent
from media_app.uploads import s3_storage


def _output_url(rendition: Rendition) -> str:
    return reverse("admin:media_app_mediaitem_output", args=[rendition.item_id, rendition.pk])


class RenditionInline(admin.TabularInline):
    model = Rendition
    verbose_name_plural = "outputs"
    extra = 0
    can_delete = False
    fields = ("role", "file", "preview", "content_type", "codec", "dimensions", "duration", "size")
    readonly_fields = fields

    @admin.display(description="file")
    def file(self, obj: Rendition) -> str:
        return format_html('<a href="{}" target="_blank">{}</a>', _output_url(obj), obj.storage_key)

    @admin.display(description="preview")
    def preview(self, obj: Rendition) -> str:
        if obj.content_type.startswith("image/"):
            return format_html(
                '<img src="{}" alt="{}" style="max-height:120px;max-width:200px">', _output_url(obj), obj.role
            )
        return ""

    @admin.display(description="size")
    def dimensions(self, obj: Rendition) -> str:
        return f"{obj.width}x{obj.height}" if obj.width and obj.height else ""

    @admin.display(description="bytes")
    def size(self, obj: Rendition) -> str:
        return filesizeformat(obj.bytes)

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


class StatusEventInline(admin.TabularInline):
    model = StatusEvent
    verbose_name_plural = "history"
    extra = 0
    can_delete = False
    fields = ("created_at", "status", "stage", "progress", "attempt", "error_code", "message")
    readonly_fields = fields

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


@admin.register(MediaItem)
class MediaItemAdmin(admin.ModelAdmin):
    list_display = (
        "original_name",
        "status",
        "kind",
        "stage",
        "progress_percent",
        "attempts",
        "owner",
        "size_human",
        "age",
        "error_code",
    )
    list_filter = ("status", "kind", "error_code", "created_at")
    search_fields = ("id", "original_name", "owner__username")
    list_select_related = ("owner",)
    date_hierarchy = "created_at"
    actions = ("process", "retry", "reprocess", "cancel")
    inlines = (RenditionInline, StatusEventInline)
    fieldsets = (
        (None, {"fields": ("id", "original_name", "owner", "kind", "status", "stage", "progress", "attempts")}),
        ("Error", {"fields": ("error_code", "error_message", "error_detail_pre")}),
        (
            "Details",
            {
                "fields": (
                    "size",
                    "declared_content_type",
                    "detected_content_type",
                    "duration",
                    "source_key",
                    "task_id",
                    "timings_table",
                    "media_info",
                    "created_at",
                    "started_at",
                    "finished_at",
                    "updated_at",
                )
            },
        ),
    )
    readonly_fields = (
        *[f.name for f in MediaItem._meta.fields],
        "error_detail_pre",
        "timings_table",
    )

    # --- list and detail ---------------------------------------------------------------------

    @admin.display(description="progress", ordering="progress")
    def progress_percent(self, obj: MediaItem) -> str:
        return f"{obj.progress}%"

    @admin.display(description="size", ordering="size")
    def size_human(self, obj: MediaItem) -> str:
        return filesizeformat(obj.size)

    @admin.display(description="age", ordering="-created_at")
    def age(self, obj: MediaItem) -> str:
        return timesince(obj.created_at)

    @admin.display(description="error detail (ffmpeg output)")
    def error_detail_pre(self, obj: MediaItem) -> str:
        if not obj.error_detail:
            return "-"
        return format_html('<pre style="white-space:pre-wrap;max-height:30em;overflow:auto">{}</pre>', obj.error_detail)

    @admin.display(description="stage timings")
    def timings_table(self, obj: MediaItem) -> str:
        if not obj.timings:
            return "-"
        rows = format_html_join("", "<tr><td>{}</td><td>{} s</td></tr>", obj.timings.items())
        return format_html("<table>{}</table>", rows)

    def get_search_results(
        self, request: HttpRequest, queryset: QuerySet[MediaItem], search_term: str
    ) -> tuple[QuerySet[MediaItem], bool]:
        # An id pasted from a log or the API, with or without dashes, finds its item directly:
        # ids are stored without dashes on some databases, so a text search would miss them.
        try:
            wanted = uuid.UUID(search_term.strip())
        except ValueError:
            return super().get_search_results(request, queryset, search_term)
        return queryset.filter(pk=wanted), False

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False  # items are made by uploads, never by hand

    # --- outputs -----------------------------------------------------------------------------

    def get_urls(self) -> list[URLPattern]:
        view = self.admin_site.admin_view(self.output_view)
        own = [path("<uuid:object_id>/output/<int:rendition_id>/", view, name="media_app_mediaitem_output")]
        return own + super().get_urls()

    def output_view(self, request: HttpRequest, object_id: uuid.UUID, rendition_id: int) -> HttpResponseBase:
        """One output, for the links and previews: staff only, streamed or redirected to S3."""
        if not self.has_view_permission(request):
            raise Http404
        rendition = Rendition.objects.filter(pk=rendition_id, item_id=object_id).first()
        if rendition is None or not default_storage.exists(rendition.storage_key):
            raise Http404("no such output")
        if s3_storage() is not None:
            return HttpResponseRedirect(default_storage.url(rendition.storage_key))
        return FileResponse(default_storage.open(rendition.storage_key, "rb"), content_type=rendition.content_type)

    # --- actions -----------------------------------------------------------------------------

    def _report(self, request: HttpRequest, verb: str, report: ops.ActionReport) -> None:
        n = len(report.changed)
        if n:
            self.message_user(request, f"{verb} {n} item{'s' if n != 1 else ''}.", messages.SUCCESS)
        for reason, names in report.skipped.items():
            names = sorted(names)
            shown = ", ".join(names[:10]) + (f" and {len(names) - 10} more" if len(names) > 10 else "")
            self.message_user(request, f"Skipped {len(names)}: {reason}: {shown}.", messages.WARNING)
        if not n and not report.skipped:
            self.message_user(request, "No items selected.", messages.WARNING)

    @admin.action(description="Process now (uploaded: start; failed: resume; completed: from scratch)",
                  permissions=["change"])  # fmt: skip
    def process(self, request: HttpRequest, queryset: QuerySet[MediaItem]) -> None:
        """The task manager's ``create_processing_task``, with the admin's name in the history."""

        def start(*, item_id: Any) -> None:
            ops.create_processing_task(
                item_id, title="Processing requested in the admin", description=str(request.user)
            )

        self._report(request, "Queued:", ops.action_apply(items=queryset, action=start))

    @admin.action(description="Retry failed items (resume at the failed stage)", permissions=["change"])
    def retry(self, request: HttpRequest, queryset: QuerySet[MediaItem]) -> None:
        self._report(request, "Queued for retry:", ops.action_apply(items=queryset, action=ops.media_retry))

    @admin.action(description="Reprocess finished items from scratch", permissions=["change"])
    def reprocess(self, request: HttpRequest, queryset: QuerySet[MediaItem]) -> None:
        report = ops.action_apply(items=queryset, action=ops.media_reprocess)
        self._report(request, "Queued for reprocessing:", report)

    @admin.action(description="Cancel pending or processing items", permissions=["change"])
    def cancel(self, request: HttpRequest, queryset: QuerySet[MediaItem]) -> None:
        self._report(request, "Cancelled:", ops.action_apply(items=queryset, action=ops.media_cancel))
