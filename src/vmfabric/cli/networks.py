"""`vmfabric network ...`"""

from __future__ import annotations

from typing import Annotated, Any

import typer

from vmfabric.cli.client import ApiClient
from vmfabric.cli.output import JsonFlag, console, run, table

app = typer.Typer(help="Networks and their subnets.", no_args_is_help=True)


def _subnet_rows(network: dict[str, Any]) -> list[list[object]]:
    return [
        [
            network["name"],
            network["kind"],
            network["vlan"],
            s["cidr"],
            s["gateway"],
            s["dhcp_server"],
            f"{s['used']}/{s['capacity']}",
            ", ".join(s["reserved"]),
        ]
        for s in network["subnets"]
    ]


_COLUMNS = ["NETWORK", "KIND", "VLAN", "CIDR", "GATEWAY", "DHCP", "USED", "RESERVED"]


def _networks_table(networks: list[dict[str, Any]]) -> None:
    table("Networks", _COLUMNS, [row for n in networks for row in _subnet_rows(n)])


@app.command("create")
def create(
    name: str,
    cidr: Annotated[
        list[str], typer.Option("--cidr", help="A subnet; repeat for more (IPv4/IPv6).")
    ],
    gateway: Annotated[
        list[str] | None, typer.Option("--gateway", help="Gateway of the subnet it is in.")
    ] = None,
    kind: Annotated[str, typer.Option("--kind", help="internal or external.")] = "internal",
    reserve: Annotated[
        list[str] | None, typer.Option("--reserve", help="FIRST-LAST kept out of allocation.")
    ] = None,
    ipv6_mode: Annotated[str, typer.Option("--ipv6-mode", help="slaac or dhcpv6.")] = "slaac",
    as_json: JsonFlag = False,
) -> None:
    """Create a network with its subnets, gateway and DHCP server."""
    body = {
        "name": name,
        "cidrs": cidr,
        "gateways": gateway or [],
        "kind": kind,
        "reserved": reserve or [],
        "ipv6_mode": ipv6_mode,
    }
    run(as_json, lambda: ApiClient().post("/networks", body), lambda n: _networks_table([n]))


@app.command("list")
def list_networks(as_json: JsonFlag = False) -> None:
    """List networks and their subnets."""
    run(as_json, lambda: ApiClient().get("/networks"), _networks_table)


@app.command("show")
def show(name: str, as_json: JsonFlag = False) -> None:
    """Show one network."""
    run(as_json, lambda: ApiClient().get(f"/networks/{name}"), lambda n: _networks_table([n]))


@app.command("delete")
def delete(name: str, as_json: JsonFlag = False) -> None:
    """Delete a network that no VM uses."""
    run(
        as_json,
        lambda: ApiClient().delete(f"/networks/{name}") or {"deleted": name},
        lambda d: console.print(f"network {d['deleted']} deleted"),
    )
