"""Authoritative DNS server for the registration zones, on dnspython and asyncio (UDP and TCP).

`DnsServer.publish` takes the zones as `ZoneContent` (from `vmfabric.domain.dns_records`) from
any thread; the server answers from the last published zones on its event loop.

Versions. Each publish compares every zone with its previous content: a changed zone gets a
new version whose serial is `max(previous + 1, int(time.time()))` (modulo 2**32), so a
restarted server, which starts from the clock, still counts upwards for the secondaries; an
unchanged zone keeps its serial; a zone no longer listed stops being served (its last serial
is remembered, so if it comes back it still counts upwards). Per zone the differences between
the last `keep_versions` versions are kept, and IXFR (RFC 1995) is answered from them: the
client's serial, then one difference sequence per version (old SOA, deleted records, new SOA,
added records). A client serial that is not among the kept versions, or a difference bigger
than the zone, gets the whole zone in AXFR form, which RFC 1995 allows; a client that is up to
date gets the SOA alone. Over UDP, IXFR is answered with the current SOA alone, which tells the
client to come back over TCP (RFC 1995 section 2). AXFR (RFC 5936) is TCP only (over UDP:
FORMERR); a transfer spans as many messages as needed, each under 64 KiB.

Publishing swaps one immutable snapshot (zones, their history, the answer caches), so the loop
never sees half a publish and needs no lock; publishers serialize on a lock among themselves.
A publish compares texts and patches copies of the previous version's tables: record sets that
did not change are kept as they are, and the dnspython records of a set are only made when a
query or a transfer first needs them (then kept while the set lives). So a publish costs in
proportion to what changed (about 50 ms for one VM changing among 6,000, 0.5 s for the first
publish of those 6,000 VMs), not to the size of the zone.

Answers. AA for names of a served zone; REFUSED (without AA) for names outside every zone and
classes other than IN; NXDOMAIN for a name that does not exist and NODATA (NOERROR, empty
answer) for a name that exists without the asked type, both with the SOA in the authority
section, TTL `min(ttl, soa.minimum)` (RFC 2308). Empty non-terminals such as `<host>.<zone>`
or `_udp.<host>.<zone>` exist (NODATA), since names exist below them. Positive answers carry no
authority section (like BIND's `minimal-responses yes`); an NS answer carries the address of the
name server in the additional section. EDNS (RFC 6891): the OPT record is echoed with our UDP
size (`max_udp_payload`, 1232 by default), the client's size is honoured up to it (512 without
EDNS), the DO bit is copied; a version other than 0 gets BADVERS. An answer that does not fit
the UDP size is sent truncated (TC, the records that do not fit left out) and the client
retries over TCP, where a connection carries any number of length-prefixed messages (RFC 7766)
until it is idle for `tcp_idle_timeout` seconds. A message that cannot be parsed gets FORMERR
(the header echoed, no question), or is dropped when it is shorter than a header or is itself
a response; opcodes other than QUERY get NOTIMP. Over TCP, a length prefix above
`max_tcp_query` or under a header's size, or a connection that ends inside a message, closes
that connection and nothing else. No exception of one message reaches the sockets: at worst it
is logged and answered SERVFAIL.

TSIG (RFC 8945). `tsig_keys` names the keys the server knows. A signed query is verified and
its answer signed; a query signed with an unknown key gets NOTAUTH with TSIG error BADKEY, a
bad signature NOTAUTH/BADSIG (both unsigned, as the RFC says), a time outside the fudge
NOTAUTH/BADTIME (signed; the time signed is the server's, dnspython does not let it be the
request's). With `transfer_key` set, AXFR and IXFR must be signed with that key, else REFUSED;
every message of a transfer is signed (RFC 8945 section 5.3.1). NOTIFY (RFC 1996) goes to each
of `notify` on every new serial and when the server starts, signed with `transfer_key` when
set, and is retried with a doubling timeout until the secondary answers or `notify_attempts`
are spent; a newer serial replaces a NOTIFY still being retried.

Answer cache. Parsing a query and rendering its answer with dnspython costs a few hundred
microseconds (about 2,200 answers a second on one core of the test machine), a hundred times
the lookup. So the rendered answer of a query without TSIG is cached, keyed by the query's wire
bytes without its 2-byte ID and with the question name in lower case (one cache for UDP, one
for TCP, as truncation differs); a query with the same key gets the cached answer with its own
ID, and its own question bytes when only the case differs (resolvers that randomize the case
check it), without being parsed. The answer is a function of that key and of the zones, and
the caches belong to the snapshot, so a publish starts with empty caches and an answer
rendered from older zones can only land in a cache nobody reads any more. Each cache is
emptied when it reaches `cache_entries` entries, which bounds the memory random queries can
take (0 turns the cache off). Signed queries, transfers and error answers are never cached.
With the cache, on uvloop and one core, the server answers about as many queries a second as
BIND 9 with one worker thread (`bench/bench_dns.py`); on the standard asyncio loop, about a
fifth as many: run it on uvloop (`ServerThread(..., loop_factory=uvloop.new_event_loop)`).
An answer that cannot fit even fully compressed (counted from the record texts) is sent empty
with TC at once, so the big groups do not cost a render to find out.

Limits. A DNS message holds 65,535 bytes, so an answer bigger than that is truncated over TCP
too: 2,000 A or AAAA records fit, but not the 2,000 SRV records of `_vms._udp` of a group that
big (SRV targets are not compressed, about 41 bytes each); zone transfers carry them all.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ipaddress
import logging
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import dns.asyncquery
import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rdtypes.ANY.NS
import dns.rdtypes.ANY.SOA
import dns.rdtypes.ANY.TSIG
import dns.rdtypes.IN.A
import dns.rdtypes.IN.AAAA
import dns.rdtypes.IN.SRV
import dns.rrset
import dns.serial
import dns.tsig

from vmfabric.domain.dns_records import ZoneChange, ZoneContent, absolute
from vmfabric.loop_thread import LoopThread

log = logging.getLogger(__name__)

_NO_KEYS: Mapping[str, tuple[str, str]] = MappingProxyType({})
_IN = dns.rdataclass.IN
_A = dns.rdatatype.A
_AAAA = dns.rdatatype.AAAA
_NS = dns.rdatatype.NS
_SOA = dns.rdatatype.SOA
_ANY = dns.rdatatype.ANY
_TXT = dns.rdatatype.TXT
_PTR = dns.rdatatype.PTR
_CNAME = dns.rdatatype.CNAME
_SRV = dns.rdatatype.SRV
_AXFR = dns.rdatatype.AXFR
_IXFR = dns.rdatatype.IXFR
_HEADER = 12
# dnspython's record classes are untyped; these are what the zones are made of.
_MAKE_A: Any = dns.rdtypes.IN.A.A
_MAKE_AAAA: Any = dns.rdtypes.IN.AAAA.AAAA
_MAKE_NS: Any = dns.rdtypes.ANY.NS.NS
_MAKE_SOA: Any = dns.rdtypes.ANY.SOA.SOA
_MAKE_SRV: Any = dns.rdtypes.IN.SRV.SRV
_RDATA_CLASS: Any = dns.rdata.get_rdata_class
_TRANSFER_BUDGET = 60_000  # bytes of records per transfer message, before compression
_SERIAL_MODULO = 2**32
_Key = tuple[bytes, ...]
_Measure = tuple[int, int, int]  # size, largest record, least size in an answer


@dataclass(frozen=True)
class SoaSettings:
    """SOA fields of every zone; the serial is the server's.

    `mname` defaults to the zone's name server, `rname` to `hostmaster.<zone>`. The short
    `minimum` (negative-answer TTL) keeps resolvers from caching a VM's absence for long: the
    records follow leases within a second.
    """

    mname: str | None = None
    rname: str | None = None
    refresh: int = 300
    retry: int = 60
    expire: int = 1_209_600
    minimum: int = 5


class _Entry:
    """One record set: its texts, bounds of its size, and its records, made when first needed.

    A publish only compares texts and computes sizes; the dnspython records are made the first
    time a query or a transfer needs them, and kept, and an entry lives on across versions while
    its texts do not change: most records are made once, and a big zone publishes quickly.
    `size` is an upper bound of the records' uncompressed size and `largest` one of the largest
    record's (what transfers cut their messages by), `least` a lower bound of the whole set's
    size in an answer (what lets an answer that cannot fit be truncated without being
    rendered). Making the records twice from two threads at once is harmless: both make the
    same.
    """

    __slots__ = (
        "_made",
        "_reuse",
        "key",
        "largest",
        "least",
        "origin",
        "owner",
        "rdtype",
        "size",
        "texts",
        "ttl",
    )

    def __init__(
        self,
        owner: str,
        rdtype: dns.rdatatype.RdataType,
        texts: tuple[str, ...],
        measure: _Measure,
        *,
        ttl: int,
        origin: dns.name.Name | None = None,
        made: dns.rrset.RRset | None = None,
        reuse: _Entry | None = None,
    ) -> None:
        self.owner = owner
        self.key = _text_key(owner)
        self.rdtype = rdtype
        self.texts = texts
        self.size, self.largest, self.least = measure
        self.ttl = ttl
        self.origin = origin
        self._made = made
        # records of the previous version of this set, to reuse for the texts that stayed
        self._reuse = reuse if reuse is not None and reuse._made is not None else None

    @property
    def rrset(self) -> dns.rrset.RRset:
        made = self._made
        if made is None:
            known = self._reuse.rdatas() if self._reuse is not None else {}
            rdatas = [known.get(t) or _rdata(self.rdtype, t, self.origin) for t in self.texts]
            made = dns.rrset.from_rdata_list(_name(self.owner), self.ttl, rdatas)
            self._made, self._reuse = made, None
        return made

    def rdatas(self) -> dict[str, dns.rdata.Rdata]:
        """Record data by text (when one text is one record), to reuse in the next version."""
        made = self.rrset
        return dict(zip(self.texts, made, strict=True)) if len(made) == len(self.texts) else {}


@dataclass(frozen=True)
class _Diff:
    """What one version changed: records deleted and added, as record sets."""

    old: int
    new: int
    deleted: tuple[_Entry, ...]
    added: tuple[_Entry, ...]
    size: int


@dataclass(frozen=True)
class _Edit:
    """A zone's record sets after a change, and the keys the change set or removed."""

    entries: dict[tuple[str, str], _Entry]
    changed: list[tuple[str, str]]
    removed: list[tuple[str, str]]


@dataclass(frozen=True, eq=False)
class _Zone:
    """One version of a zone, ready to answer from; never changed once built."""

    origin: dns.name.Name
    serial: int
    soa: dns.rdtypes.ANY.SOA.SOA
    apex: tuple[_Entry, ...]  # SOA first, then NS and the name server's address
    entries: Mapping[tuple[str, str], _Entry]  # (owner, rdtype text) -> records of content
    nodes: Mapping[_Key, Mapping[int, _Entry]]  # the owners, with their record sets
    above: Mapping[_Key, int]  # names with owners below them, and how many (they exist too)
    negative_soa: dns.rrset.RRset
    glue: tuple[dns.rrset.RRset, ...]
    diffs: tuple[_Diff, ...]  # oldest first; the last one ends at `serial`
    size: int

    def soa_rrset(self, serial: int | None = None) -> dns.rrset.RRset:
        """The SOA record set, of this version or with another version's serial."""
        rdata = self.soa if serial is None else self.soa.replace(serial=serial)
        return dns.rrset.from_rdata(self.origin, self.apex[0].rrset.ttl, rdata)


@dataclass(frozen=True, eq=False)
class _Snapshot:
    """What the loop answers from; replaced whole by a publish."""

    zones: Mapping[dns.name.Name, _Zone]
    by_key: Mapping[_Key, _Zone]
    udp_cache: dict[bytes, bytes]
    tcp_cache: dict[bytes, bytes]


class _Reply(list[bytes]):
    """Several messages answering one query (a zone transfer over TCP)."""


class DnsServer:
    """An authoritative server of the published zones on one address, UDP and TCP.

    See the module docstring for what it answers and how; `start` and `stop` run on the event
    loop that serves, `publish` may be called from any thread.
    """

    def __init__(
        self,
        listen: tuple[str, int],
        *,
        tsig_keys: Mapping[str, tuple[str, str]] = _NO_KEYS,
        transfer_key: str | None = None,
        notify: Sequence[tuple[str, int]] = (),
        keep_versions: int = 100,
        ttl: int = 5,
        soa: SoaSettings | None = None,
        nameserver: str | None = None,
        max_udp_payload: int = 1232,
        max_tcp_query: int = 16_384,
        tcp_idle_timeout: float = 10.0,
        notify_attempts: int = 5,
        cache_entries: int = 100_000,
    ) -> None:
        """A server for `listen` (port 0 picks a free one, see `port`), not started yet.

        `tsig_keys` maps key names to (algorithm, base64 secret), e.g. ("hmac-sha256", "...");
        `transfer_key` (one of them) is then required on AXFR/IXFR and signs NOTIFY;
        `notify` lists the secondaries (address, port) told of each new serial;
        `nameserver` is the NS name of every zone (default `ns.<zone>` in each zone), which
        gets the listen address as A/AAAA record when it is inside the zone, the address is
        not a wildcard one and the zone has no record of its own there (a VM named `ns`
        keeps its name).
        """
        host, _ = listen
        self._listen = listen
        self._address = ipaddress.ip_address(host)
        self._keys: dict[dns.name.Name, dns.tsig.Key] = {
            dns.name.from_text(name): dns.tsig.Key(name, secret, algorithm)
            for name, (algorithm, secret) in tsig_keys.items()
        }
        self._transfer_key: dns.tsig.Key | None = None
        if transfer_key is not None:
            found = self._keys.get(dns.name.from_text(transfer_key))
            if found is None:
                raise ValueError(f"transfer key {transfer_key!r} is not one of tsig_keys")
            self._transfer_key = found
        if keep_versions < 1:
            raise ValueError("keep_versions must be at least 1")
        self._notify = [(h, p) for h, p in notify]
        self._keep_versions = keep_versions
        self._ttl = ttl
        self._soa = soa or SoaSettings()
        self._nameserver = dns.name.from_text(absolute(nameserver)) if nameserver else None
        self._max_udp = max(512, min(max_udp_payload, 65535))
        self._max_tcp_query = max_tcp_query
        self._tcp_idle = tcp_idle_timeout
        self._notify_attempts = notify_attempts
        self._cache_entries = cache_entries
        self._lock = threading.Lock()
        self._snapshot = _Snapshot({}, {}, {}, {})
        self._last_serials: dict[dns.name.Name, int] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._udp: asyncio.DatagramTransport | None = None
        self._tcp: asyncio.Server | None = None
        self._port: int | None = None
        self._connections: set[asyncio.StreamWriter] = set()
        self._tcp_tasks: set[asyncio.Task[None]] = set()
        self._notifying: dict[tuple[dns.name.Name, str, int], asyncio.Task[None]] = {}

    # -- life cycle -------------------------------------------------------------------------

    @property
    def port(self) -> int:
        """The port the server listens on (the bound one when `listen` asked for port 0)."""
        if self._port is None:
            raise RuntimeError("the DNS server is not started")
        return self._port

    async def start(self) -> None:
        """Listen on UDP and TCP (same address and port), then NOTIFY the secondaries."""
        loop = asyncio.get_running_loop()
        host, wanted = self._listen
        family = socket.AF_INET6 if self._address.version == 6 else socket.AF_INET
        for _ in range(20 if wanted == 0 else 1):
            sock = socket.socket(family, socket.SOCK_DGRAM)
            try:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
                sock.bind((host, wanted))
            except OSError:
                sock.close()
                raise
            port = int(sock.getsockname()[1])
            udp, _ = await loop.create_datagram_endpoint(lambda: _UdpProtocol(self), sock=sock)
            try:
                self._tcp = await asyncio.start_server(
                    self._accepted, host, port, reuse_address=True, backlog=256
                )
            except OSError:
                udp.close()
                if wanted != 0:
                    raise
                continue
            self._udp = udp
            self._port = port
            break
        else:
            raise OSError(f"no port free for both UDP and TCP on {host}")
        self._loop = loop
        log.info("DNS server listening on %s port %d (UDP and TCP)", host, self._port)
        zones = self._snapshot.zones
        self._schedule_notify([(zone.origin, zone.serial) for zone in zones.values()])

    async def stop(self) -> None:
        """Stop listening, close open TCP connections, give up pending NOTIFYs."""
        self._loop = None
        for task in list(self._notifying.values()):
            task.cancel()
        self._notifying.clear()
        if self._udp is not None:
            self._udp.close()
            self._udp = None
        if self._tcp is not None:
            # Let connections being accepted right now finish (and register) first: once the
            # server is closed, asyncio drops a connection it is still accepting without
            # closing its socket.
            for _ in range(3):
                await asyncio.sleep(0)
            self._tcp.close()
            for _ in range(3):
                await asyncio.sleep(0)
            for writer in list(self._connections):
                writer.close()
            if self._tcp_tasks:
                await asyncio.wait(list(self._tcp_tasks), timeout=5)
            await self._tcp.wait_closed()
            self._tcp = None
        log.info("DNS server stopped")

    # -- publishing --------------------------------------------------------------------------

    def publish(self, zones: Sequence[ZoneContent]) -> dict[str, int]:
        """Serve exactly these zones from now on; returns each zone's serial by origin.

        Thread-safe. Changed zones get a new serial and their secondaries a NOTIFY.
        """
        with self._lock:
            previous = self._snapshot.zones
            built: dict[dns.name.Name, _Zone] = {}
            changed: list[tuple[dns.name.Name, int]] = []
            for content in zones:
                origin = dns.name.from_text(absolute(content.origin))
                if origin in built:
                    raise ValueError(f"zone {origin} given twice")
                old = previous.get(origin)
                edit = self._entries(origin, content, old.entries if old is not None else {})
                built[origin] = self._version(origin, old, edit, changed)
            for origin in previous.keys() - built.keys():
                log.info("zone %s no longer served", origin)
            self._swap(previous, built, changed)
        return {origin.to_text(): zone.serial for origin, zone in built.items()}

    def update(self, changes: Sequence[ZoneChange]) -> dict[str, int]:
        """Change some record sets of served zones; returns the serial of each zone changed.

        Thread-safe. Costs what changed, however big the zones: the way to follow a stream
        of small changes (`ZoneBuilder.changes`). Raises ValueError for a zone not served.
        """
        with self._lock:
            previous = self._snapshot.zones
            built = dict(previous)
            changed: list[tuple[dns.name.Name, int]] = []
            for change in changes:
                origin = dns.name.from_text(absolute(change.origin))
                old = built.get(origin)
                if old is None:
                    raise ValueError(f"zone {origin} is not served")
                edit = self._changed_entries(origin, change, old)
                built[origin] = self._version(origin, old, edit, changed)
            self._swap(previous, built, changed)
        return {origin.to_text(): serial for origin, serial in changed}

    def _version(
        self,
        origin: dns.name.Name,
        old: _Zone | None,
        edit: _Edit,
        changed: list[tuple[dns.name.Name, int]],
    ) -> _Zone:
        """The zone after these changes: the old one if nothing changed, else a new version
        with the next serial (appended to `changed`)."""
        if old is not None and not edit.changed and not edit.removed:
            return old
        last = self._last_serials.get(origin)
        serial = int(time.time()) if last is None else max(last + 1, int(time.time()))
        serial %= _SERIAL_MODULO
        zone = self._build(origin, serial, old, edit)
        self._last_serials[origin] = serial
        changed.append((origin, serial))
        log.debug("zone %s: serial %d", origin, serial)
        return zone

    def _swap(
        self,
        previous: Mapping[dns.name.Name, _Zone],
        built: dict[dns.name.Name, _Zone],
        changed: list[tuple[dns.name.Name, int]],
    ) -> None:
        """Answer from the new zones from now on (under the lock); NOTIFY what changed."""
        if changed or previous.keys() != built.keys():
            by_key = {_key(origin): zone for origin, zone in built.items()}
            self._snapshot = _Snapshot(built, by_key, {}, {})
        loop = self._loop
        if changed and loop is not None:
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                loop.call_soon_threadsafe(self._schedule_notify, changed)

    def _build(
        self,
        origin: dns.name.Name,
        serial: int,
        old: _Zone | None,
        edit: _Edit,
    ) -> _Zone:
        """A version of the zone, made from the previous one and what changed.

        Record sets whose texts did not change are reused as they are, changed ones reuse the
        records of unchanged texts, and the lookup tables are copied and patched: a version
        costs what changed (and copying two tables), not the size of the zone.
        """
        entries, changed, removed = edit.entries, edit.changed, edit.removed
        old_entries: Mapping[tuple[str, str], _Entry] = old.entries if old is not None else {}
        apex, glue = self._apex(origin, serial, entries)
        nodes, came, went = _patched(old, entries, changed, removed, apex)
        above = _above(_key(origin), old.above if old is not None else {}, came, went)
        diffs: tuple[_Diff, ...] = ()
        if old is not None and self._keep_versions > 1:
            diff = _difference(
                old_entries,
                entries,
                changed=changed,
                removed=removed,
                old_serial=old.serial,
                new_serial=serial,
            )
            diffs = (*old.diffs, diff)[-(self._keep_versions - 1) :]
        if old is None:
            content_size = sum(e.size for e in entries.values())
        else:  # the previous size, corrected by what changed
            content_size = old.size - sum(e.size for e in old.apex)
            content_size -= sum(
                old_entries[k].size for k in (*removed, *changed) if k in old_entries
            )
            content_size += sum(entries[k].size for k in changed)
        soa = apex[0].rrset[0]
        return _Zone(
            origin=origin,
            serial=serial,
            soa=soa,
            apex=apex,
            entries=entries,
            nodes=nodes,
            above=above,
            negative_soa=dns.rrset.from_rdata(origin, min(self._ttl, self._soa.minimum), soa),
            glue=glue,
            diffs=diffs,
            size=sum(e.size for e in apex) + content_size,
        )

    def _entries(
        self,
        origin: dns.name.Name,
        content: ZoneContent,
        old_entries: Mapping[tuple[str, str], _Entry],
    ) -> _Edit:
        """The record sets of the content, reused where unchanged."""
        inside = _inside(origin)
        entries: dict[tuple[str, str], _Entry] = {}
        changed: list[tuple[str, str]] = []
        for owner, types in content.records.items():
            if not inside(owner):
                log.warning("zone %s: owner %s is outside the zone, left out", origin, owner)
                continue
            for rdtype, texts in types.items():
                key = (owner, rdtype)
                before = old_entries.get(key)
                if before is not None and before.texts == texts:
                    entries[key] = before
                elif texts:
                    entries[key] = self._entry(owner, rdtype, texts, origin, before)
                    changed.append(key)
        return _Edit(entries, changed, [key for key in old_entries if key not in entries])

    def _changed_entries(self, origin: dns.name.Name, change: ZoneChange, old: _Zone) -> _Edit:
        """The previous record sets with the change made."""
        inside = _inside(origin)
        entries = dict(old.entries)
        changed: list[tuple[str, str]] = []
        removed: list[tuple[str, str]] = []
        for key, texts in change.records.items():
            owner, rdtype = key
            if not inside(owner):
                log.warning("zone %s: owner %s is outside the zone, left out", origin, owner)
                continue
            before = entries.get(key)
            if not texts:
                if before is not None:
                    del entries[key]
                    removed.append(key)
            elif before is None or before.texts != texts:
                entries[key] = self._entry(owner, rdtype, texts, origin, before)
                changed.append(key)
        return _Edit(entries, changed, removed)

    def _apex(
        self, origin: dns.name.Name, serial: int, entries: Mapping[tuple[str, str], _Entry]
    ) -> tuple[tuple[_Entry, ...], tuple[dns.rrset.RRset, ...]]:
        """SOA, NS and, unless the zone has records of its own there, the server's address."""
        nameserver = self._nameserver or dns.name.from_text("ns", origin)
        settings = self._soa
        soa = _MAKE_SOA(
            _IN,
            _SOA,
            dns.name.from_text(absolute(settings.mname)) if settings.mname else nameserver,
            dns.name.from_text(absolute(settings.rname))
            if settings.rname
            else dns.name.from_text("hostmaster", origin),
            serial,
            settings.refresh,
            settings.retry,
            settings.expire,
            settings.minimum,
        )
        apex = [
            _entry_of(dns.rrset.from_rdata(origin, self._ttl, soa)),
            _entry_of(dns.rrset.from_rdata(origin, self._ttl, _MAKE_NS(_IN, _NS, nameserver))),
        ]
        ns_text = nameserver.to_text().lower()
        taken = any(key[0] == ns_text for key in entries)
        if nameserver.is_subdomain(origin) and not taken and not self._address.is_unspecified:
            kind = _A if self._address.version == 4 else _AAAA
            rdata = dns.rdata.from_text(_IN, kind, str(self._address))
            apex.append(_entry_of(dns.rrset.from_rdata(nameserver, self._ttl, rdata)))
        return tuple(apex), tuple(e.rrset for e in apex[2:])

    def _entry(
        self,
        owner: str,
        rdtype: str,
        texts: tuple[str, ...],
        origin: dns.name.Name,
        before: _Entry | None,
    ) -> _Entry:
        """A record set of the content, its records not made yet.

        A changed set is measured by what changed in it, so that a VM joining a group of
        thousands costs what one VM costs.
        """
        kind = _rdtype(rdtype)
        if before is None:
            measure = _measure(owner, kind, texts, origin)
        else:
            old, new = set(before.texts), set(texts)
            gone = _measure(owner, kind, old - new, origin)
            came = _measure(owner, kind, new - old, origin)
            measure = (
                before.size - gone[0] + came[0],
                max(before.largest, came[1]),
                before.least - gone[2] + came[2],
            )
        return _Entry(owner, kind, texts, measure, ttl=self._ttl, origin=origin, reuse=before)

    # -- NOTIFY ------------------------------------------------------------------------------

    def _schedule_notify(self, changed: Iterable[tuple[dns.name.Name, int]]) -> None:
        """On the loop: one NOTIFY task per zone and secondary, replacing an older one."""
        if self._loop is None:
            return
        for origin, serial in changed:
            for host, port in self._notify:
                key = (origin, host, port)
                running = self._notifying.pop(key, None)
                if running is not None:
                    running.cancel()
                task = self._loop.create_task(self._notify_one(origin, serial, host, port))
                self._notifying[key] = task
                task.add_done_callback(functools.partial(self._forget, key))

    def _forget(self, key: tuple[dns.name.Name, str, int], task: asyncio.Task[None]) -> None:
        if self._notifying.get(key) is task:
            del self._notifying[key]

    async def _notify_one(self, origin: dns.name.Name, serial: int, host: str, port: int) -> None:
        timeout = 0.5
        for attempt in range(1, self._notify_attempts + 1):
            message = dns.message.make_query(origin, _SOA)
            message.flags = dns.flags.AA
            message.set_opcode(dns.opcode.NOTIFY)
            zone = self._snapshot.zones.get(origin)
            if zone is not None and zone.serial == serial:
                message.answer.append(zone.soa_rrset())
            if self._transfer_key is not None:
                message.use_tsig(self._transfer_key)
            try:
                response = await dns.asyncquery.udp(message, host, timeout=timeout, port=port)
            except (dns.exception.DNSException, OSError) as error:
                log.info(
                    "NOTIFY %s serial %d to %s port %d, attempt %d: %s",
                    origin,
                    serial,
                    host,
                    port,
                    attempt,
                    error or type(error).__name__,
                )
                timeout *= 2
                continue
            rcode = response.rcode()
            if rcode == dns.rcode.NOERROR:
                log.info(
                    "NOTIFY %s serial %d acknowledged by %s port %d", origin, serial, host, port
                )
            else:
                log.warning(
                    "NOTIFY %s serial %d to %s port %d answered %s",
                    origin,
                    serial,
                    host,
                    port,
                    dns.rcode.to_text(rcode),
                )
            return
        log.warning(
            "NOTIFY %s serial %d to %s port %d: no answer, gave up", origin, serial, host, port
        )

    # -- transports --------------------------------------------------------------------------

    def _accepted(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Register a new connection at once (so `stop` can close it), then serve it."""
        self._connections.add(writer)
        task = asyncio.get_running_loop().create_task(self._serve_tcp(reader, writer))
        self._tcp_tasks.add(task)
        task.add_done_callback(self._tcp_tasks.discard)

    async def _serve_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Length-prefixed messages until the client closes, idles or sends a bad frame.

        Answers that are not cached are made on a worker thread (the snapshot they read is
        immutable), so that rendering a zone transfer does not hold up the UDP answers.
        """
        peer = writer.get_extra_info("peername")
        try:
            while True:
                try:
                    prefix = await asyncio.wait_for(reader.readexactly(2), self._tcp_idle)
                except (asyncio.IncompleteReadError, TimeoutError):
                    return
                (length,) = struct.unpack("!H", prefix)
                if length < _HEADER or length > self._max_tcp_query:
                    log.info("TCP from %s: message of %d bytes, connection closed", peer, length)
                    return
                try:
                    wire = await asyncio.wait_for(reader.readexactly(length), self._tcp_idle)
                except (asyncio.IncompleteReadError, TimeoutError):
                    log.info("TCP from %s: truncated message, connection closed", peer)
                    return
                cached = self._snapshot.tcp_cache.get(wire[2:])
                if cached is not None:
                    reply: bytes | list[bytes] | None = wire[:2] + cached
                else:  # a transfer takes long to render: the loop goes on answering meanwhile
                    work = functools.partial(self.handle, wire, udp=False, peer=peer)
                    reply = await asyncio.get_running_loop().run_in_executor(None, work)
                if reply is None:
                    continue
                for message in [reply] if isinstance(reply, bytes) else reply:
                    writer.write(len(message).to_bytes(2, "big") + message)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        except Exception:
            log.exception("TCP connection from %s failed", peer)
        finally:
            self._connections.discard(writer)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    # -- answering ---------------------------------------------------------------------------

    def handle(self, wire: bytes, *, udp: bool, peer: Any = None) -> bytes | list[bytes] | None:
        """The answer to one query message: bytes, several messages (a transfer), or None.

        Public so that the answering logic can be driven without sockets; never raises.
        """
        if len(wire) < _HEADER or wire[2] & 0x80:
            return None  # not even a header, or a response: answering could loop
        snapshot = self._snapshot
        cache = snapshot.udp_cache if udp else snapshot.tcp_cache
        cached = cache.get(wire[2:])
        if cached is not None:
            return wire[:2] + cached
        end = _question_end(wire)
        if end is not None:  # the same query with the name in another case (0x20 resolvers)
            cached = cache.get(_folded(wire, end))
            if cached is not None:
                return wire[:2] + cached[:10] + wire[12:end] + cached[end - 2 :]
        try:
            return self._answer(wire, udp, peer, snapshot, cache)
        except Exception:
            log.exception("query from %s failed", peer)
            return _header_only(wire, dns.rcode.SERVFAIL)

    def _answer(
        self,
        wire: bytes,
        udp: bool,
        peer: Any,
        snapshot: _Snapshot,
        cache: dict[bytes, bytes],
    ) -> bytes | list[bytes] | None:
        query = self._parse(wire, peer)
        if not isinstance(query, dns.message.Message):
            return query
        response = dns.message.make_response(query, our_payload=self._max_udp, pad=0)
        if query.edns >= 0:
            response.ednsflags |= query.ednsflags & dns.flags.DO
        if query.edns > 0:
            response.set_rcode(dns.rcode.BADVERS)
            return response.to_wire()
        if query.opcode() != dns.opcode.QUERY:
            response.set_rcode(dns.rcode.NOTIMP)
            return response.to_wire()
        if len(query.question) != 1:
            return _header_only(wire, dns.rcode.FORMERR)
        question = query.question[0]
        qkey = _key(question.name)
        zone = _find_zone(snapshot.by_key, qkey) if question.rdclass == _IN else None
        if zone is None:
            response.set_rcode(dns.rcode.REFUSED)
            return response.to_wire()
        if question.rdtype in (_AXFR, _IXFR):
            return self._transfer(query, response, zone, udp, peer)
        if dns.rdatatype.is_metatype(question.rdtype) and question.rdtype != _ANY:
            return _header_only(wire, dns.rcode.FORMERR)
        limit = 65535
        if udp:
            limit = max(512, min(query.payload, self._max_udp)) if query.edns >= 0 else 512
        end = _question_end(wire)
        room = limit - (end or len(wire)) - (11 if query.edns >= 0 else 0)
        _lookup(zone, qkey, question.rdtype, response, room)
        out = response.to_wire(max_size=limit, prefer_truncation=True)
        if self._cache_entries and not query.had_tsig and end is not None:
            if len(cache) >= self._cache_entries:
                cache.clear()
            cache[_folded(wire, end)] = out[2:]
        return out

    def _parse(self, wire: bytes, peer: Any) -> dns.message.Message | bytes | None:
        """The query, verified if signed; else the error answer to send (or None)."""
        try:
            return dns.message.from_wire(wire, keyring=self._keys)
        except (dns.message.UnknownTSIGKey, dns.tsig.BadKey, dns.tsig.BadAlgorithm):
            return self._tsig_error(wire, dns.rcode.BADKEY)
        except dns.tsig.BadSignature:
            return self._tsig_error(wire, dns.rcode.BADSIG)
        except dns.tsig.BadTime:
            return self._tsig_error(wire, dns.rcode.BADTIME)
        except Exception as error:
            log.debug("malformed query from %s: %s", peer, error)
            return _header_only(wire, dns.rcode.FORMERR)

    def _tsig_error(self, wire: bytes, error: dns.rcode.Rcode) -> bytes | None:
        """NOTAUTH with the TSIG error of RFC 8945 section 5.2 (signed only for BADTIME)."""
        try:
            query = dns.message.from_wire(wire, keyring=False)
        except Exception:
            return _header_only(wire, dns.rcode.FORMERR)
        log.info("query with TSIG key %s refused: %s", query.keyname, dns.rcode.to_text(error))
        response = dns.message.make_response(query, our_payload=self._max_udp, pad=0)
        response.set_rcode(dns.rcode.NOTAUTH)
        if not query.tsig or query.keyname is None:
            return response.to_wire()
        key = self._keys.get(query.keyname)
        if error == dns.rcode.BADTIME and key is not None:
            now = int(time.time())
            response.use_tsig(
                key, tsig_error=error, other_data=struct.pack("!HI", now >> 32, now & 0xFFFFFFFF)
            )
            response.request_mac = query.mac or b""
            return response.to_wire()
        signed: dns.rdtypes.ANY.TSIG.TSIG = query.tsig[0]
        unsigned = signed.replace(mac=b"", error=error, other=b"")
        response.tsig = dns.rrset.from_rdata(query.keyname, 0, unsigned)
        return response.to_wire()

    def _transfer(
        self,
        query: dns.message.Message,
        response: dns.message.Message,
        zone: _Zone,
        udp: bool,
        peer: Any,
    ) -> bytes | list[bytes]:
        """AXFR or IXFR of `zone`, when the query may have it."""
        question = query.question[0]
        kind = dns.rdatatype.to_text(question.rdtype)
        if question.name != zone.origin:
            response.set_rcode(dns.rcode.NOTAUTH)  # not a zone apex (RFC 5936 section 2.2.1)
            return response.to_wire()
        required = self._transfer_key
        if required is not None and (not query.had_tsig or query.keyname != required.name):
            log.info(
                "%s of %s from %s refused: not signed with the transfer key",
                kind,
                zone.origin,
                peer,
            )
            response.set_rcode(dns.rcode.REFUSED)
            return response.to_wire()
        response.flags |= dns.flags.AA
        current = zone.soa_rrset()
        if udp:
            if question.rdtype == _AXFR:
                response.set_rcode(dns.rcode.FORMERR)
                response.flags &= ~dns.flags.AA
            else:
                response.answer = [current]
            return response.to_wire()
        if question.rdtype == _AXFR:
            log.info("AXFR of %s serial %d to %s", zone.origin, zone.serial, peer)
            return self._messages(query, _full(zone))
        client = _client_serial(query, zone.origin)
        if client is None:
            response.set_rcode(dns.rcode.FORMERR)
            return response.to_wire()
        if dns.serial.Serial(client) >= dns.serial.Serial(zone.serial):
            log.info("IXFR of %s from %s: serial %d is current", zone.origin, peer, client)
            return self._messages(query, [_entry_of(current)])
        start = next((i for i, d in enumerate(zone.diffs) if d.old == client), None)
        changes = zone.diffs[start:] if start is not None else ()
        if start is None or sum(d.size for d in changes) > zone.size:
            log.info(
                "IXFR of %s serial %d to %s: from serial %d, sent as full zone (%s)",
                zone.origin,
                zone.serial,
                peer,
                client,
                "serial not kept" if start is None else "differences larger than the zone",
            )
            return self._messages(query, _full(zone))
        log.info(
            "IXFR of %s serial %d to %s: incremental from serial %d (%d versions)",
            zone.origin,
            zone.serial,
            peer,
            client,
            len(changes),
        )
        parts = [_entry_of(current)]
        for diff in changes:
            parts.append(_entry_of(zone.soa_rrset(diff.old)))
            parts.extend(diff.deleted)
            parts.append(_entry_of(zone.soa_rrset(diff.new)))
            parts.extend(diff.added)
        parts.append(_entry_of(current))
        return self._messages(query, parts)

    def _messages(self, query: dns.message.Message, parts: Sequence[_Entry]) -> _Reply:
        """The records of a transfer in as many messages as needed, each signed if asked."""
        reply = _Reply()
        context: Any = None
        for index, chunk in enumerate(_chunks(parts, _TRANSFER_BUDGET)):
            message = dns.message.Message(id=query.id)
            message.flags = dns.flags.QR | dns.flags.AA | (query.flags & dns.flags.RD)
            if index == 0:
                message.question = list(query.question)
            message.answer = chunk
            if query.edns >= 0:
                message.use_edns(0, 0, self._max_udp, pad=0)
            if query.had_tsig:
                message.use_tsig(query.keyring, query.keyname, algorithm=query.keyalgorithm or "")
                message.request_mac = query.mac or b""
            reply.append(message.to_wire(max_size=65535, multi=True, tsig_ctx=context))
            context = message.tsig_ctx
        return reply


class ServerThread(LoopThread[DnsServer]):
    """A `DnsServer` on an event loop of its own, in a daemon thread.

    For code without an event loop of its own (tests, benchmarks, a CLI): `with
    ServerThread(server) as running:` starts it and stops it at the end, even on errors;
    `publish` works from the calling thread as from any other.
    """

    def __init__(
        self,
        server: DnsServer,
        *,
        loop_factory: Callable[[], asyncio.AbstractEventLoop] = asyncio.new_event_loop,
    ) -> None:
        super().__init__(server, name="dns-server", loop_factory=loop_factory)


class _UdpProtocol(asyncio.DatagramProtocol):
    """Answers datagrams as they come; a cached answer is sent without a function call more."""

    def __init__(self, server: DnsServer) -> None:
        self.server = server
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        transport = self.transport
        if transport is None:
            return
        if len(data) >= _HEADER and not data[2] & 0x80:
            cached = self.server._snapshot.udp_cache.get(data[2:])
            if cached is not None:
                transport.sendto(data[:2] + cached, addr)
                return
        reply = self.server.handle(data, udp=True, peer=addr)
        if isinstance(reply, bytes):
            transport.sendto(reply, addr)

    def error_received(self, exc: Exception) -> None:
        log.debug("UDP error: %s", exc)


def _entry_of(rrset: dns.rrset.RRset) -> _Entry:
    """An entry for records made by the server itself (SOA, NS, its address, IXFR SOAs)."""
    owner = len(rrset.name.to_wire() or b"") + 10
    sizes = [owner + len(rdata.to_wire() or b"") for rdata in rrset]
    texts = tuple(rdata.to_text() for rdata in rrset)
    measure = (sum(sizes), max(sizes, default=0), 0)
    return _Entry(rrset.name.to_text(), rrset.rdtype, texts, measure, ttl=rrset.ttl, made=rrset)


def _measure(
    owner: str, kind: dns.rdatatype.RdataType, texts: Iterable[str], origin: dns.name.Name | None
) -> _Measure:
    """Upper bounds of the records' total and largest size, and a lower bound of their size
    in an answer (where the owner is a 2-byte pointer)."""
    owner_size = _owner_size(owner)
    size = largest = least = 0
    for text in texts:
        each = owner_size + _rdata_size(kind, text, origin)
        size += each
        largest = max(largest, each)
        least += 12 + _rdata_least(kind, text)
    return size, largest, least


@functools.lru_cache(maxsize=1 << 14)
def _owner_size(owner: str) -> int:
    """Owner name, type, class, TTL and length of a record, uncompressed."""
    plain = owner.isascii() and "\\" not in owner
    return (len(owner) + 1 if plain else len(_name(owner).to_wire() or b"")) + 10


@functools.lru_cache(maxsize=1 << 16)
def _name(text: str) -> dns.name.Name:
    """A name from its (absolute) text; the same names come back in many records."""
    return dns.name.from_text(text)


@functools.lru_cache(maxsize=256)
def _rdtype(text: str) -> dns.rdatatype.RdataType:
    return dns.rdatatype.from_text(text)


@functools.lru_cache(maxsize=1 << 16)
def _text_key(owner: str) -> _Key:
    """The lookup key of an owner name's text, without making the name when it is plain."""
    if owner == ".":
        return (b"",)
    if owner.isascii() and "\\" not in owner and owner.endswith("."):
        return tuple(label.encode().lower() for label in owner.split("."))
    return _key(_name(owner))


def _rdata(
    kind: dns.rdatatype.RdataType, text: str, origin: dns.name.Name | None
) -> dns.rdata.Rdata:
    """Record data from its text: the record types of the zones made directly, others parsed.

    dnspython's text parser costs tens of microseconds a record; these constructors a few.
    """
    if kind == _A:
        return _MAKE_A(_IN, _A, text)  # type: ignore[no-any-return]
    if kind == _AAAA:
        return _MAKE_AAAA(_IN, _AAAA, text)  # type: ignore[no-any-return]
    plain = text.isascii() and "\\" not in text and text.endswith(".")
    if plain and kind in (_PTR, _NS, _CNAME):
        maker: Any = _RDATA_CLASS(_IN, kind)
        return maker(_IN, kind, _name(text))  # type: ignore[no-any-return]
    fields = text.split()
    if plain and kind == _SRV and len(fields) == 4 and all(f.isdigit() for f in fields[:3]):
        priority, weight, port = (int(f) for f in fields[:3])
        return _MAKE_SRV(_IN, _SRV, priority, weight, port, _name(fields[3]))  # type: ignore[no-any-return]
    return dns.rdata.from_text(_IN, kind, text, origin=origin, relativize=False)


def _rdata_size(kind: dns.rdatatype.RdataType, text: str, origin: dns.name.Name | None) -> int:
    """The wire size of record data, or an upper bound of it from its text when that is cheaper.

    Absolute names take one octet more on the wire than in text, TXT no more than its text;
    anything else is rendered to know.
    """
    if kind == _A:
        return 4
    if kind == _AAAA:
        return 16
    if kind == _TXT:
        return len(text)
    if text.endswith("."):
        if kind in (_PTR, _NS, _CNAME):
            return len(text) + 1
        if kind == _SRV:
            return 6 + len(text.rsplit(maxsplit=1)[-1]) + 1  # priority, weight, port, target
    return len(_rdata(kind, text, origin).to_wire() or b"")


def _rdata_least(kind: int, text: str) -> int:
    """A lower bound of the wire size of record data in a message, compressed if it can be."""
    if kind == _A:
        return 4
    if kind == _AAAA:
        return 16
    if kind == _SRV:  # the target is never compressed (RFC 2782)
        target = text.rsplit(maxsplit=1)[-1]
        return 6 + (len(target) + 1 if target.endswith(".") and "\\" not in target else 1)
    return 1


def _patched(
    old: _Zone | None,
    entries: Mapping[tuple[str, str], _Entry],
    changed: Iterable[tuple[str, str]],
    removed: Iterable[tuple[str, str]],
    apex: Iterable[_Entry],
) -> tuple[dict[_Key, dict[int, _Entry]], set[_Key], set[_Key]]:
    """The lookup table of a new version: the previous one, copied, with the changes made;
    and the owners that came and went with them."""
    nodes: dict[_Key, dict[int, _Entry]] = dict(old.nodes) if old is not None else {}  # type: ignore[arg-type]
    came: set[_Key] = set()
    went: set[_Key] = set()
    if old is not None:
        for key in removed:
            _put(nodes, old.entries[key], None, came, went)
    for key in changed:
        _put(nodes, entries[key], entries[key], came, went)
    if old is not None:
        for entry in old.apex[2:]:  # the name server's address, maybe taken by a VM now
            key = (entry.owner.lower(), dns.rdatatype.to_text(entry.rdtype))
            _put(nodes, entry, entries.get(key), came, went)
    for entry in apex:
        _put(nodes, entry, entry, came, went)
    return nodes, came - went, went - came


def _put(
    nodes: dict[_Key, dict[int, _Entry]],
    where: _Entry,
    entry: _Entry | None,
    came: set[_Key],
    went: set[_Key],
) -> None:
    """Set (or remove, with None) one record set of a node, copying the node, not changing it;
    a node made or emptied goes into `came` or `went`."""
    key = where.key
    before = nodes.get(key)
    node = dict(before or {})
    if entry is None:
        node.pop(where.rdtype, None)
    else:
        node[where.rdtype] = entry
    if node:
        nodes[key] = node
        if before is None:
            came.add(key)
            went.discard(key)
    elif before is not None:
        del nodes[key]
        went.add(key)
        came.discard(key)


def _above(
    apex: _Key, old: Mapping[_Key, int], came: Iterable[_Key], went: Iterable[_Key]
) -> dict[_Key, int]:
    """The names between the apex and the owners, counting the owners below each.

    A name with an owner below it exists even without records of its own (an empty
    non-terminal such as `<host>.<zone>`, RFC 8020): it answers NODATA, not NXDOMAIN.
    """
    above = dict(old)
    for owners, step in ((came, 1), (went, -1)):
        for owner in owners:
            for start in range(1, len(owner) - len(apex)):
                name = owner[start:]
                count = above.get(name, 0) + step
                if count:
                    above[name] = count
                else:
                    del above[name]
    return above


def _inside(origin: dns.name.Name) -> Callable[[str], bool]:
    """Whether an owner's text is in the zone (the apex or below it)."""
    zone_text = origin.to_text().lower()
    suffix = "." + zone_text if zone_text != "." else "."
    return lambda owner: owner == zone_text or owner.endswith(suffix)


def _difference(
    old: Mapping[tuple[str, str], _Entry],
    new: Mapping[tuple[str, str], _Entry],
    *,
    changed: Iterable[tuple[str, str]],
    removed: Iterable[tuple[str, str]],
    old_serial: int,
    new_serial: int,
) -> _Diff:
    """The records deleted and added between two versions, compared by their texts."""
    deleted: list[_Entry] = []
    added: list[_Entry] = []
    for key in sorted({*changed, *removed}):
        before, after = old.get(key), new.get(key)
        gone = set(before.texts) - set(after.texts if after else ()) if before else set()
        came = set(after.texts) - set(before.texts if before else ()) if after else set()
        if before is not None and gone:
            deleted.append(_pick(before, gone))
        if after is not None and came:
            added.append(_pick(after, came))
    size = sum(e.size for e in deleted) + sum(e.size for e in added)
    return _Diff(old_serial, new_serial, tuple(deleted), tuple(added), size)


def _pick(entry: _Entry, texts: set[str]) -> _Entry:
    """The part of an entry with these texts (its records made when a transfer needs them)."""
    picked = tuple(text for text in entry.texts if text in texts)
    return _Entry(
        entry.owner,
        entry.rdtype,
        picked,
        _measure(entry.owner, entry.rdtype, picked, entry.origin),
        ttl=entry.ttl,
        origin=entry.origin,  # not `reuse`: a kept difference would hold the whole old set
    )


def _full(zone: _Zone) -> list[_Entry]:
    """AXFR order: SOA, every other record set, SOA again."""
    return [*zone.apex, *zone.entries.values(), zone.apex[0]]


def _chunks(parts: Sequence[_Entry], budget: int) -> Iterator[list[dns.rrset.RRset]]:
    """Record sets in groups under `budget` bytes; a record set too big alone is split."""
    chunk: list[dns.rrset.RRset] = []
    used = 0
    for part in parts:
        if chunk and used + part.size > budget:
            yield chunk
            chunk, used = [], 0
        if part.size <= budget:
            chunk.append(part.rrset)
            used += part.size
            continue
        records = list(part.rrset)
        each = part.largest
        start = 0
        while start < len(records):
            end, size = start, 0
            while end < len(records) and (end == start or size + each <= budget):
                size += each
                end += 1
            piece = dns.rrset.from_rdata_list(part.rrset.name, part.rrset.ttl, records[start:end])
            if end < len(records):
                yield [piece]
            else:
                chunk, used = [piece], size
            start = end
    if chunk:
        yield chunk


def _lookup(zone: _Zone, qkey: _Key, qtype: int, response: dns.message.Message, room: int) -> None:
    """Fill in an authoritative answer: the records, NODATA or NXDOMAIN.

    An answer whose records cannot fit in `room` bytes even fully compressed is sent empty
    with TC right away: rendering thousands of records only to drop them would make big
    groups the cheapest way to keep the server busy.
    """
    response.flags |= dns.flags.AA
    node = zone.nodes.get(qkey)
    if node is not None and (qtype == _ANY or qtype in node):
        found = list(node.values()) if qtype == _ANY else [node[qtype]]
        if sum(entry.least for entry in found) > room:
            response.flags |= dns.flags.TC
            return
        response.answer = [entry.rrset for entry in found]
        if qtype == _NS:
            response.additional = list(zone.glue)
        return
    if node is None and qkey not in zone.above:
        response.set_rcode(dns.rcode.NXDOMAIN)
    response.authority = [zone.negative_soa]


def _find_zone(zones: Mapping[_Key, _Zone], key: _Key) -> _Zone | None:
    """The zone of the closest enclosing origin, if any."""
    for start in range(len(key)):
        zone = zones.get(key[start:])
        if zone is not None:
            return zone
    return None


def _key(name: dns.name.Name) -> _Key:
    """A name as its lower-case labels: what the lookup tables are keyed by.

    dnspython's names hash weakly (12,000 owner names of a zone share 9,000 hashes) and
    compare slowly, which made every table build and many lookups pay for comparisons.
    """
    return tuple(map(bytes.lower, name.labels))


def _client_serial(query: dns.message.Message, origin: dns.name.Name) -> int | None:
    """The serial a client has, from the SOA in the authority section of its IXFR."""
    for rrset in query.authority:
        if rrset.rdtype == _SOA and rrset.name == origin and len(rrset) > 0:
            return int(next(iter(rrset)).serial)
    return None


def _question_end(wire: bytes) -> int | None:
    """Where the only question of a query ends (after its type and class), if it is plain.

    Plain: one question, no compression pointer in it. Others are not cached.
    """
    if wire[4:6] != b"\x00\x01":
        return None
    at, size = _HEADER, len(wire)
    while at < size:
        length = wire[at]
        if length == 0:
            end = at + 5
            return end if end <= size else None
        if length & 0xC0:
            return None
        at += length + 1
    return None


def _folded(wire: bytes, end: int) -> bytes:
    """The cache key of a query: without its ID, the question name in lower case.

    Only the name is folded (ASCII, as DNS compares names); the type and class are bytes that
    `lower()` could change. A cached answer has the question at the same place, so a query
    that differs in case only gets it with its own question bytes put back.
    """
    return wire[2:12] + wire[12 : end - 4].lower() + wire[end - 4 :]


def _header_only(wire: bytes, rcode: int) -> bytes | None:
    """An answer that echoes the query's ID, opcode and RD with `rcode`, nothing else."""
    if len(wire) < _HEADER:
        return None
    first = 0x80 | (wire[2] & 0x79)  # QR, the opcode and RD of the query
    return wire[:2] + bytes([first, rcode & 0x0F]) + bytes(8)
