"""Run ffmpeg on untrusted media: hardened inputs, resource limits, progress, typed errors.

Every ffmpeg the pipeline starts goes through ``run_ffmpeg``. It runs in its own process group
under rlimits and dies with the worker (``PR_SET_PDEATHSIG``), so a timeout, a cancel or a
SIGKILLed worker never leaves an encoder behind. Its exit is turned into one of the typed
errors of ``pipelines.errors``, with the stderr lines that explain it in ``.detail``.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import os
import re
import select
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from pipelines.errors import (
    Cancelled,
    InvalidInput,
    MediaError,
    ProcessingTimeout,
    TooLarge,
    TransientError,
    UnsupportedCodec,
)
from pipelines.profiles import Limits
from pipelines.sandbox import ChildLimits, apply_rlimits, child_limits
from pipelines.sniff import FORMATS

# Demuxers an untrusted file may be read with: those of the accepted formats' table, nothing
# else. Everything that can open *other* URLs or files (hls, dash, concat, subfile, image2, tee,
# data/playlist formats) and every subtitle demuxer is absent: the avi GAB2 subtitle trick and
# HLS-in-anything payloads need one of those.
ALLOWED_DEMUXERS: tuple[str, ...] = tuple(
    dict.fromkeys(name for f in FORMATS if f.ffmpeg_format for name in f.ffmpeg_format.split(","))
)
FORMAT_WHITELIST = ",".join(ALLOWED_DEMUXERS)

_STDERR_LINES = 200
_STDERR_BYTES = 64 * 1024
_PROGRESS_INTERVAL = 0.25  # seconds between progress callbacks: at most ~4 per second
_POLL = 0.2  # seconds between cancel / deadline checks
_PR_SET_PDEATHSIG = 1
_CLONE_NEWNET = 0x40000000
_CLONE_NEWUSER = 0x10000000

_libc: ctypes.CDLL | None = None
with contextlib.suppress(OSError):
    _libc = ctypes.CDLL(None, use_errno=True)


def ffmpeg_exe() -> str:
    """The ffmpeg binary: ``FFMPEG_BINARY`` if set, else the static build imageio-ffmpeg ships."""
    exe = os.environ.get("FFMPEG_BINARY")
    if exe:
        return exe
    import imageio_ffmpeg

    return str(imageio_ffmpeg.get_ffmpeg_exe())


@dataclass(frozen=True)
class RunResult:
    returncode: int
    seconds: float
    stderr: str  # the bounded tail of stderr (last ~200 lines / 64 KB)
    progress: dict[str, str] = field(default_factory=dict)  # the last ``-progress`` block

    @property
    def out_time(self) -> float | None:
        """Seconds of output written, from ffmpeg's own progress report."""
        return _out_time_seconds(self.progress)

    @property
    def frames(self) -> int:
        value = self.progress.get("frame", "")
        return int(value) if value.isdigit() else 0


# --- hardened inputs -------------------------------------------------------------------------


@dataclass(frozen=True)
class UntrustedInput:
    """An untrusted file handed to ffmpeg as an inherited, already-open file descriptor.

    ffmpeg gets ``-i fd:`` with ``-protocol_whitelist fd``: it cannot open any path or URL at
    all, so a playlist inside the file (HLS in an AVI subtitle, a mov external reference) has
    nothing it may open, whatever the demuxer thinks. ``-format_whitelist`` keeps nested
    demuxers to the allow-list and ``-f`` forces the demuxer sniffing chose, so ffmpeg never
    guesses a format from the content.
    """

    fd: int
    ffmpeg_format: str | None

    @property
    def options(self) -> dict[str, str]:
        """Input options, in the keyword form ``ffmpeg.input("fd:", **options)`` takes."""
        opts = {"protocol_whitelist": "fd", "format_whitelist": FORMAT_WHITELIST, "fd": str(self.fd)}
        if self.ffmpeg_format:
            opts["f"] = self.ffmpeg_format
        return opts

    def args(self, *extra: str) -> list[str]:
        """``[-f fmt] -protocol_whitelist fd -format_whitelist ... -fd N <extra input options> -i fd:``."""
        out: list[str] = []
        for key, value in self.options.items():
            out += [f"-{key}", value]
        return [*out, *extra, "-i", "fd:"]


@contextlib.contextmanager
def open_input(path: Path, ffmpeg_format: str | None) -> Iterator[UntrustedInput]:
    """Open ``path`` read-only for the duration of one ffmpeg run (pass ``inp.fd`` in ``pass_fds``)."""
    if ffmpeg_format is not None and not _format_allowed(ffmpeg_format):
        raise UnsupportedCodec(f"Files in the {ffmpeg_format} format are not supported.")
    try:
        # O_NOFOLLOW: a stage input is a file we wrote, never a link to somewhere else.
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | getattr(os, "O_NOFOLLOW", 0))
    except OSError as exc:
        raise TransientError("A working file could not be opened.", detail=f"{path}: {exc}") from None
    try:
        yield UntrustedInput(fd=fd, ffmpeg_format=ffmpeg_format)
    finally:
        os.close(fd)


def _format_allowed(ffmpeg_format: str) -> bool:
    return any(name in ALLOWED_DEMUXERS for name in ffmpeg_format.split(","))


# --- running ---------------------------------------------------------------------------------


def _preexec(limits: ChildLimits, parent: int, netns: int) -> Callable[[], None]:
    def setup() -> None:  # pragma: no cover - runs in the forked child before exec
        # Die with the worker: a SIGKILLed worker (OOM killer, hard time limit) must not leave
        # an encoder running for an hour with nobody reading its output.
        if _libc is not None:
            _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
            if netns:
                _libc.unshare(netns)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)
        apply_rlimits(limits)

    return setup


_netns_flags: int | None = None


def network_isolation() -> int:
    """The ``unshare`` flags that give ffmpeg an empty network namespace here (0 if none work).

    Defence in depth behind the protocol whitelist: in a namespace of its own, with not even a
    loopback up, ffmpeg cannot reach any address whatever a file makes it try. Root can make
    one directly; others need a user namespace too, which some hosts forbid. Tried once per
    process with a throw-away child.
    """
    global _netns_flags
    if _netns_flags is None:
        _netns_flags = 0
        if _libc is not None:
            for flags in (_CLONE_NEWNET, _CLONE_NEWUSER | _CLONE_NEWNET):
                if _try_unshare(flags):
                    _netns_flags = flags
                    break
    return _netns_flags


def _try_unshare(flags: int) -> bool:
    assert _libc is not None
    libc = _libc

    def child() -> None:  # pragma: no cover - runs in the forked child
        if libc.unshare(flags) != 0:
            os._exit(3)

    try:
        done = subprocess.run(
            [ffmpeg_exe(), "-hide_banner", "-version"],
            preexec_fn=child,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            timeout=30,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return False
    return done.returncode == 0


class _StderrTail(threading.Thread):
    """Drain stderr in the background, keeping the last lines within a byte budget."""

    def __init__(self, stream: IO[bytes]) -> None:
        super().__init__(daemon=True, name="ffmpeg-stderr")
        self.stream = stream
        self.lines: collections.deque[str] = collections.deque()
        self.size = 0

    def run(self) -> None:
        for raw in iter(self.stream.readline, b""):
            line = raw.decode("utf-8", "replace").rstrip("\r\n")[:2000]
            self.lines.append(line)
            self.size += len(line) + 1
            while len(self.lines) > _STDERR_LINES or self.size > _STDERR_BYTES:
                self.size -= len(self.lines.popleft()) + 1

    def text(self) -> str:
        return "\n".join(self.lines)


def run_ffmpeg(
    args: Sequence[str],
    *,
    limits: Limits,
    duration: float | None = None,
    progress: Callable[[float], None] | None = None,
    cancel: Callable[[], bool] | None = None,
    timeout: float | None = None,
    pass_fds: Sequence[int] = (),
) -> RunResult:
    """Run ffmpeg with ``args`` (with or without the executable first) under ``limits``.

    ``duration`` (seconds of media the run will write) turns ffmpeg's ``out_time`` into the
    fraction handed to ``progress``; ``cancel`` is polled a few times a second; ``timeout``
    defaults to ``limits.wall_seconds``. Raises a typed ``MediaError`` unless ffmpeg exits 0.
    """
    exe = ffmpeg_exe()
    args = list(args)
    if args and args[0] in (exe, "ffmpeg"):
        args = args[1:]
    cmd = [exe, "-nostdin", "-hide_banner", "-nostats", "-progress", "pipe:1", "-y", *args]
    wall = timeout if timeout is not None else limits.wall_seconds
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        # glibc reserves 64 MB of address space per malloc arena and makes up to 8 per core;
        # under RLIMIT_AS that reservation, not real use, would make a many-core box fail.
        "MALLOC_ARENA_MAX": "4",
        "LC_ALL": "C",
    }
    netns = network_isolation()
    started = time.monotonic()
    try:
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
            pass_fds=tuple(pass_fds),
            close_fds=True,
            env=env,
            preexec_fn=_preexec(child_limits(limits, wall_seconds=wall), os.getpid(), netns),
        )
    except OSError as exc:  # could not even start (exec under RLIMIT_AS, missing binary, no fds left)
        raise TransientError("The converter could not be started.", detail=f"{cmd[0]}: {exc}") from None
    assert proc.stdout is not None and proc.stderr is not None
    tail = _StderrTail(proc.stderr)
    tail.start()
    reporter = _ProgressReporter(duration, progress)
    block: dict[str, str] = {}
    last_block: dict[str, str] = {}
    buffer = b""
    stdout_fd = proc.stdout.fileno()
    deadline = started + wall
    why_killed: MediaError | None = None
    try:
        while True:
            if cancel is not None and cancel():
                why_killed = Cancelled()
                break
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                why_killed = ProcessingTimeout(
                    f"Processing took longer than the {wall:.0f} s allowed.", detail=" ".join(cmd)[:2000]
                )
                break
            ready, _, _ = select.select([stdout_fd], [], [], min(_POLL, remaining))
            if not ready:
                continue
            chunk = os.read(stdout_fd, 65536)
            if not chunk:
                break  # ffmpeg closed stdout: it is exiting
            buffer += chunk
            *lines, buffer = buffer.split(b"\n")
            for raw in lines:
                key, _, value = raw.decode("utf-8", "replace").strip().partition("=")
                block[key] = value
                if key == "progress":  # the last key of each block
                    last_block, block = block, {}
                    reporter.update(_out_time_seconds(last_block))
        if why_killed is None:
            remaining = max(0.1, deadline - time.monotonic())
            try:
                proc.wait(remaining)
            except subprocess.TimeoutExpired:
                why_killed = ProcessingTimeout(f"Processing took longer than the {wall:.0f} s allowed.")
    finally:
        # Also reached when the worker's soft time limit raises into us: never leave ffmpeg behind.
        if why_killed is not None or proc.poll() is None:
            _kill_group(proc)
        proc.wait()
        tail.join(5)
        proc.stdout.close()
        proc.stderr.close()
    if why_killed is not None:
        raise why_killed
    stderr = tail.text()
    result = RunResult(proc.returncode, time.monotonic() - started, stderr, last_block)
    if proc.returncode != 0:
        raise classify_failure(proc.returncode, stderr)
    if _OUT_OF_MEMORY.search(stderr):
        # ffmpeg treats a failed allocation while demuxing as the end of the input and exits 0
        # with whatever it had: a silently truncated output. Under our RLIMIT_AS that is a limit hit.
        raise TooLarge("The file needs more memory to convert than we allow.", detail=relevant_lines(stderr))
    reporter.finish()
    return result


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


def _out_time_seconds(block: dict[str, str]) -> float | None:
    for key in ("out_time_us", "out_time_ms"):  # both are microseconds, for historical reasons
        value = block.get(key, "")
        if value.lstrip("-").isdigit():
            return max(0.0, int(value) / 1_000_000)
    return None


class _ProgressReporter:
    """Turn out_time into a monotonic fraction, throttled to a few calls per second."""

    def __init__(self, duration: float | None, callback: Callable[[float], None] | None) -> None:
        self.duration = duration if duration and duration > 0 else None
        self.callback = callback
        self.sent = 0.0
        self.at = 0.0

    def update(self, out_time: float | None) -> None:
        if self.callback is None or self.duration is None or out_time is None:
            return
        fraction = min(1.0, out_time / self.duration)
        now = time.monotonic()
        if fraction > self.sent and now - self.at >= _PROGRESS_INTERVAL:
            self.sent, self.at = fraction, now
            self.callback(fraction)

    def finish(self) -> None:
        if self.callback is not None and self.duration is not None and self.sent < 1.0:
            self.sent = 1.0
            self.callback(1.0)


# --- classifying failures --------------------------------------------------------------------

_PERMANENT_PATTERNS: list[tuple[re.Pattern[str], type[MediaError], str]] = [
    (re.compile(r"not on whitelist|not in whitelist|Protocol not found", re.I), InvalidInput,
     "The file tries to read other files or addresses, which we do not allow."),
    (re.compile(r"moov atom not found", re.I), InvalidInput,
     "The video is incomplete: its index is missing, which usually means the upload was cut off."),
    (re.compile(r"Decoder \(codec [^)]*\) not found|Decoder not found|unsupported codec|Unknown codec"
                r"|is not supported|Unsupported codec", re.I), UnsupportedCodec,
     "The file uses a codec we do not support."),
    (re.compile(r"could not find codec parameters", re.I), InvalidInput,
     "We could not find playable video or audio in the file."),
    (re.compile(r"Output file does not contain any stream|Output file is empty|"
                r"does not contain any stream", re.I), InvalidInput,
     "The file has no video or audio we can read."),
    (re.compile(r"Invalid data found when processing input|Invalid NAL unit|EBML header parsing failed|"
                r"Error while decoding|Truncating packet|corrupt", re.I), InvalidInput,
     "The file is damaged or is not a media file we can read."),
]  # fmt: skip
_MEMORY = re.compile(r"Cannot allocate memory|out of memory|ENOMEM|Failed to allocate", re.I)
_OUT_OF_MEMORY = re.compile(r"Cannot allocate memory|out of memory", re.I)
_NO_SPACE = re.compile(r"No space left on device|Disk quota exceeded", re.I)
_FILE_SIZE = re.compile(r"File too large", re.I)
_MISSING = re.compile(r"No such file or directory|Input/output error|Permission denied", re.I)
# What only our command line can cause: a filter, option or encoder we named wrongly.
_OUR_FAULT = re.compile(
    r"No such filter|Error (initializing|configuring|parsing) (a |the )?(complex )?filter|Option \S+ not found"
    r"|Unrecognized option|Unknown encoder|Error while opening encoder|Could not open encoder|Encoder not found",
    re.I,
)
_TIMESTAMPS = re.compile(r"non[- ]?monoton|unknown timestamp|invalid timestamp|timestamps are unset", re.I)
_ERRORISH = re.compile(r"error|invalid|not found|fail|unsupported|whitelist|corrupt|cannot|could not", re.I)


def classify_failure(returncode: int, stderr: str) -> MediaError:
    """Map an ffmpeg exit (negative: killed by that signal) and its stderr to a typed error."""
    detail = relevant_lines(stderr)
    if returncode < 0:
        sig = -returncode
        if sig == signal.SIGXCPU:
            return ProcessingTimeout("Processing used more CPU time than allowed.", detail=detail)
        if sig == signal.SIGXFSZ:
            return TooLarge("The converted file would be larger than we allow.", detail=detail)
        name = signal.Signals(sig).name if sig in signal.Signals._value2member_map_ else str(sig)
        # SIGKILL from outside (the OOM killer, an operator) or a crash: maybe this machine,
        # maybe the file; a retry tells, and the attempt counter stops a file that always does it.
        detail = f"ffmpeg killed by {name}\n{detail}"
        return TransientError("The converter stopped unexpectedly.", detail=detail)
    if _MEMORY.search(stderr):
        return TooLarge("The file needs more memory to convert than we allow.", detail=detail)
    if _FILE_SIZE.search(stderr):
        return TooLarge("The converted file would be larger than we allow.", detail=detail)
    if _NO_SPACE.search(stderr):
        return TransientError("The server ran out of disk space while converting.", detail=detail)
    if _OUR_FAULT.search(stderr):
        return MediaError(
            "Converting failed because of a fault on our side, not in your file.",
            detail=f"ffmpeg exit {returncode}\n{detail}",
        )
    for pattern, cls, message in _PERMANENT_PATTERNS:
        if pattern.search(stderr):
            return cls(message, detail=detail)
    if _MISSING.search(stderr):
        return TransientError("A working file went missing while converting.", detail=detail)
    if _TIMESTAMPS.search(stderr):
        return InvalidInput("The file's timing is damaged: its frames lack times or are out of order.", detail=detail)
    # The file was probed and accepted, and ffmpeg stopped on its data for a reason not named
    # above: the file's, like every decoder failure (our own faults are matched before).
    return InvalidInput(
        "The converter stopped on this file's data; the file is probably damaged.",
        detail=f"ffmpeg exit {returncode}\n{detail}",
    )


def relevant_lines(stderr: str, *, limit: int = 4000) -> str:
    """The error-looking lines plus the last few, for an admin to read, at most ``limit`` chars."""
    lines = stderr.splitlines()
    picked = [ln for ln in lines[:-8] if _ERRORISH.search(ln)][-20:] + lines[-8:]
    text = "\n".join(dict.fromkeys(picked))
    return text[-limit:]
