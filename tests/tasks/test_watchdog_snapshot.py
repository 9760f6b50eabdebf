"""The watchdog's snapshot ends as soon as every live worker answered (issue 17: it waited the whole
inspect timeout, a second, every time), yet still waits for a worker that is alive but silent, and
still finds a dead worker's task only in the broker's unacknowledged set."""

from __future__ import annotations

import os
import signal
import time
import uuid

import pytest

from config.celery import app as celery_app
from tasks.maintenance import _drop_unacked, take_snapshot
from tests.conftest import RUN_DIR, Worker, wait_for


def _timed_snapshot(timeout: float) -> tuple[float, object]:
    started = time.monotonic()
    snap = take_snapshot(timeout=timeout)
    return time.monotonic() - started, snap


@pytest.mark.worker
def test_a_snapshot_ends_when_every_live_worker_answered_and_a_dead_ones_task_is_not_held(celery_worker):
    queue = f"doomed-{os.getpid()}"
    doomed = Worker(RUN_DIR / "logs" / "worker-doomed.log", concurrency=1, queues=queue)
    doomed.start()
    item = str(uuid.uuid4())
    try:
        (child,) = doomed.pool_pids()
        os.kill(child, signal.SIGSTOP)  # the task reaches the worker and never runs
        celery_app.send_task("media.process", args=[item], queue=queue)
        wait_for(lambda: item in take_snapshot().held, timeout=30, what="the doomed worker to hold the task")

        # Alive but silent (its main process stopped, its broker connection open): it heard the
        # ping, so the snapshot waits the whole timeout for it, as before, and cannot see its task.
        os.kill(doomed.proc.pid, signal.SIGSTOP)
        waited, snap = _timed_snapshot(timeout=1.5)
        assert waited >= 1.5
        assert snap.replied and item not in snap.held

        # Dead: its connection is gone with it; only the live worker is waited for.
        os.killpg(doomed.proc.pid, signal.SIGKILL)
        doomed.proc.wait()
        waited, snap = _timed_snapshot(timeout=1.5)
        assert waited < 1.0, f"the snapshot took {waited:.2f} s"
        assert snap.replied  # the live worker answered
        assert item not in snap.held and item in snap.unacked  # the dead one's task: the watchdog's to resume
    finally:
        if doomed.is_running():
            os.killpg(doomed.proc.pid, signal.SIGKILL)
            doomed.proc.wait()
        tags = take_snapshot(timeout=0.5).unacked.get(item, [])
        if tags:
            _drop_unacked(celery_app, tags)  # not to be restored into a queue no one serves
