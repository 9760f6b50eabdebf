"""API views: each validates its input, calls one service or selector, and shapes the answer.

A foreign item answers 404 like a missing one, so ids reveal nothing. The two token URLs (our
presigned PUT and download) are plain Django views: the signed token is their credential, and
they stream bodies in chunks rather than through a parser.
"""

from __future__ import annotations

import logging
import re
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import PurePosixPath
from typing import IO, Any

import redis
from asgiref.sync import sync_to_async
from django.conf import settings
from django.core.cache import caches
from django.core.files.storage import default_storage
from django.core.handlers.asgi import ASGIRequest
from django.http import HttpRequest, HttpResponse, JsonResponse, StreamingHttpResponse
from django.urls import reverse
from django.utils.http import content_disposition_header
from django.views.decorators.csrf import csrf_exempt
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, extend_schema
from rest_framework import status
from rest_framework.exceptions import NotFound
from rest_framework.pagination import PageNumberPagination
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from media_app.api.errors import json_error
from media_app.api.schema import COMMON, COMMON_WRITE, error_responses
from media_app.api.serializers import (
    MediaCreatedOutput,
    MediaCreateInput,
    MediaItemDetailOutput,
    MediaListFilter,
    MediaPageOutput,
)
from media_app.api.signing import (
    TokenRefused,
    dash_token_read,
    dash_url,
    download_token_read,
    download_url,
    upload_target,
    upload_token_read,
)
from media_app.api.throttles import UploadCreateThrottle
from media_app.models import MediaItem
from media_app.selectors import media_item_get, media_item_payload, media_items_for_user
from media_app.uploads import (
    UploadRefused,
    upload_complete,
    upload_create,
    upload_delete,
    upload_expires_at,
    upload_is_open,
    upload_offset,
    upload_retry,
    upload_store,
)

STREAM_CHUNK = 512 * 1024
logger = logging.getLogger(__name__)


def item_for_user(request: Request, item_id: Any) -> MediaItem:
    """The caller's item (any item for staff), or 404 — for a foreign id too."""
    try:
        uuid.UUID(str(item_id))
    except ValueError:
        raise NotFound() from None
    item = media_items_for_user(user=request.user).filter(pk=item_id).first()
    if item is None:
        raise NotFound()
    return item


def content_length(request: HttpRequest) -> int | None:
    try:
        return int(request.META["CONTENT_LENGTH"])
    except (KeyError, ValueError):
        return None


def item_detail(request: HttpRequest, item: MediaItem) -> dict[str, Any]:
    payload = media_item_payload(item)
    stem = PurePosixPath(item.original_name).stem or "media"
    for out in payload.get("outputs", []):
        if out["role"] == "manifest":
            # A folder grant, so the player fetches the segments relative to the manifest.
            version = item.finished_at.isoformat() if item.finished_at else "0"
            out["url"], out["url_expires_at"] = dash_url(request, manifest_key=out["key"], version=version)
            continue
        name = f"{stem}{PurePosixPath(out['key']).suffix}"
        out["url"], out["url_expires_at"] = download_url(
            request, key=out["key"], content_type=output_content_type(out["key"], out["content_type"]), file_name=name
        )
    if upload_is_open(item):
        payload["upload"] = {
            "offset": upload_offset(item),
            "expires_at": upload_expires_at(item).isoformat(),
            "tus_url": request.build_absolute_uri(reverse("api:tus-upload", args=[item.pk])),
        }
    return payload


class MediaPagination(PageNumberPagination):
    page_size = 20
    page_size_query_param = "page_size"
    max_page_size = 100


class MediaListCreateApi(APIView):
    def get_throttles(self) -> list[Any]:
        return [UploadCreateThrottle()] if self.request.method == "POST" else []

    @extend_schema(
        operation_id="media_list",
        parameters=[MediaListFilter],
        responses={
            200: OpenApiResponse(MediaPageOutput, description="One page of items."),
            **error_responses(400, *COMMON, _404="`not_found`: there is no such page (message `Invalid page.`)."),
        },
        description="Your items (every item, for staff), newest first, 20 a page unless `page_size` says.",
    )
    def get(self, request: Request) -> Response:
        filters = MediaListFilter(data=request.query_params)
        filters.is_valid(raise_exception=True)
        wanted = {k: v for k, v in filters.validated_data.items() if k in ("status", "kind")}
        items = media_items_for_user(user=request.user).filter(**wanted)
        paginator = MediaPagination()
        page = paginator.paginate_queryset(items, request, view=self)
        return paginator.get_paginated_response([media_item_payload(i, with_outputs=False) for i in page or []])

    @extend_schema(
        operation_id="media_create",
        request=MediaCreateInput,
        responses={
            201: OpenApiResponse(MediaCreatedOutput, description="Created (Pending); send the bytes as `upload` says."),
            **error_responses(
                400,
                *COMMON_WRITE,
                413,
                429,
                _415="`unsupported_media_type`: send JSON; `unsupported_type`: a name or declared type "
                "that is never accepted.",
            ),
        },
        description="Create an item awaiting its bytes; answers where to send them (presigned PUT or tus).",
    )
    def post(self, request: Request) -> Response:
        data = MediaCreateInput(data=request.data)
        data.is_valid(raise_exception=True)
        item = upload_create(
            owner=request.user,
            file_name=data.validated_data["file_name"],
            size=data.validated_data["size"],
            content_type=data.validated_data["content_type"],
        )
        body = {**media_item_payload(item), "upload": upload_target(request, item)}
        location = request.build_absolute_uri(reverse("api:media-detail", args=[item.pk]))
        return Response(body, status=status.HTTP_201_CREATED, headers={"Location": location})


ITEM_ID = OpenApiParameter("item_id", OpenApiTypes.UUID, OpenApiParameter.PATH)


class MediaDetailApi(APIView):
    @extend_schema(
        operation_id="media_get",
        parameters=[ITEM_ID],
        responses={
            200: OpenApiResponse(MediaItemDetailOutput, description="The item."),
            **error_responses(*COMMON, 404),
        },
        description="One item: its state, its outputs with signed download URLs once Completed, "
        "and where its upload stands while it is open.",
    )
    def get(self, request: Request, item_id: str) -> Response:
        return Response(item_detail(request, item_for_user(request, item_id)))

    @extend_schema(
        operation_id="media_delete",
        parameters=[ITEM_ID],
        responses={204: OpenApiResponse(description="Removed."), **error_responses(*COMMON_WRITE, 404, 423)},
        description="Cancel processing and remove the item and every file of it.",
    )
    def delete(self, request: Request, item_id: str) -> Response:
        upload_delete(item=item_for_user(request, item_id))
        return Response(status=status.HTTP_204_NO_CONTENT)


class MediaCompleteApi(APIView):
    @extend_schema(
        operation_id="media_complete",
        parameters=[ITEM_ID],
        request=None,
        responses={
            202: OpenApiResponse(MediaItemDetailOutput, description="Queued (or already queued): the item."),
            **error_responses(
                *COMMON_WRITE,
                404,
                423,
                _400="`size_mismatch`: the bytes stored are not the size declared.",
                _409="`not_uploaded`: the bytes have not all arrived; `upload_failed`: the upload was refused.",
                _415="`unsupported_type`: the content is not a type we accept (sniffed from the bytes).",
            ),
        },
        description="Every byte is in: check the content and queue processing (once, however often it is called).",
    )
    def post(self, request: Request, item_id: str) -> Response:
        item = upload_complete(item=item_for_user(request, item_id))
        return Response(item_detail(request, item), status=status.HTTP_202_ACCEPTED)


class MediaRetryApi(APIView):
    @extend_schema(
        operation_id="media_retry",
        parameters=[ITEM_ID],
        request=None,
        responses={
            202: OpenApiResponse(MediaItemDetailOutput, description="Queued (or already queued): the item."),
            **error_responses(
                *COMMON_WRITE,
                404,
                _409="`not_failed`: only Failed items are retried; `source_missing`: the upload is gone.",
            ),
        },
        description="Queue a Failed item again, from the stage that failed.",
    )
    def post(self, request: Request, item_id: str) -> Response:
        item = upload_retry(item=item_for_user(request, item_id))
        return Response(item_detail(request, item), status=status.HTTP_202_ACCEPTED)


# --- token URLs -------------------------------------------------------------------------------


def not_allowed(message: str, allow: str) -> HttpResponse:
    """405 with the ``Allow`` header HTTP requires, as DRF's views send it."""
    response = json_error("method_not_allowed", message, 405)
    response["Allow"] = allow
    return response


@csrf_exempt
def upload_put(request: HttpRequest, token: str) -> HttpResponse:
    """Our presigned PUT: the body streams to a staging file, then into storage."""
    if request.method != "PUT":
        return not_allowed("Send the file's bytes with PUT.", "PUT")
    try:
        grant = upload_token_read(token)
    except TokenRefused as exc:
        return json_error(exc.code, exc.message)
    item = media_item_get(item_id=grant.item_id)
    if item is None:
        return json_error("not_found", "There is no such item.")
    try:
        item = upload_store(item=item, stream=request, content_length=content_length(request), expected_size=grant.size)
    except UploadRefused as exc:
        return json_error(exc.code, exc.message)
    return JsonResponse({"id": str(item.pk), "size": item.size, "stored": True})


@csrf_exempt  # no cookie is its credential; exempt, so any other method gets its 405
def file_download(request: HttpRequest, token: str) -> HttpResponse:
    """Serve one stored output named by a signed token, with single-range support."""
    if request.method not in ("GET", "HEAD"):
        return not_allowed("Use GET (or HEAD).", "GET, HEAD")
    try:
        grant = download_token_read(token)
    except TokenRefused as exc:
        return json_error(exc.code, exc.message)
    try:
        size = default_storage.size(grant.key)
        fh = default_storage.open(grant.key, "rb")
    except FileNotFoundError:
        return json_error("not_found", "This file no longer exists.")
    response = ranged_response(
        request, size=size, fh=fh, content_type=output_content_type(grant.key, grant.content_type)
    )
    if response.status_code < 300:
        response["Content-Disposition"] = content_disposition_header(False, grant.file_name)
    return response


def ranged_response(
    request: HttpRequest, *, size: int, content_type: str, fh: IO[bytes] | None = None, data: bytes | None = None
) -> HttpResponse:
    """Answer GET/HEAD for a stored file (open ``fh``) or cached bytes (``data``), one Range at most."""
    start, length, code = 0, size, 200
    wanted = parse_range(request.headers.get("Range", ""), size)
    if wanted == "unsatisfiable":
        if fh is not None:
            fh.close()
        response = json_error("range_not_satisfiable", f"The file has {size} bytes.", 416)
        response["Content-Range"] = f"bytes */{size}"
        return response
    if wanted is not None:
        start, end = wanted
        length, code = end - start + 1, 206
    response: HttpResponse
    if request.method == "HEAD" or data is not None:
        if fh is not None:
            fh.close()
        body = b"" if request.method == "HEAD" or data is None else data[start : start + length]
        response = HttpResponse(body, status=code, content_type=content_type)
    else:
        assert fh is not None
        stream = _aiter_file(fh, start, length) if isinstance(request, ASGIRequest) else _iter_file(fh, start, length)
        response = StreamingHttpResponse(stream, status=code, content_type=content_type)
    response["Content-Length"] = str(length)
    response["Accept-Ranges"] = "bytes"
    response["X-Content-Type-Options"] = "nosniff"
    response["Cache-Control"] = "private, max-age=300"
    if code == 206:
        response["Content-Range"] = f"bytes {start}-{start + length - 1}/{size}"
    return response


def parse_range(header: str, size: int) -> tuple[int, int] | str | None:
    """One ``bytes=`` range as (first, last); None to serve it all; "unsatisfiable" for 416."""
    unit, _, spec = header.partition("=")
    if unit.strip().lower() != "bytes" or not spec or "," in spec:
        return None  # absent, another unit or several ranges: the whole file is a valid answer
    first, _, last = spec.strip().partition("-")
    try:
        if first == "":
            suffix = int(last)
            if suffix <= 0:
                return "unsatisfiable"
            return max(0, size - suffix), size - 1
        start = int(first)
        end = int(last) if last else size - 1
    except ValueError:
        return None
    if start >= size or end < start:
        return "unsatisfiable"
    return start, min(end, size - 1)


def _iter_file(fh: IO[bytes], start: int, length: int) -> Iterator[bytes]:
    with fh:
        fh.seek(start)
        while length > 0:
            chunk = fh.read(min(STREAM_CHUNK, length))
            if not chunk:
                return
            length -= len(chunk)
            yield chunk


async def _aiter_file(fh: IO[bytes], start: int, length: int) -> AsyncIterator[bytes]:
    # Under ASGI, Django would turn a sync iterator into one list in memory; an async one
    # streams chunk by chunk, each read done in a worker thread.
    read = sync_to_async(fh.read, thread_sensitive=False)
    try:
        await sync_to_async(fh.seek, thread_sensitive=False)(start)
        while length > 0:
            chunk = await read(min(STREAM_CHUNK, length))
            if not chunk:
                return
            length -= len(chunk)
            yield chunk
    finally:
        fh.close()


# --- output types and DASH serving -----------------------------------------------------------

# What each output's extension is, for objects stored without a useful type (and for the DASH
# folder, whose files have no grant of their own). Python's mimetypes knows neither .mpd nor,
# before 3.13, .avif.
OUTPUT_CONTENT_TYPES = {
    ".mpd": "application/dash+xml",
    ".webm": "video/webm",
    ".avif": "image/avif",
    ".webp": "image/webp",
    ".opus": "audio/ogg",
    ".m4s": "video/iso.segment",
}
GENERIC_TYPES = ("", "application/octet-stream", "binary/octet-stream")
# A manifest or segment name as the chunk stage writes them: no folders, no dot files.
DASH_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
SEGMENT_CACHE = "segments"


def output_content_type(key: str, declared: str = "") -> str:
    if declared.lower() not in GENERIC_TYPES:
        return declared
    return OUTPUT_CONTENT_TYPES.get(PurePosixPath(key).suffix.lower(), "application/octet-stream")


def segment_cache_key(key: str, version: str) -> str:
    return f"dash:{version}:{key}"


def segment_load(key: str, version: str) -> tuple[bytes | None, IO[bytes] | None, bool]:
    """A DASH file's bytes, from the cache when a request read them within the TTL.

    Returns (bytes, None, hit) or, for a file above MEDIA_SEGMENT_CACHE_MAX_BYTES, (None, open
    file, False) to stream. A cache that does not answer is a miss, never an error: storage
    still has the bytes.
    """
    cache = caches[SEGMENT_CACHE]
    cache_key = segment_cache_key(key, version)
    try:
        data = cache.get(cache_key)
    except redis.RedisError:
        logger.warning("segment cache unavailable; reading %s from storage", key, exc_info=True)
        data = None
    if data is not None:
        return data, None, True
    fh = default_storage.open(key, "rb")
    if fh.size > settings.MEDIA_SEGMENT_CACHE_MAX_BYTES:
        return None, fh, False
    with fh:
        data = fh.read()
    try:
        cache.set(cache_key, data, timeout=settings.MEDIA_SEGMENT_CACHE_SECONDS)
    except redis.RedisError:
        logger.warning("segment cache unavailable; %s not cached", key, exc_info=True)
    return data, None, False


@csrf_exempt  # as file_download
def dash_file(request: HttpRequest, token: str, name: str) -> HttpResponse:
    """Serve a DASH manifest or segment from a folder granted by a signed token, with Range."""
    if request.method not in ("GET", "HEAD"):
        return not_allowed("Use GET (or HEAD).", "GET, HEAD")
    try:
        grant = dash_token_read(token)
    except TokenRefused as exc:
        return json_error(exc.code, exc.message)
    if not DASH_NAME.fullmatch(name):
        return json_error("not_found", "There is no such file.")
    key = grant.prefix + name
    try:
        data, fh, hit = segment_load(key, grant.version)
    except FileNotFoundError:
        return json_error("not_found", "This file no longer exists.")
    size = len(data) if data is not None else fh.size  # type: ignore[union-attr]
    response = ranged_response(request, size=size, fh=fh, data=data, content_type=output_content_type(key))
    response["X-Segment-Cache"] = "hit" if hit else "miss"
    return response
