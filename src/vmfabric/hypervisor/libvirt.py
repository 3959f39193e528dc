"""The libvirt driver: KVM guests whose NICs are ports on Open vSwitch bridges.

Conventions on the host (the operator prepares the pool and the images, vmfabric the rest):

- Disks live in one libvirt storage pool (`pool`, default `default`). An image `IMAGE` is
  the volume `IMAGE.qcow2` (qcow2 or raw). A VM `VM` boots from its own volume
  `VM.root.qcow2`, a qcow2 overlay on its image that `define` creates and `undefine`
  deletes. Names are DNS labels, so the extra dot keeps the two kinds of volume apart.
- Two virtio-serial unix channels: the QEMU guest agent (`org.qemu.guest_agent.0`) and the
  access proxy (`org.vmfabric.access.0`). With `channel_dir` set their sockets are
  `<channel_dir>/VM.agent.sock` and `<channel_dir>/VM.access.sock`; without it libvirt picks
  the paths when the VM starts (the QEMU driver does, under its own channel directory).
- vmfabric marks the domains it defines with a `<metadata>` element in its namespace that
  records the image. Domains without it belong to someone else: they are not listed, started,
  stopped or removed, and defining a VM with the same name is refused.
"""

from __future__ import annotations

import contextlib
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from typing import Any, NamedTuple, TypeVar

import libvirt

from vmfabric.domain.model import DefinedVm, HypervisorVm, VmSpec
from vmfabric.hypervisor import HypervisorError

METADATA_NS = "https://vmfabric.dev/xmlns/libvirt/domain/1"
AGENT_CHANNEL = "org.qemu.guest_agent.0"
ACCESS_CHANNEL = "org.vmfabric.access.0"
_UNDEFINE_FLAGS = (
    libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE | libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA
)
_MIGRATE_FLAGS = (
    libvirt.VIR_MIGRATE_LIVE
    | libvirt.VIR_MIGRATE_PEER2PEER
    | libvirt.VIR_MIGRATE_PERSIST_DEST
    | libvirt.VIR_MIGRATE_UNDEFINE_SOURCE
)
"""Live, driven by this host's libvirtd (peer to peer), the definition moving with the VM."""
_POLL_SECONDS = 0.25

T = TypeVar("T")

ET.register_namespace("vmfabric", METADATA_NS)


def _ignore_libvirt_error(_ctx: object, _err: object) -> None:
    """Errors reach us as exceptions; libvirt's default handler would also print them."""


libvirt.registerErrorHandler(_ignore_libvirt_error, None)


def image_volume(image: str) -> str:
    """Name of the pool volume that holds an image, so operators know where to put images."""
    return f"{image}.qcow2"


def disk_volume(vm: str) -> str:
    """Name of the pool volume a VM boots from, owned by vmfabric."""
    return f"{vm}.root.qcow2"


def _sub(parent: ET.Element, tag: str, text: str | None = None, **attrs: str) -> ET.Element:
    element = ET.SubElement(parent, tag, attrs)
    element.text = text
    return element


def _channel(devices: ET.Element, target: str, path: str | None) -> None:
    channel = _sub(devices, "channel", type="unix")
    source = _sub(channel, "source", mode="bind")
    if path is not None:
        source.set("path", path)
    _sub(channel, "target", type="virtio", name=target)


def _interfaces(devices: ET.Element, spec: VmSpec) -> None:
    for nic in spec.nics:
        interface = _sub(devices, "interface", type="bridge")
        if nic.mac is not None:
            _sub(interface, "mac", address=nic.mac)
        _sub(interface, "source", bridge=nic.bridge)
        _sub(interface, "virtualport", type="openvswitch")
        _sub(_sub(interface, "vlan"), "tag", id=str(nic.vlan))
        _sub(interface, "model", type="virtio")


def domain_xml(
    spec: VmSpec, *, pool: str, channel_dir: str | None = None, domain_type: str = "kvm"
) -> str:
    """The domain definition for a VM; public so that its shape can be checked without libvirt."""
    domain = ET.Element("domain", type=domain_type)
    _sub(domain, "name", spec.name)
    _sub(_sub(domain, "metadata"), f"{{{METADATA_NS}}}image", spec.image)
    _sub(domain, "memory", str(spec.memory_mib * 1024), unit="KiB")
    _sub(domain, "vcpu", str(spec.vcpus))
    os_element = _sub(domain, "os")
    _sub(os_element, "type", "hvm", arch="x86_64")
    _sub(os_element, "boot", dev="hd")
    features = _sub(domain, "features")
    _sub(features, "acpi")
    _sub(features, "apic")
    _sub(domain, "cpu", mode="host-model")
    devices = _sub(domain, "devices")
    disk = _sub(devices, "disk", type="volume", device="disk")
    _sub(disk, "driver", name="qemu", type="qcow2")
    _sub(disk, "source", pool=pool, volume=disk_volume(spec.name))
    _sub(disk, "target", dev="vda", bus="virtio")
    _interfaces(devices, spec)
    _sub(devices, "serial", type="pty")
    _sub(devices, "console", type="pty")
    for target, suffix in ((AGENT_CHANNEL, "agent"), (ACCESS_CHANNEL, "access")):
        path = None if channel_dir is None else f"{channel_dir}/{spec.name}.{suffix}.sock"
        _channel(devices, target, path)
    return ET.tostring(domain, encoding="unicode")


def _overlay_xml(name: str, base: Any) -> str:
    base_xml = ET.fromstring(base.XMLDesc(0))
    base_format = base_xml.find("target/format")
    volume = ET.Element("volume")
    _sub(volume, "name", name)
    _sub(volume, "capacity", str(base.info()[1]), unit="bytes")
    _sub(_sub(volume, "target"), "format", type="qcow2")
    backing = _sub(volume, "backingStore")
    _sub(backing, "path", base.path())
    _sub(backing, "format", type="raw" if base_format is None else base_format.get("type", "raw"))
    return ET.tostring(volume, encoding="unicode")


def _image_of(root: ET.Element) -> str | None:
    image = root.find(f"metadata/{{{METADATA_NS}}}image")
    return None if image is None else (image.text or "")


def _macs(root: ET.Element) -> tuple[str, ...]:
    return tuple(nic.mac or "" for nic in _nics(root))


class _Nic(NamedTuple):
    bridge: str | None
    vlan: str | None
    mac: str | None


def _attribute(element: ET.Element, path: str, name: str) -> str | None:
    found = element.find(path)
    return None if found is None else found.get(name)


def _nics(root: ET.Element) -> list[_Nic]:
    """Each interface in order, with its MAC only where the XML names one."""
    return [
        _Nic(
            bridge=_attribute(interface, "source", "bridge"),
            vlan=_attribute(interface, "vlan/tag", "id"),
            mac=(_attribute(interface, "mac", "address") or "").lower() or None,
        )
        for interface in root.iterfind("devices/interface")
    ]


def _differences(wanted: ET.Element, actual: ET.Element) -> list[str]:
    """What an existing definition does not share with the wanted one; fixed MACs must match."""
    found = []
    for label, path in (("memory (KiB)", "memory"), ("vcpus", "vcpu")):
        want, have = wanted.findtext(path), actual.findtext(path)
        if want != have:
            found.append(f"{label} {have} instead of {want}")
    if _image_of(wanted) != _image_of(actual):
        found.append(f"image {_image_of(actual)!r} instead of {_image_of(wanted)!r}")
    want_nics, have_nics = _nics(wanted), _nics(actual)
    want_ports = [(nic.bridge, nic.vlan) for nic in want_nics]
    have_ports = [(nic.bridge, nic.vlan) for nic in have_nics]
    if want_ports != have_ports:
        found.append(f"NICs (bridge, vlan) {have_ports} instead of {want_ports}")
    for index, (want_nic, have_nic) in enumerate(zip(want_nics, have_nics, strict=False)):
        if want_nic.mac is not None and want_nic.mac != have_nic.mac:
            found.append(f"NIC {index} MAC {have_nic.mac} instead of {want_nic.mac}")
    return found


def _channel_path(root: ET.Element, target: str) -> str | None:
    for channel in root.iterfind("devices/channel"):
        channel_target = channel.find("target")
        if channel_target is not None and channel_target.get("name") == target:
            source = channel.find("source")
            return None if source is None else source.get("path")
    return None


def _xml(domain: Any) -> ET.Element:
    return ET.fromstring(domain.XMLDesc(0))


def _missing(err: libvirt.libvirtError, *codes: int) -> bool:
    return err.get_error_code() in codes


def _lookup(conn: Any, name: str) -> Any | None:
    try:
        return conn.lookupByName(name)
    except libvirt.libvirtError as err:
        if _missing(err, libvirt.VIR_ERR_NO_DOMAIN):
            return None
        raise


def _lookup_managed(conn: Any, name: str) -> Any | None:
    domain = _lookup(conn, name)
    if domain is None or _image_of(_xml(domain)) is None:
        return None
    return domain


def _find_pool(conn: Any, name: str) -> Any | None:
    try:
        return conn.storagePoolLookupByName(name)
    except libvirt.libvirtError as err:
        if _missing(err, libvirt.VIR_ERR_NO_STORAGE_POOL):
            return None
        raise


def _find_volume(pool: Any, name: str) -> Any | None:
    try:
        return pool.storageVolLookupByName(name)
    except libvirt.libvirtError as err:
        if _missing(err, libvirt.VIR_ERR_NO_STORAGE_VOL):
            return None
        raise


def _attempt(change: Callable[[], object], done: Callable[[], bool]) -> None:
    """Make a state change, forgiving its failure when something else already made it."""
    try:
        change()
    except libvirt.libvirtError:
        if not done():
            raise


def _is_alive(conn: Any) -> bool:
    try:
        return bool(conn.isAlive() == 1)
    except libvirt.libvirtError:
        return False


def _describe(domain: Any) -> HypervisorVm | None:
    """A managed domain as the reconciler sees it; None for others and for vanished ones."""
    try:
        root = _xml(domain)
    except libvirt.libvirtError as err:
        if _missing(err, libvirt.VIR_ERR_NO_DOMAIN):
            return None
        raise
    if _image_of(root) is None:
        return None
    return HypervisorVm(name=domain.name(), running=root.get("id") is not None, macs=_macs(root))


class LibvirtHypervisor:
    """A `Hypervisor` on one libvirt connection, e.g. `qemu:///system`.

    Thread safety: the controller calls from several threads. The connection is opened lazily,
    shared, and replaced under a lock when it has dropped (libvirt connections are safe to use
    from several threads). Operations on one VM hold that VM's lock, so a check-then-act such
    as "define unless it exists" cannot interleave with another call for the same VM, while
    a slow graceful shutdown of one VM does not hold up the others.
    """

    blocks = True

    def __init__(
        self,
        uri: str,
        *,
        pool: str = "default",
        channel_dir: str | None = None,
        shutdown_timeout: float = 60.0,
        domain_type: str = "kvm",
    ) -> None:
        """Configure the host conventions; nothing is opened until the first call.

        `shutdown_timeout` bounds how long `stop` waits for the guest before pulling the plug,
        so a guest that ignores ACPI cannot stall reconciling. `domain_type` is `kvm`, or
        `qemu` (TCG) where KVM cannot boot guests, as in nested test machines.
        """
        self._uri = uri
        self._pool = pool
        self._channel_dir = channel_dir
        self._shutdown_timeout = shutdown_timeout
        self._domain_type = domain_type
        self._conn: Any | None = None
        self._conn_lock = threading.Lock()
        self._vm_locks: dict[str, threading.Lock] = {}
        self._vm_locks_guard = threading.Lock()

    def define(self, spec: VmSpec) -> DefinedVm:
        """Define the VM and its disk; an identical existing VM is kept, a different one refused.

        The MACs come from libvirt's own record of the domain, so they are what the guest
        will really use, whether libvirt chose them or the spec fixed them.
        """
        wanted = domain_xml(
            spec, pool=self._pool, channel_dir=self._channel_dir, domain_type=self._domain_type
        )
        with self._vm_lock(spec.name):
            return self._run(
                f"define VM {spec.name!r}", lambda conn: self._define(conn, spec, wanted)
            )

    def start(self, name: str) -> None:
        """Boot the VM; starting a running VM is not an error, so reconciling can repeat it."""
        with self._vm_lock(name):
            self._run(f"start VM {name!r}", lambda conn: self._start(conn, name))

    def stop(self, name: str) -> None:
        """Ask the guest to shut down, and power it off if it has not within the timeout."""
        with self._vm_lock(name):
            self._run(f"stop VM {name!r}", lambda conn: self._stop(conn, name))

    def undefine(self, name: str) -> None:
        """Power off and remove the VM and its disk; unknown and foreign VMs are left alone."""
        with self._vm_lock(name):
            self._run(f"undefine VM {name!r}", lambda conn: self._undefine(conn, name))

    def list_vms(self) -> list[HypervisorVm]:
        """Every VM vmfabric defined on this host, by name, for reconciling."""
        return self._run("list VMs", self._list)

    def agent_socket(self, name: str) -> str | None:
        """The guest agent socket as the running VM uses it (libvirt may choose it at start)."""
        return self._channel_socket(name, AGENT_CHANNEL)

    def migrate(self, name: str, to_host: str, to_uri: str | None) -> None:
        """Live-migrate the running VM to the libvirt at `to_uri` and wait for the end.

        The VM's disk must be reachable from the destination (shared storage for the pool);
        its definition moves with it and leaves this host. Not retried on a new connection:
        a move cut off half way is for the caller to look at, not to start again.
        """
        where = f"{to_host} ({to_uri})"
        if to_uri is None:
            raise HypervisorError(
                f"cannot migrate VM {name!r} to {to_host}: the host has no libvirt URI"
            )
        with self._vm_lock(name):
            self._run(
                f"migrate VM {name!r} to {where}",
                lambda conn: self._migrate(conn, name, to_uri),
                retry=False,
            )

    def access_socket(self, name: str) -> str | None:
        """The socket of the channel to the access proxy inside the VM, found like the agent's."""
        return self._channel_socket(name, ACCESS_CHANNEL)

    def close(self) -> None:
        """Release the libvirt connection; the next call opens a new one."""
        with self._conn_lock:
            conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(libvirt.libvirtError):
                conn.close()

    def _vm_lock(self, name: str) -> threading.Lock:
        with self._vm_locks_guard:
            return self._vm_locks.setdefault(name, threading.Lock())

    def _connection(self) -> Any:
        with self._conn_lock:
            if self._conn is None or not _is_alive(self._conn):
                self._conn = self._open()
            return self._conn

    def _open(self) -> Any:
        try:
            return libvirt.open(self._uri)
        except libvirt.libvirtError as err:
            message = f"cannot connect to libvirt at {self._uri}: {err.get_error_message()}"
            raise HypervisorError(message) from err

    def _run(self, what: str, operation: Callable[[Any], T], *, retry: bool = True) -> T:
        """Run an operation, once more on a new connection if the old one dropped under it.

        Every operation is idempotent, so repeating one that was cut off half way is safe.
        """
        conn = self._connection()
        try:
            return operation(conn)
        except libvirt.libvirtError as err:
            if retry and not _is_alive(conn):
                return self._run(what, operation, retry=False)
            message = f"libvirt at {self._uri} could not {what}: {err.get_error_message()}"
            raise HypervisorError(message) from err

    def _define(self, conn: Any, spec: VmSpec, wanted: str) -> DefinedVm:
        pool = self._storage_pool(conn)
        domain = _lookup(conn, spec.name)
        if domain is None:
            domain = self._define_new(conn, pool, spec, wanted)
        else:
            self._check_same(spec.name, ET.fromstring(wanted), _xml(domain))
            if _find_volume(pool, disk_volume(spec.name)) is None:
                self._create_disk(pool, spec)
        return DefinedVm(name=spec.name, macs=_macs(_xml(domain)))

    def _define_new(self, conn: Any, pool: Any, spec: VmSpec, wanted: str) -> Any:
        """Define with a fresh disk; a disk left by an earlier VM of that name is not reused."""
        stale = _find_volume(pool, disk_volume(spec.name))
        if stale is not None:
            stale.delete(0)
        disk = self._create_disk(pool, spec)
        try:
            return conn.defineXML(wanted)
        except libvirt.libvirtError:
            with contextlib.suppress(libvirt.libvirtError):
                disk.delete(0)
            raise

    def _check_same(self, name: str, wanted: ET.Element, actual: ET.Element) -> None:
        if _image_of(actual) is None:
            raise HypervisorError(
                f"cannot define VM {name!r}: libvirt at {self._uri} already has a domain of"
                " that name that vmfabric does not manage"
            )
        differences = _differences(wanted, actual)
        if differences:
            raise HypervisorError(
                f"cannot define VM {name!r}: it already exists on {self._uri} with a different"
                f" definition: {'; '.join(differences)}"
            )

    def _storage_pool(self, conn: Any) -> Any:
        pool = _find_pool(conn, self._pool)
        if pool is None:
            raise HypervisorError(f"storage pool {self._pool!r} not found at {self._uri}")
        return pool

    def _create_disk(self, pool: Any, spec: VmSpec) -> Any:
        base = self._image(pool, spec)
        return pool.createXML(_overlay_xml(disk_volume(spec.name), base), 0)

    def _image(self, pool: Any, spec: VmSpec) -> Any:
        """The image volume, rescanning the pool once for images copied in behind libvirt."""
        volume = _find_volume(pool, image_volume(spec.image))
        if volume is None:
            pool.refresh(0)
            volume = _find_volume(pool, image_volume(spec.image))
        if volume is None:
            raise HypervisorError(
                f"cannot define VM {spec.name!r}: image {spec.image!r} not found (no volume"
                f" {image_volume(spec.image)!r} in storage pool {self._pool!r} at {self._uri})"
            )
        return volume

    def _managed(self, conn: Any, name: str) -> Any:
        domain = _lookup_managed(conn, name)
        if domain is None:
            raise HypervisorError(f"VM {name!r} is not defined by vmfabric at {self._uri}")
        return domain

    def _start(self, conn: Any, name: str) -> None:
        domain = self._managed(conn, name)
        if not domain.isActive():
            _attempt(domain.create, lambda: bool(domain.isActive()))

    def _stop(self, conn: Any, name: str) -> None:
        domain = self._managed(conn, name)

        def stopped() -> bool:
            return not domain.isActive()

        if stopped():
            return
        _attempt(domain.shutdown, stopped)
        deadline = time.monotonic() + self._shutdown_timeout
        while not stopped() and time.monotonic() < deadline:
            time.sleep(min(_POLL_SECONDS, max(deadline - time.monotonic(), 0.0)))
        if not stopped():
            _attempt(domain.destroy, stopped)

    def _migrate(self, conn: Any, name: str, to_uri: str) -> None:
        domain = self._managed(conn, name)
        if not domain.isActive():
            raise HypervisorError(
                f"cannot migrate VM {name!r}: it is not running at {self._uri}"
                " (only a running VM migrates)"
            )
        domain.migrateToURI3(to_uri, {}, _MIGRATE_FLAGS)

    def _undefine(self, conn: Any, name: str) -> None:
        domain = _lookup(conn, name)
        if domain is not None:
            if _image_of(_xml(domain)) is None:
                return
            if domain.isActive():
                _attempt(domain.destroy, lambda: not domain.isActive())
            domain.undefineFlags(_UNDEFINE_FLAGS)
        pool = _find_pool(conn, self._pool)
        disk = None if pool is None else _find_volume(pool, disk_volume(name))
        if disk is not None:
            disk.delete(0)

    def _list(self, conn: Any) -> list[HypervisorVm]:
        described = (_describe(domain) for domain in conn.listAllDomains())
        return sorted((vm for vm in described if vm is not None), key=lambda vm: vm.name)

    def _channel_socket(self, name: str, target: str) -> str | None:
        def find(conn: Any) -> str | None:
            domain = _lookup_managed(conn, name)
            return None if domain is None else _channel_path(_xml(domain), target)

        return self._run(f"read the channels of VM {name!r}", find)
