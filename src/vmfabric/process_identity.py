"""Naming a process so that another process can tell later whether it still runs.

A PID alone can be reused; the PID with the process's start time (from /proc) cannot.
Used to mark in-progress work in the database and to stop only processes we started.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

_STATE_FIELD = 0  # field 3 of /proc/PID/stat, counted after the ")" that ends comm
_STARTTIME_FIELD = 19  # field 22


def start_time(pid: int) -> int | None:
    """When `pid` started, in clock ticks since boot; None when it is gone or a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()
    if fields[_STATE_FIELD] in {"Z", "X"}:
        return None
    return int(fields[_STARTTIME_FIELD])


def is_same_process(pid: int, started: int) -> bool:
    """True when `pid` is still the process that started at `started`."""
    return start_time(pid) == started


def current_owner() -> str:
    """`host:pid:start` of this process."""
    pid = os.getpid()
    return f"{socket.gethostname()}:{pid}:{start_time(pid)}"


def owner_alive(owner: str) -> bool | None:
    """Whether the process named by `current_owner()` runs: None if it is on another machine."""
    host, _, rest = owner.partition(":")
    if host != socket.gethostname():
        return None
    pid, _, started = rest.partition(":")
    return pid.isdigit() and started.isdigit() and is_same_process(int(pid), int(started))
