"""`vmfabric check ...`: connectivity of VMs as their guest agents see it."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from vmfabric.cli.client import ApiClient
from vmfabric.cli.output import JsonFlag, run, table

app = typer.Typer(
    help="Connectivity checks through the QEMU guest agent: OS, gateway and outside.",
    no_args_is_help=True,
)


def _checks_table(results: list[dict[str, Any]]) -> None:
    table(
        "Checks",
        ["VM", "OS", "AGENT", "MAC", "IPV4", "GATEWAY", "EXTERNAL", "CHECKED AT", "DETAIL"],
        [
            [r["vm"], r["os"], r["agent"], *_nic_cells(nic), r["checked_at"], r["detail"]]
            for r in results
            for nic in r["nics"] or [None]
        ],
    )


def _nic_cells(nic: dict[str, Any] | None) -> list[object]:
    if nic is None:
        return ["", "", "", ""]
    return [nic["mac"], nic["ipv4"], nic["gateway"], nic["external"]]


@app.command("run")
def run_checks(
    vm: Annotated[str | None, typer.Argument(help="Only this VM.")] = None,
    as_json: JsonFlag = False,
) -> None:
    """Check every running VM (or one) now, and show the results."""
    run(as_json, lambda: ApiClient().post("/checks/run", {"vm": vm}), _checks_table)


@app.command("status")
def status(
    vm: Annotated[str | None, typer.Argument(help="Only this VM.")] = None,
    as_json: JsonFlag = False,
) -> None:
    """The latest check of every VM (or of one)."""
    path = f"/checks/{vm}" if vm else "/checks"
    run(as_json, lambda: ApiClient().get(path), lambda r: _checks_table(r if vm is None else [r]))


@app.command("history")
def history(
    vm: str,
    limit: Annotated[int, typer.Option("--limit", help="How many, newest first.")] = 20,
    as_json: JsonFlag = False,
) -> None:
    """A VM's checks, newest first."""
    run(as_json, lambda: ApiClient().get(f"/checks/{vm}/history?limit={limit}"), _checks_table)
