"""What a started lab VM serves besides its DHCP clients: the access channel's guest proxy and,
when the lab is asked for them, a web server and an sshd (issue 7).

- `access`, in every started VM: the guest proxy (`vmfabric.access.guest_proxy`) as a guest
  runs it, the one-file zipapp the lab builds into its directory, run by the system's
  `/usr/bin/python3 -I -S` (no site-packages, no environment: nothing of the project's venv),
  listening on `access.sock` in the VM's directory and letting the host reach ports 22, 80
  and 5432. It needs no network: it is how the host reaches a VM whose network is down.
- `web`: the standard library's `http.server` on the VM's 127.0.0.1:80, serving `www/` of the
  VM's directory (an `index.html` naming the VM; tests add files).
- `ssh`: OpenSSH's `sshd` on the VM's 127.0.0.1:22 with a configuration, host key and pidfile
  in the VM's directory, letting in root with the lab's key (`vmf-lab-key` in the lab's
  directory), which `ssh -i` takes.

`web` and `ssh` run only when the lab's record lists them, set at `lab up` from
`VMFABRIC_LAB_SERVICES` (`web,ssh`; `lab demo` asks for both): they take the VM's
127.0.0.1:80 and :22, where tests and operators run servers of their own on 0.0.0.0, and a
Python process each costs more than lab tests with dozens of VMs should pay.

The processes are named after the VM's namespace, `vmf-access.<host>.<vm>` for the host the VM
was defined on: a migration keeps the namespace and the directory, so they run on through a
move and their names stay true.
"""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from vmfabric.access.bundle import build_guest_proxy
from vmfabric.lab import proc
from vmfabric.lab.errors import LabError, LabInputError
from vmfabric.lab.state import ProcessRecord, Record, VmRecord, lab_dir

ACCESS, WEB, SSH = "access", "web", "ssh"
OPTIONAL = (WEB, SSH)
SERVICES_ENV = "VMFABRIC_LAB_SERVICES"
"""At `lab up`: which of `OPTIONAL` every VM of the lab runs (comma-separated; empty: none)."""

ACCESS_FAULT = "access-down"
"""The fault (`vmfabric.lab.faults`) that holds a VM's guest proxy stopped until healed."""

ACCESS_PORTS = "22,80,5432"
ACCESS_SOCKET = "access.sock"
LONGEST_SOCKET = f"{ACCESS_SOCKET}.{2**22}"
"""The guest proxy binds `<socket>.<pid>` before renaming it into place; pids stay below 2**22."""

WEB_PORT = 80
SSH_PORT = 22
SYSTEM_PYTHON = "/usr/bin/python3"
SSHD = "/usr/sbin/sshd"
PRIVSEP_DIR = Path("/run/sshd")
"""sshd's privilege separation directory (compiled in). The system's ssh service makes it when
it starts; the lab makes it when it is missing and leaves it, as it is the system's."""

READY_TIMEOUT = 5.0
READY_POLL = 0.005
LOOPBACK = f"{int.from_bytes(socket.inet_aton('127.0.0.1'), sys.byteorder):08X}"
"""127.0.0.1 as /proc/net/tcp prints it."""
TCP_LISTEN = "0A"


@dataclass(frozen=True)
class Launch:
    """A service about to start: its process, and when it serves (given the started record)."""

    what: str
    process: ProcessRecord
    ready: Callable[[ProcessRecord], bool]


Starting = list[tuple[Launch, ProcessRecord]]
"""Services spawned and not yet waited for, each with its started process."""


def requested_services() -> list[str] | None:
    """The optional services `VMFABRIC_LAB_SERVICES` names; None when it is not set."""
    text = os.environ.get(SERVICES_ENV)
    if text is None:
        return None
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = sorted(set(names) - set(OPTIONAL))
    if unknown:
        raise LabInputError(
            f"{SERVICES_ENV} names {', '.join(unknown)}; the lab's VM services are "
            f"{', '.join(OPTIONAL)}"
        )
    return [name for name in OPTIONAL if name in names]


def service_name(vm: VmRecord, service: str) -> str:
    """The name of the VM's `service` process in the lab's record (see the module's doc)."""
    return f"vmf-{service}.{vm.netns.partition('.')[2]}"


def vm_access_socket(vm: VmRecord) -> Path:
    """The guest proxy's socket, in the VM's directory (which a migration keeps)."""
    return Path(vm.directory) / ACCESS_SOCKET


def web_root(vm: VmRecord) -> Path:
    """What the VM's web server serves."""
    return Path(vm.directory) / "www"


def guest_proxy_path() -> Path:
    """The guest proxy zipapp every lab VM runs."""
    return lab_dir() / "vmfabric-guest-proxy"


def install_guest_proxy() -> None:
    """Build the zipapp from this source tree (at every `lab up`, so it is never stale)."""
    build_guest_proxy(guest_proxy_path())


def lab_key_path() -> Path:
    """The private half of the key that logs in to every lab VM's sshd as root."""
    return lab_dir() / "vmf-lab-key"


def authorized_keys_path() -> Path:
    """The file every lab VM's sshd reads the keys it lets in from."""
    return lab_dir() / "authorized_keys"


def ensure_lab_key() -> Path:
    """Make the lab's key pair once per lab, and `authorized_keys` hold its public half; the
    private key's path."""
    key = lab_key_path()
    _keygen(key, "vmfabric-lab")
    public = key.with_name(f"{key.name}.pub").read_text()
    authorized = authorized_keys_path()
    if not authorized.exists() or authorized.read_text() != public:
        authorized.write_text(public)
    return key


def spawn_services(record: Record, vm: VmRecord) -> Starting:
    """Spawn what the VM serves and is not running, without waiting: a Python service takes
    60-100 ms to serve, which the rest of a VM's start can overlap. `wait_serving` waits.

    The guest proxy stays stopped while the VM has the `access-down` fault.
    """
    wanted = [*([] if ACCESS_FAULT in vm.faults else [ACCESS]), *record.state.services]
    return _spawn(record, vm, wanted)


def start_service(record: Record, vm: VmRecord, *services: str) -> None:
    """Start those of `services` that are not running, all at once, and wait until each serves."""
    wait_serving(vm, _spawn(record, vm, services))


def wait_serving(vm: VmRecord, starting: Starting) -> None:
    """Wait until each spawned service serves; a LabError with the end of its log for one that
    does not within `READY_TIMEOUT`."""
    proc.wait_until(
        lambda: all(launch.ready(p) or not proc.is_alive(p) for launch, p in starting),
        timeout=READY_TIMEOUT,
        interval=READY_POLL,
    )
    for launch, process in starting:
        if not launch.ready(process):
            raise LabError(
                f"{launch.what} of VM {vm.name} did not start; its log ends with:\n"
                f"{proc.log_tail(process.log)}"
            )


def stop_services(record: Record, vm: VmRecord) -> None:
    """End every service process of the VM, whichever the lab runs now."""
    stop_service(record, vm, ACCESS, *OPTIONAL)


def stop_service(record: Record, vm: VmRecord, *services: str) -> None:
    """End the VM's `services` the lab started and forget them."""
    for service in services:
        name = service_name(vm, service)
        process = record.state.processes.get(name)
        if process is not None:
            proc.stop(process)
            record.forget_process(name)


def _is_running(record: Record, name: str) -> bool:
    process = record.state.processes.get(name)
    return process is not None and proc.is_alive(process)


def _spawn(record: Record, vm: VmRecord, services: Sequence[str]) -> Starting:
    """Spawn those of `services` that are not running, each recorded before it starts."""
    starting = []
    for service in services:
        if _is_running(record, service_name(vm, service)):
            continue
        launch = _LAUNCHES[service](vm)
        record.remember_process(launch.process)
        started = proc.spawn(launch.process)
        record.remember_process(started)
        starting.append((launch, started))
    return starting


def _process(vm: VmRecord, service: str, argv: list[str], log: str) -> ProcessRecord:
    return ProcessRecord(
        name=service_name(vm, service),
        argv=argv,
        netns=vm.netns,
        log=str(Path(vm.directory) / log),
    )


def _access(vm: VmRecord) -> Launch:
    """The guest proxy on a fresh socket (a killed one leaves its socket behind)."""
    if not guest_proxy_path().exists():
        install_guest_proxy()
    path = vm_access_socket(vm)
    path.unlink(missing_ok=True)
    argv = [SYSTEM_PYTHON, "-I", "-S", str(guest_proxy_path())]
    argv += ["--unix", str(path), "--allow", ACCESS_PORTS]
    return Launch(
        what="the guest proxy",
        process=_process(vm, ACCESS, argv, "access.log"),
        ready=lambda _process: path.exists(),
    )


def _web(vm: VmRecord) -> Launch:
    """http.server on 127.0.0.1:80; `index.html` is written once, so tests may change it."""
    root = web_root(vm)
    root.mkdir(parents=True, exist_ok=True)
    index = root / "index.html"
    if not index.exists():
        index.write_text(
            f"<!doctype html>\n<title>lab VM {vm.name}</title>\n<p>lab VM {vm.name}</p>\n"
        )
    argv = [SYSTEM_PYTHON, "-I", "-S", "-m", "http.server", str(WEB_PORT)]
    argv += ["--bind", "127.0.0.1", "--directory", str(root)]
    return Launch(
        what="the web server",
        process=_process(vm, WEB, argv, "web.log"),
        ready=lambda process: _listens(process, WEB_PORT),
    )


def _ssh(vm: VmRecord) -> Launch:
    """sshd on 127.0.0.1:22, in the foreground (`-D`) so that its pid is the one recorded."""
    if not Path(SSHD).exists():
        raise LabError(f"{SSHD} is missing: install the Debian package openssh-server")
    PRIVSEP_DIR.mkdir(mode=0o755, exist_ok=True)
    directory = Path(vm.directory)
    host_key = directory / "ssh_host_ed25519_key"
    _keygen(host_key, f"vmfabric-lab-{vm.name}")
    config = directory / "sshd_config"
    config.write_text(_sshd_config(directory, host_key, ensure_lab_key()))
    return Launch(
        what="sshd",
        process=_process(vm, SSH, [SSHD, "-D", "-e", "-f", str(config)], "sshd.log"),
        ready=lambda process: _listens(process, SSH_PORT),
    )


def _sshd_config(directory: Path, host_key: Path, lab_key: Path) -> str:
    """Loopback only, key login only, everything of its own in the VM's directory.

    `StrictModes no`: the lab's directory may lie under a world-writable one (/tmp in tests),
    which strict modes refuse for `AuthorizedKeysFile`. `UsePAM no` and no last-login or motd:
    the machine's PAM stack and login records are not the lab's.
    """
    return "\n".join(
        [
            f"# a lab VM's sshd; root logs in with {lab_key}",
            "ListenAddress 127.0.0.1",
            f"Port {SSH_PORT}",
            f"HostKey {host_key}",
            f"PidFile {directory / 'sshd.pid'}",
            f"AuthorizedKeysFile {authorized_keys_path()}",
            "PermitRootLogin prohibit-password",
            "PasswordAuthentication no",
            "KbdInteractiveAuthentication no",
            "UsePAM no",
            "StrictModes no",
            "PrintMotd no",
            "PrintLastLog no",
            "Subsystem sftp internal-sftp",
            "",
        ]
    )


def _keygen(key: Path, comment: str) -> None:
    """An ed25519 key pair at `key` (and `key`.pub) unless it exists; half a pair is redone."""
    public = key.with_name(f"{key.name}.pub")
    if key.exists() and public.exists():
        return
    key.unlink(missing_ok=True)
    public.unlink(missing_ok=True)
    proc.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(key)])


def _listens(process: ProcessRecord, port: int) -> bool:
    """Whether `process` itself holds a socket listening on 127.0.0.1:`port`.

    Read from its own namespace's TCP table and matched by socket inode with its descriptors,
    so neither another process's listener nor the moment before `ip netns exec` entered the
    VM's namespace counts.
    """
    if process.pid is None:
        return False
    try:
        table = Path(f"/proc/{process.pid}/net/tcp").read_text().splitlines()[1:]
        descriptors = list(Path(f"/proc/{process.pid}/fd").iterdir())
    except OSError:
        return False
    sockets = {_link(fd) for fd in descriptors}
    local = f"{LOOPBACK}:{port:04X}"
    return any(
        fields[1] == local and fields[3] == TCP_LISTEN and f"socket:[{fields[9]}]" in sockets
        for fields in (line.split() for line in table)
    )


def _link(descriptor: Path) -> str:
    try:
        return os.readlink(descriptor)
    except OSError:
        return ""


_LAUNCHES: dict[str, Callable[[VmRecord], Launch]] = {ACCESS: _access, WEB: _web, SSH: _ssh}
