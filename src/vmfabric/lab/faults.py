"""Faults of lab VMs, so what checks a VM's network and guest agent can be tested (issue 5).

Each kind breaks one thing the way it breaks in a cloud, for that VM only:

- `gateway-down`: its networks' routers stop answering it. OpenFlow rules on the VM's host
  bridge drop every frame between the VM's MAC and the router's MAC, both ways: no ARP reply,
  no echo reply, nothing routed (IPv4 and IPv6 alike), while other VMs keep their gateway.
- `external-down`: the way to `vmf-wan` breaks while the gateway still answers: rules drop IPv4
  between the VM's MAC and 203.0.113.0/24, both ways.
- `agent-stop`: the VM's qemu-ga is stopped; its socket refuses connections (or is gone).
- `agent-hang`: qemu-ga is stopped and a listener on its socket accepts connections and never
  answers, as an agent stuck inside a guest does.
- `nic-down`: the VM's NICs are set down inside its namespace.
- `access-down`: the VM's guest proxy (`vmfabric.lab.services`) is stopped: the access channel's
  socket is gone, as when the proxy died inside a guest. Heal starts it again (in a running VM).

Rules carry a cookie whose top 16 bits are `FAULT_COOKIE_KIND`, so they are found and removed
by cookie and never mixed up with the quarantine rules (0x0B10). They sit at `FAULT_PRIORITY`,
above the quarantine rules (40000-40100): a fault only drops, so it never lets through what a
quarantine drops, and the allow rules of a quarantine (DHCP, `--allow` networks) cannot hide it.

Every fault is recorded in the VM's record before it is made, so `lab status` shows it, `heal`
undoes it from any process, and `lab down` (or removing the VM) clears it.
"""

from __future__ import annotations

import ipaddress
import signal
import sys
from enum import StrEnum
from pathlib import Path
from typing import Any

from vmfabric.lab import ovs, proc
from vmfabric.lab.errors import LabInputError
from vmfabric.lab.names import ROUTER_LAN_IF, WAN_ADDRESS, short_id
from vmfabric.lab.netns import link_mac, set_link
from vmfabric.lab.plumbing import require_lab
from vmfabric.lab.services import ACCESS, ACCESS_FAULT, start_service, stop_service
from vmfabric.lab.state import (
    FaultRecord,
    FlowRecord,
    LabStore,
    ProcessRecord,
    Record,
    VmRecord,
)
from vmfabric.lab.vm import (
    agent_name,
    clear_fault,
    dhcp_client_name,
    spawn_socket_owner,
    start_agent,
    vm_agent_socket,
    vm_named,
)

FAULT_COOKIE_KIND = 0xFA17
"""Top 16 bits of a fault rule's cookie; then the kind's number (16 bits), the VM's (32)."""

FAULT_PRIORITY = 50000
"""Above the quarantine rules, which a fault must not be hidden by (see above)."""

HANG_LISTENER = """\
import os, socket, sys
staging, path = sys.argv[1:]
server = socket.socket(socket.AF_UNIX)
server.bind(staging)
server.listen()
os.replace(staging, path)
held = []
while True:
    held.append(server.accept()[0])
"""
"""Binds and listens on a staging path, then renames it onto the agent's: a client finds the
socket only once it accepts. It holds every connection open and never reads or answers."""


class FaultKind(StrEnum):
    """What a fault breaks."""

    GATEWAY_DOWN = "gateway-down"
    EXTERNAL_DOWN = "external-down"
    AGENT_STOP = "agent-stop"
    AGENT_HANG = "agent-hang"
    NIC_DOWN = "nic-down"
    ACCESS_DOWN = ACCESS_FAULT


AGENT_KINDS = frozenset({FaultKind.AGENT_STOP, FaultKind.AGENT_HANG})
"""Two states of one agent channel: a VM has at most one of them."""


def parse_kind(text: str) -> FaultKind:
    """The kind named `text`, or a LabInputError listing the kinds."""
    try:
        return FaultKind(text)
    except ValueError:
        kinds = ", ".join(kind.value for kind in FaultKind)
        raise LabInputError(f"unknown fault kind {text!r}; the kinds are {kinds}") from None


def inject(vm_name: str, kind_text: str, store: LabStore | None = None) -> dict[str, Any]:
    """Put fault `kind_text` in place on VM `vm_name`; doing it again changes nothing.

    A fault already recorded is made again (rules re-added, a dead listener restarted), so
    the VM ends in the faulty state whatever happened to it meanwhile.
    """
    kind = parse_kind(kind_text)
    with (store or LabStore()).edit() as record:
        vm = vm_named(record.state, vm_name)
        require_lab(record.state)
        _refuse_other_agent_fault(vm, kind)
        changed = kind not in vm.faults
        fault = _plan(record, vm, kind)
        vm.faults[kind.value] = fault
        record.remember_vm(vm)
        _make(record, vm, fault)
        return {**_summary(vm), "kind": kind.value, "changed": changed, "fault": fault.model_dump()}


def heal(vm_name: str, store: LabStore | None = None) -> dict[str, Any]:
    """Undo every fault of VM `vm_name`, each forgotten once it is undone."""
    with (store or LabStore()).edit() as record:
        vm = vm_named(record.state, vm_name)
        healed = []
        for kind, fault in list(vm.faults.items()):
            clear_fault(record, fault)
            _restore(record, vm, fault)
            del vm.faults[kind]
            record.remember_vm(vm)
            healed.append(kind)
        return {**_summary(vm), "healed": healed}


def carry_over(record: Record, before: VmRecord, after: VmRecord) -> None:
    """Give a migrated VM's faults to its record on the destination (`after`, whose NICs are
    on the destination's bridges): a fault is a condition of the VM, so it follows the VM.

    Rules are made again for the new bridges (and the cookie naming the new host) before the
    source's go; the fault's processes run on in the VM's namespace, recorded under the new
    host's names; NICs a fault holds down the switch-over left down.
    """
    for kind, fault in before.faults.items():
        moved = _plan(record, after, FaultKind(kind))
        for flows in moved.flows:
            ovs.add_flows(flows.bridge, flows.rules)
        for flows in fault.flows:
            ovs.delete_flows(flows.bridge, flows.cookie)
        for old, new in zip(fault.processes, moved.processes, strict=True):
            record.rename_process(old, new)
        after.faults[kind] = moved


def fault_cookie(vm: VmRecord, kind: FaultKind) -> int:
    """The cookie of a fault's rules: lab faults, the kind, and the VM (host and name)."""
    number = list(FaultKind).index(kind) + 1
    return FAULT_COOKIE_KIND << 48 | number << 32 | int(short_id(vm.host, vm.name), 16)


def _summary(vm: VmRecord) -> dict[str, Any]:
    return {"vm": vm.name, "host": vm.host, "faults": list(vm.faults)}


def _refuse_other_agent_fault(vm: VmRecord, kind: FaultKind) -> None:
    """agent-stop (refused) and agent-hang (accepted, unanswered) cannot both hold."""
    other = next((k for k in vm.faults if k in AGENT_KINDS and k != kind), None)
    if kind in AGENT_KINDS and other is not None:
        raise LabInputError(
            f"VM {vm.name} has fault {other}; run `vmfabric lab heal {vm.name}` before {kind}"
        )


def _plan(record: Record, vm: VmRecord, kind: FaultKind) -> FaultRecord:
    """The fault's record: the rules and processes it makes, the links it sets down."""
    fault = FaultRecord(kind=kind.value)
    if kind is FaultKind.GATEWAY_DOWN:
        fault.flows = _flows(vm, kind, _gateway_matches(record, vm))
    elif kind is FaultKind.EXTERNAL_DOWN:
        fault.flows = _flows(vm, kind, _external_matches(record, vm))
    elif kind is FaultKind.AGENT_HANG:
        fault.processes = [_hang_name(vm)]
    elif kind is FaultKind.NIC_DOWN:
        fault.links = [nic.ifname for nic in vm.nics]
    return fault


def _make(record: Record, vm: VmRecord, fault: FaultRecord) -> None:
    """Put in place what the record names; every step may be repeated."""
    for flows in fault.flows:
        ovs.add_flows(flows.bridge, flows.rules)
    for ifname in fault.links:
        set_link(ifname, up=False, netns=vm.netns)
    if fault.kind in AGENT_KINDS:
        _stop_agent(record, vm)
    if fault.kind == FaultKind.AGENT_HANG:
        _ensure_hang_listener(record, vm)
    if fault.kind == FaultKind.ACCESS_DOWN:
        stop_service(record, vm, ACCESS)


def _restore(record: Record, vm: VmRecord, fault: FaultRecord) -> None:
    """Give back what the fault took inside the VM (its rules and processes are gone).

    The links and the guest proxy of a stopped VM stay down, as `stop` leaves them; `start`
    brings them up.
    """
    if fault.kind in AGENT_KINDS:
        start_agent(record, vm)
    if fault.kind == FaultKind.ACCESS_DOWN and vm.running:
        start_service(record, vm, ACCESS)
    if fault.links and vm.running:
        for ifname in fault.links:
            set_link(ifname, up=True, netns=vm.netns)
        _renew_leases(record, vm)


def _gateway_matches(record: Record, vm: VmRecord) -> dict[str, list[str]]:
    """Per bridge: frames between each NIC and its network's router, both ways."""
    matches: dict[str, list[str]] = {}
    for nic in vm.nics:
        network = record.state.networks.get(nic.network)
        if network is not None:
            router = link_mac(ROUTER_LAN_IF, network.router_netns)
            matches.setdefault(nic.bridge, []).extend(
                [f"dl_src={nic.mac},dl_dst={router}", f"dl_src={router},dl_dst={nic.mac}"]
            )
    if not matches:
        raise LabInputError(f"VM {vm.name} has no NIC on a network with a lab router")
    return matches


def _external_matches(record: Record, vm: VmRecord) -> dict[str, list[str]]:
    """Per bridge: IPv4 between each NIC on an external network and `vmf-wan`, both ways."""
    wan = ipaddress.ip_interface(WAN_ADDRESS).network
    matches: dict[str, list[str]] = {}
    for nic in vm.nics:
        network = record.state.networks.get(nic.network)
        if network is not None and network.transit is not None:
            matches.setdefault(nic.bridge, []).extend(
                [f"ip,dl_src={nic.mac},nw_dst={wan}", f"ip,dl_dst={nic.mac},nw_src={wan}"]
            )
    if not matches:
        raise LabInputError(f"VM {vm.name} has no NIC on an external network")
    return matches


def _flows(vm: VmRecord, kind: FaultKind, matches: dict[str, list[str]]) -> list[FlowRecord]:
    """Drop rules of `matches` (per bridge), with the fault's cookie and priority."""
    cookie = fault_cookie(vm, kind)
    return [
        FlowRecord(
            bridge=bridge,
            cookie=cookie,
            rules=[
                f"cookie={cookie:#x},priority={FAULT_PRIORITY},{match},actions=drop"
                for match in bridge_matches
            ],
        )
        for bridge, bridge_matches in matches.items()
    ]


def _stop_agent(record: Record, vm: VmRecord) -> None:
    """End the qemu-ga the lab started; its record stays (dead) until heal starts it again."""
    agent = record.state.processes.get(agent_name(vm))
    if agent is not None:
        proc.stop(agent)


def _hang_name(vm: VmRecord) -> str:
    return f"vmf-qga-hang.{vm.host}.{vm.name}"


def _ensure_hang_listener(record: Record, vm: VmRecord) -> None:
    """A listener on the agent's socket that accepts and never answers (kept if it runs)."""
    known = record.state.processes.get(_hang_name(vm))
    if known is not None and proc.is_alive(known):
        return
    socket_path = vm_agent_socket(vm)
    staging = socket_path.with_name("qga.tmp")
    for path in (socket_path, staging):
        path.unlink(missing_ok=True)
    process = ProcessRecord(
        name=_hang_name(vm),
        argv=[sys.executable, "-c", HANG_LISTENER, str(staging), str(socket_path)],
        netns=vm.netns,
        log=str(Path(vm.directory) / "qga-hang.log"),
    )
    spawn_socket_owner(record, process, socket_path, f"the hanging listener of VM {vm.name}")


def _renew_leases(record: Record, vm: VmRecord) -> None:
    """SIGUSR1 makes udhcpc renew at once; its script puts back the default route that went
    with the link (the kernel drops a link's routes when it goes down)."""
    for nic in vm.nics:
        client = record.state.processes.get(dhcp_client_name(vm, nic))
        if client is not None:
            proc.signal_process(client, signal.SIGUSR1)
