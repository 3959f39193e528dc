"""Connectivity checks of lab VMs through their real qemu-ga, healthy and under each fault.

The controller checks through the guest agent of each VM: Linux found by guest-get-osinfo,
`ping` run in the guest (iputils) to the NIC's gateway and, on external networks, to vmf-wan
(203.0.113.1). Each lab fault must give exactly its expected state, and healing brings back
the healthy one.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from vmfabric.cli.client import ApiClient
from vmfabric.lab import faults
from vmfabric.lab.proc import wait_until
from vmfabric.lab.testing import WebhookReceiver, controller_lab, wait_for_ipv4

pytestmark = pytest.mark.lab


@pytest.fixture
def receiver() -> Iterator[WebhookReceiver]:
    with WebhookReceiver() as server:
        yield server


@pytest.fixture
def cloud(receiver: WebhookReceiver, tmp_path: Path) -> Iterator[ApiClient]:
    """Two hosts; `out1` on an external network (hv1), `in1` on an internal one (hv2); the
    controller sends its webhooks to `receiver`."""
    secret = tmp_path / "webhook.secret"
    secret.write_text("lab-webhook-secret-0123456789")
    env = {"VMFABRIC_WEBHOOKS": receiver.url, "VMFABRIC_WEBHOOK_SECRET_FILE": str(secret)}
    with controller_lab(2, env) as lab:
        api = ApiClient(lab.url)
        api.post("/networks", {"name": "ext", "cidrs": ["10.67.0.0/24"], "kind": "external"})
        api.post("/networks", {"name": "int", "cidrs": ["10.68.0.0/24"], "kind": "internal"})
        for name, host, network in (("out1", "hv1", "ext"), ("in1", "hv2", "int")):
            api.post("/vms", {"name": name, "host": host, "nics": [{"network": network}]})
            assert wait_for_ipv4(name), name
        yield api


def states(api: ApiClient, vm: str) -> tuple[str, str, str, str]:
    """(os, agent, gateway, external) of a fresh check of the VM's first NIC."""
    (result,) = api.post("/checks/run", {"vm": vm})
    nic: dict[str, Any] = result["nics"][0]
    return result["os"], result["agent"], nic["gateway"], nic["external"]


def test_healthy_vms_on_external_and_internal_networks(cloud: ApiClient) -> None:
    results = {r["vm"]: r for r in cloud.post("/checks/run", {})}
    assert results["out1"]["os"] == results["in1"]["os"] == "linux"
    assert results["out1"]["agent"] == results["in1"]["agent"] == "ok"
    assert [(n["gateway"], n["external"]) for n in results["out1"]["nics"]] == [("ok", "ok")]
    assert [(n["gateway"], n["external"]) for n in results["in1"]["nics"]] == [("ok", "unknown")]
    assert cloud.get("/checks/out1")["checked_at"] == results["out1"]["checked_at"]


@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        ("gateway-down", ("linux", "ok", "broken", "broken")),
        ("external-down", ("linux", "ok", "ok", "broken")),
        ("nic-down", ("linux", "ok", "broken", "broken")),
        ("agent-stop", ("linux", "unreachable", "unknown", "unknown")),
        ("agent-hang", ("linux", "unreachable", "unknown", "unknown")),
    ],
)
def test_each_fault_gives_its_state_and_its_webhook_and_healing_brings_it_back(
    cloud: ApiClient, receiver: WebhookReceiver, kind: str, expected: tuple[str, str, str, str]
) -> None:
    assert states(cloud, "out1") == ("linux", "ok", "ok", "ok")
    faults.inject("out1", kind)
    assert states(cloud, "out1") == expected
    assert states(cloud, "in1") == ("linux", "ok", "ok", "unknown")  # the other VM is fine
    faults.heal("out1")
    assert wait_for_ipv4("out1")
    assert states(cloud, "out1") == ("linux", "ok", "ok", "ok")
    wait_until(lambda: len(receiver.received) >= 2, timeout=10)
    broke, healed = receiver.documents()
    assert (broke["event"], broke["vm"]) == ("vm.check.changed", "out1")
    assert _webhook_states(broke["current"]) == expected
    assert _webhook_states(healed["previous"]) == expected
    assert _webhook_states(healed["current"]) == ("linux", "ok", "ok", "ok")
    history = cloud.get("/checks/out1/history")
    assert [h["agent"] for h in history[:3]] == ["ok", expected[1], "ok"]


def _webhook_states(result: dict[str, Any]) -> tuple[str, str, str, str]:
    nic = result["nics"][0]
    return result["os"], result["agent"], nic["gateway"], nic["external"]
