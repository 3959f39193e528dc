"""Prometheus metrics of the controller."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from vmfabric.access.channels import STATS as GATEWAY
from vmfabric.domain.checks import CheckResult
from vmfabric.domain.model import VmState
from vmfabric.services.access import use_counts
from vmfabric.services.checks import Checker, check_status, run_checks
from vmfabric.services.context import Controller
from vmfabric.services.migrations import MigrationView
from vmfabric.store.tables import (
    Allocation,
    GroupBlock,
    GuestAddress,
    Lease,
    Network,
    Nic,
    Subnet,
    Vm,
)

registry = CollectorRegistry()

VM_OPERATIONS = Counter(
    "vmfabric_vm_operations",
    "VM operations by kind and outcome",
    ["operation", "outcome"],
    registry=registry,
)
VM_CREATE_SECONDS = Histogram(
    "vmfabric_vm_create_seconds",
    "Time to create a VM: preset, define, reserve, start",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
    registry=registry,
)
GROUP_OPERATIONS = Counter(
    "vmfabric_group_operations",
    "Blocks and unblocks of groups and images, by outcome",
    ["operation", "outcome"],
    registry=registry,
)
POLICY_OPERATIONS = Counter(
    "vmfabric_policy_operations",
    "Policy creates, changes, deletes, attaches and detaches, by outcome",
    ["operation", "outcome"],
    registry=registry,
)
MIGRATIONS = Counter(
    "vmfabric_migrations",
    "VM migrations by how they ended (done, rolled-back) and who started them (api, switch)",
    ["outcome", "asked_by"],
    registry=registry,
)
MIGRATION_SECONDS = Histogram(
    "vmfabric_migration_seconds",
    "Time from a migration's start to its end, rules moved and source cleaned (or rolled back)",
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60),
    registry=registry,
)
CHECK_SWEEP_SECONDS = Histogram(
    "vmfabric_check_sweep_seconds",
    "Time to check the running VMs through their guest agents, one sweep",
    buckets=(0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120),
    registry=registry,
)
LEASE_EVENTS = Counter(
    "vmfabric_lease_events",
    "DHCP lease events received, by action and whether they changed anything",
    ["action", "changed"],
    registry=registry,
)

ACCESS_GRANTS = Counter(
    "vmfabric_access_grants",
    "Access credentials asked for, by outcome (ok, error)",
    ["outcome"],
    registry=registry,
)


class AccessUseCollector(Collector):
    """Uses of access credentials at the gateway, as `services.access` counts them (the
    gateway logs them there, below this layer)."""

    def collect(self) -> Iterator[CounterMetricFamily]:
        """One sample per kind and outcome seen."""
        uses = CounterMetricFamily(
            "vmfabric_access_uses",
            "Uses of access credentials at the gateway, by kind (http, tcp) and outcome",
            labels=["kind", "outcome"],
        )
        for (kind, outcome), count in sorted(use_counts().items()):
            uses.add_metric([kind, outcome], count)
        yield uses


registry.register(AccessUseCollector())


class GatewayCollector(Collector):
    """The access gateway's channels and streams (`access.channels.STATS`, kept by the
    gateway's loop), read at scrape time."""

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        """Gauges of what is open now, counters of streams, bytes and channel resets."""
        yield GaugeMetricFamily(
            "vmfabric_access_channels",
            "Channels to guest proxies with a session established",
            value=GATEWAY.channels_open,
        )
        yield GaugeMetricFamily(
            "vmfabric_access_streams",
            "Streams open through the gateway",
            value=GATEWAY.streams_open,
        )
        yield CounterMetricFamily(
            "vmfabric_access_streams_opened",
            "Streams opened through the gateway (one per HTTP request or TCP tunnel)",
            value=GATEWAY.streams_opened,
        )
        forwarded = CounterMetricFamily(
            "vmfabric_access_bytes",
            "Stream bytes forwarded by the gateway, by direction (to-vm, from-vm)",
            labels=["direction"],
        )
        forwarded.add_metric(["to-vm"], GATEWAY.bytes_to_vm)
        forwarded.add_metric(["from-vm"], GATEWAY.bytes_from_vm)
        yield forwarded
        resets = CounterMetricFamily(
            "vmfabric_access_channel_resets",
            "Channel sessions reset (all their streams with them), by reason",
            labels=["reason"],
        )
        for reason, count in sorted(dict(GATEWAY.channel_resets).items()):
            resets.add_metric([reason], count)
        yield resets


registry.register(GatewayCollector())


class StateCollector(Collector):
    """Gauges read from the store at scrape time: subnet use and VMs by state."""

    def __init__(self, ctl: Controller) -> None:
        self._ctl = ctl

    def collect(self) -> Iterator[GaugeMetricFamily]:
        """One sample per subnet and per VM state."""
        used = GaugeMetricFamily(
            "vmfabric_subnet_addresses_used", "Addresses given to NICs", labels=["network", "cidr"]
        )
        capacity = GaugeMetricFamily(
            "vmfabric_subnet_addresses_capacity",
            "Addresses a subnet can give to NICs",
            labels=["network", "cidr"],
        )
        vms = GaugeMetricFamily("vmfabric_vms", "VMs by state", labels=["state"])
        blocks = GaugeMetricFamily(
            "vmfabric_group_blocks", "Blocks in force, by scope", labels=["scope"]
        )
        registered = GaugeMetricFamily(
            "vmfabric_registered_addresses",
            "Addresses of running VMs named in DNS, by where they were learnt",
            labels=["source"],
        )
        with self._ctl.uow() as uow:
            rows = uow.session.execute(
                select(Network.name, Subnet.cidr, func.count(Allocation.id), Subnet.capacity)
                .join(Network)
                .outerjoin(Allocation, Allocation.subnet_id == Subnet.id)
                .group_by(Subnet.id, Network.name)
            )
            for network, cidr, in_use, size in rows:
                used.add_metric([network, cidr], in_use)
                capacity.add_metric([network, cidr], float(size))
            for state, count in uow.session.execute(
                select(Vm.state, func.count()).group_by(Vm.state)
            ):
                vms.add_metric([state], count)
            for scope, count in uow.session.execute(
                select(GroupBlock.scope, func.count()).group_by(GroupBlock.scope)
            ):
                blocks.add_metric([scope], count)
            for source, table in (("lease", Lease), ("guest", GuestAddress)):
                registered.add_metric([source], _registered(uow.session, table))
        yield used
        yield capacity
        yield vms
        yield blocks
        yield registered
        yield from _check_states(self._ctl)


def _check_states(ctl: Controller) -> Iterator[GaugeMetricFamily]:
    """The latest check of each VM: 1 on the state it is in, so alerts can match on it."""
    agent = GaugeMetricFamily(
        "vmfabric_check_agent", "Guest agent state at the last check", labels=["vm", "state"]
    )
    reach = GaugeMetricFamily(
        "vmfabric_check_reach",
        "Gateway and outside reachability of each NIC at the last check",
        labels=["vm", "mac", "target", "state"],
    )
    for result in check_status(ctl):
        agent.add_metric([result.vm, result.agent.value], 1)
        for nic in result.nics:
            reach.add_metric([result.vm, nic.mac, "gateway", nic.gateway.value], 1)
            reach.add_metric([result.vm, nic.mac, "external", nic.external.value], 1)
    yield agent
    yield reach


def _registered(session: Session, table: type[Lease] | type[GuestAddress]) -> int:
    """Addresses of running VMs' NICs from leases or from guest agents."""
    query = select(func.count()).select_from(Vm).join(Nic, Nic.vm_id == Vm.id)
    if table is Lease:
        query = query.join(Lease, (Lease.mac == Nic.mac) & (Lease.network_id == Nic.network_id))
    else:
        query = query.join(GuestAddress, GuestAddress.nic_id == Nic.id)
    return int(session.scalar(query.where(Vm.state == VmState.RUNNING.value)) or 0)


def timed_checks(ctl: Controller, checker: Checker, vm: str | None = None) -> list[CheckResult]:
    """`run_checks`, its duration observed (periodic sweeps and `check run` alike)."""
    with CHECK_SWEEP_SECONDS.time():
        return run_checks(ctl, checker, vm)


def count_migration(migration: MigrationView) -> None:
    """A migration that ended: counted by outcome, its duration observed."""
    MIGRATIONS.labels(migration.phase, migration.asked_by).inc()
    if migration.seconds is not None:
        MIGRATION_SECONDS.observe(migration.seconds)


def exposition(ctl: Controller) -> bytes:
    """The text exposition of the process's counters and the store's gauges."""
    state = CollectorRegistry()
    state.register(StateCollector(ctl))
    return generate_latest(registry) + generate_latest(state)
