"""The lab's network plumbing: a router namespace and a DHCP namespace per network.

Both hang off the fabric bridge as access ports of the network's VLAN, so they see exactly the
VMs of that network on every host (host bridges trunk every VLAN to the fabric). An external
network's router also has a transit link to `vmf-wan` (the outside world, 203.0.113.1) with a
default route there, and `vmf-wan` routes the network's subnets back; an internal network's
router has no way out.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable

from vmfabric.domain.model import DhcpPlacement, NetworkInfo, NetworkKind
from vmfabric.lab.errors import LabInputError
from vmfabric.lab.names import (
    DHCP_IF,
    FABRIC_BRIDGE,
    ROUTER_LAN_IF,
    ROUTER_WAN_IF,
    TRANSIT_POOL,
    WAN_NETNS,
    check_label,
    dhcp_netns,
    dhcp_port,
    router_netns,
    router_port,
    transit,
    wan_port,
)
from vmfabric.lab.netns import (
    add_veth,
    delete_link,
    enable_forwarding,
    link_exists,
    set_default_route,
    set_link,
    sync_addresses,
    sync_routes,
)
from vmfabric.lab.plumbing import clear_netns, make_netns, plug, require_lab
from vmfabric.lab.state import LabStore, LinkRecord, NetworkRecord, Record, SubnetRecord


class LabFabric:
    """`vmfabric.fabric.Fabric` for the lab. Safe to call from several processes at once."""

    def __init__(self, store: LabStore | None = None) -> None:
        self._store = store or LabStore()

    def ensure_network(self, network: NetworkInfo) -> DhcpPlacement:
        """Converge the network's router, DHCP namespace and wan link on `network`.

        Every call re-applies everything (ports, tags, addresses, routes), so a call after a
        crash or a change of subnets, VLAN or kind leaves the network exactly as described.
        """
        _check(network)
        with self._store.edit() as record:
            require_lab(record.state)
            net = _record_network(record, network)
            _build_router(record, net)
            _build_dhcp(record, net)
            if net.transit is not None:
                _build_wan_link(record, net, net.transit)
            else:
                _remove_wan_link(record, net)
            return DhcpPlacement(interface=DHCP_IF, netns=net.dhcp_netns)

    def remove_network(self, name: str) -> None:
        """Remove the network's namespaces, ending what runs there first (dnsmasq included)."""
        with self._store.edit() as record:
            net = record.state.networks.get(name)
            if net is None:
                return
            _remove_wan_link(record, net)
            clear_netns(record, net.router_netns, [net.router_port])
            clear_netns(record, net.dhcp_netns, [net.dhcp_port])
            record.forget_network(name)


def _check(network: NetworkInfo) -> None:
    check_label("network", network.name)
    if not 1 <= network.vlan <= 4094:
        raise LabInputError(f"network {network.name}: VLAN {network.vlan} is not in 1-4094")
    for subnet in network.subnets:
        try:
            ipaddress.ip_network(subnet.cidr, strict=False)
        except ValueError as err:
            raise LabInputError(f"network {network.name}: {err}") from err


def _record_network(record: Record, network: NetworkInfo) -> NetworkRecord:
    known = record.state.networks.get(network.name)
    net = NetworkRecord(
        name=network.name,
        kind=network.kind.value,
        vlan=network.vlan,
        router_netns=router_netns(network.name),
        dhcp_netns=dhcp_netns(network.name),
        router_port=router_port(network.name),
        dhcp_port=dhcp_port(network.name),
        subnets=[
            SubnetRecord(cidr=s.cidr, gateway=s.gateway, dhcp_server=s.dhcp_server)
            for s in network.subnets
        ],
    )
    if network.kind is NetworkKind.EXTERNAL:
        kept = known.transit if known is not None else None
        net.transit = kept if kept is not None else _free_transit(record, network.name)
    record.remember_network(net)
    return net


def _free_transit(record: Record, name: str) -> int:
    used = {n.transit for n in record.state.networks.values() if n.name != name}
    return next(i for i in range(TRANSIT_POOL.num_addresses // 4) if i not in used)


def _addresses(net: NetworkRecord, pick: Callable[[SubnetRecord], str | None]) -> set[str]:
    """One address per subnet (`address/prefix`), for subnets that name one."""
    return {
        f"{address}/{ipaddress.ip_network(subnet.cidr, strict=False).prefixlen}"
        for subnet in net.subnets
        if (address := pick(subnet)) is not None
    }


def _build_router(record: Record, net: NetworkRecord) -> None:
    gateways = _addresses(net, lambda s: s.gateway)
    _attach(
        record,
        net,
        netns=net.router_netns,
        port=net.router_port,
        ifname=ROUTER_LAN_IF,
        role="router",
        addresses=gateways,
    )
    enable_forwarding(net.router_netns)


def _build_dhcp(record: Record, net: NetworkRecord) -> None:
    servers = _addresses(net, lambda s: s.dhcp_server)
    _attach(
        record,
        net,
        netns=net.dhcp_netns,
        port=net.dhcp_port,
        ifname=DHCP_IF,
        role="DHCP",
        addresses=servers,
    )


def _attach(
    record: Record,
    net: NetworkRecord,
    *,
    netns: str,
    port: str,
    ifname: str,
    role: str,
    addresses: set[str],
) -> None:
    """A namespace of the network with an access port on the fabric bridge in its VLAN."""
    make_netns(record, netns)
    plug(
        record,
        bridge=FABRIC_BRIDGE,
        port=port,
        netns=netns,
        ifname=ifname,
        vlan=net.vlan,
        owner=f"network {net.name} {role}",
    )
    set_link(ifname, up=True, netns=netns)
    sync_addresses(ifname, netns, addresses)


def _build_wan_link(record: Record, net: NetworkRecord, index: int) -> None:
    port = wan_port(net.name)
    wan_side, router_side = transit(index)
    if not link_exists(port, WAN_NETNS):
        record.remember_link(
            LinkRecord(
                name=port,
                netns=WAN_NETNS,
                peer=ROUTER_WAN_IF,
                peer_netns=net.router_netns,
                owner=f"network {net.name} transit",
            )
        )
        add_veth(port, ROUTER_WAN_IF, net.router_netns, netns=WAN_NETNS)
    set_link(ROUTER_WAN_IF, up=True, netns=net.router_netns)
    sync_addresses(port, WAN_NETNS, {wan_side})
    sync_addresses(ROUTER_WAN_IF, net.router_netns, {router_side})
    set_default_route(_address(wan_side), net.router_netns)
    subnets = {
        str(ipaddress.ip_network(s.cidr, strict=False))
        for s in net.subnets
        if ipaddress.ip_network(s.cidr, strict=False).version == 4
    }
    sync_routes(_address(router_side), WAN_NETNS, subnets)


def _remove_wan_link(record: Record, net: NetworkRecord) -> None:
    port = wan_port(net.name)
    delete_link(port, WAN_NETNS)
    record.forget_link(port)


def _address(cidr: str) -> str:
    return str(ipaddress.ip_interface(cidr).ip)
