"""Quarantine rules: cookies, allowed networks, and what the compiled rules match (properties)."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vmfabric.domain.errors import InvalidInput
from vmfabric.domain.quarantine import (
    ALLOW_PRIORITY,
    DROP_PRIORITY,
    QUARANTINE_KIND,
    QUARANTINE_MASK,
    QuarantinedNic,
    parse_allowed,
    quarantine_cookie,
    quarantine_flows,
)

MAX_VM_ID = (1 << 48) - 1


@dataclass(frozen=True)
class Rule:
    """One compiled flow text, taken apart."""

    cookie: int
    priority: int
    match: frozenset[str]
    actions: str

    @classmethod
    def parse(cls, flow: str) -> Rule:
        head, actions = flow.split(",actions=")
        fields = head.split(",")
        cookie, priority = fields[0], fields[1]
        assert cookie.startswith("cookie=0x")
        assert priority.startswith("priority=")
        return cls(
            cookie=int(cookie.removeprefix("cookie="), 16),
            priority=int(priority.removeprefix("priority=")),
            match=frozenset(fields[2:]),
            actions=actions,
        )

    def allows(self, *terms: str) -> bool:
        return self.actions == "NORMAL" and self.match == frozenset(terms)


def rules(nic: QuarantinedNic, allowed: tuple[str, ...] = ()) -> list[Rule]:
    return [Rule.parse(flow) for flow in quarantine_flows(nic, allowed)]


def sources(nic: QuarantinedNic) -> list[str]:
    """The matches of traffic the NIC sends."""
    mac = f"dl_src={nic.mac.lower()}"
    return [mac] if nic.ofport is None else [mac, f"in_port={nic.ofport}"]


macs = st.binary(min_size=6, max_size=6).map(lambda raw: ":".join(f"{b:02x}" for b in raw))
nics = st.builds(
    QuarantinedNic,
    vm_id=st.integers(1, MAX_VM_ID),
    mac=macs,
    ofport=st.none() | st.integers(1, 0xFEFF),
)
ipv4_networks = st.builds(
    lambda address, prefix: str(ipaddress.ip_network(f"{address}/{prefix}", strict=False)),
    st.ip_addresses(v=4),
    st.integers(0, 32),
)
ipv6_networks = st.builds(
    lambda address, prefix: str(ipaddress.ip_network(f"{address}/{prefix}", strict=False)),
    st.ip_addresses(v=6),
    st.integers(0, 128),
)
allowed_lists = st.lists(ipv4_networks | ipv6_networks, max_size=4).map(parse_allowed)


@given(st.integers(1, MAX_VM_ID))
def test_a_cookie_names_the_kind_and_the_vm(vm_id: int) -> None:
    cookie = quarantine_cookie(vm_id)
    assert cookie >> 48 == QUARANTINE_KIND
    assert cookie & MAX_VM_ID == vm_id
    assert cookie & QUARANTINE_MASK == QUARANTINE_KIND << 48
    assert cookie < 1 << 64


def test_cookie_of_a_known_vm() -> None:
    assert quarantine_cookie(5) == 0x0B10_0000_0000_0005


@pytest.mark.parametrize("vm_id", [0, -1, 1 << 48, 1 << 64])
def test_ids_outside_48_bits_are_refused(vm_id: int) -> None:
    with pytest.raises(InvalidInput, match=f"VM id {vm_id} does not fit in a cookie"):
        quarantine_cookie(vm_id)
    with pytest.raises(InvalidInput):
        quarantine_flows(QuarantinedNic(vm_id, "52:54:00:00:00:01"))


def test_allowed_networks_are_canonical_and_unique_in_order() -> None:
    assert parse_allowed(
        [" 10.0.0.5 ", "10.0.0.7/24", "fd00::1/64", "10.0.0.0/24", "2001:db8::1"]
    ) == (
        "10.0.0.5/32",
        "10.0.0.0/24",
        "fd00::/64",
        "2001:db8::1/128",
    )
    assert parse_allowed([]) == ()


@pytest.mark.parametrize("text", ["", "patch-server", "10.0.0.0/33", "10.0.0.256", "fd00::/129"])
def test_a_bad_allowed_network_is_refused_by_name(text: str) -> None:
    with pytest.raises(InvalidInput) as caught:
        parse_allowed(["10.0.0.0/24", text, "also bad"])
    assert caught.value.detail == (
        f"invalid allowed network {text!r}: expected an address or CIDR like "
        "10.0.0.5 or 10.0.0.0/24"
    )


@given(st.lists(ipv4_networks | ipv6_networks, max_size=6))
def test_parsing_allowed_networks_is_idempotent(texts: list[str]) -> None:
    once = parse_allowed(texts)
    assert parse_allowed(once) == once
    assert set(once) == set(texts)


@given(nics, allowed_lists)
def test_every_rule_carries_the_vm_cookie_and_a_match_on_the_nic(
    nic: QuarantinedNic, allowed: tuple[str, ...]
) -> None:
    own = {*sources(nic), f"dl_dst={nic.mac}"}
    for rule in rules(nic, allowed):
        assert rule.cookie == quarantine_cookie(nic.vm_id)
        assert rule.match & own, f"{rule} would touch other VMs' traffic"


@given(nics, allowed_lists)
def test_allow_rules_outrank_the_three_drop_rules(
    nic: QuarantinedNic, allowed: tuple[str, ...]
) -> None:
    compiled = rules(nic, allowed)
    drops = [rule for rule in compiled if rule.actions == "drop"]
    assert {rule.priority for rule in drops} == {DROP_PRIORITY}
    assert sorted(rule.match for rule in drops) == sorted(
        frozenset([match]) for match in [*sources(nic), f"dl_dst={nic.mac}"]
    )
    allows = [rule for rule in compiled if rule.actions != "drop"]
    assert all(rule.actions == "NORMAL" and rule.priority == ALLOW_PRIORITY for rule in allows)
    assert ALLOW_PRIORITY > DROP_PRIORITY


@given(nics, allowed_lists)
def test_dhcp_client_traffic_passes_both_ways(
    nic: QuarantinedNic, allowed: tuple[str, ...]
) -> None:
    compiled = rules(nic, allowed)
    received = f"dl_dst={nic.mac}"
    for source in sources(nic):
        assert any(rule.allows(source, "udp", "tp_src=68", "tp_dst=67") for rule in compiled)
        assert any(rule.allows(source, "udp6", "tp_src=546", "tp_dst=547") for rule in compiled)
    assert any(rule.allows(received, "udp", "tp_src=67", "tp_dst=68") for rule in compiled)
    assert any(rule.allows(received, "udp6", "tp_src=547", "tp_dst=546") for rule in compiled)


@given(nics)
def test_no_dhcp_server_traffic_passes(nic: QuarantinedNic) -> None:
    for rule in rules(nic, ()):
        if rule.match & set(sources(nic)):
            assert "tp_src=67" not in rule.match
            assert "tp_src=547" not in rule.match


@given(nics, allowed_lists)
def test_allowed_networks_pass_both_ways(nic: QuarantinedNic, allowed: tuple[str, ...]) -> None:
    compiled = rules(nic, allowed)
    for text in allowed:
        network = ipaddress.ip_network(text)
        kind, field = ("ip", "nw") if network.version == 4 else ("ipv6", "ipv6")
        for source in sources(nic):
            assert any(rule.allows(source, kind, f"{field}_dst={text}") for rule in compiled)
        assert any(
            rule.allows(f"dl_dst={nic.mac}", kind, f"{field}_src={text}") for rule in compiled
        )


@given(nics, allowed_lists)
def test_address_resolution_passes_only_for_the_allowed_ip_versions(
    nic: QuarantinedNic, allowed: tuple[str, ...]
) -> None:
    versions = {ipaddress.ip_network(text).version for text in allowed}
    terms = {term for rule in rules(nic, allowed) for term in rule.match}
    assert ("arp" in terms) == (4 in versions)
    assert ("icmp_type=135" in terms) == (6 in versions)
    assert ("icmp_type=136" in terms) == (6 in versions)


@given(nics, allowed_lists)
def test_the_rule_count_follows_from_sources_and_networks(
    nic: QuarantinedNic, allowed: tuple[str, ...]
) -> None:
    versions = {ipaddress.ip_network(text).version for text in allowed}
    per_direction = 2 + len(allowed) + (4 in versions) + 2 * (6 in versions) + 1
    assert len(quarantine_flows(nic, allowed)) == (len(sources(nic)) + 1) * per_direction


def test_without_a_port_no_rule_matches_in_port() -> None:
    flows = quarantine_flows(QuarantinedNic(7, "52:54:00:00:00:07"), ("10.9.0.0/24",))
    assert not [flow for flow in flows if "in_port" in flow]
    assert any("dl_src=52:54:00:00:00:07" in flow for flow in flows)


def test_the_port_is_matched_when_known() -> None:
    compiled = rules(QuarantinedNic(7, "52:54:00:00:00:07", ofport=12))
    assert Rule(quarantine_cookie(7), DROP_PRIORITY, frozenset(["in_port=12"]), "drop") in compiled
    assert any(rule.allows("in_port=12", "udp", "tp_src=68", "tp_dst=67") for rule in compiled)


def test_macs_are_matched_in_lower_case_colon_form() -> None:
    flows = quarantine_flows(QuarantinedNic(1, "52-54-00-AB-CD-EF"))
    assert all("52:54:00:ab:cd:ef" in flow for flow in flows)


def test_a_bad_mac_is_refused() -> None:
    with pytest.raises(InvalidInput, match="invalid MAC address 'nope'"):
        quarantine_flows(QuarantinedNic(1, "nope"))


def test_the_flows_of_one_nic_exactly() -> None:
    assert quarantine_flows(QuarantinedNic(1, "52:54:00:00:00:01", 3), ("10.9.0.0/24",)) == [
        "cookie=0x0b10000000000001,priority=40100,dl_src=52:54:00:00:00:01,udp,tp_src=68,tp_dst=67,actions=NORMAL",
        "cookie=0x0b10000000000001,priority=40100,dl_src=52:54:00:00:00:01,udp6,tp_src=546,tp_dst=547,actions=NORMAL",
        "cookie=0x0b10000000000001,priority=40100,dl_src=52:54:00:00:00:01,ip,nw_dst=10.9.0.0/24,actions=NORMAL",
        "cookie=0x0b10000000000001,priority=40100,dl_src=52:54:00:00:00:01,arp,actions=NORMAL",
        "cookie=0x0b10000000000001,priority=40000,dl_src=52:54:00:00:00:01,actions=drop",
        "cookie=0x0b10000000000001,priority=40100,in_port=3,udp,tp_src=68,tp_dst=67,actions=NORMAL",
        "cookie=0x0b10000000000001,priority=40100,in_port=3,udp6,tp_src=546,tp_dst=547,actions=NORMAL",
        "cookie=0x0b10000000000001,priority=40100,in_port=3,ip,nw_dst=10.9.0.0/24,actions=NORMAL",
        "cookie=0x0b10000000000001,priority=40100,in_port=3,arp,actions=NORMAL",
        "cookie=0x0b10000000000001,priority=40000,in_port=3,actions=drop",
        "cookie=0x0b10000000000001,priority=40100,dl_dst=52:54:00:00:00:01,udp,tp_src=67,tp_dst=68,actions=NORMAL",
        "cookie=0x0b10000000000001,priority=40100,dl_dst=52:54:00:00:00:01,udp6,tp_src=547,tp_dst=546,actions=NORMAL",
        "cookie=0x0b10000000000001,priority=40100,dl_dst=52:54:00:00:00:01,ip,nw_src=10.9.0.0/24,actions=NORMAL",
        "cookie=0x0b10000000000001,priority=40100,dl_dst=52:54:00:00:00:01,arp,actions=NORMAL",
        "cookie=0x0b10000000000001,priority=40000,dl_dst=52:54:00:00:00:01,actions=drop",
    ]
