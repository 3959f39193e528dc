"""The lab's record: round trip, atomic writes, a lock that serializes processes and threads."""

from __future__ import annotations

import multiprocessing
import threading
from pathlib import Path

import pytest

from vmfabric.lab.errors import LabError
from vmfabric.lab.state import (
    FaultRecord,
    FlowRecord,
    LabState,
    LabStore,
    LinkRecord,
    ProcessRecord,
    VmRecord,
)


def test_a_lab_never_up_reads_as_empty(tmp_path: Path) -> None:
    assert LabStore(tmp_path / "lab").read() == LabState()


def test_remembered_resources_are_on_disk_at_once(tmp_path: Path) -> None:
    store = LabStore(tmp_path / "lab")
    with store.edit() as record:
        record.remember_namespace("vmf-wan")
        assert store.read().namespaces == ["vmf-wan"]
        record.remember_link(LinkRecord(name="vmfv1", peer="eth0", peer_netns="vmf-vm.hv1.a"))
        record.remember_process(ProcessRecord(name="vmf-x", argv=["sleep", "1"], pid=1))
        record.remember_vm(VmRecord(name="a", host="hv1", image="i", netns="n", directory="d"))
    state = store.read()
    assert state.links["vmfv1"].peer_netns == "vmf-vm.hv1.a"
    assert state.processes["vmf-x"].pid == 1
    assert state.vms["hv1/a"].host == "hv1"


def test_forgetting_removes_and_remembering_twice_keeps_one(tmp_path: Path) -> None:
    store = LabStore(tmp_path / "lab")
    with store.edit() as record:
        record.remember_bridge("vmf-fabric")
        record.remember_bridge("vmf-fabric")
        record.remember_bridge("vmf-hv1")
        record.forget_bridge("vmf-fabric")
        record.forget_bridge("vmf-unknown")
    assert store.read().bridges == ["vmf-hv1"]


def test_writes_leave_no_temporary_files(tmp_path: Path) -> None:
    store = LabStore(tmp_path / "lab")
    with store.edit() as record:
        for i in range(5):
            record.remember_namespace(f"vmf-{i}")
    assert sorted(p.name for p in store.root.iterdir()) == ["state.json", "state.lock"]


def test_nested_edits_in_one_thread_share_the_record(tmp_path: Path) -> None:
    store = LabStore(tmp_path / "lab")
    with store.edit() as outer, store.edit() as inner:
        assert inner is outer
        inner.remember_namespace("vmf-a")
    assert store.read().namespaces == ["vmf-a"]


def test_faults_keep_their_cookies_in_hex_and_old_records_have_none(tmp_path: Path) -> None:
    store = LabStore(tmp_path / "lab")
    flows = FlowRecord(bridge="vmf-hv1", cookie=0xFA17000100ABCDEF, rules=["r"])
    vm = VmRecord(name="a", host="hv1", image="i", netns="n", directory="d")
    vm.faults["gateway-down"] = FaultRecord(kind="gateway-down", flows=[flows])
    with store.edit() as record:
        record.remember_vm(vm)
    assert '"cookie": "0xfa17000100abcdef"' in store.path.read_text()
    assert store.read().vms["hv1/a"].faults["gateway-down"].flows == [flows]
    store.path.write_text(
        '{"vms": {"hv1/b": {"name": "b", "host": "hv1", "image": "i", '
        '"netns": "n", "directory": "d"}}}'
    )
    assert store.read().vms["hv1/b"].faults == {}


def test_an_unreadable_record_is_a_clear_error(tmp_path: Path) -> None:
    store = LabStore(tmp_path / "lab")
    store.root.mkdir()
    store.path.write_text('{"namespaces": 3}')
    with pytest.raises(LabError, match="unreadable"):
        store.read()


def _add_many(root: str, prefix: str, count: int) -> None:
    store = LabStore(Path(root))
    for i in range(count):
        with store.edit() as record:
            record.remember_namespace(f"{prefix}-{i}")


def test_processes_and_threads_never_lose_an_update(tmp_path: Path) -> None:
    root = str(tmp_path / "lab")
    context = multiprocessing.get_context("spawn")
    workers: list[multiprocessing.process.BaseProcess | threading.Thread] = [
        context.Process(target=_add_many, args=(root, f"p{n}", 25)) for n in range(3)
    ]
    workers += [threading.Thread(target=_add_many, args=(root, f"t{n}", 25)) for n in range(3)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert len(LabStore(Path(root)).read().namespaces) == 6 * 25


def test_a_lock_file_removed_by_down_is_not_shared(tmp_path: Path) -> None:
    store = LabStore(tmp_path / "lab")
    with store.edit() as record:
        record.remember_namespace("vmf-a")
    store.lock_path.unlink()
    store.path.unlink()
    with store.edit() as record:
        record.remember_namespace("vmf-b")
    assert store.read().namespaces == ["vmf-b"]
