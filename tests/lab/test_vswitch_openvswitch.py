"""The Open vSwitch driver on the lab's real switch: atomic rule sets, VM ports, quarantine,
packet counts, peer links and announcements.

The rules are checked the way the switch sees them: `ovs-ofctl dump-flows` for what is
installed, `ovs-appctl ofproto/trace` for what the installed rules do to a packet.
"""

from __future__ import annotations

import ipaddress
import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vmfabric.domain.model import NicSpec, VmSpec
from vmfabric.domain.quarantine import (
    QUARANTINE_KIND,
    QUARANTINE_MASK,
    QuarantinedNic,
    parse_allowed,
    quarantine_cookie,
    quarantine_flows,
)
from vmfabric.hypervisor.lab import LabHypervisor
from vmfabric.lab.names import FABRIC_BRIDGE, host_bridge, host_uplink
from vmfabric.lab.ovs import switch_access
from vmfabric.lab.state import LabStore
from vmfabric.lab.testing import temporary_lab
from vmfabric.vswitch import VswitchError
from vmfabric.vswitch.openvswitch import OpenVswitch, gratuitous_arp, lab_vswitch

pytestmark = [
    pytest.mark.lab,
    pytest.mark.skipif(os.geteuid() != 0, reason="the lab needs root"),
]

BRIDGE = host_bridge("hv1")
OTHER_BRIDGE = host_bridge("hv2")
VLAN = 10
KIND = QUARANTINE_KIND << 48
SEND = 0x05E0 << 48
RECEIVE = 0x05E1 << 48
ONE_VM = 0xFFFC << 48 | (1 << 48) - 1
"""With a send cookie, selects the send, receive and where rules of one VM."""
EXACT = (1 << 64) - 1
OTHER_RULE = "cookie=0x42, priority=5,arp actions=NORMAL"
DEFAULT_RULE = "priority=0 actions=NORMAL"
GATEWAY_MAC = "52:54:00:00:00:fe"
WEB_ID = 5
ALLOWED = parse_allowed(["10.9.0.0/24", "fd00:9::/64"])


def ofctl(*args: str) -> str:
    return switch_access().run("ovs-ofctl", *args)


def vsctl(*args: str) -> str:
    return switch_access().run("ovs-vsctl", *args)


def installed() -> list[str]:
    """Every rule of the bridge, as the switch's own tool prints it."""
    dumped = ofctl("--no-stats", "dump-flows", BRIDGE)
    return sorted(line.strip() for line in dumped.splitlines() if line.strip())


def reset_rules() -> None:
    """The bridge's table as a fresh bridge has it (no meters), plus a rule some other module
    owns."""
    ofctl("del-flows", BRIDGE)
    ofctl("-O", "OpenFlow13", "del-meters", BRIDGE)
    ofctl("add-flow", BRIDGE, "priority=0,actions=NORMAL")
    ofctl("add-flow", BRIDGE, "cookie=0x42,priority=5,arp,actions=NORMAL")


def drop_rule(vm_id: int, mac: str, table: int = 0, kind: int = KIND) -> tuple[str, str]:
    """A rule as given to replace_flows and as dump-flows prints it back."""
    given_text = f"cookie={kind | vm_id:#x},table={table},priority=100,dl_src={mac},actions=drop"
    shown_table = f"table={table}, " if table else ""
    shown = f"cookie={kind | vm_id:#x}, {shown_table}priority=100,dl_src={mac} actions=drop"
    return given_text, shown


@pytest.fixture(scope="module")
def macs() -> Iterator[dict[str, str]]:
    """A two-host lab with two VMs on VLAN 10 of hv1's bridge: VM name -> MAC."""
    with temporary_lab(hosts=2):
        hypervisor = LabHypervisor("hv1")
        yield {
            name: hypervisor.define(VmSpec(name, "debian12", (NicSpec("n1", BRIDGE, VLAN),))).macs[
                0
            ]
            for name in ("web", "peer")
        }


@pytest.fixture
def switch(macs: dict[str, str]) -> OpenVswitch:
    reset_rules()
    return lab_vswitch()


def test_replace_installs_exactly_the_rules_and_leaves_other_cookies_alone(
    switch: OpenVswitch,
) -> None:
    first, first_shown = drop_rule(1, "52:54:00:00:00:01")
    second, second_shown = drop_rule(2, "52:54:00:00:00:02", table=1)
    switch.replace_flows(BRIDGE, KIND, QUARANTINE_MASK, [first, second])
    assert switch.flows(BRIDGE, KIND, QUARANTINE_MASK) == sorted([first_shown, second_shown])
    assert installed() == sorted([first_shown, second_shown, OTHER_RULE, DEFAULT_RULE])


def test_a_second_replace_swaps_the_set_in_every_table(switch: OpenVswitch) -> None:
    old = [drop_rule(1, "52:54:00:00:00:01")[0], drop_rule(2, "52:54:00:00:00:02", table=3)[0]]
    new, new_shown = drop_rule(3, "52:54:00:00:00:03")
    switch.replace_flows(BRIDGE, KIND, QUARANTINE_MASK, old)
    switch.replace_flows(BRIDGE, KIND, QUARANTINE_MASK, [new])
    assert installed() == sorted([new_shown, OTHER_RULE, DEFAULT_RULE])


def test_an_exact_cookie_replaces_one_vm_and_keeps_the_others(switch: OpenVswitch) -> None:
    one, _ = drop_rule(1, "52:54:00:00:00:01")
    two, two_shown = drop_rule(2, "52:54:00:00:00:02")
    one_again, one_again_shown = drop_rule(1, "52:54:00:00:00:11")
    switch.replace_flows(BRIDGE, KIND, QUARANTINE_MASK, [one, two])
    switch.replace_flows(BRIDGE, KIND | 1, EXACT, [one_again])
    assert switch.flows(BRIDGE, KIND, QUARANTINE_MASK) == sorted([one_again_shown, two_shown])
    assert switch.flows(BRIDGE, KIND | 1, EXACT) == [one_again_shown]


def test_an_empty_replace_removes_the_set(switch: OpenVswitch) -> None:
    switch.replace_flows(BRIDGE, KIND, QUARANTINE_MASK, [drop_rule(1, "52:54:00:00:00:01")[0]])
    switch.replace_flows(BRIDGE, KIND, QUARANTINE_MASK, [])
    assert switch.flows(BRIDGE, KIND, QUARANTINE_MASK) == []
    assert installed() == sorted([OTHER_RULE, DEFAULT_RULE])


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        # refused by ovs-ofctl's parser, before the bundle is opened
        (f"cookie={KIND | 9:#x},priority=100,dl_src=52:54:00:00:00:09,actions=bogus", "bogus"),
        # refused by the switch inside the bundle, after its delete: the commit is abandoned
        (
            f"cookie={KIND | 9:#x},priority=100,dl_src=52:54:00:00:00:09,actions=group:99",
            "OFPBAC_BAD_OUT_GROUP",
        ),
        # refused by the driver: without a matching cookie the rule could not be replaced
        ("priority=100,dl_src=52:54:00:00:00:09,actions=drop", "needs a cookie"),
        ("cookie=0x42,priority=100,dl_src=52:54:00:00:00:09,actions=drop", "needs a cookie"),
        # refused by the driver: a second line would be a flow-mod of its own
        (f"cookie={KIND | 9:#x},actions=drop\ndelete", "spans several lines"),
    ],
)
def test_a_refused_rule_leaves_the_previous_set_in_place(
    switch: OpenVswitch, bad: str, message: str
) -> None:
    before = [drop_rule(1, "52:54:00:00:00:01")[0], drop_rule(2, "52:54:00:00:00:02")[0]]
    switch.replace_flows(BRIDGE, KIND, QUARANTINE_MASK, before)
    rules = installed()
    replacement = [drop_rule(3, "52:54:00:00:00:03")[0], bad, drop_rule(4, "52:54:00:00:00:04")[0]]
    with pytest.raises(VswitchError, match=message) as caught:
        switch.replace_flows(BRIDGE, KIND, QUARANTINE_MASK, replacement)
    assert "\n" not in str(caught.value)
    assert installed() == rules


def test_the_tools_messages_become_vswitch_errors(switch: OpenVswitch, tmp_path: Path) -> None:
    with pytest.raises(VswitchError, match=r"^ovs-ofctl: vmf-nope is not a bridge or a socket$"):
        switch.replace_flows("vmf-nope", KIND, QUARANTINE_MASK, [])
    with pytest.raises(VswitchError, match=r"^ovs-ofctl: vmf-nope is not a bridge or a socket$"):
        switch.flows("vmf-nope", KIND, QUARANTINE_MASK)
    with pytest.raises(VswitchError, match=r"^ovs-vsctl: no bridge named vmf-nope$"):
        switch.ports("vmf-nope")
    with pytest.raises(VswitchError, match="does not fit in 64 bits"):
        switch.flows(BRIDGE, 1 << 64, EXACT)
    gone = OpenVswitch(env={"OVS_RUNDIR": str(tmp_path)}, db=f"unix:{tmp_path / 'db.sock'}")
    with pytest.raises(VswitchError, match="database connection failed"):
        gone.ports(BRIDGE)
    with pytest.raises(VswitchError, match=f"{BRIDGE} is not a bridge or a socket"):
        gone.replace_flows(BRIDGE, KIND, QUARANTINE_MASK, [])


def test_ten_thousand_rules_in_one_replace(switch: OpenVswitch) -> None:
    def rules(offset: int) -> list[str]:
        return [
            f"cookie={KIND | (i + 1):#x},priority=100,"
            f"dl_src=02:{offset:02x}:00:{i >> 16:02x}:{(i >> 8) & 0xFF:02x}:{i & 0xFF:02x},"
            "actions=drop"
            for i in range(10_000)
        ]

    timings = []
    for offset in (1, 2):
        started = time.perf_counter()
        switch.replace_flows(BRIDGE, KIND, QUARANTINE_MASK, rules(offset))
        timings.append(time.perf_counter() - started)
    installed_now = switch.flows(BRIDGE, KIND, QUARANTINE_MASK)
    print(f"10,000-rule replace: {timings[0]:.3f} s into an empty set, {timings[1]:.3f} s over one")
    assert len(installed_now) == 10_000
    assert all("dl_src=02:02:00:" in rule for rule in installed_now)
    assert max(timings) < 3.0


def test_ports_maps_each_vm_nic_to_its_openflow_port(
    switch: OpenVswitch, macs: dict[str, str]
) -> None:
    nics = [nic for vm in LabStore().read().vms.values() for nic in vm.nics]
    expected = {nic.mac: int(vsctl("get", "Interface", nic.port, "ofport")) for nic in nics}
    assert set(expected) == set(macs.values())
    assert switch.ports(BRIDGE) == expected
    assert switch.ports(FABRIC_BRIDGE) == {}


def test_ports_follow_vms_and_skip_unnumbered_interfaces(
    switch: OpenVswitch, macs: dict[str, str]
) -> None:
    hypervisor = LabHypervisor("hv1")
    late = hypervisor.define(VmSpec("late", "debian12", (NicSpec("n1", BRIDGE, VLAN),))).macs[0]
    port = LabStore().read().vms["hv1/late"].nics[0].port
    ghost_mark = 'external_ids:attached-mac="52:54:00:00:99:99"'
    vsctl("add-port", BRIDGE, "vmfghost", "--", "set", "Interface", "vmfghost", ghost_mark)
    try:
        vsctl("set", "Interface", port, 'external_ids:attached-mac="52:54:00:AB:CD:EF"')
        found = switch.ports(BRIDGE)
        assert vsctl("get", "Interface", "vmfghost", "ofport").strip() == "-1"
        assert "52:54:00:00:99:99" not in found
        assert found["52:54:00:ab:cd:ef"] == int(vsctl("get", "Interface", port, "ofport"))
    finally:
        vsctl("--if-exists", "del-port", "vmfghost")
        hypervisor.undefine("late")
    assert set(switch.ports(BRIDGE)) == set(macs.values())
    assert late not in switch.ports(BRIDGE)


@dataclass(frozen=True)
class Packet:
    """A packet for ofproto/trace; `{web}`, `{peer}` and `{gw}` stand for the MACs."""

    sender: str
    fields: str
    forwarded: bool


PACKETS = {
    "DHCP discover from the VM": Packet(
        "web",
        "udp,dl_src={web},dl_dst=ff:ff:ff:ff:ff:ff,nw_src=0.0.0.0,nw_dst=255.255.255.255,"
        "udp_src=68,udp_dst=67",
        forwarded=True,
    ),
    "DHCPv6 solicit from the VM": Packet(
        "web",
        "udp6,dl_src={web},dl_dst=33:33:00:01:00:02,ipv6_src=fe80::5,ipv6_dst=ff02::1:2,"
        "udp_src=546,udp_dst=547",
        forwarded=True,
    ),
    "ARP for the gateway": Packet(
        "web",
        "arp,dl_src={web},dl_dst=ff:ff:ff:ff:ff:ff,arp_op=1,arp_spa=10.0.0.5,arp_tpa=10.0.0.1",
        forwarded=True,
    ),
    "ping to the gateway": Packet(
        "web",
        "icmp,dl_src={web},dl_dst={gw},nw_src=10.0.0.5,nw_dst=10.0.0.1,icmp_type=8",
        forwarded=False,
    ),
    "TCP to an allowed network": Packet(
        "web",
        "tcp,dl_src={web},dl_dst={gw},nw_src=10.0.0.5,nw_dst=10.9.0.7,tcp_dst=443",
        forwarded=True,
    ),
    "TCP to an allowed IPv6 network": Packet(
        "web",
        "tcp6,dl_src={web},dl_dst={gw},ipv6_src=fd00::5,ipv6_dst=fd00:9::7,tcp_dst=443",
        forwarded=True,
    ),
    "TCP to another network": Packet(
        "web",
        "tcp,dl_src={web},dl_dst={gw},nw_src=10.0.0.5,nw_dst=10.8.0.7,tcp_dst=443",
        forwarded=False,
    ),
    "DHCP offer sent by the VM": Packet(
        "web",
        "udp,dl_src={web},dl_dst=ff:ff:ff:ff:ff:ff,nw_src=10.0.0.5,nw_dst=255.255.255.255,"
        "udp_src=67,udp_dst=68",
        forwarded=False,
    ),
    "a forged source MAC from the VM's port": Packet(
        "web",
        "tcp,dl_src=02:00:00:00:00:66,dl_dst={gw},nw_src=10.0.0.5,nw_dst=10.8.0.7,tcp_dst=443",
        forwarded=False,
    ),
    "ping to the VM": Packet(
        "peer",
        "icmp,dl_src={peer},dl_dst={web},nw_src=10.0.0.6,nw_dst=10.0.0.5,icmp_type=8",
        forwarded=False,
    ),
    "DHCP offer to the VM": Packet(
        "peer",
        "udp,dl_src={peer},dl_dst={web},nw_src=10.0.0.2,nw_dst=10.0.0.5,udp_src=67,udp_dst=68",
        forwarded=True,
    ),
    "TCP from an allowed network to the VM": Packet(
        "peer",
        "tcp,dl_src={peer},dl_dst={web},nw_src=10.9.0.7,nw_dst=10.0.0.5,tcp_src=443",
        forwarded=True,
    ),
}


def trace(in_port: int, fields: str) -> tuple[bool, str]:
    """Whether the switch forwards the packet (its datapath actions are not `drop`), and why."""
    output = switch_access().run(
        "ovs-appctl", "ofproto/trace", BRIDGE, f"in_port={in_port},{fields}"
    )
    actions = [line for line in output.splitlines() if line.startswith("Datapath actions:")]
    return actions[-1].removeprefix("Datapath actions:").strip() != "drop", output


def quarantine_web(switch: OpenVswitch, macs: dict[str, str], allowed: tuple[str, ...]) -> None:
    nic = QuarantinedNic(WEB_ID, macs["web"], switch.ports(BRIDGE)[macs["web"]])
    switch.replace_flows(BRIDGE, quarantine_cookie(WEB_ID), EXACT, quarantine_flows(nic, allowed))


@pytest.mark.parametrize("name", PACKETS)
def test_quarantine_rules_on_the_switch(
    switch: OpenVswitch, macs: dict[str, str], name: str
) -> None:
    packet = PACKETS[name]
    quarantine_web(switch, macs, ALLOWED)
    fields = packet.fields.format(web=macs["web"], peer=macs["peer"], gw=GATEWAY_MAC)
    forwarded, why = trace(switch.ports(BRIDGE)[macs[packet.sender]], fields)
    assert forwarded == packet.forwarded, why
    assert f"cookie {quarantine_cookie(WEB_ID):#x}" in why, "not decided by a quarantine rule"


def test_quarantine_leaves_other_vms_alone(switch: OpenVswitch, macs: dict[str, str]) -> None:
    quarantine_web(switch, macs, ())
    forwarded, why = trace(
        switch.ports(BRIDGE)[macs["peer"]],
        f"icmp,dl_src={macs['peer']},dl_dst={GATEWAY_MAC},nw_src=10.0.0.6,nw_dst=10.0.0.1",
    )
    assert forwarded, why
    assert "cookie 0xb1" not in why


@st.composite
def destinations(draw: st.DrawFn) -> tuple[str, str]:
    """An allowed IPv4 network and an address inside it or anywhere."""
    network = ipaddress.ip_network(
        f"{draw(st.ip_addresses(v=4))}/{draw(st.integers(8, 32))}", strict=False
    )
    inside = network[draw(st.integers(0, network.num_addresses - 1))]
    return str(network), str(draw(st.sampled_from([inside, draw(st.ip_addresses(v=4))])))


@settings(max_examples=12, deadline=None)
@given(destinations())
def test_a_quarantined_vm_reaches_exactly_its_allowed_network(
    macs: dict[str, str], case: tuple[str, str]
) -> None:
    network, destination = case
    switch = lab_vswitch()
    reset_rules()
    quarantine_web(switch, macs, parse_allowed([network]))
    forwarded, why = trace(
        switch.ports(BRIDGE)[macs["web"]],
        f"udp,dl_src={macs['web']},dl_dst={GATEWAY_MAC},nw_src=10.0.0.5,nw_dst={destination},"
        "udp_dst=53",
    )
    assert forwarded == (ipaddress.ip_address(destination) in ipaddress.ip_network(network)), why


def vm_rules(vm_id: int, mac: str) -> list[tuple[str, str]]:
    """A VM's send rule (table 0) and receive rule (table 1): given and shown texts."""
    return [drop_rule(vm_id, mac, kind=SEND), drop_rule(vm_id, mac, table=1, kind=RECEIVE)]


def test_change_flows_deletes_several_sets_and_adds_in_one_bundle(switch: OpenVswitch) -> None:
    kept, kept_shown = drop_rule(2, "52:54:00:00:00:02")
    switch.replace_flows(
        BRIDGE, KIND, QUARANTINE_MASK, [drop_rule(1, "52:54:00:00:00:01")[0], kept]
    )
    old = [given for given, _ in vm_rules(7, "52:54:00:00:00:07")]
    switch.change_flows(BRIDGE, [(SEND | 7, ONE_VM)], old)
    new = [*vm_rules(7, "52:54:00:00:00:77"), drop_rule(1, "52:54:00:00:00:11")]
    switch.change_flows(
        BRIDGE, [(SEND | 7, ONE_VM), (KIND | 1, EXACT)], [given for given, _ in new]
    )
    shown = [kept_shown, *(text for _, text in new), OTHER_RULE, DEFAULT_RULE]
    assert installed() == sorted(shown)
    assert switch.flows(BRIDGE, SEND | 7, ONE_VM) == sorted(text for _, text in new[:2])


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        # refused by the switch inside the bundle, after both deletes: nothing is committed
        (f"cookie={SEND | 7:#x},priority=100,actions=group:99", "OFPBAC_BAD_OUT_GROUP"),
        # refused by the driver: the cookie matches none of the deleted sets
        (f"cookie={SEND | 8:#x},priority=100,actions=drop", "needs a cookie"),
    ],
)
def test_a_bundle_with_one_bad_rule_changes_nothing(
    switch: OpenVswitch, bad: str, message: str
) -> None:
    switch.change_flows(
        BRIDGE, [(SEND | 7, ONE_VM)], [t for t, _ in vm_rules(7, "52:54:00:00:00:07")]
    )
    switch.replace_flows(BRIDGE, KIND, QUARANTINE_MASK, [drop_rule(1, "52:54:00:00:00:01")[0]])
    rules = installed()
    adds = [*(t for t, _ in vm_rules(7, "52:54:00:00:00:77")), bad]
    with pytest.raises(VswitchError, match=message):
        switch.change_flows(BRIDGE, [(SEND | 7, ONE_VM), (KIND, QUARANTINE_MASK)], adds)
    assert installed() == rules


def test_rules_can_only_be_added_with_a_set_that_removes_them(switch: OpenVswitch) -> None:
    with pytest.raises(VswitchError, match="needs a cookie matching a deleted set"):
        switch.change_flows(BRIDGE, [], [drop_rule(1, "52:54:00:00:00:01")[0]])
    switch.change_flows(BRIDGE, [], [])
    assert installed() == sorted([OTHER_RULE, DEFAULT_RULE])


METER = "meter=500,kbps,burst,bands=type=drop,rate=2000,burst_size=400"
METERED = f"cookie={SEND | 5:#x},priority=100,arp,actions=meter:500,goto_table:1"


def meters_shown() -> str:
    return ofctl("-O", "OpenFlow13", "dump-meters", BRIDGE)


def test_the_lab_bridge_has_openflow_13_meters_with_a_drop_band(switch: OpenVswitch) -> None:
    assert vsctl("get", "Bridge", BRIDGE, "protocols").strip() == "[]"  # 1.0 to 1.5 accepted
    features = ofctl("-O", "OpenFlow13", "meter-features", BRIDGE)
    found = re.search(r"max_meter:(\d+)", features)
    assert found is not None and int(found[1]) > 0
    assert "band_types: drop" in features
    assert "kbps" in features and "burst" in features


def test_a_metered_rule_reads_back_with_its_meter_which_openflow_10_leaves_out(
    switch: OpenVswitch,
) -> None:
    switch.change_flows(BRIDGE, [(SEND | 5, ONE_VM)], [METERED], [METER], [range(500, 600)])
    shown = f"cookie={SEND | 5:#x}, priority=100,arp actions=meter:500,goto_table:1"
    assert switch.flows(BRIDGE, SEND | 5, ONE_VM) == [shown]
    assert "actions=resubmit(,1)" in ofctl("--no-stats", "dump-flows", BRIDGE, "arp")
    assert switch.meters(BRIDGE) == [METER]
    assert "meter=500 kbps burst bands=\ntype=drop rate=2000 burst_size=400" in meters_shown()


def test_meters_of_any_kind_read_back_as_add_meter_takes_them(switch: OpenVswitch) -> None:
    given = "meter=7,pktps,burst,stats,bands=type=drop,rate=10,burst_size=5"
    ofctl("-O", "OpenFlow13", "add-meter", BRIDGE, given)
    ofctl("-O", "OpenFlow13", "add-meter", BRIDGE, METER)
    assert switch.meters(BRIDGE) == [given, METER]
    switch.change_flows(BRIDGE, [], [], switch.meters(BRIDGE), [range(1, 1000)])
    assert switch.meters(BRIDGE) == [given, METER]


def test_a_bundle_the_switch_refuses_takes_the_meters_it_added_back(switch: OpenVswitch) -> None:
    switch.change_flows(BRIDGE, [(SEND | 5, ONE_VM)], [METERED], [METER], [range(500, 600)])
    before = installed(), meters_shown()
    bad = f"cookie={SEND | 5:#x},priority=90,actions=group:99"
    faster = METER.replace("rate=2000", "rate=3000")
    other = "meter=501,kbps,burst,bands=type=drop,rate=64,burst_size=100"
    with pytest.raises(VswitchError, match="OFPBAC_BAD_OUT_GROUP"):
        switch.change_flows(
            BRIDGE, [(SEND | 5, ONE_VM)], [METERED, bad], [faster, other], [range(500, 600)]
        )
    assert (installed(), meters_shown()) == before


def test_flows_print_port_numbers(switch: OpenVswitch, macs: dict[str, str]) -> None:
    ports = switch.ports(BRIDGE)
    web, peer = ports[macs["web"]], ports[macs["peer"]]
    rule = f"cookie={SEND | 5:#x},priority=100,in_port={web},actions=output:{peer}"
    switch.replace_flows(BRIDGE, SEND | 5, EXACT, [rule])
    assert switch.flows(BRIDGE, SEND | 5, EXACT) == [
        f"cookie={SEND | 5:#x}, priority=100,in_port={web} actions=output:{peer}"
    ]


def test_rules_name_ports_by_number_only(switch: OpenVswitch) -> None:
    """ovs-ofctl runs without port names (taking them costs each run a second connection
    to the switch): a rule naming a port is refused, and nothing changes."""
    before = installed()
    rule = f"cookie={SEND | 5:#x},priority=100,in_port={host_uplink('hv1')},actions=drop"
    with pytest.raises(VswitchError):
        switch.replace_flows(BRIDGE, SEND | 5, EXACT, [rule])
    assert installed() == before


def n_packets(bridge: str, cookie: int) -> list[int]:
    """The packet count of each rule carrying exactly `cookie`, as dump-flows prints them."""
    dumped = ofctl("dump-flows", bridge, f"cookie={cookie:#x}/-1")
    return [
        int(field.removeprefix("n_packets="))
        for line in dumped.splitlines()
        for field in line.replace(",", " ").split()
        if field.startswith("n_packets=")
    ]


def test_packets_counts_what_went_through_the_rules(
    switch: OpenVswitch, macs: dict[str, str]
) -> None:
    port = switch.ports(BRIDGE)[macs["web"]]
    rules = [
        f"cookie={SEND | 5:#x},priority=200,in_port={port},arp,actions=NORMAL",
        f"cookie={SEND | 5:#x},priority=150,in_port={port},actions=drop",
        f"cookie={RECEIVE | 5:#x},table=0,priority=100,arp,actions=NORMAL",
    ]
    switch.change_flows(BRIDGE, [(SEND | 5, ONE_VM)], rules)
    assert switch.packets(BRIDGE, SEND | 5, ONE_VM) == 0
    frame = gratuitous_arp(macs["web"], "10.0.0.5").hex()
    for _ in range(3):
        ofctl("packet-out", BRIDGE, f"in_port={port} packet={frame} actions=table")
    other_port = switch.ports(BRIDGE)[macs["peer"]]
    other = gratuitous_arp(macs["peer"], "10.0.0.6").hex()
    ofctl("packet-out", BRIDGE, f"in_port={other_port} packet={other} actions=table")
    assert switch.packets(BRIDGE, SEND | 5, EXACT) == 3 == sum(n_packets(BRIDGE, SEND | 5))
    assert switch.packets(BRIDGE, RECEIVE | 5, EXACT) == 1
    assert switch.packets(BRIDGE, SEND | 5, ONE_VM) == 4
    assert switch.packets(BRIDGE, KIND, QUARANTINE_MASK) == 0


def ofport(interface: str) -> int:
    return int(vsctl("get", "Interface", interface, "ofport"))


def test_peer_ports_finds_the_marked_links(switch: OpenVswitch) -> None:
    def patch(bridge: str, name: str, host: str) -> list[str]:
        return [
            "--",
            "add-port",
            bridge,
            name,
            "--",
            "set",
            "Interface",
            name,
            "type=patch",
            "options:peer=vmftnowhere",
            f"external_ids:vmfabric-peer={host}",
        ]

    ghost = ["--", "add-port", BRIDGE, "vmftghost", "--", "set", "Interface", "vmftghost"]
    vsctl(
        *patch(BRIDGE, "vmftpeer8", "hv8")[1:],
        *patch(OTHER_BRIDGE, "vmftpeer7", "hv7"),
        *ghost,
        "external_ids:vmfabric-peer=hv9",
    )
    try:
        found = switch.peer_ports(BRIDGE)
        assert ofport("vmftghost") == -1
        assert found["hv8"] == ofport("vmftpeer8") > 0
        assert "hv9" not in found
        assert "hv7" not in found
        assert switch.peer_ports(OTHER_BRIDGE)["hv7"] == ofport("vmftpeer7")
        assert not set(found.values()) & set(switch.ports(BRIDGE).values())
    finally:
        vsctl("--if-exists", "del-port", "vmftpeer8", "--", "--if-exists", "del-port", "vmftpeer7")
        vsctl("--if-exists", "del-port", "vmftghost")
    assert "hv8" not in switch.peer_ports(BRIDGE)


def fdb(bridge: str) -> dict[str, tuple[int, int]]:
    """MAC -> (port, VLAN) the bridge's MAC learning table holds."""
    lines = switch_access().run("ovs-appctl", "fdb/show", bridge).splitlines()[1:]
    return {mac: (int(port), int(vlan)) for port, vlan, mac, _ in map(str.split, lines)}


def test_the_announcement_is_an_arp_the_switch_parses(macs: dict[str, str]) -> None:
    frame = gratuitous_arp(macs["web"].upper(), "10.0.0.5")
    parsed = switch_access().run("ovs-appctl", "ofproto/trace", BRIDGE, "in_port=1", frame.hex())
    flow = next(line for line in parsed.splitlines() if line.startswith("Flow:"))
    assert len(frame) == 60
    for field in (
        "arp,",
        f"dl_src={macs['web']}",
        "dl_dst=ff:ff:ff:ff:ff:ff",
        "arp_spa=10.0.0.5",
        "arp_tpa=10.0.0.5",
        "arp_op=1",
        f"arp_sha={macs['web']}",
        "arp_tha=00:00:00:00:00:00",
    ):
        assert field in flow


def test_announce_teaches_every_bridge_where_the_vm_is(
    switch: OpenVswitch, macs: dict[str, str]
) -> None:
    mac = macs["web"]
    port = switch.ports(BRIDGE)[mac]
    switch.announce(BRIDGE, port, mac, "10.0.0.5")
    assert fdb(BRIDGE)[mac] == (port, VLAN)
    assert fdb(FABRIC_BRIDGE)[mac] == (ofport(host_uplink("hv1")[1]), VLAN)

    # the VM moved: its MAC now behind a port of hv2's bridge
    vsctl(
        "add-port",
        OTHER_BRIDGE,
        "vmftmoved",
        "tag=10",
        "--",
        "set",
        "Interface",
        "vmftmoved",
        "type=internal",
    )
    try:
        switch.announce(OTHER_BRIDGE, ofport("vmftmoved"), mac, "10.0.0.5")
        assert fdb(OTHER_BRIDGE)[mac] == (ofport("vmftmoved"), VLAN)
        assert fdb(FABRIC_BRIDGE)[mac] == (ofport(host_uplink("hv2")[1]), VLAN)
        assert fdb(BRIDGE)[mac] == (ofport(host_uplink("hv1")[0]), VLAN)
    finally:
        vsctl("--if-exists", "del-port", "vmftmoved")


def test_announce_refuses_what_it_cannot_send(switch: OpenVswitch, macs: dict[str, str]) -> None:
    with pytest.raises(VswitchError, match="no OpenFlow number"):
        switch.announce(BRIDGE, 0, macs["web"], "10.0.0.5")
    with pytest.raises(VswitchError, match="cannot announce"):
        switch.announce(BRIDGE, 1, macs["web"], "10.0.0.300")
    with pytest.raises(VswitchError, match="cannot announce"):
        switch.announce(BRIDGE, 1, "52:54:00", "10.0.0.5")
    with pytest.raises(VswitchError, match="vmf-nope is not a bridge"):
        switch.announce("vmf-nope", 1, macs["web"], "10.0.0.5")
