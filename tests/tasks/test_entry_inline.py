"""One Celery task per image: the entry task (``media.process``) runs an image's stages itself when
its delivery came from the stages' queue, with every guarantee of the fused task (history,
retry from the failed stage, a redelivery resuming at the first stage not done, a replaced entry
starting nothing). A video stays a chain (tests/e2e/test_waiting_status.py says why)."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest

from media_app import jobs, lifecycle
from media_app.models import MediaItem
from media_app.services import media_processing_start
from tasks import bindings
from tests.conftest import Worker, wait_for
from tests.media import drawn_image
from tests.tasks.conftest import history

pytestmark = pytest.mark.django_db(transaction=True)

IMAGE_STAGES = ["decode", "normalize", "encode", "store"]


def _final(item: MediaItem) -> MediaItem | None:
    item.refresh_from_db()
    return item if item.is_final else None


def stage_tasks(worker: Worker, item: MediaItem, count: int) -> list[tuple[str, str]] | None:
    """(stage, task name) of each stage the worker logged as done for the item, once ``count``."""
    found = []
    for line in worker.log.read_text(errors="replace").splitlines():
        start = line.find('{"item"')
        if start >= 0 and "tasks.stages" in line:
            entry = json.loads(line[start:])
            if entry["item"] == str(item.pk) and entry.get("outcome") == "done":
                found.append((entry["stage"], entry.get("task", "")))
    return found if len(found) >= count else None


def received(worker: Worker, since: int) -> list[str]:
    """Names of the tasks the worker received after log offset ``since``, in order."""
    text = worker.log.read_bytes()[since:].decode(errors="replace")
    return re.findall(r"Task (media\.[\w.]+)\[[^\]]+\] received", text)


def log_size(worker: Worker) -> int:
    return worker.log.stat().st_size if worker.log.exists() else 0


# --- on the real worker -----------------------------------------------------------------------------


@pytest.mark.worker
def test_an_image_is_one_task_on_the_worker_with_its_whole_history(celery_worker, make_item, tmp_path):
    item = make_item(drawn_image(tmp_path / "photo.jpg", size=(640, 480)))
    assert media_processing_start(item=item)
    entry = MediaItem.objects.values_list("task_id", flat=True).get(pk=item.pk)
    wait_for(lambda: _final(item), timeout=60, what="the image to finish")

    assert item.status == "Completed", item.error_message
    assert item.task_id == entry  # the stages ran under the entry task's id: a cancel kills it
    assert history(item) == [(s, f"{s} started", 1) for s in IMAGE_STAGES]
    assert sorted(item.timings) == sorted(IMAGE_STAGES)
    assert {r.role for r in item.renditions.all()} >= {"image_avif", "image_webp"}
    ran = wait_for(lambda: stage_tasks(celery_worker, item, 4), timeout=10, what="the stage log lines")
    assert ran == [(s, "media.process") for s in IMAGE_STAGES]


@pytest.mark.worker
def test_an_entry_task_from_another_queue_hands_the_image_over_to_its_own(celery_worker, make_item, tmp_path):
    """The stages' queue is where their workers are: an entry task delivered from another queue
    (here the video queue) does not run an image there, it queues the fused task on the image's."""
    item = make_item(drawn_image(tmp_path / "photo.jpg", size=(320, 240)))
    MediaItem.objects.filter(pk=item.pk).update(kind="image")
    lifecycle.upload_finished(item_id=item.pk)
    task_id = lifecycle.queued(item_id=item.pk, send=False)
    assert task_id
    jobs.send(jobs.PROCESS_TASK, item.pk, task_id=task_id, queue=jobs.Queue.VIDEO)
    wait_for(lambda: _final(item), timeout=60, what="the image to finish")

    assert item.status == "Completed", item.error_message
    assert history(item) == [(s, f"{s} started", 1) for s in IMAGE_STAGES]
    ran = wait_for(lambda: stage_tasks(celery_worker, item, 4), timeout=10, what="the stage log lines")
    assert ran == [(s, "media.stage.fused") for s in IMAGE_STAGES]


# --- in process: the entry task's guarantees ---------------------------------------------------------


def test_the_entry_task_runs_an_images_stages_itself(image):
    from tasks.stages import process

    process.apply(args=[str(image.pk)], task_id=image.task_id).get()

    image.refresh_from_db()
    assert (image.status, image.progress) == ("Completed", 100), image.error_detail
    assert history(image) == [(s, f"{s} started", 1) for s in IMAGE_STAGES]


def test_a_redelivered_entry_task_resumes_at_the_stage_that_was_running(image):
    """As if the worker died during ``encode``: the same message again (same id) skips decode and
    normalize, and counts the encode's second delivery."""
    from tasks.stages import STAGE_TASKS, process

    entry = image.task_id
    for stage in ("decode", "normalize"):
        STAGE_TASKS[stage].apply(args=[str(image.pk)], task_id=entry).get()
    assert lifecycle.stage_started(item_id=image.pk, stage="encode", task_id=entry, progress=30) == 1

    process.apply(args=[str(image.pk)], task_id=entry).get()

    image.refresh_from_db()
    assert image.status == "Completed", image.error_detail
    assert history(image)[-3:] == [
        ("encode", "encode started", 1),
        ("encode", "encode started (attempt 2)", 2),
        ("store", "store started", 1),
    ]


def test_an_entry_task_the_watchdog_replaced_starts_nothing(image, monkeypatch):
    """Between the entry task's first read and its first stage, the item was queued again under
    another id: the old delivery must not start a second run beside the new one."""
    from tasks import stages

    real = stages.runs_inline

    def replaced_meanwhile(task: Any, item: MediaItem) -> bool:
        MediaItem.objects.filter(pk=item.pk).update(task_id="replaced")
        return real(task, item)

    monkeypatch.setattr(stages, "runs_inline", replaced_meanwhile)
    stages.process.apply(args=[str(image.pk)], task_id=image.task_id).get()

    image.refresh_from_db()
    assert (image.status, image.task_id) == ("Pending", "replaced")
    assert history(image) == []


def test_a_retryable_error_in_the_entry_task_retries_from_the_stage_that_failed(image, monkeypatch):
    from tasks.stages import process

    real_run = bindings.run
    runs: list[str] = []

    def run(ctx: Any) -> Any:
        runs.append(ctx.stage)
        if ctx.stage == "encode" and runs.count("encode") == 1:
            raise ConnectionError("storage blinked")
        return real_run(ctx)

    monkeypatch.setattr(bindings, "run", run)
    process.apply(args=[str(image.pk)], task_id=image.task_id)

    image.refresh_from_db()
    assert image.status == "Completed", image.error_detail
    assert runs == ["decode", "normalize", "encode", "encode", "store"]
    assert history(image)[2:] == [
        ("encode", "encode started", 1),
        ("encode", "encode started (attempt 2)", 2),
        ("store", "store started", 1),
    ]


def test_an_item_whose_stages_were_all_done_completes_on_retry(image, monkeypatch):
    """Cancelled just after its store: a retry finds every stage done, and still completes."""
    from tasks.stages import STAGE_TASKS, process

    monkeypatch.setattr(jobs, "send", lambda *a, **k: None)  # the test runs the entry task itself
    entry = image.task_id
    assert lifecycle.stage_started(item_id=image.pk, stage="decode", task_id=entry, progress=0)
    for stage in IMAGE_STAGES:
        STAGE_TASKS[stage].apply(args=[str(image.pk)]).get()
    assert lifecycle.cancelled(item_id=image.pk, message="Cancelled.")
    assert lifecycle.retried(item_id=image.pk)
    image.refresh_from_db()

    process.apply(args=[str(image.pk)], task_id=image.task_id).get()

    image.refresh_from_db()
    assert (image.status, image.progress) == ("Completed", 100), image.error_detail


def test_only_kinds_with_a_previews_stage_look_for_an_early_thumbnail():
    """A Processing event looks for the thumbnail only where a stage stores one before the end."""
    from media_app.selectors import EARLY_THUMBNAIL_KINDS

    assert {kind for kind, stages in bindings.PIPELINES.items() if "previews" in [st.name for st in stages]} == set(
        EARLY_THUMBNAIL_KINDS
    )
