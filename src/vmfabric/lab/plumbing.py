"""Plugging namespaces into the lab switch, shared by VMs, routers and DHCP namespaces.

Each step is recorded before it is made and is idempotent, so a call after a crash finishes
the job instead of failing on what already exists.
"""

from __future__ import annotations

from vmfabric.lab import ovs
from vmfabric.lab.errors import LabError
from vmfabric.lab.names import FABRIC_BRIDGE, WAN_NETNS
from vmfabric.lab.netns import (
    add_netns,
    add_veth,
    delete_link,
    delete_netns,
    end_netns_processes,
    link_exists,
    tx_checksum_off,
)
from vmfabric.lab.state import LabState, LinkRecord, Record


def require_lab(state: LabState) -> None:
    """Refuse to build on a lab that is not up, with the command that brings it up."""
    if FABRIC_BRIDGE not in state.bridges or WAN_NETNS not in state.namespaces:
        raise LabError("the lab is not up: run `vmfabric lab up` first")
    if not ovs.is_running(state):
        raise LabError("the lab switch is not running: run `vmfabric lab up` to restart it")


def make_netns(record: Record, name: str) -> None:
    """A recorded namespace."""
    record.remember_namespace(name)
    add_netns(name)


def plug(
    record: Record,
    *,
    bridge: str,
    port: str,
    netns: str,
    ifname: str,
    vlan: int,
    owner: str,
    mac: str | None = None,
) -> None:
    """A veth from `netns` (end `ifname`) to an access port `port` of `vlan` on `bridge`.

    A VM NIC's `mac` is both the veth end's address and the port's `attached-mac` mark.
    """
    if not link_exists(port):
        record.remember_link(LinkRecord(name=port, peer=ifname, peer_netns=netns, owner=owner))
        add_veth(port, ifname, netns, peer_mac=mac)
    tx_checksum_off(ifname, netns)
    ovs.add_access_port(bridge, port, vlan, mac)


def unplug(record: Record, port: str) -> None:
    """Take a port off the switch and delete its veth pair."""
    if ovs.database_running(record.state):
        ovs.delete_port(port)
    delete_link(port)
    record.forget_link(port)


def remove_netns(record: Record, name: str) -> None:
    """End what runs in a recorded namespace, delete it, and forget it."""
    delete_netns(name)
    record.forget_namespace(name)


def clear_netns(record: Record, netns: str, ports: list[str]) -> None:
    """Remove a namespace and the switch ports of its veths, processes first."""
    end_netns_processes(netns)
    for port in ports:
        unplug(record, port)
    remove_netns(record, netns)
