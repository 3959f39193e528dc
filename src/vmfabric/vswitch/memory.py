"""`Vswitch` in memory: rule sets by cookie, meters by id, ports and peer links set by the
caller.

The controller's use cases (blocks, policies, the migration method) are tested on it quickly
and without root; the same contract tests (`tests/lab/test_vswitch_contract.py`) run on the
real Open vSwitch, so what the use cases rely on holds on both. It keeps rule texts as given
and does not forward packets: what rules do to traffic is tested on the real switch only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from vmfabric.vswitch import (
    MeterChange,
    RedirectPorts,
    VswitchError,
    cookie_of,
    meter_id_of,
    metered_by,
)


@dataclass
class MemorySwitch:
    """A switch whose bridges hold rule texts and meters (`meter_table`: id -> text);
    `plugged`, `peers`, `tags` (port -> VLAN) and `counts` are set by the test (as libvirt
    plugging a VM, or traffic, would change them on a real switch)."""

    rules: dict[str, list[str]] = field(default_factory=dict)
    meter_table: dict[str, dict[int, str]] = field(default_factory=dict)
    plugged: dict[str, dict[str, int]] = field(default_factory=dict)
    peers: dict[str, dict[str, int]] = field(default_factory=dict)
    tags: dict[str, dict[int, int]] = field(default_factory=dict)
    counts: dict[str, dict[int, int]] = field(default_factory=dict)
    announced: list[tuple[str, int, str, str]] = field(default_factory=list)
    changes: int = 0

    def ports(self, bridge: str) -> dict[str, int]:
        """MAC -> port of the NICs plugged into `bridge`."""
        return dict(self.plugged.get(bridge, {}))

    def flows(self, bridge: str, cookie: int, mask: int) -> list[str]:
        """The rule texts whose cookie matches, sorted."""
        return sorted(r for r in self.rules.get(bridge, []) if cookie_of(r) & mask == cookie & mask)

    def replace_flows(self, bridge: str, cookie: int, mask: int, flows: Sequence[str]) -> None:
        """One change: the matching rules go, `flows` come."""
        self.change_flows(bridge, [(cookie, mask)], flows)

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
        """All or nothing, like a bundle: a rule no delete could remove again, or that uses
        a meter the bridge would not have, is refused. A meter removed takes the rules that
        use it along, as on Open vSwitch. The change is worked out from `current_meters`
        when given, as the real switch's is."""
        for flow in adds:
            cookie = cookie_of(flow)
            if not any(cookie & mask == wanted & mask for wanted, mask in deletes):
                raise VswitchError(f"flow {flow!r} needs a cookie matching one of the deletes")
        current = self.meter_table.get(bridge, {})
        present = current.values() if current_meters is None else current_meters
        change = MeterChange.of(present, meters, meter_deletes, adds)

        def kept(rule: str) -> bool:
            deleted = any(cookie_of(rule) & mask == c & mask for c, mask in deletes)
            return not deleted and metered_by(rule) not in change.removed

        table = {**current, **{meter_id_of(m): m for m in (*change.added, *change.modified)}}
        self.meter_table[bridge] = {i: table[i] for i in sorted(table) if i not in change.removed}
        self.rules[bridge] = [r for r in self.rules.get(bridge, []) if kept(r)] + list(adds)
        self.changes += 1

    def meters(self, bridge: str) -> list[str]:
        """The meter texts of `bridge`, by id."""
        return list(self.meter_table.get(bridge, {}).values())

    def packets(self, bridge: str, cookie: int, mask: int) -> int:
        """The packets counted for the matching cookies."""
        counted = self.counts.get(bridge, {})
        return sum(n for c, n in counted.items() if c & mask == cookie & mask)

    def peer_ports(self, bridge: str) -> dict[str, int]:
        """Other host -> port of the peer link to it."""
        return dict(self.peers.get(bridge, {}))

    def redirect_ports(self, bridge: str) -> RedirectPorts:
        """The peer links, and the tagged ports by VLAN."""
        return RedirectPorts.of(self.peer_ports(bridge), self.tags.get(bridge, {}).items())

    def announce(self, bridge: str, ofport: int, mac: str, ipv4: str) -> None:
        """Remembered, for the test to see."""
        self.announced.append((bridge, ofport, mac, ipv4))
