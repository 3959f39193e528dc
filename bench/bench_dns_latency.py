"""Lease event -> DNS answer changed: how soon a VM's name follows its lease (issue 4).

A real `vmfabric serve` (SQLite, DNS on, hosts on the noop hypervisor) with `--vms` VMs; the
bench sends lease events as dnsmasq's lease hook does (one datagram on the controller's lease
socket, an add or a release of a VM's address) and asks the DNS server, every millisecond,
until the VM's name answers with the address (after an add) or without it (after a release).
The peer is BIND 9 doing the same work the way operators glue it today: a dynamic update
(RFC 2136, TSIG-signed) of the VM's and the group's A records per event, timed from the
update's sending to the changed answer. Prints one JSON line.

    uv run python bench/bench_dns_latency.py [--vms 1000] [--events 300] [--gap-ms 50]

Events come at random gaps of 0 to `--gap-ms` ms, so some land while the previous publish is
still being spaced (the publisher waits at least 50 ms between runs under load).
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import random
import secrets
import socket
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import dns.message
import dns.query
import dns.rdatatype
import dns.tsigkeyring
import dns.update
import httpx

from bench_api_creates import create_all, start_controller
from bench_dns import start_bind, stop
from figures import free_port, summary
from vmfabric.domain.dns_records import Registration, forward_zone, group_name
from vmfabric.services.vms import DEFAULT_IMAGE as IMAGE

ZONE = "vmfabric.test."
HOST = "hv1"


def answer(port: int, name: str) -> set[str]:
    """The A records of `name` at the server (empty on NXDOMAIN or no answer)."""
    query = dns.message.make_query(name, dns.rdatatype.A)
    try:
        response = dns.query.udp(query, "127.0.0.1", port=port, timeout=0.5)
    except dns.exception.Timeout:
        return set()
    return {rdata.to_text() for rrset in response.answer for rdata in rrset}


def wait_changed(port: int, name: str, address: str, present: bool) -> float:
    """Seconds until `name` answers with (or without) `address`, asking every millisecond."""
    started = time.perf_counter()
    while (address in answer(port, name)) != present:
        if time.perf_counter() - started > 10:
            raise RuntimeError(f"{name} did not follow within 10 s")
        time.sleep(0.001)
    return time.perf_counter() - started


def lease_sender(sock_path: str) -> Callable[[str, str, str, str], None]:
    """What dnsmasq's lease hook does: one JSON datagram per lease change."""
    sender = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)

    def send(action: str, mac: str, address: str, vm: str) -> None:
        event = {
            "network": "net",
            "action": action,
            "mac": mac,
            "address": address,
            "hostname": vm,
            "expires": int(time.time()) + 3600,
        }
        sender.sendto(json.dumps(event).encode(), sock_path)

    return send


def plan(vms: list[dict[str, str]], events: int, seed: int) -> list[tuple[dict[str, str], bool]]:
    """(VM, leased after the event) for each event: an add when it has no lease, else a
    release; the same plan for both servers."""
    rng = random.Random(seed)
    leased: set[str] = set()
    steps = []
    for _ in range(events):
        vm = rng.choice(vms)
        now_leased = vm["name"] not in leased
        (leased.add if now_leased else leased.discard)(vm["name"])
        steps.append((vm, now_leased))
    return steps


def measure_vmfabric(state: Path, args: argparse.Namespace) -> tuple[list[float], int]:
    dns_port = free_port()
    process, url = start_controller(state, dns_listen=f"127.0.0.1:{dns_port}")
    try:
        setup = httpx.Client(base_url=f"{url}/api/v1", timeout=60)
        setup.post("/hosts", json={"name": HOST, "driver": "noop", "bridge": "br0"})
        setup.post("/networks", json={"name": "net", "cidrs": ["10.128.0.0/16"]})
        create_all(url, 8, args.vms)
        vms = [
            {"name": vm["name"], "mac": vm["nics"][0]["mac"], "ip": vm["nics"][0]["ipv4"]}
            for vm in setup.get("/vms").json()
        ]
        send = lease_sender(str(state / "run" / "lease-events.sock"))
        took = []
        for vm, leased in plan(vms, args.events, args.seed):
            send("add" if leased else "del", vm["mac"], vm["ip"], vm["name"])
            took.append(wait_changed(dns_port, f"{vm['name']}.{ZONE}", vm["ip"], leased))
            time.sleep(random.uniform(0, args.gap_ms / 1000))
        return took, len(vms)
    finally:
        process.terminate()
        process.wait()


def measure_bind(root: Path, args: argparse.Namespace, vms: int) -> list[float]:
    port = free_port()
    names = [{"name": f"vm{i}", "ip": f"10.128.{i // 250}.{i % 250 + 2}"} for i in range(vms)]
    zone = forward_zone(ZONE, [Registration(n["name"], HOST, IMAGE, ()) for n in names], {})
    secret = base64.b64encode(secrets.token_bytes(32)).decode()
    key = f'key "upd" {{ algorithm hmac-sha256; secret "{secret}"; }};'
    process = start_bind(
        root,
        port,
        cpu=0,
        contents=[zone],
        conf=key,
        zone_options='allow-update { key "upd"; }; max-records-per-type 0;',
    )
    keyring = dns.tsigkeyring.from_text({"upd": ("hmac-sha256", secret)})
    group = f"{group_name(HOST, IMAGE)}.{ZONE}"
    try:
        took = []
        for vm, leased in plan(names, args.events, args.seed):
            update = dns.update.UpdateMessage(ZONE, keyring=keyring, keyalgorithm="hmac-sha256")
            for owner in (f"{vm['name']}.{ZONE}", group):
                if leased:
                    update.add(owner, 5, "A", vm["ip"])
                else:
                    update.delete(owner, "A", vm["ip"])
            started = time.perf_counter()
            dns.query.tcp(update, "127.0.0.1", port=port, timeout=5)
            wait_changed(port, f"{vm['name']}.{ZONE}", vm["ip"], leased)
            took.append(time.perf_counter() - started)
            time.sleep(random.uniform(0, args.gap_ms / 1000))
        return took
    finally:
        stop(process)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--vms", type=int, default=1000)
    parser.add_argument("--events", type=int, default=300)
    parser.add_argument("--gap-ms", type=float, default=50)
    parser.add_argument("--seed", type=int, default=4)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        ours, vms = measure_vmfabric(Path(tmp), args)
    with tempfile.TemporaryDirectory(prefix="vmf-bench-", dir="/var/tmp") as tmp:
        peer = measure_bind(Path(tmp), args, vms) if os.geteuid() == 0 else []
    figures: dict[str, object] = {
        "bench": "dns_lease_latency",
        "vms": vms,
        "events": args.events,
        "vmfabric_ms": summary(ours),
    }
    if peer:
        figures["bind_nsupdate_ms"] = summary(peer)
        figures["ratio_p50"] = round(summary(ours)["p50"] / max(summary(peer)["p50"], 0.1), 2)
    print(json.dumps(figures))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
