"""Upload services: how bytes become an item's source, and the limits on the way.

Bytes never sit in memory whole. A tus upload is appended, chunk by chunk, to a staging file
under ``UPLOAD_STAGING_DIR`` (its size *is* the upload offset) and moved into storage when the
last byte arrives: a rename on local storage, a multipart push on S3. A presigned PUT of ours
streams to a staging file too and lands in storage only when its size is right; an S3
presigned PUT goes straight to the bucket. Either way ``upload_complete`` then checks the size,
sniffs the first bytes and queues processing once.

Writers to one upload (a PATCH, a PUT, a delete) hold a Redis lock, so two web processes never
interleave bytes of the same upload: the second is refused, not queued.
"""

from __future__ import annotations

import logging
import time
import unicodedata
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta
from functools import cache
from pathlib import Path
from typing import IO, Any, NoReturn

import redis
from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.files import File
from django.core.files.storage import default_storage
from django.db import transaction
from django.db.models import Sum
from django.template.defaultfilters import filesizeformat
from django.utils import timezone

from media_app import lifecycle
from media_app.lifecycle import ErrorReport
from media_app.models import MediaItem, MediaStatus
from media_app.services import media_item_remove_files, media_processing_start
from pipelines.errors import InvalidInput, MediaError, UnsupportedCodec
from pipelines.results import to_json
from pipelines.sniff import Sniffed, sniff_bytes

logger = logging.getLogger("media_app.uploads")

CHUNK_BYTES = 1 << 20
# Enough for every magic number and the MP4 brand list sniff_bytes looks at.
SNIFF_BYTES = 4096
NAME_LIMIT = 255
LOCK_SECONDS = 60


class UploadRefused(Exception):
    """An upload the rules do not allow. ``code`` is stable; ``message`` is for people."""

    def __init__(self, code: str, message: str) -> None:
        self.code = code
        self.message = message
        super().__init__(message)


# --- names and state --------------------------------------------------------------------------


def clean_file_name(name: str, *, limit: int = NAME_LIMIT) -> str:
    """A display name: control and format characters (NUL, RTL override, zero-width) removed,
    whitespace collapsed, length capped keeping the extension. Never used as a path."""
    name = unicodedata.normalize("NFC", name)
    name = "".join(ch if unicodedata.category(ch)[0] != "C" else " " for ch in name)
    name = " ".join(name.split())
    if len(name) > limit:
        stem, dot, ext = name.rpartition(".")
        keep_ext = bool(dot and stem and 0 < len(ext) <= 16)
        name = f"{stem[: limit - len(ext) - 1]}.{ext}" if keep_ext else name[:limit]
    return name or "upload"


def upload_is_open(item: MediaItem) -> bool:
    """Bytes may still arrive: Pending and not yet completed."""
    return item.upload_open


def upload_expires_at(item: MediaItem) -> datetime:
    """An open upload expires this long after its last activity (creation or a chunk)."""
    return item.updated_at + timedelta(seconds=settings.UPLOAD_EXPIRY_SECONDS)


def upload_is_expired(item: MediaItem, *, now: datetime | None = None) -> bool:
    return upload_is_open(item) and upload_expires_at(item) <= (now or timezone.now())


def staging_path(item_id: Any) -> Path:
    return Path(settings.UPLOAD_STAGING_DIR) / f"{item_id}.part"


def upload_offset(item: MediaItem) -> int:
    """Bytes received so far: the staging file's size while open, the whole size once done."""
    if not upload_is_open(item):
        return item.size
    try:
        return staging_path(item.pk).stat().st_size
    except FileNotFoundError:
        return 0


def s3_storage() -> Any | None:
    """The default storage when it is S3 (django-storages), else None."""
    try:
        from storages.backends.s3 import S3Storage
    except ImportError:  # pragma: no cover - django-storages is a requirement
        return None
    return default_storage if isinstance(default_storage, S3Storage) else None


def s3_object_name(storage: Any, key: str) -> str:
    from storages.utils import clean_name

    return str(storage._normalize_name(clean_name(key)))


# --- create -----------------------------------------------------------------------------------


def _words(text: str) -> frozenset[str]:
    return frozenset(text.split())


# Name endings and declared types that no accepted file ever has (programs, scripts, pages,
# markup, documents, archives): refused at create, before any byte, with the answer the upload
# would get. A narrow first filter only: a name proves nothing (a photo may be called `photo`,
# or `IMG_1234.JPG.download`), so anything not listed is created and judged by its bytes, which
# stay the real check (a `.jpg` that is a PHP script is refused when its first bytes arrive).
NEVER_EXTENSIONS = _words(
    """
    php php3 php4 php5 php7 php8 phtml pht phps phar asp aspx ascx ashx asmx jsp jspx cfm cgi
    pl py pyc rb sh bash zsh csh ksh ps1 psm1 bat cmd vbs vbe wsf wsh hta
    html htm xhtml xht shtml mht mhtml svg svgz xml xsl xslt js mjs cjs css json wasm swf
    exe dll com scr pif msi msp cpl sys ocx jar class apk aab ipa dmg pkg deb rpm so dylib lnk reg
    pdf doc docx xls xlsx ppt pptx odt ods odp rtf txt csv md zip rar 7z gz tgz bz2 xz tar iso
    """
)
NEVER_TYPES = _words(
    """
    image/svg+xml application/x-php application/x-httpd-php application/php application/javascript
    application/x-javascript application/ecmascript application/xhtml+xml application/xml
    application/json application/wasm application/x-sh application/x-csh application/x-msdownload
    application/x-msdos-program application/x-dosexec application/x-executable
    application/vnd.microsoft.portable-executable application/java-archive application/x-java-archive
    application/x-shockwave-flash application/pdf application/zip application/x-bat application/hta
    """
)
NEVER_TYPE_FAMILIES = ("text/",)  # text/html, text/x-php, text/javascript, text/plain …


def never_accepted(file_name: str, content_type: str) -> str | None:
    """What in the name or declared type can never be accepted, said for people; else None."""
    # Windows drops trailing dots and spaces: "shell.php." is saved as "shell.php".
    stem, dot, ext = file_name.rstrip(". ").rpartition(".")
    ext = ext.lower() if dot and stem else ""
    if ext in NEVER_EXTENSIONS:
        return f"{ext.upper()} files"
    declared = content_type.split(";")[0].strip().lower()
    if declared in NEVER_TYPES or declared.startswith(NEVER_TYPE_FAMILIES):
        return f"{declared} files"
    return None


def upload_create(*, owner: Any, file_name: str, size: int, content_type: str = "") -> MediaItem:
    """A Pending item awaiting ``size`` bytes, if its name, type and the owner's limits allow it."""
    refused = never_accepted(clean_file_name(file_name), content_type)
    if refused:
        # The code and status the upload itself would get once its bytes were sniffed.
        raise UploadRefused("unsupported_type", f"{refused} are not accepted here; send a video, audio or image file.")
    if size < 1:
        raise UploadRefused("invalid", "The file is empty; there is nothing to upload.")
    if size > settings.UPLOAD_MAX_BYTES:
        raise UploadRefused(
            "too_large", f"The file is {_human(size)}; the largest we accept is {_human(settings.UPLOAD_MAX_BYTES)}."
        )
    with transaction.atomic():
        # Serialises one user's creates, so two at once cannot both squeeze under a limit.
        get_user_model().objects.select_for_update().filter(pk=owner.pk).first()
        mine = MediaItem.objects.filter(owner=owner)
        active_since = timezone.now() - timedelta(seconds=settings.UPLOAD_EXPIRY_SECONDS)
        unfinished = mine.filter(
            status=MediaStatus.PENDING, upload_finished_at__isnull=True, updated_at__gt=active_since
        ).count()
        if unfinished >= settings.UPLOAD_MAX_UNFINISHED:
            raise UploadRefused(
                "too_many_uploads",
                f"You have {unfinished} uploads in progress; finish or delete one before starting another.",
            )
        held = mine.exclude(source_key="").aggregate(total=Sum("size"))["total"] or 0
        if held + size > settings.UPLOAD_QUOTA_BYTES:
            raise UploadRefused(
                "quota_exceeded",
                f"This upload ({_human(size)}) would take you over your storage quota of "
                f"{_human(settings.UPLOAD_QUOTA_BYTES)} ({_human(held)} used).",
            )
        from media_app.services import media_item_create

        item = media_item_create(
            owner=owner,
            original_name=clean_file_name(file_name),
            size=size,
            declared_content_type="".join(ch for ch in content_type if ch.isprintable())[:255],
        )
    logger.info("upload created item=%s owner=%s size=%d", item.pk, owner.pk, size)
    return item


# --- receive bytes ----------------------------------------------------------------------------


def upload_append(*, item: MediaItem, offset: int, stream: IO[bytes], content_length: int | None) -> MediaItem:
    """Append a tus chunk at ``offset``; the chunk that brings the last byte completes the item."""
    with _upload_lock(item.pk) as lock:
        item.refresh_from_db()
        _check_open(item)
        path = staging_path(item.pk)
        current = path.stat().st_size if path.exists() else 0
        if offset != current:
            raise UploadRefused(
                "offset_mismatch", f"The upload is at byte {current}, not {offset}; resume from {current}."
            )
        remaining = item.size - current
        if content_length is not None and content_length > remaining:
            raise UploadRefused(
                "too_large", f"This chunk ({content_length} bytes) goes past the declared size of {item.size} bytes."
            )
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "ab") as fh:
            if fh.tell() != current:  # pragma: no cover - the lock makes this impossible
                raise UploadRefused("offset_mismatch", "The upload changed underneath this request; resume it.")
            try:
                received = _copy(stream, fh, limit=remaining, lock=lock)
            except UploadRefused:
                fh.truncate(current)
                raise
        new_offset = current + received
        # Activity postpones expiry.
        MediaItem.objects.filter(pk=item.pk).update(updated_at=timezone.now())
        if current < SNIFF_BYTES and (new_offset >= SNIFF_BYTES or new_offset == item.size):
            # Refuse a wrong type as soon as its first bytes are in, not after the whole file.
            with open(path, "rb") as fh:
                _sniff_or_refuse(item, fh.read(SNIFF_BYTES))
        if new_offset == item.size:
            _store_staged(item, path)
            return _complete(item)
        item.refresh_from_db()
        return item


def upload_store(*, item: MediaItem, stream: IO[bytes], content_length: int | None, expected_size: int) -> MediaItem:
    """A whole-file PUT (our presigned URL): staged, size-checked, then moved into storage."""
    with _upload_lock(item.pk) as lock:
        item.refresh_from_db()
        _check_open(item)
        if expected_size != item.size:
            raise UploadRefused("size_mismatch", "This upload URL was issued for a different size.")
        if content_length is not None and content_length > settings.UPLOAD_MAX_BYTES:
            raise UploadRefused("too_large", f"The largest file we accept is {_human(settings.UPLOAD_MAX_BYTES)}.")
        if content_length is not None and content_length != item.size:
            raise UploadRefused(
                "size_mismatch", f"The body is {content_length} bytes but {item.size} bytes were declared."
            )
        tmp = Path(settings.UPLOAD_STAGING_DIR) / f"{item.pk}.put-{uuid.uuid4().hex[:8]}"
        tmp.parent.mkdir(parents=True, exist_ok=True)
        try:
            with open(tmp, "wb") as fh:
                try:
                    received = _copy(stream, fh, limit=item.size, lock=lock)
                except UploadRefused:
                    raise UploadRefused(
                        "size_mismatch", f"The body is longer than the {item.size} bytes declared."
                    ) from None
            if received != item.size:
                raise UploadRefused(
                    "size_mismatch", f"The body is {received} bytes but {item.size} bytes were declared."
                )
            with open(tmp, "rb") as fh:
                _sniff_or_refuse(item, fh.read(SNIFF_BYTES))
            _store_staged(item, tmp)
            staging_path(item.pk).unlink(missing_ok=True)  # a tus attempt this PUT replaces
        finally:
            tmp.unlink(missing_ok=True)
        MediaItem.objects.filter(pk=item.pk).update(updated_at=timezone.now())
    logger.info("upload stored item=%s bytes=%d", item.pk, item.size)
    item.refresh_from_db()
    return item


def _copy(stream: IO[bytes], out: IO[bytes], *, limit: int, lock: Any) -> int:
    """Copy at most ``limit`` bytes in chunks; more than that is refused (and left to the caller)."""
    received = 0
    last_extend = time.monotonic()
    while True:
        chunk = stream.read(min(CHUNK_BYTES, limit - received + 1))
        if not chunk:
            return received
        received += len(chunk)
        if received > limit:
            raise UploadRefused("too_large", f"The body is longer than the {limit} bytes still expected.")
        out.write(chunk)
        if time.monotonic() - last_extend > LOCK_SECONDS / 3:
            # A slow client (under a WSGI server, reading from the socket) keeps its lock.
            lock.extend(LOCK_SECONDS, replace_ttl=True)
            last_extend = time.monotonic()


def _store_staged(item: MediaItem, path: Path) -> None:
    """Put a finished staging file into storage under the item's generated key."""
    key = item.source_key
    if default_storage.exists(key):
        default_storage.delete(key)
    with open(path, "rb") as fh:
        saved = default_storage.save(key, _StagedFile(fh, path))
    path.unlink(missing_ok=True)
    if saved != key:  # pragma: no cover - only if another writer raced the delete above
        MediaItem.objects.filter(pk=item.pk).update(source_key=saved)
        item.source_key = saved


class _StagedFile(File):  # type: ignore[type-arg]
    """A file on local disk: FileSystemStorage renames it into place instead of copying."""

    def __init__(self, fh: IO[bytes], path: Path) -> None:
        super().__init__(fh, name=path.name)
        self._path = path

    def temporary_file_path(self) -> str:
        return str(self._path)


# --- complete ---------------------------------------------------------------------------------


def upload_complete(*, item: MediaItem) -> MediaItem:
    """Check size and content, then queue processing once (a second call queues nothing)."""
    # Waits for a chunk being written rather than refusing: a client may say "complete" while
    # its last PATCH is still being stored.
    with _upload_lock(item.pk, wait=LOCK_SECONDS / 2):
        return _complete(item)


def _complete(item: MediaItem) -> MediaItem:
    item.refresh_from_db()
    if item.status == MediaStatus.FAILED:
        raise UploadRefused("upload_failed", item.error_message or "This upload has failed.")
    if not upload_is_open(item):
        return item  # already completed: completing twice enqueues once
    staged = staging_path(item.pk)
    if staged.exists() and staged.stat().st_size == item.size:
        _store_staged(item, staged)
    if not item.source_key or not default_storage.exists(item.source_key):
        have = upload_offset(item)
        raise UploadRefused(
            "not_uploaded",
            f"Only {have} of {item.size} bytes have arrived; upload the rest first."
            if have
            else "No bytes have been uploaded for this item yet.",
        )
    stored = default_storage.size(item.source_key)
    if stored != item.size:
        default_storage.delete(item.source_key)
        raise UploadRefused(
            "size_mismatch", f"{stored} bytes were stored but {item.size} were declared; upload the file again."
        )
    sniffed = _sniff_or_refuse(item, _read_head(item.source_key))
    with transaction.atomic():
        # The bytes settle the kind of an image; audio/video is settled by the worker's probe
        # (the web process never runs a decoder), which also measures duration.
        queued = media_processing_start(
            item=item,
            kind="image" if sniffed.kind == "image" else "",
            content_type=sniffed.mime,
            info={"sniffed": to_json(sniffed)},
        )
    logger.info("upload completed item=%s type=%s queued=%s", item.pk, sniffed.mime, queued)
    item.refresh_from_db()
    return item


def _sniff_or_refuse(item: MediaItem, head: bytes) -> Sniffed:
    """The type from the bytes, if it is one we accept; otherwise the item fails (see _refuse)."""
    try:
        sniffed = sniff_bytes(head)
    except (InvalidInput, UnsupportedCodec) as exc:
        _refuse(item, exc)
    if sniffed.mime not in settings.UPLOAD_ALLOWED_CONTENT_TYPES:
        _refuse(item, UnsupportedCodec(f"{sniffed.mime} files are not accepted here."))
    return sniffed


def _refuse(item: MediaItem, exc: MediaError) -> NoReturn:
    """Fail the item with the reason, drop its bytes, and refuse the request. Nothing is queued."""
    staging_path(item.pk).unlink(missing_ok=True)
    if item.source_key and default_storage.exists(item.source_key):
        default_storage.delete(item.source_key)
    lifecycle.failed(
        item_id=item.pk,
        error=ErrorReport(exc.code, exc.message),
        message=f"Upload refused: {exc.message}",
        source_gone=True,
    )
    logger.info("upload refused item=%s code=%s", item.pk, exc.code)
    raise UploadRefused("unsupported_type", exc.message)


def _read_head(key: str, size: int = SNIFF_BYTES) -> bytes:
    """The first bytes of a stored object, without fetching the rest (a ranged GET on S3)."""
    s3 = s3_storage()
    if s3 is not None:
        obj = s3.bucket.Object(s3_object_name(s3, key))
        return bytes(obj.get(Range=f"bytes=0-{size - 1}")["Body"].read())
    with default_storage.open(key, "rb") as fh:
        return bytes(fh.read(size))


# --- delete, retry, expire --------------------------------------------------------------------


def upload_delete(*, item: MediaItem) -> None:
    """Cancel processing, remove every stored byte of the item, then the item itself."""
    with _upload_lock(item.pk):
        item.refresh_from_db()
        # Watchers see the end; the running task is killed after commit, and a stage that
        # escapes the kill sees Failed at its next cancel check.
        lifecycle.cancelled(item_id=item.pk, message="The upload was deleted.", deleted=True)
        item.refresh_from_db()
        staging_path(item.pk).unlink(missing_ok=True)
        media_item_remove_files(item, source=True)
        MediaItem.objects.filter(pk=item.pk).delete()
        # The last word to other tabs and clients: it is gone (a Failed item would otherwise
        # keep the Retry its failure offered).
        lifecycle.deleted(item=item)
    logger.info("upload deleted item=%s", item.pk)


def upload_retry(*, item: MediaItem) -> MediaItem:
    """Send a Failed item back to Pending and queue it; finished stages are skipped on rerun."""
    item.refresh_from_db()
    if item.status != MediaStatus.FAILED:
        raise UploadRefused("not_failed", f"Only failed items can be retried; this one is {item.status}.")
    if not item.source_key or not default_storage.exists(item.source_key):
        raise UploadRefused(
            "source_missing", "The uploaded file is gone, so there is nothing to retry; upload it again."
        )
    if not lifecycle.retried(item_id=item.pk, message="Retry requested"):
        item.refresh_from_db()
        raise UploadRefused("not_failed", f"Only failed items can be retried; this one is {item.status}.")
    logger.info("retry queued item=%s", item.pk)
    item.refresh_from_db()
    return item


def uploads_expire(*, now: datetime | None = None) -> int:
    """Remove uploads idle past UPLOAD_EXPIRY_SECONDS and stray staging files. For the beat schedule."""
    now = now or timezone.now()
    cutoff = now - timedelta(seconds=settings.UPLOAD_EXPIRY_SECONDS)
    removed = 0
    abandoned = MediaItem.objects.filter(status=MediaStatus.PENDING, upload_finished_at__isnull=True)
    for item in abandoned.filter(updated_at__lte=cutoff):
        try:
            upload_delete(item=item)
            removed += 1
        except UploadRefused:
            continue  # a chunk is arriving right now: not abandoned
    staging = Path(settings.UPLOAD_STAGING_DIR)
    if staging.is_dir():
        for path in staging.iterdir():
            if path.stat().st_mtime < cutoff.timestamp():
                path.unlink(missing_ok=True)
    if removed:
        logger.info("expired uploads removed=%d", removed)
    return removed


# --- helpers ----------------------------------------------------------------------------------


def _check_open(item: MediaItem) -> None:
    if item.status == MediaStatus.FAILED:
        raise UploadRefused("upload_failed", item.error_message or "This upload has failed.")
    if not upload_is_open(item):
        raise UploadRefused("upload_finished", "This upload is already complete.")
    if upload_is_expired(item):
        raise UploadRefused("upload_expired", "This upload expired after a period without activity; start again.")


@cache
def _redis(url: str) -> redis.Redis:
    return redis.Redis.from_url(url)


def upload_lock_name(item_id: Any) -> str:
    return f"uploads:lock:{item_id}"


@contextmanager
def _upload_lock(item_id: Any, *, wait: float = 0) -> Iterator[Any]:
    """Exclusive right to write one upload, across web processes; refused if held (after ``wait`` s)."""
    lock = _redis(settings.UPLOADS_REDIS_URL).lock(upload_lock_name(item_id), timeout=LOCK_SECONDS)
    if not lock.acquire(blocking=wait > 0, blocking_timeout=wait or None):
        raise UploadRefused("upload_locked", "Another request is writing to this upload right now; try again shortly.")
    try:
        yield lock
    finally:
        try:
            lock.release()
        except redis.exceptions.LockError:
            logger.warning("upload lock of %s expired while held", item_id)


def _human(size: int) -> str:
    """1.5 GB, 300 MB: Django's own wording, with a plain space."""
    return str(filesizeformat(size)).replace("\xa0", " ")
