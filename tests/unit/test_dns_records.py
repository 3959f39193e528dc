"""Registrations become the DNS names of the spec: VM, group, SRV, PTR and block records."""

from __future__ import annotations

import ipaddress
import random

import dns.name
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vmfabric.domain.dns_records import (
    Registration,
    ZoneBuilder,
    ZoneChange,
    ZoneContent,
    blocked_txt,
    forward_zone,
    group_name,
    parse_blocked_txt,
    reverse_zone_name,
    reverse_zones,
)
from vmfabric.domain.errors import InvalidInput

ZONE = "vmfabric.test."

REGISTRATIONS = [
    Registration("web1", "hv1", "debian12", ("10.0.0.10", "fd00::10")),
    Registration("web2", "hv1", "debian12", ("10.0.0.11",)),
    Registration("cache", "hv1", "alpine", ("10.0.0.12", "fd00::12", "10.0.0.13")),
    Registration("db1", "hv2", "debian12", ("10.0.1.20",)),
    Registration("idle", "hv2", "debian12", ()),
]


def test_group_name_is_host_dash_image() -> None:
    assert group_name("hv1", "debian12") == "hv1-debian12"


def test_forward_zone_has_exactly_the_names_of_the_spec() -> None:
    zone = forward_zone("vmfabric.test", REGISTRATIONS, {})
    assert zone.origin == ZONE
    assert zone.records == {
        "_vmgroups._udp.hv1.vmfabric.test.": {
            "SRV": ("0 0 0 hv1-alpine.vmfabric.test.", "0 0 0 hv1-debian12.vmfabric.test.")
        },
        "_vmgroups._udp.hv2.vmfabric.test.": {"SRV": ("0 0 0 hv2-debian12.vmfabric.test.",)},
        "_vms._udp.hv1-alpine.vmfabric.test.": {"SRV": ("0 0 0 cache.vmfabric.test.",)},
        "_vms._udp.hv1-debian12.vmfabric.test.": {
            "SRV": ("0 0 0 web1.vmfabric.test.", "0 0 0 web2.vmfabric.test.")
        },
        "_vms._udp.hv2-debian12.vmfabric.test.": {
            "SRV": ("0 0 0 db1.vmfabric.test.", "0 0 0 idle.vmfabric.test.")
        },
        "cache.vmfabric.test.": {"A": ("10.0.0.12", "10.0.0.13"), "AAAA": ("fd00::12",)},
        "db1.vmfabric.test.": {"A": ("10.0.1.20",)},
        "hv1-alpine.vmfabric.test.": {"A": ("10.0.0.12", "10.0.0.13"), "AAAA": ("fd00::12",)},
        "hv1-debian12.vmfabric.test.": {"A": ("10.0.0.10", "10.0.0.11"), "AAAA": ("fd00::10",)},
        "hv2-debian12.vmfabric.test.": {"A": ("10.0.1.20",)},
        "web1.vmfabric.test.": {"A": ("10.0.0.10",), "AAAA": ("fd00::10",)},
        "web2.vmfabric.test.": {"A": ("10.0.0.11",)},
    }


def test_vm_without_addresses_is_a_group_member_without_a_name() -> None:
    records = forward_zone(ZONE, REGISTRATIONS, {}).records
    assert "idle.vmfabric.test." not in records
    assert "0 0 0 idle.vmfabric.test." in records["_vms._udp.hv2-debian12.vmfabric.test."]["SRV"]


def test_group_of_vms_without_addresses_has_srv_but_no_address() -> None:
    records = forward_zone(ZONE, [Registration("a", "hv1", "img", ())], {}).records
    assert records == {
        "_vmgroups._udp.hv1.vmfabric.test.": {"SRV": ("0 0 0 hv1-img.vmfabric.test.",)},
        "_vms._udp.hv1-img.vmfabric.test.": {"SRV": ("0 0 0 a.vmfabric.test.",)},
    }


def test_addresses_are_canonical_sorted_by_value_and_unique() -> None:
    registrations = [
        Registration("a", "hv1", "img", ("10.0.0.10", "FD00:0:0::0010", "10.0.0.9", "10.0.0.10")),
        Registration("b", "hv1", "img", ("10.0.0.9", "10.0.0.100")),
    ]
    records = forward_zone(ZONE, registrations, {}).records
    assert records["a.vmfabric.test."] == {"A": ("10.0.0.9", "10.0.0.10"), "AAAA": ("fd00::10",)}
    assert records["hv1-img.vmfabric.test."]["A"] == ("10.0.0.9", "10.0.0.10", "10.0.0.100")


def test_blocked_group_gets_a_txt_record_with_the_reason() -> None:
    records = forward_zone(ZONE, REGISTRATIONS, {"hv1-alpine": "CVE-2024-1234 found"}).records
    assert records["hv1-alpine.vmfabric.test."]["TXT"] == (
        '"vmfabric-blocked" "reason=CVE-2024-1234 found"',
    )
    assert "TXT" not in records["hv1-debian12.vmfabric.test."]


def test_block_of_a_group_without_members_is_visible_too() -> None:
    records = forward_zone(ZONE, [], {"hv7-win11": "quarantine"}).records
    assert records == {
        "hv7-win11.vmfabric.test.": {"TXT": ('"vmfabric-blocked" "reason=quarantine"',)}
    }


def test_block_keys_that_cannot_be_group_names_are_left_out() -> None:
    records = forward_zone(ZONE, [], {"Not A Label": "x", "a.b": "y", "": "z"}).records
    assert records == {}


@pytest.mark.parametrize(
    "reason",
    ['quote " and backslash \\', "é and emoji 🙂", "", "x" * 600, "tab\tnewline\n"],
)
def test_blocked_txt_is_valid_zone_text_and_gives_the_reason_back(reason: str) -> None:
    text = blocked_txt(reason)
    rdata = dns.rdata.from_text(dns.rdataclass.IN, dns.rdatatype.TXT, text)
    strings = rdata.strings  # type: ignore[attr-defined]
    assert strings[0] == b"vmfabric-blocked"
    assert strings[1].startswith(b"reason=")
    assert all(len(s) <= 255 for s in strings)
    assert parse_blocked_txt(strings) == reason


def test_parse_blocked_txt_refuses_other_records() -> None:
    assert parse_blocked_txt([b"v=spf1 -all"]) is None
    assert parse_blocked_txt([b"vmfabric-blocked", b"why=none"]) is None


def test_vm_named_like_a_group_shares_the_name() -> None:
    registrations = [
        Registration("hv1-debian12", "hv2", "alpine", ("10.0.0.99",)),
        Registration("web1", "hv1", "debian12", ("10.0.0.10",)),
    ]
    records = forward_zone(ZONE, registrations, {}).records
    assert records["hv1-debian12.vmfabric.test."]["A"] == ("10.0.0.10", "10.0.0.99")
    assert records["_vms._udp.hv1-debian12.vmfabric.test."]["SRV"] == ("0 0 0 web1.vmfabric.test.",)
    assert records["_vms._udp.hv2-alpine.vmfabric.test."]["SRV"] == (
        "0 0 0 hv1-debian12.vmfabric.test.",
    )


def test_group_name_longer_than_a_label_is_left_out() -> None:
    host, image = "h" * 40, "i" * 40
    records = forward_zone(ZONE, [Registration("vm1", host, image, ("10.0.0.1",))], {}).records
    assert records == {"vm1.vmfabric.test.": {"A": ("10.0.0.1",)}}


@pytest.mark.parametrize(
    "registration",
    [
        Registration("Bad_Name", "hv1", "img", ()),
        Registration("vm", "hv 1", "img", ()),
        Registration("vm", "hv1", "-img", ()),
        Registration("vm", "hv1", "img", ("10.0.0.300",)),
        Registration("vm", "hv1", "img", ("fe80::1%eth0",)),
    ],
)
def test_invalid_registrations_are_refused(registration: Registration) -> None:
    with pytest.raises(InvalidInput):
        forward_zone(ZONE, [registration], {})


@pytest.mark.parametrize(
    ("origin", "expected"),
    [("vmfabric.test", "vmfabric.test."), ("VMFabric.Test.", "vmfabric.test."), (".", ".")],
)
def test_origin_is_made_absolute_and_lower_case(origin: str, expected: str) -> None:
    assert forward_zone(origin, [], {}).origin == expected


def test_root_origin() -> None:
    records = forward_zone(".", [Registration("a", "h", "i", ("10.0.0.1",))], {}).records
    assert records["a."] == {"A": ("10.0.0.1",)}
    assert records["_vms._udp.h-i."] == {"SRV": ("0 0 0 a.",)}


# -- reverse zones -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cidr", "zone"),
    [
        ("10.0.0.0/24", "0.0.10.in-addr.arpa."),
        ("10.0.0.0/20", "0.10.in-addr.arpa."),
        ("10.0.16.0/20", "0.10.in-addr.arpa."),
        ("10.1.2.64/26", "2.1.10.in-addr.arpa."),
        ("192.168.0.0/16", "168.192.in-addr.arpa."),
        ("172.16.0.0/12", "172.in-addr.arpa."),
        ("10.0.0.7/32", "7.0.0.10.in-addr.arpa."),
        ("10.0.0.0/7", "in-addr.arpa."),
        ("2001:db8::/32", "8.b.d.0.1.0.0.2.ip6.arpa."),
        ("2001:db8::/62", "0.0.0.0.0.0.0.8.b.d.0.1.0.0.2.ip6.arpa."),
        ("2001:db8:0:1::/64", "1.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2.ip6.arpa."),
        ("fc00::/7", "f.ip6.arpa."),
    ],
)
def test_reverse_zone_name_rounds_the_prefix_down(cidr: str, zone: str) -> None:
    assert reverse_zone_name(ipaddress.ip_network(cidr)) == zone


def test_reverse_zones_have_a_ptr_per_address_inside_the_networks() -> None:
    zones = reverse_zones("vmfabric.test", ["10.0.0.0/24", "fd00::/64"], REGISTRATIONS)
    assert [z.origin for z in zones] == [
        "0.0.0.0.0.0.0.0.0.0.0.0.0.0.d.f.ip6.arpa.",
        "0.0.10.in-addr.arpa.",
    ]
    ip6, ip4 = zones
    assert ip4.records == {
        "10.0.0.10.in-addr.arpa.": {"PTR": ("web1.vmfabric.test.",)},
        "11.0.0.10.in-addr.arpa.": {"PTR": ("web2.vmfabric.test.",)},
        "12.0.0.10.in-addr.arpa.": {"PTR": ("cache.vmfabric.test.",)},
        "13.0.0.10.in-addr.arpa.": {"PTR": ("cache.vmfabric.test.",)},
    }  # 10.0.1.20 is outside 10.0.0.0/24
    pointer = "0.1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.d.f.ip6.arpa."
    assert ip6.records[pointer] == {"PTR": ("web1.vmfabric.test.",)}
    assert len(ip6.records) == 2


def test_addresses_in_the_zone_but_outside_the_networks_get_no_ptr() -> None:
    registrations = [Registration("a", "h", "i", ("10.0.0.1", "10.0.99.1"))]
    (zone,) = reverse_zones(ZONE, ["10.0.0.0/20"], registrations)
    assert zone.origin == "0.10.in-addr.arpa."
    assert list(zone.records) == ["1.0.0.10.in-addr.arpa."]


def test_networks_of_one_zone_share_it_and_nested_zones_are_merged() -> None:
    registrations = [Registration("a", "h", "i", ("10.0.0.1", "10.0.17.1", "10.0.5.9"))]
    (shared,) = reverse_zones(ZONE, ["10.0.0.0/20", "10.0.16.0/20"], registrations)
    assert shared.origin == "0.10.in-addr.arpa."
    assert set(shared.records) == {
        "1.0.0.10.in-addr.arpa.",
        "9.5.0.10.in-addr.arpa.",
        "1.17.0.10.in-addr.arpa.",
    }
    (outer,) = reverse_zones(ZONE, ["10.0.0.0/16", "10.0.5.0/24"], registrations)
    assert outer.origin == "0.10.in-addr.arpa."
    assert "9.5.0.10.in-addr.arpa." in outer.records


def test_reverse_zone_without_registrations_is_still_listed() -> None:
    assert reverse_zones(ZONE, ["10.9.0.0/24"], REGISTRATIONS) == [
        ZoneContent("0.9.10.in-addr.arpa.", {})
    ]


def test_one_address_of_two_vms_gets_both_targets() -> None:
    registrations = [
        Registration("a", "h", "i", ("10.0.0.1",)),
        Registration("b", "h", "i", ("10.0.0.1",)),
    ]
    (zone,) = reverse_zones(ZONE, ["10.0.0.0/24"], registrations)
    assert zone.records["1.0.0.10.in-addr.arpa."] == {
        "PTR": ("a.vmfabric.test.", "b.vmfabric.test.")
    }


def test_bad_network_is_refused() -> None:
    with pytest.raises(InvalidInput, match="invalid network"):
        reverse_zones(ZONE, ["10.0.0.0/33"], [])


# -- properties ----------------------------------------------------------------------------

_HOSTS = st.sampled_from(["h1", "h2", "h3"])
_IMAGES = st.sampled_from(["debian12", "alpine", "win11"])
_IPV4 = st.integers(0, 2**16 - 1).map(lambda n: str(ipaddress.IPv4Address(0x0A000000 + n)))
_IPV6 = st.integers(0, 2**64 - 1).map(lambda n: str(ipaddress.IPv6Address((0xFD00 << 112) + n)))
_REGISTRATIONS = st.lists(
    st.builds(
        Registration,
        vm=st.from_regex(r"vm[a-z0-9]{0,6}", fullmatch=True),
        host=_HOSTS,
        image=_IMAGES,
        addresses=st.lists(_IPV4 | _IPV6, max_size=4).map(tuple),
    ),
    max_size=25,
    unique_by=lambda r: r.vm,
)
_CIDRS = ["10.0.0.0/16", "fd00::/64"]


def _addresses(records: ZoneContent, owner: str) -> set[str]:
    types = records.records.get(owner, {})
    return {*types.get("A", ()), *types.get("AAAA", ())}


def _canonical(text: str) -> str:
    return str(ipaddress.ip_address(text))


@given(_REGISTRATIONS)
def test_every_address_is_under_its_vm_its_group_and_one_ptr(
    registrations: list[Registration],
) -> None:
    forward = forward_zone(ZONE, registrations, {})
    reverse = reverse_zones(ZONE, _CIDRS, registrations)
    pointers: dict[str, set[str]] = {}
    for zone in reverse:
        for owner, types in zone.records.items():
            assert owner not in pointers  # each address in one zone only
            pointers[owner] = set(types["PTR"])
    for registration in registrations:
        vm = f"{registration.vm}.{ZONE}"
        group = f"{group_name(registration.host, registration.image)}.{ZONE}"
        for address in map(_canonical, registration.addresses):
            assert address in _addresses(forward, vm)
            assert address in _addresses(forward, group)
            owner = ipaddress.ip_address(address).reverse_pointer + "."
            assert vm in pointers[owner]


@given(_REGISTRATIONS)
def test_group_sets_are_exactly_the_union_of_their_vms(registrations: list[Registration]) -> None:
    forward = forward_zone(ZONE, registrations, {})
    groups: dict[str, set[str]] = {}
    members: dict[str, set[str]] = {}
    hosts: dict[str, set[str]] = {}
    for r in registrations:
        group = group_name(r.host, r.image)
        groups.setdefault(group, set()).update(map(_canonical, r.addresses))
        members.setdefault(group, set()).add(f"0 0 0 {r.vm}.{ZONE}")
        hosts.setdefault(r.host, set()).add(f"0 0 0 {group}.{ZONE}")
    for group, addresses in groups.items():
        assert _addresses(forward, f"{group}.{ZONE}") == addresses
        assert set(forward.records[f"_vms._udp.{group}.{ZONE}"]["SRV"]) == members[group]
    for host, srv in hosts.items():
        assert set(forward.records[f"_vmgroups._udp.{host}.{ZONE}"]["SRV"]) == srv
    for r in registrations:
        assert _addresses(forward, f"{r.vm}.{ZONE}") == set(map(_canonical, r.addresses))
    srv_owners = {o for o in forward.records if o.startswith("_")}
    assert len(srv_owners) == len(groups) + len(hosts)  # nothing else


@given(_REGISTRATIONS, st.dictionaries(st.sampled_from(["h1-alpine", "h2-win11"]), st.text()))
def test_records_are_sorted_unique_inside_the_zone_and_valid_dns(
    registrations: list[Registration], blocked: dict[str, str]
) -> None:
    origin = dns.name.from_text(ZONE)
    for zone in [
        forward_zone(ZONE, registrations, blocked),
        *reverse_zones(ZONE, _CIDRS, registrations),
    ]:
        zone_origin = dns.name.from_text(zone.origin)
        for owner, types in zone.records.items():
            assert types  # no name without records
            assert dns.name.from_text(owner).is_subdomain(zone_origin)
            for rdtype, texts in types.items():
                assert len(set(texts)) == len(texts)
                if rdtype in {"A", "AAAA"}:
                    assert list(texts) == sorted(texts, key=lambda t: int(ipaddress.ip_address(t)))
                else:
                    assert list(texts) == sorted(texts)
                for text in texts:
                    kind = dns.rdatatype.from_text(rdtype)
                    dns.rdata.from_text(dns.rdataclass.IN, kind, text, origin=origin)
    for group, reason in blocked.items():
        (text,) = forward_zone(ZONE, registrations, blocked).records[f"{group}.{ZONE}"]["TXT"]
        rdata = dns.rdata.from_text(dns.rdataclass.IN, dns.rdatatype.TXT, text)
        assert parse_blocked_txt(rdata.strings) == reason  # type: ignore[attr-defined]


@settings(max_examples=50)
@given(_REGISTRATIONS, st.randoms(use_true_random=False))
def test_order_of_registrations_does_not_matter(
    registrations: list[Registration], rng: random.Random
) -> None:
    shuffled = list(registrations)
    rng.shuffle(shuffled)
    assert forward_zone(ZONE, shuffled, {}) == forward_zone(ZONE, registrations, {})
    assert reverse_zones(ZONE, _CIDRS, shuffled) == reverse_zones(ZONE, _CIDRS, registrations)


@given(st.lists(st.integers(0, 32), min_size=1, max_size=4), st.integers(0, 2**32 - 1))
def test_reverse_zone_of_a_network_contains_it(prefixes: list[int], base: int) -> None:
    for prefix in prefixes:
        network = ipaddress.IPv4Network((base, prefix), strict=False)
        zone = dns.name.from_text(reverse_zone_name(network))
        for address in (network.network_address, network.broadcast_address):
            pointer = dns.name.from_text(address.reverse_pointer + ".")
            assert pointer.is_subdomain(zone)
        assert (len(zone) - 3) == prefix // 8  # labels: octets, in-addr, arpa, root


# -- incremental building ------------------------------------------------------------------

_OPERATIONS = st.lists(
    st.one_of(
        _REGISTRATIONS.map(lambda rs: ("put", rs)),
        st.lists(st.from_regex(r"vm[a-z0-9]{0,6}", fullmatch=True), max_size=5).map(
            lambda vms: ("remove", vms)
        ),
        st.tuples(st.sampled_from(["h1-alpine", "h2-win11", "h9-x"]), st.text(max_size=20)).map(
            lambda block: ("block", block)
        ),
        st.sampled_from(["h1-alpine", "h2-win11", "h9-x"]).map(lambda g: ("unblock", g)),
    ),
    max_size=8,
)


def _apply(served: dict[str, dict[tuple[str, str], tuple[str, ...]]], change: ZoneChange) -> None:
    for key, texts in change.records.items():
        if texts:
            served[change.origin][key] = texts
        else:
            del served[change.origin][key]  # a set reported gone was there


def _flat(zones: list[ZoneContent]) -> dict[str, dict[tuple[str, str], tuple[str, ...]]]:
    return {
        zone.origin: {
            (owner, rdtype): texts
            for owner, types in zone.records.items()
            for rdtype, texts in types.items()
        }
        for zone in zones
    }


@settings(max_examples=150)
@given(_OPERATIONS)
def test_changes_applied_one_by_one_give_the_zones_built_at_once(operations: list) -> None:
    """What a server sees through `changes` is always what a fresh build would give."""
    builder = ZoneBuilder(ZONE, _CIDRS)
    served = _flat(builder.contents())
    registered: dict[str, Registration] = {}
    blocked: dict[str, str] = {}
    for kind, argument in operations:
        if kind == "put":
            for registration in argument:
                builder.put(registration)
                registered[registration.vm] = registration
        elif kind == "remove":
            for vm in argument:
                builder.remove(vm)
                registered.pop(vm, None)
        elif kind == "block":
            builder.block(*argument)
            blocked[argument[0]] = argument[1]
        else:
            builder.unblock(argument)
            blocked.pop(argument, None)
        for change in builder.changes():
            _apply(served, change)
        fresh = [
            forward_zone(ZONE, registered.values(), blocked),
            *reverse_zones(ZONE, _CIDRS, registered.values()),
        ]
        assert served == _flat(fresh)
        assert builder.contents() == fresh
    assert builder.vms() == set(registered)


def test_changes_name_only_the_sets_that_changed() -> None:
    builder = ZoneBuilder(ZONE, ["10.0.0.0/24"])
    for registration in REGISTRATIONS:
        builder.put(registration)
    builder.changes()
    builder.put(Registration("web2", "hv1", "debian12", ("10.0.0.99",)))
    (forward, reverse) = builder.changes()
    assert forward.records == {
        (f"web2.{ZONE}", "A"): ("10.0.0.99",),
        (f"hv1-debian12.{ZONE}", "A"): ("10.0.0.10", "10.0.0.99"),
    }
    assert reverse.records == {
        ("11.0.0.10.in-addr.arpa.", "PTR"): (),
        ("99.0.0.10.in-addr.arpa.", "PTR"): (f"web2.{ZONE}",),
    }
    builder.put(Registration("web2", "hv1", "debian12", ("10.0.0.99",)))
    assert builder.changes() == []


def test_a_refused_registration_changes_nothing() -> None:
    builder = ZoneBuilder(ZONE, [])
    builder.put(REGISTRATIONS[0])
    builder.changes()
    with pytest.raises(InvalidInput):
        builder.put(Registration("web1", "hv1", "debian12", ("not-an-address",)))
    assert builder.changes() == []
    assert builder.registration("web1") == REGISTRATIONS[0]
