"""The REST API under /api/v1: hosts, networks, VMs, leases, groups, checks, policies, access.

Handlers are plain `def`, which FastAPI runs in its thread pool, since most use cases do
blocking database and driver work; a VM create, the hot path, is a coroutine on the event
loop (see `services.vms.create_vm`).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

from fastapi import APIRouter, Query, Request, Response
from prometheus_client import Counter

from vmfabric import __version__
from vmfabric.api.metrics import (
    ACCESS_GRANTS,
    GROUP_OPERATIONS,
    POLICY_OPERATIONS,
    VM_CREATE_SECONDS,
    VM_OPERATIONS,
    exposition,
    timed_checks,
)
from vmfabric.api.schemas import (
    AccessIn,
    AddressIn,
    AttachIn,
    BlockIn,
    CheckRunIn,
    HostIn,
    MigrateIn,
    NetworkIn,
    PolicyDocumentIn,
    PolicyIn,
    RevokeIn,
    UnblockIn,
    VmIn,
)
from vmfabric.domain.access import parse_ttl
from vmfabric.domain.checks import CheckResult
from vmfabric.domain.model import LeaseEvent
from vmfabric.services import (
    access,
    checks,
    groups,
    hosts,
    leases,
    migrations,
    networks,
    policies,
    registrations,
    vms,
)
from vmfabric.services.context import Controller
from vmfabric.services.views import HostView, NetworkView, VmView

router = APIRouter(prefix="/api/v1")
metrics_router = APIRouter()


def _ctl(request: Request) -> Controller:
    controller: Controller = request.app.state.controller
    return controller


@contextmanager
def _counted(operation: str, counter: Counter = VM_OPERATIONS) -> Iterator[None]:
    try:
        yield
    except Exception:
        counter.labels(operation, "error").inc()
        raise
    counter.labels(operation, "ok").inc()


@router.get("/info")
def info(request: Request) -> dict[str, object]:
    """Version and mode, so clients (and `lab up`) know what they talk to."""
    return {"version": __version__, "lab": request.app.state.lab}


@router.get("/hosts")
def list_hosts(request: Request) -> list[HostView]:
    """Every registered hypervisor host."""
    return hosts.list_hosts(_ctl(request))


@router.post("/hosts", status_code=201)
def register_host(request: Request, body: HostIn) -> HostView:
    """Register a hypervisor host."""
    return hosts.register_host(_ctl(request), body.name, body.driver, body.bridge, body.uri)


@router.get("/networks")
def list_networks(request: Request) -> list[NetworkView]:
    """Every network with its subnets."""
    return networks.list_networks(_ctl(request))


@router.post("/networks", status_code=201)
def create_network(request: Request, body: NetworkIn) -> NetworkView:
    """Create a network: subnets, gateway, DHCP server."""
    return networks.create_network(_ctl(request), networks.CreateNetwork(**body.model_dump()))


@router.get("/networks/{name}")
def show_network(request: Request, name: str) -> NetworkView:
    """One network."""
    return networks.show_network(_ctl(request), name)


@router.delete("/networks/{name}", status_code=204)
def delete_network(request: Request, name: str) -> Response:
    """Delete a network no VM uses."""
    networks.delete_network(_ctl(request), name)
    return Response(status_code=204)


@router.get("/networks/{name}/leases")
def network_leases(request: Request, name: str) -> list[LeaseEvent]:
    """The network's current DHCP leases as dnsmasq reported them."""
    networks.show_network(_ctl(request), name)
    return leases.leases_of(_ctl(request), name)


@router.get("/vms")
def list_vms(request: Request) -> list[VmView]:
    """The global VM list: VM, host, MAC and IP of every NIC."""
    return vms.list_vms(_ctl(request))


@router.post("/vms", status_code=201)
async def create_vm(request: Request, body: VmIn) -> VmView:
    """Create a VM with preset addresses served by DHCP."""
    started = time.perf_counter()
    create = vms.CreateVm(
        name=body.name,
        host=body.host,
        image=body.image,
        nics=[vms.NicRequest(n.network, n.address) for n in body.nics],
    )
    with _counted("create"):
        view = await vms.create_vm(_ctl(request), create)
    VM_CREATE_SECONDS.observe(time.perf_counter() - started)
    return view


@router.get("/vms/{name}")
def show_vm(request: Request, name: str) -> VmView:
    """One VM."""
    return vms.show_vm(_ctl(request), name)


@router.delete("/vms/{name}", status_code=204)
def delete_vm(request: Request, name: str) -> Response:
    """Delete a VM and release its addresses."""
    with _counted("delete"):
        vms.delete_vm(_ctl(request), name)
    return Response(status_code=204)


@router.post("/vms/{name}/set-ip")
def set_ip(request: Request, name: str, body: AddressIn) -> VmView:
    """Change one of the VM's addresses and its DHCP reservation."""
    with _counted("set-ip"):
        return vms.set_ip(_ctl(request), name, body.address)


@router.post("/vms/{name}/stop")
def stop_vm(request: Request, name: str) -> VmView:
    """Shut a VM down."""
    with _counted("stop"):
        return vms.stop_vm(_ctl(request), name)


@router.post("/vms/{name}/start")
def start_vm(request: Request, name: str) -> VmView:
    """Boot a VM."""
    with _counted("start"):
        return vms.start_vm(_ctl(request), name)


@router.post("/checks/run")
def run_checks(request: Request, body: CheckRunIn) -> list[CheckResult]:
    """Check every running VM (or one) through its guest agent now; the results."""
    return timed_checks(_ctl(request), request.app.state.checker, body.vm)


@router.get("/checks")
def check_status(request: Request) -> list[CheckResult]:
    """The latest check of every VM."""
    return checks.check_status(_ctl(request))


@router.get("/checks/{vm}")
def check_status_of(request: Request, vm: str) -> CheckResult:
    """The latest check of one VM."""
    return checks.check_status(_ctl(request), vm)[0]


@router.get("/checks/{vm}/history")
def check_history(request: Request, vm: str, limit: int = 100) -> list[CheckResult]:
    """A VM's checks, newest first."""
    return checks.check_history(_ctl(request), vm, limit)


@router.get("/registrations")
def list_registrations(request: Request) -> list[registrations.RegistrationView]:
    """What the DNS server names: every running VM, its group and the addresses it holds."""
    return registrations.registration_views(_ctl(request))


@router.get("/groups")
def list_groups(request: Request) -> list[groups.GroupView]:
    """Every group (a host's VMs of one image) with its members, addresses and blocks."""
    return groups.list_groups(_ctl(request))


@router.get("/groups/{name}")
def show_group(request: Request, name: str) -> groups.GroupDetail:
    """One group with the audit trail of its blocks and its image's."""
    return groups.show_group(_ctl(request), name)


@router.post("/groups/{name}/block")
def block_group(request: Request, name: str, body: BlockIn) -> groups.AuditView:
    """Quarantine a group's VMs (DHCP and the allowed networks excepted)."""
    asked = groups.BlockRequest(name, body.by, body.reason, body.allow)
    with _counted("block", GROUP_OPERATIONS):
        return groups.block(_ctl(request), asked)


@router.post("/groups/{name}/unblock")
def unblock_group(request: Request, name: str, body: UnblockIn) -> groups.AuditView:
    """Lift a group's block."""
    with _counted("unblock", GROUP_OPERATIONS):
        return groups.unblock(_ctl(request), groups.BlockRequest(name, body.by, body.reason))


@router.post("/images/{image}/block")
def block_image(request: Request, image: str, body: BlockIn) -> groups.AuditView:
    """Quarantine every VM of an image, on every host, now and later."""
    asked = groups.BlockRequest(image, body.by, body.reason, body.allow, image=True)
    with _counted("block", GROUP_OPERATIONS):
        return groups.block(_ctl(request), asked)


@router.post("/images/{image}/unblock")
def unblock_image(request: Request, image: str, body: UnblockIn) -> groups.AuditView:
    """Lift the block of an image."""
    asked = groups.BlockRequest(image, body.by, body.reason, image=True)
    with _counted("unblock", GROUP_OPERATIONS):
        return groups.unblock(_ctl(request), asked)


@router.post("/vms/{name}/migrate")
def migrate_vm(request: Request, name: str, body: MigrateIn) -> migrations.MigrationView:
    """Move a running VM to another host; its network policy follows it (the answer comes
    once its rules moved, or the move was rolled back)."""
    engine: migrations.MigrationEngine = request.app.state.migrations
    with _counted("migrate"):
        return engine.migrate(name, body.to)


@router.get("/migrations")
def list_migrations(request: Request, vm: str | None = None) -> list[migrations.MigrationView]:
    """The latest migrations, newest first (of one VM with `?vm=`)."""
    return migrations.list_migrations(_ctl(request), vm)


@router.get("/policies")
def list_policies(request: Request) -> list[policies.PolicyView]:
    """Every policy with where it is attached and the VMs it applies to."""
    return policies.list_policies(_ctl(request))


@router.post("/policies", status_code=201)
def create_policy(request: Request, body: PolicyIn) -> policies.PolicyView:
    """Create a policy (and attach it); its VMs' switches get the rules at once."""
    document = body.model_dump(exclude={"name", "vms", "networks"})
    attach = [policies.Attachment(vm=vm) for vm in body.vms]
    attach += [policies.Attachment(network=network) for network in body.networks]
    with _counted("create", POLICY_OPERATIONS):
        return policies.create_policy(_ctl(request), body.name, document, attach)


@router.get("/policies/{name}")
def show_policy(request: Request, name: str) -> policies.PolicyView:
    """One policy."""
    return policies.show_policy(_ctl(request), name)


@router.put("/policies/{name}")
def replace_policy(request: Request, name: str, body: PolicyDocumentIn) -> policies.PolicyView:
    """Give a policy new rules; the VMs it applies to get them at once."""
    with _counted("replace", POLICY_OPERATIONS):
        return policies.replace_policy(_ctl(request), name, body.model_dump())


@router.delete("/policies/{name}", status_code=204)
def delete_policy(request: Request, name: str) -> Response:
    """Delete a policy that is attached to nothing."""
    with _counted("delete", POLICY_OPERATIONS):
        policies.delete_policy(_ctl(request), name)
    return Response(status_code=204)


@router.post("/policies/{name}/attach")
def attach_policy(request: Request, name: str, body: AttachIn) -> policies.PolicyView:
    """Attach a policy to a VM or to a network (every NIC on it)."""
    with _counted("attach", POLICY_OPERATIONS):
        return policies.attach_policy(_ctl(request), name, _attachment(body))


@router.post("/policies/{name}/detach")
def detach_policy(request: Request, name: str, body: AttachIn) -> policies.PolicyView:
    """Detach a policy from a VM or a network."""
    with _counted("detach", POLICY_OPERATIONS):
        return policies.detach_policy(_ctl(request), name, _attachment(body))


def _attachment(body: AttachIn) -> policies.Attachment:
    return policies.Attachment(vm=body.vm, network=body.network)


@router.post("/access", status_code=201)
def grant_access(request: Request, body: AccessIn) -> access.IssuedGrant:
    """Grant access to one port of a VM through the host's access gateway: the grant with its
    signed credential, given this once."""
    with ACCESS_GRANTS.labels("error").count_exceptions():
        issued = access.grant_access(
            _ctl(request), body.vm, body.port, parse_ttl(body.ttl), user=body.user, by=body.by
        )
    ACCESS_GRANTS.labels("ok").inc()
    return issued


@router.get("/access")
def list_access(
    request: Request,
    vm: str | None = None,
    include_all: bool = Query(False, alias="all", description="Expired and revoked too."),
) -> list[access.GrantView]:
    """The grants in force (`?all=true`: every grant), of every VM or of one, newest first,
    with their number of uses; never their credentials."""
    return access.list_grants(_ctl(request), vm, include_all)


@router.get("/access/{grant_id}")
def show_access(request: Request, grant_id: str) -> access.GrantDetail:
    """One grant with its latest uses."""
    return access.show_grant(_ctl(request), grant_id)


@router.post("/access/{grant_id}/revoke")
def revoke_access(request: Request, grant_id: str, body: RevokeIn) -> access.GrantView:
    """End a grant now (kept, with who revoked it, for the audit)."""
    return access.revoke_grant(_ctl(request), grant_id, body.by)


@metrics_router.get("/metrics", include_in_schema=False)
def metrics(request: Request) -> Response:
    """Prometheus text exposition."""
    return Response(exposition(_ctl(request)), media_type="text/plain; version=0.0.4")
