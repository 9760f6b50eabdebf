"""The web process: websocket status delivery under many subscribers (tus uploads: bench/tus.py).

Delivery delay is measured from the worker's save of a status (``updated_at``, set when the
worker saves the row, before it commits and broadcasts) to the moment a websocket client holds
the message. Every subscriber watches the same user's items (``/ws/media/``); the events come from
real image items going through the real worker. Up to 1,000 subscribers the clients share this
process with one web process; the 10,000 row spreads them over 4 web processes with one client
process each. The clients share the machine, so at high counts part of the delay is the clients'
own: it is an upper bound on what a browser would see. "Lost": every subscriber should receive
every (item, seq) event any subscriber received; each one missing counts.
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import os
import time
from dataclasses import dataclass, field
from datetime import datetime
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any

from bench import inputs, stack
from bench.harness import Report, Row, TreeSampler, check, median, pct, proc_cpu, ratio

WS_MS = 250.0  # issue 6: subscribers one web process holds with the delay under 250 ms
MB = 1 << 20
ITEM_TIMEOUT = 60.0


def _session_headers(user: Any, server: Any) -> dict[str, str]:
    from django.test import Client

    client = Client()
    client.force_login(user)
    return {"Cookie": f"sessionid={client.cookies['sessionid'].value}", "Origin": server.url}


async def _connect(url: str, headers: dict[str, str], count: int) -> list[Any]:
    import websockets

    async def one() -> Any:
        ws = await websockets.connect(url, additional_headers=headers, open_timeout=60, max_queue=None)
        # The consumer handles messages one at a time: the pong proves it has joined the group.
        await ws.send(json.dumps({"type": "ping"}))
        while json.loads(await ws.recv()).get("type") != "pong":
            pass
        return ws

    sockets: list[Any] = []
    for start in range(0, count, 50):
        sockets += await asyncio.gather(*(one() for _ in range(min(50, count - start))))
    return sockets


@dataclass
class Watched:
    delays: list[float] = field(default_factory=list)  # seconds, one per message received
    received: list[int] = field(default_factory=list)  # messages per subscriber
    lost: str = ""  # why the run stopped early, if it did
    events: set[tuple[str, int]] = field(default_factory=set)  # every (item, seq) anyone received

    @property
    def missing(self) -> int:
        """Messages some subscriber did not get although another one did."""
        return sum(len(self.events) - n for n in self.received)


class _Subscribers:
    """The reading side of ``count`` sockets: delays, what each received, who has seen an item end."""

    def __init__(self, count: int) -> None:
        self.out = Watched(received=[0] * count)
        self.count = count
        self.finished: dict[str, int] = {}
        self.on_finished: Any = None  # called with an item id once every socket has its final status

    async def read(self, ws: Any, index: int) -> None:
        async for raw in ws:
            received = time.time()
            msg = json.loads(raw)
            if msg.get("type") != "media.status":
                continue
            item = msg["item"]
            self.out.delays.append(received - datetime.fromisoformat(item["updated_at"]).timestamp())
            self.out.received[index] += 1
            self.out.events.add((item["id"], item["seq"]))
            if item["status"] in stack.FINAL:
                done = self.finished[item["id"]] = self.finished.get(item["id"], 0) + 1
                if done == self.count and self.on_finished is not None:
                    self.on_finished(item["id"])


async def _watch(subscribers: int, url: str, headers: dict[str, str], paths: list[Path], owner: Any) -> Watched:
    """Process ``paths`` one by one while ``subscribers`` clients watch; each item waits until
    every client has its final status (or ``ITEM_TIMEOUT``: the web process fell behind so far
    that it stopped answering, or messages were lost)."""
    sockets = await _connect(url, headers, subscribers)
    subs = _Subscribers(subscribers)
    everyone: dict[str, asyncio.Event] = {}
    subs.on_finished = lambda key: everyone[key].set() if key in everyone else None
    readers = [asyncio.create_task(subs.read(ws, i)) for i, ws in enumerate(sockets)]
    out = subs.out
    try:
        for path in paths:
            item = await asyncio.to_thread(stack.create, path, owner)
            key = str(item.pk)
            everyone[key] = asyncio.Event()
            await asyncio.to_thread(stack.enqueue, item)
            try:
                await asyncio.wait_for(everyone[key].wait(), ITEM_TIMEOUT)
            except TimeoutError:
                got = subs.finished.get(key, 0)
                out.lost = f"only {got} of {subscribers} clients got Completed within {ITEM_TIMEOUT:g} s"
                break
    finally:
        for task in readers:
            task.cancel()
        await asyncio.gather(*(ws.close() for ws in sockets), return_exceptions=True)
    return out


def _client_process(url: str, headers: dict[str, str], count: int, commands: Connection, reports: Connection) -> None:
    """One client process of the multi-process row: ``count`` sockets on one web process; reports
    "ready", then "done <item>" as every socket gets an item's final status, then its figures."""

    async def main() -> None:
        sockets = await _connect(url, headers, count)
        subs = _Subscribers(count)
        subs.on_finished = lambda key: reports.send(("done", key))
        readers = [asyncio.create_task(subs.read(ws, i)) for i, ws in enumerate(sockets)]
        reports.send(("ready", None))
        await asyncio.to_thread(commands.recv)  # "stop"
        for task in readers:
            task.cancel()
        await asyncio.gather(*(ws.close() for ws in sockets), return_exceptions=True)
        w = subs.out
        reports.send(("result", (w.delays, w.received, sorted(w.events))))

    asyncio.run(main())


def _watch_spread(
    servers: list[Any], per_server: int, headers: dict[str, str], paths: list[Path], owner: Any
) -> Watched:
    """``_watch`` with the subscribers spread over several web processes, one client process each."""
    ctx = multiprocessing.get_context("spawn")
    procs, commands, reports = [], [], []
    for server in servers:
        cmd_r, cmd_w = ctx.Pipe(duplex=False)
        rep_r, rep_w = ctx.Pipe(duplex=False)
        proc = ctx.Process(
            target=_client_process, args=(f"{server.ws_url}/ws/media/", headers, per_server, cmd_r, rep_w)
        )
        proc.start()
        procs.append(proc)
        commands.append(cmd_w)
        reports.append(rep_r)
    out = Watched()
    done: dict[str, int] = {}
    results: list[Any] = []

    def pump(until: Any, deadline: float) -> bool:
        while not until():
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            for conn in wait(reports, timeout=min(left, 1.0)):
                kind, value = conn.recv()  # type: ignore[union-attr]
                if kind == "done":
                    done[value] = done.get(value, 0) + 1
                elif kind == "ready":
                    done["ready"] = done.get("ready", 0) + 1
                else:
                    results.append(value)
        return True

    try:
        if not pump(lambda: done.get("ready", 0) == len(servers), time.monotonic() + 600):
            out.lost = "the clients did not connect within 600 s"
        for path in paths if not out.lost else []:
            item = stack.create(path, owner)
            key = str(item.pk)
            stack.enqueue(item)
            if not pump(lambda k=key: done.get(k, 0) == len(servers), time.monotonic() + ITEM_TIMEOUT):
                out.lost = f"only {done.get(key, 0)} of {len(servers)} client processes saw every socket get Completed"
                break
    finally:
        for cmd in commands:
            cmd.send("stop")
        pump(lambda: len(results) == len(servers), time.monotonic() + 120)
        for proc in procs:
            proc.join(30)
            if proc.is_alive():
                proc.kill()
    for delays, received, events in results:
        out.delays += delays
        out.received += received
        out.events |= {tuple(e) for e in events}
    return out


def _row(report: Report, name: str, watched: Watched, base: float | None, extra: str) -> float:
    """Add one delay row; return its p95 (infinite when the run stopped early)."""
    ms = [d * 1000 for d in watched.delays] or [float("nan")]
    p50, p95 = median(ms), pct(ms, 95)
    expected = len(watched.events) * len(watched.received)
    missing = watched.missing
    note = f"lost {missing} of {expected} messages; {len(watched.events)} events; {extra}" + (
        f"; STOPPED: {watched.lost}" if watched.lost else ""
    )
    meets = False if watched.lost or missing else check(p95, "<", WS_MS)
    report.add(
        Row(name, p95, "ms p95", base, ratio(p95, base), f"< {WS_MS:g} ms (value), nothing lost", meets,
            f"median {p50:.0f} ms", len(watched.delays), note)
    )  # fmt: skip
    return float("inf") if watched.lost or missing else p95


def websocket_section(
    report: Report, server: Any, *, counts: list[int], items: int, spread: tuple[int, int] | None = None
) -> None:
    """Rows per subscriber count on one web process, then (``spread``: processes, subscribers) the
    same with the subscribers spread over several web processes. The baseline of every row is the
    1-subscriber p95 of the same run."""
    paths = inputs.small_images(items)
    results: dict[int, tuple[float, float]] = {}
    load_now = " ".join(f"{x:.2f}" for x in os.getloadavg())
    for count in counts:
        owner = stack.user(f"bench-ws-{count}-{time.monotonic_ns()}")
        headers = _session_headers(owner, server)
        with TreeSampler(server.proc.pid) as memory:
            started, web_cpu, own_cpu = time.monotonic(), proc_cpu(server.proc.pid), time.process_time()
            watched = asyncio.run(_watch(count, f"{server.ws_url}/ws/media/", headers, paths, owner))
            wall = time.monotonic() - started
            web_busy, own_busy = (proc_cpu(server.proc.pid) - web_cpu) / wall, (time.process_time() - own_cpu) / wall
        base = results[counts[0]][1] if count != counts[0] else None
        extra = (
            f"web RSS {memory.peak.processes_mb:.0f} MB; CPU busy: web {web_busy:.0%}, clients {own_busy:.0%}; "
            f"{wall:.0f} s; load {load_now}"
        )
        label = f"websocket delay save→client, {count} subscriber{'s' if count > 1 else ''}"
        p95 = _row(report, label, watched, base, extra)
        results[count] = (median([d * 1000 for d in watched.delays] or [float("nan")]), p95)
        if watched.lost:
            break  # more subscribers can only do worse
    # The largest count such that it and every smaller count tested stayed under the bound.
    best = 0
    for count in sorted(results):
        if results[count][1] >= WS_MS:
            break
        best = count
    everyone = best == max(counts)
    report.add(
        Row("subscribers one web process holds (p95 < 250 ms)", best, "subscribers", None, None, "", None, "",
            len(counts), f"{'≥ ' if everyone else ''}{best}: every count up to it stayed under; tested {counts}")
    )  # fmt: skip
    report.extra["websocket"] = {str(c): {"p50_ms": r[0], "p95_ms": r[1]} for c, r in results.items()}  # inf: lost
    if spread is not None and counts[0] in results:
        _spread_row(report, server, spread, paths, base=results[counts[0]][1])


def _spread_row(report: Report, server: Any, spread: tuple[int, int], paths: list[Path], *, base: float) -> None:
    from tests.conftest import AsgiServer

    processes, total = spread
    extra_servers = [AsgiServer(server.log.parent / f"asgi-{i}.log") for i in range(1, processes)]
    try:
        for s in extra_servers:
            s.start()
        servers = [server, *extra_servers]
        owner = stack.user(f"bench-ws-spread-{total}-{time.monotonic_ns()}")
        headers = _session_headers(owner, server)
        load_now = " ".join(f"{x:.2f}" for x in os.getloadavg())
        started = time.monotonic()
        cpu = {s.proc.pid: proc_cpu(s.proc.pid) for s in servers}
        watched = _watch_spread(servers, total // processes, headers, paths, owner)
        wall = time.monotonic() - started
        busy = ", ".join(f"{(proc_cpu(s.proc.pid) - cpu[s.proc.pid]) / wall:.0%}" for s in servers)
        extra = f"{processes} web processes, {total // processes} each; CPU busy: {busy}; {wall:.0f} s; load {load_now}"
        p95 = _row(report, f"websocket delay save→client, {total} subscribers over {processes} web processes",
                   watched, base, extra)  # fmt: skip
        report.extra.setdefault("websocket", {})[f"{total}/{processes}"] = {"p95_ms": p95}
    finally:
        for s in extra_servers:
            s.stop()
