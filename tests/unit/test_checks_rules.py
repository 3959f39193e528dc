"""The rules of connectivity checks: which pings, in which syntax, meaning what."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from vmfabric.domain.checks import (
    AgentState,
    GuestOs,
    NicFacts,
    Ping,
    Reach,
    check_external_target,
    nic_results,
    os_from_info,
    os_from_probe,
    ping_command,
    pings,
    reach_of,
    unreachable,
)
from vmfabric.domain.errors import InvalidInput
from vmfabric.domain.model import NetworkKind

EXTERNAL = NicFacts("52:54:00:00:00:01", "10.0.0.5", "10.0.0.1", NetworkKind.EXTERNAL)
INTERNAL = NicFacts("52:54:00:00:00:02", "10.9.0.5", "10.9.0.1", NetworkKind.INTERNAL)
NO_GATEWAY = NicFacts("52:54:00:00:00:03", None, None, NetworkKind.EXTERNAL)


def test_gateways_everywhere_and_the_outside_only_from_external_networks() -> None:
    assert pings([EXTERNAL, INTERNAL, NO_GATEWAY], "203.0.113.1") == [
        Ping(EXTERNAL.mac, "gateway", "10.0.0.1"),
        Ping(EXTERNAL.mac, "external", "203.0.113.1"),
        Ping(INTERNAL.mac, "gateway", "10.9.0.1"),
        Ping(NO_GATEWAY.mac, "external", "203.0.113.1"),
    ]


@pytest.mark.parametrize(
    ("guest_os", "expected"),
    [
        (GuestOs.LINUX, ("ping", ["-c", "1", "-W", "2", "-n", "10.0.0.1"])),
        (GuestOs.UNKNOWN, ("ping", ["-c", "1", "-W", "2", "-n", "10.0.0.1"])),
        (GuestOs.WINDOWS, ("ping.exe", ["-n", "1", "-w", "2000", "10.0.0.1"])),
    ],
)
def test_ping_syntax_follows_the_os(guest_os: GuestOs, expected: tuple[str, list[str]]) -> None:
    assert ping_command(guest_os, "10.0.0.1", 2) == expected


@pytest.mark.parametrize("deadline", [0, 31])
def test_ping_deadlines_are_bounded(deadline: int) -> None:
    with pytest.raises(InvalidInput, match="invalid ping deadline"):
        ping_command(GuestOs.LINUX, "10.0.0.1", deadline)


def test_the_os_comes_from_osinfo_or_from_the_probe() -> None:
    assert os_from_info({"id": "mswindows"}) == GuestOs.WINDOWS
    assert os_from_info({"id": "debian"}) == GuestOs.LINUX
    assert os_from_info({}) == GuestOs.UNKNOWN
    assert os_from_probe(ran=True) == GuestOs.WINDOWS
    assert os_from_probe(ran=False) == GuestOs.LINUX


def test_states_from_outcomes_and_unreachable_agents() -> None:
    assert reach_of(0) == Reach.OK
    assert reach_of(1) == reach_of(None) == Reach.BROKEN
    results = nic_results([EXTERNAL, INTERNAL], {(EXTERNAL.mac, "gateway"): Reach.OK})
    assert [(r.gateway, r.external) for r in results] == [
        (Reach.OK, Reach.UNKNOWN),
        (Reach.UNKNOWN, Reach.UNKNOWN),
    ]
    at = datetime(2026, 11, 23, tzinfo=UTC)
    gone = unreachable("vm1", [EXTERNAL], at, "no answer within 5 s", GuestOs.LINUX)
    assert gone.agent == AgentState.UNREACHABLE and gone.os == GuestOs.LINUX
    assert (gone.nics[0].gateway, gone.nics[0].external) == (Reach.UNKNOWN, Reach.UNKNOWN)


def test_the_external_target_is_an_ip_address() -> None:
    assert check_external_target(" 203.0.113.1 ") == "203.0.113.1"
    with pytest.raises(InvalidInput, match=r"invalid external target 'example\.com'"):
        check_external_target("example.com")
