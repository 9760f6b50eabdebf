"""A video's storyboard is made beside its encode (issue 17), not before it in the previews stage:
it decodes the whole video, and in the previews stage all of that time came before the encode
started. The stages run in-process here (no worker), each through its task, as a worker runs them.

What a user sees: the thumbnail at once, a storyboard whose tiles are the video's frames, one of
each output at the end; an item whose previews stage made the storyboard (the version before),
or whose encode left none, still gets exactly one; a cancel during the encode stops both."""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
from pathlib import Path
from typing import Any

import pytest
from django.core.files.storage import default_storage
from django.db import connection
from PIL import Image

from media_app import jobs, lifecycle
from media_app.models import MediaItem
from pipelines import av
from tasks import bindings, workspace
from tests.conftest import wait_for
from tests.media import lavfi_video
from tests.pipelines.test_storyboard import _cues, _ssim

pytestmark = pytest.mark.django_db(transaction=True)

BEFORE_ENCODE = ("demux", "previews", "decode", "normalize", "filter")
AFTER_ENCODE = ("mux", "chunk", "store")


@pytest.fixture
def video(make_item, tmp_path, tmp_storage, settings, monkeypatch) -> Any:
    """``video(seconds, size)``: a queued video item whose stage tasks the test runs itself."""
    settings.CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}
    monkeypatch.setattr(jobs, "revoke", lambda task_ids: None)

    def make(seconds: float = 8, size: str = "320x240") -> tuple[MediaItem, Path]:
        src = lavfi_video(tmp_path / "clip.mp4", seconds=seconds, size=size)
        item = make_item(src)
        MediaItem.objects.filter(pk=item.pk).update(kind="video")
        lifecycle.upload_finished(item_id=item.pk)
        lifecycle.queued(item_id=item.pk, send=False)
        item.refresh_from_db()
        return item, src

    return make


def _run(item: MediaItem, stages: tuple[str, ...]) -> None:
    from tasks.stages import STAGE_TASKS

    for stage in stages:
        STAGE_TASKS[stage].apply(args=[str(item.pk)]).get()


def _finish(item: MediaItem) -> None:
    """The stages after the encode (each skipped if done), then the completion."""
    from tasks.stages import finish

    _run(item, AFTER_ENCODE)
    finish.apply(args=[str(item.pk)]).get()
    item.refresh_from_db()
    assert item.status == "Completed", (item.error_code, item.error_message)


class FfmpegChildren(threading.Thread):
    """Samples this process's ffmpeg children (of any thread) every few milliseconds, keeping each
    sample's command lines: what ran at the same time."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.samples: list[list[str]] = []
        self.done = threading.Event()

    @staticmethod
    def now() -> list[str]:
        found = []
        for tid in os.listdir(f"/proc/{os.getpid()}/task"):
            try:
                children = Path(f"/proc/{os.getpid()}/task/{tid}/children").read_text().split()
            except FileNotFoundError:
                continue
            for pid in children:
                try:
                    cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                except FileNotFoundError:
                    continue
                if "ffmpeg" in cmd.split(" ", 1)[0]:
                    found.append(cmd)
        return found

    def run(self) -> None:
        while True:
            self.samples.append(self.now())
            if self.done.wait(0.005):  # a sample every 5 ms until the test has what it watched
                return


def _is_storyboard(cmd: str) -> bool:
    return "libwebp" in cmd and "[sheet]" in cmd


def _is_encode(cmd: str) -> bool:
    return "libsvtav1" in cmd


def _check_storyboard(item: MediaItem, src: Path, tmp_path: Path) -> None:
    """One sheet and one index, each recorded once; the cues cover the video and their tiles are
    its frames."""
    roles = sorted(item.renditions.exclude(role="segment").values_list("role", flat=True))
    assert roles == ["manifest", "storyboard", "storyboard_vtt", "thumbnail", "video"], roles
    sheet_rendition = item.renditions.get(role="storyboard")
    sheet = tmp_path / "sheet.webp"
    with default_storage.open(sheet_rendition.storage_key, "rb") as fh:
        sheet.write_bytes(fh.read())
    with Image.open(sheet) as img:
        assert img.format == "WEBP" and img.size == (sheet_rendition.width, sheet_rendition.height)
    with default_storage.open(item.renditions.get(role="storyboard_vtt").storage_key, "rb") as fh:
        cues = _cues(fh.read().decode())
    assert cues[0][0] == 0 and abs(cues[-1][1] - 8) < 0.5, (cues[0], cues[-1])
    for start, _end, box in (cues[0], cues[len(cues) // 2]):
        assert _ssim(sheet, box, src, start) >= 0.8


def test_the_storyboard_is_made_while_the_encode_runs_and_stored_once(video, tmp_path):
    item, src = video()
    _run(item, BEFORE_ENCODE)
    # The previews stage is the thumbnail alone now: the page shows it while the rest works.
    shown = workspace.load_result(item.pk, "previews", av.PreviewResult)
    assert [out.role for out in shown.outputs] == ["thumbnail"]
    assert not workspace.stage_done(item.pk, bindings.STORYBOARD_STAGE)

    watcher = FfmpegChildren()
    watcher.start()
    try:
        _run(item, ("encode",))
    finally:
        watcher.done.set()
        watcher.join()
    # Both ffmpegs ran at once: the storyboard's decode beside the encoder, not after it.
    assert any(any(map(_is_storyboard, sample)) and any(map(_is_encode, sample)) for sample in watcher.samples), [
        sample for sample in watcher.samples if sample
    ][:: max(len(watcher.samples) // 20, 1)]
    assert workspace.stage_done(item.pk, bindings.STORYBOARD_STAGE)
    assert not FfmpegChildren.now()  # the encode task returned with nothing of its own running

    _finish(item)
    _check_storyboard(item, src, tmp_path)


def test_a_host_that_lacks_the_demuxed_streams_fetches_them_once_for_the_encode_and_its_storyboard(video, caplog):
    """The encode runs on a host that did not run the demux (its cache is empty): the encode and
    the storyboard beside it both read the demuxed streams, which may be the whole upload; they
    come from storage once, not once per thread."""
    item, _src = video(seconds=8, size="1280x720")
    _run(item, BEFORE_ENCODE)
    workspace.clear(item.pk)  # this host's cache of the item's stages: another host's disk
    caplog.set_level(logging.INFO, logger="tasks.workspace")

    _run(item, ("encode",))

    fetched = [json.loads(r.getMessage()) for r in caplog.records if r.name == "tasks.workspace"]
    demux = [line for line in fetched if line["stage"] == "demux"]
    assert len(demux) == 1 and demux[0]["fetched_bytes"] > 1_000_000, demux
    assert workspace.stage_done(item.pk, bindings.STORYBOARD_STAGE)


def _forget(item: MediaItem, stage: str) -> None:
    """Drop a stage's files from storage and this host's cache."""
    shutil.rmtree(workspace.stage_dir(item.pk, stage), ignore_errors=True)
    root = Path(default_storage.path(workspace.stored_prefix(item.pk, stage)))
    shutil.rmtree(root)


def test_an_encode_that_left_no_storyboard_gets_it_from_the_store(video, tmp_path):
    """The storyboard's thread failed, or its files were lost: the store makes it."""
    item, src = video()
    _run(item, (*BEFORE_ENCODE, "encode"))
    _forget(item, bindings.STORYBOARD_STAGE)
    assert not workspace.stage_done(item.pk, bindings.STORYBOARD_STAGE)

    _finish(item)
    _check_storyboard(item, src, tmp_path)


def test_an_item_whose_previews_stage_made_the_storyboard_records_it_once(video, tmp_path):
    """An item that was past its previews stage when the worker was upgraded: the storyboard is in
    the previews stage's result, as the version before left it, and is recorded from there."""
    item, src = video()
    _run(item, (*BEFORE_ENCODE, "encode"))
    previews = workspace.load_result(item.pk, "previews", av.PreviewResult)
    board = workspace.load_result(item.pk, bindings.STORYBOARD_STAGE, av.PreviewResult)
    # The previews stage as the version before committed it: the thumbnail and the storyboard.
    tmp = workspace.new_tmp_dir(item.pk, "previews")
    for stage, result in (("previews", previews), (bindings.STORYBOARD_STAGE, board)):
        for out in result.outputs:
            shutil.copy(workspace.stage_dir(item.pk, stage) / out.file, tmp / out.file)
    _forget(item, "previews")
    _forget(item, bindings.STORYBOARD_STAGE)
    old = av.PreviewResult(outputs=(*previews.outputs, *board.outputs), at=previews.at)
    workspace.commit_stage(item.pk, "previews", tmp, old)

    _run(item, AFTER_ENCODE)
    assert not workspace.stage_done(item.pk, bindings.STORYBOARD_STAGE)  # not made a second time
    _finish(item)
    _check_storyboard(item, src, tmp_path)


def test_a_cancel_during_the_encode_stops_the_storyboard_too(video, tmp_path):
    """The encode sees the cancel at its next check and stops; so does the storyboard beside it,
    which would have taken longer than that to finish."""
    item, _src = video(seconds=40, size="1280x720")
    _run(item, BEFORE_ENCODE)
    errors: list[BaseException] = []

    def encode() -> None:
        try:
            _run(item, ("encode",))
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            errors.append(exc)
        finally:
            connection.close()

    task = threading.Thread(target=encode)
    task.start()
    try:
        wait_for(lambda: any(map(_is_storyboard, FfmpegChildren.now())), timeout=60, what="the storyboard's ffmpeg",
                 interval=0.01)  # fmt: skip
        assert lifecycle.cancelled(item_id=item.pk, message="Cancelled by an administrator.")
        # The encode checks once a second; the storyboard stops with it.
        wait_for(lambda: not FfmpegChildren.now(), timeout=10, what="both ffmpegs to stop")
    finally:
        task.join(timeout=60)
    assert not task.is_alive()
    item.refresh_from_db()
    assert (item.status, item.error_code) == ("Failed", "cancelled")
    assert not workspace.stage_done(item.pk, bindings.STORYBOARD_STAGE)
    assert not workspace.stage_done(item.pk, "encode")


def test_a_cancel_after_the_encode_ended_stops_the_storyboard_it_waits_for(video):
    """The encode task does not return while its storyboard runs; if the encode ended first, a
    cancel arriving meanwhile is still seen (by the task's thread, which polls the item) and stops
    the storyboard, instead of the task waiting for a sheet nobody will see."""
    from tasks.stages import StageContext, _Beside

    item, _src = video(seconds=40, size="1280x720")
    _run(item, BEFORE_ENCODE)
    beside = _Beside(item)  # as the encode task starts it; here the encode has already ended
    wait_for(lambda: any(map(_is_storyboard, FfmpegChildren.now())), timeout=60, what="the storyboard's ffmpeg",
             interval=0.01)  # fmt: skip
    assert lifecycle.cancelled(item_id=item.pk, message="Cancelled by an administrator.")
    ctx = StageContext(item, "encode", workspace.item_dir(item.pk), (0.0, 0.0))
    waiter = threading.Thread(target=beside.wait, args=(ctx.cancelled,))
    waiter.start()
    waiter.join(timeout=10)
    beside.stop.set()  # a failing test leaves no ffmpeg behind
    beside.thread.join()
    assert not waiter.is_alive(), "the encode task still waited for its storyboard after the cancel"
    assert not FfmpegChildren.now()
    assert not workspace.stage_done(item.pk, bindings.STORYBOARD_STAGE)
