"""A private PostgreSQL server for the tests that run the store on it.

Started by the tests (initdb and pg_ctl as the `postgres` user, listening only on a unix
socket in its own directory) and stopped at the end of the session; skipped where PostgreSQL,
root or the `postgresql` extra is missing.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import pwd
import secrets
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest


def _postgres_binary(name: str) -> str | None:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return found[-1] if found else shutil.which(name)


def _as_postgres(*command: str) -> None:
    subprocess.run(
        ["runuser", "-u", "postgres", "--", *command], check=True, capture_output=True, timeout=60
    )


@pytest.fixture(scope="session")
def postgresql_socket_dir() -> Iterator[Path]:
    """The socket directory of a PostgreSQL server running for this test session."""
    initdb, pg_ctl = _postgres_binary("initdb"), _postgres_binary("pg_ctl")
    if os.geteuid() != 0 or initdb is None or pg_ctl is None:
        pytest.skip("needs root and PostgreSQL's server binaries")
    if importlib.util.find_spec("psycopg") is None:
        pytest.skip("needs the postgresql extra (uv sync --extra postgresql)")
    try:
        user = pwd.getpwnam("postgres")
    except KeyError:
        pytest.skip("needs the postgres user")
    root = Path(tempfile.mkdtemp(prefix="vmf-pg-", dir="/var/tmp"))
    data, sockets = root / "data", root / "run"
    try:
        sockets.mkdir()
        for path in (root, sockets):
            os.chown(path, user.pw_uid, user.pw_gid)
        _as_postgres(initdb, "-D", str(data), "-A", "trust", "-U", "postgres", "--no-sync")
        options = f"-k {sockets} -c listen_addresses='' -c fsync=off -c max_connections=200"
        _as_postgres(pg_ctl, "-D", str(data), "-o", options, "-l", str(root / "log"), "-w", "start")
        yield sockets
    finally:
        if (data / "postmaster.pid").exists():
            _as_postgres(pg_ctl, "-D", str(data), "-m", "immediate", "-w", "stop")
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def postgresql_url(postgresql_socket_dir: Path) -> Iterator[str]:
    """A database of the test's own on the session's PostgreSQL server."""
    import psycopg

    name = f"vmf_{secrets.token_hex(4)}"
    admin = f"host={postgresql_socket_dir} user=postgres dbname=postgres"
    with psycopg.connect(admin, autocommit=True) as connection:
        connection.execute(f"CREATE DATABASE {name}")
    yield f"postgresql+psycopg://postgres@/{name}?host={postgresql_socket_dir}"
    with psycopg.connect(admin, autocommit=True) as connection:
        connection.execute(f"DROP DATABASE {name} WITH (FORCE)")
