"""`vmfabric lab …` as an operator runs it: JSON on stdout, one-line errors, exit codes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from vmfabric.domain.model import NicSpec, VmSpec
from vmfabric.hypervisor.lab import LabHypervisor
from vmfabric.lab.testing import FakeController

pytestmark = [
    pytest.mark.lab,
    pytest.mark.skipif(os.geteuid() != 0, reason="the lab needs root"),
]


def lab_cli(*args: str, url: str = "http://127.0.0.1:9") -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "VMFABRIC_URL": url}
    command = [sys.executable, "-m", "vmfabric.cli.lab", *args]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=60, check=False)


def json_of(done: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    assert done.returncode == 0, done.stderr
    document = json.loads(done.stdout)
    assert isinstance(document, dict)
    return document


def test_up_status_exec_and_down_speak_json(state: Path) -> None:
    with FakeController() as fake:
        up = json_of(lab_cli("up", "--hosts", "2", "--json", url=fake.url))
        assert fake.hosts == ["hv1", "hv2"]
    assert up["hosts"] == ["hv1", "hv2"]
    assert up["controller"] == {"url": fake.url, "started_by_lab": False, "pid": None}
    mac = LabHypervisor("hv2").define(VmSpec("web", "img", (NicSpec("n", "vmf-hv2", 7),))).macs[0]

    status = json_of(lab_cli("status", "--json"))
    assert status["up"] is True
    assert [(vm["name"], vm["host"]) for vm in status["vms"]] == [("web", "hv2")]

    ran = json_of(lab_cli("exec", "--json", "web", "--", "cat", "/sys/class/net/eth0/address"))
    assert ran["exit_code"] == 0
    assert ran["stdout"] == f"{mac}\n"

    passthrough = lab_cli("exec", "web", "--", "sh", "-c", "echo out; echo err >&2; exit 7")
    assert (passthrough.returncode, passthrough.stdout, passthrough.stderr) == (7, "out\n", "err\n")

    down = json_of(lab_cli("down", "--json"))
    assert down["vms"] == ["hv2/web"]
    assert not (state / "lab").exists()


def test_humans_get_text(state: Path) -> None:
    assert "lab up: hosts hv1" in lab_cli("up", "--hosts", "1", "--no-controller").stdout
    assert "vmf-ovs-vswitchd" in lab_cli("status").stdout
    assert "lab down: removed 0 VMs" in lab_cli("down").stdout


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (("up", "--hosts", "0", "--json"), 2, "1 to 64 hosts"),
        (("exec", "ghost", "--", "true"), 2, "no VM named 'ghost'"),
        (("exec", "--json", "ghost", "--", "true"), 2, "no VM named 'ghost'"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(
    state: Path, args: tuple[str, ...], code: int, message: str
) -> None:
    done = lab_cli(*args)
    assert done.returncode == code
    assert done.stdout == ""
    assert done.stderr.count("\n") == 1
    assert message in done.stderr


def test_a_controller_not_in_lab_mode_fails_with_exit_1(state: Path) -> None:
    with FakeController(lab=False) as fake:
        done = lab_cli("up", "--json", url=fake.url)
    assert done.returncode == 1
    assert done.stdout == ""
    assert done.stderr.startswith("error: the controller at")
    assert "not in lab mode" in done.stderr
    assert done.stderr.count("\n") == 1
