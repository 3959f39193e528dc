"""Finding stored objects by the names operators use, with NotFound errors that say what.

Two kinds of reader: ORM objects with their relations loaded, for the use cases that walk
them, and frozen records read with Core statements, for the hot path of creating a VM.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import Connection, Select, bindparam, insert, select
from sqlalchemy.orm import Session, joinedload, selectinload

from vmfabric.domain.errors import Conflict, NotFound
from vmfabric.domain.ipam import AddressRange, key_value
from vmfabric.store.tables import (
    Allocation,
    Base,
    Host,
    Network,
    Nic,
    ReservedRange,
    Subnet,
    Vm,
)


@dataclass(frozen=True)
class HostRecord:
    """A stored host, read without the ORM."""

    id: int
    name: str
    driver: str
    uri: str | None
    bridge: str


@dataclass(frozen=True)
class SubnetRecord:
    """A stored subnet with its reserved ranges, read without the ORM."""

    id: int
    cidr: str
    version: int
    gateway: str | None
    dhcp_server: str | None
    ipv6_mode: str | None
    capacity: int
    reserved: tuple[AddressRange, ...]


@dataclass(frozen=True)
class NetworkRecord:
    """A stored network with its subnets, read without the ORM."""

    id: int
    name: str
    kind: str
    vlan: int
    subnets: tuple[SubnetRecord, ...]


_HOST_FOR_VM = select(
    Host.id,
    Host.name,
    Host.driver,
    Host.uri,
    Host.bridge,
    select(Vm.id).where(Vm.name == bindparam("vm")).scalar_subquery().label("vm_id"),
).where(Host.name == bindparam("name"))
_NETWORK = (
    select(
        Network.id.label("network_id"),
        Network.kind,
        Network.vlan,
        Subnet.id,
        Subnet.cidr,
        Subnet.version,
        Subnet.gateway,
        Subnet.dhcp_server,
        Subnet.ipv6_mode,
        Subnet.capacity,
        ReservedRange.first_key,
        ReservedRange.last_key,
    )
    .join(Subnet, Subnet.network_id == Network.id)
    .outerjoin(ReservedRange, ReservedRange.subnet_id == Subnet.id)
    .where(Network.name == bindparam("name"))
    .order_by(Subnet.id, ReservedRange.first_key)
)


def host_for_new_vm(conn: Connection, name: str, vm: str) -> HostRecord:
    """The host called `name`, when no VM called `vm` exists yet (one query for both)."""
    row = conn.execute(_HOST_FOR_VM, {"name": name, "vm": vm}).first()
    if row is None:
        raise NotFound(f"unknown host {name!r}", host=name)
    if row.vm_id is not None:
        raise Conflict(f"VM {vm!r} already exists", vm=vm)
    return HostRecord(row.id, row.name, row.driver, row.uri, row.bridge)


def network_record(conn: Connection, name: str) -> NetworkRecord:
    """The network called `name`, with its subnets and their reserved ranges (one query)."""
    rows = conn.execute(_NETWORK, {"name": name}).all()
    if not rows:
        raise NotFound(f"unknown network {name!r}", network=name)
    reserved: dict[int, list[AddressRange]] = {}
    for row in rows:
        blocks = reserved.setdefault(row.id, [])
        if row.first_key is not None:
            blocks.append(AddressRange(key_value(row.first_key), key_value(row.last_key)))
    subnets = {
        row.id: SubnetRecord(
            row.id,
            row.cidr,
            row.version,
            row.gateway,
            row.dhcp_server,
            row.ipv6_mode,
            int(row.capacity),
            tuple(reserved[row.id]),
        )
        for row in rows
    }
    first = rows[0]
    return NetworkRecord(first.network_id, name, first.kind, first.vlan, tuple(subnets.values()))


def insert_row(conn: Connection, table: type[Base], values: dict[str, object]) -> int:
    """Insert one row and return its id."""
    key = conn.execute(insert(table), values).inserted_primary_key
    if key is None:
        raise RuntimeError("the database returned no id for the new row")
    return int(key[0])


def get_host(session: Session, name: str) -> Host:
    """The host called `name`."""
    host = session.scalar(select(Host).where(Host.name == name))
    if host is None:
        raise NotFound(f"unknown host {name!r}", host=name)
    return host


def get_network(session: Session, name: str) -> Network:
    """The network called `name`, with its subnets."""
    network = session.scalar(
        select(Network)
        .where(Network.name == name)
        .options(selectinload(Network.subnets).selectinload(Subnet.reserved))
    )
    if network is None:
        raise NotFound(f"unknown network {name!r}", network=name)
    return network


def find_vm(session: Session, name: str) -> Vm | None:
    """The VM called `name` with its NICs and addresses, or None."""
    return session.scalar(_vm_query().where(Vm.name == name))


def get_vm(session: Session, name: str) -> Vm:
    """The VM called `name` with its NICs and addresses."""
    vm = find_vm(session, name)
    if vm is None:
        raise NotFound(f"unknown VM {name!r}", vm=name)
    return vm


def list_vms(session: Session) -> Sequence[Vm]:
    """The patent's global VM list: every VM with host, NICs, MACs and addresses."""
    return session.scalars(_vm_query().order_by(Vm.name)).all()


def list_hosts(session: Session) -> Sequence[Host]:
    """Every registered host."""
    return session.scalars(select(Host).order_by(Host.name)).all()


def list_networks(session: Session) -> Sequence[Network]:
    """Every network with its subnets."""
    return session.scalars(
        select(Network)
        .order_by(Network.name)
        .options(selectinload(Network.subnets).selectinload(Subnet.reserved))
    ).all()


def network_nics(session: Session, network_id: int) -> Sequence[Nic]:
    """NICs attached to a network, with their VM and addresses (for DHCP reservations)."""
    return session.scalars(
        select(Nic)
        .where(Nic.network_id == network_id)
        .options(selectinload(Nic.vm), selectinload(Nic.addresses).selectinload(Allocation.subnet))
    ).all()


def _vm_query() -> Select[Vm]:
    return select(Vm).options(
        joinedload(Vm.host),
        selectinload(Vm.nics).joinedload(Nic.network),
        selectinload(Vm.nics).selectinload(Nic.addresses).joinedload(Allocation.subnet),
    )
