"""`vmfabric policy`: rule texts become the API's rules; texts it cannot read exit 2."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from cli_process import vmfabric

from vmfabric.cli.policies import parse_rule


@pytest.mark.parametrize(
    ("text", "rule"),
    [
        (
            "ingress allow tcp/80 from group:hv1-debian12",
            {
                "direction": "ingress",
                "action": "allow",
                "protocol": "tcp",
                "ports": "80",
                "peer": "group:hv1-debian12",
            },
        ),
        (
            "in allow icmp from set:peers",
            {"direction": "ingress", "action": "allow", "protocol": "icmp", "peer": "set:peers"},
        ),
        (
            "egress deny udp/53",
            {"direction": "egress", "action": "deny", "protocol": "udp", "ports": "53"},
        ),
        ("out deny to 10.0.0.0/8", {"direction": "egress", "action": "deny", "peer": "10.0.0.0/8"}),
        ("ingress deny", {"direction": "ingress", "action": "deny"}),
    ],
)
def test_rule_texts_become_rules(text: str, rule: dict[str, str]) -> None:
    assert parse_rule(text) == rule


def policy(args: list[str], state: Path) -> subprocess.CompletedProcess[str]:
    """`vmfabric policy ARGS` against a controller that is not there."""
    return vmfabric(["policy", *args], state)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["create", "p", "--rule", "sideways allow"], "error: invalid rule 'sideways allow'"),
        (["create", "p", "--rule", "ingress allow tcp/80 to 10.0.0.1"], "comes after 'from'"),
        (["create", "p", "--set", "frontends"], "error: invalid --set 'frontends'"),
        (["create", "p", "--file", "/nonexistent.json"], "cannot read the policy file"),
        (["attach", "p"], "give --vm VM or --network NET to attach to"),
    ],
)
def test_unreadable_options_exit_2_in_one_line(
    args: list[str], message: str, tmp_path: Path
) -> None:
    done = policy(args, tmp_path)
    assert done.returncode == 2
    assert message in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
