"""Lab VMs: a namespace per VM with veth NICs on a host bridge, qemu-ga and a DHCP client.

A lab VM "runs" while its DHCP clients run: `start` launches busybox udhcpc on each NIC, which
asks for a lease like a booting guest and applies it with `udhcpc.script`, and what the VM
serves (`vmfabric.lab.services`: the access channel's guest proxy, maybe a web server and an
sshd); `stop` ends those, releases the leases and takes the links down. The QEMU guest agent
runs from `define` on, as the channel does for a defined libvirt domain.
"""

from __future__ import annotations

import contextlib
import secrets
import shutil
import signal
from importlib.resources import as_file, files
from pathlib import Path

from vmfabric.domain.errors import InvalidInput
from vmfabric.domain.model import NicSpec, VmSpec
from vmfabric.domain.names import normalize_mac
from vmfabric.lab import ovs, proc
from vmfabric.lab.errors import LabError, LabInputError
from vmfabric.lab.names import check_label, vm_ifname, vm_netns, vm_port
from vmfabric.lab.netns import (
    flush_addresses,
    global_addresses,
    link_exists,
    netns_exists,
    set_link,
)
from vmfabric.lab.plumbing import clear_netns, make_netns, plug, require_lab
from vmfabric.lab.services import LONGEST_SOCKET, spawn_services, stop_services, wait_serving
from vmfabric.lab.state import (
    FaultRecord,
    LabState,
    NicRecord,
    ProcessRecord,
    Record,
    VmRecord,
    lab_dir,
    vm_key,
)

MAX_SOCKET_PATH = 107
QGA_BLOCKED_RPCS = (
    "guest-shutdown",
    "guest-suspend-disk",
    "guest-suspend-ram",
    "guest-suspend-hybrid",
    "guest-set-time",
    "guest-set-user-password",
    "guest-set-vcpus",
    "guest-set-memory-blocks",
    "guest-fsfreeze-freeze",
    "guest-fsfreeze-freeze-list",
    "guest-ssh-add-authorized-keys",
    "guest-ssh-remove-authorized-keys",
)
"""Agent commands that would act on the machine itself: a lab VM shares its kernel."""


def vm_dir(host: str, vm: str) -> Path:
    """The VM's files: agent socket, pidfiles, logs."""
    return lab_dir() / "vms" / host / vm


def agent_socket_path(host: str, vm: str) -> Path:
    """The unix socket of the qemu-ga of a VM defined on `host`."""
    return vm_dir(host, vm) / "qga.sock"


def vm_agent_socket(vm: VmRecord) -> Path:
    """The unix socket of the VM's qemu-ga, in its directory (which a migration keeps)."""
    return Path(vm.directory) / "qga.sock"


def dhcp_script() -> Path:
    """The udhcpc event script, copied into the lab's directory so it is executable."""
    return lab_dir() / "udhcpc.script"


def install_dhcp_script() -> None:
    """Copy `udhcpc.script` from the package (whose files may lack the exec bit)."""
    target = dhcp_script()
    target.parent.mkdir(parents=True, exist_ok=True)
    with as_file(files("vmfabric.lab").joinpath("udhcpc.script")) as source:
        shutil.copyfile(source, target)
    target.chmod(0o755)


def find_vm(state: LabState, host: str, name: str) -> VmRecord | None:
    """The VM `name` of `host`, if the lab has it."""
    return state.vms.get(vm_key(host, name))


def define_vm(record: Record, host: str, spec: VmSpec) -> VmRecord:
    """Build the VM, or keep it when it already matches `spec` (then its MACs stay)."""
    _check_spec(record.state, host, spec)
    known = find_vm(record.state, host, spec.name)
    if (
        known is not None
        and known.defined
        and netns_exists(known.netns)
        and _same_nics(known, spec)
    ):
        return _refresh(record, known, spec)
    macs = _macs(known, spec)
    was_running = known is not None and known.running
    if known is not None:
        destroy_vm(record, known)
    vm = _plan(host, spec, macs)
    record.remember_vm(vm)
    try:
        _build(record, vm)
    except (LabError, OSError):
        destroy_vm(record, vm)
        raise
    vm.defined = True
    record.remember_vm(vm)
    if was_running:
        start_vm(record, vm)
    return vm


def start_vm(record: Record, vm: VmRecord) -> None:
    """The VM's services, links up and a DHCP client on each NIC; returns once the services
    serve. NICs whose client runs and services that run are left alone."""
    if not dhcp_script().exists():
        install_dhcp_script()
    starting = spawn_services(record, vm)
    for nic in vm.nics:
        set_link(nic.ifname, up=True, netns=vm.netns)
        known = record.state.processes.get(dhcp_client_name(vm, nic))
        if known is None or not proc.is_alive(known):
            _start_dhcp_client(record, vm, nic)
    wait_serving(vm, starting)
    vm.running = True
    record.remember_vm(vm)


def stop_vm(record: Record, vm: VmRecord) -> None:
    """End its services; release each lease (SIGUSR2), end the clients, drop addresses,
    links down."""
    stop_services(record, vm)
    for nic in vm.nics:
        name = dhcp_client_name(vm, nic)
        process = record.state.processes.get(name)
        if process is not None:
            _release(process, vm.netns, nic.ifname)
            proc.stop(process)
            record.forget_process(name)
        if netns_exists(vm.netns) and link_exists(nic.ifname, vm.netns):
            flush_addresses(nic.ifname, vm.netns)
            set_link(nic.ifname, up=False, netns=vm.netns)
    vm.running = False
    record.remember_vm(vm)


def destroy_vm(record: Record, vm: VmRecord) -> None:
    """Clear its faults, stop the VM, end its agent and all else in it, delete NICs and namespace.

    A fault's rules match the VM's MAC, which a VM defined again on the same network keeps,
    so they must go with the VM.
    """
    for fault in vm.faults.values():
        clear_fault(record, fault)
    stop_vm(record, vm)
    agent = record.state.processes.get(agent_name(vm))
    if agent is not None:
        proc.stop(agent)
        record.forget_process(agent.name)
    incoming = vm.migration.nics if vm.migration else []
    clear_netns(record, vm.netns, [nic.port for nic in [*vm.nics, *incoming]])
    shutil.rmtree(vm.directory, ignore_errors=True)
    _remove_if_empty(Path(vm.directory).parent)
    record.forget_vm(vm.key)


def clear_fault(record: Record, fault: FaultRecord) -> None:
    """Delete a fault's switch rules and end its processes (it stays in the VM's record).

    What it changed inside the VM (a link set down, a stopped agent) is for the caller to
    restore, or goes with the VM. A switch that is not running holds no rules: OpenFlow rules
    live in ovs-vswitchd, not in its database.
    """
    for flow in fault.flows:
        if ovs.is_running(record.state) and flow.bridge in record.state.bridges:
            ovs.delete_flows(flow.bridge, flow.cookie)
    for name in fault.processes:
        process = record.state.processes.get(name)
        if process is not None:
            proc.stop(process)
            record.forget_process(name)


def vm_named(state: LabState, name: str) -> VmRecord:
    """The defined lab VM `name`; the running one if it exists on two hosts (migration)."""
    found = [vm for vm in state.vms.values() if vm.name == name and vm.defined]
    if not found:
        raise LabInputError(f"the lab has no VM named {name!r}")
    running = [vm for vm in found if is_running(state, vm)]
    return (running or found)[0]


def is_running(state: LabState, vm: VmRecord) -> bool:
    """Running means: started, and every NIC's DHCP client still alive."""
    clients = [state.processes.get(dhcp_client_name(vm, nic)) for nic in vm.nics]
    return vm.running and all(c is not None and proc.is_alive(c) for c in clients)


def _check_spec(state: LabState, host: str, spec: VmSpec) -> None:
    check_label("host", host)
    check_label("VM", spec.name)
    require_lab(state)
    for index, nic in enumerate(spec.nics):
        if nic.bridge not in state.bridges:
            raise LabInputError(
                f"NIC {index} of VM {spec.name}: {nic.bridge!r} is not a lab bridge "
                f"(the lab has {', '.join(state.bridges)})"
            )
        if not 1 <= nic.vlan <= 4094:
            raise LabInputError(f"NIC {index} of VM {spec.name}: VLAN {nic.vlan} is not in 1-4094")
        if nic.mac is not None:
            _check_mac(nic.mac)
    _check_socket_path(vm_dir(host, spec.name) / LONGEST_SOCKET)
    _refuse_moved_vm(state, host, spec.name)


def _refuse_moved_vm(state: LabState, host: str, name: str) -> None:
    """A VM that migrated away from `host` keeps the namespace and directory it had there."""
    netns = vm_netns(host, name)
    for other in state.vms.values():
        if other.key != vm_key(host, name) and other.netns == netns:
            raise LabInputError(
                f"VM {name} moved from {host} to {other.host} and still lives in {netns}; "
                f"remove it from {other.host} before defining it on {host} again"
            )


def _check_mac(mac: str) -> str:
    try:
        normal = normalize_mac(mac)
    except InvalidInput as err:
        raise LabInputError(err.detail) from err
    if int(normal[:2], 16) & 1:
        raise LabInputError(f"MAC address {mac} is a multicast address; a NIC needs unicast")
    return normal


def _check_socket_path(path: Path) -> None:
    """The VM's longest unix socket path (the guest proxy's while it binds) must fit."""
    if len(str(path)) > MAX_SOCKET_PATH:
        raise LabInputError(
            f"the VM's socket {path} would be longer than {MAX_SOCKET_PATH} bytes; "
            "use a shorter VMFABRIC_STATE or VM name"
        )


def _same_nics(vm: VmRecord, spec: VmSpec) -> bool:
    if len(vm.nics) != len(spec.nics):
        return False
    return all(
        (have.network, have.bridge, have.vlan) == (want.network, want.bridge, want.vlan)
        and (want.mac is None or _check_mac(want.mac) == have.mac)
        for have, want in zip(vm.nics, spec.nics, strict=True)
    )


def _refresh(record: Record, vm: VmRecord, spec: VmSpec) -> VmRecord:
    """Keep a matching VM, updating what needs no rebuild and restarting a dead agent."""
    vm.image, vm.memory_mib, vm.vcpus = spec.image, spec.memory_mib, spec.vcpus
    record.remember_vm(vm)
    agent = record.state.processes.get(agent_name(vm))
    if agent is None or not proc.is_alive(agent):
        start_agent(record, vm)
    return vm


def _macs(known: VmRecord | None, spec: VmSpec) -> list[str]:
    """The operator's MAC, else the one the NIC had before (same network), else a new one."""
    return [_mac_for(known, index, nic) for index, nic in enumerate(spec.nics)]


def _mac_for(known: VmRecord | None, index: int, nic: NicSpec) -> str:
    if nic.mac is not None:
        return _check_mac(nic.mac)
    if known is not None and index < len(known.nics) and known.nics[index].network == nic.network:
        return known.nics[index].mac
    return "52:54:00:" + ":".join(f"{b:02x}" for b in secrets.token_bytes(3))


def _plan(host: str, spec: VmSpec, macs: list[str]) -> VmRecord:
    nics = [
        NicRecord(
            network=nic.network,
            bridge=nic.bridge,
            vlan=nic.vlan,
            mac=mac,
            ifname=vm_ifname(index),
            port=vm_port(host, spec.name, index),
        )
        for index, (nic, mac) in enumerate(zip(spec.nics, macs, strict=True))
    ]
    return VmRecord(
        name=spec.name,
        host=host,
        image=spec.image,
        netns=vm_netns(host, spec.name),
        directory=str(vm_dir(host, spec.name)),
        nics=nics,
        memory_mib=spec.memory_mib,
        vcpus=spec.vcpus,
    )


def plug_nic(record: Record, vm: VmRecord, nic: NicRecord, owner: str) -> None:
    """One of the VM's NICs as its record names it: a veth from the VM's namespace to its
    bridge's access port (at definition, and on the destination of a migration)."""
    plug(
        record,
        bridge=nic.bridge,
        port=nic.port,
        netns=vm.netns,
        ifname=nic.ifname,
        vlan=nic.vlan,
        owner=owner,
        mac=nic.mac,
    )


def _build(record: Record, vm: VmRecord) -> None:
    make_netns(record, vm.netns)
    for nic in vm.nics:
        plug_nic(record, vm, nic, f"VM {vm.name} on {vm.host}")
    start_agent(record, vm)


def agent_name(vm: VmRecord) -> str:
    """The name of the VM's qemu-ga in the lab's record."""
    return f"vmf-qga.{vm.host}.{vm.name}"


def dhcp_client_name(vm: VmRecord, nic: NicRecord) -> str:
    """The name of a NIC's DHCP client in the lab's record."""
    return f"vmf-udhcpc.{vm.host}.{vm.name}.{nic.ifname}"


def start_agent(record: Record, vm: VmRecord) -> None:
    """Start the VM's qemu-ga on its socket and wait until the socket exists."""
    directory = Path(vm.directory)
    directory.mkdir(parents=True, exist_ok=True)
    socket = vm_agent_socket(vm)
    socket.unlink(missing_ok=True)
    argv = [
        "qemu-ga",
        "--method=unix-listen",
        f"--path={socket}",
        f"--pidfile={directory / 'qga.pid'}",
        f"--statedir={directory}",
        f"--block-rpcs={','.join(QGA_BLOCKED_RPCS)}",
    ]
    process = ProcessRecord(
        name=agent_name(vm), argv=argv, netns=vm.netns, log=str(directory / "qga.log")
    )
    spawn_socket_owner(record, process, socket, f"qemu-ga of VM {vm.name}")


def spawn_socket_owner(record: Record, process: ProcessRecord, socket: Path, what: str) -> None:
    """Start a recorded process that serves a unix socket; wait until the socket exists.

    Raises LabError with the end of the process's log when it does not appear in 5 s.
    """
    record.remember_process(process)
    started = proc.spawn(process)
    record.remember_process(started)
    proc.wait_until(lambda: socket.exists() or not proc.is_alive(started), timeout=5.0)
    if not socket.exists():
        raise LabError(
            f"{what} did not open {socket}; its log ends with:\n{proc.log_tail(process.log)}"
        )


def _start_dhcp_client(record: Record, vm: VmRecord, nic: NicRecord) -> None:
    directory = Path(vm.directory)
    pidfile = directory / f"udhcpc-{nic.ifname}.pid"
    argv = [
        "busybox",
        "udhcpc",
        "-f",
        "-R",
        f"-i{nic.ifname}",
        f"-p{pidfile}",
        f"-s{dhcp_script()}",
        f"-xhostname:{vm.name}",
        "-t3",
        "-T1",
        "-A3",
    ]
    process = ProcessRecord(
        name=dhcp_client_name(vm, nic),
        argv=argv,
        netns=vm.netns,
        pidfile=str(pidfile),
        log=str(directory / f"udhcpc-{nic.ifname}.log"),
    )
    record.remember_process(process)
    record.remember_process(proc.spawn(process))


def _release(process: ProcessRecord, netns: str, ifname: str) -> None:
    """SIGUSR2 makes udhcpc send DHCPRELEASE, then drop the address (script `deconfig`)."""
    if proc.signal_process(process, signal.SIGUSR2):
        proc.wait_until(lambda: not _has_ipv4(ifname, netns), timeout=1.0)


def _has_ipv4(ifname: str, netns: str) -> bool:
    if not (netns_exists(netns) and link_exists(ifname, netns)):
        return False
    return any(":" not in address for address in global_addresses(ifname, netns))


def _remove_if_empty(directory: Path) -> None:
    with contextlib.suppress(OSError):
        directory.rmdir()
