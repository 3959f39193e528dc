"""The in-process host agents: one hypervisor and one switch driver per registered host.

On one machine the controller and every host's agent share a process; the drivers are built
on first use and kept, so a libvirt connection is opened once per host.
"""

from __future__ import annotations

import threading

from vmfabric.hypervisor import Hypervisor, HypervisorError
from vmfabric.services.context import HostRef
from vmfabric.vswitch import Vswitch


class LocalAgents:
    """Builds and caches the hypervisor driver of each host."""

    def __init__(self, switch: Vswitch | None = None) -> None:
        """`switch`, when given, is every host's switch (an in-memory one in tests)."""
        self._drivers: dict[str, Hypervisor] = {}
        self._switches: dict[str, Vswitch | None] = {}
        self._switch = switch
        self._lock = threading.Lock()

    def hypervisor(self, host: HostRef) -> Hypervisor:
        """The driver for `host`, built from its registration the first time."""
        with self._lock:
            driver = self._drivers.get(host.name)
            if driver is None:
                driver = _build(host)
                self._drivers[host.name] = driver
            return driver

    def vswitch(self, host: HostRef) -> Vswitch | None:
        """The switch driver for `host`: the lab's switch, the system Open vSwitch of a
        libvirt host, none for noop hosts."""
        if self._switch is not None:
            return self._switch
        with self._lock:
            if host.name not in self._switches:
                self._switches[host.name] = _switch(host)
            return self._switches[host.name]


def _build(host: HostRef) -> Hypervisor:
    if host.driver == "lab":
        from vmfabric.hypervisor.lab import LabHypervisor

        return LabHypervisor(host.name)
    if host.driver == "libvirt":
        from vmfabric.hypervisor.libvirt import LibvirtHypervisor

        return LibvirtHypervisor(host.uri or "qemu:///system")
    if host.driver == "noop":
        from vmfabric.hypervisor.noop import NoopHypervisor

        return NoopHypervisor()
    raise HypervisorError(f"host {host.name!r} has unknown driver {host.driver!r}")


def _switch(host: HostRef) -> Vswitch | None:
    if host.driver == "lab":
        from vmfabric.vswitch.openvswitch import lab_vswitch

        return lab_vswitch()
    if host.driver == "libvirt":
        from vmfabric.vswitch.openvswitch import OpenVswitch

        return OpenVswitch()
    return None
