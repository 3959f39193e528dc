"""Hypervisor drivers: define, start, stop and remove VMs on one host.

One module per hypervisor (`libvirt`, `lab`), all behind `Hypervisor`.
"""

from __future__ import annotations

from typing import Protocol

from vmfabric.domain.model import DefinedVm, HypervisorVm, VmSpec


class HypervisorError(Exception):
    """The hypervisor refused or failed an operation; the message says what and why."""


class Hypervisor(Protocol):
    """What the host agent asks of a hypervisor. Every method is idempotent where it can be."""

    blocks: bool
    """Whether its calls wait on something outside the process (a hypervisor daemon, the
    kernel): the controller then makes them from a worker thread, not its event loop."""

    def define(self, spec: VmSpec) -> DefinedVm:
        """Create the VM (not started) and return the MACs the hypervisor chose or kept."""
        ...

    def start(self, name: str) -> None:
        """Boot the VM; a running VM stays running."""
        ...

    def stop(self, name: str) -> None:
        """Shut the VM down; a stopped VM stays stopped."""
        ...

    def undefine(self, name: str) -> None:
        """Remove the VM and everything it holds on the host; unknown names are ignored."""
        ...

    def list_vms(self) -> list[HypervisorVm]:
        """Every VM this driver manages on the host, for reconciling."""
        ...

    def agent_socket(self, name: str) -> str | None:
        """Path of the unix socket of the VM's QEMU guest agent channel, if it has one."""
        ...

    def access_socket(self, name: str) -> str | None:
        """Path of the unix socket of the VM's access channel (where the host gateway reaches
        the guest proxy, `docs/access-protocol.md`), if it has one."""
        ...

    def migrate(self, name: str, to_host: str, to_uri: str | None) -> None:
        """Live-migrate the running VM to host `to_host` (whose hypervisor answers at `to_uri`,
        where the driver needs one).

        Blocks until the VM runs on the destination, or the move failed and the VM still runs
        here. Raises HypervisorError with a clear message otherwise: an unknown VM, a VM that
        is not running, an unknown or unreachable destination, a refusal by the hypervisor.
        """
        ...
