"""Groups of VMs and their quarantine (CN101652749A, points 2 and 5).

A group is a host's VMs of one image, named `<host>-<image>`: it exists while the host has
such a VM (in any state), and also while a block names it. An operator (or a firewall acting
on the DNS names) blocks a group, or every group of an image on every host, in one
operation: the block is stored, recorded in the audit trail with the VMs it concerned, shown
in DNS (a TXT record on each blocked group name) and enforced by the switch of each host
(`domain.quarantine`). A block applies to every VM of the group, also to one created into
it later (before it starts) and after restarts: `enforce_blocks` makes a host's switch hold
exactly the quarantine rules of its VMs, and runs after every change and when the controller
starts.

A VM under two blocks (its group's and its image's) may reach only the networks both allow.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from vmfabric.domain.dns_records import group_name
from vmfabric.domain.errors import Conflict, InvalidInput, NotFound, Unavailable
from vmfabric.domain.names import check_name, is_label
from vmfabric.domain.quarantine import (
    QUARANTINE_KIND,
    QUARANTINE_MASK,
    QuarantinedNic,
    parse_allowed,
    quarantine_flows,
)
from vmfabric.services.context import Controller, transaction
from vmfabric.services.hosts import host_ref
from vmfabric.services.views import as_utc
from vmfabric.store import repository
from vmfabric.store.tables import GroupAudit, GroupBlock, Host, Nic, Vm
from vmfabric.store.unit_of_work import UnitOfWork
from vmfabric.vswitch import VswitchError

log = logging.getLogger(__name__)

GROUP = "group"
IMAGE = "image"
MAX_REASON = 1024


@dataclass(frozen=True)
class BlockView:
    """A block in force on a group: of the group itself or of its image."""

    scope: str
    target: str
    reason: str
    allowed: list[str]
    by: str
    at: datetime


@dataclass(frozen=True)
class GroupView:
    """A group as `group list` shows it: members, their addresses, the blocks on it."""

    name: str
    host: str
    image: str
    vms: list[str]
    addresses: list[str]
    blocked: bool
    blocks: list[BlockView]


@dataclass(frozen=True)
class AuditView:
    """One block or unblock: who, when, why, the groups and VMs it concerned."""

    at: datetime
    action: str
    scope: str
    target: str
    by: str
    reason: str
    allowed: list[str]
    vms: list[str]
    groups: list[str]


@dataclass(frozen=True)
class GroupDetail(GroupView):
    """A group as `group show` shows it: with its audit trail, oldest first."""

    audit: list[AuditView] = field(default_factory=list)


@dataclass(frozen=True)
class BlockRequest:
    """A block or unblock asked for: of a group, or (`image` True) of an image."""

    target: str
    by: str
    reason: str = ""
    allowed: Sequence[str] = ()
    image: bool = False


@dataclass(frozen=True)
class _Target:
    """What a block request names: its scope and target, and what it concerns now."""

    scope: str
    name: str
    image: str
    host: str | None
    groups: list[str]
    vms: list[str]
    hosts: set[str]


@dataclass(frozen=True)
class _Block:
    """A stored block, read out of its session."""

    scope: str
    target: str
    host: str | None
    image: str
    view: BlockView


@dataclass(frozen=True)
class _Member:
    vm_id: int
    vm: str
    host: str
    image: str
    macs: tuple[str, ...]


def list_groups(ctl: Controller) -> list[GroupView]:
    """Every group, by name."""
    with ctl.uow() as uow:
        session = uow.session
        groups = _groups(session)
        addresses = _addresses(uow)
        blocks = _blocks(session)
    for row in blocks:  # a blocked group without members is still listed
        if row.scope == GROUP and row.host is not None:
            groups.setdefault((row.host, row.image), [])
    return [_view(key, members, blocks, addresses) for key, members in sorted(groups.items())]


def show_group(ctl: Controller, name: str) -> GroupDetail:
    """One group with its audit trail (the group's own blocks and its image's)."""
    with ctl.uow() as uow:
        session = uow.session
        groups = _groups(session)
        host, image = _resolve(session, name, groups)
        members = groups.get((host, image), [])
        blocks = _blocks(session)
        view = _view((host, image), members, blocks, _addresses(uow))
        trail = session.scalars(
            select(GroupAudit)
            .where(
                ((GroupAudit.scope == GROUP) & (GroupAudit.target == group_name(host, image)))
                | ((GroupAudit.scope == IMAGE) & (GroupAudit.target == image))
            )
            .order_by(GroupAudit.id)
        )
        audit = [_audit_view(entry) for entry in trail]
    return GroupDetail(**vars(view), audit=audit)


def block(ctl: Controller, request: BlockRequest) -> AuditView:
    """Block a group or an image: stored and audited in one transaction, then enforced on
    each host's switch and shown in DNS."""
    allowed = parse_allowed(request.allowed)
    reason = _reason(request.reason, required=True)
    entry, hosts = transaction(lambda: _store_block(ctl, request, reason, list(allowed)))
    _after_change(ctl, hosts)
    return entry


def unblock(ctl: Controller, request: BlockRequest) -> AuditView:
    """Lift the block of a group or an image; audited, then enforced and shown in DNS."""
    reason = _reason(request.reason, required=False)
    entry, hosts = transaction(lambda: _remove_block(ctl, request, reason))
    _after_change(ctl, hosts)
    return entry


def blocked_names(session: Session) -> dict[str, str]:
    """Group name -> reason of every blocked group, for the TXT records in DNS.

    An image block marks the group of that image on every registered host, members or not,
    so a firewall sees it before a VM of the image lands there.
    """
    hosts = list(session.scalars(select(Host.name)))
    marks: dict[str, str] = {}
    for row in session.scalars(select(GroupBlock).order_by(GroupBlock.scope.desc())):
        if row.scope == GROUP:
            marks[row.target] = row.reason  # the group's own reason wins over its image's
        else:
            for host in hosts:
                marks.setdefault(group_name(host, row.image), row.reason)
    return marks


def enforce_blocks(ctl: Controller, hosts: Collection[str] | None = None) -> dict[str, int]:
    """Make each host's switch hold exactly the quarantine rules of its blocked VMs (all
    hosts, or these); the number of rules per host.

    One atomic replace per host, so a VM is never left half blocked; hosts without a switch
    driver (noop) are skipped. Raises Unavailable naming the hosts whose switch failed,
    after trying every host.
    """
    with ctl.uow() as uow:
        session = uow.session
        stored = [host_ref(h) for h in session.scalars(select(Host).order_by(Host.name))]
        members = _groups(session)
        blocks = _blocks(session)
    counts: dict[str, int] = {}
    failed: list[str] = []
    for host in stored:
        if hosts is not None and host.name not in hosts:
            continue
        switch = ctl.agents.vswitch(host)
        if switch is None:
            continue
        blocked = [
            (member, allowed)
            for (name, image), group in members.items()
            if name == host.name and (allowed := _allowed(blocks, name, image)) is not None
            for member in group
        ]
        try:
            ports = switch.ports(host.bridge)
            flows = [
                flow
                for member, allowed in blocked
                for mac in member.macs
                for flow in quarantine_flows(
                    QuarantinedNic(member.vm_id, mac, ports.get(mac)), allowed
                )
            ]
            switch.replace_flows(host.bridge, QUARANTINE_KIND << 48, QUARANTINE_MASK, flows)
        except VswitchError as error:
            log.error("quarantine rules of host %s not applied: %s", host.name, error)
            failed.append(f"{host.name} ({error})")
            continue
        counts[host.name] = len(flows)
    if failed:
        raise Unavailable(
            f"the switch of host {', '.join(failed)} could not be updated; the blocks are "
            "stored and are applied again when the controller restarts"
        )
    return counts


def _after_change(ctl: Controller, hosts: set[str]) -> None:
    ctl.names_changed(None)
    enforce_blocks(ctl, hosts)


def _store_block(
    ctl: Controller, request: BlockRequest, reason: str, allowed: list[str]
) -> tuple[AuditView, set[str]]:
    with ctl.uow() as uow:
        session = uow.session
        target = _target(session, request)
        existing = _block_row(session, target.scope, target.name)
        if existing is not None:
            raise Conflict(
                f"{target.scope} {target.name!r} is already blocked (since "
                f"{existing.created_at:%Y-%m-%d %H:%M:%S} UTC by {existing.actor}: "
                f"{existing.reason}); unblock it first to change the block",
                **{target.scope: target.name},
            )
        session.add(
            GroupBlock(
                scope=target.scope,
                target=target.name,
                host=target.host,
                image=target.image,
                reason=reason,
                allowed=allowed,
                actor=request.by,
            )
        )
        entry = _audit(
            session, target, action="block", by=request.by, reason=reason, allowed=allowed
        )
        uow.commit()
        return entry, target.hosts


def _remove_block(
    ctl: Controller, request: BlockRequest, reason: str
) -> tuple[AuditView, set[str]]:
    with ctl.uow() as uow:
        session = uow.session
        target = _target(session, request)
        if _block_row(session, target.scope, target.name) is None:
            raise Conflict(_not_blocked(session, target), **{target.scope: target.name})
        session.execute(
            delete(GroupBlock).where(
                GroupBlock.scope == target.scope, GroupBlock.target == target.name
            )
        )
        entry = _audit(session, target, action="unblock", by=request.by, reason=reason, allowed=[])
        uow.commit()
        return entry, target.hosts


def _not_blocked(session: Session, target: _Target) -> str:
    if target.scope == GROUP and _block_row(session, IMAGE, target.image) is not None:
        return (
            f"group {target.name!r} has no block of its own: it is blocked with every group "
            f"of image {target.image!r}; lift that with `vmfabric group unblock --image "
            f"{target.image}`"
        )
    return f"{target.scope} {target.name!r} is not blocked"


def _target(session: Session, request: BlockRequest) -> _Target:
    """What a request names, and the groups, VMs and hosts it concerns now."""
    groups = _groups(session)
    if request.image:
        image = check_name("image", request.target)
        found = {key: members for key, members in groups.items() if key[1] == image}
        if not found and _block_row(session, IMAGE, image) is None:
            raise NotFound(
                f"unknown image {image!r}: no VM runs it; `vmfabric group list` shows the "
                "images in use",
                image=image,
            )
        host: str | None = None
    else:
        host, image = _resolve(session, request.target, groups)
        found = {(host, image): groups.get((host, image), [])}
    return _Target(
        scope=GROUP if host is not None else IMAGE,
        name=group_name(host, image) if host is not None else image,
        image=image,
        host=host,
        groups=sorted(group_name(h, i) for h, i in found),
        vms=sorted(member.vm for members in found.values() for member in members),
        hosts={h for h, _ in found},
    )


def _resolve(
    session: Session, name: str, groups: Mapping[tuple[str, str], list[_Member]]
) -> tuple[str, str]:
    """The (host, image) of a group name among `groups` (or the blocked ones); NotFound for a
    name no group has.

    A name splits as `<host>-<image>` after the registered host it starts with; should two
    hosts fit (hosts `a` and `a-b`, group `a-b-c`), the one with such VMs or a block wins.
    """
    text = name.strip().lower()
    hosts = session.scalars(select(Host.name))
    candidates = [
        (host, text[len(host) + 1 :])
        for host in hosts
        if text.startswith(f"{host}-") and is_label(text[len(host) + 1 :])
    ]
    blocked = {
        row.target for row in session.scalars(select(GroupBlock).where(GroupBlock.scope == GROUP))
    }
    known = [c for c in candidates if c in groups or group_name(*c) in blocked]
    if len(known) == 1:
        return known[0]
    if len(known) > 1:
        raise Conflict(
            f"group name {name!r} is ambiguous: it is "
            + " and ".join(f"host {h!r} with image {i!r}" for h, i in known),
            group=name,
        )
    raise NotFound(
        f"unknown group {name!r}: groups are named <host>-<image> after a host's VMs of an "
        "image; `vmfabric group list` shows them",
        group=name,
    )


def _reason(text: str, *, required: bool) -> str:
    reason = " ".join(text.split())
    if required and not reason:
        raise InvalidInput("a block needs a reason (--reason): it goes to the audit trail and DNS")
    if len(reason) > MAX_REASON:
        raise InvalidInput(f"reason too long: {len(reason)} characters, at most {MAX_REASON}")
    return reason


def _groups(session: Session) -> dict[tuple[str, str], list[_Member]]:
    """Every (host, image) with its VMs and their NICs' MACs."""
    rows = session.execute(
        select(Vm.id, Vm.name, Host.name.label("host"), Vm.image, Nic.mac)
        .join(Host, Host.id == Vm.host_id)
        .outerjoin(Nic, Nic.vm_id == Vm.id)
        .order_by(Vm.name, Nic.position)
    )
    by_vm: dict[int, _Member] = {}
    for row in rows:
        member = by_vm.get(row.id) or _Member(row.id, row.name, row.host, row.image, ())
        if row.mac is not None:
            member = _Member(
                member.vm_id, member.vm, member.host, member.image, (*member.macs, row.mac)
            )
        by_vm[row.id] = member
    groups: dict[tuple[str, str], list[_Member]] = {}
    for member in by_vm.values():
        groups.setdefault((member.host, member.image), []).append(member)
    return groups


def _addresses(uow: UnitOfWork) -> dict[str, list[str]]:
    """Registered (leased) addresses of each running VM."""
    found: dict[str, list[str]] = {}
    for row in repository.registration_rows(uow.connection):
        if row.address is not None:
            found.setdefault(row.name, []).append(row.address)
    return found


def _allowed(blocks: Iterable[_Block], host: str, image: str) -> list[str] | None:
    """What a VM of this group may still reach, or None when no block is on it."""
    applying = [
        row
        for row in blocks
        if (row.scope == GROUP and row.target == group_name(host, image))
        or (row.scope == IMAGE and row.target == image)
    ]
    if not applying:
        return None
    allowed = set(applying[0].view.allowed)
    for row in applying[1:]:
        allowed &= set(row.view.allowed)
    return sorted(allowed)


def _view(
    key: tuple[str, str],
    members: list[_Member],
    blocks: Iterable[_Block],
    addresses: dict[str, list[str]],
) -> GroupView:
    host, image = key
    name = group_name(host, image)
    on_it = [
        row.view
        for row in blocks
        if (row.scope == GROUP and row.target == name)
        or (row.scope == IMAGE and row.target == image)
    ]
    vms = sorted(member.vm for member in members)
    return GroupView(
        name=name,
        host=host,
        image=image,
        vms=vms,
        addresses=[a for vm in vms for a in addresses.get(vm, [])],
        blocked=bool(on_it),
        blocks=on_it,
    )


def _block_row(session: Session, scope: str, target: str) -> GroupBlock | None:
    return session.scalar(
        select(GroupBlock).where(GroupBlock.scope == scope, GroupBlock.target == target)
    )


def _blocks(session: Session) -> list[_Block]:
    return [
        _Block(
            row.scope,
            row.target,
            row.host,
            row.image,
            BlockView(
                row.scope,
                row.target,
                row.reason,
                list(row.allowed),
                row.actor,
                as_utc(row.created_at),
            ),
        )
        for row in session.scalars(select(GroupBlock).order_by(GroupBlock.id))
    ]


def _audit(
    session: Session, target: _Target, *, action: str, by: str, reason: str, allowed: list[str]
) -> AuditView:
    entry = GroupAudit(
        action=action,
        scope=target.scope,
        target=target.name,
        actor=by,
        reason=reason,
        allowed=allowed,
        vms=target.vms,
        groups=target.groups,
    )
    session.add(entry)
    session.flush()
    return _audit_view(entry)


def _audit_view(entry: GroupAudit) -> AuditView:
    return AuditView(
        at=as_utc(entry.at),
        action=entry.action,
        scope=entry.scope,
        target=entry.target,
        by=entry.actor,
        reason=entry.reason,
        allowed=list(entry.allowed),
        vms=list(entry.vms),
        groups=list(entry.groups),
    )
