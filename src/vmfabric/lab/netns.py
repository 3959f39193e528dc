"""Namespaces, veth pairs, addresses and routes, through `ip` and `ethtool`.

Every helper takes the namespace to act in; None means the machine's own, where the lab only
ever creates and deletes veth ends and never adds an address or a route.
"""

from __future__ import annotations

import ipaddress
import json
import os
from pathlib import Path
from typing import Any

from vmfabric.lab.errors import CommandError
from vmfabric.lab.proc import end_pid, run

NETNS_DIR = Path("/run/netns")


def _ip(netns: str | None, *args: str) -> list[str]:
    return ["ip", *(["-n", netns] if netns else []), *args]


def netns_exists(name: str) -> bool:
    """Whether `ip netns` knows the namespace."""
    return (NETNS_DIR / name).exists()


def add_netns(name: str) -> None:
    """Make the namespace (if missing) with its loopback up."""
    if not netns_exists(name):
        run(["ip", "netns", "add", name])
    run(_ip(name, "link", "set", "lo", "up"))


def netns_pids(name: str) -> list[int]:
    """Processes living in the namespace, whoever started them."""
    if not netns_exists(name):
        return []
    out = run(["ip", "netns", "pids", name]).stdout
    return [int(word) for word in out.split() if word.isdigit()]


def end_netns_processes(name: str, grace: float = 3.0) -> None:
    """End every process in a lab namespace, the lab's own and those other parts started there.

    The DHCP driver starts dnsmasq in a network's DHCP namespace, tests start servers in VM
    namespaces; the namespace is the lab's, so whatever runs in it goes with it. A process
    counts only while it is still in the namespace once a pidfd pins it.
    """
    for pid in netns_pids(name):
        end_pid(pid, lambda p: _lives_in(p, name), grace)


def delete_netns(name: str) -> None:
    """End its processes, then remove the namespace (and with it the interfaces inside)."""
    end_netns_processes(name)
    if netns_exists(name):
        run(["ip", "netns", "delete", name])


def _lives_in(pid: int, netns: str) -> bool:
    try:
        mine = os.stat(f"/proc/{pid}/ns/net")
        theirs = os.stat(NETNS_DIR / netns)
    except OSError:
        return False
    return (mine.st_dev, mine.st_ino) == (theirs.st_dev, theirs.st_ino)


def link_exists(name: str, netns: str | None = None) -> bool:
    """Whether an interface of that name exists in the namespace."""
    return run(_ip(netns, "link", "show", "dev", name), check=False).returncode == 0


def add_veth(
    name: str, peer: str, peer_netns: str, netns: str | None = None, peer_mac: str | None = None
) -> None:
    """A veth pair whose `peer` end is born inside `peer_netns` (no name clash outside)."""
    peer_args = ["name", peer, *(["address", peer_mac] if peer_mac else []), "netns", peer_netns]
    run(_ip(netns, "link", "add", name, "type", "veth", "peer", *peer_args))
    if netns is None:
        run(_ip(None, "link", "set", "dev", name, "addrgenmode", "none"))
    set_link(name, up=True, netns=netns)


def delete_link(name: str, netns: str | None = None) -> None:
    """Remove an interface (a veth takes its peer along); a missing one is fine."""
    if netns is not None and not netns_exists(netns):
        return
    if link_exists(name, netns):
        try:
            run(_ip(netns, "link", "delete", "dev", name))
        except CommandError:
            if link_exists(name, netns):
                raise


def set_link(name: str, up: bool, netns: str | None = None) -> None:
    """Bring an interface up or down."""
    run(_ip(netns, "link", "set", "dev", name, "up" if up else "down"))


def tx_checksum_off(ifname: str, netns: str) -> None:
    """Userspace OVS passes veth frames with unfilled checksums; DHCP clients drop those."""
    run(["ethtool", "-K", ifname, "tx", "off"], netns=netns)


def link_mac(ifname: str, netns: str) -> str:
    """The MAC address of an interface."""
    info = json.loads(run(_ip(netns, "-j", "link", "show", "dev", ifname)).stdout)
    return str(info[0]["address"])


def global_address_details(ifname: str, netns: str) -> list[dict[str, Any]]:
    """The interface's addresses that are not link-local, as `ip -j addr` describes them
    (`family`, `local`, `prefixlen`, `broadcast`, lifetimes)."""
    shown = json.loads(run(_ip(netns, "-j", "addr", "show", "dev", ifname)).stdout)
    return [
        info
        for entry in shown
        for info in entry.get("addr_info", [])
        if info.get("scope") == "global"
    ]


def global_addresses(ifname: str, netns: str) -> set[str]:
    """The interface's addresses that are not link-local, as `address/prefix`."""
    return {
        f"{info['local']}/{info['prefixlen']}" for info in global_address_details(ifname, netns)
    }


def device_routes(ifname: str, netns: str, version: int) -> list[dict[str, Any]]:
    """The main table's IPv`version` routes through the interface, as `ip -j route` shows
    them (`dst`, `gateway`, `metric`, `protocol` unless boot, `scope` unless global)."""
    shown = run(_ip(netns, f"-{version}", "-j", "route", "show", "dev", ifname)).stdout
    routes: list[dict[str, Any]] = json.loads(shown or "[]")
    return routes


def neighbours(ifname: str, netns: str) -> list[tuple[str, str]]:
    """The interface's resolved neighbours, IPv4 and IPv6, as (address, MAC): what the
    kernel holds for it (`ip -j neigh`), without entries it could not resolve."""
    shown = run(_ip(netns, "-j", "neigh", "show", "dev", ifname)).stdout
    entries: list[dict[str, Any]] = json.loads(shown or "[]")
    unresolved = {"FAILED", "INCOMPLETE"}
    return [
        (str(entry["dst"]), str(entry["lladdr"]))
        for entry in entries
        if "lladdr" in entry and not unresolved & set(entry.get("state", []))
    ]


def sync_addresses(ifname: str, netns: str, wanted: set[str]) -> None:
    """Make the interface's global addresses exactly `wanted` (`address/prefix` strings)."""
    wanted = {str(ipaddress.ip_interface(cidr)) for cidr in wanted}
    present = global_addresses(ifname, netns)
    for cidr in present - wanted:
        run(_ip(netns, "addr", "del", cidr, "dev", ifname))
    for cidr in wanted - present:
        nodad = ["nodad"] if ipaddress.ip_interface(cidr).version == 6 else []
        run(_ip(netns, "addr", "add", cidr, "dev", ifname, *nodad))


def flush_addresses(ifname: str, netns: str) -> None:
    """Drop the interface's global addresses, as a stopped guest would lose them."""
    run(_ip(netns, "addr", "flush", "dev", ifname, "scope", "global"))


def enable_forwarding(netns: str) -> None:
    """Let the namespace route between its interfaces (a router)."""
    for key in ("net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1"):
        run(["sysctl", "-qw", key], netns=netns)


def routes_via(gateway: str, netns: str) -> set[str]:
    """Destinations the namespace routes through `gateway`."""
    shown = json.loads(run(_ip(netns, "-j", "route", "show")).stdout)
    return {
        str(ipaddress.ip_network(route["dst"]))
        for route in shown
        if route.get("gateway") == gateway and route["dst"] != "default"
    }


def sync_routes(gateway: str, netns: str, wanted: set[str]) -> None:
    """Make the routes through `gateway` exactly `wanted` (destinations in CIDR form)."""
    wanted = {str(ipaddress.ip_network(dst)) for dst in wanted}
    present = routes_via(gateway, netns)
    for dst in present - wanted:
        run(_ip(netns, "route", "del", dst, "via", gateway))
    for dst in wanted - present:
        run(_ip(netns, "route", "replace", dst, "via", gateway))


def set_default_route(gateway: str, netns: str) -> None:
    """Send everything not local to `gateway`."""
    run(_ip(netns, "route", "replace", "default", "via", gateway))
