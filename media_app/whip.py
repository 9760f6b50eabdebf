"""WebRTC ingest (WHIP, RFC 9725): a publisher's audio and video recorded into a new upload.

A session is one aiortc peer connection that only receives. Its media is recorded *without
decoding*: aiortc's receiver hands each reassembled, depayloaded frame (a VP8 or H.264 access
unit, an Opus packet) to a queue that feeds its decoder thread; ``_Tap`` takes that queue's
place, so the frames go to ``Recording`` instead, which muxes them with PyAV into Matroska at
their RTP times (audio and video aligned through the senders' RTCP Sender Reports, or through
arrival times for a sender that sends none). Nothing is decoded or encoded here.

Sessions live on one asyncio loop in a thread of the web process (``_loop``), started on the
first WHIP request: the loop outlives the request that starts a session, and the views stay the
API's ordinary synchronous DRF views (authentication, throttles, error shape). The recording is
a staging file on this host only while the session lasts; when it ends (DELETE, ICE failure,
silence, a limit, the server stopping) the file goes to storage at the item's ``source_key`` and
the upload is completed exactly as any other (``uploads.upload_complete``: sniffed, queued,
history and live events). A session that recorded nothing leaves no item.

Several web processes: each holds its own sessions. A DELETE that reaches another process sets
a stop flag in Redis, which the owning process's monitor reads within a second; the per-user
limit on concurrent sessions is counted in Redis too.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import heapq
import io
import logging
import queue
import threading
import time
import uuid
from collections import deque
from collections.abc import Coroutine
from dataclasses import dataclass, field
from fractions import Fraction
from functools import cache
from pathlib import Path
from typing import Any, TypeVar

import av
import redis
from aiortc import RTCConfiguration, RTCIceServer, RTCPeerConnection, RTCRtpReceiver, RTCSessionDescription
from aiortc.rtcrtpreceiver import TimestampMapper
from aiortc.rtp import RtcpSrPacket
from aiortc.sdp import SessionDescription
from django.conf import settings
from django.db import close_old_connections
from django.utils import timezone

from media_app import lifecycle
from media_app.models import MediaItem, MediaStatus
from media_app.services import media_item_store_source
from media_app.uploads import UploadRefused, upload_complete, upload_create, upload_delete

logger = logging.getLogger("media_app.whip")
# aioice logs every candidate pair's every state at INFO (a dozen lines per session): the web
# log keeps its warnings only, unless LOGGING gives these loggers a level of their own.
for _name in ("aioice", "aiortc"):
    if logging.getLogger(_name).level == logging.NOTSET:
        logging.getLogger(_name).setLevel(logging.WARNING)

T = TypeVar("T")

# Matroska holds VP8, H.264 and Opus as they come off the wire (WebM would refuse H.264).
CONTAINER = "matroska"
CONTENT_TYPE = "video/x-matroska"
VIDEO_CODECS = ("VP8", "H264")
AUDIO_CODECS = ("opus",)
MS = Fraction(1, 1000)  # Matroska's timestamps are milliseconds
# The first frames wait this long (or until every track has SENDER_REPORTS reports) before the
# file is started: long enough for a few RTCP Sender Reports of each track, which place audio and
# video on the sender's one clock (browsers send one every 1-5 s, aiortc every 0.5-1.5 s).
START_WAIT_SECONDS = 4.0
SENDER_REPORTS = 3
# A frame is written once every track has reached its time (so the tracks end together when
# the session stops), or once it is this far behind the newest frame (a track that went quiet
# holds nothing up for long).
HOLD_MS = 1000
# The bitrate limit is judged over this window, with a margin: a key frame is a burst.
BITRATE_WINDOW_SECONDS = 5
BITRATE_MARGIN = 1.25
# The length limit is the sender's time; frames are still taken this long past it by arrival, so
# the ones held up on the way (a busy server, jitter) still fill the file to the limit. A sender
# whose clock crawls is cut here by arrival.
ARRIVAL_GRACE_SECONDS = 1.0
MONITOR_SECONDS = 0.5
# How often a process reads the stop flags (a DELETE that reached another process) and whether
# its sessions' items still exist: one Redis MGET and one query for all its sessions.
REMOTE_CHECK_SECONDS = 0.5
# A peer that has not connected (ICE + DTLS) this long after its offer never will.
CONNECT_TIMEOUT_SECONDS = 30.0
SDP_MAX_BYTES = 64 * 1024


class WhipRefused(Exception):
    """A WHIP request the rules do not allow; ``code`` and ``status`` are the API's."""

    def __init__(self, code: str, message: str, status: int) -> None:
        self.code, self.message, self.status = code, message, status
        super().__init__(message)


@dataclass(frozen=True)
class Answer:
    item_id: uuid.UUID
    sdp: str


# --- the loop -----------------------------------------------------------------------------------


class _Loop:
    """One asyncio loop in a daemon thread, for every session of this process."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self._run, name="whip-loop", daemon=True)
        # Storage uploads and database writes at a session's end: never on the loop.
        self.finisher = concurrent.futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="whip-finish")
        self.thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def call(self, coro: Coroutine[Any, Any, T], timeout: float) -> T:
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise


_loop_lock = threading.Lock()
_the_loop: _Loop | None = None


def _get_loop() -> _Loop:
    global _the_loop
    with _loop_lock:
        if _the_loop is None:
            _the_loop = _Loop()
            _the_loop.call(_manager.start_monitor(), timeout=5)
            atexit.register(_stop_all_at_exit)
        return _the_loop


def whip_sessions_stop_all(reason: str = "the web server stopped") -> None:
    """End every session of this process and store what each recorded (blocking)."""
    if _the_loop is not None and _manager.sessions:
        _the_loop.call(_manager.stop_all(reason), timeout=120)


async def lifespan(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """ASGI lifespan (config/asgi.py): when the server shuts down (SIGTERM on a deploy), every
    session here ends and its recording is stored and queued before the process exits. uvicorn
    re-raises SIGTERM once it has shut down, so an ``atexit`` hook would never run under it."""
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            try:
                await asyncio.to_thread(whip_sessions_stop_all)
            except Exception:
                logger.exception("whip sessions not all finished at shutdown")
            await send({"type": "lifespan.shutdown.complete"})
            return


def _stop_all_at_exit() -> None:
    """A server without ASGI lifespan (runserver, a WSGI server) is exiting: end every session
    here, so what they recorded is stored and processed rather than left on this host's disk.
    The connections close on the loop; the storing runs here, in the main thread, because
    thread pools take no new work once the interpreter is shutting down."""
    if _the_loop is None or not _manager.sessions:
        return
    _manager.exiting = True
    try:
        _the_loop.call(_manager.stop_all("the web server stopped"), timeout=30)
    except Exception:
        logger.warning("whip sessions not all closed at exit", exc_info=True)
    for session, keep in _manager.left_to_finish:
        try:
            _finish(session, keep)
        except Exception:
            logger.exception("whip: storing the recording of %s at exit failed", session.item_id)


# --- Redis: slots per user, live sessions, stop flags ---------------------------------------------


@cache
def _redis(url: str) -> redis.Redis:
    return redis.Redis.from_url(url)


def _r() -> redis.Redis:
    return _redis(settings.UPLOADS_REDIS_URL)


def _slots_key(owner_id: Any) -> str:
    return f"whip:slots:{owner_id}"


def _live_key(item_id: Any) -> str:
    return f"whip:live:{item_id}"


def _stop_key(item_id: Any) -> str:
    return f"whip:stop:{item_id}"


# Drop expired slots (a process that died mid-session), count, take one if under the limit.
_TAKE_SLOT = """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[3]) then return 0 end
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[4])
redis.call('EXPIRE', KEYS[1], ARGV[5])
return 1
"""


def _session_ttl() -> int:
    return int(settings.WHIP_MAX_SESSION_SECONDS + CONNECT_TIMEOUT_SECONDS + 120)


def _take_slot(owner_id: Any) -> str | None:
    token = uuid.uuid4().hex
    now = time.time()
    ttl = _session_ttl()
    taken = _r().eval(
        _TAKE_SLOT, 1, _slots_key(owner_id), now, now + ttl, settings.WHIP_MAX_SESSIONS_PER_USER, token, ttl
    )
    return token if taken else None


def _release_slot(owner_id: Any, token: str) -> None:
    _r().zrem(_slots_key(owner_id), token)


# --- recording ----------------------------------------------------------------------------------


def _ntp_seconds(ntp: int) -> float:
    return (ntp >> 32) + (ntp & 0xFFFFFFFF) / 2**32


def vp8_keyframe_size(data: bytes) -> tuple[int, int] | None:
    """Width and height of a VP8 key frame (RFC 6386 9.1), or None for an inter frame."""
    if len(data) < 10 or data[0] & 1 or data[3:6] != b"\x9d\x01\x2a":
        return None
    return int.from_bytes(data[6:8], "little") & 0x3FFF, int.from_bytes(data[8:10], "little") & 0x3FFF


def h264_nal_types(data: bytes) -> set[int]:
    """NAL unit types in an Annex B access unit (as aiortc's depayloader writes them)."""
    types, start = set(), 0
    while True:
        start = data.find(b"\x00\x00\x01", start)
        if start < 0 or start + 3 >= len(data):
            return types
        types.add(data[start + 3] & 0x1F)
        start += 3


def is_keyframe(codec: str, data: bytes) -> bool:
    if codec == "VP8":
        return vp8_keyframe_size(data) is not None
    if codec == "H264":
        return 5 in h264_nal_types(data)  # an IDR picture
    return True


def starts_a_track(codec: str, data: bytes) -> bool:
    """A frame a recording's video can begin with: a key frame (for H.264, with the parameter
    sets that become the track's CodecPrivate)."""
    if codec == "H264":
        return {5, 7, 8} <= h264_nal_types(data)
    return is_keyframe(codec, data)


class _OriginMapper(TimestampMapper):  # type: ignore[misc]
    """aiortc's mapper (frame timestamps from 0, unwrapped), remembering the first RTP
    timestamp, so that frames can be placed against the sender's reports."""

    first: int | None = None

    def map(self, timestamp: int) -> int:
        if self.first is None:
            self.first = timestamp
        return int(super().map(timestamp))


@dataclass
class _Track:
    kind: str
    receiver: Any
    mapper: _OriginMapper = field(default_factory=_OriginMapper)
    codec: str = ""
    clock_rate: int = 90000
    # Sender Reports: the sender's wall clock (NTP seconds) at an RTP time, the first few.
    reports: list[tuple[float, int]] = field(default_factory=list)
    first_arrival: float | None = None
    first_ext: int | None = None
    anchor: tuple[float, int] | None = None  # (wall seconds, extended RTP time) once started
    stream: Any = None
    last_pts: int = -1
    written_pts: int = 0
    frames: int = 0
    template: Any = None  # H.264: the demuxed first key frame, whose stream gives codec parameters
    size: tuple[int, int] | None = None
    last_pli: float = 0.0
    past_limit: bool = False  # a frame past the recording's length limit arrived

    def extended(self, mapped: int) -> int:
        assert self.mapper.first is not None
        return self.mapper.first + mapped

    def report_anchor(self) -> tuple[float, int]:
        """(sender's seconds, extended RTP time) from the report that says the least delay.

        A sender may stamp a report with the time it *sent* its last packet (aiortc does) rather
        than the time that packet's media was captured (browsers do); the report with the
        smallest wall-minus-media time was delayed least, and is the best clock of the few."""
        assert self.reports and self.mapper.first is not None
        anchors = []
        for ntp, rtp in self.reports:
            delta = (rtp - self.mapper.first) & 0xFFFFFFFF
            if delta >= 1 << 31:
                delta -= 1 << 32
            anchors.append((ntp, self.mapper.first + delta))
        return min(anchors, key=lambda a: a[0] - a[1] / self.clock_rate)

    def request_keyframe(self) -> None:
        # The receiver sends a PLI with its next packet when its decoder reported an error.
        now = time.monotonic()
        flag = getattr(self.receiver, "_RTCRtpReceiver__decoder_error", None)
        if flag is not None and now - self.last_pli >= 0.5:
            self.last_pli = now
            flag.set()


class _Tap(queue.Queue):  # type: ignore[type-arg]
    """Stands in for a receiver's decoder queue: encoded frames go to the recording, undecoded;
    the ``None`` that stops the (idle) decoder thread still reaches it."""

    def __init__(self, recording: Recording, track: _Track) -> None:
        super().__init__()
        self._recording, self._track = recording, track

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        if item is None:
            super().put(None)
            return
        codec, frame = item
        try:
            self._recording.on_frame(self._track, codec.name, codec.clockRate, bytes(frame.data), frame.timestamp)
        except Exception:  # never into aiortc's packet handling: this frame is lost, not the session
            logger.exception("whip: a %s frame could not be recorded", self._track.kind)


def install_tap(receiver: Any, recording: Recording, kind: str) -> _Track:
    """Route ``receiver``'s encoded frames and Sender Reports to ``recording``. Relies on
    aiortc's receiver internals (pinned in requirements.txt; tests/media_app/test_whip.py
    fails if they move)."""
    if not hasattr(receiver, "_RTCRtpReceiver__decoder_queue"):
        raise RuntimeError("aiortc's RTCRtpReceiver has no decoder queue to tap: pin a version this code knows")
    track = _Track(kind=kind, receiver=receiver)
    receiver._RTCRtpReceiver__decoder_queue = _Tap(recording, track)
    receiver._RTCRtpReceiver__timestamp_mapper = track.mapper
    handle_rtcp = receiver._handle_rtcp_packet

    async def on_rtcp(packet: Any) -> None:
        if isinstance(packet, RtcpSrPacket) and not recording.started and len(track.reports) < 20:
            track.reports.append((_ntp_seconds(packet.sender_info.ntp_timestamp), packet.sender_info.rtp_timestamp))
            recording.maybe_start()
        await handle_rtcp(packet)

    receiver._handle_rtcp_packet = on_rtcp
    recording.tracks.append(track)
    return track


class Recording:
    """Encoded frames into a Matroska file at their sender's times, written as they arrive.

    Frames wait (START_WAIT_SECONDS at most) until every track has its first frame (video: a
    key frame) and a few Sender Reports; then the streams are set up and the frames written in
    time order as the tracks advance (HOLD_MS). At the end, frames past the time every track
    reached are left out, so audio and video end within a frame of each other."""

    def __init__(self, path: Path, *, max_seconds: float = float("inf")) -> None:
        self.path = path
        # Frames that lie past this by their sender's times are not written, nor any that arrive
        # ARRIVAL_GRACE_SECONDS later than that after the first: the session is over its length
        # (the monitor ends it), and the file holds exactly the limit.
        self.max_seconds = max_seconds
        self.full = False  # every track with a stream is past the limit, or the arrival grace is over
        self.tracks: list[_Track] = []
        self.container: Any = None
        self.started = False
        self.closed = False
        self.waiting: list[tuple[_Track, bytes, int, bool]] = []
        self.first_frame_at: float | None = None  # monotonic
        self.last_frame_at: float | None = None
        self.bytes_in = 0
        self.window: deque[tuple[int, int]] = deque()  # (second, bytes) for the bitrate limit
        self.sync = ""
        self.pending: list[tuple[int, int, _Track, bytes, bool]] = []  # a heap by time
        self.count = 0

    # -- frames in --

    def on_frame(self, track: _Track, codec: str, clock_rate: int, data: bytes, mapped: int) -> None:
        if self.closed:
            return
        now = time.monotonic()
        self.last_frame_at = now
        self._count(now, len(data))
        if self.over_length(now):
            self.full = True
            return
        track.codec, track.clock_rate = codec, clock_rate
        key = is_keyframe(codec, data)
        if track.kind == "video" and track.frames == 0 and not self.started and not starts_a_track(codec, data):
            track.request_keyframe()  # nothing decodes before the first key frame: wait for it
            return
        if track.stream is None and self.started:
            return  # a track that began after the file did: Matroska's tracks are fixed at its start
        if self.first_frame_at is None:
            self.first_frame_at = now
        ext = track.extended(mapped)
        if track.first_ext is None:
            track.first_ext, track.first_arrival = ext, time.time()
            if codec == "VP8":
                track.size = vp8_keyframe_size(data)
            elif codec == "H264":
                track.template = av.open(io.BytesIO(data), format="h264")
        track.frames += 1
        if self.started:
            self._write(track, data, ext, key)
        else:
            self.waiting.append((track, data, ext, key))
            self.maybe_start()

    def _count(self, now: float, size: int) -> None:
        self.bytes_in += size
        second = int(now)
        if self.window and self.window[-1][0] == second:
            self.window[-1] = (second, self.window[-1][1] + size)
        else:
            self.window.append((second, size))
        while self.window and self.window[0][0] <= second - BITRATE_WINDOW_SECONDS:
            self.window.popleft()

    def over_length(self, now: float) -> bool:
        """The recording holds its limit: every track passed it by the sender's clock, or the
        grace past it by arrival is over (a track that stopped, a sender's clock that crawls)."""
        if self.full:
            return True
        late = self.max_seconds + ARRIVAL_GRACE_SECONDS
        return self.first_frame_at is not None and now - self.first_frame_at >= late

    def bitrate(self) -> float:
        """Bits per second over the last window (0 until a whole window has passed)."""
        if self.first_frame_at is None or time.monotonic() - self.first_frame_at < BITRATE_WINDOW_SECONDS:
            return 0.0
        return sum(b for _, b in self.window) * 8 / BITRATE_WINDOW_SECONDS

    # -- start: streams and time origin --

    def maybe_start(self, *, force: bool = False) -> None:
        if self.started or self.closed or not self.waiting:
            return
        live = [t for t in self.tracks if t.first_ext is not None]
        everyone = len(live) == len(self.tracks)
        reports = all(t.reports for t in live)
        waited = self.first_frame_at is not None and time.monotonic() - self.first_frame_at >= START_WAIT_SECONDS
        enough = everyone and all(len(t.reports) >= SENDER_REPORTS for t in live)
        if not (force or waited or enough):
            return
        if reports and not self._reports_agree(live):
            logger.warning(
                "whip %s: the sender reports disagree with arrival times; syncing by arrival", self.path.name
            )
            reports = False
        if reports:
            # The senders' own clock: audio and video captured at the same moment line up.
            self.sync = "sender reports"
            for t in live:
                t.anchor = t.report_anchor()
        else:
            self.sync = "arrival"
            for t in live:
                assert t.first_arrival is not None and t.first_ext is not None
                t.anchor = (t.first_arrival, t.first_ext)
        self.origin = min(self._wall(t, t.first_ext) for t in live if t.first_ext is not None)
        self.container = av.open(str(self.path), "w", format=CONTAINER)
        for t in live:
            t.stream = self._add_stream(t)
        self.started = True
        waiting, self.waiting = self.waiting, []
        for track, data, ext, key in sorted(waiting, key=lambda w: self._wall(w[0], w[2])):
            self._write(track, data, ext, key)
        logger.info(
            "whip recording started %s: %s (sync by %s)",
            self.path.name,
            ", ".join(f"{t.kind} {t.codec}" for t in live),
            self.sync,
        )

    @staticmethod
    def _reports_agree(live: list[_Track]) -> bool:
        """A sender's reports put its tracks' first frames within a second of when they arrived."""
        lags = []
        for t in live:
            assert t.first_ext is not None and t.first_arrival is not None
            ntp, rtp = t.report_anchor()
            sent = ntp + (t.first_ext - rtp) / t.clock_rate
            lags.append(t.first_arrival - sent)
        return max(lags) - min(lags) < 1.0

    def _add_stream(self, t: _Track) -> Any:
        if t.codec == "H264":
            stream = self.container.add_stream_from_template(t.template.streams.video[0])
        elif t.codec == "VP8":
            width, height = t.size or (0, 0)
            stream = self.container.add_mux_stream("vp8", width=width, height=height)
        else:
            stream = self.container.add_mux_stream("opus", rate=48000)
        stream.time_base = MS
        return stream

    def _wall(self, t: _Track, ext: int) -> float:
        assert t.anchor is not None
        return t.anchor[0] + (ext - t.anchor[1]) / t.clock_rate

    def _write(self, t: _Track, data: bytes, ext: int, key: bool) -> None:
        pts = round((self._wall(t, ext) - self.origin) * 1000)
        pts = max(pts, t.last_pts + 1, 0)  # never backwards within a track
        if pts >= self.max_seconds * 1000:
            # Past the limit by the sender's clock, whenever it arrived: frames that came late
            # and then in a burst (a busy server, a network that stalled) must not stretch the
            # file past the limit. Full once every track with a stream is past it: a track that
            # lags another still fills its last moments.
            t.past_limit = True
            self.full = all(x.past_limit for x in self.tracks if x.stream is not None)
            return
        t.last_pts = pts
        self.count += 1
        heapq.heappush(self.pending, (pts, self.count, t, data, key))
        self._drain()

    def _drain(self, *, until: int | None = None) -> None:
        """Mux the frames every track has reached, or that HOLD_MS has passed by (``until``:
        every frame up to that time, at the end)."""
        times = [t.last_pts for t in self.tracks if t.stream is not None]
        reached, newest = min(times), max(times)
        while self.pending:
            pts, _, t, data, key = self.pending[0]
            if until is not None:
                if pts > until:
                    break
            elif pts > reached and pts >= newest - HOLD_MS:
                break
            heapq.heappop(self.pending)
            packet = av.Packet(data)
            packet.stream = t.stream
            packet.pts = packet.dts = pts
            packet.time_base = MS
            packet.is_keyframe = key
            self.container.mux(packet)
            t.written_pts = pts

    # -- end --

    def close(self) -> bool:
        """Finish the file. True if it holds anything."""
        if self.closed:
            return self.container is not None
        if not self.started and self.waiting:
            self.maybe_start(force=True)
        self.closed = True
        for t in self.tracks:
            if t.template is not None:
                t.template.close()
        if self.container is None:
            return False
        # The tail that only some tracks reached (audio and video stop at slightly different
        # moments) is left out: the recording ends where all of it ends.
        self._drain(until=min(t.last_pts for t in self.tracks if t.stream is not None))
        self.pending.clear()
        self.container.close()
        return True

    def seconds(self) -> float:
        return max((t.written_pts for t in self.tracks), default=0) / 1000


# --- sessions -----------------------------------------------------------------------------------


@dataclass
class Session:
    item_id: uuid.UUID
    owner_id: Any
    slot: str
    pc: RTCPeerConnection
    recording: Recording
    created_at: float = field(default_factory=time.monotonic)
    connected_at: float | None = None
    reason: str = ""
    ended: asyncio.Future[None] | None = None
    ending: asyncio.Future[None] | None = None


class Manager:
    """This process's sessions, and the monitor that ends them at their limits."""

    def __init__(self) -> None:
        self.sessions: dict[uuid.UUID, Session] = {}
        self._monitor: asyncio.Task[None] | None = None
        self._last_remote_check = 0.0
        self.exiting = False
        self.left_to_finish: list[tuple[Session, bool]] = []

    async def start_monitor(self) -> None:
        self._monitor = asyncio.ensure_future(self._watch())

    # -- start --

    async def open(self, *, item_id: uuid.UUID, owner_id: Any, slot: str, offer: str, path: Path) -> str:
        config = RTCConfiguration(iceServers=[RTCIceServer(**s) for s in settings.WHIP_ICE_SERVERS])
        pc = RTCPeerConnection(config)
        recording = Recording(path, max_seconds=settings.WHIP_MAX_SESSION_SECONDS)
        session = Session(item_id=item_id, owner_id=owner_id, slot=slot, pc=pc, recording=recording)
        session.ended = asyncio.get_running_loop().create_future()

        @pc.on("track")
        def on_track(track: Any) -> None:
            for transceiver in pc.getTransceivers():
                if transceiver.receiver.track is track:
                    install_tap(transceiver.receiver, recording, track.kind)

        @pc.on("connectionstatechange")
        async def on_state() -> None:
            if pc.connectionState == "connected" and session.connected_at is None:
                session.connected_at = time.monotonic()
            elif pc.connectionState in ("failed", "closed"):
                self.end_soon(session, f"the connection {pc.connectionState}")

        try:
            try:
                await pc.setRemoteDescription(RTCSessionDescription(sdp=offer, type="offer"))
            except Exception as exc:  # aiortc's many ways of saying the offer is not one it can take
                logger.info("whip offer refused: %r", exc)
                raise WhipRefused("invalid", f"The SDP offer cannot be answered: {exc}", 400) from exc
            sending = [t for t in pc.getTransceivers() if t.kind in ("audio", "video")]
            if not sending or not recording.tracks:
                raise WhipRefused("invalid", "The offer publishes no audio or video.", 400)
            for transceiver in sending:
                _prefer_codecs(transceiver)
            await pc.setLocalDescription(await pc.createAnswer())
            answer = pc.localDescription.sdp
            _check_codecs(answer)
        except BaseException:
            await pc.close()
            raise
        self.sessions[item_id] = session
        return _with_bitrate(answer, settings.WHIP_MAX_BITRATE)

    # -- end --

    def end_soon(self, session: Session, reason: str, *, discard: bool = False) -> None:
        if not session.reason:
            session.reason = reason
            session.ending = asyncio.ensure_future(self._end(session, discard=discard))

    async def end(self, item_id: uuid.UUID, reason: str) -> bool:
        session = self.sessions.get(item_id)
        if session is None:
            return False
        self.end_soon(session, reason)
        assert session.ended is not None
        await asyncio.shield(session.ended)
        return True

    async def stop_all(self, reason: str) -> None:
        await asyncio.gather(*(self.end(i, reason) for i in list(self.sessions)), return_exceptions=True)

    async def _end(self, session: Session, *, discard: bool) -> None:
        try:
            await session.pc.close()
        except Exception:
            logger.warning("whip: closing the connection of %s failed", session.item_id, exc_info=True)
        try:
            has_media = session.recording.close()
        except Exception:
            logger.exception("whip: finishing the recording of %s failed", session.item_id)
            has_media = session.recording.path.exists() and session.recording.path.stat().st_size > 0
        loop = asyncio.get_running_loop()
        assert _the_loop is not None
        try:
            if self.exiting:
                self.left_to_finish.append((session, has_media and not discard))
            else:
                await loop.run_in_executor(_the_loop.finisher, _finish, session, has_media and not discard)
        except Exception:
            logger.exception("whip: storing the recording of %s failed", session.item_id)
        finally:
            self.sessions.pop(session.item_id, None)
            assert session.ended is not None
            session.ended.set_result(None)

    # -- limits --

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(MONITOR_SECONDS)
            try:
                await self._check()
            except Exception:
                logger.exception("whip monitor")

    async def _check(self) -> None:
        now = time.monotonic()
        for session in list(self.sessions.values()):
            if session.reason:
                continue
            rec = session.recording
            limit = settings.WHIP_MAX_SESSION_SECONDS
            # The cap from the offer covers a publisher that connects late in its window and
            # then holds the length and its grace.
            cap = limit + CONNECT_TIMEOUT_SECONDS + ARRIVAL_GRACE_SECONDS
            if rec.over_length(now) or now - session.created_at >= cap:
                self.end_soon(session, f"it reached the {_seconds(limit)} limit of a recording")
            elif session.connected_at is None and now - session.created_at >= CONNECT_TIMEOUT_SECONDS:
                self.end_soon(session, "the publisher never connected")
            elif now - (rec.last_frame_at or session.connected_at or now) >= settings.WHIP_SILENCE_TIMEOUT_SECONDS:
                silence = _seconds(settings.WHIP_SILENCE_TIMEOUT_SECONDS)
                self.end_soon(session, f"no media arrived for {silence}")
            elif rec.bitrate() > settings.WHIP_MAX_BITRATE * BITRATE_MARGIN:
                rate = f"{rec.bitrate() / 1e6:.1f} Mb/s"
                self.end_soon(session, f"it sent {rate}, over the {settings.WHIP_MAX_BITRATE / 1e6:g} Mb/s limit")
        if self.sessions and now - self._last_remote_check >= REMOTE_CHECK_SECONDS:
            self._last_remote_check = now
            ids = [i for i, s in self.sessions.items() if not s.reason]
            stop, gone = await asyncio.get_running_loop().run_in_executor(None, _remote_checks, ids)
            for item_id in stop:
                if item_id in self.sessions:
                    self.end_soon(self.sessions[item_id], "the publisher ended it")
            for item_id in gone:
                if item_id in self.sessions:
                    self.end_soon(self.sessions[item_id], "the item was deleted", discard=True)


_manager = Manager()


def _seconds(value: float) -> str:
    value = float(value)
    if value >= 120 and value % 60 == 0:
        return f"{int(value // 60)} min"
    return f"{value:g} s"


def _prefer_codecs(transceiver: Any) -> None:
    """Only what the recording writes as it comes: Opus; VP8 or H.264 (and their RTX)."""
    wanted = AUDIO_CODECS if transceiver.kind == "audio" else (*VIDEO_CODECS, "rtx")
    caps = RTCRtpReceiver.getCapabilities(transceiver.kind)
    codecs = [c for c in caps.codecs if c.mimeType.split("/")[1].lower() in {w.lower() for w in wanted}]
    transceiver.setCodecPreferences(codecs)


def _check_codecs(answer: str) -> None:
    media = [line for line in answer.splitlines() if line.startswith("m=")]
    if not any(line.split()[1] != "0" for line in media):
        raise WhipRefused(
            "unsupported_codec", "The offer has no codec we record: send Opus audio and VP8 or H.264 video.", 400
        )


def _with_bitrate(sdp: str, bitrate: int) -> str:
    """Tell the sender the limit (RFC 3556 b=AS, RFC 3890 b=TIAS) in each media section."""
    lines, out, in_media = sdp.split("\r\n"), [], False
    for line in lines:
        out.append(line)
        if line.startswith("m="):
            in_media = True
        elif in_media and line.startswith("c="):
            out += [f"b=AS:{bitrate // 1000}", f"b=TIAS:{bitrate}"]
            in_media = False
    return "\r\n".join(out)


# --- the parts that run in threads (database, storage, Redis) ------------------------------------


def _remote_checks(ids: list[uuid.UUID]) -> tuple[list[uuid.UUID], list[uuid.UUID]]:
    """Sessions a DELETE on another process asked to stop, and sessions whose item is gone
    (deleted, or no longer an open upload)."""
    if not ids:
        return [], []
    try:
        flags = _r().mget([_stop_key(i) for i in ids])
        stop = [i for i, f in zip(ids, flags, strict=True) if f]
        open_ = set(
            MediaItem.objects.filter(
                pk__in=ids, status=MediaStatus.PENDING, upload_finished_at__isnull=True
            ).values_list("pk", flat=True)
        )
        return stop, [i for i in ids if i not in open_]
    finally:
        close_old_connections()


def _finish(session: Session, keep: bool) -> None:
    """The session is over: store what it recorded and complete the upload as any other is
    completed (sniffed, queued, history, live events); or, with nothing recorded, remove the
    item. Always gives back the user's slot."""
    item_id, path, rec = session.item_id, session.recording.path, session.recording
    try:
        item = MediaItem.objects.filter(pk=item_id).first()
        if item is None or not item.upload_open:
            return
        if not keep:
            upload_delete(item=item)
            return
        _store(item, path)
        lifecycle.noted(item_id=item_id, message=f"Recording ended: {session.reason}")
        upload_complete(item=item)
    except UploadRefused as exc:
        logger.warning("whip recording of %s refused: %s", item_id, exc.message)
    except Exception:
        # Storage would not take it: the file stays on this host (UPLOAD_STAGING_DIR, removed
        # with the item when its upload expires) for an operator to store by hand.
        logger.exception("whip: the recording of %s could not be stored; kept at %s", item_id, path)
        path = None
    finally:
        if path is not None:
            path.unlink(missing_ok=True)
        _release_slot(session.owner_id, session.slot)
        _r().delete(_live_key(item_id), _stop_key(item_id))
        close_old_connections()
        tracks = ", ".join(f"{t.kind} {t.codec} {t.frames} frames" for t in rec.tracks)
        setup = f"{session.connected_at - session.created_at:.2f}" if session.connected_at else "-"
        logger.info(
            "whip session ended item=%s reason=%r seconds=%.2f bytes=%d connect_s=%s sync=%s tracks=[%s]",
            item_id,
            session.reason,
            rec.seconds(),
            rec.bytes_in,
            setup,
            rec.sync or "-",
            tracks,
        )


STORE_ATTEMPTS = 3


def _store(item: MediaItem, path: Path) -> None:
    """The recording into storage at the item's source key; a storage hiccup is tried again."""
    for attempt in range(1, STORE_ATTEMPTS + 1):
        try:
            with open(path, "rb") as fh:
                media_item_store_source(item=item, fileobj=fh)
            return
        except Exception:  # S3's errors are not OSErrors
            if attempt == STORE_ATTEMPTS:
                raise
            logger.warning("whip: storing %s failed (attempt %d); trying again", item.pk, attempt, exc_info=True)
            time.sleep(2**attempt)


# --- the API's entry points ---------------------------------------------------------------------


def _read_offer(offer: str) -> None:
    """Refuse, before anything is made, a body that is not an SDP offer publishing media."""
    try:
        parsed = SessionDescription.parse(offer)
    except Exception:  # noqa: BLE001 - aiortc's parser raises anything (IndexError, KeyError…) on garbage
        raise WhipRefused("invalid", "The body is not an SDP offer.", 400) from None
    media = [m for m in parsed.media if m.kind in ("audio", "video")]
    if not offer.lstrip().startswith("v=0") or not media:
        raise WhipRefused("invalid", "The offer publishes no audio or video.", 400)
    for m in media:
        ours = {c.lower() for c in (AUDIO_CODECS if m.kind == "audio" else VIDEO_CODECS)}
        offered = [c.mimeType.split("/")[-1] for c in m.rtp.codecs if c.mimeType.split("/")[-1].lower() != "rtx"]
        if not ours & {c.lower() for c in offered}:
            raise WhipRefused(
                "unsupported_codec",
                f"The offer's {m.kind} is {', '.join(dict.fromkeys(offered)) or 'in no codec'}: "
                "we record Opus audio and VP8 or H.264 video.",
                400,
            )


def recording_path(item_id: Any) -> Path:
    return Path(settings.UPLOAD_STAGING_DIR) / f"{item_id}.whip.mkv"


def whip_session_start(*, owner: Any, offer: str) -> Answer:
    """A new session for ``owner`` from an SDP offer: a Pending item awaiting the recording,
    and the SDP answer. Refused (WhipRefused, UploadRefused) over the owner's limits or for an
    offer with nothing we can record."""
    _read_offer(offer)
    slot = _take_slot(owner.pk)
    if slot is None:
        raise WhipRefused(
            "too_many_sessions",
            f"You are already publishing {settings.WHIP_MAX_SESSIONS_PER_USER} live "
            f"session{'s' if settings.WHIP_MAX_SESSIONS_PER_USER != 1 else ''}; end one before starting another.",
            429,
        )
    item = None
    try:
        # The most it may write counts against the quota until the recording's real size is known.
        most = max(1, settings.WHIP_MAX_BITRATE * settings.WHIP_MAX_SESSION_SECONDS // 8)
        stamp = timezone.now().strftime("%Y-%m-%d %H.%M.%S")
        item = upload_create(
            owner=owner,
            file_name=f"Recording {stamp}.mkv",
            size=min(most, settings.UPLOAD_MAX_BYTES),
            content_type=CONTENT_TYPE,
        )
        path = recording_path(item.pk)
        path.parent.mkdir(parents=True, exist_ok=True)
        _r().set(_live_key(item.pk), "1", ex=_session_ttl())
        loop = _get_loop()
        sdp = loop.call(
            _manager.open(item_id=item.pk, owner_id=owner.pk, slot=slot, offer=offer, path=path), timeout=30
        )
    except BaseException:
        _release_slot(owner.pk, slot)
        if item is not None:
            _r().delete(_live_key(item.pk))
            upload_delete(item=item)
        raise
    logger.info("whip session started item=%s owner=%s", item.pk, owner.pk)
    return Answer(item_id=item.pk, sdp=sdp)


def whip_session_stop(*, item_id: Any, timeout: float = 60) -> bool:
    """End the session recording into ``item_id``, wherever it runs; True once it has ended
    (its recording stored and queued), False if there is no live session for it."""
    item_id = uuid.UUID(str(item_id))
    if _the_loop is not None and item_id in _manager.sessions:
        return bool(_the_loop.call(_manager.end(item_id, "the publisher ended it"), timeout=timeout))
    client = _r()
    if not client.exists(_live_key(item_id)):
        return False
    # Another process holds it: its monitor sees the flag within a second.
    client.set(_stop_key(item_id), "1", ex=int(timeout) + 60)
    deadline = time.monotonic() + timeout
    while client.exists(_live_key(item_id)):
        if time.monotonic() > deadline:
            raise TimeoutError(f"the WHIP session of {item_id} did not end within {timeout:g} s")
        time.sleep(0.1)
    return True
