"""The checker against stand-in agents: the Windows branch, hung agents, refused guest-exec,
and the API's run/status/history. The Linux branch runs against the real qemu-ga in the lab
(`tests/lab/test_checks_lab.py`)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from vmfabric.api.app import create_app
from vmfabric.domain.checks import AgentState, GuestOs, NicFacts, Reach
from vmfabric.domain.model import NetworkKind
from vmfabric.guest.double import WindowsAgent, windows_agent
from vmfabric.hypervisor.noop import NoopHypervisor
from vmfabric.services.checks import CheckChange, Checker, CheckSettings, CheckTarget
from vmfabric.services.context import Controller, HostRef

GATEWAY = "10.0.0.1"
OUTSIDE = "203.0.113.1"
EXTERNAL_NIC = NicFacts("52:54:00:00:00:01", "10.0.0.5", GATEWAY, NetworkKind.EXTERNAL)
INTERNAL_NIC = NicFacts("52:54:00:00:00:02", "10.9.0.5", "10.9.0.1", NetworkKind.INTERNAL)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def settings(**changes: object) -> CheckSettings:
    return CheckSettings(**{"vm_deadline_s": 2.0, "connect_timeout_s": 1.0, **changes})  # type: ignore[arg-type]


@pytest.mark.anyio
async def test_windows_guests_are_found_and_pinged_in_windows_syntax(tmp_path: Path) -> None:
    for with_osinfo in (True, False):  # without guest-get-osinfo: the patent's cmd.exe probe
        agent = WindowsAgent(reachable={GATEWAY, "10.9.0.1"}, with_osinfo=with_osinfo)
        path = str(tmp_path / f"win-{with_osinfo}.sock")
        async with windows_agent(path, agent):
            target = CheckTarget("win1", path, [EXTERNAL_NIC, INTERNAL_NIC])
            (result,) = await Checker(settings()).check_all([target])
        assert result.os == GuestOs.WINDOWS and result.agent == AgentState.OK
        assert [(n.gateway, n.external) for n in result.nics] == [
            (Reach.OK, Reach.BROKEN),  # the outside does not answer this agent
            (Reach.OK, Reach.UNKNOWN),  # internal: no way out to check
        ]
        pinged = [args for program, args in agent.programs if program == "ping.exe"]
        assert pinged == [
            ["-n", "1", "-w", "1000", GATEWAY],
            ["-n", "1", "-w", "1000", OUTSIDE],
            ["-n", "1", "-w", "1000", "10.9.0.1"],
        ]
        assert (("cmd.exe", ["-h"]) in agent.programs) is not with_osinfo


@pytest.mark.anyio
async def test_the_os_is_found_once_per_vm(tmp_path: Path) -> None:
    agent = WindowsAgent(reachable={GATEWAY, OUTSIDE}, with_osinfo=False)
    path = str(tmp_path / "win.sock")
    checker = Checker(settings())
    async with windows_agent(path, agent):
        for _ in range(3):
            (result,) = await checker.check_all([CheckTarget("win1", path, [EXTERNAL_NIC])])
            assert (result.nics[0].gateway, result.nics[0].external) == (Reach.OK, Reach.OK)
    assert sum(program == "cmd.exe" for program, _ in agent.programs) == 1


@pytest.mark.anyio
async def test_hung_and_missing_agents_are_unreachable_without_holding_up_the_others(
    tmp_path: Path,
) -> None:
    healthy = WindowsAgent(reachable={GATEWAY, OUTSIDE})
    hung = WindowsAgent(hang=True)
    good, bad = str(tmp_path / "good.sock"), str(tmp_path / "hung.sock")
    targets = [CheckTarget(f"hung{i}", bad, [EXTERNAL_NIC]) for i in range(10)]
    targets += [CheckTarget(f"ok{i}", good, [EXTERNAL_NIC]) for i in range(3)]
    targets += [CheckTarget("gone", str(tmp_path / "nothing.sock"), [EXTERNAL_NIC])]
    targets += [CheckTarget("nochannel", None, [EXTERNAL_NIC])]
    started = time.monotonic()
    async with windows_agent(good, healthy), windows_agent(bad, hung):
        results = await Checker(settings(vm_deadline_s=1.0)).check_all(targets)
    took = time.monotonic() - started
    states = {r.vm: (r.agent, r.nics[0].gateway) for r in results}
    assert all(states[f"hung{i}"] == (AgentState.UNREACHABLE, Reach.UNKNOWN) for i in range(10))
    assert all(states[f"ok{i}"] == (AgentState.OK, Reach.OK) for i in range(3))
    assert states["gone"][0] == states["nochannel"][0] == AgentState.UNREACHABLE
    assert took < 1.0 + 0.5  # the VM deadline, plus a margin: hung agents run side by side


@pytest.mark.anyio
async def test_an_agent_that_refuses_to_run_programs_is_ok_with_unknown_network(
    tmp_path: Path,
) -> None:
    class NoExec(WindowsAgent):
        def _start(self, path: str, args: list[str]) -> bytes:
            error = {"class": "CommandNotFound", "desc": "Command guest-exec has been disabled"}
            return b'{"error": ' + str(error).replace("'", '"').encode() + b"}\n"

    path = str(tmp_path / "noexec.sock")
    async with windows_agent(path, NoExec()):
        (result,) = await Checker(settings()).check_all(
            [CheckTarget("locked", path, [EXTERNAL_NIC])]
        )
    assert result.agent == AgentState.OK
    assert (result.nics[0].gateway, result.nics[0].external) == (Reach.UNKNOWN, Reach.UNKNOWN)
    assert result.detail is not None and "has been disabled" in result.detail


class AgentLoop:
    """Stand-in agents served from a loop of their own, for code that runs its own loop."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def serve(self, path: str, agent: WindowsAgent) -> None:
        async def start() -> None:
            await asyncio.start_unix_server(agent.serve, path)

        asyncio.run_coroutine_threadsafe(start(), self.loop).result(timeout=5)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=5)


class AgentHypervisor(NoopHypervisor):
    """The noop hypervisor, with an agent channel per VM."""

    def __init__(self, sockets: dict[str, str]) -> None:
        super().__init__()
        self.sockets = sockets

    def agent_socket(self, name: str) -> str | None:
        return self.sockets.get(name)


class Agents:
    def __init__(self, hypervisor: AgentHypervisor) -> None:
        self.host = hypervisor

    def hypervisor(self, host: HostRef) -> AgentHypervisor:
        return self.host

    def vswitch(self, host: HostRef) -> None:
        return None


@pytest.fixture
def agents(tmp_path: Path) -> Iterator[tuple[AgentLoop, dict[str, str]]]:
    loop = AgentLoop()
    try:
        yield loop, {}
    finally:
        loop.close()


def test_run_status_and_history_through_the_api(
    controller: Controller, tmp_path: Path, agents: tuple[AgentLoop, dict[str, str]]
) -> None:
    loop, sockets = agents
    controller.agents = Agents(AgentHypervisor(sockets))  # type: ignore[assignment]
    changes: list[CheckChange] = []
    api = TestClient(create_app(controller, checker=Checker(settings(), on_change=changes.append)))
    api.post("/api/v1/hosts", json={"name": "hv1", "driver": "noop", "bridge": "br0"})
    api.post(
        "/api/v1/networks",
        json={"name": "ext", "cidrs": ["10.0.0.0/24"], "kind": "external"},
    )
    body = {"name": "win1", "host": "hv1", "image": "win2022", "nics": [{"network": "ext"}]}
    nic = api.post("/api/v1/vms", json=body).json()["nics"][0]
    sockets["win1"] = str(tmp_path / "win1.sock")
    agent = WindowsAgent(reachable={nic["gateway"]})
    loop.serve(sockets["win1"], agent)

    (ran,) = api.post("/api/v1/checks/run", json={}).json()
    assert ran["vm"] == "win1" and ran["os"] == "windows" and ran["agent"] == "ok"
    assert ran["nics"] == [
        {"mac": nic["mac"], "ipv4": nic["ipv4"], "gateway": "ok", "external": "broken"}
    ]
    assert changes == []  # a first check is no change
    agent.reachable.add(OUTSIDE)
    api.post("/api/v1/checks/run", json={"vm": "win1"})
    api.post("/api/v1/checks/run", json={"vm": "win1"})  # the same again: no change
    (change,) = changes
    assert change.vm == "win1"
    assert (change.previous.nics[0].external, change.current.nics[0].external) == (
        Reach.BROKEN,
        Reach.OK,
    )
    assert api.get("/api/v1/checks/win1").json()["nics"][0]["external"] == "ok"
    history = api.get("/api/v1/checks/win1/history").json()
    assert [h["nics"][0]["external"] for h in history] == ["ok", "ok", "broken"]
    assert api.get("/api/v1/checks").json()[0]["vm"] == "win1"
    metrics = api.get("/metrics").text
    assert 'vmfabric_check_agent{state="ok",vm="win1"} 1.0' in metrics
    assert (
        f'vmfabric_check_reach{{mac="{nic["mac"]}",state="ok",target="external",vm="win1"}} 1.0'
        in metrics
    )
    assert "vmfabric_check_sweep_seconds_count" in metrics
    assert api.post("/api/v1/checks/run", json={"vm": "nope"}).status_code == 404
    assert api.get("/api/v1/checks/nope/history").status_code == 404
