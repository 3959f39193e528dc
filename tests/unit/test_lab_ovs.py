"""How other modules reach the lab switch: directories in the environment, the db explicitly."""

from __future__ import annotations

from pathlib import Path

import pytest

from vmfabric.lab.ovs import switch_access


def test_switch_access_follows_the_state_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("VMFABRIC_STATE", str(tmp_path))
    switch = switch_access()
    rundir = tmp_path / "lab" / "ovs" / "run"
    assert switch.env["OVS_RUNDIR"] == str(rundir)
    assert switch.environ()["OVS_RUNDIR"] == str(rundir)
    assert switch.command("ovs-vsctl", "show") == [
        "ovs-vsctl",
        f"--db=unix:{rundir / 'db.sock'}",
        "--timeout=10",
        "show",
    ]
    assert switch.command("ovs-ofctl", "dump-flows", "vmf-hv1") == [
        "ovs-ofctl",
        "dump-flows",
        "vmf-hv1",
    ]
