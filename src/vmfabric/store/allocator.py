"""Store-backed address allocation over the free ranges of `domain.ipam`.

Each operation reads at most two free ranges through the (subnet, first address) index, so it
costs the same whether the subnet is empty or nearly full. Concurrency: on SQLite every write
transaction holds the database's write lock from its start (BEGIN IMMEDIATE); on PostgreSQL
the subnet row is locked first. The unique key on (subnet, address) is the last line: a
violation aborts the transaction, and the service retries it.

Allocation is on the hot path of every VM create, so its statements are built once and run as
`Prepared` statements on the transaction's connection: the ORM's unit-of-work bookkeeping,
and even SQLAlchemy's per-call execution machinery, cost several times the SQL itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import Connection, bindparam, delete, func, select, update

from vmfabric.domain.errors import Conflict
from vmfabric.domain.ipam import (
    AddressRange,
    IPAddress,
    address_key,
    address_text,
    key_value,
    released,
)
from vmfabric.store.prepared import Prepared, PreparedInsert
from vmfabric.store.tables import Allocation, FreeRange, Nic, Subnet, Vm

_RANGE_COLUMNS = (FreeRange.id, FreeRange.first_key, FreeRange.last_key)
_LOWEST = Prepared(
    select(*_RANGE_COLUMNS)
    .where(FreeRange.subnet_id == bindparam("subnet_id"))
    .order_by(FreeRange.first_key)
    .limit(1)
)
_AT_OR_BELOW = Prepared(
    select(*_RANGE_COLUMNS)
    .where(FreeRange.subnet_id == bindparam("subnet_id"), FreeRange.first_key <= bindparam("key"))
    .order_by(FreeRange.first_key.desc())
    .limit(1)
)
_STARTING_AT = Prepared(
    select(*_RANGE_COLUMNS).where(
        FreeRange.subnet_id == bindparam("subnet_id"), FreeRange.first_key == bindparam("key")
    )
)
_MOVE_RANGE = Prepared(
    update(FreeRange)
    .where(FreeRange.id == bindparam("row_id"))
    .values(first_key=bindparam("new_first"), last_key=bindparam("new_last"))
)
_DROP_RANGE = Prepared(delete(FreeRange).where(FreeRange.id == bindparam("row_id")))
_INSERT_RANGE = PreparedInsert(FreeRange, "subnet_id", "first_key", "last_key")
_INSERT_ALLOCATION = PreparedInsert(
    Allocation, "subnet_id", "nic_id", "version", "address", "address_key"
)
_DROP_ALLOCATION = Prepared(
    delete(Allocation).where(
        Allocation.subnet_id == bindparam("subnet_id"), Allocation.address_key == bindparam("key")
    )
)
_HOLDER = Prepared(
    select(Vm.name)
    .join(Nic, Nic.vm_id == Vm.id)
    .join(Allocation, Allocation.nic_id == Nic.id)
    .where(
        Allocation.subnet_id == bindparam("subnet_id"), Allocation.address_key == bindparam("key")
    )
)
_USED = (
    select(Allocation.subnet_id, func.count())
    .where(Allocation.subnet_id.in_(bindparam("subnet_ids", expanding=True)))
    .group_by(Allocation.subnet_id)
)
_LOCK_SUBNET = Prepared(
    select(Subnet.id).where(Subnet.id == bindparam("subnet_id")).with_for_update()
)


@dataclass(frozen=True)
class _Row:
    """A stored free range and its row id."""

    id: int
    block: AddressRange


def seed_free_ranges(conn: Connection, subnet_id: int, ranges: Sequence[AddressRange]) -> None:
    """Record the free space of a new subnet."""
    for block in ranges:
        _INSERT_RANGE.row_id(conn, _range_values(subnet_id, block))


def lock_subnet(conn: Connection, subnet_id: int) -> None:
    """Serialize allocation in one subnet on databases with row locks.

    SQLite has none to take: its write transactions already hold the database lock.
    """
    if conn.dialect.name != "sqlite":
        _LOCK_SUBNET.rows(conn, {"subnet_id": subnet_id})


def take_lowest(conn: Connection, subnet_id: int) -> int | None:
    """Take the lowest free address of the subnet, or None if it has none."""
    row = _one_range(conn, _LOWEST, subnet_id)
    if row is None:
        return None
    value = row.block.first
    _replace(conn, subnet_id, [row], row.block.without(value))
    return value


def take(conn: Connection, subnet_id: int, value: int) -> bool:
    """Take one given address; False when it is not free."""
    row = _one_range(conn, _AT_OR_BELOW, subnet_id, value)
    if row is None or value not in row.block:
        return False
    _replace(conn, subnet_id, [row], row.block.without(value))
    return True


def give_back(conn: Connection, subnet_id: int, value: int) -> None:
    """Return an address to the free space, merging it with free neighbours."""
    left = _one_range(conn, _AT_OR_BELOW, subnet_id, value - 1)
    if left is not None and left.block.last != value - 1:
        left = None
    right = _one_range(conn, _STARTING_AT, subnet_id, value + 1)
    old = [r for r in (left, right) if r is not None]
    merged = released(value, left.block if left else None, right.block if right else None)
    _replace(conn, subnet_id, old, (merged,))


def assign(conn: Connection, subnet_id: int, version: int, nic_id: int, value: int) -> str:
    """Record that the NIC holds address `value` (already taken from free space); its text."""
    address = address_text(version, value)
    values = {
        "subnet_id": subnet_id,
        "nic_id": nic_id,
        "version": version,
        "address": address,
        "address_key": address_key(value),
    }
    _INSERT_ALLOCATION.row_id(conn, values)
    return address


def release(conn: Connection, subnet_id: int, value: int, *, to_free_space: bool) -> None:
    """Drop the allocation of `value`; SLAAC addresses (`to_free_space` False) have no pool."""
    _DROP_ALLOCATION.rows(conn, {"subnet_id": subnet_id, "key": address_key(value)})
    if to_free_space:
        give_back(conn, subnet_id, value)


def used(conn: Connection, subnet_ids: Sequence[int]) -> dict[int, int]:
    """How many addresses of each subnet are given to NICs (counted, never stored)."""
    counts = {subnet_id: 0 for subnet_id in subnet_ids}
    counts.update((row[0], row[1]) for row in conn.execute(_USED, {"subnet_ids": list(subnet_ids)}))
    return counts


def ensure_not_held(conn: Connection, subnet_id: int, address: IPAddress) -> None:
    """Raise Conflict naming the VM when `address` is already given to a NIC."""
    holder = _HOLDER.scalar(conn, {"subnet_id": subnet_id, "key": address_key(int(address))})
    if holder is not None:
        raise Conflict(
            f"{address} is already in use by VM {holder!r}", address=str(address), vm=holder
        )


def _one_range(
    conn: Connection, statement: Prepared, subnet_id: int, value: int | None = None
) -> _Row | None:
    params: dict[str, object] = {"subnet_id": subnet_id}
    if value is not None:
        params["key"] = address_key(value)
    row = statement.first(conn, params)
    if row is None:
        return None
    return _Row(row.id, AddressRange(key_value(row.first_key), key_value(row.last_key)))


def _range_values(subnet_id: int, block: AddressRange) -> dict[str, object]:
    return {
        "subnet_id": subnet_id,
        "first_key": address_key(block.first),
        "last_key": address_key(block.last),
    }


def _replace(
    conn: Connection, subnet_id: int, old: list[_Row], new: tuple[AddressRange, ...]
) -> None:
    """Turn the `old` rows into the `new` ranges, updating rows in place where it can.

    Rows are deleted before any is updated or inserted: a range's new first address may be
    another old row's, and (subnet, first address) is unique.
    """
    kept, dropped = old[: len(new)], old[len(new) :]
    for row in dropped:
        _DROP_RANGE.rows(conn, {"row_id": row.id})
    for row, block in zip(kept, new, strict=False):
        moved = {
            "row_id": row.id,
            "new_first": address_key(block.first),
            "new_last": address_key(block.last),
        }
        _MOVE_RANGE.rows(conn, moved)
    seed_free_ranges(conn, subnet_id, new[len(kept) :])
