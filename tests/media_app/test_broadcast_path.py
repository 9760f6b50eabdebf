"""What a watcher hears now that a status save does not wait for Redis (issue 17, queue overhead).

Broadcasts leave from a sender thread of the process, in order; a last event (Completed, Failed,
deleted) is published before the save returns. The entry task's hand-over to its chain, which
changes nothing a watcher is shown, is no longer an event of its own. Real Redis, the real
channel layer, events heard as a web process hears them.
"""

from __future__ import annotations

import itertools
import os
from typing import Any

import pytest
from channels.layers import get_channel_layer
from django.conf import settings

from media_app import lifecycle
from media_app.channel_layers import FanOutChannelLayer
from media_app.lifecycle import item_group
from media_app.models import MediaItem
from media_app.services import media_item_create
from tests.conftest import GroupListener

pytestmark = pytest.mark.django_db(transaction=True)


def _queued(user: Any, kind: str = "image") -> MediaItem:
    item = media_item_create(owner=user, original_name="photo.jpg", size=1000)
    assert lifecycle.upload_finished(item_id=item.pk, kind=kind)
    assert lifecycle.queued(item_id=item.pk, send=False)
    assert get_channel_layer().flush()  # those two events are out before anyone listens
    item.refresh_from_db()
    return item


def test_the_hand_over_to_the_chain_is_not_an_event_the_first_stage_is(make_user):
    item = _queued(make_user())
    listener = GroupListener(item_group(item.pk))
    try:
        assert lifecycle.chain_started(item_id=item.pk, entry_task_id=item.task_id, first_task_id="f-1", detected={})
        assert lifecycle.stage_started(item_id=item.pk, stage="decode", task_id="f-1", progress=0) == 1
        # Had the hand-over been sent, it would have come first (one sender, in order).
        first = listener.next(10)["item"]
    finally:
        listener.close()
    assert (first["status"], first["stage"], first["waiting"], first["queue_position"]) == (
        "Processing",
        "decode",
        False,
        None,
    )


def test_a_hand_over_that_learnt_the_kind_is_heard_with_it(make_user):
    item = _queued(make_user(), kind="")
    listener = GroupListener(item_group(item.pk))
    try:
        detected = {"kind": "audio", "detected_content_type": "audio/flac"}
        assert lifecycle.chain_started(
            item_id=item.pk, entry_task_id=item.task_id, first_task_id="f-1", detected=detected
        )
        heard = listener.next(10)["item"]
    finally:
        listener.close()
    assert (heard["status"], heard["kind"], heard["waiting"], heard["queue_position"]) == (
        "Pending",
        "audio",
        True,
        1,
    )


def test_every_stage_and_the_completion_are_heard_in_order_and_sent_when_completed_returns(make_user):
    item = _queued(make_user())
    listener = GroupListener(item_group(item.pk))
    stages = ["decode", "normalize", "encode", "store"]
    try:
        lifecycle.stage_started(item_id=item.pk, stage=stages[0], task_id="f-1", progress=0)
        for n, (stage, following) in enumerate(itertools.pairwise(stages)):
            lifecycle.stage_advanced(
                item_id=item.pk,
                stage=stage,
                progress=20 * (n + 1),
                seconds=0.01,
                peak_child_rss=0,
                next_stage=following,
                task_id="f-1",
                next_progress=20 * (n + 1),
            )
        assert lifecycle.completed(item_id=item.pk, stage="store", seconds=0.01)
        # completed() returned: everything is on Redis already, so a process may end here.
        assert get_channel_layer().flush(timeout=0)
        heard = [listener.next(10)["item"] for _ in range(len(stages) + 1)]
    finally:
        listener.close()
    assert [(e["status"], e["stage"]) for e in heard] == [("Processing", s) for s in stages] + [("Completed", "")]
    assert [e["progress"] for e in heard] == sorted(e["progress"] for e in heard) and heard[-1]["progress"] == 100
    seqs = [e["seq"] for e in heard]
    assert seqs == sorted(set(seqs))


def test_a_forked_process_sends_its_own_events_and_its_last_one_before_it_exits():
    # A Celery pool process is forked from the worker and ends with os._exit, past any atexit:
    # it must not use the parent's sender thread (not running there), and a last event sent
    # with wait is on Redis before the call returns.
    layer = FanOutChannelLayer(hosts=[settings.CHANNEL_REDIS_URL])
    group = "media.fork-test"
    layer.group_send_soon([(group, {"type": "media.status", "n": 0})], wait=True)  # the parent's sender
    listener = GroupListener(group)
    try:
        pid = os.fork()
        if pid == 0:  # the child: no pytest, no Django database, only the layer
            try:
                for n in range(1, 20):
                    layer.group_send_soon([(group, {"type": "media.status", "n": n})])
                layer.group_send_soon([(group, {"type": "media.status", "n": 20})], wait=True)
            finally:
                os._exit(0)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        heard = [listener.next(10)["n"] for _ in range(20)]
    finally:
        listener.close()
    assert heard == list(range(1, 21))
