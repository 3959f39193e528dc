"""The patent's whole chain in the lab: CLI/API -> preset IP -> lab host defines the VM and
returns its MAC -> dnsmasq reservation -> the VM's real DHCP client gets exactly that IP."""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterator

import pytest

from vmfabric.cli.client import ApiClient, CliError
from vmfabric.lab import lifecycle
from vmfabric.lab.testing import controller_lab

pytestmark = pytest.mark.lab


@pytest.fixture
def cloud() -> Iterator[ApiClient]:
    """A two-host lab with its own controller (started by `lab up`) on free ports."""
    with controller_lab(2) as lab:
        yield ApiClient(lab.url)


def address_in_vm(vm: str, device: str = "eth0") -> str | None:
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        shown = lifecycle.run_in_vm(vm, ["ip", "-4", "-o", "addr", "show", "dev", device]).stdout
        if found := re.search(r"inet (\S+)/", shown):
            return found.group(1)
        time.sleep(0.1)
    return None


def create(api: ApiClient, name: str, host: str, address: str | None = None) -> dict[str, str]:
    body = {"name": name, "host": host, "nics": [{"network": "ext", "address": address}]}
    return api.post("/vms", body)["nics"][0]


def test_named_and_automatic_ips_reach_the_vms_on_two_hosts(cloud: ApiClient) -> None:
    cloud.post("/networks", {"name": "ext", "cidrs": ["10.61.0.0/24"], "kind": "external"})
    nics = {
        "named1": create(cloud, "named1", "hv1", "10.61.0.77"),
        "auto1": create(cloud, "auto1", "hv1"),
        "named2": create(cloud, "named2", "hv2", "10.61.0.88"),
        "auto2": create(cloud, "auto2", "hv2"),
    }
    assert nics["named1"]["ipv4"] == "10.61.0.77"
    assert nics["named2"]["ipv4"] == "10.61.0.88"
    for vm, nic in nics.items():
        assert address_in_vm(vm) == nic["ipv4"], vm
        mac = lifecycle.run_in_vm(vm, ["cat", "/sys/class/net/eth0/address"]).stdout.strip()
        assert mac == nic["mac"]
    ping = lifecycle.run_in_vm("auto2", ["busybox", "ping", "-c1", "-W2", "10.61.0.77"])
    assert ping.returncode == 0


def test_set_ip_is_served_after_the_guest_renews_and_delete_frees_everything(
    cloud: ApiClient,
) -> None:
    cloud.post("/networks", {"name": "ext", "cidrs": ["10.62.0.0/24"], "kind": "external"})
    create(cloud, "mover", "hv1", "10.62.0.10")
    assert address_in_vm("mover") == "10.62.0.10"
    cloud.post("/vms/mover/set-ip", {"address": "10.62.0.11"})
    cloud.post("/vms/mover/stop")
    cloud.post("/vms/mover/start")
    assert address_in_vm("mover") == "10.62.0.11"
    cloud.delete("/vms/mover")
    assert cloud.get("/networks/ext")["subnets"][0]["used"] == 0
    with pytest.raises(CliError, match="unknown VM"):
        cloud.get("/vms/mover")
    assert "mover" not in {vm["name"] for vm in lifecycle.status()["vms"]}


def test_controller_restart_keeps_reservations(cloud: ApiClient) -> None:
    cloud.post("/networks", {"name": "ext", "cidrs": ["10.63.0.0/24"], "kind": "external"})
    create(cloud, "keeper", "hv2", "10.63.0.5")
    info = lifecycle.status()
    controller = next(p for p in info["processes"] if "controller" in p["name"])
    os.kill(controller["pid"], 9)
    lifecycle.up(2)
    cloud.post("/vms/keeper/stop")
    cloud.post("/vms/keeper/start")
    assert address_in_vm("keeper") == "10.63.0.5"
