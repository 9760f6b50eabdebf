"""The README's other broker: RabbitMQ (``CELERY_BROKER_URL=amqp://…``). A video chain, a cancel,
the watchdog's hung-task path and a worker killed whole run with every task, revoke and
control-API call over AMQP; results and live status stay on the suite's Redis, as in a deployment
that moves only its broker.

The broker is ``TEST_AMQP_URL`` (default the local one on 5672); ``make test`` starts a throwaway
node when nothing answers there (``scripts/lib.sh``)."""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import av
import kombu
import pytest
from amqp.exceptions import NotFound, ResourceLocked
from django.core.files.storage import default_storage

from config.celery import app
from media_app.models import MediaItem, StatusEvent
from media_app.ops import media_cancel
from media_app.services import media_processing_start
from tasks.maintenance import take_snapshot, watchdog_run
from tests.conftest import RUN_DIR, Worker, wait_for
from tests.media import lavfi_video

pytestmark = [pytest.mark.worker, pytest.mark.django_db(transaction=True)]

AMQP_URL = os.environ.get("TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672//")
LOCK_QUEUE = "cpc-test-rabbitmq-lock"


@pytest.fixture(scope="module")
def _broker_lock() -> Iterator[None]:
    """Hold an exclusive queue on the broker for the module: test runs sharing one RabbitMQ take
    turns, or one run's worker would take the other's tasks (its items are in another database)."""
    shown = kombu.Connection(AMQP_URL).as_uri()  # no password
    conn = kombu.Connection(AMQP_URL, connect_timeout=3)
    try:
        conn.ensure_connection(max_retries=1)
    except Exception as exc:
        raise AssertionError(f"no RabbitMQ at {shown} ({exc}): `make test` starts one, or set TEST_AMQP_URL") from exc

    def take() -> bool:
        try:
            kombu.Queue(LOCK_QUEUE, exclusive=True, channel=conn.channel()).declare()
        except ResourceLocked:
            return False
        return True

    wait_for(take, timeout=300, what=f"another test run to release {shown}", interval=1)
    # Anyone else consuming our queues on this vhost (a developer's `make run`?) would steal tasks.
    with kombu.Connection(AMQP_URL) as probe:
        for name in ("default", "video"):
            try:
                _, _, consumers = probe.channel().queue_declare(name, passive=True)
            except NotFound:  # not declared yet: nobody consumes it
                continue
            assert consumers == 0, f"{consumers} consumer(s) on queue {name} at {shown}: use a vhost of its own"
    yield
    conn.close()  # the exclusive queue goes with the connection


@pytest.fixture(scope="module")
def rabbit_worker(_broker_lock: None, django_db_setup: None, django_db_blocker: Any) -> Iterator[Worker]:
    """This process's Celery app on RabbitMQ (its sends, revokes and control API), and a worker
    on RabbitMQ; both put back afterwards so later tests keep using Redis.

    ``CELERY_BROKER_URL`` in the environment wins over the app's ``broker_url`` (Celery reads it
    first), and the connection and producer pools are cached on the app, on ``app.amqp`` and on
    the control mailbox: each is swapped, then restored."""
    saved_env = os.environ["CELERY_BROKER_URL"]
    saved_conf = app.conf["broker_url"]
    saved_pool, saved_producers = app._pool, app.amqp._producer_pool
    mailbox = app.control.mailbox
    saved_mailbox = mailbox.__dict__.pop("producer_pool", None)
    os.environ["CELERY_BROKER_URL"] = app.conf["broker_url"] = AMQP_URL
    app._pool = app.amqp._producer_pool = None
    assert app.pool.connection.transport.driver_type == "amqp"
    worker = Worker(RUN_DIR / "logs" / "rabbitmq-worker.log", env={"CELERY_BROKER_URL": AMQP_URL}, concurrency=1)
    try:
        with django_db_blocker.unblock():
            worker.start()
        yield worker
    finally:
        worker.stop()
        if app._pool is not None:
            app._pool.force_close_all()
        os.environ["CELERY_BROKER_URL"], app.conf["broker_url"] = saved_env, saved_conf
        app._pool, app.amqp._producer_pool = saved_pool, saved_producers
        mailbox.__dict__.pop("producer_pool", None)
        if saved_mailbox is not None:
            mailbox.__dict__["producer_pool"] = saved_mailbox


def encoding(worker: Worker, item: MediaItem) -> tuple[int, int] | None:
    """(pool process, ffmpeg) while the item's encode runs: its ffmpeg is a child of the pool
    process that runs the stage."""
    item.refresh_from_db()
    if item.status != "Processing" or item.stage != "encode":
        return None
    for pool in worker.pool_pids():
        try:
            children = Path(f"/proc/{pool}/task/{pool}/children").read_text().split()
            for child in children:
                cmdline = Path(f"/proc/{child}/cmdline").read_bytes()
                if b"ffmpeg" in cmdline and str(item.pk).encode() in cmdline:
                    return pool, int(child)
        except OSError:  # it exited meanwhile
            continue
    return None


def stages_run(worker: Worker, item: MediaItem) -> list[str]:
    """The stages this worker logged as done for the item, in order."""
    done = []
    for line in worker.log.read_text(errors="replace").splitlines():
        start = line.find('{"item"')
        if start >= 0 and "tasks.stages" in line:
            entry = json.loads(line[start:])
            if entry["item"] == str(item.pk) and entry.get("outcome") == "done":
                done.append(entry["stage"])
    return done


def assert_one_playable_webm(item: MediaItem, *, frames: int, size: tuple[int, int]) -> None:
    """One set of outputs (every rendition's file stored, nothing stored that no rendition names),
    and the WebM plays: AV1 video of the source's frames and size, Opus audio."""
    keys = set(item.renditions.values_list("storage_key", flat=True))
    assert len(keys) == item.renditions.count()
    stored: set[str] = set()
    prefixes = [f"outputs/{item.pk}"]
    while prefixes:
        prefix = prefixes.pop()
        dirs, files = default_storage.listdir(prefix)
        stored.update(f"{prefix}/{f}" for f in files)
        prefixes += [f"{prefix}/{d}" for d in dirs]
    assert stored == keys
    (video,) = item.renditions.filter(role="video")
    with default_storage.open(video.storage_key, "rb") as fh, av.open(fh) as container:
        assert container.format.name.startswith("matroska,webm")
        assert container.streams.audio[0].codec_context.name == "opus"
        stream = container.streams.video[0]
        assert stream.codec_context.name in ("av1", "libdav1d", "libaom-av1")
        decoded = [(frame.width, frame.height) for frame in container.decode(stream)]
    assert len(decoded) == frames and set(decoded) == {size}


def test_a_video_chain_completes_over_rabbitmq(rabbit_worker, make_item, tmp_path):
    item = make_item(lavfi_video(tmp_path / "clip.mp4", seconds=2, size="320x240"))

    media_processing_start(item=item)

    wait_for(lambda: item.refresh_from_db() or item.is_final, timeout=120, what="the item to finish")
    assert item.status == "Completed", (item.error_code, item.error_message, item.error_detail[-800:])
    assert_one_playable_webm(item, frames=50, size=(320, 240))
    # Every stage ran on the RabbitMQ worker (the suite's Redis worker may be up, and idle).
    assert stages_run(rabbit_worker, item) == [
        "demux",
        "previews",
        "decode",
        "normalize",
        "filter",
        "encode.storyboard",  # beside the encode, which logs once it has ended
        "encode",
        "mux",
        "chunk",
        "store",
    ]


def test_a_cancel_during_the_encode_kills_it_over_rabbitmq(rabbit_worker, make_item, tmp_path):
    item = make_item(lavfi_video(tmp_path / "cancel.mp4", seconds=10, size="640x360"))
    media_processing_start(item=item)
    pool, ffmpeg = wait_for(lambda: encoding(rabbit_worker, item), timeout=90, what="the encode's ffmpeg")
    task_id = item.task_id

    media_cancel(item_id=item.pk)

    # The revoke reached the worker over AMQP: its pool process was SIGKILLed, not merely told
    # to stop by the stage's own cancel check (which would leave the process alive).
    wait_for(
        lambda: not os.path.exists(f"/proc/{ffmpeg}") and not os.path.exists(f"/proc/{pool}"),
        timeout=5,
        what="the encode's pool process and ffmpeg to be killed",
    )
    assert f"Terminating {task_id} (" in rabbit_worker.log.read_text(errors="replace")
    # The chain is over: the worker holds nothing of the item (no redelivery runs it on).
    wait_for(lambda: str(item.pk) not in take_snapshot().held, timeout=30, what="the worker to let the item go")
    item.refresh_from_db()
    assert (item.status, item.error_code) == ("Failed", "cancelled")
    assert not item.renditions.exclude(role="thumbnail").exists()  # the thumbnail comes before the encode
    assert "encode" not in stages_run(rabbit_worker, item)


def test_the_watchdog_kills_a_hung_encode_and_requeues_it_over_rabbitmq(rabbit_worker, make_item, tmp_path, settings):
    item = make_item(lavfi_video(tmp_path / "hang.mp4", seconds=10, size="640x360"))
    media_processing_start(item=item)
    pool, ffmpeg = wait_for(lambda: encoding(rabbit_worker, item), timeout=90, what="the encode's ffmpeg")
    os.kill(ffmpeg, signal.SIGSTOP)  # a hung encoder: alive, silent, forever

    # The worker holds the task (control API over AMQP); RabbitMQ's queues are not read.
    snapshot = take_snapshot()
    assert str(item.pk) in snapshot.held and snapshot.queued is None
    settings.WATCHDOG_STALL_SECONDS = 3
    outcome = wait_for(lambda: watchdog_run(settle=0.5)["requeued"], timeout=60, what="the watchdog to see the hang")

    assert outcome == [str(item.pk)]
    wait_for(
        lambda: not os.path.exists(f"/proc/{ffmpeg}") and not os.path.exists(f"/proc/{pool}"),
        timeout=15,
        what="the hung encode's pool process and ffmpeg to be killed",
    )
    wait_for(lambda: item.refresh_from_db() or item.is_final, timeout=180, what="the item to finish")
    assert item.status == "Completed", (item.error_code, item.error_message, item.error_detail[-800:])
    encodes = StatusEvent.objects.filter(item=item, stage="encode", status="Processing", message__contains="started")
    assert list(encodes.values_list("attempt", flat=True)) == [1, 2]
    assert StatusEvent.objects.filter(item=item, message__startswith="Watchdog: no progress since").count() == 1
    assert stages_run(rabbit_worker, item).count("encode") == 1
    assert_one_playable_webm(item, frames=250, size=(640, 360))


def test_a_worker_killed_whole_mid_encode_has_its_task_redelivered_by_rabbitmq(rabbit_worker, make_item, tmp_path):
    """What the watchdog leaves to RabbitMQ: a dead worker's unacknowledged task is queued again
    by the broker as soon as its connection drops (Redis holds it for the visibility timeout)."""
    item = make_item(lavfi_video(tmp_path / "killed.mp4", seconds=10, size="640x360"))
    media_processing_start(item=item)
    wait_for(lambda: encoding(rabbit_worker, item), timeout=90, what="the encode's ffmpeg")

    os.killpg(rabbit_worker.proc.pid, signal.SIGKILL)  # worker, pool and ffmpeg, as a power cut
    rabbit_worker.proc.wait(10)
    rabbit_worker.start()  # its supervisor restarts it; no watchdog runs

    wait_for(lambda: item.refresh_from_db() or item.is_final, timeout=120, what="the item to finish")
    assert item.status == "Completed", (item.error_code, item.error_message, item.error_detail[-800:])
    encodes = StatusEvent.objects.filter(item=item, stage="encode", status="Processing", message__contains="started")
    assert list(encodes.values_list("attempt", flat=True)) == [1, 2]
    assert not StatusEvent.objects.filter(item=item, message__startswith="Watchdog").exists()
    assert_one_playable_webm(item, frames=250, size=(640, 360))
