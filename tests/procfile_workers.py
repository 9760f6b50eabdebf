"""Workers shaped like the Procfile's (``default`` with two slots, ``video`` with one), for tests
of what a person sees when work waits for a worker. Loaded with ``pytest_plugins``."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.conftest import Worker, replace_workers
from tests.env_plugin import RUN_DIR


@pytest.fixture
def procfile_workers(_worker_session: Worker, transactional_db: None) -> Iterator[list[Worker]]:
    """Workers shaped like the Procfile's: ``default`` with two slots, ``video`` with one. The
    session's worker (both queues) is stopped, so only these take tasks; ``celery_worker``
    starts it again for the next test that needs it."""
    workers = [
        Worker(RUN_DIR / "logs" / "worker-default.log", queues="default", concurrency=2),
        Worker(RUN_DIR / "logs" / "worker-video.log", queues="video", concurrency=1),
    ]
    try:
        replace_workers([_worker_session], workers)
        yield workers
    finally:
        replace_workers(workers, [])
