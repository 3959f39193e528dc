"""Names are DNS labels; MACs are normalized."""

from __future__ import annotations

import pytest

from vmfabric.domain.errors import InvalidInput
from vmfabric.domain.names import check_name, normalize_mac


@pytest.mark.parametrize("name", ["a", "web-1", "x" * 63, "0abc"])
def test_good_names(name: str) -> None:
    assert check_name("VM", name) == name


@pytest.mark.parametrize("name", ["", "-a", "a-", "A", "a_b", "x" * 64, "a.b", "é"])
def test_bad_names(name: str) -> None:
    with pytest.raises(InvalidInput, match="invalid VM name"):
        check_name("VM", name)


def test_mac_normalized() -> None:
    assert normalize_mac("52-54-00-AB-cd-01") == "52:54:00:ab:cd:01"
    with pytest.raises(InvalidInput):
        normalize_mac("52:54:00")
