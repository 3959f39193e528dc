"""Bringing the world back in line with the store when the controller starts."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from vmfabric.domain.errors import Unavailable
from vmfabric.services.context import Controller
from vmfabric.services.groups import enforce_blocks
from vmfabric.services.leases import sync_leases
from vmfabric.services.networks import network_infos, provision
from vmfabric.services.policies import apply_policies
from vmfabric.services.vms import recover_interrupted_creates, resume_vms

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReconcileReport:
    """What a reconcile pass did, for the log and for tests."""

    undone_creates: list[str]
    networks: list[str]
    resumed_vms: list[str]
    quarantine_rules: dict[str, int]
    policy_rules: dict[str, int]


def reconcile(ctl: Controller) -> ReconcileReport:
    """Undo interrupted creates, rebuild each network's gateway, DHCP and reservations, catch
    up on the leases its DHCP server handed out meanwhile, put the quarantine rules of
    blocked groups back on every switch (a restarted switch has lost them), start VMs that
    should run, and make every switch hold exactly the policy rules of its VMs."""
    undone = recover_interrupted_creates(ctl)
    networks = network_infos(ctl)
    lease_changes = 0
    for network in networks:
        provision(ctl, network)
        lease_changes += sync_leases(ctl, network.name, ctl.dhcp.leases(network.name))
    try:
        rules = enforce_blocks(ctl)
    except Unavailable as error:
        log.error("%s", error.detail)
        rules = {}
    resumed = resume_vms(ctl)
    try:
        policy_rules = apply_policies(ctl)
    except Unavailable as error:
        log.error("%s", error.detail)
        policy_rules = {}
    log.info(
        "reconciled %d networks (%d lease changes caught up), undid %d interrupted creates, "
        "started %d VMs that should run",
        len(networks),
        lease_changes,
        len(undone),
        len(resumed),
    )
    return ReconcileReport(undone, [n.name for n in networks], resumed, rules, policy_rules)
