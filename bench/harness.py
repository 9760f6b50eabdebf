"""What every benchmark section shares: the isolated environment, rows, statistics, memory sampling.

The environment is the test suite's own (``tests/env_plugin.py``): importing it points this process
and every subprocess it starts at a throw-away ``DATA_DIR`` with its own SQLite file, and at a
Redis database no other run holds (or at a redis-server of its own when none answers on 6379).
The worker and the ASGI server are the test suite's ``Worker`` and ``AsgiServer`` classes.
"""

from __future__ import annotations

import math
import os
import platform
import resource
import statistics
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
CACHE = RESULTS / "tmp"  # generated inputs, kept between runs (git-ignored)
REAL = ROOT.parent / "shared" / "testdata" / "real"


def setup_django() -> Path:
    """Isolated DATA_DIR + Redis db (the test suite's), Django set up, database migrated."""
    from tests import env_plugin  # sets DATA_DIR, REDIS_URL, ... before settings load

    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")
    os.environ["LOG_LEVEL"] = os.environ.get("BENCH_LOG_LEVEL", "WARNING")
    import django

    django.setup()
    from django.core.management import call_command

    call_command("migrate", verbosity=0, interactive=False)
    return env_plugin.RUN_DIR


# --- rows ------------------------------------------------------------------------------------


@dataclass
class Row:
    """One figure. ``ratio`` is value / baseline; ``target`` names what it applies to."""

    name: str
    value: float | None
    unit: str
    baseline: float | None = None
    ratio: float | None = None
    target: str = ""
    meets: bool | None = None
    spread: str = ""  # min-max (or p95) of the repeats behind a median
    n: int = 1
    note: str = ""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def ratio(value: float | None, baseline: float | None) -> float | None:
    if value is None or not baseline:
        return None
    return value / baseline


def check(x: float | None, op: str, limit: float) -> bool | None:
    if x is None or math.isnan(x):
        return None
    return {"<": x < limit, "<=": x <= limit, ">": x > limit, ">=": x >= limit}[op]


def median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs))


def pct(xs: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100)."""
    s = sorted(xs)
    return float(s[max(0, math.ceil(q / 100 * len(s)) - 1)])


def spread(xs: Sequence[float], fmt: str = "{:.2f}") -> str:
    if len(xs) < 2:
        return "n=1"
    return f"{fmt.format(min(xs))}-{fmt.format(max(xs))}"


# --- processes -------------------------------------------------------------------------------


def ffmpeg() -> str:
    from pipelines.runner import ffmpeg_exe

    return ffmpeg_exe()


def run(args: Sequence[str], **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(args), check=True, capture_output=True, text=True, **kw)


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    started = time.perf_counter()
    out = fn()
    return time.perf_counter() - started, out


def cpu_now() -> float:
    """CPU seconds of this process (all threads), of its reaped children (ffmpeg), and of the
    sandbox's fork server with the decoder children it has reaped (they are its children, not ours).

    On a shared machine CPU time moves far less with the load than wall time does: rows print
    both, so a missed target can be told apart from a busy neighbour.
    """
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime + _fork_server_cpu()


_TICK = os.sysconf("SC_CLK_TCK")


def _fork_server_cpu() -> float:
    """utime + stime + cutime + cstime of this process's sandbox fork server, if it has one."""
    from pipelines import sandbox

    server = sandbox._server
    if server is None or server.owner != os.getpid():
        return 0.0
    try:
        with open(f"/proc/{server.pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return sum(int(v) for v in fields[11:15]) / _TICK


def timed_cpu(fn: Callable[[], Any]) -> tuple[float, float, Any]:
    """(wall seconds, CPU seconds, result) of ``fn()``."""
    cpu, started = cpu_now(), time.perf_counter()
    out = fn()
    return time.perf_counter() - started, cpu_now() - cpu, out


def _children_map() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as fh:
                stat = fh.read()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        kids.setdefault(ppid, []).append(int(entry.name))
    return kids


def proc_cpu(pid: int) -> float:
    """CPU seconds (user + system) a live process has used so far."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


@dataclass
class TreePeak:
    """Peaks of one process tree: the sum of its long-lived processes (root and direct children,
    e.g. a celery worker and its pool) and the largest short-lived grandchild (ffmpeg, a decoder)."""

    start_mb: float = 0.0
    processes_mb: float = 0.0
    largest_child_mb: float = 0.0


class TreeSampler:
    """Samples a process tree's resident memory every ``interval`` s in a thread."""

    def __init__(self, pid: int, interval: float = 0.1) -> None:
        self.pid, self.interval = pid, interval
        self.peak = TreePeak()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def sample(self) -> tuple[float, float]:
        kids = _children_map()
        direct = kids.get(self.pid, [])
        own = rss_bytes(self.pid) + sum(rss_bytes(p) for p in direct)
        largest = 0
        stack = [k for p in direct for k in kids.get(p, [])]
        while stack:
            p = stack.pop()
            largest = max(largest, rss_bytes(p))
            stack += kids.get(p, [])
        return own / 2**20, largest / 2**20

    def _run(self) -> None:
        while not self._stop.is_set():
            own, largest = self.sample()
            self.peak.processes_mb = max(self.peak.processes_mb, own)
            self.peak.largest_child_mb = max(self.peak.largest_child_mb, largest)
            self._stop.wait(self.interval)

    def __enter__(self) -> TreeSampler:
        self.peak.start_mb = self.sample()[0]
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join()


# --- the machine -----------------------------------------------------------------------------


def load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def machine() -> dict[str, Any]:
    model = ""
    with open("/proc/cpuinfo") as fh:
        for line in fh:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem_kb = 0
    with open("/proc/meminfo") as fh:
        for line in fh:
            if line.startswith("MemTotal:"):
                mem_kb = int(line.split()[1])
    import PIL

    ff_version = run([ffmpeg(), "-hide_banner", "-version"]).stdout.split("\n", 1)[0]
    return {
        "nproc": os.cpu_count(),
        "cpu": model,
        "memory_gb": round(mem_kb / 2**20, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "ffmpeg": ff_version.replace("ffmpeg version ", "").split(" Copyright")[0],
        "pillow": PIL.__version__,
        "hypervisor": "yes" if "hypervisor" in Path("/proc/cpuinfo").read_text() else "no",
    }


@dataclass
class Report:
    quick: bool
    rows: list[Row] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    def add(self, row: Row) -> Row:
        self.rows.append(row)
        print_row(row)
        return row


def fmt(x: float | None, digits: int = 3) -> str:
    if x is None:
        return "—"
    if float(x).is_integer():
        return f"{int(x)}"
    if abs(x) >= 100:
        return f"{x:.0f}"
    if abs(x) >= 10:
        return f"{x:.1f}"
    return f"{x:.{digits - 1}f}" if abs(x) >= 1 else f"{x:.{digits}f}"


def print_row(row: Row) -> None:
    meets = {True: "yes", False: "NO", None: ""}[row.meets]
    print(
        f"  {row.name:<52} {fmt(row.value):>8} {row.unit:<10} base {fmt(row.baseline):>8}  "
        f"ratio {fmt(row.ratio):>6}  {row.target:<18} {meets:<3} {row.spread} {row.note}",
        flush=True,
    )


@contextmanager
def section(title: str) -> Iterator[None]:
    started = time.monotonic()
    print(f"\n== {title}  (load {' '.join(map(str, load()))})", flush=True)
    yield
    print(f"   [{title}: {time.monotonic() - started:.0f} s]", flush=True)
