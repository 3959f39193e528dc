"""Virtual switch drivers: the OpenFlow rules and VM ports of a host's switch.

Quarantine rules (and later network policies) are installed by cookie: each set of rules
carries a cookie that names its purpose and VM, so a set is read, replaced or removed as a
whole (`cookie`/`mask`) without touching the rules of anybody else. One module per switch
(`openvswitch`), all behind `Vswitch`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol


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
