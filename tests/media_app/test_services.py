"""Status flows through one service: saved, recorded in the history, then broadcast."""

from __future__ import annotations

import io

import pytest
from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from django.core.files.storage import default_storage

from media_app.models import MediaStatus, StatusEvent
from media_app.services import (
    ErrorReport,
    item_group,
    media_item_create,
    media_item_store_source,
    media_processing_start,
    media_status_report,
)

pytestmark = pytest.mark.django_db


def test_created_item_is_pending_with_generated_storage_name(make_user, tmp_storage):
    item = media_item_create(owner=make_user(), original_name="../../etc/passwd", size=5)
    media_item_store_source(item=item, fileobj=io.BytesIO(b"hello"))
    assert item.status == MediaStatus.PENDING
    assert item.original_name == "../../etc/passwd"
    assert item.source_key == f"uploads/{item.pk}/source"
    assert default_storage.open(item.source_key).read() == b"hello"
    assert not (tmp_storage.parent / "etc").exists()


def test_status_is_saved_then_broadcast_with_rising_sequence(make_user, settings):
    settings.CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}
    layer = get_channel_layer()
    item = media_item_create(owner=make_user(), original_name="a.mp4")
    channel = async_to_sync(layer.new_channel)()
    async_to_sync(layer.group_add)(item_group(item.pk), channel)

    media_status_report(item_id=item.pk, status=MediaStatus.PROCESSING, stage="demux", progress=3)
    media_status_report(item_id=item.pk, stage="encode", progress=50)
    first = async_to_sync(layer.receive)(channel)
    second = async_to_sync(layer.receive)(channel)

    assert first["item"]["status"] == "Processing" and first["item"]["stage"] == "demux"
    assert second["item"]["stage"] == "encode" and second["item"]["progress"] == 50
    assert second["item"]["seq"] == first["item"]["seq"] + 1
    item.refresh_from_db()
    assert (item.status, item.stage, item.progress) == ("Processing", "encode", 50)


def test_progress_never_goes_back_and_reaches_100_only_when_completed(make_user):
    item = media_item_create(owner=make_user(), original_name="a.mp4")
    media_status_report(item_id=item.pk, status=MediaStatus.PROCESSING, progress=60)
    media_status_report(item_id=item.pk, progress=40)
    media_status_report(item_id=item.pk, progress=100)
    item.refresh_from_db()
    assert item.progress == 99
    media_status_report(item_id=item.pk, status=MediaStatus.COMPLETED)
    item.refresh_from_db()
    assert item.progress == 100 and item.finished_at is not None


def test_every_transition_is_in_the_history(make_user):
    item = media_item_create(owner=make_user(), original_name="a.mp4")
    media_status_report(item_id=item.pk, status=MediaStatus.PROCESSING, stage="demux", attempts=1)
    media_status_report(item_id=item.pk, progress=10)  # not a transition
    media_status_report(
        item_id=item.pk, status=MediaStatus.FAILED, error=ErrorReport("invalid_input", "The file is damaged.")
    )
    events = list(StatusEvent.objects.filter(item=item).values_list("status", "stage", "error_code"))
    assert events == [("Pending", "", ""), ("Processing", "demux", ""), ("Failed", "demux", "invalid_input")]


def test_processing_is_enqueued_once_after_commit(make_user, django_capture_on_commit_callbacks):
    item = media_item_create(owner=make_user(), original_name="a.mp4")
    with django_capture_on_commit_callbacks() as callbacks:
        assert media_processing_start(item=item, kind="video") is True
        assert media_processing_start(item=item, kind="video") is False
    assert len(callbacks) == 1
