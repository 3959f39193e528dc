"""VM creates per second through the API, hypervisor step excluded (hosts on the noop driver).

A real `vmfabric serve` on SQLite with the real dnsmasq driver writing one reservation file
per NIC; concurrent clients create VMs with automatic addresses in a /16. Prints one JSON line.

    uv run python bench/bench_api_creates.py [--vms 2000] [--clients 16] [--server-cpu 1]

The controller is one Python process; its threads (HTTP loop, request workers, the database
writer) hand the interpreter lock to each other many times per create, which costs much more
when they run on different CPUs: `--server-cpu` measures it kept on one.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def start_controller(state: Path, cpu: int | None = None) -> tuple[subprocess.Popen[bytes], str]:
    """`vmfabric serve` on a fresh state directory, on one CPU if `cpu` is given."""
    listen = f"127.0.0.1:{free_port()}"
    pin = ["taskset", "--cpu-list", str(cpu)] if cpu is not None else []
    process = subprocess.Popen(
        [*pin, sys.executable, "-m", "vmfabric.cli.main", "serve", "--listen", listen],
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


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--vms", type=int, default=2000)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument(
        "--server-cpu", type=int, help="run the controller on this CPU only (taskset)"
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        process, url = start_controller(Path(tmp), args.server_cpu)
        try:
            client = httpx.Client(
                base_url=f"{url}/api/v1",
                timeout=60,
                limits=httpx.Limits(max_connections=args.clients),
            )
            client.post("/hosts", json={"name": "hv1", "driver": "noop", "bridge": "br0"})
            client.post("/networks", json={"name": "net", "cidrs": ["10.128.0.0/16"]})

            def create(index: int) -> int:
                body = {"name": f"vm{index}", "host": "hv1", "nics": [{"network": "net"}]}
                return client.post("/vms", json=body).status_code

            started = time.perf_counter()
            with ThreadPoolExecutor(args.clients) as pool:
                statuses = list(pool.map(create, range(args.vms)))
            elapsed = time.perf_counter() - started
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
                "failed": sum(1 for s in statuses if s != 201),
                "seconds": round(elapsed, 3),
                "creates_per_second": round(args.vms / elapsed, 1),
            }
        )
    )


if __name__ == "__main__":
    main()
