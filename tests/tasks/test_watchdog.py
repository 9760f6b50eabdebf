"""The watchdog: nothing stays Processing forever, and nothing is processed into two sets of outputs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from datetime import timedelta
from typing import Any

import pytest
import redis
from django.conf import settings
from django.utils import timezone

from config.celery import app as celery_app
from media_app.models import MediaItem, StatusEvent
from media_app.services import media_item_create, media_processing_start
from tasks import workspace
from tasks.maintenance import Snapshot, take_snapshot, watchdog_run
from tests.conftest import RUN_DIR, wait_for
from tests.media import lavfi_video
from tests.states import set_state

# Marked `postgres` one by one: the decisions (fast) and the stall (the watchdog's requeue and
# the worker's own handling of its killed ffmpeg write the item side by side) run again on
# PostgreSQL. The killed-whole test does not: its worker is dead before the watchdog writes, so
# no two writers meet; what it proves (Redis's unacked copy, the replay) is the broker's.
# --- decisions, on snapshots made up for each case -------------------------------------------


@pytest.fixture
def broker(monkeypatch: pytest.MonkeyPatch) -> dict[str, list[Any]]:
    """What the watchdog would have sent: revokes and new process tasks, kept instead of sent."""
    calls: dict[str, list[Any]] = {"sent": [], "revoked": []}

    def send_task(name: str, args: Any = None, kwargs: Any = None, **options: Any) -> None:
        calls["sent"].append((name, args[0], options.get("task_id")))

    monkeypatch.setattr(celery_app, "send_task", send_task)
    monkeypatch.setattr(celery_app.control, "revoke", lambda task_id, **kw: calls["revoked"].append((task_id, kw)))
    return calls


def _item(make_user: Any, status: str, *, quiet_for: float, attempts: int = 1, task_id: str = "t-1") -> MediaItem:
    item = media_item_create(owner=make_user(), original_name=f"{status}.mp4")
    stage = "encode" if status == "Processing" else ""
    set_state(item_id=item.pk, status=status, stage=stage, attempts=attempts, extra={"kind": "video"})
    since = timezone.now() - timedelta(seconds=quiet_for)
    queued = {"queued_at": since, "upload_finished_at": since} if status == "Pending" else {}
    MediaItem.objects.filter(pk=item.pk).update(task_id=task_id, updated_at=since, **queued)
    item.refresh_from_db()
    return item


def _id(item: MediaItem) -> str:
    item.refresh_from_db()
    return item.task_id


def _run(snapshot: Snapshot, capture: Any) -> dict[str, list[str]]:
    with capture(execute=True):
        return watchdog_run(snapshot=lambda: snapshot, settle=0)


@pytest.fixture
def thresholds(settings: Any) -> None:
    settings.WATCHDOG_STALL_SECONDS = 600
    settings.WATCHDOG_LOST_SECONDS = 60
    settings.MEDIA_MAX_ATTEMPTS = 3


@pytest.mark.postgres
@pytest.mark.django_db
def test_a_held_task_without_progress_is_killed_and_queued_again(
    make_user, broker, thresholds, django_capture_on_commit_callbacks
):
    hung = _item(make_user, "Processing", quiet_for=700)
    busy = _item(make_user, "Processing", quiet_for=100, task_id="t-2")
    snapshot = Snapshot(replied=True, held={str(hung.pk): ["t-1"], str(busy.pk): ["t-2"]}, queued=set())

    outcome = _run(snapshot, django_capture_on_commit_callbacks)

    assert outcome["requeued"] == [str(hung.pk)]
    assert broker["revoked"] == [("t-1", {"terminate": True, "signal": "SIGKILL"})]
    hung.refresh_from_db()
    # The chain resumes at the first stage not done (none here), under the id the item records.
    assert broker["sent"] == [("media.stage.demux", str(hung.pk), hung.task_id)]
    assert hung.status == "Processing" and hung.task_id != "t-1"
    assert StatusEvent.objects.filter(item=hung, message__startswith="Watchdog: no progress since").exists()


@pytest.mark.postgres
@pytest.mark.django_db
def test_after_the_last_attempt_a_stalled_item_fails_stalled(
    make_user, broker, thresholds, django_capture_on_commit_callbacks
):
    item = _item(make_user, "Processing", quiet_for=700, attempts=3)

    outcome = _run(
        Snapshot(replied=True, held={str(item.pk): ["t-1"]}, queued=set()), django_capture_on_commit_callbacks
    )

    assert outcome["failed"] == [str(item.pk)]
    item.refresh_from_db()
    assert (item.status, item.error_code) == ("Failed", "stalled")
    assert broker["revoked"] and not broker["sent"]


@pytest.mark.postgres
@pytest.mark.django_db
def test_lost_work_is_queued_again_once_and_waiting_work_is_left_alone(
    make_user, broker, thresholds, django_capture_on_commit_callbacks
):
    lost_pending = _item(make_user, "Pending", quiet_for=120)
    lost_processing = _item(make_user, "Processing", quiet_for=120)
    for stage in ("demux", "previews", "decode", "normalize", "filter"):
        workspace.stage_dir(lost_processing.pk, stage).mkdir(parents=True)
        (workspace.stage_dir(lost_processing.pk, stage) / workspace.RESULT_FILE).write_text("{}")
    waiting = _item(make_user, "Pending", quiet_for=3000)
    recent = _item(make_user, "Processing", quiet_for=10)
    snapshot = Snapshot(replied=True, queued={str(waiting.pk)})

    outcome = _run(snapshot, django_capture_on_commit_callbacks)
    again = _run(snapshot, django_capture_on_commit_callbacks)  # the next beat, a minute later

    assert sorted(outcome["requeued"]) == sorted([str(lost_pending.pk), str(lost_processing.pk)])
    assert again["requeued"] == []
    # Pending: the entry task again. Processing: the chain from its first unfinished stage, so
    # the stage that was lost counts one more delivery when it starts.
    assert sorted(broker["sent"]) == sorted(
        [
            ("media.process", str(lost_pending.pk), _id(lost_pending)),
            ("media.stage.encode", str(lost_processing.pk), _id(lost_processing)),
        ]
    )
    assert not broker["revoked"]
    for item in (waiting, recent):
        assert not StatusEvent.objects.filter(item=item, message__startswith="Watchdog").exists()


@pytest.mark.postgres
@pytest.mark.django_db
def test_when_no_worker_answers_nothing_is_judged_lost(
    make_user, broker, thresholds, django_capture_on_commit_callbacks
):
    _item(make_user, "Processing", quiet_for=120)

    outcome = _run(Snapshot(replied=False, queued=set()), django_capture_on_commit_callbacks)
    # A broker whose queues cannot be read (not Redis): waiting and lost look alike, so neither is touched.
    unreadable = _run(Snapshot(replied=True, queued=None), django_capture_on_commit_callbacks)

    assert outcome == unreadable == {"requeued": [], "failed": [], "moved": []} and not broker["sent"]


# --- the real thing: a worker SIGKILLed as a whole in the middle of an encode ------------------


def _item_ffmpeg(item: MediaItem) -> list[str]:
    out = subprocess.run(["pgrep", "-af", "ffmpeg-linux"], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if str(item.pk) in line]


def _broker() -> redis.Redis:
    return redis.Redis.from_url(settings.CELERY_BROKER_URL)


@pytest.mark.worker
def test_a_worker_killed_whole_mid_encode_is_picked_up_by_the_watchdog_and_completes_once(
    celery_worker, make_item, tmp_path, settings: Any
):
    # 8 s, as the pool-process kill of tests/tasks/test_faults.py: the kill comes well under a
    # second after the encode's ffmpeg shows, and the encode runs again in full after it.
    item = make_item(lavfi_video(tmp_path / "long.mp4", seconds=8, size="1280x720"))
    media_processing_start(item=item)
    wait_for(
        lambda: _item_ffmpeg(item) and (item.refresh_from_db() or item.stage == "encode"),
        timeout=90,
        what="the encode's ffmpeg",
    )

    assert str(item.pk) in take_snapshot().held  # the control API sees who works on what

    # Main process and pool children at once, as a power cut or `kill -9` of the group would.
    os.killpg(celery_worker.proc.pid, signal.SIGKILL)
    celery_worker.proc.wait()
    assert wait_for(lambda: not _item_ffmpeg(item), timeout=10, what="ffmpeg to die with its worker")
    item.refresh_from_db()
    assert (item.status, item.stage, item.attempts) == ("Processing", "encode", 1)

    # The encode's message stays unacknowledged in Redis for the visibility timeout (over an
    # hour): Celery alone would leave the item Processing that long. Keep a copy, to replay it.
    lost = take_snapshot().unacked[str(item.pk)]
    (old_raw,) = [_broker().hget("unacked", tag) for tag in lost]
    old_message, _, routing_key = json.loads(old_raw)

    celery_worker.start()  # everything restarts; the watchdog runs from beat
    settings.WATCHDOG_LOST_SECONDS = 2
    outcome = wait_for(lambda: watchdog_run()["requeued"], timeout=30, what="the watchdog to requeue it")
    assert outcome == [str(item.pk)]
    assert not any(_broker().hexists("unacked", tag) for tag in lost)  # the dead worker's copy is forgotten

    wait_for(lambda: item.refresh_from_db() or item.is_final, timeout=180, what="the item to finish")
    assert item.status == "Completed", item.error_message
    attempts = StatusEvent.objects.filter(item=item, stage="encode", status="Processing", message__contains="started")
    assert list(attempts.values_list("attempt", flat=True)) == [1, 2]
    for stage in ("demux", "previews", "decode", "normalize", "filter"):  # resumed at the encode: done once
        assert StatusEvent.objects.filter(item=item, message__startswith=f"{stage} started").count() == 1
    outputs = list(item.renditions.order_by("pk").values_list("pk", "role", "storage_key"))
    assert [r for _, r, _ in outputs].count("video") == 1
    assert len({key for _, _, key in outputs}) == len(outputs)

    # A late redelivery of the old message (had it been restored after the visibility timeout)
    # changes nothing: the item is final, so the stage stops at once and the chain ends there.
    events_before = StatusEvent.objects.filter(item=item).count()
    _broker().rpush(routing_key, json.dumps(old_message))
    log = RUN_DIR / "logs" / "worker.log"
    wait_for(lambda: f"[{old_message['headers']['id']}] ignored" in log.read_text(), timeout=30, what="the replay")
    item.refresh_from_db()
    assert item.status == "Completed"
    assert list(item.renditions.order_by("pk").values_list("pk", "role", "storage_key")) == outputs
    assert StatusEvent.objects.filter(item=item).count() == events_before


@pytest.mark.postgres
@pytest.mark.worker
def test_an_encode_that_stops_making_progress_is_killed_and_resumed(celery_worker, make_item, tmp_path, settings):
    # SIGSTOPped as soon as it shows, so the clip's length only sets how long the resumed encode
    # takes: 8 s, as the killed-whole test above.
    item = make_item(lavfi_video(tmp_path / "hang.mp4", seconds=8, size="1280x720"))
    media_processing_start(item=item)
    # The encoder, not the storyboard's decode that runs beside it.
    (line,) = wait_for(
        lambda: (
            (item.refresh_from_db() or item.stage == "encode") and [c for c in _item_ffmpeg(item) if "libsvtav1" in c]
        ),
        timeout=90,
        what="the encode's ffmpeg",
    )
    ffmpeg = int(line.split()[0])
    os.kill(ffmpeg, signal.SIGSTOP)  # a hung encoder: alive, silent, forever

    settings.WATCHDOG_STALL_SECONDS = 3
    outcome = wait_for(lambda: watchdog_run()["requeued"], timeout=60, what="the watchdog to see the hang")

    assert outcome == [str(item.pk)]
    wait_for(lambda: not os.path.exists(f"/proc/{ffmpeg}"), timeout=15, what="the hung ffmpeg to be killed")
    wait_for(lambda: item.refresh_from_db() or item.is_final, timeout=180, what="the item to finish")
    assert item.status == "Completed", item.error_message
    attempts = StatusEvent.objects.filter(item=item, stage="encode", status="Processing", message__contains="started")
    assert list(attempts.values_list("attempt", flat=True)) == [1, 2]
    assert StatusEvent.objects.filter(item=item, message__startswith="Watchdog: no progress since").count() == 1
    assert item.renditions.filter(role="video").count() == 1
    assert celery_worker.is_running()
