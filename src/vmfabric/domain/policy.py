"""Network policies that follow a VM (issue 6): the model, its checks and its switch rules.

An operator writes a policy at a high level (`parse_policy`): rules in order, first match
wins, each allowing or denying one direction of traffic by protocol, ports and peer; a default
action per direction; anti-spoofing; named sets of VMs. The compiler (`compile_port`) turns a
policy and the facts of one NIC's switch port into `ovs-ofctl` flow texts, laid out in the
three tables of `docs/policies.md`: send rules (traffic from the NIC's port) in table 0, receive
rules (traffic to the NIC's MAC) in table 1, and in table 2 the NIC's where rule (where what
the receive rules allow goes: the switch's forwarding, or the peer link toward the host the VM
moves to), each carrying a cookie that names the VM and the kind, so one VM's rules are found,
moved and removed as a set, and its where rules changed alone. The rewrites at the end
(`retarget_send`, `redirect_where`, `retarget_receive`) are the migration method's: they work
on the texts a switch gives back, as well as on the compiler's own.

The compiler sees only addresses: the services resolve the symbolic peers a policy names
(`peer_references`) to CIDR lists first. Policy rules govern IP traffic; address resolution
(ARP, neighbour discovery) and DHCP (v4 and v6) always pass, so no policy can cut a VM off its
network, and anti-spoofing limits what of it the VM may send. A rate limit becomes one
OpenFlow meter per NIC (`port_meters`), named after the VM and the NIC so that it keeps its id
on every host, which the NIC's allowed send rules pass through first (`meter:<id>`).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Any, ParamSpec, TypeVar

from vmfabric.domain.errors import InvalidInput
from vmfabric.domain.names import check_name, is_label, normalize_mac

SEND_KIND = 0x05E0
"""Top 16 bits of a send rule's cookie; the low 48 bits are the VM's id."""

RECEIVE_KIND = 0x05E1
"""Top 16 bits of a receive rule's cookie; the low 48 bits are the VM's id."""

WHERE_KIND = 0x05E2
"""Top 16 bits of a where rule's cookie; the low 48 bits are the VM's id. A kind of its own,
so that redirecting a VM that moves out deletes and replaces these few rules alone."""

BASE_KIND = 0x0BA5
"""Top 16 bits of the cookie of a bridge's base rules (the pipeline itself)."""

VM_ID_BITS = 48
KIND_MASK = 0xFFFF << VM_ID_BITS
"""Cookie mask that selects every rule of one kind on a switch."""

POLICY_KINDS_MASK = 0xFFFC << VM_ID_BITS
"""With `send_cookie(vm)`, selects every VM's send, receive and where rules: their kinds
differ only in the lowest two bits (0x05E3 is no kind)."""

VM_RULES_MASK = POLICY_KINDS_MASK | (1 << VM_ID_BITS) - 1
"""With `send_cookie(vm)`, selects that VM's send, receive and where rules."""

METERS_PER_VM = 100
"""A VM's meters are `vm_id * 100 + n`, n the NIC's position on the VM (0 for the first): the
same ids on every host, and readable where ovs-ofctl prints them in decimal (VM 5's first NIC
has meter 500). Ids below 100 are no VM's: they are left to the operator."""

MAX_METER = 0xFFFF0000
"""The highest meter id of OpenFlow (`OFPM_MAX`); the ids above it are reserved."""

MAX_RATE_KBPS = 0xFFFF_FFFF
"""A meter band's rate is a 32-bit number of kbit/s."""

BURST_FRACTION = 5
"""A meter lets a burst of a fifth of a second at the rate through: on the lab's switch TCP
then gets about 90 % of the rate, with a tenth of a second only about 45 % (it takes each
drop for congestion and backs off)."""

MIN_BURST_KBITS = 100
"""The smallest burst, in kbit: more than a jumbo frame (9000 bytes), so that a low rate never
drops every full-size frame."""

SEND_TABLE = 0
RECEIVE_TABLE = 1
WHERE_TABLE = 2

DELIVERY_PRIORITY = 31000
"""Table 1: a packet redirected by another host, to a local NIC."""
PEER_DROP_PRIORITY = 30500
"""Table 1: anything else from a peer link."""
PEER_PRIORITY = 30000
"""Table 0: a packet from a peer link is marked (reg7 = 1) and goes to table 1."""
INFRASTRUCTURE_PRIORITY = 29999
"""Both tables: ARP, DHCP and neighbour discovery, above the policy's rules."""
FIRST_RULE_PRIORITY = 29998
"""The policy's first rule of a direction; each later rule gets the next lower priority."""
DEFAULT_PRIORITY = 20001
"""Table 0 with anti-spoofing: the default egress action for the NIC's own addresses."""
LAST_PRIORITY = 20000
"""The rule that decides whatever nothing above matched: the default, or the spoof drop."""
WHERE_PRIORITY = 20000
"""Table 2: a NIC's where rule (or, while its VM moves out, the rules that redirect it)."""
BASE_PRIORITY = 0
"""Every table: the base rule (table 0 to table 1, tables 1 and 2 `NORMAL`)."""

MAX_RULES = FIRST_RULE_PRIORITY - DEFAULT_PRIORITY
"""Rules a policy may have per direction: the priorities between the fixed rules."""

ANY_PEER = "any"
MAX_PORT = 0xFFFF
MAX_VLAN = 4094
GOTO_RECEIVE = f"goto_table:{RECEIVE_TABLE}"
GOTO_WHERE = f"goto_table:{WHERE_TABLE}"
DROP = "drop"
NORMAL = "NORMAL"
UNTAGGED = "vlan_tci=0x0000/0x1fff"
"""Matches a packet without VLAN tag, written as `ovs-ofctl dump-flows` prints it."""

_DHCP_CLIENT = (("udp", "68", "67"), ("udp6", "546", "547"))
_DHCP_SERVER = (("udp", "67", "68"), ("udp6", "547", "546"))
_ND_SENT = (133, 135, 136)
"""Router solicitation, neighbour solicitation and advertisement; never an advertisement of a
router or a redirect."""
_ND_RECEIVED = (134, 135, 136)
_LINK_LOCAL = ipaddress.IPv6Network("fe80::/10")


class Direction(StrEnum):
    """Which traffic a rule is about: to the VM (ingress) or from it (egress)."""

    INGRESS = "ingress"
    EGRESS = "egress"


class Action(StrEnum):
    """What a rule does with the traffic it matches."""

    ALLOW = "allow"
    DENY = "deny"


class Protocol(StrEnum):
    """The IP protocol a rule matches; `any` is every IP packet, of both versions."""

    ANY = "any"
    TCP = "tcp"
    UDP = "udp"
    ICMP = "icmp"
    ICMP6 = "icmp6"


_Network = ipaddress.IPv4Network | ipaddress.IPv6Network
_PORTED = (Protocol.TCP, Protocol.UDP)
_SYMBOLIC = ("group", "vm", "set")
_POLICY_FIELDS = (
    "rules",
    "ingress_default",
    "egress_default",
    "antispoof",
    "sets",
    "rate_limit_kbps",
)
_RULE_FIELDS = ("direction", "action", "protocol", "ports", "peer")


@dataclass(frozen=True)
class Rule:
    """One rule: `ports` (low, high) only for tcp and udp; `peer` is `any`, a canonical CIDR,
    or `group:<host>-<image>`, `vm:<name>` or `set:<name>`."""

    direction: Direction
    action: Action
    protocol: Protocol = Protocol.ANY
    ports: tuple[int, int] | None = None
    peer: str = ANY_PEER


@dataclass(frozen=True)
class Policy:
    """A named policy: its rules in order (first match wins), defaults, anti-spoofing, its
    sets (set name -> VM names) and an optional rate limit in kbit/s."""

    name: str
    rules: tuple[Rule, ...] = ()
    ingress_default: Action = Action.DENY
    egress_default: Action = Action.ALLOW
    antispoof: bool = True
    sets: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    rate_limit_kbps: int | None = None


def send_cookie(vm_id: int) -> int:
    """The cookie of a VM's send rules."""
    return _cookie(SEND_KIND, vm_id)


def receive_cookie(vm_id: int) -> int:
    """The cookie of a VM's receive rules."""
    return _cookie(RECEIVE_KIND, vm_id)


def where_cookie(vm_id: int) -> int:
    """The cookie of a VM's where rules."""
    return _cookie(WHERE_KIND, vm_id)


def _cookie(kind: int, vm_id: int) -> int:
    if not 0 < vm_id < 1 << VM_ID_BITS:
        raise InvalidInput(f"VM id {vm_id} does not fit in a cookie")
    return kind << VM_ID_BITS | vm_id


# Parsing -------------------------------------------------------------------------------


def parse_policy(name: str, document: Mapping[str, Any]) -> Policy:
    """The policy a JSON-like document describes, checked whole.

    Raises InvalidInput with a one-line detail naming the rule (1-based) and the field at
    fault, so the operator can fix the document without guessing; a rule that an earlier rule
    with the other action covers entirely is refused too, since it could never match.
    """
    check_name("policy", name)
    if not isinstance(document, Mapping):
        raise InvalidInput(f"a policy is an object with the fields {', '.join(_POLICY_FIELDS)}")
    _refuse_unknown(document, _POLICY_FIELDS, "unknown policy field")
    sets = _parse_sets(document.get("sets"))
    policy = Policy(
        name=name,
        rules=_parse_rules(document.get("rules", []), sets),
        ingress_default=_choice(Action, document.get("ingress_default", "deny"), "ingress_default"),
        egress_default=_choice(Action, document.get("egress_default", "allow"), "egress_default"),
        antispoof=_flag(document.get("antispoof", True)),
        sets=sets,
        rate_limit_kbps=_rate(document.get("rate_limit_kbps")),
    )
    _check_capacity(policy.rules)
    _check_conflicts(policy.rules)
    return policy


def to_document(policy: Policy) -> dict[str, Any]:
    """The canonical document of a policy, as the API shows it; `parse_policy` of it gives
    the same policy back."""
    return {
        "rules": [_rule_document(rule) for rule in policy.rules],
        "ingress_default": str(policy.ingress_default),
        "egress_default": str(policy.egress_default),
        "antispoof": policy.antispoof,
        "sets": {name: list(members) for name, members in sorted(policy.sets.items())},
        "rate_limit_kbps": policy.rate_limit_kbps,
    }


def peer_references(policy: Policy) -> frozenset[str]:
    """The symbolic peers (`group:`, `vm:`, `set:` texts) the services must resolve to
    addresses before the policy can be compiled."""
    return frozenset(rule.peer for rule in policy.rules if _is_symbolic(rule.peer))


def _rule_document(rule: Rule) -> dict[str, Any]:
    return {
        "direction": str(rule.direction),
        "action": str(rule.action),
        "protocol": str(rule.protocol),
        "ports": _ports_document(rule.ports),
        "peer": rule.peer,
    }


def _ports_document(ports: tuple[int, int] | None) -> int | str | None:
    if ports is None:
        return None
    low, high = ports
    return low if low == high else f"{low}-{high}"


def _refuse_unknown(document: Mapping[str, Any], known: Sequence[str], what: str) -> None:
    unknown = sorted(str(key) for key in document if key not in known)
    if unknown:
        raise InvalidInput(f"{what} {unknown[0]!r}: expected {', '.join(sorted(known))}")


_E = TypeVar("_E", bound=StrEnum)


def _choice(kind: type[_E], value: object, what: str) -> _E:
    """The member of `kind` named `value`; InvalidInput listing the members otherwise."""
    for member in kind:
        if value == member.value:
            return member
    expected = " or ".join(member.value for member in kind)
    shown = repr(value) if isinstance(value, str) else str(value)
    raise InvalidInput(f"unknown {what} {shown}: expected {expected}")


def _flag(value: object) -> bool:
    if not isinstance(value, bool):
        raise InvalidInput(f"antispoof must be true or false, not {value!r}")
    return value


def _rate(value: object) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise InvalidInput(
            f"rate_limit_kbps must be a whole number of kbit/s above 0, not {value!r}"
        )
    if value > MAX_RATE_KBPS:
        raise InvalidInput(
            f"rate_limit_kbps {value} is more than a switch meter takes ({MAX_RATE_KBPS})"
        )
    return value


def _parse_sets(value: object) -> dict[str, tuple[str, ...]]:
    """Set name -> its VMs' names, sorted and without duplicates."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise InvalidInput("sets must be an object: set name -> list of VM names")
    sets: dict[str, tuple[str, ...]] = {}
    for name, members in value.items():
        check_name("set", str(name))
        if not isinstance(members, list | tuple) or not all(isinstance(m, str) for m in members):
            raise InvalidInput(f"set {name!r} must be a list of VM names")
        if not members:
            raise InvalidInput(f"set {name!r} is empty: name at least one VM")
        for member in members:
            _with_prefix(f"set {name!r}: ", check_name, "VM", member)
        sets[str(name)] = tuple(sorted(set(members)))
    return sets


def _parse_rules(value: object, sets: Mapping[str, tuple[str, ...]]) -> tuple[Rule, ...]:
    if not isinstance(value, list | tuple):
        raise InvalidInput("rules must be a list of rule objects")
    return tuple(_parse_rule(number, raw, sets) for number, raw in enumerate(value, start=1))


def _parse_rule(number: int, raw: object, sets: Mapping[str, tuple[str, ...]]) -> Rule:
    """One rule of the document; every error names the rule."""
    prefix = f"rule {number}: "
    if not isinstance(raw, Mapping):
        raise InvalidInput(f"{prefix}expected an object with {', '.join(_RULE_FIELDS)}")
    _with_prefix(prefix, _refuse_unknown, raw, _RULE_FIELDS, "unknown field")
    for required in ("direction", "action"):
        if required not in raw:
            raise InvalidInput(f"{prefix}{required} is missing")
    protocol = _with_prefix(prefix, _choice, Protocol, raw.get("protocol", "any"), "protocol")
    return Rule(
        direction=_with_prefix(prefix, _choice, Direction, raw["direction"], "direction"),
        action=_with_prefix(prefix, _choice, Action, raw["action"], "action"),
        protocol=protocol,
        ports=_with_prefix(prefix, _parse_ports, raw.get("ports"), protocol),
        peer=_with_prefix(prefix, _parse_peer, raw.get("peer", ANY_PEER), protocol, sets),
    )


_P = ParamSpec("_P")
_R = TypeVar("_R")


def _with_prefix(prefix: str, check: Callable[_P, _R], *args: _P.args, **kwargs: _P.kwargs) -> _R:
    """`check(*args)`, its InvalidInput's detail prefixed (which rule or set it is about)."""
    try:
        return check(*args, **kwargs)
    except InvalidInput as error:
        raise InvalidInput(prefix + error.detail) from None


_PORTS = re.compile(r"(\d{1,9})(?:\s*-\s*(\d{1,9}))?")


def _parse_ports(value: object, protocol: Protocol) -> tuple[int, int] | None:
    """(low, high) of `80` or `"8000-8080"`; only tcp and udp have ports."""
    if value is None:
        return None
    if protocol not in _PORTED:
        raise InvalidInput(f"ports need protocol tcp or udp, not {protocol}")
    if isinstance(value, int) and not isinstance(value, bool):
        low = high = value
    else:
        found = _PORTS.fullmatch(value.strip()) if isinstance(value, str) else None
        if found is None:
            raise InvalidInput(f"ports {value!r} are not a port or a range like 80 or 8000-8080")
        low, high = int(found[1]), int(found[2] or found[1])
    shown = str(low) if low == high else f"{low}-{high}"
    if not (0 < low <= MAX_PORT and 0 < high <= MAX_PORT):
        raise InvalidInput(f"ports {shown} are outside 1-{MAX_PORT}")
    if low > high:
        raise InvalidInput(f"ports {shown} are reversed: write {high}-{low}")
    return low, high


def _parse_peer(value: object, protocol: Protocol, sets: Mapping[str, tuple[str, ...]]) -> str:
    """The canonical text of a peer: `any`, a CIDR, or a symbolic peer."""
    if not isinstance(value, str):
        raise InvalidInput(f"peer {value!r} is not text like any, 10.0.0.0/24 or vm:web")
    text = value.strip()
    if text == ANY_PEER:
        return text
    kind, colon, name = text.partition(":")
    if colon and kind in _SYMBOLIC:
        return _parse_symbolic(kind, name, sets)
    network = _parse_cidr(text)
    if protocol is Protocol.ICMP and network.version == 6:
        raise InvalidInput(f"peer {network} is IPv6, but icmp is IPv4's: use icmp6")
    if protocol is Protocol.ICMP6 and network.version == 4:
        raise InvalidInput(f"peer {network} is IPv4, but icmp6 is IPv6's: use icmp")
    return str(network)


def _parse_symbolic(kind: str, name: str, sets: Mapping[str, tuple[str, ...]]) -> str:
    if kind == "group" and not _is_group(name):
        raise InvalidInput(
            f"peer group:{name} is not a group: expected group:<host>-<image>, "
            "like group:hv1-debian12"
        )
    if kind == "vm":
        _with_prefix("peer: ", check_name, "VM", name)
    if kind == "set" and name not in sets:
        known = f"its sets are {', '.join(sorted(sets))}" if sets else "it has none"
        raise InvalidInput(f"peer set:{name} names no set of the policy ({known})")
    return f"{kind}:{name}"


def _is_group(name: str) -> bool:
    """Whether `name` is `<host>-<image>`, both DNS labels, and one label as a whole."""
    splits = (i for i, char in enumerate(name) if char == "-")
    return is_label(name) and any(is_label(name[:i]) and is_label(name[i + 1 :]) for i in splits)


def _parse_cidr(text: str) -> _Network:
    try:
        return ipaddress.ip_network(text)
    except ValueError:
        pass
    try:
        loose = ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise InvalidInput(
            f"peer {text!r} is not any, an address, a CIDR, group:<host>-<image>, vm:<name> "
            "or set:<name>"
        ) from None
    raise InvalidInput(f"peer {text} has host bits set: did you mean {loose}?")


def _is_symbolic(peer: str) -> bool:
    return peer.partition(":")[0] in _SYMBOLIC


def _cidr(peer: str) -> _Network | None:
    """The network of a CIDR peer; None for `any` and symbolic peers."""
    if peer == ANY_PEER or _is_symbolic(peer):
        return None
    return ipaddress.ip_network(peer)


def _check_capacity(rules: Sequence[Rule]) -> None:
    for direction in Direction:
        count = sum(rule.direction is direction for rule in rules)
        if count > MAX_RULES:
            raise InvalidInput(
                f"a policy has at most {MAX_RULES} {direction} rules (the priorities of the "
                f"switch's range), not {count}"
            )


def _check_conflicts(rules: Sequence[Rule]) -> None:
    """Refuse a rule an earlier rule with the other action covers entirely."""
    earlier = _EarlierRules()
    for number, rule in enumerate(rules, start=1):
        covering = earlier.covering(rule)
        if covering is not None:
            verb = "denies" if rule.action is Action.ALLOW else "allows"
            raise InvalidInput(f"rule {number} can never match: rule {covering} {verb} all of it")
        earlier.file(number, rule)


@dataclass
class _Kin:
    """Earlier rules that differ only in their ports (same direction, action, peer and
    protocol): one comparison of the rest decides for all of them."""

    example: Rule
    without_ports: int | None = None
    ranges: list[tuple[int, int, int]] = field(default_factory=list)

    def add(self, number: int, rule: Rule) -> None:
        if rule.ports is None:
            self.without_ports = self.without_ports or number
        else:
            self.ranges.append((*rule.ports, number))

    def covering(self, rule: Rule) -> int | None:
        """The number of the first of these rules that covers `rule`."""
        if not _covers(replace(self.example, ports=None), rule):
            return None
        numbers = [self.without_ports] if self.without_ports else []
        if rule.ports is not None:
            low, high = rule.ports
            numbers += [number for a, b, number in self.ranges if a <= low and high <= b]
        return min(numbers, default=None)


class _EarlierRules:
    """The rules before the one checked, filed so that it is compared only with those that
    could cover it: thousands of rules are checked in about linear time, unless they share
    a peer and protocol."""

    def __init__(self) -> None:
        self._kin: dict[tuple[Direction, Action, str, Protocol], _Kin] = {}
        self._prefixes: set[tuple[int, int]] = set()

    def file(self, number: int, rule: Rule) -> None:
        key = (rule.direction, rule.action, rule.peer, rule.protocol)
        self._kin.setdefault(key, _Kin(rule)).add(number, rule)
        network = _cidr(rule.peer)
        if network is not None:
            self._prefixes.add((network.version, network.prefixlen))

    def covering(self, rule: Rule) -> int | None:
        """The number of the first earlier rule with the other action that covers `rule`."""
        other = Action.DENY if rule.action is Action.ALLOW else Action.ALLOW
        kin = (
            self._kin.get((rule.direction, other, peer, protocol))
            for peer in self._peers_around(rule.peer)
            for protocol in {Protocol.ANY, rule.protocol}
        )
        found = (k.covering(rule) for k in kin if k is not None)
        return min((number for number in found if number is not None), default=None)

    def _peers_around(self, peer: str) -> set[str]:
        """The peers that may cover `peer`: any, itself, and filed networks around it."""
        network = _cidr(peer)
        if network is None:
            return {ANY_PEER, peer, "0.0.0.0/0", "::/0"}
        lengths = (p for v, p in self._prefixes if v == network.version and p <= network.prefixlen)
        return {ANY_PEER, *(str(network.supernet(new_prefix=p)) for p in lengths)}


def _covers(outer: Rule, inner: Rule) -> bool:
    """Whether every packet `inner` matches, `outer` matches too, for any resolution of the
    symbolic peers; False whenever that is not certain."""
    return _protocol_covers(outer, inner) and all(
        _peer_covers(outer, inner, version) for version in _versions(inner)
    )


def _protocol_covers(outer: Rule, inner: Rule) -> bool:
    if outer.protocol is Protocol.ANY:
        return True
    if outer.protocol is not inner.protocol:
        return False
    if outer.ports is None:
        return True
    if inner.ports is None:
        return False
    return outer.ports[0] <= inner.ports[0] and inner.ports[1] <= outer.ports[1]


def _peer_covers(outer: Rule, inner: Rule, version: int) -> bool:
    """Whether `outer` matches every peer of `inner` of one IP version."""
    if version not in _versions(outer):
        return False
    if outer.peer in (ANY_PEER, inner.peer):
        return True
    wide, narrow = _cidr(outer.peer), _cidr(inner.peer)
    if wide is None:
        return False
    if wide.prefixlen == 0:
        return True
    return narrow is not None and _within(narrow, wide)


def _within(narrow: _Network, wide: _Network) -> bool:
    if isinstance(narrow, ipaddress.IPv4Network) and isinstance(wide, ipaddress.IPv4Network):
        return narrow.subnet_of(wide)
    if isinstance(narrow, ipaddress.IPv6Network) and isinstance(wide, ipaddress.IPv6Network):
        return narrow.subnet_of(wide)
    return False


def _versions(rule: Rule) -> set[int]:
    """The IP versions whose packets a rule can match."""
    versions = {Protocol.ICMP: {4}, Protocol.ICMP6: {6}}.get(rule.protocol, {4, 6})
    network = _cidr(rule.peer)
    return versions & {network.version} if network is not None else versions


# Compiling -----------------------------------------------------------------------------


@dataclass(frozen=True)
class PortFacts:
    """What the compiler needs of one NIC: its VM's id, MAC, switch port (0 while the port
    does not exist yet), VLAN, addresses, and position on the VM (0 for the first), which
    names its meter."""

    vm_id: int
    mac: str
    ofport: int
    vlan: int
    ipv4: tuple[str, ...] = ()
    ipv6: tuple[str, ...] = ()
    nic: int = 0


@dataclass(frozen=True)
class Flow:
    """One OpenFlow rule: `protocol` is an `ovs-ofctl` shorthand (`ip`, `tcp6`, `arp`, ...,
    or empty for any frame), `match` the other fields in order."""

    cookie: int
    table: int
    priority: int
    protocol: str
    match: tuple[tuple[str, str], ...]
    actions: str

    def text(self) -> str:
        """The rule in `ovs-ofctl add-flows` syntax."""
        fields = [self.protocol] if self.protocol else []
        fields += [f"{name}={value}" for name, value in self.match]
        head = f"cookie={self.cookie:#x},table={self.table},priority={self.priority}"
        return ",".join([head, *fields, f"actions={self.actions}"])


@dataclass(frozen=True)
class PortFlows:
    """A NIC's send rules (table 0), receive rules (table 1) and where rule (table 2), as
    structures."""

    send: tuple[Flow, ...]
    receive: tuple[Flow, ...]
    where: tuple[Flow, ...]


@dataclass(frozen=True)
class PortRules:
    """A NIC's send rules (table 0), receive rules (table 1) and where rule (table 2), as flow
    texts."""

    send: tuple[str, ...]
    receive: tuple[str, ...]
    where: tuple[str, ...]


def compile_port(policy: Policy, port: PortFacts, peers: Mapping[str, Sequence[str]]) -> PortRules:
    """The switch rules that enforce `policy` on one NIC, in `ovs-ofctl` syntax.

    `peers` maps each of `peer_references(policy)` to the CIDRs or addresses it stands for
    now. See `compile_port_flows`.
    """
    flows = compile_port_flows(policy, port, peers)
    return PortRules(
        send=tuple(flow.text() for flow in flows.send),
        receive=tuple(flow.text() for flow in flows.receive),
        where=tuple(flow.text() for flow in flows.where),
    )


def compile_port_flows(
    policy: Policy, port: PortFacts, peers: Mapping[str, Sequence[str]]
) -> PortFlows:
    """The switch rules that enforce `policy` on one NIC.

    Send rules match the NIC's port, which no guest can forge: anti-spoofing, then the
    egress rules, then the default; with a rate limit, what they allow passes the NIC's
    meter first (`port_meters`), and what they drop counts nothing against the rate.
    Receive rules match its MAC, wherever the packet comes from: the delivery of packets
    another host redirected here, the infrastructure, the ingress rules, then the default;
    what they allow goes on to the where rule (`where_rule`). A rule's place in the policy
    gives its priority; a rule whose peer stands for no address now is left out. Without a
    port yet (ofport 0) there is nothing to match or deliver to: only the receive and where
    rules of the MAC are made.

    Raises InvalidInput for facts that cannot be matched (a bad MAC, address or VLAN), a
    symbolic peer missing from `peers`, more rules than the priority range holds, or a rate
    limit on a NIC that has no meter id (see `meter_id`).
    """
    _check_capacity(policy.rules)
    nic = _checked(port)
    resolved = _resolve(policy, peers)
    send = _Side.sending(nic, policy.antispoof, _port_meter(policy, nic))
    receive = _Side.receiving(nic)
    return PortFlows(
        send=_send_flows(policy, nic, send, resolved) if nic.ofport else (),
        receive=_receive_flows(policy, nic, receive, resolved),
        where=(_where(nic),),
    )


def where_rule(port: PortFacts) -> str:
    """A NIC's where rule in `ovs-ofctl` syntax: what its receive rules allow goes to the
    switch's `NORMAL` forwarding, which delivers it to the NIC's port and keeps VLANs apart
    (an explicit output would not, for a sender on another VLAN of the same bridge).

    It depends only on the NIC's VM and MAC, not on the policy or the port: the migration
    method makes it anew to redirect it (`redirect_where`), without reading the switch.
    Raises InvalidInput as `compile_port` does for facts that cannot be matched.
    """
    return _where(_checked(port)).text()


def _where(nic: PortFacts) -> Flow:
    match = (("dl_dst", nic.mac),)
    return Flow(where_cookie(nic.vm_id), WHERE_TABLE, WHERE_PRIORITY, "", match, NORMAL)


_Fields = tuple[tuple[str, str], ...]


def _checked(port: PortFacts) -> PortFacts:
    """The facts with a canonical MAC and addresses, or InvalidInput for what cannot be
    matched."""
    if port.ofport < 0:
        raise InvalidInput(f"switch port {port.ofport} is not a port number")
    if not 0 < port.vlan <= MAX_VLAN:
        raise InvalidInput(f"VLAN {port.vlan} is outside 1-{MAX_VLAN}")
    send_cookie(port.vm_id)
    return replace(
        port,
        mac=normalize_mac(port.mac),
        ipv4=tuple(_address(text, 4) for text in port.ipv4),
        ipv6=tuple(_address(text, 6) for text in port.ipv6),
    )


def _address(text: str, version: int) -> str:
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        address = None
    if address is None or address.version != version:
        raise InvalidInput(f"{text!r} is not an IPv{version} address of the NIC")
    return str(address)


@dataclass(frozen=True)
class _Family:
    """One IP version as ovs-ofctl spells it."""

    version: int
    keywords: Mapping[Protocol, str]
    source: str
    destination: str


_FAMILIES = (
    _Family(
        4,
        {Protocol.ANY: "ip", Protocol.TCP: "tcp", Protocol.UDP: "udp", Protocol.ICMP: "icmp"},
        "nw_src",
        "nw_dst",
    ),
    _Family(
        6,
        {Protocol.ANY: "ipv6", Protocol.TCP: "tcp6", Protocol.UDP: "udp6", Protocol.ICMP6: "icmp6"},
        "ipv6_src",
        "ipv6_dst",
    ),
)


@dataclass(frozen=True)
class _Side:
    """One direction's rules: where they live, what they match first, how the peer is
    matched, what an allowed packet does, and the NIC's own side (anti-spoofing: per IP
    version, the alternatives of source fields a packet must have)."""

    table: int
    cookie: int
    head: _Fields
    peer_field: Mapping[int, str]
    allow: str
    own: Mapping[int, tuple[_Fields, ...]]

    @classmethod
    def sending(cls, nic: PortFacts, antispoof: bool, meter: int | None) -> _Side:
        return cls(
            table=SEND_TABLE,
            cookie=send_cookie(nic.vm_id),
            head=(("in_port", str(nic.ofport)),),
            peer_field={family.version: family.destination for family in _FAMILIES},
            allow=GOTO_RECEIVE if meter is None else f"meter:{meter},{GOTO_RECEIVE}",
            own=_own_sources(nic) if antispoof else _ANYONE,
        )

    @classmethod
    def receiving(cls, nic: PortFacts) -> _Side:
        return cls(
            table=RECEIVE_TABLE,
            cookie=receive_cookie(nic.vm_id),
            head=(("dl_dst", nic.mac),),
            peer_field={family.version: family.source for family in _FAMILIES},
            allow=GOTO_WHERE,
            own=_ANYONE,
        )

    def flow(self, priority: int, protocol: str, match: _Fields, actions: str) -> Flow:
        return Flow(self.cookie, self.table, priority, protocol, self.head + match, actions)

    def verdict(self, action: Action) -> str:
        return self.allow if action is Action.ALLOW else DROP


_ANYONE: Mapping[int, tuple[_Fields, ...]] = {4: ((),), 6: ((),)}


def _own_sources(nic: PortFacts) -> Mapping[int, tuple[_Fields, ...]]:
    """The MAC and one of the NIC's addresses (IPv6: or link-local)."""
    mac = ("dl_src", nic.mac)
    ipv6 = (*nic.ipv6, str(_LINK_LOCAL))
    return {
        4: tuple((mac, ("nw_src", address)) for address in nic.ipv4),
        6: tuple((mac, ("ipv6_src", address)) for address in ipv6),
    }


def _resolve(
    policy: Policy, peers: Mapping[str, Sequence[str]]
) -> dict[str, tuple[_Network, ...] | None]:
    """Each peer of the policy's rules -> its networks; None for `any`."""
    resolved: dict[str, tuple[_Network, ...] | None] = {}
    for rule in policy.rules:
        if rule.peer == ANY_PEER:
            resolved[rule.peer] = None
        elif _is_symbolic(rule.peer):
            if rule.peer not in peers:
                raise InvalidInput(f"peer {rule.peer} of policy {policy.name} is not resolved")
            resolved[rule.peer] = tuple(
                dict.fromkeys(_resolved_network(rule.peer, text) for text in peers[rule.peer])
            )
        else:
            resolved[rule.peer] = (ipaddress.ip_network(rule.peer),)
    return resolved


def _resolved_network(peer: str, text: str) -> _Network:
    try:
        return ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise InvalidInput(f"peer {peer} resolved to {text!r}, not an address or CIDR") from None


def _send_flows(
    policy: Policy, nic: PortFacts, side: _Side, peers: Mapping[str, tuple[_Network, ...] | None]
) -> tuple[Flow, ...]:
    return (
        *_infrastructure(side, _sent_infrastructure(nic, policy.antispoof)),
        *_rules_flows(policy, Direction.EGRESS, side, peers),
        *_send_default(policy, side),
    )


def _receive_flows(
    policy: Policy, nic: PortFacts, side: _Side, peers: Mapping[str, tuple[_Network, ...] | None]
) -> tuple[Flow, ...]:
    return (
        *_delivery(nic, side),
        *_infrastructure(side, _RECEIVED_INFRASTRUCTURE),
        *_rules_flows(policy, Direction.INGRESS, side, peers),
        side.flow(LAST_PRIORITY, "", (), side.verdict(policy.ingress_default)),
    )


def _delivery(nic: PortFacts, side: _Side) -> tuple[Flow, ...]:
    """A packet another host redirected here goes straight to the NIC's port, untagged."""
    if not nic.ofport:
        return ()
    match = (("reg7", "1"), ("dl_vlan", str(nic.vlan)), ("dl_dst", nic.mac))
    actions = f"strip_vlan,output:{nic.ofport}"
    return (Flow(side.cookie, RECEIVE_TABLE, DELIVERY_PRIORITY, "", match, actions),)


def _infrastructure(side: _Side, matches: Iterable[tuple[str, _Fields]]) -> list[Flow]:
    return [
        side.flow(INFRASTRUCTURE_PRIORITY, protocol, match, side.allow)
        for protocol, match in matches
    ]


def _sent_infrastructure(nic: PortFacts, antispoof: bool) -> list[tuple[str, _Fields]]:
    """DHCP as a client, ARP and neighbour discovery; with anti-spoofing only from the MAC,
    and ARP only for the NIC's own IPv4 addresses."""
    source: _Fields = (("dl_src", nic.mac),) if antispoof else ()
    arp: list[_Fields] = (
        [(*source, ("arp_sha", nic.mac), ("arp_spa", ip)) for ip in nic.ipv4] if antispoof else [()]
    )
    return [
        *(
            (p, (*source, ("tp_src", client), ("tp_dst", server)))
            for p, client, server in _DHCP_CLIENT
        ),
        *(("arp", match) for match in arp),
        *(("icmp6", (*source, ("icmp_type", str(kind)))) for kind in _ND_SENT),
    ]


_RECEIVED_INFRASTRUCTURE: tuple[tuple[str, _Fields], ...] = (
    ("arp", ()),
    *((p, (("tp_src", server), ("tp_dst", client))) for p, server, client in _DHCP_SERVER),
    *(("icmp6", (("icmp_type", str(kind)),)) for kind in _ND_RECEIVED),
)


def _rules_flows(
    policy: Policy,
    direction: Direction,
    side: _Side,
    peers: Mapping[str, tuple[_Network, ...] | None],
) -> list[Flow]:
    """The flows of one direction's rules, the first at the highest priority."""
    rules = [rule for rule in policy.rules if rule.direction is direction]
    return [
        flow
        for index, rule in enumerate(rules)
        for flow in _rule_flows(rule, FIRST_RULE_PRIORITY - index, side, peers[rule.peer])
    ]


def _rule_flows(
    rule: Rule, priority: int, side: _Side, networks: tuple[_Network, ...] | None
) -> list[Flow]:
    """One rule as flows: per IP version its protocol has, every combination of the NIC's
    own side, the peer's networks and the port blocks."""
    flows = []
    for family in _FAMILIES:
        protocol = family.keywords.get(rule.protocol)
        if protocol is None:
            continue
        peer_field = side.peer_field[family.version]
        peer_matches: list[_Fields] = (
            [()]
            if networks is None
            else [
                ((peer_field, _network_text(n)),) for n in networks if n.version == family.version
            ]
        )
        flows += [
            side.flow(priority, protocol, own + peer + ports, side.verdict(rule.action))
            for own in side.own[family.version]
            for peer in peer_matches
            for ports in _port_matches(rule.ports)
        ]
    return flows


def _network_text(network: _Network) -> str:
    """A network as dump-flows prints it: a single address without its prefix length."""
    if network.prefixlen == network.max_prefixlen:
        return str(network.network_address)
    return str(network)


def _port_matches(ports: tuple[int, int] | None) -> list[_Fields]:
    if ports is None:
        return [()]
    return [(("tp_dst", _masked(value, mask)),) for value, mask in port_masks(*ports)]


def _masked(value: int, mask: int) -> str:
    return str(value) if mask == MAX_PORT else f"{value:#x}/{mask:#x}"


def _send_default(policy: Policy, side: _Side) -> list[Flow]:
    """The default egress action; with anti-spoofing only for IP from the NIC's own
    addresses, and everything else from the port dropped."""
    if not policy.antispoof:
        return [side.flow(LAST_PRIORITY, "", (), side.verdict(policy.egress_default))]
    allowed = [
        side.flow(DEFAULT_PRIORITY, family.keywords[Protocol.ANY], own, side.allow)
        for family in _FAMILIES
        for own in side.own[family.version]
        if policy.egress_default is Action.ALLOW
    ]
    return [*allowed, side.flow(LAST_PRIORITY, "", (), DROP)]


def meter_id(vm_id: int, nic: int) -> int:
    """The meter of a VM's NIC (`METERS_PER_VM`); InvalidInput when the pair has none."""
    if not 0 <= nic < METERS_PER_VM:
        raise InvalidInput(
            f"NIC {nic} of VM {vm_id} cannot be rate limited: only a VM's first "
            f"{METERS_PER_VM} NICs have a meter"
        )
    meter = vm_id * METERS_PER_VM + nic
    if not METERS_PER_VM <= meter <= MAX_METER:
        raise InvalidInput(
            f"VM id {vm_id} has no meter ids (they end at {MAX_METER}): it cannot be rate limited"
        )
    return meter


def vm_meters(vm_id: int) -> range:
    """Every meter id a VM's NICs may have, to find or remove them all on a switch."""
    first = vm_id * METERS_PER_VM
    return range(first, first + METERS_PER_VM)


def meter_vm(meter: int) -> int | None:
    """The VM a meter id belongs to; None for the operator's own ids (below 100)."""
    return meter // METERS_PER_VM or None


def port_meters(policy: Policy, port: PortFacts) -> tuple[str, ...]:
    """The meters the send rules of `policy` on one NIC use, in `ovs-ofctl add-meter`
    syntax as the switch prints them back: none without a rate limit, else one that drops
    what exceeds the rate, after a burst (`BURST_FRACTION`).

    It does not depend on the port: the NIC keeps the same meter on every host. Raises
    InvalidInput as `meter_id` does, for a rate limited NIC only.
    """
    rate = policy.rate_limit_kbps
    if rate is None:
        return ()
    meter = meter_id(port.vm_id, port.nic)
    burst = max(rate // BURST_FRACTION, MIN_BURST_KBITS)
    return (f"meter={meter},kbps,burst,bands=type=drop,rate={rate},burst_size={burst}",)


def _port_meter(policy: Policy, port: PortFacts) -> int | None:
    """The id of the NIC's meter, if the policy limits its rate."""
    if policy.rate_limit_kbps is None:
        return None
    return meter_id(port.vm_id, port.nic)


def port_masks(low: int, high: int) -> tuple[tuple[int, int], ...]:
    """(value, mask) pairs whose matches together cover exactly the ports low..high: an
    OpenFlow match is a value under a mask, not a range."""
    if not 0 <= low <= high <= MAX_PORT:
        raise InvalidInput(f"ports {low}-{high} are not a range within 0-{MAX_PORT}")
    blocks = []
    while low <= high:
        size = low & -low or MAX_PORT + 1
        while size > high - low + 1:
            size >>= 1
        blocks.append((low, MAX_PORT & ~(size - 1)))
        low += size
    return tuple(blocks)


def base_pipeline(peer_ports: Iterable[int]) -> tuple[Flow, ...]:
    """The rules of a bridge that make the three tables one pipeline, and make a packet from
    a peer link reach only the NIC it was redirected to. What a where rule does not take (a
    packet of another VLAN while the VM is redirected) goes to `NORMAL`, as everything does
    that no VM's policy concerns."""
    cookie = BASE_KIND << VM_ID_BITS
    ports = sorted(set(peer_ports))
    if any(port <= 0 for port in ports):
        raise InvalidInput(f"peer link ports {ports} are not all port numbers")
    mark = f"load:1->NXM_NX_REG7[],{GOTO_RECEIVE}"
    return (
        Flow(cookie, SEND_TABLE, BASE_PRIORITY, "", (), GOTO_RECEIVE),
        *(Flow(cookie, SEND_TABLE, PEER_PRIORITY, "", (("in_port", str(p)),), mark) for p in ports),
        Flow(cookie, RECEIVE_TABLE, PEER_DROP_PRIORITY, "", (("reg7", "1"),), DROP),
        Flow(cookie, RECEIVE_TABLE, BASE_PRIORITY, "", (), NORMAL),
        Flow(cookie, WHERE_TABLE, BASE_PRIORITY, "", (), NORMAL),
    )


def base_flows(peer_ports: Iterable[int]) -> list[str]:
    """`base_pipeline` in `ovs-ofctl` syntax."""
    return [flow.text() for flow in base_pipeline(peer_ports)]


# Rewrites of the migration method --------------------------------------------------------

# A field starts the text or follows a comma or a blank. Each pattern starts with its
# field's name, so that a search skips to it as fast as a plain find (a migration rewrites
# thousands of rules while the VM waits), and the lookbehind after the name checks that it
# starts a field.
_ACTIONS_AT = re.compile(r"actions=(?<![^,\s]actions=)")
_IN_PORT = re.compile(r"in_port=(?<![^,\s]in_port=)(\d+)(?=[,\s]|$)")
_DELIVERY = re.compile(r"reg7=(?<![^,\s]reg7=)(?:1|0x1)(?=[,\s]|$)")
_REDIRECT_FIELDS = re.compile(
    r"[,\s]*\b(?:dl_vlan=\d+|vlan_tci=0x0+(?:/0x1fff)?|in_port=\d+)(?=[,\s]|$)"
)
_OUTPUT = re.compile(r"\boutput:\d+$")
_REDIRECTED = re.compile(
    r"(?:mod_vlan_vid:\d+,|push_vlan:0x8100,set_field:\d+->vlan_vid,)?output:\d+"
)


def retarget_send(flows: Iterable[str], new_port: int) -> list[str]:
    """Send rules moved to another port of a VM (its port on the destination host): each
    `in_port` becomes `new_port`, nothing else changes."""
    return [
        _IN_PORT.sub(f"in_port={new_port}", match) + actions
        for match, actions in map(_split, flows)
    ]


def in_port_of(flow: str) -> int | None:
    """The port a send rule matches (`in_port`), to tell one NIC's send rules from another's
    of the same VM: dump-flows prints the field anywhere in the match, followed by a comma
    or by the space before `actions=`."""
    found = _IN_PORT.search(_split(flow)[0])
    return None if found is None else int(found[1])


def redirect_where(
    flows: Iterable[str], vlan: int, peer_port: int, neighbours: Iterable[int]
) -> list[str]:
    """Where rules of a VM that left, so what its receive rules allow reaches it through the
    peer link `peer_port` toward its new host, tagged with its VLAN; every other rule (its
    receive rules, which end in `goto_table:2`, `drop` or the delivery's output) passes
    untouched: the receive rules still decide, only where their packets go changes.

    Each where rule becomes several: a packet tagged with the VLAN (from a trunk) goes out
    as it is; an untagged one gets the tag pushed, but only from `neighbours`, the local
    ports on the VM's VLAN: an untagged packet carries no VLAN to match, and one from a port
    of another VLAN must not be let into the VM's. A single `mod_vlan_vid` would not do:
    given to the switch as OpenFlow 1.1+ (a bundle) it becomes an unconditional push, which
    would tag a tagged packet twice. A packet tagged with another VLAN matches none (the
    base rule gives it to `NORMAL`, which keeps VLANs apart).
    """
    ports = sorted(set(neighbours))
    redirected = []
    for match, actions in map(_split, flows):
        if actions != NORMAL:
            redirected.append(match + actions)
            continue
        redirected.append(_with_field(match, f"dl_vlan={vlan}") + f"output:{peer_port}")
        redirected += [
            _with_field(_with_field(match, f"in_port={port}"), UNTAGGED)
            + f"mod_vlan_vid:{vlan},output:{peer_port}"
            for port in ports
        ]
    return redirected


def retarget_receive(flows: Iterable[str], new_port: int) -> list[str]:
    """Receive and where rules of a VM back on a port of this host: the delivery rule outputs
    to `new_port`, where rules that `redirect_where` redirected end in `NORMAL` again, and
    the other receive rules stay as they are."""
    restored: dict[str, None] = {}
    for match, actions in map(_split, flows):
        if _DELIVERY.search(match):
            text = match + _OUTPUT.sub(f"output:{new_port}", actions)
        elif _REDIRECTED.fullmatch(actions):
            text = _REDIRECT_FIELDS.sub("", match) + NORMAL
        else:
            text = match + actions
        restored[text] = None
    return list(restored)


def _split(flow: str) -> tuple[str, str]:
    """(everything up to and including `actions=`, the actions) of a flow text."""
    found = _ACTIONS_AT.search(flow)
    if found is None:
        raise InvalidInput(f"flow {flow!r} has no actions")
    return flow[: found.end()], flow[found.end() :].strip()


def _with_field(match: str, term: str) -> str:
    """`match` (ending in its separator and `actions=`) with one more field."""
    body = match.removesuffix("actions=")
    kept = body.rstrip(", \t")
    return f"{kept},{term}{body[len(kept) :]}actions="
