"""`vmfabric policy ...`: network policies, attached to VMs or networks, that follow a VM.

A rule is written on the command line as one short text, the way an operator says it:

    DIRECTION ACTION [PROTOCOL[/PORTS]] [from|to PEER]

for example `ingress allow tcp/80 from group:hv1-debian12`, `ingress allow icmp from
set:peers`, `egress deny udp/53`, `ingress deny any from 10.0.0.0/8`. The controller checks
the rules (the CLI only splits the text), so the API and the CLI refuse the same things.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from vmfabric.cli.client import ApiClient
from vmfabric.cli.output import JsonFlag, console, fail, run, table

app = typer.Typer(help="Network policies that follow their VMs.", no_args_is_help=True)

DIRECTIONS = {"ingress": "ingress", "in": "ingress", "egress": "egress", "out": "egress"}
PEER_WORD = {"ingress": "from", "egress": "to"}

RuleOption = Annotated[
    list[str] | None,
    typer.Option(
        "--rule",
        help="A rule: 'DIRECTION ACTION PROTOCOL/PORTS from|to PEER', all after ACTION "
        "optional, e.g. 'ingress allow tcp/80 from group:hv2-alpine'; repeatable, first "
        "match wins.",
    ),
]
FileOption = Annotated[
    Path | None,
    typer.Option("--file", help="A JSON policy document (rules, defaults, sets); - for stdin."),
]
IngressOption = Annotated[
    str | None, typer.Option("--ingress", help="What arrives unmatched: allow or deny (deny).")
]
EgressOption = Annotated[
    str | None, typer.Option("--egress", help="What leaves unmatched: allow or deny (allow).")
]
AntispoofOption = Annotated[
    bool | None,
    typer.Option(
        "--antispoof/--no-antispoof", help="Only the VM's own MAC and addresses may send (on)."
    ),
]
SetOption = Annotated[
    list[str] | None,
    typer.Option("--set", help="A named set of VMs, NAME=vm1,vm2, for 'set:NAME' peers."),
]
RateOption = Annotated[
    int | None, typer.Option("--rate-limit", help="Kbit/s a NIC may send, at most.")
]
VmOption = Annotated[str | None, typer.Option("--vm", help="A VM.")]
NetworkOption = Annotated[str | None, typer.Option("--network", help="A network (every NIC).")]


def parse_rule(text: str) -> dict[str, Any]:
    """The API's form of one rule text; exits 2 with one line when the text cannot be read."""
    words = text.split()
    if len(words) < 2 or words[0].lower() not in DIRECTIONS:
        fail(
            f"invalid rule {text!r}: expected 'DIRECTION ACTION ...', e.g. 'ingress allow tcp/80'",
            2,
        )
    direction = DIRECTIONS[words[0].lower()]
    rule: dict[str, Any] = {"direction": direction, "action": words[1].lower()}
    rest = words[2:]
    if rest and rest[0].lower() not in PEER_WORD.values():
        protocol, _, ports = rest.pop(0).partition("/")
        rule["protocol"] = protocol.lower()
        if ports:
            rule["ports"] = ports
    if rest:
        if len(rest) != 2 or rest[0].lower() != PEER_WORD[direction]:
            fail(
                f"invalid rule {text!r}: the peer of an {direction} rule comes after "
                f"'{PEER_WORD[direction]}', as in '... {PEER_WORD[direction]} 10.0.0.0/24'",
                2,
            )
        rule["peer"] = rest[1]
    return rule


def _document(
    file: Path | None,
    rules: list[str] | None,
    ingress: str | None,
    egress: str | None,
    antispoof: bool | None,
    sets: list[str] | None,
    rate_limit: int | None,
) -> dict[str, Any]:
    """The policy document of the options, on top of the --file's."""
    document = _read_file(file) if file is not None else {}
    document.setdefault("rules", [])
    document["rules"] += [parse_rule(text) for text in rules or []]
    given = {
        "ingress_default": ingress,
        "egress_default": egress,
        "antispoof": antispoof,
        "rate_limit_kbps": rate_limit,
    }
    document.update({key: value for key, value in given.items() if value is not None})
    if sets:
        document["sets"] = {**document.get("sets", {}), **dict(_parse_set(s) for s in sets)}
    return document


def _read_file(file: Path) -> dict[str, Any]:
    try:
        text = sys.stdin.read() if str(file) == "-" else file.read_text()
        document = json.loads(text)
    except (OSError, ValueError) as error:
        fail(f"cannot read the policy file {file}: {error}", 2)
    if not isinstance(document, dict):
        fail(f"the policy file {file} must hold a JSON object", 2)
    return document


def _parse_set(text: str) -> tuple[str, list[str]]:
    name, sep, members = text.partition("=")
    if not sep or not name or not members:
        fail(f"invalid --set {text!r}: expected NAME=vm1,vm2", 2)
    return name, [m for m in members.split(",") if m]


def _target(vm: str | None, network: str | None, action: str) -> dict[str, str]:
    if (vm is None) == (network is None):
        fail(f"give --vm VM or --network NET to {action}, not both nor neither", 2)
    return {"vm": vm} if vm is not None else {"network": str(network)}


def _policies_table(policies: list[dict[str, Any]]) -> None:
    table(
        "Policies",
        ["POLICY", "RULES", "INGRESS", "EGRESS", "ANTISPOOF", "VMS", "NETWORKS", "APPLIES TO"],
        [
            [
                p["name"],
                len(p["document"]["rules"]),
                p["document"]["ingress_default"],
                p["document"]["egress_default"],
                "on" if p["document"]["antispoof"] else "off",
                ", ".join(p["vms"]) or "-",
                ", ".join(p["networks"]) or "-",
                ", ".join(p["applies_to"]) or "-",
            ]
            for p in policies
        ],
    )


def _policy_detail(policy: dict[str, Any]) -> None:
    _policies_table([policy])
    document = policy["document"]
    table(
        f"Rules of {policy['name']} (first match wins)",
        ["#", "DIRECTION", "ACTION", "PROTOCOL", "PORTS", "PEER"],
        [
            [i, r["direction"], r["action"], r["protocol"], r.get("ports") or "-", r["peer"]]
            for i, r in enumerate(document["rules"], start=1)
        ],
    )
    for name, members in sorted(document.get("sets", {}).items()):
        console.print(f"set {name}: {', '.join(members)}")


@app.command("create")
def create(
    name: str,
    rule: RuleOption = None,
    file: FileOption = None,
    ingress: IngressOption = None,
    egress: EgressOption = None,
    antispoof: AntispoofOption = None,
    set_: SetOption = None,
    rate_limit: RateOption = None,
    vm: Annotated[list[str] | None, typer.Option("--vm", help="Attach to this VM.")] = None,
    network: Annotated[
        list[str] | None, typer.Option("--network", help="Attach to this network.")
    ] = None,
    as_json: JsonFlag = False,
) -> None:
    """Create a policy, and attach it to VMs or networks: their switches get it at once."""
    body = _document(file, rule, ingress, egress, antispoof, set_, rate_limit)
    body.update(name=name, vms=vm or [], networks=network or [])
    run(as_json, lambda: ApiClient().post("/policies", body), _policy_detail)


@app.command("replace")
def replace(
    name: str,
    rule: RuleOption = None,
    file: FileOption = None,
    ingress: IngressOption = None,
    egress: EgressOption = None,
    antispoof: AntispoofOption = None,
    set_: SetOption = None,
    rate_limit: RateOption = None,
    as_json: JsonFlag = False,
) -> None:
    """Give a policy new rules and defaults; the VMs it applies to get them at once."""
    body = _document(file, rule, ingress, egress, antispoof, set_, rate_limit)
    run(as_json, lambda: ApiClient().request("PUT", f"/policies/{name}", body), _policy_detail)


@app.command("list")
def list_policies(as_json: JsonFlag = False) -> None:
    """Every policy, where it is attached and the VMs it applies to."""
    run(as_json, lambda: ApiClient().get("/policies"), _policies_table)


@app.command("show")
def show(name: str, as_json: JsonFlag = False) -> None:
    """One policy with its rules."""
    run(as_json, lambda: ApiClient().get(f"/policies/{name}"), _policy_detail)


@app.command("delete")
def delete(name: str, as_json: JsonFlag = False) -> None:
    """Delete a policy that is attached to nothing."""
    run(
        as_json,
        lambda: ApiClient().delete(f"/policies/{name}") or {"deleted": name},
        lambda _: console.print(f"policy {name} deleted"),
    )


@app.command("attach")
def attach(
    name: str, vm: VmOption = None, network: NetworkOption = None, as_json: JsonFlag = False
) -> None:
    """Attach a policy to a VM, or to a network (every NIC on it)."""
    body = _target(vm, network, "attach to")
    run(as_json, lambda: ApiClient().post(f"/policies/{name}/attach", body), _policy_detail)


@app.command("detach")
def detach(
    name: str, vm: VmOption = None, network: NetworkOption = None, as_json: JsonFlag = False
) -> None:
    """Detach a policy from a VM or a network; its VMs lose the rules at once."""
    body = _target(vm, network, "detach from")
    run(as_json, lambda: ApiClient().post(f"/policies/{name}/detach", body), _policy_detail)
