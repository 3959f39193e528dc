"""Store-backed address allocation over the free ranges of `domain.ipam`.

Each operation reads at most two free ranges through the (subnet, first address) index, so it
costs the same whether the subnet is empty or nearly full. Concurrency: on SQLite every write
transaction holds the database's write lock from its start (BEGIN IMMEDIATE); on PostgreSQL
the subnet row is locked first. The unique key on (subnet, address) is the last line: a
violation aborts the transaction, and the service retries it.
"""

from __future__ import annotations

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from vmfabric.domain.errors import Conflict
from vmfabric.domain.ipam import (
    AddressRange,
    IPAddress,
    address_key,
    address_text,
    key_value,
    released,
)
from vmfabric.store.tables import Allocation, FreeRange, Nic, Subnet


def seed_free_ranges(session: Session, subnet: Subnet, ranges: list[AddressRange]) -> None:
    """Record the free space of a new subnet."""
    session.add_all(
        FreeRange(subnet_id=subnet.id, first_key=address_key(r.first), last_key=address_key(r.last))
        for r in ranges
    )


def lock_subnet(session: Session, subnet: Subnet) -> None:
    """Serialize allocation in one subnet on databases with row locks.

    SQLite has none to take: its write transactions already hold the database lock.
    """
    if session.get_bind().dialect.name != "sqlite":
        session.execute(select(Subnet.id).where(Subnet.id == subnet.id).with_for_update())


def take_lowest(session: Session, subnet: Subnet) -> int | None:
    """Take the lowest free address of the subnet, or None if it has none."""
    row = session.scalar(
        select(FreeRange)
        .where(FreeRange.subnet_id == subnet.id)
        .order_by(FreeRange.first_key)
        .limit(1)
    )
    if row is None:
        return None
    value = key_value(row.first_key)
    _replace(session, subnet, [row], _range(row).without(value))
    return value


def take(session: Session, subnet: Subnet, value: int) -> bool:
    """Take one given address; False when it is not free."""
    row = _range_at_or_below(session, subnet, value)
    if row is None or value not in _range(row):
        return False
    _replace(session, subnet, [row], _range(row).without(value))
    return True


def give_back(session: Session, subnet: Subnet, value: int) -> None:
    """Return an address to the free space, merging it with free neighbours."""
    left = _range_at_or_below(session, subnet, value - 1)
    if left is not None and key_value(left.last_key) != value - 1:
        left = None
    right = session.scalar(
        select(FreeRange).where(
            FreeRange.subnet_id == subnet.id, FreeRange.first_key == address_key(value + 1)
        )
    )
    old = [r for r in (left, right) if r is not None]
    merged = released(value, _range(left) if left else None, _range(right) if right else None)
    _replace(session, subnet, old, (merged,))


def assign(session: Session, subnet: Subnet, nic: Nic, value: int) -> Allocation:
    """Record that `nic` holds address `value` of `subnet` (already taken from free space)."""
    allocation = Allocation(
        subnet_id=subnet.id,
        nic=nic,
        version=subnet.version,
        address=address_text(subnet.version, value),
        address_key=address_key(value),
    )
    session.add(allocation)
    subnet.used += 1
    return allocation


def holder_of(session: Session, subnet: Subnet, address: IPAddress) -> Allocation | None:
    """The allocation holding `address`, if any (to say who has it)."""
    return session.scalar(
        select(Allocation).where(
            Allocation.subnet_id == subnet.id, Allocation.address_key == address_key(int(address))
        )
    )


def ensure_not_held(session: Session, subnet: Subnet, address: IPAddress) -> None:
    """Raise Conflict naming the VM when `address` is already given to a NIC."""
    holder = holder_of(session, subnet, address)
    if holder is not None:
        raise Conflict(
            f"{address} is already in use by VM {holder.nic.vm.name!r}",
            address=str(address),
            vm=holder.nic.vm.name,
        )


def _range_at_or_below(session: Session, subnet: Subnet, value: int) -> FreeRange | None:
    return session.scalar(
        select(FreeRange)
        .where(FreeRange.subnet_id == subnet.id, FreeRange.first_key <= address_key(value))
        .order_by(FreeRange.first_key.desc())
        .limit(1)
    )


def _range(row: FreeRange) -> AddressRange:
    return AddressRange(key_value(row.first_key), key_value(row.last_key))


def _replace(
    session: Session, subnet: Subnet, old: list[FreeRange], new: tuple[AddressRange, ...]
) -> None:
    if old:
        session.execute(delete(FreeRange).where(FreeRange.id.in_([r.id for r in old])))
    seed_free_ranges(session, subnet, list(new))
