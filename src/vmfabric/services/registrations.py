"""VM registrations with the name service (CN101652749A) and the zones made of them.

A registration is a running VM's name with the addresses it really holds: the DHCP leases of
its NICs as dnsmasq reported them (lease events add, renew and release them). It is read from
the store, not kept apart, so it follows every change the store sees: a released lease, a VM
stopped, deleted or moved to another host. A running VM without a lease is still registered
(it belongs to its group, it just has no address to publish yet); a stopped one is not.

The publisher keeps the zones in a `ZoneBuilder` and, after a change, re-reads only the VMs
the change names, so that what a change costs does not grow with the number of VMs; the DNS
server gets only the record sets that changed. Changes that touch everything (the controller
starting, networks added or removed, leases resynchronized) re-read the whole store.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from sqlalchemy import select

from vmfabric.coalescing import Coalescer
from vmfabric.domain.dns_records import (
    Registration,
    ZoneBuilder,
    ZoneChange,
    ZoneContent,
    group_name,
)
from vmfabric.services.context import Controller
from vmfabric.services.groups import blocked_names
from vmfabric.store import repository
from vmfabric.store.tables import Subnet

log = logging.getLogger(__name__)

MIN_PUBLISH_WINDOW_S = 0.05
PUBLISH_SPACING_FACTOR = 2
MAX_PUBLISH_WINDOW_S = 0.5


class ZonePublisher(Protocol):
    """Where zones go: the authoritative DNS server."""

    def publish(self, zones: Sequence[ZoneContent]) -> dict[str, int]:
        """Serve exactly these zones from now on; the serial of each."""
        ...

    def update(self, changes: Sequence[ZoneChange]) -> dict[str, int]:
        """Change these record sets of the served zones; the serial of each zone changed."""
        ...


def registrations(ctl: Controller) -> list[Registration]:
    """Every running VM with the addresses its NICs hold by lease, sorted by VM name."""
    with ctl.uow() as uow:
        return _registrations(repository.registration_rows(uow.connection))


@dataclass(frozen=True)
class RegistrationView:
    """A registration as the API shows it: the VM, where it runs, its group, its addresses."""

    vm: str
    host: str
    image: str
    group: str
    addresses: list[str]


def registration_views(ctl: Controller) -> list[RegistrationView]:
    """Every registration, by VM name."""
    return [
        RegistrationView(r.vm, r.host, r.image, group_name(r.host, r.image), list(r.addresses))
        for r in sorted(registrations(ctl), key=lambda r: r.vm)
    ]


def _registrations(rows: Iterable[Any]) -> list[Registration]:
    found: dict[str, tuple[str, str, list[str]]] = {}
    for row in rows:
        _host, _image, addresses = found.setdefault(row.name, (row.host, row.image, []))
        if row.address is not None:
            addresses.append(row.address)
    return [Registration(vm, h, i, tuple(a)) for vm, (h, i, a) in found.items()]


class NamePublisher:
    """Keeps the DNS server's zones in step with the store, spaced by what a run costs.

    The first change after a quiet spell is published at once; a burst of changes (hundreds
    of lease events after a dnsmasq reload) shares runs no closer than twice the last run's
    duration, between 50 and 500 ms.
    """

    def __init__(self, ctl: Controller, server: ZonePublisher, origin: str) -> None:
        self._ctl = ctl
        self._server = server
        self._origin = origin
        self._builder: ZoneBuilder | None = None
        self._cidrs: tuple[str, ...] = ()
        self._blocked: dict[str, str] = {}
        self._lock = threading.Lock()  # guards what is pending
        self._running = threading.Lock()  # one run at a time: the builder is not shared
        self._pending: set[str] = set()
        self._everything = True
        self._last_cost = 0.0
        self._runs = Coalescer(self._publish, self._window, "dns-publish")

    def changed(self, vms: Collection[str] | None = None) -> None:
        """These VMs' registrations (or, with None, anything) changed: publish soon.

        Cheap: called on the event loop by the use cases.
        """
        with self._lock:
            if vms is None:
                self._everything = True
            else:
                self._pending.update(vms)
        self._runs.request(self._origin)

    def publish_now(self) -> dict[str, int]:
        """Read everything and publish at once (at start); the serial of each zone."""
        with self._lock:
            self._everything = True
        return self._run()

    def close(self) -> None:
        """Publish what is pending, then stop."""
        self._runs.close()

    def _window(self, _origin: str) -> float:
        spaced = self._last_cost * PUBLISH_SPACING_FACTOR
        return min(max(spaced, MIN_PUBLISH_WINDOW_S), MAX_PUBLISH_WINDOW_S)

    def _publish(self, _origin: str) -> None:
        self._run()

    def _run(self) -> dict[str, int]:
        with self._running:
            return self._run_alone()

    def _run_alone(self) -> dict[str, int]:
        started = time.monotonic()
        with self._lock:
            everything, names = self._everything, self._pending
            self._everything, self._pending = False, set()
        try:
            if everything or self._builder is None:
                serials = self._publish_everything()
            else:
                serials = self._publish_vms(self._builder, names)
        except Exception:
            # the builder may hold changes the server did not get: start again from the store
            self._builder = None
            self._last_cost = MAX_PUBLISH_WINDOW_S
            self.changed()
            raise
        self._last_cost = time.monotonic() - started
        return serials

    def _publish_everything(self) -> dict[str, int]:
        """Re-read the store whole; rebuild the zones only when the networks changed."""
        with self._ctl.uow() as uow:
            cidrs = tuple(uow.session.scalars(select(Subnet.cidr).order_by(Subnet.id)))
            found = _registrations(repository.registration_rows(uow.connection))
            blocked = blocked_names(uow.session)
        builder = self._builder
        if builder is None or cidrs != self._cidrs:
            builder = ZoneBuilder(self._origin, cidrs)
            _apply(builder, found, ())
            _mark(builder, blocked, {})
            builder.changes()
            self._builder, self._cidrs, self._blocked = builder, cidrs, blocked
            return self._server.publish(builder.contents())
        _apply(builder, found, builder.vms() - {r.vm for r in found})
        _mark(builder, blocked, self._blocked)
        self._blocked = blocked
        return self._server.update(builder.changes())

    def _publish_vms(self, builder: ZoneBuilder, names: set[str]) -> dict[str, int]:
        """Re-read only these VMs: what a change costs does not grow with the zones."""
        with self._ctl.uow() as uow:
            conn = uow.connection
            found = _registrations(
                row for vm in sorted(names) for row in repository.registration_rows(conn, vm)
            )
        _apply(builder, found, names - {r.vm for r in found})
        return self._server.update(builder.changes())


def _apply(builder: ZoneBuilder, found: Iterable[Registration], gone: Iterable[str]) -> None:
    """Put what was read into the builder; registrations that did not change stay as they are."""
    for vm in gone:
        builder.remove(vm)
    for registration in found:
        if builder.registration(registration.vm) != registration:
            builder.put(registration)


def _mark(builder: ZoneBuilder, blocked: dict[str, str], before: dict[str, str]) -> None:
    """Put the blocked groups' marks into the builder; lift those no longer blocked."""
    for group in before.keys() - blocked.keys():
        builder.unblock(group)
    for group, reason in blocked.items():
        if before.get(group) != reason:
            builder.block(group, reason)
