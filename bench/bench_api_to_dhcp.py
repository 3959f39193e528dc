"""Time from the API answering a VM create to a real DHCP client getting the preset address.

A controller (SQLite, real dnsmasq driver) serves its API over HTTP; its network's dnsmasq
runs in a `vmf` namespace (tests/lab's `VethLab`) and a busybox udhcpc in the other one takes
the MAC of each VM the API created. Hosts use the noop hypervisor, so the VM is not booted:
the client plays it, starting the moment the API answered. Measured with 10 and with 5,000
existing VMs; `client_only` is the same client asking again for an address dnsmasq already
serves, the floor set by the client's start and the DHCP exchange. Prints one JSON line.

Needs root. Run: `uv run python bench/bench_api_to_dhcp.py [--samples 200]`.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import uvicorn

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "lab"))

from test_dnsmasq_lab import VethLab, stop_our_dnsmasqs

from figures import free_port, summary
from vmfabric.agent.registry import LocalAgents
from vmfabric.api.app import create_app
from vmfabric.dhcp.dnsmasq import DnsmasqServer
from vmfabric.domain.model import DhcpPlacement, NetworkInfo
from vmfabric.process_identity import current_owner
from vmfabric.services.context import Controller
from vmfabric.store.engine import migrate, open_engine, session_factory
from vmfabric.store.group_commit import GroupCommitter

CIDR = "10.77.0.0/16"


@dataclass
class VethFabric:
    """A fabric whose every network's DHCP server sits in the bench's server namespace."""

    lab: VethLab

    def ensure_network(self, network: NetworkInfo) -> DhcpPlacement:
        return self.lab.placement()

    def remove_network(self, name: str) -> None:
        """Nothing to remove: the namespaces go with the lab."""


@contextmanager
def controller_api(lab: VethLab, state: Path) -> Iterator[httpx.Client]:
    """The controller's API served over HTTP from a thread of this process."""
    engine = open_engine(f"sqlite:///{state / 'vmfabric.db'}")
    migrate(engine)
    ctl = Controller(
        sessions=session_factory(engine),
        agents=LocalAgents(),
        dhcp=DnsmasqServer(state / "dhcp", state / "lease.sock", supervise_interval=None),
        fabric=VethFabric(lab),
        owner=current_owner(),
        writes=GroupCommitter(engine),
    )
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(create_app(ctl), host="127.0.0.1", port=port, log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}/api/v1", timeout=60) as client:
            yield client
    finally:
        server.should_exit = True
        thread.join()
        ctl.close()
        stop_our_dnsmasqs(state / "dhcp")
        engine.dispose()


def create(client: httpx.Client, name: str) -> tuple[str, str]:
    """Create a VM; its MAC and preset address."""
    response = client.post("/vms", json={"name": name, "host": "hv1", "nics": [{"network": "n"}]})
    response.raise_for_status()
    nic = response.json()["nics"][0]
    return nic["mac"], nic["ipv4"]


def measure(lab: VethLab, client: httpx.Client, existing: int, samples: int) -> dict[str, object]:
    for index in range(existing):
        create(client, f"old{index}")
    after_api: list[float] = []
    client_only: list[float] = []
    for sample in range(samples):
        mac, address = create(client, f"new{existing}-{sample}")
        for times in (after_api, client_only):
            started = time.perf_counter()
            got = lab.udhcpc_lease(mac)
            if got != address:
                raise RuntimeError(f"{mac} got {got}, not its preset {address}")
            times.append(time.perf_counter() - started)
    return {"after_api": summary(after_api), "client_only": summary(client_only)}


def run(samples: int, sizes: list[int]) -> dict[str, object]:
    results: dict[str, object] = {}
    for existing in sizes:
        with (
            tempfile.TemporaryDirectory(prefix="vmf-bench-", dir="/var/tmp") as tmp,
            VethLab() as lab,
            controller_api(lab, Path(tmp)) as client,
        ):
            client.post("/hosts", json={"name": "hv1", "driver": "noop", "bridge": "br0"})
            client.post("/networks", json={"name": "n", "cidrs": [CIDR]}).raise_for_status()
            results[str(existing)] = measure(lab, client, existing, samples)
    return results


def main() -> None:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit("terminated"))  # clean up on SIGTERM too
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument("--existing", default="10,5000", help="existing VMs, comma-separated")
    options = parser.parse_args()
    load = os.getloadavg()[0]
    sizes = [int(n) for n in options.existing.split(",")]
    latency = run(options.samples, sizes)
    print(
        json.dumps(
            {
                "bench": "api_to_dhcp",
                "latency_ms": latency,
                "cpus": os.cpu_count(),
                "load_avg_1m_at_start": load,
            }
        )
    )


if __name__ == "__main__":
    main()
