"""What every use case needs: the database, the host agents, the DHCP server, the fabric."""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Protocol, TypeVar

from sqlalchemy.orm import Session, sessionmaker

from vmfabric.dhcp import DhcpServer
from vmfabric.fabric import Fabric
from vmfabric.hypervisor import Hypervisor
from vmfabric.store.group_commit import RETRYING, GroupCommitter
from vmfabric.store.unit_of_work import UnitOfWork
from vmfabric.vswitch import Vswitch

T = TypeVar("T")


@dataclass(frozen=True)
class HostRef:
    """How to reach one host's hypervisor."""

    name: str
    driver: str
    uri: str | None
    bridge: str


class HostAgents(Protocol):
    """Finds the agent (here: its hypervisor driver) of a host."""

    def hypervisor(self, host: HostRef) -> Hypervisor:
        """The hypervisor driver the host's agent uses."""
        ...

    def vswitch(self, host: HostRef) -> Vswitch | None:
        """The driver of the host's switch; None for hosts without one (noop)."""
        ...


@dataclass(eq=False)
class Controller:
    """The controller's collaborators, handed to every use case; compared and hashed by
    identity, so per-controller state can be kept beside it (`weakref.WeakKeyDictionary`)."""

    sessions: sessionmaker[Session]
    agents: HostAgents
    dhcp: DhcpServer
    fabric: Fabric | None
    owner: str
    writes: GroupCommitter
    create_claim: timedelta = timedelta(seconds=120)
    names_changed: Callable[[Collection[str] | None], None] = field(default=lambda _vms: None)
    """Called after every change registrations are made of (leases, VM states, VMs, networks)
    with the names of the VMs it concerns, or None when it may concern any; the name
    publisher sets it when a DNS server runs."""

    def uow(self) -> UnitOfWork:
        """A new unit of work (one transaction)."""
        return UnitOfWork(self.sessions)

    def close(self) -> None:
        """Stop the background work (DHCP coalescing, the database writer)."""
        self.dhcp.close()
        self.writes.close()


def transaction(function: Callable[[], T]) -> T:
    """Run one transaction, retrying it when the database reports a race or a busy lock.

    The uniqueness constraints are the last guard against two processes taking the same name
    or address; a violation aborts the transaction and the retry sees the winner's commit and
    answers with a clear Conflict.
    """
    return RETRYING(function)
