"""Request bodies of the API. Responses are the service views (`services.views`)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from vmfabric.domain.access import DEFAULT_TTL
from vmfabric.services.vms import DEFAULT_IMAGE


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class HostIn(_Body):
    """Register a host."""

    name: str
    driver: str = "libvirt"
    bridge: str
    uri: str | None = None


class NetworkIn(_Body):
    """Create a network."""

    name: str
    cidrs: list[str] = Field(min_length=1)
    kind: str = "internal"
    gateways: list[str] = []
    reserved: list[str] = []
    ipv6_mode: str = "slaac"
    vlan: int | None = Field(default=None, ge=1, le=4094)


class NicIn(_Body):
    """One NIC of a new VM; `address` presets its IP."""

    network: str
    address: str | None = None


class VmIn(_Body):
    """Create a VM."""

    name: str
    host: str
    image: str = DEFAULT_IMAGE
    nics: list[NicIn] = Field(min_length=1)


class MigrateIn(_Body):
    """Move a running VM to another host."""

    to: str


class AddressIn(_Body):
    """Change a VM's address."""

    address: str


class BlockIn(_Body):
    """Block a group or an image: why, who asks, and what its VMs may still reach."""

    reason: str
    by: str = "api"
    allow: list[str] = []


class UnblockIn(_Body):
    """Lift a block: who asks, and why."""

    reason: str = ""
    by: str = "api"


class CheckRunIn(_Body):
    """Run checks now: of one VM, or of every running VM."""

    vm: str | None = None


class PolicyDocumentIn(_Body):
    """A policy's rules, defaults and sets; checked by `domain.policy.parse_policy`."""

    rules: list[dict[str, Any]] = []
    ingress_default: str = "deny"
    egress_default: str = "allow"
    antispoof: bool = True
    sets: dict[str, list[str]] = {}
    rate_limit_kbps: int | None = None


class PolicyIn(PolicyDocumentIn):
    """Create a policy, and attach it to VMs and networks at once."""

    name: str
    vms: list[str] = []
    networks: list[str] = []


class AttachIn(_Body):
    """Where to attach a policy, or detach it from: one VM or one network."""

    vm: str | None = None
    network: str | None = None


class AccessIn(_Body):
    """Grant access to one port of a VM: for how long (`30s`, `15m`, `2h`, `1d`, `1h30m`), for
    whom (`for`, any user name; none for whoever holds the credential), and who asks."""

    vm: str
    port: int
    ttl: str = DEFAULT_TTL
    user: str | None = Field(default=None, alias="for")
    by: str = "api"


class RevokeIn(_Body):
    """Revoke a grant: who asks."""

    by: str = "api"
