"""Group commit: short units of work from many threads, run by one thread, several per commit.

The controller's hot path (a VM create is three short transactions) is bound by the Python
interpreter, not by the database: per transaction, handing the connection from thread to
thread, BEGIN and COMMIT cost as much as the statements themselves, and threads handing the
interpreter lock back and forth between CPU cores cost more again (measured: 16 threads
creating VMs used 5.0 ms of CPU per VM through a shared connection, 3.7 ms through this).
So units queue here, and one thread runs whatever is queued in one transaction, then
answers each caller.

A unit is a function of the connection with no effect outside the database: it may run more
than once. When one unit of a batch fails, the batch is rolled back and its units are run
again one by one, so one caller's error (a name already taken) never reaches another. A unit
run alone is retried on the errors a race with another process gives (`RETRYING`).
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from sqlalchemy import Connection, Engine
from sqlalchemy.exc import IntegrityError, OperationalError
from tenacity import Retrying, retry_if_exception_type, stop_after_attempt, wait_random_exponential

log = logging.getLogger(__name__)
T = TypeVar("T")

MAX_BATCH = 64

RETRYING = Retrying(
    retry=retry_if_exception_type((IntegrityError, OperationalError)),
    stop=stop_after_attempt(5),
    wait=wait_random_exponential(multiplier=0.01, max=0.5),
    reraise=True,
)
"""Transactions that lose a race (a unique key another process took first, a busy database)
are run again; the retry sees the winner's commit and answers with a clear error."""


@dataclass
class _Pending(Generic[T]):
    unit: Callable[[Connection], T]
    future: Future[T] = field(default_factory=Future)


class GroupCommitter:
    """Runs units of work in batches on one thread; `run` blocks until its unit committed.

    A caller that finds nothing queued and nobody writing runs its unit on its own thread:
    without contention there is nothing to share a commit with, and the hand-over to the
    writer thread and back costs more than the unit.
    """

    def __init__(self, engine: Engine, max_batch: int = MAX_BATCH) -> None:
        self._engine = engine
        self._max_batch = max_batch
        self._queue: queue.SimpleQueue[_Pending[Any] | None] = queue.SimpleQueue()
        self._writing = threading.Lock()
        self._closed = False
        self._thread = threading.Thread(
            target=self._serve, name="vmfabric-group-commit", daemon=True
        )
        self._thread.start()

    def run(self, unit: Callable[[Connection], T]) -> T:
        """Run `unit` in a transaction (perhaps shared with others'); its result once committed."""
        if self._closed:
            raise RuntimeError("the database writer is closed")
        pending: _Pending[T] = _Pending(unit)
        if self._queue.empty() and self._writing.acquire(blocking=False):
            try:
                self._commit_alone(pending)
            finally:
                self._writing.release()
        else:
            self._queue.put(pending)
        return pending.future.result()

    async def run_async(self, unit: Callable[[Connection], T]) -> T:
        """`run` for the event loop: the unit always goes to the writer thread, so the loop
        never waits on the database (a lock another process holds can take seconds), and one
        batch's callers are woken together."""
        if self._closed:
            raise RuntimeError("the database writer is closed")
        pending: _Pending[T] = _Pending(unit)
        self._queue.put(pending)
        return await asyncio.wrap_future(pending.future)

    def queued(self) -> int:
        """Units waiting for the writer thread (approximate, as queues are)."""
        return self._queue.qsize()

    def close(self) -> None:
        """Finish what is queued, then stop the thread."""
        self._closed = True
        self._queue.put(None)
        self._thread.join(timeout=30)

    def _serve(self) -> None:
        while (first := self._queue.get()) is not None:
            with self._writing:
                self._commit(self._following(first))

    def _following(self, first: _Pending[Any]) -> list[_Pending[Any]]:
        """`first` and what is queued behind it now, up to `max_batch`."""
        batch = [first]
        while len(batch) < self._max_batch:
            try:
                following = self._queue.get_nowait()
            except queue.Empty:
                break
            if following is None:
                self._queue.put(None)
                break
            batch.append(following)
        return batch

    def _commit(self, batch: list[_Pending[Any]]) -> None:
        if len(batch) == 1:
            self._commit_alone(batch[0])
            return
        try:
            results = self._attempt(batch)
        except Exception:
            for pending in batch:
                self._commit_alone(pending)
            return
        for pending, result in zip(batch, results, strict=True):
            pending.future.set_result(result)

    def _commit_alone(self, pending: _Pending[Any]) -> None:
        try:
            (result,) = RETRYING(self._attempt, [pending])
        except Exception as error:
            pending.future.set_exception(error)
        else:
            pending.future.set_result(result)

    def _attempt(self, batch: list[_Pending[Any]]) -> list[Any]:
        with self._engine.begin() as conn:
            return [pending.unit(conn) for pending in batch]
