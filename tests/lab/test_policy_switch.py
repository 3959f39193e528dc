"""Compiled policies on the lab's real switch: what `ofproto/trace` says they do to packets.

Two hosts: on `vmf-hv1` the policy VM `web` (VLAN 10), a neighbour on the same VLAN and a VM
on VLAN 20; on `vmf-hv2` the port `web` gets when it migrates there (same MAC); the peer link
the lab made between the bridges. The packets, the random policies and the
policy's meaning (`expected`) are the unit test's, so the switch is held to the same
reference semantics as the compiler's structures.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace

import pytest
from hypothesis import Phase, given, settings
from hypothesis import strategies as st

from unit.test_policy_compiler import (
    NEIGHBOUR_MAC,
    VM,
    Packet,
    expected,
    packets,
    policies,
    resolutions,
)
from vmfabric.domain.model import NicSpec, VmSpec
from vmfabric.domain.policy import (
    BASE_KIND,
    KIND_MASK,
    VM_RULES_MASK,
    Action,
    Policy,
    PortFacts,
    base_flows,
    compile_port,
    receive_cookie,
    redirect_where,
    retarget_receive,
    retarget_send,
    send_cookie,
    where_cookie,
)
from vmfabric.hypervisor.lab import LabHypervisor
from vmfabric.lab.names import host_bridge, host_uplink
from vmfabric.lab.ovs import switch_access
from vmfabric.lab.state import LabStore
from vmfabric.lab.testing import temporary_lab
from vmfabric.vswitch.openvswitch import OpenVswitch, lab_vswitch

pytestmark = [
    pytest.mark.lab,
    pytest.mark.skipif(os.geteuid() != 0, reason="the lab needs root"),
]

SOURCE = host_bridge("hv1")
DESTINATION = host_bridge("hv2")
VLAN = VM.vlan
OTHER_VLAN = 20
EXACT = (1 << 64) - 1
Tags = tuple[int, ...]


@dataclass(frozen=True)
class Lab:
    """The lab's ports: OpenFlow numbers for rules, datapath numbers to read traces."""

    web: PortFacts
    moved: PortFacts
    neighbour: int
    other: int
    uplink: int
    peer_link: Mapping[str, int]
    datapath: Mapping[str, int]


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    with temporary_lab(hosts=2):
        source, destination = LabHypervisor("hv1"), LabHypervisor("hv2")
        mac = define(source, "web", SOURCE, VLAN)
        define(source, "neighbour", SOURCE, VLAN)
        define(source, "other", SOURCE, OTHER_VLAN)
        define(destination, "web", DESTINATION, VLAN, mac)
        switch = lab_vswitch()
        web = replace(VM, mac=mac, ofport=ofport(vm_port("hv1", "web")))
        yield Lab(
            web=web,
            moved=replace(web, ofport=ofport(vm_port("hv2", "web"))),
            neighbour=ofport(vm_port("hv1", "neighbour")),
            other=ofport(vm_port("hv1", "other")),
            uplink=ofport(host_uplink("hv1")[0]),
            peer_link={
                SOURCE: switch.peer_ports(SOURCE)["hv2"],
                DESTINATION: switch.peer_ports(DESTINATION)["hv1"],
            },
            datapath=datapath_ports(),
        )


def define(
    hypervisor: LabHypervisor, name: str, bridge: str, vlan: int, mac: str | None = None
) -> str:
    spec = VmSpec(name, "debian12", (NicSpec("n1", bridge, vlan, mac),))
    return hypervisor.define(spec).macs[0]


def vm_port(host: str, vm: str) -> str:
    return LabStore().read().vms[f"{host}/{vm}"].nics[0].port


def ofport(interface: str) -> int:
    return int(switch_access().run("ovs-vsctl", "get", "Interface", interface, "ofport"))


def datapath_ports() -> dict[str, int]:
    """Interface name -> datapath port number, which trace's datapath actions name."""
    shown = switch_access().run("ovs-appctl", "dpif/show")
    return {name: int(odp) for name, odp in re.findall(r"^\s+(\S+) \d+/(\d+):", shown, re.M)}


def odp(lab: Lab, host: str, vm: str) -> int:
    return lab.datapath[vm_port(host, vm)]


# Installing and tracing -----------------------------------------------------------------


def install(lab: Lab, policy: Policy, peers: Mapping[str, Sequence[str]]) -> OpenVswitch:
    """The base rules on both bridges, and `web`'s compiled rules on its host's."""
    switch = lab_vswitch()
    for bridge, link in lab.peer_link.items():
        switch.replace_flows(bridge, BASE_KIND << 48, KIND_MASK, base_flows([link]))
        switch.replace_flows(bridge, send_cookie(VM.vm_id), VM_RULES_MASK, [])
    compiled = compile_port(policy, lab.web, peers)
    rules = [*compiled.send, *compiled.receive, *compiled.where]
    switch.replace_flows(SOURCE, send_cookie(VM.vm_id), VM_RULES_MASK, rules)
    return switch


@dataclass(frozen=True)
class Trace:
    """What `ofproto/trace` says: its text, and each datapath output with the VLAN tags the
    packet carries there, outermost last (none: untagged)."""

    text: str
    outputs: list[tuple[int, Tags]]


def trace(bridge: str, packet: Packet) -> Trace:
    text = switch_access().run("ovs-appctl", "ofproto/trace", bridge, trace_fields(packet))
    actions = [line for line in text.splitlines() if line.startswith("Datapath actions:")][-1]
    tags = () if packet.vlan is None else (packet.vlan,)
    return Trace(text, outputs(actions.removeprefix("Datapath actions:").strip(), tags))


def outputs(actions: str, tags: Tags) -> list[tuple[int, Tags]]:
    """Follow the datapath actions: outputs (port numbers), pushes and pops of VLAN tags."""
    found = []
    for action in top_level(actions):
        if action.isdigit():
            found.append((int(action), tags))
        elif action == "pop_vlan":
            tags = tags[:-1]
        elif action.startswith("push_vlan("):
            tags = (*tags, int(action.split("vid=")[1].split(",")[0]))
    return found


def top_level(actions: str) -> list[str]:
    """Split datapath actions at the commas outside parentheses."""
    parts, depth, current = [], 0, ""
    for char in actions:
        depth += {"(": 1, ")": -1}.get(char, 0)
        if char == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += char
    return [*parts, current]


def trace_fields(packet: Packet) -> str:
    """The packet in ofproto/trace's flow syntax: the VLAN before the protocol (after it, it
    would be taken for an inner header, hiding the protocol from the fields after it), and
    `icmpv6_type`, `udp_src`, ... (trace does not take `icmp_type` and `tp_src` for IPv6, as
    ovs-ofctl does)."""
    head = [f"in_port={packet.in_port}"]
    head += [f"dl_vlan={packet.vlan}"] if packet.vlan is not None else []
    macs = [f"dl_src={packet.dl_src}", f"dl_dst={packet.dl_dst}"]
    if packet.kind == "arp":
        arp = [f"arp_sha={packet.arp_sha}", f"arp_spa={packet.src}", "arp_tpa=10.0.0.1,arp_op=1"]
        return ",".join([*head, "arp", *macs, *arp])
    if packet.kind == "other":
        return ",".join([*head, "dl_type=0x88b5", *macs])
    v6 = packet.kind == "ipv6"
    family = "ipv6" if v6 else "nw"
    protocol = {6: "tcp", 17: "udp", 1: "icmp", 58: "icmp"}.get(packet.proto)
    keyword = f"{protocol}6" if protocol and v6 else protocol or packet.kind
    terms = [*macs, f"{family}_src={packet.src}", f"{family}_dst={packet.dst}"]
    if protocol in ("tcp", "udp"):
        terms += [f"{protocol}_src={packet.sport}", f"{protocol}_dst={packet.dport}"]
    elif protocol == "icmp":
        terms += [f"{'icmpv6' if v6 else 'icmp'}_type={packet.icmp_type}"]
    else:
        terms += [f"nw_proto={packet.proto}"]
    return ",".join([*head, keyword, *terms])


def passes(lab: Lab, packet: Packet) -> tuple[bool, str]:
    """Whether the switch lets the packet out of `web` (any output), or delivers it to `web`'s
    port (untagged: a tagged copy there is a failure)."""
    result = trace(SOURCE, packet)
    if packet.sent:
        return bool(result.outputs), result.text
    port = odp(lab, "hv1", "web")
    assert not [tags for out, tags in result.outputs if out == port and tags], result.text
    return (port, ()) in result.outputs, result.text


def tcp_to_web(lab: Lab, in_port: int, vlan: int | None = None) -> Packet:
    """A TCP packet to `web`'s SSH port, entering at `in_port`."""
    return Packet(
        in_port, NEIGHBOUR_MAC, lab.web.mac, "ip", 6, "10.1.2.3", "10.0.0.5", 4000, 22, vlan=vlan
    )


# The policy on the switch ----------------------------------------------------------------

EXPENSIVE = settings(deadline=None, phases=[Phase.explicit, Phase.reuse, Phase.generate])
"""Each example drives the real switch: no shrinking (minutes), a failure shows its example
and the trace of the packet at fault as found."""


@settings(EXPENSIVE, max_examples=15)
@given(policies(), resolutions(), st.data())
def test_the_switch_decides_as_the_policy_says(
    lab: Lab, policy: Policy, peers: dict[str, list[str]], data: st.DataObject
) -> None:
    install(lab, policy, peers)
    sample = data.draw(
        st.lists(packets(lab.web, lab.neighbour, lab.uplink), min_size=10, max_size=10)
    )
    for packet in sample:
        passed, why = passes(lab, packet)
        assert passed == expected(policy, peers, packet, lab.web), f"{trace_fields(packet)}\n{why}"


def test_a_tagged_packet_from_a_peer_link_is_delivered_untagged_to_its_nic_only(lab: Lab) -> None:
    install(lab, Policy("web"), {})
    port = odp(lab, "hv1", "web")
    arriving = tcp_to_web(lab, lab.peer_link[SOURCE], vlan=VLAN)
    assert trace(SOURCE, arriving).outputs == [(port, ())]
    for stray in (replace(arriving, vlan=OTHER_VLAN), replace(arriving, dl_dst=NEIGHBOUR_MAC)):
        assert trace(SOURCE, stray).outputs == []


def test_a_vm_on_another_vlan_of_the_bridge_cannot_reach_a_policy_vm(lab: Lab) -> None:
    install(lab, Policy("web", ingress_default=Action.ALLOW), {})
    port = odp(lab, "hv1", "web")
    same_vlan = tcp_to_web(lab, lab.neighbour)
    assert (port, ()) in trace(SOURCE, same_vlan).outputs
    arp = replace(same_vlan, kind="arp", proto=0, src="10.0.0.6", arp_sha=NEIGHBOUR_MAC)
    for packet in (
        replace(same_vlan, in_port=lab.other),
        replace(same_vlan, in_port=lab.uplink, vlan=OTHER_VLAN),
        replace(arp, in_port=lab.other),
        replace(arp, in_port=lab.uplink, vlan=OTHER_VLAN),
    ):
        assert port not in [out for out, _ in trace(SOURCE, packet).outputs], trace_fields(packet)


# The migration method's rewrites on the switch ----------------------------------------


def redirect(
    lab: Lab, switch: OpenVswitch, policy: Policy, peers: Mapping[str, Sequence[str]]
) -> None:
    """`web` left hv1 for hv2: its rules on hv2, and on hv1 its send rules gone and its where
    rule, as read back from hv1, redirected (its receive rules stay)."""
    moved = compile_port(policy, lab.moved, peers)
    rules = [*moved.send, *moved.receive, *moved.where]
    switch.replace_flows(DESTINATION, send_cookie(VM.vm_id), VM_RULES_MASK, rules)
    where = switch.flows(SOURCE, where_cookie(VM.vm_id), EXACT)
    ports = switch.redirect_ports(SOURCE)
    redirected = redirect_where(where, VLAN, ports.peers["hv2"], ports.vlans[VLAN])
    deletes = [(send_cookie(VM.vm_id), EXACT), (where_cookie(VM.vm_id), EXACT)]
    switch.change_flows(SOURCE, deletes, redirected)


@settings(EXPENSIVE, max_examples=10)
@given(policies(), resolutions(), st.data())
def test_redirected_packets_reach_the_moved_vm_untagged_as_the_policy_says(
    lab: Lab, policy: Policy, peers: dict[str, list[str]], data: st.DataObject
) -> None:
    switch = install(lab, policy, peers)
    redirect(lab, switch, policy, peers)
    port = odp(lab, "hv2", "web")
    received = packets(lab.web, lab.neighbour, lab.uplink, vlans=[VLAN, OTHER_VLAN]).filter(
        lambda p: not p.sent
    )
    for packet in data.draw(st.lists(received, min_size=8, max_size=8)):
        result = trace(SOURCE, packet)
        allowed = expected(policy, peers, packet, lab.web) and packet.vlan in (None, VLAN)
        delivered = [tags for out, tags in result.outputs if out == port]
        assert delivered == ([()] if allowed else []), f"{trace_fields(packet)}\n{result.text}"
        if allowed:
            assert f"reg7=0x1,dl_vlan={VLAN},dl_dst={lab.web.mac}, priority 31000" in result.text


def test_a_redirected_packet_crosses_the_peer_link_tagged_once(lab: Lab) -> None:
    policy = Policy("web", ingress_default=Action.ALLOW)
    redirect(lab, install(lab, policy, {}), policy, {})
    delivery = f"reg7=0x1,dl_vlan={VLAN},dl_dst={lab.web.mac}, priority 31000"
    for packet in (tcp_to_web(lab, lab.neighbour), tcp_to_web(lab, lab.uplink, vlan=VLAN)):
        result = trace(SOURCE, packet)
        assert delivery in result.text, "not tagged with the VLAN on the peer link"
        assert result.outputs == [(odp(lab, "hv2", "web"), ())], result.text


def test_while_redirected_a_port_of_another_vlan_still_cannot_reach_the_vm(lab: Lab) -> None:
    policy = Policy("web", ingress_default=Action.ALLOW)
    switch = install(lab, policy, {})
    ports = switch.redirect_ports(SOURCE)
    assert ports.vlans[VLAN] == tuple(sorted([lab.web.ofport, lab.neighbour]))
    assert ports.vlans[OTHER_VLAN] == (lab.other,)
    assert ports.peers["hv2"] == lab.peer_link[SOURCE]
    redirect(lab, switch, policy, {})
    moved = odp(lab, "hv2", "web")
    assert trace(SOURCE, tcp_to_web(lab, lab.neighbour)).outputs == [(moved, ())]
    for packet in (
        tcp_to_web(lab, lab.other),
        tcp_to_web(lab, lab.uplink, vlan=OTHER_VLAN),
    ):
        assert moved not in [out for out, _ in trace(SOURCE, packet).outputs], trace_fields(packet)


def test_rules_read_back_from_the_switch_are_rewritten_and_installed_again(lab: Lab) -> None:
    policy = Policy("web", ingress_default=Action.ALLOW)
    switch = install(lab, policy, {})
    send = switch.flows(SOURCE, send_cookie(VM.vm_id), EXACT)
    receive = switch.flows(SOURCE, receive_cookie(VM.vm_id), EXACT)

    switch.replace_flows(SOURCE, send_cookie(VM.vm_id), EXACT, retarget_send(send, 99))
    moved = switch.flows(SOURCE, send_cookie(VM.vm_id), EXACT)
    assert all("in_port=99" in flow for flow in moved) and len(moved) == len(send)
    switch.replace_flows(SOURCE, send_cookie(VM.vm_id), EXACT, retarget_send(moved, lab.web.ofport))
    assert switch.flows(SOURCE, send_cookie(VM.vm_id), EXACT) == send

    where = switch.flows(SOURCE, where_cookie(VM.vm_id), EXACT)
    assert receive and not [flow for flow in receive if "NORMAL" in flow]
    assert len(where) == 1 and where[0].endswith("actions=NORMAL")

    redirected = redirect_where(where, VLAN, lab.peer_link[SOURCE], [lab.neighbour])
    switch.replace_flows(SOURCE, where_cookie(VM.vm_id), EXACT, redirected)
    shown = switch.flows(SOURCE, where_cookie(VM.vm_id), EXACT)
    assert len(shown) == 2 and not [flow for flow in shown if "NORMAL" in flow]
    switch.replace_flows(
        SOURCE, where_cookie(VM.vm_id), EXACT, retarget_receive(shown, lab.web.ofport)
    )
    assert switch.flows(SOURCE, where_cookie(VM.vm_id), EXACT) == where

    switch.replace_flows(SOURCE, receive_cookie(VM.vm_id), EXACT, retarget_receive(receive, 99))
    retargeted = switch.flows(SOURCE, receive_cookie(VM.vm_id), EXACT)
    assert [flow for flow in retargeted if "output:99" in flow and "reg7=0x1" in flow]
    assert [f for f in retargeted if "reg7" not in f] == [f for f in receive if "reg7" not in f]
