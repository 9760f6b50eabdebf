"""Live status at scale (issue 17): a web process subscribes once per group and fans out in process.

Real sockets against the live server, events from the real broadcast (``lifecycle.broadcast``,
as a worker sends them) through the real Redis. With channels-redis' default layer every event
was one Redis message per socket; now Redis sees one subscriber per group per web process.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import redis
import websockets
from channels.layers import get_channel_layer
from django.conf import settings
from rest_framework.authtoken.models import Token

from media_app import lifecycle
from media_app.channel_layers import FanOutChannelLayer
from media_app.models import MediaItem
from media_app.services import media_item_create, owner_group
from tests.conftest import AsgiServer, wait_for
from tests.env_plugin import free_port

pytestmark = pytest.mark.django_db(transaction=True)
SOCKETS = 200
EVENTS = 10


async def _open(url: str, headers: dict[str, str], count: int) -> list[Any]:
    async def one() -> Any:
        ws = await websockets.connect(url, additional_headers=headers, open_timeout=30, max_queue=None)
        json.loads(await asyncio.wait_for(ws.recv(), 30))  # the snapshot: the consumer has joined
        return ws

    sockets: list[Any] = []
    for start in range(0, count, 50):
        sockets += await asyncio.gather(*(one() for _ in range(min(50, count - start))))
    return sockets


async def _seqs(ws: Any, n: int) -> list[int]:
    return [json.loads(await asyncio.wait_for(ws.recv(), 30))["seq"] for _ in range(n)]


def _broadcast(item: MediaItem, seq: int) -> None:
    item.event_seq = seq
    lifecycle.broadcast(item)


def test_every_socket_gets_every_event_in_order_through_one_subscription(asgi_server, make_user):
    user = make_user()
    item = media_item_create(owner=user, original_name="photo.jpg", size=1000)
    headers = {"Authorization": f"Token {Token.objects.create(user=user).key}"}
    layer = get_channel_layer()
    assert isinstance(layer, FanOutChannelLayer)
    group = layer.group_channel(owner_group(user.pk))
    client = redis.Redis.from_url(settings.CHANNEL_REDIS_URL)
    first = item.event_seq + 1

    async def scenario() -> list[list[int]]:
        sockets = await _open(f"{asgi_server.ws_url}/ws/media/", headers, SOCKETS)
        try:
            # One subscriber for the whole web process, not one per socket.
            assert client.pubsub_numsub(group) == [(group.encode(), 1)]
            for seq in range(first, first + EVENTS):
                await asyncio.to_thread(_broadcast, item, seq)
            return await asyncio.gather(*(_seqs(ws, EVENTS) for ws in sockets))
        finally:
            await asyncio.gather(*(ws.close() for ws in sockets), return_exceptions=True)

    received = asyncio.run(scenario())

    assert received == [list(range(first, first + EVENTS))] * SOCKETS


def test_a_site_on_another_redis_database_is_not_heard(asgi_server, make_user):
    # Pub/sub ignores Redis' database number; the layer's prefix carries it.
    user = make_user()
    item = media_item_create(owner=user, original_name="photo.jpg", size=1000)
    headers = {"Authorization": f"Token {Token.objects.create(user=user).key}"}
    ours = settings.CHANNEL_REDIS_URL
    base, _, db = ours.rpartition("/")
    other = FanOutChannelLayer(hosts=[f"{base}/{(int(db or 0) + 1) % 16}"])
    first = item.event_seq + 1

    async def scenario() -> int:
        (ws,) = await _open(f"{asgi_server.ws_url}/ws/media/", headers, 1)
        try:
            stranger = {"type": "media.status", "item": {"id": str(item.pk), "seq": first + 100}}
            await asyncio.to_thread(other.group_send_many, [(owner_group(user.pk), stranger)])
            # Published after the stranger's message returned: had that one been heard, it came first.
            await asyncio.to_thread(_broadcast, item, first)
            return int(json.loads(await asyncio.wait_for(ws.recv(), 30))["seq"])
        finally:
            await ws.close()

    assert asyncio.run(scenario()) == first


def test_a_send_that_waits_holds_up_no_other_socket():
    # uvicorn's send waits on an Event while a client's buffer is full (a client not reading).
    # Events are handed to sockets in one pass; only a send that waits becomes a task of its own.
    layer = FanOutChannelLayer(hosts=[settings.CHANNEL_REDIS_URL])
    log: list[str] = []

    async def scenario() -> None:
        loop_layer = layer._get_layer()
        writable = asyncio.Event()

        async def send(name: str, wait: bool = False) -> None:
            if wait:
                await writable.wait()
            log.append(name)

        loop_layer.run_eagerly(send("stuck client", wait=True))
        loop_layer.run_eagerly(send("a"))
        loop_layer.run_eagerly(send("b"))
        assert log == ["a", "b"]  # sent at once, in order, not behind the stuck one
        writable.set()
        await asyncio.wait_for(asyncio.gather(*loop_layer._tasks), 5)

    asyncio.run(scenario())

    assert log == ["a", "b", "stuck client"]


def _event(item_id: str, seq: int) -> dict[str, Any]:
    item = {"id": item_id, "seq": seq}
    return {
        "type": "media.status",
        "item": item,
        "text": json.dumps({"type": "media.status", "seq": seq, "item": item}),
    }


def test_after_redis_restarts_events_flow_again_and_the_log_has_no_traceback(
    transactional_db: None, tmp_path: Path, monkeypatch: Any, make_user: Any
):
    # Pub/sub keeps no backlog: what is published while Redis is away is lost (a reconnecting
    # client gets the saved state first); once it is back, the web process subscribes again.
    exe = shutil.which("redis-server")
    assert exe is not None, "redis-server is not installed (make test installs it: scripts/test.sh)"
    port = free_port()
    url = f"redis://127.0.0.1:{port}/0"
    command = [exe, "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--appendonly", "no"]
    client = redis.Redis(port=port, socket_timeout=5)

    def up() -> bool:
        try:
            return bool(client.ping())
        except redis.ConnectionError:
            return False

    user = make_user()
    item_id = str(media_item_create(owner=user, original_name="photo.jpg", size=1000).pk)
    headers = {"Authorization": f"Token {Token.objects.create(user=user).key}"}
    layer = FanOutChannelLayer(hosts=[url])
    server = AsgiServer(tmp_path / "asgi.log")
    procs = [subprocess.Popen([*command, "--dir", str(tmp_path)], stdout=subprocess.DEVNULL)]
    try:
        wait_for(up, timeout=10, what="the test's redis-server")
        monkeypatch.setenv("CHANNEL_REDIS_URL", url)
        server.start()

        async def scenario() -> int:
            (ws,) = await _open(f"{server.ws_url}/ws/media/", headers, 1)
            try:
                procs[0].terminate()
                procs[0].wait(10)
                await asyncio.to_thread(
                    wait_for, lambda: b"Redis unreachable" in server.log.read_bytes(), timeout=20, what="the outage"
                )
                procs.append(subprocess.Popen([*command, "--dir", str(tmp_path)], stdout=subprocess.DEVNULL))
                await asyncio.to_thread(wait_for, up, timeout=10, what="Redis back")
                # redis-py subscribes again on its next read: publish until the socket hears one.
                deadline = time.monotonic() + 20
                for seq in range(1, 1000):
                    await asyncio.to_thread(layer.group_send_many, [(owner_group(user.pk), _event(item_id, seq))])
                    try:
                        return int(json.loads(await asyncio.wait_for(ws.recv(), 0.5))["seq"])
                    except TimeoutError:
                        assert time.monotonic() < deadline, "no event reached the socket after Redis came back"
                raise AssertionError("unreachable")
            finally:
                await ws.close()

        assert asyncio.run(scenario()) >= 1
    finally:
        server.stop()
        for proc in procs:
            proc.terminate()
            proc.wait(10)
    log = server.log.read_text()
    assert "Traceback" not in log, log[-3000:]
    assert log.count("Redis unreachable") == 1  # one line for the outage, not one a second


class _Transport:
    def __init__(self) -> None:
        self.written: list[bytes] = []
        self.closing = False

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def is_closing(self) -> bool:
        return self.closing


def _open_protocol() -> Any:
    """uvicorn's protocol object in the state of an accepted socket (what ``frame_writer`` reads)."""
    from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
    from websockets.protocol import State
    from websockets.server import ServerProtocol

    proto = WebSocketsSansIOProtocol.__new__(WebSocketsSansIOProtocol)
    proto.writable = asyncio.Event()
    proto.writable.set()
    proto.conn = ServerProtocol()
    proto.conn.state = State.OPEN
    proto.transport = _Transport()
    proto.handshake_complete, proto.close_sent, proto.disconnected = True, False, False
    return proto


def test_the_prebuilt_frame_is_what_uvicorn_would_send():
    from media_app.consumers import text_frame

    proto = _open_protocol()
    text = json.dumps({"type": "media.status", "seq": 7, "item": {"id": "x", "pad": "é" * 300}})
    proto.conn.send_text(text.encode())
    assert text_frame(text) == b"".join(proto.conn.data_to_send())


def test_a_frame_is_written_directly_only_when_uvicorn_would_send_at_once():
    # Otherwise the caller goes through uvicorn's send, which waits (flow control) or raises.
    from websockets.protocol import State

    from media_app.consumers import frame_writer

    proto = _open_protocol()
    write = frame_writer(proto.send)
    assert write is not None
    assert write(b"one") is True
    proto.writable.clear()  # the client is not reading: its buffer is full
    assert write(b"two") is False
    proto.writable.set()
    proto.conn.state = State.CLOSING  # the client has sent its close
    assert write(b"three") is False
    proto.conn.state = State.OPEN
    proto.close_sent = True
    assert write(b"four") is False
    assert proto.transport.written == [b"one"]
    assert frame_writer(lambda message: None) is None  # another server: its ASGI send only


def test_the_plain_call_writes_what_it_can_and_hands_the_rest_to_the_coroutine():
    # consumers._deliver_now: an event written at once records its seq; a stale one is dropped;
    # a socket without room records nothing, so _deliver then sends the same event through
    # uvicorn's send (which waits), and the socket still gets it once, in order.
    from media_app.consumers import FRAME, RAW_SEND, MediaListConsumer, frame_writer, text_frame

    proto = _open_protocol()
    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    consumer = MediaListConsumer()
    consumer.scope = {RAW_SEND: send, "path": "/ws/media/"}
    consumer.last_seq = {}
    consumer._write_frame = frame_writer(proto.send)

    def event(seq: int) -> dict[str, Any]:
        text = json.dumps({"type": "media.status", "seq": seq, "item": {"id": "x", "seq": seq}})
        return {"type": "media.status", "item": {"id": "x", "seq": seq}, "text": text}

    first = event(1)
    assert consumer._deliver_now(first) is True
    assert proto.transport.written == [text_frame(first["text"])] and first[FRAME] == text_frame(first["text"])
    assert consumer._deliver_now(event(1)) is True  # not newer: dropped, nothing written
    assert len(proto.transport.written) == 1

    proto.writable.clear()  # the client is not reading
    second = event(2)
    assert consumer._deliver_now(second) is False
    assert consumer.last_seq == {"x": 1}  # not recorded as sent
    asyncio.run(consumer._deliver(second))
    assert sent == [{"type": "websocket.send", "text": second["text"]}]
    assert consumer.last_seq == {"x": 2}
    assert consumer._deliver_now(event(2)) is True and len(sent) == 1  # and only once

    consumer._write_frame = None  # another server: the coroutine's ASGI send only
    assert consumer._deliver_now(event(3)) is False


def test_events_that_arrived_together_reach_a_socket_in_one_write_in_order():
    # A small image's start, advance and completion are published within milliseconds: on a busy
    # web process they queue in Redis while the previous event goes out to every socket. Read
    # together, they reach each socket in one write (one system call, one TCP segment) instead of
    # one each; a stale one among them is left out. A socket without room gets each of them
    # through uvicorn's send instead, in order, once.
    from media_app.consumers import RAW_SEND, MediaListConsumer, frame_writer, text_frame

    layer = FanOutChannelLayer(hosts=[settings.CHANNEL_REDIS_URL])
    group = layer.group_channel("media.owner.1")
    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    def socket(loop_layer: Any, channel: str) -> tuple[Any, MediaListConsumer]:
        proto = _open_protocol()
        consumer = MediaListConsumer()
        consumer.scope = {RAW_SEND: send, "path": "/ws/media/"}
        consumer.last_seq = {"x": 1}
        consumer._write_frame = frame_writer(proto.send)
        loop_layer.channels[channel] = asyncio.Queue()
        loop_layer.groups.setdefault(group, set()).add(channel)
        loop_layer.deliver_directly(
            channel,
            {"media.status"},
            consumer._deliver,
            now=consumer._deliver_now,
            many=consumer._deliver_many_now,
        )
        return proto, consumer

    events = [_event("x", seq) for seq in (1, 2, 3, 4)]  # the socket already has 1

    async def scenario() -> tuple[Any, Any, Any]:
        loop_layer = layer._get_layer()
        reading, reading_consumer = socket(loop_layer, "reading")
        stuck, _ = socket(loop_layer, "stuck")
        stuck.writable.clear()  # this client is not reading
        messages = [{"channel": group.encode(), "data": layer.serialize(e)} for e in events]
        loop_layer._shards[0]._receive_messages(messages)
        await asyncio.wait_for(asyncio.gather(*loop_layer._tasks), 5)
        return reading, reading_consumer, stuck

    reading, consumer, stuck = asyncio.run(scenario())

    assert reading.transport.written == [b"".join(text_frame(e["text"]) for e in events[1:])]
    assert consumer.last_seq == {"x": 4}
    assert stuck.transport.written == []
    assert [m["text"] for m in sent] == [e["text"] for e in events[1:]]


def test_a_batch_is_read_whole_and_handed_out_even_when_redis_goes_away_mid_read():
    # The receive loop reads what has queued up (up to BATCH_MAX) before handing it out. Redis
    # dropping the connection in the middle of that read loses nothing already read; a message
    # that cannot be decoded costs only itself; the loop then goes on as after any outage.
    from media_app.consumers import RAW_SEND, MediaListConsumer, frame_writer, text_frame

    layer = FanOutChannelLayer(hosts=[settings.CHANNEL_REDIS_URL])
    group = layer.group_channel("media.owner.2")
    events = [_event("y", seq) for seq in (1, 2, 3)]
    queued = [
        {"channel": group.encode(), "data": layer.serialize(events[0])},
        {"channel": group.encode(), "data": b"\xc1 not a message"},
        {"channel": group.encode(), "data": layer.serialize(events[1])},
        {"channel": group.encode(), "data": layer.serialize(events[2])},
    ]

    class _PubSub:
        subscribed = True
        reads: list[float | None] = []

        async def get_message(self, ignore_subscribe_messages: bool, timeout: float | None) -> Any:
            self.reads.append(timeout)
            if queued:
                return queued.pop(0)
            raise redis.ConnectionError("Connection closed by server.")

    async def sent(send_: Any) -> None:
        raise AssertionError("the socket had room: nothing goes through uvicorn's send")

    async def scenario() -> tuple[Any, Any, list[float | None]]:
        loop_layer = layer._get_layer()
        proto = _open_protocol()
        consumer = MediaListConsumer()
        consumer.scope = {RAW_SEND: sent, "path": "/ws/media/"}
        consumer.last_seq = {}
        consumer._write_frame = frame_writer(proto.send)
        loop_layer.channels["reader"] = asyncio.Queue()
        loop_layer.groups[group] = {"reader"}
        loop_layer.deliver_directly(
            "reader", {"media.status"}, consumer._deliver, now=consumer._deliver_now, many=consumer._deliver_many_now
        )
        shard = loop_layer._shards[0]
        shard._pubsub = _PubSub()
        task = asyncio.ensure_future(shard._do_receiving())
        deadline = time.monotonic() + 5
        while len(_PubSub.reads) < 6 and time.monotonic() < deadline:  # the read after the outage
            await asyncio.sleep(0.01)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        return proto, consumer, _PubSub.reads

    proto, consumer, reads = asyncio.run(scenario())

    assert proto.transport.written == [b"".join(text_frame(e["text"]) for e in events)]  # one write, in order
    assert consumer.last_seq == {"y": 3}
    assert reads[:5] == [0.1, 0, 0, 0, 0]  # one wait, then what had queued, until Redis went away
