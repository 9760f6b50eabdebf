"""Upload services: how bytes become an item's source, and the limits on the way.

Bytes never sit in memory whole, and a tus upload never sits on one web machine's disk: each
PATCH appends to the upload *in storage*, so the next PATCH may land on any web process. The
offset (``upload_received``) and, on S3, the multipart upload it is building (``upload_parts``)
are in the database; the row is the commit point, so bytes a crashed PATCH wrote past it are
discarded (local) or never listed (S3) and the client resumes from the recorded offset.

- Local storage: the chunk is appended in place to the source file (the one disk of a one-box
  setup; several boxes use S3) and synced before the offset is recorded. Nothing is copied at
  the end.
- S3: as tusd's S3 store does, bytes go into a multipart upload in parts of at least 5 MiB
  (S3's floor for every part but the last); a shorter tail waits in a ``.tail-<offset>`` object
  beside the source and is prepended to the next PATCH. The last byte completes the multipart
  upload, so the object at ``source_key`` is the whole file.

A presigned PUT of ours (one request, one process) is received in ``UPLOAD_STAGING_DIR`` and
lands in storage only when its size is right; an S3 presigned PUT goes straight to the bucket.
Either way ``upload_complete`` then checks the size, sniffs the first bytes and queues
processing once.

Writers to one upload (a PATCH, a PUT, a delete) hold a Redis lock, so two web processes never
interleave bytes of the same upload: the second is refused, not queued.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import time
import unicodedata
import uuid
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
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
# S3: every part of a multipart upload but the last is at least 5 MiB, and there are at most
# 10,000 parts. A PATCH's bytes are cut into parts of PART_BYTES while at least a minimum part
# is left over (so one PATCH holds at most PART_BYTES + 5 MiB in memory); a rest below the
# minimum is the tail object.
MIN_PART_BYTES = 5 * 1024**2
PART_BYTES = 8 * 1024**2
MAX_PARTS = 10_000
# Parts of one PATCH in flight at once while the next is read (2 gave 1.4x on moto; real S3,
# latency-bound, gains more); each holds its bytes in memory until S3 has them.
PARTS_IN_FLIGHT = 2
# Enough for every magic number and the MP4 brand list sniff_bytes looks at.
SNIFF_BYTES = 4096
NAME_LIMIT = 255
LOCK_SECONDS = 60
# A PATCH streams its body while it holds the lock (media_app.api.tus_stream), so a PATCH whose
# client vanished holds it until its server notices and lets go (after any S3 part in flight). A
# client resuming at once, perhaps on another web process, waits this long for it rather than
# being refused (tusd waits too, 20 s); a writer that is really alive still gets 423 after it.
PATCH_LOCK_WAIT = 5.0


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


def upload_offset(item: MediaItem) -> int:
    """Bytes received so far: the recorded offset while open, the whole size once done."""
    if not upload_is_open(item):
        return item.size
    return item.upload_received


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
    with _upload_lock(item.pk, wait=PATCH_LOCK_WAIT) as lock:
        item.refresh_from_db()
        _check_open(item)
        current = item.upload_received
        if offset != current:
            raise UploadRefused(
                "offset_mismatch", f"The upload is at byte {current}, not {offset}; resume from {current}."
            )
        remaining = item.size - current
        if content_length is not None and content_length > remaining:
            raise UploadRefused(
                "too_large", f"This chunk ({content_length} bytes) goes past the declared size of {item.size} bytes."
            )
        if not remaining:
            return _complete(item)  # every byte is in already; completing them failed before
        s3 = s3_storage()
        if s3 is not None:
            new_offset = _append_s3(s3, item, _chunks(stream, limit=remaining, lock=lock))
        else:
            new_offset = _append_local(item, stream, limit=remaining, lock=lock)
        if new_offset == item.size:
            return _complete(item)
        return item  # _record set what changed: no query to read it back


def _append_local(item: MediaItem, stream: IO[bytes], *, limit: int, lock: Any) -> int:
    """Append in place to the source file in storage: no staging copy, no move at the end."""
    current = item.upload_received
    path = Path(default_storage.path(item.source_key))
    path.parent.mkdir(parents=True, exist_ok=True)
    # Unbuffered: each read of the body goes to the file as it is, and its writeback starts at once.
    with open(path, "ab", buffering=0) as fh:
        on_disk = fh.seek(0, os.SEEK_END)
        if on_disk < current:  # pragma: no cover - only if the disk lost synced bytes
            _record(item, current, on_disk, item.upload_parts)
            raise UploadRefused("offset_mismatch", f"The upload is at byte {on_disk}; resume from {on_disk}.")
        # Bytes past the recorded offset are a PATCH that died before recording them: not ours.
        fh.truncate(current)
        try:
            received = _write_body(stream, fh.fileno(), current, limit=limit, lock=lock)
        except BaseException:  # refused, or the client left mid-chunk: none of it counts
            fh.truncate(current)
            raise
        # On disk before the offset says so: a crash never leaves a recorded offset past the data.
        os.fdatasync(fh.fileno())
    new_offset = current + received
    if current < SNIFF_BYTES and (new_offset >= SNIFF_BYTES or new_offset == item.size):
        # Refuse a wrong type as soon as its first bytes are in, not after the whole file.
        with open(path, "rb") as fh:
            _sniff_or_refuse(item, fh.read(SNIFF_BYTES))
    _record(item, current, new_offset, {})
    return new_offset


def _write_body(stream: IO[bytes], fd: int, start: int, *, limit: int, lock: Any) -> int:
    """Write a PATCH's body at the end of ``fd`` (at ``start``); more than ``limit`` bytes is refused.

    The disk writes while the next bytes arrive (writeback starts as each write lands), so the
    fdatasync after the body waits for the last write's worth, not the whole PATCH (half its
    wait, measured). A streamed body (tus_stream) writes itself from the event loop.
    """
    received = 0

    def wrote(size: int) -> None:
        nonlocal received
        _start_writeback(fd, start + received, size)
        received += size

    write_to = getattr(stream, "write_to", None)
    if write_to is None:
        for chunk in _chunks(stream, limit=limit, lock=lock):
            view = memoryview(chunk)
            while view:
                view = view[os.write(fd, view) :]
            wrote(len(chunk))
        return received
    last_extend = time.monotonic()
    while write_to(fd, limit - received, seconds=LOCK_SECONDS / 3, wrote=wrote):
        if time.monotonic() - last_extend > LOCK_SECONDS / 3:  # a slow client keeps its lock
            lock.extend(LOCK_SECONDS, replace_ttl=True)
            last_extend = time.monotonic()
    if stream.read(1):
        raise UploadRefused("too_large", f"The body is longer than the {limit} bytes still expected.")
    return received


@cache
def _sync_file_range() -> Any | None:
    """Linux's sync_file_range(2) (Python has no binding), or None elsewhere."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        call = libc.sync_file_range
    except (OSError, AttributeError, TypeError):  # pragma: no cover - not Linux
        return None
    call.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    return call


SYNC_FILE_RANGE_WRITE = 2  # start writeback of the range's dirty pages, without waiting


def _start_writeback(fd: int, offset: int, length: int) -> None:
    """Ask the kernel to start writing a range to disk now (a hint: failing it changes nothing)."""
    call = _sync_file_range()
    if call is not None:
        call(fd, offset, length, SYNC_FILE_RANGE_WRITE)


def _append_s3(s3: Any, item: MediaItem, chunks: Iterator[bytes]) -> int:
    """Add a PATCH's bytes to the item's S3 multipart upload: the old tail first, then whole
    parts while at least a minimum part is left over; the last byte's PATCH sends everything.
    Parts upload while the next ones are read, a few at a time (S3 is latency-bound)."""
    current = item.upload_received
    state = dict(item.upload_parts)
    parts: list[dict[str, Any]] = list(state.get("parts", []))
    parts_end = sum(p["Size"] for p in parts)
    old_tail = state.get("tail", "")
    buf = bytearray(_s3_read_tail(s3, item, old_tail, current - parts_end))
    floor, cut = _part_sizes(item.size)
    sniffed = current >= SNIFF_BYTES
    received = 0
    sending: deque[Future[dict[str, Any]]] = deque()
    # django-storages makes a boto3 session per thread (slow); its client is thread-safe: share it.
    client = _s3_client(s3)

    def send(pool: ThreadPoolExecutor, data: bytes) -> None:
        if "id" not in state:
            state["id"] = _s3_start(s3, item.source_key)
        while len(sending) >= PARTS_IN_FLIGHT:  # at most this many parts held in memory
            parts.append(sending.popleft().result())
        number = len(parts) + len(sending) + 1
        sending.append(pool.submit(_s3_part, client, s3, item.source_key, state["id"], number, data))

    with ThreadPoolExecutor(PARTS_IN_FLIGHT, thread_name_prefix="s3-part") as pool:
        for chunk in chunks:
            buf += chunk
            received += len(chunk)
            if not sniffed and (len(buf) >= SNIFF_BYTES or current + received == item.size):
                # Parts are >= 5 MiB, so below SNIFF_BYTES the buffer starts at byte 0: refuse a
                # wrong type before any of it is stored.
                _sniff_or_refuse(item, bytes(buf[:SNIFF_BYTES]))
                sniffed = True
            while len(buf) >= cut + floor:
                send(pool, bytes(memoryview(buf)[:cut]))
                del buf[:cut]
        new_offset = current + received
        last = new_offset == item.size
        tail = ""
        if last and "id" not in state:
            # The whole file fits one request: a plain PUT, no multipart upload.
            _s3_put(s3, item.source_key, bytes(buf))
        elif last or len(buf) >= floor:
            send(pool, bytes(buf))
        elif buf:
            # Named by its start, so a PATCH that dies after writing a longer tail or a part
            # never changes the bytes that the recorded offset points at.
            tail = f"{item.source_key}.tail-{new_offset - len(buf)}"
            _s3_put(s3, tail, bytes(buf))
        parts += [future.result() for future in sending]
    new_state: dict[str, Any] = {"id": state["id"], "parts": parts} if "id" in state else {}
    if tail:
        new_state["tail"] = tail
    _record(item, current, new_offset, new_state)
    if old_tail and old_tail != tail:
        _s3_delete(s3, old_tail)
    if last and "id" in state:
        _s3_complete(s3, item)
    return new_offset


def _part_sizes(size: int) -> tuple[int, int]:
    """(smallest part, size parts are cut at) for an upload of ``size`` bytes: big enough that
    the parts of any upload, however small its PATCHes, stay within S3's 10,000."""
    floor = max(MIN_PART_BYTES, -(-size // (MAX_PARTS - 1)))
    return floor, max(PART_BYTES, floor)


def _record(item: MediaItem, current: int, new_offset: int, parts: dict[str, Any]) -> None:
    """The commit point of a PATCH: the new offset and parts, only if nothing moved meanwhile
    (the lock should make that so; this catches a lock that expired under a stalled writer)."""
    now = timezone.now()
    moved = MediaItem.objects.filter(pk=item.pk, upload_received=current).update(
        upload_received=new_offset, upload_parts=parts, updated_at=now
    )
    if not moved:
        raise UploadRefused("offset_mismatch", "The upload changed underneath this request; ask where to resume.")
    item.upload_received, item.upload_parts, item.updated_at = new_offset, parts, now


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
            _forget_tus(item)  # a tus attempt this PUT replaces
        finally:
            tmp.unlink(missing_ok=True)
        # Every byte is in: a tus HEAD now says so (and finishes the upload if nobody completes it).
        MediaItem.objects.filter(pk=item.pk).update(upload_received=item.size, updated_at=timezone.now())
    logger.info("upload stored item=%s bytes=%d", item.pk, item.size)
    item.refresh_from_db()
    return item


def _chunks(stream: IO[bytes], *, limit: int, lock: Any) -> Iterator[bytes]:
    """The body in chunks of at most CHUNK_BYTES; more than ``limit`` bytes is refused."""
    received = 0
    last_extend = time.monotonic()
    while True:
        chunk = stream.read(min(CHUNK_BYTES, limit - received + 1))
        if not chunk:
            return
        received += len(chunk)
        if received > limit:
            raise UploadRefused("too_large", f"The body is longer than the {limit} bytes still expected.")
        yield chunk
        if time.monotonic() - last_extend > LOCK_SECONDS / 3:
            # A slow client (under a WSGI server, reading from the socket) keeps its lock.
            lock.extend(LOCK_SECONDS, replace_ttl=True)
            last_extend = time.monotonic()


def _copy(stream: IO[bytes], out: IO[bytes], *, limit: int, lock: Any) -> int:
    """Copy at most ``limit`` bytes; more than that is refused (and left to the caller)."""
    received = 0
    for chunk in _chunks(stream, limit=limit, lock=lock):
        out.write(chunk)
        received += len(chunk)
    return received


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
    s3 = s3_storage()
    if s3 is not None and item.upload_received == item.size and "id" in item.upload_parts:
        _s3_complete(s3, item)  # every byte is in its parts, but completing them failed before
    stored = default_storage.size(item.source_key) if default_storage.exists(item.source_key) else None
    if stored != item.size and (stored is None or 0 < item.upload_received < item.size):
        # Nothing stored, or a tus upload under way (on local storage its file grows in place).
        have = upload_offset(item)
        raise UploadRefused(
            "not_uploaded",
            f"Only {have} of {item.size} bytes have arrived; upload the rest first."
            if have
            else "No bytes have been uploaded for this item yet.",
        )
    if stored != item.size:
        _restart(item)
        raise UploadRefused(
            "size_mismatch", f"{stored} bytes were stored but {item.size} were declared; upload the file again."
        )
    sniffed = _sniff_or_refuse(item, _read_head(item.source_key))
    if item.upload_parts:
        _forget_tus(item)  # a tus attempt that a whole-file PUT replaced
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
    _forget_tus(item)
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


# --- S3 multipart bookkeeping ------------------------------------------------------------------


def _s3_client(s3: Any) -> Any:
    return s3.connection.meta.client


def _s3_start(s3: Any, key: str) -> str:
    """A new multipart upload for ``key``; its id."""
    created = _s3_client(s3).create_multipart_upload(
        Bucket=s3.bucket_name, Key=s3_object_name(s3, key), ContentType="application/octet-stream"
    )
    return str(created["UploadId"])


def _s3_part(client: Any, s3: Any, key: str, upload_id: str, number: int, data: bytes) -> dict[str, Any]:
    """Upload one part (from a PATCH's part pool: ``client`` is the request thread's)."""
    answer = client.upload_part(
        Bucket=s3.bucket_name, Key=s3_object_name(s3, key), UploadId=upload_id, PartNumber=number, Body=data
    )
    return {"PartNumber": number, "ETag": answer["ETag"], "Size": len(data)}


def _s3_complete(s3: Any, item: MediaItem) -> None:
    """Join the recorded parts into the object at ``source_key``; then the tails go."""
    from botocore.exceptions import ClientError

    state = item.upload_parts
    parts = [{"PartNumber": p["PartNumber"], "ETag": p["ETag"]} for p in state["parts"]]
    try:
        _s3_client(s3).complete_multipart_upload(
            Bucket=s3.bucket_name,
            Key=s3_object_name(s3, item.source_key),
            UploadId=state["id"],
            MultipartUpload={"Parts": parts},
        )
    except ClientError as exc:
        # Completed by an earlier attempt whose answer was lost: the object is there, whole.
        if exc.response.get("Error", {}).get("Code") != "NoSuchUpload":
            raise
        if not (default_storage.exists(item.source_key) and default_storage.size(item.source_key) == item.size):
            _restart(item)
            raise UploadRefused(
                "offset_mismatch", "This upload's parts are gone from storage; resume from 0."
            ) from None
    _forget_tus(item, abort=False)


def _forget_tus(item: MediaItem, *, abort: bool = True) -> None:
    """Drop a tus upload's S3 bookkeeping: abort its multipart upload (unless it was just
    completed) and delete its tail objects, including any a dead PATCH left behind."""
    s3 = s3_storage()
    state = item.upload_parts
    if s3 is not None and item.source_key:
        if abort and "id" in state:
            _s3_abort(s3, s3_object_name(s3, item.source_key), state["id"])
        folder, _, base = item.source_key.rpartition("/")
        try:
            names = default_storage.listdir(folder)[1]
        except FileNotFoundError:  # pragma: no cover - S3 lists nothing rather than failing
            names = []
        for name in names:
            if name.startswith(f"{base}.tail-"):
                _s3_delete(s3, f"{folder}/{name}")
    if state:
        MediaItem.objects.filter(pk=item.pk).update(upload_parts={})
        item.upload_parts = {}


def _restart(item: MediaItem) -> None:
    """Back to byte 0: what was stored cannot make the declared file (it is gone or the wrong size)."""
    _forget_tus(item)
    if default_storage.exists(item.source_key):
        default_storage.delete(item.source_key)
    MediaItem.objects.filter(pk=item.pk).update(upload_received=0, upload_parts={})
    item.upload_received, item.upload_parts = 0, {}


def _s3_abort(s3: Any, name: str, upload_id: str) -> None:
    from botocore.exceptions import ClientError

    try:
        _s3_client(s3).abort_multipart_upload(Bucket=s3.bucket_name, Key=name, UploadId=upload_id)
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") != "NoSuchUpload":
            raise


def _s3_put(s3: Any, key: str, data: bytes) -> None:
    _s3_client(s3).put_object(
        Bucket=s3.bucket_name, Key=s3_object_name(s3, key), Body=data, ContentType="application/octet-stream"
    )


def _s3_read_tail(s3: Any, item: MediaItem, key: str, size: int) -> bytes:
    """The first ``size`` bytes of the tail: a longer tail object is a dead PATCH's, past the offset."""
    from botocore.exceptions import ClientError

    if not size:
        return b""
    try:
        answer = _s3_client(s3).get_object(
            Bucket=s3.bucket_name, Key=s3_object_name(s3, key), Range=f"bytes=0-{size - 1}"
        )
        data = bytes(answer["Body"].read())
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") not in ("NoSuchKey", "InvalidRange"):
            raise
        data = b""
    if len(data) != size:  # pragma: no cover - only if someone deleted or cut the tail object
        _restart(item)
        raise UploadRefused("offset_mismatch", "Part of this upload is gone from storage; resume from 0.")
    return data


def _s3_delete(s3: Any, key: str) -> None:
    _s3_client(s3).delete_object(Bucket=s3.bucket_name, Key=s3_object_name(s3, key))


def _s3_stray_uploads(s3: Any, cutoff: datetime) -> int:
    """Abort multipart uploads under ``uploads/`` that no open item records, started before
    ``cutoff`` (a PATCH that died between starting one and recording it)."""
    open_ids = {
        parts.get("id")
        for parts in MediaItem.objects.filter(status=MediaStatus.PENDING, upload_finished_at__isnull=True).values_list(
            "upload_parts", flat=True
        )
    }
    client, prefix = _s3_client(s3), s3_object_name(s3, "uploads/")
    aborted = 0
    for page in client.get_paginator("list_multipart_uploads").paginate(Bucket=s3.bucket_name, Prefix=prefix):
        for upload in page.get("Uploads", []):
            if upload["UploadId"] not in open_ids and upload["Initiated"] < cutoff:
                _s3_abort(s3, upload["Key"], upload["UploadId"])
                aborted += 1
    return aborted


# --- delete, retry, expire --------------------------------------------------------------------


def upload_delete(*, item: MediaItem) -> None:
    """Cancel processing, remove every stored byte of the item, then the item itself."""
    with _upload_lock(item.pk):
        item.refresh_from_db()
        # Watchers see the end; the running task is killed after commit, and a stage that
        # escapes the kill sees Failed at its next cancel check.
        lifecycle.cancelled(item_id=item.pk, message="The upload was deleted.", deleted=True)
        item.refresh_from_db()
        _forget_tus(item)
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
    """Remove uploads idle past UPLOAD_EXPIRY_SECONDS (with their S3 multipart uploads and tails),
    multipart uploads no item records, and stray PUT staging files. For the beat schedule."""
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
    s3 = s3_storage()
    if s3 is not None:
        _s3_stray_uploads(s3, cutoff)
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
