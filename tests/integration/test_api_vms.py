"""The patent's IP presetting through the API, with bad input refused and nothing changed."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, replace
from typing import Any

import pytest
from fastapi.testclient import TestClient

from vmfabric.domain.model import DefinedVm, VmSpec
from vmfabric.hypervisor import Hypervisor
from vmfabric.hypervisor.noop import NoopHypervisor
from vmfabric.services.context import Controller, HostRef


def setup_cloud(api: TestClient, cidrs: list[str] | None = None, **network: Any) -> None:
    for host in ("hv1", "hv2"):
        assert api.post("/api/v1/hosts", json={"name": host, "driver": "noop", "bridge": "br0"})
    body = {"name": "net1", "cidrs": cidrs or ["10.0.0.0/24"], **network}
    response = api.post("/api/v1/networks", json=body)
    assert response.status_code == 201, response.text


def create(api: TestClient, name: str, address: str | None = None, host: str = "hv1") -> Any:
    body = {"name": name, "host": host, "nics": [{"network": "net1", "address": address}]}
    return api.post("/api/v1/vms", json=body)


def snapshot(api: TestClient) -> tuple[Any, Any]:
    return api.get("/api/v1/vms").json(), api.get("/api/v1/networks").json()


def test_named_and_automatic_addresses_are_preset_and_reserved(
    api: TestClient, controller: Controller
) -> None:
    setup_cloud(api)
    named = create(api, "web", "10.0.0.50")
    auto = create(api, "db", host="hv2")
    assert named.status_code == 201, named.text
    assert auto.status_code == 201, auto.text
    web, db = named.json(), auto.json()
    assert web["nics"][0]["ipv4"] == "10.0.0.50"
    assert db["nics"][0]["ipv4"] == "10.0.0.2"
    assert web["state"] == "running"
    assert web["nics"][0]["gateway"] == "10.0.0.1"
    assert web["nics"][0]["mac"].startswith("52:54:00:")
    served = controller.dhcp.reservations("net1")  # type: ignore[attr-defined]
    assert {(r.mac, r.ipv4, r.hostname) for r in served} == {
        (web["nics"][0]["mac"], "10.0.0.50", "web"),
        (db["nics"][0]["mac"], "10.0.0.2", "db"),
    }


def test_global_vm_list_has_every_field_of_the_spec(api: TestClient) -> None:
    setup_cloud(api)
    create(api, "web", "10.0.0.50")
    (vm,) = api.get("/api/v1/vms").json()
    assert {"name", "host", "image", "state", "nics"} <= vm.keys()
    assert {"network", "mac", "ipv4", "ipv6", "gateway"} <= vm["nics"][0].keys()


@pytest.mark.parametrize(
    ("address", "status", "detail"),
    [
        ("10.9.0.5", 400, "outside the subnets"),
        ("10.0.0.1", 400, "gateway"),
        ("10.0.0.255", 400, "broadcast"),
        ("10.0.0.0", 400, "network address"),
        ("10.0.0.254", 400, "DHCP server"),
        ("10.0.0.12", 400, "reserved range"),
        ("10.0.0.50", 409, "already in use by VM 'first'"),
        ("not-an-ip", 400, "invalid IP address"),
    ],
)
def test_bad_addresses_are_refused_and_change_nothing(
    api: TestClient, address: str, status: int, detail: str
) -> None:
    setup_cloud(api, reserved=["10.0.0.10-10.0.0.20"])
    assert create(api, "first", "10.0.0.50").status_code == 201
    before = snapshot(api)
    response = create(api, "second", address)
    assert response.status_code == status
    assert response.headers["content-type"] == "application/problem+json"
    assert detail in response.json()["detail"]
    assert snapshot(api) == before


@pytest.mark.parametrize(
    ("body", "status", "detail"),
    [
        ({"host": "hv9"}, 404, "unknown host 'hv9'"),
        ({"nics": [{"network": "nope"}]}, 404, "unknown network 'nope'"),
        ({"name": "Bad_Name"}, 400, "invalid VM name"),
        ({"name": "first"}, 409, "VM 'first' already exists"),
        ({"image": "-x"}, 400, "invalid image name"),
        ({"nics": []}, 400, "nics"),
    ],
)
def test_bad_requests_are_refused_and_change_nothing(
    api: TestClient, body: dict[str, Any], status: int, detail: str
) -> None:
    setup_cloud(api)
    assert create(api, "first").status_code == 201
    before = snapshot(api)
    request = {"name": "second", "host": "hv1", "nics": [{"network": "net1"}], **body}
    response = api.post("/api/v1/vms", json=request)
    assert response.status_code == status, response.text
    assert detail in response.json()["detail"]
    assert snapshot(api) == before


def test_exhausted_subnet_says_which_and_how_full(api: TestClient) -> None:
    setup_cloud(api, cidrs=["10.0.0.0/29"])
    for index in range(4):
        assert create(api, f"vm{index}").status_code == 201
    before = snapshot(api)
    response = create(api, "extra")
    assert response.status_code == 409
    problem = response.json()
    assert "10.0.0.0/29 has 4 of 4 addresses in use" in problem["detail"]
    assert problem["subnets"] == [{"cidr": "10.0.0.0/29", "used": 4, "capacity": 4}]
    assert snapshot(api) == before


def test_second_subnet_takes_over_when_first_is_full(api: TestClient) -> None:
    setup_cloud(api, cidrs=["10.0.0.0/29", "10.0.1.0/29"])
    addresses = [create(api, f"vm{i}").json()["nics"][0]["ipv4"] for i in range(5)]
    assert addresses[-1] == "10.0.1.2"


def test_delete_releases_the_address_and_reservation(
    api: TestClient, controller: Controller
) -> None:
    setup_cloud(api)
    assert create(api, "a").json()["nics"][0]["ipv4"] == "10.0.0.2"
    assert api.delete("/api/v1/vms/a").status_code == 204
    assert controller.dhcp.reservations("net1") == []  # type: ignore[attr-defined]
    assert create(api, "b").json()["nics"][0]["ipv4"] == "10.0.0.2"
    subnet = api.get("/api/v1/networks/net1").json()["subnets"][0]
    assert subnet["used"] == 1


def test_set_ip_moves_address_and_reservation(api: TestClient, controller: Controller) -> None:
    setup_cloud(api)
    create(api, "a", "10.0.0.50")
    create(api, "b", "10.0.0.60")
    refused = api.post("/api/v1/vms/a/set-ip", json={"address": "10.0.0.60"})
    assert refused.status_code == 409
    moved = api.post("/api/v1/vms/a/set-ip", json={"address": "10.0.0.70"})
    assert moved.status_code == 200, moved.text
    assert moved.json()["nics"][0]["ipv4"] == "10.0.0.70"
    served = {r.hostname: r.ipv4 for r in controller.dhcp.reservations("net1")}  # type: ignore[attr-defined]
    assert served == {"a": "10.0.0.70", "b": "10.0.0.60"}
    assert create(api, "c", "10.0.0.50").status_code == 201


def test_several_nics_and_ipv6(api: TestClient) -> None:
    setup_cloud(api, cidrs=["10.0.0.0/24", "fd00:1::/64"])
    api.post(
        "/api/v1/networks",
        json={"name": "net6", "cidrs": ["fd00:2::/120"], "ipv6_mode": "dhcpv6"},
    )
    body = {
        "name": "multi",
        "host": "hv1",
        "nics": [{"network": "net1"}, {"network": "net6", "address": "fd00:2::10"}],
    }
    vm = api.post("/api/v1/vms", json=body).json()
    first, second = vm["nics"]
    mac = first["mac"].split(":")
    assert first["ipv4"] == "10.0.0.2"
    expected = f"fd00:1::{int(mac[0], 16) ^ 2:02x}{mac[1]}:{mac[2]}ff:fe{mac[3]}:{mac[4]}{mac[5]}"
    assert ipaddress.ip_address(first["ipv6"]) == ipaddress.ip_address(expected)
    assert second["ipv6"] == "fd00:2::10"
    assert second["ipv4"] is None


def test_network_bad_input(api: TestClient) -> None:
    setup_cloud(api)
    cases = [
        ({"name": "n2", "cidrs": ["10.0.0.128/25"]}, 409, "overlaps 10.0.0.0/24"),
        ({"name": "n2", "cidrs": ["10.1.0.1/24"]}, 400, "did you mean 10.1.0.0/24"),
        ({"name": "n2", "cidrs": ["10.1.0.0/24"], "kind": "dmz"}, 400, "invalid kind"),
        ({"name": "n2", "cidrs": ["10.1.0.0/24"], "gateways": ["10.2.0.1"]}, 400, "gateway"),
        ({"name": "net1", "cidrs": ["10.1.0.0/24"]}, 409, "already exists"),
    ]
    for body, status, detail in cases:
        response = api.post("/api/v1/networks", json=body)
        assert response.status_code == status, (body, response.text)
        assert detail in response.json()["detail"]
    assert [n["name"] for n in api.get("/api/v1/networks").json()] == ["net1"]


def test_network_in_use_cannot_be_deleted(api: TestClient) -> None:
    setup_cloud(api)
    create(api, "a")
    response = api.delete("/api/v1/networks/net1")
    assert response.status_code == 409
    assert "still has VMs: a" in response.json()["detail"]
    api.delete("/api/v1/vms/a")
    assert api.delete("/api/v1/networks/net1").status_code == 204


def test_openapi_and_metrics(api: TestClient) -> None:
    setup_cloud(api)
    create(api, "a")
    assert "/api/v1/vms" in api.get("/api/v1/openapi.json").json()["paths"]
    metrics = api.get("/metrics").text
    assert 'vmfabric_subnet_addresses_used{cidr="10.0.0.0/24",network="net1"} 1.0' in metrics
    assert 'vmfabric_vm_operations_total{operation="create",outcome="ok"}' in metrics


def test_host_list_counts_vms(api: TestClient) -> None:
    setup_cloud(api)
    create(api, "a", host="hv2")
    hosts = {h["name"]: h["vms"] for h in api.get("/api/v1/hosts").json()}
    assert hosts == {"hv1": 0, "hv2": 1}
    duplicate = {"name": "hv1", "driver": "noop", "bridge": "x"}
    assert api.post("/api/v1/hosts", json=duplicate).status_code == 409


class CollidingHypervisor(NoopHypervisor):
    """Chooses `taken` as the MAC of the first `times` VMs it defines, as hosts now and then do."""

    def __init__(self, taken: str, times: int) -> None:
        super().__init__()
        self.taken, self.times, self.defines = taken, times, 0

    def define(self, spec: VmSpec) -> DefinedVm:
        self.defines += 1
        if self.defines <= self.times:
            pinned = tuple(replace(nic, mac=self.taken) for nic in spec.nics)
            return super().define(replace(spec, nics=pinned))
        return super().define(spec)


def colliding_host(controller: Controller, api: TestClient, times: int) -> CollidingHypervisor:
    setup_cloud(api)
    taken = create(api, "first").json()["nics"][0]["mac"]
    hypervisor = CollidingHypervisor(taken, times)
    controller.agents = FixedAgents(hypervisor)
    return hypervisor


@dataclass
class FixedAgents:
    hypervisor_of_every_host: Hypervisor

    def hypervisor(self, host: HostRef) -> Hypervisor:
        return self.hypervisor_of_every_host

    def vswitch(self, host: HostRef) -> None:
        return None


def test_a_mac_already_in_use_makes_the_host_define_the_vm_again(
    api: TestClient, controller: Controller
) -> None:
    hypervisor = colliding_host(controller, api, times=1)
    response = create(api, "second")
    assert response.status_code == 201, response.text
    macs = [vm["nics"][0]["mac"] for vm in api.get("/api/v1/vms").json()]
    assert len(set(macs)) == 2
    assert hypervisor.defines == 2
    assert [vm.name for vm in hypervisor.list_vms()] == ["second"]


def test_a_host_that_keeps_choosing_taken_macs_gets_a_conflict_and_nothing_stays(
    api: TestClient, controller: Controller
) -> None:
    hypervisor = colliding_host(controller, api, times=99)
    before = snapshot(api)
    response = create(api, "second")
    assert response.status_code == 409
    assert "MACs already in use" in response.json()["detail"]
    assert snapshot(api) == before
    assert hypervisor.list_vms() == []


def test_create_answers_with_the_same_vm_that_show_returns(api: TestClient) -> None:
    setup_cloud(api)
    created = create(api, "first", "10.0.0.50").json()
    assert created == api.get("/api/v1/vms/first").json()
    assert created["created_at"].endswith("Z")
