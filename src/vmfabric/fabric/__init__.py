"""Network plumbing shared by the hosts of a network: its gateway and its DHCP attachment.

In the lab this is a router namespace and a DHCP namespace per network (`vmfabric.lab.fabric`);
in a real cloud the gateway is the operator's router and DHCP attaches to a host interface.
"""

from __future__ import annotations

from typing import Protocol

from vmfabric.domain.model import DhcpPlacement, NetworkInfo


class Fabric(Protocol):
    """Builds and removes what a network needs outside the hypervisor hosts."""

    def ensure_network(self, network: NetworkInfo) -> DhcpPlacement:
        """Build (or find already built) the network's gateway and DHCP attachment."""
        ...

    def remove_network(self, name: str) -> None:
        """Remove what `ensure_network` built; unknown names are ignored."""
        ...
