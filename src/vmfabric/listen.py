"""Whether a server could listen on an address now.

`vmfabric serve` checks the addresses it was given before it opens anything, so a taken one
ends it with one clear line instead of a failure half way through its start; each server
still binds for itself.
"""

from __future__ import annotations

import ipaddress
import socket


def check_free(listen: tuple[str, int], *, udp: bool = False) -> None:
    """Raise OSError if TCP (and, with `udp`, UDP) on this address cannot be bound now."""
    host, port = listen
    family = socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
    kinds = (socket.SOCK_DGRAM, socket.SOCK_STREAM) if udp else (socket.SOCK_STREAM,)
    for kind in kinds:
        with socket.socket(family, kind) as probe:
            if kind == socket.SOCK_STREAM:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((host, port))
