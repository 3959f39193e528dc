"""Names of everything the lab makes.

All start with `vmf`. Interface names must fit Linux's 15 characters, so they carry a short
hash of their owner instead of its name; the owner is recorded next to each interface in the
lab's record. Namespace names join their parts with `.`, which no DNS label contains, so two
owners can never produce the same name.
"""

from __future__ import annotations

import hashlib
import ipaddress

from vmfabric.domain.errors import InvalidInput
from vmfabric.domain.names import check_name
from vmfabric.lab.errors import LabInputError

PREFIX = "vmf"
FABRIC_BRIDGE = "vmf-fabric"
WAN_NETNS = "vmf-wan"
WAN_ADDRESS = "203.0.113.1/24"
MAX_IFNAME = 15
MAX_HOSTS = 64
TRANSIT_POOL = ipaddress.IPv4Network("198.18.0.0/15")

ROUTER_LAN_IF = "vmf-lan"
ROUTER_WAN_IF = "vmf-up"
DHCP_IF = "vmf-dhcp"


def check_label(kind: str, name: str) -> str:
    """Refuse names that are not DNS labels, since they end up in paths and device names."""
    try:
        return check_name(kind, name)
    except InvalidInput as err:
        raise LabInputError(err.detail) from err


def short_id(*parts: str) -> str:
    """Eight hex digits standing for `parts`, stable across processes and runs."""
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:8]


def lab_hosts(count: int) -> list[str]:
    """The host names of a lab with `count` hosts: hv1…hvN."""
    if not 1 <= count <= MAX_HOSTS:
        raise LabInputError(f"the lab has 1 to {MAX_HOSTS} hosts, not {count}")
    return [f"hv{i}" for i in range(1, count + 1)]


def host_bridge(host: str) -> str:
    """The host's own switch: VMs of `host` plug in here."""
    return f"{PREFIX}-{check_label('host', host)}"


def host_uplink(host: str) -> tuple[str, str]:
    """The patch-port pair joining a host bridge (first) to the fabric bridge (second)."""
    return f"{PREFIX}-{host}-up", f"{PREFIX}-up-{host}"


def peer_link(host: str, other: str) -> str:
    """The port on `host`'s bridge of the peer link to `other`'s (whose end is
    `peer_link(other, host)`); it is not a kernel interface, but keeps to the same length."""
    name = f"{PREFIX}-{check_label('host', host)}-{check_label('host', other)}"
    if len(name) > MAX_IFNAME:
        raise LabInputError(
            f"the peer link name {name} is longer than {MAX_IFNAME} characters; "
            "lab hosts are named hv1...hvN"
        )
    return name


def vm_netns(host: str, vm: str) -> str:
    """One namespace per VM and host it was defined on, so a VM can be defined on two hosts;
    a VM that migrates keeps its namespace (its record names it)."""
    return f"{PREFIX}-vm.{check_label('host', host)}.{check_label('VM', vm)}"


def vm_port(host: str, vm: str, index: int) -> str:
    """The host end of a VM NIC's veth, plugged into the host bridge."""
    return f"{PREFIX}v{short_id(host, vm, str(index))}"


def vm_ifname(index: int) -> str:
    """The VM's side of NIC `index`, named as a guest would see it."""
    return f"eth{index}"


def incoming_ifname(index: int) -> str:
    """The VM's side of NIC `index`'s destination port during a migration, until the
    switch-over gives it the NIC's own name."""
    return f"{PREFIX}-in{index}"


def outgoing_ifname(index: int) -> str:
    """The VM's side of NIC `index`'s source port once the switch-over took its name, until
    its veth is deleted."""
    return f"{PREFIX}-out{index}"


def router_netns(network: str) -> str:
    """Holds the network's gateway addresses."""
    return f"{PREFIX}-rt.{check_label('network', network)}"


def dhcp_netns(network: str) -> str:
    """Where the network's DHCP server runs."""
    return f"{PREFIX}-dhcp.{check_label('network', network)}"


def router_port(network: str) -> str:
    """The fabric end of the router's LAN veth."""
    return f"{PREFIX}r{short_id(network)}"


def dhcp_port(network: str) -> str:
    """The fabric end of the DHCP namespace's veth."""
    return f"{PREFIX}d{short_id(network)}"


def wan_port(network: str) -> str:
    """The `vmf-wan` end of an external network's transit link."""
    return f"{PREFIX}w{short_id(network)}"


def transit(index: int) -> tuple[str, str]:
    """Addresses (wan side, router side) with prefix of the `index`th transit /30."""
    count = TRANSIT_POOL.num_addresses // 4
    if not 0 <= index < count:
        raise LabInputError(f"transit link index {index} is outside 0..{count - 1}")
    base = TRANSIT_POOL.network_address + 4 * index
    return f"{base + 1}/30", f"{base + 2}/30"
