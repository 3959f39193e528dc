"""Plain values passed between the services and the drivers.

They carry only what a driver needs; the store has the full picture.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum


class NetworkKind(StrEnum):
    """Internal networks stay inside the cloud; external ones route to the outside world."""

    INTERNAL = "internal"
    EXTERNAL = "external"


class Ipv6Mode(StrEnum):
    """How a VM on an IPv6 subnet gets its address."""

    SLAAC = "slaac"
    DHCPV6 = "dhcpv6"


class VmState(StrEnum):
    """Lifecycle of a VM as the controller records it."""

    CREATING = "creating"
    RUNNING = "running"
    STOPPED = "stopped"
    ERROR = "error"


@dataclass(frozen=True)
class NicSpec:
    """One NIC to attach: which bridge and VLAN, and a MAC only when the operator fixed one."""

    network: str
    bridge: str
    vlan: int
    mac: str | None = None


@dataclass(frozen=True)
class VmSpec:
    """What the hypervisor driver needs to define a VM."""

    name: str
    image: str
    nics: tuple[NicSpec, ...]
    memory_mib: int = 512
    vcpus: int = 1


@dataclass(frozen=True)
class DefinedVm:
    """What the hypervisor answered: the MAC of each NIC, in the order of `VmSpec.nics`."""

    name: str
    macs: tuple[str, ...]


@dataclass(frozen=True)
class HypervisorVm:
    """A VM as the hypervisor sees it, for reconciling."""

    name: str
    running: bool
    macs: tuple[str, ...] = ()


@dataclass(frozen=True)
class SubnetInfo:
    """A subnet as the DHCP server and the network plumbing need it."""

    cidr: str
    gateway: str | None
    dhcp_server: str | None
    ipv6_mode: Ipv6Mode | None = None


@dataclass(frozen=True)
class NetworkInfo:
    """A network as the drivers see it."""

    name: str
    kind: NetworkKind
    vlan: int
    subnets: tuple[SubnetInfo, ...]


@dataclass(frozen=True)
class Reservation:
    """A DHCP static allocation: this MAC gets these addresses and this host name."""

    network: str
    mac: str
    hostname: str
    ipv4: str | None = None
    ipv6: str | None = None


@dataclass(frozen=True)
class DhcpPlacement:
    """Where a network's DHCP server runs: a namespace (None = the host's own) and interface."""

    interface: str
    netns: str | None = None
    extra_args: tuple[str, ...] = field(default_factory=tuple)


class LeaseAction(StrEnum):
    """dnsmasq's lease script actions: granted, renewed or re-announced, released or expired."""

    ADD = "add"
    OLD = "old"
    DEL = "del"


@dataclass(frozen=True)
class LeaseEvent:
    """One lease event as dnsmasq reported it."""

    network: str
    action: LeaseAction
    mac: str
    address: str
    hostname: str | None = None
    expires: int | None = None
