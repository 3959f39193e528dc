"""The access gateway (issue 7, point 3) end to end, without root: the gateway on a free port
in this process, the real guest proxy (the built zipapp) listening on a unix socket per VM,
and behind it real servers in a child process: an HTTP/1.1 server (pages, downloads, uploads,
a WebSocket echo written with the standard library) and a TCP echo. Clients are real ones
where possible: curl, `vmfabric access forward`, raw sockets for what curl cannot do.

The VMs are on a noop host whose driver is told where each VM's channel socket is (what the
libvirt and lab drivers know for themselves): web1 and web2 have a guest proxy, down1 has a
socket path where nothing listens, bare has no channel at all; fake guests that flood or send
garbage stand in for hostile VMs.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import random
import re
import signal
import socket
import socketserver
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, NamedTuple

import h11
import httpx
import pytest
import uvicorn
from fastapi.testclient import TestClient
from processes import ProxyProcess, forked, proxy_command
from prometheus_client.parser import text_string_to_metric_families

from vmfabric.access.channel import (
    MAX_FRAME_LIMIT,
    FrameDecoder,
    FrameType,
    Hello,
    Role,
    data_header,
    decode_reason,
    encode_frame,
    reason_name,
)
from vmfabric.access.gateway import Gateway, gateway_thread
from vmfabric.access.http_front import (
    Route,
    Source,
    find_credential,
    parse_route,
    upstream_request,
)
from vmfabric.api.server import ServeOptions, build_app
from vmfabric.domain.access import Claims, sign
from vmfabric.hypervisor.noop import NoopHypervisor
from vmfabric.services import access
from vmfabric.services.context import Controller, HostRef

BIG_FILE_SIZE = 100 * 1024 * 1024
WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
HOST = HostRef("hv1", "noop", None, "br0")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# The servers inside the "VM": a child process, so their work does not compete with the
# gateway's thread for this process's interpreter lock.


def pattern(size: int, seed: int) -> bytes:
    """`size` bytes that differ from seed to seed and from offset to offset."""
    return random.Random(seed).randbytes(size)


class Backend(BaseHTTPRequestHandler):
    """The web server in the VM."""

    protocol_version = "HTTP/1.1"
    big_file = Path()

    def log_message(self, *_args: object) -> None:
        pass

    def do_GET(self) -> None:
        path, _, query = self.path.partition("?")
        if path == "/":
            self._send(200, b"<h1>hello from the VM</h1>\n", "text/html")
        elif path == "/head":
            seen = {"path": self.path, "headers": [[k.lower(), v] for k, v in self.headers.items()]}
            self._send(200, json.dumps(seen).encode(), "application/json")
        elif path.startswith("/bytes/"):
            self._send(200, pattern(int(path.removeprefix("/bytes/")), int(query or 0)))
        elif path == "/file":
            self._file()
        elif path == "/chunked":
            self._chunked([b"first ", b"second ", b"third"])
        elif path == "/redirect":
            self.send_response(302)
            self.send_header("Location", "/target?x=1")
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif path == "/ws":
            self._websocket()
        else:
            self._send(404, b"not here\n")

    def do_HEAD(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", "1234")
        self.end_headers()

    def do_POST(self) -> None:
        digest, size = hashlib.sha256(), 0
        for chunk in self._body():
            digest.update(chunk)
            size += len(chunk)
        self._send(200, json.dumps({"size": size, "sha256": digest.hexdigest()}).encode())

    def _send(self, status: int, body: bytes, kind: str = "application/octet-stream") -> None:
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _file(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", str(self.big_file.stat().st_size))
        self.end_headers()
        self.wfile.flush()
        with self.big_file.open("rb") as file:
            self.connection.sendfile(file)

    def _chunked(self, chunks: list[bytes]) -> None:
        self.send_response(200)
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        for chunk in chunks:
            self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        self.wfile.write(b"0\r\n\r\n")

    def _body(self) -> Iterator[bytes]:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            while size := int(self.rfile.readline().split(b";")[0], 16):
                yield self.rfile.read(size)
                self.rfile.readline()
            self.rfile.readline()
            return
        remaining = int(self.headers.get("Content-Length", 0))
        while remaining > 0:
            chunk = self.rfile.read(min(remaining, 1 << 20))
            remaining -= len(chunk)
            yield chunk

    def _websocket(self) -> None:
        """RFC 6455 handshake, then every message echoed (server frames are not masked)."""
        key = self.headers["Sec-WebSocket-Key"].encode()
        accept = base64.b64encode(hashlib.sha1(key + WS_GUID).digest()).decode()
        self.send_response(101)
        self.send_header("Upgrade", "websocket")
        self.send_header("Connection", "Upgrade")
        self.send_header("Sec-WebSocket-Accept", accept)
        self.end_headers()
        self.wfile.flush()
        self.close_connection = True
        while True:
            opcode, payload = read_ws_frame(self.rfile.read)
            self.wfile.write(ws_frame(opcode, payload, mask=False))
            self.wfile.flush()
            if opcode == 8:
                return


def ws_frame(opcode: int, payload: bytes, *, mask: bool) -> bytes:
    head = bytes([0x80 | opcode])
    size = len(payload)
    bit = 0x80 if mask else 0
    if size < 126:
        head += bytes([bit | size])
    elif size < 1 << 16:
        head += bytes([bit | 126]) + struct.pack("!H", size)
    else:
        head += bytes([bit | 127]) + struct.pack("!Q", size)
    if not mask:
        return head + payload
    key = os.urandom(4)
    return head + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


def read_ws_frame(read: Callable[[int], bytes]) -> tuple[int, bytes]:
    first, second = read(2)
    size = second & 0x7F
    if size == 126:
        size = struct.unpack("!H", read(2))[0]
    elif size == 127:
        size = struct.unpack("!Q", read(8))[0]
    key = read(4) if second & 0x80 else b""
    payload = read(size)
    if key:
        payload = bytes(b ^ key[i % 4] for i, b in enumerate(payload))
    return first & 0x0F, payload


class Echo(socketserver.BaseRequestHandler):
    """Echoes until the client half-closes, then half-closes too."""

    def handle(self) -> None:
        while data := self.request.recv(1 << 18):
            self.request.sendall(data)
        self.request.shutdown(socket.SHUT_WR)


class Ports(NamedTuple):
    http: int
    echo: int
    closed: int
    forbidden: int


def _serve(conn: Connection, big_file: str) -> None:
    Backend.big_file = Path(big_file)
    ThreadingHTTPServer.daemon_threads = True
    ThreadingHTTPServer.request_queue_size = 128  # 50 connections at once
    socketserver.ThreadingTCPServer.daemon_threads = True
    socketserver.ThreadingTCPServer.allow_reuse_address = True
    web = ThreadingHTTPServer(("127.0.0.1", 0), Backend)
    echo = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Echo)
    forbidden = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Echo)
    for server in (web, echo, forbidden):
        threading.Thread(target=server.serve_forever, daemon=True).start()
    closed = free_port()
    conn.send(
        Ports(web.server_address[1], echo.server_address[1], closed, forbidden.server_address[1])
    )
    threading.Event().wait()


@pytest.fixture(scope="module")
def big_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """100 MB of random bytes and their SHA-256."""
    path = tmp_path_factory.mktemp("www") / "big.bin"
    digest = hashlib.sha256()
    with path.open("wb") as file:
        for _ in range(BIG_FILE_SIZE // (1 << 20)):
            chunk = os.urandom(1 << 20)
            digest.update(chunk)
            file.write(chunk)
    return path, digest.hexdigest()


@pytest.fixture(scope="module")
def ports(big_file: tuple[Path, str]) -> Iterator[Ports]:
    with forked(_serve, str(big_file[0])) as conn:
        assert conn.poll(10), "the servers in the VM did not start"
        yield conn.recv()


class Cloud(NamedTuple):
    """The test's controller, its gateway, the VMs' guest proxies and the servers in them."""

    ctl: Controller
    api: TestClient
    url: str
    ports: Ports
    proxies: dict[str, ProxyProcess]
    sockets: dict[str, str]
    state: Path

    def grant(self, vm: str = "web1", port: int | None = None, **kw: Any) -> str:
        return access.grant_access(self.ctl, vm, port or self.ports.http, **kw).credential


@pytest.fixture
def cloud(
    api: TestClient,
    controller: Controller,
    state: Path,
    ports: Ports,
    bundle: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[Cloud]:
    api.post("/api/v1/hosts", json={"name": "hv1", "driver": "noop", "bridge": "br0"})
    api.post("/api/v1/networks", json={"name": "net1", "cidrs": ["10.0.0.0/24"]})
    for name in ("web1", "web2", "down1", "bare", "garbage", "flood", "greedy"):
        body = {"name": name, "host": "hv1", "nics": [{"network": "net1"}]}
        assert api.post("/api/v1/vms", json=body).status_code == 201
    allow = ",".join(map(str, (ports.http, ports.echo, ports.closed)))
    sockets = {vm: str(state / f"{vm}.access.sock") for vm in ("web1", "web2", "down1")}
    sockets |= {vm: str(state / f"{vm}.fake.sock") for vm in ("garbage", "flood", "greedy")}
    driver = controller.agents.hypervisor(HOST)
    assert isinstance(driver, NoopHypervisor)
    monkeypatch.setattr(driver, "access_socket", sockets.get)
    proxies = {
        vm: ProxyProcess(
            proxy_command(sys.executable, bundle, "--unix", sockets[vm], "--allow", allow),
            Path(sockets[vm]),
            state / f"{vm}.proxy.log",
        )
        for vm in ("web1", "web2")
    }
    for proxy in proxies.values():
        proxy.start()
    running = gateway_thread(Gateway(controller, ("127.0.0.1", 0)))
    host, port = running.start().address
    try:
        yield Cloud(controller, api, f"http://{host}:{port}", ports, proxies, sockets, state)
    finally:
        running.stop()
        access.flush_uses(controller)
        for proxy in proxies.values():
            if proxy.running:
                proxy.stop(signal.SIGKILL)


def curl(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["curl", "-sS", *args], capture_output=True, text=True, timeout=timeout, check=False
    )


def get(cloud: Cloud, path: str, credential: str | None = None, **kw: Any) -> httpx.Response:
    headers = {"Authorization": f"Bearer {credential}"} if credential else {}
    return httpx.get(f"{cloud.url}{path}", headers=headers, timeout=30, **kw)


def eventually(check: Callable[[], bool], timeout: float = 5) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "not within the time"
        time.sleep(0.02)


def problem(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.reason_phrase == HTTPStatus(status).phrase
    assert response.headers["content-type"] == "application/problem+json"
    document: dict[str, Any] = response.json()
    assert document["status"] == status
    return document


# Routing and the rewritten request, as functions.


def test_routes_name_a_vm_a_port_and_the_path_below_them() -> None:
    route = parse_route(b"/vm/web1/8080/a/b?x=1&access=vmfa1.a.b&y")
    assert route == Route("web1", 8080, "/a/b", ("x=1", "y"), "vmfa1.a.b")
    assert route.target == "/a/b?x=1&y" and route.cookie == "vmfabric_access_web1_8080"
    assert parse_route(b"/vm/web1/80") == Route("web1", 80, "", (), None)
    for target in (b"/", b"/vm/web1/", b"/vm/web1/0/", b"/vm/web1/65536/", b"/vm/web1/x/"):
        assert parse_route(target) is None, target


def test_the_server_never_sees_a_credential() -> None:
    route = parse_route(b"/vm/web1/80/x?access=vmfa1.q.s")
    assert route is not None
    headers = [
        (b"host", b"gw:8751"),
        (b"authorization", b"Bearer vmfa1.a.b"),
        (b"cookie", b"vmfabric_access_web1_80=vmfa1.c.d; theme=dark; vmfabric_access_db_5432=x"),
        (b"connection", b"keep-alive, x-private"),
        (b"x-private", b"1"),
        (b"expect", b"100-continue"),
        (b"x-forwarded-for", b"198.51.100.7"),
    ]
    assert find_credential(route, headers) == ("vmfa1.q.s", Source.QUERY)
    request = h11.Request(method="GET", target=b"/vm/web1/80/x?access=vmfa1.q.s", headers=headers)
    sent = upstream_request(request, route, Source.BEARER, "192.0.2.1", None)
    assert sent.target == b"/x"
    assert list(sent.headers) == [
        (b"host", b"127.0.0.1:80"),
        (b"cookie", b"theme=dark"),
        (b"x-forwarded-for", b"198.51.100.7, 192.0.2.1"),
        (b"x-forwarded-proto", b"http"),
        (b"x-forwarded-prefix", b"/vm/web1/80"),
        (b"x-forwarded-host", b"gw:8751"),
        (b"connection", b"close"),
    ]


def test_a_servers_own_bearer_token_passes_when_the_cookie_carries_ours() -> None:
    route = parse_route(b"/vm/web1/80/")
    assert route is not None
    app_token = (b"authorization", b"Bearer app-token")
    ours = (b"cookie", b"vmfabric_access_web1_80=vmfa1.c.d")
    assert find_credential(route, [app_token, ours]) == ("vmfa1.c.d", Source.COOKIE)
    assert find_credential(route, [app_token]) == (
        "app-token",
        Source.BEARER,
    )  # malformed, not missing
    assert find_credential(route, []) == (None, Source.NONE)


def test_a_page_through_the_gateway_with_a_bearer_credential(cloud: Cloud) -> None:
    credential = cloud.grant()
    page = f"{cloud.url}/vm/web1/{cloud.ports.http}/"
    done = curl("-H", f"Authorization: Bearer {credential}", page)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "<h1>hello from the VM</h1>\n"


def test_a_first_visit_with_access_sets_a_cookie_for_the_later_requests(cloud: Cloud) -> None:
    credential = cloud.grant()
    prefix = f"/vm/web1/{cloud.ports.http}"
    first = get(cloud, f"{prefix}/head?x=1&access={credential}")
    assert first.status_code == 303
    assert first.headers["location"] == f"{prefix}/head?x=1"
    cookie = first.headers["set-cookie"]
    assert cookie.startswith(f"vmfabric_access_web1_{cloud.ports.http}={credential}; ")
    assert cookie.endswith(
        f"; Path={prefix}/; HttpOnly; SameSite=Strict".replace(
            f"Path={prefix}/;", f"Path={prefix}/; Max-Age={cookie_max_age(cookie)};"
        )
    )
    assert 850 < cookie_max_age(cookie) <= 900  # the credential's 15 minutes
    with httpx.Client(base_url=cloud.url, follow_redirects=True, timeout=30) as browser:
        page = browser.get(f"{prefix}/head?x=1&access={credential}")
        assert page.status_code == 200, page.text
        seen = page.json()
        assert seen["path"] == "/head?x=1"
        assert "cookie" not in dict(seen["headers"])  # the server never sees the credential
        browser.cookies.set("theme", "dark")
        again = browser.get(f"{prefix}/head")
        assert dict(again.json()["headers"])["cookie"] == "theme=dark"
        assert browser.get("/vm/web1/1/").status_code == 401  # the cookie is the port's only


def cookie_max_age(cookie: str) -> int:
    found = re.search(r"Max-Age=(\d+)", cookie)
    assert found is not None
    return int(found[1])


def test_a_prefix_without_its_slash_is_redirected_to_it(cloud: Cloud) -> None:
    credential = cloud.grant()
    moved = get(cloud, f"/vm/web1/{cloud.ports.http}?access={credential}")
    assert moved.status_code == 308
    assert moved.headers["location"] == f"/vm/web1/{cloud.ports.http}/?access={credential}"


def test_the_server_gets_the_path_below_the_prefix_and_its_redirects_stay_below_it(
    cloud: Cloud,
) -> None:
    credential = cloud.grant()
    prefix = f"/vm/web1/{cloud.ports.http}"
    seen = get(cloud, f"{prefix}/head?a=b", credential).json()
    headers = dict(seen["headers"])
    assert seen["path"] == "/head?a=b"
    assert headers["host"] == f"127.0.0.1:{cloud.ports.http}"
    assert headers["x-forwarded-prefix"] == prefix
    assert headers["x-forwarded-for"] == "127.0.0.1"
    assert "authorization" not in headers
    moved = get(cloud, f"{prefix}/redirect", credential)
    assert moved.status_code == 302
    assert moved.headers["location"] == f"{prefix}/target?x=1"


def test_one_connection_carries_several_requests(cloud: Cloud) -> None:
    """Keep-alive, with answers of every framing: Content-Length, chunked, HEAD."""
    credential = cloud.grant()
    prefix = f"/vm/web1/{cloud.ports.http}"
    wanted = [
        ("GET", "/", b"<h1>hello from the VM</h1>\n"),
        ("GET", "/chunked", b"first second third"),
        ("HEAD", "/", b""),
        ("GET", "/bytes/300000?7", pattern(300_000, 7)),
        ("GET", "/", b"<h1>hello from the VM</h1>\n"),
    ]
    with socket.create_connection(("127.0.0.1", int(cloud.url.rsplit(":", 1)[1]))) as sock:
        conn = h11.Connection(h11.CLIENT)
        for method, path, body in wanted:
            headers = [("host", "gw"), ("authorization", f"Bearer {credential}")]
            request = h11.Request(method=method, target=f"{prefix}{path}", headers=headers)
            sock.sendall(conn.send(request) + (conn.send(h11.EndOfMessage()) or b""))
            status, received = exchange(sock, conn)
            assert (status, received) == (200, body), path
            conn.start_next_cycle()


def exchange(sock: socket.socket, conn: h11.Connection) -> tuple[int, bytes]:
    """The status and body of the next answer on a client connection."""
    status, body = 0, bytearray()
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(sock.recv(1 << 16))
        elif isinstance(event, h11.Response):
            status = event.status_code
        elif isinstance(event, h11.Data):
            body += event.data
        elif isinstance(event, h11.EndOfMessage):
            return status, bytes(body)
        else:
            raise AssertionError(event)


def test_uploads_stream_to_the_server(cloud: Cloud, tmp_path: Path) -> None:
    credential = cloud.grant()
    data = os.urandom(30 * 1024 * 1024)
    (tmp_path / "upload.bin").write_bytes(data)
    wanted = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    url = f"{cloud.url}/vm/web1/{cloud.ports.http}/upload"
    auth = f"Authorization: Bearer {credential}"
    for framing in ("Content-Type: application/octet-stream", "Transfer-Encoding: chunked"):
        done = curl("-H", auth, "-H", framing, "--data-binary", f"@{tmp_path / 'upload.bin'}", url)
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout) == wanted, framing


def test_a_100_mb_download_arrives_whole(cloud: Cloud, big_file: tuple[Path, str]) -> None:
    credential = cloud.grant()
    direct, _ = speed(f"http://127.0.0.1:{cloud.ports.http}/file")
    through, digest = speed(
        f"{cloud.url}/vm/web1/{cloud.ports.http}/file", f"Authorization: Bearer {credential}"
    )
    print(f"100 MB: {through:.0f} MB/s through the gateway, {direct:.0f} MB/s direct")
    assert digest == big_file[1]


def speed(url: str, *headers: str) -> tuple[float, str]:
    """curl's download speed (MB/s) of `url` and the SHA-256 of what it got."""
    args = [a for h in headers for a in ("-H", h)]
    done = subprocess.run(
        ["curl", "-sS", "-o", "-", "-w", "%{stderr}%{speed_download} %{http_code}", *args, url],
        capture_output=True,
        timeout=300,
        check=False,
    )
    rate, status = done.stderr.decode().split()[-2:]
    assert status == "200", done.stderr
    return float(rate) / 1e6, hashlib.sha256(done.stdout).hexdigest()


def test_50_concurrent_downloads_each_get_their_own_bytes(cloud: Cloud, tmp_path: Path) -> None:
    credential = cloud.grant()
    size = 2_000_000
    url = f"{cloud.url}/vm/web1/{cloud.ports.http}/bytes/{size}"
    auth = f"Authorization: Bearer {credential}"
    command = ["curl", "-sS", "-w", "%{http_code}", "-H", auth]
    downloads = [
        subprocess.Popen(
            [*command, "-o", str(tmp_path / str(i)), f"{url}?{i}"],
            stdout=subprocess.PIPE,
            text=True,
        )
        for i in range(50)
    ]
    for i, download in enumerate(downloads):
        status, _ = download.communicate(timeout=120)
        got = (tmp_path / str(i)).read_bytes()
        assert status == "200", got[:300]
        assert got == pattern(size, i), i


def test_a_websocket_round_trip(cloud: Cloud) -> None:
    credential = cloud.grant()
    key = base64.b64encode(os.urandom(16))
    head = (
        f"GET /vm/web1/{cloud.ports.http}/ws HTTP/1.1\r\nHost: gw\r\n"
        f"Authorization: Bearer {credential}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
        f"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {key.decode()}\r\n\r\n"
    )
    with socket.create_connection(("127.0.0.1", int(cloud.url.rsplit(":", 1)[1]))) as sock:
        sock.sendall(head.encode() + ws_frame(1, b"hello", mask=True))  # a frame right behind
        reader = sock.makefile("rb")
        assert reader.readline().startswith(b"HTTP/1.1 101 ")
        answer = dict(
            line.rstrip(b"\r\n").lower().split(b": ", 1) for line in iter(reader.readline, b"\r\n")
        )
        accept = base64.b64encode(hashlib.sha1(key + WS_GUID).digest())
        assert answer[b"sec-websocket-accept"] == accept.lower()
        assert answer[b"upgrade"] == b"websocket"
        assert read_ws_frame(reader.read) == (1, b"hello")
        big = os.urandom(300_000)
        sock.sendall(ws_frame(2, big, mask=True))
        assert read_ws_frame(reader.read) == (2, big)
        sock.sendall(ws_frame(8, b"", mask=True))
        assert read_ws_frame(reader.read) == (8, b"")
        assert reader.read() == b""  # the server closed, and the gateway passed it on


def start_forward(cloud: Cloud, *args: str, url: str = "") -> subprocess.Popen[str]:
    env = {
        **os.environ,
        "VMFABRIC_GATEWAY_URL": cloud.url,
        "VMFABRIC_URL": url or "http://127.0.0.1:9",
    }
    command = [sys.executable, "-m", "vmfabric.cli.main", "access", "forward", *args]
    return subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def echoed(port: int, data: bytes) -> bytes:
    """What comes back through a forwarded echo port after sending `data` and half-closing."""
    received = bytearray()
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sender = threading.Thread(
            target=lambda: (sock.sendall(data), sock.shutdown(socket.SHUT_WR))
        )
        sender.start()
        while chunk := sock.recv(1 << 18):
            received += chunk
        sender.join()
    return bytes(received)


def test_access_forward_tunnels_tcp_through_the_gateway(cloud: Cloud) -> None:
    credential = cloud.grant(port=cloud.ports.echo)
    forward = start_forward(
        cloud, "web1", "--port", str(cloud.ports.echo), "--credential", credential, "--json"
    )
    try:
        assert forward.stdout is not None
        lines = [forward.stdout.readline()]
        while lines[-1].rstrip() != "}":
            lines.append(forward.stdout.readline())
        document = json.loads("".join(lines))
        assert document["vm"] == "web1" and document["grant"] is None
        local = int(document["local"].rsplit(":", 1)[1])
        data = os.urandom(20 * 1024 * 1024)
        with ThreadPoolExecutor(3) as pool:
            results = list(pool.map(lambda _: echoed(local, data), range(3)))
        assert all(result == data for result in results)
    finally:
        forward.send_signal(signal.SIGINT)
        assert forward.wait(10) == 0


@pytest.fixture
def api_url(cloud: Cloud) -> Iterator[str]:
    """The test's API served over HTTP (for the CLI in another process)."""
    server = uvicorn.Server(
        uvicorn.Config(
            cloud.api.app, host="127.0.0.1", port=free_port(), lifespan="off", log_level="warning"
        )
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline, "the API did not start"
        time.sleep(0.02)
    yield f"http://127.0.0.1:{server.config.port}"
    server.should_exit = True
    thread.join(10)


def test_access_forward_asks_for_a_grant_when_given_no_credential(
    cloud: Cloud, api_url: str
) -> None:
    forward = start_forward(cloud, "web1", "--port", str(cloud.ports.echo), url=api_url)
    try:
        assert forward.stdout is not None
        line = forward.stdout.readline()
        found = re.fullmatch(
            rf"forwarding 127\.0\.0\.1:(\d+) to port {cloud.ports.echo} of web1 through "
            rf"{re.escape(cloud.url)} \(access (\S+) granted until \S+\); Ctrl-C to stop\n",
            line,
        )
        assert found is not None, line
        assert echoed(int(found[1]), b"ping") == b"ping"
        grant = access.show_grant(cloud.ctl, found[2])
        assert (grant.vm, grant.port, grant.state) == ("web1", cloud.ports.echo, "active")
        assert [use.kind for use in grant.latest_uses] == ["tcp"]
    finally:
        forward.send_signal(signal.SIGINT)
        assert forward.wait(10) == 0


def test_access_forward_says_when_the_gateway_refuses_a_connection(cloud: Cloud) -> None:
    credential = cloud.grant(port=cloud.ports.echo)
    access.revoke_grant(cloud.ctl, credential_id(credential))
    forward = start_forward(
        cloud, "web1", "--port", str(cloud.ports.echo), "--credential", credential
    )
    try:
        assert forward.stdout is not None and forward.stderr is not None
        local = int(forward.stdout.readline().split()[1].rsplit(":", 1)[1])
        sock = socket.create_connection(("127.0.0.1", local))
        with sock, pytest.raises(ConnectionResetError):  # the tunnel failed: a reset, not an end
            sock.recv(1)
        message = forward.stderr.readline()
        assert message.startswith("error: connection from 127.0.0.1:")
        revoked = f"the access credential {credential_id(credential)} was revoked"
        assert message.rstrip().endswith(f"not forwarded: HTTP 401: {revoked}")
    finally:
        forward.send_signal(signal.SIGINT)
        assert forward.wait(10) == 0


def credential_id(credential: str) -> str:
    claims = json.loads(base64.urlsafe_b64decode(credential.split(".")[1] + "=="))
    return str(claims["id"])


def test_refused_credentials(cloud: Cloud) -> None:
    http, echo = cloud.ports.http, cloud.ports.echo
    page = f"/vm/web1/{http}/"
    good = cloud.grant()
    assert problem(get(cloud, "/"), 404)["detail"].startswith("no such route '/'")
    assert problem(get(cloud, f"/vm/nosuch/{http}/", good), 404)["detail"] == "unknown VM 'nosuch'"
    missing = get(cloud, page)
    assert problem(missing, 401)["reason"] == "missing"
    assert missing.headers["www-authenticate"] == 'Bearer realm="vmfabric"'
    forged = good[:-1] + ("A" if good[-1] != "A" else "B")
    invalid = get(cloud, page, forged)
    assert problem(invalid, 401)["reason"] == "forged"
    assert invalid.headers["www-authenticate"] == 'Bearer realm="vmfabric", error="invalid_token"'
    assert problem(get(cloud, page, "junk"), 401)["reason"] == "malformed"
    key = (cloud.state / "access.key").read_bytes()
    past = int(time.time()) - 60
    expired = sign(key, Claims(credential_id(good), "web1", http, None, past - 900, past))
    assert problem(get(cloud, page, expired), 401)["reason"] == "expired"
    revoked = cloud.grant()
    access.revoke_grant(cloud.ctl, credential_id(revoked))
    assert problem(get(cloud, page, revoked), 401)["reason"] == "revoked"
    assert problem(get(cloud, page, cloud.grant("web2")), 403)["reason"] == "other-vm"
    assert problem(get(cloud, page, cloud.grant(port=echo)), 403)["reason"] == "other-port"
    assert get(cloud, page, good).status_code == 200

    def outcomes() -> list[str]:  # the use is logged once the answer is sent
        return [
            use.outcome for use in access.show_grant(cloud.ctl, credential_id(good)).latest_uses
        ]

    eventually(lambda: outcomes() == ["ok", "unauthorized"])  # the expired one; no other names it


def test_what_is_not_http_is_answered_400(cloud: Cloud) -> None:
    with socket.create_connection(("127.0.0.1", int(cloud.url.rsplit(":", 1)[1]))) as sock:
        sock.sendall(b"HELLO THERE\r\n\r\n")
        answer = sock.makefile("rb").read()
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 ")
    assert json.loads(body)["detail"].startswith("invalid HTTP request: ")


def test_guest_side_failures(cloud: Cloud) -> None:
    ports = cloud.ports
    refused = problem(
        get(cloud, f"/vm/web1/{ports.forbidden}/", cloud.grant(port=ports.forbidden)), 502
    )
    assert refused["reason"] == "not-allowed"
    assert refused["detail"] == (
        f"the guest proxy of VM web1 refused port {ports.forbidden}: "
        f"port {ports.forbidden} is not allowed"
    )
    closed = problem(get(cloud, f"/vm/web1/{ports.closed}/", cloud.grant(port=ports.closed)), 502)
    assert closed["reason"] == "connection-refused"
    assert closed["detail"].endswith(f"nothing listens on 127.0.0.1:{ports.closed}")
    down = problem(get(cloud, f"/vm/down1/{ports.http}/", cloud.grant("down1")), 503)
    assert down["detail"].startswith(
        f"the guest proxy of VM down1 does not answer: cannot connect to {cloud.sockets['down1']}"
    )
    bare = problem(get(cloud, f"/vm/bare/{ports.http}/", cloud.grant("bare")), 503)
    assert bare["detail"] == (
        "the guest proxy of VM bare does not answer: "
        "its host's hypervisor gives it no access channel"
    )
    cloud.api.post("/api/v1/vms/web2/stop")
    stopped = problem(get(cloud, f"/vm/web2/{ports.http}/", cloud.grant("web2")), 503)
    assert stopped["detail"] == (
        "the guest proxy of VM web2 does not answer: "
        "VM web2 is stopped: its guest proxy runs only while it runs"
    )


def test_the_channel_comes_back_when_the_guest_proxy_restarts(cloud: Cloud) -> None:
    credential = cloud.grant()
    page = f"/vm/web1/{cloud.ports.http}/"
    assert get(cloud, page, credential).status_code == 200
    cloud.proxies["web1"].stop(signal.SIGKILL)
    started = time.monotonic()
    down = problem(get(cloud, page, credential), 503)
    assert down["detail"].startswith("the guest proxy of VM web1 does not answer: ")
    assert time.monotonic() - started < 1  # a connection refused is known at once
    cloud.proxies["web1"].start()
    assert get(cloud, page, credential).text == "<h1>hello from the VM</h1>\n"


# Hostile guests: a child process plays the guest side of three VMs' channels.


def guest_hello() -> bytes:
    return Hello(Role.GUEST, random.getrandbits(63) + 1, 0, software="hostile").encode()


def send_garbage(sock: socket.socket) -> None:
    """A session, then random bytes for ever."""
    sock.sendall(guest_hello())
    while True:
        sock.sendall(os.urandom(1 << 16))


def send_pings(sock: socket.socket) -> None:
    """A session, then PINGs for ever, never reading the PONGs."""
    sock.sendall(guest_hello())
    pings = encode_frame(FrameType.PING, 0, b"p" * 64) * 1000
    while True:
        sock.sendall(pings)


def send_too_much(sock: socket.socket, report: Connection) -> None:
    """A session; every stream accepted and answered with the head of a huge HTTP answer,
    then with 40 MiB of its body at once, whatever the window; the resets the gateway sends
    are reported."""
    sock.sendall(guest_hello())
    decoder = FrameDecoder(MAX_FRAME_LIMIT, resync=True)
    body = (data_header(1, 1 << 16) + bytes(1 << 16)) * 640
    head = b"HTTP/1.1 200 OK\r\nContent-Length: 1000000000\r\n\r\n"
    while data := sock.recv(1 << 16):
        for frame in decoder.feed(data):
            if frame.type == FrameType.OPEN:
                accept = encode_frame(FrameType.ACCEPT, frame.stream)
                answer = data_header(frame.stream, len(head)) + head
                sending = body.replace(data_header(1, 1 << 16), data_header(frame.stream, 1 << 16))
                threading.Thread(target=sock.sendall, args=(accept + answer + sending,)).start()
            elif frame.type == FrameType.RESET:
                report.send(reason_name(decode_reason(frame)[0]))


HOSTILE: dict[str, Callable[..., None]] = {
    "garbage": send_garbage,
    "flood": send_pings,
    "greedy": send_too_much,
}


def _play_hostile(conn: Connection, sockets: dict[str, str]) -> None:
    def serve(listener: socket.socket, behave: Callable[..., None]) -> None:
        while True:
            sock, _ = listener.accept()

            def run(sock: socket.socket = sock) -> None:
                with contextlib.suppress(OSError):
                    behave(sock, conn) if behave is send_too_much else behave(sock)

            threading.Thread(target=run, daemon=True).start()

    for vm, behave in HOSTILE.items():
        listener = socket.socket(socket.AF_UNIX)
        listener.bind(sockets[vm])
        listener.listen()
        threading.Thread(target=serve, args=(listener, behave), daemon=True).start()
    conn.send("ready")
    threading.Event().wait()


@pytest.fixture
def hostile(cloud: Cloud) -> Iterator[Connection]:
    """The hostile guests; what they report (the resets the greedy one got)."""
    with forked(_play_hostile, cloud.sockets) as conn:
        assert conn.poll(10) and conn.recv() == "ready"
        yield conn


def metrics(cloud: Cloud) -> dict[tuple[str, tuple[str, ...]], float]:
    text = cloud.api.get("/metrics").text
    return {
        (sample.name, tuple(sample.labels.values())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name.startswith("vmfabric_access_")
    }


def test_hostile_guests_reset_only_their_own_channels(
    cloud: Cloud, hostile: Connection, big_file: tuple[Path, str]
) -> None:
    """Garbage and a flood of PINGs reset their channels; other VMs' downloads go on."""
    before = metrics(cloud)
    auth = f"Authorization: Bearer {cloud.grant()}"
    big = f"{cloud.url}/vm/web1/{cloud.ports.http}/file"
    with ThreadPoolExecutor(4) as pool:
        downloads = [pool.submit(speed, big, auth) for _ in range(2)]
        answers = {
            vm: pool.submit(get, cloud, f"/vm/{vm}/{cloud.ports.http}/", cloud.grant(vm))
            for vm in ("garbage", "flood")
        }
        for download in downloads:
            rate, digest = download.result()
            assert digest == big_file[1]
            print(f"100 MB beside hostile guests: {rate:.0f} MB/s")
        statuses = {vm: answer.result().status_code for vm, answer in answers.items()}
    assert {*statuses.values()} <= {502, 503}, statuses
    after = metrics(cloud)
    for reason in ("PROTOCOL_ERROR", "FLOOD"):
        key = ("vmfabric_access_channel_resets_total", (reason,))
        assert after[key] > before.get(key, 0), reason
    assert get(cloud, f"/vm/web1/{cloud.ports.http}/", cloud.grant()).status_code == 200


def test_a_stream_sent_more_than_its_window_is_reset(cloud: Cloud, hostile: Connection) -> None:
    """A client that does not read holds the window shut; the guest that sends anyway gets
    its stream reset (FLOW_CONTROL), and the client's connection is cut."""
    gateway = ("127.0.0.1", int(cloud.url.rsplit(":", 1)[1]))
    with socket.create_connection(gateway) as client:
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 16)
        request = "GET /vm/greedy/80/ HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer "
        client.sendall(f"{request}{cloud.grant('greedy', 80)}\r\n\r\n".encode())
        assert hostile.poll(20), "the gateway did not reset the stream"
        assert hostile.recv() == "FLOW_CONTROL"
        client.settimeout(20)
        received = bytearray()
        with contextlib.suppress(ConnectionResetError):
            while chunk := client.recv(1 << 20):
                received += chunk
        assert received.startswith(b"HTTP/1.1 200 ")
        assert len(received) < 40 * 1024 * 1024  # cut, not complete
    assert get(cloud, f"/vm/web1/{cloud.ports.http}/", cloud.grant()).status_code == 200


def test_metrics_count_channels_streams_and_bytes(cloud: Cloud) -> None:
    before = metrics(cloud)
    credential = cloud.grant()
    size = 3_000_000
    got = get(cloud, f"/vm/web1/{cloud.ports.http}/bytes/{size}?1", credential)
    assert got.content == pattern(size, 1)
    after = metrics(cloud)
    assert after[("vmfabric_access_channels", ())] >= 1
    opened = ("vmfabric_access_streams_opened_total", ())
    assert after[opened] == before.get(opened, 0) + 1
    from_vm = ("vmfabric_access_bytes_total", ("from-vm",))
    assert after[from_vm] >= before.get(from_vm, 0) + size
    to_vm = ("vmfabric_access_bytes_total", ("to-vm",))
    assert after[to_vm] > before.get(to_vm, 0)  # the request's head
    uses = ("vmfabric_access_uses_total", ("http", "ok"))
    eventually(lambda: metrics(cloud)[uses] == before.get(uses, 0) + 1)


# `vmfabric serve` runs the gateway with the app.


def test_serve_runs_the_gateway_with_the_app(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("VMFABRIC_STATE", str(tmp_path))
    port = free_port()
    options = ServeOptions(
        db_url=f"sqlite:///{tmp_path / 'vmfabric.db'}",
        gateway_listen=("127.0.0.1", port),
        check_interval_s=0,
    )
    with TestClient(build_app(options)):
        answer = httpx.get(f"http://127.0.0.1:{port}/vm/web1/80/", timeout=10)
        assert problem(answer, 404)["detail"] == "unknown VM 'web1'"
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.1:{port}/", timeout=10)


def serve(*args: str, state: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "vmfabric.cli.main", "serve", *args],
        env={**os.environ, "VMFABRIC_STATE": str(state)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_serve_refuses_a_gateway_address_it_cannot_use(tmp_path: Path) -> None:
    bad = serve("--gateway-listen", "gateway:8751", state=tmp_path)
    assert bad.returncode == 2
    assert (
        bad.stderr
        == "error: invalid --gateway-listen 'gateway:8751': 'gateway' is not an IP address\n"
    )
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = serve("--gateway-listen", f"127.0.0.1:{port}", "--dns-listen", "off", state=tmp_path)
    assert done.returncode == 1
    assert done.stderr.startswith(f"error: cannot serve the access gateway on 127.0.0.1:{port}: ")
    assert len(done.stderr.splitlines()) == 1
    assert not (tmp_path / "vmfabric.db").exists()
