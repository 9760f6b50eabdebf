"""Loaded with ``-p tests.env_plugin`` before Django's settings: points the whole run (this
process, the Celery worker and the ASGI server it starts) at a throw-away data directory, a
file SQLite test database both can open, and a Redis database of its own."""

from __future__ import annotations

import atexit
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import redis

ROOT = Path(__file__).resolve().parent.parent
RUN_DIR = Path(tempfile.mkdtemp(prefix="cpc-test-"))
_redis_proc: subprocess.Popen[bytes] | None = None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _claim_db(host: str, port: int) -> int | None:
    """A database number no other test run holds (a lock key with an expiry in each) and no
    client uses (a worker orphaned by a killed run would otherwise steal this run's tasks)."""
    busy = {int(c["db"]) for c in redis.Redis(host=host, port=port, socket_connect_timeout=1).client_list()}
    for db in range(1, 16):
        if db in busy:
            continue
        client = redis.Redis(host=host, port=port, db=db, socket_connect_timeout=1)
        if client.set("cpc-test-run-lock", os.getpid(), nx=True, ex=3 * 3600):
            for key in client.scan_iter(count=1000):
                if key != b"cpc-test-run-lock":
                    client.delete(key)
            atexit.register(lambda c=client: c.delete("cpc-test-run-lock"))
            return db
    return None


def _start_redis() -> str:
    global _redis_proc
    port = free_port()
    exe = shutil.which("redis-server")
    if exe is None:
        raise RuntimeError("no Redis on 127.0.0.1:6379 and no redis-server to start: run `make test`")
    _redis_proc = subprocess.Popen(
        [exe, "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--appendonly", "no", "--dir", str(RUN_DIR)],
        stdout=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            redis.Redis(port=port, socket_connect_timeout=0.2).ping()
            return f"redis://127.0.0.1:{port}/1"
        except redis.ConnectionError:
            time.sleep(0.05)
    raise RuntimeError("redis-server did not start")


def _redis_url() -> str:
    try:
        redis.Redis(socket_connect_timeout=1).ping()
    except redis.ConnectionError:
        return _start_redis()
    db = _claim_db("127.0.0.1", 6379)
    return f"redis://127.0.0.1:6379/{db}" if db is not None else _start_redis()


REDIS_URL = _redis_url()
os.environ.update(
    {
        "DJANGO_SETTINGS_MODULE": "config.settings",
        "DATA_DIR": str(RUN_DIR / "data"),
        "TEST_DATABASE_PATH": str(RUN_DIR / "test.sqlite3"),
        "REDIS_URL": REDIS_URL,
        "CELERY_BROKER_URL": REDIS_URL,
        "CELERY_RESULT_BACKEND": REDIS_URL,
        "CHANNEL_REDIS_URL": REDIS_URL,
        "MEDIA_RETRY_BACKOFF": "1",
        "DJANGO_DEBUG": "false",
    }
)


@atexit.register
def _cleanup() -> None:
    if _redis_proc is not None:
        _redis_proc.terminate()
        _redis_proc.wait(10)
    if not os.environ.get("KEEP_TEST_DATA"):
        shutil.rmtree(RUN_DIR, ignore_errors=True)
