"""The dnsmasq driver against a real dnsmasq and a real busybox udhcpc, in `vmf` namespaces.

Topology: namespace `vmf-<tag>-s` holds dnsmasq on one end of a veth pair, namespace
`vmf-<tag>-c` the client end, whose MAC each test sets to the VM it plays. Checksum offload is
off on both ends (see LAB-NOTES). `VethLab` and `udhcpc_lease` are also used by
bench/bench_dhcp.py.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from vmfabric.dhcp import DhcpError
from vmfabric.dhcp.dnsmasq import (
    DnsmasqServer,
    NetworkFiles,
    interface_socket,
    is_our_dnsmasq,
    read_pid,
    run_in_netns,
)
from vmfabric.dhcp.lease_events import LeaseEventListener
from vmfabric.domain.model import (
    DhcpPlacement,
    Ipv6Mode,
    LeaseAction,
    LeaseEvent,
    NetworkInfo,
    NetworkKind,
    Reservation,
    SubnetInfo,
)

NETWORK = "labnet"
SERVER_IP = "10.77.0.1"
GATEWAY = "10.77.0.254"
SUBNET = SubnetInfo("10.77.0.0/16", GATEWAY, SERVER_IP)
MAC1 = "52:54:00:77:00:01"
MAC2 = "52:54:00:77:00:02"

CLIENT_SCRIPT = """#!/bin/sh
# vmfabric lab: record udhcpc events and configure the address as a real VM would
echo "$1 ${ip:-} ${router:-}" >> "$0.events"
case "$1" in
  bound|renew) ip addr flush dev "$interface"; ip addr add "$ip/$mask" dev "$interface" ;;
  deconfig) ip addr flush dev "$interface" ;;
esac
"""


def run(*command: str) -> str:
    """Run a command that must succeed; the lab is broken otherwise."""
    return subprocess.run(command, check=True, capture_output=True, text=True).stdout


def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


class VethLab:
    """Two `vmf` namespaces joined by a veth pair; removed by name, whatever happened."""

    def __init__(self, tag: str | None = None) -> None:
        tag = tag or secrets.token_hex(3)
        self.server_ns, self.client_ns = f"vmf-{tag}-s", f"vmf-{tag}-c"
        self.server_if, self.client_if = f"vmf{tag}s", f"vmf{tag}c"
        self._clients: list[subprocess.Popen[str]] = []

    def __enter__(self) -> VethLab:
        try:
            self._create()
        except BaseException:
            self.remove()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.remove()

    def _create(self) -> None:
        for ns in (self.server_ns, self.client_ns):
            run("ip", "netns", "add", ns)
            run("ip", "-n", ns, "link", "set", "lo", "up")
        # Created inside the server namespace, so no name ever appears in the host's own.
        run(
            *("ip", "-n", self.server_ns, "link", "add", self.server_if, "type", "veth"),
            *("peer", "name", self.client_if, "netns", self.client_ns),
        )
        run("ip", "-n", self.server_ns, "addr", "add", f"{SERVER_IP}/16", "dev", self.server_if)
        for ns, interface in ((self.server_ns, self.server_if), (self.client_ns, self.client_if)):
            run("ip", "-n", ns, "link", "set", interface, "up")
            run("ip", "netns", "exec", ns, "ethtool", "-K", interface, "tx", "off")

    def remove(self) -> None:
        """Stop our clients, then delete both namespaces (which deletes the veth pair)."""
        for client in self._clients:
            with contextlib.suppress(ProcessLookupError):
                client.kill()
            client.wait()
        for ns in (self.server_ns, self.client_ns):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)

    def placement(self) -> DhcpPlacement:
        return DhcpPlacement(self.server_if, self.server_ns)

    def placement_args(self) -> list[str]:
        return [self.server_if, self.server_ns]

    def set_mac(self, mac: str) -> None:
        run("ip", "-n", self.client_ns, "link", "set", self.client_if, "address", mac)

    def udhcpc_lease(self, mac: str, tries: int = 3) -> str | None:
        """One DHCP exchange as a VM with this MAC: the address it got, or None."""
        self.set_mac(mac)
        done = subprocess.run(
            [
                *("ip", "netns", "exec", self.client_ns, "busybox", "udhcpc", "-q", "-n", "-f"),
                *("-i", self.client_if, "-s", "/bin/true", "-t", str(tries), "-T", "1"),
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        for line in done.stderr.splitlines():
            if "lease of" in line and "obtained" in line:
                return line.split("lease of")[1].split()[0]
        return None

    def udhcpc_daemon(self, mac: str, script: Path) -> subprocess.Popen[str]:
        """A long-running client that releases on exit (-R), like a VM's DHCP client."""
        self.set_mac(mac)
        script.write_text(CLIENT_SCRIPT)
        script.chmod(0o755)
        client = subprocess.Popen(
            [
                *("ip", "netns", "exec", self.client_ns, "busybox", "udhcpc", "-f", "-R"),
                *("-i", self.client_if, "-s", str(script), "-t", "5", "-T", "1"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        self._clients.append(client)
        return client


def seed_leases(lease_file: Path, count: int) -> dict[str, str]:
    """Leases in dnsmasq's own format, as if `count` VMs held one, for dnsmasq to load at start."""
    expires = int(time.time()) + 3600
    leases = {
        f"52:54:00:78:{i // 256:02x}:{i % 256:02x}": f"10.77.{100 + i // 250}.{i % 250 + 1}"
        for i in range(count)
    }
    lease_file.parent.mkdir(parents=True, exist_ok=True)
    lease_file.write_text("".join(f"{expires} {mac} {ip} * *\n" for mac, ip in leases.items()))
    return leases


def client_events(script: Path) -> list[str]:
    events = Path(f"{script}.events")
    return events.read_text().splitlines() if events.exists() else []


def stop_our_dnsmasqs(base: Path) -> None:
    """Kill, by verified pid, every dnsmasq that a driver started under `base`."""
    for directory in base.glob("*/"):
        files = NetworkFiles(directory)
        pid = read_pid(files.pid_file)
        if pid is not None and is_our_dnsmasq(pid, files):
            os.kill(pid, signal.SIGKILL)


def network(*subnets: SubnetInfo) -> NetworkInfo:
    return NetworkInfo(NETWORK, NetworkKind.INTERNAL, 0, subnets or (SUBNET,))


def reservation(mac: str, ipv4: str, name: str = "vm1") -> Reservation:
    return Reservation(NETWORK, mac, name, ipv4=ipv4)


pytestmark = [
    pytest.mark.lab,
    pytest.mark.skipif(
        os.geteuid() != 0 or not shutil.which("busybox") or not Path("/usr/sbin/dnsmasq").exists(),
        reason="needs root, dnsmasq and busybox",
    ),
]


@pytest.fixture
def lab() -> Iterator[VethLab]:
    with VethLab() as created:
        yield created


@pytest.fixture
def state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, lab: VethLab) -> Iterator[Path]:
    """Depends on `lab` so that dnsmasq is killed before its namespace goes."""
    monkeypatch.setenv("VMFABRIC_STATE", str(tmp_path / "state"))
    yield tmp_path / "state"
    stop_our_dnsmasqs(tmp_path / "state" / "dhcp")


@pytest.fixture
def events(state: Path) -> Iterator[list[LeaseEvent]]:
    received: list[LeaseEvent] = []
    with LeaseEventListener(state / "run" / "lease-events.sock", received.append):
        yield received


@pytest.fixture
def driver(state: Path, lab: VethLab) -> Iterator[DnsmasqServer]:
    server = DnsmasqServer(supervise_interval=None)
    server.ensure_network(network(), lab.placement())
    yield server
    server.close()


def test_reservation_is_served_exactly(lab: VethLab, driver: DnsmasqServer, tmp_path: Path) -> None:
    driver.put(reservation(MAC1, "10.77.0.5"))
    script = tmp_path / "client1"
    lab.udhcpc_daemon(MAC1, script)
    wait_for(lambda: any(e.startswith("bound") for e in client_events(script)), 10, "a lease")
    assert f"bound 10.77.0.5 {GATEWAY}" in client_events(script)
    assert lab.udhcpc_lease(MAC2, tries=2) is None


def test_changed_ip_is_served_after_renewal(
    lab: VethLab, driver: DnsmasqServer, tmp_path: Path
) -> None:
    driver.put(reservation(MAC1, "10.77.0.5"))
    script = tmp_path / "client1"
    client = lab.udhcpc_daemon(MAC1, script)
    wait_for(lambda: "bound 10.77.0.5 " + GATEWAY in client_events(script), 10, "first lease")
    pid = driver.pid(NETWORK)
    driver.put(reservation(MAC1, "10.77.0.6"))
    driver.flush()
    client.send_signal(signal.SIGUSR1)
    wait_for(lambda: "bound 10.77.0.6 " + GATEWAY in client_events(script), 15, "new address")
    assert driver.pid(NETWORK) == pid


def test_removal_stops_service_and_frees_the_address(lab: VethLab, driver: DnsmasqServer) -> None:
    driver.put(reservation(MAC1, "10.77.0.5"))
    assert lab.udhcpc_lease(MAC1) == "10.77.0.5"
    driver.delete(NETWORK, MAC1)
    driver.flush()
    time.sleep(0.2)
    assert lab.udhcpc_lease(MAC1, tries=2) is None
    driver.put(reservation(MAC2, "10.77.0.5", "vm2"))
    assert lab.udhcpc_lease(MAC2) == "10.77.0.5"


def test_burst_of_deletes_frees_every_leased_address(lab: VethLab, driver: DnsmasqServer) -> None:
    """dnsmasq rewrites its lease file in place, so releases must not depend on reading it."""
    macs = [f"52:54:00:7a:00:{i:02x}" for i in range(20)]
    for i, mac in enumerate(macs):
        driver.put(reservation(mac, f"10.77.3.{i + 1}", f"vm{i}"))
        assert lab.udhcpc_lease(mac) == f"10.77.3.{i + 1}"
    driver.sync(NETWORK, [])
    wait_for(lambda: driver.leases(NETWORK) == [], 5, "every lease released")
    driver.put(reservation(MAC2, "10.77.3.7", "vm2"))
    assert lab.udhcpc_lease(MAC2) == "10.77.3.7"


def udp_receive_errors(netns: str) -> int:
    snmp = run("ip", "netns", "exec", netns, "cat", "/proc/net/snmp").splitlines()
    names, values = (line.split()[1:] for line in snmp if line.startswith("Udp:"))
    return int(values[names.index("RcvbufErrors")])


def test_releases_dropped_by_a_full_socket_are_sent_again(
    lab: VethLab, driver: DnsmasqServer
) -> None:
    """A stopped dnsmasq with a full socket queue drops the releases; the driver repeats them."""
    macs = [f"52:54:00:7b:00:{i:02x}" for i in range(5)]
    for i, mac in enumerate(macs):
        driver.put(reservation(mac, f"10.77.4.{i + 1}", f"vm{i}"))
        assert lab.udhcpc_lease(mac) == f"10.77.4.{i + 1}"
    pid = driver.pid(NETWORK)
    assert pid is not None
    errors = udp_receive_errors(lab.server_ns)
    os.kill(pid, signal.SIGSTOP)
    try:

        def flood() -> None:
            with interface_socket(lab.server_if) as sock:
                sock.setblocking(False)
                for _ in range(5000):
                    with contextlib.suppress(BlockingIOError):
                        sock.sendto(b"junk", (SERVER_IP, 67))

        run_in_netns(lab.server_ns, flood)
        driver.sync(NETWORK, [])
        assert udp_receive_errors(lab.server_ns) > errors + 5
    finally:
        os.kill(pid, signal.SIGCONT)
    wait_for(lambda: driver.leases(NETWORK) == [], 15, "the releases to be repeated")


def test_ip_changes_back_and_forth_without_stale_entries(
    lab: VethLab, driver: DnsmasqServer
) -> None:
    for address in ("10.77.0.5", "10.77.0.6", "10.77.0.5", "10.77.0.7", "10.77.0.5"):
        driver.put(reservation(MAC1, address))
        driver.flush()
        time.sleep(0.1)
        assert lab.udhcpc_lease(MAC1) == address


def test_lease_events_for_add_old_del(
    lab: VethLab, driver: DnsmasqServer, events: list[LeaseEvent], tmp_path: Path
) -> None:
    driver.put(reservation(MAC1, "10.77.0.5"))
    script = tmp_path / "client1"
    client = lab.udhcpc_daemon(MAC1, script)

    def seen(action: LeaseAction) -> bool:
        return any(e.action == action and e.mac == MAC1 for e in events)

    wait_for(lambda: seen(LeaseAction.ADD), 10, "add")
    time.sleep(1.1)  # expiry has one-second resolution: a renewal must move it to be reported
    client.send_signal(signal.SIGUSR1)
    wait_for(lambda: seen(LeaseAction.OLD), 10, "old")
    client.send_signal(signal.SIGUSR2)
    wait_for(lambda: seen(LeaseAction.DEL), 10, "del")
    add = next(e for e in events if e.action == LeaseAction.ADD)
    assert (add.network, add.address, add.hostname) == (NETWORK, "10.77.0.5", "vm1")
    assert add.expires is not None and add.expires > time.time()


def test_sighup_replays_only_what_the_controller_missed(lab: VethLab, state: Path) -> None:
    """dnsmasq re-runs the hook for all 200 leases per SIGHUP; only undelivered ones arrive."""
    server = DnsmasqServer(supervise_interval=None)
    leases = seed_leases(server.files(NETWORK).lease_file, 200)
    events: list[LeaseEvent] = []
    listener = LeaseEventListener(server.lease_socket, events.append)
    try:
        server.ensure_network(network(), lab.placement())  # nobody listens to its `old` events
        listener.start()
        server.put(reservation(MAC1, "10.77.0.5"))
        server.put(reservation(MAC1, "10.77.0.6"))
        server.flush()

        def replayed() -> bool:
            return {e.mac for e in events if e.action == LeaseAction.OLD} >= set(leases)

        wait_for(replayed, 60, "the missed old events after SIGHUP")
        events.clear()
        server.put(reservation(MAC1, "10.77.0.7"))
        server.flush()
        assert lab.udhcpc_lease(MAC1) == "10.77.0.7"
        # the hook runs one at a time, so the add comes after this SIGHUP's replays
        wait_for(lambda: any(e.action == LeaseAction.ADD for e in events), 60, "the add")
        assert {e.mac for e in events} == {MAC1}
        assert len(server.leases(NETWORK)) == 201
    finally:
        listener.close()
        server.close()


def test_a_thousand_leases_do_not_keep_new_clients_out(lab: VethLab, state: Path) -> None:
    """dnsmasq's default lease limit (1,000) would answer "no leases left"."""
    server = DnsmasqServer(supervise_interval=None)
    seed_leases(server.files(NETWORK).lease_file, 1000)
    try:
        server.ensure_network(network(), lab.placement())
        server.put(reservation(MAC1, "10.77.0.5"))
        assert lab.udhcpc_lease(MAC1) == "10.77.0.5"
    finally:
        server.close()


def test_new_reservations_during_reloads_are_served(lab: VethLab, driver: DnsmasqServer) -> None:
    for i in range(30):
        driver.put(reservation(f"52:54:00:7c:00:{i:02x}", f"10.77.5.{i + 1}", f"vm{i}"))
        if i % 3 == 0:
            driver.delete(NETWORK, f"52:54:00:7c:00:{i:02x}")
    driver.put(reservation(MAC1, "10.77.0.5"))
    assert lab.udhcpc_lease(MAC1) == "10.77.0.5"
    driver.flush()
    assert lab.udhcpc_lease("52:54:00:7c:00:1d") == "10.77.5.30"
    assert lab.udhcpc_lease("52:54:00:7c:00:1b", tries=2) is None


ADOPT_CHILD = """
import sys
from vmfabric.dhcp.dnsmasq import DnsmasqServer
from vmfabric.domain.model import DhcpPlacement, Reservation
sys.path.insert(0, sys.argv[1])
from test_dnsmasq_lab import network, reservation, MAC1
server = DnsmasqServer()
server.ensure_network(network(), DhcpPlacement(sys.argv[2], sys.argv[3]))
server.put(reservation(MAC1, "10.77.0.5"))
print(server.pid("labnet"), flush=True)
sys.stdin.read()
"""


def test_restarted_controller_adopts_the_running_dnsmasq(lab: VethLab, state: Path) -> None:
    controller = subprocess.Popen(
        [sys.executable, "-c", ADOPT_CHILD, str(Path(__file__).parent), *lab.placement_args()],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert controller.stdout is not None
    pid = int(controller.stdout.readline())
    assert lab.udhcpc_lease(MAC1) == "10.77.0.5"
    controller.kill()
    controller.wait()

    server = DnsmasqServer(supervise_interval=None)
    try:
        server.ensure_network(network(), lab.placement())
        assert server.pid(NETWORK) == pid
        assert [(e.mac, e.address) for e in server.leases(NETWORK)] == [(MAC1, "10.77.0.5")]
        server.sync(NETWORK, [reservation(MAC1, "10.77.0.5")])
        assert lab.udhcpc_lease(MAC1) == "10.77.0.5"
        assert server.pid(NETWORK) == pid
    finally:
        server.close()


def test_killed_dnsmasq_is_restarted_by_ensure_network(lab: VethLab, driver: DnsmasqServer) -> None:
    driver.put(reservation(MAC1, "10.77.0.5"))
    assert lab.udhcpc_lease(MAC1) == "10.77.0.5"
    old = driver.pid(NETWORK)
    assert old is not None
    os.kill(old, signal.SIGKILL)
    wait_for(lambda: driver.pid(NETWORK) is None, 5, "dnsmasq to die")
    driver.ensure_network(network(), lab.placement())
    new = driver.pid(NETWORK)
    assert new is not None and new != old
    assert [e.address for e in driver.leases(NETWORK)] == ["10.77.0.5"]
    assert lab.udhcpc_lease(MAC1) == "10.77.0.5"


def test_dhcpv6_subnet_is_served_alongside_ipv4(lab: VethLab, state: Path) -> None:
    """Only dnsmasq's side: busybox has no DHCPv6 client, so no client checks the IPv6 lease."""
    run("ip", "-n", lab.server_ns, "addr", "add", "fd00:77::1/64", "dev", lab.server_if, "nodad")
    v6 = SubnetInfo("fd00:77::/64", None, "fd00:77::1", Ipv6Mode.DHCPV6)
    server = DnsmasqServer(supervise_interval=None)
    try:
        server.ensure_network(network(SUBNET, v6), lab.placement())
        server.put(Reservation(NETWORK, MAC1, "vm1", "10.77.0.5", "fd00:77::5"))
        assert lab.udhcpc_lease(MAC1) == "10.77.0.5"
        log = server.files(NETWORK).log_file.read_text()
        assert "DHCPv6, static leases only on fd00:77::" in log
        assert server.files(NETWORK).host_file(MAC1).read_text() == (
            f"{MAC1},10.77.0.5,[fd00:77::5],vm1\n"
        )
    finally:
        server.close()


def test_supervisor_restarts_a_dead_dnsmasq(lab: VethLab, state: Path) -> None:
    server = DnsmasqServer(supervise_interval=0.1)
    try:
        server.ensure_network(network(), lab.placement())
        old = server.pid(NETWORK)
        assert old is not None
        os.kill(old, signal.SIGKILL)
        wait_for(lambda: server.pid(NETWORK) not in (None, old), 10, "a new dnsmasq")
    finally:
        server.close()


def test_only_a_changed_network_restarts_dnsmasq(lab: VethLab, driver: DnsmasqServer) -> None:
    pid = driver.pid(NETWORK)
    for i in range(50):
        driver.put(reservation(f"52:54:00:79:00:{i:02x}", f"10.77.2.{i + 1}"))
        driver.delete(NETWORK, f"52:54:00:79:00:{i:02x}")
    driver.flush()
    driver.ensure_network(network(), lab.placement())
    assert driver.pid(NETWORK) == pid
    wider = SubnetInfo("10.77.0.0/16", "10.77.0.253", SERVER_IP)
    driver.ensure_network(network(wider), lab.placement())
    assert driver.pid(NETWORK) not in (None, pid)


def test_remove_network_stops_dnsmasq_and_deletes_files(
    lab: VethLab, driver: DnsmasqServer
) -> None:
    pid = driver.pid(NETWORK)
    assert pid is not None
    driver.remove_network(NETWORK)
    assert not driver.files(NETWORK).root.exists()
    assert (
        not Path(f"/proc/{pid}/cmdline").exists() or not Path(f"/proc/{pid}/cmdline").read_bytes()
    )


def test_start_failure_is_reported(lab: VethLab, state: Path) -> None:
    server = DnsmasqServer(supervise_interval=None)
    try:
        with pytest.raises(DhcpError, match="did not start"):
            server.ensure_network(network(), DhcpPlacement("vmf-nosuchif", lab.server_ns))
    finally:
        server.close()
