"""Connectivity checks through the guest agent (CN patent of SPEC.md section 2): the rules.

For each running VM the checker learns its OS once (the agent's `guest-get-osinfo` when it
has it, else the patent's probe: run `cmd.exe -h`; a program that ran means Windows, one the
guest cannot run means Linux), then runs one ping per NIC to the NIC's gateway and, on
external networks, one to the external target, with the OS's ping syntax and a short
deadline, and reads the exit codes. Internal networks have no way out, so their external
state is "unknown", as is every state the agent could not tell.

"Agent unreachable" (nothing answered) is kept apart from "network broken" (the agent ran the
ping and it failed): the first says nothing about the network.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any

from vmfabric.domain.errors import InvalidInput
from vmfabric.domain.model import NetworkKind

WINDOWS_PROBE = ("cmd.exe", ("-h",))
"""The patent's OS probe: runs on Windows, cannot be started on Linux."""

MIN_DEADLINE_S = 1
MAX_DEADLINE_S = 30


class GuestOs(StrEnum):
    """The OS family, which decides the syntax of the commands run in the guest."""

    LINUX = "linux"
    WINDOWS = "windows"
    UNKNOWN = "unknown"


class Reach(StrEnum):
    """Whether a NIC reached a target."""

    OK = "ok"
    BROKEN = "broken"
    UNKNOWN = "unknown"


class AgentState(StrEnum):
    """Whether the guest agent answered."""

    OK = "ok"
    UNREACHABLE = "unreachable"


@dataclass(frozen=True)
class NicFacts:
    """What the store knows of a NIC: enough to check it and to report it."""

    mac: str
    ipv4: str | None
    gateway: str | None
    kind: NetworkKind


@dataclass(frozen=True)
class Ping:
    """One ping to run in the guest for a NIC: to its gateway or to the external target."""

    mac: str
    purpose: str  # "gateway" or "external"
    target: str


@dataclass(frozen=True)
class NicResult:
    """The spec's JSON of one NIC's check."""

    mac: str
    ipv4: str | None
    gateway: Reach
    external: Reach


@dataclass(frozen=True)
class CheckResult:
    """The spec's JSON of one VM's check; `detail` says why a state is unknown."""

    vm: str
    os: GuestOs
    agent: AgentState
    nics: list[NicResult]
    checked_at: datetime
    detail: str | None = None


def os_from_info(info: Mapping[str, Any]) -> GuestOs:
    """The OS family from `guest-get-osinfo` (`id` is "mswindows" on Windows agents)."""
    ident = str(info.get("id", "")).lower()
    if not ident:
        return GuestOs.UNKNOWN
    return GuestOs.WINDOWS if ident == "mswindows" else GuestOs.LINUX


def os_from_probe(ran: bool) -> GuestOs:
    """The patent's rule: `cmd.exe -h` ran (whatever its exit code) on Windows only."""
    return GuestOs.WINDOWS if ran else GuestOs.LINUX


def check_external_target(text: str) -> str:
    """The operator's external target: an IP address (a name would test DNS, not the path)."""
    try:
        return str(ipaddress.ip_address(text.strip()))
    except ValueError:
        raise InvalidInput(
            f"invalid external target {text!r}: expected an IP address like 203.0.113.1"
        ) from None


def pings(nics: Sequence[NicFacts], external_target: str) -> list[Ping]:
    """What to ping for these NICs: each gateway, and the target from external networks."""
    planned = []
    for nic in nics:
        if nic.gateway is not None:
            planned.append(Ping(nic.mac, "gateway", nic.gateway))
        if nic.kind == NetworkKind.EXTERNAL:
            planned.append(Ping(nic.mac, "external", external_target))
    return planned


def ping_command(guest_os: GuestOs, target: str, deadline_s: int) -> tuple[str, list[str]]:
    """Program and arguments of one ping with a deadline, in the OS's syntax."""
    if not MIN_DEADLINE_S <= deadline_s <= MAX_DEADLINE_S:
        raise InvalidInput(
            f"invalid ping deadline {deadline_s} s: between {MIN_DEADLINE_S} and {MAX_DEADLINE_S} s"
        )
    if guest_os == GuestOs.WINDOWS:
        return "ping.exe", ["-n", "1", "-w", str(deadline_s * 1000), target]
    return "ping", ["-c", "1", "-W", str(deadline_s), "-n", target]


def nic_results(
    nics: Sequence[NicFacts], outcomes: Mapping[tuple[str, str], Reach]
) -> list[NicResult]:
    """Each NIC's states from the outcome of its pings, keyed by (MAC, purpose); what was
    not pinged (no gateway, an internal network, a ping that could not run) is unknown."""
    return [
        NicResult(
            nic.mac,
            nic.ipv4,
            outcomes.get((nic.mac, "gateway"), Reach.UNKNOWN),
            outcomes.get((nic.mac, "external"), Reach.UNKNOWN),
        )
        for nic in nics
    ]


def reach_of(exitcode: int | None) -> Reach:
    """A ping that exited 0 got an answer; any other end means no answer in time."""
    return Reach.OK if exitcode == 0 else Reach.BROKEN


def unreachable(
    vm: str, nics: Sequence[NicFacts], at: datetime, why: str, guest_os: GuestOs
) -> CheckResult:
    """The result for a VM whose agent did not answer: nothing is known of its network."""
    return CheckResult(vm, guest_os, AgentState.UNREACHABLE, nic_results(nics, {}), at, why)
