"""Live status over websockets: the current state first, then every change, in order.

Thin by design: join the item's (or the owner's) group, send a snapshot, forward
``media.status`` events. Each event carries the item's ``seq``; the consumer drops any event
not newer than what it already sent, so the snapshot/event race never shows a step backwards.

Who may connect: a browser page of ours (its ``Origin`` is checked, then its session cookie
counts) or any client with ``Authorization: Token …`` (no ``Origin`` needed: a token is not
ambient like a cookie, so a cross-site page cannot borrow it). See ``SessionForOwnPages``.

A socket's end is never an incident: the Redis behind the channel layer may be slow or
restarting when a client leaves (``LayerTolerantConsumer``), and the client may be gone before
the last message; each is one log line, never a traceback.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable
from typing import Any

from channels.auth import AuthMiddlewareStack
from channels.db import database_sync_to_async
from channels.exceptions import StopConsumer
from channels.generic.websocket import AsyncJsonWebsocketConsumer
from channels.security.websocket import AllowedHostsOriginValidator
from django.contrib.auth.models import AnonymousUser
from redis.exceptions import RedisError
from rest_framework import exceptions
from websockets.frames import Frame, Opcode
from websockets.protocol import State

from media_app.graphql.context import authenticate_websocket
from media_app.selectors import media_item_payload, media_items_for_user
from media_app.services import item_group, owner_group

_SANSIO: type[Any] | None
try:  # uvicorn's default websocket implementation (websockets' sans-I/O protocol)
    from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol as _SANSIO
except ImportError:  # pragma: no cover - another server, or an older uvicorn: the ASGI send only
    _SANSIO = None

logger = logging.getLogger("media_app.sockets")

# Close codes in the 4000 range (application-defined), mirroring HTTP where one fits.
CLOSE_UNAUTHENTICATED = 4401
CLOSE_NOT_FOUND = 4404
# 1011: the server cannot serve the socket just now (the channel layer is unreachable).
CLOSE_UNAVAILABLE = 1011
NOT_AUTHENTICATED = (
    "Authentication credentials were not provided: log in on this site's page, "
    "or send the header 'Authorization: Token <key>'."
)

# What a slow or restarting Redis raises through channels_redis (timeouts, refused connections).
LAYER_ERRORS: tuple[type[BaseException], ...] = (RedisError, OSError, asyncio.TimeoutError)
# The server's own ``send``, in the scope: a status event goes out through it, past the session
# middleware's wrapper (which acts only on the handshake), as one of 1,000 sends per event.
RAW_SEND = "media_app.raw_send"
# The event's websocket frame, built once per web process and cached on the shared event.
FRAME = "_frame"
# How long a socket that has ended keeps trying to leave its groups while Redis is unreachable.
LEAVE_GROUPS_FOR = 30.0


def text_frame(text: str) -> bytes:
    """A whole unfragmented text frame as a server sends it (unmasked): the same bytes for every
    socket, so an event's frame is built once per web process, not once per socket."""
    return bytes(Frame(Opcode.TEXT, text.encode()).serialize(mask=False))


def frame_writer(send: Any) -> Callable[[bytes], bool] | None:
    """A writer of ready-made frames straight to the socket behind uvicorn's ``send``, or None for
    another server. At 1,000 sockets, the ASGI send (an awaited Event, the message dict, websockets
    framing the same text again) was a third of the web process's CPU per event (issue 17).

    The writer sends only when ``send`` itself would send at once: the handshake done, no close
    sent or received, the transport writable (uvicorn's flow control) and open. Otherwise it
    returns False and the caller goes through ``send``, which waits or raises as it always does.
    A frame is written whole in one ``write``, so uvicorn's own frames (pings, close) never
    interleave within it."""
    proto: Any = getattr(send, "__self__", None)
    if _SANSIO is None or type(proto) is not _SANSIO:
        return None
    writable, conn, transport = proto.writable, proto.conn, proto.transport

    def write(frame: bytes) -> bool:
        if (
            writable.is_set()
            and conn.state is State.OPEN
            and proto.handshake_complete
            and not proto.close_sent
            and not proto.disconnected
            and not transport.is_closing()
        ):
            transport.write(frame)
            return True
        return False

    return write


def _header(scope: dict[str, Any], name: bytes) -> bytes | None:
    for key, value in scope.get("headers", []):
        if key.lower() == name:
            return bytes(value)
    return None


class SessionForOwnPages:
    """ASGI middleware: the session cookie counts only on a handshake from one of our pages.

    The ``Origin`` check exists against cross-site use of a visitor's cookie, so it guards the
    cookie only. A handshake without ``Origin`` comes from no browser (browsers always send one
    on a websocket) and one with ``Authorization`` brings its own credential: both go on
    without the session, and the consumer authenticates the token (or closes with 4401).
    A handshake with a foreign ``Origin`` and no token is refused (403), as before.
    """

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.with_session = AllowedHostsOriginValidator(AuthMiddlewareStack(inner))

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> Any:
        scope = {**scope, RAW_SEND: send}
        if _header(scope, b"origin") is not None and _header(scope, b"authorization") is None:
            return await self.with_session(scope, receive, send)
        return await self.inner({**scope, "user": AnonymousUser()}, receive, send)


class LayerTolerantConsumer:
    """Mixin for channel-layer consumers: Redis trouble never ends in a traceback.

    - The layer's receive loop retries a failed read instead of killing the socket. (Redis-py
      reads time out after ``socket_timeout``, 5 s by default, while channels_redis blocks
      ``BZPOPMIN`` for 5 s too: an idle socket races that timeout every 5 s.)
    - Leaving the groups after the socket ended retries for ``LEAVE_GROUPS_FOR`` seconds, so a
      Redis paused or restarting at that moment still ends with the channel out of its groups.
    - A client gone before our last message, or a layer error anywhere else, ends the consumer
      with one log line (and close code 1011 when the client is still there).
    """

    groups_joined: set[str]
    _layer_receive: Any = None

    def _consumer_init(self) -> None:
        self.groups_joined = set()
        self.opened_at = time.monotonic()
        self.close_code: int | None = None

    # AsyncConsumer.__call__ assigns ``channel_receive`` and passes it to its dispatch loop: the
    # property hands that loop our retrying wrapper instead.
    @property
    def channel_receive(self) -> Any:
        return self._receive_from_layer

    @channel_receive.setter
    def channel_receive(self, receive: Any) -> None:
        self._layer_receive = receive

    async def _receive_from_layer(self) -> dict[str, Any]:
        failures = 0
        while True:
            try:
                message: dict[str, Any] = await self._layer_receive()
            except LAYER_ERRORS as exc:
                task = asyncio.current_task()
                if task is not None and task.cancelling():
                    # The socket is closing and its read was cancelled; the read timeout may have
                    # expired at the same moment and turned the cancellation into a TimeoutError.
                    raise asyncio.CancelledError from exc
                failures += 1
                # One timeout is the BZPOPMIN race above; a second in a row means Redis is away.
                level = logging.DEBUG if failures == 1 and "Timeout" in type(exc).__name__ else logging.WARNING
                logger.log(level, "websocket %s: channel layer read failed (%s); retrying", self._path(), exc)
                await asyncio.sleep(min(0.2 * 2**failures, 5.0))
                continue
            if failures > 1:
                logger.info("websocket %s: channel layer reachable again", self._path())
            return message

    async def join_group(self, group: str) -> None:
        self.groups_joined.add(group)  # first, so that a half-done add is undone on leaving
        await self.channel_layer.group_add(group, self.channel_name)  # type: ignore[attr-defined]

    async def leave_groups(self) -> None:
        """Leave every group joined, retrying while Redis is unreachable (never raises)."""
        deadline = time.monotonic() + LEAVE_GROUPS_FOR
        delay = 0.5
        while self.groups_joined:
            group = next(iter(self.groups_joined))
            try:
                await self.channel_layer.group_discard(group, self.channel_name)  # type: ignore[attr-defined]
            except LAYER_ERRORS as exc:
                if time.monotonic() + delay > deadline:
                    logger.warning(
                        "websocket %s: could not leave %d group(s) (%s); they expire on their own",
                        self._path(),
                        len(self.groups_joined),
                        exc,
                    )
                    return
                logger.warning("websocket %s: leaving group %s failed (%s); retrying", self._path(), group, exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
                continue
            self.groups_joined.discard(group)

    def _path(self) -> str:
        return str(getattr(self, "scope", {}).get("path", "?"))

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        self._consumer_init()
        how = "closed"
        try:
            await super().__call__(scope, receive, send)  # type: ignore[misc]
        except LAYER_ERRORS as exc:
            # OSError covers the ASGI server's "client disconnected" on a send to a gone client.
            how = f"ended: {type(exc).__name__}: {exc}"
            await self._close_quietly()
            await self.leave_groups()
        finally:
            code = f" (code {self.close_code})" if self.close_code is not None else ""
            logger.info(
                "websocket %s %s%s after %.1f s", scope.get("path", "?"), how, code, time.monotonic() - self.opened_at
            )

    async def websocket_disconnect(self, message: dict[str, Any]) -> None:
        self.close_code = message.get("code")
        await super().websocket_disconnect(message)  # type: ignore[misc]

    async def _close_quietly(self) -> None:
        try:
            await self.close(code=CLOSE_UNAVAILABLE, reason="Live updates are unavailable for a moment; reconnect.")  # type: ignore[attr-defined]
        except Exception:  # noqa: BLE001 - the client is gone, or the socket is closed already
            return


class _StatusConsumer(LayerTolerantConsumer, AsyncJsonWebsocketConsumer):
    last_seq: dict[str, int]

    async def connect(self) -> None:
        self.last_seq = {}
        # Accept first so the client sees our close code and reason, not a bare handshake failure.
        await self.accept()
        try:
            user = await database_sync_to_async(authenticate_websocket)(self.scope, {})
        except exceptions.AuthenticationFailed as exc:
            await self.close(code=CLOSE_UNAUTHENTICATED, reason=str(exc.detail))
            return
        if user is None:
            await self.close(code=CLOSE_UNAUTHENTICATED, reason=NOT_AUTHENTICATED)
            return
        try:
            found = await self.subscribe(user)
        except LAYER_ERRORS as exc:
            logger.warning("websocket %s: could not join the status group (%s)", self._path(), exc)
            await self.close(code=CLOSE_UNAVAILABLE, reason="Live updates are unavailable for a moment; reconnect.")
            return
        if not found:
            await self.close(code=CLOSE_NOT_FOUND, reason="There is no such item.")
            return
        for payload in await self.snapshot(user):
            await self.forward(payload)
        # From now on status events skip the receive loop (media_app/channel_layers.py); until now
        # they queued behind the snapshot, so the order a client sees is unchanged.
        deliver_directly = getattr(self.channel_layer, "deliver_directly", None)
        if deliver_directly is not None:
            self._write_frame = frame_writer(self.scope.get(RAW_SEND))
            now = self._deliver_now if self._write_frame is not None else None
            many = self._deliver_many_now if self._write_frame is not None else None
            deliver_directly(self.channel_name, {"media.status"}, self._deliver, now=now, many=many)

    _write_frame: Callable[[bytes], bool] | None = None

    def _deliver_now(self, event: dict[str, Any]) -> bool:
        """``_deliver``'s common case as a plain call: no coroutine to create, start and finish per
        socket per event (a fifth of the web process's CPU per message at 2,500 sockets, issue
        17). True when the event is done with: written whole, or not newer than what the socket
        has. False hands it to ``_deliver``, which checks again and goes through uvicorn's send
        (waits or raises) as before; nothing is recorded as sent until it is. Never raises."""
        try:
            item, text, write = event["item"], event.get("text"), self._write_frame
            if text is None or write is None:
                return False
            key, seq = item["id"], item["seq"]
            if seq <= self.last_seq.get(key, -1):
                return True
            frame = event.get(FRAME)
            if frame is None:
                frame = event[FRAME] = text_frame(text)  # the event is shared: once per process
            if not write(frame):
                return False
            self.last_seq[key] = seq
            return True
        except Exception:  # noqa: BLE001 - _deliver takes it, and logs what it cannot deliver
            return False

    def _deliver_many_now(self, events: list[dict[str, Any]]) -> bool:
        """``_deliver_now`` for events that arrived together: the frames of those newer than what
        the socket has, in order, in one write (one system call and one TCP segment instead of one
        each). False, with nothing recorded as sent, hands every event to ``_deliver_now`` in turn.
        Never raises."""
        try:
            write = self._write_frame
            if write is None:
                return False
            seen: dict[str, int] = {}
            frames = []
            for event in events:
                item, text = event["item"], event.get("text")
                if text is None:
                    return False
                key, seq = item["id"], item["seq"]
                if seq <= seen.get(key, self.last_seq.get(key, -1)):
                    continue
                frame = event.get(FRAME)
                if frame is None:
                    frame = event[FRAME] = text_frame(text)  # the event is shared: once per process
                frames.append(frame)
                seen[key] = seq
            if frames and not write(frames[0] if len(frames) == 1 else b"".join(frames)):
                return False
            self.last_seq.update(seen)
            return True
        except Exception:  # noqa: BLE001 - each event then goes its own way, which logs
            return False

    async def _deliver(self, event: dict[str, Any]) -> None:
        """``media_status`` for events handed over directly; the same checks, the fewest steps:
        the event's frame, built once, written to the socket when it has room (``frame_writer``)."""
        item, text, send = event["item"], event.get("text"), self.scope.get(RAW_SEND)
        try:
            if text is None or send is None:
                await self.media_status(event)
            elif item["seq"] > self.last_seq.get(item["id"], -1):
                self.last_seq[item["id"]] = item["seq"]
                write = self._write_frame
                if write is not None:
                    frame = event.get(FRAME)
                    if frame is None:
                        frame = event[FRAME] = text_frame(text)  # the event is shared: once per process
                    if write(frame):
                        return
                await send({"type": "websocket.send", "text": text})
        except Exception as exc:  # noqa: BLE001 - the client is gone; its consumer ends on its own
            logger.debug("websocket %s: event not delivered (%s)", self._path(), exc)

    async def subscribe(self, user: Any) -> bool:
        raise NotImplementedError

    async def snapshot(self, user: Any) -> list[dict[str, Any]]:
        raise NotImplementedError

    async def disconnect(self, code: int) -> None:
        stop = getattr(self.channel_layer, "stop_delivering_directly", None)
        if stop is not None:
            stop(self.channel_name)
        await self.leave_groups()
        raise StopConsumer()

    async def dispatch(self, message: dict[str, Any]) -> None:
        # Channels runs close_old_connections() in a worker thread before every message it
        # dispatches, for handlers that use the ORM. Forwarding an event uses none, and that thread
        # hop per socket per event was most of the web process's time at 1,000 sockets (issue 17).
        if message.get("type") == "media.status":
            await self.media_status(message)
            return
        await super().dispatch(message)

    async def media_status(self, event: dict[str, Any]) -> None:
        # The event is shared by every socket of this process (read-only); its "text" is the
        # message already serialised by the broadcast, once for all of them.
        await self.forward(event["item"], event.get("text"))

    async def forward(self, item: dict[str, Any], text: str | None = None) -> None:
        if item["seq"] <= self.last_seq.get(item["id"], -1):
            return
        self.last_seq[item["id"]] = item["seq"]
        if text is None:
            await self.send_json({"type": "media.status", "seq": item["seq"], "item": item})
        else:
            await self.send(text_data=text)

    async def receive_json(self, content: Any, **kwargs: Any) -> None:
        # Read-only socket: a ping gets a pong so clients can check liveness, nothing else.
        if isinstance(content, dict) and content.get("type") == "ping":
            await self.send_json({"type": "pong"})


class MediaItemConsumer(_StatusConsumer):
    """``/ws/media/<id>/``: one item, for its owner or staff."""

    async def subscribe(self, user: Any) -> bool:
        self.item_id = str(self.scope["url_route"]["kwargs"]["item_id"])
        if not await self._visible(user, self.item_id):
            return False
        await self.join_group(item_group(self.item_id))
        return True

    async def snapshot(self, user: Any) -> list[dict[str, Any]]:
        return await self._payloads(user, [self.item_id])

    @database_sync_to_async
    def _visible(self, user: Any, item_id: str) -> bool:
        try:
            uuid.UUID(item_id)
        except ValueError:
            return False
        return media_items_for_user(user=user).filter(pk=item_id).exists()

    @database_sync_to_async
    def _payloads(self, user: Any, ids: list[str]) -> list[dict[str, Any]]:
        return [media_item_payload(i) for i in media_items_for_user(user=user).filter(pk__in=ids)]


class MediaListConsumer(_StatusConsumer):
    """``/ws/media/``: every item of the connected user."""

    SNAPSHOT_LIMIT = 100

    async def subscribe(self, user: Any) -> bool:
        await self.join_group(owner_group(user.pk))
        return True

    @database_sync_to_async
    def snapshot(self, user: Any) -> list[dict[str, Any]]:
        items = user.media_items.order_by("-created_at")[: self.SNAPSHOT_LIMIT]
        return [media_item_payload(i) for i in reversed(items)]
