"""Run untrusted decoding in a child process with hard resource limits.

A decoder bug, a decompression bomb or an out-of-memory kills the child, never the worker.

The children are forked from a *fork server*: a lean Python process, started once per worker
process, that imports only the decoders (``pipelines.images``, ``pipelines.probe``) and forks one
child per call. Forking the worker itself cost a 113 MB worker 7-8 ms of CPU per fork, plus
~2.6 ms of copy-on-write faults on its own heap afterwards, twice per image; and the child started
with a copy of the worker's memory, environment (secret key, database and broker credentials) and
open sockets. A child of the fork server has none of these, and, where the host allows it, no
network either. Still a fork, not a spawn: the decoders are already imported, so a child costs
about a millisecond instead of an interpreter start.

If the fork server cannot be started, or ``CPC_SANDBOX_FORK_SERVER=0``, the worker forks the
child itself, as before: same limits, same errors.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import importlib
import json
import logging
import os
import pickle
import resource
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn, TypeVar

from pipelines.errors import MediaError, ProcessingTimeout, TooLarge, TransientError
from pipelines.profiles import Limits

T = TypeVar("T")
log = logging.getLogger(__name__)

_LENGTH_BYTES = 8
# What the fork server imports before it forks anything: every module that runs a sandboxed call.
PRELOAD = ("pipelines.images", "pipelines.probe")
# Off switch (and the tests' way to inject faults into a child by monkeypatching the parent).
FORK_SERVER = os.environ.get("CPC_SANDBOX_FORK_SERVER", "1") != "0"
# How long a call waits for the fork server to fork its child (an interpreter start, once).
_START_SECONDS = 60.0
# How long a call waits for the server's report of how its child ended, after the child's output
# ended (the server reaps within milliseconds; this only bounds a wedged server).
_STATUS_SECONDS = 10.0
_PID = struct.Struct("!i")
_STATUS = struct.Struct("!iq")  # wait status, peak RSS in KiB
_REQUEST_LENGTH = struct.Struct("!I")
_PR_SET_PDEATHSIG = 1
# The worker's import path first: the server must import the same ``pipelines`` as the worker.
_BOOT = "import json, sys; sys.path[:] = json.loads(sys.argv[2]); from pipelines.sandbox import _serve; _serve()"
_CLONE_NEWNET = 0x40000000
_CLONE_NEWUSER = 0x10000000


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
    """Call ``fn(*args, **kwargs)`` in a child under ``limits``; return its result and peak RSS.

    ``fn`` and its arguments are pickled (``fn`` by name, so a module-level function). A child
    that has sent its whole result is not waited for when the fork server reaps it, nor, with
    ``reap_in_background``, when we forked it ourselves: the kernel takes ~7 ms per 100 MB to tear
    down a child's memory (10-20 ms after a 12 MP image's encode), time in which the result is
    already known. The peak RSS is then the child's own report. A child that ends any other way
    is waited for, as always.
    """
    server = fork_server() if FORK_SERVER else None
    if server is not None:
        try:
            return server.run(fn, args, kwargs, limits)
        except _ServerGone:
            # Died between calls (the OOM killer picks big processes): start another, once.
            log.warning("sandbox fork server %s ended; starting another", server.pid)
            server = fork_server()
            if server is not None:
                with contextlib.suppress(_ServerGone):
                    return server.run(fn, args, kwargs, limits)
    return _run_forked(fn, args, kwargs, limits, reap_in_background=reap_in_background)


def run_isolated(fn: Callable[..., T], *args: Any, limits: ChildLimits, **kwargs: Any) -> T:
    return run_isolated_with_stats(fn, *args, limits=limits, **kwargs)[0]


# --------------------------------------------------------------------------------------------
# The fork server, seen from the worker


class _ServerGone(Exception):
    """The fork server ended before it forked the call's child: nothing ran; safe to retry."""


_server: _ForkServer | None = None
_server_lock = threading.Lock()


def fork_server() -> _ForkServer | None:
    """This process's fork server, started on first use (or again, if it ended); None if it
    cannot start, and the caller forks itself. Workers call it at process start, so the first
    image does not wait for an interpreter."""
    global _server
    with _server_lock:
        if _server is not None and _server.alive():
            return _server
        if _server is not None:
            _server.close()
            _server = None
        try:
            _server = _ForkServer.start()
        except OSError as exc:
            log.warning("sandbox fork server could not start (%s); forking the worker instead", exc)
            return None
        return _server


def _forget_server_in_child() -> None:
    """A forked process (a Celery pool process, a direct-fork child) starts its own server:
    the parent's socket is closed here, so the parent's server still ends with the parent."""
    global _server, _server_lock
    if _server is not None:
        with contextlib.suppress(OSError):
            _server.control.close()
    _server = None
    _server_lock = threading.Lock()


os.register_at_fork(after_in_child=_forget_server_in_child)


class _ForkServer:
    def __init__(self, process: subprocess.Popen[bytes], control: socket.socket) -> None:
        self.process = process
        self.pid = process.pid
        self.control = control
        self.owner = os.getpid()
        self._send_lock = threading.Lock()

    @classmethod
    def start(cls) -> _ForkServer:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            process = subprocess.Popen(
                [sys.executable, "-c", _BOOT, str(theirs.fileno()), json.dumps(sys.path), ",".join(PRELOAD)],
                pass_fds=[theirs.fileno()],
                stdin=subprocess.DEVNULL,
                env=_lean_environment(),
                # Its own session: a Ctrl-C or a TERM to the worker's group must not end it before
                # the worker's warm shutdown has finished its calls. It ends when we close `ours`.
                start_new_session=True,
            )  # fmt: skip
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        return cls(process, ours)

    def alive(self) -> bool:
        return self.owner == os.getpid() and self.process.poll() is None

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.control.close()
        with contextlib.suppress(OSError, subprocess.TimeoutExpired):
            self.process.wait(timeout=5)

    def run(
        self,
        fn: Callable[..., T],
        args: Sequence[Any],
        kwargs: dict[str, Any],
        limits: ChildLimits,
    ) -> tuple[T, ChildStats]:
        request = pickle.dumps((fn, tuple(args), kwargs, limits))
        read_fd, write_fd = os.pipe()
        status, their_status = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            try:
                message = _REQUEST_LENGTH.pack(len(request)) + request
                with self._send_lock:  # one request at a time on the stream, whole
                    sent = socket.send_fds(self.control, [message], [write_fd, their_status.fileno()])
                    self.control.sendall(message[sent:])
            except OSError as exc:
                raise _ServerGone from exc
            finally:
                os.close(write_fd)
                their_status.close()
            try:
                pid, pidfd = _receive_pid(status)
            except BaseException:
                _kill_unseen(status)
                raise
            try:
                # The server reaps. Once the whole result is here, how the child then ended (its
                # teardown, 1-2 ms) changes nothing: only a child that did not finish is waited for.
                return _collect(
                    read_fd, pid, limits, reap_in_background=True,
                    kill=lambda: _kill(pid, pidfd), wait=lambda: _receive_status(status),
                )  # fmt: skip
            finally:
                if pidfd is not None:
                    os.close(pidfd)
        finally:
            os.close(read_fd)
            status.close()


def _lean_environment() -> dict[str, str]:
    """What the fork server (and every decoder child) sees of the environment: no secrets."""
    keep = ("PATH", "LANG", "LC_ALL", "LC_CTYPE", "TMPDIR", "HOME", "TZ", "LD_LIBRARY_PATH")
    return {key: os.environ[key] for key in keep if key in os.environ}


def _receive_pid(status: socket.socket, seconds: float = _START_SECONDS) -> tuple[int, int | None]:
    ready, _, _ = select.select([status], [], [], seconds)
    if not ready:
        raise TransientError("The decoder did not start.", detail=f"no fork within {seconds:.0f} s")
    message, fds, _, _ = socket.recv_fds(status, _PID.size, 1)
    if len(message) < _PID.size:
        for fd in fds:
            os.close(fd)
        raise _ServerGone
    return _PID.unpack(message)[0], (fds[0] if fds else None)


def _kill_unseen(status: socket.socket) -> None:
    """The call gave up before it learnt its child's pid (the worker's soft time limit, a slow
    server): the server forks right after it reads the request, so wait a moment for the pid and
    kill the child, which would otherwise run on with nobody to read its result."""
    with contextlib.suppress(Exception):
        pid, pidfd = _receive_pid(status, seconds=2.0)
        _kill(pid, pidfd)
        if pidfd is not None:
            os.close(pidfd)


def _receive_status(status: socket.socket) -> tuple[int, int] | None:
    """(wait status, peak RSS KiB) of an ended child, from the server; None if it went away."""
    data = b""
    deadline = time.monotonic() + _STATUS_SECONDS
    while len(data) < _STATUS.size:
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not select.select([status], [], [], remaining)[0]:
            return None
        chunk = status.recv(_STATUS.size - len(data))
        if not chunk:
            return None
        data += chunk
    wait_status, peak_kib = _STATUS.unpack(data)
    return wait_status, peak_kib


# --------------------------------------------------------------------------------------------
# The fork server itself (a process of its own; ``_serve`` is its main)


def _serve() -> NoReturn:  # pragma: no cover - runs in the fork server, tested through it
    """Fork one child per request read from the control socket; report each child's end.

    Single-threaded on purpose: a process with threads cannot fork safely. It exits, killing
    any child still running, when the worker closes the control socket (the worker ended).
    """
    control = socket.socket(fileno=int(sys.argv[1]))
    _isolate_network()
    for name in filter(None, sys.argv[3].split(",")):
        importlib.import_module(name)
    gc.freeze()  # the imports' objects: the collector never touches them, so children do not copy
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    running: dict[int, socket.socket] = {}
    server_pid = os.getpid()
    try:
        while True:
            ready, _, _ = select.select([control.fileno(), wake_r], [], [])
            if wake_r in ready:
                os.read(wake_r, 4096)
                _reap(running)
            if control.fileno() in ready:
                request = _read_request(control)
                if request is None:
                    break
                body, write_fd, status = request
                pid = os.fork()
                if pid == 0:
                    for sock in (control, *running.values()):
                        sock.close()
                    os.close(wake_r)
                    os.close(wake_w)
                    _child_of_server(body, write_fd, status, server_pid)
                os.close(write_fd)
                pidfd = None
                with contextlib.suppress(OSError, AttributeError):
                    pidfd = os.pidfd_open(pid)
                try:
                    socket.send_fds(status, [_PID.pack(pid)], [pidfd] if pidfd is not None else [])
                except OSError:
                    pass  # the caller gave up already; the child is reaped all the same
                finally:
                    if pidfd is not None:
                        os.close(pidfd)
                running[pid] = status
    finally:
        for pid in running:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    os._exit(0)


def _read_request(control: socket.socket) -> tuple[bytes, int, socket.socket] | None:  # pragma: no cover
    head, fds, _, _ = socket.recv_fds(control, _REQUEST_LENGTH.size, 2)
    if len(head) < _REQUEST_LENGTH.size or len(fds) != 2:
        for fd in fds:
            os.close(fd)
        return None
    (length,) = _REQUEST_LENGTH.unpack(head)
    body = bytearray()
    while len(body) < length:
        chunk = control.recv(length - len(body))
        if not chunk:
            return None
        body += chunk
    return bytes(body), fds[0], socket.socket(fileno=fds[1])


def _reap(running: dict[int, socket.socket]) -> None:  # pragma: no cover
    while running:
        try:
            pid, wait_status, usage = os.wait4(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if not pid:
            return
        status = running.pop(pid, None)
        if status is None:
            continue
        with contextlib.suppress(OSError), status:
            status.sendall(_STATUS.pack(wait_status, usage.ru_maxrss))


def _child_of_server(
    body: bytes, write_fd: int, status: socket.socket, server_pid: int
) -> NoReturn:  # pragma: no cover
    status.close()
    signal.set_wakeup_fd(-1)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    try:
        if _LIBC is not None:
            # Die with the server, which dies with the worker: nobody would read our result.
            _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != server_pid:
            os._exit(1)
        fn, args, kwargs, limits = pickle.loads(body)
    except BaseException:  # noqa: BLE001
        traceback.print_exc()
        os._exit(70)
    _child_main(fn, args, kwargs, limits, write_fd)


def _isolate_network() -> None:  # pragma: no cover
    """An empty network namespace for the server and so every decoder: whatever a file makes a
    demuxer try, there is no address to reach (not even loopback). Root can make one directly;
    others need a user namespace too, which some hosts forbid: then the children keep the
    network, as the worker's own forks did."""
    if _LIBC is None:
        return
    for flags in (_CLONE_NEWNET, _CLONE_NEWUSER | _CLONE_NEWNET):
        if _LIBC.unshare(flags) == 0:
            return


def _libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None


_LIBC = _libc()


# --------------------------------------------------------------------------------------------
# Shared by both ways of forking


def _child_main(
    fn: Callable[..., Any], args: Sequence[Any], kwargs: dict[str, Any], limits: ChildLimits, write_fd: int
) -> NoReturn:  # pragma: no cover
    """The child's whole life: limits, the call, its pickled result down ``write_fd``, exit."""
    status = 0
    try:
        # Default signal handlers: the worker's (or server's) handlers must not run in the child.
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGUSR1, signal.SIGHUP):
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


def _run_forked(
    fn: Callable[..., T], args: Sequence[Any], kwargs: dict[str, Any], limits: ChildLimits, *, reap_in_background: bool
) -> tuple[T, ChildStats]:
    """The worker forks the child itself (no fork server)."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child, reported through the pipe
        os.close(read_fd)
        _child_main(fn, args, kwargs, limits, write_fd)
    os.close(write_fd)

    def wait() -> tuple[int, int] | None:
        try:
            _, wait_status, usage = os.wait4(pid, 0)
        except ChildProcessError:
            return 0, 0
        return wait_status, usage.ru_maxrss

    def reaped_already() -> tuple[int, int] | None:
        """Reap now if it has ended, else hand it to a thread and return None."""
        try:
            waited, wait_status, usage = os.wait4(pid, os.WNOHANG)
        except ChildProcessError:
            return 0, 0
        if not waited:
            threading.Thread(target=_reap_one, args=(pid,), name=f"reap-{pid}", daemon=True).start()
            return None
        return wait_status, usage.ru_maxrss

    try:
        return _collect(
            read_fd, pid, limits, reap_in_background=reap_in_background,
            kill=lambda: _kill(pid, None), wait=wait, wait_if_ended=reaped_already,
        )  # fmt: skip
    finally:
        os.close(read_fd)


def _collect(
    read_fd: int,
    pid: int,
    limits: ChildLimits,
    *,
    reap_in_background: bool,
    kill: Callable[[], None],
    wait: Callable[[], tuple[int, int] | None],
    wait_if_ended: Callable[[], tuple[int, int] | None] | None = None,
) -> tuple[Any, ChildStats]:
    """Read the child's result from ``read_fd`` within the wall limit; make sense of its end.

    ``wait`` returns (wait status, peak RSS KiB) once the child has ended, or None if that cannot
    be known (the fork server went away).
    """
    started = time.monotonic()
    chunks: list[bytes] = []
    deadline = started + limits.wall_seconds
    timed_out = False
    ended: tuple[int, int] | None = None
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
    except BaseException:
        # Interrupted (the worker's soft time limit): the child must not outlive the call.
        kill()
        wait()
        raise
    if timed_out:
        kill()
    whole = _whole_payload(b"".join(chunks))
    if reap_in_background and whole is not None and not timed_out:
        ended = wait_if_ended() if wait_if_ended is not None else (0, 0)
    else:
        ended = wait()
    if timed_out:
        raise ProcessingTimeout(f"Decoding took longer than {limits.wall_seconds:.0f} s.")
    wait_status = ended[0] if ended is not None else 0
    if os.WIFSIGNALED(wait_status) or whole is None:
        signum: int | None = os.WTERMSIG(wait_status) if os.WIFSIGNALED(wait_status) else None
        if signum == signal.SIGXCPU:
            raise ProcessingTimeout("Decoding used more CPU time than allowed.")
        if signum:
            name = signal.Signals(signum).name
        elif ended is None:
            name = "an unknown cause (the sandbox's fork server ended too)"
        else:
            name = f"exit {os.WEXITSTATUS(wait_status)}"
        # A crashed decoder might be a one-off (the machine killed it); retry, and the attempt
        # counter fails a file that crashes it every time.
        raise TransientError("The decoder crashed while reading this file.", detail=f"child ended by {name}")
    kind, value, *rest = pickle.loads(whole)
    if kind == "err":
        raise value
    peak_kib = ended[1] if ended is not None and ended[1] else (rest[0] if rest else 0)
    return value, ChildStats(peak_rss_bytes=int(peak_kib * 1024), seconds=time.monotonic() - started)


def _whole_payload(data: bytes) -> bytes | None:
    """The child's pickled result, or None when it did not arrive whole."""
    if len(data) < _LENGTH_BYTES:
        return None
    payload = data[_LENGTH_BYTES:]
    return payload if int.from_bytes(data[:_LENGTH_BYTES], "big") == len(payload) else None


def _reap_one(pid: int) -> None:
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)


def _kill(pid: int, pidfd: int | None) -> None:
    """SIGKILL the child; through its pidfd when we have one (a pid the server already reaped
    could have been reused, a pidfd cannot)."""
    with contextlib.suppress(ProcessLookupError):
        if pidfd is not None:
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        else:
            os.kill(pid, signal.SIGKILL)
