"""The lab hypervisor driver: define/start/stop/undefine with real namespaces, qemu-ga, udhcpc."""

from __future__ import annotations

import os
import re
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from vmfabric.domain.model import HypervisorVm, NicSpec, VmSpec
from vmfabric.hypervisor import HypervisorError
from vmfabric.hypervisor.lab import LabHypervisor
from vmfabric.lab import lifecycle, proc
from vmfabric.lab.netns import link_exists, netns_exists
from vmfabric.lab.state import LabStore, ProcessRecord
from vmfabric.lab.testing import (
    agent_call,
    boot,
    lab_network,
    temporary_lab,
    vm_ipv4,
    wait_for_ipv4,
)

pytestmark = [
    pytest.mark.lab,
    pytest.mark.skipif(os.geteuid() != 0, reason="the lab needs root"),
]

MAC = re.compile(r"^52:54:00(:[0-9a-f]{2}){3}$")


@pytest.fixture
def lab() -> Iterator[Path]:
    with temporary_lab(hosts=2) as root:
        yield root


def spec(name: str, *nics: NicSpec) -> VmSpec:
    return VmSpec(name, "debian12", nics)


def test_define_picks_macs_keeps_fixed_ones_and_is_idempotent(lab: Path) -> None:
    hv1 = LabHypervisor("hv1")
    wanted = spec(
        "web", NicSpec("n1", "vmf-hv1", 10), NicSpec("n2", "vmf-hv1", 11, "52:54:00:AB:CD:EF")
    )
    defined = hv1.define(wanted)
    assert MAC.match(defined.macs[0])
    assert defined.macs[1] == "52:54:00:ab:cd:ef"
    assert hv1.define(wanted) == defined
    netns = LabStore().read().vms["hv1/web"].netns
    assert (
        lifecycle.run_in_vm("web", ["cat", "/sys/class/net/eth0/address"]).stdout.strip()
        == (defined.macs[0])
    )
    assert link_exists("eth1", netns)
    assert hv1.list_vms() == [HypervisorVm("web", running=False, macs=defined.macs)]
    assert LabHypervisor("hv2").list_vms() == []


def test_redefining_with_another_nic_keeps_the_first_mac(lab: Path) -> None:
    hv1 = LabHypervisor("hv1")
    first = hv1.define(spec("db", NicSpec("n1", "vmf-hv1", 10)))
    second = hv1.define(spec("db", NicSpec("n1", "vmf-hv1", 10), NicSpec("n2", "vmf-hv1", 12)))
    assert second.macs[0] == first.macs[0]
    assert len(second.macs) == 2


def test_a_failed_define_leaves_nothing_behind(lab: Path) -> None:
    before = LabStore().read()
    with pytest.raises(HypervisorError, match="not a lab bridge"):
        LabHypervisor("hv1").define(spec("bad", NicSpec("n1", "br-nope", 10)))
    with pytest.raises(HypervisorError, match="multicast"):
        LabHypervisor("hv1").define(spec("bad", NicSpec("n1", "vmf-hv1", 10, "01:00:5e:00:00:01")))
    with pytest.raises(HypervisorError, match="invalid VM name"):
        LabHypervisor("hv1").define(spec("Bad_Name", NicSpec("n1", "vmf-hv1", 10)))
    assert LabStore().read() == before


def test_a_define_failing_half_way_is_undone(lab: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    before = LabStore().read()
    real_spawn = proc.spawn

    def agent_dies_at_once(process: ProcessRecord) -> ProcessRecord:
        if process.argv[0] == "qemu-ga":
            process = process.model_copy(update={"argv": ["sh", "-c", "echo no agent; exit 1"]})
        return real_spawn(process)

    monkeypatch.setattr(proc, "spawn", agent_dies_at_once)
    with pytest.raises(
        HypervisorError, match=r"(?s)cannot define VM half on hv1: qemu-ga.*no agent"
    ):
        LabHypervisor("hv1").define(spec("half", NicSpec("n1", "vmf-hv1", 10)))
    assert LabStore().read() == before
    assert not netns_exists("vmf-vm.hv1.half")


def test_start_leases_stop_releases_and_undefine_removes(lab: Path) -> None:
    network, placement = lab_network("lan", "10.70.0.0/24", vlan=70)
    boot(network, placement, {"app": ("hv1", "10.70.0.5")})
    hv1 = LabHypervisor("hv1")
    assert wait_for_ipv4("app") == "10.70.0.5"
    assert hv1.list_vms()[0].running
    hv1.start("app")
    leases = lab.parent / lab.name / f"dnsmasq-{placement.netns}" / "leases"
    assert "10.70.0.5" in leases.read_text()
    hv1.stop("app")
    hv1.stop("app")
    assert not hv1.list_vms()[0].running
    assert vm_ipv4("app") is None
    assert "10.70.0.5" not in leases.read_text()
    hv1.start("app")
    assert wait_for_ipv4("app") == "10.70.0.5"
    netns = LabStore().read().vms["hv1/app"].netns
    hv1.undefine("app")
    hv1.undefine("app")
    hv1.undefine("never-there")
    assert hv1.list_vms() == []
    assert not netns_exists(netns)
    assert not any(name.startswith("vmf-udhcpc.hv1.app") for name in LabStore().read().processes)


def test_a_dead_dhcp_client_shows_the_vm_stopped(lab: Path) -> None:
    hv2 = LabHypervisor("hv2")
    hv2.define(spec("lone", NicSpec("n1", "vmf-hv2", 10)))
    hv2.start("lone")
    assert hv2.list_vms()[0].running
    client = LabStore().read().processes["vmf-udhcpc.hv2.lone.eth0"]
    assert client.pid is not None
    os.kill(client.pid, signal.SIGKILL)
    assert proc.wait_until(lambda: not hv2.list_vms()[0].running, timeout=5)
    hv2.start("lone")
    assert hv2.list_vms()[0].running


def test_unknown_vms_cannot_be_started_or_stopped(lab: Path) -> None:
    with pytest.raises(HypervisorError, match="no VM named 'ghost'"):
        LabHypervisor("hv1").start("ghost")
    with pytest.raises(HypervisorError, match="no VM named 'ghost'"):
        LabHypervisor("hv1").stop("ghost")
    assert LabHypervisor("hv1").agent_socket("ghost") is None


def test_the_guest_agent_answers_and_runs_commands_in_the_vm(lab: Path) -> None:
    hv1 = LabHypervisor("hv1")
    hv1.define(spec("agent", NicSpec("n1", "vmf-hv1", 10)))
    sock = hv1.agent_socket("agent")
    assert sock is not None and sock.endswith("/vms/hv1/agent/qga.sock")
    assert agent_call(sock, "guest-sync", {"id": 4711}) == 4711
    assert agent_call(sock, "guest-ping") == {}
    interfaces = {i["name"] for i in agent_call(sock, "guest-network-get-interfaces")}
    assert interfaces == {"lo", "eth0"}
    assert LabHypervisor("hv2").agent_socket("agent") is None


def test_a_vm_may_exist_on_two_hosts_at_once(lab: Path) -> None:
    nic = NicSpec("n1", "vmf-hv1", 10)
    first = LabHypervisor("hv1").define(spec("mover", nic))
    LabHypervisor("hv2").define(spec("mover", NicSpec("n1", "vmf-hv2", 10, first.macs[0])))
    LabHypervisor("hv1").undefine("mover")
    assert [vm.name for vm in LabHypervisor("hv2").list_vms()] == ["mover"]


def test_the_driver_needs_the_lab_up() -> None:
    with pytest.raises(HypervisorError, match="lab up"):
        LabHypervisor("hv1").define(spec("x"))
