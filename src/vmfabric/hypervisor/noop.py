"""A hypervisor for hosts whose VMs are run by someone else.

vmfabric still does IP control for them (addresses, DHCP reservations, DNS): the MAC is
chosen here, in QEMU's 52:54:00 range, or kept when the operator fixed it. Used also to
measure the controller without a hypervisor's own time.
"""

from __future__ import annotations

import secrets
import threading

from vmfabric.domain.model import DefinedVm, HypervisorVm, VmSpec


class NoopHypervisor:
    """Remembers VMs in memory; nothing runs."""

    blocks = False

    def __init__(self) -> None:
        self._vms: dict[str, HypervisorVm] = {}
        self._lock = threading.Lock()

    def define(self, spec: VmSpec) -> DefinedVm:
        """Keep the VM and hand out MACs."""
        with self._lock:
            known = self._vms.get(spec.name)
            if known is None:
                macs = tuple(nic.mac or _random_mac() for nic in spec.nics)
                known = HypervisorVm(spec.name, running=False, macs=macs)
                self._vms[spec.name] = known
            return DefinedVm(spec.name, known.macs)

    def start(self, name: str) -> None:
        """Mark the VM running."""
        self._set_running(name, True)

    def stop(self, name: str) -> None:
        """Mark the VM stopped."""
        self._set_running(name, False)

    def _set_running(self, name: str, running: bool) -> None:
        with self._lock:
            vm = self._vms.get(name)
            if vm is not None:
                self._vms[name] = HypervisorVm(name, running, vm.macs)

    def undefine(self, name: str) -> None:
        """Forget the VM."""
        with self._lock:
            self._vms.pop(name, None)

    def list_vms(self) -> list[HypervisorVm]:
        """The VMs defined since this process started."""
        with self._lock:
            return list(self._vms.values())

    def agent_socket(self, name: str) -> str | None:
        """No guest agent."""
        return None

    def access_socket(self, name: str) -> str | None:
        """No access channel: nothing runs here."""
        return None

    def migrate(self, name: str, to_host: str, to_uri: str | None) -> None:
        """Nothing runs here, so nothing moves: the move is accepted as done."""


def _random_mac() -> str:
    tail = secrets.token_bytes(3)
    return "52:54:00:" + ":".join(f"{b:02x}" for b in tail)
