"""Writes: each mutation is one call to the upload service the REST endpoint calls.

Order of checks as in REST: authentication, then the create rate limit, then input validation,
then the service (size, quota and unfinished-upload limits live there).
"""

from __future__ import annotations

from datetime import datetime

import strawberry
from rest_framework import exceptions

from media_app.api.serializers import MediaCreateInput
from media_app.api.signing import upload_target
from media_app.api.throttles import UploadCreateThrottle
from media_app.api.views import item_for_user
from media_app.graphql.context import GraphQLContext
from media_app.graphql.errors import call_sync
from media_app.graphql.types import (
    BigInt,
    CancelMediaPayload,
    CreateMediaUploadPayload,
    MediaItem,
    media_item_from_model,
)
from media_app.uploads import upload_complete, upload_create, upload_delete, upload_retry


def create_upload(context: GraphQLContext, *, file_name: str, size: int, content_type: str) -> CreateMediaUploadPayload:
    request = context.request
    request.user = context.require_user()
    throttle = UploadCreateThrottle()
    if not throttle.allow_request(request, None):  # type: ignore[arg-type]
        raise exceptions.Throttled(throttle.wait())
    data = MediaCreateInput(data={"file_name": file_name, "size": size, "content_type": content_type})
    data.is_valid(raise_exception=True)
    item = upload_create(owner=request.user, **data.validated_data)
    target = upload_target(request, item)
    return CreateMediaUploadPayload(
        item=media_item_from_model(request, item),
        upload_url=target["url"],
        expires_at=datetime.fromisoformat(target["expires_at"]),
        tus_url=target["tus_url"],
    )


def complete_upload(context: GraphQLContext, media_id: str) -> MediaItem:
    context.request.user = context.require_user()
    item = upload_complete(item=item_for_user(context.request, media_id))  # type: ignore[arg-type]
    return media_item_from_model(context.request, item)


def retry(context: GraphQLContext, media_id: str) -> MediaItem:
    context.request.user = context.require_user()
    item = upload_retry(item=item_for_user(context.request, media_id))  # type: ignore[arg-type]
    return media_item_from_model(context.request, item)


def cancel(context: GraphQLContext, media_id: str) -> CancelMediaPayload:
    context.request.user = context.require_user()
    item = item_for_user(context.request, media_id)  # type: ignore[arg-type]
    upload_delete(item=item)
    return CancelMediaPayload(media_id=strawberry.ID(str(item.pk)))


@strawberry.type
class Mutation:
    @strawberry.mutation(
        description="Start an upload: a Pending item and where to send its bytes. Then PUT the file to "
        "uploadUrl (or use tusUrl) and call completeMediaUpload."
    )
    async def create_media_upload(
        self,
        info: strawberry.Info[GraphQLContext, None],
        file_name: str,
        size: BigInt,
        content_type: str = "",
    ) -> CreateMediaUploadPayload:
        return await call_sync(info.context, create_upload, file_name=file_name, size=size, content_type=content_type)

    @strawberry.mutation(
        description="Say the bytes are all there: size and content are checked, then processing is queued "
        "(once: completing twice queues nothing more)."
    )
    async def complete_media_upload(
        self, info: strawberry.Info[GraphQLContext, None], media_id: strawberry.ID
    ) -> MediaItem:
        return await call_sync(info.context, complete_upload, str(media_id))

    @strawberry.mutation(description="Run a Failed item again, from the stage that failed.")
    async def retry_media(self, info: strawberry.Info[GraphQLContext, None], media_id: strawberry.ID) -> MediaItem:
        return await call_sync(info.context, retry, str(media_id))

    @strawberry.mutation(
        description="Stop processing and delete the item with every stored byte (REST's DELETE). "
        "Watchers see it end as Failed with the code `cancelled`."
    )
    async def cancel_media(
        self, info: strawberry.Info[GraphQLContext, None], media_id: strawberry.ID
    ) -> CancelMediaPayload:
        return await call_sync(info.context, cancel, str(media_id))
