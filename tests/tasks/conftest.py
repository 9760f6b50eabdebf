"""What the fused-task and entry-task tests share: ``image``, a queued image whose tasks the test
runs itself (in process, no worker), and an item's Processing history."""

from __future__ import annotations

import pytest

from media_app import jobs, lifecycle
from media_app.models import MediaItem, StatusEvent
from tests.media import drawn_image


@pytest.fixture
def image(make_item, tmp_path, tmp_storage, settings, monkeypatch) -> MediaItem:
    settings.CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}
    monkeypatch.setattr(jobs, "revoke", lambda task_ids: None)
    item = make_item(drawn_image(tmp_path / "photo.jpg", size=(320, 240)))
    MediaItem.objects.filter(pk=item.pk).update(kind="image")
    lifecycle.upload_finished(item_id=item.pk)
    lifecycle.queued(item_id=item.pk, send=False)  # the test runs the task itself
    item.refresh_from_db()
    return item


def history(item: MediaItem) -> list[tuple[str, str, int]]:
    rows = StatusEvent.objects.filter(item=item, status="Processing").order_by("pk")
    return list(rows.values_list("stage", "message", "attempt"))
