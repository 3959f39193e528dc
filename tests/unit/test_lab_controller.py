"""Finding the controller for the lab: lab mode required, hosts registered once, local only."""

from __future__ import annotations

from pathlib import Path

import pytest

from vmfabric.lab import controller
from vmfabric.lab.errors import LabError
from vmfabric.lab.state import LabStore
from vmfabric.lab.testing import FakeController


@pytest.fixture
def lab_state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> LabStore:
    monkeypatch.setenv("VMFABRIC_STATE", str(tmp_path))
    return LabStore()


def test_a_controller_in_lab_mode_is_used_as_is(
    lab_state: LabStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    with FakeController(lab=True) as fake:
        monkeypatch.setenv("VMFABRIC_URL", fake.url)
        status = controller.ensure_controller(lab_state)
    assert status == controller.ControllerStatus(url=fake.url, started_by_lab=False, pid=None)


def test_a_controller_not_in_lab_mode_is_refused(
    lab_state: LabStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    with FakeController(lab=False) as fake:
        monkeypatch.setenv("VMFABRIC_URL", fake.url)
        with pytest.raises(LabError, match="not in lab mode"):
            controller.ensure_controller(lab_state)


def test_hosts_already_registered_are_fine() -> None:
    with FakeController() as fake:
        controller.register_hosts(["hv1", "hv2"], fake.url)
        controller.register_hosts(["hv1", "hv2", "hv3"], fake.url)
        assert fake.hosts == ["hv1", "hv2", "hv3"]


def test_the_controller_listens_where_the_cli_looks() -> None:
    argv = controller.controller_argv("http://127.0.0.1:18750")
    assert argv[1:] == ["-m", "vmfabric.cli.main", "serve", "--lab", "--listen", "127.0.0.1:18750"]
    assert controller.controller_argv("http://[::1]:9")[-1] == "[::1]:9"


@pytest.mark.parametrize("url", ["https://127.0.0.1:8750", "http://192.0.2.7:8750"])
def test_the_lab_starts_controllers_only_on_local_http(url: str) -> None:
    with pytest.raises(LabError, match="loopback"):
        controller.controller_argv(url)


def test_stopping_without_a_recorded_controller_does_nothing(lab_state: LabStore) -> None:
    assert controller.stop_controller(lab_state) is False
