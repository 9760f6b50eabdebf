"""``mediaStatus``: the current state, then every change, until Completed or Failed.

Fed by the same channel group (``media.<id>``) and the same ``media.status`` events as the
websocket consumer, through the GraphQL consumer's ``listen_to_channel``. The group is joined
*before* the snapshot is read, so no change can fall between the two; an event the snapshot
already shows (seq not newer) is dropped, as the consumer does.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import Any

import strawberry

from media_app.api.views import item_for_user
from media_app.graphql.context import GraphQLContext
from media_app.graphql.errors import call_sync, not_found, websocket_required
from media_app.graphql.types import MediaItem, media_item_from_payload
from media_app.models import FINAL_STATUSES
from media_app.selectors import media_item_payload, media_items_for_user
from media_app.services import item_group

STATUS_EVENT = "media.status"


def visible_item_id(context: GraphQLContext, media_id: str) -> str:
    context.request.user = context.require_user()
    return str(item_for_user(context.request, media_id).pk)  # type: ignore[arg-type]


def snapshot(context: GraphQLContext, item_id: str) -> dict[str, Any] | None:
    item = media_items_for_user(user=context.user).filter(pk=item_id).first()
    return media_item_payload(item) if item is not None else None


@strawberry.type
class Subscription:
    @strawberry.subscription(
        description="Live status of one of your items over graphql-transport-ws: first its current state, "
        "then every change (stage, progress, outputs), ending after Completed or Failed."
    )
    async def media_status(
        self, info: strawberry.Info[GraphQLContext, None], media_id: strawberry.ID
    ) -> AsyncGenerator[MediaItem, None]:
        context = info.context
        consumer = context.consumer
        if consumer is None:
            raise websocket_required()
        item_id = await call_sync(context, visible_item_id, str(media_id))
        async with consumer.listen_to_channel(STATUS_EVENT, groups=[item_group(item_id)]) as events:
            payload = await call_sync(context, snapshot, item_id)
            if payload is None:  # deleted in between
                raise not_found()
            last_seq = payload["seq"]
            yield media_item_from_payload(payload)
            if payload["status"] in FINAL_STATUSES:
                return
            async for event in events:
                payload = event["item"]
                # Several subscriptions of one connection share its channel: keep only this item's events.
                if payload["id"] != item_id or payload["seq"] <= last_seq:
                    continue
                last_seq = payload["seq"]
                yield media_item_from_payload(payload)
                if payload["status"] in FINAL_STATUSES:
                    return
