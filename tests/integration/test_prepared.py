"""`Prepared` statements give what `Connection.execute` gives, on SQLite and on PostgreSQL."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import Engine, bindparam, delete, select, update
from sqlalchemy.exc import IntegrityError

from vmfabric.store.engine import migrate, open_engine
from vmfabric.store.prepared import Prepared, PreparedInsert
from vmfabric.store.tables import FreeRange, Host, Vm

INSERT_HOST = PreparedInsert(Host, "name", "driver", "uri", "bridge", "created_at")
INSERT_VM = PreparedInsert(
    Vm, "name", "host_id", "image", "state", "owner", "claim_expires", "created_at"
)
VMS_OF_HOST = Prepared(
    select(Vm.id, Vm.name, Host.name.label("host"))
    .join(Host, Host.id == Vm.host_id)
    .where(Host.name == bindparam("host"))
    .order_by(Vm.name)
    .limit(2)
)
RENAME = Prepared(update(Vm).where(Vm.id == bindparam("vm_id")).values(name=bindparam("new")))
DROP = Prepared(delete(Vm).where(Vm.name == bindparam("name")))
AT = datetime(2026, 11, 23, 12, 30, 15, 123456, tzinfo=UTC)


@pytest.fixture(params=["sqlite", "postgresql"])
def engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Engine]:
    if request.param == "postgresql":
        url = request.getfixturevalue("postgresql_url")
    else:
        url = f"sqlite:///{tmp_path / 'prepared.db'}"
    engine = open_engine(url)
    migrate(engine)
    yield engine
    engine.dispose()


def vm(name: str, host_id: int) -> dict[str, object]:
    return {
        "name": name,
        "host_id": host_id,
        "image": "debian12",
        "state": "running",
        "owner": None,
        "claim_expires": AT + timedelta(minutes=2),
        "created_at": AT,
    }


def test_rows_ids_and_stored_values_match_what_the_orm_reads(engine: Engine) -> None:
    with engine.begin() as conn:
        host = {"name": "hv1", "driver": "noop", "uri": None, "bridge": "br0", "created_at": AT}
        host_id = INSERT_HOST.row_id(conn, host)
        ids = [INSERT_VM.row_id(conn, vm(name, host_id)) for name in ("c", "a", "b")]
        assert len(set(ids)) == 3
        rows = VMS_OF_HOST.rows(conn, {"host": "hv1"})
        assert [(r.name, r.host) for r in rows] == [("a", "hv1"), ("b", "hv1")]
        assert rows[0].id == ids[1]
        assert VMS_OF_HOST.rows(conn, {"host": "hv2"}) == []
        assert RENAME.rows(conn, {"vm_id": ids[0], "new": "d"}) == []
        DROP.rows(conn, {"name": "a"})
    with engine.connect() as conn:
        stored = conn.execute(select(Vm.name, Vm.created_at, Vm.claim_expires).order_by(Vm.name))
        assert [(r.name, r.created_at.replace(tzinfo=UTC), r.claim_expires) for r in stored] == [
            ("b", AT, stored_expiry(engine)),
            ("d", AT, stored_expiry(engine)),
        ]


def stored_expiry(engine: Engine) -> datetime:
    """What the ORM reads back: SQLite keeps no time zone, PostgreSQL does."""
    expiry = AT + timedelta(minutes=2)
    return expiry.replace(tzinfo=None) if engine.dialect.name == "sqlite" else expiry


def test_a_constraint_violation_is_sqlalchemys_integrity_error(engine: Engine) -> None:
    with engine.begin() as conn:
        host = {"name": "hv1", "driver": "noop", "uri": None, "bridge": "br0", "created_at": AT}
        host_id = INSERT_HOST.row_id(conn, host)
        INSERT_VM.row_id(conn, vm("a", host_id))
    with pytest.raises(IntegrityError), engine.begin() as conn:
        INSERT_VM.row_id(conn, vm("a", host_id))
    with engine.connect() as conn:
        assert conn.execute(select(Vm.name)).scalars().all() == ["a"]


def test_statements_whose_results_need_converting_are_refused(tmp_path: Path) -> None:
    """SQLite keeps times as text, which SQLAlchemy turns into datetimes when it reads them."""
    engine = open_engine(f"sqlite:///{tmp_path / 'prepared.db'}")
    with engine.connect() as conn, pytest.raises(TypeError, match="needs converting"):
        Prepared(select(Vm.created_at)).rows(conn)


def test_statements_expanded_at_execution_are_refused(engine: Engine) -> None:
    expanding = select(FreeRange.id).where(FreeRange.id.in_(bindparam("ids", expanding=True)))
    with engine.connect() as conn, pytest.raises(TypeError, match="expanded at execution"):
        Prepared(expanding).rows(conn, {"ids": [1, 2]})
