"""Peer links between host bridges, and lab VMs moving between hosts as libvirt moves them.

Real switch, real DHCP leases, real traffic: the peer links are checked with
`ovs-appctl ofproto/trace` and with packets; a migration with a continuous ping, a server, the
DHCP client and qemu-ga running in the VM throughout.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pytest
from test_lab_lifecycle import assert_nothing_left, lab_pids

from vmfabric.domain.model import NicSpec, VmSpec
from vmfabric.hypervisor import HypervisorError
from vmfabric.hypervisor.lab import LabHypervisor
from vmfabric.lab import faults, lifecycle, migration, proc
from vmfabric.lab.errors import LabError
from vmfabric.lab.names import host_bridge, vm_port
from vmfabric.lab.netns import neighbours
from vmfabric.lab.ovs import PEER_VLAN, OvsPaths, add_flows, switch_access
from vmfabric.lab.state import LabStore, VmRecord
from vmfabric.lab.testing import (
    Snapshot,
    agent_call,
    boot,
    lab_names,
    lab_network,
    pings,
    temporary_lab,
    vm_ipv4,
    wait_for_ipv4,
)

pytestmark = [
    pytest.mark.lab,
    pytest.mark.skipif(os.geteuid() != 0, reason="the lab needs root"),
]

MARK = 0xFEED
"""Cookie of the test's rules that count what arrives through a peer link."""
APP, PEER = "10.70.0.5", "10.70.0.6"
GATEWAY = "10.70.0.1"
SERVED = "migrating VM's page"
PEER_VM = "peer"


# --- helpers -------------------------------------------------------------------------------


def ovs(tool: str, *args: str) -> str:
    return switch_access().run(tool, *args)


def column(table: str, row: str, name: str) -> str:
    """One column (or map key) of an OVSDB row, unquoted."""
    return ovs("ovs-vsctl", "get", table, row, name).strip().strip('"')


def trace(bridge: str, flow: str) -> str:
    return ovs("ovs-appctl", "ofproto/trace", bridge, flow)


def mark_peer_arrivals() -> None:
    """On every bridge, a rule that drops and counts what comes in through a peer link: a
    trace that crosses a peer link shows its cookie."""
    for link in LabStore().read().peer_links.values():
        for host, port in ((link.host, link.port), (link.peer_host, link.peer_port)):
            rule = f"cookie={MARK:#x},priority=65535,in_port={port},actions=drop"
            add_flows(host_bridge(host), [rule])


def marked_packets(bridge: str) -> int:
    dumped = ovs("ovs-ofctl", "dump-flows", bridge, f"cookie={MARK:#x}/-1")
    return sum(int(n) for n in re.findall(r"n_packets=(\d+)", dumped))


def ports_with_mac(bridge: str, mac: str) -> set[str]:
    """The ports of `bridge` whose interface is marked with `mac` (as libvirt marks taps)."""
    found = ovs(
        "ovs-vsctl",
        "--bare",
        "--columns=name",
        "find",
        "interface",
        f'external_ids:attached-mac="{mac}"',
    )
    return set(found.split()) & set(ovs("ovs-vsctl", "list-ports", bridge).split())


def vm_record(name: str) -> VmRecord:
    return next(vm for vm in LabStore().read().vms.values() if vm.name == name)


def in_vm(name: str, *argv: str) -> subprocess.CompletedProcess[str]:
    return lifecycle.run_in_vm(name, list(argv))


def start_in_vm(name: str, *argv: str) -> subprocess.Popen[str]:
    """A process of the test's own in the VM's namespace (`lab down` ends it with it)."""
    command = proc.in_netns(vm_record(name).netns, list(argv))
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def serve_page(name: str, root: Path) -> int:
    """A web server on 0.0.0.0:8080 in the VM, serving `SERVED`; its pid."""
    site = root / "site"
    site.mkdir()
    (site / "index.html").write_text(SERVED)
    argv = [sys.executable, "-m", "http.server", "8080", "--bind", "0.0.0.0", "--directory"]
    server = start_in_vm(name, *argv, str(site))
    assert proc.wait_until(lambda: fetch_page(PEER_VM, APP) == SERVED, timeout=10)
    return server.pid


def fetch_page(client: str, address: str) -> str:
    # busybox 1.35's wget crashes with -T: coreutils' timeout bounds it instead
    done = in_vm(
        client, "timeout", "3", "busybox", "wget", "-q", "-O", "-", f"http://{address}:8080/"
    )
    return done.stdout


def ping_loss(pinger: subprocess.Popen[str]) -> tuple[int, int]:
    """(sent, received) of an iputils ping once it ended."""
    out, _ = pinger.communicate(timeout=30)
    found = re.search(r"(\d+) packets transmitted, (\d+) received", out)
    assert found, out
    return int(found[1]), int(found[2])


def ifindex(name: str, ifname: str = "eth0") -> int:
    return int(
        json.loads(in_vm(name, "ip", "-j", "link", "show", "dev", ifname).stdout)[0]["ifindex"]
    )


def switch_gap(events: str, old: int, new: int) -> float:
    """Seconds between the old NIC going down and the new one coming up, from `ip -ts monitor
    link` lines such as `[2026-01-01T10:00:00.123456] 3: eth0@if9: <...,UP,...> ... state UP`."""
    stamps: dict[str, datetime] = {}
    for line in events.splitlines():
        found = re.match(r"\[([^]]+)\] (\d+): \S+: <([^>]*)>.* state (\w+)", line)
        if found is None:
            continue
        when, index, flags, state = found[1], int(found[2]), found[3].split(","), found[4]
        if index == old and "UP" not in flags:
            stamps.setdefault("down", datetime.fromisoformat(when))
        if index == new and state == "UP":
            stamps.setdefault("up", datetime.fromisoformat(when))
    assert set(stamps) == {"down", "up"}, events
    return (stamps["up"] - stamps["down"]).total_seconds()


def lab_cli(*args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "vmfabric.cli.lab", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)


def two_hosts_one_network() -> None:
    """VM app on hv1 and VM peer on hv2, on one network, both with their DHCP leases."""
    network, placement = lab_network("lan", "10.70.0.0/24", vlan=70)
    boot(network, placement, {"app": ("hv1", APP), PEER_VM: ("hv2", PEER)})
    assert wait_for_ipv4("app") == APP
    assert wait_for_ipv4(PEER_VM) == PEER


@pytest.fixture
def lab() -> Iterator[Path]:
    with temporary_lab(hosts=2) as root:
        yield root


@pytest.fixture
def lab3() -> Iterator[Path]:
    with temporary_lab(hosts=3) as root:
        yield root


# --- peer links ----------------------------------------------------------------------------


def test_every_two_hosts_are_joined_by_a_recorded_peer_link(lab3: Path) -> None:
    links = LabStore().read().peer_links
    assert {(link.port, link.peer_port) for link in links.values()} == {
        ("vmf-hv1-hv2", "vmf-hv2-hv1"),
        ("vmf-hv1-hv3", "vmf-hv3-hv1"),
        ("vmf-hv2-hv3", "vmf-hv3-hv2"),
    }
    for host, other in (("hv1", "hv2"), ("hv2", "hv1"), ("hv3", "hv2")):
        port = f"vmf-{host}-{other}"
        assert port in ovs("ovs-vsctl", "list-ports", f"vmf-{host}").split()
        assert column("interface", port, "options:peer") == f"vmf-{other}-{host}"
        for table in ("port", "interface"):
            assert column(table, port, "external_ids:vmfabric-peer") == other
        assert column("port", port, "tag") == str(PEER_VLAN)
        assert column("port", port, "protected") == "true"
    recorded = LabStore().read()
    lifecycle.up(3, controller=False)
    assert LabStore().read() == recorded
    assert len(lifecycle.status()["peer_links"]) == 3


def test_normal_forwarding_never_sends_on_a_peer_link(lab3: Path) -> None:
    LabHypervisor("hv1").define(VmSpec("a", "img", (NicSpec("n", "vmf-hv1", 70),)))
    LabHypervisor("hv2").define(VmSpec("b", "img", (NicSpec("n", "vmf-hv2", 70),)))
    port = vm_record("a").nics[0].port
    mark_peer_arrivals()
    for destination in ("ff:ff:ff:ff:ff:ff", "52:54:00:99:99:99"):
        frame = f"dl_src=52:54:00:11:11:11,dl_dst={destination}"
        from_vm = trace("vmf-hv1", f"in_port={port},{frame}")
        assert 'bridge("vmf-fabric")' in from_vm  # flooded, to the other hosts too
        assert f"cookie {MARK:#x}" not in from_vm
        from_uplink = trace("vmf-hv1", f"in_port=vmf-hv1-up,dl_vlan=70,{frame}")
        assert "no learned MAC for destination, flooding" in from_uplink
        assert f"cookie {MARK:#x}" not in from_uplink
    assert "disallowed VLAN" in trace(
        "vmf-hv1", f"in_port=vmf-hv1-up,dl_vlan={PEER_VLAN},dl_dst=ff:ff:ff:ff:ff:ff"
    )
    ovs("ovs-ofctl", "del-flows", "vmf-hv1", f"cookie={MARK:#x}/-1")
    for flow in ("dl_dst=ff:ff:ff:ff:ff:ff", "dl_vlan=70,dl_dst=ff:ff:ff:ff:ff:ff"):
        from_peer = trace("vmf-hv1", f"in_port=vmf-hv1-hv2,{flow}")
        assert from_peer.count('bridge("') == 1  # it stays on vmf-hv1: no uplink, no peer


def test_a_rule_to_a_peer_link_delivers_on_the_other_host(lab3: Path) -> None:
    hv1 = LabHypervisor("hv1")
    hv1.define(VmSpec("a", "img", (NicSpec("n", "vmf-hv1", 70),)))
    port = vm_record("a").nics[0].port
    mark_peer_arrivals()
    add_flows("vmf-hv1", [f"priority=100,in_port={port},actions=output:vmf-hv1-hv2"])
    traced = trace("vmf-hv1", f"in_port={port},dl_dst=ff:ff:ff:ff:ff:ff")
    assert 'bridge("vmf-hv2")' in traced
    assert f"cookie {MARK:#x}" in traced
    hv1.start("a")  # its DHCP client broadcasts discovers
    assert proc.wait_until(lambda: marked_packets("vmf-hv2") > 0, timeout=10)
    assert marked_packets("vmf-hv3") == 0


# --- migration -----------------------------------------------------------------------------


def test_a_vm_moves_with_its_address_traffic_and_processes(lab: Path) -> None:
    two_hosts_one_network()
    app = vm_record("app")
    mac, old_port, old_index = app.nics[0].mac, app.nics[0].port, ifindex("app")
    server = serve_page("app", lab)
    monitor = start_in_vm("app", "ip", "-ts", "monitor", "link")
    pinger = start_in_vm(PEER_VM, "ping", "-q", "-i", "0.01", "-w", "3", APP)
    assert pings("app", GATEWAY)  # the gateway is a neighbour the VM does not talk to next
    time.sleep(0.5)

    with LabStore().edit() as record:
        vm = record.state.vms["hv1/app"]
        migration.begin(record, vm, "hv2")
        assert ports_with_mac("vmf-hv2", mac) == {vm_port("hv2", "app", 0)}
        assert ports_with_mac("vmf-hv1", mac) == {old_port}
        incoming = json.loads(in_vm("app", "ip", "-j", "link", "show", "dev", "vmf-in0").stdout)
        assert (incoming[0]["address"], incoming[0]["operstate"]) == (mac, "DOWN")
        assert pings(PEER_VM, APP)  # still through the source port
        known = set(neighbours("eth0", app.netns))
        migration.switch_over(record, vm)

    assert known and known <= set(neighbours("eth0", app.netns)), "the VM keeps its neighbours"
    assert ports_with_mac("vmf-hv1", mac) == set()
    assert ports_with_mac("vmf-hv2", mac) == {vm_port("hv2", "app", 0)}
    assert_announced_from_hv2(mac)
    sent, received = ping_loss(pinger)
    time.sleep(0.2)
    monitor.send_signal(signal.SIGTERM)
    gap = switch_gap(monitor.communicate(timeout=10)[0], old_index, ifindex("app"))
    print(f"switch-over gap {gap * 1000:.2f} ms; peer's pings: {sent - received} of {sent} lost")
    assert received >= sent - 20

    assert in_vm("app", "cat", "/sys/class/net/eth0/address").stdout.strip() == mac
    assert vm_ipv4("app") == APP
    assert "default via 10.70.0.1 dev eth0 metric 100" in in_vm("app", "ip", "route").stdout
    assert pings("app", GATEWAY)
    assert fetch_page(PEER_VM, APP) == SERVED
    assert proc.start_time(server) is not None


def test_the_record_agent_and_dhcp_client_follow_the_vm(lab: Path) -> None:
    two_hosts_one_network()
    app = vm_record("app")
    LabHypervisor("hv1").migrate("app", "hv2", None)

    state = LabStore().read()
    assert "hv1/app" not in state.vms
    moved = state.vms["hv2/app"]
    assert (moved.netns, moved.directory) == (app.netns, app.directory)
    new_port = vm_port("hv2", "app", 0)
    assert [(nic.bridge, nic.port, nic.ifname) for nic in moved.nics] == [
        ("vmf-hv2", new_port, "eth0")
    ]
    assert state.links[new_port].peer == "eth0"
    assert app.nics[0].port not in state.links
    assert [vm["host"] for vm in lifecycle.status()["vms"] if vm["name"] == "app"] == ["hv2"]

    assert [vm.name for vm in LabHypervisor("hv1").list_vms()] == []
    listed = {(vm.name, vm.running) for vm in LabHypervisor("hv2").list_vms()}
    assert listed == {("app", True), (PEER_VM, True)}
    assert LabHypervisor("hv1").agent_socket("app") is None
    socket_path = LabHypervisor("hv2").agent_socket("app")
    assert socket_path is not None
    assert agent_call(socket_path, "guest-sync", {"id": 7}) == 7

    log = Path(moved.directory) / "udhcpc-eth0.log"
    leases = log.read_text().count("obtained")
    assert proc.signal_process(state.processes["vmf-udhcpc.hv2.app.eth0"], signal.SIGUSR1)
    assert proc.wait_until(lambda: log.read_text().count("obtained") > leases, timeout=5)
    assert vm_ipv4("app") == APP

    with pytest.raises(HypervisorError, match="moved from hv1 to hv2"):
        LabHypervisor("hv1").define(VmSpec("app", "img", (NicSpec("lan", "vmf-hv1", 70),)))


def assert_announced_from_hv2(mac: str) -> None:
    """The fabric bridge learned `mac` behind hv2's uplink: the VM announced itself there
    (the peer's pings to it stay on hv2, so nothing else told the fabric)."""
    up_hv2 = column("interface", "vmf-up-hv2", "ofport")
    learned = re.compile(rf"^\s*{up_hv2}\s+70\s+{mac}", re.M)
    assert proc.wait_until(
        lambda: learned.search(ovs("ovs-appctl", "fdb/show", "vmf-fabric")) is not None,
        timeout=2,
    )


def test_the_hypervisor_plugs_the_destination_port_before_the_source_port_goes(lab: Path) -> None:
    two_hosts_one_network()
    mac = vm_record("app").nics[0].mac
    db = f"unix:{OvsPaths().db_socket}"
    monitor = subprocess.Popen(
        [
            "stdbuf",
            "-oL",
            "ovsdb-client",
            "--timestamp",
            "monitor",
            db,
            "Open_vSwitch",
            "Interface",
            "name",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=switch_access().environ(),
    )
    time.sleep(0.5)
    LabHypervisor("hv1").migrate("app", "hv2", None)
    LabHypervisor("hv2").migrate("app", "hv1", "ignored://")
    time.sleep(0.5)
    monitor.terminate()
    events = [
        (action, name.strip('"'))
        for action, name in re.findall(
            r"^\S+\s+(insert|delete)\s+(\S+)", monitor.communicate()[0], re.M
        )
    ]
    there, back = vm_port("hv2", "app", 0), vm_port("hv1", "app", 0)
    assert events == [("insert", there), ("delete", back), ("insert", back), ("delete", there)]
    assert ports_with_mac("vmf-hv1", mac) == {back}
    assert pings(PEER_VM, APP)


def test_an_aborted_move_leaves_the_vm_where_it_was(lab: Path) -> None:
    two_hosts_one_network()
    before = vm_record("app")
    done = lab_cli("migrate", "app", "--to", "hv2", "--abort", "--json")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert (result["outcome"], result["host"]) == ("aborted", "hv1")
    assert vm_record("app") == before
    assert ports_with_mac("vmf-hv2", before.nics[0].mac) == set()
    assert vm_port("hv2", "app", 0) not in LabStore().read().links
    assert "vmf-in0" not in in_vm("app", "ip", "-o", "link").stdout
    assert pings(PEER_VM, APP)
    assert [vm.name for vm in LabHypervisor("hv1").list_vms()] == ["app"]

    moved = json.loads(lab_cli("migrate", "app", "--to", "hv2", "--json").stdout)
    assert (moved["outcome"], moved["from"], moved["host"]) == ("moved", "hv1", "hv2")
    assert moved["nics"][0]["bridge"] == "vmf-hv2"
    ran = lab_cli("exec", "app", "--", "cat", "/sys/class/net/eth0/address")
    assert ran.stdout.strip() == before.nics[0].mac


def test_faults_follow_the_vm(lab: Path) -> None:
    two_hosts_one_network()
    faults.inject("app", "gateway-down")
    faults.inject("app", "agent-hang")
    assert not pings("app", GATEWAY)
    LabHypervisor("hv1").migrate("app", "hv2", None)
    moved = vm_record("app")
    assert [flow.bridge for flow in moved.faults["gateway-down"].flows] == ["vmf-hv2"]
    fault_rules = "cookie=0xfa17000000000000/0xffff000000000000"
    assert "cookie" not in ovs("ovs-ofctl", "dump-flows", "vmf-hv1", fault_rules)
    assert "cookie" in ovs("ovs-ofctl", "dump-flows", "vmf-hv2", fault_rules)
    assert not pings("app", GATEWAY)
    processes = LabStore().read().processes
    assert proc.is_alive(processes["vmf-qga-hang.hv2.app"])
    assert "vmf-qga-hang.hv1.app" not in processes
    assert faults.heal("app")["healed"] == ["gateway-down", "agent-hang"]
    # The moved VM's new NIC starts with an empty neighbour table; its first ARP for the
    # gateway is now and then left unanswered, and the kernel asks again after a second.
    assert proc.wait_until(lambda: pings("app", GATEWAY), timeout=3.0)
    socket_path = LabHypervisor("hv2").agent_socket("app")
    assert socket_path is not None
    assert agent_call(socket_path, "guest-sync", {"id": 3}) == 3


def test_a_nic_held_down_by_a_fault_stays_down(lab: Path) -> None:
    two_hosts_one_network()
    faults.inject("app", "nic-down")
    LabHypervisor("hv1").migrate("app", "hv2", None)
    assert (
        json.loads(in_vm("app", "ip", "-j", "link", "show", "dev", "eth0").stdout)[0]["operstate"]
        == "DOWN"
    )
    faults.heal("app")
    assert proc.wait_until(lambda: pings("app", GATEWAY), timeout=10)


def test_lab_down_after_moves_leaves_nothing_behind(state: Path) -> None:
    before = Snapshot.take()
    lifecycle.up(2, controller=False)
    two_hosts_one_network()
    LabHypervisor("hv1").migrate("app", "hv2", None)
    start_in_vm("app", "sleep", "600")
    with LabStore().edit() as record:  # a move of the peer cut off after `begin`
        migration.begin(record, record.state.vms["hv2/peer"], "hv1")
    recorded = LabStore().read()
    names, pids = lab_names(recorded), lab_pids(recorded)
    assert vm_port("hv1", PEER_VM, 0) in names
    lifecycle.down()
    assert_nothing_left(before, names, pids, state)


def test_wrong_moves_are_refused_with_one_line(lab: Path) -> None:
    LabHypervisor("hv1").define(VmSpec("idle", "img", (NicSpec("n", "vmf-hv1", 70),)))
    for args, message in (
        (("ghost", "--to", "hv2"), "no VM named 'ghost'"),
        (("idle", "--to", "hv9"), "no host 'hv9'"),
        (("idle", "--to", "hv1"), "already runs on hv1"),
        (("idle", "--to", "hv2"), "not running"),
        (("idle", "--to", "Bad_Host"), "invalid host name"),
    ):
        done = lab_cli("migrate", *args, "--json")
        assert (done.returncode, done.stdout) == (2, ""), done.stderr
        assert message in done.stderr
        assert len(done.stderr.splitlines()) == 1
    with pytest.raises(HypervisorError, match="host hv2 has no VM named 'idle'"):
        LabHypervisor("hv2").migrate("idle", "hv1", None)
    with pytest.raises(
        HypervisorError, match=r"cannot migrate VM idle from hv1 to hv2: .*not running"
    ):
        LabHypervisor("hv1").migrate("idle", "hv2", None)
    assert vm_record("idle").migration is None


def test_the_copy_time_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    assert migration.copy_seconds() == migration.COPY_SECONDS
    monkeypatch.setenv(migration.COPY_SECONDS_ENV, "0.05")
    assert migration.copy_seconds() == 0.05
    for bad in ("-1", "soon", "nan"):
        monkeypatch.setenv(migration.COPY_SECONDS_ENV, bad)
        with pytest.raises(LabError, match=migration.COPY_SECONDS_ENV):
            migration.copy_seconds()
