"""tus 1.0 (core, creation, creation-with-upload, termination, expiration) over the upload services.

``/api/tus/`` creates an upload (an item); ``/api/tus/<id>`` is that upload: HEAD tells the
offset to resume from, PATCH appends a chunk at exactly that offset, DELETE terminates it. The
item created by ``POST /api/media/`` has a tus URL too, so either client can start either way.
Authentication and ownership are the rest of the API's: a foreign upload is 404.

Reference: https://tus.io/protocols/resumable-upload (1.0.0).
"""

from __future__ import annotations

import base64
import re
import uuid
from typing import Any

from django.conf import settings
from django.http import UnreadablePostError
from django.urls import reverse
from django.utils.http import http_date
from drf_spectacular.utils import extend_schema
from rest_framework import status
from rest_framework.exceptions import NotFound
from rest_framework.permissions import AllowAny
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from media_app.api.schema import TUS_EXTENSIONS, UPLOAD_METADATA_PATTERN
from media_app.api.throttles import UploadCreateThrottle
from media_app.api.views import content_length, item_for_user
from media_app.models import MediaItem, MediaStatus
from media_app.uploads import (
    UploadRefused,
    upload_append,
    upload_complete,
    upload_create,
    upload_delete,
    upload_expires_at,
    upload_is_expired,
    upload_is_open,
    upload_offset,
)

TUS_VERSION = "1.0.0"
CHUNK_CONTENT_TYPE = "application/offset+octet-stream"
UPLOAD_METADATA = re.compile(UPLOAD_METADATA_PATTERN)


def parse_metadata(header: str) -> dict[str, str]:
    """``Upload-Metadata: key base64,key2 base64`` -> {key: text}; anything else is a 400."""
    if not UPLOAD_METADATA.fullmatch(header.strip()):
        raise UploadRefused("invalid", "Upload-Metadata must be comma-separated pairs of a key and a base64 value.")
    result: dict[str, str] = {}
    for pair in header.split(","):
        key, _, value = pair.strip().partition(" ")
        if key:
            result[key] = base64.b64decode(value, validate=True).decode("utf-8", errors="replace")
    return result


def _int_header(request: Request, name: str) -> int:
    value = request.headers.get(name)
    if value is None or not (value.isascii() and value.isdigit()):
        raise UploadRefused("invalid", f"The {name} header must be a non-negative integer.")
    return int(value)


@extend_schema(exclude=True)
class TusApi(APIView):
    parser_classes: list[Any] = []  # chunks are streamed from the request, never parsed

    def get_permissions(self) -> list[Any]:
        # Discovery needs no account; everything else is the API's usual authentication.
        return [AllowAny()] if self.request.method == "OPTIONS" else super().get_permissions()

    def initial(self, request: Request, *args: Any, **kwargs: Any) -> None:
        super().initial(request, *args, **kwargs)
        if request.method != "OPTIONS" and request.headers.get("Tus-Resumable") != TUS_VERSION:
            raise UploadRefused(
                "tus_version", f"This server speaks tus {TUS_VERSION}; send Tus-Resumable: {TUS_VERSION}."
            )

    def finalize_response(self, request: Request, response: Response, *args: Any, **kwargs: Any) -> Response:
        response = super().finalize_response(request, response, *args, **kwargs)
        response["Tus-Resumable"] = TUS_VERSION
        response["Cache-Control"] = "no-store"
        if response.status_code == status.HTTP_412_PRECONDITION_FAILED:
            response["Tus-Version"] = TUS_VERSION
        return response

    def options(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        return Response(
            status=status.HTTP_204_NO_CONTENT,
            headers={
                "Tus-Version": TUS_VERSION,
                "Tus-Extension": TUS_EXTENSIONS,
                "Tus-Max-Size": str(settings.UPLOAD_MAX_BYTES),
            },
        )

    def _append(self, request: Request, item: MediaItem, offset: int) -> dict[str, str]:
        if request.content_type != CHUNK_CONTENT_TYPE:
            raise UploadRefused("unsupported_media_type", f"Send chunks as {CHUNK_CONTENT_TYPE}.")
        try:
            # The streamed body itself when there is one (tus_stream): it can write to a file
            # from the event loop; Django's request reads any other body.
            body = getattr(request._request, "tus_body", None) or request._request
            item = upload_append(item=item, offset=offset, stream=body, content_length=content_length(request._request))
        except UnreadablePostError:
            # The client left mid-chunk (see tus_stream): nothing of this chunk was recorded.
            raise UploadRefused(
                "invalid", "The request ended before its body did; ask where to resume (HEAD)."
            ) from None
        headers = {"Upload-Offset": str(upload_offset(item))}
        if upload_is_open(item):
            headers["Upload-Expires"] = http_date(upload_expires_at(item).timestamp())
        return headers


class TusCreateApi(TusApi):
    def get_throttles(self) -> list[Any]:
        return [UploadCreateThrottle()] if self.request.method == "POST" else []

    def post(self, request: Request) -> Response:
        if "Upload-Defer-Length" in request.headers:
            raise UploadRefused("invalid", "Upload-Defer-Length is not supported; send Upload-Length.")
        length = _int_header(request, "Upload-Length")
        meta = parse_metadata(request.headers.get("Upload-Metadata", ""))
        item = upload_create(
            owner=request.user,
            file_name=meta.get("filename") or meta.get("name") or "upload",
            size=length,
            content_type=meta.get("filetype") or meta.get("type") or "",
        )
        headers = {
            "Location": request.build_absolute_uri(reverse("api:tus-upload", args=[item.pk])),
            "Upload-Expires": http_date(upload_expires_at(item).timestamp()),
        }
        if request.content_type == CHUNK_CONTENT_TYPE and content_length(request._request):
            headers.update(self._append(request, item, 0))  # creation-with-upload
        return Response(status=status.HTTP_201_CREATED, headers=headers)


class TusUploadApi(TusApi):
    def options(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        try:
            uuid.UUID(str(kwargs.get("item_id")))
        except ValueError:
            raise NotFound() from None  # not an upload URL at all (a real id answers 204, whoever owns it)
        return super().options(request, *args, **kwargs)

    def head(self, request: Request, item_id: str) -> Response:
        item = _upload_for(request, item_id)
        if upload_is_open(item) and upload_offset(item) == item.size:
            # Every byte arrived but storing them failed (say, S3 was down): finish now, or the
            # client, told the upload is whole, would never send anything that finishes it.
            item = upload_complete(item=item)
        headers = {"Upload-Offset": str(upload_offset(item)), "Upload-Length": str(item.size)}
        meta = {"filename": item.original_name, "filetype": item.declared_content_type}
        headers["Upload-Metadata"] = ",".join(
            f"{k} {base64.b64encode(v.encode()).decode('ascii')}" for k, v in meta.items() if v
        )
        if upload_is_open(item):
            headers["Upload-Expires"] = http_date(upload_expires_at(item).timestamp())
        return Response(status=status.HTTP_200_OK, headers=headers)

    def patch(self, request: Request, item_id: str) -> Response:
        item = _upload_for(request, item_id)
        offset = _int_header(request, "Upload-Offset")
        return Response(status=status.HTTP_204_NO_CONTENT, headers=self._append(request, item, offset))

    def delete(self, request: Request, item_id: str) -> Response:
        upload_delete(item=item_for_user(request, item_id))
        return Response(status=status.HTTP_204_NO_CONTENT)


def _upload_for(request: Request, item_id: str) -> MediaItem:
    """The caller's upload; 410 Gone once it failed, was refused or expired."""
    item = item_for_user(request, item_id)
    if item.status == MediaStatus.FAILED:
        raise UploadRefused("upload_gone", item.error_message or "This upload has failed.")
    if upload_is_expired(item):
        raise UploadRefused("upload_expired", "This upload expired after a period without activity; start again.")
    return item
