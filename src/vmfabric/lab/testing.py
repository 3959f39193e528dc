"""Helpers for tests that need a real lab (root): a throw-away lab, a plain DHCP server, pings.

Kept in the package so every part's lab tests build labs the same way.
"""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from vmfabric.domain.model import (
    DhcpPlacement,
    NetworkInfo,
    NetworkKind,
    NicSpec,
    SubnetInfo,
    VmSpec,
)
from vmfabric.hypervisor.lab import LabHypervisor
from vmfabric.lab import lifecycle
from vmfabric.lab.controller import HOSTS_PATH, INFO_PATH
from vmfabric.lab.fabric import LabFabric
from vmfabric.lab.names import host_bridge
from vmfabric.lab.proc import command_line, run, wait_until
from vmfabric.lab.state import LabState, LabStore
from vmfabric.process_identity import start_time


@contextmanager
def state_dir_env() -> Iterator[Path]:
    """A fresh, short `VMFABRIC_STATE` (unix socket paths stay short), removed afterwards."""
    root = Path(tempfile.mkdtemp(prefix="vmf", dir="/tmp"))
    saved = os.environ.get("VMFABRIC_STATE")
    os.environ["VMFABRIC_STATE"] = str(root)
    try:
        yield root
    finally:
        if saved is None:
            os.environ.pop("VMFABRIC_STATE", None)
        else:
            os.environ["VMFABRIC_STATE"] = saved
        shutil.rmtree(root, ignore_errors=True)


@dataclass(frozen=True)
class ControllerLab:
    """A lab with its own controller: where its API, its DNS server and its access gateway
    answer."""

    url: str
    dns_port: int
    gateway_url: str


@contextmanager
def controller_lab(hosts: int = 2, env: dict[str, str] | None = None) -> Iterator[ControllerLab]:
    """A lab whose controller (started by `lab up`, with `env` added to its environment)
    answers its API, DNS and access gateway on free ports of its own (never the defaults,
    which a demo may hold), in its own state directory; `down` runs even on failure. The
    CLI run in this process or its children talks to them."""
    gateway = f"127.0.0.1:{free_port()}"
    lab = ControllerLab(f"http://127.0.0.1:{free_port()}", free_port(), f"http://{gateway}")
    wanted = {
        "VMFABRIC_URL": lab.url,
        "VMFABRIC_DNS_LISTEN": f"127.0.0.1:{lab.dns_port}",
        "VMFABRIC_GATEWAY_LISTEN": gateway,
        "VMFABRIC_GATEWAY_URL": lab.gateway_url,
    }
    wanted |= env or {}
    saved = {name: os.environ.get(name) for name in wanted}
    os.environ.update(wanted)
    try:
        with state_dir_env():
            try:
                lifecycle.up(hosts)
                yield lab
            finally:
                lifecycle.down()
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@contextmanager
def temporary_lab(hosts: int = 2) -> Iterator[Path]:
    """A lab without controller in its own state directory; `down` runs even on failure."""
    with state_dir_env() as root:
        try:
            lifecycle.up(hosts, controller=False)
            yield root
        finally:
            lifecycle.down()


def plain_dnsmasq(placement: DhcpPlacement, cidr: str, gateway: str, hosts: dict[str, str]) -> None:
    """A DHCP server handing `hosts` (MAC → IPv4) out, in the placement's namespace.

    It daemonizes and is not recorded: `lab down` ends it with the namespace.
    """
    network = ipaddress.ip_network(cidr)
    files = LabStore().root.parent / f"dnsmasq-{placement.netns}"
    files.mkdir(parents=True, exist_ok=True)
    argv = [
        "dnsmasq",
        "--conf-file=/dev/null",
        "--user=root",
        "--group=root",
        "--port=0",
        "--bind-interfaces",
        f"--interface={placement.interface}",
        f"--dhcp-range={network.network_address},static,{network.netmask}",
        f"--dhcp-option=option:router,{gateway}",
        f"--pid-file={files / 'pid'}",
        f"--dhcp-leasefile={files / 'leases'}",
        *(f"--dhcp-host={mac},{ip}" for mac, ip in hosts.items()),
    ]
    run(argv, netns=placement.netns)


def lab_network(
    name: str, cidr: str, vlan: int, kind: NetworkKind = NetworkKind.INTERNAL
) -> tuple[NetworkInfo, DhcpPlacement]:
    """A network with one subnet (gateway .1, DHCP server .2), built by the lab fabric."""
    hosts = ipaddress.ip_network(cidr).hosts()
    gateway, server = str(next(hosts)), str(next(hosts))
    network = NetworkInfo(name, kind, vlan, (SubnetInfo(cidr, gateway, server),))
    return network, LabFabric().ensure_network(network)


def boot(network: NetworkInfo, placement: DhcpPlacement, vms: dict[str, tuple[str, str]]) -> None:
    """Define VMs (name → (host, IPv4)) on `network`, serve their IPs by DHCP, start them."""
    macs = {}
    for vm, (host, _) in vms.items():
        nic = NicSpec(network.name, host_bridge(host), network.vlan)
        macs[vm] = LabHypervisor(host).define(VmSpec(vm, "debian12", (nic,))).macs[0]
    subnet = network.subnets[0]
    if subnet.gateway is None:
        raise ValueError(f"network {network.name} needs a gateway to boot VMs on it")
    plain_dnsmasq(
        placement, subnet.cidr, subnet.gateway, {macs[vm]: ip for vm, (_, ip) in vms.items()}
    )
    for vm, (host, _) in vms.items():
        LabHypervisor(host).start(vm)


def vm_ipv4(vm: str, ifname: str = "eth0") -> str | None:
    """The VM's IPv4 address on `ifname`, once DHCP gave it one."""
    done = lifecycle.run_in_vm(vm, ["ip", "-j", "-4", "addr", "show", "dev", ifname])
    if done.returncode != 0:
        return None
    infos = [info for entry in json.loads(done.stdout) for info in entry["addr_info"]]
    return next((str(info["local"]) for info in infos if info.get("scope") == "global"), None)


def wait_for_ipv4(vm: str, timeout: float = 10.0, ifname: str = "eth0") -> str | None:
    """Wait until the VM's DHCP client applied a lease; the address or None."""
    wait_until(lambda: vm_ipv4(vm, ifname) is not None, timeout, interval=0.05)
    return vm_ipv4(vm, ifname)


def dig_short(port: int, *query: str) -> set[str]:
    """The answer lines of `dig +short` asking 127.0.0.1:`port` (once, waiting up to a
    second); dig's own comments (such as a timeout) are left out."""
    done = subprocess.run(
        ["dig", "@127.0.0.1", "-p", str(port), "+short", "+time=1", "+tries=1", *query],
        capture_output=True,
        text=True,
        timeout=10,
        check=False,
    )
    return {line for line in done.stdout.splitlines() if line and not line.startswith(";")}


def pings(vm: str, address: str) -> bool:
    """Whether one ping from the VM to `address` is answered within a second."""
    done = lifecycle.run_in_vm(vm, ["busybox", "ping", "-c", "1", "-W", "1", address])
    return done.returncode == 0


def agent_call(socket_path: str, command: str, arguments: dict[str, Any] | None = None) -> Any:
    """One QEMU guest agent command over its unix socket; the `return` value."""
    request: dict[str, Any] = {"execute": command}
    if arguments is not None:
        request["arguments"] = arguments
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(5.0)
        sock.connect(socket_path)
        sock.sendall(json.dumps(request).encode() + b"\n")
        reply = sock.makefile("rb").readline()
    return json.loads(reply)["return"]


@dataclass(frozen=True)
class Snapshot:
    """Namespaces, links of the machine's namespace and live processes, at one moment."""

    namespaces: frozenset[str]
    links: frozenset[str]
    processes: frozenset[tuple[int, int]]

    @classmethod
    def take(cls) -> Snapshot:
        """Look at the machine now."""
        netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True)
        links = json.loads(run(["ip", "-j", "link", "show"]).stdout)
        return cls(
            namespaces=frozenset(line.split()[0] for line in netns.stdout.splitlines() if line),
            links=frozenset(link["ifname"] for link in links),
            processes=frozenset(_live_processes()),
        )


def _live_processes() -> Iterator[tuple[int, int]]:
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            started = start_time(int(entry.name))
            if started is not None:
                yield int(entry.name), started


def lab_names(state: LabState) -> set[str]:
    """Every namespace and interface name a lab record mentions."""
    names = set(state.namespaces) | set(state.bridges) | set(state.datapath_taps)
    for link in state.links.values():
        names |= {link.name, link.peer}
    return names


def processes_mentioning(text: str) -> list[int]:
    """Live processes whose command line contains `text` (e.g. a lab's state directory)."""
    return [
        pid
        for pid, _ in _live_processes()
        if pid != os.getpid() and any(text in arg for arg in command_line(pid))
    ]


class _FakeServer(ThreadingHTTPServer):
    lab: bool
    hosts: list[str]


class _FakeApi(BaseHTTPRequestHandler):
    """Just enough of the controller's API for `lab up`: info and host registration."""

    server: _FakeServer

    def do_GET(self) -> None:
        if self.path == INFO_PATH:
            self._answer(200, {"name": "vmfabric", "lab": self.server.lab})
        else:
            self._answer(404, {"detail": "not found"})

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length", "0"))
        body = json.loads(self.rfile.read(length) or b"{}")
        if self.path != HOSTS_PATH:
            self._answer(404, {"detail": "not found"})
        elif body.get("name") in self.server.hosts:
            self._answer(409, {"detail": f"host {body['name']} exists"})
        else:
            self.server.hosts.append(body["name"])
            print(f"registered {json.dumps(body, sort_keys=True)}", flush=True)
            self._answer(201, body)

    def _answer(self, status: int, document: object) -> None:
        data = json.dumps(document).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: object) -> None:
        """Keep test output quiet."""


class FakeController:
    """A stand-in controller on 127.0.0.1, in a thread, for tests of `lab up` without the API."""

    def __init__(self, lab: bool = True) -> None:
        self._server = _FakeServer(("127.0.0.1", 0), _FakeApi)
        self._server.lab = lab
        self._server.hosts = []
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        """Where it answers."""
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    @property
    def hosts(self) -> list[str]:
        """Names registered so far."""
        return list(self._server.hosts)

    def __enter__(self) -> FakeController:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()


def free_port() -> int:
    """A TCP port nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _serve_fake_controller(listen: str) -> None:
    host, _, port = listen.rpartition(":")
    server = _FakeServer((host, int(port)), _FakeApi)
    server.lab, server.hosts = True, []
    server.serve_forever()


if __name__ == "__main__":
    _serve_fake_controller(sys.argv[-1])


class WebhookReceiver(ThreadingHTTPServer):
    """A webhook receiver on loopback: answers each POST with the next of `statuses` (then
    200) and keeps the headers and body of every request, in order."""

    def __init__(self, statuses: list[int] | None = None) -> None:
        super().__init__(("127.0.0.1", 0), _WebhookHandler)
        self.statuses = list(statuses or [])
        self.received: list[tuple[dict[str, str], bytes]] = []
        self._thread = threading.Thread(target=self.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        """Where it takes webhooks."""
        return f"http://127.0.0.1:{self.server_address[1]}/hook"

    def documents(self) -> list[Any]:
        """The JSON bodies received so far."""
        return [json.loads(body) for _, body in self.received]

    def __enter__(self) -> WebhookReceiver:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()
        self.server_close()


class _WebhookHandler(BaseHTTPRequestHandler):
    server: WebhookReceiver

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.server.received.append((dict(self.headers), body))
        status = self.server.statuses.pop(0) if self.server.statuses else 200
        self.send_response(status)
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        """Quiet: tests look at `received`."""


NAMED = shutil.which("named") or "/usr/sbin/named"
"""BIND 9's server, which tests and benchmarks compare with or use as a secondary."""


def named_conf(root: Path, port: int, *, options: str = "", rest: str = "") -> str:
    """named.conf of a BIND 9 of a test's own: on 127.0.0.1 `port` only, every file in `root`,
    no recursion, no NOTIFY of its own; `options` go into its options block, `rest` after it
    (keys, logging, zones)."""
    return f"""
options {{
    directory "{root}";
    pid-file "{root}/named.pid";
    session-keyfile "{root}/session.key";
    managed-keys-directory "{root}";
    listen-on port {port} {{ 127.0.0.1; }};
    listen-on-v6 {{ none; }};
    recursion no;
    dnssec-validation no;
    notify no;
{options}
}};
controls {{ }};
{rest}
"""
