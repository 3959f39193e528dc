"""The lease event listener survives garbage; the lease file reads back as current leases."""

from __future__ import annotations

import contextlib
import json
import random
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vmfabric.dhcp.lease_events import (
    LeaseEventListener,
    parse_event,
    parse_lease_file,
    read_lease_file,
)
from vmfabric.domain.model import LeaseAction, LeaseEvent

MAC = "52:54:00:12:34:56"
VALID = {
    "network": "net1",
    "action": "add",
    "mac": MAC,
    "address": "10.77.0.5",
    "hostname": "vm1",
    "expires": 1700000000,
}


def wait_for(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def send(path: Path, payload: bytes) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.sendto(payload, str(path))


def test_parse_event_accepts_the_hook_format() -> None:
    event = parse_event(json.dumps(VALID).encode())
    assert event == LeaseEvent("net1", LeaseAction.ADD, MAC, "10.77.0.5", "vm1", 1700000000)


@pytest.mark.parametrize(
    "change",
    [
        {"action": "init"},
        {"address": "10.77.0.999"},
        {"mac": ""},
        {"network": 5},
        {"expires": "soon"},
        {"expires": True},
        {"hostname": 7},
    ],
)
def test_parse_event_rejects_wrong_fields(change: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        parse_event(json.dumps(VALID | change).encode())


@given(st.binary(max_size=300))
def test_parse_event_raises_only_value_error_on_bytes(data: bytes) -> None:
    with contextlib.suppress(ValueError):
        parse_event(data)


@given(st.recursive(st.none() | st.booleans() | st.integers() | st.text(), st.lists))
def test_parse_event_raises_only_value_error_on_json(value: object) -> None:
    with contextlib.suppress(ValueError):
        parse_event(json.dumps(value).encode())


def test_listener_survives_garbage_and_delivers_valid_events(tmp_path: Path) -> None:
    path = tmp_path / "run" / "events.sock"
    received: list[LeaseEvent] = []
    rng = random.Random(7)
    garbage = [rng.randbytes(rng.randrange(0, 2000)) for _ in range(500)]
    garbage += [b"", b"{}", b"[]", b"null", b'{"action": "add"}', b"[" * 100_000]
    with LeaseEventListener(path, received.append) as listener:
        for index, junk in enumerate(garbage):
            send(path, junk)
            if index % 100 == 99:
                send(path, json.dumps(VALID | {"address": f"10.77.1.{index // 100}"}).encode())
        wait_for(lambda: listener.received == len(garbage) + 5)
        wait_for(lambda: len(received) == 5)
        assert listener.malformed == len(garbage)
    assert [e.address for e in received] == [f"10.77.1.{i}" for i in range(5)]
    assert not path.exists()


def test_failing_callback_does_not_stop_the_listener(tmp_path: Path) -> None:
    path = tmp_path / "events.sock"
    seen: list[str] = []

    def callback(event: LeaseEvent) -> None:
        seen.append(event.address)
        if len(seen) == 1:
            raise RuntimeError("boom")

    with LeaseEventListener(path, callback) as listener:
        send(path, json.dumps(VALID).encode())
        send(path, json.dumps(VALID | {"address": "10.77.0.6"}).encode())
        wait_for(lambda: len(seen) == 2)
        assert listener.callback_errors == 1


def test_slow_callback_does_not_block_senders(tmp_path: Path) -> None:
    path = tmp_path / "events.sock"
    release = threading.Event()
    seen: list[LeaseEvent] = []

    def callback(event: LeaseEvent) -> None:
        release.wait(10)
        seen.append(event)

    with LeaseEventListener(path, callback):
        started = time.monotonic()
        for _ in range(200):
            send(path, json.dumps(VALID).encode())
        assert time.monotonic() - started < 2
        release.set()
        wait_for(lambda: len(seen) == 200)


def test_listener_replaces_a_stale_socket_but_not_a_file(tmp_path: Path) -> None:
    stale = tmp_path / "stale.sock"
    socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM).bind(str(stale))
    with LeaseEventListener(stale, lambda e: None):
        pass
    regular = tmp_path / "file"
    regular.write_text("x")
    with pytest.raises(FileExistsError):
        LeaseEventListener(regular, lambda e: None).start()


LEASES = """\
1700003600 52:54:00:00:00:01 10.77.0.5 vm1 01:52:54:00:00:00:01
1600000000 52:54:00:00:00:02 10.77.0.6 vm2 *
0 52:54:00:00:00:03 10.77.0.7 * *
duid 00:01:00:01:2c:3d:4e:5f:0a:0b:0c:0d:0e:0f
1700003600 1234 fd00::5 vm1 00:03:00:01:52:54:00:00:00:01
1700003600 T99 fd00::6 * 00:02:00:00:ab:11:01
1700003600 52:54:00:00:00:04 not-an-address vm4 *
soon 52:54:00:00:00:04 10.77.0.8 vm4 *
broken line
"""


def test_parse_lease_file_keeps_current_leases() -> None:
    events = parse_lease_file(LEASES, "net1", now=1700000000)
    assert [(e.mac, e.address, e.hostname, e.expires) for e in events] == [
        ("52:54:00:00:00:01", "10.77.0.5", "vm1", 1700003600),
        ("52:54:00:00:00:03", "10.77.0.7", None, 0),
        ("52:54:00:00:00:01", "fd00::5", "vm1", 1700003600),
        ("00:02:00:00:ab:11:01", "fd00::6", None, 1700003600),
    ]
    assert {(e.network, e.action) for e in events} == {("net1", LeaseAction.OLD)}


def test_read_lease_file(tmp_path: Path) -> None:
    path = tmp_path / "leases"
    path.write_text(LEASES)
    events = read_lease_file(path, "net1", now=1700000000)
    first = LeaseEvent("net1", LeaseAction.OLD, "52:54:00:00:00:01", "10.77.0.5", "vm1", 1700003600)
    assert events[0] == first
    assert read_lease_file(tmp_path / "missing", "net1") == []
