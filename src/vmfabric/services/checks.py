"""Connectivity checks of running VMs through their guest agents, and their history.

The rules (what to ping, how, what a result means) are `domain.checks`; this runs them: it
reads each running VM's NICs from the store, asks the VM's host for the agent's channel, and
checks many VMs at once, at most `concurrency` together, each within `vm_deadline_s`: a hung
or dead agent makes its VM "unreachable" and never holds up the others beyond that deadline.
Each VM's OS is found once and remembered. Results are stored; the history older than
`keep` is dropped at each sweep.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Collection
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session

from vmfabric.domain.checks import (
    WINDOWS_PROBE,
    AgentState,
    CheckResult,
    GuestOs,
    NicFacts,
    NicResult,
    Reach,
    nic_results,
    os_from_info,
    os_from_probe,
    ping_command,
    pings,
    reach_of,
    unreachable,
)
from vmfabric.domain.errors import NotFound
from vmfabric.domain.model import NetworkKind
from vmfabric.guest import CommandFailed, GuestAgentError, ProgramTimeout
from vmfabric.guest.qga import QgaClient
from vmfabric.services.context import Controller
from vmfabric.services.hosts import host_ref
from vmfabric.services.views import as_utc
from vmfabric.store import repository
from vmfabric.store.tables import Check, Nic, utcnow

log = logging.getLogger(__name__)

DEFAULT_EXTERNAL_TARGET = "203.0.113.1"


@dataclass(frozen=True)
class CheckSettings:
    """How checks run; the operator sets them on `serve`.

    A VM being checked mostly waits for its guest's pings, so `concurrency` is sized for a
    whole host's VMs in one round: with 32, an uplink outage (every outside ping waits out its
    deadline) made a 100-VM sweep four ping deadlines long.
    """

    external_target: str = DEFAULT_EXTERNAL_TARGET
    concurrency: int = 128
    vm_deadline_s: float = 6.0
    ping_deadline_s: int = 1
    connect_timeout_s: float = 2.0
    keep: timedelta = timedelta(days=7)


@dataclass(frozen=True)
class CheckTarget:
    """A running VM to check: its NICs and its agent's channel (None: the host has none)."""

    vm: str
    socket: str | None
    nics: list[NicFacts]


@dataclass(frozen=True)
class CheckChange:
    """A VM whose state (OS, agent, any NIC's reachability) differs from its last check."""

    vm: str
    previous: CheckResult
    current: CheckResult


class Checker:
    """Checks VMs through their agents, remembering each VM's OS between sweeps; tells
    `on_change` of every VM whose state changed (not of a VM's first check)."""

    def __init__(
        self, settings: CheckSettings, on_change: Callable[[CheckChange], None] | None = None
    ) -> None:
        self.settings = settings
        self.on_change = on_change
        self._os: dict[str, GuestOs] = {}

    async def check_all(self, targets: Collection[CheckTarget]) -> list[CheckResult]:
        """Every target's result, in the order given."""
        limit = asyncio.Semaphore(self.settings.concurrency)

        async def bounded(target: CheckTarget) -> CheckResult:
            async with limit:
                return await self.check(target)

        return list(await asyncio.gather(*(bounded(target) for target in targets)))

    async def check(self, target: CheckTarget) -> CheckResult:
        """One VM's result within the VM deadline; an agent that does not answer in time
        makes it unreachable."""
        at = utcnow()
        known = self._os.get(target.vm, GuestOs.UNKNOWN)
        if target.socket is None:
            return unreachable(target.vm, target.nics, at, "its host has no agent channel", known)
        try:
            async with asyncio.timeout(self.settings.vm_deadline_s):
                return await self._check(target, target.socket)
        except TimeoutError:
            why = f"no answer within {self.settings.vm_deadline_s:g} s"
        except GuestAgentError as error:
            why = str(error)
        return unreachable(target.vm, target.nics, at, why, known)

    async def _check(self, target: CheckTarget, socket: str) -> CheckResult:
        at = utcnow()
        timeout = self.settings.connect_timeout_s
        async with await QgaClient.connect(socket, timeout=timeout) as agent:
            guest_os = await self._guest_os(target.vm, agent)
            outcomes, detail = await self._ping_all(agent, guest_os, target.nics)
        nics = nic_results(target.nics, outcomes)
        return CheckResult(target.vm, guest_os, AgentState.OK, nics, at, detail)

    async def _ping_all(
        self, agent: QgaClient, guest_os: GuestOs, nics: list[NicFacts]
    ) -> tuple[dict[tuple[str, str], Reach], str | None]:
        """Each ping's outcome by (MAC, purpose); and why some could not run, if so.

        A VM's pings run side by side: a VM whose gateway and outside both fail is judged
        in one ping deadline, not one per ping.
        """
        planned = pings(nics, self.settings.external_target)
        found = await asyncio.gather(*(self._ping(agent, guest_os, p.target) for p in planned))
        outcomes = {
            (ping.mac, ping.purpose): reach
            for ping, reach in zip(planned, found, strict=True)
            if isinstance(reach, Reach)
        }
        refused = next((str(f) for f in found if isinstance(f, CommandFailed)), None)
        return outcomes, None if refused is None else f"the agent cannot run ping: {refused}"

    async def _ping(
        self, agent: QgaClient, guest_os: GuestOs, target: str
    ) -> Reach | CommandFailed:
        """One ping's outcome, or the agent's refusal to run it."""
        deadline = self.settings.ping_deadline_s
        program, args = ping_command(guest_os, target, deadline)
        try:
            result = await agent.run(program, args, timeout=deadline + 2)
        except ProgramTimeout:
            return Reach.BROKEN
        except CommandFailed as error:
            return error
        return reach_of(result.exitcode)

    async def _guest_os(self, vm: str, agent: QgaClient) -> GuestOs:
        """The VM's OS: remembered, else from guest-get-osinfo, else by the patent's probe."""
        known = self._os.get(vm)
        if known is not None:
            return known
        if (await agent.commands()).get("guest-get-osinfo"):
            found = os_from_info(await agent.os_info())
        else:
            program, args = WINDOWS_PROBE
            try:
                await agent.run(program, list(args), timeout=self.settings.ping_deadline_s + 2)
            except (CommandFailed, ProgramTimeout):
                found = os_from_probe(ran=False)
            else:
                found = os_from_probe(ran=True)
        if found != GuestOs.UNKNOWN:
            self._os[vm] = found
        return found


_SWEEPING = threading.Lock()


def run_checks(ctl: Controller, checker: Checker, vm: str | None = None) -> list[CheckResult]:
    """Check every running VM (or one), store the results, drop old history; the results.

    One run at a time (an operator's `check run` waits for a periodic sweep under way), so
    that a VM is never checked twice at once. Raises NotFound for a VM that does not exist
    or does not run.
    """
    targets = _targets(ctl, vm)
    with _SWEEPING:
        results = asyncio.run(checker.check_all(targets))
        changes = _store(ctl, results, checker.settings.keep, vm)
    if checker.on_change is not None:
        for change in changes:
            checker.on_change(change)
    return results


def check_status(ctl: Controller, vm: str | None = None) -> list[CheckResult]:
    """The latest result of every VM checked (or of one), by VM name."""
    with ctl.uow() as uow:
        found = _latest(uow.session, vm)
    if vm is not None and not found:
        raise NotFound(f"VM {vm!r} has not been checked (yet)", vm=vm)
    return found


def check_history(ctl: Controller, vm: str, limit: int = 100) -> list[CheckResult]:
    """The VM's results, newest first."""
    with ctl.uow() as uow:
        rows = uow.session.scalars(
            select(Check).where(Check.vm == vm).order_by(Check.id.desc()).limit(limit)
        )
        found = [_result(row) for row in rows]
    if not found:
        raise NotFound(f"VM {vm!r} has no check history", vm=vm)
    return found


def _targets(ctl: Controller, vm: str | None) -> list[CheckTarget]:
    with ctl.uow() as uow:
        vms = repository.running_vms(uow.session, vm)
        if vm is not None and not vms:
            raise NotFound(f"no running VM named {vm!r}", vm=vm)
        wanted = [
            (v.name, host_ref(v.host), [_facts(n, n.mac) for n in v.nics if n.mac]) for v in vms
        ]
    return [
        CheckTarget(name, ctl.agents.hypervisor(host).agent_socket(name), nics)
        for name, host, nics in wanted
    ]


def _facts(nic: Nic, mac: str) -> NicFacts:
    ipv4 = next((a for a in nic.addresses if a.version == 4), None)
    return NicFacts(
        mac=mac,
        ipv4=ipv4.address if ipv4 else None,
        gateway=ipv4.subnet.gateway if ipv4 else None,
        kind=NetworkKind(nic.network.kind),
    )


def _latest(session: Session, vm: str | None) -> list[CheckResult]:
    """The latest result of each VM checked (or of one), by VM name."""
    newest = select(Check.vm, func.max(Check.id).label("id")).group_by(Check.vm)
    if vm is not None:
        newest = newest.where(Check.vm == vm)
    latest = newest.subquery()
    query = select(Check).join(latest, latest.c.id == Check.id).order_by(Check.vm)
    return [_result(row) for row in session.scalars(query)]


def _store(
    ctl: Controller, results: list[CheckResult], keep: timedelta, vm: str | None
) -> list[CheckChange]:
    """Store the results of one VM or all; the VMs whose state differs from their previous
    result (read in the same transaction)."""
    with ctl.uow() as uow:
        session = uow.session
        before = {r.vm: r for r in _latest(session, vm)}
        changes = [
            CheckChange(result.vm, before[result.vm], result)
            for result in results
            if result.vm in before and _state(before[result.vm]) != _state(result)
        ]
        for result in results:
            session.add(
                Check(
                    vm=result.vm,
                    checked_at=result.checked_at,
                    os=result.os.value,
                    agent=result.agent.value,
                    nics=[_nic_json(nic) for nic in result.nics],
                    detail=result.detail,
                )
            )
        session.execute(delete(Check).where(Check.checked_at < utcnow() - keep))
        uow.commit()
    return changes


def _state(result: CheckResult) -> tuple[object, ...]:
    """What a change of state is judged by: not the time or the wording of `detail`."""
    nics = tuple((nic.mac, nic.gateway, nic.external) for nic in result.nics)
    return (result.os, result.agent, nics)


def _nic_json(nic: NicResult) -> dict[str, str | None]:
    return {
        "mac": nic.mac,
        "ipv4": nic.ipv4,
        "gateway": nic.gateway.value,
        "external": nic.external.value,
    }


def _result(row: Check) -> CheckResult:
    return CheckResult(
        vm=row.vm,
        os=GuestOs(row.os),
        agent=AgentState(row.agent),
        nics=[
            NicResult(
                str(nic["mac"]),
                nic.get("ipv4"),
                Reach(str(nic["gateway"])),
                Reach(str(nic["external"])),
            )
            for nic in row.nics
        ],
        checked_at=as_utc(row.checked_at),
        detail=row.detail,
    )
