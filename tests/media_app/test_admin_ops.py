"""The admin as an operator uses it, over HTTP: find an item, read what went wrong, act on it."""

from __future__ import annotations

import html
import re
import subprocess
import threading
from collections.abc import Callable
from typing import Any

import pytest
from django.core.files.storage import default_storage
from django.db import connection
from django.test import Client

from config.celery import app as celery_app
from media_app.models import MediaItem, StatusEvent
from media_app.services import ErrorReport, media_item_create, media_processing_start
from tests.conftest import wait_for
from tests.media import drawn_image, lavfi_video
from tests.states import set_state

CHANGELIST = "/admin/media_app/mediaitem/"


@pytest.fixture
def staff_client(make_user: Callable[..., Any]) -> Client:
    admin = make_user("operator", staff=True)
    admin.is_superuser = True
    admin.save()
    client = Client()
    client.force_login(admin)
    return client


def act(client: Client, action: str, *items: MediaItem) -> list[str]:
    """Tick the items on the change list, pick the action, press Go; return the messages shown."""
    response = client.post(
        CHANGELIST, {"action": action, "_selected_action": [str(i.pk) for i in items], "index": 0}, follow=True
    )
    assert response.status_code == 200
    # Read from the page as a person would (response.context is not thread-safe in the test client).
    found = re.findall(r'<li class="(?:success|warning|info|error)">(.*?)</li>', response.content.decode(), re.S)
    return [html.unescape(m).strip() for m in found]


def _final(item: MediaItem) -> bool:
    item.refresh_from_db()
    return item.is_final


def _item_ffmpeg(item: MediaItem) -> list[str]:
    """ffmpeg processes working on this item (their paths name it), whoever else runs ffmpeg here."""
    out = subprocess.run(["pgrep", "-af", "ffmpeg-linux"], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if str(item.pk) in line]


def _events(item: MediaItem, since: int = 0) -> list[str]:
    return list(StatusEvent.objects.filter(item=item, pk__gt=since).values_list("message", flat=True))


# --- with the real worker --------------------------------------------------------------------


@pytest.mark.worker
def test_cancel_kills_the_running_encode_then_retry_resumes_at_encode_once(
    celery_worker, staff_client, make_item, tmp_path
):
    # 8 s, as the kill mid-encode of tests/tasks/test_faults.py: the cancel comes at once, and the
    # retried encode runs in full.
    item = make_item(lavfi_video(tmp_path / "long.mp4", seconds=8, size="1280x720"))
    media_processing_start(item=item)
    wait_for(lambda: _item_ffmpeg(item) and (item.refresh_from_db() or item.stage == "encode"), timeout=90,
             what="the encode's ffmpeg")  # fmt: skip

    messages = act(staff_client, "cancel", item)

    assert messages == ["Cancelled: 1 item."]
    item.refresh_from_db()
    assert (item.status, item.error_code) == ("Failed", "cancelled")
    assert wait_for(lambda: not _item_ffmpeg(item), timeout=10, what="its ffmpeg to die")
    assert celery_worker.is_running()

    before_retry = StatusEvent.objects.filter(item=item).latest("pk").pk
    first = act(staff_client, "retry", item)
    second = act(staff_client, "retry", item)  # the impatient double click

    assert first == ["Queued for retry: 1 item."]
    assert len(second) == 1 and second[0].startswith("Skipped 1: ") and "long.mp4" in second[0]
    wait_for(lambda: _final(item), timeout=180, what="the retried item to finish")
    assert item.status == "Completed", item.error_message
    events = _events(item, since=before_retry)
    assert events.count("Retry requested by an administrator") == 1
    # Resumed at the failed stage: what was done before the cancel is not done again...
    for stage in ("demux", "decode", "normalize", "filter"):
        assert f"{stage} skipped: already done" in events
    # ...and the encode ran once more, by one chain only.
    assert events.count("encode started") == 1
    assert item.renditions.filter(role="video").count() == 1
    assert item.attempts == 1


@pytest.mark.worker
def test_reprocess_runs_a_finished_item_again_with_one_set_of_outputs(celery_worker, staff_client, make_item, tmp_path):
    item = make_item(drawn_image(tmp_path / "photo.jpg"))
    media_processing_start(item=item)
    wait_for(lambda: _final(item), timeout=60, what="the first run")
    assert item.status == "Completed", item.error_message
    first_outputs = set(item.renditions.values_list("pk", flat=True))
    since = StatusEvent.objects.filter(item=item).latest("pk").pk

    assert act(staff_client, "reprocess", item) == ["Queued for reprocessing: 1 item."]
    wait_for(lambda: _final(item), timeout=60, what="the second run")

    assert item.status == "Completed", item.error_message
    events = _events(item, since=since)
    assert "encode started" in events and not any("skipped" in e for e in events)
    outputs = list(item.renditions.all())
    assert {r.role for r in outputs} == {"image_avif", "image_webp"} and len(outputs) == 2
    assert not first_outputs & {r.pk for r in outputs}
    assert all(default_storage.exists(r.storage_key) for r in outputs)


# --- without a worker ------------------------------------------------------------------------


@pytest.mark.django_db
def test_each_action_says_how_many_changed_and_why_others_were_skipped(staff_client, make_user, monkeypatch):
    sent: list[Any] = []
    monkeypatch.setattr(celery_app, "send_task", lambda *a, **k: sent.append((a, k)))
    owner = make_user("dana")
    done = media_item_create(owner=owner, original_name="done.jpg")
    set_state(item_id=done.pk, status="Completed")
    waiting = media_item_create(owner=owner, original_name="waiting.mp4")
    failed = media_item_create(owner=owner, original_name="gone.mp4", size=10)
    set_state(item_id=failed.pk, status="Failed", error=ErrorReport("internal", "boom"))

    messages = act(staff_client, "retry", done, waiting, failed)
    assert "Skipped 1: not failed (Completed): done.jpg." in messages
    assert "Skipped 1: not failed (Pending): waiting.mp4." in messages
    assert "Skipped 1: the uploaded file is gone: gone.mp4." in messages
    assert act(staff_client, "cancel", done, waiting) == [
        "Cancelled: 1 item.",
        "Skipped 1: already finished (Completed): done.jpg.",
    ]
    waiting.refresh_from_db()
    assert (waiting.status, waiting.error_code) == ("Failed", "cancelled")
    assert act(staff_client, "reprocess", waiting, failed) == [
        "Skipped 2: the uploaded file is gone: gone.mp4, waiting.mp4."
    ]
    assert sent == []


@pytest.mark.django_db(transaction=True)
def test_two_simultaneous_retries_of_one_item_queue_it_once(make_user, make_item, tmp_path, monkeypatch):
    sent: list[Any] = []
    monkeypatch.setattr(celery_app, "send_task", lambda *a, **k: sent.append(a))
    item = make_item(drawn_image(tmp_path / "a.jpg"))
    set_state(item_id=item.pk, status="Failed", error=ErrorReport("internal", "boom"))
    barrier = threading.Barrier(2)
    results: list[list[str]] = []

    admin = make_user("operator", staff=True)
    admin.is_superuser = True
    admin.save()

    def click(client: Client) -> None:
        try:
            barrier.wait()
            results.append(act(client, "retry", item))
        finally:
            connection.close()

    clients = [Client(), Client()]  # two browser tabs: each has its own session and messages
    for client in clients:
        client.force_login(admin)
    threads = [threading.Thread(target=click, args=(c,)) for c in clients]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)

    assert sorted(results) == [["Queued for retry: 1 item."], ["Skipped 1: already queued: a.jpg."]]
    assert len(sent) == 1
    assert StatusEvent.objects.filter(item=item, message="Retry requested by an administrator").count() == 1


@pytest.mark.django_db
def test_detail_page_shows_history_error_detail_and_outputs_with_previews(staff_client, make_item, tmp_path):
    from media_app.services import renditions_replace

    item = make_item(drawn_image(tmp_path / "p.png", fmt="PNG"), name="holiday.png")
    set_state(item_id=item.pk, status="Processing", stage="encode", extra={"kind": "image"})
    set_state(
        item_id=item.pk,
        status="Failed",
        error=ErrorReport("invalid_input", "The file is damaged.", "[png @ 0x1] IHDR: CRC error\nInvalid data"),
    )
    default_storage.save(f"outputs/{item.pk}/thumb.webp", open(tmp_path / "p.png", "rb"))  # noqa: SIM115
    (thumb,) = renditions_replace(
        item_id=item.pk,
        renditions=[
            {"role": "thumbnail", "storage_key": f"outputs/{item.pk}/thumb.webp", "content_type": "image/webp"}
        ],
    )

    page = staff_client.get(f"{CHANGELIST}{item.pk}/change/").content.decode()

    assert "invalid_input" in page and "The file is damaged." in page
    assert "IHDR: CRC error" in page  # the ffmpeg output an admin needs
    assert "encode" in page and "Processing" in page  # history rows
    output_url = f"{CHANGELIST}{item.pk}/output/{thumb.pk}/"
    assert f'href="{output_url}"' in page and f'<img src="{output_url}"' in page
    served = staff_client.get(output_url)
    assert served.status_code == 200 and served["Content-Type"] == "image/webp"
    assert b"".join(served.streaming_content) == (tmp_path / "p.png").read_bytes()
    assert Client().get(output_url).status_code == 302  # anonymous: sent to the login page

    found = staff_client.get(CHANGELIST, {"q": str(item.pk)}).content.decode()
    assert "holiday.png" in found and "1 media item" in found


@pytest.mark.django_db(transaction=True)
def test_process_now_goes_through_the_task_manager_api_for_each_kind_of_item(
    staff_client, make_user, make_item, tmp_path, monkeypatch
):
    """An upload whose bytes arrived but was never completed starts; a failed one resumes; one
    already queued is refused; each queued item notes why in its history."""
    sent: list[Any] = []
    monkeypatch.setattr(celery_app, "send_task", lambda *a, **k: sent.append((a[0], k["args"][0])))
    stuck = make_item(drawn_image(tmp_path / "stuck.jpg"))
    failed = make_item(drawn_image(tmp_path / "failed.jpg"))
    set_state(item_id=failed.pk, status="Failed", error=ErrorReport("internal", "boom"))
    queued = make_item(drawn_image(tmp_path / "queued.jpg"))
    assert media_processing_start(item=queued)
    sent.clear()

    messages = act(staff_client, "process", stuck, failed, queued)

    assert messages == ["Queued: 2 items.", "Skipped 1: already queued or processing: queued.jpg."]
    assert sorted(sent) == sorted([("media.process", str(stuck.pk)), ("media.process", str(failed.pk))])
    for item in (stuck, failed):
        item.refresh_from_db()
        assert item.is_queued
        assert _events(item)[-1] == "Task: Processing requested in the admin - operator"
