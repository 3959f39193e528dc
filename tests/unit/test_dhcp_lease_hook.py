"""The lease hook: what it sends for each dnsmasq call, that it stays cheap, never fails."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from vmfabric.dhcp import lease_hook
from vmfabric.dhcp.dnsmasq import hook_script
from vmfabric.dhcp.lease_events import parse_event
from vmfabric.domain.model import LeaseAction

MAC = "52:54:00:12:34:56"


@pytest.fixture
def receiver(tmp_path: Path) -> Iterator[tuple[Path, socket.socket]]:
    path = tmp_path / "events.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        sock.settimeout(10)
        yield path, sock


def test_ipv4_event_carries_the_lease_event_fields() -> None:
    env = {"DNSMASQ_LEASE_EXPIRES": "1700000000"}
    event = lease_hook.build_event("net1", ["add", MAC.upper(), "10.77.0.5", "vm1"], env)
    assert event == {
        "network": "net1",
        "action": "add",
        "mac": MAC,
        "address": "10.77.0.5",
        "hostname": "vm1",
        "expires": 1700000000,
    }


def test_missing_hostname_and_expiry_are_null() -> None:
    event = lease_hook.build_event("net1", ["del", MAC, "10.77.0.5"], {})
    assert event["hostname"] is None
    assert event["expires"] is None


def test_ipv6_event_uses_the_mac_rather_than_the_duid() -> None:
    duid = "00:01:00:01:2c:3d:4e:5f:" + MAC
    from_env = lease_hook.build_event("n", ["old", duid, "fd00::5"], {"DNSMASQ_MAC": MAC})
    from_duid = lease_hook.build_event("n", ["old", duid, "fd00::5"], {})
    assert from_env["mac"] == from_duid["mac"] == MAC


@pytest.mark.parametrize(
    ("duid", "mac"),
    [
        ("00:01:00:01:2c:3d:4e:5f:52:54:00:12:34:56", MAC),
        ("00:03:00:01:52:54:00:12:34:56", MAC),
        ("00:02:00:00:ab:11:01:02:03:04", None),
        ("garbage", None),
    ],
)
def test_mac_from_duid(duid: str, mac: str | None) -> None:
    assert lease_hook.mac_from_duid(duid) == mac


@pytest.mark.parametrize(
    "args", [["init"], ["tftp", "1024", "10.0.0.1", "/srv/f"], ["arp-add", MAC, "10.0.0.1"], []]
)
def test_other_actions_are_not_reported(args: list[str]) -> None:
    with pytest.raises(ValueError):
        lease_hook.build_event("n", args, {})


def test_unparseable_expiry_is_dropped() -> None:
    assert lease_hook.lease_expiry({"DNSMASQ_LEASE_EXPIRES": "soon"}) is None


def test_main_sends_one_datagram_the_listener_accepts(
    receiver: tuple[Path, socket.socket],
) -> None:
    path, sock = receiver
    argv = ["--socket", str(path), "--network", "net1", "--", "old", MAC, "10.77.0.9", "vm9"]
    assert lease_hook.main(argv) == 0
    event = parse_event(sock.recv(65536))
    assert (event.action, event.mac, event.address) == (LeaseAction.OLD, MAC, "10.77.0.9")


def test_main_says_when_the_controller_is_down(tmp_path: Path) -> None:
    nobody = str(tmp_path / "nobody.sock")
    argv = ["--socket", nobody, "--network", "n", "--", "add", MAC, "1.2.3.4"]
    assert lease_hook.main(argv) == os.EX_TEMPFAIL


def test_main_says_when_the_socket_is_stale(tmp_path: Path) -> None:
    path = tmp_path / "stale.sock"
    socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM).bind(str(path))
    argv = ["--socket", str(path), "--network", "n", "--", "add", MAC, "1.2.3.4"]
    assert lease_hook.main(argv) == os.EX_TEMPFAIL


def test_main_ignores_what_is_not_a_lease_change(tmp_path: Path) -> None:
    argv = ["--socket", str(tmp_path / "nobody.sock"), "--network", "n", "--", "init"]
    assert lease_hook.main(argv) == 0


@pytest.fixture
def wrapper(tmp_path: Path, receiver: tuple[Path, socket.socket]) -> Path:
    """The generated lease script, as dnsmasq would run it."""
    path = tmp_path / "hook"
    delivered = tmp_path / "delivered"
    delivered.mkdir()
    path.write_text(hook_script(sys.executable, receiver[0], "net1", delivered))
    path.chmod(0o755)
    return path


def run_wrapper(wrapper: Path, *args: str, expires: str = "1700000000") -> None:
    """Run the wrapper to its end: whatever it sends is in the socket's queue afterwards."""
    env = {"DNSMASQ_LEASE_EXPIRES": expires}
    done = subprocess.run([str(wrapper), *args], env=env, capture_output=True, check=False)
    assert (done.returncode, done.stderr) == (0, b"")


def sent(sock: socket.socket) -> list[tuple[str, str]]:
    """(action, address) of every datagram waiting in the socket."""
    sock.setblocking(False)
    received = []
    while True:
        try:
            event = json.loads(sock.recv(65536))
        except BlockingIOError:
            return received
        received.append((event["action"], event["address"]))


def test_wrapper_runs_the_hook_from_this_interpreter(
    wrapper: Path, receiver: tuple[Path, socket.socket]
) -> None:
    run_wrapper(wrapper, "add", MAC, "10.77.0.7", "vm7")
    assert sent(receiver[1]) == [("add", "10.77.0.7")]


def test_wrapper_drops_replays_of_what_it_delivered(
    wrapper: Path, receiver: tuple[Path, socket.socket]
) -> None:
    run_wrapper(wrapper, "add", MAC, "10.77.0.7", "vm7")
    run_wrapper(wrapper, "old", MAC, "10.77.0.7", "vm7")
    run_wrapper(wrapper, "old", MAC, "10.77.0.7", "vm7", expires="1700000600")
    run_wrapper(wrapper, "old", MAC, "10.77.0.7", "vm7", expires="1700000600")
    run_wrapper(wrapper, "del", MAC, "10.77.0.7", "vm7", expires="1700000600")
    run_wrapper(wrapper, "old", MAC, "10.77.0.7", "vm7", expires="1700000600")
    assert sent(receiver[1]) == [
        ("add", "10.77.0.7"),
        ("old", "10.77.0.7"),
        ("del", "10.77.0.7"),
        ("old", "10.77.0.7"),
    ]


def test_wrapper_replays_what_the_controller_missed(
    wrapper: Path, receiver: tuple[Path, socket.socket], tmp_path: Path
) -> None:
    path, sock = receiver
    sock.close()
    path.unlink()
    run_wrapper(wrapper, "old", MAC, "10.77.0.7", "vm7")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as restarted:
        restarted.bind(str(path))
        run_wrapper(wrapper, "old", MAC, "10.77.0.7", "vm7")
        run_wrapper(wrapper, "old", MAC, "10.77.0.7", "vm7")
        assert sent(restarted) == [("old", "10.77.0.7")]


def test_hook_imports_only_the_standard_library(tmp_path: Path) -> None:
    done = subprocess.run(
        [
            *(sys.executable, "-X", "importtime", "-I", "-S", lease_hook.__file__),
            *("--socket", str(tmp_path / "x.sock"), "--network", "n", "--", "old", MAC, "1.2.3.4"),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == os.EX_TEMPFAIL, done.stderr
    imported = {line.split("|")[-1].strip() for line in done.stderr.splitlines()[1:]}
    heavy = {"httpx", "sqlalchemy", "pydantic", "vmfabric", "fastapi", "site"}
    assert not imported & heavy
