"""The client's side of raw TCP through the access gateway (`vmfabric access forward`).

A tunnel is one HTTP/1.1 request to the gateway, `GET /vm/<vm>/<port>/` with `Connection:
Upgrade`, `Upgrade: vmfabric-tcp` and the credential as a bearer token; the gateway answers
`101 Switching Protocols` once the guest proxy connected 127.0.0.1:<port> in the VM, and the
connection then carries the stream's bytes both ways (as `ssh -L` or SSM port forwarding
would). `Forwarder` listens on a local port and opens one tunnel per connection it accepts.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

import h11

from vmfabric.access.splice import READ_SIZE, SocketPipe, splice

log = logging.getLogger(__name__)

TUNNEL_PROTOCOL = b"vmfabric-tcp"
"""The `Upgrade` token of a raw TCP tunnel."""
MAX_PROBLEM = 64 * 1024
CONNECT_TIMEOUT_S = 30.0
"""How long a tunnel may take to open: the gateway waits up to 2 s for the channel and up to
15 s for the guest's answer."""


class TunnelError(Exception):
    """The gateway did not open the tunnel; the message says why (its problem's detail)."""

    def __init__(self, message: str, status: int = 0) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Gateway:
    """Where the gateway answers, from its URL (`http://HOST:PORT[/prefix]`)."""

    host: str
    port: int
    prefix: str

    @classmethod
    def from_url(cls, url: str) -> Gateway:
        """Raises ValueError for anything but a plain http:// URL."""
        parts = urlsplit(url)
        if parts.scheme != "http" or not parts.hostname or parts.query or parts.fragment:
            raise ValueError(f"expected http://HOST:PORT, not {url!r}")
        return cls(parts.hostname, parts.port or 80, parts.path.rstrip("/"))

    def authority(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


async def open_tunnel(gateway: Gateway, vm: str, port: int, credential: str) -> SocketPipe:
    """A connection to the gateway switched to the raw stream to `port` of `vm`; TunnelError
    when the gateway refuses (with the status and detail of its answer) or cannot be reached."""
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(gateway.host, gateway.port, limit=READ_SIZE), CONNECT_TIMEOUT_S
        )
    except (OSError, TimeoutError) as error:
        raise TunnelError(
            f"cannot reach the access gateway at {gateway.authority()}: {error}"
        ) from None
    try:
        async with asyncio.timeout(CONNECT_TIMEOUT_S):
            return await _upgrade(
                reader, writer, gateway=gateway, vm=vm, port=port, credential=credential
            )
    except TimeoutError:
        failure = TunnelError(f"the access gateway did not answer in {CONNECT_TIMEOUT_S:g} s")
    except (OSError, h11.ProtocolError) as broken:
        failure = TunnelError(f"the access gateway broke the connection: {broken}")
    except BaseException:
        writer.close()
        raise
    writer.close()
    raise failure


async def _upgrade(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    *,
    gateway: Gateway,
    vm: str,
    port: int,
    credential: str,
) -> SocketPipe:
    conn = h11.Connection(h11.CLIENT)
    request = h11.Request(
        method="GET",
        target=f"{gateway.prefix}/vm/{vm}/{port}/",
        headers=[
            ("host", gateway.authority()),
            ("authorization", f"Bearer {credential}"),
            ("connection", "upgrade"),
            ("upgrade", TUNNEL_PROTOCOL.decode()),
        ],
    )
    writer.write(conn.send(request) + (conn.send(h11.EndOfMessage()) or b""))
    status = 0
    body = bytearray()
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(await reader.read(READ_SIZE))
        elif isinstance(event, h11.InformationalResponse) and event.status_code == 101:
            pending, _ = conn.trailing_data
            return SocketPipe(reader, writer, bytes(pending))
        elif isinstance(event, h11.Response):
            status = event.status_code
        elif isinstance(event, h11.Data) and len(body) < MAX_PROBLEM:
            body += event.data
        elif isinstance(event, (h11.EndOfMessage, h11.ConnectionClosed)):
            raise TunnelError(_problem_detail(status, bytes(body)), status)


def _problem_detail(status: int, body: bytes) -> str:
    """`HTTP <status>: <detail>` from the gateway's problem document."""
    try:
        detail = json.loads(body).get("detail")
    except (ValueError, AttributeError):
        detail = None
    text = detail if isinstance(detail, str) else body.decode("utf-8", "replace").strip()[:200]
    return f"HTTP {status}: {text}" if status else "the access gateway closed the connection"


class Forwarder:
    """Listens on a local address; each connection accepted is spliced with a tunnel of its
    own through the gateway. `on_error` hears of each connection the gateway refused."""

    def __init__(
        self,
        gateway: Gateway,
        vm: str,
        port: int,
        credential: str,
        on_error: Callable[[str], None],
    ) -> None:
        self.gateway = gateway
        self.vm = vm
        self.port = port
        self.credential = credential
        self._on_error = on_error
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[None]] = set()

    async def start(self, host: str, port: int) -> tuple[str, int]:
        """Listen (OSError when the address is taken); the address, with the port chosen
        when `port` is 0."""
        self._server = await asyncio.start_server(self._accepted, host, port, limit=READ_SIZE)
        name = self._server.sockets[0].getsockname()
        return str(name[0]), int(name[1])

    async def close(self) -> None:
        """Stop listening and cut the connections in progress."""
        if self._server is not None:
            self._server.close()
        for task in list(self._connections):
            task.cancel()
        await asyncio.gather(*self._connections, return_exceptions=True)

    async def _accepted(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        local = SocketPipe(reader, writer)
        peer = writer.get_extra_info("peername")
        try:
            try:
                remote = await open_tunnel(self.gateway, self.vm, self.port, self.credential)
            except TunnelError as error:
                self._on_error(f"connection from {peer[0]}:{peer[1]} not forwarded: {error}")
                local.abort()
                return
            await splice(local, remote)
        finally:
            self._connections.discard(task)
