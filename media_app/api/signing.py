"""Signed, expiring URLs: where to PUT an upload's bytes and where to GET an output.

With S3 storage both are S3's own presigned URLs (the bytes never pass through us). With local
storage they are ours: a token signed with SECRET_KEY that binds one object (item and size for
an upload; key, type and name for a download) and an expiry, so it cannot be reused for another
object, stretched, or edited without failing the signature.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from django.conf import settings
from django.core import signing
from django.http import HttpRequest
from django.urls import reverse

from media_app.models import MediaItem
from media_app.uploads import s3_object_name, s3_storage

UPLOAD_SALT = "media_app.api.upload"
DOWNLOAD_SALT = "media_app.api.download"


class TokenRefused(Exception):
    def __init__(self, code: str, message: str) -> None:
        self.code, self.message = code, message
        super().__init__(message)


@dataclass(frozen=True)
class UploadGrant:
    item_id: str
    size: int
    expires: int


@dataclass(frozen=True)
class DownloadGrant:
    key: str
    content_type: str
    file_name: str
    expires: int


def _expiry(seconds: int) -> tuple[int, datetime]:
    expires = int(time.time()) + int(seconds)
    return expires, datetime.fromtimestamp(expires, tz=UTC)


def _read(token: str, salt: str) -> dict[str, Any]:
    try:
        data = signing.loads(token, salt=salt)
    except signing.BadSignature:
        raise TokenRefused("url_invalid", "This URL is not valid: it was altered or not issued by us.") from None
    if not isinstance(data, dict) or int(data.get("e", 0)) < time.time():
        raise TokenRefused("url_expired", "This URL has expired; ask for a new one.")
    return data


def upload_token_read(token: str) -> UploadGrant:
    data = _read(token, UPLOAD_SALT)
    return UploadGrant(item_id=str(data["i"]), size=int(data["s"]), expires=int(data["e"]))


def download_token_read(token: str) -> DownloadGrant:
    data = _read(token, DOWNLOAD_SALT)
    return DownloadGrant(key=data["k"], content_type=data["t"], file_name=data["n"], expires=int(data["e"]))


def upload_target(request: HttpRequest, item: MediaItem) -> dict[str, Any]:
    """Where and how to send the item's bytes: a presigned PUT, and the item's tus URL."""
    expires, expires_at = _expiry(settings.UPLOAD_URL_EXPIRY_SECONDS)
    s3 = s3_storage()
    if s3 is not None:
        url = s3.connection.meta.client.generate_presigned_url(
            "put_object",
            Params={"Bucket": s3.bucket_name, "Key": s3_object_name(s3, item.source_key)},
            ExpiresIn=settings.UPLOAD_URL_EXPIRY_SECONDS,
            HttpMethod="PUT",
        )
    else:
        token = signing.dumps({"i": str(item.pk), "s": item.size, "e": expires}, salt=UPLOAD_SALT)
        url = request.build_absolute_uri(reverse("api:upload-put", args=[token]))
    return {
        "method": "PUT",
        "url": url,
        "expires_at": expires_at.isoformat(),
        "size": item.size,
        "tus_url": request.build_absolute_uri(reverse("api:tus-upload", args=[item.pk])),
        "complete_url": request.build_absolute_uri(reverse("api:media-complete", args=[item.pk])),
    }


def download_url(request: HttpRequest, *, key: str, content_type: str, file_name: str) -> tuple[str, str]:
    """A URL that serves one stored object until it expires; returns (url, expires_at)."""
    expires, expires_at = _expiry(settings.DOWNLOAD_URL_EXPIRY_SECONDS)
    s3 = s3_storage()
    if s3 is not None:
        from django.utils.http import content_disposition_header

        url = s3.url(
            key,
            parameters={
                "ResponseContentType": content_type,
                "ResponseContentDisposition": content_disposition_header(False, file_name),
            },
            expire=settings.DOWNLOAD_URL_EXPIRY_SECONDS,
        )
    else:
        token = signing.dumps({"k": key, "t": content_type, "n": file_name, "e": expires}, salt=DOWNLOAD_SALT)
        url = request.build_absolute_uri(reverse("api:file", args=[token]))
    return url, expires_at.isoformat()


# --- DASH: one token for a folder, so the player can resolve segment URLs against the manifest ---

DASH_SALT = "media_app.api.dash"


@dataclass(frozen=True)
class DashGrant:
    prefix: str  # the folder in storage, ending in "/"
    version: str  # changes when the outputs are rewritten (a rerun), so cached bytes never go stale
    expires: int


def dash_token_read(token: str) -> DashGrant:
    data = _read(token, DASH_SALT)
    return DashGrant(prefix=str(data["p"]), version=str(data["v"]), expires=int(data["e"]))


def dash_url(request: HttpRequest, *, manifest_key: str, version: str) -> tuple[str, str]:
    """The manifest's URL under a token that grants its whole folder; returns (url, expires_at).

    dash.js resolves the manifest's relative ``init-…``/``chunk-…`` names against this URL, so
    every segment carries the same token without the manifest being rewritten. Served by us on
    S3 too: the segment cache sits in front of the storage.
    """
    prefix, _, name = manifest_key.rpartition("/")
    expires, expires_at = _expiry(settings.DOWNLOAD_URL_EXPIRY_SECONDS)
    token = signing.dumps({"p": f"{prefix}/", "v": version, "e": expires}, salt=DASH_SALT)
    return request.build_absolute_uri(reverse("media-dash", args=[token, name])), expires_at.isoformat()
