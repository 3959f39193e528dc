"""What the use cases return: plain dataclasses that the API serializes as they are.

Field names here are the stable JSON of the spec ("Interfaces that stay stable"); add fields,
never rename them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

from vmfabric.domain.ipam import AddressRange, address_text, key_value
from vmfabric.domain.model import Ipv6Mode, Reservation
from vmfabric.store.tables import Host, Network, Nic, Subnet, Vm


@dataclass(frozen=True)
class HostView:
    """A host as `host list` shows it."""

    name: str
    driver: str
    uri: str | None
    bridge: str
    vms: int


@dataclass(frozen=True)
class SubnetView:
    """A subnet with its fixed addresses and how full it is."""

    cidr: str
    version: int
    gateway: str | None
    dhcp_server: str | None
    ipv6_mode: str | None
    reserved: list[str]
    capacity: int
    used: int


@dataclass(frozen=True)
class NetworkView:
    """A network as `network show` prints it."""

    name: str
    kind: str
    vlan: int
    subnets: list[SubnetView]


@dataclass(frozen=True)
class NicView:
    """A NIC: the spec's fields, plus its position on the VM."""

    network: str
    mac: str | None
    ipv4: str | None
    ipv6: str | None
    gateway: str | None
    gateway6: str | None = None


@dataclass(frozen=True)
class VmView:
    """A VM: the spec's fields (name, host, image, state, nics) and when it was created."""

    name: str
    host: str
    image: str
    state: str
    nics: list[NicView] = field(default_factory=list)
    created_at: datetime | None = None


def host_view(host: Host, vms: int) -> HostView:
    """The view of a stored host."""
    return HostView(host.name, host.driver, host.uri, host.bridge, vms)


def subnet_view(subnet: Subnet, used: int) -> SubnetView:
    """The view of a stored subnet with `used` of its addresses given to NICs."""
    reserved = [
        _range_text(subnet.version, AddressRange(key_value(r.first_key), key_value(r.last_key)))
        for r in subnet.reserved
    ]
    return SubnetView(
        subnet.cidr,
        subnet.version,
        subnet.gateway,
        subnet.dhcp_server,
        subnet.ipv6_mode,
        reserved,
        int(subnet.capacity),
        used,
    )


def _range_text(version: int, block: AddressRange) -> str:
    first = address_text(version, block.first)
    return first if block.size == 1 else f"{first}-{address_text(version, block.last)}"


def network_view(network: Network, used: Mapping[int, int]) -> NetworkView:
    """The view of a stored network; `used` counts addresses in use by subnet id."""
    subnets = [subnet_view(s, used.get(s.id, 0)) for s in network.subnets]
    return NetworkView(network.name, network.kind, network.vlan, subnets)


@dataclass(frozen=True)
class HeldAddress:
    """An address a NIC holds, with what its subnet says about it."""

    version: int
    address: str
    gateway: str | None
    ipv6_mode: str | None


def held_addresses(nic: Nic) -> list[HeldAddress]:
    """The addresses of a stored NIC."""
    return [
        HeldAddress(a.version, a.address, a.subnet.gateway, a.subnet.ipv6_mode)
        for a in nic.addresses
    ]


def nic_view_of(network: str, mac: str | None, held: Sequence[HeldAddress]) -> NicView:
    """A NIC's view; gateways are those of the subnets its addresses are in."""
    by_version = {a.version: a for a in held}
    v4, v6 = by_version.get(4), by_version.get(6)
    return NicView(
        network=network,
        mac=mac,
        ipv4=v4.address if v4 else None,
        ipv6=v6.address if v6 else None,
        gateway=v4.gateway if v4 else None,
        gateway6=v6.gateway if v6 else None,
    )


def nic_view(nic: Nic) -> NicView:
    """The view of a stored NIC."""
    return nic_view_of(nic.network.name, nic.mac, held_addresses(nic))


def as_utc(moment: datetime) -> datetime:
    """Stored times are UTC; SQLite hands them back without their time zone."""
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def vm_view(vm: Vm) -> VmView:
    """The view of a stored VM."""
    nics = [nic_view(n) for n in vm.nics]
    return VmView(vm.name, vm.host.name, vm.image, vm.state, nics, as_utc(vm.created_at))


def reservation_for(
    network: str, mac: str, hostname: str, held: Sequence[HeldAddress]
) -> Reservation:
    """The DHCP reservation a NIC needs: its IPv4 and its DHCPv6 address, by its MAC."""
    view = nic_view_of(network, mac, held)
    dhcpv6 = any(a.version == 6 and a.ipv6_mode == Ipv6Mode.DHCPV6.value for a in held)
    return Reservation(
        network=network,
        mac=mac,
        hostname=hostname,
        ipv4=view.ipv4,
        ipv6=view.ipv6 if dhcpv6 else None,
    )


def reservation_of(nic: Nic) -> Reservation | None:
    """The reservation of a stored NIC; none before the hypervisor gave it a MAC."""
    if nic.mac is None:
        return None
    return reservation_for(nic.network.name, nic.mac, nic.vm.name, held_addresses(nic))
