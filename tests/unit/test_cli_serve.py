"""`vmfabric serve` refuses bad options in one line, before it opens anything."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--cpu", "4096"], "error: invalid --cpu 4096: this process may run on CPUs"),
        (["--listen", "8750"], "error: invalid --listen '8750': expected HOST:PORT"),
        (["--dns-listen", "localhost:53"], "error: invalid --dns-listen 'localhost:53': 'local"),
        (["--dns-listen", "127.0.0.1:70000"], "error: invalid --dns-listen '127.0.0.1:70000'"),
    ],
)
def test_bad_serve_options_exit_2_with_one_line(
    args: list[str], message: str, tmp_path: Path
) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "vmfabric.cli.main", "serve", *args],
        env={**os.environ, "VMFABRIC_STATE": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2
    assert done.stderr.startswith(message)
    assert len(done.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "vmfabric.db").exists()
