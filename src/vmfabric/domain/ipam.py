"""IP address management rules: what a subnet can hand out and how free space is kept.

Free space is a set of disjoint address ranges. Taking or releasing one address touches at most
two ranges, so allocation costs the same in an empty and in a nearly full subnet (the store
keeps the ranges in an indexed table and finds the right one with one index lookup).
Addresses are compared as integers; the store writes them as fixed-width hex keys so that
IPv4 and IPv6 sort correctly as text.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from vmfabric.domain.errors import InvalidInput
from vmfabric.domain.model import Ipv6Mode

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

_MAX_V4_PREFIX = 29
_MAX_V6_PREFIX = 120
_SLAAC_PREFIX = 64


def address_key(value: int) -> str:
    """Fixed-width text form of an address that sorts like the number."""
    return f"{value:032x}"


def key_value(key: str) -> int:
    """Inverse of `address_key`."""
    return int(key, 16)


@dataclass(frozen=True, order=True)
class AddressRange:
    """An inclusive range of addresses, as integers."""

    first: int
    last: int

    def __post_init__(self) -> None:
        if self.first > self.last:
            raise ValueError(f"empty range {self.first}-{self.last}")

    def __contains__(self, value: object) -> bool:
        return isinstance(value, int) and self.first <= value <= self.last

    @property
    def size(self) -> int:
        """Number of addresses in the range."""
        return self.last - self.first + 1

    def without(self, value: int) -> tuple[AddressRange, ...]:
        """What is left of this range once `value` is taken (zero, one or two ranges)."""
        if value not in self:
            raise ValueError(f"{value} is not in {self}")
        left = (AddressRange(self.first, value - 1),) if value > self.first else ()
        right = (AddressRange(value + 1, self.last),) if value < self.last else ()
        return left + right


def released(value: int, left: AddressRange | None, right: AddressRange | None) -> AddressRange:
    """The range that results from freeing `value` between its free neighbours, if any.

    `left` must end at value-1 and `right` start at value+1; the caller found them with one
    index lookup each and replaces all three with the result.
    """
    if left is not None and left.last != value - 1:
        raise ValueError("left neighbour does not touch the released address")
    if right is not None and right.first != value + 1:
        raise ValueError("right neighbour does not touch the released address")
    first = left.first if left is not None else value
    last = right.last if right is not None else value
    return AddressRange(first, last)


def subtract(whole: AddressRange, holes: Iterable[AddressRange]) -> list[AddressRange]:
    """`whole` minus every hole, as sorted disjoint ranges."""
    result: list[AddressRange] = []
    cursor = whole.first
    for hole in sorted(holes):
        if hole.last < cursor or hole.first > whole.last:
            continue
        if hole.first > cursor:
            result.append(AddressRange(cursor, hole.first - 1))
        cursor = max(cursor, hole.last + 1)
    if cursor <= whole.last:
        result.append(AddressRange(cursor, whole.last))
    return result


def parse_address(text: str) -> IPAddress:
    """An IPv4 or IPv6 address, or InvalidInput naming the bad text."""
    try:
        return ipaddress.ip_address(text.strip())
    except ValueError:
        raise InvalidInput(f"invalid IP address {text!r}") from None


def parse_network(text: str) -> IPNetwork:
    """A subnet in CIDR form with no host bits set; the error suggests the right form."""
    try:
        return ipaddress.ip_network(text.strip())
    except ValueError:
        pass
    try:
        suggestion = ipaddress.ip_network(text.strip(), strict=False)
    except ValueError:
        raise InvalidInput(
            f"invalid CIDR {text!r}: expected e.g. 10.0.0.0/24 or fd00::/64"
        ) from None
    raise InvalidInput(f"CIDR {text!r} has host bits set; did you mean {suggestion}?")


def parse_range(text: str) -> tuple[IPAddress, IPAddress]:
    """`FIRST-LAST` (or a single address) as two addresses of one family, FIRST ≤ LAST."""
    first_text, _, last_text = text.partition("-")
    first = parse_address(first_text)
    last = parse_address(last_text) if last_text else first
    if first.version != last.version or int(first) > int(last):
        raise InvalidInput(f"invalid range {text!r}: expected FIRST-LAST with FIRST <= LAST")
    return first, last


@dataclass(frozen=True)
class SubnetPlan:
    """A subnet with the addresses it must never hand to a VM."""

    network: IPNetwork
    gateway: IPAddress | None
    dhcp_server: IPAddress | None
    reserved: tuple[AddressRange, ...]
    ipv6_mode: Ipv6Mode | None

    @property
    def version(self) -> int:
        """4 or 6."""
        return self.network.version

    @property
    def usable(self) -> AddressRange:
        """Addresses a host may have: all but the network address (and broadcast on IPv4)."""
        first = int(self.network.network_address) + 1
        last = int(self.network.broadcast_address) - (1 if self.version == 4 else 0)
        return AddressRange(first, last)

    @property
    def auto_assigned(self) -> bool:
        """False for SLAAC subnets, where a VM's address derives from its MAC."""
        return self.ipv6_mode != Ipv6Mode.SLAAC

    def excluded(self) -> list[AddressRange]:
        """Usable addresses that are nevertheless not for VMs."""
        fixed = [a for a in (self.gateway, self.dhcp_server) if a is not None]
        return [AddressRange(int(a), int(a)) for a in fixed] + list(self.reserved)

    def initial_free(self) -> list[AddressRange]:
        """The free ranges of the subnet before any VM takes an address."""
        if not self.auto_assigned:
            return []
        return subtract(self.usable, self.excluded())

    def capacity(self) -> int:
        """How many VM addresses the subnet holds when empty."""
        if not self.auto_assigned:
            return self.usable.size
        return sum(r.size for r in self.initial_free())

    def refusal(self, address: IPAddress) -> str | None:
        """Why `address` cannot be given to a VM in this subnet, or None if it can."""
        if address not in self.network:
            return f"{address} is outside the subnet {self.network}"
        value = int(address)
        if value == int(self.network.network_address):
            return f"{address} is the network address of {self.network}"
        if self.version == 4 and value == int(self.network.broadcast_address):
            return f"{address} is the broadcast address of {self.network}"
        if address == self.gateway:
            return f"{address} is the gateway of {self.network}"
        if address == self.dhcp_server:
            return f"{address} is the DHCP server address of {self.network}"
        for block in self.reserved:
            if value in block:
                return (
                    f"{address} is in the reserved range "
                    f"{_text(self.version, block.first)}-{_text(self.version, block.last)}"
                )
        return None


def _text(version: int, value: int) -> str:
    return str(ipaddress.IPv4Address(value) if version == 4 else ipaddress.IPv6Address(value))


def address_text(version: int, value: int) -> str:
    """Printable form of an address given as an integer."""
    return _text(version, value)


def plan_subnet(
    cidr: str,
    gateway: IPAddress | None = None,
    reserved: Sequence[tuple[IPAddress, IPAddress]] = (),
    ipv6_mode: Ipv6Mode = Ipv6Mode.SLAAC,
) -> SubnetPlan:
    """Check a subnet the operator asked for and fill in its defaults.

    The gateway defaults to the first usable address; the DHCP server takes the last usable
    address (IPv4 and DHCPv6 subnets), so an operator sees both in `network show` and neither
    is ever given to a VM.
    """
    network = parse_network(cidr)
    _check_prefix(network, ipv6_mode)
    mode = ipv6_mode if network.version == 6 else None
    usable_first = int(network.network_address) + 1
    usable_last = int(network.broadcast_address) - (1 if network.version == 4 else 0)
    if gateway is None:
        gateway = ipaddress.ip_address(usable_first)
    elif gateway not in network or not usable_first <= int(gateway) <= usable_last:
        raise InvalidInput(f"gateway {gateway} is not a usable address of {network}")
    dhcp_server = None if mode == Ipv6Mode.SLAAC else ipaddress.ip_address(usable_last)
    if dhcp_server == gateway:
        raise InvalidInput(f"gateway {gateway} is the address {network} keeps for its DHCP server")
    blocks = []
    for first, last in reserved:
        if first not in network or last not in network:
            raise InvalidInput(f"reserved range {first}-{last} is not inside {network}")
        blocks.append(AddressRange(int(first), int(last)))
    return SubnetPlan(network, gateway, dhcp_server, tuple(sorted(blocks)), mode)


def _check_prefix(network: IPNetwork, ipv6_mode: Ipv6Mode) -> None:
    if network.version == 4 and network.prefixlen > _MAX_V4_PREFIX:
        raise InvalidInput(
            f"subnet {network} is too small: IPv4 subnets need at least a /{_MAX_V4_PREFIX} "
            "(network, gateway, DHCP server, broadcast and room for VMs)"
        )
    if network.version == 6 and ipv6_mode == Ipv6Mode.SLAAC and network.prefixlen != _SLAAC_PREFIX:
        raise InvalidInput(
            f"SLAAC needs a /{_SLAAC_PREFIX}; {network} is not (use --ipv6-mode dhcpv6)"
        )
    if network.version == 6 and network.prefixlen > _MAX_V6_PREFIX:
        raise InvalidInput(f"subnet {network} is too small: IPv6 subnets need at least a /120")


def eui64_address(network: IPNetwork, mac: str) -> ipaddress.IPv6Address:
    """The SLAAC address a guest forms from its MAC in a /64 (modified EUI-64, RFC 4291)."""
    octets = bytes(int(part, 16) for part in mac.split(":"))
    interface_id = bytes([octets[0] ^ 0x02]) + octets[1:3] + b"\xff\xfe" + octets[3:6]
    return ipaddress.IPv6Address(int(network.network_address) | int.from_bytes(interface_id, "big"))
