"""What every `Hypervisor` driver must do, run against each driver in `DRIVERS`.

To add a driver, write a `<name>_subject` fixture here that yields a `Subject` for it (the lab
driver's fixture calls `pytest.skip` unless `os.geteuid() == 0`) and add `<name>` to `DRIVERS`.
"""

from __future__ import annotations

import random
import re
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import libvirt
import pytest

from vmfabric.domain.model import NicSpec, VmSpec
from vmfabric.hypervisor import Hypervisor, HypervisorError
from vmfabric.hypervisor.libvirt import LibvirtHypervisor, image_volume

DRIVERS = ["libvirt"]
TEST_URI = "test:///default"
TEST_POOL = "default-pool"
UNICAST_MAC = re.compile(r"^[0-9a-f][02468ace](:[0-9a-f]{2}){5}$")


def random_mac() -> str:
    """A locally unique MAC in QEMU's range, so fixed MACs of different tests never meet."""
    return "52:54:00:" + ":".join(f"{random.randrange(256):02x}" for _ in range(3))


@dataclass
class Subject:
    """A driver under test, with an image and a bridge it can use, and the VMs made through it."""

    hypervisor: Hypervisor
    image: str
    bridge: str
    names: list[str] = field(default_factory=list)

    def spec(self, *macs: str | None, vlan: int = 10, memory_mib: int = 256) -> VmSpec:
        """A VM with a fresh name and one NIC per MAC given (None: the driver chooses)."""
        name = f"vmf-t-{uuid.uuid4().hex[:10]}"
        self.names.append(name)
        nics = tuple(
            NicSpec(network=f"net{i}", bridge=self.bridge, vlan=vlan + i, mac=mac)
            for i, mac in enumerate(macs or (None,))
        )
        return VmSpec(name=name, image=self.image, nics=nics, memory_mib=memory_mib)

    def cleanup(self) -> None:
        """Remove every VM the test made, so tests sharing the hypervisor stay independent."""
        for name in self.names:
            self.hypervisor.undefine(name)


@pytest.fixture
def libvirt_image() -> Iterator[str]:
    """An image volume of its own in the test driver's pool, removed afterwards."""
    name = f"img-{uuid.uuid4().hex[:10]}"
    conn = libvirt.open(TEST_URI)
    pool = conn.storagePoolLookupByName(TEST_POOL)
    volume = pool.createXML(
        f"<volume><name>{image_volume(name)}</name><capacity unit='MiB'>64</capacity>"
        "<target><format type='qcow2'/></target></volume>",
        0,
    )
    yield name
    volume.delete(0)
    conn.close()


@pytest.fixture
def libvirt_subjects(libvirt_image: str) -> Iterator[Callable[..., Subject]]:
    """Makes libvirt drivers on libvirt's in-process test driver (no root, no QEMU)."""
    made: list[tuple[Subject, LibvirtHypervisor]] = []

    def make(**options: Any) -> Subject:
        hypervisor = LibvirtHypervisor(TEST_URI, pool=TEST_POOL, **options)
        made.append((Subject(hypervisor, image=libvirt_image, bridge="vmf-br-test"), hypervisor))
        return made[-1][0]

    yield make
    for subject, hypervisor in made:
        subject.cleanup()
        hypervisor.close()


@pytest.fixture
def libvirt_subject(libvirt_subjects: Callable[..., Subject], tmp_path: Path) -> Subject:
    """The libvirt driver with its sockets in a directory of the test's own."""
    return libvirt_subjects(channel_dir=str(tmp_path), shutdown_timeout=1.0)


@pytest.fixture(params=DRIVERS)
def subject(request: pytest.FixtureRequest) -> Subject:
    """Each driver in turn."""
    found: Subject = request.getfixturevalue(f"{request.param}_subject")
    return found


def listed(subject: Subject, name: str) -> list[tuple[bool, tuple[str, ...]]]:
    """(running, MACs) of each listed VM of that name: empty when absent, never two."""
    return [(vm.running, vm.macs) for vm in subject.hypervisor.list_vms() if vm.name == name]


def test_define_returns_one_distinct_unicast_mac_per_nic(subject: Subject) -> None:
    spec = subject.spec(None, None, None)
    defined = subject.hypervisor.define(spec)
    assert defined.name == spec.name
    assert len(defined.macs) == 3
    assert len(set(defined.macs)) == 3
    assert all(UNICAST_MAC.match(mac) for mac in defined.macs)


def test_fixed_mac_is_kept_in_nic_order(subject: Subject) -> None:
    fixed = random_mac()
    defined = subject.hypervisor.define(subject.spec(None, fixed.upper()))
    assert defined.macs[1] == fixed
    assert defined.macs[0] != fixed


def test_define_is_idempotent(subject: Subject) -> None:
    spec = subject.spec(None, None)
    first = subject.hypervisor.define(spec)
    assert subject.hypervisor.define(spec) == first
    assert listed(subject, spec.name) == [(False, first.macs)]


def test_define_of_an_existing_name_with_another_spec_is_refused(subject: Subject) -> None:
    spec = subject.spec(None)
    defined = subject.hypervisor.define(spec)
    changed = replace(spec, nics=(NicSpec("net0", subject.bridge, 99),))
    with pytest.raises(HypervisorError, match=spec.name):
        subject.hypervisor.define(changed)
    assert listed(subject, spec.name) == [(False, defined.macs)]


def test_start_and_stop_show_in_the_list_and_repeat_harmlessly(subject: Subject) -> None:
    spec = subject.spec(None)
    macs = subject.hypervisor.define(spec).macs
    subject.hypervisor.start(spec.name)
    subject.hypervisor.start(spec.name)
    assert listed(subject, spec.name) == [(True, macs)]
    subject.hypervisor.stop(spec.name)
    subject.hypervisor.stop(spec.name)
    assert listed(subject, spec.name) == [(False, macs)]


def test_undefine_removes_a_running_vm_and_repeats_harmlessly(subject: Subject) -> None:
    spec = subject.spec(None)
    subject.hypervisor.define(spec)
    subject.hypervisor.start(spec.name)
    subject.hypervisor.undefine(spec.name)
    subject.hypervisor.undefine(spec.name)
    assert listed(subject, spec.name) == []


def test_undefine_of_an_unknown_vm_is_harmless(subject: Subject) -> None:
    subject.hypervisor.undefine(f"vmf-unknown-{uuid.uuid4().hex[:8]}")


def test_a_name_can_be_defined_again_after_undefine(subject: Subject) -> None:
    spec = subject.spec(None)
    subject.hypervisor.define(spec)
    subject.hypervisor.undefine(spec.name)
    again = subject.hypervisor.define(spec)
    subject.hypervisor.start(spec.name)
    assert listed(subject, spec.name) == [(True, again.macs)]


@pytest.mark.parametrize("operation", ["start", "stop"])
def test_start_or_stop_of_an_unknown_vm_is_an_error(subject: Subject, operation: str) -> None:
    name = f"vmf-unknown-{uuid.uuid4().hex[:8]}"
    with pytest.raises(HypervisorError, match=name):
        getattr(subject.hypervisor, operation)(name)


def test_migrating_an_unknown_or_stopped_vm_is_an_error(subject: Subject) -> None:
    unknown = f"vmf-unknown-{uuid.uuid4().hex[:8]}"
    with pytest.raises(HypervisorError, match=unknown):
        subject.hypervisor.migrate(unknown, "hv2", "test:///default")
    spec = subject.spec(None)
    macs = subject.hypervisor.define(spec).macs
    with pytest.raises(HypervisorError, match="not running"):
        subject.hypervisor.migrate(spec.name, "hv2", "test:///default")
    assert listed(subject, spec.name) == [(False, macs)]


def test_a_running_vm_has_an_agent_socket(subject: Subject) -> None:
    spec = subject.spec(None)
    subject.hypervisor.define(spec)
    subject.hypervisor.start(spec.name)
    assert subject.hypervisor.agent_socket(spec.name)


def test_an_unknown_vm_has_no_agent_socket(subject: Subject) -> None:
    assert subject.hypervisor.agent_socket(f"vmf-unknown-{uuid.uuid4().hex[:8]}") is None


def test_concurrent_defines_of_one_vm_agree(subject: Subject) -> None:
    spec = subject.spec(None, None)
    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(lambda _: subject.hypervisor.define(spec), range(16)))
    assert {result.macs for result in results} == {results[0].macs}
    assert listed(subject, spec.name) == [(False, results[0].macs)]
