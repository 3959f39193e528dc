"""The access channel's protocol state machine for either side, without I/O.

A Session is given the bytes that arrive on the channel (`receive`), the passing of time
(`poll`) and what the application wants (`open_stream`, `accept`, `send`, `close`, `reset`,
`consumed`...); it returns events for the application and frames for the channel
(`data_to_send`). The host gateway drives one from asyncio, the guest proxy from its own loop, so
neither re-implements the handshake, the checks, what a violation resets, flow control or the
round-robin between streams. Standard library only and Python 3.8 syntax: the guest bundles it.
"""

from __future__ import annotations

import enum
import secrets
import struct
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from vmfabric.access.channel import (
    DEFAULT_MAX_FRAME,
    DEFAULT_WINDOW,
    MAX_FRAME_LIMIT,
    MAX_PING_PAYLOAD,
    MAX_STREAM_ID,
    MAX_WINDOW,
    MIN_FRAME,
    PREAMBLE,
    PROTOCOL_VERSIONS,
    ChannelError,
    Frame,
    FrameDecoder,
    FrameType,
    Hello,
    Reason,
    Role,
    Stream,
    StreamError,
    check_empty,
    check_ping,
    data_header,
    decode_hello,
    decode_increment,
    decode_port,
    decode_reason,
    encode_frame,
    encode_open,
    encode_reason,
    encode_window,
    negotiate,
)

CONTROL_LIMIT = 2 * 1024 * 1024
"""Queued control frames (answers, resets) beyond this mean a peer that sends without reading."""
SEND_BATCH = 256 * 1024
_PING_COUNTER = struct.Struct("!Q")


@dataclass(frozen=True)
class Settings:
    """This side's limits (advertised in its HELLO) and how it watches the channel."""

    max_frame: int = DEFAULT_MAX_FRAME
    max_streams: int = 256
    initial_window: int = DEFAULT_WINDOW
    versions: tuple[int, ...] = PROTOCOL_VERSIONS
    keepalive_interval: float = 10.0
    keepalive_timeout: float = 30.0
    software: str = ""

    def __post_init__(self) -> None:
        if not MIN_FRAME <= self.max_frame <= MAX_FRAME_LIMIT:
            raise ValueError(f"max_frame must be within {MIN_FRAME}..{MAX_FRAME_LIMIT}")
        if not 1 <= self.initial_window <= MAX_WINDOW or self.max_streams < 1:
            raise ValueError("initial_window and max_streams must be positive")
        if not 0 < self.keepalive_interval < self.keepalive_timeout:
            raise ValueError("the keepalive interval must be positive and below the timeout")
        if not self.versions:
            raise ValueError("at least one protocol version")


class Phase(enum.Enum):
    """Where the session is: no channel yet, HELLO sent, running, or given up."""

    IDLE = "idle"
    WAITING = "waiting"
    ESTABLISHED = "established"
    FAILED = "failed"


class StateError(Exception):
    """The application asked for something the session cannot do now (a bug on its side)."""


class Event:
    """Something the application must act on; returned by `receive` and `poll`."""


@dataclass(frozen=True)
class Established(Event):
    """Both HELLOs crossed: streams can be opened. `peer` is the other side's HELLO."""

    version: int
    peer: Hello


@dataclass(frozen=True)
class ChannelReset(Event):
    """Every stream is gone (abort them all); a new HELLO exchange follows on the same channel."""

    code: int
    text: str
    by_peer: bool


@dataclass(frozen=True)
class ChannelFailed(Event):
    """No session is possible (no common version, both sides of one role): close the channel."""

    code: int
    text: str


@dataclass(frozen=True)
class StreamOpened(Event):
    """(Guest) the host asks for 127.0.0.1:port: answer with `accept` or `refuse`."""

    stream: int
    port: int


@dataclass(frozen=True)
class StreamAccepted(Event):
    """(Host) the guest connected the stream."""

    stream: int


@dataclass(frozen=True)
class StreamRefused(Event):
    """(Host) the guest did not connect the stream; it is gone."""

    stream: int
    code: int
    text: str


@dataclass(frozen=True)
class DataReceived(Event):
    """Payload for the stream: call `consumed` once it is passed on, to reopen the window."""

    stream: int
    data: bytes


@dataclass(frozen=True)
class StreamEnded(Event):
    """The peer half-closed the stream: no more data will come (like a TCP FIN)."""

    stream: int


@dataclass(frozen=True)
class StreamReset(Event):
    """The stream is aborted, by the peer or because the peer broke the protocol on it."""

    stream: int
    code: int
    text: str
    by_peer: bool


@dataclass(frozen=True)
class PongReceived(Event):
    """The answer to a PING (ours carry a counter)."""

    payload: bytes


def _random_nonce() -> int:
    return secrets.randbits(64) or 1


class Session:
    """One side of the channel: handshake, streams, flow control, keepalive.

    The I/O around it calls `start` whenever the channel is (re)opened, passes every byte read
    to `receive`, calls `poll` a few times per keepalive interval, and writes what
    `data_to_send` returns after each of these calls and after the application's own calls.
    Control frames go first; DATA is taken round-robin, one frame per stream in turn.
    """

    def __init__(
        self,
        role: Role,
        settings: Settings | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        nonces: Callable[[], int] = _random_nonce,
    ) -> None:
        self.role = role
        self.settings = settings or Settings()
        self._clock = clock
        self._nonces = nonces
        self._phase = Phase.IDLE
        self._decoder = FrameDecoder(self.settings.max_frame, resync=True)
        self._nonce = 0
        self._peer: Hello | None = None
        self._version = 0
        self._streams: dict[int, Stream] = {}
        self._highest = 0
        self._control: deque[bytes] = deque()
        self._control_size = 0
        self._ready: deque[Stream] = deque()
        self._scheduled: set[int] = set()
        self._announced = self._heard = self._pinged = 0.0
        self._pings = 0

    @property
    def phase(self) -> Phase:
        return self._phase

    @property
    def peer(self) -> Hello | None:
        """The other side's HELLO while established."""
        return self._peer

    @property
    def version(self) -> int:
        """The negotiated protocol version, 0 until established."""
        return self._version

    @property
    def stream_count(self) -> int:
        return len(self._streams)

    def start(self, *, preamble: bool = False) -> None:
        """Begin on a freshly (re)opened channel: drop everything, send HELLO.

        `preamble` first writes the sync preamble: for a channel whose other end may still
        hold a partial frame from this side's previous instance (a virtio-serial port).
        """
        self._decoder = FrameDecoder(self.settings.max_frame, resync=True)
        self._control.clear()
        self._control_size = 0
        if preamble:
            self._queue(PREAMBLE)
        self._begin()

    def fail(self, reason: Reason, text: str) -> None:
        """End the session for good (e.g. shutting down): ERROR, then nothing until `start`."""
        self._queue(encode_reason(FrameType.ERROR, 0, reason, text))
        self._forget(Phase.FAILED)

    def receive(self, data: bytes) -> list[Event]:
        """Take bytes read from the channel; never raises on what the peer sent."""
        events: list[Event] = []
        if self._phase in (Phase.IDLE, Phase.FAILED):
            return events
        if data:
            self._heard = self._clock()
        frames = self._decoder.feed(data)
        while True:
            try:
                for frame in frames:
                    self._handle(frame, events)
                    if self._failed():
                        return events
                break
            except ChannelError as exc:
                self._restart(exc.reason, str(exc), events)
                frames = self._decoder.feed(b"")
        if self._control_size > CONTROL_LIMIT:
            self._control.clear()
            self._control_size = 0
            self._restart(Reason.FLOOD, "the peer sends faster than it reads the answers", events)
        return events

    def poll(self) -> list[Event]:
        """Keepalive: re-announce while waiting, PING a silent peer, give up on a dead one."""
        events: list[Event] = []
        now = self._clock()
        interval = self.settings.keepalive_interval
        if self._phase is Phase.WAITING and now - self._announced >= interval:
            self._announce()
        elif self._phase is Phase.ESTABLISHED:
            silent = now - self._heard
            if silent >= self.settings.keepalive_timeout:
                self._restart(Reason.KEEPALIVE_TIMEOUT, f"nothing heard for {silent:.1f} s", events)
            elif silent >= interval and now - self._pinged >= interval:
                self._pings += 1
                self.ping(_PING_COUNTER.pack(self._pings))
        return events

    def data_to_send(self, limit: int = SEND_BATCH) -> list[bytes]:
        """Encoded frames to write, about `limit` bytes at most (one frame may go over)."""
        chunks: list[bytes] = []
        size = 0
        while self._control and size < limit:
            frame = self._control.popleft()
            chunks.append(frame)
            size += len(frame)
        self._control_size -= size
        max_frame = self._peer.max_frame if self._peer else 0
        while self._ready and size < limit:
            stream = self._ready.popleft()
            self._scheduled.discard(stream.id)
            if self._streams.get(stream.id) is not stream or not stream.sendable:
                continue
            if stream.outbox:
                payload = stream.take(max_frame)
                chunks += (data_header(stream.id, len(payload)), payload)
                size += len(payload)
                self._schedule(stream)
            else:
                chunks.append(encode_frame(FrameType.CLOSE, stream.id))
                stream.local_closed = True
                if stream.finished:
                    self._drop(stream)
        return chunks

    def open_stream(self, port: int) -> int:
        """(Host) ask the guest for 127.0.0.1:port; data may be sent before the answer."""
        peer = self._require_established()
        if self.role is not Role.HOST:
            raise StateError("only the host opens streams")
        if not 0 < port < 65536:
            raise ValueError(f"port {port} out of range")
        if len(self._streams) >= peer.max_streams:
            raise StateError(f"the guest takes at most {peer.max_streams} streams at once")
        if self._highest >= MAX_STREAM_ID:
            raise StateError("stream ids used up: start a new session")
        self._highest += 1
        stream = Stream(
            self._highest, port, peer.initial_window, self.settings.initial_window, accepted=False
        )
        self._streams[stream.id] = stream
        self._queue(encode_open(stream.id, port))
        return stream.id

    def accept(self, stream_id: int) -> None:
        """(Guest) the connection is made: data flows both ways."""
        stream = self._answerable(stream_id)
        if stream:
            stream.accepted = True
            self._queue(encode_frame(FrameType.ACCEPT, stream_id))
            self._schedule(stream)

    def refuse(self, stream_id: int, reason: Reason, text: str = "") -> None:
        """(Guest) the stream will not be connected."""
        stream = self._answerable(stream_id)
        if stream:
            self._drop(stream)
            self._queue(encode_reason(FrameType.REFUSE, stream_id, reason, text))

    def send(self, stream_id: int, data: bytes) -> None:
        """Queue payload for the stream (sent as the window allows); ignored once it is reset."""
        stream = self._streams.get(stream_id)
        if stream is None:
            return
        if stream.closing:
            raise StateError(f"stream {stream_id} was closed for sending")
        stream.outbox += data
        self._schedule(stream)

    def close(self, stream_id: int) -> None:
        """Half-close: CLOSE follows the data already queued."""
        stream = self._streams.get(stream_id)
        if stream:
            stream.closing = True
            self._schedule(stream)

    def reset(self, stream_id: int, reason: Reason = Reason.CANCELLED, text: str = "") -> None:
        """Abort the stream now, dropping what is queued for it."""
        stream = self._streams.get(stream_id)
        if stream:
            self._drop(stream)
            self._queue(encode_reason(FrameType.RESET, stream_id, reason, text))

    def consumed(self, stream_id: int, size: int) -> None:
        """`size` received bytes were passed on: give the peer that much window back."""
        stream = self._streams.get(stream_id)
        increment = stream.consumed(size) if stream else 0
        if increment:
            self._queue(encode_window(stream_id, increment))

    def buffered(self, stream_id: int) -> int:
        """Bytes queued for the stream and not yet framed: read less from its source above a
        threshold."""
        stream = self._streams.get(stream_id)
        return len(stream.outbox) if stream else 0

    def ping(self, payload: bytes = b"") -> None:
        """Ask the peer for a PONG with the same payload."""
        if len(payload) > MAX_PING_PAYLOAD:
            raise ValueError(f"PING payloads are at most {MAX_PING_PAYLOAD} bytes")
        self._pinged = self._clock()
        self._queue(encode_frame(FrameType.PING, 0, payload))

    def _begin(self) -> None:
        """A new session on the current channel: new nonce, no streams, HELLO."""
        self._forget(Phase.WAITING)
        self._nonce = self._nonces()
        self._announce()

    def _forget(self, phase: Phase) -> None:
        """The session is over: no peer, no streams."""
        self._drop_all()
        self._peer = None
        self._version = 0
        self._phase = phase

    def _announce(self) -> None:
        self._announced = self._clock()
        self._queue(self._hello(echo=0))

    def _hello(self, echo: int) -> bytes:
        settings = self.settings
        return Hello(
            self.role,
            self._nonce,
            echo,
            settings.versions,
            settings.max_frame,
            settings.max_streams,
            settings.initial_window,
            settings.software,
        ).encode()

    def _restart(self, reason: Reason, text: str, events: list[Event]) -> None:
        """Channel-level error: tell the peer, drop every stream, resynchronise, HELLO again."""
        self._queue(encode_reason(FrameType.ERROR, 0, reason, text))
        events.append(ChannelReset(reason, text, by_peer=False))
        self._decoder.resync()
        self._begin()

    def _handle(self, frame: Frame, events: list[Event]) -> None:
        """One frame; until the session is established only HELLO and ERROR count."""
        kind = frame.type
        if kind == FrameType.HELLO:
            self._on_hello(decode_hello(frame), events)
        elif kind == FrameType.ERROR:
            code, text = decode_reason(frame)
            self._forget(Phase.WAITING)
            events.append(ChannelReset(code, text, by_peer=True))
        elif self._phase is not Phase.ESTABLISHED:
            return
        elif kind in (FrameType.PING, FrameType.PONG):
            check_ping(frame)
            if kind == FrameType.PING:
                self._queue(encode_frame(FrameType.PONG, 0, frame.payload))
            else:
                events.append(PongReceived(frame.payload))
        else:
            try:
                self._on_stream_frame(frame, events)
            except StreamError as exc:
                self._violation(exc, events)

    def _on_hello(self, hello: Hello, events: list[Event]) -> None:
        """Announcements (echo 0) are answered; a new peer nonce means the peer restarted."""
        if hello.role == self.role:
            self._reject(hello, Reason.ROLE_CONFLICT, f"both sides are {self.role.name}", events)
            return
        version = negotiate(self.settings.versions, hello.versions)
        if version is None:
            ours, theirs = (",".join(map(str, v)) for v in (self.settings.versions, hello.versions))
            text = f"no common protocol version: this side speaks {ours}, the peer {theirs}"
            self._reject(hello, Reason.VERSION_MISMATCH, text, events)
            return
        peer = self._peer if self._phase is Phase.ESTABLISHED else None
        known = peer is not None and peer.nonce == hello.nonce
        if hello.echo == 0:
            if not known:
                self._establish(hello, version, events)
            self._queue(self._hello(echo=hello.nonce))
        elif hello.echo == self._nonce and not known:
            self._establish(hello, version, events)

    def _establish(self, hello: Hello, version: int, events: list[Event]) -> None:
        if self._phase is Phase.ESTABLISHED:
            text = f"peer {hello.software or hello.role.name} started a new session"
            events.append(ChannelReset(Reason.PEER_RESTARTED, text, by_peer=True))
        self._drop_all()
        self._peer = hello
        self._version = version
        self._highest = 0
        self._phase = Phase.ESTABLISHED
        self._heard = self._pinged = self._clock()
        events.append(Established(version, hello))

    def _reject(self, hello: Hello, reason: Reason, text: str, events: list[Event]) -> None:
        """No session with this peer: our HELLO first (a peer that just started reads nothing
        before a HELLO, and so learns the problem too), then the ERROR."""
        self._queue(self._hello(echo=hello.nonce))
        self.fail(reason, text)
        events.append(ChannelFailed(reason, text))

    def _on_stream_frame(self, frame: Frame, events: list[Event]) -> None:
        kind = frame.type
        if kind == FrameType.OPEN:
            self._on_open(frame, events)
            return
        stream = self._streams.get(frame.stream)
        if stream is None:
            if kind != FrameType.RESET and frame.stream > self._highest:
                name = FrameType(kind).name
                raise StreamError(frame.stream, Reason.PROTOCOL_ERROR, f"{name} before OPEN")
            return
        if kind == FrameType.DATA:
            self._on_data(stream, frame, events)
        elif kind == FrameType.WINDOW:
            stream.granted(decode_increment(frame))
            self._schedule(stream)
        elif kind == FrameType.CLOSE:
            self._on_close(stream, frame, events)
        elif kind == FrameType.RESET:
            code, text = decode_reason(frame)
            self._drop(stream)
            events.append(StreamReset(stream.id, code, text, by_peer=True))
        else:
            self._on_answer(stream, frame, events)

    def _on_open(self, frame: Frame, events: list[Event]) -> None:
        if self.role is Role.HOST:
            raise StreamError(frame.stream, Reason.PROTOCOL_ERROR, "only the host opens streams")
        if frame.stream <= self._highest:
            text = f"stream id {frame.stream} is not above {self._highest}"
            raise StreamError(frame.stream, Reason.PROTOCOL_ERROR, text)
        self._highest = frame.stream
        port = decode_port(frame)
        if len(self._streams) >= self.settings.max_streams:
            text = f"{self.settings.max_streams} streams are open"
            self._queue(
                encode_reason(FrameType.REFUSE, frame.stream, Reason.TOO_MANY_STREAMS, text)
            )
            return
        peer = self._require_established()
        stream = Stream(
            frame.stream, port, peer.initial_window, self.settings.initial_window, accepted=False
        )
        self._streams[stream.id] = stream
        events.append(StreamOpened(stream.id, port))

    def _on_data(self, stream: Stream, frame: Frame, events: list[Event]) -> None:
        if self.role is Role.HOST and not stream.accepted:
            raise StreamError(stream.id, Reason.PROTOCOL_ERROR, "DATA before ACCEPT")
        stream.received(len(frame.payload))
        if frame.payload:
            events.append(DataReceived(stream.id, frame.payload))

    def _on_close(self, stream: Stream, frame: Frame, events: list[Event]) -> None:
        check_empty(frame)
        if self.role is Role.HOST and not stream.accepted:
            raise StreamError(stream.id, Reason.PROTOCOL_ERROR, "CLOSE before ACCEPT")
        if stream.remote_closed:
            raise StreamError(stream.id, Reason.STREAM_CLOSED, "second CLOSE")
        stream.remote_closed = True
        events.append(StreamEnded(stream.id))
        if stream.finished:
            self._drop(stream)

    def _on_answer(self, stream: Stream, frame: Frame, events: list[Event]) -> None:
        """ACCEPT or REFUSE: only the host gets them, once per stream."""
        name = FrameType(frame.type).name
        if self.role is Role.GUEST or stream.accepted:
            raise StreamError(stream.id, Reason.PROTOCOL_ERROR, f"unexpected {name}")
        if frame.type == FrameType.ACCEPT:
            check_empty(frame)
            stream.accepted = True
            events.append(StreamAccepted(stream.id))
            self._schedule(stream)
        else:
            code, text = decode_reason(frame)
            self._drop(stream)
            events.append(StreamRefused(stream.id, code, text))

    def _violation(self, exc: StreamError, events: list[Event]) -> None:
        """A per-stream violation resets that stream only (and tells the application)."""
        stream = self._streams.get(exc.stream)
        if stream:
            self._drop(stream)
            events.append(StreamReset(exc.stream, exc.reason, str(exc), by_peer=False))
        self._queue(encode_reason(FrameType.RESET, exc.stream, exc.reason, str(exc)))

    def _answerable(self, stream_id: int) -> Stream | None:
        """The guest's stream still waiting for accept/refuse (None if it was reset meanwhile)."""
        if self.role is not Role.GUEST:
            raise StateError("only the guest answers OPEN")
        stream = self._streams.get(stream_id)
        if stream and stream.accepted:
            raise StateError(f"stream {stream_id} was already accepted")
        return stream

    def _failed(self) -> bool:
        return self._phase is Phase.FAILED

    def _require_established(self) -> Hello:
        if self._phase is not Phase.ESTABLISHED or self._peer is None:
            raise StateError(f"the session is {self._phase.value}")
        return self._peer

    def _schedule(self, stream: Stream) -> None:
        """Put the stream in the round-robin if it has something it may send now."""
        may_send = self.role is Role.HOST or stream.accepted
        if may_send and stream.sendable and stream.id not in self._scheduled:
            self._scheduled.add(stream.id)
            self._ready.append(stream)

    def _queue(self, frame: bytes) -> None:
        self._control.append(frame)
        self._control_size += len(frame)

    def _drop(self, stream: Stream) -> None:
        del self._streams[stream.id]

    def _drop_all(self) -> None:
        self._streams.clear()
        self._ready.clear()
        self._scheduled.clear()
