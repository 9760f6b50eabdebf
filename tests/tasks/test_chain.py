"""The real chain on the real worker through Redis: outputs, history, retries, bad input."""

from __future__ import annotations

import itertools
import json
import os
from pathlib import Path

import av
import pytest
from django.core.files.storage import default_storage
from PIL import Image

from media_app import lifecycle
from media_app.models import MediaItem, StatusEvent
from media_app.services import item_group, media_processing_start
from tests.conftest import RUN_DIR, GroupListener, Worker, replace_workers, wait_for
from tests.media import drawn_image, lavfi_audio, lavfi_video

pytestmark = pytest.mark.worker


def _finished(item: MediaItem) -> MediaItem | None:
    item.refresh_from_db()
    return item if item.is_final else None


def _roles(item: MediaItem) -> dict[str, list]:
    out: dict[str, list] = {}
    for r in item.renditions.all():
        out.setdefault(r.role, []).append(r)
    return out


def test_image_upload_is_processed_by_the_worker(celery_worker, make_item, tmp_path):
    item = make_item(drawn_image(tmp_path / "photo.jpg", size=(800, 600)))
    assert media_processing_start(item=item)

    wait_for(lambda: _finished(item), timeout=60, what="the image to finish")

    assert item.status == "Completed", item.error_message
    assert item.kind == "image" and item.progress == 100
    roles = _roles(item)
    for role, fmt in (("image_avif", "AVIF"), ("image_webp", "WEBP")):
        (rendition,) = roles[role]
        with default_storage.open(rendition.storage_key) as fh, Image.open(fh) as img:
            assert img.format == fmt and img.size == (800, 600)


def _proc(pid: int, name: str) -> bytes:
    try:
        return Path(f"/proc/{pid}/{name}").read_bytes()
    except FileNotFoundError:
        return b""


def test_pool_processes_decode_in_a_fork_server_of_their_own(celery_worker, make_item, tmp_path):
    """Each pool process starts the sandbox's fork server when it starts; the decoders are forked
    from that lean process, which has none of the worker's environment (database and broker
    URLs, secret key)."""
    item = make_item(drawn_image(tmp_path / "photo.jpg", size=(320, 240)))
    assert media_processing_start(item=item)
    wait_for(lambda: _finished(item), timeout=60, what="the image to finish")
    assert item.status == "Completed", item.error_message

    lean = {"PATH", "LANG", "LC_ALL", "LC_CTYPE", "TMPDIR", "HOME", "TZ", "LD_LIBRARY_PATH"}
    pools = celery_worker.pool_pids()
    assert len(pools) == celery_worker.concurrency
    for pool in pools:
        children = _proc(pool, f"task/{pool}/children").split()
        servers = [int(c) for c in children if b"pipelines.sandbox" in _proc(int(c), "cmdline")]
        assert len(servers) == 1, f"pool process {pool}: children {children}"
        pool_env = {e.split(b"=", 1)[0].decode() for e in _proc(pool, "environ").split(b"\0") if e}
        server_env = {e.split(b"=", 1)[0].decode() for e in _proc(servers[0], "environ").split(b"\0") if e}
        assert "DJANGO_SETTINGS_MODULE" in pool_env
        assert server_env <= lean, server_env - lean


def test_each_stage_logs_one_json_line_through_django_logging(celery_worker, make_item, tmp_path):
    """An operator greps or ships the worker log: one JSON object per stage, with its outcome."""
    item = make_item(drawn_image(tmp_path / "photo.jpg", size=(320, 240)))
    assert media_processing_start(item=item)
    wait_for(lambda: _finished(item), timeout=60, what="the image to finish")

    def stage_lines() -> list[dict]:
        found = []
        for line in celery_worker.log.read_text(errors="replace").splitlines():
            start = line.find("{")
            if "tasks.stages" in line and start >= 0 and str(item.pk) in line:
                found.append(json.loads(line[start:]))
        return found if len(found) >= 4 else []

    lines = wait_for(stage_lines, timeout=10, what="the stage log lines")
    assert [entry["stage"] for entry in lines] == ["decode", "normalize", "encode", "store"]
    for entry in lines:
        assert entry["item"] == str(item.pk) and entry["attempt"] == 1 and entry["outcome"] == "done"
        assert isinstance(entry["seconds"], float) and entry["seconds"] >= 0


def test_video_chain_runs_every_stage_in_order_with_rising_progress(celery_worker, make_item, tmp_path):
    item = make_item(lavfi_video(tmp_path / "clip.mp4", seconds=3))
    listener = GroupListener(item_group(item.pk))
    media_processing_start(item=item)

    events = []
    try:
        while not events or events[-1]["status"] not in ("Completed", "Failed"):
            events.append(listener.next(90)["item"])
    finally:
        listener.close()

    assert events[-1]["status"] == "Completed", events[-1]
    # Events are numbered (seq) in the order of the writes; the page drops one older than one it
    # has shown. A chain's stages run in two worker processes, each sending its events from a
    # thread of its own, so on a loaded machine an event may arrive after a newer one (a CI run:
    # progress 0 after 4): the order that counts is the numbers'.
    assert len({e["seq"] for e in events}) == len(events)  # every event has a number of its own
    by_seq = sorted(events, key=lambda e: e["seq"])
    assert by_seq[-1] is events[-1]  # the completion is the newest, and the page ends on it
    stages = [e["stage"] for e in by_seq if e["status"] == "Processing"]
    order = ["demux", "previews", "decode", "normalize", "filter", "encode", "mux", "chunk", "store"]
    assert [s for i, s in enumerate(stages) if i == 0 or s != stages[i - 1]] == order
    progress = [e["progress"] for e in by_seq]
    assert progress == sorted(progress) and progress[-1] == 100

    item.refresh_from_db()
    roles = _roles(item)
    (video,) = roles["video"]
    with default_storage.open(video.storage_key) as fh, av.open(fh) as container:
        codecs = sorted(s.codec_context.name for s in container.streams)
        assert codecs == ["libdav1d", "opus"] or codecs == ["av1", "opus"]
        assert "webm" in container.format.name
    assert video.width == 320 and video.height == 240 and abs(video.duration - 3) < 0.2
    assert roles["manifest"] and roles["segment"] and roles["thumbnail"]
    history = list(StatusEvent.objects.filter(item=item).values_list("status", flat=True))
    assert history[0] == "Pending" and history[-1] == "Completed"


def test_audio_becomes_opus_webm(celery_worker, make_item, tmp_path):
    item = make_item(lavfi_audio(tmp_path / "song.mp3", seconds=4))
    media_processing_start(item=item)
    wait_for(lambda: _finished(item), timeout=60, what="the audio to finish")
    assert item.status == "Completed", item.error_message
    (audio,) = _roles(item)["audio"]
    assert audio.content_type == "audio/webm" and audio.codec == "opus"
    with default_storage.open(audio.storage_key) as fh, av.open(fh) as container:
        assert [s.codec_context.name for s in container.streams] == ["opus"]
        assert container.streams[0].codec_context.sample_rate == 48000


def test_garbage_fails_at_once_with_a_readable_reason_and_the_worker_goes_on(celery_worker, make_item, tmp_path):
    garbage = tmp_path / "movie.mp4"
    garbage.write_bytes(b"<html><script>alert(1)</script></html>" * 100)
    bad = make_item(garbage)
    good = make_item(drawn_image(tmp_path / "ok.png", fmt="PNG"))
    media_processing_start(item=bad)
    media_processing_start(item=good)

    wait_for(lambda: _finished(bad) and _finished(good), timeout=60, what="both items")

    assert (bad.status, bad.error_code) == ("Failed", "invalid_input")
    assert bad.error_message == "The file is not a video, audio or image file we can read."
    assert bad.renditions.count() == 0
    assert good.status == "Completed"
    assert celery_worker.is_running()


def test_a_retryable_error_is_tried_three_times_then_fails(make_item, tmp_path, transactional_db, _worker_session):
    """A wall-clock limit far too small for the encode: each attempt times out (retryable)."""
    env_worker = Worker(RUN_DIR / "logs" / "worker-tiny-limit.log")
    item = make_item(lavfi_video(tmp_path / "clip.mp4", seconds=6, size="640x360"))
    os.environ["MEDIA_PROFILES"] = '{"limits": {"wall_seconds": 0.3}}'
    try:
        replace_workers([_worker_session], [env_worker])  # only the tiny-limit worker may take this item
    finally:
        del os.environ["MEDIA_PROFILES"]
    try:
        media_processing_start(item=item)
        wait_for(lambda: _finished(item), timeout=120, what="the item to fail")
    finally:
        replace_workers([env_worker], [_worker_session])

    assert (item.status, item.error_code) == ("Failed", "timeout")
    attempts = list(
        StatusEvent.objects.filter(item=item, stage=item.stage, status="Processing").values_list("attempt", flat=True)
    )
    assert attempts == [1, 2, 3]
    assert item.attempts == 3


def test_a_rerun_after_a_crash_resumes_without_redoing_the_encode(make_item, tmp_path, tmp_storage, settings):
    """Run the chain up to encode in-process, as if the worker died then; the rerun skips it."""
    from tasks.stages import STAGE_TASKS, build_chain

    settings.CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}
    item = make_item(lavfi_video(tmp_path / "clip.mp4", seconds=2))
    item.kind = "video"
    item.save()
    lifecycle.upload_finished(item_id=item.pk)
    lifecycle.queued(item_id=item.pk, send=False)  # this test runs the chain itself
    for stage in ("demux", "decode", "normalize", "filter", "encode"):
        STAGE_TASKS[stage].apply(args=[str(item.pk)]).get()
    item.refresh_from_db()
    first_encode_seconds = item.timings["encode"]
    assert item.status == "Processing" and item.stage == "encode"

    build_chain(item).apply().get()

    item.refresh_from_db()
    assert item.status == "Completed", item.error_message
    messages = list(StatusEvent.objects.filter(item=item).values_list("message", flat=True))
    for stage in ("demux", "decode", "normalize", "filter", "encode"):
        assert f"{stage} skipped: already done" in messages
    assert "mux skipped: already done" not in messages
    assert item.timings["encode"] == first_encode_seconds


def test_progress_moves_at_least_every_two_seconds_during_a_long_encode(celery_worker, make_item, tmp_path):
    import time

    item = make_item(lavfi_video(tmp_path / "long.mp4", seconds=12, size="960x540"))
    listener = GroupListener(item_group(item.pk))
    media_processing_start(item=item)

    received: list[tuple[float, dict]] = []
    try:
        while not received or received[-1][1]["status"] not in ("Completed", "Failed"):
            received.append((time.monotonic(), listener.next(120)["item"]))
    finally:
        listener.close()

    assert received[-1][1]["status"] == "Completed"
    encode = [(t, e["progress"]) for t, e in received if e["stage"] == "encode"]
    assert len(encode) >= 3, encode
    gaps = [b[0] - a[0] for a, b in itertools.pairwise(encode)]
    assert max(gaps) < 2.0, gaps
    assert [p for _, p in encode] == sorted(p for _, p in encode)
