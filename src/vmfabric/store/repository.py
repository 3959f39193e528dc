"""Finding stored objects by the names operators use, with NotFound errors that say what."""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import Select, select
from sqlalchemy.orm import Session, joinedload, selectinload

from vmfabric.domain.errors import NotFound
from vmfabric.store.tables import Allocation, Host, Network, Nic, Subnet, Vm


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
