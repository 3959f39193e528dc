"""`vmfabric group ...`: the groups of VMs per host and image, and their quarantine."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from vmfabric.cli.client import ApiClient
from vmfabric.cli.output import JsonFlag, console, fail, operator, run, table

app = typer.Typer(
    help="Groups of VMs (<host>-<image>), their DNS names and blocks.", no_args_is_help=True
)

ImageOption = Annotated[
    str | None, typer.Option("--image", help="Every group of this image, on every host.")
]


def _groups_table(groups: list[dict[str, Any]]) -> None:
    table(
        "Groups",
        ["GROUP", "HOST", "IMAGE", "VMS", "ADDRESSES", "BLOCKED"],
        [
            [
                g["name"],
                g["host"],
                g["image"],
                len(g["vms"]),
                len(g["addresses"]),
                ", ".join(_block_text(b) for b in g["blocks"]) or "no",
            ]
            for g in groups
        ],
    )


def _block_text(block: dict[str, Any]) -> str:
    allowed = f", allows {' '.join(block['allowed'])}" if block["allowed"] else ""
    return f"by {block['scope']} ({block['reason']}{allowed})"


def _group_detail(group: dict[str, Any]) -> None:
    _groups_table([group])
    console.print(f"VMs: {', '.join(group['vms']) or '-'}")
    console.print(f"addresses: {', '.join(group['addresses']) or '-'}")
    _audit_table(group["audit"])


def _audit_table(entries: list[dict[str, Any]]) -> None:
    table(
        "Audit trail",
        ["AT", "ACTION", "OF", "BY", "REASON", "VMS"],
        [
            [
                e["at"],
                e["action"],
                f"{e['scope']} {e['target']}",
                e["by"],
                e["reason"],
                ", ".join(e["vms"]),
            ]
            for e in entries
        ],
    )


def _done(entry: dict[str, Any]) -> None:
    what = f"{entry['scope']} {entry['target']}"
    vms = f"{len(entry['vms'])} VMs" if entry["vms"] else "no VMs yet"
    console.print(f"{what} {entry['action']}ed ({vms}; groups: {', '.join(entry['groups'])})")


def _path(group: str | None, image: str | None, action: str) -> str:
    """The API path of a block or unblock; exactly one of GROUP and --image."""
    if (group is None) == (image is None):
        fail(f"give a GROUP or --image IMAGE to {action}, not both nor neither", 2)
    return f"/images/{image}/{action}" if image is not None else f"/groups/{group}/{action}"


@app.command("list")
def list_groups(as_json: JsonFlag = False) -> None:
    """Every group with its VMs, registered addresses and blocks."""
    run(as_json, lambda: ApiClient().get("/groups"), _groups_table)


@app.command("show")
def show(group: str, as_json: JsonFlag = False) -> None:
    """One group, with the audit trail of its blocks (and its image's)."""
    run(as_json, lambda: ApiClient().get(f"/groups/{group}"), _group_detail)


@app.command("block")
def block(
    group: Annotated[str | None, typer.Argument(help="The group, <host>-<image>.")] = None,
    image: ImageOption = None,
    reason: Annotated[
        str, typer.Option("--reason", help="Why (kept in the audit trail and shown in DNS).")
    ] = "",
    allow: Annotated[
        list[str] | None,
        typer.Option("--allow", help="A network its VMs may still reach (CIDR); repeatable."),
    ] = None,
    as_json: JsonFlag = False,
) -> None:
    """Quarantine a group's VMs (or an image's, on every host): only DHCP and the allowed
    networks pass their switch ports, now and for VMs that join later."""
    path = _path(group, image, "block")
    body = {"reason": reason, "by": operator(), "allow": allow or []}
    run(as_json, lambda: ApiClient().post(path, body), _done)


@app.command("unblock")
def unblock(
    group: Annotated[str | None, typer.Argument(help="The group, <host>-<image>.")] = None,
    image: ImageOption = None,
    reason: Annotated[str, typer.Option("--reason", help="Why (for the audit trail).")] = "",
    as_json: JsonFlag = False,
) -> None:
    """Lift the block of a group (or of an image)."""
    path = _path(group, image, "unblock")
    body = {"reason": reason, "by": operator()}
    run(as_json, lambda: ApiClient().post(path, body), _done)
