"""The lifecycle's guards under real concurrency: threads with their own database connections,
released together by a barrier, a hundred rounds on PostgreSQL (a few dozen on SQLite, which
serialises every writer anyway). Each round checks what a user would: a cancelled item never
runs on, never ends Completed, and its running task is the one killed; one retry queues once;
two deliveries of a stage leave one result and one set of outputs."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Callable
from typing import Any

import pytest
import websockets
from django.db import connection, transaction

from media_app import jobs, lifecycle
from media_app.lifecycle import ErrorReport
from media_app.models import MediaItem, Rendition
from media_app.services import media_item_create, renditions_replace
from tasks import workspace
from tests.media_app.test_live_status import session_headers

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.postgres]


def rounds() -> int:
    return 100 if connection.vendor == "postgresql" else 25


def race(*calls: Callable[[], Any]) -> list[Any]:
    """Run the calls in threads released at once; their results (or exceptions) in order."""
    barrier = threading.Barrier(len(calls))
    results: list[Any] = [None] * len(calls)

    def run(n: int, call: Callable[[], Any]) -> None:
        try:
            barrier.wait(timeout=10)
            results[n] = call()
        except Exception as exc:  # noqa: BLE001 - handed to the test, which raises it
            results[n] = exc
        finally:
            connection.close()

    threads = [threading.Thread(target=run, args=(n, c)) for n, c in enumerate(calls)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    for r in results:
        if isinstance(r, Exception):
            raise r
    return results


@pytest.fixture
def broker(monkeypatch: pytest.MonkeyPatch) -> dict[str, list[Any]]:
    """What would reach Celery (sends and revokes), recorded with a lock across threads."""
    calls: dict[str, list[Any]] = {"sent": [], "revoked": []}
    lock = threading.Lock()

    def send(name: str, item_id: Any, *, task_id: str, **kw: Any) -> None:
        with lock:
            calls["sent"].append((name, str(item_id), task_id))

    def revoke(task_ids: Any) -> None:
        with lock:
            calls["revoked"].extend([task_ids] if isinstance(task_ids, str) else list(task_ids))

    monkeypatch.setattr(jobs, "send", send)
    monkeypatch.setattr(jobs, "revoke", revoke)
    return calls


def queued_item(user: Any) -> MediaItem:
    item = media_item_create(owner=user, original_name="a.mp4", size=10)
    MediaItem.objects.filter(pk=item.pk).update(kind="video")
    assert lifecycle.upload_finished(item_id=item.pk)
    assert lifecycle.queued(item_id=item.pk, send=False)
    return item


def processing_item(user: Any, stage: str, task_id: str = "first") -> MediaItem:
    item = queued_item(user)
    assert lifecycle.stage_started(item_id=item.pk, stage=stage, task_id=task_id, progress=10) == 1
    return item


def test_cancel_racing_stage_start_never_leaves_a_cancelled_item_running(make_user, broker):
    user = make_user()
    started_first = cancelled_first = 0
    for n in range(rounds()):
        item = queued_item(user)
        task_id = f"stage-{n}"
        attempt, was_cancelled = race(
            lambda i=item, t=task_id: lifecycle.stage_started(item_id=i.pk, stage="demux", task_id=t, progress=1),
            lambda i=item: lifecycle.cancelled(item_id=i.pk, message="Cancelled by an administrator."),
        )
        item.refresh_from_db()
        assert was_cancelled and (item.status, item.error_code) == ("Failed", "cancelled")
        if attempt is not None:
            # The stage began first: the cancel read its task id under the row lock and killed it.
            started_first += 1
            assert task_id in broker["revoked"], f"round {n}: the running stage {task_id} was not killed"
        else:
            cancelled_first += 1
            assert task_id not in broker["revoked"]
        # Whatever the running copy does next, the cancel stands.
        assert not lifecycle.stage_finished(item_id=item.pk, stage="demux", progress=5, seconds=1.0)
        assert not lifecycle.completed(item_id=item.pk)
        assert lifecycle.stage_started(item_id=item.pk, stage="decode", task_id="next", progress=6) is None
        item.refresh_from_db()
        assert item.status == "Failed"
    assert started_first + cancelled_first == rounds()


def test_two_starts_each_telling_the_line_wait_for_neither(make_user, broker, monkeypatch, caplog):
    """Two items of one line start at once on two workers; each start tells the head of the line
    its place in the same transaction, and the other's item is still in that line as its
    transaction sees it. Neither may wait for the other's row: on PostgreSQL that was a deadlock,
    broken after a second by dropping one notice."""
    if connection.vendor != "postgresql":
        pytest.skip("SQLite has one write lock: two transitions never overlap there")
    user = make_user()
    items = [queued_item(user) for _ in range(4)]
    both_updated = threading.Barrier(2)
    real_line_moved = lifecycle.line_moved

    def line_moved(*, kind: str) -> None:
        both_updated.wait(timeout=10)  # each holds its own started row now
        real_line_moved(kind=kind)

    monkeypatch.setattr(lifecycle, "line_moved", line_moved)
    caplog.set_level("WARNING", logger="media_app.lifecycle")
    for n, item in enumerate(items[:2]):
        MediaItem.objects.filter(pk=item.pk).update(task_id=f"start-{n}")
    started = race(
        *(
            lambda i=item, n=n: lifecycle.stage_started(item_id=i.pk, stage="demux", task_id=f"s{n}", progress=1)
            for n, item in enumerate(items[:2])
        )
    )
    assert started == [1, 1]
    assert "line notice failed" not in caplog.text
    # Those still in line were told (a new number each).
    for item in items[2:]:
        seq = item.event_seq
        item.refresh_from_db()
        assert item.event_seq > seq


def test_cancel_racing_stage_finish_and_completion_never_ends_completed(make_user, broker):
    user = make_user()
    outcomes = {"cancelled": 0, "completed": 0}
    for n in range(rounds()):
        item = processing_item(user, "store", task_id=f"store-{n}")

        def finish(i: MediaItem = item) -> bool:
            return lifecycle.stage_finished(item_id=i.pk, stage="store", progress=98, seconds=0.1) and (
                lifecycle.completed(item_id=i.pk)
            )

        done, was_cancelled = race(finish, lambda i=item: lifecycle.cancelled(item_id=i.pk, message="Stop."))
        item.refresh_from_db()
        assert done != was_cancelled, f"round {n}: both or neither applied"
        if was_cancelled:
            outcomes["cancelled"] += 1
            assert (item.status, item.error_code, item.progress < 100) == ("Failed", "cancelled", True)
            assert f"store-{n}" in broker["revoked"]
        else:
            outcomes["completed"] += 1
            assert (item.status, item.progress, item.error_code) == ("Completed", 100, "")
    assert sum(outcomes.values()) == rounds()


def test_retry_racing_retry_queues_once(make_user, broker):
    user = make_user()
    for n in range(rounds()):
        item = processing_item(user, "encode")
        assert lifecycle.failed(item_id=item.pk, error=ErrorReport("timeout", "Processing took longer than allowed."))
        broker["sent"].clear()
        results = race(*[lambda i=item: lifecycle.retried(item_id=i.pk)] * 2)
        item.refresh_from_db()
        assert sorted(results) == [False, True], f"round {n}: {results}"
        assert item.status == "Pending" and item.queued_at is not None and item.error_code == ""
        assert broker["sent"] == [("media.process", str(item.pk), item.task_id)]


def test_watchdog_requeue_racing_a_late_stage_finish(make_user, broker):
    """Either the finish lands first and the watchdog sees the item moved, or the requeue lands
    first and exactly one new delivery is sent, the hung copy killed; never both or neither."""
    user = make_user()
    seen = {"moved": 0, "requeued": 0}
    for n in range(rounds()):
        item = processing_item(user, "encode", task_id=f"hung-{n}")
        item.refresh_from_db()
        broker["sent"].clear()
        finished, outcome = race(
            lambda i=item: lifecycle.stage_finished(item_id=i.pk, stage="encode", progress=80, seconds=3.0),
            lambda i=item, k=f"hung-{n}": lifecycle.requeued(
                item_id=i.pk, seen_updated_at=i.updated_at, reason="test", kill=[k]
            ),
        )
        assert finished, "a late finish of the stage still counts: its result is complete"
        seen[outcome] += 1
        if outcome == "requeued":
            assert len(broker["sent"]) == 1 and f"hung-{n}" in broker["revoked"]
        else:
            assert outcome == "moved" and not broker["sent"]
    assert sum(seen.values()) == rounds()


def test_two_deliveries_of_a_stage_commit_one_result_and_one_set_of_outputs(make_user, broker, settings, tmp_path):
    settings.WORK_ROOT = str(tmp_path / "work")
    user = make_user()
    for n in range(max(rounds() // 2, 20)):
        item = processing_item(user, "store")

        def deliver(tag: str, i: MediaItem = item) -> bool:
            tmp = workspace.new_tmp_dir(i.pk, "store")
            (tmp / "out.webm").write_bytes(tag.encode() * 100)
            workspace.commit_stage(i.pk, "store", tmp, {"by": tag})
            renditions_replace(
                item_id=i.pk,
                renditions=[
                    {"role": role, "storage_key": f"outputs/{i.pk}/{role}", "content_type": "video/webm", "bytes": 1}
                    for role in ("video", "thumbnail")
                ],
            )
            return lifecycle.stage_finished(item_id=i.pk, stage="store", progress=98, seconds=1.0)

        results = race(lambda: deliver("a"), lambda: deliver("b"))
        assert all(results)
        stage_dir = workspace.stage_dir(item.pk, "store")
        result = json.loads((stage_dir / workspace.RESULT_FILE).read_text())
        assert result["by"] in ("a", "b"), f"round {n}"
        # The committed folder is one delivery's, whole: its file matches its result.
        assert (stage_dir / "out.webm").read_bytes() == result["by"].encode() * 100
        assert [p.name for p in workspace.item_dir(item.pk).iterdir()] == ["store"], "a temporary folder was left"
        assert Rendition.objects.filter(item=item).count() == 2


def test_rolled_back_transition_sends_nothing_and_a_committed_one_arrives_after_commit(make_user, asgi_server, broker):
    user = make_user()
    item = queued_item(user)
    url = f"{asgi_server.ws_url}/ws/media/{item.pk}/"
    headers = session_headers(user, asgi_server)
    in_transaction = threading.Event()
    commit_now = threading.Event()

    def transitions() -> None:
        try:
            try:
                with transaction.atomic():
                    lifecycle.stage_started(item_id=item.pk, stage="demux", task_id="t-1", progress=2)
                    raise RuntimeError("roll back")
            except RuntimeError:
                pass
            with transaction.atomic():
                lifecycle.stage_started(item_id=item.pk, stage="demux", task_id="t-2", progress=2)
                in_transaction.set()
                commit_now.wait(10)
        finally:
            connection.close()

    async def scenario() -> list[tuple[dict[str, Any], bool]]:
        async with websockets.connect(url, additional_headers=headers) as ws:
            first = json.loads(await asyncio.wait_for(ws.recv(), 10))
            worker = threading.Thread(target=transitions)
            worker.start()
            await asyncio.to_thread(in_transaction.wait, 10)
            # Inside the open transaction: nothing may have been sent, rolled back or not.
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(ws.recv(), 1.5)
            commit_now.set()
            event = json.loads(await asyncio.wait_for(ws.recv(), 10))
            # Read by another connection the moment the event arrives: committed already?
            visible = await asyncio.to_thread(committed_task_id)
            await asyncio.to_thread(worker.join, 10)
            return [(first, ""), (event, visible)]

    def committed_task_id() -> str:
        try:
            return MediaItem.objects.values_list("task_id", flat=True).get(pk=item.pk)
        finally:
            connection.close()

    (first, _), (event, visible) = asyncio.run(scenario())
    assert first["item"]["status"] == "Pending"
    assert event["item"]["status"] == "Processing" and event["item"]["stage"] == "demux"
    assert visible == "t-2", "the event arrived before its transaction committed"


@pytest.mark.worker
def test_a_cancel_at_any_moment_on_the_real_worker_stops_the_item_and_its_ffmpeg(celery_worker, make_item, tmp_path):
    """The same race with the real worker, ffmpeg and broker: cancels land while the item is
    queued, between stages and in the middle of a stage; each ends cancelled, never Completed,
    with no ffmpeg left working on it and no task of it left on the worker."""
    from config.celery import app
    from media_app.ops import media_cancel
    from media_app.services import media_processing_start
    from tests.conftest import wait_for
    from tests.media import lavfi_video
    from tests.media_app.test_admin_ops import _item_ffmpeg

    # Long enough that even the last cancel lands before the encode ends on an idle machine.
    clip = lavfi_video(tmp_path / "clip.mp4", seconds=40, size="640x360")
    seen_stages = set()
    for delay in (0.0, 0.3, 0.8, 1.5, 2.5, 3.5):
        item = make_item(clip)
        assert media_processing_start(item=item)
        # The moment of the cancel is what this loop varies; nothing here waits for a state.
        threading.Event().wait(delay)
        item.refresh_from_db()
        seen_stages.add(item.stage or item.status)
        media_cancel(item_id=item.pk, message="Cancelled by an administrator.")

        def worker_done_with(i: MediaItem = item) -> bool:
            active = app.control.inspect([celery_worker.name], timeout=1).active() or {}
            busy = any(str(i.pk) in json.dumps(t.get("args")) for tasks in active.values() for t in tasks)
            return not busy and not _item_ffmpeg(i)

        wait_for(worker_done_with, timeout=30, what="the worker to let go of the cancelled item")
        item.refresh_from_db()
        assert (item.status, item.error_code) == ("Failed", "cancelled"), f"cancel after {delay} s"
        # Nothing of the encode's: at most the thumbnail, which is stored before the encode starts.
        assert not item.renditions.exclude(role="thumbnail").exists()
    assert len(seen_stages) >= 3, f"the cancels all landed at the same point: {seen_stages}"
