"""Putting the controller together and serving it: `vmfabric serve`."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import uvicorn
from fastapi import FastAPI

from vmfabric import config
from vmfabric.agent.registry import LocalAgents
from vmfabric.api.app import create_app
from vmfabric.api.metrics import LEASE_EVENTS
from vmfabric.dhcp.dnsmasq import DnsmasqServer
from vmfabric.dhcp.lease_events import LeaseEventListener
from vmfabric.domain.model import LeaseEvent
from vmfabric.fabric import Fabric
from vmfabric.process_identity import current_owner
from vmfabric.services.context import Controller
from vmfabric.services.leases import record_lease_event
from vmfabric.services.reconcile import reconcile
from vmfabric.store.engine import migrate, open_engine, session_factory
from vmfabric.store.group_commit import GroupCommitter

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServeOptions:
    """`vmfabric serve` options."""

    db_url: str
    host: str = "127.0.0.1"
    port: int = 8750
    lab: bool = False
    token: str | None = None


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
    reconcile(ctl)
    return create_app(ctl, lab=options.lab, token=options.token, background=_lease_listener(ctl))


def _lease_listener(ctl: Controller) -> Callable[[], Callable[[], None]]:
    def on_event(event: LeaseEvent) -> None:
        changed = record_lease_event(ctl, event)
        LEASE_EVENTS.labels(event.action.value, str(changed).lower()).inc()

    def start() -> Callable[[], None]:
        listener = LeaseEventListener(config.lease_socket(), on_event)
        listener.start()

        def stop() -> None:
            listener.close()
            ctl.close()

        return stop

    return start


def serve(options: ServeOptions) -> None:
    """Run the controller until interrupted."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    app = build_app(options)
    uvicorn.run(app, host=options.host, port=options.port, log_level="warning")
