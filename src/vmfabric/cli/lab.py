"""`vmfabric lab`: bring the lab up and down, look at it, run commands in and break its VMs.

With `--json` each command prints exactly one JSON document on stdout. Errors are one line on
stderr: exit code 2 for bad input, 1 for a failure.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import asdict
from typing import Annotated, Any, TypeVar

import typer

from vmfabric.cli.demo import run_demo
from vmfabric.cli.output import JsonFlag, cli_errors, console, emit_json, fail, steps, table
from vmfabric.lab import faults, lifecycle, migration, services
from vmfabric.lab.errors import LabError, LabInputError

app = typer.Typer(
    name="lab",
    help="A lab cloud on this machine: hosts and VMs from network namespaces and Open vSwitch.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

T = TypeVar("T")


def _guarded(action: Callable[[], T]) -> T:
    """Run a lab action, turning its errors into the CLI's exit codes."""
    if os.geteuid() != 0:
        fail("the lab needs root (it creates namespaces and runs Open vSwitch)", 1)
    try:
        return action()
    except LabInputError as err:
        fail(str(err), 2)
    except (LabError, OSError) as err:
        fail(str(err), 1)


@app.command()
def up(
    hosts: Annotated[int, typer.Option("--hosts", help="Number of hosts hv1…hvN.")] = 2,
    controller: Annotated[
        bool,
        typer.Option(
            "--controller/--no-controller",
            help="Start (or find) the controller and register the hosts with it.",
        ),
    ] = True,
    as_json: JsonFlag = False,
) -> None:
    """Build the lab (switch, bridges, vmf-wan), start the controller if none answers."""
    with steps(not as_json) as progress:
        result = _guarded(lambda: lifecycle.up(hosts, controller=controller, progress=progress))
    if as_json:
        emit_json(result)
        return
    typer.echo(f"lab up: hosts {', '.join(result['hosts'])}")
    if "controller" in result:
        info = result["controller"]
        how = f"started by the lab, pid {info['pid']}" if info["started_by_lab"] else "running"
        typer.echo(f"controller: {info['url']} ({how})")


@app.command()
def down(as_json: JsonFlag = False) -> None:
    """Remove every lab resource and stop what `lab up` started."""
    with steps(not as_json) as progress:
        result = _guarded(lambda: lifecycle.down(progress=progress))
    if as_json:
        emit_json(result)
        return
    typer.echo(
        f"lab down: removed {len(result['vms'])} VMs, {len(result['networks'])} networks, "
        f"{result['namespaces']} namespaces, {result['bridges']} bridges, "
        f"{result['processes']} processes"
    )


@app.command()
def status(as_json: JsonFlag = False) -> None:
    """Show what the lab holds and whether each part runs."""
    result = _guarded(lifecycle.status)
    if as_json:
        emit_json(result)
        return
    _show_status(result)


@app.command("exec")
def exec_(
    vm: Annotated[str, typer.Argument(help="The lab VM.")],
    command: Annotated[list[str], typer.Argument(help="The command, after `--`.")],
    as_json: JsonFlag = False,
) -> None:
    """Run a command inside a lab VM; exit with its exit code (0 with --json)."""
    if as_json:
        done = _guarded(lambda: lifecycle.run_in_vm(vm, command))
        emit_json(
            {
                "vm": vm,
                "command": command,
                "exit_code": done.returncode,
                "stdout": done.stdout,
                "stderr": done.stderr,
            }
        )
        return
    raise typer.Exit(_guarded(lambda: lifecycle.exec_in_vm(vm, command)))


@app.command()
def fault(
    vm: Annotated[str, typer.Argument(help="The lab VM.")],
    kind: Annotated[
        str,
        typer.Argument(
            help="gateway-down, external-down, agent-stop, agent-hang, nic-down or access-down.",
            show_default=False,
        ),
    ],
    as_json: JsonFlag = False,
) -> None:
    """Break one thing of a lab VM, until `lab heal`; asking again changes nothing."""
    result = _guarded(lambda: faults.inject(vm, kind))
    if as_json:
        emit_json(result)
        return
    how = "in place" if result["changed"] else "already in place"
    typer.echo(
        f"fault {result['kind']} {how} on VM {result['vm']} ({result['host']}); "
        f"its faults: {', '.join(result['faults'])}"
    )


@app.command()
def heal(
    vm: Annotated[str, typer.Argument(help="The lab VM.")],
    as_json: JsonFlag = False,
) -> None:
    """Undo every fault of a lab VM."""
    result = _guarded(lambda: faults.heal(vm))
    if as_json:
        emit_json(result)
        return
    healed = ", ".join(result["healed"]) or "nothing (it had no faults)"
    typer.echo(f"VM {result['vm']} ({result['host']}) healed: {healed}")


@app.command()
def migrate(
    vm: Annotated[str, typer.Argument(help="The running lab VM.")],
    to: Annotated[str, typer.Option("--to", help="The destination host (hv1…hvN).")],
    abort: Annotated[
        bool,
        typer.Option("--abort", help="Cancel after the copy time: the VM stays where it is."),
    ] = False,
    as_json: JsonFlag = False,
) -> None:
    """Move a lab VM to another host as its hypervisor would on its own (not asked by the
    controller, which follows the move through the switches' port events)."""
    with steps(not as_json) as progress:
        result = _guarded(lambda: migration.migrate(vm, to, cancel=abort, progress=progress))
    if as_json:
        emit_json(result)
        return
    if result["outcome"] == "aborted":
        typer.echo(f"VM {result['vm']}: move to {result['to']} aborted, stays on {result['host']}")
        return
    typer.echo(
        f"VM {result['vm']} moved from {result['from']} to {result['to']} "
        f"(switch-over {result['switch_seconds'] * 1000:.1f} ms)"
    )


@app.command()
def demo(as_json: JsonFlag = False) -> None:
    """Show IP presetting end to end: VMs on two hosts get exactly their preset IPs by DHCP.

    Its VMs also serve a web page and sshd on their loopback (unless `VMFABRIC_LAB_SERVICES`
    says otherwise), for the access path.
    """
    os.environ.setdefault(services.SERVICES_ENV, ",".join(services.OPTIONAL))
    with steps(not as_json) as step, cli_errors():
        outcomes = _guarded(lambda: run_demo(step))
    if as_json:
        emit_json([{**asdict(o), "matches": o.matches} for o in outcomes])
    else:
        table(
            "Preset IP vs. the IP each VM's DHCP client got",
            ["VM", "HOST", "MAC", "PRESET IP", "IP IN VM", "MATCH"],
            [
                [o.vm, o.host, o.mac, o.preset, o.in_vm or "(none)", "yes" if o.matches else "NO"]
                for o in outcomes
            ],
        )
        typer.echo(
            "\nThe lab keeps running. Try: vmfabric vm list, vmfabric lab status,\n"
            "  vmfabric lab exec web1 -- busybox ping -c1 203.0.113.1\n"
            "Remove it with: vmfabric lab down"
        )
    if not all(o.matches for o in outcomes):
        raise typer.Exit(1)


def _show_status(result: dict[str, Any]) -> None:
    state = "up" if result["up"] else "down"
    hosts = ", ".join(result["hosts"]) or "-"
    console.print(
        f"lab {state} ({result['state_dir']}); hosts: {hosts}; "
        f"peer links: {len(result['peer_links'])}"
    )
    if result["services"]:
        key = f"; ssh -i {result['lab_key']}" if result["lab_key"] else ""
        console.print(f"VMs serve on their loopback: {', '.join(result['services'])}{key}")
    vms = [
        (
            vm["name"],
            f"{vm['host']} → {vm['migration']['host']}" if vm["migration"] else vm["host"],
            "yes" if vm["running"] else "no",
            ", ".join(f"{n['ifname']} {n['mac']} {n['network']}/{n['vlan']}" for n in vm["nics"]),
            ", ".join(f["kind"] for f in vm["faults"]) or "-",
        )
        for vm in result["vms"]
    ]
    networks = [
        (net["name"], net["kind"], net["vlan"], net["router_netns"], net["dhcp_netns"])
        for net in result["networks"]
    ]
    processes = [
        (p["name"], p["pid"], "yes" if p["alive"] else "no", p["netns"] or "-")
        for p in result["processes"]
    ]
    for title, columns, rows in (
        ("VMs", ("VM", "HOST", "RUNNING", "NICS", "FAULTS"), vms),
        ("Networks", ("NETWORK", "KIND", "VLAN", "ROUTER", "DHCP"), networks),
        ("Processes", ("PROCESS", "PID", "ALIVE", "NAMESPACE"), processes),
    ):
        if rows:
            table(title, columns, rows)


def main() -> None:
    """Run the lab commands on their own (the `vmfabric` CLI mounts `app` as `lab`)."""
    app(prog_name="vmfabric lab")


if __name__ == "__main__":
    main()
