"""`vmfabric host ...`"""

from __future__ import annotations

from typing import Annotated, Any

import typer

from vmfabric.cli.client import ApiClient
from vmfabric.cli.output import JsonFlag, console, run, table

app = typer.Typer(help="Hypervisor hosts.", no_args_is_help=True)


def _hosts_table(hosts: list[dict[str, Any]]) -> None:
    table(
        "Hosts",
        ["NAME", "DRIVER", "BRIDGE", "URI", "VMS"],
        [[h["name"], h["driver"], h["bridge"], h["uri"], h["vms"]] for h in hosts],
    )


@app.command("list")
def list_hosts(as_json: JsonFlag = False) -> None:
    """List the registered hosts."""
    run(as_json, lambda: ApiClient().get("/hosts"), _hosts_table)


@app.command("add")
def add_host(
    name: str,
    bridge: Annotated[str, typer.Option(help="The host's Open vSwitch bridge for VM ports.")],
    driver: Annotated[str, typer.Option(help="libvirt, lab or noop.")] = "libvirt",
    uri: Annotated[str | None, typer.Option(help="libvirt connection URI of the host.")] = None,
    as_json: JsonFlag = False,
) -> None:
    """Register a hypervisor host."""
    body = {"name": name, "bridge": bridge, "driver": driver, "uri": uri}
    run(
        as_json,
        lambda: ApiClient().post("/hosts", body),
        lambda h: console.print(f"host {h['name']} registered ({h['driver']}, {h['bridge']})"),
    )
