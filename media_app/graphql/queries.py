"""Reads: one item, or a page of the caller's items (staff see everyone's, as in REST)."""

from __future__ import annotations

import base64
import binascii
import json
import uuid
from datetime import datetime

import strawberry
from django.db.models import Q
from rest_framework import exceptions

from media_app.api.views import item_for_user
from media_app.graphql.context import GraphQLContext
from media_app.graphql.errors import call_sync
from media_app.graphql.types import (
    MediaItem,
    MediaItemConnection,
    MediaItemEdge,
    MediaKind,
    PageInfo,
    ProcessingStatus,
    media_item_from_model,
    media_item_from_payload,
)
from media_app.selectors import media_item_payload, media_items_for_user

# As REST's page size: 20 by default, at most 100.
DEFAULT_PAGE = 20
MAX_PAGE = 100


def item_detail(context: GraphQLContext, media_id: str) -> MediaItem:
    """The caller's item by id (REST's ownership rule: foreign or malformed ids are not_found)."""
    context.request.user = context.require_user()
    return media_item_from_model(context.request, item_for_user(context.request, media_id))  # type: ignore[arg-type]


def encode_cursor(created_at: datetime, item_id: uuid.UUID) -> str:
    raw = json.dumps([created_at.isoformat(), str(item_id)]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, uuid.UUID]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        created_at, item_id = json.loads(raw)
        return datetime.fromisoformat(created_at), uuid.UUID(item_id)
    except (binascii.Error, ValueError, TypeError):
        raise exceptions.ValidationError({"after": ["This cursor is not one we issued."]}) from None


def item_page(
    context: GraphQLContext,
    *,
    status: ProcessingStatus | None,
    kind: MediaKind | None,
    first: int,
    after: str | None,
) -> MediaItemConnection:
    """Keyset pagination on (created_at, id), newest first: stable while items are added."""
    user = context.require_user()
    if first < 1:
        raise exceptions.ValidationError({"first": ["Ask for at least one item."]})
    items = media_items_for_user(user=user)
    if status is not None:
        items = items.filter(status=status.value)
    if kind is not None:
        items = items.filter(kind=kind.value)
    total = items.count()
    if after:
        created_at, item_id = decode_cursor(after)
        items = items.filter(Q(created_at__lt=created_at) | Q(created_at=created_at, pk__lt=item_id))
    rows = list(items.order_by("-created_at", "-pk")[: min(first, MAX_PAGE) + 1])
    page, more = rows[: min(first, MAX_PAGE)], len(rows) > min(first, MAX_PAGE)
    edges = [
        MediaItemEdge(
            cursor=encode_cursor(item.created_at, item.pk),
            node=media_item_from_payload(media_item_payload(item, with_outputs=False)),
        )
        for item in page
    ]
    return MediaItemConnection(
        edges=edges,
        page_info=PageInfo(has_next_page=more, end_cursor=edges[-1].cursor if edges else None),
        total_count=total,
    )


@strawberry.type
class Query:
    @strawberry.field(description="One of your items; a foreign or unknown id is a not_found error.")
    async def media_item(self, info: strawberry.Info[GraphQLContext, None], id: strawberry.ID) -> MediaItem | None:
        return await call_sync(info.context, item_detail, str(id))

    @strawberry.field(description="Your items, newest first, optionally filtered; `after` takes an endCursor.")
    async def media_items(
        self,
        info: strawberry.Info[GraphQLContext, None],
        status: ProcessingStatus | None = None,
        kind: MediaKind | None = None,
        first: int = DEFAULT_PAGE,
        after: str | None = None,
    ) -> MediaItemConnection:
        return await call_sync(info.context, item_page, status=status, kind=kind, first=first, after=after)
