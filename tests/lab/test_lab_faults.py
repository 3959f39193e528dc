"""`vmfabric lab fault` / `lab heal` with real traffic and the real qemu-ga (root).

Faults are made and healed through the CLI, each call its own process, so what heal undoes
comes from the lab's record alone.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from vmfabric.domain.model import NetworkKind, NicSpec, VmSpec
from vmfabric.hypervisor.lab import LabHypervisor
from vmfabric.lab import lifecycle, proc
from vmfabric.lab.ovs import switch_access
from vmfabric.lab.state import LabStore
from vmfabric.lab.testing import (
    agent_call,
    boot,
    lab_network,
    pings,
    processes_mentioning,
    temporary_lab,
    wait_for_ipv4,
)

pytestmark = [
    pytest.mark.lab,
    pytest.mark.skipif(os.geteuid() != 0, reason="the lab needs root"),
]

GATEWAY = "10.81.0.1"
OUTSIDE = "203.0.113.1"
FAULT_RULES = "cookie=0xfa17000000000000/0xffff000000000000"


def lab_cli(*args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "vmfabric.cli.lab", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)


def json_of(*args: str) -> dict[str, Any]:
    done = lab_cli(*args, "--json")
    assert done.returncode == 0, done.stderr
    document = json.loads(done.stdout)
    assert isinstance(document, dict)
    return document


def fault_rules(bridge: str = "vmf-hv1") -> list[str]:
    """The lab-fault rules on the switch, as ovs-ofctl prints them."""
    dumped = switch_access().run("ovs-ofctl", "--no-stats", "dump-flows", bridge, FAULT_RULES)
    return [line.strip() for line in dumped.splitlines() if "cookie=" in line]


def agent_socket(vm: str) -> str:
    path = LabHypervisor("hv1").agent_socket(vm)
    assert path is not None
    return path


def build_lab() -> None:
    """An external network with VMs a and b on hv1, both with their leases."""
    network, placement = lab_network("pub", "10.81.0.0/24", vlan=81, kind=NetworkKind.EXTERNAL)
    boot(network, placement, {"a": ("hv1", "10.81.0.10"), "b": ("hv1", "10.81.0.11")})
    assert wait_for_ipv4("a") == "10.81.0.10"
    assert wait_for_ipv4("b") == "10.81.0.11"


@pytest.fixture
def lab() -> Iterator[Path]:
    with temporary_lab(hosts=1) as root:
        build_lab()
        yield root


def test_gateway_down_cuts_one_vm_off_its_router_until_healed(lab: Path) -> None:
    made = json_of("fault", "a", "gateway-down")
    assert (made["vm"], made["kind"], made["changed"], made["faults"]) == (
        "a",
        "gateway-down",
        True,
        ["gateway-down"],
    )
    assert len(fault_rules()) == 2
    assert all("priority=50000" in rule and "actions=drop" in rule for rule in fault_rules())
    assert not pings("a", GATEWAY)
    assert not pings("a", OUTSIDE)
    assert pings("b", GATEWAY)
    assert pings("a", "10.81.0.11")

    again = json_of("fault", "a", "gateway-down")
    assert (again["changed"], again["faults"]) == (False, ["gateway-down"])
    assert len(fault_rules()) == 2
    status = json_of("status")
    faults = {vm["name"]: [f["kind"] for f in vm["faults"]] for vm in status["vms"]}
    assert faults == {"a": ["gateway-down"], "b": []}

    assert json_of("heal", "a")["healed"] == ["gateway-down"]
    assert fault_rules() == []
    assert pings("a", GATEWAY)
    assert pings("a", OUTSIDE)


def test_external_down_keeps_the_gateway(lab: Path) -> None:
    assert json_of("fault", "a", "external-down")["faults"] == ["external-down"]
    assert pings("a", GATEWAY)
    assert not pings("a", OUTSIDE)
    assert pings("b", OUTSIDE)
    assert json_of("heal", "a")["healed"] == ["external-down"]
    assert pings("a", OUTSIDE)
    assert fault_rules() == []


def test_agent_stop_refuses_connections_until_healed(lab: Path) -> None:
    path = agent_socket("a")
    json_of("fault", "a", "agent-stop")
    with (
        socket.socket(socket.AF_UNIX) as sock,
        pytest.raises((ConnectionRefusedError, FileNotFoundError)),
    ):
        sock.connect(path)
    assert agent_call(agent_socket("b"), "guest-ping") == {}
    json_of("heal", "a")
    assert agent_call(path, "guest-ping") == {}


def test_agent_hang_accepts_and_never_answers_until_healed(lab: Path) -> None:
    path = agent_socket("a")
    assert json_of("fault", "a", "agent-hang")["fault"]["processes"] == ["vmf-qga-hang.hv1.a"]
    assert json_of("fault", "a", "agent-hang")["changed"] is False
    listener = LabStore().read().processes["vmf-qga-hang.hv1.a"]
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(1.0)
        sock.connect(path)
        sock.sendall(b'{"execute": "guest-ping"}\n')
        with pytest.raises(TimeoutError):
            sock.recv(1)
    json_of("heal", "a")
    assert not proc.is_alive(listener)
    assert "vmf-qga-hang.hv1.a" not in LabStore().read().processes
    assert agent_call(path, "guest-ping") == {}


def test_nic_down_and_heal_brings_back_the_lease_and_its_route(lab: Path) -> None:
    assert json_of("fault", "a", "nic-down")["fault"]["links"] == ["eth0"]
    assert not pings("a", GATEWAY)
    assert pings("b", GATEWAY)
    json_of("heal", "a")
    assert proc.wait_until(lambda: pings("a", OUTSIDE), timeout=5.0)
    assert wait_for_ipv4("a") == "10.81.0.10"


def test_faults_heal_together_and_healing_twice_is_harmless(lab: Path) -> None:
    for kind in ("gateway-down", "external-down", "agent-hang", "nic-down"):
        json_of("fault", "a", kind)
    healed = json_of("heal", "a")
    assert healed["healed"] == ["gateway-down", "external-down", "agent-hang", "nic-down"]
    assert healed["faults"] == []
    assert json_of("heal", "a")["healed"] == []
    assert fault_rules() == []
    assert agent_call(agent_socket("a"), "guest-ping") == {}
    assert proc.wait_until(lambda: pings("a", OUTSIDE), timeout=5.0)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("fault", "ghost", "nic-down"), "no VM named 'ghost'"),
        (("fault", "--json", "a", "cpu-melt"), "unknown fault kind 'cpu-melt'"),
        (("heal", "ghost"), "no VM named 'ghost'"),
        (("fault", "lonely", "external-down"), "no NIC on an external network"),
        (("fault", "lonely", "gateway-down"), "no NIC on a network with a lab router"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(lab: Path, args: tuple[str, ...], message: str) -> None:
    LabHypervisor("hv1").define(VmSpec("lonely", "img", (NicSpec("none", "vmf-hv1", 99),)))
    done = lab_cli(*args)
    assert (done.returncode, done.stdout, done.stderr.count("\n")) == (2, "", 1), done.stderr
    assert message in done.stderr


def test_the_two_agent_faults_exclude_each_other(lab: Path) -> None:
    json_of("fault", "a", "agent-stop")
    done = lab_cli("fault", "a", "agent-hang")
    assert done.returncode == 2
    assert "has fault agent-stop; run `vmfabric lab heal a`" in done.stderr


def test_lab_down_after_faults_leaves_nothing(state: Path) -> None:
    lifecycle.up(1, controller=False)
    build_lab()
    for kind in ("gateway-down", "agent-hang", "nic-down"):
        json_of("fault", "a", kind)
    json_of("fault", "b", "agent-stop")
    listener = LabStore().read().processes["vmf-qga-hang.hv1.a"]
    assert proc.is_alive(listener)

    lifecycle.down()
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True)
    assert [line for line in netns.stdout.splitlines() if "vmf" in line] == []
    assert not proc.is_alive(listener)
    assert processes_mentioning(str(state)) == []


def test_removing_a_vm_removes_its_fault_rules(lab: Path) -> None:
    json_of("fault", "a", "gateway-down")
    json_of("fault", "b", "external-down")
    LabHypervisor("hv1").undefine("a")
    kept = LabStore().read().vms["hv1/b"].faults["external-down"].flows[0].cookie
    left = fault_rules()
    assert len(left) == 2
    assert all(rule.startswith(f"cookie={kept:#x},") for rule in left)
