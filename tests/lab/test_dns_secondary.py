"""A real BIND 9 secondary of the vmfabric DNS server: TSIG transfers, NOTIFY, then IXFR.

The test starts its own `named` (from the Debian `bind9` package) in the foreground, with a
configuration of its own in a temporary directory, listening on 127.0.0.1 and a free port, as
a secondary of our server; it is stopped by the PID the test started, whatever happens. Any
system `named` is left alone.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from vmfabric.dns.server import DnsServer, ServerThread
from vmfabric.domain.dns_records import Registration, ZoneContent, forward_zone, reverse_zones
from vmfabric.lab.testing import NAMED, dig_short, named_conf

pytestmark = pytest.mark.lab

ZONE = "vmfabric.test."
REVERSE = "0.0.10.in-addr.arpa."
SECRET = base64.b64encode(b"lab-secondary-transfer-key-01234").decode()


def zones(registrations: list[Registration]) -> list[ZoneContent]:
    return [
        forward_zone(ZONE, registrations, {}),
        *reverse_zones(ZONE, ["10.0.0.0/24"], registrations),
    ]


def free_port() -> int:
    """A port free for both UDP and TCP on loopback."""
    for _ in range(50):
        with socket.socket() as tcp:
            tcp.bind(("127.0.0.1", 0))
            port = int(tcp.getsockname()[1])
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
                try:
                    udp.bind(("127.0.0.1", port))
                except OSError:
                    continue
                return port
    raise RuntimeError("no free port")


def stop_named(process: subprocess.Popen[bytes]) -> None:
    """Stop the named this test started (by its PID), killing it if it does not stop."""
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@dataclass
class Secondary:
    port: int
    log: Path
    process: subprocess.Popen[bytes]


def secondary_conf(root: Path, port: int, primary_port: int) -> str:
    """A BIND secondary of both zones of the primary on `primary_port`, with the transfer key."""
    rest = f"""
key "xfr-key" {{ algorithm hmac-sha256; secret "{SECRET}"; }};
logging {{
    channel lab {{
        file "{root}/named.log";
        severity debug 1;
        print-time yes;
        print-category yes;
        print-severity yes;
    }};
    category default {{ lab; }};
    category xfer-in {{ lab; }};
    category notify {{ lab; }};
}};
zone "{ZONE}" {{
    type secondary;
    primaries port {primary_port} {{ 127.0.0.1 key xfr-key; }};
    file "forward.db";
}};
zone "{REVERSE}" {{
    type secondary;
    primaries port {primary_port} {{ 127.0.0.1 key xfr-key; }};
    file "reverse.db";
}};
"""
    return named_conf(root, port, rest=rest)


@pytest.fixture
def primary_and_secondary(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> Iterator[tuple[DnsServer, Secondary]]:
    if not os.access(NAMED, os.X_OK):
        pytest.skip("needs BIND 9's named (Debian package bind9)")
    caplog.set_level(logging.INFO, logger="vmfabric.dns.server")
    secondary_port = free_port()
    server = DnsServer(
        ("127.0.0.1", 0),
        tsig_keys={"xfr-key": ("hmac-sha256", SECRET)},
        transfer_key="xfr-key",
        notify=[("127.0.0.1", secondary_port)],
    )
    server.publish(zones(FIRST))
    with (
        ServerThread(server) as running,
        secondary_of(tmp_path, secondary_port, running.port) as ns,
    ):
        yield running, ns


@contextlib.contextmanager
def secondary_of(root: Path, port: int, primary_port: int) -> Iterator[Secondary]:
    """A BIND secondary on `port` of the zones of the primary on `primary_port`."""
    conf = root / "named.conf"
    conf.write_text(secondary_conf(root, port, primary_port))
    os.chmod(root, 0o777)  # named may switch to the bind user for its files
    with (root / "named.out").open("wb") as output:
        process = subprocess.Popen(
            [NAMED, "-f", "-n", "1", "-c", str(conf)], stdout=output, stderr=output
        )
        try:
            yield Secondary(port, root / "named.log", process)
        finally:
            stop_named(process)


FIRST = [
    Registration("vm-a", "hv1", "debian12", ("10.0.0.10",)),
    Registration("vm-b", "hv1", "debian12", ("10.0.0.11",)),
    Registration("vm-c", "hv2", "alpine", ("10.0.0.12",)),
]


def serial(port: int, zone: str = ZONE) -> int | None:
    found = dig_short(port, zone, "SOA")
    return int(next(iter(found)).split()[2]) if found else None


def wait_for(check: Callable[[], bool], seconds: float) -> float:
    """Seconds until `check()` held; fails the test after `seconds`."""
    started = time.monotonic()
    while time.monotonic() - started < seconds:
        if check():
            return time.monotonic() - started
        time.sleep(0.05)
    raise AssertionError(f"not within {seconds} s")


def test_bind_secondary_follows_through_notify_and_ixfr(
    primary_and_secondary: tuple[DnsServer, Secondary], caplog: pytest.LogCaptureFixture
) -> None:
    primary, secondary = primary_and_secondary
    first = serial(primary.port)
    wait_for(lambda: serial(secondary.port) == first, 15)  # initial transfer, at start-up
    wait_for(lambda: serial(secondary.port, REVERSE) == serial(primary.port, REVERSE), 15)
    assert dig_short(secondary.port, "hv1-debian12.vmfabric.test") == {"10.0.0.10", "10.0.0.11"}
    assert dig_short(secondary.port, "-x", "10.0.0.12") == {"vm-c.vmfabric.test."}

    # a VM boots: the secondary serves it within two seconds of the publish
    second = [*FIRST, Registration("vm-d", "hv1", "debian12", ("10.0.0.13",))]
    new_serial = primary.publish(zones(second))[ZONE]
    took = wait_for(lambda: dig_short(secondary.port, "vm-d.vmfabric.test") == {"10.0.0.13"}, 2)
    assert serial(secondary.port) == new_serial
    assert dig_short(secondary.port, "hv1-debian12.vmfabric.test") == {
        "10.0.0.10",
        "10.0.0.11",
        "10.0.0.13",
    }
    wait_for(lambda: dig_short(secondary.port, "-x", "10.0.0.13") == {"vm-d.vmfabric.test."}, 2)

    # a VM goes away: gone from its name and its group on the secondary too
    third = [r for r in second if r.vm != "vm-b"]
    primary.publish(zones(third))
    wait_for(lambda: dig_short(secondary.port, "vm-b.vmfabric.test") == set(), 2)
    assert dig_short(secondary.port, "hv1-debian12.vmfabric.test") == {"10.0.0.10", "10.0.0.13"}

    # named's own account: AXFR for the first copy, IXFR afterwards, all signed
    log = secondary.log.read_text()
    requests = [
        line
        for line in log.splitlines()
        if f"zone {ZONE[:-1]}/IN:" in line and "requesting" in line
    ]
    assert "requesting AXFR of initial version" in requests[0]
    assert len(requests) >= 3
    assert all("requesting IXFR" in line for line in requests[1:]), requests
    assert "nonincremental" not in log and "falling back to AXFR" not in log
    assert log.count(f"zone {ZONE[:-1]}/IN: transferred serial") >= 3
    assert "TSIG 'xfr-key'" in log
    # ours: the same, from the server's side
    served = [r.getMessage() for r in caplog.records if "XFR of vmfabric.test." in r.getMessage()]
    assert served[0].startswith("AXFR of vmfabric.test.")
    assert len(served) >= 3
    assert all("incremental from serial" in message for message in served[1:]), served
    assert took < 2


def test_transfer_without_the_key_is_refused_to_a_misconfigured_secondary(
    tmp_path: Path,
) -> None:
    if not os.access(NAMED, os.X_OK):
        pytest.skip("needs BIND 9's named (Debian package bind9)")
    server = DnsServer(
        ("127.0.0.1", 0),
        tsig_keys={"xfr-key": ("hmac-sha256", SECRET)},
        transfer_key="xfr-key",
    )
    server.publish(zones(FIRST))
    with ServerThread(server) as running:
        port = free_port()
        conf = secondary_conf(tmp_path, port, running.port).replace(" key xfr-key;", ";")
        (tmp_path / "named.conf").write_text(conf)
        os.chmod(tmp_path, 0o777)
        process = subprocess.Popen(
            [NAMED, "-f", "-n", "1", "-c", str(tmp_path / "named.conf")],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            log = tmp_path / "named.log"
            wait_for(lambda: log.exists() and "REFUSED" in log.read_text(), 15)
            assert serial(port) is None  # nothing transferred, nothing served
        finally:
            stop_named(process)


def test_bind_secondary_of_serve_follows_a_lease_within_two_seconds(tmp_path: Path) -> None:
    """The whole chain: `serve` with a TSIG key file and a secondary; a lease event (as the
    dnsmasq hook sends it) reaches the secondary through NOTIFY and IXFR."""
    if not os.access(NAMED, os.X_OK):
        pytest.skip("needs BIND 9's named (Debian package bind9)")
    key_file = tmp_path / "xfr.key"
    key_file.write_text(f'key "xfr-key" {{\n\talgorithm hmac-sha256;\n\tsecret "{SECRET}";\n}};\n')
    api_port, dns_port, secondary_port = free_port(), free_port(), free_port()
    state = tmp_path / "state"
    options = [
        *("--listen", f"127.0.0.1:{api_port}", "--dns-listen", f"127.0.0.1:{dns_port}"),
        *("--dns-secondary", f"127.0.0.1:{secondary_port}", "--dns-tsig-key-file", str(key_file)),
    ]
    with (tmp_path / "serve.log").open("wb") as log:
        controller = subprocess.Popen(
            [sys.executable, "-m", "vmfabric.cli.main", "serve", *options],
            env={**os.environ, "VMFABRIC_STATE": str(state)},
            stdout=log,
            stderr=log,
        )
        try:
            api = httpx.Client(base_url=f"http://127.0.0.1:{api_port}/api/v1", timeout=30)
            wait_for(lambda: _answers(api), 30)
            api.post("/hosts", json={"name": "hv1", "driver": "noop", "bridge": "br0"})
            api.post("/networks", json={"name": "net1", "cidrs": ["10.0.0.0/24"]})
            body = {
                "name": "vm-a",
                "host": "hv1",
                "image": "debian12",
                "nics": [{"network": "net1"}],
            }
            nic = api.post("/vms", json=body).json()["nics"][0]
            root = tmp_path / "named"
            root.mkdir()
            with secondary_of(root, secondary_port, dns_port) as secondary:
                wait_for(lambda: serial(secondary.port) == serial(dns_port), 15)
                wait_for(lambda: serial(secondary.port, REVERSE) == serial(dns_port, REVERSE), 15)
                event = {"network": "net1", "action": "add", "mac": nic["mac"]}
                event |= {"address": nic["ipv4"], "hostname": "vm-a", "expires": None}
                with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as hook:
                    hook.sendto(
                        json.dumps(event).encode(), str(state / "run" / "lease-events.sock")
                    )
                took = wait_for(
                    lambda: dig_short(secondary.port, "vm-a.vmfabric.test") == {nic["ipv4"]}, 2
                )
                wait_for(
                    lambda: dig_short(secondary.port, "-x", nic["ipv4"]) == {"vm-a.vmfabric.test."},
                    2,
                )
                named_log = secondary.log.read_text()
        finally:
            controller.terminate()
            controller.wait(timeout=30)
    requests = [line for line in named_log.splitlines() if "zone vmfabric.test/IN:" in line]
    asked = [line for line in requests if "requesting" in line]
    assert "AXFR" in asked[0] and asked[1:] and all("IXFR" in line for line in asked[1:])
    assert "TSIG 'xfr-key'" in named_log
    assert took < 2


def _answers(api: httpx.Client) -> bool:
    try:
        return api.get("/info").status_code == 200
    except httpx.TransportError:
        return False
