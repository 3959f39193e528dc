"""What the use cases rely on from a switch, checked on the in-memory switch and on the real
Open vSwitch alike: rule sets by cookie, atomic changes, and rule texts read back in a form
the migration method rewrites (`in_port=N,`, `dl_dst=MAC`)."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from vmfabric.domain.policy import (
    VM_RULES_MASK,
    PortFacts,
    compile_port,
    parse_policy,
    receive_cookie,
)
from vmfabric.domain.policy import send_cookie as cookie
from vmfabric.lab.testing import temporary_lab
from vmfabric.vswitch import Vswitch, VswitchError, cookie_of
from vmfabric.vswitch.memory import MemorySwitch
from vmfabric.vswitch.openvswitch import lab_vswitch

BRIDGE = "vmf-hv1"
MAC = "52:54:00:12:34:56"
OTHER = 0x42 << 48


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
    return [*compiled.send, *compiled.receive]


@pytest.fixture
def clean(switch: Vswitch) -> Vswitch:
    switch.change_flows(BRIDGE, [(0, 0)], [])
    return switch


def test_a_change_replaces_one_vms_rules_and_keeps_the_others(clean: Vswitch) -> None:
    clean.change_flows(BRIDGE, [(cookie(1), VM_RULES_MASK)], rules_of(1, 5))
    clean.change_flows(BRIDGE, [(OTHER, OTHER)], [f"cookie={OTHER:#x},priority=5,arp,actions=drop"])
    clean.change_flows(BRIDGE, [(cookie(1), VM_RULES_MASK)], rules_of(1, 7))
    mine = clean.flows(BRIDGE, cookie(1), VM_RULES_MASK)
    assert len(mine) == len(rules_of(1, 7))
    assert {cookie_of(r) for r in mine} == {cookie(1), receive_cookie(1)}
    assert all("in_port=5," not in r for r in mine)
    assert any("in_port=7," in r for r in mine)
    assert any(f"dl_dst={MAC}" in r for r in mine)
    assert len(clean.flows(BRIDGE, OTHER, OTHER)) == 1


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
