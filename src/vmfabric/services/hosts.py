"""Registering hypervisor hosts and listing them."""

from __future__ import annotations

from sqlalchemy import func, select

from vmfabric.domain.errors import Conflict, InvalidInput
from vmfabric.domain.names import check_name
from vmfabric.services.context import Controller, HostRef, transaction
from vmfabric.services.views import HostView, host_view
from vmfabric.store import repository
from vmfabric.store.repository import HostRecord
from vmfabric.store.tables import Host, Vm

DRIVERS = ("lab", "libvirt", "noop")


def register_host(
    ctl: Controller, name: str, driver: str, bridge: str, uri: str | None = None
) -> HostView:
    """Add a host; its agent will drive `driver` and attach VMs to `bridge`."""
    check_name("host", name)
    if driver not in DRIVERS:
        raise InvalidInput(f"unknown driver {driver!r}: expected one of {', '.join(DRIVERS)}")
    if driver == "libvirt" and not uri:
        raise InvalidInput("a libvirt host needs --uri (e.g. qemu+ssh://hv1/system)")
    if not bridge:
        raise InvalidInput("a host needs the name of its Open vSwitch bridge")

    def run() -> HostView:
        with ctl.uow() as uow:
            if uow.session.scalar(select(Host).where(Host.name == name)) is not None:
                raise Conflict(f"host {name!r} is already registered", host=name)
            host = Host(name=name, driver=driver, bridge=bridge, uri=uri)
            uow.session.add(host)
            uow.commit()
            return host_view(host, 0)

    return transaction(run)


def list_hosts(ctl: Controller) -> list[HostView]:
    """Every host with the number of its VMs."""
    with ctl.uow() as uow:
        counts: dict[int, int] = {
            host_id: count
            for host_id, count in uow.session.execute(
                select(Vm.host_id, func.count()).group_by(Vm.host_id)
            )
        }
        return [host_view(h, counts.get(h.id, 0)) for h in repository.list_hosts(uow.session)]


def host_on_bridge(ctl: Controller, bridge: str, driver: str) -> str | None:
    """The host of `driver` whose switch bridge is `bridge`: a switch event names a bridge,
    the migration method a host. None for a bridge no host of this controller uses."""
    with ctl.uow() as uow:
        return uow.session.scalar(
            select(Host.name).where(Host.bridge == bridge, Host.driver == driver)
        )


def host_ref(host: Host | HostRecord) -> HostRef:
    """How the agents find a stored host."""
    return HostRef(host.name, host.driver, host.uri, host.bridge)
