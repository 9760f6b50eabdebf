"""A socket's end is never an incident: no traceback in the web log, however the client leaves.

Real clients against the live server, on every websocket route (``/ws/media/``,
``/ws/media/<id>/`` and GraphQL's ``/graphql/``): a normal close, a client that vanishes without
a close frame, sockets left idle across the channel layer's read timeout, and all of that again
while the Redis behind the channel layer is paused (``CLIENT PAUSE``) on a server of the test's
own, so that leaving the groups times out. Each consumer logs one ``websocket … closed`` line
when it has finished; the tests wait for those lines, then read the server's log.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import websockets
from django.test import Client
from rest_framework.authtoken.models import Token

from media_app.services import media_item_create
from tests.conftest import AsgiServer, wait_for
from tests.env_plugin import free_port

pytestmark = pytest.mark.django_db(transaction=True)
CLOSED_LINE = re.compile(rb"websocket (\S+) (closed|ended)")
INCIDENT = re.compile(rb"Traceback|Exception in ASGI application|ERROR")
GRAPHQL_WS = "graphql-transport-ws"
STATUS = "subscription($id: ID!) { mediaStatus(mediaId: $id) { id processingStatus } }"


class LogReader:
    """The server's log from the moment the test began."""

    def __init__(self, server: AsgiServer) -> None:
        self.path, self.start = server.log, server.log.stat().st_size

    def text(self) -> bytes:
        with open(self.path, "rb") as fh:
            fh.seek(self.start)
            return fh.read()

    def closed(self) -> int:
        return len(CLOSED_LINE.findall(self.text()))

    def wait_for_closed(self, count: int, *, timeout: float) -> None:
        def done() -> bool:
            incidents = INCIDENT.findall(self.text())
            assert not incidents, f"the web log has an error:\n{self.text().decode(errors='replace')[-6000:]}"
            return self.closed() >= count

        try:
            wait_for(done, timeout=timeout, what=f"{count} sockets to be finished with")
        except AssertionError as exc:
            raise AssertionError(f"{exc}; log:\n{self.text().decode(errors='replace')[-6000:]}") from None

    def assert_clean(self) -> None:
        text = self.text()
        assert not INCIDENT.search(text), text.decode(errors="replace")[-6000:]


def cookie_headers(user: Any, server: AsgiServer) -> dict[str, str]:
    client = Client()
    client.force_login(user)
    return {"Cookie": f"sessionid={client.cookies['sessionid'].value}", "Origin": server.url}


async def open_status(url: str, headers: dict[str, str]) -> Any:
    """A status socket that has received its snapshot (so the server has joined its group)."""
    ws = await websockets.connect(url, additional_headers=headers, open_timeout=10)
    first = json.loads(await asyncio.wait_for(ws.recv(), 10))
    assert first["type"] == "media.status"
    return ws


async def open_graphql(server: AsgiServer, token: str, item_id: str) -> Any:
    """A graphql-transport-ws socket with a mediaStatus subscription that has sent its first result."""
    # (With an Origin, as a browser would: token clients need none, which test_socket_token checks.)
    ws = await websockets.connect(
        f"{server.ws_url}/graphql/",
        subprotocols=[GRAPHQL_WS],
        additional_headers={"Origin": server.url},
        open_timeout=10,
    )
    await ws.send(json.dumps({"type": "connection_init", "payload": {"Authorization": f"Token {token}"}}))
    assert json.loads(await asyncio.wait_for(ws.recv(), 10))["type"] == "connection_ack"
    await ws.send(
        json.dumps({"id": "1", "type": "subscribe", "payload": {"query": STATUS, "variables": {"id": item_id}}})
    )
    message = json.loads(await asyncio.wait_for(ws.recv(), 10))
    assert message["type"] == "next", message
    return ws


async def open_all(server: AsgiServer, headers: dict[str, str], token: str, item_id: str) -> list[Any]:
    return [
        await open_status(f"{server.ws_url}/ws/media/", headers),
        await open_status(f"{server.ws_url}/ws/media/{item_id}/", headers),
        await open_graphql(server, token, item_id),
    ]


def vanish(ws: Any) -> None:
    """The client is gone: the TCP connection drops without a close frame."""
    ws.transport.abort()


@pytest.fixture
def owner_and_item(make_user: Any, asgi_server: AsgiServer) -> tuple[dict[str, str], str, str]:
    """The owner's session headers (as their browser sends them), their token, and their item."""
    user = make_user()
    item = media_item_create(owner=user, original_name="clip.mp4", size=1000)
    return cookie_headers(user, asgi_server), Token.objects.create(user=user).key, str(item.pk)


def test_closing_every_kind_of_socket_in_every_way_logs_no_error(asgi_server, owner_and_item):
    headers, token, item_id = owner_and_item
    log = LogReader(asgi_server)

    async def scenario() -> None:
        closed = await open_all(asgi_server, headers, token, item_id)
        gone = await open_all(asgi_server, headers, token, item_id)
        idle = await open_all(asgi_server, headers, token, item_id)
        for ws in closed:
            await ws.close()
        for ws in gone:
            vanish(ws)
        # Idle across more than one of the channel layer's 5 s reads, then closed.
        await asyncio.sleep(6)
        for ws in idle:
            await ws.close()

    asyncio.run(scenario())
    log.wait_for_closed(9, timeout=30)
    log.assert_clean()
    assert log.text().count(b"websocket /graphql/ closed") == 3


@pytest.fixture
def server_with_pausable_redis(transactional_db: None, tmp_path: Path, monkeypatch: Any) -> Iterator[Any]:
    """A live server whose channel layer runs on a Redis of this test's own, which it may pause."""
    exe = shutil.which("redis-server")
    if exe is None:
        pytest.skip("redis-server is not installed (make test installs it)")
    port = free_port()
    proc = subprocess.Popen(
        [exe, "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--appendonly", "no", "--dir", str(tmp_path)],
        stdout=subprocess.DEVNULL,
    )
    client = redis.Redis(port=port, socket_timeout=30)

    def up() -> bool:
        try:
            return bool(client.ping())
        except redis.ConnectionError:
            return False

    server = AsgiServer(tmp_path / "asgi.log")
    try:
        wait_for(up, timeout=10, what="the test's redis-server")
        monkeypatch.setenv("CHANNEL_REDIS_URL", f"redis://127.0.0.1:{port}/0")
        server.start()
        yield server, client
    finally:
        server.stop()
        proc.terminate()
        proc.wait(10)


def test_sockets_closed_while_redis_is_paused_log_no_error_and_leave_their_groups(
    server_with_pausable_redis, owner_and_item
):
    server, layer_redis = server_with_pausable_redis
    headers, token, item_id = owner_and_item
    log = LogReader(server)

    async def scenario() -> None:
        closed = await open_all(server, headers, token, item_id)
        gone = await open_all(server, headers, token, item_id)
        # The pub/sub layer (media_app/channel_layers.py): one subscription per group per process.
        assert layer_redis.pubsub_channels("*__group__*")
        # Longer than redis-py's 5 s read timeout: leaving the groups waits for Redis.
        layer_redis.execute_command("CLIENT", "PAUSE", 7000, "ALL")
        for ws in closed:
            await ws.close()
        for ws in gone:
            vanish(ws)

    asyncio.run(scenario())
    log.wait_for_closed(6, timeout=60)
    log.assert_clean()
    # Once Redis answers again, the web process holds no group subscription any more.
    wait_for(lambda: not layer_redis.pubsub_channels("*__group__*"), timeout=10, what="the groups to be left")
