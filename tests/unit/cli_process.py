"""The `vmfabric` command run as a process, as an operator runs it: what it prints and how
it exits, with a state directory of the test's own."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

NOBODY_LISTENS = "http://127.0.0.1:9"
"""A controller URL where nothing answers (port 9, discard): commands that must refuse bad
input before they call the API show it by not failing on the connection."""


def vmfabric(
    args: list[str], state: Path, url: str = NOBODY_LISTENS, **env: str
) -> subprocess.CompletedProcess[str]:
    """`vmfabric ARGS` with `VMFABRIC_STATE` = `state`, `VMFABRIC_URL` = `url` and `env`."""
    return subprocess.run(
        [sys.executable, "-m", "vmfabric.cli.main", *args],
        env={**os.environ, "VMFABRIC_STATE": str(state), "VMFABRIC_URL": url, **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
