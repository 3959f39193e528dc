"""Creating, listing and deleting networks and their subnets."""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from vmfabric.domain.errors import Conflict, InvalidInput, Unavailable
from vmfabric.domain.ipam import (
    IPAddress,
    SubnetPlan,
    address_key,
    parse_address,
    parse_network,
    parse_range,
    plan_subnet,
)
from vmfabric.domain.model import (
    Ipv6Mode,
    NetworkInfo,
    NetworkKind,
    SubnetInfo,
)
from vmfabric.domain.names import check_name
from vmfabric.services.context import Controller, transaction
from vmfabric.services.views import NetworkView, network_view, reservation_of
from vmfabric.store import allocator, repository
from vmfabric.store.repository import SubnetRecord
from vmfabric.store.tables import Network, Nic, ReservedRange, Subnet

_FIRST_VLAN = 100
_LAST_VLAN = 4094


@dataclass(frozen=True)
class CreateNetwork:
    """What an operator asks for in `network create`."""

    name: str
    cidrs: Sequence[str]
    kind: str = NetworkKind.INTERNAL.value
    gateways: Sequence[str] = ()
    reserved: Sequence[str] = ()
    ipv6_mode: str = Ipv6Mode.SLAAC.value
    vlan: int | None = None


def plan_network(request: CreateNetwork) -> list[SubnetPlan]:
    """Check a network request and work out each subnet's fixed addresses."""
    check_name("network", request.name)
    if request.kind not in {k.value for k in NetworkKind}:
        raise InvalidInput(f"invalid kind {request.kind!r}: expected internal or external")
    if request.ipv6_mode not in {m.value for m in Ipv6Mode}:
        raise InvalidInput(f"invalid IPv6 mode {request.ipv6_mode!r}: expected slaac or dhcpv6")
    if not request.cidrs:
        raise InvalidInput("a network needs at least one --cidr")
    networks = [parse_network(c) for c in request.cidrs]
    _refuse_overlaps(networks)
    gateways = [parse_address(g) for g in request.gateways]
    ranges = [parse_range(r) for r in request.reserved]
    _refuse_strays("gateway", [(g, g) for g in gateways], networks)
    _refuse_strays("reserved range", ranges, networks)
    return [
        plan_subnet(
            str(net),
            gateway=next((g for g in gateways if g in net), None),
            reserved=[r for r in ranges if r[0] in net],
            ipv6_mode=Ipv6Mode(request.ipv6_mode),
        )
        for net in networks
    ]


def _refuse_overlaps(networks: Sequence[ipaddress.IPv4Network | ipaddress.IPv6Network]) -> None:
    for i, a in enumerate(networks):
        for b in networks[i + 1 :]:
            if a.version == b.version and a.overlaps(b):
                raise InvalidInput(f"subnets {a} and {b} overlap")


def _refuse_strays(
    what: str,
    ranges: Sequence[tuple[IPAddress, IPAddress]],
    networks: Sequence[ipaddress.IPv4Network | ipaddress.IPv6Network],
) -> None:
    for first, last in ranges:
        if not any(first in n and last in n for n in networks):
            shown = first if first == last else f"{first}-{last}"
            raise InvalidInput(f"{what} {shown} is not inside any --cidr of the network")


def plan_of(subnet: SubnetRecord) -> SubnetPlan:
    """The rules of a stored subnet, to check an address against them."""
    return SubnetPlan(
        network=parse_network(subnet.cidr),
        gateway=ipaddress.ip_address(subnet.gateway) if subnet.gateway else None,
        dhcp_server=ipaddress.ip_address(subnet.dhcp_server) if subnet.dhcp_server else None,
        reserved=subnet.reserved,
        ipv6_mode=Ipv6Mode(subnet.ipv6_mode) if subnet.ipv6_mode else None,
    )


def network_info(network: Network) -> NetworkInfo:
    """What the fabric and DHCP drivers need to know of a network."""
    return NetworkInfo(
        name=network.name,
        kind=NetworkKind(network.kind),
        vlan=network.vlan,
        subnets=tuple(
            SubnetInfo(
                cidr=s.cidr,
                gateway=s.gateway,
                dhcp_server=s.dhcp_server,
                ipv6_mode=Ipv6Mode(s.ipv6_mode) if s.ipv6_mode else None,
            )
            for s in network.subnets
        ),
    )


def create_network(ctl: Controller, request: CreateNetwork) -> NetworkView:
    """Store the network, then build its gateway and DHCP server; undo the record on failure."""
    plans = plan_network(request)
    info, view = transaction(lambda: _store_network(ctl, request, plans))
    try:
        provision(ctl, info)
    except Exception as error:
        _unprovision(ctl, request.name)
        transaction(lambda: _drop_network(ctl, request.name))
        raise Unavailable(f"could not set up network {request.name!r}: {error}") from error
    ctl.names_changed(None)  # a reverse zone more
    return view


def _store_network(
    ctl: Controller, request: CreateNetwork, plans: list[SubnetPlan]
) -> tuple[NetworkInfo, NetworkView]:
    with ctl.uow() as uow:
        session = uow.session
        if session.scalar(select(Network.id).where(Network.name == request.name)) is not None:
            raise Conflict(f"network {request.name!r} already exists", network=request.name)
        _refuse_taken_cidrs(session, plans)
        network = Network(
            name=request.name, kind=request.kind, vlan=request.vlan or _free_vlan(session)
        )
        session.add(network)
        for plan in plans:
            network.subnets.append(_subnet_row(plan))
        session.flush()
        for subnet, plan in zip(network.subnets, plans, strict=True):
            allocator.seed_free_ranges(uow.connection, subnet.id, plan.initial_free())
        uow.commit()
        return network_info(network), network_view(network, {})


def _subnet_row(plan: SubnetPlan) -> Subnet:
    return Subnet(
        cidr=str(plan.network),
        version=plan.version,
        gateway=str(plan.gateway) if plan.gateway else None,
        dhcp_server=str(plan.dhcp_server) if plan.dhcp_server else None,
        ipv6_mode=plan.ipv6_mode.value if plan.ipv6_mode else None,
        capacity=str(plan.capacity()),
        reserved=[
            ReservedRange(first_key=address_key(r.first), last_key=address_key(r.last))
            for r in plan.reserved
        ],
    )


def _refuse_taken_cidrs(session: Session, plans: list[SubnetPlan]) -> None:
    for existing, network_name in session.execute(select(Subnet.cidr, Network.name).join(Network)):
        taken = parse_network(existing)
        for plan in plans:
            if plan.version == taken.version and plan.network.overlaps(taken):
                raise Conflict(
                    f"subnet {plan.network} overlaps {taken} of network {network_name!r}"
                )


def _free_vlan(session: Session) -> int:
    used = set(session.scalars(select(Network.vlan)))
    for vlan in range(_FIRST_VLAN, _LAST_VLAN + 1):
        if vlan not in used:
            return vlan
    raise Conflict("every VLAN tag is in use")


def provision(ctl: Controller, info: NetworkInfo) -> None:
    """Build the network's gateway and DHCP server and give it its reservations.

    Safe to repeat: the controller calls it for every network when it starts.
    """
    if ctl.fabric is not None:
        placement = ctl.fabric.ensure_network(info)
        ctl.dhcp.ensure_network(info, placement)
    with ctl.uow() as uow:
        network = repository.get_network(uow.session, info.name)
        nics = repository.network_nics(uow.session, network.id)
        reservations = [r for r in (reservation_of(n) for n in nics) if r is not None]
    ctl.dhcp.sync(info.name, reservations)


def network_infos(ctl: Controller) -> list[NetworkInfo]:
    """Every network as the drivers see it."""
    with ctl.uow() as uow:
        return [network_info(n) for n in repository.list_networks(uow.session)]


def list_networks(ctl: Controller) -> list[NetworkView]:
    """Every network with its subnets."""
    with ctl.uow() as uow:
        found = repository.list_networks(uow.session)
        used = allocator.used(uow.connection, [s.id for n in found for s in n.subnets])
        return [network_view(n, used) for n in found]


def show_network(ctl: Controller, name: str) -> NetworkView:
    """One network with its subnets and how full they are."""
    with ctl.uow() as uow:
        network = repository.get_network(uow.session, name)
        return network_view(
            network, allocator.used(uow.connection, [s.id for s in network.subnets])
        )


def delete_network(ctl: Controller, name: str) -> None:
    """Remove a network no VM uses any more, with its gateway and DHCP server."""
    with ctl.uow() as uow:
        network = repository.get_network(uow.session, name)
        users = sorted({n.vm.name for n in repository.network_nics(uow.session, network.id)})
    if users:
        raise Conflict(
            f"network {name!r} still has VMs: {', '.join(users)}; delete them first",
            vms=users,
        )
    _unprovision(ctl, name)
    transaction(lambda: _drop_network(ctl, name))
    ctl.names_changed(None)


def _unprovision(ctl: Controller, name: str) -> None:
    ctl.dhcp.remove_network(name)
    if ctl.fabric is not None:
        ctl.fabric.remove_network(name)


def _drop_network(ctl: Controller, name: str) -> None:
    with ctl.uow() as uow:
        network = uow.session.scalar(select(Network).where(Network.name == name))
        if network is not None and not uow.session.scalar(
            select(Nic.id).where(Nic.network_id == network.id).limit(1)
        ):
            uow.session.delete(network)
            uow.commit()
