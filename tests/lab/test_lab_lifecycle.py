"""`lab up` / `lab down`: nothing left behind, even after crashes; only our processes end."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from vmfabric.domain.model import NicSpec, VmSpec
from vmfabric.hypervisor.lab import LabHypervisor
from vmfabric.lab import controller, lifecycle, proc
from vmfabric.lab.errors import LabError
from vmfabric.lab.netns import netns_pids
from vmfabric.lab.state import LabState, LabStore, ProcessRecord
from vmfabric.lab.testing import (
    Snapshot,
    boot,
    free_port,
    lab_names,
    lab_network,
    processes_mentioning,
    state_dir_env,
    wait_for_ipv4,
)

pytestmark = [
    pytest.mark.lab,
    pytest.mark.skipif(os.geteuid() != 0, reason="the lab needs root"),
]

BUSY_LAB = """
from vmfabric.domain.model import NetworkKind
from vmfabric.lab import lifecycle
from vmfabric.lab.testing import boot, lab_network
lifecycle.up(2, controller=False)
for n in range(3):
    network, placement = lab_network(f"n{n}", f"10.9{n}.0.0/24", 90 + n, NetworkKind.EXTERNAL)
    vms = {f"v{n}a": ("hv1", f"10.9{n}.0.10"), f"v{n}b": ("hv2", f"10.9{n}.0.11")}
    boot(network, placement, vms)
"""


def lab_pids(state: LabState) -> set[tuple[int, int]]:
    """Every live process the record names or that lives in a recorded namespace."""
    pids = {proc.live_pid(p) for p in state.processes.values()}
    pids |= {pid for ns in state.namespaces for pid in netns_pids(ns)}
    return {(pid, started) for pid in pids if pid and (started := proc.start_time(pid))}


def assert_nothing_left(
    before: Snapshot, names: set[str], pids: set[tuple[int, int]], root: Path
) -> None:
    after = Snapshot.take()
    assert names or pids, "the lab recorded nothing"
    assert not (after.namespaces - before.namespaces) & names
    assert not (after.links - before.links) & names
    assert not after.namespaces & names
    assert not pids & after.processes
    assert processes_mentioning(str(root)) == []
    assert not (root / "lab").exists()


def test_up_and_down_leave_nothing_behind(state: Path) -> None:
    before = Snapshot.take()
    lifecycle.up(2, controller=False)
    network, placement = lab_network("web", "10.80.0.0/24", 80)
    boot(network, placement, {"w1": ("hv1", "10.80.0.11"), "w2": ("hv2", "10.80.0.12")})
    assert wait_for_ipv4("w2") == "10.80.0.12"
    recorded = LabStore().read()
    lifecycle.up(2, controller=False)
    assert LabStore().read() == recorded
    names, pids = lab_names(recorded), lab_pids(recorded)
    assert len(pids) >= 2 + 2 + 2 + 1
    summary = lifecycle.down()
    assert summary["vms"] == ["hv1/w1", "hv2/w2"]
    assert summary["networks"] == ["web"]
    assert lifecycle.down()["vms"] == []
    assert_nothing_left(before, names, pids, state)


@pytest.mark.parametrize(
    "moment",
    [
        lambda s: "vmf-ovs-vswitchd" in s.processes,
        lambda s: "vmf-vm.hv2.v0b" in s.namespaces,
        lambda s: any(name.startswith("vmf-udhcpc.hv1.v2a") for name in s.processes),
    ],
    ids=["switch-starting", "vm-defining", "vms-starting"],
)
def test_down_cleans_up_after_up_was_killed_half_way(
    state: Path, moment: Callable[[LabState], bool]
) -> None:
    before = Snapshot.take()
    builder = subprocess.Popen([sys.executable, "-c", BUSY_LAB])
    store = LabStore()
    seen = proc.wait_until(lambda: store.path.exists() and moment(store.read()), timeout=30)
    builder.send_signal(signal.SIGKILL)
    builder.wait()
    assert seen
    recorded = store.read()
    names, pids = lab_names(recorded), lab_pids(recorded)
    lifecycle.down()
    assert_nothing_left(before, names, pids, state)


def test_down_cleans_up_after_the_switch_and_agents_crashed(state: Path) -> None:
    before = Snapshot.take()
    lifecycle.up(2, controller=False)
    LabHypervisor("hv1").define(VmSpec("c", "debian12", (NicSpec("n", "vmf-hv1", 5),)))
    LabHypervisor("hv1").start("c")
    recorded = LabStore().read()
    names, pids = lab_names(recorded), lab_pids(recorded)
    for pid, _ in pids:
        # processes in the VM's namespace come and go (the DHCP client's script runs)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    lifecycle.down()
    assert_nothing_left(before, names, pids, state)


def test_down_never_ends_a_process_it_did_not_start(state: Path) -> None:
    lifecycle.up(1, controller=False)
    stranger = subprocess.Popen(["sleep", "60"])
    try:
        started = proc.start_time(stranger.pid)
        assert started is not None
        impostor = ProcessRecord(
            name="vmf-old", argv=["sleep"], pid=stranger.pid, start_time=started + 1
        )
        with LabStore().edit() as record:
            record.remember_process(impostor)
        lifecycle.down()
        assert stranger.poll() is None
    finally:
        stranger.kill()
        stranger.wait()


def test_a_lab_never_adopts_another_labs_resources(state: Path) -> None:
    lifecycle.up(1, controller=False)
    with state_dir_env(), pytest.raises(LabError, match="another lab"):
        lifecycle.up(1, controller=False)
    assert lifecycle.status()["up"]


def fake_controller_argv(url: str) -> list[str]:
    return [sys.executable, "-m", "vmfabric.lab.testing", url.removeprefix("http://")]


def test_up_starts_a_controller_registers_hosts_and_down_stops_it(
    state: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("VMFABRIC_URL", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setattr(controller, "controller_argv", fake_controller_argv)
    result = lifecycle.up(2)
    assert result["controller"]["started_by_lab"]
    pid = result["controller"]["pid"]
    assert lifecycle.up(2)["controller"]["pid"] == pid
    log = (state / "lab" / "controller.log").read_text()
    registered = [
        json.loads(line.split(" ", 1)[1])
        for line in log.splitlines()
        if line.startswith("registered")
    ]
    assert registered == [
        {"bridge": "vmf-hv1", "driver": "lab", "name": "hv1"},
        {"bridge": "vmf-hv2", "driver": "lab", "name": "hv2"},
    ]
    assert lifecycle.down()["controller_stopped"]
    assert proc.start_time(pid) is None


def test_a_controller_that_dies_at_start_is_reported_with_its_log(
    state: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("VMFABRIC_URL", f"http://127.0.0.1:{free_port()}")
    crashing = [sys.executable, "-c", "import sys; print('database is locked'); sys.exit(3)"]
    monkeypatch.setattr(controller, "controller_argv", lambda url: crashing)
    with pytest.raises(LabError, match=r"(?s)controller exited at start.*database is locked"):
        lifecycle.up(1)
    assert controller.CONTROLLER not in LabStore().read().processes
