"""`vmfabric access ...`: credentials for a server inside a VM, used through the host's access
gateway (`http://127.0.0.1:8751/vm/VM/PORT/...`).

`grant` prints the credential once (the controller keeps only the grant) and how to use it;
`list`, `show` and `revoke` work on grants by id; `forward` opens a local port that tunnels
TCP through the gateway (`access.tunnel`). The port and the ttl are checked here with the
controller's own rules, so a typo exits at once; the controller checks them again.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
from typing import Annotated, Any
from urllib.parse import quote, urlencode

import typer

from vmfabric import config
from vmfabric.access.tunnel import Forwarder, Gateway
from vmfabric.cli.client import ApiClient
from vmfabric.cli.output import JsonFlag, cli_errors, console, emit_json, fail, operator, run, table
from vmfabric.domain.access import DEFAULT_TTL, PREFIX, QUERY_PARAMETER, check_port, parse_ttl
from vmfabric.domain.errors import InvalidInput
from vmfabric.domain.names import check_name

app = typer.Typer(
    help="Credentials for a server inside a VM, through the host's access gateway.",
    no_args_is_help=True,
)

PortOption = Annotated[int, typer.Option("--port", help="The port of the server in the VM.")]
"""`--port` of `grant` and `forward`."""

_GRANT_COLUMNS = ["ID", "VM", "PORT", "USER", "STATE", "EXPIRES", "USES", "LAST USED"]


def gateway_url(vm: str, port: int) -> str:
    """Where the gateway serves `port` of `vm` (`VMFABRIC_GATEWAY_URL`)."""
    return f"{config.gateway_url()}/vm/{vm}/{port}/"


def usage_lines(grant: dict[str, Any]) -> list[str]:
    """How to use a new credential: a curl command with the header, and the URL that carries
    it as a query parameter (for a browser)."""
    url = gateway_url(grant["vm"], grant["port"])
    credential = grant["credential"]
    return [
        f'curl -H "Authorization: Bearer {credential}" {url}',
        f"{url}?{urlencode({QUERY_PARAMETER: credential})}",
    ]


def _checked(port: int, ttl: str) -> None:
    """Exit 2 in one line when the port or the ttl would be refused."""
    try:
        check_port(port)
        parse_ttl(ttl)
    except InvalidInput as error:
        fail(error.detail, 2)


def _path(grant_id: str, *rest: str) -> str:
    return "/".join(("/access", quote(grant_id, safe=""), *rest))


def _grants_table(grants: list[dict[str, Any]]) -> None:
    table(
        "Access grants",
        _GRANT_COLUMNS,
        [
            [
                g["id"],
                g["vm"],
                g["port"],
                g["user"] or "-",
                g["state"],
                g["expires_at"],
                g["uses"],
                g["last_used_at"] or "-",
            ]
            for g in grants
        ],
    )


def _issued(grant: dict[str, Any]) -> None:
    who = f"for {grant['user']}" if grant["user"] else "for whoever holds the credential"
    console.print(
        f"access {grant['id']} to port {grant['port']} of {grant['vm']} {who}, "
        f"until {grant['expires_at']}"
    )
    console.print("credential (shown only now; keep it secret):")
    console.print(grant["credential"], soft_wrap=True)
    console.print("use it through the access gateway:")
    for line in usage_lines(grant):
        console.print(f"  {line}", soft_wrap=True)


def _grant_detail(grant: dict[str, Any]) -> None:
    _grants_table([grant])
    console.print(f"granted by {grant['granted_by']} at {grant['created_at']}")
    if grant["revoked_at"]:
        console.print(f"revoked by {grant['revoked_by']} at {grant['revoked_at']}")
    table(
        f"Latest uses of {grant['id']}",
        ["AT", "CLIENT", "KIND", "OUTCOME", "DETAIL"],
        [
            [u["at"], u["client"] or "-", u["kind"], u["outcome"], u["detail"] or ""]
            for u in grant["latest_uses"]
        ],
    )


def _revoked(grant: dict[str, Any]) -> None:
    console.print(
        f"access {grant['id']} to port {grant['port']} of {grant['vm']} revoked by "
        f"{grant['revoked_by']} at {grant['revoked_at']}"
    )


@app.command("grant")
def grant(
    vm: str,
    port: PortOption,
    ttl: Annotated[
        str, typer.Option("--ttl", help="How long the credential is valid: 30s, 15m, 2h, 1d.")
    ] = DEFAULT_TTL,
    user: Annotated[
        str | None,
        typer.Option("--for", help="The user it is for (kept with the grant and in its log)."),
    ] = None,
    as_json: JsonFlag = False,
) -> None:
    """Grant access to a port of a VM: prints the credential, once, and how to use it."""
    _checked(port, ttl)
    body = {"vm": vm, "port": port, "ttl": ttl, "for": user, "by": operator()}
    run(as_json, lambda: ApiClient().post("/access", body), _issued)


@app.command("list")
def list_grants(
    vm: Annotated[str | None, typer.Option("--vm", help="Only this VM's grants.")] = None,
    include_all: Annotated[
        bool, typer.Option("--all", help="Expired and revoked grants too.")
    ] = False,
    as_json: JsonFlag = False,
) -> None:
    """The grants in force (or all), newest first, with their uses."""
    query = {"vm": vm} if vm else {}
    if include_all:
        query["all"] = "true"
    path = f"/access?{urlencode(query)}" if query else "/access"
    run(as_json, lambda: ApiClient().get(path), _grants_table)


@app.command("show")
def show(grant_id: Annotated[str, typer.Argument(metavar="ID")], as_json: JsonFlag = False) -> None:
    """One grant with its latest uses."""
    run(as_json, lambda: ApiClient().get(_path(grant_id)), _grant_detail)


@app.command("revoke")
def revoke(
    grant_id: Annotated[str, typer.Argument(metavar="ID")], as_json: JsonFlag = False
) -> None:
    """End a grant now: its credential opens nothing any more."""
    body = {"by": operator()}
    run(as_json, lambda: ApiClient().post(_path(grant_id, "revoke"), body), _revoked)


@app.command("forward")
def forward(
    vm: str,
    port: PortOption,
    local_port: Annotated[
        int,
        typer.Option("--local-port", help="Port to listen on at 127.0.0.1; 0: a free one."),
    ] = 0,
    credential: Annotated[
        str | None,
        typer.Option(
            "--credential",
            envvar="VMFABRIC_ACCESS_CREDENTIAL",
            help="A credential for this VM and port, from access grant (default: one is "
            f"granted for {DEFAULT_TTL}).",
            show_envvar=True,
        ),
    ] = None,
    as_json: JsonFlag = False,
) -> None:
    """Forward a local port to a port of a VM through the access gateway, as ssh -L would:
    each connection to 127.0.0.1:LOCAL-PORT becomes a TCP stream to 127.0.0.1:PORT in the VM,
    over the VM's access channel (not its network). Runs until Ctrl-C."""
    gateway = _forward_checked(vm, port, local_port, credential)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_forward(gateway, vm, port, local_port, credential, as_json))


def _forward_checked(vm: str, port: int, local_port: int, credential: str | None) -> Gateway:
    """The gateway to use, or exit 2 in one line when an argument would be refused."""
    try:
        check_name("VM", vm)
        check_port(port)
    except InvalidInput as error:
        fail(error.detail, 2)
    if not 0 <= local_port <= 0xFFFF:
        fail(f"invalid --local-port {local_port}: between 0 (any free port) and 65535", 2)
    if credential is not None and not _looks_like_credential(credential):
        fail(
            f"invalid --credential: expected {PREFIX}.<claims>.<signature>, as access grant gives",
            2,
        )
    try:
        return Gateway.from_url(config.gateway_url())
    except ValueError as error:
        fail(f"invalid VMFABRIC_GATEWAY_URL: {error}", 2)


def _looks_like_credential(text: str) -> bool:
    parts = text.split(".")
    return len(parts) == 3 and parts[0] == PREFIX and all(parts)


async def _forward(
    gateway: Gateway, vm: str, port: int, local_port: int, credential: str | None, as_json: bool
) -> None:
    """Listen first (so a taken port costs no grant), then get a credential if none was
    given, say where it listens, and serve until cancelled."""
    forwarder = Forwarder(gateway, vm, port, credential or "", _connection_failed)
    try:
        host, bound = await forwarder.start("127.0.0.1", local_port)
    except OSError as error:
        fail(f"cannot listen on 127.0.0.1:{local_port}: {error.strerror or error}", 1)
    grant = None
    if credential is None:
        body = {"vm": vm, "port": port, "ttl": DEFAULT_TTL, "for": None, "by": operator()}
        with cli_errors():
            grant = ApiClient().post("/access", body)
        forwarder.credential = grant["credential"]
    document = {
        "vm": vm,
        "port": port,
        "local": f"{host}:{bound}",
        "gateway": config.gateway_url(),
        "grant": grant["id"] if grant else None,
        "expires_at": grant["expires_at"] if grant else None,
    }
    if as_json:
        emit_json(document)
    else:
        granted = f" (access {grant['id']} granted until {grant['expires_at']})" if grant else ""
        console.print(
            f"forwarding {host}:{bound} to port {port} of {vm} through {config.gateway_url()}"
            f"{granted}; Ctrl-C to stop"
        )
    sys.stdout.flush()
    try:
        await asyncio.Event().wait()
    finally:
        await forwarder.close()


def _connection_failed(message: str) -> None:
    sys.stderr.write(f"error: {message}\n")
    sys.stderr.flush()
