"""An item whose next stage waits for a worker says so: its queue, its place in line, and a time
left that includes the wait.

The payload tests move items through the real lifecycle transitions (no worker; what would be
sent to Celery is recorded). The live test runs two videos on workers shaped like the Procfile's,
one slot for the video queue: while one encodes, the other reports waiting, first in line.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer

from media_app import jobs, lifecycle
from media_app.lifecycle import owner_group
from media_app.models import MediaItem
from media_app.selectors import media_item_payload, media_item_work_left
from media_app.services import media_item_create, media_processing_start
from tasks import bindings
from tests.conftest import wait_for
from tests.media import lavfi_video

pytest_plugins = ["tests.procfile_workers"]


def _at(kind: str, stage: str, end: bool = False) -> int:
    return int(bindings.progress_span(kind, stage)[1 if end else 0])


def test_every_stage_of_a_kind_runs_on_the_queue_the_selectors_count_it_in():
    """The line an item waits in is ``jobs.queue_for(kind)``: true of every stage in the table."""
    for kind, stages in bindings.PIPELINES.items():
        assert {str(st.queue) for st in stages} == {str(jobs.queue_for(kind))}, kind


# --- the payload -----------------------------------------------------------------------------------


@pytest.fixture
def no_broker(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    sent: list[str] = []
    monkeypatch.setattr(jobs, "send", lambda name, item_id, **_: sent.append(str(item_id)))
    monkeypatch.setattr(jobs, "revoke", lambda *_: None)
    return sent


@pytest.fixture
def layer(settings: Any) -> Any:
    settings.CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}
    return get_channel_layer()


def _video(owner: Any, name: str) -> MediaItem:
    item = media_item_create(owner=owner, original_name=name, size=1000)
    media_processing_start(item=item, kind="video")
    return item


def _run_stages(item: MediaItem, stages: list[str], *, seconds: float) -> None:
    """Each stage started and finished by the lifecycle, as a worker would, taking ``seconds``."""
    for stage in stages:
        lifecycle.stage_started(
            item_id=item.pk, stage=stage, task_id=f"{stage}-{item.pk}", progress=_at("video", stage)
        )
        lifecycle.stage_finished(item_id=item.pk, stage=stage, progress=_at("video", stage, True), seconds=seconds)


def _receive(layer: Any, channel: str) -> dict[str, Any]:
    """The next item state sent to ``channel``."""

    async def one() -> dict[str, Any]:
        return dict((await asyncio.wait_for(layer.receive(channel), timeout=5))["item"])

    return async_to_sync(one)()


def _payload(item: MediaItem) -> dict[str, Any]:
    item.refresh_from_db()
    return media_item_payload(item)


@pytest.mark.django_db
def test_an_item_between_stages_waits_in_its_queue_with_its_place_and_a_time_left_that_includes_the_wait(
    make_user, no_broker, layer, django_capture_on_commit_callbacks
):
    owner = make_user()
    first, second, third = (_video(owner, f"{n}.mp4") for n in ("first", "second", "third"))
    photo = media_item_create(owner=owner, original_name="photo.jpg", size=1000)
    media_processing_start(item=photo, kind="image")
    before_encode = ["demux", "decode", "normalize", "filter"]

    # The first video encodes, and its encoder says 60 s are left.
    _run_stages(first, before_encode, seconds=1.0)
    lifecycle.stage_started(item_id=first.pk, stage="encode", task_id="enc", progress=_at("video", "encode"))
    lifecycle.progressed(item_id=first.pk, progress=_at("video", "encode") + 10, eta_seconds=60.0)
    # The second and third reach the encode too, one after the other: their encodes wait.
    _run_stages(second, before_encode, seconds=1.0)
    _run_stages(third, before_encode, seconds=2.0)

    encoding, waiting, behind, queued = map(_payload, (first, second, third, photo))

    assert (encoding["status"], encoding["stage"], encoding["waiting"]) == ("Processing", "encode", False)
    assert (encoding["queue"], encoding["queue_position"]) == (None, None)
    assert 59 <= encoding["eta_seconds"] <= 60
    assert (waiting["status"], waiting["stage"], waiting["waiting"]) == ("Processing", "filter", True)
    assert (waiting["queue"], waiting["queue_position"]) == ("video", 1)
    assert (behind["queue"], behind["queue_position"]) == ("video", 2)
    # The photo waits in the other line, on its own.
    assert (queued["status"], queued["waiting"], queued["queue"], queued["queue_position"]) == (
        "Pending",
        True,
        "default",
        1,
    )
    # Time left = the wait (what is left of everything running or ahead) + its own work left:
    # 4 s of work bought 12 % of the bar, so 88 % more takes about 29 s.
    second.refresh_from_db()
    own = media_item_work_left(second)
    assert own == pytest.approx(4.0 * (100 - second.progress) / second.progress, abs=0.2)
    assert waiting["eta_seconds"] == pytest.approx(60 + own, abs=1.0)
    third.refresh_from_db()
    assert behind["eta_seconds"] == pytest.approx(60 + own + media_item_work_left(third), abs=1.0)

    # The line moves: the second's encode starts, and those behind hear their new places at once.
    fourth = _video(owner, "fourth.mp4")
    _run_stages(fourth, before_encode, seconds=1.0)
    assert _payload(fourth)["queue_position"] == 3
    seq_before = _payload(third)["seq"]
    channel = async_to_sync(layer.new_channel)()
    async_to_sync(layer.group_add)(owner_group(owner.pk), channel)
    lifecycle._last_line_notice.clear()
    with django_capture_on_commit_callbacks(execute=True):
        lifecycle.stage_started(item_id=second.pk, stage="encode", task_id="enc2", progress=_at("video", "encode"))
    # On the owner's group: the second's start, then the line notice to those behind.
    told = {e["id"]: e for e in (_receive(layer, channel) for _ in range(3))}
    assert (told[str(second.pk)]["waiting"], told[str(second.pk)]["stage"]) == (False, "encode")
    assert (told[str(third.pk)]["waiting"], told[str(third.pk)]["queue_position"]) == (True, 1)
    assert told[str(third.pk)]["seq"] > seq_before  # a new number: the sockets drop one they have seen
    assert told[str(fourth.pk)]["queue_position"] == 2
    # Within the second: the notice is cut to the one now first in line, who still hears it.
    with django_capture_on_commit_callbacks(execute=True):
        lifecycle.stage_started(item_id=third.pk, stage="encode", task_id="enc3", progress=_at("video", "encode"))
    told = {e["id"]: e for e in (_receive(layer, channel) for _ in range(2))}
    assert set(told) == {str(third.pk), str(fourth.pk)}
    assert told[str(fourth.pk)]["queue_position"] == 1


@pytest.mark.django_db
def test_progress_and_time_left_while_no_stage_is_running_are_the_waits_not_a_stale_estimate(
    make_user, no_broker, layer
):
    """The last stage done, the chain's last link waits: "waiting", not "saving · 99 %"."""
    owner = make_user()
    item = _video(owner, "clip.mp4")
    _run_stages(item, bindings.stages_for("video"), seconds=0.5)
    payload = _payload(item)
    assert (payload["status"], payload["progress"], payload["waiting"], payload["queue_position"]) == (
        "Processing",
        99,
        True,
        1,
    )
    lifecycle.completed(item_id=item.pk)
    done = _payload(item)
    assert (done["status"], done["waiting"], done["queue"], done["eta_seconds"]) == ("Completed", False, None, None)


# --- live: one video slot, two videos ----------------------------------------------------------


@pytest.mark.worker
def test_two_videos_on_one_video_slot_the_second_waits_first_in_line_then_both_complete(
    procfile_workers, make_item, tmp_path
):
    longer = make_item(lavfi_video(tmp_path / "longer.mp4", seconds=12, size="1280x720"))
    shorter = make_item(lavfi_video(tmp_path / "shorter.mp4", seconds=3))
    started = time.monotonic()
    media_processing_start(item=longer)
    media_processing_start(item=shorter)

    def one_encodes_the_other_waits() -> tuple[dict[str, Any], dict[str, Any], MediaItem] | None:
        items = list(MediaItem.objects.filter(pk__in=[longer.pk, shorter.pk]))
        states = [(media_item_payload(i, with_outputs=False), i) for i in items]
        for (enc, enc_item), (other, _) in (states, states[::-1]):
            encoding = enc["status"] == "Processing" and enc["stage"] == "encode" and not enc["waiting"]
            if encoding and other["waiting"] and other["status"] in ("Pending", "Processing"):
                return enc, other, enc_item
        return None

    enc, waiting, enc_item = wait_for(one_encodes_the_other_waits, timeout=240, what="one encoding, one waiting")
    seen_at = time.monotonic() - started

    assert (waiting["queue"], waiting["queue_position"]) == ("video", 1)
    assert (enc["queue"], enc["queue_position"]) == (None, None)
    if waiting["eta_seconds"] is not None:
        # The wait is in it: at least what the encoding video has left.
        assert waiting["eta_seconds"] >= (media_item_work_left(enc_item) or 0)

    def both_done() -> bool:
        return set(MediaItem.objects.filter(pk__in=[longer.pk, shorter.pk]).values_list("status", flat=True)) <= {
            "Completed",
            "Failed",
        }

    wait_for(both_done, timeout=300, what="both videos to finish")
    for item in (longer, shorter):
        item.refresh_from_db()
        assert item.status == "Completed", item.error_message
        assert item.waiting_since is None
    print(
        f"seen at {seen_at:.1f} s: {enc['file_name']} encoding ({enc['progress']} %), {waiting['file_name']} "
        f"{waiting['status']} at {waiting['stage'] or '-'} waiting, place {waiting['queue_position']}, "
        f"eta {waiting['eta_seconds']} s; both done in {time.monotonic() - started:.1f} s"
    )
