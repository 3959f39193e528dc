"""One transaction per use case: the unit of work the services open and commit."""

from __future__ import annotations

from types import TracebackType

from sqlalchemy import Connection
from sqlalchemy.orm import Session, sessionmaker


class UnitOfWork:
    """A session in one transaction; leaving without `commit()` rolls everything back."""

    def __init__(self, sessions: sessionmaker[Session]) -> None:
        self._sessions = sessions
        self._session: Session | None = None

    @property
    def session(self) -> Session:
        """The open session (only inside `with`)."""
        if self._session is None:
            raise RuntimeError("unit of work used outside its `with` block")
        return self._session

    @property
    def connection(self) -> Connection:
        """The transaction's connection, for Core statements on hot paths."""
        return self.session.connection()

    def __enter__(self) -> UnitOfWork:
        self._session = self._sessions()
        self._session.begin()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        session = self.session
        try:
            if session.in_transaction():
                session.rollback()
        finally:
            session.close()
            self._session = None

    def commit(self) -> None:
        """Make the use case's changes durable."""
        self.session.commit()
