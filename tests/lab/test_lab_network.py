"""Traffic in the lab: real OVS, namespaces, dnsmasq and udhcpc (root)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from vmfabric.domain.model import NetworkKind
from vmfabric.lab.fabric import LabFabric
from vmfabric.lab.netns import netns_exists, netns_pids
from vmfabric.lab.ovs import switch_access
from vmfabric.lab.state import LabStore
from vmfabric.lab.testing import boot, lab_network, pings, temporary_lab, wait_for_ipv4

pytestmark = [
    pytest.mark.lab,
    pytest.mark.skipif(os.geteuid() != 0, reason="the lab needs root"),
]


@pytest.fixture
def lab() -> Iterator[Path]:
    with temporary_lab(hosts=2) as root:
        yield root


def test_vms_on_two_hosts_get_their_reserved_ips_and_reach_each_other(lab: Path) -> None:
    network, placement = lab_network("blue", "10.20.0.0/24", vlan=20)
    boot(network, placement, {"a": ("hv1", "10.20.0.11"), "b": ("hv2", "10.20.0.12")})
    assert wait_for_ipv4("a") == "10.20.0.11"
    assert wait_for_ipv4("b") == "10.20.0.12"
    assert pings("a", "10.20.0.12")
    assert pings("b", "10.20.0.11")
    assert pings("a", "10.20.0.1")
    assert pings("b", "10.20.0.1")


def test_only_external_networks_reach_the_outside_world(lab: Path) -> None:
    ext, ext_dhcp = lab_network("pub", "10.30.0.0/24", vlan=30, kind=NetworkKind.EXTERNAL)
    internal, internal_dhcp = lab_network("priv", "10.31.0.0/24", vlan=31)
    boot(ext, ext_dhcp, {"out": ("hv1", "10.30.0.10")})
    boot(internal, internal_dhcp, {"in": ("hv2", "10.31.0.10")})
    assert wait_for_ipv4("out") == "10.30.0.10"
    assert wait_for_ipv4("in") == "10.31.0.10"
    assert pings("out", "203.0.113.1")
    assert pings("in", "10.31.0.1")
    assert not pings("in", "203.0.113.1")


def test_vlans_keep_networks_apart_even_on_the_same_subnet(lab: Path) -> None:
    red, red_dhcp = lab_network("red", "10.40.0.0/24", vlan=41)
    green, green_dhcp = lab_network("green", "10.40.0.0/24", vlan=42)
    boot(red, red_dhcp, {"r1": ("hv1", "10.40.0.11"), "r2": ("hv2", "10.40.0.12")})
    boot(green, green_dhcp, {"g1": ("hv1", "10.40.0.21")})
    assert wait_for_ipv4("r1") == "10.40.0.11"
    assert wait_for_ipv4("r2") == "10.40.0.12"
    assert wait_for_ipv4("g1") == "10.40.0.21"
    assert pings("r1", "10.40.0.12")
    assert not pings("g1", "10.40.0.11")
    assert not pings("g1", "10.40.0.12")


def test_ensure_network_is_idempotent_and_follows_changes(lab: Path) -> None:
    _, placement = lab_network("sky", "10.50.0.0/24", vlan=50)
    before = LabStore().read()
    assert lab_network("sky", "10.50.0.0/24", vlan=50)[1] == placement
    assert LabStore().read() == before
    assert placement.netns is not None and netns_exists(placement.netns)
    external, _ = lab_network("sky", "10.50.0.0/24", vlan=51, kind=NetworkKind.EXTERNAL)
    assert LabStore().read().networks["sky"].transit == 0
    boot(external, placement, {"s": ("hv1", "10.50.0.9")})
    assert wait_for_ipv4("s") == "10.50.0.9"
    assert pings("s", "203.0.113.1")


def test_remove_network_ends_its_dhcp_server_and_namespaces(lab: Path) -> None:
    network, placement = lab_network("gone", "10.60.0.0/24", vlan=60)
    boot(network, placement, {})
    assert placement.netns is not None
    assert netns_pids(placement.netns)
    LabFabric().remove_network("gone")
    LabFabric().remove_network("gone")
    state = LabStore().read()
    assert "gone" not in state.networks
    assert not netns_exists(placement.netns)
    assert not any(ns.endswith(".gone") for ns in state.namespaces)


def test_other_parts_reach_the_lab_switch_with_the_ovs_tools(lab: Path) -> None:
    switch = switch_access()
    assert switch.run("ovs-vsctl", "list-br").split() == ["vmf-fabric", "vmf-hv1", "vmf-hv2"]
    assert "actions=NORMAL" in switch.run("ovs-ofctl", "dump-flows", "vmf-hv1")
    assert "Open vSwitch" in switch.run("ovs-appctl", "-t", "ovs-vswitchd", "version")
    ports = switch.run("ovs-vsctl", "list-ports", "vmf-fabric").split()
    assert ports == ["vmf-up-hv1", "vmf-up-hv2"]
