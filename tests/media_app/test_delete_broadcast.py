"""A deleted item's last event tells every other tab and client so, and offers no retry.

Before, deleting a Processing item broadcast "Failed, cancelled" with ``retryable: true`` as its
last word (other tabs showed Retry on an item that no longer exists), and deleting a Failed item
broadcast nothing (other tabs kept its Retry).
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from django.core.files.base import ContentFile
from django.core.files.storage import default_storage

from media_app.lifecycle import ErrorReport, owner_group
from media_app.models import MediaItem, MediaStatus
from media_app.services import media_item_create
from tests.states import set_state

pytest_plugins = ["tests.media_app.test_api_support"]
pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("local_storage")]


@pytest.fixture
def layer(settings: Any) -> Any:
    settings.CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}
    return get_channel_layer()


def _events(layer: Any, channel: str) -> list[dict[str, Any]]:
    """Every event waiting on ``channel``, in order."""

    async def drain() -> list[dict[str, Any]]:
        found = []
        while True:
            try:
                found.append((await asyncio.wait_for(layer.receive(channel), timeout=0.5))["item"])
            except TimeoutError:
                return found

    return async_to_sync(drain)()


def _item(owner: Any, **state: Any) -> MediaItem:
    item = media_item_create(owner=owner, original_name="clip.mp4", size=3)
    default_storage.save(item.source_key, ContentFile(b"abc"))
    set_state(item_id=item.pk, **state)
    return item


@pytest.mark.parametrize(
    "state",
    [
        {"status": MediaStatus.PROCESSING, "stage": "encode", "extra": {"task_id": "task-7"}},
        {"status": MediaStatus.FAILED, "error": ErrorReport("timeout", "Processing took longer than allowed.")},
    ],
    ids=["processing", "failed-retryable"],
)
def test_the_last_event_of_a_deleted_item_says_deleted_and_offers_no_retry(
    api, sent, layer, state, django_capture_on_commit_callbacks
):
    client, user = api()
    item = _item(user, **state)
    if item.status == MediaStatus.FAILED:
        assert client.get(f"/api/media/{item.pk}").json()["retryable"] is True  # what other tabs show
    channel = async_to_sync(layer.new_channel)()
    async_to_sync(layer.group_add)(owner_group(user.pk), channel)  # another tab's list socket

    with django_capture_on_commit_callbacks(execute=True):
        assert client.delete(f"/api/media/{item.pk}").status_code == 204

    events = _events(layer, channel)
    assert events, "other tabs were not told"
    assert all(e["retryable"] is False for e in events), events
    last = events[-1]
    assert (last["id"], last["status"], last.get("deleted")) == (str(item.pk), "Failed", True)
    assert [e["seq"] for e in events] == sorted({e["seq"] for e in events})  # each one newer
    assert not MediaItem.objects.filter(pk=item.pk).exists()
