"""Workers shaped like the Procfile's (``default`` with two slots, ``video`` with one), for tests
of what a person sees when work waits for a worker. Loaded with ``pytest_plugins``."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.conftest import Worker
from tests.env_plugin import RUN_DIR


@pytest.fixture
def procfile_workers(_worker_session: Worker, transactional_db: None) -> Iterator[list[Worker]]:
    """Workers shaped like the Procfile's: ``default`` with two slots, ``video`` with one. The
    session's worker (both queues) is stopped, so only these take tasks; ``celery_worker``
    starts it again for the next test that needs it."""
    _worker_session.stop()
    workers = [
        Worker(RUN_DIR / "logs" / "worker-default.log", queues="default", concurrency=2),
        Worker(RUN_DIR / "logs" / "worker-video.log", queues="video", concurrency=1),
    ]
    try:
        for worker in workers:
            worker.start()
        yield workers
    finally:
        for worker in workers:
            worker.stop()
