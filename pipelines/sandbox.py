"""Run untrusted decoding in a forked child with hard resource limits.

A decoder bug, a decompression bomb or an out-of-memory kills the child, never the worker.
We fork rather than spawn: the child inherits the already-imported Pillow/PyAV, so isolation
costs a few milliseconds instead of an interpreter start (which would eat the image budget).
"""

from __future__ import annotations

import contextlib
import os
import pickle
import resource
import select
import signal
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from pipelines.errors import MediaError, ProcessingTimeout, TooLarge, TransientError
from pipelines.profiles import Limits

T = TypeVar("T")
_LENGTH_BYTES = 8


@dataclass(frozen=True)
class ChildLimits:
    memory_bytes: int
    cpu_seconds: int
    wall_seconds: float
    max_open_files: int = 256
    max_file_bytes: int = 16 * 1024**3


def child_limits(limits: Limits, *, wall_seconds: float | None = None) -> ChildLimits:
    """The rlimits of every child we start (ffmpeg, probe, image decoder), from the profile:
    one place, so no kind of child runs without one of them."""
    return ChildLimits(
        memory_bytes=limits.memory_bytes,
        cpu_seconds=limits.cpu_seconds,
        wall_seconds=wall_seconds if wall_seconds is not None else limits.wall_seconds,
        max_open_files=limits.max_open_files,
        max_file_bytes=limits.max_file_bytes,
    )


@dataclass(frozen=True)
class ChildStats:
    peak_rss_bytes: int
    seconds: float


def apply_rlimits(limits: ChildLimits) -> None:
    """Set the limits on the calling process; used in forked children and ffmpeg's preexec."""
    resource.setrlimit(resource.RLIMIT_AS, (limits.memory_bytes, limits.memory_bytes))
    cpu = max(1, int(limits.cpu_seconds))
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 5))
    resource.setrlimit(resource.RLIMIT_FSIZE, (limits.max_file_bytes, limits.max_file_bytes))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    n = min(limits.max_open_files, hard) if hard != resource.RLIM_INFINITY else limits.max_open_files
    resource.setrlimit(resource.RLIMIT_NOFILE, (n, n))


def run_isolated_with_stats(
    fn: Callable[..., T], *args: Any, limits: ChildLimits, reap_in_background: bool = False, **kwargs: Any
) -> tuple[T, ChildStats]:
    """Call ``fn(*args, **kwargs)`` in a forked child under ``limits``; return its result and peak RSS.

    With ``reap_in_background``, a child that has sent its whole result is reaped by a thread
    instead of waited for: the kernel takes ~7 ms per 100 MB to tear down a child's memory (10-20 ms
    after a 12 MP image's encode), time in which the result is already known. The peak RSS is then
    the child's own report. A child that ends any other way is waited for, as always.
    """
    started = time.monotonic()
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child, reported through the pipe
        os.close(read_fd)
        status = 0
        try:
            # Default signal handlers: the worker's handlers must not run in the child.
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGUSR1):
                signal.signal(sig, signal.SIG_DFL)
            apply_rlimits(limits)
            result = fn(*args, **kwargs)
            peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            payload = pickle.dumps(("ok", result, peak_kib))
        except MediaError as exc:
            payload = pickle.dumps(("err", exc))
        except MemoryError:
            payload = pickle.dumps(("err", TooLarge("The file needs more memory to decode than we allow.")))
        except BaseException as exc:  # noqa: BLE001 - everything must reach the parent
            err = MediaError(detail="".join(traceback.format_exception(exc))[-4000:])
            try:
                payload = pickle.dumps(("err", err))
            except Exception:  # noqa: BLE001
                payload = b""
                status = 70
        try:
            # Length first: the parent can tell a whole result from one cut short by a kill.
            view = memoryview(len(payload).to_bytes(_LENGTH_BYTES, "big") + payload)
            while view:
                n = os.write(write_fd, view)
                view = view[n:]
            os.close(write_fd)  # the parent reads its end-of-file now, not after our memory is freed
        finally:
            os._exit(status)

    os.close(write_fd)
    chunks: list[bytes] = []
    deadline = started + limits.wall_seconds
    timed_out = False
    try:
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                timed_out = True
                break
            ready, _, _ = select.select([read_fd], [], [], min(remaining, 1.0))
            if not ready:
                continue
            chunk = os.read(read_fd, 1 << 20)
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(read_fd)
        if timed_out:
            _kill(pid)
        data = b"".join(chunks)
        whole = _whole_payload(data)
        # Reap in every case (also when the worker's soft time limit interrupts us).
        usage: resource.struct_rusage | None = None
        wait_status = 0
        try:
            if reap_in_background and whole is not None and not timed_out:
                waited, wait_status, usage = os.wait4(pid, os.WNOHANG)
                if not waited:
                    usage = None  # all zeros for a child still running
                    threading.Thread(target=_reap, args=(pid,), name=f"reap-{pid}", daemon=True).start()
            else:
                _, wait_status, usage = os.wait4(pid, 0)
        except ChildProcessError:
            wait_status = 0
        except BaseException:
            _kill(pid)
            os.waitpid(pid, 0)
            raise
    if timed_out:
        raise ProcessingTimeout(f"Decoding took longer than {limits.wall_seconds:.0f} s.")
    if os.WIFSIGNALED(wait_status) or whole is None:
        signum: int | None = os.WTERMSIG(wait_status) if os.WIFSIGNALED(wait_status) else None
        if signum == signal.SIGXCPU:
            raise ProcessingTimeout("Decoding used more CPU time than allowed.")
        name = signal.Signals(signum).name if signum else f"exit {os.WEXITSTATUS(wait_status)}"
        # A crashed decoder might be a one-off (the machine killed it); retry, and the attempt
        # counter fails a file that crashes it every time.
        raise TransientError("The decoder crashed while reading this file.", detail=f"child ended by {name}")
    kind, value, *rest = pickle.loads(whole)
    if kind == "err":
        raise value
    peak_kib = usage.ru_maxrss if usage else (rest[0] if rest else 0)
    return value, ChildStats(peak_rss_bytes=int(peak_kib * 1024), seconds=time.monotonic() - started)


def _whole_payload(data: bytes) -> bytes | None:
    """The child's pickled result, or None when it did not arrive whole."""
    if len(data) < _LENGTH_BYTES:
        return None
    payload = data[_LENGTH_BYTES:]
    return payload if int.from_bytes(data[:_LENGTH_BYTES], "big") == len(payload) else None


def _reap(pid: int) -> None:
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)


def run_isolated(fn: Callable[..., T], *args: Any, limits: ChildLimits, **kwargs: Any) -> T:
    return run_isolated_with_stats(fn, *args, limits=limits, **kwargs)[0]


def _kill(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
