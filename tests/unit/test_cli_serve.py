"""`vmfabric serve` refuses bad options in one line, before it opens anything."""

from __future__ import annotations

import socket
import subprocess
from pathlib import Path

import pytest
from cli_process import vmfabric


def serve(args: list[str], state: Path) -> subprocess.CompletedProcess[str]:
    """`vmfabric serve ARGS` on a state directory of its own, which must end at once."""
    return vmfabric(["serve", *args], state)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--cpu", "4096"], "error: invalid --cpu 4096: this process may run on CPUs"),
        (["--listen", "8750"], "error: invalid --listen '8750': expected HOST:PORT"),
        (["--dns-listen", "localhost:53"], "error: invalid --dns-listen 'localhost:53': 'local"),
        (["--dns-listen", "127.0.0.1:70000"], "error: invalid --dns-listen '127.0.0.1:70000'"),
        (["--dns-secondary", "ns2:53"], "error: invalid --dns-secondary 'ns2:53'"),
        (["--check-target", "example.com"], "error: invalid --check-target: invalid external"),
        (["--check-deadline", "0"], "error: invalid --check-deadline 0: between 1 and 300"),
        (["--check-interval", "-1"], "error: invalid --check-interval -1"),
        (["--webhook", "http://hooks.example/x"], "error: --webhook needs --webhook-secret-file"),
        (["--webhook", "ftp://x"], "error: invalid --webhook 'ftp://x'"),
        (["--dns-tsig-key-file", "/nonexistent"], "error: invalid --dns-tsig-key-file '/none"),
        (["--migration-timeout", "0"], "error: invalid --migration-timeout 0: between 1 and"),
        (["--migration-grace", "60"], "error: invalid --migration-grace 60: between 0 and the"),
    ],
)
def test_bad_serve_options_exit_2_with_one_line(
    args: list[str], message: str, tmp_path: Path
) -> None:
    done = serve(args, tmp_path)
    assert done.returncode == 2
    assert done.stderr.startswith(message)
    assert len(done.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "vmfabric.db").exists()


def test_dns_address_in_use_exits_1_with_one_line(tmp_path: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
        taken.bind(("127.0.0.1", 0))
        port = taken.getsockname()[1]
        done = serve(["--dns-listen", f"127.0.0.1:{port}"], tmp_path)
    assert done.returncode == 1
    assert done.stderr.startswith(f"error: cannot serve DNS on 127.0.0.1:{port}: ")
    assert "--dns-listen off" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "vmfabric.db").exists()
