"""GraphQL types over the one shape of an item's state (``selectors.media_item_payload``).

Every ``MediaItem`` is built from that payload, whether it was just read from the database or
arrived in a ``media.status`` broadcast, so HTTP answers and subscription events cannot differ.
Output URLs are REST's (``api.views.item_detail``), signed per caller, never re-derived here.
"""

from __future__ import annotations

from datetime import datetime
from enum import Enum
from typing import Any, NewType

import strawberry
from django.http import HttpRequest

from media_app.api.views import item_detail
from media_app.graphql.errors import call_sync
from media_app.models import MediaItem as MediaItemModel
from media_app.models import MediaKind as MediaKindChoices
from media_app.models import MediaStatus
from media_app.selectors import media_item_placeholder


def _parse_big_int(value: Any) -> int:
    # bool is an int in Python, but `true` is no byte count.
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ValueError("BigInt must be a whole number.")
    try:
        return int(value)
    except ValueError:
        raise ValueError("BigInt must be a whole number.") from None


# GraphQL's Int stops at 2^31-1 (2 GiB), below the largest upload we accept.
BigInt = NewType("BigInt", int)
BIG_INT_SCALAR = strawberry.scalar(
    name="BigInt",
    description="A whole number beyond GraphQL's 32-bit Int (byte counts), sent as a JSON number.",
    serialize=int,
    parse_value=_parse_big_int,
)
SCALARS: dict[object, Any] = {BigInt: BIG_INT_SCALAR}


@strawberry.enum(description="Where an item is in its life; the same four words as the REST API and the page.")
class ProcessingStatus(Enum):
    Pending = "Pending"
    Processing = "Processing"
    Completed = "Completed"
    Failed = "Failed"


@strawberry.enum(description="What the content is (known once the bytes were sniffed or probed).")
class MediaKind(Enum):
    video = "video"
    audio = "audio"
    image = "image"


# Drift between the model's vocabulary and the schema's would silently drop values.
assert {s.value for s in ProcessingStatus} == set(MediaStatus.values)
assert {k.value for k in MediaKind} == set(MediaKindChoices.values)


@strawberry.type(description="Why an item failed: a stable code and a sentence for people.")
class MediaError:
    code: str
    message: str


@strawberry.type(description="One output file, with a signed download URL that expires.")
class MediaOutput:
    kind: str = strawberry.field(description="Its role: video, audio, thumbnail, manifest or an image format.")
    url: str
    url_expires_at: datetime
    content_type: str
    codec: str | None
    width: int | None
    height: int | None
    duration: float | None = strawberry.field(description="Seconds of audio/video.")
    bytes: BigInt
    placeholder: str | None = strawberry.field(
        default=None, description="ThumbHash (base64) of a picture output (thumbnail, image WebP)."
    )


@strawberry.type(description="An uploaded file and what became of it.")
class MediaItem:
    id: strawberry.ID
    seq: int = strawberry.field(description="Rises with every change; a client drops anything not newer.")
    file_name: str
    kind: MediaKind | None
    processing_status: ProcessingStatus
    stage: str | None = strawberry.field(description="The pipeline stage running or last run.")
    progress: int = strawberry.field(description="0-100, never falling within a run; 100 only when Completed.")
    attempts: int
    error: MediaError | None
    retryable: bool = strawberry.field(
        description="Whether a retry can change the outcome: Failed, its upload still stored, and not a fault of "
        "the file itself (a damaged file fails the same way every time)."
    )
    waiting: bool = strawberry.field(description="Waiting for a worker: queued, or between two stages.")
    queue: str | None = strawberry.field(description="The queue it waits in (video or default); null unless waiting.")
    queue_position: int | None = strawberry.field(
        description="1 for the next item its queue takes; null unless waiting for a worker."
    )
    eta_seconds: float | None = strawberry.field(description="Estimated seconds left; Processing only.")
    size: BigInt
    created_at: datetime
    updated_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    # Outputs already in the payload (a broadcast, a detail read); None means "load if asked".
    preloaded_outputs: strawberry.Private[list[MediaOutput] | None] = None
    # The placeholder, when the payload carried it (a page of items does not: loaded if asked).
    preloaded_placeholder: strawberry.Private[tuple[str | None] | None] = None

    @strawberry.field(
        description="ThumbHash (base64) to paint until the poster or image loads; null until a picture is taken."
    )
    async def placeholder(self, info: strawberry.Info) -> str | None:
        if self.preloaded_placeholder is not None:
            return self.preloaded_placeholder[0]
        return await call_sync(info.context, _load_placeholder, str(self.id))

    @strawberry.field(description="The output files; empty until the item is Completed.")
    async def outputs(self, info: strawberry.Info) -> list[MediaOutput]:
        if self.preloaded_outputs is not None:
            return self.preloaded_outputs
        if self.processing_status != ProcessingStatus.Completed:
            return []
        return await call_sync(info.context, _load_outputs, str(self.id))


def _load_placeholder(context: Any, item_id: str) -> str | None:
    return media_item_placeholder(item_id=item_id)


def _load_outputs(context: Any, item_id: str) -> list[MediaOutput]:
    item = MediaItemModel.objects.filter(pk=item_id).first()
    return [] if item is None else outputs_from_detail(item_detail(context.request, item))


def outputs_from_detail(detail: dict[str, Any]) -> list[MediaOutput]:
    """Outputs as REST's detail signs them for this caller (download URL, or the DASH folder URL)."""
    return [
        MediaOutput(
            kind=out["role"],
            url=out["url"],
            url_expires_at=datetime.fromisoformat(out["url_expires_at"]),
            content_type=out["content_type"],
            codec=out["codec"] or None,
            width=out["width"],
            height=out["height"],
            duration=out["duration"],
            bytes=out["bytes"],
            placeholder=out.get("placeholder") or None,
        )
        for out in detail.get("outputs", [])
    ]


def media_item_from_model(request: HttpRequest, item: MediaItemModel) -> MediaItem:
    """The item as REST's detail shows it to this caller, outputs included. Sync (database)."""
    detail = item_detail(request, item)
    return media_item_from_payload(detail, outputs=outputs_from_detail(detail))


def media_item_from_payload(payload: dict[str, Any], *, outputs: list[MediaOutput] | None = None) -> MediaItem:
    """The GraphQL item for a ``media_item_payload`` dict (a read, or a broadcast event).

    Without ``outputs``, they are signed only if a client asks for them (see ``MediaItem.outputs``):
    a page of items or a progress event then costs no extra query.
    """
    error = payload.get("error")
    return MediaItem(
        id=strawberry.ID(payload["id"]),
        seq=payload["seq"],
        file_name=payload["file_name"],
        kind=MediaKind(payload["kind"]) if payload["kind"] else None,
        processing_status=ProcessingStatus(payload["status"]),
        stage=payload["stage"] or None,
        progress=payload["progress"],
        attempts=payload["attempts"],
        error=MediaError(code=error["code"], message=error["message"]) if error else None,
        retryable=bool(payload.get("retryable", False)),
        waiting=bool(payload.get("waiting", False)),
        queue=payload.get("queue"),
        queue_position=payload.get("queue_position"),
        eta_seconds=payload.get("eta_seconds"),
        size=payload["size"],
        created_at=_when(payload["created_at"]),
        updated_at=_when(payload["updated_at"]),
        started_at=_when(payload["started_at"]),
        finished_at=_when(payload["finished_at"]),
        preloaded_outputs=outputs,
        preloaded_placeholder=(payload["placeholder"],) if "placeholder" in payload else None,
    )


def _when(value: str | None) -> Any:
    return datetime.fromisoformat(value) if value else None


@strawberry.type(description="A new item awaiting its bytes, and where to send them.")
class CreateMediaUploadPayload:
    item: MediaItem
    upload_url: str = strawberry.field(
        description="Presigned URL: PUT the whole file here (S3's own with S3 storage), no credentials needed."
    )
    expires_at: datetime = strawberry.field(description="When uploadUrl stops working.")
    tus_url: str = strawberry.field(description="tus 1.0 URL of the same item, for resumable chunked upload.")


@strawberry.type(description="A cancelled item: processing stopped and every stored byte removed, the item too.")
class CancelMediaPayload:
    media_id: strawberry.ID


@strawberry.type
class PageInfo:
    has_next_page: bool
    end_cursor: str | None


@strawberry.type
class MediaItemEdge:
    cursor: str
    node: MediaItem


@strawberry.type(description="A page of items, newest first.")
class MediaItemConnection:
    edges: list[MediaItemEdge]
    page_info: PageInfo
    total_count: int = strawberry.field(description="Items matching the filters, on every page.")
