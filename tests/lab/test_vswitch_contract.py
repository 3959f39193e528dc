"""What the use cases rely on from a switch, checked on the in-memory switch and on the real
Open vSwitch alike: rule sets by cookie, atomic changes, rule texts read back in a form
the migration method rewrites (`in_port=N,`, `dl_dst=MAC`, `meter:N`), the meters of rate
limits (there before the rules that use them, gone with them), and the ports a migrating VM's
redirect rules name."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from vmfabric.domain.policy import (
    KIND_MASK,
    MAX_METER,
    VM_RULES_MASK,
    PortFacts,
    compile_port,
    parse_policy,
    port_meters,
    receive_cookie,
    vm_meters,
    where_cookie,
)
from vmfabric.domain.policy import send_cookie as cookie
from vmfabric.lab.ovs import switch_access
from vmfabric.lab.testing import temporary_lab
from vmfabric.vswitch import Vswitch, VswitchError, cookie_of
from vmfabric.vswitch.memory import MemorySwitch
from vmfabric.vswitch.openvswitch import lab_vswitch

BRIDGE = "vmf-hv1"
MAC = "52:54:00:12:34:56"
OTHER = 0x42 << 48
"""The kind of another module's rules."""


def real_switch() -> Iterator[Vswitch]:
    with temporary_lab(hosts=1):
        yield lab_vswitch()


@pytest.fixture(
    scope="module",
    params=[
        "memory",
        pytest.param(
            "openvswitch",
            marks=[
                pytest.mark.lab,
                pytest.mark.skipif(os.geteuid() != 0, reason="the lab needs root"),
            ],
        ),
    ],
)
def switch(request: pytest.FixtureRequest) -> Iterator[Vswitch]:
    if request.param == "memory":
        yield MemorySwitch()
    else:
        yield from real_switch()


def rules_of(vm_id: int, port: int) -> list[str]:
    """A VM's compiled send and receive rules on `port`."""
    policy = parse_policy("p", {"rules": [{"direction": "ingress", "action": "allow"}]})
    compiled = compile_port(policy, PortFacts(vm_id, MAC, port, 100, ("10.0.0.5",), ()), {})
    return [*compiled.send, *compiled.receive, *compiled.where]


def limited_rules_of(
    vm_id: int, port: int, rate: int | None = 2000, mac: str = MAC
) -> tuple[list[str], list[str]]:
    """A VM's compiled rules on `port` under a policy limiting its rate, and its meters."""
    document = {"rules": [{"direction": "ingress", "action": "allow"}], "rate_limit_kbps": rate}
    policy = parse_policy("p", document)
    facts = PortFacts(vm_id, mac, port, 100, ("10.0.0.5",), ())
    compiled = compile_port(policy, facts, {})
    return [*compiled.send, *compiled.receive, *compiled.where], list(port_meters(policy, facts))


def install(switch: Vswitch, vm_id: int, rules: list[str], meters: list[str]) -> None:
    """Make these the VM's rules and meters, as the policy service does."""
    switch.change_flows(BRIDGE, [(cookie(vm_id), VM_RULES_MASK)], rules, meters, [vm_meters(vm_id)])


@pytest.fixture
def clean(switch: Vswitch) -> Vswitch:
    switch.change_flows(BRIDGE, [(0, 0)], [], meter_deletes=[range(1, MAX_METER + 1)])
    return switch


def test_a_change_replaces_one_vms_rules_and_keeps_the_others(clean: Vswitch) -> None:
    clean.change_flows(BRIDGE, [(cookie(1), VM_RULES_MASK)], rules_of(1, 5))
    clean.change_flows(
        BRIDGE, [(OTHER, KIND_MASK)], [f"cookie={OTHER:#x},priority=5,arp,actions=drop"]
    )
    clean.change_flows(BRIDGE, [(cookie(1), VM_RULES_MASK)], rules_of(1, 7))
    mine = clean.flows(BRIDGE, cookie(1), VM_RULES_MASK)
    assert len(mine) == len(rules_of(1, 7))
    assert {cookie_of(r) for r in mine} == {cookie(1), receive_cookie(1), where_cookie(1)}
    assert all("in_port=5," not in r for r in mine)
    assert any("in_port=7," in r for r in mine)
    assert any(f"dl_dst={MAC}" in r for r in mine)
    assert len(clean.flows(BRIDGE, OTHER, KIND_MASK)) == 1


def test_one_refused_rule_changes_nothing(clean: Vswitch) -> None:
    clean.change_flows(BRIDGE, [(cookie(1), VM_RULES_MASK)], rules_of(1, 5))
    before = clean.flows(BRIDGE, 0, 0)
    stray = f"cookie={cookie(2):#x},priority=5,arp,actions=drop"
    with pytest.raises(VswitchError):
        clean.change_flows(BRIDGE, [(cookie(1), VM_RULES_MASK)], [*rules_of(1, 7), stray])
    assert clean.flows(BRIDGE, 0, 0) == before


def test_rules_read_back_install_again_as_they_were(clean: Vswitch) -> None:
    clean.change_flows(BRIDGE, [(cookie(1), VM_RULES_MASK)], rules_of(1, 5))
    read = clean.flows(BRIDGE, cookie(1), VM_RULES_MASK)
    clean.change_flows(BRIDGE, [(cookie(1), VM_RULES_MASK)], read)
    assert clean.flows(BRIDGE, cookie(1), VM_RULES_MASK) == read


def test_no_packets_counted_on_rules_no_traffic_met(clean: Vswitch) -> None:
    clean.change_flows(BRIDGE, [(cookie(1), VM_RULES_MASK)], rules_of(1, 5))
    assert clean.packets(BRIDGE, cookie(1), VM_RULES_MASK) == 0


def test_meters_come_with_the_rules_that_use_them_and_install_again_as_read(
    clean: Vswitch,
) -> None:
    rules, meters = limited_rules_of(1, 5)
    install(clean, 1, rules, meters)
    assert (
        clean.meters(BRIDGE)
        == meters
        == ["meter=100,kbps,burst,bands=type=drop,rate=2000,burst_size=400"]
    )
    read = clean.flows(BRIDGE, cookie(1), VM_RULES_MASK)
    assert any("in_port=5," in r and r.endswith("actions=meter:100,goto_table:1") for r in read)
    install(clean, 1, read, clean.meters(BRIDGE))
    assert clean.flows(BRIDGE, cookie(1), VM_RULES_MASK) == read
    assert clean.meters(BRIDGE) == meters


def test_a_rule_using_a_meter_the_bridge_lacks_is_refused_and_changes_nothing(
    clean: Vswitch,
) -> None:
    rules, meters = limited_rules_of(1, 5)
    for given, owned in (([], []), ([], [vm_meters(1)]), (meters, [vm_meters(2)])):
        with pytest.raises(VswitchError):
            clean.change_flows(BRIDGE, [(cookie(1), VM_RULES_MASK)], rules, given, owned)
    assert clean.flows(BRIDGE, 0, 0) == []
    assert clean.meters(BRIDGE) == []


def test_a_refused_rule_leaves_the_meters_as_they_were(clean: Vswitch) -> None:
    install(clean, 1, *limited_rules_of(1, 5))
    before = clean.flows(BRIDGE, 0, 0), clean.meters(BRIDGE)
    rules, meters = limited_rules_of(1, 7, rate=3000)
    stray = f"cookie={cookie(2):#x},priority=5,arp,actions=drop"
    with pytest.raises(VswitchError):
        install(clean, 1, [*rules, stray], meters)
    assert (clean.flows(BRIDGE, 0, 0), clean.meters(BRIDGE)) == before


def test_a_new_rate_changes_the_meter_and_no_limit_removes_it(clean: Vswitch) -> None:
    install(clean, 1, *limited_rules_of(1, 5))
    rules, faster = limited_rules_of(1, 5, rate=3000)
    install(clean, 1, rules, faster)
    assert clean.meters(BRIDGE) == faster and "rate=3000" in faster[0]
    unlimited, none = limited_rules_of(1, 5, rate=None)
    install(clean, 1, unlimited, none)
    assert clean.meters(BRIDGE) == none == []
    assert not [r for r in clean.flows(BRIDGE, 0, 0) if "meter" in r]
    assert len(clean.flows(BRIDGE, cookie(1), VM_RULES_MASK)) == len(unlimited)


def test_a_vms_rules_and_meters_go_together_and_the_others_stay(clean: Vswitch) -> None:
    install(clean, 1, *limited_rules_of(1, 5))
    two, two_meters = limited_rules_of(2, 6, rate=500, mac="52:54:00:12:34:57")
    install(clean, 2, two, two_meters)
    install(clean, 1, [], [])
    assert clean.flows(BRIDGE, cookie(1), VM_RULES_MASK) == []
    assert clean.meters(BRIDGE) == two_meters
    assert len(clean.flows(BRIDGE, cookie(2), VM_RULES_MASK)) == len(two)


def test_a_change_given_the_meters_read_before_it_adds_modifies_and_removes_alike(
    clean: Vswitch,
) -> None:
    two, two_meters = limited_rules_of(2, 6, rate=500, mac="52:54:00:12:34:57")
    install(clean, 2, two, two_meters)
    for rate in (2000, 3000, None):
        rules, meters = limited_rules_of(1, 5, rate=rate)
        clean.change_flows(
            BRIDGE,
            [(cookie(1), VM_RULES_MASK)],
            rules,
            meters,
            [vm_meters(1)],
            current_meters=clean.meters(BRIDGE),
        )
        assert clean.meters(BRIDGE) == [*meters, *two_meters]
        assert len(clean.flows(BRIDGE, cookie(1), VM_RULES_MASK)) == len(rules)
    assert len(clean.flows(BRIDGE, cookie(2), VM_RULES_MASK)) == len(two)


def test_a_meter_removed_takes_the_rules_that_use_it_along(clean: Vswitch) -> None:
    rules, meters = limited_rules_of(1, 5)
    install(clean, 1, rules, meters)
    clean.change_flows(BRIDGE, [(OTHER, KIND_MASK)], [], meter_deletes=[vm_meters(1)])
    left = clean.flows(BRIDGE, cookie(1), VM_RULES_MASK)
    assert left and not [r for r in left if "meter" in r]
    assert len(left) == len([r for r in rules if "meter" not in r])


ACCESS_VLAN, OTHER_VLAN = 3001, 3002
"""VLANs no other port of the lab's bridge is on."""


PLUGGED = {
    "access": ("vmfcacc", [f"tag={ACCESS_VLAN}"], ["type=internal"]),
    "neighbour": ("vmfcnbr", [f"tag={ACCESS_VLAN}"], ["type=internal"]),
    "other": ("vmfcoth", [f"tag={OTHER_VLAN}"], ["type=internal"]),
    "trunk": ("vmfctrk", [], ["type=internal"]),
    "peer": (
        "vmfcpeer",
        [],
        ["type=patch", "options:peer=vmfcnowhere", "external_ids:vmfabric-peer=hv9"],
    ),
}
"""Ports by role: interface name, Port and Interface settings."""


@pytest.fixture
def plugged(switch: Vswitch) -> Iterator[dict[str, int]]:
    """The ports of `PLUGGED` on the bridge, as libvirt and the operator make them (two access
    ports on `ACCESS_VLAN`, one on `OTHER_VLAN`, a trunk, a peer link to hv9): role -> port."""
    if isinstance(switch, MemorySwitch):
        switch.tags[BRIDGE] = {23: ACCESS_VLAN, 21: ACCESS_VLAN, 22: OTHER_VLAN}
        switch.peers[BRIDGE] = {"hv9": 25}
        yield {"access": 23, "neighbour": 21, "other": 22, "trunk": 24, "peer": 25}
        del switch.tags[BRIDGE], switch.peers[BRIDGE]
        return
    run = switch_access().run
    try:
        for name, port, interface in PLUGGED.values():
            run(
                "ovs-vsctl",
                "add-port",
                BRIDGE,
                name,
                *port,
                "--",
                "set",
                "Interface",
                name,
                *interface,
            )
        yield {
            role: int(run("ovs-vsctl", "get", "Interface", name, "ofport"))
            for role, (name, _, _) in PLUGGED.items()
        }
    finally:
        for name, _, _ in PLUGGED.values():
            run("ovs-vsctl", "--if-exists", "del-port", name)


def test_redirect_ports_are_the_peer_links_and_the_access_ports_by_vlan(
    switch: Vswitch, plugged: dict[str, int]
) -> None:
    ports = switch.redirect_ports(BRIDGE)
    assert ports.peers["hv9"] == plugged["peer"]
    assert ports.peers == switch.peer_ports(BRIDGE)
    assert ports.vlans[ACCESS_VLAN] == tuple(sorted([plugged["access"], plugged["neighbour"]]))
    assert ports.vlans[OTHER_VLAN] == (plugged["other"],)
    on_a_vlan = {port for members in ports.vlans.values() for port in members}
    assert plugged["trunk"] not in on_a_vlan and plugged["peer"] not in on_a_vlan
