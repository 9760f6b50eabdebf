"""Loaded with ``-p tests.env_plugin`` before Django's settings: points the whole run (this
process, the Celery worker and the ASGI server it starts) at a throw-away data directory, a
file SQLite test database both can open, and a Redis database of its own.

The database is SQLite unless ``DATABASE_URL`` is set in the environment (a ``.env`` file does
not count: the suite never runs on a developer's own database by accident). With a PostgreSQL
``DATABASE_URL`` (``make test``'s second pass sets one), this run's test database has a name of
its own, ``test_cpc_<unix time>_<pid>``, so that several runs can share one server; it is dropped
at the end even when the run is interrupted, and ones left by killed runs are dropped at start
once they are ``PG_STALE_SECONDS`` old."""

from __future__ import annotations

import atexit
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest
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
        "DATABASE_URL": os.environ.get("DATABASE_URL") or f"sqlite:///{RUN_DIR / 'data' / 'db.sqlite3'}",
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


# --- PostgreSQL: a test database of this run's own on a shared server ---------------------------

PG_TEST_PREFIX = "test_cpc_"
PG_TEST_NAME = f"{PG_TEST_PREFIX}{int(time.time())}_{os.getpid()}"
PG_STALE_SECONDS = 6 * 3600  # far beyond any run; a younger one may belong to a run still going


def _pg_connect(db: dict[str, Any]) -> Any:
    """An autocommit connection to the server's maintenance database, as Django would open it."""
    import psycopg

    params = {"host": db.get("HOST"), "port": db.get("PORT"), "user": db.get("USER"), "password": db.get("PASSWORD")}
    params = {k: str(v) for k, v in params.items() if v not in (None, "")}
    options = {k: v for k, v in (db.get("OPTIONS") or {}).items() if k in ("sslmode", "passfile", "service")}
    return psycopg.connect(dbname="postgres", autocommit=True, connect_timeout=10, **params, **options)


def _pg_drop_stale(db: dict[str, Any]) -> None:
    """Drop test databases of earlier runs that were killed before they could drop their own."""
    now = time.time()
    with _pg_connect(db) as conn:
        rows = conn.execute(
            "SELECT datname FROM pg_database WHERE datname LIKE %s AND datname NOT IN "
            "(SELECT datname FROM pg_stat_activity WHERE datname IS NOT NULL)",
            (PG_TEST_PREFIX.replace("_", r"\_") + "%",),
        ).fetchall()
        for (name,) in rows:
            match = re.fullmatch(rf"{PG_TEST_PREFIX}(\d+)_\d+", name)
            if match and now - int(match[1]) > PG_STALE_SECONDS:
                try:
                    conn.execute(f'DROP DATABASE IF EXISTS "{name}"')
                except Exception as exc:  # noqa: BLE001 - another run may be dropping it too
                    print(f"env_plugin: could not drop stale test database {name}: {exc}")


def _pg_drop_own(db: dict[str, Any]) -> None:
    """pytest-django drops the test database at the end of a run; this is the fallback for when
    its teardown did not run or failed (connections of a worker that outlived its run)."""
    try:
        with _pg_connect(db) as conn:
            try:
                conn.execute(f'DROP DATABASE IF EXISTS "{PG_TEST_NAME}" WITH (FORCE)')
            except Exception:  # noqa: BLE001 - FORCE needs PostgreSQL 13
                conn.execute(f'DROP DATABASE IF EXISTS "{PG_TEST_NAME}"')
    except Exception as exc:  # noqa: BLE001 - at exit, say so rather than raise
        print(f"env_plugin: could not drop test database {PG_TEST_NAME}: {exc}")


def _sigterm_as_interrupt(signum: int, frame: Any) -> None:
    """A run killed with SIGTERM (a CI timeout, `kill`) stops as on Ctrl-C: fixtures are torn down
    (worker and server stopped, test database dropped) and the atexit clean-ups run. A second
    SIGTERM kills at once."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    raise KeyboardInterrupt(f"signal {signum}")


def pytest_configure(config: pytest.Config) -> None:
    signal.signal(signal.SIGTERM, _sigterm_as_interrupt)
    from django.conf import settings

    db = settings.DATABASES["default"]
    if "postgresql" not in db["ENGINE"] or config.getoption("reuse_db", False):
        return
    # Django connections share this dict, and no connection is open yet.
    db.setdefault("TEST", {})["NAME"] = PG_TEST_NAME
    _pg_drop_stale(db)
    atexit.register(_pg_drop_own, dict(db))
