"""Running commands and owning processes.

`run` raises a `CommandError` carrying the command and its stderr. Processes are signalled
through a pidfd opened *before* their identity is checked, so a pid that was reused in the
meantime is never hit: a process counts as ours only when its start time (field 22 of
/proc/PID/stat) is the one recorded, or, for a daemon that forked, when its command line
still names the pidfile we gave it.

The init process of this machine does not reap orphans, so an ended daemon may stay a zombie;
zombies count as ended.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from vmfabric.lab.errors import CommandError, LabError
from vmfabric.lab.state import ProcessRecord
from vmfabric.process_identity import start_time

DEFAULT_TIMEOUT = 30.0
STOP_LOOKS = 5


def in_netns(netns: str | None, argv: Sequence[str]) -> list[str]:
    """`argv` as run inside `netns` (or as is for the machine's own namespace)."""
    return ["ip", "netns", "exec", netns, *argv] if netns else list(argv)


def run(
    argv: Sequence[str],
    *,
    netns: str | None = None,
    env: dict[str, str] | None = None,
    check: bool = True,
    timeout: float = DEFAULT_TIMEOUT,
    stdin: str | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run a command to completion, fed `stdin` if given; with `check`, a failure raises a
    readable CommandError."""
    full = in_netns(netns, argv)
    try:
        done = subprocess.run(
            full,
            input=stdin,
            stdin=subprocess.DEVNULL if stdin is None else None,
            capture_output=True,
            text=True,
            env=env,
            timeout=timeout,
            check=False,
        )
    except FileNotFoundError as err:
        raise LabError(f"`{full[0]}` is not installed: {err}") from err
    except subprocess.TimeoutExpired as err:
        raise CommandError(full, -1, f"no answer within {timeout:g} s") from err
    if check and done.returncode != 0:
        raise CommandError(full, done.returncode, done.stderr)
    return done


def command_line(pid: int) -> list[str]:
    """The arguments of `pid`, empty when it is gone."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def spawn(process: ProcessRecord, env: dict[str, str] | None = None) -> ProcessRecord:
    """Start `process` detached (own session, output to its log) and name it by pid + start."""
    log_path = Path(process.log) if process.log else Path(os.devnull)
    with log_path.open("ab") as log:
        child = subprocess.Popen(
            in_netns(process.netns, process.argv),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
    return process.model_copy(update={"pid": child.pid, "start_time": start_time(child.pid)})


def live_pid(process: ProcessRecord) -> int | None:
    """The pid of `process` if it still runs, judged by start time or by its pidfile."""
    if process.pid is not None and _is_recorded(process, process.pid):
        return process.pid
    pid = _pidfile_pid(process)
    if pid is not None and _names_pidfile(process, pid):
        return pid
    return None


def is_alive(process: ProcessRecord) -> bool:
    """Whether `process` still runs."""
    return live_pid(process) is not None


def stop(
    process: ProcessRecord, grace: float = 5.0, first: signal.Signals = signal.SIGTERM
) -> None:
    """End `process` if it is still the one we started: `first`, then SIGKILL after `grace`.

    A daemon killed while starting may not have written its pidfile yet; any process whose
    command line names our pidfile is that daemon (or its detaching parent) and ends too. A
    detaching parent may fork its daemon just after a look for them, so they are looked for
    again until none is left.
    """
    pid = live_pid(process)
    if pid is not None:
        end_pid(pid, lambda p: live_pid(process) == p, grace, first)
    for _look in range(STOP_LOOKS):
        others = _naming_pidfile(process)
        if not others:
            return
        for other in others:
            end_pid(other, lambda p: _names_pidfile(process, p), grace, first)
    raise LabError(f"processes naming {process.pidfile} keep appearing")


def end_pid(
    pid: int,
    is_ours: Callable[[int], bool],
    grace: float = 5.0,
    first: signal.Signals = signal.SIGTERM,
) -> None:
    """Signal `pid` only if `is_ours(pid)` holds once a pidfd pins it; wait for its end."""
    with _pinned(pid, is_ours) as fd:
        if fd is None:
            return
        for sig in (first, signal.SIGKILL):
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(fd, sig)
            if _wait_exit(fd, grace):
                break
        else:
            raise LabError(f"process {pid} did not end after SIGKILL")
    _reap(pid)


def signal_process(process: ProcessRecord, sig: signal.Signals) -> bool:
    """Send `sig` to `process` if it still runs; tell whether it was sent."""
    pid = live_pid(process)
    if pid is None:
        return False
    with _pinned(pid, lambda p: live_pid(process) == p) as fd:
        if fd is None:
            return False
        signal.pidfd_send_signal(fd, sig)
        return True


def wait_until(condition: Callable[[], bool], timeout: float, interval: float = 0.02) -> bool:
    """Poll `condition` until it holds or `timeout` passes; tell whether it held."""
    deadline = time.monotonic() + timeout
    while True:
        if condition():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


def log_tail(path: Path | str | None, lines: int = 15) -> str:
    """The last lines of a log, for error messages."""
    if path is None:
        return ""
    try:
        text = Path(path).read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def _is_recorded(process: ProcessRecord, pid: int) -> bool:
    return process.start_time is not None and start_time(pid) == process.start_time


def _pidfile_pid(process: ProcessRecord) -> int | None:
    if not process.pidfile:
        return None
    try:
        text = Path(process.pidfile).read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _names_pidfile(process: ProcessRecord, pid: int) -> bool:
    if start_time(pid) is None or not process.pidfile:
        return False
    return any(process.pidfile in arg for arg in command_line(pid))


@contextlib.contextmanager
def _pinned(pid: int, is_ours: Callable[[int], bool]) -> Iterator[int | None]:
    """A pidfd on `pid` when, with the pid pinned, `is_ours` still holds; else None."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        yield None
        return
    try:
        yield fd if is_ours(pid) else None
    finally:
        os.close(fd)


def _naming_pidfile(process: ProcessRecord) -> list[int]:
    if not process.pidfile:
        return []
    return [
        int(entry.name)
        for entry in Path("/proc").iterdir()
        if entry.name.isdigit() and _names_pidfile(process, int(entry.name))
    ]


def _wait_exit(fd: int, timeout: float) -> bool:
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(int(timeout * 1000)))


def _reap(pid: int) -> None:
    """Collect the exit status when the process was our child, so it leaves no zombie."""
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)
