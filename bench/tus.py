"""tus uploads on loopback: the real ASGI server against a bare tus server on the same uvicorn.

The client is what a real tus client does (tus-js-client, tuspy): each chunk is one PATCH body,
over one kept-alive connection, sent from the file with ``sendfile`` (no copy of it in the
client). The bench runs on the same 2 cores as the server: tuspy's ``requests`` opens a
connection per chunk and reads each chunk into a fresh buffer (about 4x the client's CPU), which
the figure should not carry. The baseline is the same client against ``bench.tus_bare`` (a plain
ASGI app that appends each body to a file and syncs it: no Django, database or lock), run
alternately with the real one so that both see the same load.
"""

from __future__ import annotations

import base64
import http.client
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from bench import stack
from bench.harness import REAL, Report, Row, TreeSampler, check, median, ratio, spread

MEMORY_GROWTH_MB = 64.0  # issue 5: the web process's memory stays flat (our bound: growth under 64 MB)
MB = 1 << 20
REPS = 3  # uploads per chunk size and server, alternating; the rows are medians


def padded_video(path: Path, size: int) -> Path:
    """A real MP4 grown to ``size`` bytes by a trailing ``free`` box (demuxers skip it)."""
    clip = (REAL / "cockatoo.mp4").read_bytes()
    pad = size - len(clip)
    block = os.urandom(4 * MB)
    with open(path, "wb") as fh:
        fh.write(clip)
        fh.write(pad.to_bytes(4, "big") + b"free")
        left = pad - 8
        while left:
            n = min(left, len(block))
            fh.write(block[:n])
            left -= n
    return path


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process (all its threads) so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def upload(create_url: str, headers: dict[str, str], path: Path, chunk: int) -> str:
    """A whole tus upload: create, then one PATCH per chunk sent with sendfile, on one connection.
    Returns the upload's id (the last part of its URL)."""
    url = urlsplit(create_url)
    size = path.stat().st_size
    conn = http.client.HTTPConnection(url.hostname or "127.0.0.1", url.port, timeout=60)
    tus = {**headers, "Tus-Resumable": "1.0.0"}
    try:
        conn.request("POST", url.path, headers={**tus, "Upload-Length": str(size), "Upload-Metadata": metadata(path)})
        answer = conn.getresponse()
        answer.read()
        if answer.status != 201:
            raise AssertionError(f"tus create answered {answer.status}")
        target = urlsplit(answer.getheader("Location", "")).path
        offset = 0
        with open(path, "rb") as fh:
            while offset < size:
                n = min(chunk, size - offset)
                conn.putrequest("PATCH", target, skip_accept_encoding=True)
                for k, v in {**tus, "Upload-Offset": str(offset), "Content-Length": str(n),
                             "Content-Type": "application/offset+octet-stream"}.items():  # fmt: skip
                    conn.putheader(k, v)
                conn.endheaders()
                conn.sock.sendfile(fh, offset, n)  # os.sendfile, with the socket's timeout
                answer = conn.getresponse()
                answer.read()
                if answer.status != 204:
                    raise AssertionError(f"tus PATCH at {offset} answered {answer.status}")
                offset = int(answer.getheader("Upload-Offset", "-1"))
    finally:
        conn.close()
    return target.rstrip("/").rsplit("/", 1)[-1]


def metadata(path: Path) -> str:
    meta = {"filename": path.name, "filetype": "video/mp4"}
    return ",".join(f"{k} {base64.b64encode(v.encode()).decode('ascii')}" for k, v in meta.items())


class BareServer:
    """``bench.tus_bare`` on uvicorn, with the real server's defaults (uvloop, httptools)."""

    def __init__(self, directory: Path) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        directory.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "bench.tus_bare:app", "--host", "127.0.0.1", "--port", str(port),
             "--no-access-log", "--log-level", "warning"],
            env={**os.environ, "TUS_BARE_DIR": str(directory)}, start_new_session=True,
        )  # fmt: skip
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"{self.url}/healthz", timeout=1)
                return
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise AssertionError("the bare tus server did not start") from None
                time.sleep(0.05)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(30)


def tus_section(report: Report, server: Any, *, size_mb: int) -> None:
    from django.conf import settings
    from django.core.files.storage import default_storage
    from rest_framework.authtoken.models import Token

    from media_app.models import MediaItem

    def forget(item_id: str) -> None:
        """The finished upload's file goes (the worker is stopped; 6 uploads of 1 GB add up)."""
        default_storage.delete(MediaItem.objects.get(pk=item_id).source_key)

    owner = stack.user("bench-tus")
    auth = {"Authorization": f"Token {Token.objects.get_or_create(user=owner)[0].key}"}
    work = Path(tempfile.mkdtemp(prefix="bench-tus-", dir=settings.DATA_DIR))
    bare = BareServer(work / "bare")
    try:
        big = padded_video(work / "big.mp4", size_mb * MB)
        # The disk's own rate: the same bytes copied and synced, the ceiling of anything landing there.
        started = time.perf_counter()
        shutil.copyfile(big, work / "copy.mp4")
        with open(work / "copy.mp4", "rb") as fh:
            os.fsync(fh.fileno())
        copy_rate = size_mb / (time.perf_counter() - started)
        (work / "copy.mp4").unlink()

        web_url, bare_url = f"{server.url}/api/tus/", f"{bare.url}/files/"
        # A fresh web process imports what the upload path imports lazily (boto3 through
        # django-storages, the sniffer) on its first PATCH: about a second, once per process, not
        # a rate. A small upload first keeps it out of the figure.
        warm = padded_video(work / "warm.mp4", 2 * MB)
        upload(web_url, auth, warm, MB)
        upload(bare_url, {}, warm, MB)
        start_mb = TreeSampler(server.proc.pid).sample()[0]
        peak_mb = start_mb
        for chunk in sorted({settings.UPLOAD_PAGE_CHUNK_BYTES, 16 * MB}):
            rates: list[float] = []
            bare_rates: list[float] = []
            cpus: list[float] = []
            for _ in range(REPS):
                cpu_before = cpu_seconds(server.proc.pid)
                with TreeSampler(server.proc.pid, interval=0.02) as memory:
                    started = time.perf_counter()
                    item_id = upload(web_url, auth, big, chunk)
                    rates.append(size_mb / (time.perf_counter() - started))
                cpus.append(cpu_seconds(server.proc.pid) - cpu_before)
                forget(item_id)
                peak_mb = max(peak_mb, memory.peak.processes_mb)
                started = time.perf_counter()
                upload(bare_url, {}, big, chunk)
                bare_rates.append(size_mb / (time.perf_counter() - started))
            rate, bare_rate, cpu = median(rates), median(bare_rates), median(cpus)
            report.add(
                Row(f"tus upload {size_mb} MB on loopback ({chunk // MB} MB chunks)", rate, "MB/s", bare_rate,
                    ratio(rate, bare_rate), "", None, spread(rates, "{:.0f}"), REPS,
                    f"baseline: the same client against a bare ASGI app on the same uvicorn "
                    f"({spread(bare_rates, '{:.0f}')}); the disk copies at {copy_rate:.0f} MB/s; web CPU {cpu:.2f} s "
                    f"({size_mb / max(cpu, 1e-3):.0f} MB per web CPU-second: load bends it less than MB/s)")
            )  # fmt: skip
        growth = peak_mb - start_mb
        report.add(
            Row(f"web process peak RSS during the {size_mb} MB uploads", peak_mb, "MB", start_mb,
                ratio(peak_mb, start_mb), f"growth < {MEMORY_GROWTH_MB:g} MB", check(growth, "<", MEMORY_GROWTH_MB),
                f"+{growth:.0f} MB", 1, "baseline: RSS before the uploads (after a warm-up upload)")
        )  # fmt: skip
    finally:
        bare.stop()
        shutil.rmtree(work, ignore_errors=True)
