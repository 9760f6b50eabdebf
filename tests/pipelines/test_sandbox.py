"""The sandbox's fork server: decoders run in children of a lean process of their own, not of
the worker, and every blow a child can take still reaches the caller as the right error.

The functions the children run are module-level, so the fork server's children import this
module to find them (a call is pickled; a function by its name)."""

from __future__ import annotations

import faulthandler
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from pipelines import sandbox
from pipelines.errors import ProcessingTimeout, TooLarge, TransientError
from pipelines.profiles import Profiles
from pipelines.runner import network_isolation
from tests.pipelines.conftest import exited, pid_told, tell_pid_and_hang

LIMITS = sandbox.child_limits(Profiles().limits)
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _with_fork_server(monkeypatch: pytest.MonkeyPatch) -> sandbox._ForkServer:
    monkeypatch.setattr(sandbox, "FORK_SERVER", True)
    server = sandbox.fork_server()
    assert server is not None, "the fork server did not start"
    return server


# ---- what the children run


def _link(fd: str) -> str:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except FileNotFoundError:  # the descriptor listdir itself used
        return ""


def _what_i_see() -> dict[str, object]:
    links = [_link(fd) for fd in os.listdir("/proc/self/fd")]
    return {
        "pid": os.getpid(),
        "parent": os.getppid(),
        "environment": sorted(os.environ),
        "django": "django" in sys.modules,
        "sockets": [link for link in links if link.startswith("socket:")],
    }


def _connect(port: int) -> str:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            return "connected"
    except OSError as exc:
        return f"refused: {exc}"


def _crash() -> None:
    faulthandler.disable()
    os.kill(os.getpid(), signal.SIGSEGV)


def _hang() -> None:
    signal.pause()  # a decoder stuck for good: only a signal ends it


def _hog_memory() -> None:
    bytearray(8 * 1024**3)


def _spin() -> None:
    while True:
        pass


def _children(parent: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except (FileNotFoundError, ProcessLookupError):
                continue
            if int(fields[1]) == parent:
                found.append(int(entry.name))
    return found


# ---- isolation


def test_child_starts_without_the_workers_secrets_or_sockets(
    monkeypatch: pytest.MonkeyPatch, _with_fork_server: sandbox._ForkServer
) -> None:
    """Before the fork server, a decoder was a fork of the worker: it started with the worker's
    environment (secret key, database and broker URLs) and its open database and broker sockets."""
    monkeypatch.setenv("DATABASE_URL", "postgres://user:secret@db/media")
    monkeypatch.setenv("SECRET_KEY", "not-for-decoders")
    import django  # noqa: F401 - the worker has it loaded; the decoder must not

    with socket.create_server(("127.0.0.1", 0)) as listener, socket.create_connection(listener.getsockname()):
        seen = sandbox.run_isolated(_what_i_see, limits=LIMITS)

    assert seen["parent"] == _with_fork_server.pid != os.getpid()
    assert "DATABASE_URL" not in seen["environment"] and "SECRET_KEY" not in seen["environment"]
    assert seen["django"] is False
    assert seen["sockets"] == []  # its result goes down a pipe; the server's sockets are closed


def test_child_cannot_reach_the_network() -> None:
    if not network_isolation():
        pytest.skip("this host allows no network namespace (no root, no user namespaces)")
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        assert _connect(port) == "connected"  # from here it can

        outcome = sandbox.run_isolated(_connect, port, limits=LIMITS)

    assert outcome.startswith("refused")


# ---- the blows


def test_crash_is_a_retryable_error_naming_the_signal() -> None:
    with pytest.raises(TransientError) as caught:
        sandbox.run_isolated(_crash, limits=LIMITS)

    assert "SIGSEGV" in caught.value.detail
    assert caught.value.retryable


def test_hang_is_stopped_at_the_wall_limit_and_the_child_killed(_with_fork_server: sandbox._ForkServer) -> None:
    limits = sandbox.ChildLimits(memory_bytes=LIMITS.memory_bytes, cpu_seconds=60, wall_seconds=1.0)
    earlier = set(_children(_with_fork_server.pid))  # earlier calls' children may still be ending
    started = time.monotonic()

    with pytest.raises(ProcessingTimeout):
        sandbox.run_isolated(_hang, limits=limits)

    assert time.monotonic() - started < 10
    # The call ends only after the server has reported the killed child reaped.
    assert set(_children(_with_fork_server.pid)) - earlier == set()


def test_memory_hog_is_too_large() -> None:
    limits = sandbox.ChildLimits(memory_bytes=1024**3, cpu_seconds=60, wall_seconds=30)

    with pytest.raises(TooLarge):
        sandbox.run_isolated(_hog_memory, limits=limits)


def test_cpu_hog_is_stopped_by_its_cpu_limit() -> None:
    limits = sandbox.ChildLimits(memory_bytes=LIMITS.memory_bytes, cpu_seconds=1, wall_seconds=30)

    with pytest.raises(ProcessingTimeout) as caught:
        sandbox.run_isolated(_spin, limits=limits)

    assert "CPU" in caught.value.message


def test_calls_from_many_threads_each_get_their_own_result() -> None:
    results: dict[int, int] = {}

    def call(x: int) -> None:
        # A builtin: the children need import nothing to find it.
        results[x] = sandbox.run_isolated(abs, -x, limits=LIMITS)

    threads = [threading.Thread(target=call, args=(x,)) for x in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)

    assert results == {x: x for x in range(12)}


def test_a_request_larger_than_the_sockets_buffer_arrives_whole() -> None:
    assert sandbox.run_isolated(len, b"x" * 4_000_000, limits=LIMITS) == 4_000_000


# ---- the server's own life


def test_a_server_that_died_is_replaced_on_the_next_call(_with_fork_server: sandbox._ForkServer) -> None:
    os.kill(_with_fork_server.pid, signal.SIGKILL)
    assert exited(_with_fork_server.pid)

    assert sandbox.run_isolated(abs, -21, limits=LIMITS) == 21

    assert sandbox._server is not None and sandbox._server.pid != _with_fork_server.pid


def test_server_killed_during_a_call_fails_that_call_and_kills_its_child(
    _with_fork_server: sandbox._ForkServer, tmp_path: Path
) -> None:
    outcome: list[BaseException] = []
    address = str(tmp_path / "pid.sock")

    def call() -> None:
        try:
            sandbox.run_isolated(tell_pid_and_hang, address, limits=LIMITS)
        except BaseException as exc:  # noqa: BLE001 - what the call ended with is the point
            outcome.append(exc)

    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(address)
        listener.listen()
        thread = threading.Thread(target=call)
        thread.start()
        child = pid_told(listener)
    assert child is not None, "the child never started"

    os.kill(_with_fork_server.pid, signal.SIGKILL)
    thread.join(timeout=30)

    assert not thread.is_alive()
    assert [type(exc) for exc in outcome] == [TransientError]
    assert exited(child)  # it died with its server (PDEATHSIG), rather than hang on


def test_server_ends_with_the_process_that_started_it() -> None:
    script = (
        "from pipelines import sandbox; server = sandbox.fork_server(); "
        "print(server.pid, flush=True); import os; os._exit(0)"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60, check=True
    )
    server_pid = int(done.stdout.split()[0])

    assert exited(server_pid)


def test_a_call_interrupted_before_its_child_is_known_kills_that_child(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The worker's soft time limit can interrupt a call while it waits for the server to say
    which child it forked: that child must not run on with nobody to read it."""
    real = sandbox._receive_pid
    learnt: list[int] = []

    class SoftTimeLimit(Exception):
        pass

    def interrupted_once(status: socket.socket, seconds: float = 60.0) -> tuple[int, int | None]:
        if not learnt:
            learnt.append(0)
            raise SoftTimeLimit
        pid, pidfd = real(status, seconds)
        learnt.append(pid)  # the sandbox asked after all (to kill it)
        return pid, pidfd

    monkeypatch.setattr(sandbox, "_receive_pid", interrupted_once)
    address = str(tmp_path / "pid.sock")
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(address)
        listener.listen()

        with pytest.raises(SoftTimeLimit):
            sandbox.run_isolated(tell_pid_and_hang, address, limits=LIMITS)

        # Killed at once, the child may never have said who it is; else it says so now.
        child = learnt[-1] if len(learnt) > 1 else pid_told(listener)
    assert child, "the child neither was killed by the sandbox nor started"
    assert exited(child)
