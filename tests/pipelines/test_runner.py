"""The ffmpeg runner: limits, timeouts, cancel, progress, death with the worker, typed errors."""

from __future__ import annotations

import itertools
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest

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
from pipelines.runner import (
    FORMAT_WHITELIST,
    UntrustedInput,
    classify_failure,
    ffmpeg_exe,
    network_isolation,
    open_input,
    run_ffmpeg,
)

ROOT = Path(__file__).resolve().parents[2]


def _marker_source(seconds: float = 60) -> tuple[str, list[str]]:
    """A lavfi input whose command line is unique, so the test can find its process."""
    marker = f"{seconds + uuid.uuid4().int % 1000 / 1e6:.6f}"
    return marker, ["-re", "-f", "lavfi", "-i", f"testsrc2=size=160x120:rate=25:duration={marker}"]


def _processes_with(marker: str) -> list[int]:
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if marker.encode() in cmdline and state != "Z":
            found.append(int(pid))
    return found


def _gone(marker: str, within: float = 3.0) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if not _processes_with(marker):
            return True
        time.sleep(0.05)
    return False


def test_ffmpeg_exe_is_the_bundled_binary_unless_overridden(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FFMPEG_BINARY", raising=False)
    exe = ffmpeg_exe()
    assert os.access(exe, os.X_OK) and "ffmpeg" in Path(exe).name
    monkeypatch.setenv("FFMPEG_BINARY", "/opt/ffmpeg/bin/ffmpeg")
    assert ffmpeg_exe() == "/opt/ffmpeg/bin/ffmpeg"


def test_progress_is_monotonic_throttled_and_ends_at_one(limits: Limits) -> None:
    seen: list[tuple[float, float]] = []
    result = run_ffmpeg(
        ["-re", "-f", "lavfi", "-i", "testsrc2=size=160x120:rate=25:duration=2", "-f", "null", "-"],
        limits=limits, duration=2.0, progress=lambda f: seen.append((time.monotonic(), f)),
    )  # fmt: skip
    fractions = [f for _, f in seen]
    assert len(fractions) >= 3, fractions
    assert fractions == sorted(fractions) and len(set(fractions)) == len(fractions)
    assert all(0 < f <= 1 for f in fractions) and fractions[-1] == 1.0
    # At most ~4 calls per second (the closing 1.0 may follow the last report at once).
    gaps = [b - a for (a, _), (b, _) in itertools.pairwise(seen[:-1])]
    assert all(gap >= 0.2 for gap in gaps), gaps
    assert result.returncode == 0 and result.frames == 50
    assert result.out_time == pytest.approx(2.0, abs=0.1)


def test_timeout_kills_the_process_group_and_raises(limits: Limits) -> None:
    marker, source = _marker_source()
    started = time.monotonic()
    with pytest.raises(ProcessingTimeout) as caught:
        run_ffmpeg([*source, "-f", "null", "-"], limits=limits, timeout=1.0)
    assert time.monotonic() - started < 5
    assert caught.value.retryable
    assert _gone(marker), "ffmpeg is still running after the timeout"


def test_wall_limit_comes_from_limits_when_no_timeout_is_given(limits: Limits) -> None:
    marker, source = _marker_source()
    with pytest.raises(ProcessingTimeout):
        run_ffmpeg([*source, "-f", "null", "-"], limits=Limits(wall_seconds=0.8))
    assert _gone(marker)


def test_cancel_stops_ffmpeg_and_raises_cancelled(limits: Limits) -> None:
    marker, source = _marker_source()
    started = time.monotonic()
    with pytest.raises(Cancelled):
        run_ffmpeg([*source, "-f", "null", "-"], limits=limits, cancel=lambda: time.monotonic() > started + 1)
    assert time.monotonic() - started < 3
    assert _gone(marker)


def test_ffmpeg_dies_when_the_worker_is_sigkilled(tmp_path: Path) -> None:
    """PR_SET_PDEATHSIG: an encoder must not outlive a worker the OOM killer or a hard time limit took."""
    marker, source = _marker_source()
    script = textwrap.dedent(
        f"""
        from pipelines.profiles import Limits
        from pipelines.runner import run_ffmpeg
        run_ffmpeg({[*source, "-f", "null", "-"]!r}, limits=Limits())
        """
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    worker = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, env=env)
    try:
        deadline = time.monotonic() + 10
        while not _processes_with(marker) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _processes_with(marker), "ffmpeg did not start"
        worker.kill()
        worker.wait(5)
        assert _gone(marker), "ffmpeg outlived its SIGKILLed parent"
    finally:
        worker.kill()
        worker.wait()
        for pid in _processes_with(marker):
            os.kill(pid, signal.SIGKILL)


def test_a_failing_command_raises_a_typed_error_with_stderr_lines(tmp_path: Path, limits: Limits) -> None:
    broken = tmp_path / "cut.mp4"
    broken.write_bytes(b"\x00\x00\x00\x18ftypmp42\x00\x00\x00\x00mp42isom" + b"\x00" * 4000)
    with open_input(broken, "mov,mp4,m4a,3gp,3g2,mj2") as inp, pytest.raises(InvalidInput) as caught:
        run_ffmpeg([*inp.args(), "-f", "null", "-"], limits=limits, pass_fds=[inp.fd])
    assert "moov atom not found" in caught.value.detail
    assert "index is missing" in caught.value.message


def test_unknown_encoder_is_an_internal_error_not_a_crash(limits: Limits) -> None:
    with pytest.raises(MediaError) as caught:
        run_ffmpeg(
            ["-f", "lavfi", "-i", "testsrc2=duration=1", "-c:v", "no_such_encoder", "-f", "null", "-"],
            limits=limits,
        )
    assert "no_such_encoder" in caught.value.detail


def test_file_size_limit_is_too_large(tmp_path: Path) -> None:
    with pytest.raises(TooLarge):
        run_ffmpeg(
            ["-f", "lavfi", "-i", "testsrc2=size=320x240:duration=5", "-c:v", "rawvideo", "-f", "nut",
             str(tmp_path / "big.nut")],
            limits=Limits(max_file_bytes=1_000_000),
        )  # fmt: skip
    assert (tmp_path / "big.nut").stat().st_size <= 1_000_000


def test_memory_limit_is_too_large(tmp_path: Path) -> None:
    # A 16k x 16k RGBA frame needs 1 GiB; the child may have 400 MB.
    with pytest.raises(TooLarge):
        run_ffmpeg(
            ["-f", "lavfi", "-i", "color=size=16000x16000:duration=0.1", "-pix_fmt", "rgba",
             "-f", "null", "-"],
            limits=Limits(memory_bytes=400 * 1024**2),
        )  # fmt: skip


@pytest.mark.parametrize(
    ("returncode", "stderr", "expected"),
    [
        (-signal.SIGKILL, "", TransientError),
        (-signal.SIGSEGV, "", TransientError),
        (-signal.SIGXCPU, "", ProcessingTimeout),
        (-signal.SIGXFSZ, "", TooLarge),
        (1, "[in#0] Error opening input: Invalid data found when processing input", InvalidInput),
        (1, "[mov,mp4] moov atom not found", InvalidInput),
        (1, "Could not find codec parameters for stream 0 (Video: none)", InvalidInput),
        (1, "Decoder (codec cavs) not found for input stream #0:0", UnsupportedCodec),
        (1, "Protocol 'file' not on whitelist 'fd'!", InvalidInput),
        (1, "Format hls not on whitelist 'mov,mp4'", InvalidInput),
        (1, "Error allocating frame: Cannot allocate memory", TooLarge),
        (1, "av_interleaved_write_frame(): No space left on device", TransientError),
        # Issue 15: a failure on the file's data after a successful probe is the file's, not ours.
        (1, "[vist#0:0/h264] Error submitting packet to decoder: Operation not permitted", InvalidInput),
        (1, "[matroska] Can't write packet with unknown timestamp", InvalidInput),
        (1, "[AVFilterGraph] No such filter: 'zscal'", MediaError),
        (1, "Unknown encoder 'libfoo'", MediaError),
    ],
)
def test_failures_are_classified(returncode: int, stderr: str, expected: type[MediaError]) -> None:
    error = classify_failure(returncode, "frame=1\n" + stderr + "\nConversion failed!")
    assert type(error) is expected
    assert error.message and not error.message.startswith("[")  # a sentence for a person
    if expected is MediaError:  # ours: internal, and the sentence says so
        assert error.code == "internal" and "our side" in error.message
    if stderr:
        assert stderr in error.detail


def test_detail_is_bounded() -> None:
    error = classify_failure(1, "\n".join(f"Error line {i} " + "x" * 300 for i in range(200)))
    assert len(error.detail) <= 4100


def test_hardened_input_reads_through_an_fd_only(tmp_path: Path, clip: Path) -> None:
    with open_input(clip, "mov,mp4,m4a,3gp,3g2,mj2") as inp:
        args = inp.args()
        assert args[-2:] == ["-i", "fd:"]
        assert args[args.index("-protocol_whitelist") + 1] == "fd"
        assert args[args.index("-format_whitelist") + 1] == FORMAT_WHITELIST
        assert args[args.index("-f") + 1] == "mov,mp4,m4a,3gp,3g2,mj2"
        # Seeking works through the fd (mov needs it for a moov at the end and for -ss).
        result = run_ffmpeg(
            [*inp.args("-ss", "2"), "-map", "0:v", "-f", "null", "-"], limits=Limits(), pass_fds=[inp.fd]
        )
    assert 40 <= result.frames <= 55
    for banned in ("hls", "concat", "subfile", "image2", "tee", "data", "srt", "ass"):
        assert banned not in FORMAT_WHITELIST.split(",")


def test_demuxers_outside_the_allow_list_are_refused(tmp_path: Path) -> None:
    playlist = tmp_path / "list.m3u8"
    playlist.write_text("#EXTM3U\n#EXT-X-TARGETDURATION:1\n#EXTINF:1,\nfile:///etc/passwd\n#EXT-X-ENDLIST\n")
    with pytest.raises(UnsupportedCodec), open_input(playlist, "hls"):
        pass


def _playlist(tmp_path: Path) -> Path:
    playlist = tmp_path / "list.m3u8"
    playlist.write_text("#EXTM3U\n#EXT-X-TARGETDURATION:1\n#EXTINF:1,\nfile:///etc/passwd\n#EXT-X-ENDLIST\n")
    return playlist


def test_a_playlist_cannot_open_files_even_if_ffmpeg_guesses(tmp_path: Path, limits: Limits) -> None:
    out = tmp_path / "out.nut"
    with open_input(_playlist(tmp_path), None) as inp, pytest.raises(InvalidInput):
        args = [*inp.args(), "-map", "0", "-c", "copy", "-f", "nut", str(out)]
        run_ffmpeg(args, limits=limits, pass_fds=[inp.fd])
    assert not out.exists() or b"root:" not in out.read_bytes()


def test_each_layer_alone_stops_a_playlist_reading_a_local_file(tmp_path: Path, limits: Limits) -> None:
    """Forced to the HLS demuxer, the format whitelist refuses it; with that layer removed and
    HLS's own extension check switched off, the fd-only protocol whitelist still refuses file:."""
    playlist = _playlist(tmp_path)
    out = tmp_path / "out.nut"
    fd = os.open(playlist, os.O_RDONLY)
    try:
        with pytest.raises(InvalidInput) as caught:
            args = [*UntrustedInput(fd, "hls").args(), "-c", "copy", "-f", "nut", str(out)]
            run_ffmpeg(args, limits=limits, pass_fds=[fd])
        assert "not on whitelist" in caught.value.detail

        args = UntrustedInput(fd, "hls").args("-allowed_extensions", "ALL", "-extension_picky", "0")
        at = args.index("-format_whitelist")
        del args[at : at + 2]
        os.lseek(fd, 0, os.SEEK_SET)
        with pytest.raises(InvalidInput) as caught:
            run_ffmpeg([*args, "-c", "copy", "-f", "nut", str(out)], limits=limits, pass_fds=[fd])
        assert "file:///etc/passwd" in caught.value.detail  # it tried, and was refused
    finally:
        os.close(fd)
    assert not out.exists() or b"root:" not in out.read_bytes()


def test_ffmpeg_has_no_network_at_all(limits: Limits) -> None:
    """Behind the whitelists, ffmpeg runs in an empty network namespace: even a plain tcp://
    input given on purpose (no untrusted-input hardening) reaches nothing, not even loopback."""
    if not network_isolation():
        pytest.skip("this host allows no network namespace for unprivileged children")
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        server.setblocking(False)
        port = server.getsockname()[1]
        with pytest.raises(MediaError):
            args = ["-f", "s16le", "-i", f"tcp://127.0.0.1:{port}", "-f", "null", "-"]
            run_ffmpeg(args, limits=limits, timeout=20)
        with pytest.raises(BlockingIOError):
            server.accept()
