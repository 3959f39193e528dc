"""The authoritative DNS server, asked by the real `dig` (bind9-dnsutils) on loopback.

The server runs on its own thread and event loop (`ServerThread`), on 127.0.0.1 and a port the
kernel picks; the tests publish zones from the test's thread, as the controller will.
"""

from __future__ import annotations

import base64
import io
import logging
import random
import re
import shutil
import socket
import struct
import subprocess
import time
from collections.abc import Iterator, Sequence

import dns.flags
import dns.message
import dns.opcode
import dns.query
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rdtypes.ANY.TSIG
import dns.rrset
import dns.tsig
import dns.update
import pytest

from vmfabric.dns.server import DnsServer, ServerThread
from vmfabric.domain.dns_records import (
    Registration,
    ZoneBuilder,
    ZoneChange,
    ZoneContent,
    forward_zone,
    reverse_zones,
)

pytestmark = pytest.mark.skipif(shutil.which("dig") is None, reason="needs dig (bind9-dnsutils)")

ZONE = "vmfabric.test."
CIDRS = ["10.0.0.0/20", "fd00::/64", "10.1.0.0/16"]
SECRET = base64.b64encode(b"vmfabric-transfer-key-0123456789").decode()
OTHER_SECRET = base64.b64encode(b"some-other-key-0123456789abcdefg").decode()
TRANSFER_KEY = f"hmac-sha256:xfr-key:{SECRET}"

REGISTRATIONS = [
    Registration("vm-a", "hv1", "debian12", ("10.0.0.10", "fd00::10")),
    Registration("vm-b", "hv1", "debian12", ("10.0.0.11",)),
    Registration("vm-c", "hv1", "alpine", ("10.0.0.12", "fd00::12")),
    Registration("vm-d", "hv2", "debian12", ("10.0.1.20",)),
    Registration("vm-e", "hv2", "debian12", ()),
]
BLOCKED = {"hv1-alpine": "infected by worm"}


def zones(
    registrations: Sequence[Registration] = REGISTRATIONS,
    blocked: dict[str, str] | None = None,
) -> list[ZoneContent]:
    blocked = BLOCKED if blocked is None else blocked
    return [
        forward_zone(ZONE, registrations, blocked),
        *reverse_zones(ZONE, CIDRS, registrations),
    ]


@pytest.fixture
def server() -> Iterator[DnsServer]:
    """A started server with the test zones; transfers need the `xfr-key` TSIG key."""
    dns_server = DnsServer(
        ("127.0.0.1", 0),
        tsig_keys={"xfr-key": ("hmac-sha256", SECRET), "other-key": ("hmac-sha256", OTHER_SECRET)},
        transfer_key="xfr-key",
    )
    dns_server.publish(zones())
    with ServerThread(dns_server) as running:
        yield running


def dig(server: DnsServer, *args: str) -> str:
    result = subprocess.run(
        ["dig", "@127.0.0.1", "-p", str(server.port), "+time=3", "+tries=1", *args],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    return result.stdout


def short(server: DnsServer, *args: str) -> set[str]:
    return {line for line in dig(server, "+short", *args).splitlines() if line}


def status(output: str) -> str:
    found = re.search(r"status: (\w+)", output)
    assert found, output
    return found.group(1)


def flags(output: str) -> set[str]:
    found = re.search(r";; flags: ([a-z ]*);", output)
    assert found, output
    return set(found.group(1).split())


def section(output: str, name: str) -> list[str]:
    """Record lines of one section of dig's full output (`ANSWER`, `AUTHORITY`, ...)."""
    lines = output.splitlines()
    try:
        start = lines.index(f";; {name} SECTION:") + 1
    except ValueError:
        return []
    taken = []
    for line in lines[start:]:
        if not line.strip():
            break
        taken.append(line)
    return taken


def records(output: str) -> list[list[str]]:
    """The records of a transfer's output, each split in fields (comments left out)."""
    return [line.split() for line in output.splitlines() if line and not line.startswith(";")]


def soa_serial(server: DnsServer, zone: str = ZONE) -> int:
    (line,) = short(server, zone, "SOA")
    return int(line.split()[2])


def tsig_key() -> dns.tsig.Key:
    return dns.tsig.Key("xfr-key", SECRET, "hmac-sha256")


# -- names of the spec ---------------------------------------------------------------------


def test_vm_names_resolve_to_their_addresses(server: DnsServer) -> None:
    assert short(server, "vm-a.vmfabric.test", "A") == {"10.0.0.10"}
    assert short(server, "vm-a.vmfabric.test", "AAAA") == {"fd00::10"}
    assert short(server, "vm-d.vmfabric.test") == {"10.0.1.20"}
    output = dig(server, "vm-b.vmfabric.test", "A")
    assert status(output) == "NOERROR"
    assert "aa" in flags(output)


def test_group_names_resolve_to_every_address_of_the_group(server: DnsServer) -> None:
    assert short(server, "hv1-debian12.vmfabric.test", "A") == {"10.0.0.10", "10.0.0.11"}
    assert short(server, "hv1-debian12.vmfabric.test", "AAAA") == {"fd00::10"}
    assert short(server, "hv1-alpine.vmfabric.test", "A") == {"10.0.0.12"}
    assert short(server, "hv2-debian12.vmfabric.test", "A") == {"10.0.1.20"}


def test_srv_records_map_hosts_to_groups_and_groups_to_vms(server: DnsServer) -> None:
    assert short(server, "_vmgroups._udp.hv1.vmfabric.test", "SRV") == {
        "0 0 0 hv1-alpine.vmfabric.test.",
        "0 0 0 hv1-debian12.vmfabric.test.",
    }
    assert short(server, "_vmgroups._udp.hv2.vmfabric.test", "SRV") == {
        "0 0 0 hv2-debian12.vmfabric.test."
    }
    assert short(server, "_vms._udp.hv1-debian12.vmfabric.test", "SRV") == {
        "0 0 0 vm-a.vmfabric.test.",
        "0 0 0 vm-b.vmfabric.test.",
    }
    # a VM without an address is still a member of its group
    assert short(server, "_vms._udp.hv2-debian12.vmfabric.test", "SRV") == {
        "0 0 0 vm-d.vmfabric.test.",
        "0 0 0 vm-e.vmfabric.test.",
    }


def test_reverse_lookups_name_the_vm(server: DnsServer) -> None:
    assert short(server, "-x", "10.0.0.10") == {"vm-a.vmfabric.test."}
    assert short(server, "-x", "10.0.1.20") == {"vm-d.vmfabric.test."}
    assert short(server, "-x", "fd00::12") == {"vm-c.vmfabric.test."}
    unknown = dig(server, "-x", "10.0.0.99")
    assert status(unknown) == "NXDOMAIN"
    assert "aa" in flags(unknown)


def test_blocked_group_has_a_txt_record(server: DnsServer) -> None:
    assert short(server, "hv1-alpine.vmfabric.test", "TXT") == {
        '"vmfabric-blocked" "reason=infected by worm"'
    }
    assert short(server, "hv1-debian12.vmfabric.test", "TXT") == set()


def test_names_are_case_insensitive(server: DnsServer) -> None:
    assert short(server, "VM-A.VmFabric.TEST", "A") == {"10.0.0.10"}


def test_query_in_another_case_gets_its_own_question_back(server: DnsServer) -> None:
    """Resolvers check the case of the question they sent (0x20): the answer cache keeps it."""
    names = [
        "vm-a.vmfabric.test.",
        "Vm-A.VMfabric.tEst.",
        "Vm-A.VMfabric.tEst.",
        "VM-A.VMFABRIC.TEST.",
    ]
    for name in [*names, *reversed(names)]:
        query = dns.message.make_query(name, "A")
        response = dns.query.udp(query, "127.0.0.1", port=server.port, timeout=3)
        assert response.id == query.id
        assert (response.wire or b"")[12 : 12 + len(name) + 1] == query.to_wire()[
            12 : 12 + len(name) + 1
        ]
        assert [rdata.to_text() for rdata in response.answer[0]] == ["10.0.0.10"]


def test_soa_and_ns_at_the_apex(server: DnsServer) -> None:
    assert short(server, "vmfabric.test", "NS") == {"ns.vmfabric.test."}
    assert short(server, "ns.vmfabric.test", "A") == {"127.0.0.1"}
    output = dig(server, "vmfabric.test", "NS")
    assert any("127.0.0.1" in line for line in section(output, "ADDITIONAL"))
    (soa,) = short(server, "vmfabric.test", "SOA")
    assert soa.startswith("ns.vmfabric.test. hostmaster.vmfabric.test. ")


# -- negative answers ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    ["nothing.vmfabric.test", "vm-a.nothing.vmfabric.test", "vm-e.vmfabric.test"],
)
def test_nxdomain_for_names_that_do_not_exist(server: DnsServer, name: str) -> None:
    output = dig(server, name, "A")
    assert status(output) == "NXDOMAIN"
    assert "aa" in flags(output)
    assert section(output, "ANSWER") == []
    (authority,) = section(output, "AUTHORITY")
    assert authority.split()[0] == "vmfabric.test." and "SOA" in authority.split()


@pytest.mark.parametrize(
    ("name", "rdtype"),
    [
        ("hv1.vmfabric.test", "A"),  # empty non-terminal (below it: _vmgroups._udp.hv1)
        ("_udp.hv1.vmfabric.test", "SRV"),  # empty non-terminal
        ("_udp.hv1-debian12.vmfabric.test", "A"),  # empty non-terminal
        ("vm-a.vmfabric.test", "TXT"),  # the name has records, not this type
        ("vm-b.vmfabric.test", "AAAA"),
        ("vmfabric.test", "A"),
        ("0.10.in-addr.arpa", "PTR"),
    ],
)
def test_nodata_for_names_that_exist(server: DnsServer, name: str, rdtype: str) -> None:
    output = dig(server, name, rdtype)
    assert status(output) == "NOERROR"
    assert "aa" in flags(output)
    assert section(output, "ANSWER") == []
    (authority,) = section(output, "AUTHORITY")
    fields = authority.split()
    assert fields[3] == "SOA"
    assert int(fields[1]) <= 5  # negative TTL: min(SOA TTL, SOA minimum)


def test_refused_outside_every_zone(server: DnsServer) -> None:
    for name in ["example.com", "test", "vmfabric.example"]:
        output = dig(server, name, "A")
        assert status(output) == "REFUSED"
        assert "aa" not in flags(output)
    assert status(dig(server, "-x", "192.168.1.1")) == "REFUSED"
    assert status(dig(server, "-c", "CH", "version.bind", "TXT")) == "REFUSED"


def test_other_opcodes_are_not_implemented(server: DnsServer) -> None:
    update = dns.update.UpdateMessage("vmfabric.test")
    update.add("new", 5, "A", "10.0.0.1")
    response = dns.query.udp(update, "127.0.0.1", port=server.port, timeout=3)
    assert response.rcode() == dns.rcode.NOTIMP
    assert short(server, "new.vmfabric.test") == set()


# -- sizes: EDNS, truncation, TCP ----------------------------------------------------------


def test_edns_is_echoed_with_our_size(server: DnsServer) -> None:
    output = dig(server, "+bufsize=4096", "vm-a.vmfabric.test")
    assert "; EDNS: version: 0, flags:; udp: 1232" in output
    assert "OPT PSEUDOSECTION" not in dig(server, "+noedns", "vm-a.vmfabric.test")
    dnssec = dig(server, "+dnssec", "vm-a.vmfabric.test")
    assert "; EDNS: version: 0, flags: do; udp: 1232" in dnssec


def test_edns_version_other_than_zero_gets_badvers(server: DnsServer) -> None:
    output = dig(server, "+edns=1", "+noednsnegotiation", "vm-a.vmfabric.test")
    assert status(output) == "BADVERS"
    assert section(output, "ANSWER") == []


def test_udp_size_of_the_client_decides_truncation(server: DnsServer) -> None:
    small = [Registration(f"s{i}", "hv3", "small", (f"10.0.2.{i + 1}",)) for i in range(40)]
    server.publish(zones([*REGISTRATIONS, *small]))
    # 40 addresses take 640 bytes of answer: more than 512, less than 1232
    without_edns = dig(server, "+noedns", "+ignore", "hv3-small.vmfabric.test")
    assert "tc" in flags(without_edns)
    with_edns = dig(server, "+bufsize=1232", "+ignore", "hv3-small.vmfabric.test")
    assert "tc" not in flags(with_edns)
    assert len(section(with_edns, "ANSWER")) == 40


def test_group_of_2000_vms_is_truncated_over_udp_and_complete_over_tcp(
    server: DnsServer,
) -> None:
    big = [
        Registration(f"big{i}", "hv9", "debian12", (f"10.1.{i // 250}.{i % 250 + 1}",))
        for i in range(2000)
    ]
    server.publish(zones([*REGISTRATIONS, *big]))
    udp = dig(server, "+ignore", "+notcp", "+bufsize=4096", "hv9-debian12.vmfabric.test")
    assert "tc" in flags(udp)
    assert "aa" in flags(udp)
    over_tcp = short(server, "+tcp", "hv9-debian12.vmfabric.test")
    assert over_tcp == {f"10.1.{i // 250}.{i % 250 + 1}" for i in range(2000)}
    retried = short(server, "hv9-debian12.vmfabric.test")  # dig retries over TCP on TC
    assert retried == over_tcp
    # 2,000 SRV records (targets are not compressed) take ~82 KB, more than a DNS message
    # can hold even over TCP: the answer says so with TC; a transfer still carries them all
    srv = dig(server, "+tcp", "+ignore", "_vms._udp.hv9-debian12.vmfabric.test", "SRV")
    assert "tc" in flags(srv)
    server.publish(zones([*REGISTRATIONS, *big[:1000]]))
    members = short(server, "+tcp", "_vms._udp.hv9-debian12.vmfabric.test", "SRV")
    assert len(members) == 1000


def test_several_queries_on_one_tcp_connection(server: DnsServer) -> None:
    names = ["vm-a.vmfabric.test.", "vm-b.vmfabric.test.", "nothing.vmfabric.test."]
    queries = [dns.message.make_query(name, "A") for name in names]
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as connection:
        connection.sendall(b"".join(_framed(q.to_wire()) for q in queries))  # pipelined
        answers = [dns.message.from_wire(_read_frame(connection)) for _ in queries]
        again = dns.message.make_query("vm-d.vmfabric.test.", "A")
        connection.sendall(_framed(again.to_wire()))
        last = dns.message.from_wire(_read_frame(connection))
    assert [a.id for a in answers] == [q.id for q in queries]
    assert [a.rcode() for a in answers] == [dns.rcode.NOERROR] * 2 + [dns.rcode.NXDOMAIN]
    assert [rr.to_text() for rr in answers[0].answer[0]] == ["10.0.0.10"]
    assert [rr.to_text() for rr in last.answer[0]] == ["10.0.1.20"]


# -- TSIG ----------------------------------------------------------------------------------


def test_signed_query_gets_a_signed_answer(server: DnsServer) -> None:
    output = dig(server, "-y", TRANSFER_KEY, "vm-a.vmfabric.test")
    assert status(output) == "NOERROR"
    assert "Couldn't verify" not in output
    assert re.search(
        r"xfr-key\.\s+0\s+ANY\s+TSIG\s+hmac-sha256\. \d+ 300 32 \S+ \d+ NOERROR", output
    )


def test_bad_signature_and_unknown_key_get_notauth(server: DnsServer) -> None:
    wrong = base64.b64encode(b"x" * 32).decode()
    bad_signature = dig(server, "-y", f"hmac-sha256:xfr-key:{wrong}", "vm-a.vmfabric.test")
    assert status(bad_signature) == "NOTAUTH"
    assert "BADSIG" in bad_signature
    unknown = dig(server, "-y", f"hmac-sha256:nobody:{wrong}", "vm-a.vmfabric.test")
    assert status(unknown) == "NOTAUTH"
    assert "BADKEY" in unknown


def test_signature_out_of_time_gets_badtime(server: DnsServer) -> None:
    key = tsig_key()
    query = dns.message.make_query("vm-a.vmfabric.test.", "A")
    unsigned = query.to_wire()
    blank = dns.rdtypes.ANY.TSIG.TSIG(
        dns.rdataclass.ANY, dns.rdatatype.TSIG, key.algorithm, 0, 300, b"", query.id, 0, b""
    )
    an_hour_ago = int(time.time()) - 3600
    signed, _ = dns.tsig.sign(unsigned, key, blank, an_hour_ago, b"")
    record = io.BytesIO()
    dns.rrset.from_rdata(key.name, 0, signed).to_wire(record)
    wire = unsigned[:10] + struct.pack("!H", 1) + unsigned[12:] + record.getvalue()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        udp.settimeout(3)
        udp.sendto(wire, ("127.0.0.1", server.port))
        reply = udp.recv(65535)
    response = dns.message.from_wire(reply, keyring=False)
    assert response.rcode() == dns.rcode.NOTAUTH
    assert response.tsig_error == dns.rcode.BADTIME
    with pytest.raises(dns.tsig.PeerBadTime):  # the answer itself is signed, and verifies
        dns.message.from_wire(reply, keyring=key, request_mac=signed.mac)


def test_notify_is_signed_and_retried_until_answered() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as secondary:
        secondary.bind(("127.0.0.1", 0))
        secondary.settimeout(0.2)
        dns_server = DnsServer(
            ("127.0.0.1", 0),
            tsig_keys={"xfr-key": ("hmac-sha256", SECRET)},
            transfer_key="xfr-key",
            notify=[("127.0.0.1", secondary.getsockname()[1])],
            notify_attempts=3,
        )
        serial = dns_server.publish([forward_zone(ZONE, REGISTRATIONS, {})])[ZONE]
        with ServerThread(dns_server):
            silent = _notifies(secondary, seconds=4.5, answer=False)  # 0.5 + 1 + 2 s, then gives up
            assert len(silent) == 3
            for message in silent:
                assert message.opcode() == dns.opcode.NOTIFY
                assert message.flags & dns.flags.AA
                assert message.question[0].name.to_text() == ZONE
                assert message.question[0].rdtype == dns.rdatatype.SOA
                assert next(iter(message.answer[0])).serial == serial
                assert message.keyname is not None and message.keyname.to_text() == "xfr-key."
            changed = [*REGISTRATIONS, Registration("vm-new", "hv1", "debian12", ("10.0.0.99",))]
            new_serial = dns_server.publish([forward_zone(ZONE, changed, {})])[ZONE]
            answered = _notifies(secondary, seconds=2, answer=True)
            assert len(answered) == 1  # acknowledged at once: no retry
            assert next(iter(answered[0].answer[0])).serial == new_serial


def _notifies(
    secondary: socket.socket, *, seconds: float, answer: bool
) -> list[dns.message.Message]:
    """NOTIFY messages the fake secondary gets in `seconds`, verified with the key."""
    received = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            wire, peer = secondary.recvfrom(65535)
        except TimeoutError:
            continue
        message = dns.message.from_wire(wire, keyring={tsig_key().name: tsig_key()})
        received.append(message)
        if answer:
            secondary.sendto(dns.message.make_response(message).to_wire(), peer)
    return received


# -- transfers -----------------------------------------------------------------------------


def test_axfr_with_the_transfer_key(server: DnsServer) -> None:
    output = dig(server, "-y", TRANSFER_KEY, "vmfabric.test", "AXFR")
    assert "Transfer failed" not in output
    transferred = records(output)
    assert transferred[0][3] == "SOA"
    assert transferred[-2][3] == "SOA"  # then the TSIG of the last message
    assert transferred[-1][3] == "TSIG"
    owners = {fields[0] for fields in transferred}
    expected = set(forward_zone(ZONE, REGISTRATIONS, BLOCKED).records)
    assert expected <= owners
    assert ["vm-a.vmfabric.test.", "5", "IN", "A", "10.0.0.10"] in transferred
    reverse = dig(server, "-y", TRANSFER_KEY, "0.10.in-addr.arpa", "AXFR")
    assert ["10.0.0.10.in-addr.arpa.", "5", "IN", "PTR", "vm-a.vmfabric.test."] in records(reverse)


def test_axfr_without_the_key_is_refused(server: DnsServer) -> None:
    output = dig(server, "vmfabric.test", "AXFR")
    assert "Transfer failed" in output
    assert not [fields for fields in records(output) if fields[3] in {"A", "SOA"}]
    query = dns.message.make_query("vmfabric.test.", "AXFR")
    assert dns.query.tcp(query, "127.0.0.1", port=server.port, timeout=5).rcode() == (
        dns.rcode.REFUSED
    )
    other = f"hmac-sha256:other-key:{OTHER_SECRET}"  # a known key, but not the transfer key
    assert "Transfer failed" in dig(server, "-y", other, "vmfabric.test", "AXFR")
    ixfr = dns.message.make_query("vmfabric.test.", "IXFR")
    assert dns.query.tcp(ixfr, "127.0.0.1", port=server.port, timeout=5).rcode() == (
        dns.rcode.REFUSED
    )


def test_transfer_of_a_name_that_is_no_zone_or_without_serial(server: DnsServer) -> None:
    not_apex = dns.message.make_query("vm-a.vmfabric.test.", "AXFR")
    not_apex.use_tsig(tsig_key())
    response = dns.query.tcp(not_apex, "127.0.0.1", port=server.port, timeout=5)
    assert response.rcode() == dns.rcode.NOTAUTH
    no_serial = dns.message.make_query("vmfabric.test.", "IXFR")  # IXFR needs the client's SOA
    no_serial.use_tsig(tsig_key())
    response = dns.query.tcp(no_serial, "127.0.0.1", port=server.port, timeout=5)
    assert response.rcode() == dns.rcode.FORMERR


def test_stop_closes_open_connections() -> None:
    dns_server = DnsServer(("127.0.0.1", 0))
    dns_server.publish(zones())
    running = ServerThread(dns_server)
    port = running.start().port
    with socket.create_connection(("127.0.0.1", port), timeout=5) as idle:
        idle.sendall(_framed(dns.message.make_query("vm-a.vmfabric.test.", "A").to_wire()))
        assert _read_frame(idle)  # served, then idle: the connection stays open
        started = time.monotonic()
        running.stop()
        assert time.monotonic() - started < 3
        assert _read_all(idle) == b""


def test_axfr_over_udp_is_refused_as_formerr(server: DnsServer) -> None:
    query = dns.message.make_query("vmfabric.test.", "AXFR")
    query.use_tsig(tsig_key())
    response = dns.query.udp(query, "127.0.0.1", port=server.port, timeout=3)
    assert response.rcode() == dns.rcode.FORMERR


def test_large_axfr_spans_several_messages(server: DnsServer) -> None:
    big = [
        Registration(f"big{i}", "hv9", "debian12", (f"10.1.{i // 250}.{i % 250 + 1}",))
        for i in range(3000)
    ]
    server.publish(zones([*REGISTRATIONS, *big]))
    output = dig(server, "-y", TRANSFER_KEY, "vmfabric.test", "AXFR")
    found = re.search(r"XFR size: (\d+) records \(messages (\d+)", output)
    assert found, output
    assert int(found.group(2)) > 1
    addresses = {
        f[4] for f in records(output) if f[0] == "hv9-debian12.vmfabric.test." and f[3] == "A"
    }
    assert len(addresses) == 3000


def test_publish_changes_answers_and_serials(server: DnsServer) -> None:
    ip6 = "0.0.0.0.0.0.0.0.0.0.0.0.0.0.d.f.ip6.arpa."
    before = soa_serial(server)
    reverse_before = soa_serial(server, "0.10.in-addr.arpa.")
    ip6_before = soa_serial(server, ip6)
    assert short(server, "vm-a.vmfabric.test") == {"10.0.0.10"}  # now in the answer cache
    assert server.publish(zones())[ZONE] == before  # nothing changed: same serial
    moved = [
        Registration("vm-a", "hv1", "debian12", ("10.0.0.50", "fd00::10")),
        *REGISTRATIONS[1:],
    ]
    serials = server.publish(zones(moved))
    assert serials[ZONE] > before
    assert soa_serial(server) == serials[ZONE]
    assert soa_serial(server, "0.10.in-addr.arpa.") > reverse_before
    assert soa_serial(server, ip6) == serials[ip6] == ip6_before  # unchanged: same serial
    assert short(server, "vm-a.vmfabric.test") == {"10.0.0.50"}
    assert short(server, "hv1-debian12.vmfabric.test") == {"10.0.0.50", "10.0.0.11"}
    assert short(server, "-x", "10.0.0.50") == {"vm-a.vmfabric.test."}
    assert status(dig(server, "-x", "10.0.0.10")) == "NXDOMAIN"


def test_updates_change_only_what_they_name(server: DnsServer) -> None:
    builder = ZoneBuilder(ZONE, CIDRS)
    for registration in REGISTRATIONS:
        builder.put(registration)
    builder.block("hv1-alpine", "infected by worm")
    builder.changes()
    before = soa_serial(server)
    reverse_before = soa_serial(server, "0.10.in-addr.arpa.")
    assert short(server, "hv3-win11.vmfabric.test") == set()  # now in the answer cache
    builder.put(Registration("vm-w", "hv3", "win11", ("10.0.0.77",)))  # a new host and group
    builder.remove("vm-c")  # the only member of hv1-alpine
    serials = server.update(builder.changes())
    assert serials[ZONE] > before and serials["0.10.in-addr.arpa."] > reverse_before
    assert short(server, "hv3-win11.vmfabric.test") == {"10.0.0.77"}
    assert short(server, "_vmgroups._udp.hv3.vmfabric.test", "SRV") == {
        "0 0 0 hv3-win11.vmfabric.test."
    }
    assert status(dig(server, "hv3.vmfabric.test")) == "NOERROR"  # a new empty non-terminal
    assert short(server, "-x", "10.0.0.77") == {"vm-w.vmfabric.test."}
    assert status(dig(server, "vm-c.vmfabric.test")) == "NXDOMAIN"
    assert short(server, "hv1-alpine.vmfabric.test", "TXT")  # still blocked, without members
    assert status(dig(server, "_udp.hv1-alpine.vmfabric.test")) == "NXDOMAIN"  # no SRV below
    assert short(server, "vm-a.vmfabric.test") == {"10.0.0.10"}  # the rest as it was

    builder.remove("vm-w")
    server.update(builder.changes())
    assert status(dig(server, "hv3.vmfabric.test")) == "NXDOMAIN"
    assert server.update([]) == {}
    assert server.update([ZoneChange(ZONE, {(f"vm-a.{ZONE}", "A"): ("10.0.0.10",)})]) == {}
    with pytest.raises(ValueError, match="not served"):
        server.update([ZoneChange("other.test.", {})])


def test_zones_no_longer_published_are_not_served(server: DnsServer) -> None:
    server.publish([forward_zone(ZONE, REGISTRATIONS, {})])
    assert status(dig(server, "-x", "10.0.0.10")) == "REFUSED"
    assert short(server, "hv1-alpine.vmfabric.test", "TXT") == set()  # unblocked


def test_ixfr_sends_the_differences_since_the_clients_serial(server: DnsServer) -> None:
    first = soa_serial(server)
    changed = [
        Registration("vm-a", "hv1", "debian12", ("10.0.0.10", "fd00::10")),
        Registration("vm-b", "hv1", "debian12", ("10.0.0.31",)),  # new address
        *REGISTRATIONS[2:],
        Registration("vm-f", "hv2", "debian12", ("10.0.1.21",)),  # new VM
    ]
    second = server.publish(zones(changed))[ZONE]
    third = server.publish(zones(changed, blocked={}))[ZONE]  # the block is lifted
    assert first < second < third

    output = dig(server, "-y", TRANSFER_KEY, "vmfabric.test", f"IXFR={first}")
    transferred = [f for f in records(output) if f[3] != "TSIG"]
    soas = [(i, int(f[6])) for i, f in enumerate(transferred) if f[3] == "SOA"]
    # current, then (old, deleted, new, added) per version, then current again
    assert [serial for _, serial in soas] == [third, first, second, second, third, third]
    assert not [f for f in transferred if f[3] == "NS"]  # not a full zone
    first_deleted = transferred[soas[1][0] + 1 : soas[2][0]]
    first_added = transferred[soas[2][0] + 1 : soas[3][0]]
    assert ["vm-b.vmfabric.test.", "5", "IN", "A", "10.0.0.11"] in first_deleted
    assert ["hv1-debian12.vmfabric.test.", "5", "IN", "A", "10.0.0.11"] in first_deleted
    assert ["vm-b.vmfabric.test.", "5", "IN", "A", "10.0.0.31"] in first_added
    assert ["vm-f.vmfabric.test.", "5", "IN", "A", "10.0.1.21"] in first_added
    assert ["hv2-debian12.vmfabric.test.", "5", "IN", "A", "10.0.1.21"] in first_added
    second_deleted = transferred[soas[3][0] + 1 : soas[4][0]]
    assert [f[0] for f in second_deleted] == ["hv1-alpine.vmfabric.test."]
    assert second_deleted[0][3] == "TXT"
    assert transferred[soas[4][0] + 1 : soas[5][0]] == []

    # from the second version: only the last difference
    later = [
        f
        for f in records(dig(server, "-y", TRANSFER_KEY, "vmfabric.test", f"IXFR={second}"))
        if f[3] != "TSIG"
    ]
    assert [int(f[6]) for f in later if f[3] == "SOA"] == [third, second, third, third]
    # up to date: the SOA alone
    current = [
        f
        for f in records(dig(server, "-y", TRANSFER_KEY, "vmfabric.test", f"IXFR={third}"))
        if f[3] != "TSIG"
    ]
    assert current == [["vmfabric.test.", "5", "IN", "SOA", *current[0][4:]]]
    assert int(current[0][6]) == third


def test_ixfr_from_an_unknown_serial_sends_the_whole_zone(server: DnsServer) -> None:
    output = dig(server, "-y", TRANSFER_KEY, "vmfabric.test", "IXFR=12345")
    transferred = [f for f in records(output) if f[3] != "TSIG"]
    assert transferred[0][3] == "SOA" and transferred[-1][3] == "SOA"
    assert ["vmfabric.test.", "5", "IN", "NS", "ns.vmfabric.test."] in transferred
    assert ["vm-a.vmfabric.test.", "5", "IN", "A", "10.0.0.10"] in transferred


def test_ixfr_over_udp_gets_the_current_soa(server: DnsServer) -> None:
    query = dns.message.make_query("vmfabric.test.", "IXFR")
    query.authority.append(
        dns.rrset.from_text(
            "vmfabric.test.", 0, "IN", "SOA", "ns.vmfabric.test. h.vmfabric.test. 1 2 3 4 5"
        )
    )
    query.use_tsig(tsig_key())
    response = dns.query.udp(query, "127.0.0.1", port=server.port, timeout=3)
    assert response.rcode() == dns.rcode.NOERROR
    (soa,) = response.answer
    assert soa.rdtype == dns.rdatatype.SOA
    assert next(iter(soa)).serial == soa_serial(server)


def test_versions_kept_are_bounded() -> None:
    dns_server = DnsServer(
        ("127.0.0.1", 0),
        tsig_keys={"xfr-key": ("hmac-sha256", SECRET)},
        transfer_key="xfr-key",
        keep_versions=3,
    )
    serials = []
    for step in range(5):
        regs = [Registration("vm-a", "hv1", "debian12", (f"10.0.0.{step + 1}",))]
        serials.append(dns_server.publish(zones(regs))[ZONE])
    with ServerThread(dns_server) as running:
        kept = dig(running, "-y", TRANSFER_KEY, "vmfabric.test", f"IXFR={serials[2]}")
        assert not [f for f in records(kept) if f[3] == "NS"]  # incremental
        too_old = dig(running, "-y", TRANSFER_KEY, "vmfabric.test", f"IXFR={serials[1]}")
        assert [f for f in records(too_old) if f[3] == "NS"]  # whole zone


# -- bad input -----------------------------------------------------------------------------


def test_fuzzed_messages_never_kill_the_server(
    server: DnsServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="vmfabric.dns.server")
    rng = random.Random(4)
    valid = [
        dns.message.make_query("vm-a.vmfabric.test.", "A").to_wire(),
        dns.message.make_query("hv1-debian12.vmfabric.test.", "A", use_edns=0).to_wire(),
        dns.message.make_query("_vms._udp.hv1-debian12.vmfabric.test.", "SRV").to_wire(),
        _signed(dns.message.make_query("vmfabric.test.", "AXFR")),
        _signed(dns.message.make_query("vm-b.vmfabric.test.", "A", use_edns=0)),
    ]
    datagrams = [rng.randbytes(rng.randrange(0, 600)) for _ in range(1500)]
    datagrams += [_mutated(rng, rng.choice(valid)) for _ in range(3000)]
    replies: list[bytes] = []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        udp.settimeout(0.001)
        for index, datagram in enumerate(datagrams):
            udp.sendto(datagram, ("127.0.0.1", server.port))
            if index % 20 == 0:
                replies.extend(_drain(udp))
        udp.settimeout(0.5)
        replies.extend(_drain(udp))
    assert replies  # mutated queries are mostly still queries, and get answers
    for reply in replies:
        assert reply[2] & 0x80  # every reply is a response (QR), never a query
        assert dns.message.from_wire(reply, keyring=False).rcode() != dns.rcode.SERVFAIL

    for frames in [datagrams[i : i + 50] for i in range(0, 600, 50)]:
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as connection:
            connection.sendall(b"".join(_framed(f) for f in frames if len(f) >= 12))
            connection.shutdown(socket.SHUT_WR)
            _read_all(connection)
    assert short(server, "vm-a.vmfabric.test") == {"10.0.0.10"}
    assert short(server, "+tcp", "vm-a.vmfabric.test") == {"10.0.0.10"}
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]  # no exception at all
    assert any("malformed query" in r.getMessage() for r in caplog.records)


def test_malformed_query_gets_formerr(server: DnsServer) -> None:
    query = dns.message.make_query("vm-a.vmfabric.test.", "A").to_wire()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        udp.settimeout(3)
        udp.sendto(query[:-3], ("127.0.0.1", server.port))  # the question is cut short
        reply = udp.recv(65535)
    assert reply[:2] == query[:2]
    assert dns.message.from_wire(reply).rcode() == dns.rcode.FORMERR


def test_bad_tcp_frames_close_only_their_connection(server: DnsServer) -> None:
    query = dns.message.make_query("vm-a.vmfabric.test.", "A").to_wire()
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as keeper:
        keeper.sendall(_framed(query))
        assert dns.message.from_wire(_read_frame(keeper)).rcode() == dns.rcode.NOERROR
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as oversize:
            oversize.sendall(struct.pack("!H", 65535) + b"\0" * 65535)
            assert _read_all(oversize) == b""  # closed without an answer
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as short_frame:
            short_frame.sendall(struct.pack("!H", 5) + b"12345")
            assert _read_all(short_frame) == b""
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as truncated:
            truncated.sendall(struct.pack("!H", 100) + query)  # says 100, sends fewer
            truncated.shutdown(socket.SHUT_WR)
            assert _read_all(truncated) == b""
        keeper.sendall(_framed(query))  # the first connection still works
        assert dns.message.from_wire(_read_frame(keeper)).rcode() == dns.rcode.NOERROR
    assert short(server, "vm-a.vmfabric.test") == {"10.0.0.10"}


def test_listen_port_0_binds_udp_and_tcp_on_the_same_port() -> None:
    dns_server = DnsServer(("127.0.0.1", 0))
    with pytest.raises(RuntimeError, match="not started"):
        _ = dns_server.port
    dns_server.publish(zones())
    with ServerThread(dns_server) as running:
        assert running.port > 0
        assert short(running, "vm-a.vmfabric.test") == {"10.0.0.10"}
        assert short(running, "+tcp", "vm-a.vmfabric.test") == {"10.0.0.10"}


# -- helpers -------------------------------------------------------------------------------


def _signed(query: dns.message.Message) -> bytes:
    query.use_tsig(tsig_key())
    return query.to_wire()


def _mutated(rng: random.Random, wire: bytes) -> bytes:
    data = bytearray(wire)
    kind = rng.randrange(4)
    if kind == 0:  # flip a few bytes
        for _ in range(rng.randrange(1, 4)):
            data[rng.randrange(len(data))] = rng.randrange(256)
    elif kind == 1:  # cut short
        del data[rng.randrange(len(data)) :]
    elif kind == 2:  # junk at the end
        data += rng.randbytes(rng.randrange(1, 40))
    else:  # a random count or a random compression pointer
        at = rng.choice([4, 6, 8, 10, 12, len(data) - 4])
        data[at : at + 2] = rng.randbytes(2)
    if len(data) > 2:
        data[2] &= 0x7F  # keep it a query, or the server rightly drops it
    return bytes(data)


def _framed(wire: bytes) -> bytes:
    return struct.pack("!H", len(wire)) + wire


def _read_exactly(connection: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = connection.recv(size - len(data))
        if not chunk:
            raise ConnectionError("closed")
        data += chunk
    return data


def _read_frame(connection: socket.socket) -> bytes:
    (length,) = struct.unpack("!H", _read_exactly(connection, 2))
    return _read_exactly(connection, length)


def _read_all(connection: socket.socket) -> bytes:
    """All the server sends until it closes the connection (a reset counts as closing)."""
    data = b""
    try:
        while chunk := connection.recv(65536):
            data += chunk
    except ConnectionResetError:
        pass
    return data


def _drain(udp: socket.socket) -> list[bytes]:
    replies = []
    while True:
        try:
            replies.append(udp.recv(65535))
        except (TimeoutError, BlockingIOError):
            return replies
