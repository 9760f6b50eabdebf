"""tus uploads on loopback: the real ASGI server against a copy of the same bytes on the same disk."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import stack
from bench.harness import REAL, Report, Row, TreeSampler, check, ratio

MEMORY_GROWTH_MB = 64.0  # issue 5: the web process's memory stays flat (our bound: growth under 64 MB)
MB = 1 << 20


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


def tus_section(report: Report, server: Any, *, size_mb: int) -> None:
    from django.conf import settings
    from rest_framework.authtoken.models import Token
    from tusclient.client import TusClient

    owner = stack.user("bench-tus")
    key = Token.objects.get_or_create(user=owner)[0].key
    work = Path(tempfile.mkdtemp(prefix="bench-tus-", dir=settings.DATA_DIR))
    try:
        big = padded_video(work / "big.mp4", size_mb * MB)
        # Baseline: the same bytes copied on the same disk, the ceiling of any upload that lands there.
        started = time.perf_counter()
        shutil.copyfile(big, work / "copy.mp4")
        with open(work / "copy.mp4", "rb") as fh:
            os.fsync(fh.fileno())
        copy_rate = size_mb / (time.perf_counter() - started)
        (work / "copy.mp4").unlink()

        client = TusClient(f"{server.url}/api/tus/", headers={"Authorization": f"Token {key}"})

        def upload(path: Path, chunk: int) -> None:
            meta = {"filename": path.name, "filetype": "video/mp4"}
            client.uploader(file_path=str(path), chunk_size=chunk, metadata=meta).upload()

        # A fresh web process imports what the upload path imports lazily (boto3 through
        # django-storages, the sniffer) on its first PATCH: about a second, once per process, not
        # a rate. A small upload first keeps it out of the figure.
        upload(padded_video(work / "warm.mp4", 2 * MB), MB)
        start_mb = TreeSampler(server.proc.pid).sample()[0]
        peak_mb = start_mb
        for chunk in sorted({settings.UPLOAD_PAGE_CHUNK_BYTES, 16 * MB}):
            cpu_before = cpu_seconds(server.proc.pid)
            with TreeSampler(server.proc.pid, interval=0.02) as memory:
                started = time.perf_counter()
                upload(big, chunk)
                seconds = time.perf_counter() - started
            cpu = cpu_seconds(server.proc.pid) - cpu_before
            peak_mb = max(peak_mb, memory.peak.processes_mb)
            rate = size_mb / seconds
            report.add(
                Row(f"tus upload {size_mb} MB on loopback ({chunk // MB} MB chunks)", rate, "MB/s", copy_rate,
                    ratio(rate, copy_rate), "", None, "", 1,
                    f"baseline: copying the file on the same disk; web CPU {cpu:.2f} s "
                    f"({size_mb / max(cpu, 1e-3):.0f} MB per web CPU-second: load bends it less than MB/s)")
            )  # fmt: skip
        growth = peak_mb - start_mb
        report.add(
            Row(f"web process peak RSS during the {size_mb} MB uploads", peak_mb, "MB", start_mb,
                ratio(peak_mb, start_mb), f"growth < {MEMORY_GROWTH_MB:g} MB", check(growth, "<", MEMORY_GROWTH_MB),
                f"+{growth:.0f} MB", 1, "baseline: RSS before the uploads (after a warm-up upload)")
        )  # fmt: skip
    finally:
        shutil.rmtree(work, ignore_errors=True)
