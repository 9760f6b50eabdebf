"""Status flows through one service: saved, recorded in the history, then broadcast."""

from __future__ import annotations

import io

import pytest
from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from django.core.files.storage import default_storage

from media_app import lifecycle
from media_app.models import MediaStatus, StatusEvent
from media_app.services import (
    ErrorReport,
    item_group,
    media_item_create,
    media_item_store_source,
    media_processing_start,
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


def _processing(item, *, stage: str = "demux", progress: int = 3) -> None:
    lifecycle.upload_finished(item_id=item.pk)
    lifecycle.queued(item_id=item.pk, send=False)
    assert lifecycle.stage_started(item_id=item.pk, stage=stage, task_id="t-1", progress=progress) == 1


def test_status_is_saved_then_broadcast_with_rising_sequence(make_user, settings, django_capture_on_commit_callbacks):
    settings.CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}
    layer = get_channel_layer()
    item = media_item_create(owner=make_user(), original_name="a.mp4")
    channel = async_to_sync(layer.new_channel)()
    async_to_sync(layer.group_add)(item_group(item.pk), channel)

    with django_capture_on_commit_callbacks(execute=True):
        _processing(item, stage="demux", progress=3)
        lifecycle.stage_started(item_id=item.pk, stage="encode", task_id="t-2", progress=50)
    events = [async_to_sync(layer.receive)(channel)["item"] for _ in range(4)]
    first, second = events[-2:]

    assert [e["status"] for e in events[:2]] == ["Pending", "Pending"]  # upload finished, queued
    assert first["status"] == "Processing" and first["stage"] == "demux"
    assert second["stage"] == "encode" and second["progress"] == 50
    assert [e["seq"] for e in events] == list(range(events[0]["seq"], events[0]["seq"] + 4))
    item.refresh_from_db()
    assert (item.status, item.stage, item.progress) == ("Processing", "encode", 50)


def test_progress_never_goes_back_and_reaches_100_only_when_completed(make_user):
    item = media_item_create(owner=make_user(), original_name="a.mp4")
    _processing(item, progress=60)
    for value in (40, 100):
        lifecycle._last_progress.clear()  # the per-item throttle is not what this test is about
        lifecycle.progressed(item_id=item.pk, progress=value)
        item.refresh_from_db()
        assert item.progress == (60 if value == 40 else 99)
    assert lifecycle.completed(item_id=item.pk)
    item.refresh_from_db()
    assert item.progress == 100 and item.finished_at is not None


def test_every_transition_is_in_the_history(make_user):
    item = media_item_create(owner=make_user(), original_name="a.mp4")
    _processing(item)
    lifecycle._last_progress.clear()
    lifecycle.progressed(item_id=item.pk, progress=10)  # not a transition
    lifecycle.failed(item_id=item.pk, error=ErrorReport("invalid_input", "The file is damaged."))
    events = list(StatusEvent.objects.filter(item=item).values_list("status", "stage", "error_code", "message"))
    assert events == [
        ("Pending", "", "", "Created"),
        ("Pending", "", "", "Upload finished"),
        ("Pending", "", "", "Queued"),
        ("Processing", "demux", "", "demux started"),
        ("Failed", "demux", "invalid_input", "The file is damaged."),
    ]


def test_processing_is_enqueued_once_after_commit(make_user, django_capture_on_commit_callbacks, monkeypatch):
    sent = []
    monkeypatch.setattr(lifecycle.jobs, "send", lambda name, item_id, **kw: sent.append((name, str(item_id))))
    item = media_item_create(owner=make_user(), original_name="a.mp4")
    with django_capture_on_commit_callbacks() as callbacks:
        assert media_processing_start(item=item, kind="video") is True
        assert media_processing_start(item=item, kind="video") is False
        assert not sent, "nothing may be sent before the commit"
    for callback in callbacks:
        callback()
    assert sent == [("media.process", str(item.pk))]
