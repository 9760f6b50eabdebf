"""Redis restarted under load: every item still ends Completed, once, with one set of outputs.

A Redis of its own (so the restart hurts no other test) with persistence off: the worst case,
where the restart drops every queued message and every unacknowledged copy. Production runs
Redis with `appendonly yes` / `appendfsync everysec`, which keeps all but the last second; the
watchdog covers what is lost either way, and this test shows it covers everything.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from celery import Celery
from django.utils import timezone

from media_app.models import MediaItem, MediaStatus, StatusEvent
from tests.conftest import _subprocess_env, wait_for
from tests.env_plugin import ROOT, free_port
from tests.media import drawn_image, lavfi_audio, lavfi_video

pytestmark = pytest.mark.worker


class RedisServer:
    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.workdir = workdir
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            pytest.fail("no redis-server to start (`make test` installs it)")
        # Persistence off on purpose: a restart loses every queued and unacknowledged message.
        args = ["--bind", "127.0.0.1", "--port", str(self.port), "--save", "", "--appendonly", "no"]
        self.proc = subprocess.Popen([exe, *args, "--dir", str(self.workdir)], stdout=subprocess.DEVNULL)
        wait_for(self._up, timeout=10, what="redis-server")

    def _up(self) -> bool:
        try:
            return bool(redis.Redis.from_url(self.url, socket_connect_timeout=0.2).ping())
        except redis.ConnectionError:
            return False

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


class OwnWorker:
    """A worker on that Redis, with a watchdog that judges quickly."""

    def __init__(self, server: RedisServer, log: Path) -> None:
        self.name = f"restart-{uuid.uuid4().hex[:8]}@localhost"
        env = _subprocess_env()
        for key in (
            "REDIS_URL",
            "CELERY_BROKER_URL",
            "CELERY_RESULT_BACKEND",
            "CHANNEL_REDIS_URL",
            "UPLOADS_REDIS_URL",
        ):
            env[key] = server.url
        env.update({"WATCHDOG_LOST_SECONDS": "5", "WATCHDOG_STALL_SECONDS": "120"})
        cmd = [sys.executable, "-m", "celery", "-A", "config", "worker", "-Q", "default,video", "-c", "2"]
        cmd += ["-n", self.name, "--loglevel", "INFO", "--without-gossip", "--without-mingle"]
        self.log = log.open("ab")
        self.proc = subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True
        )

    def up(self, app: Celery) -> bool:
        assert self.proc.poll() is None, "the worker exited"
        return bool(app.control.ping([self.name], timeout=0.5))

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.log.close()


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path)
    server.start()
    yield server
    server.stop()


def _inputs(tmp_path: Path) -> list[Path]:
    files = [drawn_image(tmp_path / f"img{n}.jpg", size=(320 + 16 * n, 240)) for n in range(14)]
    files += [lavfi_audio(tmp_path / f"tone{n}.mp3", seconds=2) for n in range(4)]
    files += [lavfi_video(tmp_path / f"clip{n}.mp4", seconds=2) for n in range(2)]
    return files


def _statuses() -> Counter[str]:
    return Counter(MediaItem.objects.values_list("status", flat=True))


def test_twenty_items_survive_a_redis_restart_with_nothing_lost_or_doubled(
    transactional_db, own_redis, make_item, tmp_path, monkeypatch
):
    log = tmp_path / "worker.log"
    worker = OwnWorker(own_redis, log)
    # Celery prefers these variables to any URL given in code: point this process's client at it too.
    monkeypatch.setenv("CELERY_BROKER_URL", own_redis.url)
    monkeypatch.setenv("CELERY_RESULT_BACKEND", own_redis.url)
    # Not the current app: later tests must keep sending to the session's broker.
    app = Celery("restart-test", broker=own_redis.url, backend=own_redis.url, set_as_current=False)
    try:
        wait_for(lambda: worker.up(app), timeout=180, what="the worker")
        items = [make_item(path) for path in _inputs(tmp_path)]
        for item in items:
            # What media_processing_start does, sent to this test's own broker.
            task_id = str(uuid.uuid4())
            now = timezone.now()
            MediaItem.objects.filter(pk=item.pk).update(task_id=task_id, upload_finished_at=now, queued_at=now)
            app.send_task("media.process", args=[str(item.pk)], task_id=task_id, queue="default")

        wait_for(lambda: _statuses()[MediaStatus.PENDING] <= 16, timeout=90, what="the first items to start")
        before = _statuses()
        assert before[MediaStatus.PENDING] > 0, before  # some still queued when Redis goes
        own_redis.stop()
        time.sleep(3)  # a restart's downtime: stages finishing now cannot publish their next one
        own_redis.start()

        # Beat sends the watchdog every minute; here every few seconds, with a 5 s threshold.
        deadline = time.monotonic() + 300
        while _statuses()[MediaStatus.COMPLETED] + _statuses()[MediaStatus.FAILED] < len(items):
            assert time.monotonic() < deadline, f"not all final: {_statuses()}; log:\n{log.read_text()[-3000:]}"
            # A worker that exited (as kombu's closing race once made it) fails now, not in 300 s.
            assert worker.proc.poll() is None, f"the worker exited; log:\n{log.read_text()[-3000:]}"
            app.send_task("media.maintenance.watchdog", queue="default", expires=10)
            time.sleep(4)
    finally:
        worker.stop()
        app.close()

    for item in items:
        item.refresh_from_db()
        assert item.status == "Completed", (item.original_name, item.error_code, item.error_message)
        roles = Counter(item.renditions.values_list("role", flat=True))
        keys = list(item.renditions.values_list("storage_key", flat=True))
        assert len(keys) == len(set(keys))
        expected = {"image": {"image_avif", "image_webp"}, "audio": {"audio"}, "video": {"video", "thumbnail"}}
        for role in expected[item.kind]:
            assert roles[role] == 1, (item.original_name, roles)
        assert StatusEvent.objects.filter(item=item, status="Completed").count() == 1
    assert MediaItem.objects.count() == len(items)
    recovered = StatusEvent.objects.filter(message__startswith="Watchdog:").values_list("item_id", flat=True)
    print(f"before the restart: {dict(before)}; requeued by the watchdog: {len(set(recovered))}")


def test_a_channel_closing_after_redis_went_away_does_not_take_the_worker_down(own_redis, caplog):
    """What killed a worker in a CI run: Redis went away while the worker held an unacknowledged
    message; Celery closed the connection, and kombu's Redis channel, whose transport had
    already dropped its connection settings and which had no pool yet, raised AttributeError
    while putting the message back: "Unrecoverable error", the worker exited, and 13 of 20
    items waited forever. Now the message is left in Redis (kombu restores it after the
    visibility timeout; the watchdog resumes its item first) and the close goes on."""
    import kombu

    import config.celery  # noqa: F401 - installs the guard, as every process of ours does

    conn = kombu.Connection(own_redis.url)
    channel = conn.default_channel
    queue = kombu.Queue("closing-race", channel=channel)
    queue.declare()
    kombu.Producer(channel).publish({"n": 1}, routing_key="closing-race")
    assert queue.get(no_ack=False) is not None  # delivered, not acknowledged
    # The state the lost connection left behind: no pool yet, the transport's settings gone.
    channel._pool = None
    conn.transport.client = None

    channel.close()  # raised AttributeError: 'NoneType' object has no attribute 'hostname'

    assert "1 unacknowledged message(s) left in Redis" in caplog.text
    unacked = redis.Redis.from_url(own_redis.url).hlen("unacked")
    assert unacked == 1  # still in Redis, for kombu's restore after the visibility timeout
