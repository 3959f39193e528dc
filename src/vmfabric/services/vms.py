"""VM use cases, with the patent's IP presetting (CN102710814A) at their heart.

Creating a VM is a short saga, because the hypervisor and the DHCP server are outside the
database: (1) one transaction presets every NIC's address and records the VM as `creating`,
claimed by this process for a while; (2) the host's agent defines the VM and returns its MACs;
(3) one transaction records the MACs (and SLAAC addresses derived from them) and the VM as
running; (4) the DHCP reservations are written; (5) the VM starts. A failure at any step undoes
the earlier ones. A process killed before (3) leaves a `creating` VM whose claim lapses or
whose owner is gone; `recover_interrupted_creates` undoes it, so no address leaks. One killed
after (3) leaves a running VM that did not start; `resume_vms` starts it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from functools import partial
from typing import ParamSpec, TypeVar

import anyio
import anyio.to_thread
from sqlalchemy import Connection, delete, select

from vmfabric.domain.dns_records import group_name
from vmfabric.domain.errors import Conflict, Exhausted, InvalidInput, Unavailable
from vmfabric.domain.ipam import IPAddress, eui64_address, key_value, parse_address, parse_network
from vmfabric.domain.model import DefinedVm, Ipv6Mode, NicSpec, Reservation, VmSpec, VmState
from vmfabric.domain.names import MAX_LABEL, check_name, normalize_mac
from vmfabric.hypervisor import Hypervisor, HypervisorError
from vmfabric.process_identity import owner_alive
from vmfabric.services.context import Controller, HostRef, transaction
from vmfabric.services.groups import enforce_blocks
from vmfabric.services.hosts import host_ref
from vmfabric.services.networks import plan_of
from vmfabric.services.policies import apply_policies, forget_rules
from vmfabric.services.views import (
    HeldAddress,
    VmView,
    as_utc,
    nic_view_of,
    reservation_for,
    reservation_of,
    vm_view,
)
from vmfabric.store import allocator, repository
from vmfabric.store.repository import HostRecord, NetworkRecord, SubnetRecord
from vmfabric.store.tables import Allocation, Host, Nic, Vm, utcnow

log = logging.getLogger(__name__)
T = TypeVar("T")
P = ParamSpec("P")

DEFAULT_IMAGE = "debian12"
DEFINE_ATTEMPTS = 3


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


@dataclass(frozen=True)
class _PresetNic:
    """A NIC as the create saga knows it: its row, its network, what it holds."""

    id: int
    network: NetworkRecord
    held: tuple[HeldAddress, ...]
    mac: str | None = None


@dataclass(frozen=True)
class _Preset:
    """What step 1 stored, kept in memory for the rest of the saga and its answer."""

    vm_id: int
    host: HostRecord
    created_at: datetime
    nics: tuple[_PresetNic, ...]
    group: str
    image: str


@dataclass(frozen=True)
class _Defined:
    """What step 3 recorded: the NICs with their MACs, whether the VM's group is blocked and
    whether a network of its has a policy (asked in the same transaction, so a block or
    policy committed later finds the MACs)."""

    nics: list[_PresetNic]
    blocked: bool
    policed: bool


async def create_vm(ctl: Controller, request: CreateVm) -> VmView:
    """Create a VM whose NICs get exactly the preset addresses from DHCP.

    It is the hot path of the controller, so it runs on the event loop: its transactions go to
    the database writer (Core statements, several creates per commit) and only host calls that
    block take a worker thread; its answer is built from what it wrote, not read back. The VM
    is recorded as running with its MACs just before it starts: a controller killed in between
    finds it defined and not running when it restarts, and starts it (`resume_vms`). A create
    that began is finished or undone even if the client goes away meanwhile.
    """
    _check_request(request)
    with anyio.CancelScope(shield=True):
        preset = await ctl.writes.run_async(partial(_preset, ctl, request))
        hypervisor = ctl.agents.hypervisor(host_ref(preset.host))
        try:
            defined = await _define(ctl, hypervisor, request, preset)
            nics = defined.nics
            if defined.blocked:  # quarantined before its first packet
                await anyio.to_thread.run_sync(enforce_blocks, ctl, {preset.host.name})
            if defined.policed:  # its network's policy before its first packet
                await anyio.to_thread.run_sync(apply_policies, ctl, {request.name})
            _put_all(ctl, [_reservation(request.name, n) for n in nics])
            await _on_host(hypervisor, hypervisor.start, request.name)
        except BaseException:
            await anyio.to_thread.run_sync(_undo_create, ctl, request.name, hypervisor)
            raise
    ctl.names_changed([request.name])
    views = [nic_view_of(n.network.name, n.mac, n.held) for n in nics]
    return VmView(
        request.name,
        preset.host.name,
        request.image,
        VmState.RUNNING.value,
        views,
        preset.created_at,
    )


def _check_request(request: CreateVm) -> None:
    check_name("VM", request.name)
    check_name("host", request.host)
    check_name("image", request.image)
    group = group_name(request.host, request.image)
    if len(group) > MAX_LABEL:
        raise InvalidInput(
            f"host {request.host!r} with image {request.image!r} makes group name {group!r}, "
            f"{len(group)} characters; a DNS label has at most {MAX_LABEL}: choose a shorter "
            "image name",
            image=request.image,
        )
    if not request.nics:
        raise InvalidInput("a VM needs at least one NIC (--network)")
    for nic in request.nics:
        check_name("network", nic.network)
        if nic.address is not None:
            parse_address(nic.address)


def _preset(ctl: Controller, request: CreateVm, conn: Connection) -> _Preset:
    """Step 1 of the patent: fix every NIC's address before the VM exists."""
    host = repository.host_for_new_vm(conn, request.host, request.name)
    created = utcnow()
    vm_id = repository.insert_vm(
        conn,
        {
            "name": request.name,
            "host_id": host.id,
            "image": request.image,
            "state": VmState.CREATING.value,
            "owner": ctl.owner,
            "claim_expires": created + ctl.create_claim,
            "created_at": created,
        },
    )
    nics = []
    for position, nic_request in enumerate(request.nics):
        network = repository.network_record(conn, nic_request.network)
        nic_id = repository.insert_nic(conn, vm_id, network.id, position)
        held = _preset_addresses(conn, network, nic_id, nic_request.address)
        nics.append(_PresetNic(nic_id, network, held))
    group = group_name(host.name, request.image)
    return _Preset(vm_id, host, created, tuple(nics), group, request.image)


def _spec(request: CreateVm, preset: _Preset) -> VmSpec:
    """What the hypervisor is asked to define: one port per NIC on the host's bridge."""
    nics = tuple(NicSpec(n.network.name, preset.host.bridge, n.network.vlan) for n in preset.nics)
    return VmSpec(name=request.name, image=request.image, nics=nics)


def _preset_addresses(
    conn: Connection, network: NetworkRecord, nic_id: int, wanted: str | None
) -> tuple[HeldAddress, ...]:
    """Give the NIC the wanted address and a free one of every other family it needs."""
    held = []
    if wanted is not None:
        held.append(_take_named(conn, network, nic_id, parse_address(wanted)))
    for version in sorted({s.version for s in network.subnets} - {a.version for a in held}):
        subnets = [s for s in network.subnets if s.version == version]
        if not any(s.ipv6_mode == Ipv6Mode.SLAAC.value for s in subnets):
            held.append(_take_any(conn, network, nic_id, subnets))
    return tuple(held)


def _held(subnet: SubnetRecord, address: str) -> HeldAddress:
    return HeldAddress(subnet.version, address, subnet.gateway, subnet.ipv6_mode)


def _take_named(
    conn: Connection, network: NetworkRecord, nic_id: int, address: IPAddress
) -> HeldAddress:
    subnet = _subnet_for(network, address)
    refusal = plan_of(subnet).refusal(address)
    if refusal is not None:
        raise InvalidInput(refusal, address=str(address))
    if subnet.ipv6_mode == Ipv6Mode.SLAAC.value:
        raise InvalidInput(
            f"{address}: addresses in the SLAAC subnet {subnet.cidr} derive from the MAC; "
            "create the network with --ipv6-mode dhcpv6 to preset IPv6 addresses"
        )
    allocator.lock_subnet(conn, subnet.id)
    if not allocator.take(conn, subnet.id, int(address)):
        allocator.ensure_not_held(conn, subnet.id, address)
        raise Conflict(f"{address} is not free in {subnet.cidr}", address=str(address))
    return _held(subnet, allocator.assign(conn, subnet.id, subnet.version, nic_id, int(address)))


def _subnet_for(network: NetworkRecord, address: IPAddress) -> SubnetRecord:
    for subnet in network.subnets:
        if address in parse_network(subnet.cidr):
            return subnet
    cidrs = ", ".join(s.cidr for s in network.subnets)
    raise InvalidInput(
        f"{address} is outside the subnets of network {network.name!r} ({cidrs})",
        address=str(address),
    )


def _take_any(
    conn: Connection, network: NetworkRecord, nic_id: int, subnets: list[SubnetRecord]
) -> HeldAddress:
    for subnet in subnets:
        allocator.lock_subnet(conn, subnet.id)
        value = allocator.take_lowest(conn, subnet.id)
        if value is not None:
            return _held(subnet, allocator.assign(conn, subnet.id, subnet.version, nic_id, value))
    used = allocator.used(conn, [s.id for s in subnets])
    fullness = "; ".join(
        f"{s.cidr} has {used[s.id]} of {s.capacity} addresses in use" for s in subnets
    )
    raise Exhausted(
        f"network {network.name!r} has no free IPv{subnets[0].version} address: {fullness}",
        network=network.name,
        subnets=[{"cidr": s.cidr, "used": used[s.id], "capacity": s.capacity} for s in subnets],
    )


class _MacTaken(Exception):
    """The hypervisor chose a MAC that a NIC of another VM already has."""


async def _define(
    ctl: Controller, hypervisor: Hypervisor, request: CreateVm, preset: _Preset
) -> _Defined:
    """Steps 2 and 3: the host defines the VM and chooses its MACs, which are recorded.

    Hypervisors choose MACs at random in 52:54:00, and each knows only its own host's, so
    in a cloud of thousands of VMs two NICs get the same one now and then (a one-in-five
    chance among 2,500 VMs). Such a VM is defined afresh, which draws new MACs.
    """
    for _attempt in range(DEFINE_ATTEMPTS):
        defined = await _on_host(hypervisor, hypervisor.define, _spec(request, preset))
        try:
            return await ctl.writes.run_async(partial(_record_macs, preset, defined))
        except _MacTaken as taken:
            log.info("VM %s: %s; defining it again", request.name, taken)
            await _on_host(hypervisor, hypervisor.undefine, request.name)
    raise Conflict(
        f"host {preset.host.name!r} chose MACs already in use {DEFINE_ATTEMPTS} times "
        f"for VM {request.name!r}",
        vm=request.name,
    )


def _record_macs(preset: _Preset, defined: DefinedVm, conn: Connection) -> _Defined:
    """Step 3: keep the MACs the hypervisor chose, and the SLAAC addresses they imply; the VM
    is no longer a create in progress but one that runs."""
    if len(defined.macs) != len(preset.nics):
        raise Unavailable(
            f"hypervisor returned {len(defined.macs)} MACs for {len(preset.nics)} NICs "
            f"of {defined.name!r}"
        )
    macs = [normalize_mac(m) for m in defined.macs]
    for mac in macs:
        holder = repository.mac_holder(conn, mac, preset.vm_id)
        if holder is not None:
            raise _MacTaken(f"MAC {mac} is already VM {holder!r}'s")
    nics = []
    for nic, mac in zip(preset.nics, macs, strict=True):
        repository.set_mac(conn, nic.id, mac)
        nics.append(replace(nic, mac=mac, held=nic.held + _claim_slaac(conn, nic, mac)))
    _write_state(defined.name, VmState.RUNNING, conn)
    blocked = repository.is_blocked(conn, preset.group, preset.image)
    policed = any(repository.has_network_policy(conn, nic.network.id) for nic in preset.nics)
    return _Defined(nics, blocked, policed)


def _claim_slaac(conn: Connection, nic: _PresetNic, mac: str) -> tuple[HeldAddress, ...]:
    """The EUI-64 address of the MAC in the network's first SLAAC subnet, if it has one."""
    if any(a.version == 6 for a in nic.held):
        return ()
    for subnet in nic.network.subnets:
        if subnet.ipv6_mode == Ipv6Mode.SLAAC.value:
            address = eui64_address(parse_network(subnet.cidr), mac)
            allocator.ensure_not_held(conn, subnet.id, address)
            text = allocator.assign(conn, subnet.id, 6, nic.id, int(address))
            return (_held(subnet, text),)
    return ()


def _reservation(name: str, nic: _PresetNic) -> Reservation:
    assert nic.mac is not None
    return reservation_for(nic.network.name, nic.mac, name, nic.held)


def _put_all(ctl: Controller, reservations: list[Reservation]) -> None:
    """Step 4: the DHCP server learns MAC -> address for every NIC of the VM."""
    for reservation in reservations:
        ctl.dhcp.put(reservation)


def _write_reservations(ctl: Controller, name: str) -> None:
    with ctl.uow() as uow:
        vm = repository.get_vm(uow.session, name)
        reservations = [r for r in (reservation_of(n) for n in vm.nics) if r is not None]
    _put_all(ctl, reservations)


def _set_state(ctl: Controller, name: str, state: VmState) -> None:
    """Record the VM's state; a settled VM is nobody's claim any more."""
    ctl.writes.run(partial(_write_state, name, state))
    ctl.names_changed([name])


def _write_state(name: str, state: VmState, conn: Connection) -> None:
    repository.set_vm_state(conn, name, state.value)


def _call(operation: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
    """Run a hypervisor operation, turning its failures into a 503 for the operator."""
    try:
        return operation(*args, **kwargs)
    except HypervisorError as error:
        raise Unavailable(str(error)) from error


async def _on_host(
    hypervisor: Hypervisor, operation: Callable[P, T], *args: P.args, **kwargs: P.kwargs
) -> T:
    """`_call` from the event loop: in a worker thread when the driver blocks."""
    if hypervisor.blocks:
        return await anyio.to_thread.run_sync(partial(_call, operation, *args, **kwargs))
    return _call(operation, *args, **kwargs)


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
    ctl.names_changed([name])


def _delete_records(ctl: Controller, name: str) -> None:
    with ctl.uow() as uow:
        vm = repository.find_vm(uow.session, name)
        if vm is None:
            return
        conn = uow.connection
        for nic in vm.nics:
            for allocation in nic.addresses:
                _release(conn, allocation)
        conn.execute(delete(Vm).where(Vm.id == vm.id))
        uow.commit()


def _release(conn: Connection, allocation: Allocation) -> None:
    subnet = allocation.subnet
    allocator.lock_subnet(conn, subnet.id)
    slaac = subnet.ipv6_mode == Ipv6Mode.SLAAC.value
    allocator.release(conn, subnet.id, key_value(allocation.address_key), to_free_space=not slaac)


@dataclass(frozen=True)
class _Placed:
    """Where a settled VM runs: its host's hypervisor, and the host when the VM is under a
    block (its switch holds quarantine rules for the VM)."""

    hypervisor: Hypervisor
    blocked_on: str | None
    host: HostRef
    vm_id: int


def _placed(ctl: Controller, name: str) -> _Placed:
    with ctl.uow() as uow:
        vm = repository.get_vm(uow.session, name)
        if vm.state == VmState.CREATING.value:
            raise Conflict(f"VM {name!r} is still being created", vm=name)
        group = group_name(vm.host.name, vm.image)
        blocked = repository.is_blocked(uow.connection, group, vm.image)
        host = host_ref(vm.host)
        hypervisor = ctl.agents.hypervisor(host)
        return _Placed(hypervisor, vm.host.name if blocked else None, host, vm.id)


def delete_vm(ctl: Controller, name: str) -> None:
    """Remove the VM from its host, then its reservations, then free its addresses (and its
    quarantine and policy rules)."""
    placed = _placed(ctl, name)
    _call(placed.hypervisor.undefine, name)
    _forget_vm(ctl, name)
    if placed.blocked_on is not None:
        enforce_blocks(ctl, {placed.blocked_on})
    forget_rules(ctl, placed.host, placed.vm_id)


def stop_vm(ctl: Controller, name: str) -> VmView:
    """Shut the VM down; it keeps its addresses and reservations."""
    _call(_placed(ctl, name).hypervisor.stop, name)
    _set_state(ctl, name, VmState.STOPPED)
    return show_vm(ctl, name)


def start_vm(ctl: Controller, name: str) -> VmView:
    """Boot the VM again; DHCP hands it the same addresses."""
    _write_reservations(ctl, name)
    placed = _placed(ctl, name)
    _call(placed.hypervisor.start, name)
    _set_state(ctl, name, VmState.RUNNING)
    if placed.blocked_on is not None:  # a libvirt port is new at each start: match it too
        enforce_blocks(ctl, {placed.blocked_on})
    apply_policies(ctl, {name})
    return show_vm(ctl, name)


def set_ip(ctl: Controller, name: str, address: str) -> VmView:
    """Move the VM's NIC on the address's network to `address`, reservation included.

    The guest gets the new address at its next DHCP exchange (renewal or restart).
    """
    check_name("VM", name)
    wanted = parse_address(address)
    transaction(lambda: _move_address(ctl, name, wanted))
    _write_reservations(ctl, name)
    return show_vm(ctl, name)


def _move_address(ctl: Controller, name: str, wanted: IPAddress) -> None:
    with ctl.uow() as uow:
        vm = repository.get_vm(uow.session, name)
        if vm.state == VmState.CREATING.value:
            raise Conflict(f"VM {name!r} is still being created", vm=name)
        nic = _nic_for(vm, wanted)
        current = next((a for a in nic.addresses if a.version == wanted.version), None)
        if current is not None and current.address == str(wanted):
            return
        conn = uow.connection
        network = repository.network_record(conn, nic.network.name)
        if current is not None:
            _release(conn, current)
        _take_named(conn, network, nic.id, wanted)
        uow.commit()


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
                or (vm.claim_expires is not None and as_utc(vm.claim_expires) < now)
            )
        ]
    for name, host in stale:
        log.warning("undoing the interrupted create of VM %s", name)
        _undo_create(ctl, name, ctl.agents.hypervisor(host))
    return [name for name, _ in stale]


def resume_vms(ctl: Controller) -> list[str]:
    """Start the VMs recorded as running that their host has defined but not running.

    A create records the VM as running just before starting it, so a controller killed in
    between leaves one so; a host may also have lost a VM's processes. VMs stopped on purpose
    are recorded as stopped and stay so. A host that cannot be asked is skipped.
    """
    with ctl.uow() as uow:
        rows = uow.session.execute(
            select(Vm.name, Host).join(Host).where(Vm.state == VmState.RUNNING.value)
        ).all()
        wanted: dict[HostRef, set[str]] = {}
        for name, stored_host in rows:
            wanted.setdefault(host_ref(stored_host), set()).add(name)
    resumed = []
    for host, names in wanted.items():
        hypervisor = ctl.agents.hypervisor(host)
        try:
            listed = hypervisor.list_vms()
            for name in sorted(v.name for v in listed if v.name in names and not v.running):
                log.warning("VM %s should run on %s but does not; starting it", name, host.name)
                hypervisor.start(name)
                resumed.append(name)
        except HypervisorError:
            log.exception("could not check the VMs of host %s", host.name)
    return resumed
