"""tus against the live ASGI server (uvicorn) with the reference Python client, tuspy.

The end-to-end test checks the bytes in storage as soon as the upload finishes, and only then
asks for the real Celery worker and waits for ``Completed``.
"""

from __future__ import annotations

import hashlib
import os
import socket
import threading
import time
from pathlib import Path
from urllib.parse import urlparse

import pytest
import requests
from django.core.files.storage import default_storage
from rest_framework.authtoken.models import Token
from tusclient.client import TusClient

from media_app.models import FINAL_STATUSES, MediaItem
from tests.conftest import wait_for

pytest_plugins = ["tests.media_app.test_api_support"]
pytestmark = pytest.mark.django_db(transaction=True)

MB = 1 << 20


def padded_video(clip: Path, path: Path, size: int) -> Path:
    """A real MP4 grown to ``size`` bytes by a trailing top-level ``free`` box of random bytes:
    still a valid file every demuxer reads (they skip ``free``), and every byte is checkable."""
    data = clip.read_bytes()
    pad = size - len(data)
    with open(path, "wb") as fh:
        fh.write(data)
        fh.write(pad.to_bytes(4, "big") + b"free")
        left = pad - 8
        while left:
            n = min(left, 4 * MB)
            fh.write(os.urandom(n))
            left -= n
    return path


def sha256_of(fh) -> str:
    digest = hashlib.sha256()
    for chunk in iter(lambda: fh.read(MB), b""):
        digest.update(chunk)
    return digest.hexdigest()


def token_for(user) -> str:
    return Token.objects.get_or_create(user=user)[0].key


def dropped_patch(url: str, key: str, offset: int, chunk: bytes, send: int) -> None:
    """A PATCH whose connection dies after ``send`` of its bytes, as on a network failure."""
    target = urlparse(url)
    head = (
        f"PATCH {target.path} HTTP/1.1\r\nHost: {target.netloc}\r\nAuthorization: Token {key}\r\n"
        f"Tus-Resumable: 1.0.0\r\nUpload-Offset: {offset}\r\nContent-Type: application/offset+octet-stream\r\n"
        f"Content-Length: {len(chunk)}\r\n\r\n"
    )
    with socket.create_connection((target.hostname, target.port)) as sock:
        sock.sendall(head.encode() + chunk[:send])


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


class PeakMemory:
    """Samples a process's resident memory in a thread; ``peak`` is the highest seen."""

    def __init__(self, pid: int) -> None:
        self.pid, self.start, self.peak = pid, rss_mb(pid), 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_mb(self.pid))
            self._stop.wait(0.02)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


@pytest.fixture(scope="module")
def video_50mb(clip: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return padded_video(clip, tmp_path_factory.mktemp("big") / "big.mp4", 50 * MB)


def test_tuspy_upload_interrupted_after_20mb_resumes_byte_identical_and_completes(
    asgi_server, make_user, video_50mb, request
):
    key = token_for(make_user())
    client = TusClient(f"{asgi_server.url}/api/tus/", headers={"Authorization": f"Token {key}"})
    first = client.uploader(
        file_path=str(video_50mb), chunk_size=5 * MB, metadata={"filename": "big.mp4", "filetype": "video/mp4"}
    )
    first.upload(stop_at=20 * MB)
    assert first.offset == 20 * MB
    item_id = first.url.rsplit("/", 1)[1]

    # The next chunk is cut off after 2 MB: the server keeps only whole, acknowledged chunks.
    with open(video_50mb, "rb") as fh:
        fh.seek(20 * MB)
        dropped_patch(first.url, key, 20 * MB, fh.read(5 * MB), send=2 * MB)

    # A new client (as after a restart) asks the server where to go on.
    resumed = client.uploader(file_path=str(video_50mb), url=first.url, chunk_size=5 * MB)
    assert resumed.offset == 20 * MB
    resumed.upload()

    item = MediaItem.objects.get(pk=item_id)
    assert item.task_id, "the last chunk should have completed the upload"
    with default_storage.open(item.source_key, "rb") as stored, open(video_50mb, "rb") as original:
        assert sha256_of(stored) == sha256_of(original)

    request.getfixturevalue("celery_worker")
    final = wait_for(
        lambda: MediaItem.objects.filter(pk=item_id, status__in=FINAL_STATUSES).first(),
        timeout=240,
        what="the uploaded video to finish processing",
    )
    assert final.status == "Completed", (final.error_code, final.error_message)


def test_concurrent_patches_to_one_upload_are_refused_not_interleaved(asgi_server, make_user, clip):
    key = token_for(make_user())
    data = clip.read_bytes()
    headers = {"Authorization": f"Token {key}", "Tus-Resumable": "1.0.0"}
    created = requests.post(f"{asgi_server.url}/api/tus/", headers={**headers, "Upload-Length": str(len(data))})
    url = created.headers["Location"]
    half = len(data) // 2
    barrier = threading.Barrier(2)
    statuses: list[int] = []

    def patch() -> None:
        barrier.wait()
        response = requests.patch(
            url,
            data=data[:half],
            headers={**headers, "Upload-Offset": "0", "Content-Type": "application/offset+octet-stream"},
        )
        statuses.append(response.status_code)

    threads = [threading.Thread(target=patch) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(statuses) in ([204, 409], [204, 423])
    assert int(requests.head(url, headers=headers).headers["Upload-Offset"]) == half
    with default_storage.open(f"uploads/{url.rsplit('/', 1)[1]}/source") as stored:
        assert stored.read() == data[:half]


def test_web_process_memory_stays_flat_during_a_large_chunked_upload(asgi_server, make_user, clip, tmp_path):
    """192 MB through tus in 8 MB chunks: the web process's memory grows by a few chunks, not the file."""
    big = padded_video(clip, tmp_path / "big.mp4", 192 * MB)
    key = token_for(make_user())
    client = TusClient(f"{asgi_server.url}/api/tus/", headers={"Authorization": f"Token {key}"})
    uploader = client.uploader(file_path=str(big), chunk_size=8 * MB, metadata={"filename": "big.mp4"})
    started = time.monotonic()
    with PeakMemory(asgi_server.proc.pid) as memory:
        uploader.upload()
    seconds = time.monotonic() - started
    growth = memory.peak - memory.start
    print(f"tus 192 MB in {seconds:.1f} s ({192 / seconds:.0f} MB/s); web RSS +{growth:.0f} MB")
    assert growth < 64, f"the web process grew by {growth:.0f} MB while receiving 192 MB in 8 MB chunks"


def test_web_process_memory_stays_flat_during_one_large_put(asgi_server, make_user, clip, tmp_path):
    big = padded_video(clip, tmp_path / "big.mp4", 192 * MB)
    key = token_for(make_user())
    headers = {"Authorization": f"Token {key}"}
    created = requests.post(
        f"{asgi_server.url}/api/media/", json={"file_name": "big.mp4", "size": 192 * MB}, headers=headers
    ).json()
    with PeakMemory(asgi_server.proc.pid) as memory, open(big, "rb") as fh:
        assert requests.put(created["upload"]["url"], data=fh).status_code == 200
    growth = memory.peak - memory.start
    assert growth < 64, f"the web process grew by {growth:.0f} MB while receiving one 192 MB PUT"
