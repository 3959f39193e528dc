"""Benchmark of the dnsmasq driver against a real dnsmasq and real busybox udhcpc clients.

Prints one JSON line:
- `rate`, for dnsmasq started with 0, 200 and 1,000 leases (once its lease hook delivered
  them all to the controller, which happens once per network): reservation changes (adds, address
  changes, deletes over 1,000 reservations) offered at rising rates; for each step, the rate
  dnsmasq applied (counting until it has processed everything) while a probe client kept
  asking for a lease. `sustained_per_s` is the best step at which the probe never failed and
  no backlog built up. The same work the peers' way (rewrite one `--dhcp-hostsfile` and
  SIGHUP per change, waiting until dnsmasq has re-read it), the ratio, and whether real
  clients got exactly the final state afterwards, both ways.
- `latency_ms`: time from `put()` returning to a real client holding the new reservation,
  p50/p99, with 10 and with 5,000 existing reservations; `client_only` is the same client run
  against a reservation dnsmasq already has, i.e. the floor set by process start and the DHCP
  exchange itself.
- `file_create_us`: what creating a file costs on the state directory's file system.

Needs root. Builds two `vmf-` namespaces (tests/lab's `VethLab`) and removes them, and stops
every dnsmasq it started, even on failure. Run: `uv run python bench/bench_dhcp.py`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "lab"))

from test_dnsmasq_lab import (
    NETWORK,
    VethLab,
    network,
    reservation,
    seed_leases,
    stop_our_dnsmasqs,
)

from figures import cpu_seconds, summary
from vmfabric.dhcp.dnsmasq import (
    DnsmasqServer,
    NetworkFiles,
    dnsmasq_command,
    hook_script,
    host_line,
)
from vmfabric.dhcp.lease_events import LeaseEventListener
from vmfabric.domain.model import Reservation

PROBE_MAC = "52:54:00:7f:ff:fe"
PROBE_IP = "10.77.0.200"
QUIET_S = 0.3
RATE_STEPS = (10, 25, 50, 100, 250, 500, 1000, None)


def pool_mac(index: int) -> str:
    return f"52:54:01:{index >> 16 & 0xFF:02x}:{index >> 8 & 0xFF:02x}:{index & 0xFF:02x}"


def pool_ip(index: int, alternate: bool = False) -> str:
    """Two addresses per MAC, never shared with another MAC, so every state is valid."""
    block = 10 + index // 250 + (60 if alternate else 0)
    return f"10.77.{block}.{index % 250 + 2}"


def wait_until_quiet(log_file: Path) -> float:
    """When dnsmasq last wrote its log, once it has been quiet for a while: work drained."""
    size, changed = log_file.stat().st_size, time.perf_counter()
    while time.perf_counter() - changed < QUIET_S:
        time.sleep(0.01)
        if (now := log_file.stat().st_size) != size:
            size, changed = now, time.perf_counter()
    return changed


@dataclass
class Workload:
    """A seeded random mix of changes over a pool of MACs, and the state it should end in."""

    size: int
    rng: random.Random = field(default_factory=lambda: random.Random(42))
    present: dict[int, bool] = field(default_factory=dict)

    def initial(self) -> list[Reservation]:
        self.present = {i: False for i in range(self.size)}
        return [self.reservation(i) for i in range(self.size)]

    def reservation(self, index: int) -> Reservation:
        return reservation(pool_mac(index), pool_ip(index, self.present[index]), f"vm{index}")

    def changes(self) -> Iterator[tuple[int, Reservation | None]]:
        """Half address changes, a quarter deletes, a quarter (re-)adds; None = delete."""
        while True:
            index = self.rng.randrange(self.size)
            if index not in self.present:
                self.present[index] = False
                yield index, self.reservation(index)
            elif self.rng.random() < 1 / 3:
                del self.present[index]
                yield index, None
            else:
                self.present[index] = not self.present[index]
                yield index, self.reservation(index)

    def expected(self, index: int) -> str | None:
        return pool_ip(index, self.present[index]) if index in self.present else None


class Prober:
    """A client asking for its lease again and again: does dnsmasq keep serving?"""

    def __init__(self, lab: VethLab) -> None:
        self.lab = lab
        self.times: list[float] = []
        self.failures = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Prober:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            started = time.perf_counter()
            if self.lab.udhcpc_lease(PROBE_MAC, tries=3) == PROBE_IP:
                self.times.append(time.perf_counter() - started)
            else:
                self.failures += 1
            self._stop.wait(0.05)

    def report(self) -> dict[str, float]:
        return {"failures": self.failures, **(summary(self.times) if self.times else {"p99": 0})}


def verify(lab: VethLab, work: Workload, samples: int = 6) -> bool:
    """Real clients get exactly the final state: reserved MACs their address, others nothing."""
    rng = random.Random(7)
    present = rng.sample(sorted(work.present), samples)
    absent = rng.sample(sorted(set(range(work.size)) - set(work.present)), 2)
    return all(
        lab.udhcpc_lease(pool_mac(i), tries=1 if i in absent else 3) == work.expected(i)
        for i in present + absent
    )


def driver_step(
    lab: VethLab,
    server: DnsmasqServer,
    changes: Iterator[tuple[int, Reservation | None]],
    rate: float | None,
    seconds: float,
) -> dict[str, object]:
    """Offer changes at `rate` a second (None: as fast as one caller can) while a client probes."""
    count = 0
    hups = server.sighups_sent()
    pid = server.pid(NETWORK)
    assert pid is not None
    cpu = cpu_seconds(pid)
    with Prober(lab) as prober:
        started = now = time.perf_counter()
        while now - started < seconds:
            if rate is not None and count >= (now - started) * rate:
                time.sleep(0.0005)
            else:
                index, res = next(changes)
                if res is None:
                    server.delete(NETWORK, pool_mac(index))
                else:
                    server.put(res)
                count += 1
            now = time.perf_counter()
        server.flush()
    drained = wait_until_quiet(server.files(NETWORK).log_file) - started
    probe = prober.report()
    healthy = prober.failures == 0 and probe["p99"] < 1000 and drained - seconds < 1.0
    return {
        "offered_per_s": rate or "max",
        "applied_per_s": round(count / drained),
        "sighups": server.sighups_sent() - hups,
        "dnsmasq_cpu_ms_per_change": round((cpu_seconds(pid) - cpu) / count * 1000, 2),
        "probe_ms": probe,
        "healthy": healthy,
    }


def driver_run(lab: VethLab, server: DnsmasqServer, seconds: float) -> dict[str, object]:
    """Rising offered rates until dnsmasq stops keeping up (a probe fails or a backlog grows)."""
    work = Workload(1000)
    for res in work.initial():
        server.put(res)
    server.put(reservation(PROBE_MAC, PROBE_IP, "probe"))
    wait_until_quiet(server.files(NETWORK).log_file)
    changes = work.changes()
    steps = []
    for rate in RATE_STEPS:
        steps.append(driver_step(lab, server, changes, rate, seconds))
        if not steps[-1]["healthy"]:
            break
    sustained = [step["applied_per_s"] for step in steps if step["healthy"]]
    return {
        "sustained_per_s": max(sustained, default=0),  # type: ignore[type-var]
        "steps": steps,
        "final_state_served": verify(lab, work),
    }


def start_peer_dnsmasq(lab: VethLab, root: Path, sock: Path) -> tuple[int, Path]:
    """A dnsmasq configured as the peers do: one hosts file, re-read on SIGHUP (our lease hook)."""
    files = NetworkFiles(root)
    files.prepare()
    files.hosts_file.write_text("")
    hook = hook_script(sys.executable, sock, NETWORK, files.delivered_dir)
    files.replace(files.hook, hook, mode=0o755)
    command = [
        arg
        for arg in dnsmasq_command("/usr/sbin/dnsmasq", network(), lab.placement(), files, "root")
        if not arg.startswith("--dhcp-hostsdir=")
    ]
    subprocess.run(["ip", "netns", "exec", lab.server_ns, *command], check=True)
    return int(files.pid_file.read_text()), files.hosts_file


def peer_apply(pid: int, hosts_file: Path, lines: dict[int, str], log: Path, offset: int) -> int:
    """Rewrite the whole file, SIGHUP, wait for dnsmasq to have re-read it; new log offset."""
    staged = hosts_file.with_suffix(".tmp")
    staged.write_text("".join(lines.values()))
    os.replace(staged, hosts_file)
    os.kill(pid, signal.SIGHUP)
    marker = f"read {hosts_file}".encode()
    while True:
        with log.open("rb") as stream:
            stream.seek(offset)
            chunk = stream.read()
        if marker in chunk:
            return offset + chunk.rindex(marker) + len(marker)
        time.sleep(0.0005)


def peer_run(lab: VethLab, root: Path, sock: Path, count: int) -> dict[str, object]:
    work = Workload(1000)
    lines = {i: host_line(r) for i, r in enumerate(work.initial())}
    lines[-1] = host_line(reservation(PROBE_MAC, PROBE_IP, "probe"))
    pid, hosts_file = start_peer_dnsmasq(lab, root, sock)
    log = NetworkFiles(root).log_file
    offset = peer_apply(pid, hosts_file, lines, log, 0)
    changes = work.changes()
    with Prober(lab) as prober:
        started = time.perf_counter()
        for _ in range(count):
            index, res = next(changes)
            if res is None:
                del lines[index]
            else:
                lines[index] = host_line(res)
            offset = peer_apply(pid, hosts_file, lines, log, offset)
        elapsed = time.perf_counter() - started
    result = {
        "changes": count,
        "applied_per_s": round(count / elapsed, 1),
        "probe_during_ms": prober.report(),
        "final_state_served": verify(lab, work),
    }
    os.kill(pid, signal.SIGTERM)
    return result


def compare(
    lab: VethLab, root: Path, server: DnsmasqServer, leases: int, options: argparse.Namespace
) -> dict[str, object]:
    """The driver, then the peers' way, on the same lab, each dnsmasq starting with `leases`."""
    files = server.files(NETWORK)
    seed_leases(files.lease_file, leases)
    server.ensure_network(network(), lab.placement())
    while sum(1 for _ in files.delivered_dir.iterdir()) < leases:  # the controller knows them
        time.sleep(0.1)
    driver = driver_run(lab, server, options.seconds)
    server.remove_network(NETWORK)
    peer_root = root / "peer" / NETWORK
    seed_leases(NetworkFiles(peer_root).lease_file, leases)
    try:
        peer = peer_run(lab, peer_root, server.lease_socket, options.peer_changes)
    finally:
        stop_our_dnsmasqs(peer_root.parent)
    shutil.rmtree(peer_root)
    ratio = driver["sustained_per_s"] / peer["applied_per_s"]  # type: ignore[operator]
    return {"driver": driver, "peers_way": peer, "ratio": round(ratio, 1)}


def latency(lab: VethLab, server: DnsmasqServer, existing: int, samples: int) -> dict[str, object]:
    """put() → a client holding the lease, for MACs dnsmasq has never seen."""
    server.sync(NETWORK, [reservation(pool_mac(i), pool_ip(i), f"vm{i}") for i in range(existing)])
    server.flush()
    wait_until_quiet(server.files(NETWORK).log_file)
    after_put: list[float] = []
    client_only: list[float] = []
    for sample in range(samples):
        mac = pool_mac(100_000 + existing * 10 + sample)
        address = f"10.77.{200 + sample // 250}.{sample % 250 + 2}"
        lab.set_mac(mac)
        server.put(reservation(mac, address, f"new{sample}"))
        for times in (after_put, client_only):
            started = time.perf_counter()
            if lab.udhcpc_lease(mac) != address:
                about = log_about(server, (mac, mac.replace(":", "-"), f"{address} "))
                raise RuntimeError(f"{mac} did not get {address}:\n{about}")
            times.append(time.perf_counter() - started)
    return {"after_put": summary(after_put), "client_only": summary(client_only)}


def log_about(server: DnsmasqServer, needles: tuple[str, ...]) -> str:
    """dnsmasq's last words on a client, to tell why it was not served."""
    lines = server.files(NETWORK).log_file.read_text().splitlines()
    return "\n".join([line for line in lines if any(n in line for n in needles)][-12:])


def file_create_us(directory: Path, count: int = 200) -> float:
    """What creating one small file costs on this file system: the driver's floor per change."""
    started = time.perf_counter()
    for i in range(count):
        (directory / f"probe{i}").write_text("x")
    elapsed = time.perf_counter() - started
    for i in range(count):
        (directory / f"probe{i}").unlink()
    return round(elapsed / count * 1e6, 1)


@contextlib.contextmanager
def bench_lab(parent: str | None = None) -> Iterator[tuple[VethLab, Path]]:
    with tempfile.TemporaryDirectory(prefix="vmf-bench-", dir=parent) as tmp, VethLab() as lab:
        root = Path(tmp)
        try:
            yield lab, root
        finally:
            stop_our_dnsmasqs(root / "dhcp")
            stop_our_dnsmasqs(root / "peer")


def main() -> None:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit("terminated"))  # clean up on SIGTERM too
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=4.0, help="length of each rate step")
    parser.add_argument("--peer-changes", type=int, default=300)
    parser.add_argument(
        "--leases",
        type=lambda text: [int(n) for n in text.split(",")],
        default=[0, 200, 1000],
        help="leases dnsmasq starts with, one rate run each",
    )
    parser.add_argument("--samples", type=int, default=200, help="latency samples per size")
    parser.add_argument(
        "--dir", default="/var/tmp", help="parent of the state directory (its file system counts)"
    )
    options = parser.parse_args()
    load = os.getloadavg()[0]
    with bench_lab(options.dir) as (lab, root):
        create_us = file_create_us(root)
        sock = root / "run" / "lease-events.sock"
        events: list[object] = []
        with LeaseEventListener(sock, events.append):
            server = DnsmasqServer(root / "dhcp", sock, supervise_interval=None)
            try:
                rate = {
                    f"leases_{n}": compare(lab, root, server, n, options) for n in options.leases
                }
                server.ensure_network(network(), lab.placement())
                lat = {str(n): latency(lab, server, n, options.samples) for n in (10, 5000)}
            finally:
                server.close()
    print(
        json.dumps(
            {
                "bench": "dhcp",
                "rate": rate,
                "latency_ms": lat,
                "lease_events_received": len(events),
                "file_create_us": create_us,
                "cpus": os.cpu_count(),
                "load_avg_1m_at_start": load,
            }
        )
    )


if __name__ == "__main__":
    main()
