"""Groups through the API: listing, blocks and unblocks, the audit trail, bad input.

The hosts run the noop hypervisor, and their switches record what the controller makes them
hold; the same rules on the real Open vSwitch, and their effect on traffic, are tested in the
lab (`tests/lab/test_group_quarantine.py`, `tests/lab/test_vswitch_openvswitch.py`).
"""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from vmfabric.agent.registry import LocalAgents
from vmfabric.domain.quarantine import QUARANTINE_MASK, quarantine_cookie
from vmfabric.services.context import Controller
from vmfabric.services.groups import blocked_names
from vmfabric.services.reconcile import reconcile
from vmfabric.vswitch import cookie_of
from vmfabric.vswitch.memory import MemorySwitch


@pytest.fixture
def switch(controller: Controller) -> MemorySwitch:
    recording = MemorySwitch()
    controller.agents = LocalAgents(switch=recording)
    return recording


def cloud(api: TestClient) -> dict[str, dict[str, object]]:
    """Two hosts, VMs of two images on each; the VMs by name."""
    for host in ("hv1", "hv2"):
        api.post("/api/v1/hosts", json={"name": host, "driver": "noop", "bridge": f"br-{host}"})
    api.post("/api/v1/networks", json={"name": "net1", "cidrs": ["10.0.0.0/24"]})
    vms = {}
    for name, host, image in (
        ("a1", "hv1", "debian12"),
        ("a2", "hv1", "debian12"),
        ("b1", "hv1", "alpine"),
        ("c1", "hv2", "debian12"),
    ):
        body = {"name": name, "host": host, "image": image, "nics": [{"network": "net1"}]}
        vms[name] = api.post("/api/v1/vms", json=body).json()
    return vms


def quarantined(switch: MemorySwitch, bridge: str) -> set[int]:
    """VM ids whose quarantine rules the bridge holds."""
    return {
        cookie_of(rule) & ~QUARANTINE_MASK
        for rule in switch.flows(bridge, quarantine_cookie(1) & QUARANTINE_MASK, QUARANTINE_MASK)
    }


def vm_ids(controller: Controller, *names: str) -> set[int]:
    from vmfabric.store import repository

    with controller.uow() as uow:
        return {repository.get_vm(uow.session, name).id for name in names}


def block(api: TestClient, group: str, reason: str = "worm found", **extra: object) -> dict:
    response = api.post(
        f"/api/v1/groups/{group}/block", json={"reason": reason, "by": "alice", **extra}
    )
    assert response.status_code == 200, response.text
    return response.json()


def test_groups_are_a_hosts_vms_of_one_image(api: TestClient, switch: MemorySwitch) -> None:
    cloud(api)
    groups = api.get("/api/v1/groups").json()
    assert [(g["name"], g["host"], g["image"], g["vms"]) for g in groups] == [
        ("hv1-alpine", "hv1", "alpine", ["b1"]),
        ("hv1-debian12", "hv1", "debian12", ["a1", "a2"]),
        ("hv2-debian12", "hv2", "debian12", ["c1"]),
    ]
    assert not any(g["blocked"] for g in groups)


def test_block_quarantines_the_groups_vms_on_their_host_and_is_audited(
    api: TestClient, controller: Controller, switch: MemorySwitch
) -> None:
    cloud(api)
    entry = block(api, "hv1-debian12", allow=["10.9.0.5", "10.9.0.0/24"])
    assert entry["action"] == "block" and entry["by"] == "alice"
    assert entry["scope"] == "group" and entry["target"] == "hv1-debian12"
    assert entry["vms"] == ["a1", "a2"] and entry["groups"] == ["hv1-debian12"]
    assert entry["allowed"] == ["10.9.0.5/32", "10.9.0.0/24"]
    assert quarantined(switch, "br-hv1") == vm_ids(controller, "a1", "a2")
    assert quarantined(switch, "br-hv2") == set()
    assert any("nw_dst=10.9.0.0/24" in rule for rule in switch.rules["br-hv1"])
    shown = api.get("/api/v1/groups/hv1-debian12").json()
    assert shown["blocked"] is True
    assert [(b["scope"], b["reason"], b["by"]) for b in shown["blocks"]] == [
        ("group", "worm found", "alice")
    ]

    response = api.post(
        "/api/v1/groups/hv1-debian12/unblock", json={"reason": "cleaned", "by": "bob"}
    )
    assert response.status_code == 200, response.text
    assert quarantined(switch, "br-hv1") == set()
    assert len(api.get("/api/v1/groups/HV1-Debian12").json()["audit"]) == 2  # any case
    trail = api.get("/api/v1/groups/hv1-debian12").json()["audit"]
    assert [(e["action"], e["by"], e["reason"], e["vms"], e["groups"]) for e in trail] == [
        ("block", "alice", "worm found", ["a1", "a2"], ["hv1-debian12"]),
        ("unblock", "bob", "cleaned", ["a1", "a2"], ["hv1-debian12"]),
    ]
    assert trail[0]["at"] <= trail[1]["at"]
    assert trail[0]["at"].endswith("Z") or trail[0]["at"].endswith("+00:00")  # UTC, said so


def test_vm_created_into_a_blocked_group_is_quarantined_and_deleted_ones_leave(
    api: TestClient, controller: Controller, switch: MemorySwitch
) -> None:
    cloud(api)
    block(api, "hv1-debian12")
    body = {"name": "a3", "host": "hv1", "image": "debian12", "nics": [{"network": "net1"}]}
    assert api.post("/api/v1/vms", json=body).status_code == 201
    assert quarantined(switch, "br-hv1") == vm_ids(controller, "a1", "a2", "a3")
    gone = vm_ids(controller, "a1")
    assert api.delete("/api/v1/vms/a1").status_code == 204
    assert quarantined(switch, "br-hv1") == vm_ids(controller, "a2", "a3")
    assert not gone & quarantined(switch, "br-hv1")


def test_image_block_covers_every_host_and_group_unblock_says_so(
    api: TestClient, controller: Controller, switch: MemorySwitch
) -> None:
    cloud(api)
    response = api.post(
        "/api/v1/images/debian12/block", json={"reason": "CVE-2026-0001", "by": "alice"}
    )
    assert response.status_code == 200, response.text
    assert response.json()["groups"] == ["hv1-debian12", "hv2-debian12"]
    assert quarantined(switch, "br-hv1") == vm_ids(controller, "a1", "a2")
    assert quarantined(switch, "br-hv2") == vm_ids(controller, "c1")
    with controller.uow() as uow:
        assert blocked_names(uow.session) == {
            "hv1-debian12": "CVE-2026-0001",
            "hv2-debian12": "CVE-2026-0001",
        }
    refused = api.post("/api/v1/groups/hv2-debian12/unblock", json={"by": "bob"})
    assert refused.status_code == 409
    assert "group unblock --image debian12" in refused.json()["detail"]
    lifted = api.post("/api/v1/images/debian12/unblock", json={"by": "bob"})
    assert lifted.status_code == 200
    assert quarantined(switch, "br-hv1") == quarantined(switch, "br-hv2") == set()


def test_restart_puts_the_quarantine_back_on_a_switch_that_lost_it(
    api: TestClient, controller: Controller, switch: MemorySwitch
) -> None:
    cloud(api)
    block(api, "hv2-debian12")
    switch.rules.clear()  # the switch restarted and lost its rules
    report = reconcile(controller)
    assert report.quarantine_rules["hv2"] > 0
    assert quarantined(switch, "br-hv2") == vm_ids(controller, "c1")


@pytest.mark.parametrize(
    ("path", "body", "status", "detail"),
    [
        ("/groups/hv9-debian12/block", {"reason": "x"}, 404, "unknown group 'hv9-debian12'"),
        ("/groups/hv1-win11/block", {"reason": "x"}, 404, "unknown group 'hv1-win11'"),
        ("/images/win11/block", {"reason": "x"}, 404, "unknown image 'win11'"),
        ("/images/Not_An_Image/block", {"reason": "x"}, 400, "invalid image name"),
        ("/groups/hv1-debian12/block", {"reason": "  "}, 400, "a block needs a reason"),
        (
            "/groups/hv1-debian12/block",
            {"reason": "x", "allow": ["10.0.0.300"]},
            400,
            "invalid allowed network '10.0.0.300'",
        ),
        ("/groups/hv1-debian12/unblock", {}, 409, "group 'hv1-debian12' is not blocked"),
        ("/groups/hv1-debian12/block", {"reason": "x", "colour": 1}, 400, "colour"),
    ],
)
def test_bad_group_requests_are_refused_and_change_nothing(
    api: TestClient,
    switch: MemorySwitch,
    path: str,
    body: dict[str, object],
    status: int,
    detail: str,
) -> None:
    cloud(api)
    before = api.get("/api/v1/groups").json()
    response = api.post(f"/api/v1{path}", json=body)
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    assert detail in str(response.json()["detail"])
    assert api.get("/api/v1/groups").json() == before
    assert switch.changes == 0


def test_second_block_is_a_conflict_naming_the_first(api: TestClient, switch: MemorySwitch) -> None:
    cloud(api)
    block(api, "hv1-alpine")
    again = api.post("/api/v1/groups/hv1-alpine/block", json={"reason": "y", "by": "bob"})
    assert again.status_code == 409
    assert "already blocked" in again.json()["detail"] and "by alice" in again.json()["detail"]


def test_host_and_image_making_a_group_name_too_long_are_refused(api: TestClient) -> None:
    api.post("/api/v1/hosts", json={"name": "h" * 40, "driver": "noop", "bridge": "br0"})
    api.post("/api/v1/networks", json={"name": "net1", "cidrs": ["10.0.0.0/24"]})
    body = {"name": "vm", "host": "h" * 40, "image": "i" * 30, "nics": [{"network": "net1"}]}
    response = api.post("/api/v1/vms", json=body)
    assert response.status_code == 400
    assert "a DNS label has at most 63" in response.json()["detail"]
    assert api.get("/api/v1/vms").json() == []
