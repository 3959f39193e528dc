"""Queries per second of the vmfabric DNS server and of BIND 9 serving the same zones, on one core.

Both servers get the same zones, made by `vmfabric.domain.dns_records` from one set of
registrations (`--vms` VMs with an IPv4 and an IPv6 address, in `--groups` groups of hosts and
images): ours from the `ZoneContent`, BIND 9 (`named -n 1`, one worker thread, `minimal-responses
yes` like ours) from zone files written from the same `ZoneContent`. Each server runs pinned to
CPU `--cpu`, alone there; `dnsperf` runs pinned to the other CPUs, over UDP with EDNS, from one
query file: VM A/AAAA (55 %), group A (10 %), SRV host->groups and group->VMs (10 %), PTR
(15 %) and NXDOMAIN (10 %). A group of 100 VMs does not fit in 1,232 bytes: both servers answer
it truncated (TC), as a client would then ask over TCP.

After a warm-up, each server is measured for `--seconds` at full speed (dnsperf keeps
`--outstanding` queries in flight), then for `--latency-seconds` at half of the slower server's
rate with each answer's latency logged (`dnsperf -v`), which gives p50/p99 under the same load
for both. Prints one JSON line.

    uv run python bench/bench_dns.py [--vms 1000] [--groups 10] [--seconds 30] [--cpu 0]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from figures import cpu_seconds, free_port, percentile
from vmfabric.domain.dns_records import Registration, ZoneContent, forward_zone, reverse_zones
from vmfabric.lab.testing import NAMED, named_conf

ZONE = "vmfabric.test."
CIDRS = ["10.0.0.0/16", "fd00::/64"]


def registrations(vms: int, groups: int) -> list[Registration]:
    """`vms` VMs spread evenly over `groups` groups (two images per host)."""
    result = []
    for index in range(vms):
        group = index % groups
        host, image = f"hv{group // 2 + 1}", ("debian12", "alpine")[group % 2]
        v4 = f"10.0.{index // 250}.{index % 250 + 1}"
        result.append(Registration(f"vm{index}", host, image, (v4, f"fd00::{index + 1:x}")))
    return result


def zones(vms: int, groups: int) -> list[ZoneContent]:
    regs = registrations(vms, groups)
    return [forward_zone(ZONE, regs, {}), *reverse_zones(ZONE, CIDRS, regs)]


def query_file(path: Path, vms: int, groups: int, count: int = 20_000) -> None:
    """The mix of queries both servers are asked, one `name type` per line."""
    rng = random.Random(7)
    regs = registrations(vms, groups)
    lines = []
    for _ in range(count):
        draw = rng.random()
        r = rng.choice(regs)
        group = f"{r.host}-{r.image}"
        if draw < 0.45:
            lines.append(f"{r.vm}.{ZONE} A")
        elif draw < 0.55:
            lines.append(f"{r.vm}.{ZONE} AAAA")
        elif draw < 0.65:
            lines.append(f"{group}.{ZONE} A")
        elif draw < 0.70:
            lines.append(f"_vmgroups._udp.{r.host}.{ZONE} SRV")
        elif draw < 0.75:
            lines.append(f"_vms._udp.{group}.{ZONE} SRV")
        elif draw < 0.90:
            octets = r.addresses[0].split(".")
            lines.append(f"{'.'.join(reversed(octets))}.in-addr.arpa. PTR")
        else:
            lines.append(f"nothing{rng.randrange(10**6)}.{ZONE} A")
    path.write_text("\n".join(lines) + "\n")


def zone_file(zone: ZoneContent) -> str:
    """A BIND zone file with what our server serves: SOA, NS, the NS address, the records."""
    origin = zone.origin
    lines = [
        "$TTL 5",
        f"{origin} IN SOA ns.{origin} hostmaster.{origin} 1 300 60 1209600 5",
        f"{origin} IN NS ns.{origin}",
        f"ns.{origin} IN A 127.0.0.1",
    ]
    for owner, types in zone.records.items():
        for rdtype, texts in types.items():
            lines.extend(f"{owner} IN {rdtype} {text}" for text in texts)
    return "\n".join(lines) + "\n"


def pinned(cpu: int) -> None:
    os.sched_setaffinity(0, {cpu})


def start_bind(
    root: Path,
    port: int,
    cpu: int,
    contents: Sequence[ZoneContent],
    *,
    conf: str = "",
    zone_options: str = "",
) -> subprocess.Popen[bytes]:
    """`named -n 1` on `port`, pinned to `cpu`, primary of the zones; ready when it answers.

    `conf` is added to named.conf (a key), `zone_options` to every zone (`allow-update`).
    """
    zone_blocks = []
    for index, zone in enumerate(contents):
        (root / f"zone{index}.db").write_text(zone_file(zone))
        zone_blocks.append(
            f'zone "{zone.origin}" {{ type primary; file "zone{index}.db"; {zone_options} }};'
        )
    options = "    minimal-responses yes;\n    edns-udp-size 1232;\n    max-udp-size 1232;"
    rest = "\n".join(["logging { category default { null; }; };", conf, *zone_blocks])
    (root / "named.conf").write_text(named_conf(root, port, options=options, rest=rest))
    os.chmod(root, 0o777)
    process = subprocess.Popen(
        ["taskset", "-c", str(cpu), NAMED, "-f", "-n", "1", "-c", str(root / "named.conf")],
        stdout=subprocess.DEVNULL,
        stderr=(root / "named.err").open("wb"),
    )
    try:
        wait_answering(port, process)
    except RuntimeError:
        stop(process)
        raise
    return process


def start_vmfabric(
    port: int, args: argparse.Namespace, *, cache: bool = True
) -> subprocess.Popen[bytes]:
    """This script in `--serve` mode: our server in a process of its own, pinned to `--cpu`."""
    command = [sys.executable, __file__, "--serve", str(port), "--cpu", str(args.cpu)]
    command += ["--vms", str(args.vms), "--groups", str(args.groups), "--loop", args.loop]
    if not cache:
        command.append("--no-cache")
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL)
    wait_answering(port, process)
    return process


def wait_answering(port: int, process: subprocess.Popen[bytes]) -> None:
    for _ in range(300):
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}")
        answer = subprocess.run(
            ["dig", "@127.0.0.1", "-p", str(port), "+short", "+time=1", "+tries=1", ZONE, "SOA"],
            capture_output=True,
            text=True,
            check=False,
        )
        if [line for line in answer.stdout.splitlines() if line and not line.startswith(";")]:
            return  # the SOA, not dig's ";; connection timed out"
        time.sleep(0.1)
    raise RuntimeError("server did not answer")


def stop(process: subprocess.Popen[bytes]) -> None:
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def dnsperf(
    port: int, queries: Path, seconds: float, cpus: set[int], extra: Sequence[str] = ()
) -> str:
    command = ["taskset", "-c", ",".join(map(str, sorted(cpus))), "dnsperf", "-s", "127.0.0.1"]
    command += ["-p", str(port), "-d", str(queries), "-e", "-l", str(seconds), *extra]
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    return result.stdout


def figures(output: str) -> dict[str, float]:
    def number(label: str) -> float:
        found = re.search(rf"{label}:\s+([\d.]+)", output)
        return float(found.group(1)) if found else float("nan")

    lost = re.search(r"Queries lost:\s+(\d+)", output)
    codes = re.search(r"Response codes:\s+(.*)", output)
    size = re.search(r"Average packet size:\s+request \d+, response (\d+)", output)
    share = {
        code: float(percent)
        for code, percent in re.findall(r"(\w+) \d+ \(([\d.]+)%\)", codes.group(1) if codes else "")
    }
    return {
        "qps": round(number("Queries per second"), 1),
        "avg_latency_ms": round(number(r"Average Latency \(s\)") * 1000, 3),
        "lost": int(lost.group(1)) if lost else -1,
        "avg_response_bytes": float(size.group(1)) if size else float("nan"),
        **{f"{code.lower()}_percent": percent for code, percent in share.items()},
    }


def compare(queries: Path, port_a: int, port_b: int, sample: int) -> int:
    """How many of `sample` queries of the file get different answers from the two servers.

    Compared: rcode, AA and TC flags, the answer records (in any order), the authority types.
    """
    import dns.flags
    import dns.message
    import dns.query

    lines = queries.read_text().splitlines()[:sample]
    differences = 0
    for line in lines:
        name, rdtype = line.split()
        seen = []
        for port in (port_a, port_b):
            query = dns.message.make_query(name, rdtype, use_edns=0, payload=4096)
            answer = dns.query.udp(query, "127.0.0.1", port=port, timeout=3)
            seen.append(
                (
                    answer.rcode(),
                    answer.flags & (dns.flags.AA | dns.flags.TC),
                    sorted(
                        f"{rrset.name} {rrset.rdtype} {rd}"
                        for rrset in answer.answer
                        for rd in rrset
                    ),
                    sorted(rrset.rdtype for rrset in answer.authority),
                )
            )
        differences += seen[0] != seen[1]
    return differences


def latencies(output: str) -> dict[str, float]:
    """p50/p99 in ms from `dnsperf -v` lines (`> NOERROR name type latency`)."""
    values = [
        float(line.rsplit(maxsplit=1)[1]) for line in output.splitlines() if line.startswith("> ")
    ]
    if not values:
        return {}
    return {
        "n": len(values),
        "p50_ms": round(percentile(values, 0.5) * 1000, 3),
        "p99_ms": round(percentile(values, 0.99) * 1000, 3),
    }


def measure(
    start: Callable[[int], subprocess.Popen[bytes]],
    queries: Path,
    args: argparse.Namespace,
    client_cpus: set[int],
) -> tuple[dict[str, float], subprocess.Popen[bytes], int]:
    """Start a server, warm it up, then full speed for `--seconds`; the server stays up."""
    port = free_port()
    process = start(port)
    try:
        dnsperf(port, queries, args.warmup, client_cpus)
        before = cpu_seconds(process.pid)  # all threads of the process
        output = dnsperf(port, queries, args.seconds, client_cpus, ["-q", str(args.outstanding)])
        used = cpu_seconds(process.pid) - before
    except BaseException:
        stop(process)
        raise
    return {**figures(output), "server_cpu_share": round(used / args.seconds, 2)}, process, port


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--vms", type=int, default=1000)
    parser.add_argument("--groups", type=int, default=10)
    parser.add_argument("--seconds", type=float, default=30)
    parser.add_argument("--warmup", type=float, default=3)
    parser.add_argument("--latency-seconds", type=float, default=5)
    parser.add_argument("--outstanding", type=int, default=100)
    parser.add_argument("--cpu", type=int, default=0, help="the one CPU each server runs on")
    parser.add_argument("--loop", choices=["uvloop", "asyncio"], default="uvloop")
    parser.add_argument(
        "--uncached",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also measure our server with its answer cache off (dnspython on every query)",
    )
    parser.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--no-cache", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args()


def main() -> None:
    args = arguments()
    if args.serve is not None:
        serve(args)
        return
    missing = [tool for tool in ("dnsperf", "dig", "taskset") if shutil.which(tool) is None]
    if not os.access(NAMED, os.X_OK):
        missing.append("named")
    if missing:
        error = f"missing {', '.join(missing)}: Debian packages bind9, dnsperf, bind9-dnsutils"
        print(json.dumps({"bench": "dns", "error": error}))
        sys.exit(1)
    cpus = os.sched_getaffinity(0)
    client_cpus = (cpus - {args.cpu}) or cpus
    with tempfile.TemporaryDirectory(prefix="vmf-bench-dns-") as tmp:
        results = run(Path(tmp), args, client_cpus)
    ours, bind = results.pop("vmfabric"), results.pop("bind")
    print(
        json.dumps(
            {
                "bench": "dns",
                "vms": args.vms,
                "groups": args.groups,
                "seconds": args.seconds,
                "server_cpu": args.cpu,
                "client_cpus": sorted(client_cpus),
                "loop": args.loop,
                "bind_version": _bind_version(),
                "vmfabric": ours,
                "bind": bind,
                "ratio": round(ours["qps"] / bind["qps"], 3),
                **results,
            }
        )
    )


def run(root: Path, args: argparse.Namespace, client_cpus: set[int]) -> dict[str, dict[str, float]]:
    """Both servers at full speed, their answers compared, then both at the same rate."""
    queries = root / "queries.txt"
    query_file(queries, args.vms, args.groups)
    (root / "bind").mkdir()
    contents = zones(args.vms, args.groups)
    processes: dict[str, tuple[subprocess.Popen[bytes], int]] = {}
    results: dict[str, dict[str, float]] = {}
    try:
        ours, process, our_port = measure(
            lambda port: start_vmfabric(port, args), queries, args, client_cpus
        )
        processes["vmfabric"] = (process, our_port)
        bind, process, bind_port = measure(
            lambda port: start_bind(root / "bind", port, args.cpu, contents),
            queries,
            args,
            client_cpus,
        )
        processes["bind"] = (process, bind_port)
        results = {"vmfabric": ours, "bind": bind}
        differences = compare(queries, our_port, bind_port, 300)
        results["answers_compared"] = {"queries": 300, "different": differences}
        rate = int(min(ours["qps"], bind["qps"]) / 2)
        if args.latency_seconds > 0:
            for name, (_, port) in processes.items():
                extra = ["-Q", str(rate), "-v"]
                output = dnsperf(port, queries, args.latency_seconds, client_cpus, extra)
                results[name] |= {"latency_at_qps": rate, **latencies(output)}
        if args.uncached:
            uncached, process, _ = measure(
                lambda port: start_vmfabric(port, args, cache=False), queries, args, client_cpus
            )
            stop(process)
            results["vmfabric_uncached"] = uncached
    finally:
        for process, _ in processes.values():
            stop(process)
    return results


def _bind_version() -> str:
    output = subprocess.run([NAMED, "-v"], capture_output=True, text=True, check=False).stdout
    return output.split()[1] if output else "?"


def serve(args: argparse.Namespace) -> None:
    """Child mode: serve the zones on 127.0.0.1:`--serve` until SIGTERM."""
    from vmfabric.dns.server import DnsServer

    pinned(args.cpu)
    if args.loop == "uvloop":
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())

    async def run() -> None:
        server = DnsServer(("127.0.0.1", args.serve), cache_entries=0 if args.no_cache else 100_000)
        server.publish(zones(args.vms, args.groups))
        await server.start()
        stopped = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stopped.set)
        await stopped.wait()
        await server.stop()

    asyncio.run(run())


if __name__ == "__main__":
    main()
