"""dnsmasq's `--dhcp-script`: forward one lease change to the controller as a JSON datagram.

dnsmasq runs its script once per lease change and, after every SIGHUP, once more for every
existing lease, one run at a time. The driver's shell wrapper (`dnsmasq.hook_script`) drops
those replays when they repeat what was already delivered, without starting Python, and runs
this for the rest: standard library only (`python -I -S lease_hook.py`, without site-packages
and without importing the vmfabric package), one datagram. The exit status tells the wrapper
whether the datagram was delivered (0) or not (`EX_TEMPFAIL`), so that an event the controller
missed is sent again at the next replay; the wrapper itself always exits 0, because dnsmasq
would log any other status as a failure. The datagram carries the fields of
`vmfabric.domain.model.LeaseEvent`.

Usage: `lease_hook.py --socket PATH --network NAME -- ACTION MAC ADDRESS [HOSTNAME]`.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
from collections.abc import Mapping, Sequence

LEASE_ACTIONS = ("add", "old", "del")
SEND_TIMEOUT_S = 1.0

_DUID_LLT_ETHERNET = ["00", "01", "00", "01"]
_DUID_LL_ETHERNET = ["00", "03", "00", "01"]


def mac_from_duid(duid: str) -> str | None:
    """DHCPv6 names clients by DUID; the link-layer kinds (LLT, LL) on Ethernet embed the MAC."""
    octets = duid.lower().split(":")
    if len(octets) == 14 and octets[:4] == _DUID_LLT_ETHERNET:
        return ":".join(octets[8:])
    if len(octets) == 10 and octets[:4] == _DUID_LL_ETHERNET:
        return ":".join(octets[4:])
    return None


def lease_expiry(env: Mapping[str, str]) -> int | None:
    """Absolute expiry (epoch seconds, 0 = never) so the controller need not trust its own clock."""
    value = env.get("DNSMASQ_LEASE_EXPIRES")
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def build_event(network: str, args: Sequence[str], env: Mapping[str, str]) -> dict[str, object]:
    """Turn dnsmasq's arguments into the event; raises ValueError for actions we do not report.

    dnsmasq passes the client's DUID instead of a MAC for DHCPv6 leases, with the MAC (when it
    knows it) in `DNSMASQ_MAC`; the controller keys everything by MAC, so prefer that.
    """
    if len(args) < 3 or args[0] not in LEASE_ACTIONS:
        raise ValueError(f"not a lease change: {list(args)!r}")
    action, client, address = args[0], args[1], args[2]
    hostname = args[3] if len(args) > 3 and args[3] else None
    mac = env.get("DNSMASQ_MAC") or mac_from_duid(client) or client
    return {
        "network": network,
        "action": action,
        "mac": mac.lower(),
        "address": address,
        "hostname": hostname,
        "expires": lease_expiry(env),
    }


def send_datagram(socket_path: str, payload: bytes) -> bool:
    """Best effort: a controller that is down or stuck must never hold up dnsmasq's script queue."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.settimeout(SEND_TIMEOUT_S)
            sock.sendto(payload, socket_path)
    except OSError:
        return False
    return True


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """Our own options first; dnsmasq's arguments follow `--` as they came."""
    parser = argparse.ArgumentParser(prog="vmfabric-lease-hook", description=__doc__)
    parser.add_argument("--socket", required=True, help="unix datagram socket of the controller")
    parser.add_argument("--network", required=True, help="the network this dnsmasq serves")
    parser.add_argument("dnsmasq_args", nargs="*", help="ACTION MAC ADDRESS [HOSTNAME]")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point for the wrapper: 0 when the event was delivered or is not one we report."""
    options = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        event = build_event(options.network, options.dnsmasq_args, os.environ)
    except ValueError:
        return 0
    return 0 if send_datagram(options.socket, json.dumps(event).encode()) else os.EX_TEMPFAIL


if __name__ == "__main__":
    sys.exit(main())
