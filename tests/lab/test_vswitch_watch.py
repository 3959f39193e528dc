"""The port watcher on the lab's real switch: VM ports coming, going, moving and losing their
number; the snapshot of a late watcher; restarts of its monitor; no process left behind.

Latencies are measured from the start of the change (a lab VM defined or undefined, an
ovs-vsctl run) to the event, and printed (`pytest -s`); the waits are generous on purpose.
"""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from vmfabric.domain.model import NicSpec, VmSpec
from vmfabric.hypervisor.lab import LabHypervisor
from vmfabric.lab.names import host_bridge, host_uplink
from vmfabric.lab.ovs import switch_access
from vmfabric.lab.proc import command_line, wait_until
from vmfabric.lab.state import LabStore
from vmfabric.lab.testing import temporary_lab
from vmfabric.vswitch.watch import PAUSE, PortEvent, PortWatcher, lab_port_watcher

pytestmark = [
    pytest.mark.lab,
    pytest.mark.skipif(os.geteuid() != 0, reason="the lab needs root"),
]

BRIDGE = host_bridge("hv1")
OTHER_BRIDGE = host_bridge("hv2")
UPLINK = host_uplink("hv1")[0]
VLAN = 10
WAIT = 10.0
"""Seconds an expected event may take; they take milliseconds."""
QUIET = 1.5
"""Seconds during which an event that should not come would have come."""


def vsctl(*args: str) -> str:
    return switch_access().run("ovs-vsctl", *args)


class Events:
    """Collects a watcher's events with their arrival times."""

    def __init__(self) -> None:
        self._queue: queue.Queue[tuple[float, PortEvent]] = queue.Queue()
        self._unclaimed: list[tuple[float, PortEvent]] = []
        self.seen: list[PortEvent] = []

    def __call__(self, event: PortEvent) -> None:
        self._queue.put((time.monotonic(), event))

    def next(
        self, wanted: Callable[[PortEvent], bool], timeout: float = WAIT
    ) -> tuple[float, PortEvent]:
        """The first event not taken yet that is `wanted`, and when it arrived."""
        deadline = time.monotonic() + timeout
        while True:
            for index, (arrived, event) in enumerate(self._unclaimed):
                if wanted(event):
                    del self._unclaimed[index]
                    return arrived, event
            try:
                arrival = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                pytest.fail(f"no wanted event within {timeout:g} s; seen: {self.seen}")
            self._unclaimed.append(arrival)
            self.seen.append(arrival[1])

    def rest(self, wait: float = QUIET) -> list[PortEvent]:
        """The events that arrive within `wait` seconds."""
        time.sleep(wait)
        found = []
        while not self._queue.empty():
            found.append(self._queue.get_nowait()[1])
        self.seen += found
        return found


def about(name: str, kind: str) -> Callable[[PortEvent], bool]:
    return lambda event: event.name == name and event.kind == kind


LATENCIES: dict[str, list[float]] = {}


def measured(what: str, started: float, done: float, arrived: float) -> None:
    """Keep and print how long after the change started (and after the tool making it
    returned: ovs-vsctl returns once ovs-vswitchd has numbered the port) an event came."""
    LATENCIES.setdefault(what, []).append(arrived - started)
    print(
        f"{what}: event {1000 * (arrived - started):.1f} ms after the change started, "
        f"{1000 * (arrived - done):.1f} ms after it was made"
    )


@pytest.fixture(scope="module")
def lab() -> Iterator[None]:
    with temporary_lab(hosts=2):
        yield
    for what, values in LATENCIES.items():
        print(f"{what}: {', '.join(f'{1000 * v:.1f}' for v in values)} ms from the change's start")


Start = Callable[..., tuple[PortWatcher, Events]]


@pytest.fixture
def watch(lab: None) -> Iterator[Start]:
    """Starts watchers (lab_port_watcher's options) that have read the switch; stops them."""
    started: list[PortWatcher] = []

    def start(snapshot: bool = True, pause: float = PAUSE) -> tuple[PortWatcher, Events]:
        watcher, events = lab_port_watcher(snapshot=snapshot, pause=pause), Events()
        watcher.start(events)
        started.append(watcher)
        if snapshot:
            events.next(about(UPLINK, "added"))
        else:
            time.sleep(QUIET)
        return watcher, events

    yield start
    for watcher in started:
        watcher.stop()
    assert monitors() == []


def define(name: str, host: str = "hv1") -> tuple[str, str]:
    """A lab VM with one NIC on VLAN 10: its port and MAC."""
    nic = NicSpec("n1", host_bridge(host), VLAN)
    mac = LabHypervisor(host).define(VmSpec(name, "debian12", (nic,))).macs[0]
    return LabStore().read().vms[f"{host}/{name}"].nics[0].port, mac


def ofport(interface: str) -> int:
    return int(vsctl("get", "Interface", interface, "ofport"))


def monitors() -> list[int]:
    """The ovsdb-client processes watching the lab switch."""
    db = switch_access().db
    found = []
    for entry in Path("/proc").iterdir():
        argv = command_line(int(entry.name)) if entry.name.isdigit() else []
        if argv[:1] == ["ovsdb-client"] and db in argv and alive(int(entry.name)):
            found.append(int(entry.name))
    return found


def alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie no longer does)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def test_a_vm_port_is_added_with_its_number_and_removed_with_it(watch: Start) -> None:
    _, events = watch()
    started = time.monotonic()
    port, mac = define("web")
    done = time.monotonic()
    arrived, added = events.next(lambda event: event.name == port)
    measured("added", started, done, arrived)
    assert added.kind == "added"
    assert (added.bridge, added.ofport, added.mac) == (BRIDGE, ofport(port), mac)
    assert added.external_ids["attached-mac"] == mac
    assert [event for event in events.rest() if event.name == port] == []

    started = time.monotonic()
    LabHypervisor("hv1").undefine("web")
    done = time.monotonic()
    arrived, removed = events.next(lambda event: event.name == port)
    measured("removed", started, done, arrived)
    assert removed.kind == "removed"
    assert (removed.bridge, removed.ofport, removed.mac) == (BRIDGE, added.ofport, mac)


def test_a_port_moved_to_another_bridge_leaves_one_and_joins_the_other(watch: Start) -> None:
    _, events = watch()
    port, mac = define("mover")
    _, before = events.next(about(port, "added"))
    started = time.monotonic()
    vsctl(
        "del-port",
        BRIDGE,
        port,
        "--",
        "add-port",
        OTHER_BRIDGE,
        port,
        f"tag={VLAN}",
        "--",
        "set",
        "Interface",
        port,
        f'external_ids:attached-mac="{mac}"',
    )
    done = time.monotonic()
    _, removed = events.next(lambda event: event.name == port)
    arrived, added = events.next(lambda event: event.name == port)
    measured("moved", started, done, arrived)
    assert (removed.kind, removed.bridge, removed.ofport) == ("removed", BRIDGE, before.ofport)
    assert (added.kind, added.bridge, added.ofport) == ("added", OTHER_BRIDGE, ofport(port))
    assert added.mac == mac
    LabHypervisor("hv1").undefine("mover")
    _, gone = events.next(lambda event: event.name == port)
    assert (gone.kind, gone.bridge) == ("removed", OTHER_BRIDGE)


def test_a_number_turning_minus_one_is_a_removal_and_a_new_one_an_addition(watch: Start) -> None:
    _, events = watch()
    port, mac = define("broken")
    _, added = events.next(about(port, "added"))
    started = time.monotonic()
    vsctl("set", "Interface", port, "type=vmfabric-bogus")
    done = time.monotonic()
    arrived, removed = events.next(lambda event: event.name == port)
    measured("ofport -1", started, done, arrived)
    assert ofport(port) == -1
    assert removed == PortEvent("removed", BRIDGE, port, added.ofport, mac, added.external_ids)
    vsctl("set", "Interface", port, "type=system")
    _, again = events.next(lambda event: event.name == port)
    assert (again.kind, again.ofport, again.mac) == ("added", ofport(port), mac)
    LabHypervisor("hv1").undefine("broken")
    events.next(about(port, "removed"))


def test_a_veth_deleted_under_the_switch_keeps_its_number(watch: Start) -> None:
    """OVS 3.1 on the userspace datapath keeps the row and its number: no event until the
    row goes. Should OVS start numbering it -1, the previous test says what the watcher does."""
    _, events = watch()
    port, _ = define("vanishing")
    _, added = events.next(about(port, "added"))
    subprocess.run(["ip", "link", "delete", "dev", port], check=True)
    assert [event for event in events.rest() if event.name == port] == []
    assert ofport(port) == added.ofport
    LabHypervisor("hv1").undefine("vanishing")
    events.next(about(port, "removed"))


def test_a_late_watcher_reports_the_existing_ports(watch: Start) -> None:
    port, mac = define("early")
    _, events = watch()
    _, added = events.next(about(port, "added"))
    assert added == PortEvent("added", BRIDGE, port, ofport(port), mac, {"attached-mac": mac})
    _, quiet = watch(snapshot=False)
    LabHypervisor("hv1").undefine("early")
    _, removed = quiet.next(lambda event: event.name == port)
    assert removed.kind == "removed"
    assert quiet.seen == [removed]
    events.next(about(port, "removed"))


def test_a_dead_monitor_is_restarted_and_reports_what_changed_meanwhile(watch: Start) -> None:
    _, events = watch(pause=2.0)
    old_port, _ = define("leaving")
    events.next(about(old_port, "added"))
    (monitor,) = monitors()
    os.kill(monitor, signal.SIGKILL)
    LabHypervisor("hv1").undefine("leaving")
    new_port, mac = define("coming")
    events.next(about(old_port, "removed"))
    _, added = events.next(about(new_port, "added"))
    assert (added.bridge, added.mac) == (BRIDGE, mac)
    assert monitors() != [monitor]
    assert events.rest() == []
    assert [event.kind for event in events.seen if event.name == UPLINK] == ["added"]
    LabHypervisor("hv1").undefine("coming")
    events.next(about(new_port, "removed"))


def test_stop_ends_the_monitor_and_the_events(watch: Start) -> None:
    watcher, events = watch()
    (monitor,) = monitors()
    watcher.stop()
    assert not alive(monitor)
    assert monitors() == []
    events.rest(0.0)
    define("after")
    try:
        assert events.rest() == []
    finally:
        LabHypervisor("hv1").undefine("after")


CHILD = """
import sys, time
from vmfabric.vswitch.watch import lab_port_watcher
lab_port_watcher().start(lambda event: print(event.name, flush=True))
time.sleep(60)
"""


def test_the_monitor_does_not_outlive_its_python_process(lab: None) -> None:
    child = subprocess.Popen([sys.executable, "-c", CHILD], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None
        child.stdout.readline()
        (monitor,) = monitors()
    finally:
        child.kill()
        child.wait()
    assert wait_until(lambda: not alive(monitor), WAIT, interval=0.05)
    assert monitors() == []
