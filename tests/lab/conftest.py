"""Fixtures of the lab tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from vmfabric.lab import lifecycle
from vmfabric.lab.testing import state_dir_env


@pytest.fixture
def state() -> Iterator[Path]:
    """A state directory of the test's own; whatever lab the test built goes down after it."""
    with state_dir_env() as root:
        try:
            yield root
        finally:
            lifecycle.down()
