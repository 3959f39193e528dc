"""A VM's policy follows it from hv1 to hv2 on the real Open vSwitch (CN103051479A).

web1 (hv1) may receive only TCP 80 and ICMP from the group hv2-alpine (peer1); deny1, of
another group, may reach it in no way. While peer1 pings web1 every 10 ms and fetches its
page in a loop, `vm migrate web1 --to hv2` moves it. A capture inside web1 (a packet socket
on every interface of its namespace, which the move does not interrupt) proves that nothing
the policy denies reached it during the move; afterwards hv2 passes exactly what the policy
allows and hv1 holds no rule with web1's cookie.

The same engine follows moves the hypervisor makes on its own (`lab migrate`): one it aborts
half way rolls back with the policy whole on hv1, and a controller killed in the middle of a
move finishes it, or rolls it back, when it starts again.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from vmfabric.cli.client import ApiClient
from vmfabric.config import api_url
from vmfabric.domain.policy import KIND_MASK, RECEIVE_KIND, VM_RULES_MASK, send_cookie
from vmfabric.lab import lifecycle
from vmfabric.lab.ovs import switch_access
from vmfabric.lab.testing import controller_lab, wait_for_ipv4
from vmfabric.vswitch import cookie_of

pytestmark = pytest.mark.lab

CAPTURE = r"""
import socket, struct, sys
sniffer = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.ntohs(3))
with open(sys.argv[1], "w", buffering=1) as out:
    while True:
        frame, where = sniffer.recvfrom(65535)
        if where[2] == socket.PACKET_OUTGOING or frame[12:14] != b"\x08\x00":
            continue
        ip = frame[14:]
        proto, source = ip[9], socket.inet_ntoa(ip[12:16])
        port = struct.unpack("!H", ip[(ip[0] & 15) * 4 + 2:][:2])[0] if proto in (6, 17) else 0
        out.write(f"{source} {proto} {port}\n")
"""
POLICY = {
    "name": "web-only",
    "vms": ["web1"],
    "rules": [
        {
            "direction": "ingress",
            "action": "allow",
            "protocol": "tcp",
            "ports": 80,
            "peer": "group:hv2-alpine",
        },
        {"direction": "ingress", "action": "allow", "protocol": "icmp", "peer": "group:hv2-alpine"},
    ],
}


def spawn(vm: str, *argv: str) -> subprocess.Popen[str]:
    """A process inside the lab VM, ended by the test (or with the VM's namespace)."""
    namespace = lifecycle.vm_namespace(vm)
    return subprocess.Popen(
        ["ip", "netns", "exec", namespace, *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def fetch(vm: str, address: str, port: int = 80) -> bool:
    done = lifecycle.run_in_vm(
        vm, ["curl", "-s", "-o", "/dev/null", "-m", "1", f"http://{address}:{port}/"]
    )
    return done.returncode == 0


def ping(vm: str, address: str) -> bool:
    return lifecycle.run_in_vm(vm, ["ping", "-c", "1", "-W", "1", "-n", address]).returncode == 0


@pytest.fixture
def cloud() -> Iterator[tuple[ApiClient, dict[str, str]]]:
    """web1 on hv1 serving on 80 and 8080 under its policy; peer1 (hv2-alpine) and deny1
    (hv1-debian12); their addresses by name."""
    with controller_lab(2) as lab:
        api = ApiClient(lab.url)
        api.post("/networks", {"name": "lan", "cidrs": ["10.69.0.0/24"]})
        for name, host, image in (
            ("web1", "hv1", "debian12"),
            ("peer1", "hv2", "alpine"),
            ("deny1", "hv1", "centos9"),
        ):
            api.post(
                "/vms", {"name": name, "host": host, "image": image, "nics": [{"network": "lan"}]}
            )
        addresses = {name: wait_for_ipv4(name) or "" for name in ("web1", "peer1", "deny1")}
        assert all(addresses.values()), addresses
        servers = [
            spawn("web1", sys.executable, "-m", "http.server", str(port), "--bind", "0.0.0.0")
            for port in (80, 8080)
        ]
        try:
            assert api.post("/policies", POLICY)["applies_to"] == ["web1"]
            yield api, addresses
        finally:
            for server in servers:
                server.kill()


def allowed_and_denied(addresses: dict[str, str]) -> dict[str, bool]:
    web = addresses["web1"]
    return {
        "peer ping": ping("peer1", web),
        "peer tcp 80": fetch("peer1", web),
        "peer tcp 8080": fetch("peer1", web, 8080),
        "other ping": ping("deny1", web),
        "other tcp 80": fetch("deny1", web),
    }


EXPECTED = {
    "peer ping": True,
    "peer tcp 80": True,
    "peer tcp 8080": False,
    "other ping": False,
    "other tcp 80": False,
}


def web1_rules(bridge: str, vm_id: int) -> list[str]:
    cookie = f"cookie={send_cookie(vm_id):#x}/{VM_RULES_MASK:#x}"
    dumped = switch_access().run("ovs-ofctl", "--no-stats", "dump-flows", bridge, cookie)
    return [line for line in dumped.splitlines() if line.strip()]


def test_the_policy_follows_the_vm_and_nothing_denied_reaches_it_during_the_move(
    cloud: tuple[ApiClient, dict[str, str]], tmp_path: Path
) -> None:
    api, addresses = cloud
    web = addresses["web1"]
    assert allowed_and_denied(addresses) == EXPECTED
    vm_id = _vm_id(_mac(api))
    captured = tmp_path / "capture.txt"
    capture = spawn("web1", sys.executable, "-c", CAPTURE, str(captured))
    pinger = spawn("peer1", "ping", "-i", "0.01", "-c", "300", "-n", web)
    loader = spawn(
        "peer1", "sh", "-c", f"while :; do curl -s -o /dev/null -m 1 http://{web}/; done"
    )
    attacker = spawn(
        "deny1",
        "sh",
        "-c",
        f"while :; do curl -s -o /dev/null -m 1 http://{web}/; ping -c 1 -W 1 -n {web}; done",
    )
    prober = spawn(
        "peer1", "sh", "-c", f"while :; do curl -s -o /dev/null -m 1 http://{web}:8080/; done"
    )
    try:
        time.sleep(0.5)
        moved = api.post("/vms/web1/migrate", {"to": "hv2"})
        out, _ = pinger.communicate(timeout=60)
    finally:
        for process in (loader, attacker, prober, capture):
            process.kill()
    assert moved["phase"] == "done", moved
    sent, received = _ping_counts(out)
    print(f"ping every 10 ms during the move: {sent - received} of {sent} lost; move {moved}")
    assert received > 0
    seen = captured.read_text().splitlines()
    assert any(line.startswith(f"{addresses['peer1']} 6 ") for line in seen)
    denied = [
        line
        for line in seen
        if line.startswith(f"{addresses['deny1']} ") or line.endswith(" 6 8080")
    ]
    assert denied == []
    assert api.get("/vms/web1")["host"] == "hv2"
    assert web1_rules("vmf-hv1", vm_id) == []
    assert any(f"dl_dst={_mac(api)}" in rule for rule in web1_rules("vmf-hv2", vm_id))
    assert allowed_and_denied(addresses) == EXPECTED
    assert migrations_counted() == {("done", "api"): 1.0}


def migrations_counted() -> dict[tuple[str, str], float]:
    """The controller's `vmfabric_migrations_total` by (outcome, asked_by)."""
    text = httpx.get(f"{api_url()}/metrics").text
    return {
        (sample.labels["outcome"], sample.labels["asked_by"]): sample.value
        for family in text_string_to_metric_families(text)
        if family.name == "vmfabric_migrations"
        for sample in family.samples
        if sample.name.endswith("_total")
    }


def _ping_counts(output: str) -> tuple[int, int]:
    found = re.search(r"(\d+) packets transmitted, (\d+) received", output)
    assert found, output
    return int(found[1]), int(found[2])


def _vm_id(mac: str) -> int:
    """The VM id in the cookie of the receive rules that match its MAC on hv1."""
    kind = f"cookie={RECEIVE_KIND << 48:#x}/{KIND_MASK:#x}"
    dumped = switch_access().run("ovs-ofctl", "--no-stats", "dump-flows", "vmf-hv1", kind)
    cookies = {cookie_of(line) for line in dumped.splitlines() if f"dl_dst={mac}" in line}
    assert len(cookies) == 1, dumped
    return cookies.pop() & ((1 << 48) - 1)


def _mac(api: ApiClient) -> str:
    vm: dict[str, Any] = api.get("/vms/web1")
    return str(vm["nics"][0]["mac"])


def hypervisor_move(*args: str, copy_seconds: float) -> subprocess.Popen[str]:
    """`vmfabric lab migrate web1 ARGS`: a move the hypervisor makes without the controller,
    whose copy takes `copy_seconds` (the time the destination port exists beside the source's)."""
    command = [sys.executable, "-m", "vmfabric.cli.lab", "migrate", "web1", *args, "--json"]
    environment = os.environ | {"VMFABRIC_LAB_COPY_SECONDS": str(copy_seconds)}
    return subprocess.Popen(command, env=environment, stdout=subprocess.PIPE, text=True)


def latest_move(api: ApiClient) -> dict[str, Any]:
    moves: list[dict[str, Any]] = api.get("/migrations?vm=web1")
    return moves[0] if moves else {}


def wait_for(what: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not what():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def kill_controller() -> None:
    controller = next(p for p in lifecycle.status()["processes"] if "controller" in p["name"])
    os.kill(controller["pid"], signal.SIGKILL)


def test_a_move_aborted_half_way_rolls_back_with_the_policy_whole_on_the_source(
    cloud: tuple[ApiClient, dict[str, str]],
) -> None:
    api, addresses = cloud
    vm_id = _vm_id(_mac(api))
    before = web1_rules("vmf-hv1", vm_id)
    mover = hypervisor_move("--to", "hv2", "--abort", copy_seconds=1.0)
    wait_for(lambda: latest_move(api).get("phase") == "in")
    assert web1_rules("vmf-hv2", vm_id) != []  # installed the moment the port appeared
    out, _ = mover.communicate(timeout=30)
    assert '"outcome": "aborted"' in out
    wait_for(lambda: latest_move(api).get("phase") == "rolled-back")
    move = latest_move(api)
    assert move["asked_by"] == "switch" and "destination port went away" in move["detail"]
    assert migrations_counted() == {("rolled-back", "switch"): 1.0}
    assert web1_rules("vmf-hv1", vm_id) == before
    assert web1_rules("vmf-hv2", vm_id) == []
    assert api.get("/vms/web1")["host"] == "hv1"
    assert allowed_and_denied(addresses) == EXPECTED


@pytest.mark.parametrize("abort", [False, True], ids=["finished", "aborted"])
def test_a_controller_killed_during_a_move_resumes_it_or_rolls_it_back(
    cloud: tuple[ApiClient, dict[str, str]], abort: bool
) -> None:
    api, addresses = cloud
    vm_id = _vm_id(_mac(api))
    before = web1_rules("vmf-hv1", vm_id)
    mover = hypervisor_move("--to", "hv2", *(["--abort"] if abort else []), copy_seconds=1.0)
    wait_for(lambda: latest_move(api).get("phase") == "in")
    kill_controller()
    out, _ = mover.communicate(timeout=30)
    assert mover.returncode == 0, out
    lifecycle.up(2)
    if abort:
        wait_for(lambda: latest_move(api).get("phase") == "rolled-back")
        assert api.get("/vms/web1")["host"] == "hv1"
        assert web1_rules("vmf-hv1", vm_id) == before
        assert web1_rules("vmf-hv2", vm_id) == []
    else:
        wait_for(lambda: latest_move(api).get("phase") == "done")
        assert api.get("/vms/web1")["host"] == "hv2"
        assert web1_rules("vmf-hv1", vm_id) == []
        assert any(f"dl_dst={_mac(api)}" in rule for rule in web1_rules("vmf-hv2", vm_id))
    assert allowed_and_denied(addresses) == EXPECTED
