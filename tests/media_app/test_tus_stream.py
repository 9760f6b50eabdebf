"""A tus chunk streams from the ASGI server into storage (media_app.api.tus_stream).

Driven through ``config.asgi.application`` with a hand-made ``receive``, so each test decides
when the client's bytes arrive and can look at storage in between.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from django.core.files.storage import default_storage
from rest_framework.authtoken.models import Token

from config.asgi import application
from media_app.models import MediaItem
from media_app.uploads import CHUNK_BYTES, upload_create

pytest_plugins = ["tests.media_app.test_api_support"]
pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("local_storage")]

MESSAGE = 64 * 1024  # what uvicorn hands on per receive() at most, about


def _scope(
    item_id: Any, key: str, offset: int, length: int, *, create: dict[bytes, bytes] | None = None
) -> dict[str, Any]:
    """A PATCH at ``offset``; with ``create`` (more headers), a POST that creates an upload with its first bytes."""
    headers = {
        b"host": b"testserver",
        b"authorization": f"Token {key}".encode(),
        b"tus-resumable": b"1.0.0",
        b"upload-offset": str(offset).encode(),
        b"content-type": b"application/offset+octet-stream",
        b"content-length": str(length).encode(),
        **(create or {}),
    }
    path = "/api/tus/" if create else f"/api/tus/{item_id}"
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST" if create else "PATCH",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": list(headers.items()),
        "client": ("127.0.0.1", 50000),
        "server": ("testserver", 80),
    }


def _patch(
    scope: dict[str, Any], data: bytes, *, before_last: Callable[[], bool] = lambda: True, cut_after: int | None = None
) -> tuple[int, dict[str, str], int]:
    """Run one PATCH through the ASGI app: (status, headers, body messages taken before the answer).
    The last message waits until ``before_last()`` holds; ``cut_after`` bytes, then the client leaves."""
    pieces = [data[i : i + MESSAGE] for i in range(0, len(data), MESSAGE)]
    taken = 0
    answer: dict[str, Any] = {}

    async def run() -> None:
        async def receive() -> dict[str, Any]:
            nonlocal taken
            if cut_after is not None and taken * MESSAGE >= cut_after:
                return {"type": "http.disconnect"}
            if taken == len(pieces) - 1:
                async with asyncio.timeout(30):  # a handler that spools never lets the view start
                    while not await asyncio.to_thread(before_last):
                        await asyncio.sleep(0.01)
            if taken >= len(pieces):
                await asyncio.Event().wait()  # nothing more: the client waits for the answer
            taken += 1
            return {"type": "http.request", "body": pieces[taken - 1], "more_body": taken < len(pieces)}

        async def send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                answer["status"] = message["status"]
                answer["headers"] = {k.decode().lower(): v.decode() for k, v in message["headers"]}
                answer["taken"] = taken

        await application(scope, receive, send)

    asyncio.run(run())
    return answer["status"], answer["headers"], answer["taken"]


@pytest.fixture
def upload(make_user: Callable[..., Any], clip: Path) -> tuple[MediaItem, str, bytes]:
    owner = make_user()
    data = clip.read_bytes()
    data += b"\0" * (3 * CHUNK_BYTES - len(data))  # past the MP4: a few reads' worth
    item = upload_create(owner=owner, file_name="clip.mp4", size=len(data), content_type="video/mp4")
    return item, Token.objects.get_or_create(user=owner)[0].key, data


def _stored(item: MediaItem) -> int:
    path = default_storage.path(item.source_key)
    return os.path.getsize(path) if os.path.exists(path) else 0


def test_a_chunk_reaches_storage_while_its_body_is_still_arriving(upload):
    item, key, data = upload
    half = len(data) // 2

    status, headers, _ = _patch(_scope(item.pk, key, 0, half), data[:half], before_last=lambda: _stored(item) > 0)

    assert (status, headers["upload-offset"], headers["tus-resumable"]) == (204, str(half), "1.0.0")
    item.refresh_from_db()
    assert item.upload_received == half == _stored(item)


def test_a_refused_chunk_is_answered_after_its_whole_body_as_before(upload):
    item, key, data = upload

    status, headers, taken = _patch(_scope(item.pk, key, 5, len(data)), data)  # the upload is at 0, not 5

    assert (status, taken) == (409, -(-len(data) // MESSAGE))
    assert headers["tus-resumable"] == "1.0.0"


def test_a_client_gone_mid_chunk_records_nothing_and_the_upload_resumes(upload):
    item, key, data = upload

    _patch(_scope(item.pk, key, 0, len(data)), data, cut_after=2 * CHUNK_BYTES)

    item.refresh_from_db()
    assert item.upload_received == 0 == _stored(item)  # the bytes it wrote are dropped
    half = len(data) // 2
    status, headers, _ = _patch(_scope(item.pk, key, 0, half), data[:half])
    assert (status, headers["upload-offset"]) == (204, str(half))


def test_creation_with_upload_streams_its_first_chunk_too(upload):
    _, key, data = upload
    half = len(data) // 2
    create = {b"upload-length": str(len(data)).encode(), b"upload-metadata": b"filename Y2xpcC5tcDQ="}

    status, headers, _ = _patch(_scope(None, key, 0, half, create=create), data[:half])

    assert (status, headers["upload-offset"]) == (201, str(half))
    item = MediaItem.objects.get(pk=headers["location"].rsplit("/", 1)[1])
    assert item.upload_received == half == _stored(item)


def test_a_body_longer_than_the_upload_is_refused_and_nothing_of_it_counts(upload):
    item, key, data = upload
    scope = _scope(item.pk, key, 0, 0)
    # Sent chunked (no Content-Length), so only the bytes themselves show it is too long.
    scope["headers"] = [(k, v) for k, v in scope["headers"] if k != b"content-length"]

    status, headers, _ = _patch(scope, data + b"\0" * MESSAGE)

    assert status == 413 and headers["tus-resumable"] == "1.0.0"
    item.refresh_from_db()
    assert item.upload_received == 0 == _stored(item)
    status, headers, _ = _patch(_scope(item.pk, key, 0, len(data)), data)
    assert (status, headers["upload-offset"]) == (204, str(len(data)))
