from django.contrib import admin

from media_app.models import MediaItem, Rendition, StatusEvent


class RenditionInline(admin.TabularInline):
    model = Rendition
    extra = 0
    can_delete = False
    readonly_fields = ("role", "storage_key", "content_type", "codec", "width", "height", "duration", "bytes")


class StatusEventInline(admin.TabularInline):
    model = StatusEvent
    extra = 0
    can_delete = False
    readonly_fields = ("created_at", "status", "stage", "progress", "attempt", "error_code", "message")


@admin.register(MediaItem)
class MediaItemAdmin(admin.ModelAdmin):
    list_display = ("original_name", "status", "kind", "stage", "progress", "attempts", "owner", "size", "created_at")
    list_filter = ("status", "kind", "error_code", "created_at")
    search_fields = ("id", "original_name", "owner__username")
    readonly_fields = [f.name for f in MediaItem._meta.fields]
    inlines = (RenditionInline, StatusEventInline)
    list_select_related = ("owner",)
