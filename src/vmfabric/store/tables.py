"""The controller's state as SQLAlchemy 2 tables.

Every schema change goes through an Alembic migration in `store/migrations`; these classes
must always describe the schema the newest migration produces.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, ClassVar

from sqlalchemy import JSON, DateTime, ForeignKey, Index, Integer, String, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


def utcnow() -> datetime:
    """Timestamps are stored in UTC."""
    return datetime.now(UTC)


class Base(DeclarativeBase):
    """Declarative base of every table; every timestamp keeps its time zone."""

    type_annotation_map: ClassVar[dict[Any, Any]] = {datetime: DateTime(timezone=True)}


class Host(Base):
    """A hypervisor host and how its agent reaches the hypervisor."""

    __tablename__ = "hosts"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(63), unique=True)
    driver: Mapped[str] = mapped_column(String(32))
    uri: Mapped[str | None] = mapped_column(String(255))
    bridge: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Network(Base):
    """A layer-2 network (one VLAN) with one or more subnets."""

    __tablename__ = "networks"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(63), unique=True)
    kind: Mapped[str] = mapped_column(String(16))
    vlan: Mapped[int] = mapped_column(Integer, unique=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    subnets: Mapped[list[Subnet]] = relationship(
        back_populates="network", order_by="Subnet.id", cascade="all, delete-orphan"
    )


class Subnet(Base):
    """An IPv4 or IPv6 subnet of a network; its addresses in use are its allocations."""

    __tablename__ = "subnets"

    id: Mapped[int] = mapped_column(primary_key=True)
    network_id: Mapped[int] = mapped_column(ForeignKey("networks.id", ondelete="CASCADE"))
    cidr: Mapped[str] = mapped_column(String(64), unique=True)
    version: Mapped[int] = mapped_column(Integer)
    gateway: Mapped[str | None] = mapped_column(String(64))
    dhcp_server: Mapped[str | None] = mapped_column(String(64))
    ipv6_mode: Mapped[str | None] = mapped_column(String(16))
    capacity: Mapped[str] = mapped_column(String(40))
    network: Mapped[Network] = relationship(back_populates="subnets")
    reserved: Mapped[list[ReservedRange]] = relationship(
        order_by="ReservedRange.first_key", cascade="all, delete-orphan"
    )


class ReservedRange(Base):
    """Addresses of a subnet the operator keeps out of VM allocation."""

    __tablename__ = "reserved_ranges"

    id: Mapped[int] = mapped_column(primary_key=True)
    subnet_id: Mapped[int] = mapped_column(ForeignKey("subnets.id", ondelete="CASCADE"))
    first_key: Mapped[str] = mapped_column(String(32))
    last_key: Mapped[str] = mapped_column(String(32))


class FreeRange(Base):
    """A run of free addresses of a subnet (see `domain.ipam`)."""

    __tablename__ = "free_ranges"
    __table_args__ = (UniqueConstraint("subnet_id", "first_key"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    subnet_id: Mapped[int] = mapped_column(ForeignKey("subnets.id", ondelete="CASCADE"))
    first_key: Mapped[str] = mapped_column(String(32))
    last_key: Mapped[str] = mapped_column(String(32))


class Vm(Base):
    """A VM; `owner` and `claim_expires` mark a create in progress and who runs it."""

    __tablename__ = "vms"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(63), unique=True)
    host_id: Mapped[int] = mapped_column(ForeignKey("hosts.id"))
    image: Mapped[str] = mapped_column(String(63))
    state: Mapped[str] = mapped_column(String(16))
    owner: Mapped[str | None] = mapped_column(String(128))
    claim_expires: Mapped[datetime | None] = mapped_column()
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    host: Mapped[Host] = relationship()
    nics: Mapped[list[Nic]] = relationship(
        back_populates="vm", order_by="Nic.position", cascade="all, delete-orphan"
    )


class Nic(Base):
    """A VM's NIC on one network; the MAC is known once the hypervisor defined the VM."""

    __tablename__ = "nics"
    __table_args__ = (UniqueConstraint("vm_id", "position"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    vm_id: Mapped[int] = mapped_column(ForeignKey("vms.id", ondelete="CASCADE"))
    network_id: Mapped[int] = mapped_column(ForeignKey("networks.id"))
    position: Mapped[int] = mapped_column(Integer)
    mac: Mapped[str | None] = mapped_column(String(17), unique=True)
    vm: Mapped[Vm] = relationship(back_populates="nics")
    network: Mapped[Network] = relationship()
    addresses: Mapped[list[Allocation]] = relationship(
        back_populates="nic", order_by="Allocation.version", cascade="all, delete-orphan"
    )


class Allocation(Base):
    """An address given to a NIC. The unique key is the last guard against double use."""

    __tablename__ = "allocations"
    __table_args__ = (
        UniqueConstraint("subnet_id", "address_key"),
        UniqueConstraint("nic_id", "version"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    subnet_id: Mapped[int] = mapped_column(ForeignKey("subnets.id"))
    nic_id: Mapped[int] = mapped_column(ForeignKey("nics.id", ondelete="CASCADE"))
    version: Mapped[int] = mapped_column(Integer)
    address: Mapped[str] = mapped_column(String(64))
    address_key: Mapped[str] = mapped_column(String(32))
    nic: Mapped[Nic] = relationship(back_populates="addresses")
    subnet: Mapped[Subnet] = relationship()


class Lease(Base):
    """A DHCP lease as dnsmasq last reported it."""

    __tablename__ = "leases"
    __table_args__ = (UniqueConstraint("network_id", "mac", "address"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    network_id: Mapped[int] = mapped_column(ForeignKey("networks.id", ondelete="CASCADE"))
    mac: Mapped[str] = mapped_column(String(17))
    address: Mapped[str] = mapped_column(String(64))
    hostname: Mapped[str | None] = mapped_column(String(255))
    expires: Mapped[int | None] = mapped_column(Integer)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


Index("ix_leases_mac", Lease.mac)


class GuestAddress(Base):
    """An address a guest configured on a NIC itself (not by DHCP), as its agent reported it."""

    __tablename__ = "guest_addresses"
    __table_args__ = (UniqueConstraint("nic_id", "address"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    nic_id: Mapped[int] = mapped_column(ForeignKey("nics.id", ondelete="CASCADE"))
    address: Mapped[str] = mapped_column(String(64))
    seen_at: Mapped[datetime] = mapped_column(default=utcnow)


class Check(Base):
    """One connectivity check of a VM through its guest agent, kept for the history."""

    __tablename__ = "checks"

    id: Mapped[int] = mapped_column(primary_key=True)
    vm: Mapped[str] = mapped_column(String(63))
    checked_at: Mapped[datetime] = mapped_column(default=utcnow)
    os: Mapped[str] = mapped_column(String(16))
    agent: Mapped[str] = mapped_column(String(16))
    nics: Mapped[list[dict[str, str | None]]] = mapped_column(JSON)
    detail: Mapped[str | None] = mapped_column(String(1024))


Index("ix_checks_vm_at", Check.vm, Check.checked_at)
Index("ix_checks_at", Check.checked_at)


class GroupBlock(Base):
    """A block in force: of one group (`scope` "group", `target` its name `<host>-<image>`)
    or of every group of an image, on every host (`scope` "image", `target` the image)."""

    __tablename__ = "group_blocks"
    __table_args__ = (UniqueConstraint("scope", "target"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    scope: Mapped[str] = mapped_column(String(8))
    target: Mapped[str] = mapped_column(String(127))
    host: Mapped[str | None] = mapped_column(String(63))
    image: Mapped[str] = mapped_column(String(63))
    reason: Mapped[str] = mapped_column(String(1024))
    allowed: Mapped[list[str]] = mapped_column(JSON)
    actor: Mapped[str] = mapped_column(String(255))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class GroupAudit(Base):
    """One block or unblock, kept for good: who, when, why, and which VMs it concerned."""

    __tablename__ = "group_audit"

    id: Mapped[int] = mapped_column(primary_key=True)
    at: Mapped[datetime] = mapped_column(default=utcnow)
    action: Mapped[str] = mapped_column(String(8))
    scope: Mapped[str] = mapped_column(String(8))
    target: Mapped[str] = mapped_column(String(127))
    actor: Mapped[str] = mapped_column(String(255))
    reason: Mapped[str] = mapped_column(String(1024))
    allowed: Mapped[list[str]] = mapped_column(JSON)
    vms: Mapped[list[str]] = mapped_column(JSON)
    groups: Mapped[list[str]] = mapped_column(JSON)


Index("ix_group_audit_target", GroupAudit.scope, GroupAudit.target)


class Policy(Base):
    """A network policy as the operator wrote it (`domain.policy`'s canonical document)."""

    __tablename__ = "policies"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(63), unique=True)
    document: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class PolicyAttachment(Base):
    """A policy attached to one VM or to one network (every NIC on it); a VM or a network
    has at most one, and loses it with itself."""

    __tablename__ = "policy_attachments"

    id: Mapped[int] = mapped_column(primary_key=True)
    policy_id: Mapped[int] = mapped_column(ForeignKey("policies.id"))
    vm_id: Mapped[int | None] = mapped_column(ForeignKey("vms.id", ondelete="CASCADE"), unique=True)
    network_id: Mapped[int | None] = mapped_column(
        ForeignKey("networks.id", ondelete="CASCADE"), unique=True
    )
    policy: Mapped[Policy] = relationship()
    vm: Mapped[Vm | None] = relationship()
    network: Mapped[Network | None] = relationship()


class VmMigration(Base):
    """One move of a VM between hosts and where its rules are in the method (CN103051479A):
    `ports` maps each NIC's MAC to its old and new switch port, `saved` keeps the send rules
    taken off the source, so a restarted controller resumes or rolls back."""

    __tablename__ = "vm_migrations"

    id: Mapped[int] = mapped_column(primary_key=True)
    vm_id: Mapped[int] = mapped_column(ForeignKey("vms.id", ondelete="CASCADE"))
    vm: Mapped[str] = mapped_column(String(63))
    source: Mapped[str] = mapped_column(String(63))
    destination: Mapped[str] = mapped_column(String(63))
    phase: Mapped[str] = mapped_column(String(16))
    asked_by: Mapped[str] = mapped_column(String(16))
    ports: Mapped[dict[str, dict[str, int | None]]] = mapped_column(JSON)
    saved: Mapped[list[str]] = mapped_column(JSON)
    detail: Mapped[str | None] = mapped_column(String(1024))
    started_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column()


Index("ix_vm_migrations_vm", VmMigration.vm_id, VmMigration.phase)


class AccessGrant(Base):
    """An access credential issued for one port of one VM (`domain.access`), kept to list,
    revoke and audit it. The credential itself is not stored: it is given once, and only
    the signing key makes it again. `vm` keeps the VM's name for the log; the grant goes with
    its VM."""

    __tablename__ = "access_grants"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    vm_id: Mapped[int] = mapped_column(ForeignKey("vms.id", ondelete="CASCADE"))
    vm: Mapped[str] = mapped_column(String(63))
    port: Mapped[int] = mapped_column(Integer)
    user: Mapped[str | None] = mapped_column(String(128))
    granted_by: Mapped[str] = mapped_column(String(255))
    created_at: Mapped[datetime] = mapped_column()
    expires_at: Mapped[datetime] = mapped_column()
    revoked_at: Mapped[datetime | None] = mapped_column()
    revoked_by: Mapped[str | None] = mapped_column(String(255))


Index("ix_access_grants_vm", AccessGrant.vm_id)
Index("ix_access_grants_expires", AccessGrant.expires_at)


class AccessUse(Base):
    """One use of a credential at the access gateway, refused or not: the grant (when the
    credential was authentic and its grant still exists), what was asked for, by whom, how
    it ended."""

    __tablename__ = "access_uses"

    id: Mapped[int] = mapped_column(primary_key=True)
    grant_id: Mapped[str | None] = mapped_column(
        ForeignKey("access_grants.id", ondelete="SET NULL")
    )
    vm: Mapped[str] = mapped_column(String(63))
    port: Mapped[int] = mapped_column(Integer)
    at: Mapped[datetime] = mapped_column()
    client: Mapped[str | None] = mapped_column(String(64))
    kind: Mapped[str] = mapped_column(String(8))
    outcome: Mapped[str] = mapped_column(String(16))
    detail: Mapped[str | None] = mapped_column(String(1024))


Index("ix_access_uses_grant_at", AccessUse.grant_id, AccessUse.at)
