"""Two worker "hosts" on this machine, each with a WORK_ROOT of its own (two machines share no
disk), sharing the database, the storage and Redis, as an operator who adds a worker machine
runs them. Work submitted through the HTTP API completes wherever each stage runs; a host
killed in the middle of an encode loses nothing."""

from __future__ import annotations

import contextlib
import json
import os
import signal
from pathlib import Path
from typing import Any

import av
import pytest
import requests
from django.core.files.storage import default_storage
from PIL import Image
from rest_framework.authtoken.models import Token

from media_app.models import FINAL_STATUSES, MediaItem
from tests.conftest import RUN_DIR, Worker, replace_workers, wait_for
from tests.media import drawn_image, lavfi_audio, lavfi_video

pytestmark = [pytest.mark.worker, pytest.mark.django_db(transaction=True)]


@pytest.fixture(scope="module")
def _two_hosts(_worker_session: Worker) -> Any:
    """Hosts a and b (one task at a time each, so chains interleave); the suite's own worker is
    stopped meanwhile, so every stage runs on one of the two. Started once for the module."""
    hosts = {}
    for name in ("a", "b"):
        work = RUN_DIR / f"host-{name}" / "work"
        work.mkdir(parents=True, exist_ok=True)
        hosts[name] = Worker(RUN_DIR / "logs" / f"host-{name}.log", env={"WORK_ROOT": str(work)}, concurrency=1)
    replace_workers([_worker_session], list(hosts.values()))
    yield hosts
    replace_workers(list(hosts.values()), [])


@pytest.fixture
def two_hosts(_two_hosts: dict[str, Worker]) -> dict[str, Worker]:
    """Both hosts running: one a test killed is started again here, before the next test that
    needs it."""
    for host in _two_hosts.values():
        if not host.is_running():
            host.start()
    return _two_hosts


def submit(server: Any, auth: dict[str, str], path: Path, content_type: str) -> str:
    data = path.read_bytes()
    created = requests.post(
        f"{server.url}/api/media/",
        json={"file_name": path.name, "size": len(data), "content_type": content_type},
        headers=auth,
    )
    assert created.status_code == 201, created.text
    body = created.json()
    assert requests.put(body["upload"]["url"], data=data).status_code == 200
    assert requests.post(body["upload"]["complete_url"], headers=auth).status_code == 202
    return str(body["id"])


def stage_hosts(hosts: dict[str, Worker]) -> dict[str, dict[str, str]]:
    """item -> stage -> the host whose log has that stage's "done" line."""
    ran: dict[str, dict[str, str]] = {}
    for name, host in hosts.items():
        for line in host.log.read_text(errors="replace").splitlines():
            start = line.find('{"item"')
            if start >= 0 and "tasks.stages" in line:
                entry = json.loads(line[start:])
                if entry.get("outcome") == "done":
                    ran.setdefault(entry["item"], {})[entry["stage"]] = name
    return ran


def one_set_of_outputs(item: MediaItem) -> None:
    """Every rendition's file is there, and storage holds no output that no rendition names."""
    keys = set(item.renditions.values_list("storage_key", flat=True))
    assert len(keys) == item.renditions.count()
    stored: set[str] = set()

    def walk(prefix: str) -> None:
        dirs, files = default_storage.listdir(prefix)
        stored.update(f"{prefix}/{f}" for f in files)
        for d in dirs:
            walk(f"{prefix}/{d}")

    walk(f"outputs/{item.pk}")
    assert stored == keys


def test_a_mix_completes_on_two_hosts_without_a_shared_disk(two_hosts, asgi_server, make_user, tmp_path):
    auth = {"Authorization": f"Token {Token.objects.get_or_create(user=make_user())[0].key}"}
    files = [
        (lavfi_video(tmp_path / "one.mp4", seconds=2), "video/mp4"),
        (lavfi_video(tmp_path / "two.mp4", seconds=2, size="352x288"), "video/mp4"),
        (lavfi_video(tmp_path / "three.mp4", seconds=2, rate=30), "video/mp4"),
        (drawn_image(tmp_path / "photo.jpg", size=(800, 600)), "image/jpeg"),
        (lavfi_audio(tmp_path / "song.mp3", seconds=3), "audio/mpeg"),
    ]
    ids = [submit(asgi_server, auth, path, ctype) for path, ctype in files]

    def finished() -> list[MediaItem]:
        items = list(MediaItem.objects.filter(pk__in=ids, status__in=FINAL_STATUSES))
        return items if len(items) == len(ids) else []

    items = {str(i.pk): i for i in wait_for(finished, timeout=300, what="every item to finish")}
    for item_id, (path, _) in zip(ids, files, strict=True):
        item = items[item_id]
        assert item.status == "Completed", (path.name, item.error_code, item.error_message, item.error_detail[-800:])
        one_set_of_outputs(item)
        main = item.renditions.filter(role={"image": "image_webp"}.get(item.kind, item.kind)).first()
        assert main is not None
        with default_storage.open(main.storage_key, "rb") as fh:
            if item.kind == "image":
                with Image.open(fh) as img:
                    assert img.size == (800, 600)
            else:
                with av.open(fh) as container:
                    assert container.streams.audio[0].codec_context.name == "opus"
                    if item.kind == "video":
                        stream = container.streams.video[0]
                        assert stream.codec_context.name in ("av1", "libdav1d", "libaom-av1")
                        assert sum(1 for _ in container.decode(stream)) >= 40
        # The work files are gone from storage once the item completed.
        assert not default_storage.exists(f"work/{item_id}/demux/done.json")

    ran = stage_hosts(two_hosts)
    hopped = [item for item, stages in ran.items() if item in ids and len(set(stages.values())) > 1]
    assert hopped, f"no chain moved between hosts: {ran}"


def test_a_host_killed_during_an_encode_loses_nothing(two_hosts, asgi_server, make_user, tmp_path, settings):
    from tasks.maintenance import watchdog_run

    settings.WATCHDOG_LOST_SECONDS = 2
    settings.WATCHDOG_STALL_SECONDS = 600
    auth = {"Authorization": f"Token {Token.objects.get_or_create(user=make_user())[0].key}"}
    item_id = submit(asgi_server, auth, lavfi_video(tmp_path / "long.mp4", seconds=12, size="640x360"), "video/mp4")

    def encoding_host() -> str | None:
        item = MediaItem.objects.get(pk=item_id)
        if item.status != "Processing" or item.stage != "encode":
            return None
        for name, host in two_hosts.items():
            # The pool process running the encode has an ffmpeg child (every pool process also has
            # a child that is the sandbox's fork server).
            for pid in host.pool_pids():
                children = Path(f"/proc/{pid}/task/{pid}/children")
                for child in children.read_text().split() if children.exists() else []:
                    with contextlib.suppress(FileNotFoundError):
                        if b"ffmpeg" in Path(f"/proc/{child}/cmdline").read_bytes():
                            return name
        return None

    victim = wait_for(encoding_host, timeout=180, what="the encode to start")
    os.killpg(two_hosts[victim].proc.pid, signal.SIGKILL)  # the whole host: worker, pool and ffmpeg
    two_hosts[victim].proc.wait(10)

    def recovered() -> MediaItem | None:
        watchdog_run(settle=0.5)  # as beat runs it, once a minute in production
        item = MediaItem.objects.get(pk=item_id)
        return item if item.is_final else None

    # A pass costs nothing until the item has been quiet for WATCHDOG_LOST_SECONDS: one a second.
    item = wait_for(recovered, timeout=300, what="the other host to finish the item", interval=1)
    assert item.status == "Completed", (item.error_code, item.error_message)
    one_set_of_outputs(item)
    survivor = "b" if victim == "a" else "a"
    assert stage_hosts(two_hosts)[item_id].get("encode") == survivor
    assert item.renditions.filter(role="video").count() == 1
