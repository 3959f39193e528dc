"""The lab's private Open vSwitch: its own ovsdb-server and ovs-vswitchd, userspace datapath.

Both daemons keep their database, sockets, pidfiles and logs under `$VMFABRIC_STATE/lab/ovs`,
so the lab never touches a system Open vSwitch. Other modules reach the switch through
`switch_access()` (for example to install OpenFlow rules with ovs-ofctl).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from vmfabric.lab import proc
from vmfabric.lab.errors import LabError
from vmfabric.lab.netns import link_exists
from vmfabric.lab.proc import is_alive, live_pid, log_tail, run
from vmfabric.lab.state import LabState, ProcessRecord, Record, lab_dir
from vmfabric.process_identity import start_time

SCHEMA = Path("/usr/share/openvswitch/vswitch.ovsschema")
OVSDB = "vmf-ovsdb-server"
VSWITCHD = "vmf-ovs-vswitchd"
DATAPATH_TAP = "ovs-netdev"  # the netdev datapath's own tap; OVS gives it this fixed name
MAX_SOCKET_PATH = 107


@dataclass(frozen=True)
class OvsPaths:
    """Where the private switch keeps its files."""

    root: Path = field(default_factory=lambda: lab_dir() / "ovs")

    @property
    def rundir(self) -> Path:
        """Sockets and pidfiles."""
        return self.root / "run"

    @property
    def dbdir(self) -> Path:
        """The database file."""
        return self.root / "db"

    @property
    def logdir(self) -> Path:
        """Daemon logs."""
        return self.root / "log"

    @property
    def db_file(self) -> Path:
        """The OVSDB database."""
        return self.dbdir / "conf.db"

    @property
    def db_socket(self) -> Path:
        """The database's unix socket, which ovs-vsctl and ovs-vswitchd connect to."""
        return self.rundir / "db.sock"


@dataclass(frozen=True)
class SwitchAccess:
    """What another module needs to run ovs-vsctl, ovs-ofctl or ovs-appctl on the lab switch.

    ovs-ofctl finds a bridge's socket (`<bridge>.mgmt`) and ovs-appctl a daemon's control
    socket through `OVS_RUNDIR`; ovs-vsctl gets the database explicitly.
    """

    env: dict[str, str]
    db: str

    def environ(self) -> dict[str, str]:
        """The current environment with the lab switch's directories."""
        return {**os.environ, **self.env}

    def command(self, tool: str, *args: str) -> list[str]:
        """The command line of `tool` (ovs-vsctl, ovs-ofctl, ovs-appctl) for the lab switch."""
        if tool == "ovs-vsctl":
            return [tool, f"--db={self.db}", "--timeout=10", *args]
        return [tool, *args]

    def run(self, tool: str, *args: str) -> str:
        """Run `tool` on the lab switch and return its output (CommandError on failure)."""
        return run(self.command(tool, *args), env=self.environ()).stdout


def switch_access(paths: OvsPaths | None = None) -> SwitchAccess:
    """How to reach the lab switch from any process that shares `VMFABRIC_STATE`."""
    paths = paths or OvsPaths()
    env = {
        "OVS_RUNDIR": str(paths.rundir),
        "OVS_DBDIR": str(paths.dbdir),
        "OVS_LOGDIR": str(paths.logdir),
    }
    return SwitchAccess(env=env, db=f"unix:{paths.db_socket}")


def vsctl(*args: str) -> str:
    """Run ovs-vsctl on the lab switch."""
    return switch_access().run("ovs-vsctl", *args)


def is_running(state: LabState) -> bool:
    """Whether both daemons of the lab switch run."""
    daemons = [state.processes.get(name) for name in (OVSDB, VSWITCHD)]
    return all(daemon is not None and is_alive(daemon) for daemon in daemons)


def start(record: Record, paths: OvsPaths | None = None) -> None:
    """Start whichever daemon is not running; the database survives, so bridges come back."""
    paths = paths or OvsPaths()
    _check_socket_path(paths)
    for directory in (paths.rundir, paths.dbdir, paths.logdir):
        directory.mkdir(parents=True, exist_ok=True)
    if not paths.db_file.exists():
        run(["ovsdb-tool", "create", str(paths.db_file), str(SCHEMA)])
    _start_daemon(record, OVSDB, _ovsdb_argv(paths), paths)
    vsctl("--no-wait", "init")
    _start_daemon(record, VSWITCHD, _vswitchd_argv(paths), paths)


def stop(record: Record) -> None:
    """Remove the recorded bridges (and their taps), then end both daemons."""
    state = record.state
    if is_running(state):
        for bridge in reversed(state.bridges):
            vsctl("--if-exists", "del-br", bridge)
            record.forget_bridge(bridge)
    for name in (VSWITCHD, OVSDB):
        process = state.processes.get(name)
        if process is not None:
            proc.stop(process)
            record.forget_process(name)
    for tap in [*state.bridges, *state.datapath_taps]:
        _delete_tap(tap)
    state.bridges.clear()
    state.datapath_taps.clear()
    record.save()


def add_bridge(record: Record, name: str) -> None:
    """A userspace-datapath bridge (idempotent)."""
    if DATAPATH_TAP not in record.state.datapath_taps and not link_exists(DATAPATH_TAP):
        record.state.datapath_taps.append(DATAPATH_TAP)
    record.remember_bridge(name)
    vsctl("--may-exist", "add-br", name, "--", "set", "bridge", name, "datapath_type=netdev")


PEER_VLAN = 4095
"""The access VLAN of every peer link. 802.1Q reserves it, so no network has it (networks use
1-4094): the switch's NORMAL forwarding never sends a network's frame, flooded or learned, to
a peer link. What a peer link brings in untagged lands in this VLAN, which host uplinks do not
trunk and which other peer links share only as protected ports (no traffic between them), so
NORMAL never sends it anywhere either; a tagged frame on an access port is dropped. OpenFlow
rules ignore all of this: `output:<peer link>` sends the frame as it is."""

UPLINK_VLANS = f"0-{PEER_VLAN - 1}"
"""The VLANs a host uplink trunks: all but the peer links' one."""


def add_uplink(bridge: str, port: str, fabric: str, fabric_port: str) -> None:
    """Join a host bridge to the fabric bridge by patch ports: a trunk of every VLAN but
    `PEER_VLAN` (settings are re-applied to an existing pair)."""
    vsctl(
        *_patch_port(bridge, port, fabric_port, port_columns=[f"trunks={UPLINK_VLANS}"]),
        "--",
        *_patch_port(fabric, fabric_port, port),
    )


@dataclass(frozen=True)
class PeerEnd:
    """One end of a peer link: its port on `bridge`, marked with the host it leads to."""

    bridge: str
    port: str
    leads_to: str


def add_peer_links(links: Sequence[tuple[PeerEnd, PeerEnd]]) -> None:
    """Make peer links (or re-apply their settings) in one transaction.

    Each end is an access port of `PEER_VLAN`, protected, with `external_ids:vmfabric-peer`
    naming the host it leads to, on its Port and its Interface row alike (the switch driver
    reads either).
    """
    commands: list[str] = []
    for a, b in links:
        commands += ["--", *_peer_port(a, b.port), "--", *_peer_port(b, a.port)]
    if commands:
        vsctl(*commands[1:])


def _peer_port(end: PeerEnd, peer: str) -> list[str]:
    mark = f"external_ids:vmfabric-peer={end.leads_to}"
    return _patch_port(
        end.bridge,
        end.port,
        peer,
        port_columns=[f"tag={PEER_VLAN}", "protected=true", mark],
        interface_columns=[mark],
    )


def _patch_port(
    bridge: str,
    port: str,
    peer: str,
    port_columns: Sequence[str] = (),
    interface_columns: Sequence[str] = (),
) -> list[str]:
    port_settings = ["--", "set", "port", port, *port_columns] if port_columns else []
    return [
        "--may-exist",
        "add-port",
        bridge,
        port,
        "--",
        "set",
        "interface",
        port,
        "type=patch",
        f"options:peer={peer}",
        *interface_columns,
        *port_settings,
    ]


def add_access_port(bridge: str, port: str, vlan: int, mac: str | None = None) -> None:
    """Plug an interface into `bridge` as an access port of `vlan` (re-tagging an old one).

    With a VM NIC's `mac`, the Interface gets `external_ids:attached-mac` as libvirt sets it on
    the taps it plugs, so the switch driver finds a VM's port by its MAC in the lab as well.
    """
    marks = ["--", "set", "interface", port, f'external_ids:attached-mac="{mac}"'] if mac else []
    vsctl("--may-exist", "add-port", bridge, port, "--", "set", "port", port, f"tag={vlan}", *marks)


def delete_port(*ports: str) -> None:
    """Unplug ports in one transaction, without waiting for the daemon (it may be gone)."""
    commands = [arg for port in ports for arg in ("--", "--if-exists", "del-port", port)]
    if commands:
        vsctl("--no-wait", *commands[1:])


def add_flows(bridge: str, flows: Sequence[str]) -> None:
    """Install OpenFlow rules on a lab bridge; a rule of the same match and priority is replaced."""
    for flow in flows:
        switch_access().run("ovs-ofctl", "add-flow", bridge, flow)


def delete_flows(bridge: str, cookie: int) -> None:
    """Remove the rules of a lab bridge that carry exactly `cookie`."""
    switch_access().run("ovs-ofctl", "del-flows", bridge, f"cookie={cookie:#x}/-1")


def database_running(state: LabState) -> bool:
    """Whether ovsdb-server runs, so the database can still be edited."""
    process = state.processes.get(OVSDB)
    return process is not None and is_alive(process)


def _start_daemon(record: Record, name: str, argv: list[str], paths: OvsPaths) -> None:
    known = record.state.processes.get(name)
    if known is not None and is_alive(known):
        return
    pidfile = paths.rundir / f"{argv[0]}.pid"
    log = paths.logdir / f"{argv[0]}.log"
    process = ProcessRecord(name=name, argv=argv, pidfile=str(pidfile), log=str(log))
    record.remember_process(process)
    run(argv, env=switch_access(paths).environ())
    pid = live_pid(process)
    if pid is None:
        raise LabError(f"{argv[0]} did not start; its log ends with:\n{log_tail(log)}")
    record.remember_process(process.model_copy(update={"pid": pid, "start_time": start_time(pid)}))


def _ovsdb_argv(paths: OvsPaths) -> list[str]:
    return [
        "ovsdb-server",
        str(paths.db_file),
        f"--remote=punix:{paths.db_socket}",
        *_daemon_options(paths, "ovsdb-server"),
    ]


def _vswitchd_argv(paths: OvsPaths) -> list[str]:
    return ["ovs-vswitchd", f"unix:{paths.db_socket}", *_daemon_options(paths, "ovs-vswitchd")]


def _daemon_options(paths: OvsPaths, program: str) -> list[str]:
    return [
        f"--pidfile={paths.rundir / f'{program}.pid'}",
        f"--log-file={paths.logdir / f'{program}.log'}",
        "--detach",
        "--no-chdir",
        "-vconsole:off",
    ]


def _check_socket_path(paths: OvsPaths) -> None:
    longest = paths.rundir / "ovs-vswitchd.4194304.ctl"
    if len(str(longest)) > MAX_SOCKET_PATH:
        raise LabError(
            f"VMFABRIC_STATE is too deep for unix sockets ({longest} is longer than "
            f"{MAX_SOCKET_PATH} bytes); choose a shorter state directory"
        )


def _delete_tap(name: str) -> None:
    """Delete a tap OVS left behind when it died before removing its bridges."""
    if Path(f"/sys/class/net/{name}/tun_flags").exists():
        run(["ip", "link", "delete", "dev", name], check=False)
