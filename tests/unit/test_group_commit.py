"""The group committer: units of many threads share commits; one unit's error stays its own."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from sqlalchemy import Connection, Engine, event, func, insert, select

from vmfabric.store.engine import migrate, open_engine
from vmfabric.store.group_commit import GroupCommitter
from vmfabric.store.tables import Host


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    engine = open_engine(f"sqlite:///{tmp_path / 'db.sqlite'}")
    migrate(engine)
    yield engine
    engine.dispose()


def add_host(name: str, conn: Connection) -> str:
    conn.execute(insert(Host), {"name": name, "driver": "noop", "bridge": "br0"})
    return name


def host_names(engine: Engine) -> set[str]:
    with engine.connect() as conn:
        return set(conn.scalars(select(Host.name)))


def test_units_from_many_threads_share_commits(engine: Engine) -> None:
    commits: list[object] = []
    event.listen(engine, "commit", commits.append)
    writer = GroupCommitter(engine)
    names = [f"hv{i}" for i in range(400)]
    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(lambda n: writer.run(lambda c: add_host(n, c)), names))
    writer.close()
    assert results == names
    assert host_names(engine) == set(names)
    assert len(commits) < len(names)


def test_a_failing_unit_fails_alone_and_its_batch_mates_commit(engine: Engine) -> None:
    writer = GroupCommitter(engine)
    writer.run(lambda c: add_host("taken", c))
    running, gate = threading.Event(), threading.Event()

    def hold_the_writer(_conn: Connection) -> None:
        running.set()
        gate.wait(10)

    blocker = threading.Thread(target=writer.run, args=(hold_the_writer,))
    blocker.start()
    running.wait(10)
    with ThreadPoolExecutor(4) as pool:
        names = ("a", "taken", "b")
        futures = [pool.submit(writer.run, lambda c, n=n: add_host(n, c)) for n in names]
        # the writer thread holds the first while it waits to write; the others queue
        deadline = time.monotonic() + 10
        while writer.queued() < len(names) - 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        gate.set()
        outcomes = [f.exception() is None for f in futures]
    blocker.join()
    writer.close()
    assert outcomes == [True, False, True]
    assert host_names(engine) == {"taken", "a", "b"}


def test_a_closed_writer_refuses_work(engine: Engine) -> None:
    writer = GroupCommitter(engine)
    writer.close()
    with pytest.raises(RuntimeError, match="closed"):
        writer.run(lambda c: c.scalar(select(func.count()).select_from(Host)))
