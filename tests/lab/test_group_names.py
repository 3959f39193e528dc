"""Group names and group quarantine in the lab, with the real `dig`, udhcpc and Open vSwitch.

VMs of two images boot on two hosts; the controller's DNS server (on a port of the test's
own) must name exactly the right addresses, follow DHCP releases and deletes within a second,
and blocks must cut a group's VMs off their gateway while the others keep it.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Iterator

import pytest

from vmfabric.api.server import GUEST_SWEEP_S
from vmfabric.cli.client import ApiClient
from vmfabric.domain.quarantine import QUARANTINE_KIND, QUARANTINE_MASK
from vmfabric.lab import lifecycle
from vmfabric.lab.ovs import switch_access
from vmfabric.lab.testing import controller_lab, dig_short, pings, wait_for_ipv4

pytestmark = pytest.mark.lab

ZONE = "vmfabric.test"
GATEWAY = "10.64.0.1"
VMS = {  # name: (host, image)
    "web1": ("hv1", "debian12"),
    "web2": ("hv1", "debian12"),
    "edge1": ("hv1", "alpine"),
    "web3": ("hv2", "debian12"),
    "edge2": ("hv2", "alpine"),
}


@pytest.fixture
def cloud() -> Iterator[tuple[ApiClient, int]]:
    """A two-host lab with its controller (API and DNS on free ports), one external network
    and the VMs of `VMS` holding their leases; the API client and the DNS port."""
    with controller_lab(2) as lab:
        api = ApiClient(lab.url)
        api.post("/networks", {"name": "ext", "cidrs": ["10.64.0.0/24"], "kind": "external"})
        for name, (host, image) in VMS.items():
            create(api, name, host, image)
        for name in VMS:
            assert wait_for_ipv4(name), name
        yield api, lab.dns_port


def create(api: ApiClient, name: str, host: str, image: str) -> str:
    body = {"name": name, "host": host, "image": image, "nics": [{"network": "ext"}]}
    return str(api.post("/vms", body)["nics"][0]["ipv4"])


def addresses(api: ApiClient) -> dict[str, str]:
    return {vm["name"]: vm["nics"][0]["ipv4"] for vm in api.get("/vms")}


def within(seconds: float, check: Callable[[], bool]) -> float:
    """Seconds until `check()` held; fails the test when it did not within `seconds`."""
    started = time.monotonic()
    while not check():
        if time.monotonic() - started > seconds:
            pytest.fail(f"not within {seconds} s")
        time.sleep(0.01)
    return time.monotonic() - started


def names(dns: int, query: str, rdtype: str = "A") -> set[str]:
    return dig_short(dns, query, rdtype)


def dhcp_client_pid(vm: str) -> int:
    found = [p for p in lifecycle.status()["processes"] if p["name"].endswith(f".{vm}.eth0")]
    (process,) = [p for p in found if "udhcpc" in p["name"]]
    return int(process["pid"])


def test_every_name_resolves_to_exactly_its_set_and_follows_leases(
    cloud: tuple[ApiClient, int],
) -> None:
    api, dns = cloud
    ip = addresses(api)
    zone = f".{ZONE}"
    expected_a = {
        f"web1{zone}": {ip["web1"]},
        f"edge2{zone}": {ip["edge2"]},
        f"hv1-debian12{zone}": {ip["web1"], ip["web2"]},
        f"hv1-alpine{zone}": {ip["edge1"]},
        f"hv2-debian12{zone}": {ip["web3"]},
        f"hv2-alpine{zone}": {ip["edge2"]},
    }
    for name, wanted in expected_a.items():
        within(1.0, lambda name=name, wanted=wanted: names(dns, name) == wanted)
    assert names(dns, f"_vmgroups._udp.hv1{zone}", "SRV") == {
        f"0 0 0 hv1-alpine{zone}.",
        f"0 0 0 hv1-debian12{zone}.",
    }
    assert names(dns, f"_vms._udp.hv1-debian12{zone}", "SRV") == {
        f"0 0 0 web1{zone}.",
        f"0 0 0 web2{zone}.",
    }
    for vm, address in ip.items():
        assert dig_short(dns, "-x", address) == {f"{vm}{zone}."}

    os.kill(dhcp_client_pid("web2"), signal.SIGUSR2)  # the guest releases its lease
    took = within(1.0, lambda: names(dns, f"web2{zone}") == set())
    assert names(dns, f"hv1-debian12{zone}") == {ip["web1"]}
    assert dig_short(dns, "-x", ip["web2"]) == set()
    api.delete("/vms/web3")
    took_delete = within(1.0, lambda: names(dns, f"hv2-debian12{zone}") == set())
    assert names(dns, f"web3{zone}") == set()
    assert names(dns, f"_vmgroups._udp.hv2{zone}", "SRV") == {f"0 0 0 hv2-alpine{zone}."}
    print(f"release seen in DNS after {took:.3f} s, delete after {took_delete:.3f} s")


def test_blocked_groups_lose_their_gateway_until_unblocked_and_after_restarts(
    cloud: tuple[ApiClient, int],
) -> None:
    api, dns = cloud
    assert all(pings(vm, GATEWAY) for vm in VMS)

    entry = api.post("/groups/hv1-debian12/block", {"reason": "worm found", "by": "test"})
    assert entry["vms"] == ["web1", "web2"]
    assert not pings("web1", GATEWAY) and not pings("web2", GATEWAY)
    assert all(pings(vm, GATEWAY) for vm in ("edge1", "web3", "edge2"))
    assert names(dns, f"hv1-debian12.{ZONE}", "TXT") == {'"vmfabric-blocked" "reason=worm found"'}
    api.post("/groups/hv1-debian12/unblock", {"reason": "cleaned", "by": "test"})
    assert pings("web1", GATEWAY) and pings("web2", GATEWAY)

    api.post("/images/debian12/block", {"reason": "CVE-2026-0001", "by": "test"})
    assert not pings("web3", GATEWAY) and not pings("web1", GATEWAY)
    assert pings("edge1", GATEWAY) and pings("edge2", GATEWAY)
    create(api, "web4", "hv2", "debian12")  # into a blocked group: DHCP only
    assert wait_for_ipv4("web4"), "DHCP must still work for a blocked VM"
    assert not pings("web4", GATEWAY)

    # the controller dies and the switch loses its rules; the restart puts them back
    controller = next(p for p in lifecycle.status()["processes"] if "controller" in p["name"])
    os.kill(controller["pid"], signal.SIGKILL)
    rules = f"cookie={QUARANTINE_KIND << 48:#x}/{QUARANTINE_MASK:#x}"
    switch_access().run("ovs-ofctl", "del-flows", "vmf-hv2", rules)
    assert pings("web3", GATEWAY)  # unprotected now
    lifecycle.up(2)
    assert not pings("web3", GATEWAY) and not pings("web4", GATEWAY)
    assert pings("edge2", GATEWAY)
    shown = api.get("/groups/hv2-debian12")
    assert shown["blocked"] and [e["action"] for e in shown["audit"]] == ["block"]
    api.post("/images/debian12/unblock", {"by": "test"})
    assert all(pings(vm, GATEWAY) for vm in ("web1", "web3", "web4"))


def test_addresses_a_guest_sets_itself_are_registered_through_its_agent(
    cloud: tuple[ApiClient, int],
) -> None:
    _api, dns = cloud
    static = "10.64.0.200"
    added = lifecycle.run_in_vm("web1", ["ip", "addr", "add", f"{static}/24", "dev", "eth0"])
    assert added.returncode == 0, added.stderr
    sweep = GUEST_SWEEP_S + 5
    within(sweep, lambda: static in names(dns, f"web1.{ZONE}"))
    assert static in names(dns, f"hv1-debian12.{ZONE}")
    assert dig_short(dns, "-x", static) == {f"web1.{ZONE}."}
    lifecycle.run_in_vm("web1", ["ip", "addr", "del", f"{static}/24", "dev", "eth0"])
    within(sweep, lambda: static not in names(dns, f"web1.{ZONE}"))
    assert len(names(dns, f"web1.{ZONE}")) == 1  # its DHCP address stays
