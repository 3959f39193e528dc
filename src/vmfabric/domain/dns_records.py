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
from vmfabric.domain.names import check_name

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

BLOCKED_MARK = "vmfabric-blocked"
"""First character-string of the TXT record of a blocked group."""

REASON_PREFIX = "reason="
"""Start of the second character-string of that TXT record."""

_MAX_LABEL = 63
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
    """The forward zone of the registrations, with the TXT marks of the blocked groups.

    Raises InvalidInput for a VM, host or image name that is not a DNS label, or an address
    that is not an IP address: registrations come from the store, where both were checked, so
    this is a bug to report rather than a record to skip.
    """
    zone = absolute(origin)
    records = _Records()
    host_groups: dict[str, set[str]] = {}
    group_vms: dict[str, set[str]] = {}
    for registration in registrations:
        vm = _label("VM", registration.vm)
        host = _label("host", registration.host)
        image = _label("image", registration.image)
        group = group_name(host, image)
        addresses = [_canonical(text) for text in registration.addresses]
        records.add_addresses(_child(vm, zone), addresses)
        if not _fits(group, zone):
            continue
        records.add_addresses(_child(group, zone), addresses)
        host_groups.setdefault(host, set()).add(group)
        group_vms.setdefault(group, set()).add(vm)
    for host, groups in host_groups.items():
        owner = _child(f"_vmgroups._udp.{host}", zone)
        records.add_texts(owner, "SRV", (_SRV_PREFIX + _child(g, zone) for g in groups))
    for group, vms in group_vms.items():
        owner = _child(f"_vms._udp.{group}", zone)
        records.add_texts(owner, "SRV", (_SRV_PREFIX + _child(vm, zone) for vm in vms))
    for group, reason in blocked.items():
        if _is_label(group) and _fits(group, zone):
            records.add_texts(_child(group, zone), "TXT", [blocked_txt(reason)])
    return ZoneContent(zone, records.frozen())


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
    zone = absolute(origin)
    networks = [_network(cidr) for cidr in cidrs]
    zone_networks: dict[str, IPNetwork] = {}
    for network in networks:
        step = 8 if network.version == 4 else 4
        rounded = network.supernet(new_prefix=network.prefixlen - network.prefixlen % step)
        zone_networks.setdefault(reverse_zone_name(network), rounded)
    kept = {
        name: net
        for name, net in zone_networks.items()
        if not any(_strictly_inside(net, other) for other in zone_networks.values())
    }
    records = {name: _Records() for name in kept}
    zone_of = _zone_finder(tuple(networks), tuple(kept.items()))
    for registration in registrations:
        target = _child(_label("VM", registration.vm), zone)
        for text in registration.addresses:
            where = zone_of(_canonical(text)[1])
            if where is not None:
                records[where[0]].add_texts(where[1], "PTR", [target])
    return [ZoneContent(name, records[name].frozen()) for name in sorted(kept)]


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


def _is_label(text: str) -> bool:
    try:
        check_name("group", text)
    except InvalidInput:
        return False
    return True


def _child(relative: str, zone: str) -> str:
    return f"{relative}." if zone == "." else f"{relative}.{zone}"


@functools.lru_cache(maxsize=1 << 14)
def _fits(relative: str, zone: str) -> bool:
    """True if `_vms._udp.<relative>.<zone>` (the longest name made of it) is a valid name."""
    longest = _child(f"_vms._udp.{relative}", zone)
    labels = [label for label in longest.split(".") if label]
    wire = sum(len(label) + 1 for label in labels) + 1
    return all(len(label) <= _MAX_LABEL for label in labels) and wire <= _MAX_NAME_WIRE


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


class _Records:
    """Records being gathered: sets, so that duplicates go away; frozen sorted at the end."""

    def __init__(self) -> None:
        self.v4: dict[str, set[str]] = {}
        self.v6: dict[str, set[str]] = {}
        self.texts: dict[str, dict[str, set[str]]] = {}

    def add_addresses(self, owner: str, addresses: Iterable[tuple[int, str]]) -> None:
        """Addresses as (version, canonical text)."""
        for version, text in addresses:
            (self.v4 if version == 4 else self.v6).setdefault(owner, set()).add(text)

    def add_texts(self, owner: str, rdtype: str, texts: Iterable[str]) -> None:
        self.texts.setdefault(owner, {}).setdefault(rdtype, set()).update(texts)

    def frozen(self) -> dict[str, dict[str, tuple[str, ...]]]:
        """Owner -> type -> sorted texts; types in order (A and AAAA sort before the others)."""
        result: dict[str, dict[str, tuple[str, ...]]] = {}
        v4, v6, texts = self.v4, self.v6, self.texts
        for owner in sorted(v4.keys() | v6.keys() | texts.keys()):
            types: dict[str, tuple[str, ...]] = {}
            for rdtype, found in (("A", v4.get(owner)), ("AAAA", v6.get(owner))):
                if found:
                    types[rdtype] = tuple(sorted(found, key=_value) if len(found) > 1 else found)
            other = texts.get(owner)
            if other:
                for rdtype in sorted(other):
                    types[rdtype] = tuple(sorted(other[rdtype]))
            result[owner] = types
        return result


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
