"""The migration method (CN103051479A) step by step, on an in-memory switch.

The tests play the switch watcher: they plug and unplug the VM's ports as libvirt would and
hand the engine the events; the same moves with real ports, traffic and captures run in the
lab (`tests/lab/test_policy_migration.py`).
"""

from __future__ import annotations

import time
from typing import Any

import pytest
from fastapi.testclient import TestClient

from vmfabric.agent.registry import LocalAgents
from vmfabric.domain.policy import (
    BASE_KIND,
    RECEIVE_KIND,
    SEND_KIND,
    VM_RULES_MASK,
    WHERE_KIND,
    send_cookie,
)
from vmfabric.services.context import Controller
from vmfabric.services.migrations import MigrationEngine, MigrationSettings, list_migrations
from vmfabric.store import repository
from vmfabric.vswitch import VswitchError, cookie_of
from vmfabric.vswitch.memory import MemorySwitch

OLD_PORT, NEW_PORT, PEER_LINK = 5, 9, 77
KINDS = (SEND_KIND, RECEIVE_KIND, WHERE_KIND)
POLICY = {
    "name": "web",
    "vms": ["web1"],
    "rules": [{"direction": "ingress", "action": "allow", "protocol": "tcp", "ports": 80}],
}


@pytest.fixture
def switch(controller: Controller) -> MemorySwitch:
    memory = MemorySwitch(peers={"br-hv1": {"hv2": PEER_LINK}, "br-hv2": {"hv1": 78}})
    controller.agents = LocalAgents(switch=memory)
    return memory


@pytest.fixture
def engine(controller: Controller) -> MigrationEngine:
    return MigrationEngine(controller, MigrationSettings(timeout_s=0.5, grace_s=0.2))


@pytest.fixture
def mac(api: TestClient, switch: MemorySwitch) -> str:
    """web1 on hv1 (port 5) under a policy; its MAC."""
    for host in ("hv1", "hv2", "hv3"):
        driver = "lab" if host == "hv3" else "noop"
        api.post("/api/v1/hosts", json={"name": host, "driver": driver, "bridge": f"br-{host}"})
    api.post("/api/v1/networks", json={"name": "net1", "cidrs": ["10.0.0.0/24"]})
    body = {"name": "web1", "host": "hv1", "nics": [{"network": "net1"}]}
    web1: dict[str, Any] = api.post("/api/v1/vms", json=body).json()
    found: str = web1["nics"][0]["mac"]
    switch.plugged["br-hv1"] = {found: OLD_PORT}
    assert api.post("/api/v1/policies", json=POLICY).status_code == 201
    return found


def rules(switch: MemorySwitch, bridge: str, controller: Controller, kind: int) -> list[str]:
    with controller.uow() as uow:
        vm_id = repository.get_vm(uow.session, "web1").id
    found = switch.flows(bridge, send_cookie(vm_id), VM_RULES_MASK)
    return [r for r in found if cookie_of(r) >> 48 == kind]


def host_of(controller: Controller) -> str:
    with controller.uow() as uow:
        return repository.get_vm(uow.session, "web1").host.name


def phase(controller: Controller) -> str:
    return list_migrations(controller, "web1")[0].phase


def vlan_of(controller: Controller) -> int:
    with controller.uow() as uow:
        return repository.get_vm(uow.session, "web1").nics[0].network.vlan


def reads(switch: MemorySwitch, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The bridges whose rules the engine reads from now on, one entry per read."""
    read: list[str] = []
    flows = switch.flows

    def counted(bridge: str, cookie: int, mask: int) -> list[str]:
        read.append(bridge)
        return flows(bridge, cookie, mask)

    monkeypatch.setattr(switch, "flows", counted)
    return read


def assert_redirected(where: list[str], mac: str, vlan: int) -> None:
    """The where rules of the source once web1 left: its tagged packets to the peer link as
    they are, untagged ones tagged, from its neighbour (port 4) only, not from port 6."""
    assert sorted(r.split(",actions=")[1] for r in where) == [
        f"mod_vlan_vid:{vlan},output:{PEER_LINK}",
        f"output:{PEER_LINK}",
    ]
    assert all(f"dl_dst={mac}" in r for r in where)
    (untagged,) = [r for r in where if "vlan_tci=0x0000/0x1fff" in r]
    assert "in_port=4," in untagged


def test_destination_first_moves_send_rules_redirects_then_cleans_up(
    controller: Controller,
    switch: MemorySwitch,
    engine: MigrationEngine,
    mac: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    sent_before = rules(switch, "br-hv1", controller, SEND_KIND)
    received_before = rules(switch, "br-hv1", controller, RECEIVE_KIND)
    assert rules(switch, "br-hv1", controller, WHERE_KIND) == [
        f"cookie={cookie_of(sent_before[0]) | WHERE_KIND << 48:#x},table=2,priority=20000,"
        f"dl_dst={mac},actions=NORMAL"
    ]
    delivery = f"strip_vlan,output:{OLD_PORT}"
    assert {r.split("actions=")[1] for r in received_before} == {"goto_table:2", "drop", delivery}
    switch.plugged["br-hv2"] = {mac: NEW_PORT}
    engine.port_added("hv2", mac, NEW_PORT)
    assert phase(controller) == "in"
    moved = rules(switch, "br-hv2", controller, SEND_KIND)
    assert moved == sorted(
        r.replace(f"in_port={OLD_PORT},", f"in_port={NEW_PORT},") for r in sent_before
    )
    assert any(f"output:{NEW_PORT}" in r for r in rules(switch, "br-hv2", controller, RECEIVE_KIND))
    assert rules(switch, "br-hv2", controller, WHERE_KIND) == rules(
        switch, "br-hv1", controller, WHERE_KIND
    )
    assert rules(switch, "br-hv1", controller, SEND_KIND) == sent_before  # the VM still runs there

    vlan = vlan_of(controller)
    switch.tags["br-hv1"] = {4: vlan, 6: vlan + 1}  # a neighbour, a VM of another VLAN
    del switch.plugged["br-hv1"][mac]
    read = reads(switch, monkeypatch)
    engine.port_removed("hv1", mac, OLD_PORT)
    assert read == [], "the send rules were saved when the destination got them"
    assert phase(controller) == "moved"
    assert rules(switch, "br-hv1", controller, SEND_KIND) == []
    assert rules(switch, "br-hv1", controller, RECEIVE_KIND) == received_before
    assert_redirected(rules(switch, "br-hv1", controller, WHERE_KIND), mac, vlan)
    assert list_migrations(controller, "web1")[0].ports[mac] == {"old": OLD_PORT, "new": NEW_PORT}
    assert switch.announced and switch.announced[0][:3] == ("br-hv2", NEW_PORT, mac)

    switch.counts["br-hv2"] = {cookie_of(moved[0]): 3}  # the VM sends from hv2
    engine.tick()
    assert phase(controller) == "done"
    assert all(rules(switch, "br-hv1", controller, kind) == [] for kind in KINDS)
    assert host_of(controller) == "hv2"


def test_source_first_keeps_the_saved_send_rules_for_the_destination(
    controller: Controller, switch: MemorySwitch, engine: MigrationEngine, mac: str
) -> None:
    sent_before = rules(switch, "br-hv1", controller, SEND_KIND)
    received_before = rules(switch, "br-hv1", controller, RECEIVE_KIND)
    where_before = rules(switch, "br-hv1", controller, WHERE_KIND)
    del switch.plugged["br-hv1"][mac]
    engine.port_removed("hv1", mac, OLD_PORT)
    assert phase(controller) == "out"
    assert rules(switch, "br-hv1", controller, SEND_KIND) == []
    assert rules(switch, "br-hv1", controller, WHERE_KIND) == where_before  # to where? unknown
    switch.plugged["br-hv2"] = {mac: NEW_PORT}
    engine.port_added("hv2", mac, NEW_PORT)
    moved = rules(switch, "br-hv2", controller, SEND_KIND)
    assert moved == sorted(
        r.replace(f"in_port={OLD_PORT},", f"in_port={NEW_PORT},") for r in sent_before
    )
    assert rules(switch, "br-hv2", controller, RECEIVE_KIND) == sorted(
        r.replace(f"output:{OLD_PORT}", f"output:{NEW_PORT}") for r in received_before
    )
    assert rules(switch, "br-hv2", controller, WHERE_KIND) == where_before
    assert phase(controller) == "moved"


def test_without_a_peer_link_the_source_lets_go_without_redirecting(
    controller: Controller, switch: MemorySwitch, engine: MigrationEngine, mac: str
) -> None:
    received_before = rules(switch, "br-hv1", controller, RECEIVE_KIND)
    where_before = rules(switch, "br-hv1", controller, WHERE_KIND)
    switch.peers["br-hv1"] = {}
    switch.plugged["br-hv2"] = {mac: NEW_PORT}
    engine.port_added("hv2", mac, NEW_PORT)
    del switch.plugged["br-hv1"][mac]
    engine.port_removed("hv1", mac, OLD_PORT)
    assert phase(controller) == "moved"
    assert rules(switch, "br-hv1", controller, SEND_KIND) == []
    assert rules(switch, "br-hv1", controller, WHERE_KIND) == where_before
    assert rules(switch, "br-hv1", controller, RECEIVE_KIND) == received_before


def test_a_destination_port_that_goes_away_rolls_back(
    controller: Controller, switch: MemorySwitch, engine: MigrationEngine, mac: str
) -> None:
    before = switch.flows("br-hv1", 0, 0)
    switch.plugged["br-hv2"] = {mac: NEW_PORT}
    engine.port_added("hv2", mac, NEW_PORT)
    del switch.plugged["br-hv2"][mac]
    engine.port_removed("hv2", mac, NEW_PORT)
    assert phase(controller) == "rolled-back"
    assert all(cookie_of(r) >> 48 == BASE_KIND for r in switch.flows("br-hv2", 0, 0))
    assert switch.flows("br-hv1", 0, 0) == before
    assert host_of(controller) == "hv1"


def test_a_vm_whose_destination_never_shows_rolls_back_after_the_timeout(
    controller: Controller, switch: MemorySwitch, engine: MigrationEngine, mac: str
) -> None:
    del switch.plugged["br-hv1"][mac]
    engine.port_removed("hv1", mac, OLD_PORT)
    switch.plugged["br-hv1"][mac] = 6  # it comes back on its source, on a new port
    engine.port_added("hv1", mac, 6)
    assert phase(controller) == "rolled-back"
    assert all("in_port=6" in r for r in rules(switch, "br-hv1", controller, SEND_KIND))


def test_a_move_out_of_time_rolls_back(
    controller: Controller, switch: MemorySwitch, engine: MigrationEngine, mac: str
) -> None:
    switch.plugged["br-hv2"] = {mac: NEW_PORT}
    engine.port_added("hv2", mac, NEW_PORT)
    time.sleep(0.6)
    engine.tick()
    view = list_migrations(controller, "web1")[0]
    assert view.phase == "rolled-back" and "did not complete within 0.5 s" in str(view.detail)


def test_a_restarted_controller_finishes_a_move_the_switch_completed(
    controller: Controller, switch: MemorySwitch, engine: MigrationEngine, mac: str
) -> None:
    switch.plugged["br-hv2"] = {mac: NEW_PORT}
    engine.port_added("hv2", mac, NEW_PORT)
    del switch.plugged["br-hv1"][mac]  # the controller was down when the source port went
    restarted = MigrationEngine(controller, MigrationSettings(timeout_s=0.5, grace_s=0.0))
    restarted.resume()
    assert phase(controller) == "moved"
    restarted.tick()
    assert phase(controller) == "done" and host_of(controller) == "hv2"


def test_a_restarted_controller_rolls_back_a_move_abandoned_while_it_was_down(
    controller: Controller, switch: MemorySwitch, engine: MigrationEngine, mac: str
) -> None:
    sent_before = rules(switch, "br-hv1", controller, SEND_KIND)
    switch.plugged["br-hv2"] = {mac: NEW_PORT}
    engine.port_added("hv2", mac, NEW_PORT)
    del switch.plugged["br-hv2"][mac]  # the controller was down when the move was aborted
    restarted = MigrationEngine(controller, MigrationSettings(timeout_s=30, grace_s=0.0))
    restarted.resume()
    view = list_migrations(controller, "web1")[0]
    assert view.phase == "rolled-back" and "back on its source" in str(view.detail)
    assert rules(switch, "br-hv1", controller, SEND_KIND) == sent_before
    assert all(rules(switch, "br-hv2", controller, kind) == [] for kind in KINDS)
    assert host_of(controller) == "hv1"


@pytest.mark.parametrize(
    ("body", "status", "detail"),
    [
        ({"to": "hv9"}, 404, "unknown host 'hv9'"),
        ({"to": "hv1"}, 409, "runs on hv1 already"),
        ({"to": "hv3"}, 400, "cannot move from a noop host to a lab host"),
        ({"too": "hv2"}, 400, "too"),
    ],
)
def test_bad_migrations_are_refused_and_change_nothing(
    api: TestClient, switch: MemorySwitch, mac: str, body: dict[str, str], status: int, detail: str
) -> None:
    changes = switch.changes
    response = api.post("/api/v1/vms/web1/migrate", json=body)
    assert response.status_code == status, response.text
    assert detail in response.json()["detail"]
    assert api.get("/api/v1/migrations").json() == []
    assert switch.changes == changes


def test_a_move_to_an_unreachable_host_is_refused_and_changes_nothing(
    api: TestClient, switch: MemorySwitch, mac: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    plugged = switch.ports

    def ports(bridge: str) -> dict[str, int]:
        if bridge == "br-hv2":
            raise VswitchError("br-hv2: database connection failed (Connection refused)")
        return plugged(bridge)

    monkeypatch.setattr(switch, "ports", ports)
    changes = switch.changes
    refused = api.post("/api/v1/vms/web1/migrate", json={"to": "hv2"})
    assert refused.status_code == 503, refused.text
    assert "host hv2 is unreachable: br-hv2: database connection failed" in refused.json()["detail"]
    assert refused.headers["content-type"] == "application/problem+json"
    assert api.get("/api/v1/migrations").json() == []
    assert switch.changes == changes


def test_a_stopped_or_unknown_vm_does_not_migrate(api: TestClient, mac: str) -> None:
    assert api.post("/api/v1/vms/nobody/migrate", json={"to": "hv2"}).status_code == 404
    assert api.post("/api/v1/vms/web1/stop").status_code == 200
    refused = api.post("/api/v1/vms/web1/migrate", json={"to": "hv2"})
    assert refused.status_code == 409 and "only a running VM migrates" in refused.json()["detail"]
