"""The QGA client against the real qemu-ga of lab VMs (namespaces; the agent shares the kernel)."""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from vmfabric.domain.model import NicSpec, VmSpec
from vmfabric.guest import AgentUnreachable, GuestAddress
from vmfabric.guest.qga import QgaClient
from vmfabric.hypervisor.lab import LabHypervisor
from vmfabric.lab import lifecycle, proc
from vmfabric.lab.state import LabStore, ProcessRecord
from vmfabric.lab.testing import boot, lab_network, temporary_lab, wait_for_ipv4

pytestmark = [
    pytest.mark.lab,
    pytest.mark.skipif(os.geteuid() != 0, reason="the lab needs root"),
    pytest.mark.anyio,
]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def lab() -> Iterator[Path]:
    with temporary_lab(hosts=1) as root:
        yield root


def define(name: str) -> str:
    """A VM on hv1 without DHCP (its agent runs from define on); its agent socket."""
    LabHypervisor("hv1").define(VmSpec(name, "debian12", (NicSpec("n1", "vmf-hv1", 10),)))
    sock = LabHypervisor("hv1").agent_socket(name)
    assert sock is not None
    return sock


def recorded_agent(name: str) -> ProcessRecord:
    """The qemu-ga process the lab started for VM `name` of hv1, as its record names it."""
    return LabStore().read().processes[f"vmf-qga.hv1.{name}"]


async def test_the_agent_reports_commands_os_and_the_vms_addresses(lab: Path) -> None:
    network, placement = lab_network("lan", "10.73.0.0/24", vlan=73)
    boot(network, placement, {"ga": ("hv1", "10.73.0.5")})
    assert wait_for_ipv4("ga") == "10.73.0.5"
    mac = LabHypervisor("hv1").list_vms()[0].macs[0]
    sock = LabHypervisor("hv1").agent_socket("ga")
    assert sock is not None
    async with await QgaClient.connect(sock) as agent:
        commands = await agent.commands()
        assert commands["guest-network-get-interfaces"] is True
        assert commands["guest-shutdown"] is False
        assert (await agent.os_info())["kernel-release"] == os.uname().release
        interfaces = {i.name: i for i in await agent.network_interfaces()}
        assert set(interfaces) == {"lo", "eth0"}
        assert interfaces["lo"].mac is None
        assert GuestAddress("127.0.0.1", 8, 4) in interfaces["lo"].addresses
        assert interfaces["eth0"].mac == mac
        assert GuestAddress("10.73.0.5", 24, 4) in interfaces["eth0"].addresses
        added = lifecycle.run_in_vm("ga", ["ip", "addr", "add", "10.73.0.77/24", "dev", "eth0"])
        assert added.returncode == 0, added.stderr
        eth0 = next(i for i in await agent.network_interfaces() if i.name == "eth0")
        assert {GuestAddress("10.73.0.5", 24, 4), GuestAddress("10.73.0.77", 24, 4)} <= set(
            eth0.addresses
        )


async def test_a_restarted_agent_is_reached_by_a_new_connection(lab: Path) -> None:
    sock = define("rs")
    first = recorded_agent("rs")
    agent = await QgaClient.connect(sock)
    assert await agent.call("guest-ping") == {}
    proc.stop(first)
    with pytest.raises(AgentUnreachable):
        await agent.call("guest-ping", timeout=1)
    await agent.close()
    with pytest.raises(AgentUnreachable, match="cannot reach the guest agent"):
        await QgaClient.connect(sock, timeout=1)
    define("rs")
    assert recorded_agent("rs").pid != first.pid
    async with await QgaClient.connect(sock) as agent:
        assert await agent.call("guest-ping") == {}


async def test_garbage_from_another_client_does_not_break_a_fresh_one(lab: Path) -> None:
    sock = define("gb")
    with socket.socket(socket.AF_UNIX) as other:
        other.connect(sock)
        other.sendall(b'\x00\x01garbage {"execute": "guest-ping"} [[[ {"execute": "guest-pi')
    async with await QgaClient.connect(sock) as agent:
        assert await agent.call("guest-ping") == {}
        assert await agent.call("guest-sync", {"id": 4711}) == 4711


async def test_a_second_client_is_served_only_once_the_first_has_gone(lab: Path) -> None:
    sock = define("sh")
    first = await QgaClient.connect(sock)
    with pytest.raises(AgentUnreachable, match=r"no answer within 0\.5 s"):
        await QgaClient.connect(sock, timeout=0.5)
    waiting = asyncio.create_task(QgaClient.connect(sock, timeout=5))
    await asyncio.sleep(0.3)
    assert not waiting.done()
    assert await first.call("guest-ping") == {}
    await first.close()
    async with await waiting as second:
        assert await second.call("guest-ping") == {}
