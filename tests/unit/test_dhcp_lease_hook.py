"""The lease hook: what it sends for each dnsmasq call, that it stays cheap, never fails."""

from __future__ import annotations

import json
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


def test_main_exits_zero_when_the_controller_is_down(tmp_path: Path) -> None:
    nobody = str(tmp_path / "nobody.sock")
    argv = ["--socket", nobody, "--network", "n", "--", "add", MAC, "1.2.3.4"]
    assert lease_hook.main(argv) == 0


def test_main_exits_zero_on_a_stale_socket(tmp_path: Path) -> None:
    path = tmp_path / "stale.sock"
    socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM).bind(str(path))
    argv = ["--socket", str(path), "--network", "n", "--", "add", MAC, "1.2.3.4"]
    assert lease_hook.main(argv) == 0


def test_generated_wrapper_runs_the_hook_from_this_interpreter(
    tmp_path: Path, receiver: tuple[Path, socket.socket]
) -> None:
    path, sock = receiver
    wrapper = tmp_path / "hook"
    wrapper.write_text(hook_script(sys.executable, path, "net1"))
    wrapper.chmod(0o755)
    done = subprocess.run(
        [str(wrapper), "add", MAC, "10.77.0.7", "vm7"], env={}, capture_output=True, check=False
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(sock.recv(65536))["address"] == "10.77.0.7"


def test_hook_imports_only_the_standard_library(tmp_path: Path) -> None:
    done = subprocess.run(
        [
            *(sys.executable, "-X", "importtime", "-I", "-S", lease_hook.__file__),
            *("--socket", str(tmp_path / "x.sock"), "--network", "n", "--", "old", MAC, "1.2.3.4"),
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    imported = {line.split("|")[-1].strip() for line in done.stderr.splitlines()[1:]}
    heavy = {"httpx", "sqlalchemy", "pydantic", "vmfabric", "fastapi", "site"}
    assert not imported & heavy
