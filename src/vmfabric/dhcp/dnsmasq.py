"""The dnsmasq DHCP driver: one dnsmasq per network, reservations fed to it in batches.

The driver keeps one record file per NIC (`reservations/`, named by MAC), written at once by
`put`/`delete`/`sync`: that is what survives a controller restart and what a dnsmasq started
later serves. dnsmasq itself reads two things made from the records: `--dhcp-hostsfile` (all
reservations, generated at every reload) and `--dhcp-hostsdir` (reservations of MACs new since
the last reload, one file per batch). What it relies on, checked with dnsmasq 2.90 and busybox
udhcpc (see tests/lab and bench/bench_dhcp.py):

- dnsmasq reads a new file in `--dhcp-hostsdir` by inotify, without a signal, and then matches
  every lease against every reservation (lease_update_from_configs): each file costs it about
  leases x reservations x 35 ns (measured with 1,000 reservations: 0.2 ms with no lease, 6-9 ms
  with 200, 37 ms with 1,000), while more lines in the same file add little (0.1 ms each). So new
  MACs are written in batches: the first at once, the next no sooner than a window that grows
  with that cost (up to 0.1 s, which bounds how long a new reservation waits).
- It keeps the entries of removed files, and the previous entry of a changed MAC, until a
  SIGHUP; with two entries for one MAC it may go on offering the old address. So a change or a
  delete regenerates the hosts file, empties the hosts directory and sends one SIGHUP, at most
  one per window per network, first at once.
- A SIGHUP re-reads the hosts file and the hosts directory (20-50 ms for 1,000 reservations)
  and runs the lease script once for every lease with action `old` (200 runs for 200 leases).
  The script is a /bin/sh wrapper that drops a replay repeating what it last delivered for that
  address (about 1.5 ms a run) and starts the Python hook (about 40 ms) only for the rest; the
  reload window grows with the leases to keep those runs a fraction of a core.
- dnsmasq reads half-written files: files are written in a staging directory and renamed in.
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
  once the pidfile is written, with a non-zero status and a message when start-up failed. A
  controller adopting it regenerates its files and sends one SIGHUP, since the one before may
  have died between a change and its reload.
- Without `--script-on-renewal` a renewal runs no script, and the controller would believe a
  renewed lease expired; with it, each renewal arrives as an `old` event with the new expiry,
  which the wrapper forwards because the expiry changed.
- By default dnsmasq holds at most 1,000 leases and answers any further client "no leases
  left"; with static ranges only reserved MACs get a lease, so the limit is raised out of reach.
- The driver is the only writer of its base directory: it keeps the records it wrote in
  memory and regenerates dnsmasq's files from them, so one controller process serves a
  network's dnsmasq (others sharing the database only write records, as in files-only mode).
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from vmfabric import config
from vmfabric.coalescing import Coalescer
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

RECORDS_DIR = "reservations"
HOSTS_FILE = "hosts"
HOSTS_DIR = "hosts.d"
STAGING_DIR = "staging"
DELIVERED_DIR = "delivered"
PID_FILE = "vmfabric-dnsmasq.pid"
LEASE_FILE = "vmfabric-dnsmasq.leases"
LOG_FILE = "vmfabric-dnsmasq.log"
HOOK_FILE = "vmfabric-lease-hook"

# dnsmasq's cost per file in the hosts directory, per lease and reservation (measured), and
# how many times that cost batches are spaced by: dnsmasq spends at most a fifth on them.
FILE_COST_PER_LEASE_ENTRY_S = 35e-9
BATCH_SPACING_FACTOR = 5
MAX_BATCH_WINDOW_S = 0.1
# A reload's cost: re-reading each reservation, and one run of the lease wrapper per lease
# (measured about 20 µs and 1.5 ms); reloads are spaced so they take at most a third.
RELOAD_COST_PER_ENTRY_S = 20e-6
RELOAD_COST_PER_LEASE_S = 1.5e-3
RELOAD_SPACING_FACTOR = 3
DEFAULT_HUP_WINDOW_S = 0.05
MAX_HUP_WINDOW_S = 10.0
RELEASE_CHECK_S = 0.5
RELEASE_ATTEMPTS = 5
# dnsmasq refuses new leases beyond 1,000 by default; only reserved MACs get one here.
DHCP_LEASE_MAX = 1_000_000
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


HOOK_TEMPLATE = """#!/bin/sh
# vmfabric: dnsmasq's lease script for network {network}
# After each SIGHUP dnsmasq replays an `old` event for every lease: one repeating what was last
# delivered for its address ends here, without starting Python. The hook exits non-zero when
# it could not deliver, and then nothing is recorded, so the next replay tries again.
delivered={delivered}
lease="$2 ${{4:-}} ${{DNSMASQ_MAC:-}} ${{DNSMASQ_LEASE_EXPIRES:-}}"
if [ "$1" = old ] && IFS= read -r last <"$delivered/$3" && [ "$last" = "$lease" ]; then
    exit 0
fi 2>/dev/null
{command} -- "$@" || exit 0
case "$1" in
    add|old) printf '%s\\n' "$lease" >"$delivered/$3" ;;
    del) rm -f "$delivered/$3" ;;
esac
"""


def hook_script(python: str, socket_path: Path, network: str, delivered: Path) -> str:
    """dnsmasq runs its script with no PATH search and its own environment, so name everything.

    `-I -S` keeps the interpreter from reading site-packages or our environment: the hook is
    standard library only and is run by file, which also works from any venv or wheel.
    `delivered` holds, per address, the lease data last delivered (dnsmasq passes addresses,
    which make safe file names).
    """
    command = [python, "-I", "-S", lease_hook.__file__, "--socket", str(socket_path)]
    command += ["--network", network]
    return HOOK_TEMPLATE.format(
        network=network, delivered=shlex.quote(str(delivered)), command=shlex.join(command)
    )


@dataclass(frozen=True)
class NetworkFiles:
    """Where one network's dnsmasq keeps everything; the pidfile path also identifies it."""

    root: Path

    @property
    def records_dir(self) -> Path:
        return self.root / RECORDS_DIR

    @property
    def hosts_file(self) -> Path:
        return self.root / HOSTS_FILE

    @property
    def hosts_dir(self) -> Path:
        return self.root / HOSTS_DIR

    @property
    def staging_dir(self) -> Path:
        return self.root / STAGING_DIR

    @property
    def delivered_dir(self) -> Path:
        return self.root / DELIVERED_DIR

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
        """The record of one NIC's reservation."""
        return self.records_dir / host_file_name(mac)

    def make_dirs(self) -> None:
        for directory in (self.records_dir, self.hosts_dir, self.staging_dir, self.delivered_dir):
            directory.mkdir(parents=True, exist_ok=True)

    def prepare(self) -> None:
        """Create the directories and drop staging leftovers of a controller killed mid-write."""
        self.make_dirs()
        for leftover in self.staging_dir.iterdir():
            leftover.unlink(missing_ok=True)

    def replace(self, target: Path, content: str, mode: int = 0o644) -> None:
        """Write beside the target's directory, then rename over it: readers see all or nothing."""
        staged = self.staging_dir / target.name
        fd = os.open(staged, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        try:
            os.write(fd, content.encode())
            os.fchmod(fd, mode)
        finally:
            os.close(fd)
        os.replace(staged, target)

    def install(self, target: Path, content: str) -> None:
        """`replace` for files dnsmasq does not read: the old one is unlinked first.

        On ext4 a rename that replaces a file forces the new data to disk (auto_da_alloc),
        which costs several times more than the rest (measured 350 µs against 140 µs).
        """
        with contextlib.suppress(FileNotFoundError):
            target.unlink()
        self.replace(target, content)


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
        f"--dhcp-lease-max={DHCP_LEASE_MAX}",
        *range_args(network),
        f"--dhcp-hostsfile={files.hosts_file}",
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


@dataclass
class _Feed:
    """One network's reservations and what its dnsmasq has of them.

    `records` mirrors the record files (file name → hosts line). `loaded` is what dnsmasq has
    read since its files were last regenerated (the hosts file, then batches); `unsent` holds
    new MACs waiting for the next batch.
    """

    records: dict[str, str]
    loaded: dict[str, str] = field(default_factory=dict)
    unsent: dict[str, str] = field(default_factory=dict)
    batches: int = 0

    def take_batch(self) -> dict[str, str]:
        batch, self.unsent = self.unsent, {}
        self.loaded.update(batch)
        self.batches += 1
        return batch

    def regenerated(self) -> None:
        self.loaded, self.unsent = dict(self.records), {}


def read_records(records_dir: Path) -> dict[str, str]:
    """The record files of a network, by file name."""
    if not records_dir.is_dir():
        return {}
    return {p.name: p.read_text() for p in records_dir.iterdir() if _HOST_FILE.match(p.name)}


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
        self._feeds: dict[str, _Feed] = {}
        self._made: set[str] = set()
        self._lifecycle = threading.RLock()
        self._files_lock = threading.Lock()
        self._leased: dict[str, tuple[tuple[int, int, int], set[tuple[str, str]]]] = {}
        self.hup_window = hup_window
        self._batches = Coalescer(self._write_batch, self.batch_window, "dhcp-batch")
        self._reloads = Coalescer(self._reload, self.reload_window, "dhcp-reload")
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

        dnsmasq's files are regenerated from the records before it starts and when this process
        first adopts it; an adopted one then gets a SIGHUP, because the controller before may
        have died between a change and its reload.
        """
        name = network.name
        files = self.files(name)
        with self._lifecycle:
            files.prepare()
            self._install_hook(files, name)
            command = dnsmasq_command(self._dnsmasq(), network, placement, files, self._user)
            pid = self._adoptable(files, command, placement.netns)
            with self._files_lock:
                known = self._served.pop(name, None)
                if known is not None:
                    known.close_socket()
                if pid is None:
                    pid = self._start_regenerated(name, files, command, placement.netns)
                elif known is None:
                    self._regenerate(name)
                    os.kill(pid, signal.SIGHUP)
                self._served[name] = _Served(network, placement, files, command, pid)

    def remove_network(self, name: str) -> None:
        """Stop the network's dnsmasq (only if it is really ours) and delete its files."""
        files = self.files(name)
        with self._lifecycle:
            with self._files_lock:
                served = self._served.pop(name, None)
                if served is not None:
                    served.close_socket()
            for coalescer in (self._batches, self._reloads, self._checks):
                coalescer.cancel(name)
            pid = read_pid(files.pid_file)
            if pid is not None and is_our_dnsmasq(pid, files):
                self._stop(pid, files)
            shutil.rmtree(files.root, ignore_errors=True)
            self._made.discard(name)
        with self._files_lock:
            self._feeds.pop(name, None)
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
        """Record the reservation; dnsmasq gets a new MAC with the next batch, a changed one
        at the next reload (a batch cannot replace the entry dnsmasq already has)."""
        network = reservation.network
        files = self._existing_files(network)
        line = host_line(reservation)
        name = host_file_name(reservation.mac)
        with self._files_lock:
            feed = self._feed(network)
            previous = feed.records.get(name)
            if previous == line:
                return
            files.install(files.records_dir / name, line)
            feed.records[name] = line
            old_ipv4 = line_ipv4(previous)
            if old_ipv4 and old_ipv4 != line_ipv4(line):
                self._release(network, reservation.mac, old_ipv4)
            if network not in self._served:
                return
            if name not in feed.loaded:
                feed.unsent[name] = line
                coalescer = self._batches
            elif feed.loaded[name] != line:
                coalescer = self._reloads
            else:
                return
        coalescer.request(network)

    def reservations(self, network: str) -> list[Reservation]:
        """The network's reservations: what its dnsmasq serves once pending changes are applied."""
        records = read_records(self.files(network).records_dir)
        return [parse_host_line(network, records[name]) for name in sorted(records)]

    def delete(self, network: str, mac: str) -> None:
        """Drop the record, free the MAC's lease so its address can go to another VM, reload."""
        self._existing_files(network)
        self._remove(network, host_file_name(mac))

    def sync(self, network: str, reservations: list[Reservation]) -> None:
        """Make the records exactly this set, touching only what differs."""
        files = self._existing_files(network)
        for path in files.records_dir.iterdir():
            if not _HOST_FILE.match(path.name):
                path.unlink()
        wanted = {host_file_name(r.mac): r for r in reservations if r.network == network}
        with self._files_lock:
            unwanted = set(self._feed(network).records) - set(wanted)
        for name in unwanted:
            self._remove(network, name)
        for reservation in wanted.values():
            self.put(reservation)

    def pending_sighups(self) -> set[str]:
        """Networks whose reload is still to come: changes not yet fully applied."""
        return self._reloads.pending()

    def sighups_sent(self) -> int:
        """Reloads (SIGHUPs) sent so far: each costs dnsmasq a lease script run per lease."""
        return self._reloads.runs

    def batch_window(self, network: str) -> float:
        """How soon after a batch of new MACs the next may follow on this network.

        dnsmasq matches every lease against every reservation for each file it reads, so
        batches are spaced by a multiple of that cost: new reservations wait longer, by at most
        MAX_BATCH_WINDOW_S, when dnsmasq has much to match.
        """
        feed = self._feeds.get(network)
        entries = len(feed.records) if feed else 0
        cost = self._lease_count(network) * entries * FILE_COST_PER_LEASE_ENTRY_S
        return min(cost * BATCH_SPACING_FACTOR, MAX_BATCH_WINDOW_S)

    def reload_window(self, network: str) -> float:
        """How soon after a reload the next may follow on this network, up to 10 s.

        Waiting is harmless: a deleted VM no longer asks, a running one moves to a changed
        address only when it renews, and a freed address is released to its next owner at
        once. `flush()` when it must be now.
        """
        feed = self._feeds.get(network)
        entries = len(feed.records) if feed else 0
        cost = entries * RELOAD_COST_PER_ENTRY_S
        cost += self._lease_count(network) * RELOAD_COST_PER_LEASE_S
        return max(self.hup_window, min(cost * RELOAD_SPACING_FACTOR, MAX_HUP_WINDOW_S))

    def flush(self) -> None:
        """Apply pending changes now, e.g. before telling a user that a removal took effect."""
        self._batches.flush()
        self._reloads.flush()

    def close(self) -> None:
        """Apply pending changes and stop our threads; dnsmasq processes keep serving."""
        self._stopping.set()
        if self._supervisor is not None:
            self._supervisor.join(timeout=5)
        for coalescer in (self._batches, self._reloads, self._checks):
            coalescer.close()
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
        script = hook_script(self._python, self.lease_socket, network, files.delivered_dir)
        if _read_or_none(files.hook) != script:
            files.replace(files.hook, script, mode=0o755)

    def _adoptable(self, files: NetworkFiles, command: list[str], netns: str | None) -> int | None:
        """The running dnsmasq when it is ours and current; one that is not current is stopped."""
        pid = read_pid(files.pid_file)
        if pid is None or not is_our_dnsmasq(pid, files):
            return None
        if runs_as_wanted(pid, command, netns):
            return pid
        log.info("restarting dnsmasq %d of %s: its configuration changed", pid, files.root)
        self._stop(pid, files)
        return None

    def _start_regenerated(
        self, network: str, files: NetworkFiles, command: list[str], netns: str | None
    ) -> int:
        """Start dnsmasq on files regenerated from the records; called with `_files_lock`."""
        self._regenerate(network)
        return self._start(files, command, netns)

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
        with self._lifecycle, self._files_lock:
            served = self._served.get(name)
            if served is None or is_our_dnsmasq(served.pid, served.files):
                return
            log.warning("dnsmasq %d of network %s died; restarting it", served.pid, name)
            served.pid = self._start_regenerated(
                name, served.files, served.command, served.placement.netns
            )

    def _existing_files(self, network: str) -> NetworkFiles:
        """The network's files, created if needed: reservations are kept even before a server
        runs for the network, and a dnsmasq started later serves them all."""
        files = self.files(network)
        if network not in self._made:
            files.make_dirs()
            self._made.add(network)
        return files

    def _feed(self, network: str) -> _Feed:
        """The network's feed, its records read once per process; called with `_files_lock`."""
        feed = self._feeds.get(network)
        if feed is None:
            feed = self._feeds[network] = _Feed(read_records(self.files(network).records_dir))
        return feed

    def _lease_count(self, network: str) -> int:
        """About how many leases dnsmasq holds: lines of its lease file, no parsing needed."""
        try:
            return self.files(network).lease_file.read_bytes().count(b"\n")
        except FileNotFoundError:
            return 0

    def _regenerate(self, network: str) -> None:
        """dnsmasq's files made of the records: all in the hosts file, none in the directory.

        Called with `_files_lock`; dnsmasq reads the hosts file only when it starts or reloads.
        """
        feed = self._feed(network)
        files = self.files(network)
        files.replace(files.hosts_file, "".join(feed.records.values()))
        for path in files.hosts_dir.iterdir():
            path.unlink(missing_ok=True)
        feed.regenerated()

    def _write_batch(self, network: str) -> None:
        """One new file in the hosts directory with the new MACs since the last batch."""
        with self._files_lock:
            feed = self._feeds.get(network)
            if network not in self._served or feed is None or not feed.unsent:
                return
            batch = feed.take_batch()
            files = self.files(network)
            files.replace(files.hosts_dir / f"batch-{feed.batches}", "".join(batch.values()))

    def _reload(self, network: str) -> None:
        """Regenerate dnsmasq's files and SIGHUP it, which drops removed and changed entries."""
        with self._files_lock:
            served = self._served.get(network)
            if served is None:
                return
            self._regenerate(network)
            if is_our_dnsmasq(served.pid, served.files):
                os.kill(served.pid, signal.SIGHUP)
            else:
                log.warning("no dnsmasq runs for %s; it reads every file when it starts", network)

    def _remove(self, network: str, name: str) -> None:
        with self._files_lock:
            feed = self._feed(network)
            previous = feed.records.pop(name, None)
            if previous is None:
                return
            (self.files(network).records_dir / name).unlink(missing_ok=True)
            old_ipv4 = line_ipv4(previous)
            if old_ipv4 is not None:
                self._release(network, name.replace("-", ":"), old_ipv4)
            feed.unsent.pop(name, None)
            if network not in self._served or name not in feed.loaded:
                return
        self._reloads.request(network)

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
            feed = self._feeds.get(network)
            for (mac, address), attempt in self._unconfirmed.pop(network, {}).items():
                reserved = line_ipv4(feed.records.get(host_file_name(mac)) if feed else None)
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
