"""OpenFlow rules that quarantine a VM of a blocked group (CN101652749A, point 5).

A blocked VM keeps its DHCP (as a client only: it must keep its address, so that it stays
where the group's DNS name says) and reaches only the networks the operator allows (a patch
or forensics server); everything else it sends, and everything sent to it, is dropped by the
switch of its host. The rules are texts in `ovs-ofctl` flow syntax, each carrying a cookie that
names the VM and the purpose, so a host's quarantine rules are found, replaced and removed as a
set (`QUARANTINE_MASK`) without touching any other rule.

Traffic is matched three ways: from the VM's switch port (`in_port`, which no guest can
forge), from its MAC (`dl_src`, which holds before the port exists: a libvirt port appears
only when the domain starts, and a VM created into a blocked group must be blocked from its
first packet), and to its MAC (`dl_dst`). Broadcasts to the VM (a DHCP offer, ARP requests)
still arrive; it cannot answer them.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass

from vmfabric.domain.errors import InvalidInput
from vmfabric.domain.names import normalize_mac

QUARANTINE_KIND = 0x0B10
"""The top 16 bits of a quarantine rule's cookie; the low 48 bits are the VM's id."""

QUARANTINE_MASK = 0xFFFF << 48
"""Cookie mask that selects every quarantine rule of a switch."""

ALLOW_PRIORITY = 40100
DROP_PRIORITY = 40000
PASS = "NORMAL"
"""What allowed traffic does: the switch's normal forwarding."""

_VM_ID_BITS = 48


@dataclass(frozen=True)
class QuarantinedNic:
    """A NIC to quarantine: its VM's id, MAC and switch port number, when the port exists."""

    vm_id: int
    mac: str
    ofport: int | None = None


def quarantine_cookie(vm_id: int) -> int:
    """The cookie of a VM's quarantine rules."""
    if not 0 < vm_id < 1 << _VM_ID_BITS:
        raise InvalidInput(f"VM id {vm_id} does not fit in a cookie")
    return QUARANTINE_KIND << _VM_ID_BITS | vm_id


def parse_allowed(texts: Sequence[str]) -> tuple[str, ...]:
    """The networks a blocked VM may still reach, canonical and without duplicates.

    Raises InvalidInput naming the first text that is not an address or CIDR.
    """
    found: dict[str, None] = {}
    for text in texts:
        try:
            network = ipaddress.ip_network(text.strip(), strict=False)
        except ValueError:
            raise InvalidInput(
                f"invalid allowed network {text!r}: expected an address or CIDR like "
                "10.0.0.5 or 10.0.0.0/24"
            ) from None
        found[str(network)] = None
    return tuple(found)


def quarantine_flows(nic: QuarantinedNic, allowed: Sequence[str] = ()) -> list[str]:
    """The rules that quarantine one NIC, in `ovs-ofctl add-flows` syntax.

    `allowed` are canonical networks (`parse_allowed`) the NIC may still exchange traffic
    with. With any allowed, ARP (IPv4) or neighbour discovery (IPv6) is let through whole:
    an allowed network outside the VM's subnet is reached through its gateway, whose address
    must be resolved first.
    """
    cookie = f"cookie={quarantine_cookie(nic.vm_id):#018x}"
    mac = normalize_mac(nic.mac)
    sent = [f"dl_src={mac}"] + ([f"in_port={nic.ofport}"] if nic.ofport is not None else [])
    networks = [ipaddress.ip_network(text) for text in allowed]
    flows = [flow for source in sent for flow in _one_way(cookie, source, _SENT, networks)]
    return flows + _one_way(cookie, f"dl_dst={mac}", _RECEIVED, networks)


@dataclass(frozen=True)
class _Way:
    """What tells the allowed traffic of one direction: DHCP as a client, the peer's field."""

    dhcp: tuple[str, ...]
    peer_v4: str
    peer_v6: str


_SENT = _Way(("udp,tp_src=68,tp_dst=67", "udp6,tp_src=546,tp_dst=547"), "nw_dst", "ipv6_dst")
_RECEIVED = _Way(("udp,tp_src=67,tp_dst=68", "udp6,tp_src=547,tp_dst=546"), "nw_src", "ipv6_src")


def _one_way(
    cookie: str,
    match: str,
    way: _Way,
    networks: Sequence[ipaddress.IPv4Network | ipaddress.IPv6Network],
) -> list[str]:
    """The rules of one direction: allowed traffic passes, everything else matching drops."""
    allowed = [
        *way.dhcp,
        *(
            f"ip,{way.peer_v4}={network}"
            if network.version == 4
            else f"ipv6,{way.peer_v6}={network}"
            for network in networks
        ),
        *_neighbour_discovery(networks),
    ]
    rules = [f"{cookie},priority={ALLOW_PRIORITY},{match},{m},actions={PASS}" for m in allowed]
    return [*rules, f"{cookie},priority={DROP_PRIORITY},{match},actions=drop"]


def _neighbour_discovery(
    networks: Sequence[ipaddress.IPv4Network | ipaddress.IPv6Network],
) -> list[str]:
    """Matches of address resolution, for the IP versions of the allowed networks."""
    versions = {network.version for network in networks}
    matches = ["arp"] if 4 in versions else []
    if 6 in versions:
        matches += ["icmp6,icmp_type=135", "icmp6,icmp_type=136"]
    return matches
