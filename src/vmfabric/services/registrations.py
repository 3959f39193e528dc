"""VM registrations with the name service (CN101652749A) and the zones made of them.

A registration is a running VM's name with the addresses it really holds: the DHCP leases of
its NICs as dnsmasq reported them (lease events add, renew and release them). It is read from
the store, not kept apart, so it follows every change the store sees: a released lease, a VM
stopped, deleted or moved to another host. A running VM without a lease is still registered
(it belongs to its group, it just has no address to publish yet); a stopped one is not.

The zones are rebuilt whole from the registrations when something changed, at most once per
window (`NamePublisher`), which keeps the DNS server's data one consistent snapshot of the
store.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Protocol

from sqlalchemy import select
from sqlalchemy.orm import Session

from vmfabric.coalescing import Coalescer
from vmfabric.domain.dns_records import Registration, ZoneContent, forward_zone, reverse_zones
from vmfabric.domain.model import VmState
from vmfabric.services.context import Controller
from vmfabric.store.tables import Host, Lease, Nic, Subnet, Vm

log = logging.getLogger(__name__)

MIN_PUBLISH_WINDOW_S = 0.02
PUBLISH_SPACING_FACTOR = 2
MAX_PUBLISH_WINDOW_S = 0.5


class ZonePublisher(Protocol):
    """Where zones go: the authoritative DNS server."""

    def publish(self, zones: Sequence[ZoneContent]) -> dict[str, int]:
        """Serve exactly these zones from now on; the serial of each."""
        ...


def registrations(ctl: Controller) -> list[Registration]:
    """Every running VM with the addresses its NICs hold by lease, sorted by VM name."""
    with ctl.uow() as uow:
        return _registrations(uow.session)


def zones(ctl: Controller, origin: str) -> list[ZoneContent]:
    """The forward zone and the reverse zones of every network's subnets, read in one
    transaction so the zones are one snapshot of the store."""
    with ctl.uow() as uow:
        cidrs = list(uow.session.scalars(select(Subnet.cidr).order_by(Subnet.id)))
        registered = _registrations(uow.session)
    return [forward_zone(origin, registered, {}), *reverse_zones(origin, cidrs, registered)]


def _registrations(session: Session) -> list[Registration]:
    query = (
        select(Vm.name, Host.name.label("host"), Vm.image, Lease.address)
        .join(Host, Host.id == Vm.host_id)
        .outerjoin(Nic, Nic.vm_id == Vm.id)
        .outerjoin(Lease, (Lease.mac == Nic.mac) & (Lease.network_id == Nic.network_id))
        .where(Vm.state == VmState.RUNNING.value)
        .order_by(Vm.name, Lease.address)
    )
    found: dict[str, tuple[str, str, list[str]]] = {}
    for row in session.execute(query):
        _host, _image, addresses = found.setdefault(row.name, (row.host, row.image, []))
        if row.address is not None:
            addresses.append(row.address)
    return [Registration(vm, h, i, tuple(a)) for vm, (h, i, a) in found.items()]


class NamePublisher:
    """Rebuilds and publishes the zones after changes, spaced by what a rebuild costs.

    The first change after a quiet spell is published at once; a burst of changes (hundreds
    of lease events after a dnsmasq reload) shares rebuilds no closer than twice the last
    rebuild's duration, between 20 and 500 ms.
    """

    def __init__(self, ctl: Controller, server: ZonePublisher, origin: str) -> None:
        self._ctl = ctl
        self._server = server
        self._origin = origin
        self._last_cost = 0.0
        self._runs = Coalescer(self._publish, self._window, "dns-publish")

    def changed(self) -> None:
        """Something the registrations are made of changed: publish soon."""
        self._runs.request(self._origin)

    def publish_now(self) -> dict[str, int]:
        """Rebuild and publish at once (at start); the serial of each zone."""
        return self._rebuild()

    def close(self) -> None:
        """Publish what is pending, then stop."""
        self._runs.close()

    def _window(self, _origin: str) -> float:
        spaced = self._last_cost * PUBLISH_SPACING_FACTOR
        return min(max(spaced, MIN_PUBLISH_WINDOW_S), MAX_PUBLISH_WINDOW_S)

    def _publish(self, _origin: str) -> None:
        self._rebuild()

    def _rebuild(self) -> dict[str, int]:
        started = time.monotonic()
        serials = self._server.publish(zones(self._ctl, self._origin))
        self._last_cost = time.monotonic() - started
        return serials
