"""Policies: the document and its errors, and what the compiled rules do to packets.

The compiled rules are checked by evaluating them: `Switch` below runs a packet through the
three tables the way Open vSwitch does (the highest-priority matching rule of a table decides),
on the structured rules; `expected` is the policy's meaning, written straight from the design
(infrastructure passes, anti-spoofing, first matching rule, default). The lab test
(`tests/lab/test_policy_switch.py`) holds the real switch to the same meaning, with the
strategies and `expected` it imports from here.
"""

from __future__ import annotations

import ipaddress
import itertools
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vmfabric.domain.errors import InvalidInput
from vmfabric.domain.policy import (
    BASE_KIND,
    KIND_MASK,
    MAX_METER,
    MAX_RATE_KBPS,
    MAX_RULES,
    METERS_PER_VM,
    POLICY_KINDS_MASK,
    RECEIVE_KIND,
    SEND_KIND,
    VM_RULES_MASK,
    WHERE_KIND,
    Action,
    Direction,
    Flow,
    Policy,
    PortFacts,
    Protocol,
    Rule,
    base_flows,
    base_pipeline,
    compile_port,
    compile_port_flows,
    in_port_of,
    meter_id,
    meter_vm,
    parse_policy,
    peer_references,
    port_masks,
    port_meters,
    receive_cookie,
    redirect_where,
    retarget_receive,
    retarget_send,
    send_cookie,
    to_document,
    vm_meters,
    where_cookie,
    where_rule,
)
from vmfabric.vswitch import metered_by

# The scene: a VM with a policy, a neighbour on the same bridge, the uplink, a peer link ----

VM = PortFacts(
    vm_id=5, mac="52:54:00:00:00:05", ofport=3, vlan=10, ipv4=("10.0.0.5",), ipv6=("fd00:1::5",)
)
NEIGHBOUR_PORT = 4
OTHER_PORT = 6
UPLINK_PORT = 1
PEER_LINK = 7
OTHER_VLAN = 20
NEIGHBOUR_MAC = "52:54:00:00:00:06"
FORGED_MAC = "02:00:00:00:00:66"
GATEWAY_MAC = "52:54:00:00:00:fe"
LINK_LOCAL = ipaddress.ip_network("fe80::/10")

V4_PEERS = ("10.1.0.0/16", "10.1.2.0/24", "10.1.2.3/32", "192.168.0.0/16", "0.0.0.0/0")
V6_PEERS = ("2001:db8::/32", "2001:db8:1::/48", "2001:db8:1::5/128", "::/0")
SYMBOLIC_PEERS = ("vm:db", "set:db", "group:hv1-debian12")
PORT_RANGES = (None, (22, 22), (80, 80), (8000, 8080), (1, 1023), (1024, 65535), (1, 65535))
V4_ADDRESSES = ("10.1.2.3", "10.1.2.4", "10.1.9.9", "192.168.1.1", "172.16.0.1")
V6_ADDRESSES = ("2001:db8:1::5", "2001:db8:1::6", "2001:db8:2::1", "fd00::1", "fe80::1")
PORTS = (22, 53, 67, 68, 80, 443, 546, 547, 1023, 1024, 8000, 8063, 8064, 8080, 8081, 65535)
ICMP6_TYPES = (128, 133, 134, 135, 136, 137)
PROTOCOL_NUMBERS = {"tcp": 6, "udp": 17, "icmp": 1, "icmp6": 58}


@dataclass(frozen=True)
class Packet:
    """A packet as it enters the switch. `kind` is its frame type: `ip`, `ipv6`, `arp`, or
    `other`; `src`/`dst` are IP addresses (for ARP: `src` the sender's address); `sent`
    whether the policy VM sent it (else it is on its way to the VM)."""

    in_port: int
    dl_src: str
    dl_dst: str
    kind: str
    proto: int = 0
    src: str = ""
    dst: str = ""
    sport: int = 0
    dport: int = 0
    icmp_type: int = 0
    arp_sha: str = ""
    vlan: int | None = None
    reg7: int = 0
    sent: bool = False


# Reference semantics of a policy --------------------------------------------------------


def networks(peer: str, peers: Mapping[str, Sequence[str]]) -> list[Any] | None:
    """The networks a peer stands for; None for any."""
    if peer == "any":
        return None
    texts = peers[peer] if peer.partition(":")[0] in ("vm", "set", "group") else [peer]
    return [ipaddress.ip_network(text, strict=False) for text in texts]


def rule_matches(rule: Rule, packet: Packet, peers: Mapping[str, Sequence[str]]) -> bool:
    """Whether a policy rule matches an IP packet, going the rule's way."""
    if packet.kind not in ("ip", "ipv6"):
        return False
    if rule.protocol is Protocol.ICMP and (packet.kind, packet.proto) != ("ip", 1):
        return False
    if rule.protocol is Protocol.ICMP6 and (packet.kind, packet.proto) != ("ipv6", 58):
        return False
    if (
        rule.protocol in (Protocol.TCP, Protocol.UDP)
        and packet.proto != PROTOCOL_NUMBERS[rule.protocol]
    ):
        return False
    if rule.ports is not None and not rule.ports[0] <= packet.dport <= rule.ports[1]:
        return False
    found = networks(rule.peer, peers)
    address = ipaddress.ip_address(packet.dst if packet.sent else packet.src)
    return found is None or any(address.version == n.version and address in n for n in found)


def infrastructure(packet: Packet) -> bool:
    """DHCP, ARP and neighbour discovery the VM's way."""
    dhcp = (68, 67) if packet.sent else (67, 68)
    dhcp6 = (546, 547) if packet.sent else (547, 546)
    nd = (133, 135, 136) if packet.sent else (134, 135, 136)
    ports = (packet.sport, packet.dport)
    return (
        packet.kind == "arp"
        or (packet.kind, packet.proto, ports) in (("ip", 17, dhcp), ("ipv6", 17, dhcp6))
        or (packet.kind == "ipv6" and packet.proto == 58 and packet.icmp_type in nd)
    )


def not_spoofed(packet: Packet, vm: PortFacts) -> bool:
    """Whether a packet from the VM's port carries its MAC and (IP, ARP) its own address."""
    if packet.dl_src != vm.mac:
        return False
    if packet.kind == "arp":
        return packet.arp_sha == vm.mac and packet.src in vm.ipv4
    if packet.kind == "ip" and not infrastructure(packet):
        return packet.src in vm.ipv4
    if packet.kind == "ipv6" and not infrastructure(packet):
        return packet.src in vm.ipv6 or ipaddress.ip_address(packet.src) in LINK_LOCAL
    return packet.kind != "other"


def expected(
    policy: Policy, peers: Mapping[str, Sequence[str]], packet: Packet, vm: PortFacts = VM
) -> bool:
    """Whether the policy lets the packet out of (sent) or into (received) the VM."""
    if packet.sent and policy.antispoof and not not_spoofed(packet, vm):
        return False
    if infrastructure(packet):
        return True
    direction = Direction.EGRESS if packet.sent else Direction.INGRESS
    default = policy.egress_default if packet.sent else policy.ingress_default
    for rule in policy.rules:
        if rule.direction is direction and rule_matches(rule, packet, peers):
            return rule.action is Action.ALLOW
    return default is Action.ALLOW


# The switch, evaluating structured rules -----------------------------------------------

KEYWORDS = {
    "": (None, None),
    "ip": ("ip", None),
    "ipv6": ("ipv6", None),
    "arp": ("arp", None),
    "tcp": ("ip", 6),
    "udp": ("ip", 17),
    "icmp": ("ip", 1),
    "tcp6": ("ipv6", 6),
    "udp6": ("ipv6", 17),
    "icmp6": ("ipv6", 58),
}
PREREQUISITES = {
    "nw_src": {"ip", "tcp", "udp", "icmp"},
    "nw_dst": {"ip", "tcp", "udp", "icmp"},
    "ipv6_src": {"ipv6", "tcp6", "udp6", "icmp6"},
    "ipv6_dst": {"ipv6", "tcp6", "udp6", "icmp6"},
    "tp_src": {"tcp", "udp", "tcp6", "udp6"},
    "tp_dst": {"tcp", "udp", "tcp6", "udp6"},
    "icmp_type": {"icmp", "icmp6"},
    "arp_sha": {"arp"},
    "arp_spa": {"arp"},
}


def masked(value: str, actual: int) -> bool:
    """`value` or `value/mask` (either decimal or hex) matches `actual`."""
    text, _, mask = value.partition("/")
    return actual & int(mask or "0xffffffff", 0) == int(text, 0)


def field_matches(name: str, value: str, packet: Packet) -> bool:
    tci = 0 if packet.vlan is None else 0x1000 | packet.vlan
    checks = {
        "in_port": lambda: packet.in_port == int(value),
        "dl_src": lambda: packet.dl_src == value,
        "dl_dst": lambda: packet.dl_dst == value,
        "dl_vlan": lambda: packet.vlan == int(value),
        "vlan_tci": lambda: masked(value, tci),
        "reg7": lambda: packet.reg7 == int(value, 0),
        "nw_src": lambda: ipaddress.ip_address(packet.src) in ipaddress.ip_network(value),
        "ipv6_src": lambda: ipaddress.ip_address(packet.src) in ipaddress.ip_network(value),
        "nw_dst": lambda: ipaddress.ip_address(packet.dst) in ipaddress.ip_network(value),
        "ipv6_dst": lambda: ipaddress.ip_address(packet.dst) in ipaddress.ip_network(value),
        "tp_src": lambda: masked(value, packet.sport),
        "tp_dst": lambda: masked(value, packet.dport),
        "icmp_type": lambda: packet.icmp_type == int(value),
        "arp_sha": lambda: packet.arp_sha == value,
        "arp_spa": lambda: packet.src == value,
    }
    return checks[name]()


def flow_matches(flow: Flow, packet: Packet) -> bool:
    kind, proto = KEYWORDS[flow.protocol]
    if (kind is not None and packet.kind != kind) or (proto is not None and packet.proto != proto):
        return False
    for name, _ in flow.match:
        assert flow.protocol in PREREQUISITES.get(name, {flow.protocol}), f"{name} needs a protocol"
    return all(field_matches(name, value, packet) for name, value in flow.match)


@dataclass(frozen=True)
class Switch:
    """Tables of structured rules, as Open vSwitch runs them."""

    flows: tuple[Flow, ...]

    def run(self, packet: Packet) -> str:
        """The actions that end the packet's way through the tables."""
        table = 0
        while True:
            actions = self.decide(table, packet)
            goto = re.search(r"goto_table:(\d+)$", actions)
            if goto is None:
                return actions
            assert int(goto[1]) > table, "a table goes only to a later one"
            if actions.startswith("load:1->NXM_NX_REG7[]"):
                packet = replace(packet, reg7=1)
            table = int(goto[1])

    def decide(self, table: int, packet: Packet) -> str:
        """The actions of the highest-priority matching rule; two matching rules of that
        priority must agree, or the switch's choice would be arbitrary."""
        matching = [f for f in self.flows if f.table == table and flow_matches(f, packet)]
        top = max(f.priority for f in matching)
        actions = {f.actions for f in matching if f.priority == top}
        assert len(actions) == 1, f"ambiguous at priority {top}: {actions}"
        return actions.pop()


def switch_for(policy: Policy, peers: Mapping[str, Sequence[str]], vm: PortFacts = VM) -> Switch:
    compiled = compile_port_flows(policy, vm, peers)
    return Switch((*base_pipeline([PEER_LINK]), *compiled.send, *compiled.receive, *compiled.where))


def passes(actions: str) -> bool:
    """Whether the packet reaches the switch's forwarding: out of the VM, or to it."""
    return actions == "NORMAL"


# Strategies ------------------------------------------------------------------------------


@st.composite
def rules(draw: st.DrawFn) -> Rule:
    protocol = draw(st.sampled_from(Protocol))
    ports = draw(st.sampled_from(PORT_RANGES)) if protocol in (Protocol.TCP, Protocol.UDP) else None
    peers = ["any", *SYMBOLIC_PEERS]
    peers += V4_PEERS if protocol is not Protocol.ICMP6 else ()
    peers += V6_PEERS if protocol is not Protocol.ICMP else ()
    return Rule(
        direction=draw(st.sampled_from(Direction)),
        action=draw(st.sampled_from(Action)),
        protocol=protocol,
        ports=ports,
        peer=draw(st.sampled_from(peers)),
    )


@st.composite
def policies(draw: st.DrawFn, max_rules: int = 6) -> Policy:
    return Policy(
        name="web",
        rules=tuple(draw(st.lists(rules(), max_size=max_rules))),
        ingress_default=draw(st.sampled_from(Action)),
        egress_default=draw(st.sampled_from(Action)),
        antispoof=draw(st.booleans()),
        sets={"db": ("db",)},
    )


@st.composite
def limited_policies(draw: st.DrawFn) -> Policy:
    """A policy that limits its NICs' rate: their allowed send rules use a meter."""
    rate = draw(st.sampled_from([1, 64, 2000, MAX_RATE_KBPS]) | st.integers(1, MAX_RATE_KBPS))
    return replace(draw(policies()), rate_limit_kbps=rate)


def any_policies() -> st.SearchStrategy[Policy]:
    """A policy with or without a rate limit."""
    return policies() | limited_policies()


def resolutions() -> st.SearchStrategy[dict[str, list[str]]]:
    """What each symbolic peer stands for: a few addresses of either version, or none."""
    addresses = st.lists(st.sampled_from(V4_ADDRESSES + V6_ADDRESSES), max_size=3, unique=True)
    return st.fixed_dictionaries({peer: addresses for peer in SYMBOLIC_PEERS})


@st.composite
def packets(
    draw: st.DrawFn,
    vm: PortFacts = VM,
    neighbour: int = NEIGHBOUR_PORT,
    uplink: int = UPLINK_PORT,
    vlans: Sequence[int | None] = (),
) -> Packet:
    """A packet sent by the VM, or to it from a neighbour's port or (tagged) the uplink."""
    way = draw(st.sampled_from(["sent", "neighbour", "uplink"]))
    if way == "sent":
        source = draw(st.sampled_from([vm.mac, vm.mac, FORGED_MAC]))
        start = Packet(vm.ofport, source, GATEWAY_MAC, "", sent=True)
    elif way == "neighbour":
        start = Packet(neighbour, NEIGHBOUR_MAC, vm.mac, "")
    else:
        start = Packet(
            uplink, NEIGHBOUR_MAC, vm.mac, "", vlan=draw(st.sampled_from(vlans or [vm.vlan]))
        )
    kind = draw(st.sampled_from(["tcp", "udp", "icmp", "gre", "dhcp", "arp", "other"]))
    version = draw(st.sampled_from([4, 6]))
    return draw(headers(start, kind, version, vm))


def headers(start: Packet, kind: str, version: int, vm: PortFacts) -> st.SearchStrategy[Packet]:
    """The IP, transport or ARP headers of a packet (the VM's address, or a forged one)."""
    own = vm.ipv4 if version == 4 else (*vm.ipv6, "fe80::5", "febf::5")
    peers = V4_ADDRESSES if version == 4 else V6_ADDRESSES
    mine = st.sampled_from([*own, *own, peers[-1]])
    other = st.sampled_from(peers)
    if kind == "arp":
        return st.builds(
            lambda spa, sha: replace(start, kind="arp", src=spa, arp_sha=sha),
            st.sampled_from([*vm.ipv4, V4_ADDRESSES[0]]),
            st.sampled_from([vm.mac, start.dl_src, FORGED_MAC]),
        )
    if kind == "other":
        return st.just(replace(start, kind="other"))
    proto = {"tcp": 6, "udp": 17, "dhcp": 17, "gre": 47, "icmp": 1 if version == 4 else 58}[kind]
    ports = st.sampled_from(PORTS)
    dhcp = (68, 67) if version == 4 else (546, 547)
    if not start.sent:
        dhcp = dhcp[::-1]
    return st.builds(
        lambda a, b, sport, dport, icmp_type: replace(
            start,
            kind="ip" if version == 4 else "ipv6",
            proto=proto,
            src=a if start.sent else b,
            dst=b if start.sent else a,
            sport=dhcp[0] if kind == "dhcp" else sport,
            dport=dhcp[1] if kind == "dhcp" else dport,
            icmp_type=icmp_type,
        ),
        mine,
        other,
        ports,
        ports,
        st.sampled_from(ICMP6_TYPES if version == 6 else (0, 8)),
    )


# Cookies ---------------------------------------------------------------------------------


def test_cookies_name_the_kind_and_the_vm() -> None:
    assert send_cookie(5) == 0x05E0_0000_0000_0005
    assert receive_cookie(5) == 0x05E1_0000_0000_0005
    assert where_cookie(5) == 0x05E2_0000_0000_0005
    assert send_cookie(5) & KIND_MASK == SEND_KIND << 48
    for cookie in (receive_cookie(5), where_cookie(5)):
        assert cookie & VM_RULES_MASK == send_cookie(5) & VM_RULES_MASK
    assert send_cookie(6) & VM_RULES_MASK != send_cookie(5) & VM_RULES_MASK
    assert RECEIVE_KIND << 48 & VM_RULES_MASK == SEND_KIND << 48
    assert WHERE_KIND << 48 & VM_RULES_MASK == SEND_KIND << 48
    assert VM_RULES_MASK == POLICY_KINDS_MASK | (1 << 48) - 1


@pytest.mark.parametrize("kind", [0x0B10, 0x0BA5, 0xFA17, 0x05E4, 0x05DF])
def test_the_policy_kinds_select_no_other_kind(kind: int) -> None:
    assert kind << 48 & POLICY_KINDS_MASK != SEND_KIND << 48


@pytest.mark.parametrize("vm_id", [0, -1, 1 << 48])
def test_a_vm_id_must_fit_in_a_cookie(vm_id: int) -> None:
    with pytest.raises(InvalidInput, match="does not fit"):
        send_cookie(vm_id)
    with pytest.raises(InvalidInput, match="does not fit"):
        receive_cookie(vm_id)
    with pytest.raises(InvalidInput, match="does not fit"):
        where_cookie(vm_id)


# Meters ----------------------------------------------------------------------------------


def test_a_vms_meters_are_named_by_its_id_and_its_nics_position() -> None:
    assert meter_id(5, 0) == 500
    assert meter_id(5, 1) == 501
    assert meter_id(12, 99) == 1299
    assert vm_meters(5) == range(500, 600)
    assert meter_vm(501) == 5
    assert meter_vm(99) is None
    with pytest.raises(InvalidInput, match="VM id 0 has no meter ids"):
        meter_id(0, 0)


@given(st.integers(1, MAX_METER // METERS_PER_VM - 1), st.integers(0, METERS_PER_VM - 1))
def test_each_nic_of_each_vm_has_a_meter_of_its_own(vm_id: int, nic: int) -> None:
    meter = meter_id(vm_id, nic)
    assert METERS_PER_VM <= meter <= MAX_METER
    assert meter in vm_meters(vm_id)
    assert meter not in vm_meters(vm_id + 1) and meter not in vm_meters(vm_id - 1)
    assert meter_vm(meter) == vm_id


@pytest.mark.parametrize(
    ("vm_id", "nic", "detail"),
    [
        (5, METERS_PER_VM, "NIC 100 of VM 5 cannot be rate limited: only a VM's first 100"),
        (5, -1, "NIC -1 of VM 5 cannot be rate limited"),
        (MAX_METER // METERS_PER_VM + 1, 0, "has no meter ids (they end at 4294901760)"),
    ],
)
def test_a_nic_without_a_meter_id_cannot_be_rate_limited(vm_id: int, nic: int, detail: str) -> None:
    facts = replace(VM, vm_id=vm_id, nic=nic)
    with pytest.raises(InvalidInput, match=re.escape(detail)):
        compile_port(Policy("web", rate_limit_kbps=2000), facts, {})
    assert compile_port(Policy("web"), facts, {}).send


@pytest.mark.parametrize(
    ("rate", "burst"), [(2000, 400), (64, 100), (1, 100), (MAX_RATE_KBPS, MAX_RATE_KBPS // 5)]
)
def test_a_rate_limit_is_one_meter_dropping_above_the_rate_after_a_short_burst(
    rate: int, burst: int
) -> None:
    policy = Policy("web", rate_limit_kbps=rate)
    assert port_meters(policy, replace(VM, nic=1)) == (
        f"meter=501,kbps,burst,bands=type=drop,rate={rate},burst_size={burst}",
    )


@given(any_policies(), st.integers(1, 0xFFFF), st.integers(0, 1))
def test_a_nics_meter_is_the_same_on_every_port(policy: Policy, ofport: int, nic: int) -> None:
    here = replace(VM, nic=nic)
    assert port_meters(policy, replace(here, ofport=ofport)) == port_meters(policy, here)
    assert len(port_meters(policy, here)) == (policy.rate_limit_kbps is not None)


# The document ----------------------------------------------------------------------------


def rule(**fields: Any) -> dict[str, Any]:
    return {"direction": "ingress", "action": "allow", **fields}


NAME_RULES = "use 1-63 characters a-z, 0-9 and '-', not starting or ending with '-'"
PEER_FORMS = "is not any, an address, a CIDR, group:<host>-<image>, vm:<name> or set:<name>"
GROUP_FORM = "is not a group: expected group:<host>-<image>, like group:hv1-debian12"
REFUSED: list[tuple[Any, str]] = [
    (
        {"rule": []},
        "unknown policy field 'rule': expected antispoof, egress_default, ingress_default, "
        "rate_limit_kbps, rules, sets",
    ),
    ({"rules": {}}, "rules must be a list of rule objects"),
    (
        {"rules": ["allow"]},
        "rule 1: expected an object with direction, action, protocol, ports, peer",
    ),
    (
        {"rules": [rule(), rule(port=80)]},
        "rule 2: unknown field 'port': expected action, direction, peer, ports, protocol",
    ),
    ({"rules": [{"action": "allow"}]}, "rule 1: direction is missing"),
    ({"rules": [{"direction": "ingress"}]}, "rule 1: action is missing"),
    (
        {"rules": [rule(direction="in")]},
        "rule 1: unknown direction 'in': expected ingress or egress",
    ),
    ({"rules": [rule(action="reject")]}, "rule 1: unknown action 'reject': expected allow or deny"),
    (
        {"rules": [rule(protocol="sctp")]},
        "rule 1: unknown protocol 'sctp': expected any or tcp or udp or icmp or icmp6",
    ),
    (
        {"rules": [rule(protocol=6)]},
        "rule 1: unknown protocol 6: expected any or tcp or udp or icmp or icmp6",
    ),
    (
        {"rules": [rule(), rule(protocol="tcp", ports=70000)]},
        "rule 2: ports 70000 are outside 1-65535",
    ),
    (
        {"rules": [rule(protocol="tcp", ports="1-70000")]},
        "rule 1: ports 1-70000 are outside 1-65535",
    ),
    ({"rules": [rule(protocol="udp", ports=0)]}, "rule 1: ports 0 are outside 1-65535"),
    (
        {"rules": [rule(protocol="tcp", ports="8080-8000")]},
        "rule 1: ports 8080-8000 are reversed: write 8000-8080",
    ),
    (
        {"rules": [rule(protocol="tcp", ports="http")]},
        "rule 1: ports 'http' are not a port or a range like 80 or 8000-8080",
    ),
    (
        {"rules": [rule(protocol="tcp", ports=True)]},
        "rule 1: ports True are not a port or a range like 80 or 8000-8080",
    ),
    (
        {"rules": [rule(protocol="icmp", ports=80)]},
        "rule 1: ports need protocol tcp or udp, not icmp",
    ),
    ({"rules": [rule(ports=80)]}, "rule 1: ports need protocol tcp or udp, not any"),
    (
        {"rules": [rule(peer="10.0.0.256/24")]},
        f"rule 1: peer '10.0.0.256/24' {PEER_FORMS}",
    ),
    (
        {"rules": [rule(peer="web")]},
        f"rule 1: peer 'web' {PEER_FORMS}",
    ),
    (
        {"rules": [rule(peer="10.0.0.5/24")]},
        "rule 1: peer 10.0.0.5/24 has host bits set: did you mean 10.0.0.0/24?",
    ),
    (
        {"rules": [rule(peer=["10.0.0.0/8"])]},
        "rule 1: peer ['10.0.0.0/8'] is not text like any, 10.0.0.0/24 or vm:web",
    ),
    (
        {"rules": [rule(protocol="icmp", peer="2001:db8::/32")]},
        "rule 1: peer 2001:db8::/32 is IPv6, but icmp is IPv4's: use icmp6",
    ),
    (
        {"rules": [rule(protocol="icmp6", peer="10.0.0.1")]},
        "rule 1: peer 10.0.0.1/32 is IPv4, but icmp6 is IPv6's: use icmp",
    ),
    (
        {"rules": [rule(peer="group:hv1")]},
        f"rule 1: peer group:hv1 {GROUP_FORM}",
    ),
    (
        {"rules": [rule(peer="group:hv1--x")]},
        f"rule 1: peer group:hv1--x {GROUP_FORM}",
    ),
    (
        {"rules": [rule(peer="vm:Web")]},
        f"rule 1: peer: invalid VM name 'Web': {NAME_RULES}",
    ),
    (
        {"rules": [rule(peer="set:db")]},
        "rule 1: peer set:db names no set of the policy (it has none)",
    ),
    (
        {"rules": [rule(peer="set:db")], "sets": {"web": ["a"], "cache": ["b"]}},
        "rule 1: peer set:db names no set of the policy (its sets are cache, web)",
    ),
    ({"sets": ["db"]}, "sets must be an object: set name -> list of VM names"),
    ({"sets": {"db": []}}, "set 'db' is empty: name at least one VM"),
    ({"sets": {"db": "db1"}}, "set 'db' must be a list of VM names"),
    (
        {"sets": {"db": ["db1", "DB2"]}},
        f"set 'db': invalid VM name 'DB2': {NAME_RULES}",
    ),
    (
        {"sets": {"my_set": ["db1"]}},
        f"invalid set name 'my_set': {NAME_RULES}",
    ),
    ({"ingress_default": "reject"}, "unknown ingress_default 'reject': expected allow or deny"),
    ({"egress_default": None}, "unknown egress_default None: expected allow or deny"),
    ({"antispoof": "yes"}, "antispoof must be true or false, not 'yes'"),
    ({"rate_limit_kbps": 0}, "rate_limit_kbps must be a whole number of kbit/s above 0, not 0"),
    ({"rate_limit_kbps": -5}, "rate_limit_kbps must be a whole number of kbit/s above 0, not -5"),
    ({"rate_limit_kbps": 1.5}, "rate_limit_kbps must be a whole number of kbit/s above 0, not 1.5"),
    (
        {"rate_limit_kbps": True},
        "rate_limit_kbps must be a whole number of kbit/s above 0, not True",
    ),
    (
        {"rate_limit_kbps": 1 << 32},
        "rate_limit_kbps 4294967296 is more than a switch meter takes (4294967295)",
    ),
    (
        ["rules"],
        "a policy is an object with the fields rules, ingress_default, egress_default, "
        "antispoof, sets, rate_limit_kbps",
    ),
]


@pytest.mark.parametrize(("document", "detail"), REFUSED)
def test_a_malformed_document_is_refused_saying_where(document: Any, detail: str) -> None:
    with pytest.raises(InvalidInput) as caught:
        parse_policy("web", document)
    assert caught.value.detail == detail


def test_a_policy_name_is_a_label() -> None:
    with pytest.raises(InvalidInput, match="invalid policy name 'Web Servers'"):
        parse_policy("Web Servers", {})


CONFLICTS = [
    (
        [rule(action="deny"), rule(protocol="tcp", ports=22)],
        "rule 2 can never match: rule 1 denies all of it",
    ),
    (
        [
            rule(protocol="udp"),
            rule(direction="egress", action="deny"),
            rule(action="deny", protocol="udp", ports="53-54", peer="10.0.0.0/8"),
        ],
        "rule 3 can never match: rule 1 allows all of it",
    ),
    (
        [rule(peer="10.0.0.0/8"), rule(action="deny", protocol="icmp", peer="10.1.2.0/24")],
        "rule 2 can never match: rule 1 allows all of it",
    ),
    (
        [rule(peer="vm:db"), rule(action="deny", protocol="tcp", ports=80, peer="vm:db")],
        "rule 2 can never match: rule 1 allows all of it",
    ),
    (
        [rule(protocol="tcp", ports="1-1023"), rule(action="deny", protocol="tcp", ports="80-443")],
        "rule 2 can never match: rule 1 allows all of it",
    ),
    (
        [rule(peer="0.0.0.0/0"), rule(action="deny", protocol="icmp", peer="set:db")],
        "rule 2 can never match: rule 1 allows all of it",
    ),
    (
        [rule(protocol="icmp6"), rule(action="deny", protocol="icmp6", peer="2001:db8::1")],
        "rule 2 can never match: rule 1 allows all of it",
    ),
]


@pytest.mark.parametrize(("rules_", "detail"), CONFLICTS)
def test_a_rule_that_can_never_match_is_refused(rules_: list[dict[str, Any]], detail: str) -> None:
    with pytest.raises(InvalidInput) as caught:
        parse_policy("web", {"rules": rules_, "sets": {"db": ["db1"]}})
    assert caught.value.detail == detail


ACCEPTED = [
    # same action: redundant, but not a conflict
    [rule(), rule(protocol="tcp")],
    # other direction
    [rule(action="deny"), rule(direction="egress")],
    # partial overlaps
    [rule(action="deny", protocol="tcp", ports="1-1023"), rule(protocol="tcp", ports="1000-2000")],
    [rule(action="deny", protocol="tcp", ports="1-65535"), rule(protocol="tcp")],
    [rule(action="deny", peer="10.1.0.0/16"), rule(peer="10.0.0.0/8")],
    [rule(action="deny", peer="0.0.0.0/0"), rule(protocol="tcp")],
    [rule(action="deny", peer="0.0.0.0/0"), rule(peer="vm:db")],
    [rule(action="deny", protocol="tcp"), rule(protocol="udp")],
    [rule(action="deny", protocol="icmp"), rule()],
    # symbolic peers are only certain when identical
    [rule(action="deny", peer="set:db"), rule(peer="vm:db1")],
    [rule(action="deny", peer="vm:db1"), rule(peer="10.0.0.5")],
]


@pytest.mark.parametrize("rules_", ACCEPTED)
def test_overlaps_that_leave_something_to_match_are_accepted(rules_: list[dict[str, Any]]) -> None:
    assert len(parse_policy("web", {"rules": rules_, "sets": {"db": ["db1"]}}).rules) == 2


def test_the_document_is_read_with_defaults_and_shown_canonically() -> None:
    policy = parse_policy(
        "web",
        {
            "rules": [
                {
                    "direction": "ingress",
                    "action": "allow",
                    "protocol": "tcp",
                    "ports": "443",
                    "peer": " 10.1.2.3 ",
                },
                {
                    "direction": "egress",
                    "action": "deny",
                    "protocol": "udp",
                    "ports": "8000 - 8080",
                    "peer": "set:db",
                },
                {"direction": "ingress", "action": "deny", "peer": "2001:DB8::/32"},
            ],
            "sets": {"db": ["db2", "db1", "db2"]},
            "rate_limit_kbps": 10000,
        },
    )
    document = to_document(policy)
    assert document == {
        "rules": [
            {
                "direction": "ingress",
                "action": "allow",
                "protocol": "tcp",
                "ports": 443,
                "peer": "10.1.2.3/32",
            },
            {
                "direction": "egress",
                "action": "deny",
                "protocol": "udp",
                "ports": "8000-8080",
                "peer": "set:db",
            },
            {
                "direction": "ingress",
                "action": "deny",
                "protocol": "any",
                "ports": None,
                "peer": "2001:db8::/32",
            },
        ],
        "ingress_default": "deny",
        "egress_default": "allow",
        "antispoof": True,
        "sets": {"db": ["db1", "db2"]},
        "rate_limit_kbps": 10000,
    }
    assert parse_policy("web", document) == policy
    assert peer_references(policy) == {"set:db"}


def test_an_empty_document_is_the_default_policy() -> None:
    assert parse_policy("web", {}) == Policy("web")


def covering_rule(number: int, text: str) -> int:
    found = re.fullmatch(
        rf"rule {number} can never match: rule (\d+) (?:denies|allows) all of it", text
    )
    assert found is not None, text
    return int(found[1])


@given(policies(), resolutions(), st.lists(packets(), min_size=1, max_size=30))
def test_the_canonical_document_gives_the_policy_back_or_a_certain_conflict(
    policy: Policy, peers: dict[str, list[str]], sample: list[Packet]
) -> None:
    try:
        assert parse_policy("web", to_document(policy)) == policy
    except InvalidInput as error:
        later = int(error.detail.split()[1])
        earlier = covering_rule(later, error.detail)
        covering, covered = policy.rules[earlier - 1], policy.rules[later - 1]
        assert covering.action is not covered.action
        for packet in sample:
            if rule_matches(covered, packet, peers):
                assert rule_matches(covering, packet, peers)


def test_rules_beyond_the_priority_range_are_refused() -> None:
    many = [rule(protocol="tcp", ports=port) for port in range(1, MAX_RULES + 2)]
    with pytest.raises(InvalidInput, match=f"at most {MAX_RULES} ingress rules"):
        parse_policy("web", {"rules": many})
    policy = Policy("web", tuple(Rule(Direction.EGRESS, Action.DENY) for _ in range(MAX_RULES + 1)))
    with pytest.raises(InvalidInput, match=f"at most {MAX_RULES} egress rules"):
        compile_port(policy, VM, {})


def test_the_last_rule_the_range_holds_still_ranks_above_the_default() -> None:
    policy = Policy(
        "web",
        tuple(
            Rule(Direction.EGRESS, Action.DENY, Protocol.TCP, (p, p))
            for p in range(1, MAX_RULES + 1)
        ),
    )
    compiled = compile_port_flows(policy, VM, {})
    ranks = sorted({f.priority for f in compiled.send})
    assert ranks[:3] == [20000, 20001, 20002]
    assert ranks[-2:] == [29998, 29999]


# Port ranges -----------------------------------------------------------------------------


@given(st.integers(0, 65535), st.integers(0, 65535))
def test_port_masks_cover_exactly_the_range(a: int, b: int) -> None:
    low, high = min(a, b), max(a, b)
    blocks = port_masks(low, high)
    covered = [(value, 0xFFFF & ~mask) for value, mask in blocks]
    assert all(value & ~mask & 0xFFFF == 0 for value, mask in blocks), "a value outside its mask"
    spans = sorted((value, value + free) for value, free in covered)
    assert spans[0][0] == low and spans[-1][1] == high
    assert all(prev[1] + 1 == nxt[0] for prev, nxt in itertools.pairwise(spans))
    assert all((free + 1) & free == 0 for _, free in covered), "a block is not a power of two"
    assert len(blocks) <= 2 * 16


def test_port_masks_of_a_typical_range() -> None:
    assert port_masks(8000, 8080) == ((8000, 0xFFC0), (8064, 0xFFF0), (8080, 0xFFFF))
    assert port_masks(0, 65535) == ((0, 0),)
    with pytest.raises(InvalidInput):
        port_masks(10, 9)


# What the compiled rules do --------------------------------------------------------------


@given(policies(), resolutions(), st.lists(packets(), min_size=1, max_size=40))
def test_the_compiled_rules_decide_as_the_policy_says(
    policy: Policy, peers: dict[str, list[str]], sample: list[Packet]
) -> None:
    switch = switch_for(policy, peers)
    for packet in sample:
        assert passes(switch.run(packet)) == expected(policy, peers, packet), packet


@given(
    policies(),
    resolutions(),
    st.lists(packets(vlans=[VM.vlan, OTHER_VLAN]), min_size=1, max_size=40),
)
def test_a_packet_from_a_peer_link_reaches_only_the_nic_it_was_redirected_to(
    policy: Policy, peers: dict[str, list[str]], sample: list[Packet]
) -> None:
    switch = switch_for(policy, peers)
    for packet in sample:
        redirected = replace(packet, in_port=PEER_LINK, vlan=packet.vlan or VM.vlan)
        delivered = redirected.dl_dst == VM.mac and redirected.vlan == VM.vlan
        assert switch.run(redirected) == ("strip_vlan,output:3" if delivered else "drop")


@given(limited_policies(), resolutions())
def test_a_rate_limit_meters_exactly_what_the_send_rules_allow(
    policy: Policy, peers: dict[str, list[str]]
) -> None:
    unlimited = compile_port(replace(policy, rate_limit_kbps=None), VM, peers)
    limited = compile_port(policy, VM, peers)
    (meter,) = port_meters(policy, VM)
    assert meter.startswith("meter=500,")
    metered = "actions=meter:500,goto_table:1"
    assert all(text.endswith((metered, "actions=drop")) for text in limited.send)
    assert [text.replace(metered, "actions=goto_table:1") for text in limited.send] == list(
        unlimited.send
    )
    assert (limited.receive, limited.where) == (unlimited.receive, unlimited.where)
    assert not [text for text in unlimited.send if "meter" in text]


def test_rules_whose_peer_stands_for_no_address_are_left_out() -> None:
    policy = parse_policy(
        "web",
        {"rules": [rule(action="deny", peer="vm:db"), rule(protocol="icmp", peer="vm:cache")]},
    )
    compiled = compile_port_flows(policy, VM, {"vm:db": [], "vm:cache": ["2001:db8::7"]})
    assert not [f for f in compiled.receive if 20000 < f.priority < 29999]


def test_every_symbolic_peer_must_be_resolved() -> None:
    policy = parse_policy("web", {"rules": [rule(peer="vm:db")]})
    with pytest.raises(InvalidInput, match="peer vm:db of policy web is not resolved"):
        compile_port(policy, VM, {})
    with pytest.raises(InvalidInput, match="peer vm:db resolved to 'db', not an address or CIDR"):
        compile_port(policy, VM, {"vm:db": ["db"]})


@pytest.mark.parametrize(
    ("facts", "detail"),
    [
        (replace(VM, mac="52:54:00:00:05"), "invalid MAC address"),
        (replace(VM, vlan=0), "VLAN 0 is outside 1-4094"),
        (replace(VM, vlan=4095), "VLAN 4095 is outside 1-4094"),
        (replace(VM, ofport=-1), "switch port -1 is not a port number"),
        (replace(VM, ipv4=("fd00::5",)), "'fd00::5' is not an IPv4 address of the NIC"),
        (replace(VM, ipv6=("10.0.0.5",)), "'10.0.0.5' is not an IPv6 address of the NIC"),
        (replace(VM, vm_id=0), "VM id 0 does not fit in a cookie"),
    ],
)
def test_port_facts_that_cannot_be_matched_are_refused(facts: PortFacts, detail: str) -> None:
    with pytest.raises(InvalidInput, match=re.escape(detail)):
        compile_port(Policy("web"), facts, {})
    with pytest.raises(InvalidInput, match=re.escape(detail)):
        where_rule(facts)


def test_without_a_port_only_the_receive_and_where_rules_of_the_mac_are_made() -> None:
    compiled = compile_port_flows(Policy("web"), replace(VM, ofport=0), {})
    assert compiled.send == ()
    assert compiled.receive and compiled.where
    assert all(
        ("dl_dst", VM.mac) in f.match and "output" not in f.actions
        for f in (*compiled.receive, *compiled.where)
    )


@given(any_policies(), resolutions(), st.integers(0, 0xFFFF))
def test_the_where_rule_is_the_same_for_any_policy_and_port(
    policy: Policy, peers: dict[str, list[str]], ofport: int
) -> None:
    compiled = compile_port(policy, replace(VM, ofport=ofport), peers)
    assert compiled.where == (where_rule(VM),) == (where_rule(replace(VM, mac=VM.mac.upper())),)


# Rendering -------------------------------------------------------------------------------


def parse_flow(text: str) -> Flow:
    """A compiler-made flow text taken apart again."""
    head, actions = text.split(",actions=")
    cookie, table, priority, *rest = head.split(",")
    protocol = [term for term in rest if "=" not in term]
    assert len(protocol) <= 1 and (not protocol or rest[0] == protocol[0])
    return Flow(
        cookie=int(cookie.removeprefix("cookie="), 16),
        table=int(table.removeprefix("table=")),
        priority=int(priority.removeprefix("priority=")),
        protocol=protocol[0] if protocol else "",
        match=tuple(tuple(term.split("=", 1)) for term in rest if "=" in term),  # type: ignore[misc]
        actions=actions,
    )


def test_a_small_policy_compiles_to_these_texts() -> None:
    policy = parse_policy(
        "web",
        {
            "rules": [
                rule(protocol="tcp", ports="8000-8063", peer="10.1.0.0/16"),
                rule(direction="egress", action="deny", protocol="udp", peer="set:db"),
            ],
            "sets": {"db": ["db1"]},
        },
    )
    compiled = compile_port(policy, replace(VM, ipv6=()), {"set:db": ["10.1.2.3", "2001:db8::3"]})
    send = "cookie=0x5e0000000000005,table=0,priority="
    receive = "cookie=0x5e1000000000005,table=1,priority="
    where = "cookie=0x5e2000000000005,table=2,priority="
    mac = VM.mac
    assert compiled.send == (
        f"{send}29999,udp,in_port=3,dl_src={mac},tp_src=68,tp_dst=67,actions=goto_table:1",
        f"{send}29999,udp6,in_port=3,dl_src={mac},tp_src=546,tp_dst=547,actions=goto_table:1",
        f"{send}29999,arp,in_port=3,dl_src={mac},arp_sha={mac},arp_spa=10.0.0.5,actions=goto_table:1",
        f"{send}29999,icmp6,in_port=3,dl_src={mac},icmp_type=133,actions=goto_table:1",
        f"{send}29999,icmp6,in_port=3,dl_src={mac},icmp_type=135,actions=goto_table:1",
        f"{send}29999,icmp6,in_port=3,dl_src={mac},icmp_type=136,actions=goto_table:1",
        f"{send}29998,udp,in_port=3,dl_src={mac},nw_src=10.0.0.5,nw_dst=10.1.2.3,actions=drop",
        f"{send}29998,udp6,in_port=3,dl_src={mac},ipv6_src=fe80::/10,ipv6_dst=2001:db8::3,actions=drop",
        f"{send}20001,ip,in_port=3,dl_src={mac},nw_src=10.0.0.5,actions=goto_table:1",
        f"{send}20001,ipv6,in_port=3,dl_src={mac},ipv6_src=fe80::/10,actions=goto_table:1",
        f"{send}20000,in_port=3,actions=drop",
    )
    assert compiled.receive == (
        f"{receive}31000,reg7=1,dl_vlan=10,dl_dst={mac},actions=strip_vlan,output:3",
        f"{receive}29999,arp,dl_dst={mac},actions=goto_table:2",
        f"{receive}29999,udp,dl_dst={mac},tp_src=67,tp_dst=68,actions=goto_table:2",
        f"{receive}29999,udp6,dl_dst={mac},tp_src=547,tp_dst=546,actions=goto_table:2",
        f"{receive}29999,icmp6,dl_dst={mac},icmp_type=134,actions=goto_table:2",
        f"{receive}29999,icmp6,dl_dst={mac},icmp_type=135,actions=goto_table:2",
        f"{receive}29999,icmp6,dl_dst={mac},icmp_type=136,actions=goto_table:2",
        f"{receive}29998,tcp,dl_dst={mac},nw_src=10.1.0.0/16,tp_dst=0x1f40/0xffc0,actions=goto_table:2",
        f"{receive}20000,dl_dst={mac},actions=drop",
    )
    assert compiled.where == (f"{where}20000,dl_dst={mac},actions=NORMAL",)


def test_the_base_rules_of_a_bridge() -> None:
    base = "cookie=0xba5000000000000,table="
    assert base_flows([9, 7, 7]) == [
        f"{base}0,priority=0,actions=goto_table:1",
        f"{base}0,priority=30000,in_port=7,actions=load:1->NXM_NX_REG7[],goto_table:1",
        f"{base}0,priority=30000,in_port=9,actions=load:1->NXM_NX_REG7[],goto_table:1",
        f"{base}1,priority=30500,reg7=1,actions=drop",
        f"{base}1,priority=0,actions=NORMAL",
        f"{base}2,priority=0,actions=NORMAL",
    ]
    assert all(
        int(f.split(",")[0].removeprefix("cookie="), 16) == BASE_KIND << 48 for f in base_flows([])
    )


@given(policies(), resolutions())
def test_each_text_says_exactly_what_its_structure_does(
    policy: Policy, peers: dict[str, list[str]]
) -> None:
    flows = compile_port_flows(policy, VM, peers)
    texts = compile_port(policy, VM, peers)
    assert tuple(parse_flow(t) for t in texts.send) == flows.send
    assert tuple(parse_flow(t) for t in texts.receive) == flows.receive
    assert tuple(parse_flow(t) for t in texts.where) == flows.where
    assert all(f.cookie == send_cookie(VM.vm_id) and f.table == 0 for f in flows.send)
    assert all(f.cookie == receive_cookie(VM.vm_id) and f.table == 1 for f in flows.receive)
    assert all(f.cookie == where_cookie(VM.vm_id) and f.table == 2 for f in flows.where)
    assert all(("in_port", "3") in f.match for f in flows.send)
    assert all(20000 <= f.priority <= 29999 for f in flows.send)


# The rewrites of the migration method -------------------------------------------------


def as_dumped(text: str) -> str:
    """A compiler-made flow text as `ovs-ofctl -O OpenFlow14 --no-stats dump-flows` prints it
    back (the switch driver reads rules in OpenFlow 1.4, which can say `meter:N`)."""
    flow = parse_flow(text)
    table = f" table={flow.table}," if flow.table else ""
    match = ",".join(
        [
            f"priority={flow.priority}",
            *([flow.protocol] if flow.protocol else []),
            *(f"{k}={'0x1' if k == 'reg7' else v}" for k, v in flow.match),
        ]
    )
    actions = flow.actions.replace("strip_vlan", "pop_vlan")
    return f"cookie={flow.cookie:#x},{table} {match} actions={actions}"


def both_forms(texts: Iterable[str]) -> st.SearchStrategy[list[str]]:
    texts = list(texts)
    return st.sampled_from([texts, [as_dumped(t) for t in texts]])


@given(any_policies(), resolutions(), st.data())
def test_send_rules_retargeted_and_back_are_the_same(
    policy: Policy, peers: dict[str, list[str]], data: st.DataObject
) -> None:
    send = data.draw(both_forms(compile_port(policy, VM, peers).send))
    moved = retarget_send(send, 41)
    assert all("in_port=41" in text and "in_port=3" not in text for text in moved)
    assert retarget_send(moved, VM.ofport) == send
    assert [metered_by(text) for text in moved] == [metered_by(text) for text in send]
    assert compile_port(policy, replace(VM, ofport=41), peers).send == tuple(
        retarget_send(compile_port(policy, VM, peers).send, 41)
    )


@given(any_policies(), resolutions(), st.data())
def test_the_port_of_each_send_rule_is_read_back(
    policy: Policy, peers: dict[str, list[str]], data: st.DataObject
) -> None:
    compiled = compile_port(policy, VM, peers)
    assert {in_port_of(text) for text in data.draw(both_forms(compiled.send))} == {VM.ofport}
    assert {in_port_of(text) for text in data.draw(both_forms(compiled.receive))} == {None}


@pytest.mark.parametrize(
    ("text", "port"),
    [
        ("in_port=3,actions=drop", 3),
        ("cookie=0x1, priority=5,in_port=3 actions=drop", 3),
        ("cookie=0x1,priority=5,arp,in_port=3,arp_spa=10.0.0.5,actions=drop", 3),
        ("cookie=0x1,priority=5,xin_port=3,actions=drop", None),
        ("cookie=0x1,priority=5,in_port=3x,actions=drop", None),
        ("cookie=0x1,priority=5,arp,actions=load:3->in_port=7", None),
    ],
)
def test_a_field_is_read_only_where_it_starts_and_ends(text: str, port: int | None) -> None:
    assert in_port_of(text) == port
    assert retarget_send([text], 9)[0] == (text if port is None else text.replace("=3", "=9", 1))


@given(policies(), resolutions(), st.data())
def test_redirected_where_rules_come_back_to_normal_and_receive_rules_stay(
    policy: Policy, peers: dict[str, list[str]], data: st.DataObject
) -> None:
    compiled = compile_port(policy, VM, peers)
    receive = data.draw(both_forms(compiled.receive))
    where = data.draw(both_forms(compiled.where))
    delivery, *kept = receive
    assert re.search(r"actions=(strip|pop)_vlan,output:3$", delivery)
    neighbours = [NEIGHBOUR_PORT, OTHER_PORT]
    redirected = redirect_where(where, VM.vlan, PEER_LINK, neighbours)
    assert len(redirected) == 1 + len(neighbours)
    assert not [text for text in redirected if "NORMAL" in text]
    assert redirect_where(receive, VM.vlan, PEER_LINK, neighbours) == receive
    assert retarget_receive(redirected, 9) == where
    moved = [delivery.replace("output:3", "output:9"), *kept, *where]
    assert retarget_receive([*receive, *redirected], 9) == moved
    assert retarget_receive([*receive, *where], 9) == moved


@given(
    policies(),
    resolutions(),
    st.lists(packets(vlans=[VM.vlan, OTHER_VLAN]), min_size=1, max_size=40),
)
def test_redirected_where_rules_send_what_receive_rules_allow_down_the_peer_link_tagged(
    policy: Policy, peers: dict[str, list[str]], sample: list[Packet]
) -> None:
    compiled = compile_port(policy, VM, peers)
    neighbours = [NEIGHBOUR_PORT]
    redirected = redirect_where(compiled.where, VM.vlan, PEER_LINK, neighbours)
    rules = [*compiled.receive, *redirected]  # the source's, once the VM left
    switch = Switch((*base_pipeline([PEER_LINK]), *map(parse_flow, rules)))
    for packet in (p for p in sample if not p.sent):
        actions = switch.run(packet)
        allowed = expected(policy, peers, packet) and packet.vlan in (None, VM.vlan)
        assert actions.endswith(f"output:{PEER_LINK}") == allowed, (packet, actions)
        if allowed:
            pushes = actions.startswith(f"mod_vlan_vid:{VM.vlan},")
            assert pushes == (packet.vlan is None), "the packet must leave tagged once"
        if packet.vlan is None:
            from_other_vlan = switch.run(replace(packet, in_port=OTHER_PORT))
            assert not from_other_vlan.endswith(f"output:{PEER_LINK}"), packet
