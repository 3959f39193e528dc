"""Finding stored objects by the names operators use, with NotFound errors that say what.

Two kinds of reader: ORM objects with their relations loaded, for the use cases that walk
them, and frozen records read with Core statements, for the hot path of creating a VM.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, Select, bindparam, select, update
from sqlalchemy.orm import Session, joinedload, selectinload

from vmfabric.domain.errors import Conflict, NotFound
from vmfabric.domain.ipam import AddressRange, key_value
from vmfabric.domain.model import VmState
from vmfabric.store.prepared import Prepared, PreparedInsert
from vmfabric.store.tables import (
    Allocation,
    GroupBlock,
    GuestAddress,
    Host,
    Lease,
    Network,
    Nic,
    PolicyAttachment,
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


_HOST_FOR_VM = Prepared(
    select(
        Host.id,
        Host.name,
        Host.driver,
        Host.uri,
        Host.bridge,
        select(Vm.id).where(Vm.name == bindparam("vm")).scalar_subquery().label("vm_id"),
    ).where(Host.name == bindparam("name"))
)
_NETWORK = Prepared(
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

_RUNNING_WITH_LEASES = (
    select(Vm.name, Host.name.label("host"), Vm.image, Lease.address)
    .join(Host, Host.id == Vm.host_id)
    .outerjoin(Nic, Nic.vm_id == Vm.id)
    .outerjoin(Lease, (Lease.mac == Nic.mac) & (Lease.network_id == Nic.network_id))
    .where(Vm.state == VmState.RUNNING.value)
    .order_by(Vm.name, Lease.address)
)
_RUNNING_WITH_GUEST_ADDRESSES = (
    select(Vm.name, Host.name.label("host"), Vm.image, GuestAddress.address)
    .join(Host, Host.id == Vm.host_id)
    .join(Nic, Nic.vm_id == Vm.id)
    .join(GuestAddress, GuestAddress.nic_id == Nic.id)
    .where(Vm.state == VmState.RUNNING.value)
    .order_by(Vm.name, GuestAddress.address)
)
_EVERY_REGISTRATION = (
    Prepared(_RUNNING_WITH_LEASES),
    Prepared(_RUNNING_WITH_GUEST_ADDRESSES),
)
_REGISTRATION = (
    Prepared(_RUNNING_WITH_LEASES.where(Vm.name == bindparam("vm"))),
    Prepared(_RUNNING_WITH_GUEST_ADDRESSES.where(Vm.name == bindparam("vm"))),
)

_BLOCKED = Prepared(
    select(GroupBlock.id)
    .where(
        ((GroupBlock.scope == "group") & (GroupBlock.target == bindparam("group")))
        | ((GroupBlock.scope == "image") & (GroupBlock.target == bindparam("image")))
    )
    .limit(1)
)

_NETWORK_POLICY = Prepared(
    select(PolicyAttachment.id).where(PolicyAttachment.network_id == bindparam("network")).limit(1)
)

_INSERT_VM = PreparedInsert(
    Vm, "name", "host_id", "image", "state", "owner", "claim_expires", "created_at"
)
_INSERT_NIC = PreparedInsert(Nic, "vm_id", "network_id", "position")
_MAC_HOLDER = Prepared(
    select(Vm.name)
    .join(Nic, Nic.vm_id == Vm.id)
    .where(Nic.mac == bindparam("mac"), Nic.vm_id != bindparam("vm_id"))
)
_SET_MAC = Prepared(
    update(Nic).where(Nic.id == bindparam("nic_id")).values(mac=bindparam("new_mac"))
)
_SET_STATE = Prepared(
    update(Vm)
    .where(Vm.name == bindparam("vm_name"))
    .values(state=bindparam("new_state"), owner=None, claim_expires=None)
)


def host_for_new_vm(conn: Connection, name: str, vm: str) -> HostRecord:
    """The host called `name`, when no VM called `vm` exists yet (one query for both)."""
    row = _HOST_FOR_VM.first(conn, {"name": name, "vm": vm})
    if row is None:
        raise NotFound(f"unknown host {name!r}", host=name)
    if row.vm_id is not None:
        raise Conflict(f"VM {vm!r} already exists", vm=vm)
    return HostRecord(row.id, row.name, row.driver, row.uri, row.bridge)


def network_record(conn: Connection, name: str) -> NetworkRecord:
    """The network called `name`, with its subnets and their reserved ranges (one query)."""
    rows = _NETWORK.rows(conn, {"name": name})
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


def insert_vm(conn: Connection, values: dict[str, object]) -> int:
    """Insert a VM row (every column but the id); its id."""
    return _INSERT_VM.row_id(conn, values)


def insert_nic(conn: Connection, vm_id: int, network_id: int, position: int) -> int:
    """Insert a NIC row, without a MAC yet; its id."""
    return _INSERT_NIC.row_id(
        conn, {"vm_id": vm_id, "network_id": network_id, "position": position}
    )


def mac_holder(conn: Connection, mac: str, vm_id: int) -> str | None:
    """The name of the VM other than `vm_id` whose NIC has this MAC, if any."""
    holder = _MAC_HOLDER.scalar(conn, {"mac": mac, "vm_id": vm_id})
    return None if holder is None else str(holder)


def set_mac(conn: Connection, nic_id: int, mac: str) -> None:
    """Record the MAC the hypervisor gave a NIC."""
    _SET_MAC.rows(conn, {"nic_id": nic_id, "new_mac": mac})


def set_vm_state(conn: Connection, name: str, state: str) -> None:
    """Record a VM's state; a settled VM is nobody's claim any more."""
    _SET_STATE.rows(conn, {"vm_name": name, "new_state": state})


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
        raise unknown_vm(name)
    return vm


def get_vm_id(session: Session, name: str) -> int:
    """The id of the VM called `name`, for a caller that needs no more of it."""
    vm_id = session.scalar(select(Vm.id).where(Vm.name == name))
    if vm_id is None:
        raise unknown_vm(name)
    return vm_id


def unknown_vm(name: str) -> NotFound:
    """The one answer to a request naming a VM that does not exist."""
    return NotFound(f"unknown VM {name!r}", vm=name)


def list_vms(session: Session, names: Collection[str] | None = None) -> Sequence[Vm]:
    """The patent's global VM list: every VM (or these) with host, NICs, MACs and addresses."""
    query = _vm_query().order_by(Vm.name)
    if names is not None:
        query = query.where(Vm.name.in_(sorted(names)))
    return session.scalars(query).all()


def vm_of_mac(session: Session, mac: str) -> tuple[str, str] | None:
    """(VM, its host) of the NIC with this MAC, if there is one."""
    row = session.execute(
        select(Vm.name, Host.name)
        .join(Nic, Nic.vm_id == Vm.id)
        .join(Host, Host.id == Vm.host_id)
        .where(Nic.mac == mac)
    ).first()
    return None if row is None else (row[0], row[1])


def running_vms(session: Session, name: str | None = None) -> Sequence[Vm]:
    """The running VMs (or the one called `name`, if it runs) with host, NICs and addresses,
    loaded in a few queries however many there are: sweeps walk them all."""
    query = _vm_query().where(Vm.state == VmState.RUNNING.value).order_by(Vm.name)
    if name is not None:
        query = query.where(Vm.name == name)
    return session.scalars(query).all()


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


def registration_rows(conn: Connection, vm: str | None = None) -> list[Any]:
    """(name, host, image, address) of each address of running VMs, or of one VM: leased
    ones (a running VM without a lease has one row with address None), then the ones its
    guest configured itself. Sorted by VM, then address, in each part.

    Run on every change of the names a DNS server publishes, so without the ORM.
    """
    if vm is None:
        return [row for query in _EVERY_REGISTRATION for row in query.rows(conn)]
    return [row for query in _REGISTRATION for row in query.rows(conn, {"vm": vm})]


def has_network_policy(conn: Connection, network_id: int) -> bool:
    """Whether a policy is attached to the network (its new VMs get it before they start).

    Asked by every VM create, so without the ORM.
    """
    return _NETWORK_POLICY.scalar(conn, {"network": network_id}) is not None


def is_blocked(conn: Connection, group: str, image: str) -> bool:
    """Whether a VM of this group (and image) is under a block of its group or its image.

    Asked by every VM create, so without the ORM.
    """
    return _BLOCKED.scalar(conn, {"group": group, "image": image}) is not None
