"""Every command's `--help` renders: help texts are Rich markup, where brackets are tags."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

from vmfabric.cli.main import app


def command_paths(group: Any, prefix: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    """The argv of every command and group under `group` (a group has `commands`)."""
    for name, command in group.commands.items():
        yield (*prefix, name)
        if hasattr(command, "commands"):
            yield from command_paths(command, (*prefix, name))


@pytest.mark.parametrize("path", list(command_paths(typer.main.get_command(app))), ids=" ".join)
def test_help_renders(path: tuple[str, ...]) -> None:
    done = CliRunner().invoke(app, [*path, "--help"])
    assert done.exit_code == 0, done.output
    assert "Usage:" in done.output
