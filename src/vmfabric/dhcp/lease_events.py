"""Lease events from dnsmasq, live (the lease hook's datagrams) and at rest (the lease file).

The listener runs two daemon threads rather than an asyncio endpoint so that it serves a
synchronous agent as well as an asyncio one: a receiver that only drains the socket (the kernel
queues few unix datagrams, and a full queue would stall dnsmasq's one-at-a-time lease script)
and a dispatcher that calls the callback, so a slow callback delays events but never drops them.
An asyncio caller hands events over with `loop.call_soon_threadsafe` in its callback.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import logging
import os
import queue
import socket
import stat
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from vmfabric.dhcp.lease_hook import mac_from_duid
from vmfabric.domain.model import LeaseAction, LeaseEvent

log = logging.getLogger(__name__)

MAX_DATAGRAM = 65536
MALFORMED_LOG_INTERVAL_S = 10.0
SETTLE_TRIES = 10
SETTLE_PAUSE_S = 0.005

_STOP = object()

T = TypeVar("T")


def _optional(data: dict[str, object], key: str, kind: type[T]) -> T | None:
    value = data.get(key)
    if value is None:
        return None
    if not isinstance(value, kind) or isinstance(value, bool):
        raise ValueError(f"{key} must be {kind.__name__} or null")
    return value


def _required_str(data: dict[str, object], key: str) -> str:
    value = data.get(key)
    if not isinstance(value, str) or not value:
        raise ValueError(f"{key} must be a non-empty string")
    return value


def parse_event(datagram: bytes) -> LeaseEvent:
    """Validate a hook datagram; anything on the socket may be garbage, so raise ValueError."""
    try:
        data = json.loads(datagram)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise ValueError(f"not JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ValueError("not a JSON object")
    address = _required_str(data, "address")
    ipaddress.ip_address(address)
    return LeaseEvent(
        network=_required_str(data, "network"),
        action=LeaseAction(_required_str(data, "action")),
        mac=_required_str(data, "mac"),
        address=address,
        hostname=_optional(data, "hostname", str),
        expires=_optional(data, "expires", int),
    )


def _star(value: str) -> str | None:
    return None if value == "*" else value


def _parse_lease_line(line: str, network: str) -> LeaseEvent | None:
    fields = line.split()
    if len(fields) < 4 or fields[0] == "duid":
        return None
    expires, client, address, hostname = fields[:4]
    if ":" in address:
        duid = _star(fields[4]) if len(fields) > 4 else None
        client = (duid and mac_from_duid(duid)) or duid or client
    try:
        ipaddress.ip_address(address)
        return LeaseEvent(
            network, LeaseAction.OLD, client.lower(), address, _star(hostname), int(expires)
        )
    except ValueError:
        return None


def parse_lease_file(text: str, network: str, now: float | None = None) -> list[LeaseEvent]:
    """Leases still valid at `now`, as the `old` events dnsmasq itself sends for them at start.

    Expiry 0 means never; dnsmasq prunes expired leases lazily, so the file may hold some.
    IPv4 lines are `EXPIRES MAC ADDRESS HOSTNAME CLIENT-ID`; IPv6 ones put the IAID where the
    MAC goes and the client's DUID last, so their MAC comes from the DUID when it holds one.
    """
    cutoff = time.time() if now is None else now
    events = (_parse_lease_line(line, network) for line in text.splitlines())
    return [e for e in events if e is not None and (e.expires == 0 or (e.expires or 0) > cutoff)]


def _read_settled(path: Path) -> str:
    """dnsmasq truncates its lease file and rewrites it in place: read until two reads agree.

    An empty file is believed only once it stayed empty for all the tries (50 ms): between
    truncating and writing, a dnsmasq preempted on a busy machine shows an empty file for
    several milliseconds, and taking that for "no leases" skipped or wrongly confirmed a
    release.
    """
    previous = None
    for _ in range(SETTLE_TRIES):
        text = path.read_text(errors="replace")
        if text and text == previous:
            break
        previous = text
        time.sleep(SETTLE_PAUSE_S)
    return text


def read_lease_file(path: Path | str, network: str, now: float | None = None) -> list[LeaseEvent]:
    """The network's current leases, so a restarted controller can catch up on missed events."""
    try:
        text = _read_settled(Path(path))
    except FileNotFoundError:
        return []
    return parse_lease_file(text, network, now)


class LeaseEventListener:
    """Receives the lease hook's datagrams and hands each valid event to `callback`."""

    def __init__(self, socket_path: Path | str, callback: Callable[[LeaseEvent], None]) -> None:
        self.socket_path = Path(socket_path)
        self.callback = callback
        self.received = 0
        self.malformed = 0
        self.callback_errors = 0
        self._sock: socket.socket | None = None
        self._queue: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._closing = False
        self._last_malformed_log = 0.0

    def start(self) -> None:
        """Bind the socket (replacing a stale one left by a killed controller) and start."""
        self.socket_path.parent.mkdir(parents=True, exist_ok=True)
        self._remove_stale_socket()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(str(self.socket_path))
        os.chmod(self.socket_path, 0o600)
        self._sock = sock
        self._threads = [
            threading.Thread(target=self._receive, name="vmfabric-lease-rx", daemon=True),
            threading.Thread(target=self._dispatch, name="vmfabric-lease-cb", daemon=True),
        ]
        for thread in self._threads:
            thread.start()

    def close(self) -> None:
        """Stop receiving; events already received are still delivered before this returns."""
        if self._sock is None:
            return
        self._closing = True
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        for thread in self._threads:
            thread.join(timeout=5)
        self._sock.close()
        self._sock = None
        with contextlib.suppress(FileNotFoundError):
            self.socket_path.unlink()

    def __enter__(self) -> LeaseEventListener:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _remove_stale_socket(self) -> None:
        try:
            mode = self.socket_path.lstat().st_mode
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(mode):
            raise FileExistsError(f"{self.socket_path} exists and is not a socket")
        self.socket_path.unlink()

    def _receive(self) -> None:
        assert self._sock is not None
        while True:
            try:
                datagram = self._sock.recv(MAX_DATAGRAM)
            except OSError:
                if self._closing:
                    break
                log.exception("lease socket receive failed")
                continue
            if self._closing:
                break
            self._accept(datagram)
        self._queue.put(_STOP)

    def _accept(self, datagram: bytes) -> None:
        self.received += 1
        try:
            event = parse_event(datagram)
        except ValueError as exc:
            self._count_malformed(exc)
            return
        self._queue.put(event)

    def _count_malformed(self, exc: ValueError) -> None:
        self.malformed += 1
        now = time.monotonic()
        if now - self._last_malformed_log >= MALFORMED_LOG_INTERVAL_S:
            self._last_malformed_log = now
            log.warning("ignored malformed lease datagram (%d so far): %s", self.malformed, exc)

    def _dispatch(self) -> None:
        while (item := self._queue.get()) is not _STOP:
            assert isinstance(item, LeaseEvent)
            try:
                self.callback(item)
            except Exception:
                self.callback_errors += 1
                log.exception("lease event callback failed for %s", item)
