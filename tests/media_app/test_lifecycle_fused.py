"""``stage_advanced``, the fused chain's one write between two stages, under a racing cancel:
the cancel stands, and the task it kills is the one that runs the stages."""

from __future__ import annotations

import pytest

from media_app import lifecycle
from media_app.models import MediaItem, StatusEvent
from tests.media_app.test_lifecycle import broker, processing_item, race, rounds  # noqa: F401 - fixture

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.postgres]


def advance(item: MediaItem, task_id: str) -> int | None:
    return lifecycle.stage_advanced(
        item_id=item.pk,
        stage="decode",
        progress=24,
        seconds=0.05,
        peak_child_rss=0,
        next_stage="normalize",
        task_id=task_id,
        next_progress=24,
    )


def test_cancel_racing_a_stage_advance_never_leaves_a_cancelled_item_running(make_user, broker):  # noqa: F811
    user = make_user()
    advanced_first = 0
    for n in range(rounds()):
        task_id = f"fused-{n}"
        item = processing_item(user, "decode", task_id=task_id)
        attempt, was_cancelled = race(
            lambda i=item, t=task_id: advance(i, t),
            lambda i=item: lifecycle.cancelled(item_id=i.pk, message="Cancelled by an administrator."),
        )
        item.refresh_from_db()
        assert was_cancelled and (item.status, item.error_code) == ("Failed", "cancelled")
        # One task runs every stage under one id: whichever applied first, that id is killed.
        assert task_id in broker["revoked"]
        started = StatusEvent.objects.filter(item=item, message="normalize started").count()
        if attempt is not None:
            advanced_first += 1
            assert attempt == 1 and started == 1
        else:
            assert started == 0
        # Whatever the running copy does next, the cancel stands.
        assert advance(item, task_id) is None
        assert not lifecycle.completed(item_id=item.pk, stage="normalize", seconds=0.1)
        assert not lifecycle.completed(item_id=item.pk)
        item.refresh_from_db()
        assert item.status == "Failed"
    assert 0 <= advanced_first <= rounds()


def test_an_advance_writes_what_a_finish_and_a_start_would(make_user, broker):  # noqa: F811
    item = processing_item(make_user(), "decode", task_id="fused")
    assert advance(item, "fused") == 1
    item.refresh_from_db()
    assert (item.status, item.stage, item.attempts, item.task_id) == ("Processing", "normalize", 1, "fused")
    assert item.waiting_since is None and item.progress == 24 and item.timings == {"decode": 0.05}
    last = StatusEvent.objects.filter(item=item).order_by("-pk").first()
    assert (last.stage, last.message, last.attempt) == ("normalize", "normalize started", 1)
    # A stage found done already leaves its line too, as stage_finished's would.
    assert (
        lifecycle.stage_advanced(
            item_id=item.pk,
            stage="normalize",
            progress=30,
            seconds=None,
            peak_child_rss=0,
            next_stage="encode",
            task_id="fused",
            next_progress=30,
        )
        == 1
    )
    messages = list(StatusEvent.objects.filter(item=item).order_by("pk").values_list("message", flat=True))
    assert messages[-2:] == ["normalize skipped: already done", "encode started"]
