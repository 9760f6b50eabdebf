"""Workers die; work must not be lost or done twice, and a poison file must not loop forever."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import pytest

from media_app.models import MediaItem, StatusEvent
from media_app.services import media_processing_start
from tests.conftest import Worker, wait_for
from tests.media import drawn_image, lavfi_video

pytestmark = [pytest.mark.worker, pytest.mark.postgres]


def _children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def _gone(pid: int) -> bool:
    """The process no longer runs (absent, or a zombie awaiting its reaper)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1].startswith("Z")
    except (FileNotFoundError, ProcessLookupError):
        return True


def _kill_encoding_child(worker: Worker) -> int | None:
    """SIGKILL the pool process whose ffmpeg is running, as the kernel's OOM killer would;
    return that ffmpeg's pid."""
    assert worker.proc is not None
    for pool_pid in _children(worker.proc.pid):
        for child in _children(pool_pid):
            try:
                cmdline = Path(f"/proc/{child}/cmdline").read_bytes().decode(errors="replace")
            except FileNotFoundError:
                continue
            if "ffmpeg" in cmdline:
                os.kill(pool_pid, signal.SIGKILL)
                return child
    return None


def _encoding(item: MediaItem, attempt: int) -> bool:
    item.refresh_from_db()
    return item.status == "Processing" and item.stage == "encode" and item.attempts == attempt


def _final(*items: MediaItem) -> bool:
    for item in items:
        item.refresh_from_db()
    return all(i.is_final for i in items)


def test_a_worker_killed_mid_encode_is_redelivered_and_completes_once(celery_worker, make_item, tmp_path):
    item = make_item(lavfi_video(tmp_path / "long.mp4", seconds=8, size="1280x720"))
    media_processing_start(item=item)
    wait_for(lambda: _encoding(item, 1), timeout=60, what="the encode to start")
    ffmpeg = wait_for(lambda: _kill_encoding_child(celery_worker), timeout=30, what="ffmpeg under a pool process")
    # ffmpeg dies with its parent (PR_SET_PDEATHSIG): no orphan keeps encoding.
    wait_for(lambda: _gone(ffmpeg), timeout=5, what="the orphaned ffmpeg to die")

    wait_for(lambda: _final(item), timeout=180, what="the item to finish")

    assert item.status == "Completed", item.error_message
    assert item.renditions.filter(role="video").count() == 1
    attempts = StatusEvent.objects.filter(item=item, stage="encode", status="Processing").values_list(
        "attempt", flat=True
    )
    assert list(attempts) == [1, 2]


def test_a_file_that_kills_its_worker_every_time_fails_after_three_attempts(celery_worker, make_item, tmp_path):
    poison = make_item(lavfi_video(tmp_path / "poison.mp4", seconds=8, size="1280x720"))
    media_processing_start(item=poison)
    for attempt in (1, 2, 3):
        wait_for(lambda a=attempt: _encoding(poison, a), timeout=90, what=f"encode attempt {attempt}")
        wait_for(lambda: _kill_encoding_child(celery_worker), timeout=30, what="ffmpeg under a pool process")
    bystander = make_item(drawn_image(tmp_path / "ok.jpg"))
    media_processing_start(item=bystander)

    wait_for(lambda: _final(poison, bystander), timeout=120, what="both items to finish")

    assert (poison.status, poison.error_code) == ("Failed", "internal")
    assert "failed repeatedly" in poison.error_message
    assert bystander.status == "Completed"
    assert celery_worker.is_running()
