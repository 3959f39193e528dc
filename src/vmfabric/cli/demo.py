"""`vmfabric lab demo`: the patent's chain, shown on a two-host lab.

Brings the lab up, creates an external network and VMs with named and automatic addresses
on both hosts, then reads inside every VM the address its real DHCP client got and compares
it with the one vmfabric preset.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import Any

from vmfabric.cli.client import ApiClient, CliError
from vmfabric.lab import lifecycle

NETWORK = {"name": "demo", "cidrs": ["10.100.0.0/24"], "kind": "external"}
VMS = (
    ("web1", "hv1", "10.100.0.10", "debian12"),
    ("app1", "hv1", None, "alpine3"),
    ("web2", "hv2", "10.100.0.20", "debian12"),
    ("app2", "hv2", None, "alpine3"),
)
_INET = re.compile(r"inet (\d+\.\d+\.\d+\.\d+)/")
LEASE_WAIT_S = 20.0


@dataclass(frozen=True)
class Outcome:
    """One VM's preset address against the one its DHCP client configured."""

    vm: str
    host: str
    mac: str
    preset: str
    in_vm: str | None

    @property
    def matches(self) -> bool:
        """True when the VM holds exactly the preset address."""
        return self.preset == self.in_vm


def run_demo(step: Any) -> list[Outcome]:
    """Build the lab and the demo VMs; return what each VM got."""
    step("bringing the lab up (2 hosts, controller)")
    lifecycle.up(2)
    client = ApiClient()
    step("creating the external network demo (10.100.0.0/24)")
    _recreate_network(client)
    created = []
    for name, host, address, image in VMS:
        step(f"creating VM {name} on {host} ({address or 'automatic address'})")
        body = {
            "name": name,
            "host": host,
            "image": image,
            "nics": [{"network": "demo", "address": address}],
        }
        created.append(client.post("/vms", body))
    step("waiting for each VM's DHCP client")
    return [_outcome(vm) for vm in created]


def _recreate_network(client: ApiClient) -> None:
    """Start from a clean demo network, so the demo can be run again."""
    for vm in client.get("/vms"):
        if any(nic["network"] == "demo" for nic in vm["nics"]):
            client.delete(f"/vms/{vm['name']}")
    try:
        client.delete("/networks/demo")
    except CliError as error:
        if error.code != 2:
            raise
    client.post("/networks", NETWORK)


def _outcome(vm: dict[str, Any]) -> Outcome:
    nic = vm["nics"][0]
    return Outcome(vm["name"], vm["host"], nic["mac"], nic["ipv4"], _address_in_vm(vm["name"]))


def _address_in_vm(name: str) -> str | None:
    """The IPv4 address on eth0 inside the lab VM, once its DHCP client configured one."""
    deadline = time.monotonic() + LEASE_WAIT_S
    while time.monotonic() < deadline:
        shown = lifecycle.run_in_vm(name, ["ip", "-4", "-o", "addr", "show", "dev", "eth0"])
        found = _INET.search(shown.stdout)
        if found:
            return found.group(1)
        time.sleep(0.2)
    return None
