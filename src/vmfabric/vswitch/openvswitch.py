"""Open vSwitch driver of `Vswitch`: ovs-ofctl for OpenFlow rules, ovs-vsctl for the database.

The command-line tools are the interface Open vSwitch keeps stable across versions; a flow
text in their syntax is what the rule compilers produce. A replacement is one OpenFlow 1.4
bundle (`ovs-ofctl --bundle add-flows`) fed on stdin: a `delete` of the cookie's rules followed
by an `add` per rule, committed by the switch all together or not at all.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from collections.abc import Mapping, Sequence
from typing import Any

from vmfabric.domain.names import normalize_mac
from vmfabric.lab.ovs import switch_access
from vmfabric.vswitch import VswitchError

TIMEOUT = 60.0
"""Seconds any one tool may take; 20,000 rules take well under one."""

ATTACHED_MAC = "attached-mac"
"""The Interface `external_ids` key libvirt (and the lab) sets to the NIC's MAC."""

_COOKIE_BITS = 64
_ACTIONS = re.compile(r"\bactions?=")
_COOKIE = re.compile(r"(?:^|[,\s])cookie=(0x[0-9a-fA-F]+|[1-9][0-9]*|0)(?=[,\s]|$)")


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
        and reuses the names. Two tool runs whatever the number of ports.
        """
        names = self._vsctl("list-ifaces", bridge).split()
        if not names:
            return {}
        listed = self._vsctl(
            "--format=json",
            "--if-exists",
            "--columns=ofport,external_ids",
            "list",
            "Interface",
            *names,
        )
        table: dict[str, Any] = json.loads(listed)
        found = (_attached_port(row) for row in table["data"])
        return dict(port for port in found if port is not None)

    def flows(self, bridge: str, cookie: int, mask: int) -> list[str]:
        """The rules matching `cookie`/`mask` as `ovs-ofctl --no-stats dump-flows` prints them.

        The switch's own printing is canonical (field order, hex cookies), so two reads of an
        unchanged switch compare equal, and statistics would make them differ.
        """
        dumped = self._ofctl("--no-stats", "dump-flows", bridge, _cookie_match(cookie, mask))
        return sorted(line.strip() for line in dumped.splitlines() if line.strip())

    def replace_flows(self, bridge: str, cookie: int, mask: int, flows: Sequence[str]) -> None:
        """One bundle deleting the rules matching `cookie`/`mask` and adding `flows`.

        Each flow must carry a cookie matching `cookie`/`mask`, or a later replacement could
        not remove it again.
        """
        lines = [f"delete {_cookie_match(cookie, mask)}"]
        lines += [f"add {_checked_flow(flow, cookie, mask)}" for flow in flows]
        self._ofctl("--bundle", "add-flows", bridge, "-", stdin="\n".join(lines) + "\n")

    def _vsctl(self, *args: str) -> str:
        database = [f"--db={self._db}"] if self._db else []
        return self._run(["ovs-vsctl", *database, *args])

    def _ofctl(self, *args: str, stdin: str = "") -> str:
        return self._run(["ovs-ofctl", *args], stdin)

    def _run(self, argv: list[str], stdin: str = "") -> str:
        """Run a tool; its failure becomes a VswitchError with the tool's own message."""
        tool = argv[0]
        try:
            done = subprocess.run(
                argv,
                input=stdin,
                capture_output=True,
                text=True,
                env={**os.environ, **self._env},
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


def _attached_port(row: list[Any]) -> tuple[str, int] | None:
    """(MAC, port) of one `ofport, external_ids` row, if it is a numbered, marked NIC."""
    ofport, (_, pairs) = row
    mac = dict(pairs).get(ATTACHED_MAC)
    if mac is None or not isinstance(ofport, int) or ofport <= 0:
        return None
    try:
        return normalize_mac(mac), ofport
    except ValueError:
        return None


def _cookie_match(cookie: int, mask: int) -> str:
    """The `cookie=value/mask` match of ovs-ofctl."""
    for value in (cookie, mask):
        if not 0 <= value < 1 << _COOKIE_BITS:
            raise VswitchError(f"cookie or mask {value:#x} does not fit in 64 bits")
    return f"cookie={cookie:#x}/{mask:#x}"


def _checked_flow(flow: str, cookie: int, mask: int) -> str:
    """`flow` if it is one line whose own cookie matches `cookie`/`mask`."""
    if "\n" in flow or "\r" in flow:
        raise VswitchError(f"flow {flow!r} spans several lines")
    found = _COOKIE.search(_ACTIONS.split(flow, maxsplit=1)[0])
    if found is None or int(found[1], 0) & mask != cookie & mask:
        raise VswitchError(
            f"flow {flow!r} needs a cookie matching {cookie:#x}/{mask:#x}, "
            "or it could not be replaced later"
        )
    return flow.strip()


def _failure(tool: str, stderr: str, returncode: int) -> str:
    """The one line of a tool's stderr that says why: the switch's refusal, else the tool's."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    refusals = [line for line in lines if line.startswith("Error ")]
    own = [line for line in lines if line.startswith(f"{tool}:")]
    line = next(iter(refusals or own or lines), f"exited with status {returncode}")
    return line if line.startswith(f"{tool}:") else f"{tool}: {line}"
