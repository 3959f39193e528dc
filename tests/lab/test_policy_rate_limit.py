"""A policy's rate limit holds on the real Open vSwitch, and follows the VM to another host.

tx1 (hv1) sends UDP to rx1 (hv1) at 10 Mbit/s, paced; rx1 counts the frames' bytes in the
steady part of each run (after the first second, when the meter's burst is spent). Without a
policy rx1 gets all of it; under a policy of 2000 kbit/s it gets the limit (the meter drops
the rest at tx1's port), before and after `POST /vms/tx1/migrate` to hv2, from where the
traffic crosses the fabric back to hv1. Afterwards hv1 holds no meter of tx1, and once the
policy is detached hv2 holds none either and tx1 sends at full speed again.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator

import pytest

from vmfabric.cli.client import ApiClient
from vmfabric.domain.policy import meter_vm, vm_meters
from vmfabric.lab import lifecycle
from vmfabric.lab.testing import controller_lab, wait_for_ipv4
from vmfabric.vswitch import meter_id_of
from vmfabric.vswitch.openvswitch import lab_vswitch

pytestmark = [
    pytest.mark.lab,
    pytest.mark.skipif(os.geteuid() != 0, reason="the lab needs root"),
]

LIMIT_KBPS = 2000
SEND_KBPS = 10_000
SECONDS = 4.0
PORT = 9999
OVERHEAD = 42
"""Bytes of a UDP datagram's frame beyond its payload (Ethernet, IPv4, UDP headers): the
meter counts frames."""

RECEIVER = r"""
import socket, sys, time
port, seconds, overhead = int(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3])
receiver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
receiver.bind(("0.0.0.0", port))
print("ready", flush=True)
deadline = time.monotonic() + seconds
arrivals = []
while (left := deadline - time.monotonic()) > 0:
    receiver.settimeout(left)
    try:
        data = receiver.recv(65535)
    except socket.timeout:
        break
    if data == b"end":
        break
    arrivals.append((time.monotonic(), len(data) + overhead))
steady = [(at, size) for at, size in arrivals if at >= arrivals[0][0] + 1.0] if arrivals else []
span = steady[-1][0] - steady[0][0] if len(steady) > 1 else 0.0
print(sum(size for _, size in steady[1:]) * 8 / span / 1000 if span else 0.0)
"""

SENDER = r"""
import socket, sys, time
address, port, kbps, seconds, overhead = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), \
    float(sys.argv[4]), int(sys.argv[5])
sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
payload = b"x" * 1200
gap = (len(payload) + overhead) * 8 / (kbps * 1000)
start, sent = time.monotonic(), 0
while time.monotonic() - start < seconds:
    sender.sendto(payload, (address, port))
    sent += 1
    time.sleep(max(0.0, start + sent * gap - time.monotonic()))
for _ in range(5):
    time.sleep(0.3)
    sender.sendto(b"end", (address, port))
"""


@pytest.fixture
def cloud() -> Iterator[tuple[ApiClient, str]]:
    """tx1 and rx1 on hv1, on one network; the API and rx1's address."""
    with controller_lab(2) as lab:
        api = ApiClient(lab.url)
        api.post("/networks", {"name": "lan", "cidrs": ["10.70.0.0/24"]})
        for name in ("tx1", "rx1"):
            api.post(
                "/vms",
                {"name": name, "host": "hv1", "image": "debian12", "nics": [{"network": "lan"}]},
            )
        addresses = [wait_for_ipv4(name) for name in ("tx1", "rx1")]
        assert all(addresses), addresses
        yield api, str(addresses[1])


def received_kbps(address: str) -> float:
    """The rate (kbit/s of frames) at which rx1 receives what tx1 sends at `SEND_KBPS`."""
    namespace = lifecycle.vm_namespace("rx1")
    argv = [sys.executable, "-c", RECEIVER, str(PORT), str(SECONDS + 5), str(OVERHEAD)]
    with subprocess.Popen(
        ["ip", "netns", "exec", namespace, *argv], stdout=subprocess.PIPE, text=True
    ) as receiver:
        assert receiver.stdout is not None and receiver.stdout.readline().strip() == "ready"
        sent = lifecycle.run_in_vm(
            "tx1",
            [
                sys.executable,
                "-c",
                SENDER,
                address,
                str(PORT),
                str(SEND_KBPS),
                str(SECONDS),
                str(OVERHEAD),
            ],
        )
        assert sent.returncode == 0, sent.stderr
        out, _ = receiver.communicate(timeout=SECONDS + 10)
    return float(out.strip())


def meters_of(bridge: str, vm_id: int) -> list[str]:
    return [m for m in lab_vswitch().meters(bridge) if meter_id_of(m) in vm_meters(vm_id)]


def limited(rate: float) -> bool:
    return abs(rate - LIMIT_KBPS) <= 0.35 * LIMIT_KBPS


def test_a_rate_limit_holds_before_and_after_the_vm_moves(cloud: tuple[ApiClient, str]) -> None:
    api, address = cloud
    free = received_kbps(address)
    policy = {"name": "slow", "vms": ["tx1"], "rules": [], "rate_limit_kbps": LIMIT_KBPS}
    assert api.post("/policies", policy)["applies_to"] == ["tx1"]
    (meter,) = lab_vswitch().meters("vmf-hv1")
    vm_id = meter_vm(meter_id_of(meter))
    assert vm_id is not None and f"rate={LIMIT_KBPS}," in meter
    before_move = received_kbps(address)

    moved = api.post("/vms/tx1/migrate", {"to": "hv2"})
    after_move = received_kbps(address)
    left_on_hv1, on_hv2 = meters_of("vmf-hv1", vm_id), meters_of("vmf-hv2", vm_id)
    api.post("/policies/slow/detach", {"vm": "tx1"})
    detached = received_kbps(address)
    print(
        f"rx1 receives (kbit/s) without limit {free:.0f}; limited to {LIMIT_KBPS}: "
        f"{before_move:.0f} on hv1, {after_move:.0f} on hv2; detached {detached:.0f}"
    )
    assert moved["phase"] == "done", moved
    assert api.get("/vms/tx1")["host"] == "hv2"
    assert free > 3 * LIMIT_KBPS and detached > 3 * LIMIT_KBPS
    assert limited(before_move) and limited(after_move)
    assert left_on_hv1 == [] and on_hv2 == [meter]
    assert meters_of("vmf-hv2", vm_id) == []
