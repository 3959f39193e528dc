"""The libvirt driver against libvirt's in-process `test:///default` driver.

Every connection to `test:///default` in this process sees the same domains and volumes, so
each test uses fresh names and removes what it made. The fixtures shared with the contract
tests live there.
"""

from __future__ import annotations

import time
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import libvirt
import pytest
import test_hypervisor_contract as contract

from vmfabric.domain.model import NicSpec, VmSpec
from vmfabric.hypervisor import HypervisorError
from vmfabric.hypervisor.libvirt import (
    ACCESS_CHANNEL,
    AGENT_CHANNEL,
    METADATA_NS,
    LibvirtHypervisor,
    disk_volume,
    domain_xml,
)

libvirt_image = contract.libvirt_image
libvirt_subjects = contract.libvirt_subjects
libvirt_subject = contract.libvirt_subject
Subject = contract.Subject


@pytest.fixture
def conn() -> Iterator[Any]:
    """A connection of the test's own, to see what libvirt itself reports."""
    connection = libvirt.open(contract.TEST_URI)
    yield connection
    connection.close()


@pytest.fixture
def foreign(conn: Any) -> Iterator[str]:
    """A domain that someone other than vmfabric defined."""
    name = f"foreign-{uuid.uuid4().hex[:8]}"
    domain = conn.defineXML(
        f"<domain type='test'><name>{name}</name><memory>65536</memory>"
        "<os><type>hvm</type></os></domain>"
    )
    yield name
    if domain.isActive():
        domain.destroy()
    domain.undefine()


def xml_of(conn: Any, name: str) -> ET.Element:
    """The domain as libvirt describes it."""
    return ET.fromstring(conn.lookupByName(name).XMLDesc(0))


def attributes(elements: list[ET.Element], path: str, name: str) -> list[str | None]:
    """One attribute of a child of each element (None where either is missing)."""
    children = (element.find(path) for element in elements)
    return [None if child is None else child.get(name) for child in children]


def exists(conn: Any, name: str) -> bool:
    """Whether libvirt knows a domain of that name at all, managed or not."""
    return name in {domain.name() for domain in conn.listAllDomains()}


def volume(conn: Any, name: str) -> Any | None:
    """A volume of the test pool, or None."""
    pool = conn.storagePoolLookupByName(contract.TEST_POOL)
    return next((v for v in pool.listAllVolumes() if v.name() == name), None)


def test_chosen_macs_are_qemus_and_match_libvirt(libvirt_subject: Subject, conn: Any) -> None:
    spec = libvirt_subject.spec(None, None)
    defined = libvirt_subject.hypervisor.define(spec)
    reported = [m.get("address") for m in xml_of(conn, spec.name).iterfind(".//interface/mac")]
    assert list(defined.macs) == reported
    assert all(mac.startswith("52:54:00:") for mac in defined.macs)


def test_nics_are_ovs_ports_on_the_vlan(libvirt_subject: Subject, conn: Any) -> None:
    spec = libvirt_subject.spec(None, contract.random_mac(), vlan=20)
    libvirt_subject.hypervisor.define(spec)
    interfaces = xml_of(conn, spec.name).findall("devices/interface")
    assert [i.get("type") for i in interfaces] == ["bridge", "bridge"]
    assert attributes(interfaces, "source", "bridge") == [libvirt_subject.bridge] * 2
    assert attributes(interfaces, "virtualport", "type") == ["openvswitch"] * 2
    assert attributes(interfaces, "vlan/tag", "id") == ["20", "21"]
    assert attributes(interfaces, "model", "type") == ["virtio", "virtio"]


def test_domain_xml_names_a_mac_only_when_the_spec_fixes_one() -> None:
    fixed = contract.random_mac()
    nics = (NicSpec("a", "br", 1), NicSpec("b", "br", 2, fixed))
    root = ET.fromstring(domain_xml(VmSpec("vm", "img", nics), pool="p"))
    macs = [i.find("mac") for i in root.iterfind("devices/interface")]
    assert macs[0] is None
    assert macs[1] is not None
    assert macs[1].get("address") == fixed


def test_domain_has_size_image_disk_and_both_channels(
    libvirt_subject: Subject, conn: Any, tmp_path: Path
) -> None:
    spec = libvirt_subject.spec(None, memory_mib=384)
    libvirt_subject.hypervisor.define(spec)
    root = xml_of(conn, spec.name)
    assert root.findtext("memory") == str(384 * 1024)
    assert root.findtext("vcpu") == "1"
    assert root.findtext(f"metadata/{{{METADATA_NS}}}image") == spec.image
    source = root.find("devices/disk/source")
    assert source is not None
    assert (source.get("pool"), source.get("volume")) == (
        contract.TEST_POOL,
        f"{spec.name}.root.qcow2",
    )
    channels = root.findall("devices/channel")
    names, paths = attributes(channels, "target", "name"), attributes(channels, "source", "path")
    assert dict(zip(names, paths, strict=True)) == {
        AGENT_CHANNEL: f"{tmp_path}/{spec.name}.agent.sock",
        ACCESS_CHANNEL: f"{tmp_path}/{spec.name}.access.sock",
    }


def test_disk_is_an_overlay_on_the_image_removed_with_the_vm(
    libvirt_subject: Subject, conn: Any
) -> None:
    spec = libvirt_subject.spec(None)
    libvirt_subject.hypervisor.define(spec)
    disk = volume(conn, disk_volume(spec.name))
    assert disk is not None
    backing = ET.fromstring(disk.XMLDesc(0)).findtext("backingStore/path")
    assert backing == f"/{contract.TEST_POOL}/{spec.image}.qcow2"
    libvirt_subject.hypervisor.undefine(spec.name)
    assert volume(conn, disk_volume(spec.name)) is None


def test_a_stale_disk_is_replaced_not_reused(libvirt_subject: Subject, conn: Any) -> None:
    spec = libvirt_subject.spec(None)
    pool = conn.storagePoolLookupByName(contract.TEST_POOL)
    pool.createXML(
        f"<volume><name>{disk_volume(spec.name)}</name><capacity>1024</capacity></volume>", 0
    )
    libvirt_subject.hypervisor.define(spec)
    disk = volume(conn, disk_volume(spec.name))
    assert disk is not None
    assert ET.fromstring(disk.XMLDesc(0)).find("backingStore/path") is not None


def test_a_missing_image_is_refused_and_leaves_nothing(libvirt_subject: Subject, conn: Any) -> None:
    spec = libvirt_subject.spec(None)
    missing = replace(spec, image="no-such-image")
    with pytest.raises(HypervisorError, match="no-such-image"):
        libvirt_subject.hypervisor.define(missing)
    assert not exists(conn, spec.name)


def test_a_name_libvirt_refuses_is_an_error_and_leaves_nothing(
    libvirt_subject: Subject, conn: Any
) -> None:
    spec = libvirt_subject.spec(None)
    bad = replace(spec, name=f"{spec.name}/x")
    with pytest.raises(HypervisorError, match=f"define VM '{bad.name}'"):
        libvirt_subject.hypervisor.define(bad)
    assert volume(conn, disk_volume(bad.name)) is None


@pytest.mark.parametrize("mac", ["01:00:5e:00:00:01", "not-a-mac"])
def test_a_mac_libvirt_refuses_is_an_error(libvirt_subject: Subject, mac: str) -> None:
    spec = libvirt_subject.spec(mac)
    with pytest.raises(HypervisorError, match=spec.name):
        libvirt_subject.hypervisor.define(spec)


def test_a_fixed_mac_must_match_on_redefine(libvirt_subject: Subject) -> None:
    spec = libvirt_subject.spec(contract.random_mac())
    libvirt_subject.hypervisor.define(spec)
    unfixed = NicSpec("net0", libvirt_subject.bridge, 10)
    other = replace(spec, nics=(unfixed,))
    assert libvirt_subject.hypervisor.define(other).macs == (spec.nics[0].mac,)
    moved = NicSpec("net0", libvirt_subject.bridge, 10, contract.random_mac())
    with pytest.raises(HypervisorError, match="MAC"):
        libvirt_subject.hypervisor.define(replace(spec, nics=(moved,)))


def test_foreign_domains_are_left_alone(libvirt_subject: Subject, conn: Any, foreign: str) -> None:
    hypervisor = libvirt_subject.hypervisor
    assert foreign not in {vm.name for vm in hypervisor.list_vms()}
    with pytest.raises(HypervisorError, match="does not manage"):
        hypervisor.define(VmSpec(foreign, libvirt_subject.image, (NicSpec("n", "br", 1),)))
    with pytest.raises(HypervisorError, match=foreign):
        hypervisor.start(foreign)
    hypervisor.undefine(foreign)
    assert exists(conn, foreign)
    assert hypervisor.agent_socket(foreign) is None


def test_channel_sockets_are_read_from_the_domain(libvirt_subject: Subject, tmp_path: Path) -> None:
    spec = libvirt_subject.spec(None)
    hypervisor = libvirt_subject.hypervisor
    assert isinstance(hypervisor, LibvirtHypervisor)
    hypervisor.define(spec)
    hypervisor.start(spec.name)
    assert hypervisor.agent_socket(spec.name) == f"{tmp_path}/{spec.name}.agent.sock"
    assert hypervisor.access_socket(spec.name) == f"{tmp_path}/{spec.name}.access.sock"


def test_without_a_channel_dir_the_paths_are_libvirts_to_choose(
    libvirt_subjects: Callable[..., Subject],
) -> None:
    subject = libvirt_subjects()
    spec = subject.spec(None)
    subject.hypervisor.define(spec)
    subject.hypervisor.start(spec.name)
    assert subject.hypervisor.agent_socket(spec.name) is None


def test_stop_powers_off_a_guest_that_ignores_shutdown(
    libvirt_subjects: Callable[..., Subject], monkeypatch: pytest.MonkeyPatch
) -> None:
    subject = libvirt_subjects(shutdown_timeout=0.3)
    spec = subject.spec(None)
    subject.hypervisor.define(spec)
    subject.hypervisor.start(spec.name)
    monkeypatch.setattr(libvirt.virDomain, "shutdown", lambda _self: 0)
    began = time.monotonic()
    subject.hypervisor.stop(spec.name)
    assert time.monotonic() - began >= 0.3
    assert [vm.running for vm in subject.hypervisor.list_vms() if vm.name == spec.name] == [False]


def test_a_migration_libvirt_refuses_is_a_hypervisor_error(libvirt_subject: Subject) -> None:
    spec = libvirt_subject.spec(None)
    hypervisor = libvirt_subject.hypervisor
    hypervisor.define(spec)
    hypervisor.start(spec.name)
    with pytest.raises(
        HypervisorError,
        match=(
            rf"libvirt at {contract.TEST_URI} could not migrate VM '{spec.name}' to hv2 "
            r"\(test:///other\): .*p2p migration is not supported"
        ),
    ):
        hypervisor.migrate(spec.name, "hv2", "test:///other")
    assert [vm.running for vm in hypervisor.list_vms() if vm.name == spec.name] == [True]


def test_a_migration_asks_libvirt_for_a_live_peer_to_peer_move(
    libvirt_subject: Subject, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = record_migrations(monkeypatch)
    spec = libvirt_subject.spec(None)
    libvirt_subject.hypervisor.define(spec)
    libvirt_subject.hypervisor.start(spec.name)
    libvirt_subject.hypervisor.migrate(spec.name, "hv2", "qemu+tls://hv2/system")
    flags = (
        libvirt.VIR_MIGRATE_LIVE
        | libvirt.VIR_MIGRATE_PEER2PEER
        | libvirt.VIR_MIGRATE_PERSIST_DEST
        | libvirt.VIR_MIGRATE_UNDEFINE_SOURCE
    )
    assert calls == [(spec.name, "qemu+tls://hv2/system", flags)]


def test_moves_libvirt_cannot_make_are_refused_before_asking_it(
    libvirt_subject: Subject, foreign: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = record_migrations(monkeypatch)
    hypervisor = libvirt_subject.hypervisor
    stopped = libvirt_subject.spec(None)
    hypervisor.define(stopped)
    for name, uri, message in (
        ("vmf-unknown-vm", "test:///other", "'vmf-unknown-vm' is not defined by vmfabric"),
        (foreign, "test:///other", f"'{foreign}' is not defined by vmfabric"),
        (stopped.name, "test:///other", "not running"),
        (stopped.name, None, "hv2: the host has no libvirt URI"),
    ):
        with pytest.raises(HypervisorError, match=message):
            hypervisor.migrate(name, "hv2", uri)
    assert calls == []


def record_migrations(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str, int]]:
    """Record each `migrateToURI3` call (domain, destination URI, flags) instead of making it."""
    calls: list[tuple[str, str, int]] = []

    def recording(self: Any, dconnuri: str, params: dict[str, Any], flags: int = 0) -> int:
        calls.append((self.name(), dconnuri, flags))
        return 0

    monkeypatch.setattr(libvirt.virDomain, "migrateToURI3", recording)
    return calls


def test_a_dead_connection_is_replaced(monkeypatch: pytest.MonkeyPatch) -> None:
    opened = count_opens(monkeypatch)
    hypervisor = LibvirtHypervisor(contract.TEST_URI)
    hypervisor.list_vms()
    dead = opened[0]
    monkeypatch.setattr(libvirt.virConnect, "isAlive", lambda self: 0 if self is dead else 1)
    hypervisor.list_vms()
    hypervisor.list_vms()
    assert len(opened) == 2
    hypervisor.close()


def test_a_call_cut_off_by_a_dropped_connection_is_retried(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    opened = count_opens(monkeypatch)
    hypervisor = LibvirtHypervisor(contract.TEST_URI)
    hypervisor.list_vms()
    dead = opened[0]
    dropped: list[bool] = []
    real_list = libvirt.virConnect.listAllDomains

    def list_then_drop(self: Any, flags: int = 0) -> Any:
        if self is dead:
            dropped.append(True)
            raise libvirt.libvirtError("client socket is closed")
        return real_list(self, flags)

    monkeypatch.setattr(libvirt.virConnect, "listAllDomains", list_then_drop)
    monkeypatch.setattr(
        libvirt.virConnect, "isAlive", lambda self: 0 if self is dead and dropped else 1
    )
    assert isinstance(hypervisor.list_vms(), list)
    assert len(opened) == 2
    hypervisor.close()


def test_an_unreachable_libvirt_is_a_hypervisor_error() -> None:
    hypervisor = LibvirtHypervisor("test:///nonexistent/vmfabric.xml")
    with pytest.raises(HypervisorError, match="cannot connect"):
        hypervisor.list_vms()


def count_opens(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Record every connection the driver opens."""
    opened: list[Any] = []
    real_open = libvirt.open

    def recording_open(uri: str) -> Any:
        opened.append(real_open(uri))
        return opened[-1]

    monkeypatch.setattr(libvirt, "open", recording_open)
    return opened
