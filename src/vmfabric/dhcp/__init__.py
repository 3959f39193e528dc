"""DHCP drivers: serve the controller's reservations and report lease events.

`dnsmasq` is the one driver; the `DhcpServer` protocol is what the services see.
"""

from __future__ import annotations

from typing import Protocol

from vmfabric.domain.model import DhcpPlacement, LeaseEvent, NetworkInfo, Reservation


class DhcpError(Exception):
    """The DHCP server could not be started or updated."""


class DhcpServer(Protocol):
    """Reservations per network. Methods are idempotent: reconciling calls them freely."""

    def ensure_network(self, network: NetworkInfo, placement: DhcpPlacement) -> None:
        """Make sure a server for this network runs (start it or adopt a running one)."""
        ...

    def remove_network(self, name: str) -> None:
        """Stop the network's server and remove its files."""
        ...

    def put(self, reservation: Reservation) -> None:
        """Add or replace the reservation of one MAC on one network."""
        ...

    def delete(self, network: str, mac: str) -> None:
        """Remove the reservation of one MAC; unknown ones are ignored."""
        ...

    def sync(self, network: str, reservations: list[Reservation]) -> None:
        """Make the network's reservations exactly this set (after a restart)."""
        ...

    def leases(self, network: str) -> list[LeaseEvent]:
        """The leases the network's server holds now (as `old` events)."""
        ...

    def flush(self) -> None:
        """Apply every pending change now (changes may be coalesced for a short while)."""
        ...

    def close(self) -> None:
        """Stop background work; servers keep running so leases survive a controller restart."""
        ...
