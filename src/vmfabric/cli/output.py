"""Printing results: one JSON document with --json, Rich tables on a terminal otherwise."""

from __future__ import annotations

import getpass
import json
import socket
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TaskID, TextColumn, TimeElapsedColumn
from rich.table import Table

from vmfabric.cli.client import CliError

# No emoji codes (":100:" in "fd00:100::" is not an emoji) and no markup in our data; full
# width when the output goes to a file or a pipe, so nothing is cut.
console = Console(emoji=False, markup=False, width=None if sys.stdout.isatty() else 200)

JsonFlag = Annotated[
    bool, typer.Option("--json", help="Print exactly one JSON document on stdout.")
]


def emit_json(document: object) -> None:
    """The stable machine-readable output."""
    sys.stdout.write(json.dumps(document, indent=2, sort_keys=False, default=str) + "\n")


def table(title: str, columns: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    """A Rich table of rows."""
    view = Table(title=title, title_justify="left", highlight=False)
    for column in columns:
        view.add_column(column)
    for row in rows:
        view.add_row(*("" if cell is None else str(cell) for cell in row))
    console.print(view)


def fail(message: str, code: int) -> NoReturn:
    """One readable line on stderr and the exit code (2 bad input, 1 failure)."""
    one_line = " | ".join(line.strip() for line in message.splitlines() if line.strip())
    sys.stderr.write(f"error: {one_line}\n")
    raise typer.Exit(code)


@contextmanager
def cli_errors() -> Iterator[None]:
    """Turn CliError into one line on stderr and its exit code."""
    try:
        yield
    except CliError as error:
        fail(str(error), error.code)


def show(as_json: bool, document: Any, human: Callable[[Any], None]) -> None:
    """Print `document` as JSON or through `human`."""
    if as_json:
        emit_json(document)
    else:
        human(document)


def run(as_json: bool, call: Callable[[], Any], human: Callable[[Any], None]) -> None:
    """Do one API call and print its result, errors as one line and an exit code."""
    with cli_errors():
        document = call()
    show(as_json, document, human)


@contextmanager
def steps(enabled: bool) -> Iterator[Callable[[str], None]]:
    """Rich progress of a long operation's steps on a terminal; silent otherwise.

    Yields `step(description)`: each call closes the previous step and starts the next.
    """
    if not enabled or not sys.stderr.isatty():
        yield lambda _step: None
        return
    with Progress(
        SpinnerColumn(finished_text="[green]✓"),
        TextColumn("{task.description}"),
        TimeElapsedColumn(),
        console=Console(stderr=True),
    ) as bar:
        current: list[TaskID] = []

        def step(description: str) -> None:
            for task in current:
                bar.update(task, total=1, completed=1)
            current[:] = [bar.add_task(description, total=None)]

        yield step
        for task in current:
            bar.update(task, total=1, completed=1)


def operator() -> str:
    """Who acts, for audit trails (blocks, access grants): the local user at this machine."""
    return f"{getpass.getuser()}@{socket.gethostname()}"
