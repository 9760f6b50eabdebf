"""Split-and-stitch across two worker hosts (issue 14): a 2-minute clip with ``chunk_seconds``
set low is encoded as chunk tasks that both hosts take, joined without re-encoding, and the
output is checked by decoding it: every frame once, in order, key frames on the segment grid,
sound as long as the picture."""

from __future__ import annotations

import itertools
import json
import os
import signal
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path
from typing import Any

import av
import pytest
from django.core.files.storage import default_storage
from rest_framework.authtoken.models import Token

from media_app.models import FINAL_STATUSES, MediaItem
from tests.conftest import RUN_DIR, Worker, replace_workers, wait_for
from tests.media import lavfi_video
from tests.tasks.test_two_hosts import one_set_of_outputs, submit

pytestmark = [pytest.mark.worker, pytest.mark.django_db(transaction=True)]

SECONDS, RATE, SEGMENT = 120, 25, 4.0
PROFILES = {"video": {"chunk_seconds": 20, "threads": 1}}


@pytest.fixture(scope="module")
def _chunking_hosts(_worker_session: Worker) -> Any:
    """Hosts a and b, each with a WORK_ROOT of its own, one task at a time, 20 s chunks (started
    once for the module)."""
    hosts = {}
    for name in ("a", "b"):
        work = RUN_DIR / f"chunk-host-{name}" / "work"
        work.mkdir(parents=True, exist_ok=True)
        env = {"WORK_ROOT": str(work), "MEDIA_PROFILES": json.dumps(PROFILES)}
        hosts[name] = Worker(RUN_DIR / "logs" / f"chunk-host-{name}.log", env=env, concurrency=1)
    replace_workers([_worker_session], list(hosts.values()))
    yield hosts
    replace_workers(list(hosts.values()), [])


@pytest.fixture
def chunking_hosts(_chunking_hosts: dict[str, Worker]) -> dict[str, Worker]:
    """Both hosts running: one a test killed is started again here, before the next test that
    needs it (not in the killing test, which may be the module's last)."""
    for host in _chunking_hosts.values():
        if not host.is_running():
            host.start()
    return _chunking_hosts


def done_lines(hosts: dict[str, Worker], item_id: str) -> list[tuple[str, dict[str, Any]]]:
    """(host, stage log line) for each stage or chunk of the item that a host finished."""
    found = []
    for name, host in hosts.items():
        for line in host.log.read_text(errors="replace").splitlines():
            start = line.find('{"item"')
            if start >= 0 and "tasks.stages" in line:
                entry = json.loads(line[start:])
                if entry["item"] == item_id and entry.get("outcome") == "done":
                    found.append((name, entry))
    return found


def test_a_long_video_is_encoded_in_chunks_on_both_hosts_and_joined_seamlessly(
    chunking_hosts, asgi_server, make_user, tmp_path
):
    auth = {"Authorization": f"Token {Token.objects.get_or_create(user=make_user())[0].key}"}
    src = lavfi_video(tmp_path / "long.mp4", seconds=SECONDS, size="320x180", rate=RATE)
    item_id = submit(asgi_server, auth, src, "video/mp4")

    seen: set[tuple[int, bool]] = set()  # (progress, time left known) while the chunks encode

    def finished() -> MediaItem | None:
        item = MediaItem.objects.get(pk=item_id)
        if item.status == "Processing" and item.stage == "encode":
            seen.add((item.progress, item.eta_seconds is not None))
        return item if item.status in FINAL_STATUSES else None

    item = wait_for(finished, timeout=300, what="the chunked item to finish", interval=0.05)
    assert item.status == "Completed", (item.error_code, item.error_message, item.error_detail[-800:])
    one_set_of_outputs(item)
    # Progress moved as chunks finished on either host, with a time left.
    assert len({p for p, _ in seen}) >= 3 and any(eta for _, eta in seen), sorted(seen)

    # Six chunks of 20 s (five GOPs of 4 s each) and the audio, each once, on both hosts.
    lines = done_lines(chunking_hosts, item_id)
    parts = Counter(entry["stage"] for _, entry in lines if entry["stage"].startswith("encode.part"))
    assert sorted(parts) == [f"encode.part{i:05d}" for i in range(6)] and set(parts.values()) == {1}
    assert sum(1 for _, entry in lines if entry["stage"] == "encode.audio") == 1
    # The storyboard is one more task of the fan-out, beside the chunks, not a pass before them.
    assert sum(1 for _, entry in lines if entry["stage"] == "encode.storyboard") == 1
    hosts = {host for host, entry in lines if entry["stage"].startswith("encode.part")}
    assert hosts == {"a", "b"}, f"chunks ran only on {hosts}"

    video = item.renditions.get(role="video")
    frames = RATE * SECONDS  # what the whole-file encode gives (tests/pipelines/test_chunked.py)
    vpk, apk = [], []  # (seconds, key frame, duration in seconds), read while the file is open
    with default_storage.open(video.storage_key, "rb") as fh, av.open(fh) as container:
        for p in container.demux(container.streams.video[0], container.streams.audio[0]):
            if p.pts is not None:
                entry = (float(p.pts * p.time_base), p.is_keyframe, float((p.duration or 0) * p.time_base))
                (vpk if p.stream.type == "video" else apk).append(entry)
    pts = [t for t, _, _ in vpk]
    assert len(vpk) == frames
    assert all(b > a for a, b in itertools.pairwise(pts)), "timestamps not strictly increasing"
    # Frame n at n / R: none missing or doubled at a join (WebM keeps milliseconds).
    assert max(abs(t - n / RATE) for n, t in enumerate(pts)) <= 0.001
    video_end = pts[-1] + 1 / RATE
    audio_end = apk[-1][0] + apk[-1][2]
    assert abs(video_end - SECONDS) <= 1 / RATE and abs(audio_end - video_end) <= 1 / RATE, (video_end, audio_end)
    gop = round(RATE * SEGMENT)
    assert [n for n, (_, key, _) in enumerate(vpk) if key] == list(range(0, frames, gop))

    # DASH: one video segment per 4 s, each starting on one of those key frames.
    manifest = item.renditions.get(role="manifest")
    with default_storage.open(manifest.storage_key, "rb") as fh:
        mpd = ET.parse(fh).getroot()
    ns = {"d": "urn:mpeg:dash:schema:mpd:2011"}
    video_set = next(a for a in mpd.iterfind(".//d:AdaptationSet", ns) if a.get("contentType") == "video")
    timeline = [(int(s.get("d")), int(s.get("r", 0)) + 1) for s in video_set.iterfind(".//d:S", ns)]
    scale = int(video_set.find(".//d:SegmentTemplate", ns).get("timescale"))
    assert sum(n for _, n in timeline) == SECONDS / SEGMENT
    assert all(d == SEGMENT * scale for d, _ in timeline)


def ffmpegs(host: Worker) -> list[int]:
    """ffmpeg processes under the host's pool processes."""
    found = []
    for pool in host.pool_pids():
        try:
            children = Path(f"/proc/{pool}/task/{pool}/children").read_text().split()
        except FileNotFoundError:
            continue
        for child in children:
            try:
                if "ffmpeg" in Path(f"/proc/{child}/cmdline").read_bytes().decode(errors="replace"):
                    found.append(int(child))
            except FileNotFoundError:
                continue
    return found


def test_a_cancel_stops_the_chunks_on_both_hosts_and_nothing_brings_the_item_back(
    chunking_hosts, asgi_server, make_user, tmp_path
):
    from config.celery import app
    from media_app.ops import media_cancel

    auth = {"Authorization": f"Token {Token.objects.get_or_create(user=make_user())[0].key}"}
    # 320x180, as the join test: the cancel comes as soon as both hosts encode a chunk; a larger
    # picture only made the source and the stages before the encode slower.
    src = lavfi_video(tmp_path / "long.mp4", seconds=SECONDS, size="320x180", rate=RATE)
    item_id = submit(asgi_server, auth, src, "video/mp4")

    def both_encoding() -> bool:
        item = MediaItem.objects.get(pk=item_id)
        assert item.status in ("Pending", "Processing"), (item.status, item.error_message)
        return item.stage == "encode" and all(ffmpegs(h) for h in chunking_hosts.values())

    wait_for(both_encoding, timeout=120, what="chunks encoding on both hosts")
    media_cancel(item_id=item_id)
    # The running chunks see the cancel at their next check (once a second) and kill their ffmpeg.
    wait_for(lambda: not any(ffmpegs(h) for h in chunking_hosts.values()), timeout=5, what="the chunks' ffmpeg to end")

    def idle() -> bool:
        if any(ffmpegs(h) for h in chunking_hosts.values()):
            return False
        with app.connection_for_read() as conn, conn.default_channel.conn_or_acquire() as client:
            if client.llen("video"):
                return False  # chunk tasks still queued: each must come and go
        active = app.control.inspect(timeout=1).active() or {}
        return not any(active.values())

    wait_for(idle, timeout=30, what="every chunk task to stop on both hosts", interval=0.5)
    item = MediaItem.objects.get(pk=item_id)
    assert (item.status, item.error_code) == ("Failed", "cancelled")
    lines = done_lines(chunking_hosts, item_id)
    assert not [entry for _, entry in lines if entry["stage"] in ("encode.join", "mux", "store")]
    assert sum(1 for _, entry in lines if entry["stage"].startswith("encode.part")) < 6  # stopped, not finished
    assert not default_storage.exists(f"work/{item_id}/encode/done.json")
    assert not item.renditions.filter(role="video").exists()


def test_a_host_killed_in_the_middle_of_a_chunk_loses_nothing(
    chunking_hosts, asgi_server, make_user, tmp_path, settings
):
    """SIGKILL one host's whole process group while both encode chunks: the other host finishes
    the item (the watchdog hands the lost chunk back; done chunks are not encoded again)."""
    from tasks.maintenance import watchdog_run

    settings.WATCHDOG_LOST_SECONDS = 2
    settings.WATCHDOG_STALL_SECONDS = 600
    auth = {"Authorization": f"Token {Token.objects.get_or_create(user=make_user())[0].key}"}
    src = lavfi_video(tmp_path / "minute.mp4", seconds=60, size="320x180", rate=RATE)  # 3 chunks
    item_id = submit(asgi_server, auth, src, "video/mp4")

    def both_encoding() -> bool:
        item = MediaItem.objects.get(pk=item_id)
        assert item.status in ("Pending", "Processing"), (item.status, item.error_message)
        return item.stage == "encode" and all(ffmpegs(h) for h in chunking_hosts.values())

    wait_for(both_encoding, timeout=120, what="chunks encoding on both hosts")
    victim = chunking_hosts["a"]
    os.killpg(victim.proc.pid, signal.SIGKILL)  # the whole host: worker, pool and ffmpeg
    victim.proc.wait(10)

    def recovered() -> MediaItem | None:
        watchdog_run(settle=0.5)  # as beat runs it, once a minute in production
        item = MediaItem.objects.get(pk=item_id)
        return item if item.is_final else None

    # A pass costs nothing while host b's progress keeps the item fresh (not a candidate before
    # WATCHDOG_LOST_SECONDS of quiet), so a pass every second, not every 2 s: the requeue and
    # the end are seen sooner.
    item = wait_for(recovered, timeout=300, what="host b to finish the item", interval=1)
    assert item.status == "Completed", (item.error_code, item.error_message)
    one_set_of_outputs(item)
    lines = done_lines(chunking_hosts, item_id)
    parts = Counter(entry["stage"] for _, entry in lines if entry["stage"].startswith("encode.part"))
    assert sorted(parts) == [f"encode.part{i:05d}" for i in range(3)] and set(parts.values()) == {1}
    with default_storage.open(item.renditions.get(role="video").storage_key, "rb") as fh, av.open(fh) as container:
        assert sum(1 for p in container.demux(container.streams.video[0]) if p.pts is not None) == RATE * 60
