"""Where the worker's Python time goes: py-spy samples the worker and its pool while a section runs.

``bench.run --profile`` wraps the worker sections in ``WorkerProfile``; the summary sorts every
on-CPU sample of the worker's processes into buckets (media work, status saves and broadcasts,
stage bookkeeping, type detection, Celery's own machinery) and lists the functions of our code
that hold the most samples. ffmpeg runs in its own processes and is not sampled: for video and
audio its share is the ``MediaItem.timings`` of the encode stages.
"""

from __future__ import annotations

import collections
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from types import TracebackType

# First match wins, scanning a stack from its root: the outermost frame decides the bucket.
# A needle is (function name, file path suffix); "" matches anything.
BUCKETS: tuple[tuple[str, tuple[tuple[str, str], ...]], ...] = (
    # Encoder threads (images) have stacks of their own that start in pipelines/, not in bindings.
    ("media work (pipelines)", (("run", "tasks/bindings.py"), ("", "pipelines/"))),
    # Every write of an item's state goes through media_app/lifecycle.py; its broadcasts leave
    # from the channel layer's sender thread (media_app/channel_layers.py, channels_redis), or
    # through async_to_sync where the layer has no sender.
    (
        "status saves + broadcasts",
        (
            ("", "media_app/lifecycle.py"),
            ("", "media_app/channel_layers.py"),
            ("", "media_app/selectors.py"),
            ("", "channels_redis/"),
            ("", "asgiref/"),
            ("", "asyncio/runners.py"),
        ),
    ),
    ("stage bookkeeping (workspace, skip checks, logs)", (("", "tasks/workspace.py"), ("log_run", ""))),
    ("type detection (media.process)", (("detect_item", ""),)),
    ("chain building (media.process)", (("build_chain", ""), ("process_links", ""), ("chain_links", ""))),
    ("rest of task bodies (loads by id, ORM)", (("", "tasks/stages.py"),)),
    ("celery task events (worker_send_task_events)", (("", "celery/events/"),)),
    ("celery result backend (store_result)", (("", "celery/backends/"),)),
    ("celery sending the chain's next task", (("_dispatch_callbacks_and_chain", ""), ("send_task", ""))),
    ("celery/kombu: receive, hand to pool, ack", (("", "celery/"), ("", "kombu/"), ("", "billiard/"))),
    ("other (idle threads, interpreter)", (("", ""),)),
)


def _frame(frame: str) -> tuple[str, str]:
    """``func (path/file.py:123)`` -> (``func``, ``path/file.py``)."""
    func, _, rest = frame.partition(" (")
    return func, rest.rsplit(":", 1)[0]


def _matches(frames: list[tuple[str, str]], needles: tuple[tuple[str, str], ...]) -> bool:
    return any((not fn or fn == f) and (not path or path in p) for f, p in frames for fn, path in needles)


class WorkerProfile:
    """``py-spy record`` of a process and its children, in raw (collapsed-stack) format."""

    def __init__(self, pid: int, out: Path, *, rate: int = 100) -> None:
        self.pid, self.out, self.rate = pid, out, rate
        self.proc: subprocess.Popen[bytes] | None = None

    @staticmethod
    def available() -> bool:
        return _py_spy() is not None

    def __enter__(self) -> WorkerProfile:
        exe = _py_spy()
        if exe is None:
            return self
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [exe, "record", "--pid", str(self.pid), "--subprocesses", "--nonblocking", "--rate", str(self.rate),
             "--format", "raw", "--output", str(self.out)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _py_spy() -> str | None:
    beside = Path(sys.executable).with_name("py-spy")
    return str(beside) if beside.exists() else shutil.which("py-spy")


def _ours(path: str) -> bool:
    return any(f"/{part}/" in path or path.startswith(f"{part}/") for part in ("media_app", "tasks", "pipelines"))


def summarize(raw: Path, *, top: int = 12, buckets_too: bool = True) -> list[str]:
    """Bucket shares (the worker's), the hottest functions of our code (inclusive samples) and
    the hottest functions overall (self time)."""
    if not raw.exists():
        return ["(no profile: py-spy not installed or not permitted)"]
    buckets: collections.Counter[str] = collections.Counter()
    ours: collections.Counter[str] = collections.Counter()
    leaves: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [_frame(f) for f in stack.split(";")]
        total += count
        for name, needles in BUCKETS:
            if _matches(frames, needles):
                buckets[name] += count
                break
        for label in {_label(f, p) for f, p in frames if _ours(p)}:
            ours[label] += count
        leaves[_label(*frames[-1])] += count
    if not total:
        return ["(no samples)"]
    lines = [f"{total} on-CPU samples of the process and its children", ""]
    if buckets_too:
        lines += [f"- {name}: {100 * n / total:.0f} %" for name, n in buckets.most_common()]
        lines.append("")
    lines += [f"Hottest functions of ours (inclusive, % of all samples), top {top}:", ""]
    lines += [f"- {100 * n / total:4.1f} %  {f}" for f, n in ours.most_common(top)]
    lines += ["", f"Hottest functions overall (self time), top {top}:", ""]
    lines += [f"- {100 * n / total:4.1f} %  {f}" for f, n in leaves.most_common(top)]
    return lines


def _label(func: str, path: str) -> str:
    parts = path.rsplit("/", 2)
    return f"{func} ({'/'.join(parts[-2:])})"
