"""Putting the controller together and serving it: `vmfabric serve`."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import uvicorn
import uvloop
from fastapi import FastAPI
from pydantic import TypeAdapter

from vmfabric import config
from vmfabric.access.gateway import Gateway, gateway_thread
from vmfabric.agent.registry import LocalAgents
from vmfabric.api.app import create_app
from vmfabric.api.metrics import LEASE_EVENTS, count_migration, timed_checks
from vmfabric.dhcp.dnsmasq import DnsmasqServer
from vmfabric.dhcp.lease_events import LeaseEventListener
from vmfabric.dns.keyfile import TsigKey
from vmfabric.dns.server import DnsServer, ServerThread
from vmfabric.domain.checks import CheckResult
from vmfabric.domain.dns_records import absolute
from vmfabric.domain.model import LeaseEvent
from vmfabric.fabric import Fabric
from vmfabric.process_identity import current_owner
from vmfabric.services.access import configure_access, flush_uses
from vmfabric.services.checks import CheckChange, Checker, CheckSettings
from vmfabric.services.context import Controller
from vmfabric.services.guest_addresses import sweep_guest_addresses
from vmfabric.services.hosts import host_on_bridge
from vmfabric.services.leases import record_lease_event
from vmfabric.services.migrations import MigrationEngine, MigrationSettings
from vmfabric.services.reconcile import reconcile
from vmfabric.services.registrations import NamePublisher
from vmfabric.store.engine import migrate, open_engine, session_factory
from vmfabric.store.group_commit import GroupCommitter
from vmfabric.vswitch.watch import PortEvent, PortWatcher
from vmfabric.webhooks import WebhookSender

log = logging.getLogger(__name__)

CHECK_CHANGED = "vm.check.changed"
_RESULT_JSON = TypeAdapter(CheckResult)
GUEST_SWEEP_S = 10.0
"""How often the guest agents are asked for the addresses guests configured themselves."""
SYSTEM_OVSDB = "/var/run/openvswitch/db.sock"
"""Where the system's Open vSwitch keeps its database socket (Debian's default)."""
MIGRATION_TICK_S = 0.1
"""How often moves are checked for traffic at their destination and for their timeout."""


@dataclass(frozen=True)
class ServeOptions:
    """`vmfabric serve` options; `dns_listen` None runs no DNS server."""

    db_url: str
    host: str = "127.0.0.1"
    port: int = 8750
    lab: bool = False
    token: str | None = None
    dns_listen: tuple[str, int] | None = None
    zone: str = config.DEFAULT_ZONE
    dns_secondaries: tuple[tuple[str, int], ...] = ()
    dns_key: TsigKey | None = None
    checks: CheckSettings = field(default_factory=CheckSettings)
    check_interval_s: float = 60.0
    webhooks: tuple[str, ...] = ()
    webhook_secret: bytes = b""
    migrations: MigrationSettings = field(default_factory=MigrationSettings)
    access_key: bytes | None = field(default=None, repr=False)
    """The key access credentials are signed with; None: the state directory's."""
    gateway_listen: tuple[str, int] | None = None
    """Where the access gateway listens; None runs none."""


def build_controller(db_url: str, lab: bool) -> Controller:
    """Open (and migrate) the database and wire the drivers."""
    engine = open_engine(db_url)
    migrate(engine)
    fabric: Fabric | None = None
    if lab:
        from vmfabric.lab.fabric import LabFabric

        fabric = LabFabric()
    return Controller(
        sessions=session_factory(engine),
        agents=LocalAgents(),
        dhcp=DnsmasqServer(),
        fabric=fabric,
        owner=current_owner(),
        writes=GroupCommitter(engine),
    )


def build_app(options: ServeOptions) -> FastAPI:
    """The controller's app, reconciled with the world and listening for lease events."""
    ctl = build_controller(options.db_url, options.lab)
    configure_access(ctl, options.access_key)
    reconcile(ctl)
    engine = MigrationEngine(ctl, options.migrations, on_finish=count_migration)
    engine.resume()
    sender = WebhookSender(options.webhooks, options.webhook_secret)
    checker = Checker(options.checks, on_change=lambda change: _announce(sender, change))
    background = _background(ctl, options, checker, sender, engine)
    return create_app(
        ctl,
        lab=options.lab,
        token=options.token,
        background=background,
        checker=checker,
        migrations=engine,
    )


def _announce(sender: WebhookSender, change: CheckChange) -> None:
    """A change of a VM's check state, as the webhook document `vm.check.changed`."""
    sender.send(
        CHECK_CHANGED,
        {
            "event": CHECK_CHANGED,
            "vm": change.vm,
            "previous": _RESULT_JSON.dump_python(change.previous, mode="json"),
            "current": _RESULT_JSON.dump_python(change.current, mode="json"),
        },
    )


def _background(
    ctl: Controller,
    options: ServeOptions,
    checker: Checker,
    sender: WebhookSender,
    engine: MigrationEngine,
) -> Callable[[], Callable[[], None]]:
    """The lease listener, the DNS server, the access gateway, the sweep of guest addresses,
    the periodic connectivity checks and the switch watcher that drives migrations, started
    with the app and stopped after it."""

    def on_event(event: LeaseEvent) -> None:
        changed = record_lease_event(ctl, event)
        LEASE_EVENTS.labels(event.action.value, str(changed).lower()).inc()

    def start() -> Callable[[], None]:
        names = _start_names(ctl, options)
        gateway = _start_gateway(ctl, options.gateway_listen)
        listener = LeaseEventListener(config.lease_socket(), on_event)
        listener.start()
        sweeps = _every(GUEST_SWEEP_S, lambda: sweep_guest_addresses(ctl), "guest-sweep")
        watch = _watch_switches(ctl, engine, options.lab)
        ticks = _every(MIGRATION_TICK_S, engine.tick, "migrations")
        checks = (
            _every(options.check_interval_s, lambda: timed_checks(ctl, checker), "checks")
            if options.check_interval_s > 0
            else lambda: None
        )

        def stop() -> None:
            checks()
            ticks()
            watch()
            sender.close()
            sweeps()
            listener.close()
            if names is not None:
                names()
            gateway()
            flush_uses(ctl)
            ctl.close()

        return stop

    return start


def _watch_switches(ctl: Controller, engine: MigrationEngine, lab: bool) -> Callable[[], None]:
    """Watch the switch of this machine's hosts (the lab's, or the system Open vSwitch) for
    VM ports appearing and leaving: they drive the migration method; the function that stops
    watching."""
    driver = "lab" if lab else "libvirt"
    if lab:
        from vmfabric.vswitch.watch import lab_port_watcher

        watcher = lab_port_watcher()
    elif Path(SYSTEM_OVSDB).exists():
        watcher = PortWatcher()
    else:
        log.info("no Open vSwitch database at %s: migrations are not watched", SYSTEM_OVSDB)
        return lambda: None

    def on_event(event: PortEvent) -> None:
        if event.mac is None:
            return
        host = host_on_bridge(ctl, event.bridge, driver)
        if host is None:
            return
        try:
            if event.kind == "added":
                engine.port_added(host, event.mac, event.ofport)
            else:
                engine.port_removed(host, event.mac, event.ofport)
        except Exception:
            log.exception("switch event %s not handled", event)

    watcher.start(on_event)
    return watcher.stop


def _every(seconds: float, action: Callable[[], object], name: str) -> Callable[[], None]:
    """Run `action` now and then every `seconds` on a thread of its own, logging its failures;
    the function that stops it (waiting for a run under way)."""
    stopping = threading.Event()

    def loop() -> None:
        while not stopping.is_set():
            try:
                action()
            except Exception:
                log.exception("%s failed", name)
            stopping.wait(seconds)

    thread = threading.Thread(target=loop, name=f"vmfabric-{name}", daemon=True)
    thread.start()

    def stop() -> None:
        stopping.set()
        thread.join(timeout=30)

    return stop


def _start_names(ctl: Controller, options: ServeOptions) -> Callable[[], None] | None:
    """Serve the zones on `options.dns_listen`, republished on every registration change;
    the function that stops it."""
    if options.dns_listen is None:
        return None
    nameserver = f"ns.{absolute(options.zone)}"  # the reverse zones' name server too
    key = options.dns_key
    server = DnsServer(
        options.dns_listen,
        nameserver=nameserver,
        tsig_keys={key.name: (key.algorithm, key.secret)} if key else {},
        transfer_key=key.name if key else None,
        notify=options.dns_secondaries,
    )
    running = ServerThread(server, loop_factory=uvloop.new_event_loop)
    running.start()
    publisher = NamePublisher(ctl, server, options.zone)
    serials = publisher.publish_now()
    without_names = ctl.names_changed
    ctl.names_changed = publisher.changed
    log.info("DNS on %s:%d, zones %s", options.dns_listen[0], server.port, serials)

    def stop() -> None:
        ctl.names_changed = without_names
        publisher.close()
        running.stop()

    return stop


def _start_gateway(ctl: Controller, listen: tuple[str, int] | None) -> Callable[[], None]:
    """Run the access gateway on `listen` (none when None); the function that stops it.

    An address that cannot be bound leaves the controller running without a gateway (with
    an error in its log): `serve` refuses an address it was given that is taken before it
    starts, so this happens only for the default address (e.g. a second controller on the
    machine, whose host agent's gateway the first one runs) or in a race.
    """
    if listen is None:
        return lambda: None
    running = gateway_thread(Gateway(ctl, listen))
    try:
        host, port = running.start().address
    except OSError as error:
        log.error("no access gateway: cannot listen on %s:%d: %s", *listen, error.strerror or error)
        return lambda: None
    log.info("access gateway on http://%s:%d", host, port)
    return running.stop


def serve(options: ServeOptions) -> None:
    """Run the controller until interrupted."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    app = build_app(options)
    uvicorn.run(app, host=options.host, port=options.port, log_level="warning")
