"""Workers shaped like the Procfile's (``default`` with two slots, ``video`` with one), for tests
of what a person sees when work waits for a worker. Loaded with ``pytest_plugins``."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import Worker, _die_with_parent, _subprocess_env, wait_for
from tests.env_plugin import ROOT, RUN_DIR


class QueueWorker(Worker):
    """A real ``celery worker`` on the given queues with the given number of slots."""

    def __init__(self, log: Path, queues: str, slots: int) -> None:
        super().__init__(log)
        self.queues, self.slots = queues, slots

    def start(self) -> None:
        from config.celery import app

        self.log.parent.mkdir(parents=True, exist_ok=True)
        self.name = f"{self.queues}-{os.getpid()}-{time.monotonic_ns()}@localhost"
        cmd = [sys.executable, "-m", "celery", "-A", "config", "worker", "-Q", self.queues, "-c", str(self.slots)]
        cmd += ["-n", self.name, "--loglevel", "INFO", "--without-gossip", "--without-mingle"]
        self.proc = subprocess.Popen(
            cmd,
            cwd=ROOT,
            env={**_subprocess_env(), **self.env},
            stdout=self._log_file(),
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )
        wait_for(
            lambda: self._alive() and app.control.ping([self.name], timeout=0.5),
            timeout=60,
            what=f"the {self.queues} worker",
        )


@pytest.fixture
def procfile_workers(_worker_session: Worker, transactional_db: None) -> Iterator[list[QueueWorker]]:
    """Workers shaped like the Procfile's: ``default`` with two slots, ``video`` with one. The
    session's worker (both queues) is stopped, so only these take tasks; ``celery_worker``
    starts it again for the next test that needs it."""
    _worker_session.stop()
    workers = [
        QueueWorker(RUN_DIR / "logs" / "worker-default.log", "default", 2),
        QueueWorker(RUN_DIR / "logs" / "worker-video.log", "video", 1),
    ]
    try:
        for worker in workers:
            worker.start()
        yield workers
    finally:
        for worker in workers:
            worker.stop()
