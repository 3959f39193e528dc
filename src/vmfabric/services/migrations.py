"""A VM's network policy follows it to another host (CN103051479A, SPEC section 3).

The switches' port events drive the method, whoever moved the VM (`vm migrate`, or the
hypervisor on its own):

1. The VM's port appears on another host's bridge (libvirt creates the destination port
   before the source one goes): its new port is recorded, and the destination gets the VM's
   rules as the source holds them — send rules rewritten for the new port (the ones saved
   at step 2 once the source let go), receive and where rules with their delivery pointed
   at it — in one atomic change; the send rules read are saved (in the store) for step 2.
   Receive rules match the VM's MAC, so an asked-for migration installs them on the
   destination at once, before the port.
2. The VM's port leaves the source: the old port is recorded, and one atomic change on the
   source deletes the send rules (saved at step 1, else read and saved now) and replaces
   the VM's where rules, a handful, by rules that send what the receive rules allow to the
   peer link toward the destination: packets still in flight to the old host reach the VM.
   The receive rules stay as they are. The VM is announced from its new port, so learning
   switches (and so the other hosts' traffic) find it there.
3. Once traffic flows at the destination (its send rules count packets), or after a grace
   time, the source's leftovers are removed and the VM's host is the destination.
4. A move that does not complete (the destination port does not appear in time, the VM
   comes back on the source, the destination port goes away) rolls back: the destination's
   rules go, the source gets the VM's rules again for its port.

Every step is recorded, so a restarted controller resumes or rolls back by where the VM's
ports are now (`resume`). One lock serializes the steps: events come from the switch
watcher's thread, requests from the API's, timeouts from the ticker's.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import select
from sqlalchemy.orm import Session

from vmfabric.domain.errors import Conflict, InvalidInput, NotFound, Unavailable
from vmfabric.domain.model import VmState
from vmfabric.domain.policy import (
    VM_RULES_MASK,
    compile_port,
    in_port_of,
    redirect_where,
    retarget_receive,
    retarget_send,
    send_cookie,
    vm_meters,
    where_cookie,
    where_rule,
)
from vmfabric.hypervisor import HypervisorError
from vmfabric.services.context import Controller, HostRef
from vmfabric.services.hosts import host_ref
from vmfabric.services.policies import (
    OPEN_PHASES,
    PolicyNic,
    apply_policies,
    base_change,
    nic_meters,
    policy_nics,
    port_facts,
    resolve_peers,
    stored_policies,
)
from vmfabric.services.views import as_utc
from vmfabric.store import repository
from vmfabric.store.tables import Vm, VmMigration, utcnow
from vmfabric.vswitch import Vswitch, VswitchError, cookie_of

log = logging.getLogger(__name__)

EXACT = (1 << 64) - 1
"""The cookie mask that selects exactly one cookie."""

STARTED, IN, OUT, MOVED, DONE, ROLLED_BACK = "started", "in", "out", "moved", "done", "rolled-back"


@dataclass(frozen=True)
class MigrationSettings:
    """How long a move may take, how long the source keeps forwarding, and whether it does
    (off only to measure what the forwarding buys)."""

    timeout_s: float = 30.0
    grace_s: float = 2.0
    redirect: bool = True


@dataclass(frozen=True)
class MigrationView:
    """A migration as the API shows it."""

    vm: str
    source: str
    destination: str
    phase: str
    asked_by: str
    ports: dict[str, dict[str, int | None]]
    detail: str | None
    started_at: datetime
    finished_at: datetime | None
    seconds: float | None


@dataclass(frozen=True)
class _Move:
    """A migration's facts for one step: its VM's NICs and both hosts."""

    id: int
    vm: str
    vm_id: int
    phase: str
    source: HostRef
    destination: HostRef | None
    nics: list[PolicyNic]
    ports: dict[str, dict[str, int | None]]
    saved: list[str]
    started_at: datetime


class MigrationEngine:
    """Runs the method for every VM that moves; one per controller."""

    def __init__(
        self,
        ctl: Controller,
        settings: MigrationSettings | None = None,
        on_finish: Callable[[MigrationView], None] | None = None,
    ) -> None:
        self.ctl = ctl
        self.settings = settings or MigrationSettings()
        self.on_finish = on_finish
        self._lock = threading.RLock()
        self._moved_at: dict[int, float] = {}
        self._finished = threading.Condition(self._lock)

    def migrate(self, name: str, to_host: str) -> MigrationView:
        """Move a running VM to another host and wait until its rules moved too.

        Refused before anything changes: an unknown VM or host, a VM that does not run or
        is moving already, the host it is on, a host of another driver, or one whose
        hypervisor or switch does not answer.
        """
        record_id, source, destination = self._start(name, to_host)
        switched = all(self.ctl.agents.vswitch(host) is not None for host in (source, destination))
        try:
            if switched:
                self._prepare_destination(record_id)
            hypervisor = self.ctl.agents.hypervisor(source)
            hypervisor.migrate(name, destination.name, destination.uri)
        except (HypervisorError, VswitchError) as error:
            with self._lock:
                self._roll_back(record_id, f"the move failed: {error}")
            raise Unavailable(f"VM {name} could not move to {to_host}: {error}") from error
        if not switched:
            with self._lock:
                self._finish(self._reload(record_id))
        return self._wait(record_id)

    def port_added(self, host: str, mac: str, ofport: int) -> None:
        """A VM's port appeared on `host`'s switch (or was renumbered there)."""
        with self._lock:
            found = self._vm_of(mac)
            if found is None:
                return
            vm_name, vm_host = found
            move = self._open_move(vm_name)
            if move is None:
                if vm_host == host:
                    apply_policies(self.ctl, {vm_name})
                    return
                move = self._record(vm_name, vm_host, host, "switch")
            self._arrived(move, host, mac, ofport)

    def port_removed(self, host: str, mac: str, ofport: int) -> None:
        """A VM's port left `host`'s switch."""
        with self._lock:
            found = self._vm_of(mac)
            if found is None:
                return
            vm_name, vm_host = found
            move = self._open_move(vm_name)
            if move is None:
                if vm_host != host or not self._runs(vm_name):
                    return
                move = self._record(vm_name, host, "", "switch")
            self._left(move, host, mac, ofport)

    def tick(self) -> None:
        """Finish moves whose VM is at its destination; roll back those out of time."""
        with self._lock:
            for move in self._open_moves():
                if move.phase == MOVED:
                    if self._traffic_flows(move) or self._grace_over(move):
                        self._finish(move)
                elif self._age(move) > self.settings.timeout_s:
                    self._roll_back(
                        move.id,
                        f"the move did not complete within {self.settings.timeout_s:g} s",
                    )

    def resume(self) -> None:
        """After a restart: carry on, finish or roll back each open move by where the VM's
        ports are now, and take up moves the switches made while the controller was down."""
        with self._lock:
            for move in self._open_moves():
                self._resume(move)

    def _resume(self, move: _Move) -> None:
        at_source = self._ports_at(move.source, move.nics)
        destination = move.destination
        at_destination = self._ports_at(destination, move.nics) if destination else {}
        if destination is not None and at_destination and not at_source:
            for mac, ofport in at_destination.items():
                self._arrived(self._reload(move.id), destination.name, mac, ofport)
        elif at_source and (
            move.phase in (OUT, MOVED) or (move.phase == IN and not at_destination)
        ):
            self._roll_back(move.id, "the VM is back on its source host after a restart")

    # The steps -----------------------------------------------------------------------

    def _arrived(self, move: _Move, host: str, mac: str, ofport: int) -> None:
        """Step 1 (or a VM back on its source: step 4)."""
        if host == move.source.name:
            if move.phase in (OUT, MOVED):
                self._roll_back(move.id, "the VM came back on its source host")
            return
        if move.destination is not None and host != move.destination.name:
            log.warning(
                "VM %s appeared on %s while moving to %s", move.vm, host, move.destination.name
            )
            return
        move = self._set_port(move, host, mac, "new", ofport)
        if any(p.get("new") is None for p in move.ports.values()):
            return
        self._install_destination(move)
        move = self._advance(move.id, IN if move.phase in (STARTED, IN) else MOVED)
        if move.phase == IN and not self._ports_at(move.source, move.nics):
            for nic in move.nics:
                self._left(self._reload(move.id), move.source.name, nic.mac, -1)

    def _left(self, move: _Move, host: str, mac: str, ofport: int) -> None:
        """Step 2 (or the destination port gone: step 4)."""
        if move.destination is not None and host == move.destination.name:
            if move.phase in (STARTED, IN):
                self._roll_back(move.id, "the destination port went away")
            return
        if host != move.source.name or move.phase in (OUT, MOVED):
            return
        known = move.ports.get(mac, {}).get("old")
        move = self._set_port(move, host, mac, "old", known if ofport < 0 else ofport)
        if self._ports_at(move.source, move.nics):
            return
        self._take_off_source(move)
        move = self._advance(move.id, MOVED if move.phase == IN else OUT)
        if move.phase == MOVED:
            self._announce(move)

    def _prepare_destination(self, record_id: int) -> None:
        """The receive rules match the VM's MAC, not a port: an asked-for move installs them
        on the destination before its port exists, so nothing the policy denies reaches the
        VM there, whenever it starts to run."""
        with self._lock:
            move = self._reload(record_id)
            if move.destination is None:
                return
            ofports = {n.mac: 0 for n in move.nics}
            self._install(move.destination, move, lambda: self._compiled(move, ofports, send=False))

    def _install_destination(self, move: _Move) -> None:
        """The VM's rules as the source holds them, moved to the new ports, on the destination
        in one change."""
        assert move.destination is not None
        self._install(move.destination, move, lambda: self._moved_rules(move))

    def _moved_rules(self, move: _Move) -> list[str]:
        """The VM's rules as the source holds them, moved to the new ports: the send rules
        rewritten for the new ports, the receive and where rules with their delivery pointed
        at them (and a redirected where rule back to `NORMAL`). The send rules read are
        saved, so the take-off need not read them again; once the source let go of them, the
        saved ones are taken. Compiled instead when the source has none to give."""
        new_ports = {mac: int(p["new"] or 0) for mac, p in move.ports.items()}
        send, receive = self._held(move)
        if send:
            self._save(move.id, send)
        else:
            send = move.saved
        rules = (
            self._retargeted_send(move, send, new_ports)
            if send
            else self._compiled(move, new_ports, send=True)
        )
        rules += (
            self._retargeted_receive(move, receive, new_ports)
            if receive
            else self._compiled(move, new_ports, send=False)
        )
        return rules

    def _held(self, move: _Move) -> tuple[list[str], list[str]]:
        """The VM's send rules on the source, and its other rules there (receive, where)."""
        send: list[str] = []
        other: list[str] = []
        cookie = send_cookie(move.vm_id)
        for rule in self._read(move.source, cookie, VM_RULES_MASK):
            (send if cookie_of(rule) == cookie else other).append(rule)
        return send, other

    def _install(self, host: HostRef, move: _Move, rules: Callable[[], list[str]]) -> None:
        """Make the rules `rules` gives the VM's only rules on `host`, with the base rules they
        need, in one change, and the meters of its rate limits before them: the send rules
        copied from the source name those meters by ids that are the VM's on every host (and
        the VM's other meters there, stale ones, go).

        The host's peer links (its base rules) and meters are read while `rules` works (for a
        move, reading the source's rules): three tool runs at once rather than one after the
        other, while the VM waits for the change."""
        switch = self._switch(host)
        with ThreadPoolExecutor(max_workers=2) as pool:
            peers = pool.submit(switch.peer_ports, host.bridge)
            present = pool.submit(switch.meters, host.bridge)
            made = rules()
            with self.ctl.uow() as uow:
                meters = nic_meters(move.nics, stored_policies(uow.session))
            deletes, base = base_change(peers.result().values())
            current = present.result()
        deletes.append((send_cookie(move.vm_id), VM_RULES_MASK))
        owned = [vm_meters(move.vm_id)]
        switch.change_flows(
            host.bridge, deletes, base + made, meters, owned, current_meters=current
        )

    def _retargeted_send(
        self, move: _Move, rules: list[str], new_ports: Mapping[str, int]
    ) -> list[str]:
        """Send rules of the source rewritten for `new_ports`, each NIC's by the port it had
        (all of them when the VM has one NIC, else told apart by `in_port`)."""
        if len(move.nics) == 1:
            return retarget_send(rules, new_ports[move.nics[0].mac])
        old_ports = {mac: p.get("old") for mac, p in move.ports.items()}
        current = self._switch(move.source).ports(move.source.bridge)
        rewritten: list[str] = []
        for nic in move.nics:
            old = old_ports.get(nic.mac) or current.get(nic.mac)
            mine = [r for r in rules if old is not None and in_port_of(r) == old]
            rewritten += retarget_send(mine, new_ports[nic.mac])
        return rewritten

    def _retargeted_receive(
        self, move: _Move, rules: list[str], new_ports: Mapping[str, int]
    ) -> list[str]:
        """Receive and where rules of the source, each NIC's (by its MAC) delivering to its
        new port."""
        retargeted: list[str] = []
        for nic in move.nics:
            mine = [r for r in rules if f"dl_dst={nic.mac}" in r]
            retargeted += retarget_receive(mine, new_ports[nic.mac])
        return retargeted

    def _take_off_source(self, move: _Move) -> None:
        """One change on the source: the send rules go, and the where rules are replaced by
        ones sending what the receive rules allow to the peer link toward the destination;
        the receive rules stay. The destination saved the send rules when it got them;
        read and saved here when the source port goes first."""
        if move.phase == STARTED:
            self._save(move.id, self._read(move.source, send_cookie(move.vm_id)))
        deletes = [(send_cookie(move.vm_id), EXACT)]
        redirected = self._redirected_where(move)
        if redirected:
            deletes.append((where_cookie(move.vm_id), EXACT))
        switch = self._switch(move.source)
        switch.change_flows(move.source.bridge, deletes, redirected)

    def _redirected_where(self, move: _Move) -> list[str]:
        """The where rules of the VM's NICs with a policy, made anew and redirected to the
        peer link toward the destination. None when redirection is off, the destination is
        not known yet (the source port went first) or there is no link to it: the where
        rules then stay (`NORMAL`), and the destination reads them as they are."""
        if not self.settings.redirect or move.destination is None:
            return []
        ports = self._switch(move.source).redirect_ports(move.source.bridge)
        peer = ports.peers.get(move.destination.name)
        if peer is None:
            return []
        return [
            rule
            for nic in move.nics
            if nic.policy is not None
            for rule in redirect_where(
                [where_rule(port_facts(nic, 0))], nic.vlan, peer, ports.vlans.get(nic.vlan, ())
            )
        ]

    def _announce(self, move: _Move) -> None:
        """Tell the learning switches where the VM is now, as QEMU does after a move."""
        assert move.destination is not None
        self._moved_at[move.id] = time.monotonic()
        switch = self._switch(move.destination)
        for nic in move.nics:
            ofport = move.ports.get(nic.mac, {}).get("new")
            if ofport and nic.ipv4:
                try:
                    switch.announce(move.destination.bridge, ofport, nic.mac, nic.ipv4[0])
                except VswitchError as error:
                    log.warning(
                        "VM %s not announced on %s: %s", move.vm, move.destination.name, error
                    )

    def _finish(self, move: _Move) -> None:
        """Step 3: the source's leftovers (rules and meters) go, and the VM's host is the
        destination."""
        assert move.destination is not None
        source = self.ctl.agents.vswitch(move.source)
        if source is not None:
            cookies = [(send_cookie(move.vm_id), VM_RULES_MASK)]
            meters = [vm_meters(move.vm_id)]
            source.change_flows(move.source.bridge, cookies, [], meter_deletes=meters)
        with self.ctl.uow() as uow:
            vm = repository.get_vm(uow.session, move.vm)
            vm.host_id = repository.get_host(uow.session, move.destination.name).id
            uow.commit()
        self._end(move.id, DONE, None)
        self.ctl.names_changed({move.vm})

    def _roll_back(self, record_id: int, why: str) -> None:
        """Step 4: the destination's rules and meters go; the source gets the VM's rules
        again."""
        move = self._reload(record_id)
        destination = move.destination
        switch = None if destination is None else self.ctl.agents.vswitch(destination)
        if destination is not None and switch is not None:
            try:
                cookies = [(send_cookie(move.vm_id), VM_RULES_MASK)]
                meters = [vm_meters(move.vm_id)]
                switch.change_flows(destination.bridge, cookies, [], meter_deletes=meters)
            except VswitchError as error:
                log.error("VM %s: rules left on %s: %s", move.vm, destination.name, error)
        self._end(record_id, ROLLED_BACK, why)
        apply_policies(self.ctl, {move.vm})

    # Facts from the switches -----------------------------------------------------------

    def _switch(self, host: HostRef) -> Vswitch:
        switch = self.ctl.agents.vswitch(host)
        if switch is None:
            raise VswitchError(f"host {host.name} has no switch to move rules on")
        return switch

    def _read(self, host: HostRef, cookie: int, mask: int = EXACT) -> list[str]:
        return self._switch(host).flows(host.bridge, cookie, mask)

    def _ports_at(self, host: HostRef, nics: list[PolicyNic]) -> dict[str, int]:
        """The VM's NICs that have a port on `host`'s switch: MAC -> port."""
        ports = self._switch(host).ports(host.bridge)
        return {nic.mac: ports[nic.mac] for nic in nics if nic.mac in ports}

    def _traffic_flows(self, move: _Move) -> bool:
        assert move.destination is not None
        switch = self._switch(move.destination)
        return switch.packets(move.destination.bridge, send_cookie(move.vm_id), EXACT) > 0

    def _grace_over(self, move: _Move) -> bool:
        since = self._moved_at.setdefault(move.id, time.monotonic())
        return time.monotonic() - since > self.settings.grace_s

    def _age(self, move: _Move) -> float:
        return (utcnow() - move.started_at).total_seconds()

    def _compiled(self, move: _Move, ofports: Mapping[str, int], *, send: bool) -> list[str]:
        """The VM's send rules, or its receive and where rules, compiled from its policies for
        these ports."""
        with self.ctl.uow() as uow:
            policies = stored_policies(uow.session)
            peers = resolve_peers(uow.session, policies)
        rules: list[str] = []
        for nic in move.nics:
            if nic.policy is None:
                continue
            compiled = compile_port(
                policies[nic.policy], port_facts(nic, ofports[nic.mac]), peers[nic.policy]
            )
            rules += compiled.send if send else [*compiled.receive, *compiled.where]
        return rules

    # The record --------------------------------------------------------------------------

    def _start(self, name: str, to_host: str) -> tuple[int, HostRef, HostRef]:
        """Check the request and record the move; nothing changes when it is refused."""
        with self.ctl.uow() as uow:
            session = uow.session
            vm = repository.get_vm(session, name)
            destination = host_ref(repository.get_host(session, to_host))
            source = host_ref(vm.host)
            _check_move(session, vm, source, destination)
        self._check_reachable(destination)
        with self._lock:
            move = self._record(name, source.name, destination.name, "api")
        return move.id, source, destination

    def _check_reachable(self, host: HostRef) -> None:
        try:
            self.ctl.agents.hypervisor(host).list_vms()
            switch = self.ctl.agents.vswitch(host)
            if switch is not None:
                switch.ports(host.bridge)
        except (HypervisorError, VswitchError) as error:
            raise Unavailable(f"host {host.name} is unreachable: {error}") from error

    def _record(self, vm: str, source: str, destination: str, asked_by: str) -> _Move:
        with self.ctl.uow() as uow:
            row = repository.get_vm(uow.session, vm)
            macs = [n.mac for n in row.nics if n.mac]
            record = VmMigration(
                vm_id=row.id,
                vm=vm,
                source=source,
                destination=destination,
                phase=STARTED,
                asked_by=asked_by,
                ports={mac: {"old": None, "new": None} for mac in macs},
                saved=[],
            )
            uow.session.add(record)
            uow.commit()
            record_id = record.id
        return self._reload(record_id)

    def _reload(self, record_id: int) -> _Move:
        with self.ctl.uow() as uow:
            row = uow.session.get(VmMigration, record_id)
            if row is None:
                raise NotFound(f"no migration {record_id}")
            hosts = {h.name: host_ref(h) for h in repository.list_hosts(uow.session)}
            nics = policy_nics(uow.session, {row.vm})
            return _Move(
                id=row.id,
                vm=row.vm,
                vm_id=row.vm_id,
                phase=row.phase,
                source=hosts[row.source],
                destination=hosts.get(row.destination),
                nics=nics,
                ports={mac: dict(p) for mac, p in row.ports.items()},
                saved=list(row.saved),
                started_at=as_utc(row.started_at),
            )

    def _set_port(self, move: _Move, host: str, mac: str, which: str, ofport: int | None) -> _Move:
        with self.ctl.uow() as uow:
            row = _row(uow.session, move.id)
            ports = {m: dict(p) for m, p in row.ports.items()}
            ports.setdefault(mac, {"old": None, "new": None})[which] = ofport
            row.ports = ports
            if which == "new" and not row.destination:
                row.destination = host
            uow.commit()
        return self._reload(move.id)

    def _save(self, record_id: int, saved: list[str]) -> None:
        with self.ctl.uow() as uow:
            _row(uow.session, record_id).saved = saved
            uow.commit()

    def _advance(self, record_id: int, phase: str) -> _Move:
        with self.ctl.uow() as uow:
            _row(uow.session, record_id).phase = phase
            uow.commit()
        return self._reload(record_id)

    def _end(self, record_id: int, phase: str, detail: str | None) -> None:
        with self.ctl.uow() as uow:
            row = _row(uow.session, record_id)
            row.phase = phase
            row.detail = detail
            row.finished_at = utcnow()
            uow.commit()
            view = _view(row)
        self._moved_at.pop(record_id, None)
        self._finished.notify_all()
        if self.on_finish is not None:
            self.on_finish(view)

    def _wait(self, record_id: int) -> MigrationView:
        """The move once it ended, or as it is after the timeout."""
        deadline = time.monotonic() + self.settings.timeout_s + self.settings.grace_s
        with self._lock:
            while True:
                view = migration_view(self.ctl, record_id)
                left = deadline - time.monotonic()
                if view.phase in (DONE, ROLLED_BACK) or left <= 0:
                    return view
                self._finished.wait(min(left, 0.05))
                self.tick()

    def _open_move(self, vm: str) -> _Move | None:
        with self.ctl.uow() as uow:
            record_id = uow.session.scalar(
                select(VmMigration.id).where(
                    VmMigration.vm == vm, VmMigration.phase.in_(OPEN_PHASES)
                )
            )
        return None if record_id is None else self._reload(record_id)

    def _open_moves(self) -> list[_Move]:
        with self.ctl.uow() as uow:
            ids = list(
                uow.session.scalars(
                    select(VmMigration.id).where(VmMigration.phase.in_(OPEN_PHASES))
                )
            )
        return [self._reload(record_id) for record_id in ids]

    def _vm_of(self, mac: str) -> tuple[str, str] | None:
        """(VM, its host) of the NIC with this MAC, if the controller knows it."""
        with self.ctl.uow() as uow:
            return repository.vm_of_mac(uow.session, mac)

    def _runs(self, vm: str) -> bool:
        with self.ctl.uow() as uow:
            return repository.get_vm(uow.session, vm).state == VmState.RUNNING.value


def list_migrations(
    ctl: Controller, vm: str | None = None, limit: int = 100
) -> list[MigrationView]:
    """The latest migrations (of every VM, or of one), newest first."""
    with ctl.uow() as uow:
        query = select(VmMigration).order_by(VmMigration.id.desc()).limit(limit)
        if vm is not None:
            query = query.where(VmMigration.vm == vm)
        return [_view(row) for row in uow.session.scalars(query)]


def migration_view(ctl: Controller, record_id: int) -> MigrationView:
    """One migration."""
    with ctl.uow() as uow:
        return _view(_row(uow.session, record_id))


def _check_move(session: Session, vm: Vm, source: HostRef, destination: HostRef) -> None:
    if vm.state != VmState.RUNNING.value:
        raise Conflict(f"VM {vm.name} is {vm.state}: only a running VM migrates", vm=vm.name)
    if destination.name == source.name:
        raise Conflict(f"VM {vm.name} runs on {source.name} already", vm=vm.name)
    if destination.driver != source.driver:
        raise InvalidInput(
            f"VM {vm.name} cannot move from a {source.driver} host to a {destination.driver} "
            f"host ({destination.name})"
        )
    moving = session.scalar(
        select(VmMigration).where(VmMigration.vm_id == vm.id, VmMigration.phase.in_(OPEN_PHASES))
    )
    if moving is not None:
        raise Conflict(
            f"VM {vm.name} is moving already ({moving.source} to {moving.destination})",
            vm=vm.name,
        )


def _row(session: Session, record_id: int) -> VmMigration:
    row = session.get(VmMigration, record_id)
    if row is None:
        raise NotFound(f"no migration {record_id}")
    return row


def _view(row: VmMigration) -> MigrationView:
    started = as_utc(row.started_at)
    finished = as_utc(row.finished_at) if row.finished_at else None
    seconds = (finished - started) / timedelta(seconds=1) if finished else None
    return MigrationView(
        vm=row.vm,
        source=row.source,
        destination=row.destination,
        phase=row.phase,
        asked_by=row.asked_by,
        ports={mac: dict(p) for mac, p in row.ports.items()},
        detail=row.detail,
        started_at=started,
        finished_at=finished,
        seconds=seconds,
    )
