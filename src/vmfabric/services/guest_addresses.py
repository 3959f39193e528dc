"""Addresses guests configured themselves, registered as their agents report them.

CN101652749A (point 1): statically configured addresses are read from the host too. A sweep
asks the guest agent of every running VM for its interfaces (`guest-network-get-interfaces`)
and keeps, per NIC (matched by MAC), the unicast addresses that DHCP did not give: the NIC's
preset addresses are left to the lease events, so that a release still shows in DNS within
a second. The rest are stored, registered under the VM's name and group, and forgotten when
the guest no longer reports them. A VM whose agent does not answer keeps what was last seen:
an agent restarting must not make names flap.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from collections.abc import Mapping
from dataclasses import dataclass

from sqlalchemy import delete, select

from vmfabric.guest import GuestAgentError, GuestInterface
from vmfabric.guest.qga import QgaClient
from vmfabric.services.context import Controller, transaction
from vmfabric.services.hosts import host_ref
from vmfabric.store import repository
from vmfabric.store.tables import GuestAddress, Nic

log = logging.getLogger(__name__)

SWEEP_CONCURRENCY = 16
AGENT_TIMEOUT_S = 2.0


@dataclass(frozen=True)
class _Guest:
    """A running VM to ask: its agent's socket, and per NIC MAC the NIC and its preset IPs."""

    vm: str
    socket: str
    nics: Mapping[str, tuple[int, frozenset[str]]]


def sweep_guest_addresses(ctl: Controller) -> list[str]:
    """Ask every running VM's agent for its addresses and store what changed; the VMs whose
    static addresses changed (their names are republished)."""
    guests = _guests(ctl)
    seen = asyncio.run(_ask_all(guests))
    changed = transaction(lambda: _store(ctl, seen))
    if changed:
        ctl.names_changed(changed)
    return changed


def _guests(ctl: Controller) -> list[_Guest]:
    with ctl.uow() as uow:
        wanted = [
            (vm.name, host_ref(vm.host), {n.mac: _nic(n) for n in vm.nics if n.mac})
            for vm in repository.running_vms(uow.session)
        ]
    guests = []
    for name, host, nics in wanted:
        socket = ctl.agents.hypervisor(host).agent_socket(name)
        if socket is not None:
            guests.append(_Guest(name, socket, nics))
    return guests


def _nic(nic: Nic) -> tuple[int, frozenset[str]]:
    """A NIC's id and its preset addresses (which DHCP gives, so not static ones)."""
    return nic.id, frozenset(address.address for address in nic.addresses)


async def _ask_all(guests: list[_Guest]) -> dict[str, dict[int, set[str]] | None]:
    """Static addresses per NIC of each VM, or None for a VM whose agent did not answer;
    at most SWEEP_CONCURRENCY agents at once, none waited on beyond AGENT_TIMEOUT_S."""
    limit = asyncio.Semaphore(SWEEP_CONCURRENCY)

    async def ask(guest: _Guest) -> tuple[str, dict[int, set[str]] | None]:
        async with limit:
            try:
                async with asyncio.timeout(AGENT_TIMEOUT_S * 2):
                    client = await QgaClient.connect(guest.socket, timeout=AGENT_TIMEOUT_S)
                    try:
                        interfaces = await client.network_interfaces()
                    finally:
                        await client.close()
            except (GuestAgentError, TimeoutError, OSError) as error:
                log.debug("agent of VM %s: %s", guest.vm, error)
                return guest.vm, None
        return guest.vm, _static(guest, interfaces)

    return dict(await asyncio.gather(*(ask(guest) for guest in guests)))


def _static(guest: _Guest, interfaces: list[GuestInterface]) -> dict[int, set[str]]:
    found: dict[int, set[str]] = {nic: set() for nic, _ in guest.nics.values()}
    for interface in interfaces:
        nic = guest.nics.get(interface.mac or "")
        if nic is None:
            continue
        nic_id, preset = nic
        for entry in interface.addresses:
            address = ipaddress.ip_address(entry.address.split("%")[0])
            unicast = not (
                address.is_loopback
                or address.is_link_local
                or address.is_multicast
                or address.is_unspecified
            )
            if unicast and str(address) not in preset:
                found[nic_id].add(str(address))
    return found


def _store(ctl: Controller, seen: Mapping[str, dict[int, set[str]] | None]) -> list[str]:
    changed: list[str] = []
    with ctl.uow() as uow:
        session = uow.session
        for vm, nics in seen.items():
            if nics is None:
                continue
            rows = session.scalars(select(GuestAddress).where(GuestAddress.nic_id.in_(nics)))
            stored = {(row.nic_id, row.address) for row in rows}
            wanted = {(nic, address) for nic, addresses in nics.items() for address in addresses}
            for nic, address in stored - wanted:
                session.execute(
                    delete(GuestAddress).where(
                        GuestAddress.nic_id == nic, GuestAddress.address == address
                    )
                )
            for nic, address in wanted - stored:
                session.add(GuestAddress(nic_id=nic, address=address))
            if stored != wanted:
                changed.append(vm)
        uow.commit()
    return sorted(changed)
