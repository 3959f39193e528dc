"""`vmfabric vm ...`"""

from __future__ import annotations

from typing import Annotated, Any

import typer

from vmfabric.cli.client import ApiClient
from vmfabric.cli.output import JsonFlag, console, run, steps, table

app = typer.Typer(help="Virtual machines and their addresses.", no_args_is_help=True)

_COLUMNS = ["VM", "HOST", "IMAGE", "STATE", "NETWORK", "MAC", "IPV4", "IPV6", "GATEWAY"]


def vm_rows(vm: dict[str, Any]) -> list[list[object]]:
    """One table row per NIC of a VM."""
    return [[vm["name"], vm["host"], vm["image"], vm["state"], *_nic_cells(n)] for n in vm["nics"]]


def _nic_cells(nic: dict[str, Any]) -> list[object]:
    return [nic["network"], nic["mac"], nic["ipv4"], nic["ipv6"], nic["gateway"]]


def _vms_table(vms: list[dict[str, Any]]) -> None:
    table("VMs", _COLUMNS, [row for vm in vms for row in vm_rows(vm)])


def _nic(spec: str) -> dict[str, str | None]:
    network, _, address = spec.partition("=")
    return {"network": network, "address": address or None}


@app.command("create")
def create(
    name: str,
    host: Annotated[str, typer.Option("--host", help="Host to run the VM on.")],
    network: Annotated[str, typer.Option("--network", help="Network of the first NIC.")],
    ip: Annotated[str | None, typer.Option("--ip", help="Preset address of the first NIC.")] = None,
    image: Annotated[
        str | None, typer.Option("--image", help="OS image (names the DNS group).")
    ] = None,
    nic: Annotated[
        list[str] | None, typer.Option("--nic", help="More NICs: NET or NET=IP; repeatable.")
    ] = None,
    as_json: JsonFlag = False,
) -> None:
    """Create a VM: preset its IPs, define it on the host, reserve them in DHCP, start it."""
    body: dict[str, Any] = {
        "name": name,
        "host": host,
        "nics": [{"network": network, "address": ip}, *(_nic(n) for n in nic or [])],
    }
    if image:
        body["image"] = image
    run(as_json, lambda: ApiClient().post("/vms", body), lambda vm: _vms_table([vm]))


@app.command("list")
def list_vms(as_json: JsonFlag = False) -> None:
    """The global VM list: host, MAC and IP of every NIC."""
    run(as_json, lambda: ApiClient().get("/vms"), _vms_table)


@app.command("show")
def show(name: str, as_json: JsonFlag = False) -> None:
    """Show one VM."""
    run(as_json, lambda: ApiClient().get(f"/vms/{name}"), lambda vm: _vms_table([vm]))


@app.command("delete")
def delete(name: str, as_json: JsonFlag = False) -> None:
    """Delete a VM and release its addresses."""
    run(
        as_json,
        lambda: ApiClient().delete(f"/vms/{name}") or {"deleted": name},
        lambda d: console.print(f"VM {d['deleted']} deleted"),
    )


@app.command("set-ip")
def set_ip(name: str, ip: str, as_json: JsonFlag = False) -> None:
    """Change a VM's address (on the NIC whose network holds it) and its reservation."""
    run(
        as_json,
        lambda: ApiClient().post(f"/vms/{name}/set-ip", {"address": ip}),
        lambda vm: _vms_table([vm]),
    )


@app.command("stop")
def stop(name: str, as_json: JsonFlag = False) -> None:
    """Shut a VM down (it keeps its addresses)."""
    run(as_json, lambda: ApiClient().post(f"/vms/{name}/stop"), lambda vm: _vms_table([vm]))


@app.command("start")
def start(name: str, as_json: JsonFlag = False) -> None:
    """Boot a VM."""
    run(as_json, lambda: ApiClient().post(f"/vms/{name}/start"), lambda vm: _vms_table([vm]))


def _migration_table(migrations: list[dict[str, Any]]) -> None:
    table(
        "Migrations",
        ["VM", "FROM", "TO", "PHASE", "ASKED BY", "STARTED", "SECONDS", "DETAIL"],
        [
            [
                m["vm"],
                m["source"],
                m["destination"] or "-",
                m["phase"],
                m["asked_by"],
                m["started_at"],
                "-" if m["seconds"] is None else f"{m['seconds']:.3f}",
                m["detail"] or "",
            ]
            for m in migrations
        ],
    )


@app.command("migrate")
def migrate(
    name: str,
    to: Annotated[str, typer.Option("--to", help="The host to move the VM to.")],
    as_json: JsonFlag = False,
) -> None:
    """Move a running VM to another host; its network policy follows it, with no moment
    in which it runs without its rules."""

    def call() -> Any:
        with steps(not as_json) as step:
            step(f"Moving {name} to {to} with its rules")
            return ApiClient().post(f"/vms/{name}/migrate", {"to": to})

    run(as_json, call, lambda m: _migration_table([m]))


@app.command("migrations")
def migrations(
    name: Annotated[str | None, typer.Argument(help="Only this VM's.")] = None,
    as_json: JsonFlag = False,
) -> None:
    """The latest migrations, newest first."""
    path = "/migrations" + (f"?vm={name}" if name else "")
    run(as_json, lambda: ApiClient().get(path), _migration_table)
