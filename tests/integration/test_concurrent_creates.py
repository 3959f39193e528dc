"""Two controller processes share one database: no address twice, nothing leaked on SIGKILL."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

import httpx
import pytest
from sqlalchemy import create_engine, func, select

from vmfabric.dhcp.dnsmasq import DnsmasqServer
from vmfabric.domain.ipam import key_value
from vmfabric.store.tables import Allocation, FreeRange, Subnet, Vm


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class Controller:
    """A `vmfabric serve` process on a port of its own."""

    def __init__(self, state: Path, db: str) -> None:
        self.state, self.db = state, db
        self.url = f"http://127.0.0.1:{free_port()}"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        env = {**os.environ, "VMFABRIC_STATE": str(self.state)}
        listen = self.url.removeprefix("http://")
        log = (self.state / f"controller-{listen.replace(':', '_')}.log").open("ab")
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "vmfabric.cli.main",
                "serve",
                "--db",
                self.db,
                "--listen",
                listen,
                "--dns-listen",
                "127.0.0.1:0",
            ],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                httpx.get(f"{self.url}/api/v1/info", timeout=1).raise_for_status()
                return
            except httpx.HTTPError:
                time.sleep(0.1)
        raise RuntimeError(f"controller at {self.url} did not start")

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=10)


@pytest.fixture(params=["sqlite", "postgresql"])
def two_controllers(
    state: Path, request: pytest.FixtureRequest
) -> Iterator[tuple[Controller, Controller]]:
    """Two controller processes sharing one database, SQLite or PostgreSQL."""
    if request.param == "postgresql":
        db = request.getfixturevalue("postgresql_url")
    else:
        db = f"sqlite:///{state / 'shared.db'}"
    pair = (Controller(state, db), Controller(state, db))
    try:
        for controller in pair:
            controller.start()
        yield pair
    finally:
        for controller in pair:
            controller.stop()


def prepare(url: str, cidr: str = "10.20.0.0/24") -> None:
    httpx.post(f"{url}/api/v1/hosts", json={"name": "hv1", "driver": "noop", "bridge": "br0"})
    response = httpx.post(f"{url}/api/v1/networks", json={"name": "net1", "cidrs": [cidr]})
    assert response.status_code == 201, response.text


def create(url: str, name: str) -> httpx.Response:
    body = {"name": name, "host": "hv1", "nics": [{"network": "net1"}]}
    return httpx.post(f"{url}/api/v1/vms", json=body, timeout=120)


def assert_address_space_consistent(db: str) -> None:
    """Free ranges + allocations cover the subnet exactly once."""
    engine = create_engine(db)
    with engine.connect() as connection:
        for subnet in connection.execute(select(Subnet)).all():
            allocated = {
                key_value(k)
                for k in connection.scalars(
                    select(Allocation.address_key).where(Allocation.subnet_id == subnet.id)
                )
            }
            free = [
                (key_value(a), key_value(b))
                for a, b in connection.execute(
                    select(FreeRange.first_key, FreeRange.last_key).where(
                        FreeRange.subnet_id == subnet.id
                    )
                )
            ]
            free_count = sum(b - a + 1 for a, b in free)
            assert free_count + len(allocated) == int(subnet.capacity)
            assert not any(a <= v <= b for v in allocated for a, b in free)
    engine.dispose()


def test_200_concurrent_creates_on_two_controllers_never_share_an_address(
    two_controllers: tuple[Controller, Controller],
) -> None:
    first, second = two_controllers
    prepare(first.url)
    urls = [first.url, second.url]
    with ThreadPoolExecutor(max_workers=50) as pool:
        responses = list(pool.map(lambda i: create(urls[i % 2], f"vm{i}"), range(200)))
    assert [r.status_code for r in responses] == [201] * 200
    addresses = [r.json()["nics"][0]["ipv4"] for r in responses]
    assert len(set(addresses)) == 200
    listed = httpx.get(f"{second.url}/api/v1/vms").json()
    assert sorted(v["nics"][0]["ipv4"] for v in listed) == sorted(addresses)
    assert_address_space_consistent(first.db)


def test_sigkill_in_the_middle_of_creates_leaks_nothing(state: Path) -> None:
    db = f"sqlite:///{state / 'killed.db'}"
    controller = Controller(state, db)
    controller.start()
    try:
        prepare(controller.url)
        with ThreadPoolExecutor(max_workers=20) as pool:
            futures = [pool.submit(create, controller.url, f"vm{i}") for i in range(120)]
            finished = as_completed(futures)
            for _ in range(10):
                next(finished)
            controller.kill()
            outcomes = []
            for future in futures:
                try:
                    outcomes.append(future.result())
                except httpx.HTTPError:
                    outcomes.append(None)
        created = {
            f"vm{i}" for i, r in enumerate(outcomes) if r is not None and r.status_code == 201
        }
        assert created, "the kill came before any create finished; the test proves nothing"
        controller.start()
        listed = {v["name"]: v for v in httpx.get(f"{controller.url}/api/v1/vms").json()}
        assert created <= listed.keys()
        assert all(v["state"] == "running" for v in listed.values())
        engine = create_engine(db)
        with engine.connect() as connection:
            assert connection.scalar(select(func.count()).select_from(Vm)) == len(listed)
        engine.dispose()
        assert_address_space_consistent(db)
        dhcp = DnsmasqServer(state / "dhcp", state / "lease.sock", supervise_interval=None)
        served = {(r.mac, r.ipv4) for r in dhcp.reservations("net1")}
        dhcp.close()
        assert served == {(n["mac"], n["ipv4"]) for v in listed.values() for n in v["nics"]}
    finally:
        controller.stop()
