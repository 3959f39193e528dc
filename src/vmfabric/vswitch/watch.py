"""Port events of an Open vSwitch: which interface got a port number on which bridge, and
when it went away. They drive a VM's policy through a migration (docs/policies.md).

How it watches, and why that way:

- One `ovsdb-client monitor` of the Interface table (name, ofport, external_ids), JSON
  output. ovsdb-client 3.1 monitors a single table per process (several only with `ALL`,
  which also streams every interface's statistics every few seconds), and three processes
  for Interface, Port and Bridge would split one transaction over three unordered streams.
  With one table, each line of output is one whole transaction, so the watcher never sees a
  half-made change.
- The bridge is read only when an interface becomes numbered ("added"): one ovs-vsctl run
  maps Interface rows to bridges through Port and Bridge, in one transaction, by row UUID
  (a name moved to another bridge is a new row, with its own events). A row that is gone
  by then is skipped: its deletion follows. "removed" carries the bridge, port and MAC
  remembered at "added", since the row is gone or renumbered by then.
- An interface counts while its `ofport` is above 0. libvirt and ovs-vsctl insert the row
  with no number (`[]`) and ovs-vswitchd numbers it in a later transaction, so "added" comes
  with that second one; a number turning -1 (the switch could not open the interface) is a
  removal, a new number a removal and an addition. On the userspace datapath (the lab),
  OVS 3.1 keeps the number of a veth deleted under it (only ifindex, admin and link state
  change), so that is no event; its row's deletion is.
- Restarts: when the monitor dies (ovsdb-server restarted, the process killed), the reader
  starts a new one after a short pause. The new monitor's first line is the table as it is
  (the `initial` rows), or a change if the table was empty; the watcher compares it with
  the ports it reported, so what changed meanwhile comes out as events, and nothing twice.
  With an empty table the removals wait for its next change (ovsdb-client prints nothing
  for an empty table), which happens only when the switch has no bridge at all.
- Lifetime: ovsdb-client would outlive its parent until its next write hit the closed pipe,
  which on a quiet switch is never. So it runs under a small `sh` that holds a pipe from
  this process on its stdin and ends ovsdb-client when that pipe closes: `stop()` closes it,
  and so does the kernel when this process dies, however it dies (no prctl, no signal from
  a thread that may be gone).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from typing import Any, Literal

from vmfabric.domain.names import normalize_mac
from vmfabric.lab.ovs import switch_access
from vmfabric.vswitch import VswitchError
from vmfabric.vswitch.openvswitch import ATTACHED_MAC, OpenVswitch

log = logging.getLogger(__name__)

PAUSE = 1.0
"""Seconds between a monitor's death and its restart, so a switch that is down is not hammered."""

STOP_WAIT = 5.0
"""Seconds the monitor gets to end once its pipe closes, before it is killed."""

COLUMNS = "name,ofport,external_ids"

_WATCHDOG = 'ovsdb-client "$@" & exec >/dev/null 2>&1; read -r line; kill "$!"; wait'
"""Runs ovsdb-client (its output still on the pipe) until stdin closes, then ends it."""


@dataclass(frozen=True)
class PortEvent:
    """An interface got a port number on `bridge` ("added"), or lost it ("removed").

    `mac` is the VM NIC's MAC from `external_ids:attached-mac`, None for other interfaces
    (uplinks, peer links, the bridge's own); a "removed" event repeats its "added" one.
    """

    kind: Literal["added", "removed"]
    bridge: str
    name: str
    ofport: int
    mac: str | None
    external_ids: dict[str, str]


@dataclass(frozen=True)
class _Row:
    """The monitored columns of one Interface row."""

    name: str
    ofport: int | None
    external_ids: dict[str, str]

    @property
    def port(self) -> int | None:
        """Its OpenFlow port, if the switch gave it a usable number."""
        return self.ofport if self.ofport is not None and self.ofport > 0 else None

    @property
    def mac(self) -> str | None:
        """The NIC's MAC, if the interface carries a valid `attached-mac`."""
        try:
            return normalize_mac(self.external_ids[ATTACHED_MAC])
        except (KeyError, ValueError):
            return None


@dataclass(frozen=True)
class _Update:
    """One line of the monitor: a transaction's rows (None: deleted), or the initial table."""

    rows: dict[str, _Row | None]
    initial: bool


class PortWatcher:
    """Reports Interface rows getting and losing port numbers, from a thread of its own."""

    def __init__(
        self,
        env: dict[str, str] | None = None,
        db: str | None = None,
        *,
        snapshot: bool = True,
        pause: float = PAUSE,
    ) -> None:
        """`env` and `db` reach the switch as for `OpenVswitch`. With `snapshot`, the ports
        that exist at start come first, as "added" events (a restarted controller learns
        what it missed); without, only changes are reported (a port existing at start is
        still reported when it goes)."""
        self._switch = OpenVswitch(env=env, db=db)
        self._snapshot = snapshot
        self._pause = pause
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._process: subprocess.Popen[str] | None = None
        self._thread: threading.Thread | None = None
        self._rows: dict[str, _Row] = {}
        self._reported: dict[str, PortEvent] = {}
        self._caught_up = False

    def start(self, callback: Callable[[PortEvent], None]) -> None:
        """Start the monitor and the thread that calls `callback` with each event, in order.

        `callback` runs on the watcher's thread; an exception in it is logged, not fatal.
        """
        if self._thread is not None:
            raise VswitchError("the port watcher is already started")
        self._thread = threading.Thread(
            target=self._supervise, args=(callback,), name="port-watcher", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        """End the monitor process and the thread; no callback runs once this returns
        (called from a callback, the current one is the last)."""
        with self._lock:
            self._stopping.set()
            process = self._process
        if process is not None and process.stdin is not None:
            process.stdin.close()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()

    def _supervise(self, callback: Callable[[PortEvent], None]) -> None:
        """Run monitors one after the other until stopped, pausing after each death.

        A plain loop rather than a retry library: it never gives up, and its pause must end
        at once when `stop()` is called.
        """
        while not self._stopping.is_set():
            try:
                self._watch(callback)
            except (OSError, LookupError, ValueError, VswitchError) as error:
                log.warning("port monitor of %s failed: %s", self._switch.database, error)
            if self._stopping.wait(self._pause):
                return
            log.info("restarting the port monitor of %s", self._switch.database)

    def _watch(self, callback: Callable[[PortEvent], None]) -> None:
        """One monitor process: report its changes until its output ends.

        Its first line is compared with every port reported so far, so a port that went or
        came while no monitor ran is reported now. Without `snapshot`, the first table ever
        read only tells the watcher what exists.
        """
        process = self._spawn()
        if process is None:
            return
        try:
            self._rows = {}
            first = True
            for update in _updates(_lines(process)):
                quiet = update.initial and not self._caught_up and not self._snapshot
                touched = set(update.rows) | (set(self._reported) if first else set())
                self._apply(update)
                for event in self._settle(touched):
                    if not quiet:
                        _deliver(callback, event)
                first = False
                self._caught_up = True
        finally:
            _end(process)

    def _spawn(self) -> subprocess.Popen[str] | None:
        """Start a monitor, unless the watcher is stopping (then None)."""
        argv = [
            "sh",
            "-c",
            _WATCHDOG,
            "sh",
            "-vfatal_signal:off",  # its end by SIGTERM at stop() is no news
            "--format=json",
            "monitor",
            self._switch.database,
            "Open_vSwitch",
            "Interface",
            COLUMNS,
        ]
        with self._lock:
            if self._stopping.is_set():
                return None
            self._process = subprocess.Popen(
                argv,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                env=self._switch.environ(),
                start_new_session=True,
            )
            return self._process

    def _apply(self, update: _Update) -> None:
        """Bring the mirror of the table up to date with one update."""
        if update.initial:
            self._rows = {}
        for uuid, row in update.rows.items():
            if row is None:
                self._rows.pop(uuid, None)
            else:
                self._rows[uuid] = row

    def _settle(self, uuids: Iterable[str]) -> Iterator[PortEvent]:
        """The events that make the reported ports of `uuids` match the table's rows.

        Removals come first, before the bridges are read: a failed read (which restarts
        the monitor) must not lose them.
        """
        wanted: list[tuple[str, _Row, int]] = []
        for uuid in sorted(uuids):
            row = self._rows.get(uuid)
            known = self._reported.get(uuid)
            if known is not None and not _still(known, row):
                del self._reported[uuid]
                yield replace(known, kind="removed")
            if uuid not in self._reported and row is not None and row.port is not None:
                wanted.append((uuid, row, row.port))
        if wanted:
            bridges = self._switch.interface_bridges()
            for uuid, row, port in wanted:
                if uuid in bridges:
                    event = PortEvent(
                        "added", bridges[uuid], row.name, port, row.mac, dict(row.external_ids)
                    )
                    self._reported[uuid] = event
                    yield event


def lab_port_watcher(*, snapshot: bool = True, pause: float = PAUSE) -> PortWatcher:
    """A watcher of the lab's private switch."""
    access = switch_access()
    return PortWatcher(env=access.env, db=access.db, snapshot=snapshot, pause=pause)


def _lines(process: subprocess.Popen[str]) -> Iterator[str]:
    """The monitor's output lines; its own messages (not JSON) are logged on the way."""
    if process.stdout is None:
        return
    for line in process.stdout:
        if line.startswith("{"):
            yield line
        elif line.strip():
            log.warning("ovsdb-client: %s", line.strip())


def _updates(lines: Iterable[str]) -> Iterator[_Update]:
    """Each JSON table of `ovsdb-client --format=json monitor` as the rows it changes.

    A modified row comes as an `old` line (the changed columns before) followed by a `new`
    one with every column and an empty `row`; the `new` one is what counts.
    """
    for line in lines:
        table: dict[str, Any] = json.loads(line)
        headings: list[str] = table["headings"]
        rows: dict[str, _Row | None] = {}
        initial = False
        uuid = ""
        for cells in table["data"]:
            cell = dict(zip(headings, cells, strict=True))
            action = cell["action"]
            initial |= action == "initial"
            if action != "new":
                uuid = cell["row"]
            if action != "old":
                rows[uuid] = None if action == "delete" else _row(cell)
        yield _Update(rows, initial)


def _row(cell: dict[str, Any]) -> _Row:
    """The columns of one monitor row; `ofport` is `["set", []]` until the switch numbers it."""
    ofport = cell["ofport"]
    _, pairs = cell["external_ids"]
    return _Row(
        name=cell["name"],
        ofport=ofport if isinstance(ofport, int) else None,
        external_ids={key: value for key, value in pairs},
    )


def _still(known: PortEvent, row: _Row | None) -> bool:
    """Whether a reported port is still there, under the same name, number and MAC."""
    return row is not None and (row.name, row.port, row.mac) == (
        known.name,
        known.ofport,
        known.mac,
    )


def _deliver(callback: Callable[[PortEvent], None], event: PortEvent) -> None:
    """Call back with one event; a failing callback must not stop the watching."""
    try:
        callback(event)
    except Exception:
        log.exception("port event %s not handled", event)


def _end(process: subprocess.Popen[str]) -> None:
    """Close the monitor's pipe (its watchdog then ends it) and reap it; kill it if stuck."""
    if process.stdin is not None and not process.stdin.closed:
        process.stdin.close()
    try:
        process.wait(timeout=STOP_WAIT)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    if process.stdout is not None:
        process.stdout.close()
