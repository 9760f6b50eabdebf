"""The bench's bare tus server: a plain ASGI app on the same uvicorn, appending bodies to a file.

No Django, no database, no lock, no auth: the ceiling the real web's tus path is measured
against (``bench.tus``). It keeps what any honest tus server must: a PATCH at the wrong offset
is refused, and the bytes are on disk (``fdatasync``) before the new offset is answered.
``python -m uvicorn bench.tus_bare:app`` with ``TUS_BARE_DIR`` set.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(os.environ.get("TUS_BARE_DIR", "/tmp/tus-bare"))
SIZES: dict[str, int] = {}


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        while (await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
    method, path = scope["method"], scope["path"]
    if method == "GET":  # the health check
        return await answer(send, 200, {})
    if method == "POST":
        name = uuid.uuid4().hex
        SIZES[name] = int(headers["upload-length"])
        (ROOT / name).touch()
        await drain(receive)
        return await answer(send, 201, {"Location": f"/files/{name}"})
    name = path.rsplit("/", 1)[-1]
    file = ROOT / name
    if method == "HEAD":
        return await answer(send, 200, {"Upload-Offset": str(file.stat().st_size)})
    fd = os.open(file, os.O_WRONLY | os.O_APPEND)
    try:
        offset = os.fstat(fd).st_size
        if int(headers["upload-offset"]) != offset:
            await drain(receive)
            return await answer(send, 409, {"Upload-Offset": str(offset)})
        more = True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                os.ftruncate(fd, offset)
                return
            body = memoryview(message.get("body", b""))
            while body:
                body = body[os.write(fd, body) :]
            more = message.get("more_body", False)
        os.fdatasync(fd)
        offset = os.fstat(fd).st_size
    finally:
        os.close(fd)
    if offset == SIZES.get(name):
        file.unlink()  # the bench only wants the rate
    await answer(send, 204, {"Upload-Offset": str(offset)})


async def drain(receive: Any) -> None:
    while (await receive()).get("more_body", False):
        pass


async def answer(send: Any, status: int, headers: dict[str, str]) -> None:
    raw = [(k.encode(), v.encode()) for k, v in {"Tus-Resumable": "1.0.0", **headers}.items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": b""})
