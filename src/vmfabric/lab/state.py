"""The lab's record: every namespace, bridge, link and process it made, on disk.

Several processes change it (the CLI's `lab up`/`lab down`, the controller running the lab
drivers), so every change happens under an exclusive `flock` and is written atomically (temp
file + rename). Readers that only look (status) read without the lock. The lock is re-entrant
within a process: a thread holding it may open nested edits, other threads wait.
"""

from __future__ import annotations

import fcntl
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

from pydantic import BaseModel, BeforeValidator, Field, PlainSerializer, ValidationError

from vmfabric.config import state_dir
from vmfabric.lab.errors import LabError


class ProcessRecord(BaseModel):
    """A process the lab started. `pid` with `start_time` names it; a reused pid never matches.

    Daemons that fork write `pidfile`; a pid read from it counts only when that process's
    command line still names the same pidfile.
    """

    name: str
    argv: list[str]
    netns: str | None = None
    pid: int | None = None
    start_time: int | None = None
    pidfile: str | None = None
    log: str | None = None


class LinkRecord(BaseModel):
    """A veth pair: `name` lives in `netns` (None: the machine's own), `peer` in `peer_netns`."""

    name: str
    peer: str
    peer_netns: str
    netns: str | None = None
    owner: str = ""


class NicRecord(BaseModel):
    """One NIC of a lab VM: `ifname` in the VM's namespace, `port` on `bridge`."""

    network: str
    bridge: str
    vlan: int
    mac: str
    ifname: str
    port: str


HexCookie = Annotated[
    int,
    BeforeValidator(lambda value: int(value, 16) if isinstance(value, str) else value),
    PlainSerializer(lambda value: f"{value:#x}", return_type=str),
]
"""An OpenFlow cookie, written in hex as `ovs-ofctl dump-flows` prints it."""


class FlowRecord(BaseModel):
    """OpenFlow `rules` (ovs-ofctl syntax) on `bridge`, all with `cookie`, which removes them."""

    bridge: str
    cookie: HexCookie
    rules: list[str] = Field(default_factory=list)


class FaultRecord(BaseModel):
    """A fault injected into a VM (`vmfabric.lab.faults`): what healing it must undo.

    `flows` are its switch rules, `processes` the names (in `LabState.processes`) of what it
    started, `links` the VM's interfaces it set down.
    """

    kind: str
    flows: list[FlowRecord] = Field(default_factory=list)
    processes: list[str] = Field(default_factory=list)
    links: list[str] = Field(default_factory=list)


class MigrationRecord(BaseModel):
    """A move of a VM to `host` under way (`vmfabric.lab.migration`): its NICs as they are on
    the destination, each VM end under its temporary name until the switch-over."""

    host: str
    nics: list[NicRecord] = Field(default_factory=list)


class VmRecord(BaseModel):
    """A lab VM. `defined` turns true only once every part exists; `faults` by kind.

    `netns` and `directory` are named after the host the VM was defined on and stay with it
    when it migrates: look them up here, never recompute them from `host`.
    """

    name: str
    host: str
    image: str
    netns: str
    directory: str
    nics: list[NicRecord] = Field(default_factory=list)
    memory_mib: int = 512
    vcpus: int = 1
    defined: bool = False
    running: bool = False
    faults: dict[str, FaultRecord] = Field(default_factory=dict)
    migration: MigrationRecord | None = None

    @property
    def key(self) -> str:
        """Where the record keeps it: a VM may exist on two hosts at once."""
        return vm_key(self.host, self.name)


class SubnetRecord(BaseModel):
    """A subnet as the lab built it."""

    cidr: str
    gateway: str | None = None
    dhcp_server: str | None = None


class NetworkRecord(BaseModel):
    """A network's router and DHCP namespaces, and its transit link when external."""

    name: str
    kind: str
    vlan: int
    router_netns: str
    dhcp_netns: str
    router_port: str
    dhcp_port: str
    subnets: list[SubnetRecord] = Field(default_factory=list)
    transit: int | None = None


class PeerLinkRecord(BaseModel):
    """A patch-port pair joining two host bridges that only OpenFlow rules use, the lab's
    stand-in for a tunnel between two hosts: `port` on `host`'s bridge, `peer_port` on
    `peer_host`'s."""

    host: str
    port: str
    peer_host: str
    peer_port: str


class LabState(BaseModel):
    """Everything the lab made, for `down` to remove and `status` to show."""

    version: int = 1
    hosts: list[str] = Field(default_factory=list)
    bridges: list[str] = Field(default_factory=list)
    namespaces: list[str] = Field(default_factory=list)
    links: dict[str, LinkRecord] = Field(default_factory=dict)
    processes: dict[str, ProcessRecord] = Field(default_factory=dict)
    vms: dict[str, VmRecord] = Field(default_factory=dict)
    networks: dict[str, NetworkRecord] = Field(default_factory=dict)
    peer_links: dict[str, PeerLinkRecord] = Field(default_factory=dict)
    datapath_taps: list[str] = Field(default_factory=list)
    services: list[str] = Field(default_factory=list)
    """What every VM serves besides the guest proxy (`vmfabric.lab.services`), set at `up`:
    kept here so that every process starting lab VMs (the controller) does the same."""


def vm_key(host: str, vm: str) -> str:
    """Key of a VM in `LabState.vms`."""
    return f"{host}/{vm}"


def lab_dir() -> Path:
    """Where everything the lab makes on disk lives."""
    return state_dir() / "lab"


class Record:
    """The state being edited under the lock; every `remember_*`/`forget_*` is saved at once."""

    def __init__(self, path: Path, state: LabState) -> None:
        self.path = path
        self.state = state

    def save(self) -> None:
        """Write atomically, so a reader or a crash never sees half a file."""
        temp = self.path.with_name(f".{self.path.name}.{os.getpid()}.{threading.get_ident()}")
        with temp.open("w") as out:
            out.write(self.state.model_dump_json(indent=2))
            out.flush()
            os.fsync(out.fileno())
        temp.replace(self.path)

    def remember_namespace(self, name: str) -> None:
        """Record a namespace about to be made."""
        _append_once(self.state.namespaces, name)
        self.save()

    def forget_namespace(self, name: str) -> None:
        """Drop a namespace that is gone."""
        _remove_if_present(self.state.namespaces, name)
        self.save()

    def remember_bridge(self, name: str) -> None:
        """Record an OVS bridge about to be made."""
        _append_once(self.state.bridges, name)
        self.save()

    def forget_bridge(self, name: str) -> None:
        """Drop a bridge that is gone."""
        _remove_if_present(self.state.bridges, name)
        self.save()

    def remember_link(self, link: LinkRecord) -> None:
        """Record a veth pair about to be made."""
        self.state.links[link.name] = link
        self.save()

    def forget_link(self, name: str) -> None:
        """Drop a veth pair that is gone."""
        self.state.links.pop(name, None)
        self.save()

    def remember_process(self, process: ProcessRecord) -> None:
        """Record a process about to start, or fill in its pid once started."""
        self.state.processes[process.name] = process
        self.save()

    def forget_process(self, name: str) -> None:
        """Drop a process that has ended."""
        self.state.processes.pop(name, None)
        self.save()

    def rename_process(self, old: str, new: str) -> None:
        """Record a running process under another name (a migrated VM's, named by its host)."""
        process = self.state.processes.pop(old, None)
        if process is not None:
            self.state.processes[new] = process.model_copy(update={"name": new})
        self.save()

    def remember_peer_links(self, links: list[PeerLinkRecord]) -> None:
        """Record peer links about to be made (up to 2016 of them: saved once)."""
        self.state.peer_links.update((link.port, link) for link in links)
        self.save()

    def forget_peer_link(self, port: str) -> None:
        """Drop a peer link that is gone."""
        self.state.peer_links.pop(port, None)
        self.save()

    def remember_vm(self, vm: VmRecord) -> None:
        """Record or update a VM."""
        self.state.vms[vm.key] = vm
        self.save()

    def forget_vm(self, key: str) -> None:
        """Drop a VM whose parts are all gone."""
        self.state.vms.pop(key, None)
        self.save()

    def remember_network(self, network: NetworkRecord) -> None:
        """Record or update a network."""
        self.state.networks[network.name] = network
        self.save()

    def forget_network(self, name: str) -> None:
        """Drop a network whose parts are all gone."""
        self.state.networks.pop(name, None)
        self.save()


@dataclass
class _Holder:
    """The lock of one record within this process: who holds it and how deeply."""

    mutex: threading.RLock = field(default_factory=threading.RLock)
    depth: int = 0
    fd: int = -1
    record: Record | None = None


_holders: dict[str, _Holder] = {}
_holders_guard = threading.Lock()


class LabStore:
    """The record of one lab (the one under `$VMFABRIC_STATE/lab` unless told otherwise)."""

    def __init__(self, root: Path | None = None) -> None:
        self.root = root if root is not None else lab_dir()
        self.path = self.root / "state.json"
        self.lock_path = self.root / "state.lock"

    def read(self) -> LabState:
        """The state as last written; an empty one when the lab has never been up."""
        try:
            return LabState.model_validate_json(self.path.read_text())
        except FileNotFoundError:
            return LabState()
        except ValidationError as err:
            raise LabError(f"the lab's record {self.path} is unreadable: {err}") from err

    @contextmanager
    def edit(self) -> Iterator[Record]:
        """Hold the lock and hand out the current state for changes."""
        with _holders_guard:
            holder = _holders.setdefault(str(self.lock_path), _Holder())
        with holder.mutex:
            if holder.record is None:
                holder.fd = _lock(self.root, self.lock_path)
                try:
                    holder.record = Record(self.path, self.read())
                except BaseException:
                    os.close(holder.fd)
                    raise
            record = holder.record
            holder.depth += 1
            try:
                yield record
            finally:
                holder.depth -= 1
                if holder.depth == 0:
                    holder.record = None
                    os.close(holder.fd)


def _lock(root: Path, lock_path: Path) -> int:
    """Take the flock, retrying when `down` removed the file while we waited for it."""
    while True:
        root.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            if os.stat(lock_path).st_ino == os.fstat(fd).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)


def _append_once(items: list[str], item: str) -> None:
    if item not in items:
        items.append(item)


def _remove_if_present(items: list[str], item: str) -> None:
    if item in items:
        items.remove(item)
