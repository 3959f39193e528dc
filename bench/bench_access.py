"""Access to a server inside a VM through the gateway (issue 7): single-stream throughput,
added latency per request and 100 concurrent streams, side by side with socat relaying the
same kind of unix-socket channel.

All on loopback, without root. One HTTP/1.1 server in a child process (`http.server` with a
thread per connection, bodies sent with `sendfile`) plays the server inside the VM: `/file`
is a file of `--file-mb` MB of random bytes, `/slice?o=OFFSET&n=SIZE` a part of it, `/small`
100 bytes. It is reached four ways:

- direct: `http://127.0.0.1:<server>/...`;
- gateway: the access gateway (`vmfabric.access.gateway`, on its uvloop thread in this
  process, as `serve` runs it) at `/vm/web1/<server>/...` with `Authorization: Bearer`, over
  one unix-socket channel to the real guest proxy (the zipapp of `vmfabric.access.bundle` in
  a process of its own, `--unix PATH --allow <server>`, as in the lab). Behind the gateway a
  throw-away controller (SQLite in the temporary directory, a noop host, the VM web1 and a
  grant for the server's port) checks and logs every request as in production;
- socat: `socat TCP-LISTEN:<a>,fork UNIX-CONNECT:x.sock` (the gateway's place) and
  `socat UNIX-LISTEN:x.sock,fork TCP:127.0.0.1:<server>` (the guest proxy's), default 8 KiB
  buffers; socat_b262144: the same pair with `-b 262144`. Their TCP sockets are `nodelay`
  (asyncio's default, so the gateway's and the guest proxy's too: otherwise Nagle's algorithm
  holds a small answer for curl's delayed ACK now and then, 40 ms), and they listen with a
  backlog of 128 (socat's default of 5 drops the SYNs of 100 connections made at once).
  socat relays each client connection over a unix connection of its own and end to end: no
  multiplexing, flow control, credential or HTTP parsing, and the client's keep-alive
  connection is the server's.

(1) Throughput: curl downloads `/file` (`-o /dev/null`, `%{size_download}`, `%{time_total}`)
`--reps` times per path, the paths in turn, after one warm-up each; MB/s (10^6 bytes) as
median, min and max, and for the gateway the CPU that this process (the gateway's thread)
and the guest proxy used: seconds per GB and cores busy while downloading.
(2) Added latency: one curl GETs `/small` `--requests` times over one kept-alive connection,
another `--requests`/4 times with `Connection: close` (a new connection each); p50/p99 of
curl's `%{time_total}` per path, in microseconds, and the path's minus direct's; for the
gateway, the CPU microseconds per request of this process and of the guest proxy. The first
request of each series, which connects (and wakes the channel), is not counted.
(3) `--streams` downloads at once (`curl -Z --parallel-immediate`) of `--stream-mb` MB each,
every stream its own part of the file, through the gateway and through socat: how many
arrived whole (size and SHA-256), the aggregate MB/s, each stream's MB/s (min, median, max)
and Jain's fairness index of them (1: all equal), the slowest stream's MB/s over an equal
share of the aggregate, and the slowest stream's time against the median stream's (curl starts
them together; the first few connected run alone for a moment and finish early, which lowers
Jain's index without starving anyone).

    uv run python bench/bench_access.py          # 200 MB x 7, 2,000 + 500 requests, 100 x 4 MB
    uv run python bench/bench_access.py --quick  # 50 MB x 3, 300 + 75 requests, 100 x 1 MB

Needs curl and socat. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import multiprocessing
import os
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from functools import partial
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import parse_qs, urlsplit

from figures import cpu_seconds, free_port, percentile
from vmfabric.access.bundle import build_guest_proxy
from vmfabric.access.channels import Locate
from vmfabric.access.gateway import Gateway, gateway_thread
from vmfabric.api.server import build_controller
from vmfabric.services import access
from vmfabric.services.context import Controller
from vmfabric.services.hosts import register_host
from vmfabric.services.networks import CreateNetwork, create_network
from vmfabric.services.vms import CreateVm, NicRequest, create_vm

MB = 1_000_000
VM = "web1"
SMALL = b"x" * 100
BACKLOG = 128
STARTUP_S = 10.0
TARGET_RATIO = 0.5
TARGET_MBPS = 100.0
"""Issue 7's targets: at least half of socat's single-stream throughput, and 100 MB/s."""
T = TypeVar("T")


# The server in the VM: a child process, so that its work does not compete with the
# gateway's thread for this process's interpreter lock.


class FileServer(BaseHTTPRequestHandler):
    """The file, parts of it and a small page, over HTTP/1.1 keep-alive."""

    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
    """As web servers do on keep-alive connections: the head and the body are two writes,
    and Nagle's algorithm would hold the body for the client's delayed ACK (40 ms)."""
    file = Path()

    def log_message(self, *_args: object) -> None:
        """Quiet: a line per request would cost more than the request."""

    def do_GET(self) -> None:
        url = urlsplit(self.path)
        if url.path == "/small":
            self._head(len(SMALL))
            self.wfile.write(SMALL)
        elif url.path == "/file":
            self._send_file(0, self.file.stat().st_size)
        elif url.path == "/slice":
            query = parse_qs(url.query)
            self._send_file(int(query["o"][0]), int(query["n"][0]))
        else:
            self.send_error(404)

    def _head(self, length: int) -> None:
        self.send_response(200)
        self.send_header("Content-Length", str(length))
        self.end_headers()

    def _send_file(self, offset: int, count: int) -> None:
        """By `sendfile`, as a real web server would: the server costs next to no CPU."""
        self._head(count)
        with self.file.open("rb") as file:
            self.connection.sendfile(file, offset, count)


class Server(ThreadingHTTPServer):
    """A thread per connection, none of them holding up the end of the child."""

    daemon_threads = True
    request_queue_size = 2 * BACKLOG
    """The default of 5 would drop the SYNs of a hundred connections made at once."""


def serve(file: Path, port_to: Connection) -> None:
    """Child mode: serve `file` on a free loopback port, send the port, run until killed."""
    FileServer.file = file
    server = Server(("127.0.0.1", 0), FileServer)
    port_to.send(server.server_address[1])
    server.serve_forever()


# Processes, each in a session of its own, so that stopping one ends what it forked (socat's
# relays) and nothing else.


def start(command: Sequence[str], stack: contextlib.ExitStack, **kw: Any) -> subprocess.Popen[Any]:
    """Start `command`; `stack` stops it."""
    process = subprocess.Popen(command, start_new_session=True, **kw)
    stack.callback(stop, process)
    return process


def stop(process: subprocess.Popen[Any]) -> None:
    """SIGTERM to the process's group (its id), SIGKILL after 5 s."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=5)
            return


def wait_for(ready: Callable[[], bool], process: subprocess.Popen[Any], what: str) -> None:
    """Until `ready()`: a measurement must not begin before every path is up."""
    deadline = time.monotonic() + STARTUP_S
    while not ready():
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not start")
        time.sleep(0.02)


def listening(port: int) -> bool:
    """Whether a TCP connection to the port is accepted (socat makes no file to wait for)."""
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
        return True
    return False


def write_random(path: Path, size: int) -> None:
    """Random bytes: nothing on the way can compress them or take a shortcut."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as file:
        for _ in range(size // MB):
            file.write(os.urandom(MB))


def start_server(file: Path, stack: contextlib.ExitStack) -> int:
    """The server in the VM, started; its port. Forked from this process before it starts any
    thread, so the child does not import the package again (seconds on a small machine)."""
    context = multiprocessing.get_context("fork")
    ours, theirs = context.Pipe()
    process = context.Process(target=serve, args=(file, theirs), daemon=True)
    process.start()
    stack.callback(end, process)
    if not ours.poll(STARTUP_S):
        raise RuntimeError("the server in the VM did not start")
    return int(ours.recv())


def end(process: BaseProcess) -> None:
    """Kill a forked child by its id and reap it."""
    process.kill()
    process.join()


@contextlib.contextmanager
def vm_with_grant(root: Path, port: int) -> Iterator[tuple[Controller, str]]:
    """A throw-away controller in `root` (SQLite, a noop host) with the VM and a credential
    for `port`: what the gateway checks and logs every request against."""
    os.environ["VMFABRIC_STATE"] = str(root)  # the DHCP driver's files go there
    ctl = build_controller(f"sqlite:///{root / 'vmfabric.db'}", lab=False)
    try:
        access.configure_access(ctl, secrets.token_bytes(32))
        register_host(ctl, "hv1", "noop", "br0")
        create_network(ctl, CreateNetwork("net1", ["10.0.0.0/24"]))
        asyncio.run(create_vm(ctl, CreateVm(VM, "hv1", [NicRequest("net1")])))
        yield ctl, access.grant_access(ctl, VM, port, timedelta(hours=1)).credential
    finally:
        access.flush_uses(ctl)
        ctl.close()


def start_guest_proxy(root: Path, port: int, stack: contextlib.ExitStack) -> tuple[int, Path]:
    """The guest proxy's zipapp listening on a unix socket, as in a lab VM; its pid and
    socket."""
    bundle = build_guest_proxy(root / "vmfabric-guest-proxy")
    channel = root / "access.sock"
    log = stack.enter_context((root / "guest-proxy.log").open("wb"))
    command = [sys.executable, "-I", "-S", str(bundle), "--unix", str(channel)]
    process = start([*command, "--allow", str(port)], stack, stderr=log)
    wait_for(channel.exists, process, "the guest proxy")
    return process.pid, channel


def channel_at(path: Path) -> Locate:
    """The gateway's lookup of a VM's channel: the guest proxy's socket (what the lab's host
    agent answers; the noop host has none)."""

    async def locate(_vm: str) -> str:
        return str(path)

    return locate


def start_socat_pair(
    root: Path, server_port: int, buffer: int | None, stack: contextlib.ExitStack
) -> int:
    """Two socats relaying TCP over a unix socket to the server; the TCP port of the first."""
    sock = root / f"socat-{buffer or 'default'}.sock"
    port = free_port()
    size = ["-b", str(buffer)] if buffer else []
    guest_side = [
        f"UNIX-LISTEN:{sock},fork,backlog={BACKLOG}",
        f"TCP:127.0.0.1:{server_port},nodelay",
    ]
    guest = start(["socat", *size, *guest_side], stack)
    wait_for(sock.exists, guest, "socat's unix listener")
    host_side = [f"TCP-LISTEN:{port},bind=127.0.0.1,reuseaddr,fork,nodelay,backlog={BACKLOG}"]
    host = start(["socat", *size, *host_side, f"UNIX-CONNECT:{sock}"], stack)
    wait_for(lambda: listening(port), host, "socat's TCP listener")
    return port


# Measurements: curl is the client, in processes of its own.


@dataclass(frozen=True)
class Route:
    """One way to the server: its URL prefix, the headers it needs, and the processes whose
    CPU time is counted (by name)."""

    base: str
    headers: tuple[str, ...] = ()
    pids: dict[str, int] = field(default_factory=dict)


def with_cpu(pids: dict[str, int], action: Callable[[], T]) -> tuple[T, dict[str, float]]:
    """What `action` returns, and the CPU seconds each process used meanwhile."""
    before = {name: cpu_seconds(pid) for name, pid in pids.items()}
    result = action()
    return result, {name: cpu_seconds(pid) - before[name] for name, pid in pids.items()}


def curl(route: Route, *args: str, check: bool = True) -> list[list[str]]:
    """curl with the route's headers: its `-w` lines, split on blanks."""
    command = ["curl", "-sS", *(a for h in route.headers for a in ("-H", h)), *args]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)
    if check and done.returncode != 0:
        raise RuntimeError(f"curl exited with {done.returncode}: {done.stderr.strip()}")
    return [line.split() for line in done.stdout.splitlines()]


def download(route: Route, size: int) -> float:
    """One download of `/file`: its seconds (curl's), after checking that all of it came."""
    write = "%{size_download} %{time_total} %{http_code}\n"
    [[got, seconds, status]] = curl(route, "-o", "/dev/null", "-w", write, f"{route.base}/file")
    if status != "200" or int(got) != size:
        raise RuntimeError(f"{route.base}/file: HTTP {status}, {got} of {size} bytes")
    return float(seconds)


def throughput(routes: dict[str, Route], size: int, reps: int) -> dict[str, dict[str, Any]]:
    """`reps` downloads per route, the routes in turn so that a change of load on the machine
    hits them alike; MB/s and the CPU of each route's processes."""
    for route in routes.values():
        download(route, size)
    seconds: dict[str, list[float]] = {name: [] for name in routes}
    cpu = {name: dict.fromkeys(route.pids, 0.0) for name, route in routes.items()}
    for _ in range(reps):
        for name, route in routes.items():
            took, used = with_cpu(route.pids, partial(download, route, size))
            seconds[name].append(took)
            for process, cpu_s in used.items():
                cpu[name][process] += cpu_s
    return {name: rates(seconds[name], size, cpu[name]) for name in routes}


def rates(seconds: list[float], size: int, cpu: dict[str, float]) -> dict[str, Any]:
    """MB/s of downloads of `size` bytes; CPU seconds per GB and cores busy, per process."""
    mbps = [size / s / MB for s in seconds]
    result: dict[str, Any] = {
        "median": round(statistics.median(mbps), 1),
        "min": round(min(mbps), 1),
        "max": round(max(mbps), 1),
    }
    if cpu:
        gigabytes = size * len(seconds) / 1e9
        result["cpu_s_per_gb"] = {name: round(used / gigabytes, 2) for name, used in cpu.items()}
        result["cpu_cores"] = {name: round(used / sum(seconds), 2) for name, used in cpu.items()}
    return result


def request_times(route: Route, count: int, *, keep_alive: bool) -> list[float]:
    """`count` GETs of `/small` by one curl, over one connection or a new one each; their
    seconds, without the first request's."""
    args = [] if keep_alive else ["-H", "Connection: close"]
    args += ["-w", "%{time_total} %{http_code} %{num_connects}\n"]
    for _ in range(count + 1):
        args += ["-o", "/dev/null", f"{route.base}/small"]
    lines = curl(route, *args)[1:]
    connects = "0" if keep_alive else "1"
    if any(status != "200" or made != connects for _, status, made in lines):
        raise RuntimeError(f"{route.base}/small: not {count} answers over {connects} connects")
    return [float(seconds) for seconds, _, _ in lines]


def micros(values_s: list[float]) -> dict[str, int]:
    """p50 and p99 of durations in seconds, in microseconds (`figures.summary` gives tenths
    of milliseconds, too coarse for a request on loopback)."""
    us = [v * 1e6 for v in values_s]
    return {"n": len(us), "p50": round(statistics.median(us)), "p99": round(percentile(us, 0.99))}


def latency(routes: dict[str, Route], requests: int) -> dict[str, dict[str, Any]]:
    """p50/p99 per route over kept-alive and new connections, each minus direct's, and the
    CPU each route's processes spent per request."""
    measured: dict[str, dict[str, Any]] = {}
    added: dict[str, dict[str, Any]] = {}
    for mode, keep_alive, count in (
        ("keep_alive", True, requests),
        ("new_connection", False, requests // 4),
    ):
        measured[mode] = {}
        for name, route in routes.items():
            ask = partial(request_times, route, count, keep_alive=keep_alive)
            times, used = with_cpu(route.pids, ask)
            measured[mode][name] = micros(times)
            if used:
                per_request = {process: round(s * 1e6 / (count + 1)) for process, s in used.items()}
                measured[mode][name]["cpu_us_per_request"] = per_request
        direct = measured[mode]["direct"]
        added[mode] = {
            name: {q: figures[q] - direct[q] for q in ("p50", "p99")}
            for name, figures in measured[mode].items()
            if name != "direct"
        }
    return {"latency_us": measured, "added_latency_us": added}


def digest(path: Path, offset: int = 0, size: int = -1) -> str:
    """SHA-256 of a part of a file: a stream must bring its own bytes, not only as many."""
    with path.open("rb") as file:
        file.seek(offset)
        return hashlib.sha256(file.read(size)).hexdigest()


def jain(values: list[float]) -> float:
    """Jain's fairness index: 1 when all are equal, 1/n when one has everything."""
    return sum(values) ** 2 / (len(values) * sum(v * v for v in values))


def concurrent(route: Route, file: Path, streams: int, size: int, out: Path) -> dict[str, Any]:
    """`streams` downloads at once by one curl, each of its own part of `file`."""
    stride = (file.stat().st_size - size) // streams
    offsets = {i * stride: i for i in range(streams)}
    write = "%{url_effective} %{size_download} %{time_total} %{http_code}\n"
    args = ["-Z", "--parallel-immediate", "--parallel-max", str(streams), "-w", write]
    for offset, i in offsets.items():
        args += ["-o", str(out / str(i)), f"{route.base}/slice?o={offset}&n={size}"]
    began = time.perf_counter()
    lines = curl(route, *args, check=False)
    wall = time.perf_counter() - began
    times, whole = [], 0
    for url, got, seconds, status in lines:
        offset = int(parse_qs(urlsplit(url).query)["o"][0])
        part = out / str(offsets[offset])
        whole += status == "200" and int(got) == size and digest(part) == digest(file, offset, size)
        part.unlink(missing_ok=True)
        times.append(float(seconds))
    per_stream = [size / t / MB for t in times]
    aggregate = size * streams / wall / MB
    finish = {"median": statistics.median(times), "slowest": max(times)}
    return {
        "whole": whole,
        "aggregate_mbps": round(aggregate, 1),
        "slowest_stream_over_equal_share": round(min(per_stream) / (aggregate / streams), 2),
        "per_stream_mbps": {
            "min": round(min(per_stream), 2),
            "median": round(statistics.median(per_stream), 2),
            "max": round(max(per_stream), 2),
        },
        "jain": round(jain(per_stream), 3),
        "finish_s": {key: round(value, 3) for key, value in finish.items()},
        "slowest_over_median": round(finish["slowest"] / finish["median"], 2),
    }


def start_routes(root: Path, file: Path, stack: contextlib.ExitStack) -> dict[str, Route]:
    """Start the server, the controller, the guest proxy, the gateway and the socats: the
    four ways to the server, by name."""
    port = start_server(file, stack)
    ctl, credential = stack.enter_context(vm_with_grant(root, port))
    proxy, channel = start_guest_proxy(root, port, stack)
    gateway = stack.enter_context(
        gateway_thread(Gateway(ctl, ("127.0.0.1", 0), locate=channel_at(channel)))
    )
    host, gateway_port = gateway.address
    return {
        "direct": Route(f"http://127.0.0.1:{port}"),
        "gateway": Route(
            f"http://{host}:{gateway_port}/vm/{VM}/{port}",
            (f"Authorization: Bearer {credential}",),
            {"gateway": os.getpid(), "guest_proxy": proxy},
        ),
        **{
            name: Route(f"http://127.0.0.1:{start_socat_pair(root, port, buffer, stack)}")
            for name, buffer in (("socat", None), ("socat_b262144", 262144))
        },
    }


def against_targets(speeds: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The gateway's median throughput over each socat's, and issue 7's targets met or not."""
    gateway = speeds["gateway"]["median"]
    ratios = {
        peer: round(gateway / figures["median"], 2)
        for peer, figures in speeds.items()
        if peer.startswith("socat")
    }
    return {
        "ratio_gateway_over": ratios,
        "targets_met": {
            **{f"half_of_{peer}": ratio >= TARGET_RATIO for peer, ratio in ratios.items()},
            "at_least_100_mbps": gateway >= TARGET_MBPS,
        },
    }


def run(root: Path, args: argparse.Namespace, stack: contextlib.ExitStack) -> dict[str, Any]:
    """(1), (2) and (3) of the module's text, in that order."""
    file = root / "www" / "big.bin"
    write_random(file, args.file_mb * MB)
    routes = start_routes(root, file, stack)
    speeds = throughput(routes, file.stat().st_size, args.reps)
    out = root / "streams"
    out.mkdir()
    size = int(args.stream_mb * MB)
    return {
        "throughput_mbps": speeds,
        **against_targets(speeds),
        **latency({name: routes[name] for name in ("direct", "gateway", "socat")}, args.requests),
        "concurrent": {
            "streams": args.streams,
            "mb_each": args.stream_mb,
            **{
                name: concurrent(routes[name], file, args.streams, size, out)
                for name in ("gateway", "socat")
            },
        },
    }


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--file-mb", type=int, default=200, help="size of the big download")
    parser.add_argument("--reps", type=int, default=7, help="downloads per path")
    parser.add_argument("--requests", type=int, default=2000, help="small GETs kept alive")
    parser.add_argument("--streams", type=int, default=100)
    parser.add_argument("--stream-mb", type=float, default=4)
    parser.add_argument("--quick", action="store_true", help="50 MB x 3, 300 GETs, 1 MB streams")
    args = parser.parse_args()
    if args.quick:
        args.file_mb, args.reps, args.requests, args.stream_mb = 50, 3, 300, 1
    return args


def main() -> None:
    args = arguments()
    missing = [tool for tool in ("curl", "socat") if shutil.which(tool) is None]
    if missing:
        print(json.dumps({"bench": "access", "error": f"missing {', '.join(missing)}"}))
        sys.exit(1)
    began, load = time.monotonic(), os.getloadavg()[0]
    with (
        tempfile.TemporaryDirectory(prefix="vmf-bench-access-") as tmp,
        contextlib.ExitStack() as stack,
    ):
        results = run(Path(tmp), args, stack)
    figures = {
        "bench": "access",
        "quick": args.quick,
        "cpus": len(os.sched_getaffinity(0)),
        "load_1m_before": round(load, 2),
        "file_mb": args.file_mb,
        "reps": args.reps,
        **results,
        "seconds": round(time.monotonic() - began, 1),
    }
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
