"""The guest proxy as shipped, driven by a test-only host over its lab unix socket.

The proxy is the built zipapp, run by an interpreter without site-packages (`-I -S`), listening
on a unix socket in the test's directory. The host side is `Host` below: the shared protocol
`Session` over an asyncio connection, what the real gateway will be in miniature. The servers
the streams reach run in a child process (so that timing figures are not the test's own loop
competing with them): echo, a byte source, a byte sink, an upper-caser that answers after the
request ended, one that resets its connections, one that never reads, one that never accepts.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
import tty
from collections import defaultdict
from collections.abc import AsyncIterator, Callable, Iterator
from multiprocessing.connection import Connection
from pathlib import Path
from typing import NamedTuple

import pytest
from processes import ProxyProcess, forked, proxy_command

from vmfabric.access.channel import (
    HEADER,
    Frame,
    FrameDecoder,
    FrameType,
    Reason,
    Role,
    data_header,
    decode_hello,
    decode_reason,
    encode_frame,
)
from vmfabric.access.session import (
    ChannelReset,
    DataReceived,
    Established,
    Event,
    Phase,
    PongReceived,
    Session,
    Settings,
    StreamAccepted,
    StreamEnded,
    StreamRefused,
    StreamReset,
)

pytestmark = pytest.mark.anyio

READ_SIZE = 256 * 1024
SEND_CHUNK = 1024 * 1024
PATTERN = bytes(range(256)) * 4096


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class Ports(NamedTuple):
    echo: int
    source: int
    sink: int
    upper: int
    rst: int
    stall: int
    backlog: int
    closed: int
    forbidden: int


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while data := await reader.read(READ_SIZE):
        writer.write(data)
        await writer.drain()
    writer.close()


async def _source(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Sends as many bytes of PATTERN as the first line asks for, then closes."""
    remaining = int(await reader.readline())
    while remaining > 0:
        chunk = PATTERN[: min(remaining, len(PATTERN))]
        writer.write(chunk)
        remaining -= len(chunk)
        await writer.drain()
    writer.close()


async def _sink(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Counts the bytes until EOF and answers with the count."""
    count = 0
    while data := await reader.read(READ_SIZE):
        count += len(data)
    writer.write(str(count).encode())
    writer.close()


async def _upper(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Answers only once the request has ended (needs the half-close)."""
    writer.write((await reader.read()).upper())
    writer.close()


async def _rst(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Resets the connection (RST, not FIN) after the first bytes."""
    await reader.read(1)
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


async def _stall(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Never reads: whatever comes piles up in the socket buffers."""
    await asyncio.Event().wait()


def _full_backlog() -> tuple[socket.socket, list[socket.socket]]:
    """A listening socket whose accept queue is full: new connections hang (SYNs dropped)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    clients = []
    for _ in range(3):
        client = socket.socket()
        client.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            client.connect(listener.getsockname())
        clients.append(client)
    return listener, clients


async def _servers(conn: Connection) -> None:
    ports: dict[str, int] = {}
    handlers = {"echo": _echo, "source": _source, "sink": _sink, "upper": _upper}
    handlers |= {"rst": _rst, "stall": _stall, "forbidden": _echo}
    servers = [await asyncio.start_server(handler, "127.0.0.1", 0) for handler in handlers.values()]
    for name, server in zip(handlers, servers, strict=True):
        ports[name] = server.sockets[0].getsockname()[1]
    backlog, _clients = _full_backlog()
    ports["backlog"] = backlog.getsockname()[1]
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    ports["closed"] = closed.getsockname()[1]
    conn.send(ports)
    await asyncio.Event().wait()


def _serve(conn: Connection) -> None:
    asyncio.run(_servers(conn))


@pytest.fixture(scope="module")
def ports() -> Iterator[Ports]:
    with forked(_serve) as conn:
        assert conn.poll(10), "the test servers did not start"
        yield Ports(**conn.recv())


@pytest.fixture
def spare() -> Iterator[socket.socket]:
    """A listening socket whose port the proxy allows, for servers the test runs itself."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        yield listener


def _allowed(ports: Ports, spare: socket.socket) -> str:
    """Every test server's port but the forbidden one, and the spare one."""
    allowed = [*ports._asdict().values(), spare.getsockname()[1]]
    allowed.remove(ports.forbidden)
    return ",".join(map(str, allowed))


@pytest.fixture
def proxy_factory(
    tmp_path: Path, bundle: Path, ports: Ports, spare: socket.socket
) -> Iterator[Callable[..., ProxyProcess]]:
    started: list[ProxyProcess] = []

    def start(
        *extra: str, interpreter: str = sys.executable, allow: str = _allowed(ports, spare)
    ) -> ProxyProcess:
        path = tmp_path / f"access-{len(started)}.sock"
        allowing = ("--allow", allow) if allow else ()
        command = proxy_command(interpreter, bundle, "--unix", str(path), *allowing, *extra)
        proxy = ProxyProcess(command, path, tmp_path / "proxy.log")
        proxy.start()
        started.append(proxy)
        return proxy

    yield start
    for proxy in started:
        if proxy.running:
            proxy.stop(signal.SIGKILL)
    log = tmp_path / "proxy.log"
    print(log.read_text() if log.exists() else "no proxy log")


@pytest.fixture
def proxy(proxy_factory: Callable[..., ProxyProcess]) -> ProxyProcess:
    return proxy_factory("--connect-timeout", "0.5")


class Host:
    """A test-only host gateway: the shared Session over one channel connection.

    Received stream data is collected per stream and credited back at once, unless `credit`
    is off (then the test calls `session.consumed` itself).
    """

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        settings: Settings | None = None,
        *,
        credit: bool = True,
    ) -> None:
        self.session = Session(Role.HOST, settings or Settings(software="test-host"))
        self.reader = reader
        self.writer = writer
        self.credit = credit
        self.events: list[Event] = []
        self.received: dict[int, bytearray] = defaultdict(bytearray)
        self.eof = False
        self._changed = asyncio.Event()
        self._reading: asyncio.Task[None] | None = None

    @classmethod
    async def connect(cls, path: Path, settings: Settings | None = None, **kw: bool) -> Host:
        reader, writer = await asyncio.open_unix_connection(str(path))
        host = cls(reader, writer, settings, **kw)
        host.start()
        await host.established()
        return host

    def start(self, *, preamble: bool = False) -> None:
        """(Re)start the session, as a host that restarts or reconnects does."""
        self.session.start(preamble=preamble)
        self.flush()
        if self._reading is None:
            self._reading = asyncio.get_running_loop().create_task(self._read())

    def stop_reading(self) -> None:
        assert self._reading is not None
        self._reading.cancel()

    async def established(self) -> None:
        await self.until(lambda: self.session.phase is Phase.ESTABLISHED)

    def close(self) -> None:
        if self._reading:
            self._reading.cancel()
        self.writer.close()

    async def _read(self) -> None:
        while data := await self.reader.read(READ_SIZE):
            self.take(self.session.receive(data))
            self.flush()
        self.eof = True
        self._changed.set()

    def take(self, events: list[Event]) -> None:
        for event in events:
            if isinstance(event, DataReceived):
                self.received[event.stream] += event.data
                if self.credit:
                    self.session.consumed(event.stream, len(event.data))
            else:
                self.events.append(event)
        self._changed.set()

    def flush(self) -> None:
        self.writer.writelines(self.session.data_to_send(1 << 40))

    async def until(self, predicate: Callable[[], object], timeout: float = 10.0) -> None:
        async def wait() -> None:
            while not predicate():
                self._changed.clear()
                await self._changed.wait()

        await asyncio.wait_for(wait(), timeout)

    def of_stream(self, stream: int, kind: type[Event]) -> Event | None:
        found = [
            e for e in self.events if isinstance(e, kind) and getattr(e, "stream", 0) == stream
        ]
        return found[0] if found else None

    def finished(self, stream: int) -> bool:
        return bool(self.of_stream(stream, StreamEnded) or self.of_stream(stream, StreamReset))

    async def open(self, port: int) -> tuple[int, Event]:
        """Open a stream; its first answer (accepted, refused, reset)."""
        stream = self.session.open_stream(port)
        self.flush()
        kinds = (StreamAccepted, StreamRefused, StreamReset)
        await self.until(lambda: any(self.of_stream(stream, kind) for kind in kinds))
        answer = next(e for kind in kinds if (e := self.of_stream(stream, kind)))
        return stream, answer

    async def send(self, stream: int, data: bytes) -> None:
        """Queue data, waiting while more than a chunk is left unsent (window closed)."""
        for start in range(0, len(data), SEND_CHUNK):
            self.session.send(stream, data[start : start + SEND_CHUNK])
            self.flush()
            await self.writer.drain()
            await self.until(
                lambda: self.session.buffered(stream) < SEND_CHUNK or self.finished(stream)
            )

    async def exchange(self, port: int, request: bytes, *, timeout: float = 30) -> bytes:
        """Open, send, half-close, read everything the server answers until it closes."""
        stream, answer = await self.open(port)
        assert isinstance(answer, StreamAccepted), answer
        await self.send(stream, request)
        self.session.close(stream)
        self.flush()
        await self.until(lambda: self.finished(stream), timeout)
        assert self.of_stream(stream, StreamReset) is None
        return bytes(self.received.pop(stream, b""))


@contextlib.asynccontextmanager
async def connected(
    path: Path, settings: Settings | None = None, **kw: bool
) -> AsyncIterator[Host]:
    host = await Host.connect(path, settings, **kw)
    try:
        yield host
    finally:
        host.close()


async def _raw_frames(reader: asyncio.StreamReader, until: Callable[[int], bool]) -> list[Frame]:
    """Frames read raw (no session) until one whose type satisfies `until`."""
    decoder = FrameDecoder(resync=False)
    frames: list[Frame] = []
    while data := await asyncio.wait_for(reader.read(READ_SIZE), 10):
        for frame in decoder.feed(data):
            frames.append(frame)
            if until(frame.type):
                return frames
    return frames


async def test_a_stream_carries_data_to_the_server_and_back(
    proxy: ProxyProcess, ports: Ports
) -> None:
    async with connected(proxy.path) as host:
        peer = host.session.peer
        assert peer is not None and peer.role is Role.GUEST
        assert peer.software.startswith("vmfabric-guest-proxy/")
        assert host.session.version == 1
        request = os.urandom(3 * 1024 * 1024 + 17)
        assert await host.exchange(ports.echo, request) == request


async def test_ports_not_allowed_or_not_listening_are_refused_and_the_channel_goes_on(
    proxy: ProxyProcess, ports: Ports
) -> None:
    async with connected(proxy.path) as host:
        _, answer = await host.open(ports.forbidden)
        assert isinstance(answer, StreamRefused) and answer.code == Reason.NOT_ALLOWED
        assert str(ports.forbidden) in answer.text
        _, answer = await host.open(ports.closed)
        assert isinstance(answer, StreamRefused) and answer.code == Reason.CONNECTION_REFUSED
        _, answer = await host.open(ports.backlog)
        assert isinstance(answer, StreamRefused) and answer.code == Reason.TIMEOUT
        assert await host.exchange(ports.echo, b"still fine") == b"still fine"


async def test_a_hundred_concurrent_streams_each_get_their_own_data(
    proxy: ProxyProcess, ports: Ports
) -> None:
    async with connected(proxy.path) as host:
        requests = [os.urandom(256 * 1024 + n) for n in range(100)]
        started = time.monotonic()
        done: list[float] = []

        async def one(request: bytes) -> bytes:
            answer = await host.exchange(ports.echo, request, timeout=60)
            done.append(time.monotonic() - started)
            return answer

        answers = await asyncio.gather(*(one(request) for request in requests))
        assert answers == requests
        total = sum(map(len, requests)) * 2 / 1e6
        print(
            f"\n100 echo streams: {total / max(done):.0f} MB/s together; streams done after "
            f"{min(done):.2f} s (first) to {max(done):.2f} s (last)"
        )


async def test_a_half_close_lets_the_server_answer_after_the_request(
    proxy: ProxyProcess, ports: Ports
) -> None:
    async with connected(proxy.path) as host:
        assert await host.exchange(ports.upper, b"hello, guest") == b"HELLO, GUEST"


@contextlib.asynccontextmanager
async def watched(listener: socket.socket) -> AsyncIterator[asyncio.Future[str]]:
    """A server on the spare port; the future tells how its first connection ended."""
    ended: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    async def watch(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while await reader.read(READ_SIZE):
                pass
            ended.set_result("eof")
        except ConnectionResetError:
            ended.set_result("reset")

    async with await asyncio.start_server(watch, sock=listener):
        yield ended


async def test_a_reset_from_the_host_aborts_the_servers_connection(
    proxy: ProxyProcess, spare: socket.socket
) -> None:
    async with watched(spare) as ended, connected(proxy.path) as host:
        stream, answer = await host.open(spare.getsockname()[1])
        assert isinstance(answer, StreamAccepted)
        await host.send(stream, b"x" * 1000)
        host.session.reset(stream, Reason.CANCELLED, "user went away")
        host.flush()
        assert await asyncio.wait_for(ended, 5) == "reset"


async def test_a_server_that_resets_its_connection_resets_the_stream(
    proxy: ProxyProcess, ports: Ports
) -> None:
    async with connected(proxy.path) as host:
        stream, _ = await host.open(ports.rst)
        await host.send(stream, b"boom")
        await host.until(lambda: host.of_stream(stream, StreamReset))
        reset = host.of_stream(stream, StreamReset)
        assert isinstance(reset, StreamReset) and reset.by_peer
        assert reset.code == Reason.CONNECTION_RESET


async def test_a_configuration_file_sets_the_allowed_ports(
    proxy_factory: Callable[..., ProxyProcess], ports: Ports, tmp_path: Path
) -> None:
    config = tmp_path / "guest-proxy.conf"
    config.write_text(f"[guest-proxy]\nallow = {ports.echo}, {ports.rst}-{ports.rst}\n")
    proxy = proxy_factory("--config", str(config), allow="")
    async with connected(proxy.path) as host:
        assert await host.exchange(ports.echo, b"from the file") == b"from the file"
        _, answer = await host.open(ports.upper)
        assert isinstance(answer, StreamRefused) and answer.code == Reason.NOT_ALLOWED


async def test_the_guest_never_sends_more_than_the_window_granted(
    proxy: ProxyProcess, ports: Ports
) -> None:
    settings = Settings(initial_window=100_000, software="stingy host")
    async with connected(proxy.path, settings, credit=False) as host:
        stream, _ = await host.open(ports.source)
        await host.send(stream, b"5000000\n")
        await host.until(lambda: len(host.received[stream]) >= 100_000)
        await asyncio.sleep(0.5)
        assert len(host.received[stream]) == 100_000
        host.session.consumed(stream, 60_000)
        host.flush()
        await host.until(lambda: len(host.received[stream]) >= 160_000)
        await asyncio.sleep(0.3)
        assert len(host.received[stream]) == 160_000
        host.credit = True
        host.session.consumed(stream, 100_000)
        host.flush()
        await host.until(lambda: host.finished(stream))
        assert bytes(host.received[stream]) == (PATTERN * 5)[:5_000_000]


async def test_pings_are_answered_and_a_silent_host_is_given_up(
    proxy_factory: Callable[..., ProxyProcess],
) -> None:
    proxy = proxy_factory("--keepalive", "0.2")
    async with connected(proxy.path) as host:
        host.session.ping(b"are you there")
        host.flush()
        await host.until(lambda: any(isinstance(e, PongReceived) for e in host.events))
        assert PongReceived(b"are you there") in host.events
        host.stop_reading()
        frames = await _raw_frames(host.reader, lambda kind: kind == FrameType.HELLO)
    kinds = [frame.type for frame in frames]
    assert FrameType.PING in kinds and kinds[-2:] == [FrameType.ERROR, FrameType.HELLO]
    assert decode_reason(frames[-2])[0] == Reason.KEEPALIVE_TIMEOUT
    assert decode_hello(frames[-1]).echo == 0


async def test_the_proxy_restarted_says_hello_and_the_host_starts_over(
    proxy: ProxyProcess, ports: Ports
) -> None:
    async with connected(proxy.path) as host:
        first = host.session.peer
        await host.open(ports.stall)
        assert proxy.stop(signal.SIGTERM) == 0
        await host.until(lambda: host.eof)
        reset = next(e for e in host.events if isinstance(e, ChannelReset))
        assert reset.by_peer and reset.code == Reason.GOING_AWAY
        assert not proxy.path.exists()
    proxy.start()
    async with connected(proxy.path) as host:
        assert host.session.peer is not None and first is not None
        assert host.session.peer.nonce != first.nonce
        assert await host.exchange(ports.echo, b"again") == b"again"
    assert proxy.stop(signal.SIGKILL) == -signal.SIGKILL
    proxy.start()
    async with connected(proxy.path) as host:
        assert await host.exchange(ports.echo, b"after a kill") == b"after a kill"


async def test_a_host_hello_mid_session_resets_the_streams_and_starts_over(
    proxy: ProxyProcess, ports: Ports, spare: socket.socket
) -> None:
    async with watched(spare) as ended, connected(proxy.path) as host:
        await host.open(spare.getsockname()[1])
        host.start()
        await host.established()
        assert await asyncio.wait_for(ended, 5) == "reset"
        assert await host.exchange(ports.echo, b"new session") == b"new session"


async def test_a_new_connection_replaces_the_old_one(proxy: ProxyProcess, ports: Ports) -> None:
    async with connected(proxy.path) as first, connected(proxy.path) as second:
        await first.until(lambda: first.eof)
        assert await second.exchange(ports.echo, b"second") == b"second"


async def test_garbage_resets_the_channel_then_a_new_session_starts_on_it(
    proxy: ProxyProcess, ports: Ports
) -> None:
    async with connected(proxy.path) as host:
        await host.open(ports.stall)
        host.writer.write(b"\xff" + os.urandom(4096))
        await host.until(lambda: any(isinstance(e, ChannelReset) for e in host.events))
        reset = next(e for e in host.events if isinstance(e, ChannelReset))
        assert reset.by_peer and reset.code == Reason.PROTOCOL_ERROR
        await host.until(lambda: sum(isinstance(e, Established) for e in host.events) == 2)
        assert host.session.stream_count == 0
        assert await host.exchange(ports.echo, b"resynchronised") == b"resynchronised"
    async with connected(proxy.path) as host:
        assert await host.exchange(ports.echo, b"next connection") == b"next connection"


async def test_an_oversized_frame_resets_the_channel(proxy: ProxyProcess, ports: Ports) -> None:
    async with connected(proxy.path) as host:
        host.writer.write(HEADER.pack(FrameType.DATA, 0, 0, 1, 1 << 20))
        await host.until(lambda: sum(isinstance(e, Established) for e in host.events) == 2)
        reset = next(e for e in host.events if isinstance(e, ChannelReset))
        assert reset.code == Reason.PROTOCOL_ERROR and "limit" in reset.text
        assert await host.exchange(ports.echo, b"ok") == b"ok"


async def test_data_beyond_the_window_resets_only_that_stream(
    proxy: ProxyProcess, ports: Ports
) -> None:
    async with connected(proxy.path) as host:
        flooded, _ = await host.open(ports.stall)
        other, _ = await host.open(ports.echo)
        frame = data_header(flooded, 65536) + bytes(65536)
        host.writer.write(frame * 256)
        await host.until(lambda: host.of_stream(flooded, StreamReset))
        reset = host.of_stream(flooded, StreamReset)
        assert isinstance(reset, StreamReset) and reset.code == Reason.FLOW_CONTROL
        await host.send(other, b"unaffected")
        await host.until(lambda: bytes(host.received[other]) == b"unaffected")
        assert host.session.phase is Phase.ESTABLISHED and proxy.running


async def test_a_ping_flood_from_a_host_that_never_reads_resets_the_channel(
    proxy: ProxyProcess, ports: Ports
) -> None:
    async with connected(proxy.path) as host:
        host.stop_reading()
        host.writer.write(encode_frame(FrameType.PING, 0, b"12345678") * 400_000)
        await host.writer.drain()
        frames = await _raw_frames(host.reader, lambda kind: kind == FrameType.ERROR)
        assert decode_reason(frames[-1])[0] == Reason.FLOOD
        assert len(frames) < 300_000
    assert proxy.running
    async with connected(proxy.path) as host:
        assert await host.exchange(ports.echo, b"survived") == b"survived"


async def test_device_mode_over_a_character_device(
    bundle: Path, ports: Ports, tmp_path: Path, spare: socket.socket
) -> None:
    """A pty in raw mode stands in for the virtio-serial port: same syscalls, a char device."""
    master, slave = os.openpty()
    tty.setraw(slave)
    device = os.ttyname(slave)
    command = proxy_command(sys.executable, bundle, "--device", device, "--allow", str(ports.upper))
    log = tmp_path / "proxy.log"
    with log.open("wb") as stderr:
        process = subprocess.Popen(command, stderr=stderr)
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    reading, _ = await loop.connect_read_pipe(
        lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(master, "rb", buffering=0)
    )
    transport, protocol = await loop.connect_write_pipe(
        asyncio.streams.FlowControlMixin, os.fdopen(os.dup(master), "wb", buffering=0)
    )
    host = Host(reader, asyncio.StreamWriter(transport, protocol, reader, loop))
    try:
        host.start()
        await host.established()
        assert await host.exchange(ports.upper, b"over a device") == b"OVER A DEVICE"
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(10) == 0, log.read_text()
        host.close()
        reading.close()
        os.close(slave)


def _python_3_8() -> str | None:
    """The oldest Python the guest proxy supports, if this machine has one."""
    candidates = [
        shutil.which("python3.8"),
        *map(str, Path.home().glob(".pyenv/versions/3.8*/bin/python3")),
    ]
    for candidate in filter(None, candidates):
        if subprocess.run([candidate, "-c", "0"], capture_output=True, check=False).returncode == 0:
            return candidate
    return None


async def test_the_bundle_serves_under_python_3_8(
    proxy_factory: Callable[..., ProxyProcess], ports: Ports
) -> None:
    interpreter = _python_3_8()
    if interpreter is None:
        pytest.skip("no Python 3.8 on this machine")
    proxy = proxy_factory(interpreter=interpreter)
    async with connected(proxy.path) as host:
        assert await host.exchange(ports.upper, b"old python") == b"OLD PYTHON"


async def test_throughput_through_the_proxy(proxy: ProxyProcess, ports: Ports) -> None:
    """Printed, not asserted: one stream each way, through channel, proxy and a local server."""
    size = 256 * 1024 * 1024
    async with connected(proxy.path) as host:
        payload = bytes(size)
        started = time.monotonic()
        count = await host.exchange(ports.sink, payload, timeout=120)
        upload = time.monotonic() - started
        assert int(count) == size
        started = time.monotonic()
        stream, _ = await host.open(ports.source)
        await host.send(stream, f"{size}\n".encode())
        await host.until(lambda: host.finished(stream), 120)
        download = time.monotonic() - started
        assert len(host.received[stream]) == size
    print(
        f"\nsingle stream through the guest proxy: host→server {size / upload / 1e6:.0f} MB/s, "
        f"server→host {size / download / 1e6:.0f} MB/s"
    )
