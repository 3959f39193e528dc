"""Bringing the lab up and down, showing it, and running commands in its VMs.

`up` builds the switch, the bridges and `vmf-wan`, then (unless told not to) makes sure a
controller in lab mode answers and registers the hosts. `down` removes everything in the
record, whatever state a crash left it in; running it twice is harmless.
"""

from __future__ import annotations

import itertools
import shutil
import subprocess
from collections.abc import Callable
from typing import Any

from vmfabric.config import api_url
from vmfabric.lab import ovs, proc
from vmfabric.lab.controller import (
    CONTROLLER,
    ensure_controller,
    register_hosts,
    stop_controller,
)
from vmfabric.lab.errors import LabError, LabInputError
from vmfabric.lab.fabric import LabFabric
from vmfabric.lab.names import (
    FABRIC_BRIDGE,
    WAN_ADDRESS,
    WAN_NETNS,
    host_bridge,
    host_uplink,
    lab_hosts,
    peer_link,
)
from vmfabric.lab.netns import delete_link, link_exists, netns_exists, sync_addresses
from vmfabric.lab.plumbing import make_netns, remove_netns
from vmfabric.lab.services import (
    SSH,
    ensure_lab_key,
    install_guest_proxy,
    lab_key_path,
    requested_services,
    vm_access_socket,
)
from vmfabric.lab.state import (
    LabState,
    LabStore,
    PeerLinkRecord,
    ProcessRecord,
    Record,
    VmRecord,
)
from vmfabric.lab.vm import (
    destroy_vm,
    install_dhcp_script,
    is_running,
    vm_agent_socket,
    vm_named,
)

Progress = Callable[[str], None]
"""Told the name of each step as it begins, for a progress display."""


def quiet(_step: str) -> None:
    """The progress display of callers that show none."""


def up(hosts: int = 2, *, controller: bool = True, progress: Progress = quiet) -> dict[str, Any]:
    """Build the lab with `hosts` hosts; with `controller`, also start/find it and register.

    Tests of the drivers pass `controller=False`: they need the switch, not the API.
    """
    names = build(hosts, progress)
    result: dict[str, Any] = {"state_dir": str(LabStore().root), "hosts": names}
    if controller:
        progress("Waiting for the controller")
        status = ensure_controller(LabStore())
        progress("Registering the hosts")
        register_hosts(names, status.url)
        result["controller"] = {
            "url": status.url,
            "started_by_lab": status.started_by_lab,
            "pid": status.pid,
        }
    return result


def build(hosts: int, progress: Progress = quiet) -> list[str]:
    """The switch, the fabric bridge, one bridge per host joined to it, a peer link between
    every two host bridges, and `vmf-wan`; the VMs' guest proxy, services and lab key."""
    names = lab_hosts(hosts)
    services = requested_services()
    with LabStore().edit() as record:
        _refuse_foreign_lab(record.state)
        install_dhcp_script()
        _prepare_services(record, services)
        progress("Starting Open vSwitch")
        ovs.start(record)
        progress(f"Creating bridge {FABRIC_BRIDGE}")
        ovs.add_bridge(record, FABRIC_BRIDGE)
        for host in names:
            progress(f"Creating bridge {host_bridge(host)}")
            _add_host(record, host)
        progress("Joining the hosts by peer links")
        _add_peer_links(record)
        progress(f"Creating {WAN_NETNS}")
        make_netns(record, WAN_NETNS)
        sync_addresses("lo", WAN_NETNS, {WAN_ADDRESS})
    return names


def down(progress: Progress = quiet) -> dict[str, Any]:
    """Remove everything the record names: controller (if ours), VMs, networks, switch, files.

    Processes that other parts started inside lab namespaces (dnsmasq in a DHCP namespace)
    end with their namespace. What cannot be removed stays recorded, and the error says so,
    so that a second `down` can finish the job.
    """
    store = LabStore()
    if not store.root.exists():
        return _summary(LabState(), controller_stopped=False)
    progress("Stopping the controller")
    controller_stopped = stop_controller(store)
    with store.edit() as record:
        before = record.state.model_copy(deep=True)
        failures = _tear_down(record, store, progress)
        if failures:
            raise LabError("lab down left resources behind (run it again): " + "; ".join(failures))
        shutil.rmtree(store.root, ignore_errors=True)
    return _summary(before, controller_stopped)


def status() -> dict[str, Any]:
    """What the record holds and whether each part still exists or runs."""
    state = LabStore().read()
    controller = state.processes.get(CONTROLLER)
    return {
        "state_dir": str(LabStore().root),
        "up": FABRIC_BRIDGE in state.bridges and ovs.is_running(state),
        "hosts": state.hosts,
        "bridges": state.bridges,
        "namespaces": [{"name": ns, "exists": netns_exists(ns)} for ns in state.namespaces],
        "links": [link.model_dump() for link in state.links.values()],
        "processes": [_process_view(p) for p in state.processes.values()],
        "vms": [_vm_view(state, vm) for vm in state.vms.values()],
        "networks": [net.model_dump() for net in state.networks.values()],
        "peer_links": [link.model_dump() for link in state.peer_links.values()],
        "services": state.services,
        "lab_key": str(lab_key_path()) if SSH in state.services else None,
        "controller": {
            "url": api_url(),
            "started_by_lab": controller is not None,
            "alive": controller is not None and proc.is_alive(controller),
        },
    }


def vm_namespace(vm: str) -> str:
    """The namespace of lab VM `vm`; the running one if it exists on two hosts (migration)."""
    return vm_named(LabStore().read(), vm).netns


def exec_in_vm(vm: str, argv: list[str]) -> int:
    """Run `argv` in the VM with this process's stdin/stdout/stderr; return its exit code."""
    return subprocess.run(proc.in_netns(vm_namespace(vm), _command(argv)), check=False).returncode


def run_in_vm(vm: str, argv: list[str]) -> subprocess.CompletedProcess[str]:
    """Run `argv` in the VM and capture its output."""
    full = proc.in_netns(vm_namespace(vm), _command(argv))
    return subprocess.run(full, capture_output=True, text=True, check=False)


def _command(argv: list[str]) -> list[str]:
    if not argv:
        raise LabInputError("give the command to run in the VM after `--`")
    return argv


def _refuse_foreign_lab(state: LabState) -> None:
    """Never adopt `vmf-wan` or `vmf-fabric` that another lab (another state dir) made."""
    if WAN_NETNS not in state.namespaces and netns_exists(WAN_NETNS):
        owner = WAN_NETNS
    elif FABRIC_BRIDGE not in state.bridges and link_exists(FABRIC_BRIDGE):
        owner = FABRIC_BRIDGE
    else:
        return
    raise LabError(
        f"{owner} exists but is not in this lab's record ({LabStore().root}); another lab is "
        "up on this machine: run `vmfabric lab down` with its VMFABRIC_STATE first"
    )


def _prepare_services(record: Record, services: list[str] | None) -> None:
    """Build the guest proxy, record the services asked for (kept when not asked) and make
    the lab key when VMs run sshd."""
    install_guest_proxy()
    if services is not None:
        record.state.services = services
        record.save()
    if SSH in record.state.services:
        ensure_lab_key()


def _add_host(record: Record, host: str) -> None:
    bridge = host_bridge(host)
    ovs.add_bridge(record, bridge)
    uplink, fabric_end = host_uplink(host)
    ovs.add_uplink(bridge, uplink, FABRIC_BRIDGE, fabric_end)
    if host not in record.state.hosts:
        record.state.hosts.append(host)
        record.save()


def _add_peer_links(record: Record) -> None:
    """A peer link between every two hosts of the lab, recorded first, made in one go.

    Existing ones are made again too: their settings keep NORMAL forwarding off them.
    """
    links = [
        PeerLinkRecord(
            host=host,
            port=peer_link(host, other),
            peer_host=other,
            peer_port=peer_link(other, host),
        )
        for host, other in itertools.combinations(record.state.hosts, 2)
    ]
    record.remember_peer_links(links)
    ovs.add_peer_links(
        [
            (
                ovs.PeerEnd(host_bridge(link.host), link.port, leads_to=link.peer_host),
                ovs.PeerEnd(host_bridge(link.peer_host), link.peer_port, leads_to=link.host),
            )
            for link in links
        ]
    )


def _remove_peer_link(record: Record, port: str) -> None:
    link = record.state.peer_links[port]
    if ovs.database_running(record.state):
        ovs.delete_port(link.port, link.peer_port)
    record.forget_peer_link(port)


class _Attempts:
    """Runs removal steps, collecting failures instead of stopping at the first."""

    def __init__(self) -> None:
        self.failures: list[str] = []

    def run(self, what: str, action: Callable[..., object], *args: Any) -> None:
        try:
            action(*args)
        except (LabError, OSError) as err:
            self.failures.append(f"{what}: {err}")


def _tear_down(record: Record, store: LabStore, progress: Progress) -> list[str]:
    """Remove in dependency order; return what failed instead of stopping at it."""
    attempts = _Attempts()
    state = record.state
    for vm in list(state.vms.values()):
        progress(f"Removing VM {vm.name} on {vm.host}")
        attempts.run(f"VM {vm.name}", destroy_vm, record, vm)
    for name in list(state.networks):
        progress(f"Removing network {name}")
        attempts.run(f"network {name}", LabFabric(store).remove_network, name)
    progress("Removing namespaces and links")
    for name in list(reversed(state.namespaces)):
        attempts.run(f"namespace {name}", remove_netns, record, name)
    for name in list(state.processes):
        if name not in (ovs.OVSDB, ovs.VSWITCHD):
            attempts.run(f"process {name}", _end_process, record, name)
    for name in list(state.links):
        attempts.run(f"link {name}", _remove_link, record, name)
    for port in list(state.peer_links):
        attempts.run(f"peer link {port}", _remove_peer_link, record, port)
    progress("Stopping Open vSwitch")
    attempts.run("Open vSwitch", ovs.stop, record)
    return attempts.failures


def _end_process(record: Record, name: str) -> None:
    proc.stop(record.state.processes[name])
    record.forget_process(name)


def _remove_link(record: Record, name: str) -> None:
    link = record.state.links[name]
    delete_link(link.name, link.netns)
    record.forget_link(name)


def _summary(before: LabState, controller_stopped: bool) -> dict[str, Any]:
    return {
        "controller_stopped": controller_stopped,
        "vms": sorted(vm.key for vm in before.vms.values()),
        "networks": sorted(before.networks),
        "namespaces": len(before.namespaces),
        "bridges": len(before.bridges),
        "processes": len(before.processes),
    }


def _process_view(process: ProcessRecord) -> dict[str, Any]:
    pid = proc.live_pid(process)
    return {
        "name": process.name,
        "pid": pid if pid is not None else process.pid,
        "alive": pid is not None,
        "netns": process.netns,
        "argv": process.argv,
    }


def _vm_view(state: LabState, vm: VmRecord) -> dict[str, Any]:
    return {
        "name": vm.name,
        "host": vm.host,
        "image": vm.image,
        "netns": vm.netns,
        "defined": vm.defined,
        "running": is_running(state, vm),
        "agent_socket": str(vm_agent_socket(vm)),
        "access_socket": str(vm_access_socket(vm)),
        "nics": [nic.model_dump() for nic in vm.nics],
        "faults": [fault.model_dump() for fault in vm.faults.values()],
        "migration": vm.migration.model_dump() if vm.migration else None,
    }
