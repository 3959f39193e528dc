"""VM creates per second through the API, hypervisor step excluded (hosts on the noop driver).

A real `vmfabric serve` on SQLite with the real dnsmasq driver writing one reservation file
per NIC; concurrent clients create VMs with automatic addresses in a /16. Prints one JSON line.

    uv run python bench/bench_api_creates.py [--vms 2000] [--clients 16] [--server-cpu 1]
        [--dns-listen off]

The controller serves DNS as `serve` does by default (127.0.0.1:5353, on a free port here);
`--dns-listen off` measures creates without it.

The controller is one Python process; its threads (HTTP loop, request workers, the database
writer) hand the interpreter lock to each other many times per create, which costs much more
when they run on different CPUs: `--server-cpu` measures it kept on one (`serve --cpu`).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlsplit

import httpx

from figures import cpu_seconds, free_port


def start_controller(
    state: Path, cpu: int | None = None, dns_listen: str | None = None
) -> tuple[subprocess.Popen[bytes], str]:
    """`vmfabric serve` on a fresh state directory, on one CPU if `cpu` is given, with DNS
    on `dns_listen` (default: a free port on loopback)."""
    listen = f"127.0.0.1:{free_port()}"
    pin = ["--cpu", str(cpu)] if cpu is not None else []
    dns = ["--dns-listen", dns_listen or f"127.0.0.1:{free_port()}"]
    process = subprocess.Popen(
        [sys.executable, "-m", "vmfabric.cli.main", "serve", "--listen", listen, *pin, *dns],
        env={**os.environ, "VMFABRIC_STATE": str(state)},
        stdout=subprocess.DEVNULL,
        stderr=(state / "controller.log").open("wb"),
    )
    url = f"http://{listen}"
    for _ in range(300):
        try:
            httpx.get(f"{url}/api/v1/info", timeout=1).raise_for_status()
            return process, url
        except httpx.HTTPError:
            time.sleep(0.1)
    raise RuntimeError("controller did not start")


def create_all(url: str, clients: int, vms: int) -> list[int]:
    """`clients` threads, each with its own kept-alive connection, creating `vms` VMs.

    The standard library's client: it spends a fraction of httpx's CPU per request, which
    leaves more of this 2-core machine to the controller being measured.
    """
    address = urlsplit(url)
    indexes = iter(range(vms))
    statuses: list[int] = []

    def caller() -> None:
        connection = http.client.HTTPConnection(address.hostname, address.port, timeout=60)
        for index in indexes:
            body = {"name": f"vm{index}", "host": "hv1", "nics": [{"network": "net"}]}
            headers = {"Content-Type": "application/json"}
            connection.request("POST", "/api/v1/vms", json.dumps(body), headers)
            response = connection.getresponse()
            response.read()
            statuses.append(response.status)
        connection.close()

    with ThreadPoolExecutor(clients) as pool:
        for running in [pool.submit(caller) for _ in range(clients)]:
            running.result()
    return statuses


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--vms", type=int, default=2000)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--server-cpu", type=int, help="run the controller with `serve --cpu N`")
    parser.add_argument("--dns-listen", help="`serve --dns-listen`, e.g. off")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        process, url = start_controller(Path(tmp), args.server_cpu, args.dns_listen)
        try:
            setup = httpx.Client(base_url=f"{url}/api/v1", timeout=60)
            setup.post("/hosts", json={"name": "hv1", "driver": "noop", "bridge": "br0"})
            setup.post("/networks", json={"name": "net", "cidrs": ["10.128.0.0/16"]})
            server_cpu, client_cpu = cpu_seconds(process.pid), time.process_time()
            started = time.perf_counter()
            statuses = create_all(url, args.clients, args.vms)
            elapsed = time.perf_counter() - started
            server_cpu = cpu_seconds(process.pid) - server_cpu
            client_cpu = time.process_time() - client_cpu
        finally:
            process.terminate()
            process.wait()
    print(
        json.dumps(
            {
                "bench": "api_creates",
                "vms": args.vms,
                "clients": args.clients,
                "server_cpu": args.server_cpu,
                "dns": args.dns_listen != "off",
                "failed": sum(1 for s in statuses if s != 201),
                "seconds": round(elapsed, 3),
                "creates_per_second": round(args.vms / elapsed, 1),
                "server_cpu_ms_per_create": round(server_cpu / args.vms * 1000, 2),
                "client_cpu_ms_per_create": round(client_cpu / args.vms * 1000, 2),
            }
        )
    )


if __name__ == "__main__":
    main()
