"""Child processes the access tests talk to: servers forked with the test's code, and the
guest proxy's single file run as a VM runs it, restartable.

Shared by the guest proxy's and the gateway's tests (imported by name, as pytest puts this
folder on the path).
"""

from __future__ import annotations

import contextlib
import multiprocessing
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def forked(target: Callable[..., None], *args: Any) -> Iterator[Connection]:
    """`target(conn, *args)` in a forked child (so it may be a function of the test module);
    this side of the pipe `conn` is one end of. The child is killed on the way out."""
    context = multiprocessing.get_context("fork")
    parent, child = context.Pipe()
    process = context.Process(target=target, args=(child, *args), daemon=True)
    process.start()
    try:
        yield parent
    finally:
        process.kill()
        process.join()


def proxy_command(interpreter: str, bundle: Path, *options: str) -> list[str]:
    """The bundle run without site-packages, so that only the standard library is there."""
    return [interpreter, "-I", "-S", str(bundle), *options]


class ProxyProcess:
    """The guest proxy as a child process, listening on `path`; restartable."""

    def __init__(self, command: list[str], path: Path, log: Path) -> None:
        self.command = command
        self.path = path
        self.log = log
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Start it (a socket file left by a killed one goes first) and wait until it listens."""
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(self.command, stderr=log)
        deadline = time.monotonic() + 10
        while not self.path.exists():
            assert self.process.poll() is None, self.log.read_text()
            assert time.monotonic() < deadline, "the guest proxy did not listen"
            time.sleep(0.02)

    def stop(self, signum: int = signal.SIGTERM) -> int:
        """Send `signum` unless it ended already; its exit status."""
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(signum)
        return self.process.wait(10)

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None
