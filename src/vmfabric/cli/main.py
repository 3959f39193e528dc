"""The `vmfabric` command."""

from __future__ import annotations

import ipaddress
import os
from typing import Annotated

import typer

from vmfabric import config
from vmfabric.cli import groups, hosts, lab, networks, vms
from vmfabric.cli.output import fail

app = typer.Typer(
    help="vmfabric: the network control plane of a KVM/libvirt cloud.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
app.add_typer(hosts.app, name="host")
app.add_typer(networks.app, name="network")
app.add_typer(vms.app, name="vm")
app.add_typer(groups.app, name="group")
app.add_typer(lab.app, name="lab")


@app.command()
def serve(
    db: Annotated[
        str | None, typer.Option("--db", help="Database URL (default: SQLite in state).")
    ] = None,
    listen: Annotated[
        str, typer.Option("--listen", help="API address HOST:PORT.")
    ] = "127.0.0.1:8750",
    lab_mode: Annotated[
        bool, typer.Option("--lab", help="Build networks in the local lab.")
    ] = False,
    cpu: Annotated[
        int | None,
        typer.Option("--cpu", help="Keep the controller on this CPU (e.g. one VMs do not use)."),
    ] = None,
    dns_listen: Annotated[
        str | None,
        typer.Option(
            "--dns-listen",
            help="Address HOST:PORT of the DNS server of VM and group names, or 'off' "
            "(default: $VMFABRIC_DNS_LISTEN, else 127.0.0.1:5353).",
            show_default=False,
        ),
    ] = None,
    zone: Annotated[
        str, typer.Option("--zone", help="DNS zone of VM and group names.")
    ] = config.DEFAULT_ZONE,
) -> None:
    """Run the controller (API, DHCP supervision, host agents in-process)."""
    from vmfabric.api.server import ServeOptions
    from vmfabric.api.server import serve as run_server

    host, port = _address("--listen", listen)
    dns_text = dns_listen or config.dns_listen()
    dns = None if dns_text == "off" else _ip_address("--dns-listen", dns_text)
    if dns is not None:
        _require_free(dns)
    if cpu is not None:
        allowed = os.sched_getaffinity(0)
        if cpu not in allowed:
            fail(f"invalid --cpu {cpu}: this process may run on CPUs {sorted(allowed)}", 2)
        os.sched_setaffinity(0, {cpu})
    run_server(
        ServeOptions(
            db_url=db or config.default_db_url(),
            host=host,
            port=port,
            lab=lab_mode,
            token=config.api_token(),
            dns_listen=dns,
            zone=zone,
        )
    )


def _ip_address(option: str, text: str) -> tuple[str, int]:
    """`_address` whose host is an IP address (the DNS server binds exactly that)."""
    host, port = _address(option, text)
    try:
        ipaddress.ip_address(host)
    except ValueError:
        fail(f"invalid {option} {text!r}: {host!r} is not an IP address", 2)
    return host, port


def _require_free(address: tuple[str, int]) -> None:
    """Exit 1 in one line when the DNS address is taken, before anything is opened."""
    from vmfabric.dns.server import check_free

    try:
        check_free(address)
    except OSError as error:
        host, port = address
        fail(
            f"cannot serve DNS on {host}:{port}: {error.strerror or error}; choose another "
            "address with --dns-listen, or --dns-listen off",
            1,
        )


def _address(option: str, text: str) -> tuple[str, int]:
    """HOST:PORT of an option, or exit 2 saying what is wrong with it."""
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        fail(f"invalid {option} {text!r}: expected HOST:PORT", 2)
    return host, int(port)


def main() -> None:
    """Entry point of the console script."""
    app()


if __name__ == "__main__":
    main()
