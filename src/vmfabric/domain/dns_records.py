"""DNS records of the VM registrations: what the authoritative server serves, as plain text.

Registrations (VM name, host, image, addresses) become the names of the spec (`SPEC.md`,
"Interfaces that stay stable" -> DNS) in a forward zone, and PTR records in reverse zones.
Everything here is pure: the server turns the texts into wire records, so the rules can be
tested (and property-tested) without a socket.

The forward zone (`<zone>` is its origin, e.g. `vmfabric.test.`):

- `<vm>.<zone>` A/AAAA: the VM's registered addresses. A VM without addresses has none.
- `<host>-<image>.<zone>` A/AAAA: the group; every address of that host's VMs of that image.
- `_vmgroups._udp.<host>.<zone>` SRV `0 0 0 <host>-<image>.<zone>.`: one per group of the host.
- `_vms._udp.<host>-<image>.<zone>` SRV `0 0 0 <vm>.<zone>.`: one per VM of the group, also for
  a VM without addresses (it is a member, it just cannot be reached yet). Such a VM's own name
  has no record, so it does not exist in DNS (NXDOMAIN): a name exists only through records
  (or names below it), which is what a secondary transferring the zone sees too.
- A blocked group gets a TXT record on its group name, `"vmfabric-blocked" "reason=<why>"`:
  the first character-string says what it is, the second starts with `reason=`; a reason
  longer than one character-string holds (255 bytes with the prefix) goes on in further
  strings, to be concatenated. Bytes outside printable ASCII are written `\\DDD`, `"` and `\\`
  are escaped, so the text is valid zone-file syntax. The TXT is published for every blocked
  group given, members or not: a group blocked before its first VM joins is visible as such
  (a key that is not a DNS label cannot be a group name and is left out).

A VM named like a group (VM `hv1-debian12` next to host `hv1` running image `debian12`) shares
the name: its A/AAAA set is the union of the VM's and the group's addresses. DNS has one record
set per name and type, and refusing a valid VM name because of a group that may appear later
would be worse; the SRV records still tell the group (`_vms._udp.<name>`) from the VM.

A name that DNS cannot carry is left out rather than failing the whole zone: a group name is
two labels joined by `-`, so a 63-character host with a 63-character image makes a 127-character
label, longer than the 63 a label may have. Its group A/AAAA, SRV and TXT are skipped (the VM
names still resolve); names are checked against label (63) and name (255 octets) limits.

Reverse zones are named on the octet (IPv4, `in-addr.arpa.`) or nibble (IPv6, `ip6.arpa.`)
boundary at or above the network's prefix: the prefix is rounded down, so 10.0.0.0/20 is served
by `0.10.in-addr.arpa.` (the /16), 10.1.2.0/26 by `2.1.10.in-addr.arpa.` and 2001:db8::/62
by the /60 zone `0.0.0.0.0.0.0.8.b.d.0.1.0.0.2.ip6.arpa.`. Only the addresses inside the
given networks get a PTR, even where the zone is wider. Networks that round to the same zone
share it; a zone that would sit inside another zone of the list is not made (the wider one
holds its PTRs), so one server never serves a zone and a child of it without delegation.
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from vmfabric.domain.errors import InvalidInput
from vmfabric.domain.names import MAX_LABEL, check_name, is_label

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

BLOCKED_MARK = "vmfabric-blocked"
"""First character-string of the TXT record of a blocked group."""

REASON_PREFIX = "reason="
"""Start of the second character-string of that TXT record."""


_MAX_NAME_WIRE = 255
_MAX_TXT_STRING = 255
_SRV_PREFIX = "0 0 0 "


@dataclass(frozen=True)
class Registration:
    """A VM's registration with the name service: where it runs, from which image, its IPs."""

    vm: str
    host: str
    image: str
    addresses: tuple[str, ...]


@dataclass(frozen=True)
class ZoneContent:
    """The records of one zone, apart from SOA and NS (the server adds those).

    `records` maps an absolute owner name to rdtype text ("A", "SRV", ...) to rdata texts,
    without duplicates and sorted (addresses by value, other data as text).
    """

    origin: str
    records: Mapping[str, Mapping[str, tuple[str, ...]]]


def group_name(host: str, image: str) -> str:
    """The group of a host's VMs of one image: one name to act on all of them at once."""
    return f"{host}-{image}"


def absolute(origin: str) -> str:
    """Lower-case absolute form of a zone name (`vmfabric.test` -> `vmfabric.test.`).

    Callers may spell the zone either way (the CLI takes `--zone vmfabric.test`).
    """
    text = origin.strip().lower()
    if text in {"", "."}:
        return "."
    return text if text.endswith(".") else f"{text}."


def forward_zone(
    origin: str, registrations: Iterable[Registration], blocked: Mapping[str, str]
) -> ZoneContent:
    """The forward zone of the registrations (one per VM), with the TXT marks of the blocked
    groups.

    Raises InvalidInput for a VM, host or image name that is not a DNS label, or an address
    that is not an IP address: registrations come from the store, where both were checked, so
    this is a bug to report rather than a record to skip.
    """
    builder = ZoneBuilder(origin, ())
    for registration in registrations:
        builder.put(registration)
    for group, reason in blocked.items():
        builder.block(group, reason)
    return builder.contents()[0]


def blocked_txt(reason: str) -> str:
    """TXT rdata text marking a group blocked, carrying the operator's reason.

    Firewalls and scanners read it from DNS, so the format is fixed (module docstring).
    """
    rest = (REASON_PREFIX + reason).encode()
    chunks = [rest[i : i + _MAX_TXT_STRING] for i in range(0, len(rest), _MAX_TXT_STRING)]
    return " ".join(_quoted(part) for part in [BLOCKED_MARK.encode(), *chunks])


def parse_blocked_txt(strings: Sequence[bytes]) -> str | None:
    """The reason in a TXT record's character-strings, or None if it is not a block mark.

    The inverse of `blocked_txt`, for consumers and tests.
    """
    if len(strings) < 2 or strings[0] != BLOCKED_MARK.encode():
        return None
    rest = b"".join(strings[1:])
    if not rest.startswith(REASON_PREFIX.encode()):
        return None
    return rest[len(REASON_PREFIX) :].decode(errors="replace")


def reverse_zone_name(network: IPNetwork) -> str:
    """Name of the reverse zone serving `network`: its prefix rounded down to 8 or 4 bits.

    Reverse names can only be delegated on those boundaries, so a /20 is served by its /16.
    """
    if network.version == 4:
        digits = [str(octet) for octet in network.network_address.packed]
        kept, suffix = network.prefixlen // 8, "in-addr.arpa."
    else:
        digits = list(network.network_address.exploded.replace(":", ""))
        kept, suffix = network.prefixlen // 4, "ip6.arpa."
    return "".join(f"{digit}." for digit in reversed(digits[:kept])) + suffix


def reverse_zones(
    origin: str, cidrs: Iterable[str], registrations: Iterable[Registration]
) -> list[ZoneContent]:
    """Reverse zones of the networks, with a PTR to `<vm>.<origin>` for each address in them.

    Every zone of the networks is returned, also when empty, so the server answers NXDOMAIN
    (not REFUSED) for an unregistered address of a known network. Sorted by zone name.
    """
    builder = ZoneBuilder(origin, cidrs)
    for registration in registrations:
        builder.put(registration)
    return builder.contents()[1:]


@dataclass(frozen=True)
class ZoneChange:
    """What changed in one zone: the new records of each changed set, `()` for a set gone.

    `records` maps (absolute owner, rdtype text) to the sorted rdata texts, as in ZoneContent.
    """

    origin: str
    records: Mapping[tuple[str, str], tuple[str, ...]]


_SetKey = tuple[str, str, str]  # zone, owner, rdtype
_Fact = tuple[str, str, str, str]  # zone, owner, rdtype, rdata text


class ZoneBuilder:
    """The forward and reverse zones of registrations that come and go one at a time.

    Each registration (and each block) contributes records; a record set holds a record while
    any contribution has it, so a group's address set is the union of its VMs' without being
    recomputed. Changing one registration costs what that registration contributes, not the
    size of the zones, and `changes` tells exactly which record sets it changed: a server
    that applies them keeps up with thousands of VMs at the price of the few that changed.
    """

    def __init__(self, origin: str, cidrs: Iterable[str]) -> None:
        """Zones of `origin` and of the reverse zones of these networks (fixed for its life)."""
        self.origin = absolute(origin)
        networks = tuple(_network(cidr) for cidr in cidrs)
        reverse = _reverse_layout(networks)
        self.origins = (self.origin, *sorted(reverse))
        self._zone_of = _zone_finder(networks, tuple(reverse.items()))
        self._sets: dict[_SetKey, dict[str, int]] = {}
        self._contributed: dict[tuple[str, str], frozenset[_Fact]] = {}
        self._registrations: dict[str, Registration] = {}
        self._touched: set[_SetKey] = set()

    def registration(self, vm: str) -> Registration | None:
        """The registration the zones hold for a VM, if any."""
        return self._registrations.get(vm)

    def vms(self) -> set[str]:
        """The VMs registered."""
        return set(self._registrations)

    def put(self, registration: Registration) -> None:
        """Register a VM, or replace its registration (new addresses, host or image).

        Raises InvalidInput as `forward_zone` does, changing nothing.
        """
        facts = self._facts(registration)
        self._contribute(("vm", registration.vm), facts)
        self._registrations[registration.vm] = registration

    def remove(self, vm: str) -> None:
        """Take a VM's registration out of the zones (nothing happens if it has none)."""
        self._contribute(("vm", vm), frozenset())
        self._registrations.pop(vm, None)

    def block(self, group: str, reason: str) -> None:
        """Mark a group blocked in DNS (its TXT record); a key that is not a group name is
        left out."""
        facts: frozenset[_Fact] = frozenset()
        if is_label(group) and _fits(group, self.origin):
            owner = _child(group, self.origin)
            facts = frozenset({(self.origin, owner, "TXT", blocked_txt(reason))})
        self._contribute(("block", group), facts)

    def unblock(self, group: str) -> None:
        """Take a group's block mark out of DNS."""
        self._contribute(("block", group), frozenset())

    def contents(self) -> list[ZoneContent]:
        """Every zone whole: the forward zone first, then the reverse zones by name."""
        gathered: dict[str, dict[str, dict[str, tuple[str, ...]]]] = {o: {} for o in self.origins}
        for (zone, owner, rdtype), texts in self._sets.items():
            gathered[zone].setdefault(owner, {})[rdtype] = _sorted(rdtype, texts)
        return [
            ZoneContent(
                origin, {owner: _in_type_order(records[owner]) for owner in sorted(records)}
            )
            for origin, records in gathered.items()
        ]

    def changes(self) -> list[ZoneChange]:
        """The record sets changed since the last call, by zone in `origins` order (zones
        without change left out); then starts counting afresh."""
        by_zone: dict[str, dict[tuple[str, str], tuple[str, ...]]] = {}
        for key in sorted(self._touched):
            zone, owner, rdtype = key
            texts = self._sets.get(key)
            by_zone.setdefault(zone, {})[(owner, rdtype)] = _sorted(rdtype, texts or {})
        self._touched.clear()
        return [ZoneChange(zone, by_zone[zone]) for zone in self.origins if zone in by_zone]

    def _facts(self, registration: Registration) -> frozenset[_Fact]:
        zone = self.origin
        vm = _label("VM", registration.vm)
        host = _label("host", registration.host)
        image = _label("image", registration.image)
        addresses = [_canonical(text) for text in registration.addresses]
        vm_name = _child(vm, zone)
        facts: set[_Fact] = {(zone, vm_name, _address_type(v), a) for v, a in addresses}
        group = group_name(host, image)
        if _fits(group, zone):
            group_owner = _child(group, zone)
            facts.update((zone, group_owner, _address_type(v), a) for v, a in addresses)
            host_srv = _child(f"_vmgroups._udp.{host}", zone)
            facts.add((zone, host_srv, "SRV", _SRV_PREFIX + group_owner))
            facts.add((zone, _child(f"_vms._udp.{group}", zone), "SRV", _SRV_PREFIX + vm_name))
        for _version, address in addresses:
            where = self._zone_of(address)
            if where is not None:
                facts.add((where[0], where[1], "PTR", vm_name))
        return frozenset(facts)

    def _contribute(self, key: tuple[str, str], facts: frozenset[_Fact]) -> None:
        before = self._contributed.get(key, frozenset())
        for zone, owner, rdtype, text in before - facts:
            set_key = (zone, owner, rdtype)
            texts = self._sets[set_key]
            texts[text] -= 1
            if not texts[text]:
                del texts[text]
                self._touched.add(set_key)
                if not texts:
                    del self._sets[set_key]
        for zone, owner, rdtype, text in facts - before:
            set_key = (zone, owner, rdtype)
            texts = self._sets.setdefault(set_key, {})
            texts[text] = texts.get(text, 0) + 1
            if texts[text] == 1:
                self._touched.add(set_key)
        if facts:
            self._contributed[key] = facts
        else:
            self._contributed.pop(key, None)


def _reverse_layout(networks: Sequence[IPNetwork]) -> dict[str, IPNetwork]:
    """Reverse zone name -> the network it covers, for the networks; nested zones merged."""
    zone_networks: dict[str, IPNetwork] = {}
    for network in networks:
        step = 8 if network.version == 4 else 4
        rounded = network.supernet(new_prefix=network.prefixlen - network.prefixlen % step)
        zone_networks.setdefault(reverse_zone_name(network), rounded)
    return {
        name: net
        for name, net in zone_networks.items()
        if not any(_strictly_inside(net, other) for other in zone_networks.values())
    }


def _address_type(version: int) -> str:
    return "A" if version == 4 else "AAAA"


def _sorted(rdtype: str, texts: Iterable[str]) -> tuple[str, ...]:
    """Record texts in zone order: addresses by value, other data as text."""
    if rdtype in ("A", "AAAA"):
        return tuple(sorted(texts, key=_value))
    return tuple(sorted(texts))


def _in_type_order(types: Mapping[str, tuple[str, ...]]) -> dict[str, tuple[str, ...]]:
    """A and AAAA first, then the other types by name."""
    order = sorted(types, key=lambda rdtype: (rdtype not in ("A", "AAAA"), rdtype))
    return {rdtype: types[rdtype] for rdtype in order}


@functools.lru_cache(maxsize=1 << 16)
def _canonical(text: str) -> tuple[int, str]:
    """IP version and canonical text of an address, cached: zones are rebuilt from mostly the
    same addresses, and texts hash and compare much faster than `ipaddress` objects."""
    try:
        address = ipaddress.ip_address(text.strip())
    except ValueError:
        raise InvalidInput(f"invalid IP address {text!r} in a registration") from None
    if isinstance(address, ipaddress.IPv6Address) and address.scope_id is not None:
        raise InvalidInput(f"invalid IP address {text!r}: a zone index has no place in DNS")
    return address.version, str(address)


@functools.lru_cache(maxsize=1 << 16)
def _value(canonical: str) -> int:
    """The number of an address (in canonical text), to sort addresses by value."""
    return int(ipaddress.ip_address(canonical))


@functools.lru_cache(maxsize=1 << 16)
def _label(kind: str, name: str) -> str:
    return check_name(kind, name)


@functools.lru_cache(maxsize=1 << 16)
def _pointer(address: IPAddress) -> str:
    return f"{address.reverse_pointer}."


def _network(text: str) -> IPNetwork:
    try:
        return ipaddress.ip_network(text.strip(), strict=False)
    except ValueError:
        raise InvalidInput(f"invalid network {text!r}: expected a CIDR like 10.0.0.0/24") from None


def _child(relative: str, zone: str) -> str:
    return f"{relative}." if zone == "." else f"{relative}.{zone}"


@functools.lru_cache(maxsize=1 << 14)
def _fits(relative: str, zone: str) -> bool:
    """True if `_vms._udp.<relative>.<zone>` (the longest name made of it) is a valid name."""
    longest = _child(f"_vms._udp.{relative}", zone)
    labels = [label for label in longest.split(".") if label]
    wire = sum(len(label) + 1 for label in labels) + 1
    return all(len(label) <= MAX_LABEL for label in labels) and wire <= _MAX_NAME_WIRE


@functools.lru_cache(maxsize=8)
def _zone_finder(
    networks: tuple[IPNetwork, ...], zones: tuple[tuple[str, IPNetwork], ...]
) -> _ZoneOf:
    """The same finder for the same networks, so that its memory lasts across rebuilds."""
    return _ZoneOf(networks, zones)


class _ZoneOf:
    """Which reverse zone (and owner name) an address gets, remembered per address.

    The same addresses come back at every rebuild, and testing each against every network
    is most of the cost of a rebuild. The memory is bounded: emptied when it gets large.
    """

    limit = 1 << 17

    def __init__(
        self, networks: tuple[IPNetwork, ...], zones: tuple[tuple[str, IPNetwork], ...]
    ) -> None:
        self.networks = networks
        self.zones = zones
        self.found: dict[str, tuple[str, str] | None] = {}

    def __call__(self, canonical: str) -> tuple[str, str] | None:
        if canonical in self.found:
            return self.found[canonical]
        address = ipaddress.ip_address(canonical)
        where = None
        if any(address in network for network in self.networks):
            for name, net in self.zones:
                if address in net:
                    where = (name, _pointer(address))
                    break
        if len(self.found) >= self.limit:
            self.found.clear()
        self.found[canonical] = where
        return where


def _strictly_inside(inner: IPNetwork, outer: IPNetwork) -> bool:
    return (
        inner.version == outer.version
        and inner.prefixlen > outer.prefixlen
        and int(outer.network_address) <= int(inner.network_address)
        and int(inner.broadcast_address) <= int(outer.broadcast_address)
    )


def _quoted(raw: bytes) -> str:
    out = []
    for byte in raw:
        if byte in {0x22, 0x5C}:
            out.append("\\" + chr(byte))
        elif 0x20 <= byte <= 0x7E:
            out.append(chr(byte))
        else:
            out.append(f"\\{byte:03d}")
    return '"' + "".join(out) + '"'
