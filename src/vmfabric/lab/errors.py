"""Errors of the lab, split by who must act: the caller (bad input) or the machine (failure)."""

from __future__ import annotations


class LabError(Exception):
    """The lab could not do what was asked; the message says what failed and why."""


class LabInputError(LabError):
    """The request itself is wrong (a bad name, an unknown VM); the CLI exits with 2."""


class CommandError(LabError):
    """A command the lab ran failed; the message carries the command line and its stderr."""

    def __init__(self, argv: list[str], returncode: int, stderr: str) -> None:
        self.argv = argv
        self.returncode = returncode
        self.stderr = stderr.strip()
        detail = "; ".join(self.stderr.splitlines())[-400:] or f"exit code {returncode}"
        super().__init__(f"`{' '.join(argv)}` failed: {detail}")
