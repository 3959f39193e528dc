"""IPAM rules: subnet plans, refusals, free-range arithmetic (property tests), EUI-64."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vmfabric.domain.errors import InvalidInput
from vmfabric.domain.ipam import (
    AddressRange,
    address_key,
    eui64_address,
    key_value,
    parse_network,
    parse_range,
    plan_subnet,
    released,
    subtract,
)
from vmfabric.domain.model import Ipv6Mode


def ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    return ipaddress.ip_address(text)


def test_plan_defaults_gateway_first_and_dhcp_server_last() -> None:
    plan = plan_subnet("10.0.0.0/24")
    assert plan.gateway == ip("10.0.0.1")
    assert plan.dhcp_server == ip("10.0.0.254")
    assert plan.initial_free() == [AddressRange(int(ip("10.0.0.2")), int(ip("10.0.0.253")))]
    assert plan.capacity() == 252


def test_plan_keeps_reserved_ranges_and_named_gateway_out() -> None:
    plan = plan_subnet(
        "10.0.0.0/24", gateway=ip("10.0.0.100"), reserved=[(ip("10.0.0.2"), ip("10.0.0.9"))]
    )
    free = plan.initial_free()
    assert free == [
        AddressRange(int(ip("10.0.0.1")), int(ip("10.0.0.1"))),
        AddressRange(int(ip("10.0.0.10")), int(ip("10.0.0.99"))),
        AddressRange(int(ip("10.0.0.101")), int(ip("10.0.0.253"))),
    ]


@pytest.mark.parametrize(
    ("address", "reason"),
    [
        ("10.1.0.5", "outside the subnet"),
        ("10.0.0.0", "network address"),
        ("10.0.0.255", "broadcast address"),
        ("10.0.0.1", "gateway"),
        ("10.0.0.254", "DHCP server"),
        ("10.0.0.5", "reserved range 10.0.0.2-10.0.0.9"),
    ],
)
def test_refusals_say_why(address: str, reason: str) -> None:
    plan = plan_subnet("10.0.0.0/24", reserved=[(ip("10.0.0.2"), ip("10.0.0.9"))])
    refusal = plan.refusal(ip(address))
    assert refusal is not None
    assert reason in refusal


def test_usable_address_is_accepted() -> None:
    assert plan_subnet("10.0.0.0/24").refusal(ip("10.0.0.77")) is None


@pytest.mark.parametrize(
    ("cidr", "message"),
    [
        ("10.0.0.1/24", "did you mean 10.0.0.0/24"),
        ("nonsense", "invalid CIDR"),
        ("10.0.0.0/30", "too small"),
        ("fd00::/80", "SLAAC needs a /64"),
    ],
)
def test_bad_subnets_are_refused(cidr: str, message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        plan_subnet(cidr)


def test_gateway_outside_subnet_is_refused() -> None:
    with pytest.raises(InvalidInput, match="not a usable address"):
        plan_subnet("10.0.0.0/24", gateway=ip("10.0.1.1"))


def test_slaac_subnet_has_no_free_ranges_and_dhcpv6_has() -> None:
    assert plan_subnet("fd00::/64").initial_free() == []
    dhcpv6 = plan_subnet("fd00::/120", ipv6_mode=Ipv6Mode.DHCPV6)
    assert dhcpv6.dhcp_server == ip("fd00::ff")
    assert dhcpv6.capacity() == 255 - 2


def test_range_parsing() -> None:
    assert parse_range("10.0.0.2-10.0.0.9") == (ip("10.0.0.2"), ip("10.0.0.9"))
    assert parse_range("10.0.0.2") == (ip("10.0.0.2"), ip("10.0.0.2"))
    with pytest.raises(InvalidInput):
        parse_range("10.0.0.9-10.0.0.2")


def test_eui64_matches_rfc4291_example() -> None:
    network = parse_network("2001:db8::/64")
    assert eui64_address(network, "52:54:00:12:34:56") == ip("2001:db8::5054:ff:fe12:3456")


@given(st.integers(min_value=0, max_value=2**128 - 1))
def test_keys_sort_like_numbers(value: int) -> None:
    assert key_value(address_key(value)) == value
    if value:
        assert address_key(value - 1) < address_key(value)


class FreeSpace:
    """A model user of the range primitives, the way the store uses them."""

    def __init__(self, ranges: list[AddressRange]) -> None:
        self.ranges = sorted(ranges)

    def take(self, value: int) -> bool:
        for r in self.ranges:
            if value in r:
                self.ranges.remove(r)
                self.ranges = sorted(self.ranges + list(r.without(value)))
                return True
        return False

    def give_back(self, value: int) -> None:
        left = next((r for r in self.ranges if r.last == value - 1), None)
        right = next((r for r in self.ranges if r.first == value + 1), None)
        for r in (left, right):
            if r is not None:
                self.ranges.remove(r)
        self.ranges = sorted([*self.ranges, released(value, left, right)])

    def members(self) -> set[int]:
        return {v for r in self.ranges for v in range(r.first, r.last + 1)}


@given(
    st.lists(
        st.tuples(st.booleans(), st.integers(min_value=0, max_value=63)), min_size=1, max_size=80
    )
)
def test_free_ranges_match_a_set_and_stay_disjoint_and_merged(ops: list[tuple[bool, int]]) -> None:
    space = FreeSpace([AddressRange(0, 63)])
    model = set(range(64))
    for taking, value in ops:
        if taking:
            assert space.take(value) == (value in model)
            model.discard(value)
        elif value not in model:
            space.give_back(value)
            model.add(value)
        assert space.members() == model
        for a, b in zip(space.ranges, space.ranges[1:], strict=False):
            assert a.last + 1 < b.first, "ranges must be disjoint and never adjacent"


@given(
    st.lists(st.tuples(st.integers(0, 200), st.integers(0, 40)), max_size=10),
)
def test_subtract_removes_exactly_the_holes(holes: list[tuple[int, int]]) -> None:
    whole = AddressRange(10, 150)
    blocks = [AddressRange(a, a + n) for a, n in holes]
    result = subtract(whole, blocks)
    expected = set(range(10, 151)) - {v for b in blocks for v in range(b.first, b.last + 1)}
    assert {v for r in result for v in range(r.first, r.last + 1)} == expected
