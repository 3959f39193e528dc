"""The `vmfabric` command."""

from __future__ import annotations

import ipaddress
import os
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from vmfabric import config
from vmfabric.cli import access, checks, groups, hosts, lab, networks, policies, vms
from vmfabric.cli.output import fail

if TYPE_CHECKING:
    from vmfabric.dns.keyfile import TsigKey
    from vmfabric.services.checks import CheckSettings
    from vmfabric.services.migrations import MigrationSettings

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
app.add_typer(checks.app, name="check")
app.add_typer(policies.app, name="policy")
app.add_typer(lab.app, name="lab")
app.add_typer(access.app, name="access")


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
    dns_secondary: Annotated[
        list[str] | None,
        typer.Option(
            "--dns-secondary",
            help="A secondary DNS server HOST:PORT told of every new serial (NOTIFY); repeatable.",
        ),
    ] = None,
    check_interval: Annotated[
        float,
        typer.Option(
            "--check-interval", help="Seconds between connectivity checks of all VMs; 0: none."
        ),
    ] = 60.0,
    check_target: Annotated[
        str,
        typer.Option("--check-target", help="Outside address VMs on external networks ping."),
    ] = "203.0.113.1",
    check_concurrency: Annotated[
        int, typer.Option("--check-concurrency", help="VMs checked at once.")
    ] = 128,
    check_deadline: Annotated[
        float,
        typer.Option("--check-deadline", help="Seconds a VM's check may take; then unreachable."),
    ] = 6.0,
    check_keep: Annotated[
        float, typer.Option("--check-keep", help="Days of check history kept.")
    ] = 7.0,
    webhook: Annotated[
        list[str] | None,
        typer.Option(
            "--webhook",
            help="URL told of every change of a VM's check; repeatable (default: "
            "$VMFABRIC_WEBHOOKS).",
        ),
    ] = None,
    webhook_secret_file: Annotated[
        Path | None,
        typer.Option(
            "--webhook-secret-file",
            help="Secret the webhooks are signed with, HMAC (default: "
            "$VMFABRIC_WEBHOOK_SECRET_FILE).",
        ),
    ] = None,
    dns_tsig_key_file: Annotated[
        Path | None,
        typer.Option(
            "--dns-tsig-key-file",
            help="TSIG key (a file `tsig-keygen NAME` wrote) that zone transfers must be "
            "signed with; NOTIFY is signed with it too.",
        ),
    ] = None,
    migration_timeout: Annotated[
        float,
        typer.Option(
            "--migration-timeout",
            envvar="VMFABRIC_MIGRATION_TIMEOUT",
            help="Seconds a VM's move may take before its rules roll back to the source.",
        ),
    ] = 30.0,
    migration_grace: Annotated[
        float,
        typer.Option(
            "--migration-grace",
            envvar="VMFABRIC_MIGRATION_GRACE",
            help="Seconds the source forwards a moved VM's packets at most, when no traffic "
            "shows it runs at its destination.",
        ),
    ] = 2.0,
    migration_redirect: Annotated[
        bool,
        typer.Option(
            "--migration-redirect/--no-migration-redirect",
            envvar="VMFABRIC_MIGRATION_REDIRECT",
            help="Forward packets in flight to a moved VM's old host over the peer link "
            "(off only to measure what it buys).",
        ),
    ] = True,
    gateway_listen: Annotated[
        str | None,
        typer.Option(
            "--gateway-listen",
            help="Address HOST:PORT of the access gateway, or 'off' (default: "
            "$VMFABRIC_GATEWAY_LISTEN, else 127.0.0.1:8751, skipped with an error in the log "
            "when that is taken).",
            show_default=False,
        ),
    ] = None,
    access_key_file: Annotated[
        Path | None,
        typer.Option(
            "--access-key-file",
            envvar="VMFABRIC_ACCESS_KEY_FILE",
            help="Key (at least 32 bytes, all of the file) access credentials are signed with "
            "(default: access.key in the state directory, made at the start when missing).",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Run the controller (API, DHCP supervision, host agents in-process)."""
    from vmfabric.api.server import ServeOptions
    from vmfabric.api.server import serve as run_server

    host, port = _address("--listen", listen)
    dns_text = dns_listen or config.dns_listen()
    dns = None if dns_text == "off" else _ip_address("--dns-listen", dns_text)
    secondaries = tuple(_ip_address("--dns-secondary", s) for s in dns_secondary or [])
    key = _tsig_key(dns_tsig_key_file) if dns_tsig_key_file is not None else None
    checks = _check_settings(check_target, check_concurrency, check_deadline, check_keep)
    urls, secret = _webhooks(
        webhook or config.webhooks(), webhook_secret_file or config.webhook_secret_file()
    )
    if check_interval < 0:
        fail(f"invalid --check-interval {check_interval:g}: seconds, 0 for none", 2)
    moves = _migration_settings(migration_timeout, migration_grace, migration_redirect)
    access_key = _access_key(access_key_file) if access_key_file is not None else None
    gateway = _gateway_address(gateway_listen or config.gateway_listen())
    if dns is not None:
        _require_free("--dns-listen", dns, "DNS", udp=True)
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
            dns_secondaries=secondaries,
            dns_key=key,
            checks=checks,
            check_interval_s=check_interval,
            webhooks=urls,
            webhook_secret=secret,
            migrations=moves,
            access_key=access_key,
            gateway_listen=gateway,
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


def _check_settings(target: str, concurrency: int, deadline: float, keep: float) -> CheckSettings:
    """The checks' settings, or exit 2 naming the option that is wrong."""
    from vmfabric.domain.checks import check_external_target
    from vmfabric.domain.errors import InvalidInput
    from vmfabric.services.checks import CheckSettings

    try:
        external = check_external_target(target)
    except InvalidInput as error:
        fail(f"invalid --check-target: {error.detail}", 2)
    if concurrency < 1:
        fail(f"invalid --check-concurrency {concurrency}: at least 1", 2)
    if not 1 <= deadline <= 300:
        fail(f"invalid --check-deadline {deadline:g}: between 1 and 300 seconds", 2)
    if keep <= 0:
        fail(f"invalid --check-keep {keep:g}: days, more than 0", 2)
    return CheckSettings(
        external_target=external,
        concurrency=concurrency,
        vm_deadline_s=deadline,
        keep=timedelta(days=keep),
    )


def _migration_settings(timeout: float, grace: float, redirect: bool) -> MigrationSettings:
    """The migrations' settings, or exit 2 naming the option that is wrong."""
    from vmfabric.services.migrations import MigrationSettings

    if not 1 <= timeout <= 3600:
        fail(f"invalid --migration-timeout {timeout:g}: between 1 and 3600 seconds", 2)
    if not 0 <= grace <= timeout:
        fail(f"invalid --migration-grace {grace:g}: between 0 and the timeout ({timeout:g} s)", 2)
    return MigrationSettings(timeout_s=timeout, grace_s=grace, redirect=redirect)


def _webhooks(urls: list[str], secret_file: Path | None) -> tuple[tuple[str, ...], bytes]:
    """The webhook URLs and their signing secret, or exit 2 saying what is missing."""
    for url in urls:
        if not url.startswith(("http://", "https://")):
            fail(f"invalid --webhook {url!r}: expected an http:// or https:// URL", 2)
    if urls and secret_file is None:
        fail("--webhook needs --webhook-secret-file: webhooks are always signed", 2)
    if secret_file is None:
        return (), b""
    try:
        secret = secret_file.read_bytes().strip()
    except OSError as error:
        fail(f"invalid --webhook-secret-file {str(secret_file)!r}: {error.strerror}", 2)
    if len(secret) < 16:
        fail("invalid --webhook-secret-file: the secret needs at least 16 bytes", 2)
    return tuple(urls), secret


def _tsig_key(path: Path) -> TsigKey:
    """The key of `--dns-tsig-key-file`, or exit 2 saying what is wrong with the file."""
    from vmfabric.dns.keyfile import read_key_file

    try:
        return read_key_file(path)
    except OSError as error:
        fail(f"invalid --dns-tsig-key-file {str(path)!r}: {error.strerror or error}", 2)
    except ValueError as error:
        fail(f"invalid --dns-tsig-key-file: {error}", 2)


def _access_key(path: Path) -> bytes:
    """The key of `--access-key-file`, or exit 2 saying what is wrong with the file."""
    from vmfabric.domain.errors import InvalidInput
    from vmfabric.services.access import read_key

    try:
        return read_key(path)
    except InvalidInput as error:
        fail(f"invalid --access-key-file: {error.detail}", 2)


def _require_free(option: str, address: tuple[str, int], what: str, *, udp: bool) -> None:
    """Exit 1 in one line when `address` is taken, before anything is opened."""
    from vmfabric.listen import check_free

    try:
        check_free(address, udp=udp)
    except OSError as error:
        host, port = address
        fail(
            f"cannot serve {what} on {host}:{port}: {error.strerror or error}; choose another "
            f"address with {option}, or {option} off",
            1,
        )


def _gateway_address(text: str | None) -> tuple[str, int] | None:
    """The gateway's address: the one given (exit 1 in one line when it is taken), None for
    `off`, the default when none is given."""
    if text is None:
        return _address("--gateway-listen", config.DEFAULT_GATEWAY_LISTEN)
    if text == "off":
        return None
    address = _ip_address("--gateway-listen", text)
    _require_free("--gateway-listen", address, "the access gateway", udp=False)
    return address


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
