"""Connectivity checks of lab VMs through their real qemu-ga, healthy and under each fault.

The controller checks through the guest agent of each VM: Linux found by guest-get-osinfo,
`ping` run in the guest (iputils) to the NIC's gateway and, on external networks, to vmf-wan
(203.0.113.1). Each lab fault must give exactly its expected state, and healing brings back
the healthy one.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from typing import Any

import pytest

from vmfabric.cli.client import ApiClient
from vmfabric.lab import faults, lifecycle
from vmfabric.lab.testing import state_dir_env, wait_for_ipv4

pytestmark = pytest.mark.lab


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture
def cloud(monkeypatch: pytest.MonkeyPatch) -> Iterator[ApiClient]:
    """Two hosts; `out1` on an external network (hv1), `in1` on an internal one (hv2)."""
    url = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("VMFABRIC_URL", url)
    monkeypatch.setenv("VMFABRIC_DNS_LISTEN", f"127.0.0.1:{free_port()}")
    with state_dir_env():
        try:
            lifecycle.up(2)
            api = ApiClient(url)
            api.post("/networks", {"name": "ext", "cidrs": ["10.67.0.0/24"], "kind": "external"})
            api.post("/networks", {"name": "int", "cidrs": ["10.68.0.0/24"], "kind": "internal"})
            for name, host, network in (("out1", "hv1", "ext"), ("in1", "hv2", "int")):
                api.post("/vms", {"name": name, "host": host, "nics": [{"network": network}]})
                assert wait_for_ipv4(name), name
            yield api
        finally:
            lifecycle.down()


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
def test_each_fault_gives_its_state_and_healing_brings_it_back(
    cloud: ApiClient, kind: str, expected: tuple[str, str, str, str]
) -> None:
    assert states(cloud, "out1") == ("linux", "ok", "ok", "ok")
    faults.inject("out1", kind)
    assert states(cloud, "out1") == expected
    assert states(cloud, "in1") == ("linux", "ok", "ok", "unknown")  # the other VM is fine
    faults.heal("out1")
    assert wait_for_ipv4("out1")
    assert states(cloud, "out1") == ("linux", "ok", "ok", "ok")
    history = cloud.get("/checks/out1/history")
    assert [h["agent"] for h in history[:3]] == ["ok", expected[1], "ok"]
