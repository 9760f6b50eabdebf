"""The channel layer behind live status: one Redis subscription per group per web process.

channels-redis' default layer stores group members in Redis, so one ``group_send`` costs one
Redis message per subscriber, each decoded again by the web process that holds the socket: from
~250 subscribers a web process spent its CPU re-reading the same event (issue 17). Its pub/sub
layer publishes once per group; each web process subscribes once to the groups its sockets
watch and fans out in process. Two things are added here:

* The event is decoded once per web process and the same dict handed to every local member
  (the stock pub/sub layer queues the raw bytes and decodes them again in every consumer).
  Consumers treat events as read-only.
* ``group_send_many``: a synchronous publish for the Celery worker, on one long-lived
  connection, each message serialised once. ``async_to_sync`` from a worker starts an event loop
  and a new Redis connection per call, which the pub/sub layer would open and close every time.
* Messages that queued up while the last ones went out are read together, and each socket that
  takes its events directly gets all of its own in one write (``BATCH_MAX``).
* ``group_send_soon``: the same publish from a thread of the process's own, so a task does not
  wait for Redis' answer after each status save: on a busy 2-core box that round trip (Redis
  waiting for a core) was 0.3-3 ms each, five times per image. What waits meanwhile is sent in
  one pipeline, in order.

Pub/sub keeps no backlog: a web process that is disconnected from Redis misses what is published
meanwhile (redis-py subscribes again on reconnect). A socket's first message is the item's saved
state, and a reconnecting client gets it again, so nothing a person sees stays stale.
"""

from __future__ import annotations

import asyncio
import atexit
import collections
import logging
import os
import threading
from collections.abc import Callable, Coroutine, Iterable
from typing import Any
from urllib.parse import parse_qs, urlsplit

import redis
from channels_redis.pubsub import RedisPubSubChannelLayer, RedisPubSubLoopLayer, RedisSingleShardConnection
from channels_redis.utils import _consistent_hash, _wrap_close, decode_hosts

logger = logging.getLogger("media_app.sockets")

# At most this many published messages are read before they are handed out: events that arrived
# while the last ones went out to every socket reach each socket in one write.
BATCH_MAX = 64


class _FanOutShard(RedisSingleShardConnection):  # type: ignore[misc]
    async def _do_receiving(self) -> None:
        """The parent's loop, reading what has queued up in batches (``BATCH_MAX``), with Redis
        being away logged as one line, not a traceback a second.
        redis-py reconnects and subscribes again by itself; what is published meanwhile is lost
        (every socket's first message is the saved state, so a reconnecting client catches up)."""
        failures = 0
        while True:
            try:
                if self._pubsub and self._pubsub.subscribed:
                    message = await self._pubsub.get_message(ignore_subscribe_messages=True, timeout=0.1)
                    if failures:
                        logger.info("channel layer: Redis reachable again after %d failed reads", failures)
                        failures = 0
                    if message is None:
                        continue
                    # What else has arrived meanwhile (events that queued while the last batch
                    # went out to every socket) goes out with it: one write per socket for all.
                    batch = [message]
                    try:
                        while len(batch) < BATCH_MAX:
                            more = await self._pubsub.get_message(ignore_subscribe_messages=True, timeout=0)
                            if more is None:
                                break
                            batch.append(more)
                    finally:  # what was read is handed out, even when Redis went away meanwhile
                        self._hand_out(batch)
                else:
                    await asyncio.sleep(0.1)
            except (asyncio.CancelledError, GeneratorExit):
                raise
            except (redis.RedisError, OSError, TimeoutError) as exc:
                failures += 1
                if failures == 1:
                    logger.warning("channel layer: Redis unreachable (%s); retrying every second", exc)
                await asyncio.sleep(1)
            except Exception:
                logger.exception("channel layer: unexpected error in the receive loop")
                await asyncio.sleep(1)

    def _receive_message(self, message: dict[str, Any] | None) -> None:
        if message is not None:
            self._receive_messages([message])

    def _hand_out(self, batch: list[dict[str, Any]]) -> None:
        """``_receive_messages`` from the receive loop's ``finally``: it must not raise there, or it
        would replace the error (a cancel, Redis gone) already on its way out."""
        try:
            self._receive_messages(batch)
        except Exception:
            logger.exception("channel layer: could not hand out %d messages", len(batch))

    def _receive_messages(self, messages: list[dict[str, Any]]) -> None:
        """Hand each message to its group's members here. A member that takes events directly
        gets all of the batch's for it at once, in the order they were published
        (``deliver_directly``'s ``many``); events it takes through its queue are queued first. A
        message that cannot be decoded is logged and skipped: it costs no other message."""
        layer = self.channel_layer
        direct_events: dict[str, list[dict[str, Any]]] = {}
        for message in messages:
            name = message["channel"]
            if isinstance(name, bytes):
                name = name.decode()
            members = [
                c for c in ([name] if name in layer.channels else layer.groups.get(name, ())) if c in layer.channels
            ]
            if not members:
                continue
            try:
                decoded = layer.channel_layer.deserialize(message["data"])  # once, for every member
            except Exception:
                logger.exception("channel layer: a message on %s could not be decoded", name)
                continue
            kind = decoded.get("type") if isinstance(decoded, dict) else None
            for channel in members:
                direct = layer.direct.get(channel)
                if direct is not None and kind in direct[0]:
                    direct_events.setdefault(channel, []).append(decoded)
                else:
                    layer.channels[channel].put_nowait(decoded)
        for channel, events in direct_events.items():
            direct = layer.direct.get(channel)
            if direct is None:
                continue
            _, handler, now, many = direct
            if len(events) > 1 and many is not None and many(events):
                continue
            for event in events:
                if now is None or not now(event):
                    layer.run_eagerly(handler(event))


class _FanOutLoopLayer(RedisPubSubLoopLayer):  # type: ignore[misc]
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._shards = [_FanOutShard(shard.host, self) for shard in self._shards]
        # channel -> (event types, handler, plain-call handlers of one event and of several, or
        # None): see deliver_directly.
        self.direct: dict[
            str,
            tuple[
                frozenset[str],
                Callable[[dict[str, Any]], Coroutine[Any, Any, None]],
                Callable[[dict[str, Any]], bool] | None,
                Callable[[list[dict[str, Any]]], bool] | None,
            ],
        ] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    def deliver_directly(
        self,
        channel: str,
        types: Iterable[str],
        handler: Callable[[dict[str, Any]], Coroutine[Any, Any, None]],
        *,
        now: Callable[[dict[str, Any]], bool] | None = None,
        many: Callable[[list[dict[str, Any]]], bool] | None = None,
    ) -> None:
        """Hand events of ``types`` for ``channel`` straight to ``handler`` (``run_eagerly``) instead
        of queueing them for the consumer's receive loop. That loop costs a receive task,
        an ``asyncio.wait`` and Channels' dispatch (with a thread hop for the ORM) per message:
        at 1,000 sockets, most of the web process's time (issue 17). ``handler`` must not raise.
        ``now``, if given, is tried first as a plain call (no coroutine): True means the event is
        handled; False passes it on to ``handler``. It must not raise either. ``many``, if given, is
        tried first when several events for ``channel`` arrived together, with all of them: True
        means every one is handled; False, none is, and each goes on as above, in order."""
        self.direct[channel] = (frozenset(types), handler, now, many)

    def stop_delivering_directly(self, channel: str) -> None:
        self.direct.pop(channel, None)

    def run_eagerly(self, coroutine: Coroutine[Any, Any, None]) -> None:
        """Run ``coroutine`` now, up to its first suspension, as asyncio's eager tasks (3.12) do.

        A send to a socket whose buffer has room never suspends, so the common case costs no task
        at all and an event reaches every socket in one pass, in order. Only a send that waits
        (a client not reading) is handed to a task, so it holds up no other socket."""
        try:
            waiting_for = coroutine.send(None)
        except StopIteration:
            return
        except Exception:
            logger.exception("event handler failed")
            return
        task = asyncio.ensure_future(_finish(coroutine, waiting_for))
        self._tasks.add(task)  # a strong reference until it is done
        task.add_done_callback(self._tasks.discard)

    async def receive(self, channel: str) -> Any:
        try:
            return await super().receive(channel)
        except (TimeoutError, asyncio.CancelledError, GeneratorExit):
            self.direct.pop(channel, None)  # the consumer has ended
            raise


class FanOutChannelLayer(RedisPubSubChannelLayer):  # type: ignore[misc]
    """``RedisPubSubChannelLayer`` that decodes an event once per process, with a sync publish."""

    def __init__(self, *args: Any, hosts: Any = None, prefix: str | None = None, **kwargs: Any) -> None:
        # Pub/sub channels ignore Redis' database number: the default prefix carries it, so that
        # two sites (or test runs) on one Redis with different databases never hear each other.
        prefix = prefix if prefix is not None else f"asgi.db{_database(decode_hosts(hosts)[0])}."
        super().__init__(*args, hosts=hosts, prefix=prefix, **kwargs)
        self._hosts = decode_hosts(hosts)
        self._prefix = prefix
        self._clients: list[redis.Redis] | None = None
        self._clients_lock = threading.Lock()
        self._sender: _Sender | None = None

    def _get_layer(self) -> Any:
        loop = asyncio.get_running_loop()
        if loop not in self._layers:
            self._layers[loop] = _FanOutLoopLayer(*self._args, **self._kwargs, channel_layer=self)
            _wrap_close(self, loop)  # as the parent does: flush the loop's layer when its loop closes
        return self._layers[loop]

    def deserialize(self, message: Any) -> Any:
        # Already decoded by _FanOutShard (the same dict for every member of a group).
        return message if isinstance(message, dict) else super().deserialize(message)

    def group_channel(self, group: str) -> str:
        return f"{self._prefix}__group__{group}"

    def _sync_clients(self) -> list[redis.Redis]:
        with self._clients_lock:
            if self._clients is None:
                self._clients = [_sync_client(host) for host in self._hosts]
            return self._clients

    def group_send_many(self, sends: Iterable[tuple[str, dict[str, Any]]]) -> None:
        """Publish each (group, message), in order, from synchronous code; a message object sent to
        several groups is serialised once. redis-py's pool is fork-safe (a Celery pool process
        opens its own connection)."""
        clients = self._sync_clients()
        pipelines = [client.pipeline(transaction=False) for client in clients]
        encoded: dict[int, bytes] = {}
        for group, message in sends:
            data = encoded.get(id(message))
            if data is None:
                data = encoded[id(message)] = self.serialize(message)
            channel = self.group_channel(group)
            pipelines[_consistent_hash(channel, len(pipelines))].publish(channel, data)
        for pipeline in pipelines:
            if len(pipeline):
                pipeline.execute()

    def group_send_soon(self, sends: Iterable[tuple[str, dict[str, Any]]], *, wait: bool = False) -> None:
        """``group_send_many`` from this process's sender thread, after whatever it was given
        before (so in order); returns at once, or with ``wait`` once this and every earlier send is
        published (or failed: logged, as every broadcast is best effort). Sends left when the
        interpreter exits are published then; a process killed first loses what it had not sent."""
        with self._clients_lock:
            sender = self._sender
            if sender is None or sender.pid != os.getpid():  # none yet, or inherited through fork
                sender = self._sender = _Sender(self.group_send_many)
        sender.submit(list(sends), wait=wait)

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until every ``group_send_soon`` so far is published; False on timeout."""
        sender = self._sender
        return sender is None or sender.pid != os.getpid() or sender.flush(timeout)


class _Sender:
    """One thread per process that publishes what ``group_send_soon`` queues, oldest first."""

    WAIT_SECONDS = 5.0  # a send with ``wait`` gives up after this (Redis' own socket timeout)

    def __init__(self, publish: Callable[[Iterable[tuple[str, dict[str, Any]]]], None]) -> None:
        self.pid = os.getpid()
        self._publish = publish
        self._ready = threading.Condition()
        self._queue: collections.deque[list[tuple[str, dict[str, Any]]]] = collections.deque()
        self._submitted = 0  # batches queued so far ...
        self._done = 0  # ... and published (or given up) so far, in the same order
        self._thread = threading.Thread(target=self._run, name="channel-layer-sender", daemon=True)
        self._thread.start()
        atexit.register(self.flush)

    def submit(self, sends: list[tuple[str, dict[str, Any]]], *, wait: bool) -> None:
        with self._ready:
            self._queue.append(sends)
            self._submitted += 1
            ticket = self._submitted
            self._ready.notify_all()
            if wait:
                self._ready.wait_for(lambda: self._done >= ticket, self.WAIT_SECONDS)

    def flush(self, timeout: float = WAIT_SECONDS) -> bool:
        with self._ready:
            ticket = self._submitted
            return self._ready.wait_for(lambda: self._done >= ticket, timeout)

    def _run(self) -> None:
        while True:
            with self._ready:
                self._ready.wait_for(lambda: bool(self._queue))
                batches = list(self._queue)
                self._queue.clear()
            try:
                self._publish([send for batch in batches for send in batch])
            except Exception:
                groups = [group for batch in batches for group, _ in batch]
                logger.warning("broadcast failed for groups %s", groups[:20], exc_info=True)
            with self._ready:
                self._done += len(batches)
                self._ready.notify_all()


async def _finish(coroutine: Coroutine[Any, Any, None], waiting_for: Any) -> None:
    """Drive a coroutine that ``run_eagerly`` started, from where it suspended, as a Task would:
    wait for what it yielded, then resume it (it reads the outcome from that future itself)."""
    while True:
        try:
            if waiting_for is None:  # a bare yield (asyncio.sleep(0))
                await asyncio.sleep(0)
            else:
                await waiting_for
        except asyncio.CancelledError as exc:
            try:
                waiting_for = coroutine.throw(exc)
            except (StopIteration, asyncio.CancelledError):
                return
            continue
        except Exception:  # noqa: BLE001 - the coroutine gets it from the future on resuming
            pass
        try:
            waiting_for = coroutine.send(None)
        except StopIteration:
            return
        except Exception:
            logger.exception("event handler failed")
            return


def _database(host: dict[str, Any]) -> int:
    address = host.get("address")
    if isinstance(address, str):
        path = urlsplit(address).path.strip("/")
        return int(path) if path.isdigit() else int(parse_qs(urlsplit(address).query).get("db", ["0"])[0])
    return int(host.get("db", 0))


def _sync_client(host: dict[str, Any]) -> redis.Redis:
    options = dict(host)
    address = options.pop("address", None)
    options.pop("master_name", None)
    options.pop("sentinel_kwargs", None)
    options.setdefault("socket_timeout", 5)
    options.setdefault("socket_connect_timeout", 5)
    if address is None:
        return redis.Redis(**options)
    if isinstance(address, tuple | list):
        return redis.Redis(host=address[0], port=address[1], **options)
    return redis.Redis.from_url(address, **options)
