"""Sweep time of connectivity checks through the real qemu-ga of lab VMs (issue 5).

A throw-away lab (two hosts, one external network) with `--vms` VMs, each with a real qemu-ga
and DHCP client; the checker (`services.checks.Checker`, default settings) checks the first
1, 10, 50 and all of them, each time as a warm sweep (OS already known) after a first one; then
`--hung` of them get the lab fault `agent-hang` and all are checked again. Prints one JSON
line: wall time and checker CPU per sweep, and the ratio of the biggest sweep to the
smallest (target: 100 VMs within 3x the time of one). The same two sweeps (one VM, all) run
again while every VM has the lab fault `external-down`, so that each VM's outside ping runs
to its deadline, as in an uplink outage. No peer tool does this on this machine.

    uv run python bench/bench_checks.py [--vms 100] [--hung 10] [--concurrency 32]

Needs root and the lab's packages, like the lab tests.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

from vmfabric.domain.checks import AgentState, NicFacts
from vmfabric.domain.model import NetworkKind
from vmfabric.lab import faults, lifecycle
from vmfabric.lab.testing import boot, lab_network, temporary_lab, wait_for_ipv4
from vmfabric.lab.vm import agent_socket_path
from vmfabric.services.checks import Checker, CheckSettings, CheckTarget

CIDR_PREFIX = "10.71.0"
GATEWAY = f"{CIDR_PREFIX}.1"


def sweep(checker: Checker, targets: list[CheckTarget]) -> dict[str, float]:
    """Wall and CPU seconds of one sweep, and how many VMs' agents answered."""
    wall, cpu = time.perf_counter(), time.process_time()
    results = asyncio.run(checker.check_all(targets))
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    answered = sum(r.agent == AgentState.OK for r in results)
    return {
        "vms": len(targets),
        "seconds": round(wall, 3),
        "cpu_ms_per_vm": round(cpu / len(targets) * 1000, 2),
        "agents_ok": answered,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--vms", type=int, default=100)
    parser.add_argument("--hung", type=int, default=10)
    parser.add_argument("--concurrency", type=int, default=CheckSettings().concurrency)
    args = parser.parse_args()
    with temporary_lab(2):
        network, placement = lab_network(
            "vmfbench", f"{CIDR_PREFIX}.0/24", 710, NetworkKind.EXTERNAL
        )
        vms = {f"c{i}": (f"hv{i % 2 + 1}", f"{CIDR_PREFIX}.{i + 10}") for i in range(args.vms)}
        boot(network, placement, vms)
        for vm in vms:
            wait_for_ipv4(vm, timeout=30)
        macs = {vm["name"]: vm["nics"][0]["mac"] for vm in lifecycle.status()["vms"]}
        targets = [
            CheckTarget(
                vm,
                str(agent_socket_path(host, vm)),
                [NicFacts(macs[vm], ip, GATEWAY, NetworkKind.EXTERNAL)],
            )
            for vm, (host, ip) in vms.items()
        ]
        checker = Checker(CheckSettings(concurrency=args.concurrency))
        sweep(checker, targets)  # learns every VM's OS
        sizes = sorted({1, 10, 50, args.vms} & set(range(1, args.vms + 1)))
        sweeps = [sweep(checker, targets[:size]) for size in sizes]
        for vm in vms:
            faults.inject(vm, "external-down")
        outage = [sweep(checker, targets[:size]) for size in (1, args.vms)]
        for vm in vms:
            faults.heal(vm)
        for vm in list(vms)[: args.hung]:
            faults.inject(vm, "agent-hang")
        hung = sweep(checker, targets)
    print(
        json.dumps(
            {
                "bench": "checks_sweep",
                "vm_deadline_s": CheckSettings().vm_deadline_s,
                "concurrency": args.concurrency,
                "sweeps": sweeps,
                "ratio_biggest_to_one": round(sweeps[-1]["seconds"] / sweeps[0]["seconds"], 2),
                "external_down": {
                    "sweeps": outage,
                    "ratio_biggest_to_one": round(outage[-1]["seconds"] / outage[0]["seconds"], 2),
                },
                "with_hung_agents": {"hung": args.hung, **hung},
            }
        )
    )


if __name__ == "__main__":
    main()
