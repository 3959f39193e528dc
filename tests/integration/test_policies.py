"""Policies through the API: create, attach, replace, detach, delete, bad input, and the
meters of rate limits, which follow a VM when it migrates.

The hosts run the noop hypervisor and share an in-memory switch whose ports the tests plug
as libvirt would; what the compiled rules do to traffic is tested on the real Open vSwitch
(`tests/lab/test_policy_switch.py`), and the switch contract on both
(`tests/lab/test_vswitch_contract.py`).
"""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from vmfabric.agent.registry import LocalAgents
from vmfabric.domain.policy import (
    POLICY_KINDS_MASK,
    SEND_KIND,
    VM_RULES_MASK,
    WHERE_KIND,
    send_cookie,
    where_cookie,
)
from vmfabric.services.context import Controller
from vmfabric.services.migrations import MigrationEngine, MigrationSettings, list_migrations
from vmfabric.services.reconcile import reconcile
from vmfabric.store import repository
from vmfabric.vswitch import cookie_of
from vmfabric.vswitch.memory import MemorySwitch

WEB_POLICY = {
    "name": "web",
    "rules": [
        {"direction": "ingress", "action": "allow", "protocol": "tcp", "ports": 80},
        {"direction": "ingress", "action": "allow", "protocol": "icmp", "peer": "group:hv2-alpine"},
    ],
}


@pytest.fixture
def switch(controller: Controller) -> MemorySwitch:
    memory = MemorySwitch()
    controller.agents = LocalAgents(switch=memory)
    return memory


def cloud(api: TestClient, switch: MemorySwitch) -> dict[str, dict[str, Any]]:
    """Two hosts, three VMs with their ports plugged; the VMs by name."""
    for host in ("hv1", "hv2"):
        api.post("/api/v1/hosts", json={"name": host, "driver": "noop", "bridge": f"br-{host}"})
    api.post("/api/v1/networks", json={"name": "net1", "cidrs": ["10.0.0.0/24"]})
    api.post("/api/v1/networks", json={"name": "net2", "cidrs": ["10.2.0.0/24"]})
    vms = {}
    for port, (name, host, image, network) in enumerate(
        (
            ("web1", "hv1", "debian12", "net1"),
            ("web2", "hv1", "debian12", "net2"),
            ("peer1", "hv2", "alpine", "net1"),
        ),
        start=5,
    ):
        body = {"name": name, "host": host, "image": image, "nics": [{"network": network}]}
        vm = api.post("/api/v1/vms", json=body).json()
        switch.plugged.setdefault(f"br-{host}", {})[vm["nics"][0]["mac"]] = port
        vms[name] = vm
    return vms


def vm_id(controller: Controller, name: str) -> int:
    with controller.uow() as uow:
        return repository.get_vm(uow.session, name).id


def rules_of(switch: MemorySwitch, bridge: str, controller: Controller, name: str) -> list[str]:
    return switch.flows(bridge, send_cookie(vm_id(controller, name)), VM_RULES_MASK)


def policed(switch: MemorySwitch, bridge: str) -> set[int]:
    """VM ids with send, receive or where rules on the bridge."""
    found = switch.flows(bridge, SEND_KIND << 48, POLICY_KINDS_MASK)
    return {cookie_of(rule) & ((1 << 48) - 1) for rule in found}


def create(api: TestClient, body: dict[str, Any]) -> dict[str, Any]:
    response = api.post("/api/v1/policies", json=body)
    assert response.status_code == 201, response.text
    return response.json()


def test_a_policy_attached_to_a_vm_is_compiled_on_its_host_for_its_port(
    api: TestClient, controller: Controller, switch: MemorySwitch
) -> None:
    cloud(api, switch)
    policy = create(api, {**WEB_POLICY, "vms": ["web1"]})
    assert policy["vms"] == ["web1"] and policy["applies_to"] == ["web1"]
    rules = rules_of(switch, "br-hv1", controller, "web1")
    send = [r for r in rules if cookie_of(r) >> 48 == SEND_KIND]
    assert send and all("in_port=5" in r for r in send)
    mac = api.get("/api/v1/vms/web1").json()["nics"][0]["mac"]
    where = [r for r in rules if cookie_of(r) >> 48 == WHERE_KIND]
    cookie = where_cookie(vm_id(controller, "web1"))
    assert where == [f"cookie={cookie:#x},table=2,priority=20000,dl_dst={mac},actions=NORMAL"]
    assert any("tp_dst=80" in r for r in rules)
    peer = api.get("/api/v1/vms/peer1").json()["nics"][0]["ipv4"]
    assert any(f"nw_src={peer}" in r and "icmp" in r for r in rules)
    assert policed(switch, "br-hv1") == {vm_id(controller, "web1")}
    assert policed(switch, "br-hv2") == set()
    assert api.get("/api/v1/policies").json()[0]["name"] == "web"


def policy_operations(api: TestClient, operation: str, outcome: str) -> float:
    """`vmfabric_policy_operations_total` as `/metrics` shows it (0 before the first)."""
    families = text_string_to_metric_families(api.get("/metrics").text)
    return sum(
        sample.value
        for family in families
        if family.name == "vmfabric_policy_operations"
        for sample in family.samples
        if sample.name.endswith("_total")
        and sample.labels == {"operation": operation, "outcome": outcome}
    )


def test_policy_operations_are_counted_in_the_metrics(
    api: TestClient, switch: MemorySwitch
) -> None:
    cloud(api, switch)
    created, refused = (
        policy_operations(api, "create", "ok"),
        policy_operations(api, "create", "error"),
    )
    create(api, {**WEB_POLICY, "vms": ["web1"]})
    api.post("/api/v1/policies", json={**WEB_POLICY, "name": "bad", "ingress_default": "maybe"})
    assert policy_operations(api, "create", "ok") == created + 1
    assert policy_operations(api, "create", "error") == refused + 1


def test_a_network_policy_covers_its_nics_and_a_vm_policy_wins(
    api: TestClient, controller: Controller, switch: MemorySwitch
) -> None:
    cloud(api, switch)
    create(api, {"name": "lan", "rules": [], "ingress_default": "allow", "networks": ["net1"]})
    assert policed(switch, "br-hv1") == {vm_id(controller, "web1")}
    assert policed(switch, "br-hv2") == {vm_id(controller, "peer1")}
    create(api, {**WEB_POLICY, "vms": ["web1"]})
    shown = api.get("/api/v1/policies/lan").json()
    assert shown["networks"] == ["net1"] and shown["applies_to"] == ["peer1"]


def test_replace_and_detach_change_the_rules_at_once(
    api: TestClient, controller: Controller, switch: MemorySwitch
) -> None:
    cloud(api, switch)
    create(api, {**WEB_POLICY, "vms": ["web1"]})
    replaced = api.put(
        "/api/v1/policies/web",
        json={
            "rules": [{"direction": "ingress", "action": "allow", "protocol": "udp", "ports": 53}]
        },
    )
    assert replaced.status_code == 200, replaced.text
    rules = rules_of(switch, "br-hv1", controller, "web1")
    assert any("tp_dst=53" in r for r in rules) and not any("tp_dst=80" in r for r in rules)
    detached = api.post("/api/v1/policies/web/detach", json={"vm": "web1"})
    assert detached.status_code == 200 and detached.json()["vms"] == []
    assert rules_of(switch, "br-hv1", controller, "web1") == []
    assert api.delete("/api/v1/policies/web").status_code == 204
    assert api.get("/api/v1/policies").json() == []


def test_reconcile_removes_rules_of_vms_without_policy_and_restores_lost_ones(
    api: TestClient, controller: Controller, switch: MemorySwitch
) -> None:
    cloud(api, switch)
    create(api, {**WEB_POLICY, "vms": ["web1"]})
    web2 = vm_id(controller, "web2")
    stale = [
        f"cookie={send_cookie(web2):#x},priority=20000,actions=drop",
        f"cookie={where_cookie(web2):#x},table=2,priority=20000,actions=NORMAL",
    ]
    switch.rules["br-hv1"] = stale  # a restarted switch, and left-over rules
    report = reconcile(controller)
    assert report.policy_rules["hv1"] > 0
    assert policed(switch, "br-hv1") == {vm_id(controller, "web1")}


def test_a_deleted_vm_takes_its_rules_along(
    api: TestClient, controller: Controller, switch: MemorySwitch
) -> None:
    cloud(api, switch)
    create(api, {**WEB_POLICY, "vms": ["web1"]})
    assert api.delete("/api/v1/vms/web1").status_code == 204
    assert policed(switch, "br-hv1") == set()


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "detail"),
    [
        ("post", "/policies", {"name": "p", "colour": 1}, 400, "colour"),
        ("post", "/policies", {"name": "Not A Label"}, 400, "invalid policy name"),
        (
            "post",
            "/policies",
            {"name": "p", "rules": [{"direction": "ingress", "action": "allow", "ports": 80}]},
            400,
            "rule 1",
        ),
        (
            "post",
            "/policies",
            {
                "name": "p",
                "rules": [
                    {"direction": "ingress", "action": "deny"},
                    {"direction": "ingress", "action": "allow", "protocol": "tcp", "ports": 80},
                ],
            },
            400,
            "rule 2 can never match",
        ),
        (
            "post",
            "/policies",
            {
                "name": "p",
                "rules": [{"direction": "ingress", "action": "allow", "peer": "group:hv9-x"}],
            },
            404,
            "unknown peer group 'hv9-x'",
        ),
        (
            "post",
            "/policies",
            {
                "name": "p",
                "rules": [{"direction": "ingress", "action": "allow", "peer": "vm:nobody"}],
            },
            404,
            "unknown peer VM 'nobody'",
        ),
        ("post", "/policies", {"name": "p", "vms": ["nobody"]}, 404, "unknown VM 'nobody'"),
        ("post", "/policies", {"name": "p", "networks": ["nonet"]}, 404, "nonet"),
        ("post", "/policies", {**WEB_POLICY}, 409, "policy 'web' exists already"),
        ("post", "/policies", {"name": "p", "vms": ["web1"]}, 409, "VM web1 has policy 'web'"),
        ("post", "/policies/nope/attach", {"vm": "web1"}, 404, "unknown policy 'nope'"),
        ("post", "/policies/web/attach", {"vm": "web1", "network": "net1"}, 400, "not both"),
        ("post", "/policies/web/detach", {"vm": "web2"}, 409, "not attached to VM web2"),
        ("delete", "/policies/web", None, 409, "attached to VM web1; detach it first"),
        ("put", "/policies/nope", {"rules": []}, 404, "unknown policy 'nope'"),
    ],
)
def test_bad_policy_requests_are_refused_and_change_nothing(
    api: TestClient,
    switch: MemorySwitch,
    method: str,
    path: str,
    body: dict[str, Any] | None,
    status: int,
    detail: str,
) -> None:
    cloud(api, switch)
    create(api, {**WEB_POLICY, "vms": ["web1"]})
    before = api.get("/api/v1/policies").json()
    changes = switch.changes
    kwargs = {} if body is None else {"json": body}
    response = getattr(api, method)(f"/api/v1{path}", **kwargs)
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    assert detail in str(response.json()["detail"])
    assert api.get("/api/v1/policies").json() == before
    assert switch.changes == changes


LIMITED = {**WEB_POLICY, "name": "slow", "vms": ["web1"], "rate_limit_kbps": 2000}


def meter(controller: Controller, name: str, rate: int = 2000) -> str:
    """The meter of the VM's first NIC under a rate limit, as the switch holds it."""
    meter_id = vm_id(controller, name) * 100
    return f"meter={meter_id},kbps,burst,bands=type=drop,rate={rate},burst_size={rate // 5}"


def metered_send_rules(switch: MemorySwitch, bridge: str, controller: Controller) -> set[str]:
    """The actions of web1's allowed send rules on the bridge."""
    rules = rules_of(switch, bridge, controller, "web1")
    return {
        r.split("actions=")[1]
        for r in rules
        if cookie_of(r) >> 48 == SEND_KIND and not r.endswith("drop")
    }


def test_a_rate_limit_is_a_meter_that_the_vms_allowed_send_rules_use(
    api: TestClient, controller: Controller, switch: MemorySwitch
) -> None:
    cloud(api, switch)
    create(api, LIMITED)
    limit = meter(controller, "web1")
    assert switch.meters("br-hv1") == [limit]
    meter_id = limit.split(",")[0].removeprefix("meter=")
    assert metered_send_rules(switch, "br-hv1", controller) == {f"meter:{meter_id},goto_table:1"}
    received = [r for r in rules_of(switch, "br-hv1", controller, "web1") if "dl_dst" in r]
    assert received and not [r for r in received if "meter" in r]
    assert switch.meters("br-hv2") == []


def test_the_meter_follows_the_limit_and_goes_with_the_rules(
    api: TestClient, controller: Controller, switch: MemorySwitch
) -> None:
    cloud(api, switch)
    create(api, LIMITED)
    document = {key: LIMITED[key] for key in ("rules", "rate_limit_kbps")}
    api.put("/api/v1/policies/slow", json={**document, "rate_limit_kbps": 5000})
    assert switch.meters("br-hv1") == [meter(controller, "web1", 5000)]
    api.put("/api/v1/policies/slow", json={**document, "rate_limit_kbps": None})
    assert switch.meters("br-hv1") == []
    assert metered_send_rules(switch, "br-hv1", controller) == {"goto_table:1"}
    api.put("/api/v1/policies/slow", json=document)
    assert switch.meters("br-hv1") == [meter(controller, "web1")]
    api.post("/api/v1/policies/slow/detach", json={"vm": "web1"})
    assert switch.meters("br-hv1") == []
    api.post("/api/v1/policies/slow/attach", json={"vm": "web1"})
    assert switch.meters("br-hv1") == [meter(controller, "web1")]
    assert api.delete("/api/v1/vms/web1").status_code == 204
    assert switch.meters("br-hv1") == []


def test_reconcile_removes_meters_left_behind_and_restores_lost_ones(
    api: TestClient, controller: Controller, switch: MemorySwitch
) -> None:
    cloud(api, switch)
    create(api, LIMITED)
    left = meter(controller, "web2")
    switch.meter_table["br-hv1"] = {vm_id(controller, "web2") * 100: left}  # a restarted switch
    switch.meter_table["br-hv2"] = {vm_id(controller, "web1") * 100: meter(controller, "web1")}
    switch.meter_table["br-hv2"][7] = "meter=7,kbps,bands=type=drop,rate=1"  # the operator's
    reconcile(controller)
    assert switch.meters("br-hv1") == [meter(controller, "web1")]
    assert switch.meters("br-hv2") == ["meter=7,kbps,bands=type=drop,rate=1"]


@pytest.fixture
def moving(
    api: TestClient, controller: Controller, switch: MemorySwitch
) -> tuple[MigrationEngine, str]:
    """web1 under a rate limit on hv1 (port 5); the migration engine, web1's MAC."""
    vms = cloud(api, switch)
    create(api, LIMITED)
    engine = MigrationEngine(controller, MigrationSettings(timeout_s=30, grace_s=30))
    return engine, vms["web1"]["nics"][0]["mac"]


def test_the_meter_moves_with_the_vm_and_leaves_its_old_host(
    controller: Controller, switch: MemorySwitch, moving: tuple[MigrationEngine, str]
) -> None:
    engine, mac = moving
    limit, sent_before = meter(controller, "web1"), metered_send_rules(switch, "br-hv1", controller)
    switch.plugged["br-hv2"][mac] = 9
    engine.port_added("hv2", mac, 9)
    assert switch.meters("br-hv2") == [limit]
    assert metered_send_rules(switch, "br-hv2", controller) == sent_before
    del switch.plugged["br-hv1"][mac]
    engine.port_removed("hv1", mac, 5)
    switch.counts["br-hv2"] = {send_cookie(vm_id(controller, "web1")): 1}  # it sends from hv2
    engine.tick()
    assert list_migrations(controller, "web1")[0].phase == "done"
    assert switch.meters("br-hv1") == [] and rules_of(switch, "br-hv1", controller, "web1") == []
    assert switch.meters("br-hv2") == [limit]


def test_a_stale_meter_of_the_vm_at_the_destination_goes_when_its_rules_arrive(
    controller: Controller, switch: MemorySwitch, moving: tuple[MigrationEngine, str]
) -> None:
    engine, mac = moving
    stale_id = vm_id(controller, "web1") * 100 + 1
    switch.meter_table["br-hv2"] = {stale_id: f"meter={stale_id},kbps,bands=type=drop,rate=1"}
    switch.plugged["br-hv2"][mac] = 9
    engine.port_added("hv2", mac, 9)
    assert switch.meters("br-hv2") == [meter(controller, "web1")]


def test_a_move_rolled_back_leaves_no_meter_at_the_destination(
    controller: Controller, switch: MemorySwitch, moving: tuple[MigrationEngine, str]
) -> None:
    engine, mac = moving
    before = switch.meters("br-hv1"), rules_of(switch, "br-hv1", controller, "web1")
    switch.plugged["br-hv2"][mac] = 9
    engine.port_added("hv2", mac, 9)
    del switch.plugged["br-hv2"][mac]
    engine.port_removed("hv2", mac, 9)
    assert list_migrations(controller, "web1")[0].phase == "rolled-back"
    assert switch.meters("br-hv2") == [] and rules_of(switch, "br-hv2", controller, "web1") == []
    assert (switch.meters("br-hv1"), rules_of(switch, "br-hv1", controller, "web1")) == before
