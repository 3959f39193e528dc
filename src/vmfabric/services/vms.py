"""VM use cases, with the patent's IP presetting (CN102710814A) at their heart.

Creating a VM is a short saga, because the hypervisor and the DHCP server are outside the
database: (1) one transaction presets every NIC's address and records the VM as `creating`,
claimed by this process for a while; (2) the host's agent defines the VM and returns its MACs;
(3) one transaction records the MACs (and SLAAC addresses derived from them); (4) the DHCP
reservations are written; (5) the VM starts and is marked running. A failure at any step undoes
the earlier ones. A process killed in the middle leaves a `creating` VM whose claim lapses or
whose owner is gone; `recover_interrupted_creates` undoes it, so no address leaks.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import ParamSpec, TypeVar

from sqlalchemy import select
from sqlalchemy.orm import Session

from vmfabric.domain.errors import Conflict, Exhausted, InvalidInput, Unavailable
from vmfabric.domain.ipam import IPAddress, eui64_address, parse_address, parse_network
from vmfabric.domain.model import DefinedVm, Ipv6Mode, NicSpec, Reservation, VmSpec, VmState
from vmfabric.domain.names import check_name, normalize_mac
from vmfabric.hypervisor import Hypervisor, HypervisorError
from vmfabric.process_identity import owner_alive
from vmfabric.services.context import Controller, transaction
from vmfabric.services.hosts import host_ref
from vmfabric.services.networks import plan_of
from vmfabric.services.views import VmView, reservation_of, vm_view
from vmfabric.store import allocator, repository
from vmfabric.store.tables import Allocation, Network, Nic, Subnet, Vm

log = logging.getLogger(__name__)
T = TypeVar("T")
P = ParamSpec("P")

DEFAULT_IMAGE = "debian12"


@dataclass(frozen=True)
class NicRequest:
    """One NIC of a create: its network and, optionally, the address to preset."""

    network: str
    address: str | None = None


@dataclass(frozen=True)
class CreateVm:
    """What an operator asks for in `vm create`."""

    name: str
    host: str
    nics: Sequence[NicRequest]
    image: str = DEFAULT_IMAGE


def create_vm(ctl: Controller, request: CreateVm) -> VmView:
    """Create a VM whose NICs get exactly the preset addresses from DHCP."""
    _check_request(request)
    spec, hypervisor = transaction(lambda: _preset(ctl, request))
    try:
        defined = _call(hypervisor.define, spec)
        reservations = transaction(lambda: _record_macs(ctl, request.name, defined))
        _put_all(ctl, reservations)
        _call(hypervisor.start, request.name)
        return transaction(lambda: _set_state(ctl, request.name, VmState.RUNNING))
    except BaseException:
        _undo_create(ctl, request.name, hypervisor)
        raise


def _check_request(request: CreateVm) -> None:
    check_name("VM", request.name)
    check_name("host", request.host)
    check_name("image", request.image)
    if not request.nics:
        raise InvalidInput("a VM needs at least one NIC (--network)")
    for nic in request.nics:
        check_name("network", nic.network)
        if nic.address is not None:
            parse_address(nic.address)


def _preset(ctl: Controller, request: CreateVm) -> tuple[VmSpec, Hypervisor]:
    """Step 1 of the patent: fix every NIC's address before the VM exists."""
    with ctl.uow() as uow:
        session = uow.session
        host = repository.get_host(session, request.host)
        if session.scalar(select(Vm.id).where(Vm.name == request.name)) is not None:
            raise Conflict(f"VM {request.name!r} already exists", vm=request.name)
        vm = Vm(
            name=request.name,
            host=host,
            image=request.image,
            state=VmState.CREATING.value,
            owner=ctl.owner,
            claim_expires=datetime.now(UTC) + ctl.create_claim,
        )
        session.add(vm)
        nics = []
        for position, nic_request in enumerate(request.nics):
            network = repository.get_network(session, nic_request.network)
            nic = Nic(vm=vm, network=network, position=position)
            session.add(nic)
            _preset_addresses(session, network, nic, nic_request.address)
            nics.append(NicSpec(network.name, host.bridge, network.vlan))
        uow.commit()
        spec = VmSpec(name=request.name, image=request.image, nics=tuple(nics))
        return spec, ctl.agents.hypervisor(host_ref(host))


def _preset_addresses(session: Session, network: Network, nic: Nic, wanted: str | None) -> None:
    """Give the NIC the wanted address and a free one of every other family it needs."""
    done: set[int] = set()
    if wanted is not None:
        address = parse_address(wanted)
        _take_named(session, network, nic, address)
        done.add(address.version)
    for version in sorted({s.version for s in network.subnets} - done):
        subnets = [s for s in network.subnets if s.version == version]
        if any(s.ipv6_mode == Ipv6Mode.SLAAC.value for s in subnets):
            continue
        _take_any(session, network, nic, subnets)


def _take_named(session: Session, network: Network, nic: Nic, address: IPAddress) -> None:
    subnet = _subnet_for(network, address)
    refusal = plan_of(subnet).refusal(address)
    if refusal is not None:
        raise InvalidInput(refusal, address=str(address))
    if subnet.ipv6_mode == Ipv6Mode.SLAAC.value:
        raise InvalidInput(
            f"{address}: addresses in the SLAAC subnet {subnet.cidr} derive from the MAC; "
            "create the network with --ipv6-mode dhcpv6 to preset IPv6 addresses"
        )
    allocator.lock_subnet(session, subnet)
    if not allocator.take(session, subnet, int(address)):
        allocator.ensure_not_held(session, subnet, address)
        raise Conflict(f"{address} is not free in {subnet.cidr}", address=str(address))
    allocator.assign(session, subnet, nic, int(address))


def _subnet_for(network: Network, address: IPAddress) -> Subnet:
    for subnet in network.subnets:
        if address in parse_network(subnet.cidr):
            return subnet
    cidrs = ", ".join(s.cidr for s in network.subnets)
    raise InvalidInput(
        f"{address} is outside the subnets of network {network.name!r} ({cidrs})",
        address=str(address),
    )


def _take_any(session: Session, network: Network, nic: Nic, subnets: list[Subnet]) -> None:
    for subnet in subnets:
        allocator.lock_subnet(session, subnet)
        value = allocator.take_lowest(session, subnet)
        if value is not None:
            allocator.assign(session, subnet, nic, value)
            return
    fullness = "; ".join(f"{s.cidr} has {s.used} of {s.capacity} addresses in use" for s in subnets)
    raise Exhausted(
        f"network {network.name!r} has no free IPv{subnets[0].version} address: {fullness}",
        network=network.name,
        subnets=[{"cidr": s.cidr, "used": s.used, "capacity": int(s.capacity)} for s in subnets],
    )


def _record_macs(ctl: Controller, name: str, defined: DefinedVm) -> list[Reservation]:
    """Step 3: keep the MACs the hypervisor chose, and the SLAAC addresses they imply;
    return the DHCP reservations they make."""
    with ctl.uow() as uow:
        vm = repository.get_vm(uow.session, name)
        if len(defined.macs) != len(vm.nics):
            raise Unavailable(
                f"hypervisor returned {len(defined.macs)} MACs for {len(vm.nics)} NICs of {name!r}"
            )
        for nic, mac in zip(vm.nics, defined.macs, strict=True):
            nic.mac = normalize_mac(mac)
            _claim_slaac(uow.session, nic)
        uow.commit()
        return _reservations(vm)


def _claim_slaac(session: Session, nic: Nic) -> None:
    assert nic.mac is not None
    for subnet in nic.network.subnets:
        if subnet.ipv6_mode != Ipv6Mode.SLAAC.value or any(a.version == 6 for a in nic.addresses):
            continue
        address = eui64_address(parse_network(subnet.cidr), nic.mac)
        allocator.ensure_not_held(session, subnet, address)
        allocator.assign(session, subnet, nic, int(address))


def _reservations(vm: Vm) -> list[Reservation]:
    return [r for r in (reservation_of(n) for n in vm.nics) if r is not None]


def _put_all(ctl: Controller, reservations: list[Reservation]) -> None:
    """Step 4: the DHCP server learns MAC -> address for every NIC of the VM."""
    for reservation in reservations:
        ctl.dhcp.put(reservation)


def _write_reservations(ctl: Controller, name: str) -> None:
    with ctl.uow() as uow:
        reservations = _reservations(repository.get_vm(uow.session, name))
    _put_all(ctl, reservations)


def _set_state(ctl: Controller, name: str, state: VmState) -> VmView:
    with ctl.uow() as uow:
        vm = repository.get_vm(uow.session, name)
        vm.state = state.value
        vm.owner = None
        vm.claim_expires = None
        uow.commit()
        return vm_view(vm)


def _call(operation: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
    """Run a hypervisor operation, turning its failures into a 503 for the operator."""
    try:
        return operation(*args, **kwargs)
    except HypervisorError as error:
        raise Unavailable(str(error)) from error


def _undo_create(ctl: Controller, name: str, hypervisor: Hypervisor) -> None:
    """Undo a create that failed part way: VM, reservations, addresses."""
    try:
        hypervisor.undefine(name)
    except HypervisorError:
        log.exception("could not remove half-created VM %s from its host", name)
    _forget_vm(ctl, name)


def _forget_vm(ctl: Controller, name: str) -> None:
    """Remove a VM's reservations and records, returning its addresses to the free space."""
    with ctl.uow() as uow:
        vm = repository.find_vm(uow.session, name)
        reservations = [] if vm is None else [(n.network.name, n.mac) for n in vm.nics if n.mac]
    for network, mac in reservations:
        ctl.dhcp.delete(network, mac)
    transaction(lambda: _delete_records(ctl, name))


def _delete_records(ctl: Controller, name: str) -> None:
    with ctl.uow() as uow:
        vm = repository.find_vm(uow.session, name)
        if vm is None:
            return
        for nic in vm.nics:
            for allocation in nic.addresses:
                _release(uow.session, allocation)
        uow.session.delete(vm)
        uow.commit()


def _release(session: Session, allocation: Allocation) -> None:
    subnet = allocation.subnet
    allocator.lock_subnet(session, subnet)
    if subnet.ipv6_mode != Ipv6Mode.SLAAC.value:
        allocator.give_back(session, subnet, int(parse_address(allocation.address)))
    subnet.used -= 1
    session.delete(allocation)


def _hypervisor_of(ctl: Controller, name: str) -> Hypervisor:
    with ctl.uow() as uow:
        vm = repository.get_vm(uow.session, name)
        if vm.state == VmState.CREATING.value:
            raise Conflict(f"VM {name!r} is still being created", vm=name)
        return ctl.agents.hypervisor(host_ref(vm.host))


def delete_vm(ctl: Controller, name: str) -> None:
    """Remove the VM from its host, then its reservations, then free its addresses."""
    hypervisor = _hypervisor_of(ctl, name)
    _call(hypervisor.undefine, name)
    _forget_vm(ctl, name)


def stop_vm(ctl: Controller, name: str) -> VmView:
    """Shut the VM down; it keeps its addresses and reservations."""
    _call(_hypervisor_of(ctl, name).stop, name)
    return transaction(lambda: _set_state(ctl, name, VmState.STOPPED))


def start_vm(ctl: Controller, name: str) -> VmView:
    """Boot the VM again; DHCP hands it the same addresses."""
    _write_reservations(ctl, name)
    _call(_hypervisor_of(ctl, name).start, name)
    return transaction(lambda: _set_state(ctl, name, VmState.RUNNING))


def set_ip(ctl: Controller, name: str, address: str) -> VmView:
    """Move the VM's NIC on the address's network to `address`, reservation included.

    The guest gets the new address at its next DHCP exchange (renewal or restart).
    """
    check_name("VM", name)
    wanted = parse_address(address)
    view = transaction(lambda: _move_address(ctl, name, wanted))
    _write_reservations(ctl, name)
    return view


def _move_address(ctl: Controller, name: str, wanted: IPAddress) -> VmView:
    with ctl.uow() as uow:
        session = uow.session
        vm = repository.get_vm(session, name)
        if vm.state == VmState.CREATING.value:
            raise Conflict(f"VM {name!r} is still being created", vm=name)
        nic = _nic_for(vm, wanted)
        current = next((a for a in nic.addresses if a.version == wanted.version), None)
        if current is not None and current.address == str(wanted):
            return vm_view(vm)
        if current is not None:
            _release(session, current)
            session.flush()
            nic.addresses.remove(current)
        _take_named(session, nic.network, nic, wanted)
        uow.commit()
        session.expire(vm)
        return vm_view(repository.get_vm(session, name))


def _nic_for(vm: Vm, address: IPAddress) -> Nic:
    for nic in vm.nics:
        if any(address in parse_network(s.cidr) for s in nic.network.subnets):
            return nic
    networks = ", ".join(sorted({n.network.name for n in vm.nics}))
    raise InvalidInput(
        f"{address} is in no subnet of the networks of VM {vm.name!r} ({networks})",
        address=str(address),
    )


def list_vms(ctl: Controller) -> list[VmView]:
    """The global VM list: every VM with host, MACs and addresses."""
    with ctl.uow() as uow:
        return [vm_view(v) for v in repository.list_vms(uow.session)]


def show_vm(ctl: Controller, name: str) -> VmView:
    """One VM."""
    with ctl.uow() as uow:
        return vm_view(repository.get_vm(uow.session, name))


def recover_interrupted_creates(ctl: Controller) -> list[str]:
    """Undo creates whose process died (or whose claim lapsed); returns the VMs undone."""
    now = datetime.now(UTC)
    with ctl.uow() as uow:
        pending = uow.session.scalars(select(Vm).where(Vm.state == VmState.CREATING.value)).all()
        stale = [
            (vm.name, host_ref(vm.host))
            for vm in pending
            if vm.owner != ctl.owner
            and (
                owner_alive(vm.owner or "") is False
                or (vm.claim_expires is not None and _aware(vm.claim_expires) < now)
            )
        ]
    for name, host in stale:
        log.warning("undoing the interrupted create of VM %s", name)
        _undo_create(ctl, name, ctl.agents.hypervisor(host))
    return [name for name, _ in stale]


def _aware(moment: datetime) -> datetime:
    """SQLite returns naive datetimes; they were stored in UTC."""
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)
