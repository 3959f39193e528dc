"""Allocation time in an empty and in a 99%-full /16, through the store-backed allocator.

Prints one JSON line. The full subnet is built with every 100th address left free, scattered
over the whole /16, as a long-lived cloud's subnet looks.

    uv run python bench/bench_ipam.py
"""

from __future__ import annotations

import ipaddress
import json
import statistics
import tempfile
import time
from pathlib import Path

from sqlalchemy import insert
from sqlalchemy.orm import Session, sessionmaker

from vmfabric.domain.ipam import AddressRange, address_key, plan_subnet
from vmfabric.store import allocator, repository
from vmfabric.store.engine import migrate, open_engine, session_factory
from vmfabric.store.tables import Allocation, Host, Network, Nic, Subnet, Vm

SAMPLES = 300
CIDR = "10.64.0.0/16"


def build(sessions: sessionmaker[Session], full: bool) -> int:
    plan = plan_subnet(CIDR)
    with sessions.begin() as session:
        host = Host(name="hv1", driver="noop", bridge="br0")
        network = Network(name="net", kind="internal", vlan=100)
        subnet = Subnet(
            cidr=CIDR,
            version=4,
            gateway=str(plan.gateway),
            dhcp_server=str(plan.dhcp_server),
            capacity=str(plan.capacity()),
        )
        network.subnets.append(subnet)
        session.add_all([host, network])
        session.flush()
        (usable,) = plan.initial_free()
        if full:
            _fill(session, host.id, network.id, subnet, usable)
        else:
            allocator.seed_free_ranges(session.connection(), subnet.id, [usable])
        return subnet.id


def _fill(
    session: Session, host_id: int, network_id: int, subnet: Subnet, usable: AddressRange
) -> None:
    taken = [v for v in range(usable.first, usable.last + 1) if (v - usable.first) % 100 != 0]
    free = [AddressRange(v, v) for v in range(usable.first, usable.last + 1, 100)]
    session.execute(
        insert(Vm),
        [
            {"id": i + 1, "name": f"vm{i}", "host_id": host_id, "image": "x", "state": "running"}
            for i in range(len(taken))
        ],
    )
    session.execute(
        insert(Nic),
        [
            {"id": i + 1, "vm_id": i + 1, "network_id": network_id, "position": 0}
            for i in range(len(taken))
        ],
    )
    session.execute(
        insert(Allocation),
        [
            {
                "subnet_id": subnet.id,
                "nic_id": i + 1,
                "version": 4,
                "address": str(ipaddress.IPv4Address(v)),
                "address_key": address_key(v),
            }
            for i, v in enumerate(taken)
        ],
    )
    allocator.seed_free_ranges(session.connection(), subnet.id, free)


def measure(sessions: sessionmaker[Session], subnet_id: int) -> list[float]:
    with sessions.begin() as session:
        network_id = session.get_one(Subnet, subnet_id).network_id
        vm = Vm(name="bench", host_id=1, image="x", state="running")
        session.add(vm)
        session.flush()
        vm_id = vm.id
    timings = []
    for index in range(SAMPLES):
        started = time.perf_counter()
        with sessions.begin() as session:
            conn = session.connection()
            nic_id = repository.insert_row(
                conn, Nic, {"vm_id": vm_id, "network_id": network_id, "position": index + 1}
            )
            allocator.lock_subnet(conn, subnet_id)
            value = allocator.take_lowest(conn, subnet_id)
            assert value is not None
            allocator.assign(conn, subnet_id, 4, nic_id, value)
        timings.append(time.perf_counter() - started)
    return timings


def run(full: bool) -> list[float]:
    with tempfile.TemporaryDirectory() as tmp:
        engine = open_engine(f"sqlite:///{Path(tmp) / 'bench.db'}")
        migrate(engine)
        sessions = session_factory(engine)
        timings = measure(sessions, build(sessions, full))
        engine.dispose()
        return timings


def main() -> None:
    empty, full = run(False), run(True)
    empty_ms, full_ms = statistics.median(empty) * 1000, statistics.median(full) * 1000
    print(
        json.dumps(
            {
                "bench": "ipam_allocate",
                "subnet": CIDR,
                "samples": SAMPLES,
                "empty_median_ms": round(empty_ms, 3),
                "full99_median_ms": round(full_ms, 3),
                "full99_p99_ms": round(statistics.quantiles(full, n=100)[98] * 1000, 3),
                "ratio_full_over_empty": round(full_ms / empty_ms, 3),
            }
        )
    )


if __name__ == "__main__":
    main()
