"""tus chunks streamed from the ASGI server into storage, with no spool file on the way.

Django's ASGI handler reads a request's whole body into a ``SpooledTemporaryFile`` (a temp file
above 2.5 MB) before the view runs: every tus byte was written and read back once more than
needed, and that copy capped an upload at about 250 MB per CPU-second. For a tus PATCH (and a
POST that creates an upload with its first bytes) this handler gives the view a stream that
pulls the body from ASGI ``receive()`` as the view reads it, so the bytes go from the socket
straight to storage, a read's worth (``uploads.CHUNK_BYTES``) at a time.

Everything else is Django's own path: the middleware, DRF's authentication, throttles, the tus
checks and the answers are those of ``media_app.api.tus``. What stays as before:

- The answer leaves only after the whole body arrived: a view that refuses early (a wrong
  offset, a locked upload) has the rest of its body read and dropped first, so a client that
  sends its whole chunk before reading the answer gets it (a spooled body gave the same).
- A client gone mid-body is a read error in the view (``UnreadablePostError``), not a recorded
  offset: its bytes are dropped and the client resumes from the offset a HEAD gives.
- A client gone after the body is a disconnect, as Django's handler sees it.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable
from typing import Any

from django.core.handlers.asgi import ASGIHandler
from django.http import UnreadablePostError
from django.urls import Resolver404, resolve

Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

# The views whose bodies stream (tus PATCH, and POST for creation-with-upload).
STREAMED_VIEWS = frozenset({("PATCH", "api:tus-upload"), ("POST", "api:tus")})


def streams_body(scope: dict[str, Any]) -> bool:
    """True for a request whose body the tus views read as it arrives."""
    method = scope.get("method", "")
    if method not in ("PATCH", "POST"):
        return False
    path, root = scope["path"], scope.get("root_path", "")
    if root and path.startswith(root):
        path = path[len(root) :]
    try:
        return (method, resolve(path).view_name) in STREAMED_VIEWS
    except Resolver404:
        return False


def _in_event_loop() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


class BodyStream:
    """A request body read from a worker thread, pulled from ``receive()`` on the event loop.

    ``read`` runs in the view's thread and hops to the loop once per read (not per ASGI
    message), so a 1 MiB read costs one hop. Only what one read asks for is held in memory.
    """

    def __init__(self, receive: Receive, loop: asyncio.AbstractEventLoop) -> None:
        self._receive = receive
        self._loop = loop
        self._left = b""  # the part of the last message a read did not take
        self._done = False  # the last body message arrived
        self._aborted = False  # the client left before it
        self._finished = asyncio.Event()  # done or aborted

    # --- the view's side (a worker thread) ---

    def read(self, size: int = -1) -> bytes:
        if self._aborted:
            raise UnreadablePostError("The client disconnected before the request body ended.")
        if self._done and not self._left:
            return b""
        if _in_event_loop():
            raise RuntimeError("BodyStream.read blocks: call it from a worker thread, not the event loop")
        return asyncio.run_coroutine_threadsafe(self._pull(size), self._loop).result()

    def readable(self) -> bool:
        return True

    def write_to(self, fd: int, limit: int, *, seconds: float, wrote: Callable[[int], None] | None = None) -> int:
        """Write up to ``limit`` bytes of the body to ``fd`` as they arrive, for at most about
        ``seconds``; how many (0 once the body has ended). What is past ``limit`` stays for ``read``.

        The writes happen on the event loop, each ASGI message as it came (no join, no copy),
        and the calling thread waits once per call instead of once per read: the hop per read
        (and the two threads taking turns with the GIL) cost the web as much CPU as the bytes
        did. ``wrote(n)`` runs after each write (on the loop: keep it short).
        """
        if self._aborted:
            raise UnreadablePostError("The client disconnected before the request body ended.")
        if self._done and not self._left:
            return 0
        if _in_event_loop():
            raise RuntimeError("BodyStream.write_to blocks: call it from a worker thread, not the event loop")
        job = self._write_to(fd, limit, seconds, wrote)
        return asyncio.run_coroutine_threadsafe(job, self._loop).result()

    def close(self) -> None:
        self._left = b""

    # --- the event loop's side ---

    async def _pull(self, size: int) -> bytes:
        """Up to ``size`` bytes (all that is left for a negative size); b"" at the end. One
        message that fits is handed on as it is; several are joined (one copy)."""
        parts: list[bytes] = []
        got = 0
        while size < 0 or got < size:
            body = await self._take()
            if body is None:
                break
            if 0 <= size < got + len(body):  # keep what this read did not ask for
                body, self._left = body[: size - got], body[size - got :]
            if body:
                parts.append(body)
                got += len(body)
        if self._aborted:
            raise UnreadablePostError("The client disconnected before the request body ended.")
        return parts[0] if len(parts) == 1 else b"".join(parts)

    async def _write_to(self, fd: int, limit: int, seconds: float, wrote: Callable[[int], None] | None) -> int:
        deadline = self._loop.time() + seconds
        total = 0
        while total < limit and self._loop.time() < deadline:
            body = await self._take()
            if body is None:
                break
            view = memoryview(body)
            if len(view) > limit - total:  # keep what is past the limit
                self._left, view = bytes(view[limit - total :]), view[: limit - total]
            size = len(view)
            while view:
                view = view[os.write(fd, view) :]
            total += size
            if wrote is not None and size:
                wrote(size)
        if self._aborted:
            raise UnreadablePostError("The client disconnected before the request body ended.")
        return total

    async def _take(self) -> bytes | None:
        """What a read left over, else the next message's body; None once the body has ended."""
        if self._left:
            body, self._left = self._left, b""
            return body
        if self._finished.is_set():
            return None
        return await self._next()

    async def _next(self) -> bytes:
        message = await self._receive()
        if message["type"] == "http.disconnect":
            self._aborted = True
            self._finished.set()
            return b""
        if not message.get("more_body", False):
            self._done = True
            self._finished.set()
        body = message.get("body", b"")
        return body if isinstance(body, bytes) else bytes(body)

    async def drain(self) -> None:
        """Read and drop what the view left unread."""
        self._left = b""
        while not self._finished.is_set():
            await self._next()

    async def receive_after_body(self) -> Message:
        """Django's disconnect listener: it may listen only once the body is in (as after a
        spooled body). A client gone mid-body is the view's read error, not a cancelled view."""
        await self._finished.wait()
        if self._aborted:
            await asyncio.Event().wait()  # the view answers (to nobody) and the listener is cancelled
        return await self._receive()

    async def send_after_body(self, send: Send, message: Message) -> None:
        if message["type"] == "http.response.start":
            await self.drain()
        await send(message)


class StreamingBodyASGIHandler(ASGIHandler):
    """Django's ASGI handler, with the body of a tus chunk streamed to the view (see above)."""

    async def handle(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        if not streams_body(scope):
            await super().handle(scope, receive, send)
            return
        body = BodyStream(receive, asyncio.get_running_loop())

        async def send_after_body(message: Message) -> None:
            await body.send_after_body(send, message)

        await super().handle(scope, body.receive_after_body, send_after_body)

    def create_request(self, scope: dict[str, Any], body_file: Any) -> Any:
        request, error = super().create_request(scope, body_file)
        if request is not None and isinstance(body_file, BodyStream):
            request.tus_body = body_file  # the tus views write it to a file directly (write_to)
        return request, error

    async def read_body(self, receive: Receive) -> Any:
        owner = getattr(receive, "__self__", None)
        if isinstance(owner, BodyStream):
            return owner
        return await super().read_body(receive)
