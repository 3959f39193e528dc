"""The dnsmasq driver without dnsmasq: files, command line, coalescing, DHCPRELEASE."""

from __future__ import annotations

import ipaddress
import itertools
import os
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from vmfabric.coalescing import Coalescer
from vmfabric.dhcp.dnsmasq import (
    DnsmasqServer,
    NetworkFiles,
    dhcp_release_packet,
    dnsmasq_command,
    hook_script,
    host_file_name,
    host_line,
    is_our_dnsmasq,
    line_ipv4,
    parse_host_line,
    range_args,
    read_pid,
    server_address,
)
from vmfabric.domain.model import (
    DhcpPlacement,
    Ipv6Mode,
    NetworkInfo,
    NetworkKind,
    Reservation,
    SubnetInfo,
)

MAC = "52:54:00:12:34:56"
V4 = SubnetInfo("10.77.0.0/16", "10.77.0.254", "10.77.0.1")
V6 = SubnetInfo("fd00:77::/64", None, "fd00:77::1", Ipv6Mode.DHCPV6)
SLAAC = SubnetInfo("fd00:78::/64", None, None, Ipv6Mode.SLAAC)
NET = NetworkInfo("net1", NetworkKind.INTERNAL, 10, (V4, V6, SLAAC))


def reservation(mac: str = MAC, ipv4: str | None = "10.77.0.5", name: str = "vm1") -> Reservation:
    return Reservation("net1", mac, name, ipv4=ipv4)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[DnsmasqServer]:
    driver = DnsmasqServer(
        tmp_path / "dhcp", tmp_path / "lease.sock", hup_window=3600, supervise_interval=None
    )
    driver.files("net1").prepare()
    yield driver
    driver.close()


def records(driver: DnsmasqServer) -> dict[str, str]:
    return {p.name: p.read_text() for p in driver.files("net1").records_dir.iterdir()}


# --- file names and contents ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("res", "line"),
    [
        (Reservation("n", MAC, "vm1", ipv4="10.77.0.5"), f"{MAC},10.77.0.5,vm1\n"),
        (
            Reservation("n", MAC.upper(), "vm1", "10.77.0.5", "fd00:77:0::5"),
            f"{MAC},10.77.0.5,[fd00:77::5],vm1\n",
        ),
        (Reservation("n", MAC, "vm1", ipv6="fd00::5"), f"{MAC},[fd00::5],vm1\n"),
        (Reservation("n", MAC.replace(":", "-"), "vm1"), f"{MAC},vm1\n"),
    ],
)
def test_host_line(res: Reservation, line: str) -> None:
    assert host_line(res) == line


@pytest.mark.parametrize(
    "res",
    [
        Reservation("n", "52:54:00:12:34", "vm1", ipv4="10.77.0.5"),
        Reservation("n", MAC, "vm1,10.0.0.9", ipv4="10.77.0.5"),
        Reservation("n", MAC, "vm1\n52:54:00:00:00:01", ipv4="10.77.0.5"),
        Reservation("n", MAC, "vm1", ipv4="10.77.0.256"),
        Reservation("n", MAC, "vm1", ipv4="fd00::5"),
        Reservation("n", MAC, "vm1", ipv6="10.77.0.5"),
    ],
)
def test_host_line_refuses_what_could_corrupt_the_file(res: Reservation) -> None:
    with pytest.raises(ValueError):
        host_line(res)


def test_host_file_name_is_the_mac() -> None:
    assert host_file_name(MAC.upper()) == "52-54-00-12-34-56"


def test_ranges_are_static_and_tagged_per_subnet() -> None:
    second = SubnetInfo("10.78.0.0/24", "10.78.0.1", "10.78.0.2")
    net = NetworkInfo("n", NetworkKind.EXTERNAL, 0, (V4, V6, SLAAC, second))
    assert range_args(net) == [
        "--dhcp-range=set:vmf0,10.77.0.0,static,255.255.0.0",
        "--dhcp-option=tag:vmf0,option:router,10.77.0.254",
        "--dhcp-range=set:vmf1,fd00:77::,static,64",
        "--dhcp-range=set:vmf3,10.78.0.0,static,255.255.255.0",
        "--dhcp-option=tag:vmf3,option:router,10.78.0.1",
    ]


def test_command_line(tmp_path: Path) -> None:
    files = NetworkFiles(tmp_path / "net1")
    placement = DhcpPlacement("vmf-br1", "vmf-hv1", ("--log-dhcp",))
    command = dnsmasq_command("/usr/sbin/dnsmasq", NET, placement, files, "root")
    assert command[0] == "/usr/sbin/dnsmasq"
    for arg in (
        "--conf-file=/dev/null",
        "--port=0",
        "--bind-interfaces",
        "--interface=vmf-br1",
        "--dhcp-lease-max=1000000",
        f"--dhcp-hostsfile={files.hosts_file}",
        f"--dhcp-hostsdir={files.hosts_dir}",
        f"--dhcp-leasefile={files.lease_file}",
        f"--dhcp-script={files.hook}",
        "--script-on-renewal",
        f"--log-facility={files.log_file}",
        f"--pid-file={files.pid_file}",
    ):
        assert arg in command
    assert command[-1] == "--log-dhcp"
    assert all("vmfabric" in p.name for p in (files.pid_file, files.lease_file, files.hook))


def test_hook_script_quotes_paths(tmp_path: Path) -> None:
    script = hook_script("/opt/my venv/bin/python", tmp_path / "a b.sock", "net1", tmp_path / "d e")
    assert script.startswith("#!/bin/sh\n")
    assert "'/opt/my venv/bin/python' -I -S" in script
    assert f"--socket '{tmp_path / 'a b.sock'}' --network net1 -- \"$@\" || exit 0" in script
    assert f"delivered='{tmp_path / 'd e'}'\n" in script


def test_install_writes_outside_and_renames_in(tmp_path: Path) -> None:
    files = NetworkFiles(tmp_path / "net1")
    files.prepare()
    target = files.host_file(MAC)
    files.install(target, "x\n")
    files.install(target, "y\n")
    assert target.read_text() == "y\n"
    assert oct(target.stat().st_mode & 0o777) == "0o644"
    assert list(files.staging_dir.iterdir()) == []


def test_prepare_clears_staging_leftovers(tmp_path: Path) -> None:
    files = NetworkFiles(tmp_path / "net1")
    files.prepare()
    (files.staging_dir / "half-written").write_text("52:54")
    files.prepare()
    assert list(files.staging_dir.iterdir()) == []


# --- process identity ----------------------------------------------------------------------


def test_pidfile_of_another_process_is_not_ours(tmp_path: Path) -> None:
    files = NetworkFiles(tmp_path)
    files.pid_file.write_text(f"{os.getpid()}\n")
    pid = read_pid(files.pid_file)
    assert pid == os.getpid()
    assert not is_our_dnsmasq(pid, files)
    assert not is_our_dnsmasq(2**22 + 1, files)


def test_unreadable_pidfile(tmp_path: Path) -> None:
    (tmp_path / "pid").write_text("garbage")
    assert read_pid(tmp_path / "pid") is None
    assert read_pid(tmp_path / "missing") is None


# --- DHCPRELEASE ---------------------------------------------------------------------------


def test_release_packet_is_a_dhcprelease_for_the_lease() -> None:
    packet = dhcp_release_packet(MAC, "10.77.0.5", "10.77.0.1")
    op, htype, hlen = packet[0], packet[1], packet[2]
    assert (op, htype, hlen) == (1, 1, 6)
    assert ipaddress.IPv4Address(packet[12:16]) == ipaddress.IPv4Address("10.77.0.5")
    assert packet[28:34] == bytes.fromhex("525400123456")
    assert packet[236:240] == bytes((99, 130, 83, 99))
    assert packet[240:] == bytes((53, 1, 7, 54, 4, 10, 77, 0, 1, 255))
    assert struct.calcsize("!4BI2H4s4s4s4s16s64s128s") == 236


@pytest.mark.parametrize(
    ("line", "ipv4"),
    [
        (f"{MAC},10.77.0.5,[fd00::5],vm1\n", "10.77.0.5"),
        (f"{MAC},[fd00::5],vm1\n", None),
        (f"{MAC},vm1\n", None),
        (None, None),
    ],
)
def test_line_ipv4(line: str | None, ipv4: str | None) -> None:
    assert line_ipv4(line) == ipv4


def test_release_goes_to_the_server_address_of_the_lease_subnet() -> None:
    assert server_address(NET, "10.77.3.4") == "10.77.0.1"
    assert server_address(NET, "10.99.0.1") is None


# --- coalescing ----------------------------------------------------------------------------


def test_burst_becomes_at_most_one_sighup_per_window() -> None:
    sent: list[float] = []
    coalescer = Coalescer(lambda network: sent.append(time.monotonic()), lambda n: 0.05, "t")
    started = time.monotonic()
    while time.monotonic() - started < 0.5:
        coalescer.request("net1")
        time.sleep(0.0005)
    coalescer.close()
    assert 5 <= len(sent) <= 12
    gaps = [b - a for a, b in itertools.pairwise(sent)]
    assert min(gaps[:-1]) >= 0.045


def test_first_request_runs_at_once_and_the_next_waits_for_the_window() -> None:
    ran = threading.Event()
    coalescer = Coalescer(lambda network: ran.set(), lambda n: 3600, "t")
    coalescer.request("a")
    assert ran.wait(5)
    wait_until = time.monotonic() + 5
    while coalescer.runs == 0 and time.monotonic() < wait_until:
        time.sleep(0.01)
    coalescer.request("a")
    assert coalescer.pending() == {"a"}
    coalescer.close()
    assert coalescer.runs == 2


def test_flush_sends_now_and_close_sends_what_is_left() -> None:
    sent: list[str] = []
    coalescer = Coalescer(sent.append, lambda n: 3600, "t")
    coalescer.request("a")
    coalescer.request("a")
    coalescer.request("b")
    coalescer.flush()
    assert sorted(sent) == ["a", "b"]
    coalescer.request("c")
    coalescer.request("d")
    coalescer.cancel("d")
    coalescer.close()
    assert sorted(sent) == ["a", "b", "c"]


def test_coalescer_survives_a_failing_send() -> None:
    calls = threading.Event()

    def send(network: str) -> None:
        calls.set()
        raise ProcessLookupError(network)

    coalescer = Coalescer(send, lambda n: 0.01, "t")
    coalescer.request("a")
    assert calls.wait(5)
    coalescer.close()


# --- reservations on disk ------------------------------------------------------------------


def test_windows_grow_with_leases_and_reservations(tmp_path: Path) -> None:
    driver = DnsmasqServer(tmp_path, tmp_path / "s", hup_window=0.05, supervise_interval=None)
    try:
        assert driver.reload_window("net1") == 0.05
        assert driver.batch_window("net1") == 0
        for i in range(1000):
            driver.put(reservation(mac=f"52:54:00:00:{i // 256:02x}:{i % 256:02x}"))
        assert driver.reload_window("net1") == pytest.approx(0.06)
        assert driver.batch_window("net1") == 0
        lease = "0 52:54:00:00:00:01 10.0.0.1 * *\n"
        driver.files("net1").lease_file.write_text(lease * 200)
        assert driver.reload_window("net1") == pytest.approx(0.96)
        assert driver.batch_window("net1") == pytest.approx(0.035)
        driver.files("net1").lease_file.write_text(lease * 5000)
        assert driver.reload_window("net1") == 10.0
        assert driver.batch_window("net1") == 0.1
        assert driver.reload_window("unknown") == 0.05
    finally:
        driver.close()


def test_reservations_are_recorded_at_once(server: DnsmasqServer) -> None:
    server.put(reservation())
    assert records(server) == {"52-54-00-12-34-56": f"{MAC},10.77.0.5,vm1\n"}
    assert server.reservations("net1") == [reservation()]


def test_unchanged_reservation_is_not_rewritten(server: DnsmasqServer) -> None:
    server.put(reservation())
    path = server.files("net1").host_file(MAC)
    inode = path.stat().st_ino
    server.put(reservation())
    assert path.stat().st_ino == inode


def test_changed_reservation_replaces_its_record(server: DnsmasqServer) -> None:
    server.put(reservation())
    server.put(reservation(ipv4="10.77.0.6"))
    assert records(server) == {"52-54-00-12-34-56": f"{MAC},10.77.0.6,vm1\n"}


def test_delete_removes_the_record(server: DnsmasqServer) -> None:
    server.put(reservation())
    server.delete("net1", MAC.upper())
    assert records(server) == {}
    server.delete("net1", MAC)
    assert records(server) == {}


def test_records_alone_need_no_reload_before_a_server_runs(server: DnsmasqServer) -> None:
    server.put(reservation())
    server.put(reservation(ipv4="10.77.0.6"))
    server.delete("net1", MAC)
    assert server.pending_sighups() == set()
    assert server.sighups_sent() == 0
    assert list(server.files("net1").hosts_dir.iterdir()) == []


def test_a_new_driver_reads_the_records_of_the_one_before(tmp_path: Path) -> None:
    first = DnsmasqServer(tmp_path, tmp_path / "s", supervise_interval=None)
    first.put(reservation())
    first.close()
    second = DnsmasqServer(tmp_path, tmp_path / "s", supervise_interval=None)
    try:
        second.sync("net1", [])
        assert second.reservations("net1") == []
    finally:
        second.close()


def test_sync_makes_the_directory_exactly_the_set(server: DnsmasqServer) -> None:
    other = "52:54:00:00:00:09"
    server.put(reservation())
    server.put(reservation(mac=other, ipv4="10.77.0.9", name="vm9"))
    (server.files("net1").records_dir / "stray").write_text("junk")
    server.sync("net1", [reservation(ipv4="10.77.0.7"), reservation(mac="52:54:00:00:00:0a")])
    assert records(server) == {
        "52-54-00-12-34-56": f"{MAC},10.77.0.7,vm1\n",
        "52-54-00-00-00-0a": "52:54:00:00:00:0a,10.77.0.5,vm1\n",
    }


def test_reservations_are_kept_before_a_server_runs(server: DnsmasqServer) -> None:
    res = Reservation("net2", MAC, "vm1", "10.77.0.5", "fd00::5")
    server.put(res)
    assert server.reservations("net2") == [res]
    assert server.reservations("net3") == []


@pytest.mark.parametrize(
    "res",
    [
        Reservation("n", MAC, "vm1", "10.77.0.5"),
        Reservation("n", MAC, "vm1", "10.77.0.5", "fd00::5"),
        Reservation("n", MAC, "vm1", ipv6="fd00::5"),
        Reservation("n", MAC, "vm1"),
    ],
)
def test_parse_host_line_reads_back_host_line(res: Reservation) -> None:
    assert parse_host_line("n", host_line(res)) == res


@pytest.mark.parametrize("name", ["../etc", "a/b", "", "-x", "UPPER"])
def test_network_names_cannot_escape_the_base_directory(server: DnsmasqServer, name: str) -> None:
    with pytest.raises(ValueError):
        server.files(name)
