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
        chunk = settings.UPLOAD_PAGE_CHUNK_BYTES
        uploader = client.uploader(
            file_path=str(big), chunk_size=chunk, metadata={"filename": "big.mp4", "filetype": "video/mp4"}
        )
        with TreeSampler(server.proc.pid, interval=0.02) as memory:
            started = time.perf_counter()
            uploader.upload()
            seconds = time.perf_counter() - started
        rate = size_mb / seconds
        report.add(
            Row(f"tus upload {size_mb} MB on loopback ({chunk // MB} MB chunks)", rate, "MB/s", copy_rate,
                ratio(rate, copy_rate), "", None, "", 1, "baseline: copying the file on the same disk")
        )  # fmt: skip
        growth = memory.peak.processes_mb - memory.peak.start_mb
        report.add(
            Row(f"web process peak RSS during the {size_mb} MB upload", memory.peak.processes_mb, "MB",
                memory.peak.start_mb, ratio(memory.peak.processes_mb, memory.peak.start_mb),
                f"growth < {MEMORY_GROWTH_MB:g} MB", check(growth, "<", MEMORY_GROWTH_MB), f"+{growth:.0f} MB", 1,
                "baseline: RSS before the upload")
        )  # fmt: skip
    finally:
        shutil.rmtree(work, ignore_errors=True)
