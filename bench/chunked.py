"""Split-and-stitch across hosts: a 2-minute 720p clip on one host pinned to one core, then on two
hosts pinned to one core each, side by side in one run.

Each "host" is the test suite's real Celery worker with a WORK_ROOT of its own (on /dev/shm, another
file system than the storage, so the write-through to storage is a real copy and its bytes count,
as an upload to S3 would), one task at a time, its whole process tree pinned with ``taskset`` to
its core, and SVT-AV1 held to one thread (``video.threads`` = 1: workers x threads = cores).

Rows: the whole-file encode on one host (today's path, the baseline), the chunked path on one host
(its overhead), the chunked path on two hosts (target: at most 0.6 of one host), the bytes moved
through storage per item, and whether the chunked output's frames are the whole-file encode's.
The per-chunk, fan-out and join times land in ``details.chunked`` for the scaling model.
"""

from __future__ import annotations

import json
import re
import shutil
import statistics
import subprocess
from pathlib import Path
from typing import Any

from bench import inputs, stack
from bench.harness import Report, Row, ffmpeg, ratio, run

SECONDS = 120
FPS = 25
CHUNK_SECONDS = 20
_LINE = re.compile(r"(\{\"item\".*\})\s*$")
_FETCHED = re.compile(r"(\{\"item\": \"[^\"]+\", \"stage\": \"[^\"]+\", \"fetched_bytes\": \d+\})")


def clip_720p() -> Path:
    """The video benchmark's photo pan with grain, two minutes long."""
    return inputs.video(720, seconds=SECONDS, fps=FPS)


def _pin(pid: int, core: int) -> None:
    """The process, its threads and its pool processes onto one core (ffmpeg children inherit it)."""
    pids = [pid, *map(int, subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split())]
    for p in pids:
        subprocess.run(["taskset", "-a", "-p", "-c", str(core), str(p)], check=True, capture_output=True)


def _hosts_run(run_dir: Path, owner: Any, src: Path, *, hosts: int, chunk_seconds: int, tag: str) -> dict[str, Any]:
    """One item through ``hosts`` pinned workers; its wall time, stage lines and bytes moved."""
    from tests.conftest import Worker

    profiles = {"video": {"chunk_seconds": chunk_seconds, "threads": 1}}
    workers = []
    roots = []
    try:
        for i in range(hosts):
            root = Path("/dev/shm") / f"cpc-bench-{run_dir.name}-{tag}-{i}"
            roots.append(root)
            # INFO: the stage lines (timings, bytes) are read back from the worker logs.
            env = {"WORK_ROOT": str(root), "MEDIA_PROFILES": json.dumps(profiles), "LOG_LEVEL": "INFO"}
            worker = Worker(run_dir / "logs" / f"chunk-{tag}-{i}.log", env=env, concurrency=1)
            worker.start()
            assert worker.proc is not None
            _pin(worker.proc.pid, i)
            workers.append(worker)
        done = stack.process(src, owner, timeout=1800)
    finally:
        for worker in workers:
            worker.stop()
        for root in roots:
            shutil.rmtree(root, ignore_errors=True)
    item_id = str(done.item.pk)
    lines: list[tuple[int, dict[str, Any]]] = []
    fetched = 0
    for i, worker in enumerate(workers):
        for raw in worker.log.read_text(errors="replace").splitlines():
            found = _LINE.search(raw)
            if found and "tasks.stages" in raw:
                entry = json.loads(found.group(1))
                if entry.get("item") == item_id:
                    lines.append((i, entry))
            got = _FETCHED.search(raw)
            if got and item_id in raw:
                fetched += json.loads(got.group(1))["fetched_bytes"]
    stored = sum(int(e.get("stored_bytes", 0) or 0) for _, e in lines)
    outputs = sum(r.bytes for r in done.item.renditions.all())
    return {
        "item": done.item,
        "seconds": done.seconds,
        "timings": done.stages,
        "lines": lines,
        "stored": stored,
        "fetched": fetched,
        "outputs": outputs,
        "moved": stored + fetched + outputs,
    }


def _framemd5(item: Any) -> list[str]:
    from django.core.files.storage import default_storage

    key = item.renditions.get(role="video").storage_key
    out = run([ffmpeg(), "-v", "error", "-i", default_storage.path(key), "-map", "0:v", "-f", "framemd5", "-"]).stdout
    return [line.rsplit(",", 1)[-1].strip() for line in out.splitlines() if line and not line.startswith("#")]


def chunked_section(report: Report, owner: Any, run_dir: Path) -> None:
    src = clip_720p()
    whole = _hosts_run(run_dir, owner, src, hosts=1, chunk_seconds=0, tag="whole")
    one = _hosts_run(run_dir, owner, src, hosts=1, chunk_seconds=CHUNK_SECONDS, tag="one")
    two = _hosts_run(run_dir, owner, src, hosts=2, chunk_seconds=CHUNK_SECONDS, tag="two")

    parts = [(h, e) for h, e in two["lines"] if e["stage"].startswith("encode.part")]
    per_host = {h: sum(1 for host, _ in parts if host == h) for h in (0, 1)}
    busy = {h: round(sum(e.get("seconds", 0.0) for host, e in two["lines"] if host == h), 1) for h in (0, 1)}
    chunk_secs = [e["seconds"] for _, e in one["lines"] if e["stage"].startswith("encode.part")]
    audio_secs = [e["seconds"] for _, e in one["lines"] if e["stage"] == "encode.audio"]
    join = [e for _, e in one["lines"] if e["stage"] == "encode.join"]
    same = _framemd5(whole["item"]) == _framemd5(two["item"])
    frames = len(_framemd5(two["item"]))

    note = f"{SECONDS} s 720p {FPS} fps, SVT-AV1 lp=1, one worker process per core"
    report.add(Row(f"chunked: {SECONDS} s 720p on 1 host (1 core), whole-file encode", whole["seconds"], "s",
                   None, None, "", None, "", 1, f"{note}; today's path, the baseline"))  # fmt: skip
    report.add(Row(f"  1 host (1 core), {CHUNK_SECONDS} s chunks", one["seconds"], "s", whole["seconds"],
                   ratio(one["seconds"], whole["seconds"]), "", None, "", 1,
                   f"single-host overhead of the chunked path; {len(chunk_secs)} chunks, "
                   f"median {statistics.median(chunk_secs):.1f} s each"))  # fmt: skip
    two_ratio = ratio(two["seconds"], whole["seconds"])
    report.add(Row(f"  2 hosts (1 core each), {CHUNK_SECONDS} s chunks", two["seconds"], "s", whole["seconds"],
                   two_ratio, "≤ 0.6 (ratio)", two_ratio is not None and two_ratio <= 0.6, "", 1,
                   f"chunks per host {per_host[0]}/{per_host[1]}, busy {busy[0]}/{busy[1]} s; vs 1 host chunked "
                   f"{two['seconds'] / one['seconds']:.2f}"))  # fmt: skip
    mb = 1e6
    source_mb = src.stat().st_size / mb
    report.add(Row("  bytes moved through storage per item, chunked on 2 hosts", two["moved"] / mb, "MB",
                   whole["moved"] / mb, ratio(two["moved"], whole["moved"]), "", None, "", 1,
                   f"written through {two['stored'] / mb:.1f} + fetched {two['fetched'] / mb:.1f} + outputs "
                   f"{two['outputs'] / mb:.1f}; baseline: whole-file, 1 host; source {source_mb:.1f} MB"))  # fmt: skip
    report.add(Row("  frames identical to the whole-file encode", 1.0 if same else 0.0, "bool", None, None,
                   "1 (ours)", same, "", frames, f"{frames} frames decoded (framemd5) from both"))  # fmt: skip
    report.extra["chunked"] = {
        "seconds": {"whole_1host": whole["seconds"], "chunked_1host": one["seconds"], "chunked_2hosts": two["seconds"]},
        "timings_whole": whole["timings"],
        "timings_chunked_1host": one["timings"],
        "timings_chunked_2hosts": two["timings"],
        "busy_seconds_per_host_2hosts": busy,
        "chunk_seconds_2hosts": [(h, e["stage"], e["seconds"]) for h, e in parts],
        "chunk_seconds_each": chunk_secs,
        "audio_seconds": audio_secs,
        "join_seconds": join[0]["seconds"] if join else None,
        "bytes": {
            k: {"stored": r["stored"], "fetched": r["fetched"], "outputs": r["outputs"]}
            for k, r in (("whole", whole), ("one", one), ("two", two))
        },
        "chunks_per_host": per_host,
    }
