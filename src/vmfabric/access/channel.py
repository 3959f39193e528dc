"""The access channel's wire format: frames, their payloads, an incremental decoder, windows.

Shared by the host gateway and the guest proxy. The guest proxy is bundled into one file that
must run on any Linux guest's Python (3.8 or later) without third-party packages, so this module
imports only the standard library, keeps to Python 3.8 syntax and does no I/O: it turns values
into bytes and bytes into frames, and keeps one stream's flow-control accounts.
docs/access-protocol.md describes the protocol for whoever implements the other side.
"""

from __future__ import annotations

import enum
import re
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import NamedTuple

HEADER = struct.Struct("!BBHII")
"""Frame header: type, flags (0), reserved (0), stream id, payload length."""
HEADER_SIZE = HEADER.size

MAGIC = b"VMFABRIC"
"""First bytes of every HELLO payload: what a receiver that lost the frame boundaries looks for."""
PROTOCOL_VERSIONS = (1,)

MIN_FRAME = 16 * 1024
DEFAULT_MAX_FRAME = 64 * 1024
MAX_FRAME_LIMIT = 256 * 1024
"""No side may advertise a larger max_frame: it bounds the sync preamble below."""
DEFAULT_WINDOW = 256 * 1024
MAX_WINDOW = 2**31 - 1
MAX_STREAM_ID = 2**32 - 1
MAX_TEXT = 200
"""Senders cut the text of ERROR, REFUSE and RESET to this many bytes."""
MAX_PING_PAYLOAD = 64

PREAMBLE = bytes(HEADER_SIZE * (MAX_FRAME_LIMIT // HEADER_SIZE + 2))
"""Zero bytes a side writes before its HELLO when the other end may hold a partial frame.

Read in step it is a run of PAD frames; read in the middle of a frame it completes that frame
(no frame is longer than MAX_FRAME_LIMIT plus its header), and what follows no longer parses,
so the receiver resynchronises on the HELLO that comes next.
"""

_HELLO_FIXED = struct.Struct("!8sQQBB")
_HELLO_LIMITS = struct.Struct("!III")
_PORT = struct.Struct("!H")
_REASON = struct.Struct("!H")
_INCREMENT = struct.Struct("!I")
_NONZERO = re.compile(rb"[^\x00]")


class FrameType(enum.IntEnum):
    """The frame types of protocol version 1."""

    PAD = 0
    HELLO = 1
    ERROR = 2
    PING = 3
    PONG = 4
    OPEN = 5
    ACCEPT = 6
    REFUSE = 7
    DATA = 8
    WINDOW = 9
    CLOSE = 10
    RESET = 11


_LAST_TYPE = max(FrameType)

CHANNEL_TYPES = frozenset(
    {FrameType.PAD, FrameType.HELLO, FrameType.ERROR, FrameType.PING, FrameType.PONG}
)
"""Types that concern the channel: always on stream 0; every other type names a stream."""


class Reason(enum.IntEnum):
    """Why a channel or a stream ended: the code carried by ERROR, REFUSE and RESET."""

    PROTOCOL_ERROR = 1
    FLOW_CONTROL = 2
    STREAM_CLOSED = 3
    NOT_ALLOWED = 4
    CONNECTION_REFUSED = 5
    TIMEOUT = 6
    UNREACHABLE = 7
    TOO_MANY_STREAMS = 8
    CONNECTION_RESET = 9
    CANCELLED = 10
    VERSION_MISMATCH = 11
    ROLE_CONFLICT = 12
    GOING_AWAY = 13
    KEEPALIVE_TIMEOUT = 14
    FLOOD = 15
    PEER_RESTARTED = 16
    INTERNAL_ERROR = 17


def reason_name(code: int) -> str:
    """A code's name for logs; codes from a newer peer show as numbers."""
    try:
        return Reason(code).name
    except ValueError:
        return f"REASON_{code}"


class Role(enum.IntEnum):
    """Which end of the channel a side is: only the host opens streams."""

    HOST = 1
    GUEST = 2


class Frame(NamedTuple):
    """One decoded frame; the payload's meaning depends on the type."""

    type: int
    stream: int
    payload: bytes


class ProtocolError(Exception):
    """The peer broke the protocol; `reason` is the code to send back."""

    def __init__(self, reason: Reason, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class ChannelError(ProtocolError):
    """The frame boundaries or the channel's own frames are broken: the whole channel resets."""


class StreamError(ProtocolError):
    """One stream's frames broke the protocol: that stream resets, the others go on."""

    def __init__(self, stream: int, reason: Reason, message: str) -> None:
        super().__init__(reason, message)
        self.stream = stream


@dataclass(frozen=True)
class Hello:
    """The HELLO payload: who the sender is and what it accepts from the other side.

    `nonce` names the sender's session; `echo` is 0 in an announcement and the nonce of the
    announcement being answered in a reply. The limits bound what the *receiver* of this HELLO
    may send: frames up to `max_frame` payload bytes, `max_streams` streams open at once,
    `initial_window` bytes of DATA per stream before the first WINDOW.
    """

    role: Role
    nonce: int
    echo: int
    versions: tuple[int, ...] = PROTOCOL_VERSIONS
    max_frame: int = DEFAULT_MAX_FRAME
    max_streams: int = 256
    initial_window: int = DEFAULT_WINDOW
    software: str = ""

    def encode(self) -> bytes:
        """The whole HELLO frame."""
        software = _clip(self.software, 255)
        payload = b"".join(
            (
                _HELLO_FIXED.pack(MAGIC, self.nonce, self.echo, self.role, len(self.versions)),
                struct.pack(f"!{len(self.versions)}H", *self.versions),
                _HELLO_LIMITS.pack(self.max_frame, self.max_streams, self.initial_window),
                bytes((len(software),)),
                software,
            )
        )
        return encode_frame(FrameType.HELLO, 0, payload)


def negotiate(ours: tuple[int, ...], theirs: tuple[int, ...]) -> int | None:
    """The highest version both sides speak, None when they share none."""
    common = set(ours) & set(theirs)
    return max(common) if common else None


def encode_frame(frame_type: FrameType, stream: int = 0, payload: bytes = b"") -> bytes:
    """Header and payload as one bytes object (use `data_header` to avoid copying big payloads)."""
    return HEADER.pack(frame_type, 0, 0, stream, len(payload)) + payload


def data_header(stream: int, length: int) -> bytes:
    """The header of a DATA frame, so the payload can be written after it without a copy."""
    return HEADER.pack(FrameType.DATA, 0, 0, stream, length)


def encode_open(stream: int, port: int) -> bytes:
    """OPEN: the host asks for a connection to 127.0.0.1:port inside the guest."""
    return encode_frame(FrameType.OPEN, stream, _PORT.pack(port))


def encode_window(stream: int, increment: int) -> bytes:
    """WINDOW: the sender may receive `increment` more DATA bytes on this stream."""
    return encode_frame(FrameType.WINDOW, stream, _INCREMENT.pack(increment))


def encode_reason(frame_type: FrameType, stream: int, reason: int, text: str = "") -> bytes:
    """ERROR (stream 0), REFUSE or RESET: a reason code and a short human-readable text."""
    return encode_frame(frame_type, stream, _REASON.pack(reason) + _clip(text, MAX_TEXT))


def decode_hello(frame: Frame) -> Hello:
    """The HELLO payload, checked; trailing bytes are left for later protocol versions."""
    payload = frame.payload
    if len(payload) < _HELLO_FIXED.size:
        raise _malformed(frame, "too short")
    magic, nonce, echo, role, count = _HELLO_FIXED.unpack_from(payload)
    if magic != MAGIC:
        raise _malformed(frame, "bad magic")
    if role not in (Role.HOST, Role.GUEST) or not nonce or not count:
        raise _malformed(frame, "bad role, nonce or version list")
    offset = _HELLO_FIXED.size + 2 * count
    if len(payload) < offset + _HELLO_LIMITS.size + 1:
        raise _malformed(frame, "too short")
    versions = struct.unpack_from(f"!{count}H", payload, _HELLO_FIXED.size)
    max_frame, max_streams, window = _HELLO_LIMITS.unpack_from(payload, offset)
    if not MIN_FRAME <= max_frame <= MAX_FRAME_LIMIT:
        raise _malformed(frame, f"max_frame {max_frame} outside {MIN_FRAME}..{MAX_FRAME_LIMIT}")
    if not max_streams or not 1 <= window <= MAX_WINDOW:
        raise _malformed(frame, "max_streams or initial_window out of range")
    offset += _HELLO_LIMITS.size
    software = payload[offset + 1 : offset + 1 + payload[offset]]
    return Hello(
        Role(role),
        nonce,
        echo,
        versions,
        max_frame,
        max_streams,
        window,
        software.decode("utf-8", "replace"),
    )


def decode_port(frame: Frame) -> int:
    """OPEN's port."""
    if len(frame.payload) != _PORT.size:
        raise _malformed(frame, "payload is not a port")
    (port,) = _PORT.unpack(frame.payload)
    if not port:
        raise _malformed(frame, "port 0")
    return int(port)


def decode_reason(frame: Frame) -> tuple[int, str]:
    """The code and text of ERROR, REFUSE or RESET; codes unknown to us are kept as numbers."""
    if len(frame.payload) < _REASON.size:
        raise _malformed(frame, "no reason code")
    (code,) = _REASON.unpack_from(frame.payload)
    return int(code), frame.payload[_REASON.size :].decode("utf-8", "replace")


def decode_increment(frame: Frame) -> int:
    """WINDOW's increment, at least 1."""
    if len(frame.payload) != _INCREMENT.size:
        raise _malformed(frame, "payload is not an increment")
    (increment,) = _INCREMENT.unpack(frame.payload)
    if not increment:
        raise _malformed(frame, "zero increment")
    return int(increment)


def check_empty(frame: Frame) -> None:
    """ACCEPT and CLOSE carry nothing."""
    if frame.payload:
        raise _malformed(frame, "unexpected payload")


def check_ping(frame: Frame) -> None:
    """PING and PONG carry at most MAX_PING_PAYLOAD opaque bytes: answering costs no more."""
    if len(frame.payload) > MAX_PING_PAYLOAD:
        raise _malformed(frame, f"more than {MAX_PING_PAYLOAD} bytes")


def _malformed(frame: Frame, what: str) -> ProtocolError:
    """A bad payload: the channel's problem on stream 0, else only its stream's."""
    message = f"malformed {FrameType(frame.type).name}: {what}"
    if frame.stream:
        return StreamError(frame.stream, Reason.PROTOCOL_ERROR, message)
    return ChannelError(Reason.PROTOCOL_ERROR, message)


def _clip(text: str, limit: int) -> bytes:
    """UTF-8, cut to `limit` bytes without splitting a character."""
    return text.encode("utf-8")[:limit].decode("utf-8", "ignore").encode("utf-8")


class FrameDecoder:
    """Turns the bytes of a channel, in pieces of any size, into frames.

    `feed` returns an iterator over the frames that are complete; bytes of an incomplete frame
    wait for the next `feed`. A header that cannot be valid (unknown type, reserved bits, a
    payload over `max_payload`, a channel type on a stream or the reverse) raises ChannelError
    from the iterator, after the frames before it were yielded. The decoder then drops bytes
    until the next HELLO (found by its magic), which is also where a decoder created with
    `resync=True` starts: after a restart the first bytes may be the middle of a frame.
    PAD frames are consumed here and never yielded.
    """

    def __init__(self, max_payload: int = DEFAULT_MAX_FRAME, *, resync: bool = False) -> None:
        self.max_payload = max_payload
        self._buffer = bytearray()
        self._resyncing = resync

    @property
    def resyncing(self) -> bool:
        """True while bytes are dropped until the next HELLO."""
        return self._resyncing

    def resync(self) -> None:
        """Ignore everything up to the next HELLO (after an error found above the framing)."""
        self._resyncing = True

    def feed(self, data: bytes) -> Iterator[Frame]:
        """Buffer `data` and iterate over the frames now complete (pass b"" to resume)."""
        self._buffer += data
        return self._frames()

    def _frames(self) -> Iterator[Frame]:
        buffer = self._buffer
        while True:
            if self._resyncing and not self._find_hello():
                return
            if len(buffer) < HEADER_SIZE:
                return
            frame_type, flags, reserved, stream, length = HEADER.unpack_from(buffer)
            if not (frame_type or flags or reserved or stream or length):
                self._skip_padding()
                continue
            problem = self._header_problem(frame_type, flags | reserved, stream, length)
            if problem:
                del buffer[:1]
                self._resyncing = True
                raise ChannelError(Reason.PROTOCOL_ERROR, problem)
            end = HEADER_SIZE + length
            if len(buffer) < end:
                return
            with memoryview(buffer) as view:
                payload = bytes(view[HEADER_SIZE:end])
            del buffer[:end]
            yield Frame(frame_type, stream, payload)

    def _header_problem(self, frame_type: int, reserved: int, stream: int, length: int) -> str:
        """Why a header cannot start a valid frame, or "" when it can."""
        if frame_type > _LAST_TYPE:
            return f"unknown frame type {frame_type}"
        name = FrameType(frame_type).name
        if frame_type == FrameType.PAD:
            return "PAD that is not 12 zero bytes"
        if reserved:
            return f"{name} header with reserved bits set"
        if frame_type in CHANNEL_TYPES and stream:
            return f"{name} on stream {stream}"
        if frame_type not in CHANNEL_TYPES and not stream:
            return f"{name} without a stream"
        if length > self.max_payload:
            return f"{name} of {length} bytes, over the {self.max_payload}-byte limit"
        return ""

    def _skip_padding(self) -> None:
        """Drop whole PAD frames (12 zero bytes each) at once: a preamble is thousands of them."""
        match = _NONZERO.search(self._buffer)
        run = match.start() if match else len(self._buffer)
        del self._buffer[: run - run % HEADER_SIZE]

    def _find_hello(self) -> bool:
        """Drop bytes up to the next plausible HELLO header; False while there is none yet."""
        buffer = self._buffer
        start = HEADER_SIZE
        while True:
            index = buffer.find(MAGIC, start)
            if index < 0:
                keep = HEADER_SIZE + len(MAGIC) - 1
                del buffer[: max(0, len(buffer) - keep)]
                return False
            head = index - HEADER_SIZE
            frame_type, flags, reserved, stream, length = HEADER.unpack_from(buffer, head)
            plausible = len(MAGIC) <= length <= self.max_payload
            if frame_type == FrameType.HELLO and not (flags or reserved or stream) and plausible:
                del buffer[:head]
                self._resyncing = False
                return True
            start = index + 1


class Stream:
    """One stream's state and flow-control accounts, as one side of the channel sees them.

    `send_window` is what the peer still lets us send, `recv_window` what we still let it send.
    Payload bytes waiting for window sit in `outbox`; `closing` means the application is done
    sending and a CLOSE follows the outbox. Credit for received bytes goes back to the peer only
    once the application has passed them on (`consumed`), in increments of a quarter window, so
    a stream never holds more than one window of unconsumed data and WINDOW frames stay few.
    """

    def __init__(
        self, stream_id: int, port: int, send_window: int, recv_window: int, *, accepted: bool
    ) -> None:
        self.id = stream_id
        self.port = port
        self.accepted = accepted
        self.send_window = send_window
        self.recv_window = recv_window
        self.outbox = bytearray()
        self.closing = False
        self.local_closed = False
        self.remote_closed = False
        self._granted = recv_window
        self._owed = 0
        self._threshold = max(1, recv_window // 4)

    @property
    def sendable(self) -> bool:
        """Whether a DATA or CLOSE frame can be produced now."""
        if self.local_closed:
            return False
        if self.outbox:
            return self.send_window > 0
        return self.closing

    @property
    def finished(self) -> bool:
        """Both directions closed: the stream can be forgotten."""
        return self.local_closed and self.remote_closed

    def received(self, size: int) -> None:
        """Account for a DATA frame from the peer."""
        if self.remote_closed:
            raise StreamError(self.id, Reason.STREAM_CLOSED, "DATA after CLOSE")
        if size > self.recv_window:
            raise StreamError(
                self.id,
                Reason.FLOW_CONTROL,
                f"{size} bytes of DATA with {self.recv_window} bytes of window left",
            )
        self.recv_window -= size

    def consumed(self, size: int) -> int:
        """The application passed on `size` received bytes; the WINDOW increment due, or 0."""
        if self.remote_closed:
            return 0
        self._owed += min(size, self._granted - self.recv_window - self._owed)
        if self._owed < self._threshold:
            return 0
        increment, self._owed = self._owed, 0
        self.recv_window += increment
        return increment

    def granted(self, increment: int) -> None:
        """Account for a WINDOW frame from the peer."""
        if self.send_window + increment > MAX_WINDOW:
            raise StreamError(self.id, Reason.FLOW_CONTROL, "window grown past 2^31-1")
        self.send_window += increment

    def take(self, max_frame: int) -> bytes:
        """The next DATA payload: as much of the outbox as the window and frame size allow."""
        size = min(len(self.outbox), self.send_window, max_frame)
        with memoryview(self.outbox) as view:
            payload = bytes(view[:size])
        del self.outbox[:size]
        self.send_window -= size
        return payload
