"""Open vSwitch driver of `Vswitch`: ovs-ofctl for OpenFlow rules, ovs-vsctl for the database.

The command-line tools are the interface Open vSwitch keeps stable across versions; a flow
text in their syntax is what the rule compilers produce. A change of rules is one OpenFlow 1.4
bundle (`ovs-ofctl --bundle add-flows`) fed on stdin: a `delete` per cookie set followed by an
`add` per rule, committed by the switch all together or not at all. Rules are read back in
OpenFlow 1.4 too: OpenFlow 1.0 cannot say `meter:N`, and ovs-ofctl would leave it out.

Rate limits are OpenFlow 1.3 meters, which Open vSwitch takes in no bundle: a change adds the
meters its rules use before the bundle, and modifies and deletes meters after it (a deleted
meter takes the rules that use it along).

What a libvirt host's switch needs: its bridge must accept OpenFlow 1.3 and 1.4 (it does when
the Bridge's `protocols` column is empty; one that lists protocols must list both, e.g.
`ovs-vsctl set bridge br0 protocols=OpenFlow10,OpenFlow13,OpenFlow14`), and its datapath must
have meters (`ovs-ofctl -O OpenFlow13 meter-features br0` shows `max_meter` above 0): the
userspace datapath (`datapath_type=netdev`, the lab's) has them, and so does the Linux
kernel's from 4.15 on. Meter ids from 100 up are vmfabric's (`domain.policy.METERS_PER_VM`).
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import re
import struct
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from vmfabric.domain.names import normalize_mac
from vmfabric.lab.ovs import switch_access
from vmfabric.vswitch import MeterChange, RedirectPorts, VswitchError, meter_id_of

TIMEOUT = 60.0
"""Seconds any one tool may take; 20,000 rules take well under one."""

ATTACHED_MAC = "attached-mac"
"""The Interface `external_ids` key libvirt (and the lab) sets to the NIC's MAC."""

PEER_MARK = "vmfabric-peer"
"""The Interface `external_ids` key naming the host a peer link leads to."""

SYSTEM_RUNDIR = "/var/run/openvswitch"
"""Where the system's Open vSwitch keeps its sockets unless `OVS_RUNDIR` says otherwise."""

OPENFLOW = "OpenFlow14"
"""The protocol rules and meters are written and read in: that of the bundles."""

_COOKIE_BITS = 64
_METER_START = re.compile(r"^(?=meter=)", re.M)
_ACTIONS = re.compile(r"action(?<!\waction)s?=")
"""`action=` or `actions=` as a word; `action` first, so that a search skips to it as fast as a
plain find (a change checks each of its thousands of rules)."""
_COOKIE = re.compile(r"(?:^|[,\s])cookie=(0x[0-9a-fA-F]+|[1-9][0-9]*|0)(?=[,\s]|$)")
_PACKET_COUNT = re.compile(r"\bpacket_count=(\d+)")
_BROADCAST = b"\xff" * 6
_ETH_ARP = 0x0806
_ARP_ETHERNET_IPV4 = (1, 0x0800, 6, 4)
"""ARP's hardware type (Ethernet), protocol type (IPv4) and their address lengths."""
_ARP_REQUEST = 1
_MIN_FRAME = 60
"""Ethernet's shortest frame without its checksum; shorter ones are padded with zeros."""


class OpenVswitch:
    """`Vswitch` on an Open vSwitch reached with its command-line tools."""

    def __init__(self, env: Mapping[str, str] | None = None, db: str | None = None) -> None:
        """Extra `env` (`OVS_RUNDIR`, where the `<bridge>.mgmt` sockets are) and `db` (the
        OVSDB socket) reach a private switch such as the lab's; without them, the system's."""
        self._env = dict(env or {})
        self._db = db

    def ports(self, bridge: str) -> dict[str, int]:
        """MAC -> OpenFlow port of `bridge`'s interfaces marked with `attached-mac`.

        The mark, not the interface name, ties a port to a VM NIC: libvirt names taps `vnetN`
        and reuses the names. One tool run whatever the number of ports.
        """
        found = (_attached_port(i.ofport, i.marks) for i in self._interfaces(bridge))
        return dict(port for port in found if port is not None)

    def peer_ports(self, bridge: str) -> dict[str, int]:
        """Other host -> OpenFlow port of `bridge`'s interfaces marked `vmfabric-peer=<host>`.

        The operator (or the lab) marks the link to each other host, whatever its kind (patch
        port, tunnel); one tool run whatever the number of ports.
        """
        return _peers(self._interfaces(bridge))

    def redirect_ports(self, bridge: str) -> RedirectPorts:
        """The peer links (`peer_ports`) and, by VLAN, the interfaces of the ports whose `tag`
        it is (access ports), from the same single tool run."""
        interfaces = self._interfaces(bridge)
        tagged = ((i.ofport, i.tag) for i in interfaces if i.tag is not None)
        return RedirectPorts.of(_peers(interfaces), tagged)

    def interface_bridges(self) -> dict[str, str]:
        """Interface row UUID -> name of the bridge holding it, read in one transaction.

        The port watcher names each new interface's bridge with it; by row, not by name,
        since a name moved to another bridge is a new row.
        """
        listed = self._vsctl(
            "--format=json",
            "--columns=name,ports",
            "list",
            "Bridge",
            "--",
            "--columns=_uuid,interfaces",
            "list",
            "Port",
        )
        bridges, ports = (json.loads(line) for line in listed.splitlines() if line.strip())
        bridge_of_port = {
            port: name for name, members in bridges["data"] for port in _uuids(members)
        }
        return {
            interface: bridge_of_port[port]
            for (_, port), members in ports["data"]
            if port in bridge_of_port
            for interface in _uuids(members)
        }

    def flows(self, bridge: str, cookie: int, mask: int) -> list[str]:
        """The rules matching `cookie`/`mask` as `ovs-ofctl --no-stats dump-flows` prints them.

        The switch's own printing is canonical (field order, hex cookies), so two reads of an
        unchanged switch compare equal; statistics would make them differ, and port names
        (which ovs-ofctl may print for numbers) would change with a renamed port.
        """
        dumped = self._ofctl(
            "-O", OPENFLOW, "--no-stats", "dump-flows", bridge, _cookie_match(cookie, mask)
        )
        return sorted(line.strip() for line in dumped.splitlines() if line.strip())

    def replace_flows(self, bridge: str, cookie: int, mask: int, flows: Sequence[str]) -> None:
        """`change_flows` with the one set `cookie`/`mask`."""
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
        """One bundle: a `delete` per `(cookie, mask)` of `deletes`, then an `add` per rule;
        the new meters before it, the changed and the unwanted ones after it.

        Each added rule must carry a cookie matching one of `deletes`, or a later change could
        not remove it again. The switch commits the bundle whole or refuses it whole; the
        meters added for a refused bundle are deleted again (a meter the switch refuses to
        modify or delete once the bundle is in raises too, and the next change of the set
        repeats it). Without meters to set or delete the meters are not read: the switch
        itself refuses a rule using an unknown meter; with `current_meters` they are not read
        either (one tool run less).
        """
        lines = [f"delete {_cookie_match(cookie, mask)}" for cookie, mask in deletes]
        lines += [f"add {_checked_flow(flow, deletes)}" for flow in adds]
        change = self._meter_change(bridge, meters, meter_deletes, adds, current_meters)
        for meter in change.added:
            self._ofctl("-O", OPENFLOW, "add-meter", bridge, meter)
        try:
            self._ofctl("--bundle", "add-flows", bridge, "-", stdin="\n".join(lines) + "\n")
        except VswitchError:
            with contextlib.suppress(VswitchError):
                self._delete_meters(bridge, [meter_id_of(meter) for meter in change.added])
            raise
        for meter in change.modified:
            self._ofctl("-O", OPENFLOW, "mod-meter", bridge, meter)
        self._delete_meters(bridge, change.removed)

    def meters(self, bridge: str) -> list[str]:
        """`ovs-ofctl dump-meters` rewritten in add-meter syntax (`meter=N,kbps,...,bands=...`),
        one text per meter whatever the number of its bands, by id."""
        return list(self._meters_by_id(bridge).values())

    def packets(self, bridge: str, cookie: int, mask: int) -> int:
        """The sum of the rules' packet counts, added up by the switch (`dump-aggregate`).

        One line whatever the number of rules, where `dump-flows` would print every rule.
        """
        reply = self._ofctl("dump-aggregate", bridge, _cookie_match(cookie, mask))
        found = _PACKET_COUNT.search(reply)
        if found is None:
            raise VswitchError(f"ovs-ofctl: no packet count in {reply.strip()!r}")
        return int(found[1])

    def announce(self, bridge: str, ofport: int, mac: str, ipv4: str) -> None:
        """A gratuitous ARP from `ofport`, forwarded by `NORMAL` as if the port had sent it.

        `NORMAL` learns the MAC behind `ofport` (in the port's VLAN) and floods the broadcast
        over the uplinks, so the fabric and every other host bridge relearn it too; the
        OpenFlow tables are bypassed, so a policy's send rules cannot drop the announcement.
        """
        if ofport <= 0:
            raise VswitchError(f"port {ofport} cannot send: it has no OpenFlow number")
        frame = gratuitous_arp(mac, ipv4).hex()
        self._ofctl("packet-out", bridge, f"in_port={ofport} packet={frame} actions=NORMAL")

    @property
    def database(self) -> str:
        """The OVSDB server the tools talk to: the given one, else the system's socket."""
        rundir = self._env.get("OVS_RUNDIR") or os.environ.get("OVS_RUNDIR") or SYSTEM_RUNDIR
        return self._db or f"unix:{rundir}/db.sock"

    def environ(self) -> dict[str, str]:
        """The environment every tool of this switch runs in (`OVS_RUNDIR` and friends)."""
        return {**os.environ, **self._env}

    def _interfaces(self, bridge: str) -> list[_Interface]:
        """`bridge`'s numbered interfaces, with their marks and their port's VLAN tag, in one
        tool run (one OVSDB transaction: a migration step reads them while ports change).

        `list-ifaces` names the bridge's interfaces (and fails for a bridge that does not
        exist); the two tables come whole, which costs less than a second run. Interfaces
        without a number yet (`[]`) or that the switch could not open (-1) cannot carry
        traffic, so no rule may name them.
        """
        listed = self._vsctl(
            "--format=json",
            "list-ifaces",
            bridge,
            "--",
            "--columns=name,ofport,external_ids",
            "list",
            "Interface",
            "--",
            "--columns=name,tag",
            "list",
            "Port",
        )
        lines = [line.strip() for line in listed.splitlines() if line.strip()]
        names = {line for line in lines if not line.startswith("{")}
        interfaces, ports = (json.loads(line) for line in lines if line.startswith("{"))
        tags = {name: tag for name, tag in ports["data"] if isinstance(tag, int)}
        return [
            _Interface(name, ofport, dict(pairs), tags.get(name))
            for name, ofport, (_, pairs) in interfaces["data"]
            if name in names and isinstance(ofport, int) and ofport > 0
        ]

    def _meter_change(
        self,
        bridge: str,
        meters: Sequence[str],
        deletes: Sequence[range],
        adds: Sequence[str],
        current: Sequence[str] | None,
    ) -> MeterChange:
        """`MeterChange.of` the bridge's meters, read (unless `current` has them) only when
        the change is about meters."""
        if not meters and not deletes:
            return MeterChange((), (), ())
        present = self.meters(bridge) if current is None else current
        return MeterChange.of(present, meters, deletes, adds)

    def _meters_by_id(self, bridge: str) -> dict[int, str]:
        """Meter id -> text of `bridge`'s meters, in one tool run."""
        dumped = self._ofctl("-O", OPENFLOW, "dump-meters", bridge)
        body = dumped.split("\n", 1)[1] if "\n" in dumped else ""
        texts = (_meter_text(block) for block in _METER_START.split(body) if block.strip())
        return dict(sorted((meter_id_of(text), text) for text in texts))

    def _delete_meters(self, bridge: str, ids: Sequence[int]) -> None:
        """One tool run per meter: ovs-ofctl deletes one meter, or all of them, at a time."""
        for meter_id in ids:
            self._ofctl("-O", OPENFLOW, "del-meters", bridge, f"meter={meter_id}")

    def _vsctl(self, *args: str) -> str:
        database = [f"--db={self._db}"] if self._db else []
        return self._run(["ovs-vsctl", *database, *args])

    def _ofctl(self, *args: str, stdin: str = "") -> str:
        """Run ovs-ofctl with ports by number only (`--no-names`), as the rule texts name them:
        to accept or print names it first asks the switch for its ports over a connection of
        its own, ~8 ms more per run."""
        return self._run(["ovs-ofctl", "--no-names", *args], stdin)

    def _run(self, argv: list[str], stdin: str = "") -> str:
        """Run a tool; its failure becomes a VswitchError with the tool's own message."""
        tool = argv[0]
        try:
            done = subprocess.run(
                argv,
                input=stdin,
                capture_output=True,
                text=True,
                env=self.environ(),
                timeout=TIMEOUT,
                check=False,
            )
        except FileNotFoundError:
            raise VswitchError(f"{tool} is not installed (Open vSwitch is needed)") from None
        except subprocess.TimeoutExpired:
            raise VswitchError(f"{tool}: no answer within {TIMEOUT:g} s") from None
        if done.returncode != 0:
            raise VswitchError(_failure(tool, done.stderr, done.returncode))
        return done.stdout


def lab_vswitch() -> OpenVswitch:
    """The lab's private switch, so lab VMs and tests never touch a system Open vSwitch."""
    access = switch_access()
    return OpenVswitch(env=access.env, db=access.db)


@dataclass(frozen=True)
class _Interface:
    """An interface of a bridge as the driver reads it: the VLAN tag is its port's (access
    ports), None on a trunk."""

    name: str
    ofport: int
    marks: dict[str, str]
    tag: int | None


def _peers(interfaces: Sequence[_Interface]) -> dict[str, int]:
    """Other host -> port of the interfaces marked as peer links to it."""
    return {i.marks[PEER_MARK]: i.ofport for i in interfaces if PEER_MARK in i.marks}


def _attached_port(ofport: int, marks: Mapping[str, str]) -> tuple[str, int] | None:
    """(MAC, port) of an interface marked as a VM NIC with a valid MAC."""
    mac = marks.get(ATTACHED_MAC)
    if mac is None:
        return None
    try:
        return normalize_mac(mac), ofport
    except ValueError:
        return None


def _uuids(cell: list[Any]) -> list[str]:
    """The UUIDs of an OVSDB JSON reference cell: `["uuid", U]` or `["set", [...]]`."""
    kind, value = cell
    return [value] if kind == "uuid" else [uuid for _, uuid in value]


def gratuitous_arp(mac: str, ipv4: str) -> bytes:
    """The announcement a migrated guest sends (virtio's guest announce): a broadcast ARP
    request in which the sender asks for its own address (sender = target = `ipv4`)."""
    try:
        hardware = bytes.fromhex(normalize_mac(mac).replace(":", ""))
        address = ipaddress.IPv4Address(ipv4).packed
    except ValueError as error:
        raise VswitchError(f"cannot announce {mac} {ipv4}: {error}") from None
    ethernet = struct.pack("!6s6sH", _BROADCAST, hardware, _ETH_ARP)
    arp = struct.pack(
        "!HHBBH6s4s6s4s", *_ARP_ETHERNET_IPV4, _ARP_REQUEST, hardware, address, bytes(6), address
    )
    return (ethernet + arp).ljust(_MIN_FRAME, b"\0")


def _meter_text(dumped: str) -> str:
    """One meter as dump-meters prints it (`meter=5 kbps burst bands=` and a line per band of
    `type=drop rate=R burst_size=B`) in add-meter syntax, which takes the same words."""
    return ",".join(dumped.split()).replace("bands=,", "bands=")


def _cookie_match(cookie: int, mask: int) -> str:
    """The `cookie=value/mask` match of ovs-ofctl."""
    for value in (cookie, mask):
        if not 0 <= value < 1 << _COOKIE_BITS:
            raise VswitchError(f"cookie or mask {value:#x} does not fit in 64 bits")
    return f"cookie={cookie:#x}/{mask:#x}"


def _checked_flow(flow: str, sets: Sequence[tuple[int, int]]) -> str:
    """`flow` if it is one line whose own cookie matches one of the `(cookie, mask)` sets."""
    if "\n" in flow or "\r" in flow:
        raise VswitchError(f"flow {flow!r} spans several lines")
    found = _COOKIE.search(_ACTIONS.split(flow, maxsplit=1)[0])
    own = None if found is None else int(found[1], 0)
    if own is None or not any(own & mask == cookie & mask for cookie, mask in sets):
        wanted = " or ".join(f"{cookie:#x}/{mask:#x}" for cookie, mask in sets) or "a deleted set"
        raise VswitchError(
            f"flow {flow!r} needs a cookie matching {wanted}, or it could not be replaced later"
        )
    return flow.strip()


def _failure(tool: str, stderr: str, returncode: int) -> str:
    """The one line of a tool's stderr that says why: the switch's refusal, else the tool's."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    refusals = [line for line in lines if line.startswith("Error ")]
    own = [line for line in lines if line.startswith(f"{tool}:")]
    line = next(iter(refusals or own or lines), f"exited with status {returncode}")
    return line if line.startswith(f"{tool}:") else f"{tool}: {line}"
