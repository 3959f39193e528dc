"""Registrations follow leases and VM states into the DNS server, checked with the real `dig`."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from vmfabric.dns.server import DnsServer, ServerThread
from vmfabric.domain.dns_records import Registration
from vmfabric.domain.model import LeaseAction, LeaseEvent
from vmfabric.lab.testing import dig_short
from vmfabric.services.context import Controller
from vmfabric.services.leases import record_lease_event, sync_leases
from vmfabric.services.registrations import NamePublisher, registrations

ZONE = "vmfabric.test"


@pytest.fixture
def dns(controller: Controller) -> Iterator[int]:
    """A DNS server fed by the controller's name publisher; its port."""
    with ServerThread(DnsServer(("127.0.0.1", 0), nameserver=f"ns.{ZONE}")) as server:
        publisher = NamePublisher(controller, server, ZONE)
        publisher.publish_now()
        controller.names_changed = publisher.changed
        try:
            yield server.port
        finally:
            publisher.close()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def eventually(port: int, query: list[str], wanted: set[str]) -> None:
    """`dig` answers `wanted` within a second."""
    deadline = time.monotonic() + 1.0
    while (answer := dig_short(port, *query)) != wanted and time.monotonic() < deadline:
        time.sleep(0.02)
    assert answer == wanted, query


def cloud(api: TestClient) -> dict[str, str]:
    """Two hosts, one network, three VMs of two images; their MACs by name."""
    for host in ("hv1", "hv2"):
        api.post("/api/v1/hosts", json={"name": host, "driver": "noop", "bridge": "br0"})
    api.post("/api/v1/networks", json={"name": "net1", "cidrs": ["10.0.0.0/24"]})
    macs = {}
    for name, host, image in (
        ("a", "hv1", "debian12"),
        ("b", "hv1", "debian12"),
        ("c", "hv2", "alpine"),
    ):
        body = {"name": name, "host": host, "image": image, "nics": [{"network": "net1"}]}
        macs[name] = api.post("/api/v1/vms", json=body).json()["nics"][0]["mac"]
    return macs


def lease(controller: Controller, action: LeaseAction, mac: str, address: str) -> None:
    record_lease_event(controller, LeaseEvent("net1", action, mac, address, None, None))


def test_leases_of_running_vms_are_their_registrations(
    api: TestClient, controller: Controller
) -> None:
    macs = cloud(api)
    lease(controller, LeaseAction.ADD, macs["a"], "10.0.0.2")
    lease(controller, LeaseAction.ADD, macs["c"], "10.0.0.4")
    assert registrations(controller) == [
        Registration("a", "hv1", "debian12", ("10.0.0.2",)),
        Registration("b", "hv1", "debian12", ()),
        Registration("c", "hv2", "alpine", ("10.0.0.4",)),
    ]
    assert api.get("/api/v1/registrations").json()[0] == {
        "vm": "a",
        "host": "hv1",
        "image": "debian12",
        "group": "hv1-debian12",
        "addresses": ["10.0.0.2"],
    }
    assert 'vmfabric_registered_addresses{source="lease"} 2.0' in api.get("/metrics").text
    api.post("/api/v1/vms/a/stop")
    assert [r.vm for r in registrations(controller)] == ["b", "c"]
    assert 'vmfabric_registered_addresses{source="lease"} 1.0' in api.get("/metrics").text


def test_names_follow_leases_and_vms_within_a_second(
    api: TestClient, controller: Controller, dns: int
) -> None:
    assert dig_short(dns, "SOA", "0.0.10.in-addr.arpa") == set()  # no network yet
    macs = cloud(api)
    deadline = time.monotonic() + 1.0  # the network's reverse zone comes with it
    while not (soa := dig_short(dns, "SOA", "0.0.10.in-addr.arpa")) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert next(iter(soa)).startswith("ns.vmfabric.test. hostmaster.0.0.10.in-addr.arpa. ")
    lease(controller, LeaseAction.ADD, macs["a"], "10.0.0.2")
    lease(controller, LeaseAction.ADD, macs["b"], "10.0.0.3")
    lease(controller, LeaseAction.ADD, macs["c"], "10.0.0.4")
    eventually(dns, ["a.vmfabric.test"], {"10.0.0.2"})
    eventually(dns, ["hv1-debian12.vmfabric.test"], {"10.0.0.2", "10.0.0.3"})
    eventually(dns, ["-x", "10.0.0.4"], {"c.vmfabric.test."})
    eventually(
        dns, ["SRV", "_vmgroups._udp.hv1.vmfabric.test"], {"0 0 0 hv1-debian12.vmfabric.test."}
    )
    lease(controller, LeaseAction.DEL, macs["a"], "10.0.0.2")
    eventually(dns, ["a.vmfabric.test"], set())
    eventually(dns, ["hv1-debian12.vmfabric.test"], {"10.0.0.3"})
    api.delete("/api/v1/vms/b")
    eventually(dns, ["hv1-debian12.vmfabric.test"], set())
    eventually(dns, ["-x", "10.0.0.3"], set())
    api.post("/api/v1/vms/c/stop")
    eventually(dns, ["c.vmfabric.test"], set())
    api.post("/api/v1/vms/c/start")
    eventually(dns, ["c.vmfabric.test"], {"10.0.0.4"})
    sync_leases(controller, "net1", [])  # dnsmasq restarted without leases
    eventually(dns, ["c.vmfabric.test"], set())


def test_serve_answers_for_its_zone_on_the_dns_address(tmp_path: Path) -> None:
    api_port, dns_port = free_port(), free_port()
    listen = ["--listen", f"127.0.0.1:{api_port}", "--dns-listen", f"127.0.0.1:{dns_port}"]
    process = subprocess.Popen(
        [sys.executable, "-m", "vmfabric.cli.main", "serve", *listen, "--zone", "cloud.example"],
        env={**os.environ, "VMFABRIC_STATE": str(tmp_path)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if dig_short(dns_port, "SOA", "cloud.example"):
                break
            time.sleep(0.2)
        assert dig_short(dns_port, "NS", "cloud.example") == {"ns.cloud.example."}
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_blocks_show_as_txt_on_the_group_names(api: TestClient, dns: int) -> None:
    cloud(api)
    blocked = api.post(
        "/api/v1/images/debian12/block", json={"reason": "CVE-2026-0001", "by": "alice"}
    )
    assert blocked.status_code == 200, blocked.text
    mark = {'"vmfabric-blocked" "reason=CVE-2026-0001"'}
    eventually(dns, ["TXT", "hv1-debian12.vmfabric.test"], mark)
    eventually(dns, ["TXT", "hv2-debian12.vmfabric.test"], mark)  # no debian12 VM there yet
    eventually(dns, ["TXT", "hv2-alpine.vmfabric.test"], set())
    api.post("/api/v1/images/debian12/unblock", json={"by": "bob"})
    eventually(dns, ["TXT", "hv1-debian12.vmfabric.test"], set())
