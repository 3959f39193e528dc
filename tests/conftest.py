"""Fixtures shared by every test: a private state directory, a controller, its API."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from vmfabric.access.bundle import build_guest_proxy
from vmfabric.agent.registry import LocalAgents
from vmfabric.api.app import create_app
from vmfabric.dhcp.dnsmasq import DnsmasqServer
from vmfabric.process_identity import current_owner
from vmfabric.services.context import Controller
from vmfabric.store.engine import migrate, open_engine, session_factory
from vmfabric.store.group_commit import GroupCommitter


@pytest.fixture
def state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A state directory of the test's own (database, DHCP files, sockets)."""
    monkeypatch.setenv("VMFABRIC_STATE", str(tmp_path))
    return tmp_path


@pytest.fixture
def controller(state: Path) -> Iterator[Controller]:
    """A controller on SQLite with the real dnsmasq driver writing its reservation files.

    No fabric: dnsmasq processes start only where a network has a place to run (the lab).
    """
    engine = open_engine(f"sqlite:///{state / 'vmfabric.db'}")
    migrate(engine)
    dhcp = DnsmasqServer(state / "dhcp", state / "run" / "lease-events.sock")
    ctl = Controller(
        sessions=session_factory(engine),
        agents=LocalAgents(),
        dhcp=dhcp,
        fabric=None,
        owner=current_owner(),
        writes=GroupCommitter(engine),
    )
    yield ctl
    ctl.close()
    engine.dispose()


@pytest.fixture
def api(controller: Controller) -> Iterator[TestClient]:
    """The HTTP API over the test's controller."""
    with TestClient(create_app(controller)) as client:
        yield client


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The guest proxy's single file, built once per module."""
    return build_guest_proxy(tmp_path_factory.mktemp("dist") / "vmfabric-guest-proxy")
