"""Owning processes: identity by pid + start time or by pidfile, never a stranger's pid."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from vmfabric.lab import proc
from vmfabric.lab.errors import CommandError
from vmfabric.lab.state import ProcessRecord
from vmfabric.process_identity import start_time


@pytest.fixture
def sleeper() -> Iterator[subprocess.Popen[bytes]]:
    child = subprocess.Popen(["sleep", "30"])
    yield child
    child.kill()
    child.wait()


def test_start_time_names_a_live_process() -> None:
    assert start_time(os.getpid()) is not None
    assert start_time(2**22 + 1) is None


def test_a_zombie_counts_as_ended() -> None:
    child = subprocess.Popen(["true"])
    proc.wait_until(lambda: start_time(child.pid) is None, timeout=5)
    assert start_time(child.pid) is None
    child.wait()


def test_recorded_pid_with_its_start_time_is_ours(sleeper: subprocess.Popen[bytes]) -> None:
    record = ProcessRecord(
        name="vmf-s", argv=["sleep"], pid=sleeper.pid, start_time=start_time(sleeper.pid)
    )
    assert proc.live_pid(record) == sleeper.pid


def test_a_reused_pid_is_never_stopped(sleeper: subprocess.Popen[bytes]) -> None:
    started = start_time(sleeper.pid)
    assert started is not None
    record = ProcessRecord(name="vmf-s", argv=["sleep"], pid=sleeper.pid, start_time=started - 1)
    assert not proc.is_alive(record)
    proc.stop(record)
    assert sleeper.poll() is None


def test_a_pidfile_counts_only_if_the_process_names_it(
    tmp_path: Path, sleeper: subprocess.Popen[bytes]
) -> None:
    pidfile = tmp_path / "x.pid"
    pidfile.write_text(f"{sleeper.pid}\n")
    record = ProcessRecord(name="vmf-s", argv=["sleep"], pidfile=str(pidfile))
    assert proc.live_pid(record) is None
    named = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)", str(pidfile)])
    try:
        pidfile.write_text(f"{named.pid}\n")
        assert proc.wait_until(lambda: proc.live_pid(record) == named.pid, timeout=5)
    finally:
        named.kill()
        named.wait()


def test_spawned_processes_are_recorded_and_stopped(tmp_path: Path) -> None:
    record = proc.spawn(
        ProcessRecord(
            name="vmf-t",
            argv=[sys.executable, "-c", "import time; print('hi', flush=True); time.sleep(30)"],
            log=str(tmp_path / "log"),
        )
    )
    assert proc.is_alive(record)
    proc.wait_until(lambda: "hi" in proc.log_tail(record.log), timeout=5)
    proc.stop(record)
    assert not proc.is_alive(record)


def test_a_process_ignoring_sigterm_is_killed(tmp_path: Path) -> None:
    code = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(30)"
    record = proc.spawn(ProcessRecord(name="vmf-t", argv=[sys.executable, "-c", code]))
    proc.stop(record, grace=0.3)
    assert not proc.is_alive(record)


def test_a_failing_command_says_what_and_why() -> None:
    with pytest.raises(CommandError) as caught:
        proc.run(["sh", "-c", "echo boom >&2; exit 3"])
    assert "sh -c" in str(caught.value)
    assert "boom" in str(caught.value)
    assert caught.value.returncode == 3


def test_commands_in_a_namespace_go_through_ip_netns_exec() -> None:
    assert proc.in_netns("vmf-x", ["true"]) == ["ip", "netns", "exec", "vmf-x", "true"]
    assert proc.in_netns(None, ["true"]) == ["true"]
