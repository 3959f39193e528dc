"""Network policies: written once at a high level, enforced by each VM's host switch.

An operator writes a policy (`domain.policy`: rules by direction, protocol, ports and peer,
defaults, anti-spoofing) and attaches it to VMs or to networks; a NIC follows its VM's policy,
else its network's. Peers named symbolically (a DNS group, a VM, a set of VMs) are resolved
here to the addresses the store gave those VMs, so a rule follows its peers as they come, go
or move. `apply_policies` makes each host's switch hold the compiled rules of the NICs whose
ports it has, and the meters of their rate limits, one atomic change per host, leaving alone
the VMs a migration is moving (the method in `services.migrations` owns their rules until it
ends).
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from vmfabric.domain.dns_records import group_name
from vmfabric.domain.errors import Conflict, InvalidInput, NotFound, Unavailable
from vmfabric.domain.names import check_name
from vmfabric.domain.policy import (
    BASE_KIND,
    KIND_MASK,
    POLICY_KINDS_MASK,
    SEND_KIND,
    VM_RULES_MASK,
    Policy,
    PortFacts,
    base_flows,
    compile_port,
    meter_vm,
    parse_policy,
    peer_references,
    port_meters,
    send_cookie,
    to_document,
    vm_meters,
)
from vmfabric.services.context import Controller, HostRef, transaction
from vmfabric.services.hosts import host_ref
from vmfabric.services.views import as_utc
from vmfabric.store import repository
from vmfabric.store.tables import Network, PolicyAttachment, VmMigration
from vmfabric.store.tables import Policy as PolicyRow
from vmfabric.vswitch import Vswitch, VswitchError, cookie_of, meter_id_of

log = logging.getLogger(__name__)

OPEN_PHASES = ("started", "in", "out", "moved")
"""Phases of a migration whose VM's rules the migration method owns."""

_COOKIE_BITS = 48


@dataclass(frozen=True)
class PolicyView:
    """A policy as `policy show` gives it: its document, where it is attached, and the VMs
    it applies to now (directly or through a network)."""

    name: str
    document: dict[str, Any]
    vms: list[str]
    networks: list[str]
    applies_to: list[str]
    created_at: datetime
    updated_at: datetime


@dataclass(frozen=True)
class Attachment:
    """Where to attach a policy, or detach it from: a VM or a network."""

    vm: str | None = None
    network: str | None = None

    def __post_init__(self) -> None:
        if (self.vm is None) == (self.network is None):
            raise InvalidInput("name one VM or one network to attach a policy to, not both")


@dataclass(frozen=True)
class PolicyNic:
    """A NIC as the compiler needs it, with its VM's host and its position on the VM."""

    vm_id: int
    vm: str
    host: str
    mac: str
    vlan: int
    ipv4: tuple[str, ...]
    ipv6: tuple[str, ...]
    policy: str | None
    position: int


def create_policy(
    ctl: Controller, name: str, document: Mapping[str, Any], attach: Sequence[Attachment] = ()
) -> PolicyView:
    """Store a new policy (and attach it); its VMs' switches get the rules at once.

    Everything is checked first: a malformed or conflicting rule, an unknown peer, VM or
    network, or a VM or network that already has a policy change nothing.
    """
    policy = parse_policy(check_name("policy", name), document)

    def store() -> set[str]:
        with ctl.uow() as uow:
            session = uow.session
            if session.scalar(select(PolicyRow.id).where(PolicyRow.name == name)) is not None:
                raise Conflict(f"policy {name!r} exists already", policy=name)
            _check_peers(session, policy)
            row = PolicyRow(name=name, document=to_document(policy))
            session.add(row)
            session.flush()
            touched = {vm for target in attach for vm in _attach(session, row, target)}
            uow.commit()
            return touched

    _apply_after(ctl, transaction(store))
    return show_policy(ctl, name)


def replace_policy(ctl: Controller, name: str, document: Mapping[str, Any]) -> PolicyView:
    """Give a policy new rules; the VMs it applies to get them at once."""
    policy = parse_policy(name, document)

    def store() -> set[str]:
        with ctl.uow() as uow:
            session = uow.session
            row = _policy_row(session, name)
            _check_peers(session, policy)
            row.document = to_document(policy)
            touched = set(_applies_to(session, name))
            uow.commit()
            return touched

    _apply_after(ctl, transaction(store))
    return show_policy(ctl, name)


def delete_policy(ctl: Controller, name: str) -> None:
    """Remove a policy that nothing is attached to (a VM must not lose its rules by a
    policy's deletion: detach it first, on purpose)."""

    def remove() -> None:
        with ctl.uow() as uow:
            session = uow.session
            row = _policy_row(session, name)
            attached = _attachments(session, row.id)
            if attached:
                where = ", ".join(_where(a) for a in attached)
                raise Conflict(
                    f"policy {name!r} is attached to {where}; detach it first", policy=name
                )
            session.delete(row)
            uow.commit()

    transaction(remove)


def attach_policy(ctl: Controller, name: str, target: Attachment) -> PolicyView:
    """Attach a policy to a VM or a network; attaching it again changes nothing."""

    def store() -> set[str]:
        with ctl.uow() as uow:
            touched = _attach(uow.session, _policy_row(uow.session, name), target)
            uow.commit()
            return touched

    _apply_after(ctl, transaction(store))
    return show_policy(ctl, name)


def detach_policy(ctl: Controller, name: str, target: Attachment) -> PolicyView:
    """Detach a policy from a VM or a network; its VMs lose the rules at once."""

    def store() -> set[str]:
        with ctl.uow() as uow:
            session = uow.session
            row = _policy_row(session, name)
            attachment = _attachment_of(session, target)
            if attachment is None or attachment.policy_id != row.id:
                raise Conflict(f"policy {name!r} is not attached to {_target_text(target)}")
            touched = set(_vms_of(session, attachment))
            session.delete(attachment)
            uow.commit()
            return touched

    _apply_after(ctl, transaction(store))
    return show_policy(ctl, name)


def list_policies(ctl: Controller) -> list[PolicyView]:
    """Every policy, by name."""
    with ctl.uow() as uow:
        rows = uow.session.scalars(select(PolicyRow).order_by(PolicyRow.name)).all()
        return [_view(uow.session, row) for row in rows]


def show_policy(ctl: Controller, name: str) -> PolicyView:
    """One policy, with where it is attached and the VMs it applies to."""
    with ctl.uow() as uow:
        return _view(uow.session, _policy_row(uow.session, name))


def apply_policies(ctl: Controller, vms: Collection[str] | None = None) -> dict[str, int]:
    """Make each host's switch hold the compiled rules of its NICs (every VM's, or these
    VMs'); the number of rules installed per host.

    Without `vms` it reconciles: rules of VMs that are not on a host any more, or have no
    policy, are removed there too. One atomic change per host, so a VM is never left with
    half its rules. Raises Unavailable naming the hosts whose switch failed, after trying
    every host.
    """
    with ctl.uow() as uow:
        session = uow.session
        hosts = [host_ref(h) for h in repository.list_hosts(session)]
        policies = stored_policies(session)
        plan = _Plan(
            nics=policy_nics(session, vms),
            policies=policies,
            peers=resolve_peers(session, policies),
            moving=moving_vms(session),
            reconcile=vms is None,
        )
    if not plan.reconcile and not plan.policies:
        return {}
    counts: dict[str, int] = {}
    failed: list[str] = []
    for host in hosts:
        switch = ctl.agents.vswitch(host)
        in_scope = plan.reconcile or any(n.host == host.name for n in plan.nics)
        if switch is None or not in_scope:
            continue
        try:
            counts[host.name] = _apply_host(switch, host, plan)
        except VswitchError as error:
            log.error("policy rules of host %s not applied: %s", host.name, error)
            failed.append(f"{host.name} ({error})")
    if failed:
        raise Unavailable(
            f"the switch of host {', '.join(failed)} could not be updated; the policies are "
            "stored and are applied again when the controller restarts"
        )
    return counts


def forget_rules(ctl: Controller, host: HostRef, vm_id: int) -> None:
    """Remove a deleted VM's policy rules and meters from its host's switch (its cookie and
    its meter ids come from its id, which the store may give again)."""
    switch = ctl.agents.vswitch(host)
    if switch is None:
        return
    try:
        cookies = [(send_cookie(vm_id), VM_RULES_MASK)]
        switch.change_flows(host.bridge, cookies, [], meter_deletes=[vm_meters(vm_id)])
    except VswitchError as error:
        log.error("policy rules of deleted VM %d left on %s: %s", vm_id, host.name, error)


def base_change(peer_ports: Iterable[int] | None) -> tuple[list[tuple[int, int]], list[str]]:
    """The delete and the adds that put a host's base rules (the three tables, the ports of
    its peer links) in place: while any policy exists, on every host, so a VM that moves or
    starts anywhere finds them; none otherwise (`peer_ports` None, not read), leaving the
    switch's plain forwarding. The caller reads the peer links, so that a migration reads
    them at once with the other facts its install needs."""
    adds = [] if peer_ports is None else base_flows(peer_ports)
    return [(BASE_KIND << _COOKIE_BITS, KIND_MASK)], adds


def port_facts(nic: PolicyNic, ofport: int) -> PortFacts:
    """What the compiler needs of a NIC plugged into port `ofport`."""
    return PortFacts(nic.vm_id, nic.mac, ofport, nic.vlan, nic.ipv4, nic.ipv6, nic.position)


def nic_meters(nics: Iterable[PolicyNic], policies: Mapping[str, Policy]) -> list[str]:
    """The meters of the NICs' rate limits; they name no port, so they are the same on
    every host."""
    return [
        meter
        for nic in nics
        if nic.policy is not None
        for meter in port_meters(policies[nic.policy], port_facts(nic, 0))
    ]


@dataclass(frozen=True)
class _Plan:
    """What the switches should hold, read in one transaction: the NICs in scope, the
    policies with their peers resolved, the VMs a migration owns, and whether to remove
    the rules of VMs out of scope too."""

    nics: list[PolicyNic]
    policies: dict[str, Policy]
    peers: dict[str, dict[str, list[str]]]
    moving: set[int]
    reconcile: bool


def _apply_host(switch: Vswitch, host: HostRef, plan: _Plan) -> int:
    """One atomic change of a host's policy rules, with the meters its rules use (a NIC's
    meter goes with its send rules); the number of rules it installs."""
    ports = switch.ports(host.bridge)
    here = [n for n in plan.nics if n.host == host.name and n.vm_id not in plan.moving]
    deletes, adds = base_change(switch.peer_ports(host.bridge).values() if plan.policies else None)
    vm_ids = {n.vm_id for n in here}
    if plan.reconcile:
        vm_ids |= _vm_ids_with_rules(switch, host.bridge) - plan.moving
    deletes += [(send_cookie(vm_id), VM_RULES_MASK) for vm_id in sorted(vm_ids)]
    meters: list[str] = []
    for nic in here:
        ofport = ports.get(nic.mac)
        if nic.policy is None or ofport is None:
            continue
        policy = plan.policies[nic.policy]
        facts = port_facts(nic, ofport)
        compiled = compile_port(policy, facts, plan.peers[nic.policy])
        adds += [*compiled.send, *compiled.receive, *compiled.where]
        meters += port_meters(policy, facts)
    owned = [vm_meters(vm_id) for vm_id in sorted(vm_ids)]
    switch.change_flows(host.bridge, deletes, adds, meters, owned)
    return len(adds)


def _vm_ids_with_rules(switch: Vswitch, bridge: str) -> set[int]:
    """The VMs that have policy rules (of any kind, read at once) or meters on a switch now,
    by their cookies and meter ids."""
    flows = switch.flows(bridge, SEND_KIND << _COOKIE_BITS, POLICY_KINDS_MASK)
    found = {cookie_of(flow) & ((1 << _COOKIE_BITS) - 1) for flow in flows}
    owners = (meter_vm(meter_id_of(meter)) for meter in switch.meters(bridge))
    return found | {vm_id for vm_id in owners if vm_id is not None}


def _apply_after(ctl: Controller, vms: Iterable[str]) -> None:
    """Apply the policies of the VMs a change touched (their peers' rules may name them
    too, so every VM whose policy names a peer is recompiled with them)."""
    touched = set(vms)
    if touched:
        apply_policies(ctl, touched | _naming_peers(ctl))


def _naming_peers(ctl: Controller) -> set[str]:
    """The VMs whose policy names a group, VM or set: their rules change with their peers."""
    with ctl.uow() as uow:
        policies = stored_policies(uow.session)
        symbolic = {name for name, policy in policies.items() if peer_references(policy)}
        return {n.vm for n in policy_nics(uow.session) if n.policy in symbolic}


def _attach(session: Session, row: PolicyRow, target: Attachment) -> set[str]:
    """Attach `row` to the target; the VMs it now applies to there."""
    existing = _attachment_of(session, target)
    if existing is not None and existing.policy_id != row.id:
        raise Conflict(
            f"{_target_text(target)} has policy {existing.policy.name!r} already; detach it first",
            policy=existing.policy.name,
        )
    if existing is None:
        existing = PolicyAttachment(policy_id=row.id)
        if target.vm is not None:
            existing.vm_id = repository.get_vm(session, target.vm).id
        else:
            existing.network_id = repository.get_network(session, str(target.network)).id
        session.add(existing)
        session.flush()
    return set(_vms_of(session, existing))


def _attachment_of(session: Session, target: Attachment) -> PolicyAttachment | None:
    """The policy attachment of a VM or a network (NotFound if it does not exist)."""
    if target.vm is not None:
        vm_id = repository.get_vm(session, target.vm).id
        return session.scalar(select(PolicyAttachment).where(PolicyAttachment.vm_id == vm_id))
    network_id = repository.get_network(session, str(target.network)).id
    return session.scalar(select(PolicyAttachment).where(PolicyAttachment.network_id == network_id))


def _vms_of(session: Session, attachment: PolicyAttachment) -> list[str]:
    """The VMs an attachment concerns: its VM, or every VM with a NIC on its network."""
    if attachment.vm is not None:
        return [attachment.vm.name]
    return sorted(
        {nic.vm.name for nic in repository.network_nics(session, attachment.network_id or 0)}
    )


def _attachments(session: Session, policy_id: int) -> list[PolicyAttachment]:
    return list(
        session.scalars(select(PolicyAttachment).where(PolicyAttachment.policy_id == policy_id))
    )


def _applies_to(session: Session, name: str) -> list[str]:
    """The VMs a policy applies to now: NICs take their VM's policy, else their network's."""
    return sorted({n.vm for n in policy_nics(session) if n.policy == name})


def policy_nics(session: Session, vms: Collection[str] | None = None) -> list[PolicyNic]:
    """Every NIC with a MAC (or those of these VMs), with its VM's host and the policy it
    follows."""
    by_vm, by_network = _attached(session)
    nics = []
    for vm in repository.list_vms(session, vms):
        for nic in vm.nics:
            if nic.mac is None:
                continue
            addresses = [a.address for a in nic.addresses]
            nics.append(
                PolicyNic(
                    vm_id=vm.id,
                    vm=vm.name,
                    host=vm.host.name,
                    mac=nic.mac,
                    vlan=nic.network.vlan,
                    ipv4=tuple(a for a in addresses if ":" not in a),
                    ipv6=tuple(a for a in addresses if ":" in a),
                    policy=by_vm.get(vm.id) or by_network.get(nic.network_id),
                    position=nic.position,
                )
            )
    return nics


def _attached(session: Session) -> tuple[dict[int, str], dict[int, str]]:
    """Policy names by VM id and by network id."""
    rows = session.execute(
        select(PolicyAttachment.vm_id, PolicyAttachment.network_id, PolicyRow.name).join(
            PolicyRow, PolicyRow.id == PolicyAttachment.policy_id
        )
    )
    by_vm: dict[int, str] = {}
    by_network: dict[int, str] = {}
    for vm_id, network_id, name in rows:
        if vm_id is not None:
            by_vm[vm_id] = name
        if network_id is not None:
            by_network[network_id] = name
    return by_vm, by_network


def stored_policies(session: Session) -> dict[str, Policy]:
    """Every stored policy, parsed (once per version of its document: a migration step
    reads them while the VM waits, and checking a 1,000-rule policy takes tens of ms)."""
    return {
        row.name: _parsed(row.name, json.dumps(row.document, sort_keys=True))
        for row in session.scalars(select(PolicyRow))
    }


@functools.lru_cache(maxsize=256)
def _parsed(name: str, document: str) -> Policy:
    """A policy parsed from its stored document's canonical JSON; policies are frozen
    values, so one parse serves every reader."""
    return parse_policy(name, json.loads(document))


def moving_vms(session: Session) -> set[int]:
    """The VMs a migration is moving now."""
    return set(session.scalars(select(VmMigration.vm_id).where(VmMigration.phase.in_(OPEN_PHASES))))


def _check_peers(session: Session, policy: Policy) -> None:
    """Every group and VM a policy names exists (a typo must not make a rule match nobody)."""
    vms = _vm_addresses(session)
    groups = {group_name(host, image) for host, image, _ in vms.values()}
    for reference in sorted(peer_references(policy)):
        kind, _, name = reference.partition(":")
        if kind == "group" and name not in groups:
            raise NotFound(f"unknown peer group {name!r}: no host has VMs of that group")
        if kind == "vm" and name not in vms:
            raise NotFound(f"unknown peer VM {name!r}", vm=name)
    for set_name, members in policy.sets.items():
        unknown = sorted(set(members) - set(vms))
        if unknown:
            raise NotFound(f"set {set_name!r} names unknown VMs: {', '.join(unknown)}")


def resolve_peers(
    session: Session, policies: Mapping[str, Policy]
) -> dict[str, dict[str, list[str]]]:
    """Per policy: each symbolic peer it names -> the addresses that peer stands for now,
    as /32 or /128 networks (a set is the policy's own, so peers resolve per policy)."""
    vms = _vm_addresses(session)
    groups: dict[str, list[str]] = {}
    for vm, (host, image, _) in vms.items():
        groups.setdefault(group_name(host, image), []).append(vm)
    resolved: dict[str, dict[str, list[str]]] = {}
    for name, policy in policies.items():
        resolved[name] = {}
        for reference in peer_references(policy):
            kind, _, target = reference.partition(":")
            members = {
                "group": groups.get(target, []),
                "set": list(policy.sets.get(target, ())),
            }.get(kind, [target])
            resolved[name][reference] = sorted(
                {_host_network(a) for vm in members if vm in vms for a in vms[vm][2]}
            )
    return resolved


def _host_network(address: str) -> str:
    return f"{address}/{128 if ':' in address else 32}"


def _vm_addresses(session: Session) -> dict[str, tuple[str, str, list[str]]]:
    """VM name -> (host, image, the addresses the store gave its NICs)."""
    return {
        vm.name: (vm.host.name, vm.image, [a.address for n in vm.nics for a in n.addresses])
        for vm in repository.list_vms(session)
    }


def _policy_row(session: Session, name: str) -> PolicyRow:
    row = session.scalar(select(PolicyRow).where(PolicyRow.name == name))
    if row is None:
        raise NotFound(f"unknown policy {name!r}", policy=name)
    return row


def _view(session: Session, row: PolicyRow) -> PolicyView:
    attached = _attachments(session, row.id)
    return PolicyView(
        name=row.name,
        document=row.document,
        vms=sorted(a.vm.name for a in attached if a.vm is not None),
        networks=sorted(a.network.name for a in attached if a.network is not None),
        applies_to=_applies_to(session, row.name),
        created_at=as_utc(row.created_at),
        updated_at=as_utc(row.updated_at),
    )


def _where(attachment: PolicyAttachment) -> str:
    if attachment.vm is not None:
        return f"VM {attachment.vm.name}"
    network: Network | None = attachment.network
    return f"network {network.name if network else '?'}"


def _target_text(target: Attachment) -> str:
    return f"VM {target.vm}" if target.vm is not None else f"network {target.network}"
