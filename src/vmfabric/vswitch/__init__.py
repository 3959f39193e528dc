"""Virtual switch drivers: the OpenFlow rules and VM ports of a host's switch.

Quarantine rules (and later network policies) are installed by cookie: each set of rules
carries a cookie that names its purpose and VM, so a set is read, replaced or removed as a
whole (`cookie`/`mask`) without touching the rules of anybody else. One module per switch
(`openvswitch`), all behind `Vswitch`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

_COOKIE = re.compile(r"^\s*cookie=(0x[0-9a-fA-F]+|\d+)")
_METER_ID = re.compile(r"^\s*meter=(\d+)(?=[,\s]|$)")
_METERED = re.compile(r"actions=(?<![^,\s]actions=)(?:.*,)?meter:(\d+)(?=,|$)")
"""`actions=` first, and the lookbehind after it (the start, a comma or a blank before): a
search skips to it as fast as a plain find, for each of the thousands of rules of a move."""


class VswitchError(Exception):
    """The switch or its tools refused or failed an operation; the message is the tool's."""


class Vswitch(Protocol):
    """What the control plane asks of a host's virtual switch."""

    def ports(self, bridge: str) -> dict[str, int]:
        """MAC -> OpenFlow port of the VM NICs plugged into `bridge`.

        Rules matching `in_port` hold even against a guest that forges its MAC, so the
        compiler needs each NIC's port; NICs whose port has no number yet are left out.
        """
        ...

    def flows(self, bridge: str, cookie: int, mask: int) -> list[str]:
        """The rules whose cookie matches `cookie`/`mask`, sorted and without statistics.

        Sorted, stable texts let a reconciler (or a test) compare what the switch holds with
        what it should hold.
        """
        ...

    def replace_flows(self, bridge: str, cookie: int, mask: int, flows: Sequence[str]) -> None:
        """Make `flows` the only rules whose cookie matches `cookie`/`mask`, atomically.

        Atomic, so that no packet ever meets a half-installed set (a quarantined VM briefly
        unfiltered) and a refused rule leaves the previous set in place.
        """
        ...

    def change_flows(
        self,
        bridge: str,
        deletes: Sequence[tuple[int, int]],
        adds: Sequence[str],
        meters: Sequence[str] = (),
        meter_deletes: Sequence[range] = (),
        *,
        current_meters: Sequence[str] | None = None,
    ) -> None:
        """Remove the rules matching each `(cookie, mask)` of `deletes` and add `adds`, atomically;
        make `meters` the only meters whose ids are in `meter_deletes`.

        A migration moves a VM's rules of several kinds at once (its send rules go, its where
        rules become redirects); one commit keeps the VM from ever being half filtered. Each
        added rule must carry a cookie matching one of `deletes`, and each meter an id in one
        of `meter_deletes`, so a later change can remove them again. The meters the added
        rules use (`meter:N`) are there before the rules, and a meter removed goes only after
        the rules that used it (a switch deletes the rules of a meter it deletes); a refused
        change leaves rules and meters as they were.

        `current_meters` are the bridge's meters as `meters` gave them just before, for a
        caller that read them at once with other facts of the switch (a migration's install,
        while the VM waits); without them the change reads them itself when it needs them.
        """
        ...

    def meters(self, bridge: str) -> list[str]:
        """Every meter of `bridge` in `ovs-ofctl add-meter` syntax, by id.

        A rate limit follows a VM as a meter its send rules use; the texts compare equal to
        the compiler's (`domain.policy.port_meters`) and install again as they are.
        """
        ...

    def packets(self, bridge: str, cookie: int, mask: int) -> int:
        """How many packets the rules whose cookie matches `cookie`/`mask` have matched.

        A growing count tells the controller that a VM's traffic flows through its rules on a
        host, i.e. that the VM really runs there now.
        """
        ...

    def peer_ports(self, bridge: str) -> dict[str, int]:
        """Other host -> OpenFlow port of the peer link from `bridge` to that host's switch.

        Redirect rules send a migrating VM's packets in flight over these links; links whose
        port has no number yet are left out.
        """
        ...

    def redirect_ports(self, bridge: str) -> RedirectPorts:
        """The peer links of `bridge` (as `peer_ports`) and its access ports by VLAN, read at
        once: redirecting a VM that moves out needs both while the VM waits.

        An untagged packet from a local port carries no VLAN a rule could match; a migrating
        VM's redirect rules take untagged packets from the access ports of its VLAN only, so
        traffic from a port of another VLAN is not let into the VM's.
        """
        ...

    def announce(self, bridge: str, ofport: int, mac: str, ipv4: str) -> None:
        """Send a gratuitous ARP for `mac`/`ipv4` into `bridge` as if it came from `ofport`.

        After a migration the learning switches on the way still send the VM's traffic to its
        old host; QEMU announces the VM from its new port so they relearn, and so does this.
        """
        ...


@dataclass(frozen=True)
class RedirectPorts:
    """A bridge's ports that redirect rules name: other host -> port of the peer link to it,
    and VLAN -> the OpenFlow ports of the access ports on it, sorted (trunks are on none)."""

    peers: Mapping[str, int]
    vlans: Mapping[int, tuple[int, ...]]

    @classmethod
    def of(cls, peers: Mapping[str, int], tagged: Iterable[tuple[int, int]]) -> RedirectPorts:
        """From the peer links and the (port, VLAN) pairs of the access ports."""
        vlans: dict[int, list[int]] = {}
        for port, vlan in sorted(tagged):
            vlans.setdefault(vlan, []).append(port)
        return cls(dict(peers), {vlan: tuple(ports) for vlan, ports in vlans.items()})


def cookie_of(rule: str) -> int:
    """The cookie a rule text starts with, as the switches print them (0 when it has none)."""
    found = _COOKIE.match(rule)
    return int(found[1], 0) if found else 0


def meter_id_of(meter: str) -> int:
    """The id of a meter text (`meter=N,...`); VswitchError for a text that names none."""
    found = _METER_ID.match(meter)
    if found is None:
        raise VswitchError(f"meter {meter!r} does not start with meter=<id>")
    return int(found[1])


def metered_by(rule: str) -> int | None:
    """The meter a rule text's actions pass packets through (`meter:N`), if any."""
    found = _METERED.search(rule)
    return int(found[1]) if found else None


@dataclass(frozen=True)
class MeterChange:
    """What one change does to a bridge's meters: those to add before the rules, and those
    to modify and to remove after them."""

    added: tuple[str, ...]
    modified: tuple[str, ...]
    removed: tuple[int, ...]

    @classmethod
    def of(
        cls,
        present: Iterable[str],
        meters: Sequence[str],
        deletes: Sequence[range],
        adds: Sequence[str],
    ) -> MeterChange:
        """The change from the `present` meters (texts, as `Vswitch.meters` gives them) that
        makes `meters` the only meters in the ranges of `deletes`, with the same checks on
        every switch: a meter outside those ranges, or a rule using a meter the bridge would
        not have, refuses it."""
        current = {meter_id_of(meter): meter for meter in present}
        wanted = {meter_id_of(meter): meter for meter in meters}
        for meter_id, meter in wanted.items():
            if not any(meter_id in ids for ids in deletes):
                raise VswitchError(f"meter {meter!r} needs an id in a deleted range")
        removed = [i for i in current if i not in wanted and any(i in ids for ids in deletes)]
        kept = (set(current) - set(removed)) | set(wanted)
        for rule in adds:
            used = metered_by(rule)
            if used is not None and used not in kept:
                raise VswitchError(f"flow {rule!r} uses meter {used}, which would not exist")
        return cls(
            added=tuple(m for i, m in wanted.items() if i not in current),
            modified=tuple(m for i, m in wanted.items() if i in current and current[i] != m),
            removed=tuple(sorted(removed)),
        )
