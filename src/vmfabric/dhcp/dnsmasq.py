"""The dnsmasq DHCP driver: one dnsmasq per network, one reservation file per NIC.

What it relies on, checked with dnsmasq 2.90 and busybox udhcpc (see tests/lab):

- `--dhcp-hostsdir` reads new and changed files by inotify, without a signal, but keeps the
  entries of removed files, and also the previous entry of a changed file, until a SIGHUP. With
  two entries for one MAC dnsmasq may go on offering the old address. So a new file needs
  nothing, while a changed or removed one needs a SIGHUP. Those are coalesced (at most one per
  window per network), because a SIGHUP re-reads every file and re-runs the lease script for
  every lease.
- dnsmasq reads half-written files in that directory: files are written in a staging
  directory beside it and renamed in.
- A lease keeps its address from being offered to another MAC until it expires ("not using
  configured address ... because it is leased to ..."). So when a reservation is deleted or its
  IPv4 address changes, the driver releases the MAC's lease on the old address with a
  DHCPRELEASE sent on dnsmasq's interface on the client's behalf, as dnsmasq's own
  `dhcp_release` tool does. Only leases the lease file shows are released: one packet per
  change would flood dnsmasq's socket at hundreds of changes a second. dnsmasq truncates and
  rewrites that file in place, so it is read until two reads agree, and only when it changed.
- SIGHUP does not re-read the command line: a changed network (subnets, gateway, interface)
  restarts dnsmasq. Leases survive in the lease file.
- dnsmasq daemonizes, so it outlives a killed controller, and its foreground parent exits only
  once the pidfile is written, with a non-zero status and a message when start-up failed.
- Without `--script-on-renewal` a renewal runs no script, and the controller would believe a
  renewed lease expired; with it, each renewal arrives as an `old` event with the new expiry.
- By default dnsmasq drops to an unprivileged user, and then silently fails to read a hosts
  directory under a state directory that only root may enter. It serves static reservations
  only, so it runs as root here unless the operator names another `user`.
"""

from __future__ import annotations

import contextlib
import ctypes
import ipaddress
import logging
import os
import re
import secrets
import shlex
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from vmfabric import config
from vmfabric.dhcp import DhcpError, lease_hook
from vmfabric.dhcp.lease_events import read_lease_file
from vmfabric.domain.model import (
    DhcpPlacement,
    Ipv6Mode,
    LeaseEvent,
    NetworkInfo,
    Reservation,
)
from vmfabric.domain.names import check_name, normalize_mac

log = logging.getLogger(__name__)

HOSTS_DIR = "hosts.d"
STAGING_DIR = "staging"
PID_FILE = "vmfabric-dnsmasq.pid"
LEASE_FILE = "vmfabric-dnsmasq.leases"
LOG_FILE = "vmfabric-dnsmasq.log"
HOOK_FILE = "vmfabric-lease-hook"

DEFAULT_HUP_WINDOW_S = 0.05
HUP_SPACING_PER_FILE_S = 0.0001
RELEASE_CHECK_S = 0.5
RELEASE_ATTEMPTS = 5
HUP_SPACING_PER_LEASE_S = 0.01
MAX_HUP_WINDOW_S = 10.0
DEFAULT_SUPERVISE_INTERVAL_S = 5.0
START_TIMEOUT_S = 15.0
STOP_TIMEOUT_S = 5.0
POLL_S = 0.02

CLONE_NEWNET = 0x40000000
DHCP_SERVER_PORT = 67
DHCP_MAGIC = bytes((99, 130, 83, 99))
DHCPRELEASE = 7

_HOST_FILE = re.compile(r"^[0-9a-f]{2}(-[0-9a-f]{2}){5}$")

T = TypeVar("T")


def host_file_name(mac: str) -> str:
    """One file per NIC, named by its MAC, so a put replaces exactly that NIC's entry."""
    return normalize_mac(mac).replace(":", "-")


def host_line(reservation: Reservation) -> str:
    """A `--dhcp-host` entry: `MAC[,IPv4][,[IPv6]],HOSTNAME` (dnsmasq brackets IPv6)."""
    parts = [normalize_mac(reservation.mac)]
    if reservation.ipv4:
        parts.append(str(ipaddress.IPv4Address(reservation.ipv4)))
    if reservation.ipv6:
        parts.append(f"[{ipaddress.IPv6Address(reservation.ipv6)}]")
    parts.append(check_name("hostname", reservation.hostname))
    return ",".join(parts) + "\n"


def parse_host_line(network: str, line: str) -> Reservation:
    """The reservation a `host_line` entry stands for."""
    mac, *middle, hostname = line.strip().split(",")
    ipv6 = next((p.strip("[]") for p in middle if p.startswith("[")), None)
    return Reservation(network, mac, hostname, ipv4=line_ipv4(line), ipv6=ipv6)


def range_args(network: NetworkInfo) -> list[str]:
    """Static-only ranges: dnsmasq answers reserved MACs and nobody else.

    Each subnet gets a tag so that its own gateway is the router option of its clients.
    SLAAC subnets need nothing from dnsmasq.
    """
    args: list[str] = []
    for index, subnet in enumerate(network.subnets):
        net = ipaddress.ip_network(subnet.cidr, strict=False)
        tag = f"vmf{index}"
        if net.version == 4:
            args.append(f"--dhcp-range=set:{tag},{net.network_address},static,{net.netmask}")
            if subnet.gateway:
                args.append(f"--dhcp-option=tag:{tag},option:router,{subnet.gateway}")
        elif subnet.ipv6_mode == Ipv6Mode.DHCPV6:
            args.append(f"--dhcp-range=set:{tag},{net.network_address},static,{net.prefixlen}")
    return args


def hook_script(python: str, socket_path: Path, network: str) -> str:
    """dnsmasq runs its script with no PATH search and its own environment, so name everything.

    `-I -S` keeps the interpreter from reading site-packages or our environment: the hook is
    standard library only and is run by file, which also works from any venv or wheel.
    """
    command = [python, "-I", "-S", lease_hook.__file__, "--socket", str(socket_path)]
    command += ["--network", network]
    return (
        "#!/bin/sh\n"
        f"# vmfabric: dnsmasq's lease script for network {network}\n"
        f'exec {shlex.join(command)} -- "$@"\n'
    )


@dataclass(frozen=True)
class NetworkFiles:
    """Where one network's dnsmasq keeps everything; the pidfile path also identifies it."""

    root: Path

    @property
    def hosts_dir(self) -> Path:
        return self.root / HOSTS_DIR

    @property
    def staging_dir(self) -> Path:
        return self.root / STAGING_DIR

    @property
    def pid_file(self) -> Path:
        return self.root / PID_FILE

    @property
    def lease_file(self) -> Path:
        return self.root / LEASE_FILE

    @property
    def log_file(self) -> Path:
        return self.root / LOG_FILE

    @property
    def hook(self) -> Path:
        return self.root / HOOK_FILE

    def host_file(self, mac: str) -> Path:
        return self.hosts_dir / host_file_name(mac)

    def prepare(self) -> None:
        """Create the directories and drop staging leftovers of a controller killed mid-write."""
        for directory in (self.hosts_dir, self.staging_dir):
            directory.mkdir(parents=True, exist_ok=True)
        for leftover in self.staging_dir.iterdir():
            leftover.unlink(missing_ok=True)

    def install(self, target: Path, content: str, mode: int = 0o644) -> None:
        """Write beside the target's directory, then rename: readers see all or nothing.

        The old file is unlinked first rather than renamed over: on ext4 a rename that
        replaces a file forces the new data to disk (auto_da_alloc), which costs several
        times more than the rest. dnsmasq does not react to an unlink, so it sees no gap.
        """
        staged = self.staging_dir / target.name
        fd = os.open(staged, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        try:
            os.write(fd, content.encode())
            os.fchmod(fd, mode)
        finally:
            os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            target.unlink()
        os.rename(staged, target)


def dnsmasq_command(
    binary: str, network: NetworkInfo, placement: DhcpPlacement, files: NetworkFiles, user: str
) -> list[str]:
    """The full command line; adoption compares it with the running process's."""
    return [
        binary,
        "--conf-file=/dev/null",
        f"--user={user}",
        "--port=0",
        "--bind-interfaces",
        f"--interface={placement.interface}",
        "--dhcp-authoritative",
        *range_args(network),
        f"--dhcp-hostsdir={files.hosts_dir}",
        f"--dhcp-leasefile={files.lease_file}",
        f"--dhcp-script={files.hook}",
        "--script-on-renewal",
        f"--log-facility={files.log_file}",
        f"--pid-file={files.pid_file}",
        *placement.extra_args,
    ]


def read_pid(pid_file: Path) -> int | None:
    """The pid a dnsmasq wrote, or None when there is no usable pidfile."""
    try:
        return int(pid_file.read_text().strip())
    except (FileNotFoundError, ValueError):
        return None


def process_cmdline(pid: int) -> list[str]:
    """A process's arguments; empty for a gone process or a zombie."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return []
    return [arg.decode(errors="replace") for arg in raw.split(b"\0")[:-1]]


def netns_inode(netns: str | None, pid: int | str = "self") -> int | None:
    """Identity of a network namespace, by name or as a process sees it."""
    path = f"/run/netns/{netns}" if netns else f"/proc/{pid}/ns/net"
    try:
        return os.stat(path).st_ino
    except OSError:
        return None


def is_our_dnsmasq(pid: int, files: NetworkFiles) -> bool:
    """A pid from a pidfile may have been reused: only a dnsmasq writing this pidfile is ours."""
    argv = process_cmdline(pid)
    return bool(argv) and Path(argv[0]).name == "dnsmasq" and f"--pid-file={files.pid_file}" in argv


def runs_as_wanted(pid: int, command: list[str], netns: str | None) -> bool:
    """Same arguments in the same namespace: SIGHUP cannot change anything else."""
    argv = process_cmdline(pid)
    same_args = argv[1:] == command[1:]
    return same_args and netns_inode(None, pid) == netns_inode(netns)


def dhcp_release_packet(mac: str, address: str, server: str) -> bytes:
    """A DHCPRELEASE as the client would send it (RFC 2131), to free a lease from outside.

    No client identifier: dnsmasq then matches the lease by MAC, whatever id the client used.
    """
    zero = bytes(4)
    header = struct.pack(
        "!4BI2H4s4s4s4s16s64s128s",
        1,  # BOOTREQUEST
        1,  # Ethernet
        6,
        0,
        secrets.randbits(32),
        0,
        0,
        ipaddress.IPv4Address(address).packed,
        zero,
        zero,
        zero,
        bytes.fromhex(normalize_mac(mac).replace(":", "")),
        b"",
        b"",
    )
    options = bytes((53, 1, DHCPRELEASE, 54, 4)) + ipaddress.IPv4Address(server).packed
    return header + DHCP_MAGIC + options + bytes((255,))


def line_ipv4(line: str | None) -> str | None:
    """The IPv4 address of a reservation file's entry, to release it when the entry goes."""
    for part in (line or "").strip().split(",")[1:]:
        with contextlib.suppress(ValueError):
            return str(ipaddress.IPv4Address(part))
    return None


def run_in_netns(netns: str | None, action: Callable[[], T]) -> T:
    """Run `action` in a network namespace without a subprocess.

    Namespaces are per thread on Linux, so a short-lived thread enters it and the caller's
    threads never change namespace; sockets keep the namespace they were created in.
    """
    if netns is None:
        return action()
    outcome: list[T] = []
    failure: list[BaseException] = []

    def enter_and_run() -> None:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            fd = os.open(f"/run/netns/{netns}", os.O_RDONLY)
            try:
                if libc.setns(fd, CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), f"setns into {netns} failed")
            finally:
                os.close(fd)
            outcome.append(action())
        except BaseException as exc:
            failure.append(exc)

    thread = threading.Thread(target=enter_and_run, name=f"vmfabric-netns-{netns}")
    thread.start()
    thread.join()
    if failure:
        raise failure[0]
    return outcome[0]


def interface_socket(interface: str) -> socket.socket:
    """A UDP socket whose packets dnsmasq sees arrive on its interface, as a client's would."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, interface.encode())
    return sock


def server_address(network: NetworkInfo, address: str) -> str | None:
    """dnsmasq only accepts a release naming its own address in the lease's subnet."""
    ip = ipaddress.ip_address(address)
    for subnet in network.subnets:
        if subnet.dhcp_server and ip in ipaddress.ip_network(subnet.cidr, strict=False):
            return subnet.dhcp_server
    return None


class Coalescer:
    """Turns a burst of requests for one network into one run of `action`, a window later.

    Used for SIGHUPs (at most one per network per window) and for checking releases. The
    window is asked for when a burst starts, so it can follow what a run costs then. A
    background thread runs what is due; `flush` runs everything pending at once.
    """

    def __init__(
        self, action: Callable[[str], None], window: Callable[[str], float], name: str
    ) -> None:
        self._action = action
        self._window = window
        self._due: dict[str, float] = {}
        self._cond = threading.Condition()
        self._closed = False
        self.runs = 0
        self._thread = threading.Thread(target=self._run, name=f"vmfabric-{name}", daemon=True)
        self._thread.start()

    def request(self, network: str) -> None:
        """Ask for a run; joins the one already pending for this network, if any."""
        with self._cond:
            if network not in self._due:
                self._due[network] = time.monotonic() + self._window(network)
                self._cond.notify()

    def cancel(self, network: str) -> None:
        """Forget a pending run (the network's server is going away)."""
        with self._cond:
            self._due.pop(network, None)

    def pending(self) -> set[str]:
        """Networks waiting for their run."""
        with self._cond:
            return set(self._due)

    def flush(self) -> None:
        """Run everything pending now."""
        with self._cond:
            networks = list(self._due)
            self._due.clear()
        self._deliver(networks)

    def close(self) -> None:
        """Run what is pending, then stop the thread."""
        self.flush()
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join(timeout=5)

    def _take_due(self) -> list[str] | None:
        with self._cond:
            while not self._closed:
                now = time.monotonic()
                due = [n for n, at in self._due.items() if at <= now]
                if due:
                    for network in due:
                        del self._due[network]
                    return due
                timeout = min(self._due.values(), default=now + 3600) - now
                self._cond.wait(timeout)
            return None

    def _run(self) -> None:
        while (due := self._take_due()) is not None:
            self._deliver(due)

    def _deliver(self, networks: list[str]) -> None:
        for network in networks:
            try:
                self._action(network)
                self.runs += 1
            except Exception:
                log.exception("%s for network %s failed", self._thread.name, network)


@dataclass
class _Served:
    """A network this driver instance runs or adopted, as last ensured."""

    info: NetworkInfo
    placement: DhcpPlacement
    files: NetworkFiles
    command: list[str]
    pid: int
    release_socket: socket.socket | None = None

    def close_socket(self) -> None:
        if self.release_socket is not None:
            self.release_socket.close()
            self.release_socket = None


class DnsmasqServer:
    """`DhcpServer` on dnsmasq: reservations as files, dnsmasq processes that outlive us."""

    def __init__(
        self,
        base_dir: Path | None = None,
        lease_socket: Path | None = None,
        *,
        dnsmasq_binary: str | None = None,
        user: str = "root",
        hup_window: float = DEFAULT_HUP_WINDOW_S,
        supervise_interval: float | None = DEFAULT_SUPERVISE_INTERVAL_S,
        python: str = sys.executable,
    ) -> None:
        self.base_dir = base_dir or config.state_dir() / "dhcp"
        self.lease_socket = lease_socket or config.lease_socket()
        self._binary = dnsmasq_binary
        self._user = user
        self._python = python
        self._served: dict[str, _Served] = {}
        self._lifecycle = threading.RLock()
        self._files_lock = threading.Lock()
        self._leased: dict[str, tuple[tuple[int, int, int], set[tuple[str, str]]]] = {}
        self.hup_window = hup_window
        self._hups = Coalescer(self._send_hup, self.sighup_window, "dhcp-sighup")
        self._checks = Coalescer(self._check_releases, lambda _: RELEASE_CHECK_S, "dhcp-release")
        self._unconfirmed: dict[str, dict[tuple[str, str], int]] = {}
        self._stopping = threading.Event()
        self._supervisor: threading.Thread | None = None
        if supervise_interval:
            self._supervisor = threading.Thread(
                target=self._supervise,
                args=(supervise_interval,),
                name="vmfabric-dhcp-supervisor",
                daemon=True,
            )
            self._supervisor.start()

    def files(self, network: str) -> NetworkFiles:
        """The network's directory layout (for the controller's lease reconcile and for tests)."""
        return NetworkFiles(self.base_dir / check_name("network", network))

    # --- servers -------------------------------------------------------------------------

    def ensure_network(self, network: NetworkInfo, placement: DhcpPlacement) -> None:
        """Adopt the running dnsmasq when it is ours and current, else (re)start it.

        The first adoption in this process sends one SIGHUP, because a controller killed
        between removing a file and its coalesced SIGHUP left a stale entry behind.
        """
        files = self.files(network.name)
        with self._lifecycle:
            files.prepare()
            self._install_hook(files, network.name)
            command = dnsmasq_command(self._dnsmasq(), network, placement, files, self._user)
            pid, adopted = self._adopt_or_start(files, command, placement.netns)
            known = network.name in self._served
            if known:
                self._served[network.name].close_socket()
            self._served[network.name] = _Served(network, placement, files, command, pid)
        if adopted and not known:
            self._hups.request(network.name)

    def remove_network(self, name: str) -> None:
        """Stop the network's dnsmasq (only if it is really ours) and delete its files."""
        files = self.files(name)
        with self._lifecycle:
            served = self._served.pop(name, None)
            if served is not None:
                served.close_socket()
            self._hups.cancel(name)
            self._checks.cancel(name)
            pid = read_pid(files.pid_file)
            if pid is not None and is_our_dnsmasq(pid, files):
                self._stop(pid, files)
            shutil.rmtree(files.root, ignore_errors=True)
        with self._files_lock:
            self._leased.pop(name, None)
            self._unconfirmed.pop(name, None)

    def pid(self, network: str) -> int | None:
        """The pid of the network's running dnsmasq, if one runs."""
        files = self.files(network)
        pid = read_pid(files.pid_file)
        return pid if pid is not None and is_our_dnsmasq(pid, files) else None

    def leases(self, network: str) -> list[LeaseEvent]:
        """Current leases, read as `old` events, for the controller's reconcile after a restart."""
        return read_lease_file(self.files(network).lease_file, network)

    # --- reservations --------------------------------------------------------------------

    def put(self, reservation: Reservation) -> None:
        """New files need no signal; a changed one needs a SIGHUP to drop the old entry."""
        files = self._existing_files(reservation.network)
        line = host_line(reservation)
        target = files.host_file(reservation.mac)
        with self._files_lock:
            previous = _read_or_none(target)
            if previous == line:
                return
            files.install(target, line)
            old_ipv4 = line_ipv4(previous)
            if old_ipv4 and old_ipv4 != line_ipv4(line):
                self._release(reservation.network, reservation.mac, old_ipv4)
        if previous is not None:
            self._hups.request(reservation.network)

    def reservations(self, network: str) -> list[Reservation]:
        """The reservations the network's files hold, as dnsmasq reads them."""
        hosts_dir = self.files(network).hosts_dir
        if not hosts_dir.is_dir():
            return []
        return [
            parse_host_line(network, path.read_text())
            for path in sorted(hosts_dir.iterdir())
            if _HOST_FILE.match(path.name)
        ]

    def delete(self, network: str, mac: str) -> None:
        """Remove the file, free the MAC's lease so its address can go to another VM, SIGHUP."""
        files = self._existing_files(network)
        self._remove(network, files.host_file(mac), normalize_mac(mac))

    def sync(self, network: str, reservations: list[Reservation]) -> None:
        """Make the hosts directory exactly this set, touching only what differs."""
        files = self._existing_files(network)
        wanted = {host_file_name(r.mac): r for r in reservations if r.network == network}
        for path in files.hosts_dir.iterdir():
            if path.name not in wanted:
                mac = path.name.replace("-", ":") if _HOST_FILE.match(path.name) else None
                self._remove(network, path, mac)
        for reservation in wanted.values():
            self.put(reservation)

    def pending_sighups(self) -> set[str]:
        """Networks whose coalesced SIGHUP is still to come: changes not yet fully applied."""
        return self._hups.pending()

    def sighups_sent(self) -> int:
        """SIGHUPs sent so far: each costs dnsmasq a full re-read and a hook run per lease."""
        return self._hups.runs

    def sighup_window(self, network: str) -> float:
        """How long a removal or change may wait for its SIGHUP on this network.

        A SIGHUP costs dnsmasq a re-read of every file (about 30 µs each, measured) and its
        lease script one run per lease (about 35 ms each for ours): so SIGHUPs are spaced by
        100 µs per file and 10 ms per lease, up to 10 s. Waiting is harmless: a deleted VM no
        longer asks, a running one moves to a changed address only when it renews, and a
        freed address is released to its next owner at once. `flush()` when it must be now.
        """
        files = self.files(network)
        try:
            count = sum(1 for _ in os.scandir(files.hosts_dir))
        except FileNotFoundError:
            count = 0
        leases = len(read_lease_file(files.lease_file, network))
        spacing = count * HUP_SPACING_PER_FILE_S + leases * HUP_SPACING_PER_LEASE_S
        return max(self.hup_window, min(spacing, MAX_HUP_WINDOW_S))

    def flush(self) -> None:
        """Send pending SIGHUPs now, e.g. before telling a user that a removal took effect."""
        self._hups.flush()

    def close(self) -> None:
        """Apply pending changes and stop our threads; dnsmasq processes keep serving."""
        self._stopping.set()
        if self._supervisor is not None:
            self._supervisor.join(timeout=5)
        self._hups.close()
        self._checks.close()
        with self._files_lock:
            for served in self._served.values():
                served.close_socket()

    # --- internals -----------------------------------------------------------------------

    def _dnsmasq(self) -> str:
        binary = self._binary or shutil.which("dnsmasq", path=f"{os.defpath}:/usr/sbin:/sbin")
        if binary is None:
            raise DhcpError("dnsmasq is not installed (Debian package dnsmasq-base)")
        return binary

    def _install_hook(self, files: NetworkFiles, network: str) -> None:
        script = hook_script(self._python, self.lease_socket, network)
        if _read_or_none(files.hook) != script:
            files.install(files.hook, script, mode=0o755)

    def _adopt_or_start(
        self, files: NetworkFiles, command: list[str], netns: str | None
    ) -> tuple[int, bool]:
        pid = read_pid(files.pid_file)
        if pid is not None and is_our_dnsmasq(pid, files):
            if runs_as_wanted(pid, command, netns):
                return pid, True
            log.info("restarting dnsmasq %d of %s: its configuration changed", pid, files.root)
            self._stop(pid, files)
        return self._start(files, command, netns), False

    def _start(self, files: NetworkFiles, command: list[str], netns: str | None) -> int:
        files.pid_file.unlink(missing_ok=True)
        launch = ["ip", "netns", "exec", netns, *command] if netns else command
        try:
            done = subprocess.run(
                launch,
                capture_output=True,
                text=True,
                timeout=START_TIMEOUT_S,
                check=False,
                start_new_session=True,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise DhcpError(f"could not run dnsmasq for {files.root.name}: {exc}") from exc
        if done.returncode != 0:
            message = (done.stderr or done.stdout).strip()
            raise DhcpError(f"dnsmasq for network {files.root.name} did not start: {message}")
        pid = read_pid(files.pid_file)
        if pid is None or not is_our_dnsmasq(pid, files):
            raise DhcpError(f"dnsmasq for network {files.root.name} exited right after starting")
        log.info("started dnsmasq %d for network %s", pid, files.root.name)
        return pid

    def _stop(self, pid: int, files: NetworkFiles) -> None:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
            deadline = time.monotonic() + STOP_TIMEOUT_S
            while time.monotonic() < deadline:
                if not is_our_dnsmasq(pid, files):
                    return
                time.sleep(POLL_S)
        raise DhcpError(f"dnsmasq {pid} of network {files.root.name} does not stop")

    def _supervise(self, interval: float) -> None:
        while not self._stopping.wait(interval):
            for name in list(self._served):
                try:
                    self._revive(name)
                except Exception:
                    log.exception("could not restart the dnsmasq of network %s", name)

    def _revive(self, name: str) -> None:
        with self._lifecycle:
            served = self._served.get(name)
            if served is None or is_our_dnsmasq(served.pid, served.files):
                return
            log.warning("dnsmasq %d of network %s died; restarting it", served.pid, name)
            served.pid = self._start(served.files, served.command, served.placement.netns)

    def _send_hup(self, network: str) -> None:
        files = self.files(network)
        served = self._served.get(network)
        pid = served.pid if served else read_pid(files.pid_file)
        if pid is None or not is_our_dnsmasq(pid, files):
            log.warning("no dnsmasq runs for %s; it reads every file when it starts", network)
            return
        os.kill(pid, signal.SIGHUP)

    def _existing_files(self, network: str) -> NetworkFiles:
        """The network's files, created if needed: reservations are kept even before a server
        runs for the network, and a dnsmasq started later serves them all."""
        files = self.files(network)
        for directory in (files.hosts_dir, files.staging_dir):
            directory.mkdir(parents=True, exist_ok=True)
        return files

    def _remove(self, network: str, path: Path, mac: str | None) -> None:
        with self._files_lock:
            previous = _read_or_none(path)
            if previous is None:
                return
            path.unlink()
            old_ipv4 = line_ipv4(previous)
            if mac is not None and old_ipv4 is not None:
                self._release(network, mac, old_ipv4)
        self._hups.request(network)

    def _is_leased(self, network: str, mac: str, address: str) -> bool:
        path = self.files(network).lease_file
        try:
            st = path.stat()
        except FileNotFoundError:
            return False
        key = (st.st_ino, st.st_size, st.st_mtime_ns)
        cached = self._leased.get(network)
        if cached is None or cached[0] != key:
            pairs = {(e.mac, e.address) for e in read_lease_file(path, network)}
            cached = self._leased[network] = (key, pairs)
        return (normalize_mac(mac), address) in cached[1]

    def _release(self, network: str, mac: str, address: str) -> None:
        """Free `address` if `mac` holds a lease on it, so that its next owner gets it.

        Called with `_files_lock` held, which also guards the lease cache, the release
        socket and the releases waiting for confirmation.
        """
        if self._is_leased(network, mac, address):
            self._send_release(network, normalize_mac(mac), address, attempt=1)

    def _send_release(self, network: str, mac: str, address: str, attempt: int) -> None:
        served = self._served.get(network)
        server = server_address(served.info, address) if served else None
        if served is None or server is None:
            log.warning("cannot release %s on %s: no server address known", address, network)
            return
        try:
            if served.release_socket is None:
                interface = served.placement.interface
                served.release_socket = run_in_netns(
                    served.placement.netns, lambda: interface_socket(interface)
                )
            packet = dhcp_release_packet(mac, address, server)
            served.release_socket.sendto(packet, (server, DHCP_SERVER_PORT))
        except OSError as exc:
            served.close_socket()
            log.warning("could not release %s on %s: %s", address, network, exc)
        self._unconfirmed.setdefault(network, {})[(mac, address)] = attempt
        self._checks.request(network)

    def _check_releases(self, network: str) -> None:
        """Release again what is still leased: dnsmasq's socket drops what overflows its queue,
        as a burst of releases (a tenant's VMs deleted at once) can make it do.
        """
        with self._files_lock:
            for (mac, address), attempt in self._unconfirmed.pop(network, {}).items():
                reserved = line_ipv4(_read_or_none(self.files(network).host_file(mac)))
                if reserved == address or not self._is_leased(network, mac, address):
                    continue
                if attempt >= RELEASE_ATTEMPTS:
                    log.warning("dnsmasq keeps %s leased to %s on %s", address, mac, network)
                    continue
                self._send_release(network, mac, address, attempt + 1)


def _read_or_none(path: Path) -> str | None:
    try:
        return path.read_text()
    except FileNotFoundError:
        return None
