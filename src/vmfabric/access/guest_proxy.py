"""vmfabric-guest-proxy: the second proxy, inside the VM (CN107273186A).

It opens the access channel (the virtio-serial port the host gateway reaches through QEMU, or
in the lab a unix socket it listens on), speaks the channel protocol (`vmfabric.access.session`)
and connects each stream the host opens to 127.0.0.1:<port> in the guest, for the ports it is
told to allow. Standard library only, Python 3.8 or later: it ships as one file
(`vmfabric.access.bundle`) for any Linux guest. Logs go to stderr; SIGTERM stops it cleanly.
"""

from __future__ import annotations

import argparse
import asyncio
import configparser
import contextlib
import logging
import os
import signal
import socket
import struct
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from vmfabric import __version__
from vmfabric.access.channel import DEFAULT_WINDOW, PROTOCOL_VERSIONS, Reason, Role, reason_name
from vmfabric.access.session import (
    ChannelFailed,
    ChannelReset,
    DataReceived,
    Established,
    Event,
    Session,
    Settings,
    StreamEnded,
    StreamOpened,
    StreamReset,
)

DEFAULT_DEVICE = "/dev/virtio-ports/org.vmfabric.access.0"
CONFIG_SECTION = "guest-proxy"
READ_SIZE = 256 * 1024
LINK_HIGH_WATER = 1024 * 1024
"""Channel output buffered here before no more frames are taken from the session."""
STREAM_HIGH_WATER = 256 * 1024
"""A stream's queued bytes (window exhausted, channel busy) before its server is read no more."""
RETRY_INITIAL = 0.5
RETRY_CAP = 5.0
SHUTDOWN_GRACE = 1.0
_LINGER_RESET = struct.pack("ii", 1, 0)

log = logging.getLogger("vmfabric.guest_proxy")


class ConfigError(Exception):
    """Bad options or configuration file."""


@dataclass(frozen=True)
class Config:
    """Where the channel is, which ports the host may reach, and the protocol limits."""

    device: str
    unix: str | None
    allow: frozenset[int]
    connect_timeout: float
    settings: Settings


def parse_ports(text: str) -> frozenset[int]:
    """The ports of a list such as `22, 80,8000-8010`."""
    ports: set[int] = set()
    for item in filter(None, (part.strip() for part in text.split(","))):
        low, _, high = item.partition("-")
        try:
            first, last = int(low), int(high or low)
        except ValueError:
            raise ConfigError(f"not a port or port range: {item!r}") from None
        if not 0 < first <= last < 65536:
            raise ConfigError(f"port range out of 1..65535: {item!r}")
        ports.update(range(first, last + 1))
    return frozenset(ports)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vmfabric-guest-proxy",
        description="Serve the vmfabric access channel inside a VM: streams the host opens go "
        "to 127.0.0.1:<port> for the allowed ports.",
    )
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--device", help=f"virtio-serial port to open (default {DEFAULT_DEVICE})")
    where.add_argument("--unix", metavar="PATH", help="listen on this unix socket (the lab)")
    parser.add_argument(
        "--allow",
        action="append",
        metavar="PORTS",
        help="ports the host may open, e.g. 22,80,8000-8099 (repeatable; adds to the file's)",
    )
    parser.add_argument(
        "--config",
        metavar="FILE",
        help=f"INI file, section [{CONFIG_SECTION}]: allow, device, unix, connect-timeout, "
        "keepalive, max-streams, window (options given here win)",
    )
    parser.add_argument("--connect-timeout", type=float, help="seconds (default 5)")
    parser.add_argument(
        "--keepalive",
        type=float,
        help="seconds of silence before a PING (default 10); 3 times that and the channel is "
        "considered dead",
    )
    parser.add_argument("--max-streams", type=int, help="streams open at once (default 256)")
    parser.add_argument("--window", type=int, help="per-stream receive window, bytes")
    parser.add_argument(
        "--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR")
    )
    versions = ",".join(map(str, PROTOCOL_VERSIONS))
    parser.add_argument(
        "--version", action="version", version=f"%(prog)s {__version__} (protocol {versions})"
    )
    return parser


def _read_config_file(path: str) -> dict[str, str]:
    parser = configparser.ConfigParser()
    try:
        with open(path, encoding="utf-8") as file:
            parser.read_file(file)
    except (OSError, configparser.Error) as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from None
    return dict(parser[CONFIG_SECTION]) if parser.has_section(CONFIG_SECTION) else {}


def load_config(argv: Sequence[str]) -> tuple[Config, str]:
    """The configuration from the command line over the file; also the log level."""
    options = _parser().parse_args(argv)
    file = _read_config_file(options.config) if options.config else {}

    def pick(option: object, key: str, default: str) -> str:
        return str(option) if option is not None else file.get(key, default)

    allow = parse_ports(",".join([file.get("allow", ""), *(options.allow or ())]))
    unix = options.unix or (None if options.device else file.get("unix"))
    try:
        keepalive = float(pick(options.keepalive, "keepalive", "10"))
        settings = Settings(
            max_streams=int(pick(options.max_streams, "max-streams", "256")),
            initial_window=int(pick(options.window, "window", str(DEFAULT_WINDOW))),
            keepalive_interval=keepalive,
            keepalive_timeout=3 * keepalive,
            software=f"vmfabric-guest-proxy/{__version__}",
        )
        timeout = float(pick(options.connect_timeout, "connect-timeout", "5"))
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    device = pick(options.device, "device", DEFAULT_DEVICE)
    return Config(device, unix, allow, timeout, settings), options.log_level


class ChannelLink:
    """The open channel: a non-blocking descriptor (the port, or an accepted unix socket).

    Reads go to the proxy as they come; writes are buffered here and flushed when the
    descriptor is writable. `lost` completes with a reason when the descriptor fails or the
    other end closes it.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, fd: int, proxy: GuestProxy) -> None:
        self._loop = loop
        self._fd = fd
        self._proxy = proxy
        self._out = bytearray()
        self._waiting_writable = False
        self.established = False
        self.lost: asyncio.Future[str] = loop.create_future()
        loop.add_reader(fd, self._readable)

    @property
    def room(self) -> int:
        """How many more bytes to take from the session now."""
        return 0 if self.lost.done() else LINK_HIGH_WATER - len(self._out)

    def write(self, chunks: Iterable[bytes]) -> None:
        if self.lost.done():
            return
        for chunk in chunks:
            self._out += chunk
        if not self._waiting_writable:
            self._write_some()

    async def drain(self, timeout: float) -> None:
        """Wait until everything buffered is written (or the link is lost, or time is up)."""
        deadline = self._loop.time() + timeout
        while self._out and not self.lost.done() and self._loop.time() < deadline:
            await asyncio.sleep(0.01)

    def close(self, reason: str) -> None:
        if self.lost.done():
            return
        self._loop.remove_reader(self._fd)
        if self._waiting_writable:
            self._loop.remove_writer(self._fd)
        os.close(self._fd)
        self.lost.set_result(reason)

    def _readable(self) -> None:
        try:
            data = os.read(self._fd, READ_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self.close(f"read failed: {exc.strerror}")
            return
        if data:
            self._proxy.channel_data(data)
        else:
            self.close("closed by the other end")

    def _write_some(self) -> None:
        try:
            while self._out:
                del self._out[: os.write(self._fd, self._out)]
        except (BlockingIOError, InterruptedError):
            if not self._waiting_writable:
                self._waiting_writable = True
                self._loop.add_writer(self._fd, self._writable)
            return
        except OSError as exc:
            self.close(f"write failed: {exc.strerror}")
            return
        if self._waiting_writable:
            self._waiting_writable = False
            self._loop.remove_writer(self._fd)

    def _writable(self) -> None:
        self._write_some()
        self._proxy.flush()


class LocalStream(asyncio.Protocol):
    """One stream's TCP connection to the server on 127.0.0.1 inside the guest.

    Bytes from the host are written to the server and credited back to the host (WINDOW) as
    soon as the transport takes them without passing its high-water mark, later otherwise, so
    a slow server holds back its own stream only.
    """

    def __init__(self, proxy: GuestProxy, stream_id: int, port: int) -> None:
        self.proxy = proxy
        self.id = stream_id
        self.port = port
        self.transport: asyncio.Transport | None = None
        self.connecting: asyncio.Task[None] | None = None
        self.aborted = False
        self.ready = False
        self.ended_by_host = False
        self.ended_by_server = False
        self._early: list[bytes] = []
        self._writes_paused = False
        self._owed = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        if self.aborted:
            transport.abort()
        else:
            transport.set_write_buffer_limits(high=STREAM_HIGH_WATER)

    def data_received(self, data: bytes) -> None:
        self.proxy.from_server(self, data)

    def eof_received(self) -> bool:
        self.ended_by_server = True
        self.proxy.session.close(self.id)
        self.proxy.flush()
        return not self.ended_by_host

    def connection_lost(self, exc: Exception | None) -> None:
        self.proxy.server_gone(self, exc)

    def pause_writing(self) -> None:
        self._writes_paused = True

    def resume_writing(self) -> None:
        self._writes_paused = False
        owed, self._owed = self._owed, 0
        self.proxy.session.consumed(self.id, owed)
        self.proxy.flush()

    def connected(self) -> None:
        """The connection is accepted: pass on what the host sent meanwhile."""
        self.ready = True
        early, self._early = self._early, []
        for data in early:
            self.deliver(data)
        if self.ended_by_host:
            self.end()

    def deliver(self, data: bytes) -> None:
        transport = self.transport
        if not self.ready or transport is None:
            self._early.append(data)
            return
        if not transport.is_closing():
            transport.write(data)
        if self._writes_paused:
            self._owed += len(data)
        else:
            self.proxy.session.consumed(self.id, len(data))

    def end(self) -> None:
        """The host half-closed: the server sees EOF once the data before it is written."""
        self.ended_by_host = True
        transport = self.transport
        if not self.ready or transport is None or transport.is_closing():
            return
        if self.ended_by_server:
            transport.close()
        else:
            transport.write_eof()

    def abort(self) -> None:
        """The stream is reset: the server gets a TCP reset too, not an orderly end."""
        self.aborted = True
        if self.connecting:
            self.connecting.cancel()
        if self.transport:
            sock = self.transport.get_extra_info("socket")
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
            self.transport.abort()


class GuestProxy:
    """The session on the current channel and the streams it carries."""

    def __init__(self, config: Config, loop: asyncio.AbstractEventLoop) -> None:
        self.config = config
        self.loop = loop
        self.session = Session(Role.GUEST, config.settings)
        self.link: ChannelLink | None = None
        self.streams: dict[int, LocalStream] = {}
        self._paused: set[LocalStream] = set()
        self._flush_scheduled = False
        self._ticker: asyncio.TimerHandle | None = None

    def attach(self, fd: int, *, preamble: bool) -> ChannelLink:
        """A new channel (replacing any other): new session, HELLO first."""
        if self.link:
            self.link.close("replaced by a new connection")
            self._abort_all()
        if self._ticker:
            self._ticker.cancel()
        link = self.link = ChannelLink(self.loop, fd, self)
        link.lost.add_done_callback(lambda lost: self._link_lost(link, lost.result()))
        self.session.start(preamble=preamble)
        self._tick()
        return link

    async def shutdown(self) -> None:
        """Tell the host we are going (ERROR GOING_AWAY), give it a moment to get it, close."""
        link = self.link
        if link is None:
            return
        self.session.fail(Reason.GOING_AWAY, "guest proxy stopping")
        self._flush()
        await link.drain(SHUTDOWN_GRACE)
        link.close("stopping")

    def channel_data(self, data: bytes) -> None:
        self._dispatch(self.session.receive(data))
        self.flush()

    def flush(self) -> None:
        """Write the session's frames soon: once per loop turn, so streams share the writes."""
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self.loop.call_soon(self._flush)

    def from_server(self, stream: LocalStream, data: bytes) -> None:
        self.session.send(stream.id, data)
        if self.session.buffered(stream.id) >= STREAM_HIGH_WATER and stream.transport:
            stream.transport.pause_reading()
            self._paused.add(stream)
        self.flush()

    def server_gone(self, stream: LocalStream, exc: Exception | None) -> None:
        """The server's connection closed: a reset unless both sides had finished."""
        if self.streams.get(stream.id) is stream:
            del self.streams[stream.id]
        self._paused.discard(stream)
        if stream.aborted or (stream.ended_by_host and stream.ended_by_server and exc is None):
            return
        self.session.reset(stream.id, Reason.CONNECTION_RESET, str(exc or "connection closed"))
        self.flush()

    def _flush(self) -> None:
        self._flush_scheduled = False
        link = self.link
        while link and link.room > 0:
            chunks = self.session.data_to_send(link.room)
            if not chunks:
                break
            link.write(chunks)
        for stream in list(self._paused):
            if self.session.buffered(stream.id) < STREAM_HIGH_WATER // 2:
                self._paused.discard(stream)
                if stream.transport:
                    stream.transport.resume_reading()

    def _tick(self) -> None:
        """Keepalive and re-announcements, a few times per interval."""
        self._dispatch(self.session.poll())
        self.flush()
        period = min(1.0, self.config.settings.keepalive_interval / 4)
        self._ticker = self.loop.call_later(period, self._tick)

    def _link_lost(self, link: ChannelLink, reason: str) -> None:
        if self.link is not link:
            return
        log.info("channel closed: %s", reason)
        self.link = None
        if self._ticker:
            self._ticker.cancel()
        self._abort_all()

    def _dispatch(self, events: list[Event]) -> None:
        for event in events:
            if isinstance(event, DataReceived):
                stream = self.streams.get(event.stream)
                if stream:
                    stream.deliver(event.data)
            elif isinstance(event, StreamEnded):
                if event.stream in self.streams:
                    self.streams[event.stream].end()
            elif isinstance(event, StreamOpened):
                self._open(event.stream, event.port)
            elif isinstance(event, StreamReset):
                self._on_stream_reset(event)
            else:
                self._on_channel_event(event)

    def _on_stream_reset(self, event: StreamReset) -> None:
        stream = self.streams.pop(event.stream, None)
        if stream:
            stream.abort()
        level = logging.DEBUG if event.by_peer else logging.WARNING
        who = "by the host" if event.by_peer else "after a protocol violation"
        reason = reason_name(event.code)
        log.log(level, "stream %d reset %s: %s %s", event.stream, who, reason, event.text)

    def _on_channel_event(self, event: Event) -> None:
        if isinstance(event, Established):
            if self.link:
                self.link.established = True
            peer = event.peer.software or "host"
            log.info("session established with %s (protocol %d)", peer, event.version)
        elif isinstance(event, ChannelReset):
            self._abort_all()
            level = logging.INFO if event.code == Reason.PEER_RESTARTED else logging.WARNING
            who = "by the host" if event.by_peer else "here"
            log.log(level, "channel reset %s: %s %s", who, reason_name(event.code), event.text)
        elif isinstance(event, ChannelFailed):
            log.error("channel failed: %s %s", reason_name(event.code), event.text)
            self._abort_all()
            self.loop.create_task(self._close_after_flush())

    async def _close_after_flush(self) -> None:
        link = self.link
        if link:
            self._flush()
            await link.drain(SHUTDOWN_GRACE)
            link.close("no session possible")

    def _open(self, stream_id: int, port: int) -> None:
        if port not in self.config.allow:
            log.info("refused stream %d to port %d: not allowed", stream_id, port)
            self.session.refuse(stream_id, Reason.NOT_ALLOWED, f"port {port} is not allowed")
            return
        stream = self.streams[stream_id] = LocalStream(self, stream_id, port)
        stream.connecting = self.loop.create_task(self._connect(stream))

    async def _connect(self, stream: LocalStream) -> None:
        """Connect to 127.0.0.1:port, then ACCEPT; REFUSE with the reason if that fails."""
        target = f"127.0.0.1:{stream.port}"
        try:
            await asyncio.wait_for(
                self.loop.create_connection(lambda: stream, "127.0.0.1", stream.port),
                self.config.connect_timeout,
            )
        # asyncio.TimeoutError, not TimeoutError: they differ before Python 3.11.
        except asyncio.TimeoutError:  # noqa: UP041
            self._refuse(stream, Reason.TIMEOUT, f"{target} did not answer in time")
        except ConnectionRefusedError:
            self._refuse(stream, Reason.CONNECTION_REFUSED, f"nothing listens on {target}")
        except OSError as exc:
            self._refuse(stream, Reason.UNREACHABLE, f"{target}: {exc.strerror}")
        else:
            log.debug("stream %d connected to %s", stream.id, target)
            stream.connecting = None
            self.session.accept(stream.id)
            stream.connected()
        self.flush()

    def _refuse(self, stream: LocalStream, reason: Reason, text: str) -> None:
        log.info("refused stream %d: %s", stream.id, text)
        stream.connecting = None
        self.streams.pop(stream.id, None)
        self.session.refuse(stream.id, reason, text)

    def _abort_all(self) -> None:
        streams, self.streams = self.streams, {}
        self._paused.clear()
        for stream in streams.values():
            stream.abort()


async def serve_device(proxy: GuestProxy, path: str, stopped: asyncio.Future[str]) -> None:
    """Keep the port open: reopen it (with a capped backoff) whenever it fails or the host
    side is not connected (reads then end at once)."""
    delay = RETRY_INITIAL
    last_reason = ""
    while not stopped.done():
        try:
            fd = os.open(path, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:
            reason = f"cannot open {path}: {exc.strerror}"
        else:
            link = proxy.attach(fd, preamble=True)
            await asyncio.wait({link.lost, stopped}, return_when=asyncio.FIRST_COMPLETED)
            if stopped.done():
                return
            reason = f"{path}: {link.lost.result()}"
            if link.established:
                delay, last_reason = RETRY_INITIAL, ""
        level = logging.DEBUG if reason == last_reason else logging.WARNING
        log.log(level, "%s; reopening in %.1f s", reason, delay)
        last_reason = reason
        await asyncio.wait({stopped}, timeout=delay)
        delay = min(delay * 2, RETRY_CAP)


async def serve_unix(proxy: GuestProxy, path: str, stopped: asyncio.Future[str]) -> None:
    """Listen on `path`; each connection is the channel until the next one replaces it.

    The socket is bound under a temporary name and renamed into place once it listens, so
    that whoever waits for `path` to appear can connect at once.
    """
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    staging = f"{path}.{os.getpid()}"
    try:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(staging)
        listener.bind(staging)
        os.chmod(staging, 0o600)
        listener.listen(1)
        listener.setblocking(False)
        os.rename(staging, path)

        def accept() -> None:
            try:
                connection, _ = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.warning("accept on %s failed: %s", path, exc.strerror)
                return
            connection.setblocking(False)
            log.info("host connected on %s", path)
            proxy.attach(connection.detach(), preamble=False)

        proxy.loop.add_reader(listener.fileno(), accept)
        await stopped
        proxy.loop.remove_reader(listener.fileno())
    finally:
        listener.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


async def run(config: Config) -> None:
    """Serve until SIGTERM or SIGINT."""
    loop = asyncio.get_running_loop()
    stopped: asyncio.Future[str] = loop.create_future()

    def stop(signum: signal.Signals) -> None:
        if not stopped.done():
            stopped.set_result(signum.name)

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop, signum)
    proxy = GuestProxy(config, loop)
    where = f"unix socket {config.unix}" if config.unix else config.device
    allowed = ",".join(map(str, sorted(config.allow))) or "none"
    log.info("vmfabric-guest-proxy %s on %s, allowed ports: %s", __version__, where, allowed)
    if not config.allow:
        log.warning("no port is allowed: every stream will be refused")
    try:
        if config.unix:
            await serve_unix(proxy, config.unix, stopped)
        else:
            await serve_device(proxy, config.device, stopped)
    finally:
        await proxy.shutdown()
    log.info("stopped")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: 0 after SIGTERM, 2 for bad options, 1 when the channel cannot be served."""
    try:
        config, level = load_config(sys.argv[1:] if argv is None else argv)
    except ConfigError as exc:
        print(f"vmfabric-guest-proxy: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        stream=sys.stderr, level=level, format="%(asctime)s %(levelname)s %(message)s"
    )
    try:
        asyncio.run(run(config))
    except OSError as exc:
        log.error("cannot serve the channel: %s", exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
