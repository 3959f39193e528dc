"""The lab hypervisor: VMs are network namespaces on this machine (see `vmfabric.lab.vm`).

Each VM gets a namespace, veth NICs on its host's bridge (`vmf-hv1`, ...), a real qemu-ga on a
unix socket and, while running, a real DHCP client per NIC and the access channel's guest proxy
on a unix socket (`vmfabric.lab.services`). Everything is recorded in the lab's record, so
`vmfabric lab down` removes it even when the controller died.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from vmfabric.domain.model import DefinedVm, HypervisorVm, VmSpec
from vmfabric.hypervisor import HypervisorError
from vmfabric.lab import migration
from vmfabric.lab.errors import LabError
from vmfabric.lab.names import check_label
from vmfabric.lab.services import vm_access_socket
from vmfabric.lab.state import LabStore, Record, VmRecord
from vmfabric.lab.vm import (
    define_vm,
    destroy_vm,
    find_vm,
    is_running,
    start_vm,
    stop_vm,
    vm_agent_socket,
)


@contextmanager
def _failing_as(what: str) -> Iterator[None]:
    """Turn the lab's errors into the driver protocol's error, saying what was attempted."""
    try:
        yield
    except (LabError, OSError) as err:
        raise HypervisorError(f"{what}: {err}") from err


class LabHypervisor:
    """`vmfabric.hypervisor.Hypervisor` for one lab host (`hv1`, `hv2`, ...)."""

    blocks = True

    def __init__(self, host: str, store: LabStore | None = None) -> None:
        with _failing_as("cannot drive lab host"):
            self.host = check_label("host", host)
        self._store = store or LabStore()

    def define(self, spec: VmSpec) -> DefinedVm:
        """Build the VM's namespace, NICs and agent; an identical VM is kept with its MACs.

        On failure everything made for the VM is removed again before the error is raised.
        """
        with (
            _failing_as(f"cannot define VM {spec.name} on {self.host}"),
            self._store.edit() as record,
        ):
            vm = define_vm(record, self.host, spec)
            return DefinedVm(vm.name, tuple(nic.mac for nic in vm.nics))

    def start(self, name: str) -> None:
        """Run a DHCP client on each NIC, as a booting guest would."""
        with _failing_as(f"cannot start VM {name} on {self.host}"), self._store.edit() as record:
            start_vm(record, self._require(record, name))

    def stop(self, name: str) -> None:
        """Release the leases and take the NICs down."""
        with _failing_as(f"cannot stop VM {name} on {self.host}"), self._store.edit() as record:
            stop_vm(record, self._require(record, name))

    def undefine(self, name: str) -> None:
        """Remove the VM and all it holds; a VM the lab does not know is ignored."""
        with _failing_as(f"cannot undefine VM {name} on {self.host}"), self._store.edit() as record:
            vm = find_vm(record.state, self.host, name)
            if vm is not None:
                destroy_vm(record, vm)

    def list_vms(self) -> list[HypervisorVm]:
        """This host's VMs; running while every NIC's DHCP client runs."""
        with _failing_as(f"cannot list the VMs of {self.host}"):
            state = self._store.read()
            return [
                HypervisorVm(vm.name, is_running(state, vm), tuple(nic.mac for nic in vm.nics))
                for vm in state.vms.values()
                if vm.host == self.host and vm.defined
            ]

    def agent_socket(self, name: str) -> str | None:
        """The qemu-ga socket of a defined VM of this host (in the VM's directory, which stays
        where the VM was defined when it migrates)."""
        with _failing_as(f"cannot find the agent of VM {name} on {self.host}"):
            vm = find_vm(self._store.read(), self.host, name)
        if vm is None or not vm.defined:
            return None
        return str(vm_agent_socket(vm))

    def access_socket(self, name: str) -> str | None:
        """The guest proxy's socket of a defined VM of this host, where the host gateway
        connects (in the VM's directory, like the agent's; it exists while the VM runs)."""
        with _failing_as(f"cannot find the guest proxy of VM {name} on {self.host}"):
            vm = find_vm(self._store.read(), self.host, name)
        if vm is None or not vm.defined:
            return None
        return str(vm_access_socket(vm))

    def migrate(self, name: str, to_host: str, to_uri: str | None) -> None:
        """Move the VM's NICs to `to_host`'s bridge as libvirt would (`vmfabric.lab.migration`):
        the destination ports first, then after the copy time (`VMFABRIC_LAB_COPY_SECONDS`,
        default 0.2 s) the switch-over. `to_uri` is not needed: every lab host is local."""
        with _failing_as(f"cannot migrate VM {name} from {self.host} to {to_host}"):
            migration.migrate(name, to_host, from_host=self.host, store=self._store)

    def _require(self, record: Record, name: str) -> VmRecord:
        vm = find_vm(record.state, self.host, name)
        if vm is None or not vm.defined:
            raise HypervisorError(f"host {self.host} has no VM named {name!r}")
        return vm
