"""DHCP lease events from dnsmasq, kept as the current leases of each network.

dnsmasq re-runs its lease script for every lease on each SIGHUP; the driver's wrapper drops
replays it already delivered, but an event can still arrive twice (a replay after a lost
delivery, a renewal): recording one is idempotent and writes nothing when the lease did not
change.
"""

from __future__ import annotations

import logging

from sqlalchemy import ColumnElement, delete, select
from sqlalchemy.orm import Session

from vmfabric.domain.model import LeaseAction, LeaseEvent
from vmfabric.domain.names import normalize_mac
from vmfabric.services.context import Controller, transaction
from vmfabric.store.tables import Lease, Network, Nic, Vm

log = logging.getLogger(__name__)


def record_lease_event(ctl: Controller, event: LeaseEvent) -> bool:
    """Apply one event; True when it changed the stored leases."""
    holder = transaction(lambda: _apply(ctl, event))
    if holder:
        ctl.names_changed([holder])
    return holder is not None


def sync_leases(ctl: Controller, network: str, current: list[LeaseEvent]) -> int:
    """Make the stored leases of a network exactly those its DHCP server holds; the changes.

    Run when the controller starts: events sent while it was down, or still queued in its
    socket when it was killed, never arrive.
    """
    changes = transaction(lambda: _replace_leases(ctl, network, current))
    if changes:
        ctl.names_changed(None)
    return changes


def _replace_leases(ctl: Controller, network: str, current: list[LeaseEvent]) -> int:
    with ctl.uow() as uow:
        session = uow.session
        network_id = session.scalar(select(Network.id).where(Network.name == network))
        if network_id is None:
            return 0
        wanted = {(normalize_mac(e.mac), e.address): e for e in current}
        changes = 0
        for lease in session.scalars(select(Lease).where(Lease.network_id == network_id)):
            if (lease.mac, lease.address) not in wanted:
                session.delete(lease)
                changes += 1
        for (mac, _address), event in wanted.items():
            changes += _upsert(session, network_id, mac, event)
        uow.commit()
        return changes


def _apply(ctl: Controller, event: LeaseEvent) -> str | None:
    """None when nothing changed; else the VM holding the MAC ("" when no VM does)."""
    mac = normalize_mac(event.mac)
    with ctl.uow() as uow:
        session = uow.session
        network_id = session.scalar(select(Network.id).where(Network.name == event.network))
        if network_id is None:
            log.warning("lease event for unknown network %s ignored", event.network)
            return None
        if event.action == LeaseAction.DEL:
            result = session.execute(
                delete(Lease).where(*_lease_key(network_id, mac, event.address))
            )
            changed = bool(getattr(result, "rowcount", 0))
        else:
            changed = _upsert(session, network_id, mac, event)
        if not changed:
            return None
        holder = session.scalar(
            select(Vm.name).join(Nic).where(Nic.network_id == network_id, Nic.mac == mac)
        )
        uow.commit()
        return holder or ""


def _upsert(session: Session, network_id: int, mac: str, event: LeaseEvent) -> bool:
    lease = session.scalar(select(Lease).where(*_lease_key(network_id, mac, event.address)))
    if lease is None:
        session.add(
            Lease(
                network_id=network_id,
                mac=mac,
                address=event.address,
                hostname=event.hostname,
                expires=event.expires,
            )
        )
        return True
    if (lease.hostname, lease.expires) == (event.hostname, event.expires):
        return False
    lease.hostname, lease.expires = event.hostname, event.expires
    return True


def _lease_key(network_id: int, mac: str, address: str) -> tuple[ColumnElement[bool], ...]:
    return (Lease.network_id == network_id, Lease.mac == mac, Lease.address == address)


def leases_of(ctl: Controller, network: str) -> list[LeaseEvent]:
    """The current leases of a network, as dnsmasq last reported them."""
    with ctl.uow() as uow:
        rows = uow.session.execute(
            select(Lease).join(Network).where(Network.name == network).order_by(Lease.address)
        ).scalars()
        return [
            LeaseEvent(network, LeaseAction.OLD, r.mac, r.address, r.hostname, r.expires)
            for r in rows
        ]
