"""The access gateway's HTTP front (CN107273186A, steps 2-4): requests that name a VM and a
port and carry a credential are checked and forwarded over the VM's access channel.

Routes: `/vm/<vm>/<port>/<path>` forwards `/<path>` to 127.0.0.1:<port> in the VM; the
credential comes from `Authorization: Bearer`, from `?access=` (a GET or HEAD is then
answered 303 to the same URL without it, setting the cookie `vmfabric_access_<vm>_<port>`,
so that a browser's later requests carry it), or from that cookie. Every request is checked
and logged by `services.access.access_use`, then sent on a stream of its own (with
`Connection: close`: one stream per request, never a stale upstream connection to retry);
bodies stream both ways with backpressure. `Upgrade: websocket` is passed on, and after the
server's 101 the bytes are spliced both ways; `Upgrade: vmfabric-tcp` opens a raw TCP
tunnel to the port (what `vmfabric access forward` uses). HTTP/1.1 is parsed with h11 on both
sides, which keeps each connection's framing right (keep-alive, chunked bodies, HEAD, 1xx).
Refusals and failures are RFC 9457 problem documents (`docs/access.md`).
"""

from __future__ import annotations

import asyncio
import enum
import logging
import re
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http import HTTPStatus
from urllib.parse import unquote

import h11

from vmfabric.access.channels import BadGateway, ChannelPool, ChannelStream, StreamAborted
from vmfabric.access.splice import READ_SIZE, SocketPipe, reset, splice
from vmfabric.access.tunnel import TUNNEL_PROTOCOL
from vmfabric.api.problems import error_problem
from vmfabric.domain.access import PREFIX, QUERY_PARAMETER, UseKind
from vmfabric.domain.errors import InvalidInput, NotFound, VmfabricError
from vmfabric.services.access import access_checks_ready, access_use, prepare_access_checks
from vmfabric.services.context import Controller

log = logging.getLogger(__name__)

COOKIE_PREFIX = "vmfabric_access_"
"""The gateway's cookies are `vmfabric_access_<vm>_<port>`, with the path `/vm/<vm>/<port>/`."""
MAX_HEAD = 64 * 1024
IDLE_TIMEOUT_S = 75.0
"""How long a kept-alive connection may wait for its next request, and a request's head or
body for its next bytes."""
DISCARD_LIMIT = 1024 * 1024
DISCARD_TIMEOUT_S = 2.0
"""After answering before a request's body was read (a refusal), that much of the body is
read and dropped so the connection can serve the next request; beyond it, it is closed."""

_HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"upgrade",
    }
)
"""Headers of one connection only (RFC 9110 7.6.1); framing headers stay, h11 re-frames."""
_SET_BY_GATEWAY = frozenset(
    {b"host", b"expect", b"x-forwarded-host", b"x-forwarded-proto", b"x-forwarded-prefix"}
)
_ROUTE = re.compile(r"/vm/([^/?#]+)/([1-9][0-9]{0,4})(/[^?#]*)?(?:\?([^#]*))?")
_CREDENTIAL_IN_TARGET = re.compile(rf"(?<=[?&]{QUERY_PARAMETER}=)[^&#]*")


class Source(enum.Enum):
    """Where a request's credential came from."""

    NONE = "none"
    BEARER = "bearer"
    QUERY = "query"
    COOKIE = "cookie"


@dataclass(frozen=True)
class Route:
    """What a request target names: the VM, the port, the path below the prefix ("" when the
    prefix had no slash after it) and the query's parameters other than the credential."""

    vm: str
    port: int
    path: str
    query: tuple[str, ...]
    credential: str | None

    @property
    def prefix(self) -> str:
        return f"/vm/{self.vm}/{self.port}"

    @property
    def cookie(self) -> str:
        return f"{COOKIE_PREFIX}{self.vm}_{self.port}"

    @property
    def target(self) -> str:
        """The path and query the server in the VM gets."""
        query = "&".join(self.query)
        return f"{self.path or '/'}?{query}" if query else self.path or "/"


def parse_route(target: bytes) -> Route | None:
    """The route of a request target, None when it is not `/vm/<vm>/<port>[/...]`."""
    match = _ROUTE.fullmatch(target.decode("latin-1"))
    if match is None or int(match[2]) > 0xFFFF:
        return None
    query: list[str] = []
    credential = None
    for parameter in (match[4] or "").split("&"):
        name, _, value = parameter.partition("=")
        if name == QUERY_PARAMETER:
            credential = unquote(value)
        elif parameter:
            query.append(parameter)
    return Route(match[1], int(match[2]), match[3] or "", tuple(query), credential)


def find_credential(
    route: Route, headers: Iterable[tuple[bytes, bytes]]
) -> tuple[str | None, Source]:
    """The request's credential and where it was: `?access=` first, then a bearer credential
    of ours, then the route's cookie, then any other bearer token (so that a server's own
    bearer tokens pass through when the cookie carries ours, and a wrong token is reported as
    what it is, not as missing)."""
    bearer = None
    cookie = None
    for name, value in headers:
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            if scheme.lower() == "bearer":
                bearer = token.strip()
        elif name == b"cookie" and cookie is None:
            cookie = _cookies(value).get(route.cookie)
    if route.credential is not None:
        return route.credential, Source.QUERY
    if bearer is not None and bearer.startswith(f"{PREFIX}."):
        return bearer, Source.BEARER
    if cookie:
        return cookie, Source.COOKIE
    if bearer is not None:
        return bearer, Source.BEARER
    return None, Source.NONE


def upstream_request(
    request: h11.Request, route: Route, source: Source, client_ip: str, upgrade: bytes | None
) -> h11.Request:
    """The request as the server in the VM gets it: the path below the prefix, the query
    without the credential, `Host: 127.0.0.1:<port>`, no credential (neither our bearer
    header nor any `vmfabric_access_` cookie: the server never sees a credential), hop-by-hop
    headers dropped, `X-Forwarded-*` added, and `Connection: close` unless it upgrades."""
    connection = _connection_tokens(request.headers)
    headers: list[tuple[bytes, bytes]] = [(b"host", f"127.0.0.1:{route.port}".encode())]
    original_host = b""
    forwarded_for = b""
    for name, value in request.headers:
        if name == b"host":
            original_host = value
        elif name == b"x-forwarded-for":
            forwarded_for = value + b", "
        elif _dropped(name, connection) or (name == b"authorization" and source is Source.BEARER):
            continue
        elif name == b"cookie":
            kept = _without_our_cookies(value)
            if kept:
                headers.append((name, kept))
        else:
            headers.append((name, value))
    headers += [
        (b"x-forwarded-for", forwarded_for + client_ip.encode()),
        (b"x-forwarded-proto", b"http"),
        (b"x-forwarded-prefix", route.prefix.encode()),
    ]
    if original_host:
        headers.append((b"x-forwarded-host", original_host))
    if upgrade is None:
        headers.append((b"connection", b"close"))
    else:
        headers += [(b"connection", b"upgrade"), (b"upgrade", upgrade)]
    return h11.Request(
        method=request.method, target=route.target.encode("latin-1"), headers=headers
    )


def downstream_headers(
    response: h11.Response | h11.InformationalResponse, route: Route
) -> list[tuple[bytes, bytes]]:
    """The server's headers as the client gets them: hop-by-hop headers dropped (but an
    upgrade's), and a `Location` on the server's own paths moved under the route's prefix."""
    switching = response.status_code == 101
    connection = _connection_tokens(response.headers)
    headers = []
    for name, value in response.headers:
        if name in (b"connection", b"upgrade") and switching:
            headers.append((name, value))
        elif name in _HOP_BY_HOP or name in connection:
            continue
        elif name == b"location":
            headers.append((name, _rebase(value, route)))
        else:
            headers.append((name, value))
    return headers


def informational(
    status: HTTPStatus, headers: list[tuple[bytes, bytes]]
) -> h11.InformationalResponse:
    """A 1xx answer of the gateway's own, with its reason phrase (h11 sends none unless told,
    and a status line without one puzzles people reading `curl -i`)."""
    return h11.InformationalResponse(
        status_code=status, headers=headers, reason=status.phrase.encode()
    )


def upgrade_of(request: h11.Request) -> bytes | None:
    """The protocol a request asks to switch to (`Connection: upgrade` and `Upgrade`)."""
    if b"upgrade" not in _connection_tokens(request.headers):
        return None
    for name, value in request.headers:
        if name == b"upgrade":
            return value.strip().lower()
    return None


@dataclass
class _Record:
    """What the log line of one request says."""

    method: str
    target: str
    started: float = field(default_factory=time.monotonic)
    status: int = 0
    received: int = 0
    sent: int = 0
    note: str = ""


class HttpFront:
    """Serves the gateway's clients, one task per connection."""

    def __init__(self, ctl: Controller, pool: ChannelPool) -> None:
        self.ctl = ctl
        self.pool = pool
        self._tasks: set[asyncio.Task[None]] = set()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """A new client connection (asyncio.start_server's callback)."""
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            await ClientConnection(self, reader, writer).serve()
        finally:
            self._tasks.discard(task)

    async def close(self) -> None:
        """End every client connection."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class ClientConnection:
    """One client's HTTP/1.1 connection: its requests one after the other (keep-alive)."""

    def __init__(
        self, front: HttpFront, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self.ctl = front.ctl
        self.pool = front.pool
        self.reader = reader
        self.writer = writer
        self.conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
        peer = writer.get_extra_info("peername") or ("unknown", 0)
        self.client_ip = str(peer[0])
        self.client = f"{peer[0]}:{peer[1]}"

    async def serve(self) -> None:
        try:
            while await self._next_request():
                self.conn.start_next_cycle()
        except OSError:
            pass
        finally:
            if not self.writer.is_closing():
                self.writer.close()

    async def _next_request(self) -> bool:
        """Serve one request; whether the connection may carry another."""
        try:
            async with asyncio.timeout(IDLE_TIMEOUT_S):
                event = await self._next_event()
        except TimeoutError:
            return False
        except h11.RemoteProtocolError as error:
            record = _Record("-", "-")
            await self._refuse(InvalidInput(f"invalid HTTP request: {error}"), record)
            self._log(record)
            return False
        if not isinstance(event, h11.Request):
            return False
        record = _Record(event.method.decode("latin-1"), _loggable(event.target))
        try:
            return await self._handle(event, record)
        finally:
            self._log(record)

    async def _handle(self, request: h11.Request, record: _Record) -> bool:
        route = parse_route(request.target)
        try:
            if route is None:
                raise NotFound(
                    f"no such route {record.target!r}: the gateway serves /vm/<vm>/<port>/<path>"
                )
            if not route.path:
                raw = request.target.decode("latin-1")
                slashed = f"{route.prefix}/{raw[len(route.prefix) :]}"
                return await self._redirect(308, slashed, record)
            return await self._checked(request, route, record)
        except VmfabricError as error:
            return await self._refuse(error, record)
        except h11.RemoteProtocolError as error:
            return await self._refuse(InvalidInput(f"invalid HTTP request: {error}"), record)
        except OSError as error:
            record.note = f"connection lost: {error}"
            reset(self.writer.transport)
            return False
        except Exception as error:
            log.exception("request %s %s failed", record.method, record.target)
            return await self._refuse(VmfabricError(f"{type(error).__name__}: {error}"), record)

    async def _checked(self, request: h11.Request, route: Route, record: _Record) -> bool:
        """The credential checked (and the use logged), then the request forwarded."""
        token, source = find_credential(route, request.headers)
        upgrade = upgrade_of(request)
        tunnel = upgrade == TUNNEL_PROTOCOL
        kind = UseKind.TCP if tunnel else UseKind.HTTP
        if not access_checks_ready(self.ctl):
            await asyncio.to_thread(prepare_access_checks, self.ctl)
        with access_use(
            self.ctl, token, route.vm, route.port, client=self.client, kind=kind
        ) as grant:
            if source is Source.QUERY and request.method in (b"GET", b"HEAD") and token:
                cookie = cookie_header(route, token, grant.expires_at)
                return await self._redirect(303, f"{route.prefix}{route.target}", record, cookie)
            stream = await self.pool.open(route.vm, route.port)
            if not tunnel:
                return await self._forward(
                    request,
                    route=route,
                    source=source,
                    upgrade=upgrade,
                    stream=stream,
                    record=record,
                )
            try:
                await self._open_tunnel(stream, record)
            except BaseException:
                stream.abort()
                raise
        record.received, record.sent = await splice(self._client_pipe(), stream)
        return False

    async def _open_tunnel(self, stream: ChannelStream, record: _Record) -> None:
        """Switch the connection to the raw stream once the guest connected it."""
        if not isinstance(await self._next_event(), h11.EndOfMessage):
            raise InvalidInput("a tunnel request must not have a body")
        await stream.accepted()
        headers = [(b"upgrade", TUNNEL_PROTOCOL), (b"connection", b"upgrade")]
        await self._send(informational(HTTPStatus.SWITCHING_PROTOCOLS, headers))
        record.status = 101

    async def _forward(
        self,
        request: h11.Request,
        *,
        route: Route,
        source: Source,
        upgrade: bytes | None,
        stream: ChannelStream,
        record: _Record,
    ) -> bool:
        """Send the request on its stream and relay the answer; the body goes up while the
        answer comes down (a server may answer before it read everything)."""
        upstream = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_HEAD)
        try:
            await stream.write(
                upstream.send(upstream_request(request, route, source, self.client_ip, upgrade))
            )
            await stream.accepted()
            if self.conn.they_are_waiting_for_100_continue:
                await self._send(informational(HTTPStatus.CONTINUE, []))
            body = asyncio.create_task(self._send_body(upstream, stream, record))
            if upgrade is not None:
                await body
            relay = asyncio.create_task(self._relay(upstream, stream, route, record))
            complete = await _first_failure(body, relay)
        except StreamAborted as error:
            raise BadGateway(
                f"the stream to port {route.port} of VM {route.vm} broke: {error}",
                vm=route.vm,
                port=route.port,
            ) from None
        finally:
            stream.close()
        return complete and await self._finish_request()

    async def _send_body(
        self, upstream: h11.Connection, stream: ChannelStream, record: _Record
    ) -> None:
        """The request's body, from the client to the server, as the stream takes it; a
        client silent for IDLE_TIMEOUT_S in the middle of it is cut off."""
        while True:
            async with asyncio.timeout(IDLE_TIMEOUT_S):
                event = await self._next_event()
            if isinstance(event, h11.Data):
                record.received += len(event.data)
                await stream.write(b"".join(upstream.send_with_data_passthrough(event) or ()))
            elif isinstance(event, h11.EndOfMessage):
                await stream.write(upstream.send(event) or b"")
                return
            else:
                raise ConnectionResetError("the client went away in the middle of its request")

    async def _relay(
        self, upstream: h11.Connection, stream: ChannelStream, route: Route, record: _Record
    ) -> bool:
        """The server's answer, to the client; whether the connection may serve another."""
        while True:
            try:
                event = upstream.next_event()
            except h11.RemoteProtocolError as error:
                raise BadGateway(
                    f"the server on port {route.port} of VM {route.vm} answered with invalid "
                    f"HTTP: {error}",
                    vm=route.vm,
                    port=route.port,
                ) from None
            if event is h11.NEED_DATA:
                upstream.receive_data(await stream.read())
            elif isinstance(event, h11.InformationalResponse):
                headers = downstream_headers(event, route)
                informational = h11.InformationalResponse(
                    status_code=event.status_code, headers=headers, reason=event.reason
                )
                await self._send(informational)
                if event.status_code == 101:
                    record.status = 101
                    return await self._switched(upstream, stream, record)
            elif isinstance(event, h11.Response):
                record.status = event.status_code
                headers = downstream_headers(event, route)
                await self._send(
                    h11.Response(
                        status_code=event.status_code, headers=headers, reason=event.reason
                    )
                )
            elif isinstance(event, h11.Data):
                record.sent += len(event.data)
                self.writer.writelines(self.conn.send_with_data_passthrough(event) or ())
                await self.writer.drain()
            elif isinstance(event, h11.EndOfMessage):
                await self._send(h11.EndOfMessage())
                return True
            else:
                raise BadGateway(
                    f"the server on port {route.port} of VM {route.vm} closed the connection "
                    "before its answer was complete",
                    vm=route.vm,
                    port=route.port,
                )

    async def _switched(
        self, upstream: h11.Connection, stream: ChannelStream, record: _Record
    ) -> bool:
        """After a 101 (a WebSocket): the bytes, both ways, until both sides end."""
        from_vm, _ = upstream.trailing_data
        if from_vm:
            self.writer.write(from_vm)
        received, sent = await splice(self._client_pipe(), stream)
        record.received += received
        record.sent += sent + len(from_vm)
        return False

    def _client_pipe(self) -> SocketPipe:
        """The client's connection as a pipe, starting with what h11 read past the head."""
        pending, _ = self.conn.trailing_data
        return SocketPipe(self.reader, self.writer, bytes(pending))

    async def _redirect(
        self, status: int, location: str, record: _Record, cookie: bytes | None = None
    ) -> bool:
        """A redirect, setting the credential's cookie when given."""
        headers = [(b"location", location.encode("latin-1")), (b"content-length", b"0")]
        if cookie is not None:
            headers.append((b"set-cookie", cookie))
        return await self._answer(status, headers, b"", record)

    async def _refuse(self, error: VmfabricError, record: _Record) -> bool:
        """The problem document of `error`, if the answer has not begun; else the connection
        is cut (the client sees an incomplete answer, not a wrong one)."""
        record.note = error.detail
        if self.conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            reset(self.writer.transport)
            return False
        problem = error_problem(error)
        headers = [(name.encode(), value.encode()) for name, value in problem.headers.items()]
        return await self._answer(problem.status_code, headers, bytes(problem.body), record)

    async def _answer(
        self, status: int, headers: Sequence[tuple[bytes, bytes]], body: bytes, record: _Record
    ) -> bool:
        """A whole answer from the gateway itself; whether the connection may go on."""
        record.status = status
        reason = HTTPStatus(status).phrase.encode()
        await self._send(h11.Response(status_code=status, headers=list(headers), reason=reason))
        if body and record.method != "HEAD":
            record.sent += len(body)
            await self._send(h11.Data(data=body))
        await self._send(h11.EndOfMessage())
        return await self._finish_request()

    async def _finish_request(self) -> bool:
        """Read what is left of a request answered early (bounded), so the next can come."""
        if (
            self.conn.their_state is h11.SEND_BODY
            and not self.conn.they_are_waiting_for_100_continue
        ):
            discarded = 0
            try:
                async with asyncio.timeout(DISCARD_TIMEOUT_S):
                    while discarded <= DISCARD_LIMIT:
                        event = await self._next_event()
                        if not isinstance(event, h11.Data):
                            break
                        discarded += len(event.data)
            except (TimeoutError, h11.RemoteProtocolError):
                return False
        return self.conn.our_state is h11.DONE and self.conn.their_state is h11.DONE

    async def _send(self, event: h11.Event) -> None:
        data = self.conn.send(event)
        if data:
            self.writer.write(data)
        await self.writer.drain()

    async def _next_event(self) -> h11.Event | type[h11.NEED_DATA] | type[h11.PAUSED]:
        while True:
            event = self.conn.next_event()
            if event is not h11.NEED_DATA:
                return event
            self.conn.receive_data(await self.reader.read(READ_SIZE))

    def _log(self, record: _Record) -> None:
        took = (time.monotonic() - record.started) * 1000
        note = f" ({record.note})" if record.note else ""
        log.info(
            "%s %s %s -> %d, %d bytes in, %d bytes out, %.1f ms%s",
            self.client,
            record.method,
            record.target,
            record.status,
            record.received,
            record.sent,
            took,
            note,
        )


async def _first_failure(body: asyncio.Task[None], relay: asyncio.Task[bool]) -> bool:
    """The relay's result once the answer is complete; the first failure of either task as
    soon as it happens (the other is cancelled). A body still going up when the answer is
    complete is cancelled too: the rest of it is read, or the connection closed, afterwards."""
    try:
        while not relay.done():
            waiting = (relay,) if body.done() else (body, relay)
            await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
            if body.done() and not body.cancelled() and (error := body.exception()):
                raise error
        return relay.result()
    finally:
        body.cancel()
        relay.cancel()
        await asyncio.gather(body, relay, return_exceptions=True)


def _cookies(value: bytes) -> dict[str, str]:
    found: dict[str, str] = {}
    for part in value.decode("latin-1").split(";"):
        name, sep, content = part.strip().partition("=")
        if sep:
            found.setdefault(name, content)
    return found


def _without_our_cookies(value: bytes) -> bytes:
    parts = [part.strip() for part in value.split(b";")]
    return b"; ".join(p for p in parts if p and not p.startswith(COOKIE_PREFIX.encode()))


def _dropped(name: bytes, connection: set[bytes]) -> bool:
    """Whether a request header stops at the gateway: hop-by-hop, or one it sets itself."""
    return name in _HOP_BY_HOP or name in connection or name in _SET_BY_GATEWAY


def _connection_tokens(headers: Iterable[tuple[bytes, bytes]]) -> set[bytes]:
    return {
        token.strip().lower()
        for name, value in headers
        if name == b"connection"
        for token in value.split(b",")
    }


def _rebase(location: bytes, route: Route) -> bytes:
    """A `Location` on the server's own paths, under the route's prefix (like nginx's
    proxy_redirect): `/x` and `http://127.0.0.1:<port>/x` become `/vm/<vm>/<port>/x`."""
    own = f"http://127.0.0.1:{route.port}".encode()
    if location.startswith(own + b"/"):
        location = location[len(own) :]
    if location.startswith(b"/") and not location.startswith(b"//"):
        return route.prefix.encode() + location
    return location


def _loggable(target: bytes) -> str:
    """A request target for the log: never the credential it may carry."""
    return _CREDENTIAL_IN_TARGET.sub("…", target.decode("latin-1"))[:300]


def cookie_header(route: Route, token: str, expires_at: datetime) -> bytes:
    """The cookie that carries the credential for the route's later requests, for as long as
    the credential is valid."""
    max_age = max(0, int((expires_at - datetime.now(UTC)).total_seconds()))
    return (
        f"{route.cookie}={token}; Path={route.prefix}/; Max-Age={max_age}; HttpOnly; "
        "SameSite=Strict"
    ).encode("latin-1")
