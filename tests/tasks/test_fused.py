"""An image's chain (and a sound's) as one task (``media.stage.fused``), run in-process: each stage is still
started and finished through the lifecycle, a second delivery resumes at the first stage not
done and counts it, and a cancel between two stages stops the task."""

from __future__ import annotations

import base64
import subprocess
from pathlib import Path
from typing import Any

import pytest

from media_app import jobs, lifecycle
from media_app.models import MediaItem
from pipelines.placeholder import thumbhash_to_rgba
from pipelines.runner import ffmpeg_exe
from tasks import bindings
from tests.media import lavfi_audio
from tests.tasks.conftest import history

pytestmark = pytest.mark.django_db(transaction=True)

STAGES = ["decode", "normalize", "encode", "store"]
IMAGE_RUNS = STAGES


def test_one_task_reports_every_stage_as_the_chain_did(image, monkeypatch):
    from tasks.stages import fused, process_links

    (link,) = process_links(image)
    assert link.task == "media.stage.fused"
    seen: list[tuple[str, str]] = []
    real_broadcast = lifecycle.broadcast_many

    def broadcast_many(items: Any, **kwargs: Any) -> None:
        seen.extend((it.status, it.stage) for it in items)
        real_broadcast(items, **kwargs)

    monkeypatch.setattr(lifecycle, "broadcast_many", broadcast_many)
    fused.apply(args=[str(image.pk)], task_id="fused-1").get()

    image.refresh_from_db()
    assert (image.status, image.progress, image.task_id) == ("Completed", 100, "fused-1")
    assert history(image) == [(s, f"{s} started", 1) for s in STAGES]
    assert sorted(image.timings) == sorted(STAGES)
    # Watchers are told of each stage but the quick ones: the normalize (a plan, milliseconds),
    # whose start and end go with the encode's start, and the store (a copy of two small files),
    # whose start and end go with the completion: two writes fewer per image.
    assert seen == [("Processing", "decode"), ("Processing", "encode"), ("Completed", "")]
    assert image.timings["store"] > 0
    assert {r.role for r in image.renditions.all()} >= {"image_avif", "image_webp"}


def test_the_store_takes_the_image_placeholder_from_the_encode_without_decoding_the_webp(image, monkeypatch):
    """The store decoded the written WebP again for its ThumbHash (10-50 ms of the worker's CPU per
    image); the encode now hashes the picture it writes, and the store records that."""
    from tasks import bindings
    from tasks.stages import fused

    def no_decoding(path: Path) -> str:
        raise AssertionError(f"the store decoded {path.name} for a placeholder")

    monkeypatch.setattr(bindings, "thumbhash_file", no_decoding)
    fused.apply(args=[str(image.pk)], task_id="fused-1").get()

    image.refresh_from_db()
    assert image.status == "Completed", image.error_message
    webp = image.renditions.get(role="image_webp")
    w, h, pixels = thumbhash_to_rgba(base64.b64decode(webp.placeholder))
    assert abs(w / h - 320 / 240) < 0.3
    # drawn_image: mostly blue (30, 90, 200), a red corner and a green disc.
    mean = [sum(pixels[i::4]) / (w * h) for i in range(3)]
    assert mean[2] > mean[0] + 60 and mean[2] > mean[1] + 60, mean


def test_a_second_delivery_resumes_at_the_stage_that_was_running_and_counts_it(image):
    """As if the first delivery died during ``encode``: the second skips decode and normalize
    without announcing them (that would reset the count), and the encode is attempt 2."""
    from tasks.stages import STAGE_TASKS, fused

    for stage in ("decode", "normalize"):
        STAGE_TASKS[stage].apply(args=[str(image.pk)]).get()
    assert lifecycle.stage_started(item_id=image.pk, stage="encode", task_id="fused-1", progress=30) == 1

    fused.apply(args=[str(image.pk)], task_id="fused-1").get()

    image.refresh_from_db()
    assert image.status == "Completed", image.error_message
    assert history(image) == [
        ("decode", "decode started", 1),
        ("normalize", "normalize started", 1),
        ("encode", "encode started", 1),
        ("encode", "encode started (attempt 2)", 2),
        ("store", "store started", 1),
    ]


def test_a_file_that_kills_its_worker_every_time_is_stopped(image, settings):
    from tasks.stages import fused

    for _ in range(settings.MEDIA_MAX_ATTEMPTS):
        lifecycle.stage_started(item_id=image.pk, stage="decode", task_id="fused-1", progress=0)

    fused.apply(args=[str(image.pk)], task_id="fused-1")

    image.refresh_from_db()
    assert image.status == "Failed"
    assert image.error_message == "Processing this file failed repeatedly and was stopped."


@pytest.mark.parametrize(
    ("during", "ran", "announced"),
    [
        ("encode", ["decode", "normalize", "encode"], ["decode", "normalize", "encode"]),
        # Normalize is quick (a plan: milliseconds) and not announced on its own: the write that
        # would have started the encode sees the cancel, and the encode never runs.
        ("normalize", ["decode", "normalize"], ["decode"]),
        # The store is quick too, and the last stage: the completion sees the cancel instead.
        ("store", IMAGE_RUNS, ["decode", "normalize", "encode"]),
    ],
)
def test_a_cancel_during_a_stage_stops_the_task_before_the_next(image, monkeypatch, during, ran, announced):
    from tasks.stages import fused

    real_run = bindings.run
    runs: list[str] = []

    def run(ctx: Any) -> Any:
        runs.append(ctx.stage)
        result = real_run(ctx)
        if ctx.stage == during:
            assert lifecycle.cancelled(item_id=ctx.item_id, message="Cancelled by an administrator.")
        return result

    monkeypatch.setattr(bindings, "run", run)
    fused.apply(args=[str(image.pk)], task_id="fused-1")

    image.refresh_from_db()
    assert (image.status, image.error_code) == ("Failed", "cancelled")
    assert runs == ran
    assert [row[0] for row in history(image)] == announced
    if during != "store":
        assert not image.renditions.exists()


@pytest.mark.parametrize("quick", ["normalize", "store"])
def test_a_quick_stage_that_keeps_failing_is_tried_as_often_as_any_other(image, monkeypatch, settings, quick):
    """A quick stage is not announced when it starts; when it fails for something a retry can
    fix, it is announced before the retry, so that its deliveries are counted like any stage's
    (the store, the last stage, as the normalize between two others)."""
    from tasks.stages import fused

    real_run = bindings.run
    runs: list[str] = []

    def run(ctx: Any) -> Any:
        runs.append(ctx.stage)
        if ctx.stage == quick:
            raise ConnectionError("storage blinked")
        return real_run(ctx)

    monkeypatch.setattr(bindings, "run", run)
    fused.apply(args=[str(image.pk)], task_id="fused-1")

    image.refresh_from_db()
    assert image.status == "Failed"
    assert runs.count(quick) == settings.MEDIA_MAX_ATTEMPTS
    assert [row[1:] for row in history(image) if row[0] == quick] == [
        (f"{quick} started", 1),
        (f"{quick} started (attempt 2)", 2),
        (f"{quick} started (attempt 3)", 3),
    ]


def test_a_retryable_error_retries_the_task_from_the_stage_that_failed(image, monkeypatch):
    """The retry policy is the stage tasks' (StageTask): the retried delivery starts again at the
    failed stage, which counts a second attempt; the stages before it are not run again."""
    from tasks.stages import fused

    real_run = bindings.run
    runs: list[str] = []

    def run(ctx: Any) -> Any:
        runs.append(ctx.stage)
        if ctx.stage == "encode" and runs.count("encode") == 1:
            raise ConnectionError("storage blinked")
        return real_run(ctx)

    monkeypatch.setattr(bindings, "run", run)
    fused.apply(args=[str(image.pk)], task_id="fused-1")

    image.refresh_from_db()
    assert image.status == "Completed", image.error_detail
    assert runs == ["decode", "normalize", "encode", "encode", "store"]
    assert history(image)[2:] == [
        ("encode", "encode started", 1),
        ("encode", "encode started (attempt 2)", 2),
        ("store", "store started", 1),
    ]


def loudness(path: Path) -> float:
    """Integrated loudness (LUFS) of the file as ffmpeg plays it (the Opus header's gain applied)."""
    out = subprocess.run(
        [ffmpeg_exe(), "-hide_banner", "-nostats", "-i", str(path), "-af", "ebur128=framelog=quiet", "-f", "null", "-"],
        capture_output=True, text=True, check=True,
    ).stderr  # fmt: skip
    return float(out.rpartition("Summary:")[2].split("I:")[1].split()[0])


AUDIO_STAGES = ["demux", "decode", "normalize", "filter", "encode", "mux", "store"]


@pytest.fixture
def song(make_item, tmp_path, tmp_storage, settings, monkeypatch) -> MediaItem:
    settings.CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}
    monkeypatch.setattr(jobs, "revoke", lambda task_ids: None)
    item = make_item(lavfi_audio(tmp_path / "song.mp3", seconds=3))
    MediaItem.objects.filter(pk=item.pk).update(kind="audio")
    lifecycle.upload_finished(item_id=item.pk)
    lifecycle.queued(item_id=item.pk, send=False)
    item.refresh_from_db()
    return item


def test_a_sound_is_one_task_that_reports_every_stage(song):
    """Audio is fused too: one task, the seven stages in the history as a chain wrote them, and
    a loudness-normalised Opus WebM that plays at the target."""
    from django.core.files.storage import default_storage

    from tasks.stages import fused, process_links

    (link,) = process_links(song)
    assert link.task == "media.stage.fused"
    fused.apply(args=[str(song.pk)], task_id="fused-1").get()

    song.refresh_from_db()
    assert (song.status, song.progress) == ("Completed", 100), song.error_message
    assert history(song) == [(s, f"{s} started", 1) for s in AUDIO_STAGES]
    assert sorted(song.timings) == sorted(AUDIO_STAGES)
    (audio,) = song.renditions.filter(role="audio")
    assert (audio.content_type, audio.codec) == ("audio/webm", "opus")
    played = loudness(Path(default_storage.path(audio.storage_key)))
    assert played == pytest.approx(bindings.profiles().audio.loudness_i, abs=1.0)
