"""Core statements compiled once and run straight on the database driver's cursor.

On the hot path of a VM create the database's own work is a few microseconds per statement
(SQLite in the page cache), while `Connection.execute` spends about 50 µs around it building
an execution context, firing events and wrapping the result (measured: 53 µs against 3 µs for
an indexed insert). A create runs about ten statements, so that overhead was a third of the
controller's CPU per create. `Prepared` keeps SQLAlchemy for what it is good at (writing the
SQL of each dialect, converting bound values) and does the rest itself, once per dialect:
compile, find each bound value's converter, then per call only convert and execute.

It takes only statements whose result columns need no conversion (integers and strings on
every supported database), and raises at the first use otherwise; driver errors become
SQLAlchemy's, so retries and error handling see what `Connection.execute` would raise.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Connection, Dialect, bindparam, insert
from sqlalchemy.exc import DBAPIError
from sqlalchemy.sql.elements import ClauseElement, ColumnElement

_ROW_TYPE: Callable[..., Any] = collections.namedtuple
"""Row types are made at run time from the columns a statement returns."""


@dataclass
class _Compiled:
    """One statement as one dialect runs it."""

    sql: str
    positions: tuple[str, ...] | None
    constants: dict[str, Any]
    converters: dict[str, Callable[[Any], Any]]
    row: Any = field(default=None)

    def parameters(self, values: Mapping[str, Any]) -> Any:
        """The driver's parameters: a tuple in placeholder order, or a dict by name."""
        merged = {**self.constants, **values}
        for name, convert in self.converters.items():
            if merged.get(name) is not None:
                merged[name] = convert(merged[name])
        if self.positions is None:
            return merged
        return tuple(merged[name] for name in self.positions)


class Prepared:
    """A Core statement run through the driver's cursor, compiled once per dialect."""

    def __init__(self, statement: ClauseElement) -> None:
        self._statement = statement
        self._by_dialect: dict[str, _Compiled] = {}

    def rows(self, conn: Connection, values: Mapping[str, Any] | None = None) -> list[Any]:
        """Run the statement; its rows as named tuples (empty for statements without rows)."""
        compiled = self._compiled(conn.dialect)
        parameters = compiled.parameters(values or {})
        cursor = conn.connection.cursor()
        try:
            cursor.execute(compiled.sql, parameters)
            if cursor.description is None:
                return []
            if compiled.row is None:
                compiled.row = _ROW_TYPE("Row", [c[0] for c in cursor.description])
            return [compiled.row._make(r) for r in cursor.fetchall()]
        except conn.dialect.loaded_dbapi.Error as error:
            raise DBAPIError.instance(
                compiled.sql,
                parameters,
                error,
                conn.dialect.loaded_dbapi.Error,
                dialect=conn.dialect,
            ) from error
        finally:
            cursor.close()

    def first(self, conn: Connection, values: Mapping[str, Any] | None = None) -> Any | None:
        """The first row, or None."""
        found = self.rows(conn, values)
        return found[0] if found else None

    def scalar(self, conn: Connection, values: Mapping[str, Any] | None = None) -> Any | None:
        """The first column of the first row, or None."""
        row = self.first(conn, values)
        return None if row is None else row[0]

    def _compiled(self, dialect: Dialect) -> _Compiled:
        compiled = self._by_dialect.get(dialect.name)
        if compiled is None:
            compiled = self._by_dialect[dialect.name] = _compile(self._statement, dialect)
        return compiled


def _compile(statement: ClauseElement, dialect: Dialect) -> _Compiled:
    _refuse_converted_results(statement, dialect)
    compiled: Any = statement.compile(dialect=dialect)
    if compiled.post_compile_params or compiled.literal_execute_params:
        raise TypeError(f"statement has parameters expanded at execution: {compiled}")
    binds = compiled.bind_names.items()
    converters = {}
    for bind, name in binds:
        convert = bind.type.dialect_impl(dialect).bind_processor(dialect)
        if convert is not None:
            converters[name] = convert
    constants = {name: bind.effective_value for bind, name in binds if not bind.required}
    positions = tuple(compiled.positiontup) if compiled.positional else None
    return _Compiled(compiled.string, positions, constants, converters)


def _refuse_converted_results(statement: ClauseElement, dialect: Dialect) -> None:
    columns: list[ColumnElement[Any]] = list(getattr(statement, "selected_columns", []))
    columns += list(getattr(statement, "_returning", ()))
    for column in columns:
        if column.type.dialect_impl(dialect).result_processor(dialect, None) is not None:
            raise TypeError(f"column {column} needs converting; use Connection.execute for it")


class PreparedInsert:
    """An insert of one row into `table` that returns the new row's id."""

    def __init__(self, table: Any, *columns: str) -> None:
        values: dict[str, Any] = {column: bindparam(f"new_{column}") for column in columns}
        self._prepared = Prepared(insert(table).values(values).returning(table.id))

    def row_id(self, conn: Connection, values: Mapping[str, Any]) -> int:
        """Insert the row with these column values; its id."""
        new_id = self._prepared.scalar(conn, {f"new_{k}": v for k, v in values.items()})
        if new_id is None:
            raise RuntimeError("the database returned no id for the new row")
        return int(new_id)
