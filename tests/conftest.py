"""Fixtures every test layer reuses: a real Celery worker, a live ASGI server, users, items.

The worker and the server are subprocesses started once per run against the same test database
(a SQLite file, or a PostgreSQL database) and Redis database as the tests (see
``tests/env_plugin.py``); tests that use them need committed data, hence ``transactional_db``.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.env_plugin import ROOT, RUN_DIR, free_port

TESTDATA = ROOT.parent / "shared" / "testdata"


def wait_for(predicate: Callable[[], Any], *, timeout: float, what: str, interval: float = 0.1) -> Any:
    """Poll ``predicate`` until it returns something truthy, or fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def run_process_command(paths: list[Path], data_dir: Path, *, timeout: float = 900) -> tuple[Any, dict[str, dict]]:
    """``manage.py process --json`` as a developer runs it (embedded defaults in ``data_dir``):
    the finished process and its reports by input file name."""
    env = {**os.environ, "DATA_DIR": str(data_dir)}
    env.pop("DATABASE_URL", None)
    proc = subprocess.run(
        [sys.executable, "manage.py", "process", "--json", *map(str, paths)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    return proc, {Path(r["input"]).name: r for r in lines}


def _subprocess_env() -> dict[str, str]:
    """The environment of the worker and the server: this run's, with ``DATABASE_URL`` naming the
    test database that ``django_db_setup`` created (its name is in ``settings_dict`` by now)."""
    from django.db import connection

    env = dict(os.environ)
    settings_dict = connection.settings_dict
    if settings_dict["ENGINE"].endswith("sqlite3"):
        env["DATABASE_URL"] = f"sqlite:///{settings_dict['NAME']}"
    else:
        # The run's own URL with only the database swapped, so that user, password, host (a
        # socket directory too) and options (``?sslmode=``) reach the subprocesses as they are.
        url = urllib.parse.urlsplit(os.environ["DATABASE_URL"])
        env["DATABASE_URL"] = url._replace(path="/" + urllib.parse.quote(settings_dict["NAME"])).geturl()
    env["PYTHONUNBUFFERED"] = "1"
    return env


@pytest.fixture(scope="session")
def django_db_setup(django_db_setup: None, django_db_blocker: Any) -> Iterator[None]:
    """pytest-django's, plus, on PostgreSQL, before it drops the test database: end the sessions
    that other threads of this process left open (``asyncio.to_thread``, ``sync_to_async``: each
    thread has its own connection, and Django closes only this thread's), which would make
    ``DROP DATABASE`` fail. The worker and the server have stopped by then (they depend on this)."""
    yield
    from django.db import connection

    if connection.vendor == "postgresql":
        with django_db_blocker.unblock(), connection.cursor() as cursor:
            cursor.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE datname = current_database() AND pid <> pg_backend_pid()"
            )


def _die_with_parent() -> None:
    """preexec: SIGKILL this server when the test run dies, so no orphan serves a later run."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


class _Logged:
    log: Path

    def _log_file(self) -> Any:
        return open(self.log, "ab")


class Worker(_Logged):
    """A real ``celery worker`` process serving both queues. ``env`` overrides its environment
    (say its own WORK_ROOT, as on another machine)."""

    def __init__(
        self, log: Path, *, env: dict[str, str] | None = None, concurrency: int = 2, queues: str = "default,video"
    ) -> None:
        self.log = log
        self.env = env or {}
        self.concurrency = concurrency
        self.queues = queues
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.launch()
        self.wait_ready()

    def launch(self) -> None:
        """Start the process without waiting for it to answer (``wait_ready``): workers launched
        together boot side by side (see ``start_workers``)."""
        self.log.parent.mkdir(parents=True, exist_ok=True)
        self.name = f"test-{os.getpid()}-{time.monotonic_ns()}@localhost"
        cmd = [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "config",
            "worker",
            "-Q",
            self.queues,
            "-c",
            str(self.concurrency),
            "-n",
            self.name,
            "--loglevel",
            "INFO",
            "--without-gossip",
            "--without-mingle",
        ]
        self.proc = subprocess.Popen(
            cmd,
            cwd=ROOT,
            env={**_subprocess_env(), **self.env},
            stdout=self._log_file(),
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )

    def wait_ready(self) -> None:
        from config.celery import app

        wait_for(lambda: self._alive() and app.control.ping([self.name], timeout=0.5), timeout=60, what="the worker")

    def _alive(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise AssertionError(f"worker exited with {self.proc.returncode}; log:\n{self.log.read_text()[-3000:]}")
        return True

    def pool_pids(self) -> list[int]:
        assert self.proc is not None
        out = subprocess.run(["pgrep", "-P", str(self.proc.pid)], capture_output=True, text=True).stdout
        return [int(p) for p in out.split()]

    def stop(self) -> None:
        self.terminate()
        self.wait_stopped()

    def terminate(self) -> None:
        """Ask for a warm shutdown (SIGTERM to the group) without waiting for it (``wait_stopped``)."""
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)

    def wait_stopped(self) -> None:
        """The process has exited: after ``terminate``, up to 30 s, then SIGKILL."""
        if self.proc and self.proc.poll() is None:
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()

    def is_running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


def replace_workers(stopping: list[Worker], starting: list[Worker]) -> None:
    """Stop ``stopping`` and start ``starting``, their shutdowns and boots side by side (a worker
    takes ~2 s to boot and ~1.5 s to shut down, mostly waiting): when this returns every one of
    ``stopping`` has exited and every one of ``starting`` answers a ping. Nothing is sent to a
    queue meanwhile, so the one kind cannot take the other's work."""
    for worker in stopping:
        worker.terminate()
    for worker in starting:
        worker.launch()
    for worker in stopping:
        worker.wait_stopped()
    for worker in starting:
        worker.wait_ready()


@pytest.fixture(scope="session")
def _worker_session(django_db_setup: None, django_db_blocker: Any) -> Iterator[Worker]:
    with django_db_blocker.unblock():
        worker = Worker(RUN_DIR / "logs" / "worker.log")
        worker.start()
    yield worker
    worker.stop()


@pytest.fixture
def celery_worker(_worker_session: Worker, transactional_db: None) -> Worker:
    """The running worker; restarted if an earlier test killed it."""
    if not _worker_session.is_running():
        _worker_session.start()
    return _worker_session


class AsgiServer(_Logged):
    def __init__(self, log: Path) -> None:
        self.log = log
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.ws_url = f"ws://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "uvicorn",
                "config.asgi:application",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--no-access-log",
                # As the Procfile: deflate is ~40 % of the web's CPU per live-status message.
                "--ws-per-message-deflate",
                "false",
            ],
            cwd=ROOT,
            env=_subprocess_env(),
            stdout=self._log_file(),
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )

        def up() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"the ASGI server exited; log:\n{self.log.read_text()[-3000:]}")
            try:
                return urllib.request.urlopen(f"{self.url}/healthz", timeout=1).status == 200
            except OSError:
                return False

        wait_for(up, timeout=30, what="the ASGI server")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(30)


@pytest.fixture(scope="session")
def _asgi_session(django_db_setup: None, django_db_blocker: Any) -> Iterator[AsgiServer]:
    with django_db_blocker.unblock():
        server = AsgiServer(RUN_DIR / "logs" / "asgi.log")
        server.start()
    yield server
    server.stop()


@pytest.fixture
def asgi_server(_asgi_session: AsgiServer, transactional_db: None) -> AsgiServer:
    return _asgi_session


@pytest.fixture
def tmp_storage(tmp_path: Path, settings: Any) -> Path:
    """An empty local storage root and work root for tests that process in-process."""
    root = tmp_path / "storage"
    settings.STORAGES = {
        **settings.STORAGES,
        "default": {
            "BACKEND": "django.core.files.storage.FileSystemStorage",
            "OPTIONS": {"location": str(root), "base_url": "/media/"},
        },
    }
    settings.WORK_ROOT = tmp_path / "work"
    return root


@pytest.fixture
def make_user(db: None) -> Callable[..., Any]:
    from django.contrib.auth import get_user_model

    counter = iter(range(1_000_000))

    def make(username: str | None = None, *, staff: bool = False, password: str = "pw-123456") -> Any:
        name = username or f"user{next(counter)}"
        return get_user_model().objects.create_user(name, f"{name}@example.com", password, is_staff=staff)

    return make


@pytest.fixture
def make_item(make_user: Callable[..., Any]) -> Callable[..., Any]:
    """A MediaItem whose source is the given file, stored as an upload would be."""
    from media_app.services import media_item_create, media_item_store_source

    def make(path: Path, *, owner: Any = None, name: str | None = None) -> Any:
        item = media_item_create(owner=owner or make_user(), original_name=name or path.name, size=path.stat().st_size)
        with open(path, "rb") as fh:
            media_item_store_source(item=item, fileobj=fh)
        return item

    return make


class GroupListener:
    """Hears a channel-layer group as a web process does: on one event loop of its own (the
    pub/sub layer ties a channel to the loop that made it), in a thread; ``next`` waits for the
    next event with a deadline."""

    def __init__(self, group: str) -> None:
        import asyncio
        import queue
        import threading

        from channels.layers import get_channel_layer

        self._events: queue.Queue[dict[str, Any]] = queue.Queue()
        self._ready = threading.Event()
        self._stop: Any = None
        self._loop = asyncio.new_event_loop()

        async def listen() -> None:
            layer = get_channel_layer()
            channel = await layer.new_channel()
            await layer.group_add(group, channel)
            self._stop = asyncio.Event()
            self._ready.set()
            receiving = asyncio.ensure_future(self._pump(layer, channel))
            await self._stop.wait()
            receiving.cancel()
            await layer.group_discard(group, channel)

        self._thread = threading.Thread(target=self._loop.run_until_complete, args=(listen(),), daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise AssertionError(f"could not subscribe to {group}")

    async def _pump(self, layer: Any, channel: str) -> None:
        while True:
            self._events.put(await layer.receive(channel))

    def next(self, timeout: float) -> dict[str, Any]:
        import queue

        try:
            return self._events.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no event within {timeout} s") from None

    def close(self) -> None:
        if self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)
