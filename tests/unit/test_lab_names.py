"""Names the lab gives to what it makes: prefix, length, uniqueness, refusal of bad input."""

from __future__ import annotations

import ipaddress
import itertools

import pytest

from vmfabric.lab import names
from vmfabric.lab.errors import LabInputError

INTERFACE_NAMES = [
    names.vm_port("hv1", "web-01", 0),
    names.vm_port("hv12", "a" * 63, 7),
    names.router_port("a" * 63),
    names.dhcp_port("net"),
    names.wan_port("net"),
    names.ROUTER_LAN_IF,
    names.ROUTER_WAN_IF,
    names.DHCP_IF,
    names.FABRIC_BRIDGE,
    names.host_bridge("hv64"),
]


@pytest.mark.parametrize("name", INTERFACE_NAMES)
def test_interface_names_fit_linux_and_start_with_vmf(name: str) -> None:
    assert name.startswith("vmf")
    assert len(name) <= names.MAX_IFNAME


def test_namespace_names_start_with_vmf_and_keep_owners_apart() -> None:
    made = {
        names.vm_netns("a-b", "c"),
        names.vm_netns("a", "b-c"),
        names.router_netns("web"),
        names.dhcp_netns("web"),
        names.WAN_NETNS,
    }
    assert len(made) == 5
    assert all(name.startswith("vmf") for name in made)


def test_ports_differ_per_host_vm_and_nic() -> None:
    ports = {
        names.vm_port(host, vm, nic)
        for host, vm, nic in itertools.product(["hv1", "hv2"], ["a", "b"], [0, 1])
    }
    assert len(ports) == 8


def test_ports_are_stable_across_calls() -> None:
    assert names.vm_port("hv1", "web", 0) == names.vm_port("hv1", "web", 0)


@pytest.mark.parametrize("bad", ["", "Web", "-web", "web-", "a" * 64, "../etc", "a.b", "a_b"])
def test_names_that_are_not_dns_labels_are_refused(bad: str) -> None:
    with pytest.raises(LabInputError, match="invalid VM name"):
        names.vm_netns("hv1", bad)


def test_lab_hosts_are_hv1_to_hvn() -> None:
    assert names.lab_hosts(3) == ["hv1", "hv2", "hv3"]


@pytest.mark.parametrize("count", [0, -1, names.MAX_HOSTS + 1])
def test_host_count_out_of_range_is_refused(count: int) -> None:
    with pytest.raises(LabInputError, match="hosts"):
        names.lab_hosts(count)


def test_transit_links_are_disjoint_30s_in_the_pool() -> None:
    links = [names.transit(i) for i in (0, 1, 32767)]
    assert links[0] == ("198.18.0.1/30", "198.18.0.2/30")
    assert links[1] == ("198.18.0.5/30", "198.18.0.6/30")
    for wan, router in links:
        assert ipaddress.ip_interface(wan).network == ipaddress.ip_interface(router).network
        assert ipaddress.ip_interface(wan).ip in names.TRANSIT_POOL


def test_transit_index_outside_the_pool_is_refused() -> None:
    with pytest.raises(LabInputError):
        names.transit(32768)
