"""A restarted controller catches up with what happened while it was away."""

from __future__ import annotations

import time

from fastapi.testclient import TestClient

from vmfabric.domain.model import LeaseAction, LeaseEvent
from vmfabric.services.context import Controller, HostRef
from vmfabric.services.leases import record_lease_event
from vmfabric.services.reconcile import reconcile


def test_leases_missed_while_away_are_caught_up_from_the_lease_file(
    api: TestClient, controller: Controller
) -> None:
    assert api.post("/api/v1/networks", json={"name": "net1", "cidrs": ["10.0.0.0/24"]})
    gone = LeaseEvent("net1", LeaseAction.ADD, "52:54:00:00:00:01", "10.0.0.5", "old-vm", 0)
    record_lease_event(controller, gone)
    expires = int(time.time()) + 3600
    lease_file = controller.dhcp.files("net1").lease_file  # type: ignore[attr-defined]
    lease_file.write_text(f"{expires} 52:54:00:00:00:02 10.0.0.6 new-vm 01:52:54:00:00:00:02\n")

    report = reconcile(controller)

    assert report.networks == ["net1"]
    leases = api.get("/api/v1/networks/net1/leases").json()
    assert [(x["mac"], x["address"], x["hostname"], x["expires"]) for x in leases] == [
        ("52:54:00:00:00:02", "10.0.0.6", "new-vm", expires)
    ]


def test_a_vm_recorded_as_running_but_stopped_on_its_host_is_started_again(
    api: TestClient, controller: Controller
) -> None:
    for host in ("hv1", "hv2"):
        api.post("/api/v1/hosts", json={"name": host, "driver": "noop", "bridge": "br0"})
    api.post("/api/v1/networks", json={"name": "net1", "cidrs": ["10.0.0.0/24"]})
    for name, host in (("lost", "hv1"), ("kept", "hv2"), ("stopped", "hv2")):
        body = {"name": name, "host": host, "nics": [{"network": "net1"}]}
        assert api.post("/api/v1/vms", json=body).status_code == 201
    assert api.post("/api/v1/vms/stopped/stop").status_code == 200
    hv1 = controller.agents.hypervisor(HostRef("hv1", "noop", None, "br0"))
    hv1.stop("lost")

    report = reconcile(controller)

    assert report.resumed_vms == ["lost"]
    running = {vm.name: vm.running for vm in hv1.list_vms()}
    assert running == {"lost": True}
    assert api.get("/api/v1/vms/stopped").json()["state"] == "stopped"
