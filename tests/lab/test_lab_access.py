"""The lab end of the access path (issue 7): every started lab VM runs the guest proxy on a unix
socket in its directory, and with `VMFABRIC_LAB_SERVICES=web,ssh` a web server and an sshd on
its 127.0.0.1 (root).

`Channel` below is a host end in miniature: the shared protocol `Session` over the VM's access
socket, with a local TCP listener whose connections are spliced to streams, so that the real
`ssh` client logs in to the VM's sshd through the channel. The VM's network is down meanwhile
(`nic-down`): the channel does not use it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
from collections import defaultdict
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from test_lab_lifecycle import assert_nothing_left, lab_pids

from vmfabric.access.channel import Role
from vmfabric.access.session import (
    DataReceived,
    Established,
    Event,
    Session,
    Settings,
    StreamAccepted,
    StreamEnded,
)
from vmfabric.domain.model import NicSpec, VmSpec
from vmfabric.hypervisor.lab import LabHypervisor
from vmfabric.lab import faults, lifecycle, proc, services
from vmfabric.lab.errors import LabInputError
from vmfabric.lab.netns import NETNS_DIR, netns_pids
from vmfabric.lab.state import LabStore, ProcessRecord, VmRecord
from vmfabric.lab.testing import (
    Snapshot,
    boot,
    lab_names,
    lab_network,
    state_dir_env,
    temporary_lab,
    wait_for_ipv4,
)

pytestmark = [
    pytest.mark.lab,
    pytest.mark.anyio,
    pytest.mark.skipif(os.geteuid() != 0, reason="the lab needs root"),
]

APP, PEER = "10.82.0.10", "10.82.0.11"
READ_SIZE = 64 * 1024
WAIT = 10.0
CONNECT = """\
import socket, sys
try:
    socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=2).close()
    print("connected")
except OSError as error:
    print(type(error).__name__)
"""
"""Run in a VM: tries a TCP connection, prints how it went."""


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def lab(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Two hosts; VMs `app` and `peer` on hv1 with their leases, serving web and ssh."""
    monkeypatch.setenv(services.SERVICES_ENV, "web,ssh")
    with temporary_lab(hosts=2) as root:
        network, placement = lab_network("acc", "10.82.0.0/24", vlan=82)
        boot(network, placement, {"app": ("hv1", APP), "peer": ("hv1", PEER)})
        assert wait_for_ipv4("app") == APP
        assert wait_for_ipv4("peer") == PEER
        yield root


class Channel:
    """The host end of one VM's access channel: streams to the VM's 127.0.0.1 ports."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.session = Session(Role.HOST, Settings(software="vmfabric-lab-test"))
        self._reader = reader
        self._writer = writer
        self._events: defaultdict[int, asyncio.Queue[Event]] = defaultdict(asyncio.Queue)
        self._established = asyncio.Event()
        self._reading = asyncio.get_running_loop().create_task(self._read())

    async def _read(self) -> None:
        """Hand each stream its events; when the guest proxy goes, every stream is over."""
        while data := await self._reader.read(READ_SIZE):
            for event in self.session.receive(data):
                if isinstance(event, Established):
                    self._established.set()
                elif isinstance(stream := getattr(event, "stream", None), int):
                    self._events[stream].put_nowait(event)
            self._flush()
        for events in self._events.values():
            events.put_nowait(Event())

    def _flush(self) -> None:
        self._writer.writelines(self.session.data_to_send(1 << 40))

    def close(self) -> None:
        self._reading.cancel()
        self._writer.close()

    async def open(self, port: int) -> int:
        """A stream to the VM's 127.0.0.1:`port`, once the guest proxy connected it."""
        stream = self.session.open_stream(port)
        self._flush()
        answer = await asyncio.wait_for(self._events[stream].get(), WAIT)
        assert isinstance(answer, StreamAccepted), answer
        return stream

    def send(self, stream: int, data: bytes) -> None:
        self.session.send(stream, data)
        self._flush()

    def end(self, stream: int) -> None:
        self.session.close(stream)
        self._flush()

    async def received(self, stream: int) -> AsyncIterator[bytes]:
        """What the server sends, until it ends the stream; a reset raises."""
        while True:
            event = await asyncio.wait_for(self._events[stream].get(), WAIT)
            if isinstance(event, StreamEnded):
                return
            if not isinstance(event, DataReceived):
                raise ConnectionResetError(str(event))
            self.session.consumed(stream, len(event.data))
            self._flush()
            yield event.data

    async def exchange(self, port: int, request: bytes) -> bytes:
        """Send `request` to 127.0.0.1:`port` in the VM, half-close, read the whole answer."""
        stream = await self.open(port)
        self.send(stream, request)
        self.end(stream)
        return b"".join([data async for data in self.received(stream)])

    @contextlib.asynccontextmanager
    async def forwarding(self, port: int) -> AsyncIterator[int]:
        """A listener on this machine's loopback whose connections go to `port` in the VM;
        its port."""
        server = await asyncio.start_server(
            lambda reader, writer: self._splice(port, reader, writer), "127.0.0.1", 0
        )
        async with server:
            yield server.sockets[0].getsockname()[1]

    async def _splice(
        self, port: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        stream = await self.open(port)

        async def upstream() -> None:
            while data := await reader.read(READ_SIZE):
                self.send(stream, data)
            self.end(stream)

        sending = asyncio.get_running_loop().create_task(upstream())
        try:
            async for data in self.received(stream):
                writer.write(data)
                await writer.drain()
            writer.write_eof()
            await sending
        except ConnectionResetError:
            sending.cancel()
        writer.close()

    @classmethod
    @contextlib.asynccontextmanager
    async def to(cls, socket_path: str) -> AsyncIterator[Channel]:
        reader, writer = await asyncio.open_unix_connection(socket_path)
        channel = cls(reader, writer)
        channel.session.start()
        channel._flush()
        try:
            await asyncio.wait_for(channel._established.wait(), WAIT)
            yield channel
        finally:
            channel.close()


def access_socket(vm: str, host: str = "hv1") -> str:
    path = LabHypervisor(host).access_socket(vm)
    assert path is not None
    return path


def vm_record(name: str) -> VmRecord:
    return next(vm for vm in LabStore().read().vms.values() if vm.name == name)


def service_processes(vm: str) -> dict[str, ProcessRecord]:
    """The VM's service processes in the lab's record, by service."""
    record, processes = vm_record(vm), LabStore().read().processes
    every = (services.ACCESS, *services.OPTIONAL)
    names = {service: services.service_name(record, service) for service in every}
    return {service: processes[name] for service, name in names.items() if name in processes}


def in_namespace(pid: int, netns: str) -> bool:
    return os.stat(f"/proc/{pid}/ns/net").st_ino == (NETNS_DIR / netns).stat().st_ino


def live_pids(vm: str) -> dict[str, int | None]:
    return {service: proc.live_pid(p) for service, p in service_processes(vm).items()}


def get(path: str = "/") -> bytes:
    return f"GET {path} HTTP/1.0\r\nHost: vm\r\n\r\n".encode()


async def page(socket_path: str) -> bytes:
    """The VM's index page, through a channel of its own."""
    async with Channel.to(socket_path) as channel:
        return await channel.exchange(80, get())


def lab_cli(*args: str) -> dict[str, object]:
    command = [sys.executable, "-m", "vmfabric.cli.lab", *args, "--json"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    document = json.loads(done.stdout)
    assert isinstance(document, dict)
    return document


async def ssh(channel: Channel, command: str) -> str:
    """`command` run by the real ssh client in the VM through the channel, as root with the
    lab's key; its output."""
    async with channel.forwarding(22) as port:
        client = await asyncio.create_subprocess_exec(
            *("ssh", "-i", str(services.lab_key_path()), "-p", str(port)),
            *("-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null"),
            *("-o", "BatchMode=yes", "-o", "LogLevel=ERROR", "root@127.0.0.1", command),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(client.communicate(), 30)
    assert client.returncode == 0, err.decode()
    return out.decode()


def connect_from(vm: str, address: str, port: int) -> str:
    done = lifecycle.run_in_vm(vm, [sys.executable, "-c", CONNECT, address, str(port)])
    return done.stdout.strip()


async def test_a_vm_serves_its_page_and_ssh_over_the_channel_with_its_network_down(
    lab: Path,
) -> None:
    app = vm_record("app")
    running = service_processes("app")
    assert set(running) == {"access", "web", "ssh"}
    for process in running.values():
        pid = proc.live_pid(process)
        assert pid is not None and in_namespace(pid, app.netns)
    assert running["access"].argv[:3] == ["/usr/bin/python3", "-I", "-S"]
    assert running["access"].argv[-2:] == ["--allow", "22,80,5432"]
    assert access_socket("app") == str(Path(app.directory) / "access.sock")

    listening = lifecycle.run_in_vm("app", ["ss", "-Hltn"]).stdout.split("\n")
    assert sorted(line.split()[3] for line in listening if line) == [
        "127.0.0.1:22",
        "127.0.0.1:80",
    ]
    refused = "ConnectionRefusedError"
    assert connect_from("peer", APP, 22) == connect_from("peer", APP, 80) == refused

    faults.inject("app", "nic-down")
    (services.web_root(app) / "added.txt").write_text("added by the test\n")
    async with Channel.to(access_socket("app")) as channel:
        answer = await channel.exchange(80, get())
        assert answer.startswith(b"HTTP/1.0 200 OK")
        assert b"lab VM app" in answer
        added = await channel.exchange(80, get("/added.txt"))
        assert added.endswith(b"\r\n\r\nadded by the test\n")
        assert await ssh(channel, "ip netns identify; id -u") == f"{app.netns}\n0\n"
        link = await ssh(channel, "ip -br link show eth0")
        assert link.split()[1] == "DOWN"


async def test_access_down_stops_the_guest_proxy_until_healed(lab: Path) -> None:
    path = access_socket("app")
    made = lab_cli("fault", "app", "access-down")
    assert (made["kind"], made["faults"]) == ("access-down", ["access-down"])
    assert "access" not in service_processes("app")
    assert not Path(path).exists()
    with pytest.raises((FileNotFoundError, ConnectionRefusedError)):
        await page(path)
    assert b"lab VM peer" in await page(access_socket("peer"))

    LabHypervisor("hv1").stop("app")
    LabHypervisor("hv1").start("app")
    assert "access" not in service_processes("app"), "the fault holds until healed"

    assert lab_cli("heal", "app")["healed"] == ["access-down"]
    assert b"lab VM app" in await page(path)


async def test_the_services_stop_and_start_with_the_vm(lab: Path) -> None:
    before = service_processes("app")
    LabHypervisor("hv1").stop("app")
    assert service_processes("app") == {}
    assert not any(proc.is_alive(process) for process in before.values())
    assert not Path(access_socket("app")).exists()

    LabHypervisor("hv1").start("app")
    assert set(service_processes("app")) == {"access", "web", "ssh"}
    async with Channel.to(access_socket("app")) as channel:
        assert b"lab VM app" in await channel.exchange(80, get())
        assert await ssh(channel, "echo back") == "back\n"


async def test_the_services_run_on_through_a_migration(lab: Path) -> None:
    path, pids = access_socket("app"), live_pids("app")
    async with Channel.to(path) as channel:
        LabHypervisor("hv1").migrate("app", "hv2", None)
        assert b"lab VM app" in await channel.exchange(80, get())
    assert live_pids("app") == pids
    assert LabHypervisor("hv1").access_socket("app") is None
    assert access_socket("app", "hv2") == path
    async with Channel.to(path) as channel:
        assert await ssh(channel, "ip netns identify") == f"{vm_record('app').netns}\n"

    LabHypervisor("hv2").stop("app")
    assert service_processes("app") == {}


async def test_lab_down_leaves_nothing_even_with_an_ssh_session_open(lab: Path) -> None:
    before = Snapshot.take()
    async with Channel.to(access_socket("app")) as channel:
        session = asyncio.get_running_loop().create_task(ssh(channel, "sleep 600"))
        await asyncio.wait_for(running_in("app", ["sleep", "600"]), WAIT)
        recorded = LabStore().read()
        names, pids = lab_names(recorded), lab_pids(recorded)
        lifecycle.down()
        with pytest.raises(AssertionError):
            await session
    assert_nothing_left(before, names, pids, lab)


async def running_in(vm: str, argv: list[str]) -> None:
    """Wait until a process with `argv` lives in the VM's namespace."""
    netns = vm_record(vm).netns
    while argv not in [proc.command_line(pid) for pid in netns_pids(netns)]:
        await asyncio.sleep(0.05)


def test_without_services_a_vm_runs_only_the_guest_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(services.SERVICES_ENV, raising=False)
    with temporary_lab(hosts=1):
        LabHypervisor("hv1").define(VmSpec("bare", "img", (NicSpec("none", "vmf-hv1", 5),)))
        LabHypervisor("hv1").start("bare")
        assert set(service_processes("bare")) == {"access"}
        assert lifecycle.status()["services"] == []
        assert not services.lab_key_path().exists()
        assert lifecycle.run_in_vm("bare", ["ss", "-Hltn"]).stdout == ""


def test_unknown_services_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(services.SERVICES_ENV, "web,ftp")
    with state_dir_env(), pytest.raises(LabInputError, match="names ftp; the lab's VM services"):
        lifecycle.up(1, controller=False)
