"""A lean websocket subscriber for the benchmark: thousands of sockets in one thread on epoll.

The measuring clients share the machine's cores with the web processes they measure. With the
``websockets`` library's asyncio client, each message cost a reader task wake-up, the library's
frame parsing, UTF-8 decoding and a ``json.loads`` per socket: at 2,500 sockets per client
process the clients, not the web processes, were the busier side (issue 17's 10,000 row).

This client does what a subscriber must and no more: the opening handshake (checked), a ping
whose pong proves the consumer joined its group, then every frame read off the socket as it
arrives, a server ping answered. What is measured is unchanged: the moment a socket's bytes are
read is the moment the client holds the message, and every text frame of every socket is
counted. Only the parsing is shared: the web process sends every socket of an event the same
bytes (one frame per process), so a message's JSON is parsed once per distinct payload, not once
per socket; a payload that differs is parsed on its own.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import select
import socket
import struct
import time
from collections.abc import Callable
from datetime import datetime
from urllib.parse import urlsplit

FINAL = ("Completed", "Failed")
GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
TEXT, CLOSE, PING, PONG, CONTINUATION = 0x1, 0x8, 0x9, 0xA, 0x0


class ServerRefused(ConnectionError):
    """The web process answered the handshake with something other than 101, or closed or reset
    a socket: the server's doing, never the harness's."""


def client_frame(opcode: int, payload: bytes) -> bytes:
    """A client frame: masked, as RFC 6455 requires, with the all-zero key (legal, and the
    payload stays as it is)."""
    n = len(payload)
    if n < 126:
        head = struct.pack("!BB", 0x80 | opcode, 0x80 | n)
    elif n < 1 << 16:
        head = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, n)
    else:
        head = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, n)
    return head + b"\0\0\0\0" + payload


PING_MESSAGE = client_frame(TEXT, b'{"type": "ping"}')
CLOSE_MESSAGE = client_frame(CLOSE, struct.pack("!H", 1000))


class _Conn:
    __slots__ = ("buf", "fragments", "index", "key", "sock", "state")

    def __init__(self, sock: socket.socket, index: int, key: bytes) -> None:
        self.sock = sock
        self.index = index
        self.buf = bytearray()
        self.state = 0  # 0: handshake sent; 1: ping sent, awaiting pong; 2: subscribed
        self.key = key
        self.fragments: bytearray | None = None


class LeanSubscribers:
    """``count`` sockets on ``url``; the figures the benchmark keeps, as ``bench.live.Watched``'s
    fields: ``delays`` (seconds), ``received`` (per socket), ``events`` ((item, seq) seen)."""

    def __init__(self, url: str, headers: dict[str, str], count: int) -> None:
        parts = urlsplit(url)
        self.address = (parts.hostname or "127.0.0.1", parts.port or 80)
        self.path = parts.path or "/"
        self.headers = headers
        self.count = count
        self.delays: list[float] = []
        self.received = [0] * count
        self.events: set[tuple[str, int]] = set()
        self.finished: dict[str, int] = {}
        self.closed = 0  # sockets the server closed after they subscribed
        self.on_finished: Callable[[str], None] | None = None
        self.conns: dict[int, _Conn] = {}
        self.poller = select.epoll()
        self._ready = 0
        # payload -> (item id, seq, updated_at as a timestamp, final) or None (not a status event)
        self._parsed: dict[bytes, tuple[str, int, float, bool] | None] = {}

    # --- connecting ------------------------------------------------------------------------

    def connect(self, batch: int = 100, timeout: float = 60.0) -> None:
        """Open every socket, ``batch`` handshakes in flight at a time; each is ready once the
        pong to its ping came back. Raises TimeoutError when a batch is not ready in time."""
        for start in range(0, self.count, batch):
            for index in range(start, min(start + batch, self.count)):
                self._open(index)
            deadline = time.monotonic() + timeout
            while self._ready < min(start + batch, self.count):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"{self._ready} of {self.count} sockets subscribed after {timeout:g} s")
                self.poll(min(left, 1.0))

    def _open(self, index: int) -> None:
        sock = socket.create_connection(self.address, timeout=30)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        key = base64.b64encode(os.urandom(16))
        lines = [
            f"GET {self.path} HTTP/1.1",
            f"Host: {self.address[0]}:{self.address[1]}",
            "Upgrade: websocket",
            "Connection: Upgrade",
            f"Sec-WebSocket-Key: {key.decode()}",
            "Sec-WebSocket-Version: 13",
            *(f"{k}: {v}" for k, v in self.headers.items()),
        ]
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        sock.setblocking(False)
        conn = _Conn(sock, index, key)
        self.conns[sock.fileno()] = conn
        self.poller.register(sock.fileno(), select.EPOLLIN)

    # --- reading ---------------------------------------------------------------------------

    def poll(self, timeout: float) -> list[int]:
        """Read whatever arrived within ``timeout``; returns the other file descriptors that
        became readable (``watch``-ed ones, such as a command pipe)."""
        others = []
        for fd, _ in self.poller.poll(timeout):
            conn = self.conns.get(fd)
            if conn is None:
                others.append(fd)
                continue
            try:
                data = conn.sock.recv(1 << 16)
            except BlockingIOError:
                continue
            except ConnectionError as exc:
                self._lost(conn, f"reset: {exc}")
                continue
            now = time.time()  # the client holds every message in these bytes from now on
            if not data:
                self._lost(conn, "closed by the server without a close frame")
                continue
            conn.buf += data
            if conn.state == 0:
                self._handshake(conn)
            if conn.state:
                self._frames(conn, now)
        return others

    def watch(self, fd: int) -> None:
        self.poller.register(fd, select.EPOLLIN)

    def _handshake(self, conn: _Conn) -> None:
        end = conn.buf.find(b"\r\n\r\n")
        if end < 0:
            return
        head = bytes(conn.buf[:end]).decode("latin-1")
        del conn.buf[: end + 4]
        status, *lines = head.split("\r\n")
        fields = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
        accept = base64.b64encode(hashlib.sha1(conn.key + GUID).digest()).decode()
        if not status.startswith("HTTP/1.1 101") or fields.get("sec-websocket-accept") != accept:
            raise ServerRefused(f"handshake refused: {head!r}")
        conn.state = 1
        conn.sock.send(PING_MESSAGE)

    def _frames(self, conn: _Conn, now: float) -> None:
        buf = conn.buf
        while len(buf) >= 2:
            b0, b1 = buf[0], buf[1]
            n, at = b1 & 0x7F, 2
            if n == 126:
                if len(buf) < 4:
                    return
                n, at = struct.unpack_from("!H", buf, 2)[0], 4
            elif n == 127:
                if len(buf) < 10:
                    return
                n, at = struct.unpack_from("!Q", buf, 2)[0], 10
            if b1 & 0x80:
                raise ServerRefused("the server sent a masked frame")
            if len(buf) < at + n:
                return
            payload = bytes(buf[at : at + n])
            del buf[: at + n]
            opcode, fin = b0 & 0x0F, b0 & 0x80
            if opcode in (TEXT, CONTINUATION):
                if not fin:
                    conn.fragments = (conn.fragments or bytearray()) + payload
                    continue
                if conn.fragments is not None:
                    payload, conn.fragments = bytes(conn.fragments + payload), None
                self._message(conn, payload, now)
            elif opcode == PING:
                conn.sock.send(client_frame(PONG, payload))
            elif opcode == CLOSE:
                code = struct.unpack_from("!H", payload)[0] if len(payload) >= 2 else None
                self._lost(conn, f"the server closed it (code {code}: {payload[2:].decode(errors='replace')!r})")
                return

    def _message(self, conn: _Conn, payload: bytes, now: float) -> None:
        if conn.state == 1:  # before the pong, as the asyncio client: the snapshot is not counted
            if json.loads(payload).get("type") == "pong":
                conn.state = 2
                self._ready += 1
            return
        try:
            info = self._parsed[payload]
        except KeyError:
            msg = json.loads(payload)
            if msg.get("type") == "media.status":
                item = msg["item"]
                stamp = datetime.fromisoformat(item["updated_at"]).timestamp()
                info = (item["id"], item["seq"], stamp, item["status"] in FINAL)
            else:
                info = None
            self._parsed[payload] = info
        if info is None:
            return
        key, seq, stamp, final = info
        self.delays.append(now - stamp)
        self.received[conn.index] += 1
        self.events.add((key, seq))
        if final:
            done = self.finished[key] = self.finished.get(key, 0) + 1
            if done == self.count and self.on_finished is not None:
                self.on_finished(key)

    def _lost(self, conn: _Conn, why: str) -> None:
        self._drop(conn)
        if conn.state < 2:
            raise ServerRefused(f"socket {conn.index} before it subscribed: {why}")
        self.closed += 1

    def _drop(self, conn: _Conn) -> None:
        fd = conn.sock.fileno()
        self.conns.pop(fd, None)
        self.poller.unregister(fd)
        conn.sock.close()

    def close(self) -> None:
        """Say goodbye on every socket still open (a close frame; no wait for the reply)."""
        for conn in list(self.conns.values()):
            with contextlib.suppress(OSError):
                conn.sock.send(CLOSE_MESSAGE)
            self._drop(conn)
        self.poller.close()
