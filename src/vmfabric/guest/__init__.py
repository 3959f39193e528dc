"""The QEMU guest agent of a VM: its errors and what it reports (the client is `guest.qga`).

The agent runs inside the guest, so nothing it sends is trusted: the client bounds what it
buffers and how long it waits, and checks the shape of every answer it turns into these types.
"""

from __future__ import annotations

from dataclasses import dataclass


class GuestAgentError(Exception):
    """The guest agent could not give the answer asked for; raised as such when an answer
    arrived but is not shaped as QGA documents it."""


class AgentUnreachable(GuestAgentError):
    """No usable answer: cannot connect, connection lost, nothing within the timeout, or a
    stream that is not QGA. Worth retrying later: the guest may be booting or restarting its
    agent."""


class CommandFailed(GuestAgentError):
    """The agent answered with an error: the command is unknown, disabled or failed in the
    guest. The connection is fine; repeating the same call will most likely fail the same way."""

    def __init__(self, klass: str, desc: str) -> None:
        super().__init__(f"{klass}: {desc}")
        self.klass = klass
        """QGA's error class, such as "CommandNotFound" or "GenericError"."""
        self.desc = desc
        """The agent's own description of the failure."""


class ProgramTimeout(GuestAgentError):
    """A program started in the guest did not end within the time given to it; the agent
    itself answered, so the guest is alive."""


@dataclass(frozen=True)
class ExecResult:
    """What a program run in the guest did: its exit code (None when a signal ended it, then
    `signal` says which) and what it wrote."""

    exitcode: int | None
    signal: int | None
    stdout: bytes
    stderr: bytes


@dataclass(frozen=True)
class GuestAddress:
    """An IP address the guest has configured on an interface."""

    address: str
    prefix: int
    version: int


@dataclass(frozen=True)
class GuestInterface:
    """A network interface as the guest sees it; `mac` is None for interfaces without one."""

    name: str
    mac: str | None
    addresses: tuple[GuestAddress, ...]
