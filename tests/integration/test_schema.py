"""The migrations build exactly the schema `store.tables` describes."""

from __future__ import annotations

from pathlib import Path

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from vmfabric.store.engine import migrate, open_engine
from vmfabric.store.tables import Base


def test_the_newest_migration_matches_the_tables(tmp_path: Path) -> None:
    engine = open_engine(f"sqlite:///{tmp_path / 'schema.db'}")
    migrate(engine)
    with engine.connect() as connection:
        differences = compare_metadata(MigrationContext.configure(connection), Base.metadata)
    engine.dispose()
    assert differences == []
