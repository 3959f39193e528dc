"""Moving a running lab VM to another host, as libvirt moves a domain.

A lab VM is a namespace with veth NICs plugged into its host's bridge. It moves in three steps,
in libvirt's order, so that whoever watches the switches sees what a real migration shows:

1. `begin`: for each NIC, a destination port appears on the destination's bridge (an access
   port of the NIC's VLAN marked with the NIC's MAC, as libvirt plugs taps). Its VM end is born
   inside the VM's own namespace under a temporary name, with the NIC's MAC, down: the paused
   incoming domain.
2. The copy time (`COPY_SECONDS`), while libvirt would copy memory.
3. `switch_over`: one `ip -batch` run per VM takes each old NIC down and hands its name,
   addresses and routes to the new end, which comes up; then it deletes the old veth (so the
   source port vanishes), and the source ports leave the source bridge's database. The new
   ends carry `arp_notify` and `ndisc_notify`, so the VM's kernel announces its addresses
   (gratuitous ARP, unsolicited neighbour advertisement) the moment a NIC comes up, as QEMU
   announces a migrated guest. The new NIC also gets the old one's neighbour entries (as
   `STALE`, so the kernel confirms them by unicast): a guest moved by QEMU keeps its
   neighbour table, and one emptied would have to ask for every peer again, where a lost
   answer costs a second (the kernel's retransmit time). The old NIC goes and the new one
   carries its addresses about 1.5 ms apart.

`abort` instead removes the destination ports: the VM stays as it was on the source.

The VM keeps its namespace, so what runs in it runs on: its qemu-ga (whose socket stays in the
VM's directory), its DHCP clients (busybox udhcpc holds no socket while a lease is bound and
finds its interface by name at renewal, so it renews through the new NIC), a server, a capture
on `any`. The lab's record follows the move: the VM's record is now keyed by the destination,
its NICs name the destination's bridge and ports, its processes are recorded under the
destination's names and its faults (`vmfabric.lab.faults.carry_over`) follow it.
"""

from __future__ import annotations

import os
import time
from typing import Any

from vmfabric.lab import faults
from vmfabric.lab.errors import LabError, LabInputError
from vmfabric.lab.lifecycle import Progress, quiet
from vmfabric.lab.names import (
    check_label,
    host_bridge,
    incoming_ifname,
    outgoing_ifname,
    vm_ifname,
    vm_port,
)
from vmfabric.lab.netns import device_routes, global_address_details, neighbours
from vmfabric.lab.plumbing import require_lab, unplug
from vmfabric.lab.proc import run
from vmfabric.lab.state import (
    LabState,
    LabStore,
    MigrationRecord,
    NicRecord,
    Record,
    VmRecord,
)
from vmfabric.lab.vm import (
    agent_name,
    dhcp_client_name,
    find_vm,
    is_running,
    plug_nic,
    vm_named,
)

COPY_SECONDS = 0.2
"""How long a move waits between `begin` and `switch_over`, as libvirt copies memory."""

COPY_SECONDS_ENV = "VMFABRIC_LAB_COPY_SECONDS"
"""Overrides `COPY_SECONDS` (tests, benchmarks), in every process that moves lab VMs."""

FOREVER = 0xFFFFFFFF
"""An address lifetime that never ends, as `ip -j addr` shows it."""


def copy_seconds() -> float:
    """The copy time: `VMFABRIC_LAB_COPY_SECONDS` if set, else `COPY_SECONDS`."""
    text = os.environ.get(COPY_SECONDS_ENV)
    if text is None:
        return COPY_SECONDS
    try:
        seconds = float(text)
    except ValueError:
        seconds = -1.0
    if not 0 <= seconds < float("inf"):
        raise LabError(f"{COPY_SECONDS_ENV} must be a number of seconds, not {text!r}")
    return seconds


def migrate(
    name: str,
    to_host: str,
    *,
    from_host: str | None = None,
    cancel: bool = False,
    store: LabStore | None = None,
    progress: Progress = quiet,
) -> dict[str, Any]:
    """Move the running VM `name` (of `from_host`, if given) to `to_host`: begin, copy, switch
    over; with `cancel`, abort after the copy instead. Returns what happened.

    The lab's record stays locked throughout, so no other lab change (nor another move) sees
    the VM half moved. Whatever interrupts the move before the switch-over aborts it.
    """
    with (store or LabStore()).edit() as record:
        vm = movable_vm(record.state, name, from_host, to_host)
        source, seconds = vm.host, copy_seconds()
        progress(f"Plugging VM {name} into {host_bridge(to_host)}")
        try:
            begin(record, vm, to_host)
            progress(f"Copying VM {name} ({seconds:g} s)")
            time.sleep(seconds)
        except BaseException:
            abort(record, vm)
            raise
        if cancel:
            progress(f"Aborting the move of VM {name}")
            abort(record, vm)
            return _outcome(vm, source, to_host, seconds, None)
        progress(f"Switching VM {name} over to {to_host}")
        moved, switch = switch_over(record, vm)
        return _outcome(moved, source, to_host, seconds, switch)


def movable_vm(state: LabState, name: str, from_host: str | None, to_host: str) -> VmRecord:
    """The VM to move, or a LabInputError saying why it cannot move to `to_host`."""
    require_lab(state)
    check_label("host", to_host)
    vm = vm_named(state, name) if from_host is None else find_vm(state, from_host, name)
    if vm is None or not vm.defined:
        raise LabInputError(f"host {from_host} has no VM named {name!r}")
    if to_host not in state.hosts:
        hosts = ", ".join(state.hosts)
        raise LabInputError(f"the lab has no host {to_host!r} (its hosts: {hosts})")
    if to_host == vm.host:
        raise LabInputError(f"VM {name} already runs on {to_host}")
    if not is_running(state, vm):
        raise LabInputError(f"VM {name} on {vm.host} is not running: only a running VM migrates")
    if find_vm(state, to_host, name) is not None:
        raise LabInputError(f"{to_host} already has a VM named {name}")
    for index, nic in enumerate(vm.nics):
        if nic.bridge != host_bridge(vm.host):
            raise LabInputError(
                f"NIC {index} of VM {name} is on {nic.bridge}, not on its host's bridge "
                f"{host_bridge(vm.host)}: the lab moves only NICs of a host's bridge"
            )
    return vm


def begin(record: Record, vm: VmRecord, to_host: str) -> None:
    """Create the VM's ports on `to_host`'s bridge, their VM ends down in the VM's namespace.

    A move left half done by a crash is aborted first.
    """
    if vm.migration is not None:
        abort(record, vm)
    vm.migration = MigrationRecord(host=to_host, nics=_incoming_nics(vm, to_host))
    record.remember_vm(vm)
    owner = f"VM {vm.name} moving from {vm.host} to {to_host}"
    for nic in vm.migration.nics:
        plug_nic(record, vm, nic, owner)
        _announce_when_up(nic.ifname, vm.netns)


def switch_over(record: Record, vm: VmRecord) -> tuple[VmRecord, float]:
    """Move the VM onto its destination ports; return its record there and how long the
    `ip -batch` run took (the old NICs went and the new ones came up within it).

    The record follows even when some command of the batch failed; the error then says which.
    """
    migration = vm.migration
    if migration is None:
        raise LabError(f"VM {vm.name} is not migrating: begin the move first")
    held_down = {ifname for fault in vm.faults.values() for ifname in fault.links}
    script = "".join(
        _switch_commands(vm.netns, index, new.ifname, up=old.ifname not in held_down)
        for index, (old, new) in enumerate(zip(vm.nics, migration.nics, strict=True))
    )
    started = time.monotonic()
    done = run(["ip", "-n", vm.netns, "-force", "-batch", "-"], stdin=script, check=False)
    seconds = time.monotonic() - started
    for old in vm.nics:
        unplug(record, old.port)
    moved = _follow(record, vm, migration)
    if done.returncode != 0:
        raise LabError(
            f"VM {vm.name} moved to {moved.host}, but its NICs did not come back entirely: "
            + "; ".join(line for line in done.stderr.splitlines() if line)
        )
    return moved, seconds


def abort(record: Record, vm: VmRecord) -> None:
    """Remove the destination ports of a move and their VM ends: the VM stays on its host."""
    if vm.migration is None:
        return
    for nic in vm.migration.nics:
        unplug(record, nic.port)
    vm.migration = None
    record.remember_vm(vm)


def _incoming_nics(vm: VmRecord, to_host: str) -> list[NicRecord]:
    """The NICs as `begin` plugs them on the destination, named as a VM defined there."""
    return [
        nic.model_copy(
            update={
                "bridge": host_bridge(to_host),
                "port": vm_port(to_host, vm.name, index),
                "ifname": incoming_ifname(index),
            }
        )
        for index, nic in enumerate(vm.nics)
    ]


def _announce_when_up(ifname: str, netns: str) -> None:
    """Let the VM's kernel announce the interface's addresses whenever it comes up."""
    run(
        [
            "sysctl",
            "-qw",
            f"net.ipv4.conf.{ifname}.arp_notify=1",
            f"net.ipv6.conf.{ifname}.ndisc_notify=1",
        ],
        netns=netns,
    )


def _switch_commands(netns: str, index: int, incoming: str, *, up: bool) -> str:
    """`ip -batch` lines handing NIC `index` over to the `incoming` interface.

    The old interface goes down and gives up its addresses and its name; the new one takes
    them and comes up (addresses first: the kernel announces what it has when it comes up)
    with the old one's routes and neighbour entries. Deleting the old veth, which takes the
    kernel tens of milliseconds, comes last, once the new interface carries the traffic.
    """
    ifname, outgoing = vm_ifname(index), outgoing_ifname(index)
    addresses = [_address_command(info, ifname) for info in global_address_details(ifname, netns)]
    routes = [
        _route_command(route, ifname, version)
        for version in (4, 6)
        for route in device_routes(ifname, netns, version)
        if route.get("protocol") != "kernel" and route.get("type", "unicast") == "unicast"
    ]
    known = [
        f"neigh replace {address} lladdr {mac} dev {ifname} nud stale"
        for address, mac in neighbours(ifname, netns)
    ]
    lines = [
        f"link set dev {ifname} down",
        f"address flush dev {ifname} scope global",
        f"link set dev {ifname} name {outgoing}",
        f"link set dev {incoming} name {ifname}",
        *addresses,
        *([f"link set dev {ifname} up", *routes, *known] if up else []),
        f"link delete dev {outgoing}",
    ]
    return "".join(f"{line}\n" for line in lines)


def _address_command(info: dict[str, Any], ifname: str) -> str:
    """`address add` giving `ifname` the address `info` (an `ip -j addr` entry) describes."""
    words = ["address", "add", f"{info['local']}/{info['prefixlen']}", "dev", ifname]
    if "broadcast" in info:
        words += ["broadcast", str(info["broadcast"])]
    if info.get("family") == "inet6":
        words.append("nodad")
    valid = info.get("valid_life_time", FOREVER)
    if valid != FOREVER:
        words += ["valid_lft", str(valid), "preferred_lft", str(info["preferred_life_time"])]
    return " ".join(words)


def _route_command(route: dict[str, Any], ifname: str, version: int) -> str:
    """`route replace` of the route `route` (an `ip -j route` entry) through `ifname`."""
    destination = str(route["dst"])
    if destination == "default":
        destination = "0.0.0.0/0" if version == 4 else "::/0"
    words = ["route", "replace", destination]
    if "gateway" in route:
        words += ["via", str(route["gateway"])]
    words += ["dev", ifname, "proto", str(route.get("protocol", "boot"))]
    for key in ("metric", "scope"):
        if key in route:
            words += [key, str(route[key])]
    return " ".join(words)


def _follow(record: Record, vm: VmRecord, migration: MigrationRecord) -> VmRecord:
    """Make the record say what the switch-over did: the VM is on the destination."""
    moved = vm.model_copy(
        deep=True,
        update={
            "host": migration.host,
            "nics": [
                incoming.model_copy(update={"ifname": old.ifname})
                for old, incoming in zip(vm.nics, migration.nics, strict=True)
            ],
            "faults": {},
            "migration": None,
        },
    )
    renames = [(agent_name(vm), agent_name(moved))]
    renames += [(dhcp_client_name(vm, nic), dhcp_client_name(moved, nic)) for nic in vm.nics]
    for old_name, new_name in renames:
        record.rename_process(old_name, new_name)
    faults.carry_over(record, vm, moved)
    for nic in moved.nics:
        link = record.state.links.get(nic.port)
        if link is not None:
            owner = f"VM {vm.name} on {moved.host}"
            record.remember_link(link.model_copy(update={"peer": nic.ifname, "owner": owner}))
    record.forget_vm(vm.key)
    record.remember_vm(moved)
    return moved


def _outcome(
    vm: VmRecord, source: str, to_host: str, copy: float, switch: float | None
) -> dict[str, Any]:
    return {
        "vm": vm.name,
        "from": source,
        "to": to_host,
        "outcome": "aborted" if switch is None else "moved",
        "host": vm.host,
        "copy_seconds": copy,
        "switch_seconds": switch,
        "nics": [
            {"ifname": nic.ifname, "mac": nic.mac, "bridge": nic.bridge, "port": nic.port}
            for nic in vm.nics
        ],
    }
