"""Live status over websockets: the current state first, then every change, in order.

Thin by design: join the item's (or the owner's) group, send a snapshot, forward
``media.status`` events. Each event carries the item's ``seq``; the consumer drops any event
not newer than what it already sent, so the snapshot/event race never shows a step backwards.
"""

from __future__ import annotations

import uuid
from typing import Any

from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncJsonWebsocketConsumer

from media_app.selectors import media_item_payload, media_items_for_user
from media_app.services import item_group, owner_group

# Close codes in the 4000 range (application-defined), mirroring HTTP where one fits.
CLOSE_UNAUTHENTICATED = 4401
CLOSE_NOT_FOUND = 4404


class _StatusConsumer(AsyncJsonWebsocketConsumer):
    groups_joined: list[str]
    last_seq: dict[str, int]

    async def connect(self) -> None:
        self.groups_joined, self.last_seq = [], {}
        user = self.scope.get("user")
        # Accept first so the client sees our close code instead of a bare handshake failure.
        await self.accept()
        if user is None or not user.is_authenticated:
            await self.close(code=CLOSE_UNAUTHENTICATED)
            return
        if not await self.subscribe(user):
            await self.close(code=CLOSE_NOT_FOUND)
            return
        for payload in await self.snapshot(user):
            await self.forward(payload)

    async def subscribe(self, user: Any) -> bool:
        raise NotImplementedError

    async def snapshot(self, user: Any) -> list[dict[str, Any]]:
        raise NotImplementedError

    async def join(self, group: str) -> None:
        await self.channel_layer.group_add(group, self.channel_name)
        self.groups_joined.append(group)

    async def disconnect(self, code: int) -> None:
        for group in self.groups_joined:
            await self.channel_layer.group_discard(group, self.channel_name)

    async def media_status(self, event: dict[str, Any]) -> None:
        await self.forward(event["item"])

    async def forward(self, item: dict[str, Any]) -> None:
        if item["seq"] <= self.last_seq.get(item["id"], -1):
            return
        self.last_seq[item["id"]] = item["seq"]
        await self.send_json({"type": "media.status", "seq": item["seq"], "item": item})

    async def receive_json(self, content: Any, **kwargs: Any) -> None:
        # Read-only socket: a ping gets a pong so clients can check liveness, nothing else.
        if isinstance(content, dict) and content.get("type") == "ping":
            await self.send_json({"type": "pong"})


class MediaItemConsumer(_StatusConsumer):
    """``/ws/media/<id>/``: one item, for its owner or staff."""

    async def subscribe(self, user: Any) -> bool:
        self.item_id = str(self.scope["url_route"]["kwargs"]["item_id"])
        if not await self._visible(user, self.item_id):
            return False
        await self.join(item_group(self.item_id))
        return True

    async def snapshot(self, user: Any) -> list[dict[str, Any]]:
        return await self._payloads(user, [self.item_id])

    @database_sync_to_async
    def _visible(self, user: Any, item_id: str) -> bool:
        try:
            uuid.UUID(item_id)
        except ValueError:
            return False
        return media_items_for_user(user=user).filter(pk=item_id).exists()

    @database_sync_to_async
    def _payloads(self, user: Any, ids: list[str]) -> list[dict[str, Any]]:
        return [media_item_payload(i) for i in media_items_for_user(user=user).filter(pk__in=ids)]


class MediaListConsumer(_StatusConsumer):
    """``/ws/media/``: every item of the connected user."""

    SNAPSHOT_LIMIT = 100

    async def subscribe(self, user: Any) -> bool:
        await self.join(owner_group(user.pk))
        return True

    @database_sync_to_async
    def snapshot(self, user: Any) -> list[dict[str, Any]]:
        items = user.media_items.order_by("-created_at")[: self.SNAPSHOT_LIMIT]
        return [media_item_payload(i) for i in reversed(items)]
