"""The host side of the access channels: one connection and one protocol session per VM, the
streams of many users multiplexed over it, reconnected whenever the guest proxy restarts.

`ChannelPool.open(vm, port)` gives a `ChannelStream` to 127.0.0.1:port inside the VM. The
pool makes a `VmChannel` on a VM's first use; the channel finds the VM's socket (through the
store and the VM's host agent), connects, runs `vmfabric.access.session.Session` over the
connection, and connects again with a capped backoff when the connection ends. The protocol
itself (handshake, checks, windows, round-robin between streams, keepalive) is the session's;
this module only moves bytes and events between it, the socket and the streams' users.

Flow control: a stream's user reads with `read`, which gives window back to the guest for
what it takes, so a user that does not read holds back only its own stream (the guest may
never have more than one window in flight, and the session resets a stream that sends more);
`write` waits while the stream has more than `STREAM_HIGH_WATER` bytes queued in the session,
so a user is never read faster than the guest grants window. The channel's socket is always
read: what arrives is bounded by the windows, and garbage or a flood only resets this VM's
streams or session (each VM has its own socket, session and buffers).
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter, deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import cast

from vmfabric import __version__
from vmfabric.access.channel import MAX_FRAME_LIMIT, Reason, Role, reason_name
from vmfabric.access.session import (
    ChannelFailed,
    ChannelReset,
    DataReceived,
    Established,
    Event,
    Phase,
    Session,
    Settings,
    StateError,
    StreamAccepted,
    StreamEnded,
    StreamRefused,
    StreamReset,
)
from vmfabric.domain.errors import NotFound, Unavailable, VmfabricError

log = logging.getLogger(__name__)

GATEWAY_SETTINGS = Settings(
    max_frame=MAX_FRAME_LIMIT,
    initial_window=1024 * 1024,
    software=f"vmfabric-gateway/{__version__}",
)
"""What the gateway asks of guest proxies: frames up to 256 KiB and 1 MiB of window per
stream, so that one download is not held back by round trips over the channel (a stream
buffers at most one window here)."""

CHANNEL_HIGH_WATER = 1024 * 1024
"""Frames buffered in the channel's socket before no more are taken from the session."""
STREAM_HIGH_WATER = 256 * 1024
"""A stream's bytes queued in the session (no window yet, or the channel busy) before its
writer waits; it resumes below half of it."""
ESTABLISH_TIMEOUT = 2.0
"""How long a request waits for the channel's session: longer means the guest proxy is down."""
ACCEPT_TIMEOUT = 15.0
"""How long a stream waits for the guest's answer (the guest proxy gives up connecting after
5 s by default, and answers REFUSE)."""
RETRY_INITIAL = 0.1
RETRY_CAP = 2.0
"""Reconnection backoff: doubling from RETRY_INITIAL up to RETRY_CAP; a request for the VM
makes the next attempt at once (but never sooner than RETRY_INITIAL after the last)."""
QUARANTINE_INITIAL = 0.5
QUARANTINE_CAP = 30.0
"""A guest whose channel the gateway had to reset (garbage, a flood), or that sends more than
UNHEARD_LIMIT bytes without a session, is not read for this long, doubling with each offence
until one of its streams is accepted again: its garbage costs no memory, but reading it at
full speed would take the loop's time from the other VMs."""
UNHEARD_LIMIT = 8 * 1024 * 1024
"""Bytes a guest may send while the session waits for its HELLO (a restarted guest proxy's
preamble and stale frames are far less)."""
_OFFENCES = frozenset({Reason.PROTOCOL_ERROR, Reason.FLOOD})
IDLE_CLOSE_S = 300.0
"""A channel that is not connected and was not used for this long stops reconnecting (and
leaves the pool); the next request makes a new one."""

Locate = Callable[[str], Awaitable[str | None]]
"""Where a VM's channel socket is (None: the VM has none); raises NotFound for unknown VMs."""


class BadGateway(VmfabricError):
    """The guest proxy refused the stream, or the server in the VM broke the exchange."""

    status = 502
    title = "Bad gateway"


class GatewayTimeout(VmfabricError):
    """The guest proxy did not answer a stream in time."""

    status = 504
    title = "Gateway timeout"


class StreamAborted(ConnectionResetError):
    """The stream was reset (by the guest, by this side, or with its whole channel)."""


@dataclass
class GatewayStats:
    """Counters and gauges of this process's channels, for the metrics (written by the
    gateway's loop, read by the scrape)."""

    channels_open: int = 0
    streams_open: int = 0
    streams_opened: int = 0
    bytes_to_vm: int = 0
    bytes_from_vm: int = 0
    channel_resets: Counter[str] = field(default_factory=Counter)


STATS = GatewayStats()


class ChannelStream:
    """One stream to 127.0.0.1:port in a VM, for one user (a `splice.Pipe`).

    `accepted` waits for the guest's answer; `read`, `write`, `write_eof`, `abort` and
    `close` move the data. Errors: `BadGateway` (refused), `GatewayTimeout`, and
    `StreamAborted` once the stream is reset.
    """

    def __init__(self, channel: VmChannel, stream_id: int, port: int) -> None:
        self.channel = channel
        self.id = stream_id
        self.port = port
        self.ended = False
        self.ended_here = False
        self.error: Exception | None = None
        self._accepted = False
        self._answered = asyncio.Event()
        self._chunks: deque[bytes] = deque()
        self._arrived = asyncio.Event()
        self._room = asyncio.Event()

    async def accepted(self) -> None:
        """Wait until the guest connected the stream."""
        try:
            await asyncio.wait_for(self._answered.wait(), ACCEPT_TIMEOUT)
        except TimeoutError:
            self.abort()
            raise GatewayTimeout(
                f"the guest proxy of VM {self.channel.vm} did not answer for port {self.port} "
                f"within {ACCEPT_TIMEOUT:g} s",
                vm=self.channel.vm,
                port=self.port,
            ) from None
        if not self._accepted:
            error = self.error
            if isinstance(error, VmfabricError):
                raise error
            raise BadGateway(
                f"the stream to port {self.port} of VM {self.channel.vm} broke before it was "
                f"connected: {error}",
                vm=self.channel.vm,
                port=self.port,
            )

    async def read(self) -> bytes:
        """The next bytes from the server in the VM; b"" at its end. Taking them gives the
        guest window back."""
        while not self._chunks:
            if self.error is not None:
                raise StreamAborted(str(self.error))
            if self.ended:
                return b""
            self._arrived.clear()
            await self._arrived.wait()
        data = self._chunks.popleft()
        self.channel.consumed(self, len(data))
        return data

    async def write(self, data: bytes) -> None:
        """Queue `data` for the server; waits while the stream has too much queued."""
        if self.error is not None:
            raise StreamAborted(str(self.error))
        self.channel.send(self, data)
        while self.error is None and self.channel.backlog(self) >= STREAM_HIGH_WATER:
            self._room.clear()
            self.channel.wait_for_room(self)
            await self._room.wait()
        if self.error is not None:
            raise StreamAborted(str(self.error))

    def write_eof(self) -> None:
        """Half-close: the server sees the end of the request (CLOSE after the queued data)."""
        if self.error is None and not self.ended_here:
            self.ended_here = True
            self.channel.close_stream(self)

    def abort(self) -> None:
        """Reset the stream (the server's connection is reset too)."""
        if self.error is None:
            self.channel.reset_stream(self, StreamAborted("reset by the gateway"))

    def close(self) -> None:
        """Done with the stream: an orderly end once the server ended its side, else a reset
        (e.g. after a complete HTTP answer from a server that keeps its connection open)."""
        if self.ended:
            self.write_eof()
        else:
            self.abort()

    def on_accepted(self) -> None:
        self._accepted = True
        self._answered.set()

    def on_data(self, data: bytes) -> None:
        self._chunks.append(data)
        self._arrived.set()

    def on_end(self) -> None:
        self.ended = True
        self._arrived.set()

    def on_error(self, error: Exception) -> None:
        """The stream is gone: wake whoever waits on it."""
        if self.error is None:
            self.error = error
        self._answered.set()
        self._arrived.set()
        self._room.set()

    def on_room(self) -> None:
        self._room.set()


class VmChannel(asyncio.Protocol):
    """The channel to one VM's guest proxy: its connection (reconnected by `_run`), its
    session and its streams."""

    def __init__(
        self, vm: str, locate: Locate, settings: Settings, on_gone: Callable[[VmChannel], None]
    ) -> None:
        self.vm = vm
        self.session = Session(Role.HOST, settings)
        self.streams: dict[int, ChannelStream] = {}
        self.problem = "not connected yet"
        """Why the channel is not established, for the 503's detail."""
        self._locate = locate
        self._on_gone = on_gone
        self._loop = asyncio.get_running_loop()
        self.last_used = self._loop.time()
        self._transport: asyncio.Transport | None = None
        self._lost: asyncio.Future[str] | None = None
        self._paused = False
        self._flush_scheduled = False
        self._ticker: asyncio.TimerHandle | None = None
        self._waiting_room: set[ChannelStream] = set()
        self._counted_open = False
        self._was_established = False
        self._offences = 0
        self._unheard = 0
        self._quarantined: asyncio.TimerHandle | None = None
        self._failures = 0
        self._changed = asyncio.Event()
        self._wake = asyncio.Event()
        self._stopping = False
        self._task = self._loop.create_task(self._run(), name=f"vmfabric-channel-{vm}")

    @property
    def established(self) -> bool:
        return self._transport is not None and self.session.phase is Phase.ESTABLISHED

    async def ready(self) -> None:
        """Wait (at most ESTABLISH_TIMEOUT) for the session; `Unavailable` (503) with the
        reason when the guest proxy is down, or its VM has no channel."""
        self.last_used = self._loop.time()
        if self.established:
            return
        seen = self._failures
        self._wake.set()
        deadline = self._loop.time() + ESTABLISH_TIMEOUT
        while not self.established:
            remaining = deadline - self._loop.time()
            if self._failures > seen or self._stopping or remaining <= 0:
                raise Unavailable(
                    f"the guest proxy of VM {self.vm} does not answer: {self.problem}",
                    vm=self.vm,
                )
            changed = self._changed
            try:
                await asyncio.wait_for(changed.wait(), remaining)
            except TimeoutError:
                continue

    def open(self, port: int) -> ChannelStream:
        """A new stream to 127.0.0.1:port in the VM (established channels only); data may be
        written at once, before the guest's answer."""
        try:
            stream_id = self.session.open_stream(port)
        except StateError as error:
            raise Unavailable(f"VM {self.vm}: {error}", vm=self.vm) from None
        stream = self.streams[stream_id] = ChannelStream(self, stream_id, port)
        STATS.streams_open += 1
        STATS.streams_opened += 1
        self.flush()
        return stream

    async def close(self) -> None:
        """Stop: tell the guest proxy (ERROR GOING_AWAY), close the connection, stop retrying."""
        self._stopping = True
        self._wake.set()
        if self._transport is not None:
            self.session.fail(Reason.GOING_AWAY, "the gateway is stopping")
            self._flush()
            self._transport.close()
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)

    # What the streams ask of the channel.

    def send(self, stream: ChannelStream, data: bytes) -> None:
        self.session.send(stream.id, data)
        STATS.bytes_to_vm += len(data)
        self.flush()

    def backlog(self, stream: ChannelStream) -> int:
        return self.session.buffered(stream.id)

    def wait_for_room(self, stream: ChannelStream) -> None:
        self._waiting_room.add(stream)

    def consumed(self, stream: ChannelStream, size: int) -> None:
        STATS.bytes_from_vm += size
        self.session.consumed(stream.id, size)
        self.flush()

    def close_stream(self, stream: ChannelStream) -> None:
        self.session.close(stream.id)
        if stream.ended:
            self._forget(stream.id)
        self.flush()

    def reset_stream(self, stream: ChannelStream, error: Exception) -> None:
        self.session.reset(stream.id, Reason.CANCELLED, str(error))
        self._fail(stream.id, error)
        self.flush()

    # The connection (asyncio.Protocol).

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses
        self._transport = transport
        self._paused = False
        self._unheard = 0
        transport.set_write_buffer_limits(high=CHANNEL_HIGH_WATER)
        self.session.start(preamble=True)
        self._flush()
        self._tick()

    def data_received(self, data: bytes) -> None:
        self._dispatch(self.session.receive(data))
        if self.session.phase is not Phase.ESTABLISHED:
            self._unheard += len(data)
            if self._unheard > UNHEARD_LIMIT:
                self._quarantine()
        self.flush()

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        for timer in (self._ticker, self._quarantined):
            if timer is not None:
                timer.cancel()
        self._quarantined = None
        self._closed_session()
        self._fail_all(StreamAborted(f"the channel to VM {self.vm} closed"))
        if self._lost is not None and not self._lost.done():
            self._lost.set_result(f"closed ({exc})" if exc else "closed by the guest side")

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        self.flush()

    def flush(self) -> None:
        """Write the session's frames soon: once per loop turn, so that streams share writes."""
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        transport = self._transport
        while transport is not None and not self._paused:
            room = CHANNEL_HIGH_WATER - transport.get_write_buffer_size()
            chunks = self.session.data_to_send(room) if room > 0 else []
            if not chunks:
                break
            transport.writelines(chunks)
        for stream in list(self._waiting_room):
            if stream.error is not None or self.backlog(stream) < STREAM_HIGH_WATER // 2:
                self._waiting_room.discard(stream)
                stream.on_room()

    def _tick(self) -> None:
        """Keepalive and re-announcements, a few times per keepalive interval."""
        self._dispatch(self.session.poll())
        self.flush()
        period = min(1.0, self.session.settings.keepalive_interval / 4)
        self._ticker = self._loop.call_later(period, self._tick)

    def _dispatch(self, events: list[Event]) -> None:
        for event in events:
            if isinstance(event, DataReceived):
                stream = self.streams.get(event.stream)
                if stream is not None:
                    stream.on_data(event.data)
            elif isinstance(event, StreamAccepted):
                self._offences = 0
                if event.stream in self.streams:
                    self.streams[event.stream].on_accepted()
            elif isinstance(event, StreamEnded):
                self._on_end(event.stream)
            elif isinstance(event, StreamRefused):
                self._fail(event.stream, self._refusal(event))
            elif isinstance(event, StreamReset):
                who = "the guest proxy" if event.by_peer else "the gateway (protocol violation)"
                text = f"reset by {who}: {reason_name(event.code)} {event.text}".rstrip()
                self._fail(event.stream, StreamAborted(text))
            else:
                self._on_channel_event(event)

    def _on_end(self, stream_id: int) -> None:
        stream = self.streams.get(stream_id)
        if stream is not None:
            stream.on_end()
            if stream.ended_here:
                self._forget(stream_id)

    def _refusal(self, event: StreamRefused) -> BadGateway:
        stream = self.streams.get(event.stream)
        port = stream.port if stream else 0
        return BadGateway(
            f"the guest proxy of VM {self.vm} refused port {port}: {event.text}",
            vm=self.vm,
            port=port,
            reason=reason_name(event.code).lower().replace("_", "-"),
        )

    def _on_channel_event(self, event: Event) -> None:
        if isinstance(event, Established):
            peer = event.peer.software or "guest proxy"
            log.info(
                "channel to VM %s established with %s (protocol %d)", self.vm, peer, event.version
            )
            self.problem = ""
            self._unheard = 0
            self._was_established = True
            if not self._counted_open:
                self._counted_open = True
                STATS.channels_open += 1
            self._signal()
        elif isinstance(event, ChannelReset):
            name = reason_name(event.code)
            STATS.channel_resets[name] += 1
            who = "by the guest proxy" if event.by_peer else "by the gateway"
            level = logging.INFO if event.code == Reason.PEER_RESTARTED else logging.WARNING
            log.log(level, "channel to VM %s reset %s: %s %s", self.vm, who, name, event.text)
            self.problem = f"the channel was reset ({name} {event.text})".rstrip()
            self._closed_session()
            self._fail_all(StreamAborted(f"the channel to VM {self.vm} was reset: {name}"))
            if not event.by_peer and event.code in _OFFENCES:
                self._quarantine()
        elif isinstance(event, ChannelFailed):
            name = reason_name(event.code)
            log.error("channel to VM %s failed: %s %s", self.vm, name, event.text)
            self.problem = f"no session possible with its guest proxy: {event.text}"
            self._closed_session()
            self._fail_all(StreamAborted(f"the channel to VM {self.vm} failed: {name}"))
            if self._transport is not None:
                self._flush()
                self._transport.close()

    def _quarantine(self) -> None:
        """Stop reading the channel for a while (see QUARANTINE_INITIAL)."""
        transport = self._transport
        self._unheard = 0
        if transport is None or self._quarantined is not None:
            return
        pause = min(QUARANTINE_CAP, QUARANTINE_INITIAL * 2**self._offences)
        self._offences += 1
        log.warning("channel to VM %s: not read for %.1f s", self.vm, pause)
        transport.pause_reading()
        self._quarantined = self._loop.call_later(pause, self._release, transport)

    def _release(self, transport: asyncio.Transport) -> None:
        self._quarantined = None
        if transport is self._transport:
            transport.resume_reading()

    def _closed_session(self) -> None:
        if self._counted_open:
            self._counted_open = False
            STATS.channels_open -= 1

    def _fail(self, stream_id: int, error: Exception) -> None:
        stream = self._forget(stream_id)
        if stream is not None:
            stream.on_error(error)

    def _fail_all(self, error: Exception) -> None:
        for stream_id in list(self.streams):
            self._fail(stream_id, error)

    def _forget(self, stream_id: int) -> ChannelStream | None:
        stream = self.streams.pop(stream_id, None)
        if stream is not None:
            STATS.streams_open -= 1
            self._waiting_room.discard(stream)
        return stream

    def _signal(self) -> None:
        """Wake the requests waiting in `ready`."""
        self._changed.set()
        self._changed = asyncio.Event()

    async def _run(self) -> None:
        """Find the socket, connect, serve until the connection ends, wait, again."""
        delay = RETRY_INITIAL
        try:
            while not self._stopping:
                started = self._loop.time()
                self._wake.clear()
                try:
                    path = await self._locate(self.vm)
                except NotFound as error:
                    self.problem = error.detail
                    break
                except VmfabricError as error:  # e.g. the VM is stopped
                    self.problem = error.detail
                except Exception as error:  # the store or the host agent failed: try later
                    self.problem = f"cannot find its channel: {type(error).__name__}: {error}"
                else:
                    if path is None:
                        self.problem = "its host's hypervisor gives it no access channel"
                    elif await self._serve(path):
                        delay = RETRY_INITIAL
                self._failures += 1
                self._signal()
                log.debug("channel to VM %s: %s; again in %.1f s", self.vm, self.problem, delay)
                if self._loop.time() - self.last_used > IDLE_CLOSE_S:
                    break
                await self._backoff(started, delay)
                delay = min(delay * 2, RETRY_CAP)
        finally:
            self._stopping = True
            self._signal()
            self._on_gone(self)

    async def _serve(self, path: str) -> bool:
        """One connection, until it ends; whether a session was established on it."""
        self._lost = self._loop.create_future()
        try:
            await self._loop.create_unix_connection(lambda: self, path)
        except OSError as error:
            self.problem = f"cannot connect to {path}: {error.strerror or error}"
            return False
        self.problem = f"connected to {path}, but the guest proxy did not answer (no HELLO)"
        self._was_established = False
        reason = await self._lost
        self.problem = f"the channel {path} {reason}"
        return self._was_established

    async def _backoff(self, started: float, delay: float) -> None:
        """Wait `delay`, or less when a request wakes us, but at least RETRY_INITIAL since the
        last attempt started."""
        try:
            await asyncio.wait_for(self._wake.wait(), delay)
        except TimeoutError:
            return
        pause = RETRY_INITIAL - (self._loop.time() - started)
        if pause > 0:
            await asyncio.sleep(pause)


class ChannelPool:
    """The channels of every VM used through the gateway, one each, made on first use."""

    def __init__(self, locate: Locate, settings: Settings = GATEWAY_SETTINGS) -> None:
        self._locate = locate
        self._settings = settings
        self._channels: dict[str, VmChannel] = {}

    async def open(self, vm: str, port: int) -> ChannelStream:
        """A stream to 127.0.0.1:port in `vm`, once its channel is up (503 otherwise)."""
        channel = self._channels.get(vm)
        if channel is None:
            channel = self._channels[vm] = VmChannel(vm, self._locate, self._settings, self._gone)
        await channel.ready()
        return channel.open(port)

    async def close(self) -> None:
        """Close every channel (the guest proxies are told the gateway is going away)."""
        await asyncio.gather(*(channel.close() for channel in list(self._channels.values())))

    def _gone(self, channel: VmChannel) -> None:
        if self._channels.get(channel.vm) is channel:
            del self._channels[channel.vm]
