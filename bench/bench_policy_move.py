"""Moving a VM's policy rules between hosts, and what the redirection buys (issue 6).

(1) Rule work of one move on the lab's real Open vSwitch, for a VM with about 10, 100 and
1,000 OpenFlow rules. A throw-away lab (two host bridges, `vmf-hv1` and `vmf-hv2`, joined by
peer links) and, in this process, a controller on a temporary SQLite database whose two
hosts use the noop hypervisor and the lab's switch (`LocalAgents(switch=lab_vswitch())`).
The VM's port is an internal port marked with its MAC, on its network's VLAN, beside one
neighbour on that VLAN. Each move plays the switch watcher as the integration tests do: a
port for the VM appears on the destination (`MigrationEngine.port_added`: step 1 reads the
VM's rules on the source, saves the send rules, rewrites them for the new port and installs
them with the receive and where rules in one bundle), the source port goes (`port_removed`:
step 2, one bundle deletes the send rules and redirects the where rules over the peer link),
then
`tick` ends it. The engine's own two rule methods are timed (`_install_destination`,
`_take_off_source`, wrapped here; the product records no step times), and each whole event
too (with the migration record's bookkeeping). The VM moves back and forth.

The peer is the same move by hand with ovs-ofctl, as an operator would script it for another
VM with the same policy (on another VLAN): `dump-flows` of the VM's cookie on the source, a
sed-like rewrite of its port numbers in Python, `add-flows` of the file on the destination,
then `del-flows` of the cookie on the source; no bundle, no redirection.

(2) Ping loss while a lab VM migrates, with the redirection of the receive rules and without
it (`VMFABRIC_MIGRATION_REDIRECT=0` for the controller). A controller lab of three hosts: web1
(hv1) under a policy that lets ICMP in from the network, peer2 on hv2 and peer3 on hv3 both
pinging it every `--interval` s during each `POST /vms/web1/migrate` (hv1 -> hv2, then back).
Lost = echo requests (up to the last one sent but one) without an answer; gap = the longest
time between two answers. `--watched` more moves per mode (not counted in the losses) look
at the switch every few ms: when the VM's destination port appeared, when its source port
left, when the longest gap began, and when the source's redirect rules were there.

    uv run python bench/bench_policy_move.py   # 12 moves per size and method, 20 + 4 per mode
    uv run python bench/bench_policy_move.py --quick      # 3 moves; 4 + 2 per mode
    uv run python bench/bench_policy_move.py --skip-ping  # (1) only; --skip-rules: (2) only

Needs root and the lab's packages, like the lab tests; run it under the lab lock
(`flock /tmp/vmf-lab.lock ...`). Prints one JSON line.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi.testclient import TestClient

from figures import percentile
from vmfabric.agent.registry import LocalAgents
from vmfabric.api.app import create_app
from vmfabric.cli.client import ApiClient
from vmfabric.dhcp.dnsmasq import DnsmasqServer
from vmfabric.domain.policy import (
    KIND_MASK,
    RECEIVE_KIND,
    VM_RULES_MASK,
    PortFacts,
    compile_port,
    parse_policy,
    send_cookie,
    where_cookie,
)
from vmfabric.lab import lifecycle
from vmfabric.lab.ovs import switch_access
from vmfabric.lab.testing import controller_lab, temporary_lab, wait_for_ipv4
from vmfabric.process_identity import current_owner
from vmfabric.services.context import Controller
from vmfabric.services.migrations import MigrationEngine, MigrationSettings, list_migrations
from vmfabric.store import repository
from vmfabric.store.engine import migrate, open_engine, session_factory
from vmfabric.store.group_commit import GroupCommitter
from vmfabric.vswitch import cookie_of
from vmfabric.vswitch.openvswitch import OpenVswitch, lab_vswitch

SIZES = (10, 100, 1000)
CIDR = "10.76.0.0/24"
BRIDGES = {"hv1": "vmf-hv1", "hv2": "vmf-hv2"}
PEER_VM_ID = 0xBE0C
"""The cookie id of the VM moved by hand (the controller's VMs have small ids)."""
PEER_MAC = "52:54:00:be:0c:01"
PEER_IPV4 = "10.76.0.250"


def ms(values_s: list[float]) -> dict[str, float]:
    """Median and p90 of durations in seconds, in milliseconds."""
    values = [v * 1000 for v in values_s]
    return {
        "n": len(values),
        "median": round(statistics.median(values), 1),
        "p90": round(percentile(values, 0.9), 1),
    }


# (1) The rule work of one move ----------------------------------------------------------


def policy_document(rules: int) -> dict[str, Any]:
    """`rules` rules, half ingress, half egress, each on its own TCP port and /24: each
    compiles to one OpenFlow rule for a NIC with one IPv4 address."""
    return {
        "rules": [
            {
                "direction": "ingress" if i % 2 == 0 else "egress",
                "action": "allow",
                "protocol": "tcp",
                "ports": i + 1,
                "peer": f"10.{100 + i // 256}.{i % 256}.0/24",
            }
            for i in range(rules)
        ]
    }


def fixed_rules() -> int:
    """The rules every NIC with a policy has whatever its rules (anti-spoofing, ARP, DHCP,
    neighbour discovery, defaults, the delivery rule)."""
    compiled = compile_port(
        parse_policy("empty", {}), PortFacts(1, PEER_MAC, 5, 10, (PEER_IPV4,)), {}
    )
    return len(compiled.send) + len(compiled.receive)


class Switch:
    """ovs-vsctl and ovs-ofctl on the lab switch, and the ports this bench made there."""

    def __init__(self) -> None:
        self.access = switch_access()
        self.made: set[tuple[str, str]] = set()

    def vsctl(self, *args: str) -> str:
        return self.access.run("ovs-vsctl", *args)

    def ofctl(self, *args: str) -> str:
        return self.access.run("ovs-ofctl", *args)

    def add_port(self, bridge: str, name: str, vlan: int, mac: str | None) -> int:
        """An internal port on `vlan` (marked as the NIC `mac`); its OpenFlow number."""
        marks = [f"external_ids:attached-mac={mac}"] if mac else []
        self.vsctl(
            "add-port", bridge, name, f"tag={vlan}", "--", "set", "interface", name,
            "type=internal", *marks,
        )  # fmt: skip
        self.made.add((bridge, name))
        return int(self.vsctl("get", "interface", name, "ofport").strip())

    def del_port(self, bridge: str, name: str) -> None:
        self.vsctl("--if-exists", "del-port", bridge, name)
        self.made.discard((bridge, name))

    def clean(self) -> None:
        for bridge, name in list(self.made):
            self.del_port(bridge, name)


def port_name(kind: str, host: str) -> str:
    """`vmfbv1`: the bench VM's port on hv1; `vmfbp2`: the hand-moved VM's on hv2."""
    return f"vmfb{kind}{host[-1]}"


def other(host: str) -> str:
    return "hv2" if host == "hv1" else "hv1"


@dataclass
class EngineRig:
    """The controller, its API in-process, the migration engine with its rule steps timed,
    and the bench VM (where it is, its port)."""

    ctl: Controller
    api: TestClient
    engine: MigrationEngine
    switch: OpenVswitch
    mac: str
    vlan: int
    vm_id: int
    host: str = "hv1"
    ofport: int = 0
    steps: dict[str, list[float]] = field(
        default_factory=lambda: {
            step: []
            for step in (
                "install",
                "takeoff",
                "install_in_tools",
                "takeoff_in_tools",
                "port_added_event",
                "port_removed_event",
            )
        }
    )
    tool_runs: dict[str, int] = field(default_factory=dict)


class ToolClock:
    """The time the driver spends in ovs-vsctl and ovs-ofctl runs, and how many it makes;
    runs at once (the install's reads) each count their whole time, so a step's time in tools
    may exceed the step's."""

    def __init__(self, switch: OpenVswitch) -> None:
        self.seconds = 0.0
        self.runs = 0
        self.lock = threading.Lock()
        run = switch._run

        def counted(argv: list[str], stdin: str = "") -> str:
            started = time.perf_counter()
            try:
                return run(argv, stdin)
            finally:
                with self.lock:
                    self.seconds += time.perf_counter() - started
                    self.runs += 1

        switch._run = counted  # type: ignore[method-assign]


def timed(
    method: Callable[..., Any], rig: EngineRig, clock: ToolClock, step: str
) -> Callable[..., Any]:
    """`method`, recording each call's duration, its tools' time and how many it ran."""

    def run(*args: Any, **kwargs: Any) -> Any:
        started, tools, runs = time.perf_counter(), clock.seconds, clock.runs
        try:
            return method(*args, **kwargs)
        finally:
            rig.steps[step].append(time.perf_counter() - started)
            rig.steps[f"{step}_in_tools"].append(clock.seconds - tools)
            rig.tool_runs[step] = clock.runs - runs

    return run


@contextmanager
def engine_rig(root: Path, lab: Switch) -> Iterator[EngineRig]:
    """A controller on SQLite in `root` whose hosts hv1 and hv2 (noop hypervisor) have the
    lab's bridges, a network, web1 on hv1 plugged into vmf-hv1 beside a neighbour, under a
    policy."""
    database = open_engine(f"sqlite:///{root / 'vmfabric.db'}")
    migrate(database)
    switch = lab_vswitch()
    ctl = Controller(
        sessions=session_factory(database),
        agents=LocalAgents(switch=switch),
        dhcp=DnsmasqServer(root / "dhcp", root / "run" / "lease-events.sock"),
        fabric=None,
        owner=current_owner(),
        writes=GroupCommitter(database),
    )
    engine = MigrationEngine(ctl, MigrationSettings(timeout_s=60, grace_s=0))
    try:
        with TestClient(create_app(ctl, migrations=engine)) as api:
            for host, bridge in BRIDGES.items():
                body = {"name": host, "driver": "noop", "bridge": bridge}
                api.post("/api/v1/hosts", json=body).raise_for_status()
            api.post("/api/v1/networks", json={"name": "lan", "cidrs": [CIDR]}).raise_for_status()
            vlan = int(api.get("/api/v1/networks/lan").json()["vlan"])
            body = {"name": "web1", "host": "hv1", "nics": [{"network": "lan"}]}
            created = api.post("/api/v1/vms", json=body)
            created.raise_for_status()
            mac = str(created.json()["nics"][0]["mac"])
            with ctl.uow() as uow:
                vm_id = repository.get_vm(uow.session, "web1").id
            rig = EngineRig(ctl, api, engine, switch, mac, vlan, vm_id)
            rig.ofport = lab.add_port(BRIDGES["hv1"], port_name("v", "hv1"), vlan, mac)
            for host, bridge in BRIDGES.items():
                lab.add_port(bridge, port_name("n", host), vlan, None)
            policy = {"name": "bench", "vms": ["web1"], **policy_document(0)}
            api.post("/api/v1/policies", json=policy).raise_for_status()
            clock = ToolClock(switch)
            engine._install_destination = timed(  # type: ignore[method-assign]
                engine._install_destination, rig, clock, "install"
            )
            engine._take_off_source = timed(  # type: ignore[method-assign]
                engine._take_off_source, rig, clock, "takeoff"
            )
            yield rig
    finally:
        ctl.close()
        database.dispose()


def vm_rules(switch: OpenVswitch, host: str, vm_id: int) -> list[str]:
    return switch.flows(BRIDGES[host], send_cookie(vm_id), VM_RULES_MASK)


def engine_move(rig: EngineRig, lab: Switch) -> dict[str, int]:
    """One move of web1 to the other host, driven through the engine's switch events."""
    source, destination = rig.host, other(rig.host)
    new = lab.add_port(BRIDGES[destination], port_name("v", destination), rig.vlan, rig.mac)
    started = time.perf_counter()
    rig.engine.port_added(destination, rig.mac, new)
    rig.steps["port_added_event"].append(time.perf_counter() - started)
    installed = len(vm_rules(rig.switch, destination, rig.vm_id))
    lab.del_port(BRIDGES[source], port_name("v", source))
    started = time.perf_counter()
    rig.engine.port_removed(source, rig.mac, rig.ofport)
    rig.steps["port_removed_event"].append(time.perf_counter() - started)
    redirected = len(vm_rules(rig.switch, source, rig.vm_id))
    rig.engine.tick()
    done = list_migrations(rig.ctl, "web1")[0]
    if done.phase != "done":
        raise RuntimeError(f"the move ended {done.phase}: {done.detail}")
    rig.host, rig.ofport = destination, new
    return {"installed": installed, "redirected": redirected}


@dataclass
class HandMoved:
    """The VM an operator moves by hand: where it is, its port."""

    vlan: int
    host: str = "hv1"
    ofport: int = 0
    steps: dict[str, list[float]] = field(default_factory=lambda: {"install": [], "takeoff": []})


def hand_setup(lab: Switch, switch: OpenVswitch, moved: HandMoved, rules: int) -> int:
    """The hand-moved VM's port on its host with the compiled rules of the same policy;
    the number of rules."""
    if not moved.ofport:
        moved.ofport = lab.add_port(
            BRIDGES[moved.host], port_name("p", moved.host), moved.vlan, None
        )
    facts = PortFacts(PEER_VM_ID, PEER_MAC, moved.ofport, moved.vlan, (PEER_IPV4,))
    compiled = compile_port(parse_policy("bench", policy_document(rules)), facts, {})
    cookie = [(send_cookie(PEER_VM_ID), VM_RULES_MASK)]
    switch.change_flows(BRIDGES[other(moved.host)], cookie, [])
    switch.change_flows(BRIDGES[moved.host], cookie, [*compiled.send, *compiled.receive])
    return len(compiled.send) + len(compiled.receive)


def hand_move(lab: Switch, moved: HandMoved, scratch: Path) -> int:
    """The move as an operator scripts it with ovs-ofctl; the number of rules moved."""
    source, destination = moved.host, other(moved.host)
    old = moved.ofport
    new = lab.add_port(BRIDGES[destination], port_name("p", destination), moved.vlan, None)
    cookie = f"cookie={send_cookie(PEER_VM_ID):#x}/{VM_RULES_MASK:#x}"
    started = time.perf_counter()
    dumped = lab.ofctl("--no-stats", "--no-names", "dump-flows", BRIDGES[source], cookie)
    rewritten = [
        re.sub(rf"\b(in_port=|output:){old}\b", rf"\g<1>{new}", line.strip())
        for line in dumped.splitlines()
        if line.strip()
    ]
    scratch.write_text("\n".join(rewritten) + "\n")
    lab.ofctl("add-flows", BRIDGES[destination], str(scratch))
    moved.steps["install"].append(time.perf_counter() - started)
    lab.del_port(BRIDGES[source], port_name("p", source))
    started = time.perf_counter()
    lab.ofctl("del-flows", BRIDGES[source], cookie)
    moved.steps["takeoff"].append(time.perf_counter() - started)
    moved.host, moved.ofport = destination, new
    return len(rewritten)


def step_figures(steps: dict[str, list[float]]) -> dict[str, Any]:
    """Median and p90 of each step and of both together, in ms."""
    both = [a + b for a, b in zip(steps["install"], steps["takeoff"], strict=True)]
    figures = {f"{step}_ms": ms(times) for step, times in steps.items()}
    return {**figures, "total_ms": ms(both)}


def rule_moves(reps: int) -> list[dict[str, Any]]:
    """Per size: the engine's and the by-hand move's times, `reps` moves each, interleaved."""
    fixed = fixed_rules()
    results = []
    with temporary_lab(2), tempfile.TemporaryDirectory(prefix="vmfb") as tmp:
        lab = Switch()
        try:
            with engine_rig(Path(tmp), lab) as rig:
                moved = HandMoved(vlan=rig.vlan + 1)
                for size in SIZES:
                    rules = max(0, size - fixed)
                    body = policy_document(rules)
                    rig.api.put("/api/v1/policies/bench", json=body).raise_for_status()
                    vm_rule_count = len(vm_rules(rig.switch, rig.host, rig.vm_id))
                    hand_rules = hand_setup(lab, rig.switch, moved, rules)
                    counts: dict[str, int] = {}
                    for rep in range(reps + 1):  # the first of each is a warm-up
                        if rep == 1:
                            for times in (*rig.steps.values(), *moved.steps.values()):
                                times.clear()
                        counts = engine_move(rig, lab)
                        if hand_move(lab, moved, Path(tmp) / "flows.txt") != hand_rules:
                            raise RuntimeError(f"the hand move lost some of {hand_rules} rules")
                    ours = step_figures(rig.steps)
                    peer = step_figures(moved.steps)
                    results.append(
                        {
                            "size": size,
                            "policy_rules": rules,
                            "vm_openflow_rules": vm_rule_count,
                            "installed_on_destination": counts["installed"],
                            "left_on_source_redirected": counts["redirected"],
                            "by_hand_rules": hand_rules,
                            "vmfabric": {**ours, "tool_runs": dict(rig.tool_runs)},
                            "ovs_ofctl_by_hand": peer,
                            "ratio_median_total": round(
                                ours["total_ms"]["median"] / peer["total_ms"]["median"], 2
                            ),
                        }
                    )
        finally:
            lab.clean()
    return results


# (2) Ping loss during a lab migration ---------------------------------------------------

POLICY = {
    "name": "icmp-in",
    "vms": ["web1"],
    "rules": [{"direction": "ingress", "action": "allow", "protocol": "icmp", "peer": CIDR}],
}
_REPLY = re.compile(r"^\[(\d+\.\d+)\] .*icmp_seq=(\d+)")
_SENT = re.compile(r"(\d+) packets transmitted")


def start_ping(vm: str, address: str, interval: float) -> subprocess.Popen[str]:
    """iputils ping inside the lab VM's namespace, timestamped, until interrupted."""
    namespace = lifecycle.vm_namespace(vm)
    return subprocess.Popen(
        ["ip", "netns", "exec", namespace, "ping", "-D", "-n", "-i", str(interval), address],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def stop_ping(process: subprocess.Popen[str]) -> dict[str, float]:
    """Sent (all but the last request, which may still be in flight), lost, duplicates,
    the longest time between two answers in ms, and when it began (Unix time)."""
    process.send_signal(signal.SIGINT)
    out, _ = process.communicate(timeout=10)
    transmitted = _SENT.search(out)
    if transmitted is None:
        raise RuntimeError(f"ping printed no summary: {out[-300:]}")
    sent = int(transmitted[1]) - 1
    answers = [(float(m[1]), int(m[2])) for m in map(_REPLY.match, out.splitlines()) if m]
    answered = {seq for _, seq in answers if seq <= sent}
    times = sorted(at for at, _ in answers)
    gap, since = max(((b - a, a) for a, b in itertools.pairwise(times)), default=(0.0, 0.0))
    return {
        "sent": sent,
        "lost": sent - len(answered),
        "dups": len(answers) - len({seq for _, seq in answers}),
        "gap_ms": round(gap * 1000, 1),
        "gap_at": since,
    }


class MoveWatch(threading.Thread):
    """Looks at the switch every few milliseconds during a move: when the VM's destination
    port appeared and its source port left (the switch-over), when the source's receive
    rules sent to a peer link, and how many packets they counted (a lower bound: the switch
    updates rule statistics about once a second)."""

    def __init__(self, bridge: str, cookie: int, mac: str) -> None:
        super().__init__(daemon=True)
        self.bridge, self.cookie, self.mac = bridge, cookie, mac
        self.redirects: list[float] = []
        self.both_ports: list[float] = []
        self.source_gone: float | None = None
        self.packets = 0
        self.stopping = threading.Event()
        self.access = switch_access()

    def run(self) -> None:
        match = f"cookie={self.cookie:#x}/-1"
        marked = f'external_ids:attached-mac="{self.mac}"'
        while not self.stopping.wait(0.002):
            ports = self.access.run(
                "ovs-vsctl", "--bare", "--columns=name", "find", "interface", marked
            ).split()
            now = time.time()
            if len(ports) > 1:
                self.both_ports.append(now)
            elif self.both_ports and self.source_gone is None:
                self.source_gone = now
            dumped = self.access.run("ovs-ofctl", "--no-names", "dump-flows", self.bridge, match)
            redirects = [line for line in dumped.splitlines() if "output:" in line]
            redirects = [line for line in redirects if "reg7=" not in line]
            if redirects:
                self.redirects.append(time.time())
                counts = (int(m[1]) for m in map(_PACKETS.search, redirects) if m)
                self.packets = max(self.packets, sum(counts))

    def stop(self) -> None:
        self.stopping.set()
        self.join()


_PACKETS = re.compile(r"\bn_packets=(\d+)")


def web1_id(mac: str, bridge: str) -> int:
    """The VM id in the cookie of the receive rules that match web1's MAC."""
    kind = f"cookie={RECEIVE_KIND << 48:#x}/{KIND_MASK:#x}"
    dumped = switch_access().run("ovs-ofctl", "--no-stats", "dump-flows", bridge, kind)
    cookies = {cookie_of(line) for line in dumped.splitlines() if f"dl_dst={mac}" in line}
    if len(cookies) != 1:
        raise RuntimeError(f"web1's receive rules not found on {bridge}: {dumped}")
    return cookies.pop() & ((1 << 48) - 1)


def ping_moves(redirect: bool, moves: int, watched: int, interval: float) -> dict[str, Any]:
    """`moves` moves of web1 between hv1 and hv2 while peer2 (hv2) and peer3 (hv3) ping it,
    then `watched` more with the switch watched (their losses left out: the watching costs
    CPU the lab's switch and the pings share)."""
    env = {"VMFABRIC_MIGRATION_REDIRECT": "1" if redirect else "0"}
    per_peer: dict[str, list[dict[str, float]]] = {"peer2": [], "peer3": []}
    seconds: list[float] = []
    timeline: dict[str, list[float]] = {
        "destination_port_appeared": [],
        "longest_gap_began": [],
        "source_port_left": [],
        "redirect_rules_from": [],
    }
    lasted: list[float] = []
    packets = 0
    with controller_lab(3, env=env) as lab:
        api = ApiClient(lab.url)
        api.post("/networks", {"name": "lan", "cidrs": [CIDR]})
        for name, host, image in (
            ("web1", "hv1", "debian12"),
            ("peer2", "hv2", "alpine"),
            ("peer3", "hv3", "alpine"),
        ):
            api.post(
                "/vms", {"name": name, "host": host, "image": image, "nics": [{"network": "lan"}]}
            )
        addresses = {vm: wait_for_ipv4(vm, timeout=30) for vm in ("web1", "peer2", "peer3")}
        if not all(addresses.values()):
            raise RuntimeError(f"no address for some VMs: {addresses}")
        web = str(addresses["web1"])
        api.post("/policies", POLICY)
        mac = api.get("/vms/web1")["nics"][0]["mac"]
        cookie = where_cookie(web1_id(mac, BRIDGES["hv1"]))
        for move in range(moves + watched):
            source, destination = ("hv1", "hv2") if move % 2 == 0 else ("hv2", "hv1")
            pingers = {peer: start_ping(peer, web, interval) for peer in per_peer}
            watch = MoveWatch(BRIDGES[source], cookie, mac)
            time.sleep(0.3)
            if move >= moves:
                watch.start()
            started, wall = time.perf_counter(), time.time()
            view = api.post("/vms/web1/migrate", {"to": destination})
            took = time.perf_counter() - started
            time.sleep(0.3)
            if move >= moves:
                watch.stop()
            results = {peer: stop_ping(process) for peer, process in pingers.items()}
            if view["phase"] != "done":
                raise RuntimeError(f"move {move + 1} ended {view['phase']}: {view['detail']}")
            if move < moves:
                seconds.append(took)
                for peer, result in results.items():
                    per_peer[peer].append(result)
                continue
            gaps = [r["gap_at"] for r in results.values()]
            moments = {
                "destination_port_appeared": watch.both_ports[:1],
                "longest_gap_began": [statistics.median(gaps)],
                "source_port_left": [watch.source_gone] if watch.source_gone else [],
                "redirect_rules_from": watch.redirects[:1],
            }
            for what, at in moments.items():
                timeline[what] += [moment - wall for moment in at]
            if watch.redirects:
                lasted.append(watch.redirects[-1] - watch.redirects[0])
            packets += watch.packets
    return {
        "moves": moves,
        "migrate_call_ms": ms(seconds),
        **{peer: loss_figures(results) for peer, results in per_peer.items()},
        "watched_moves": {
            "moves": watched,
            "ms_after_the_call": {what: ms(at) for what, at in timeline.items() if at},
            "with_redirect_rules": len(lasted),
            **({"redirect_rules_lasted_ms": ms(lasted)} if lasted else {}),
            "packets_through_redirect_rules_at_least": packets,
        },
    }


def loss_figures(results: list[dict[str, float]]) -> dict[str, Any]:
    lost = [r["lost"] for r in results]
    gaps = [r["gap_ms"] for r in results]
    return {
        "sent": int(sum(r["sent"] for r in results)),
        "lost": int(sum(lost)),
        "dups": int(sum(r["dups"] for r in results)),
        "lost_per_move": {"median": statistics.median(lost), "max": max(lost)},
        "longest_gap_ms": {"median": statistics.median(gaps), "max": max(gaps)},
        "lost_each_move": lost,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--reps", type=int, default=12, help="moves per size and method")
    parser.add_argument("--moves", type=int, default=20, help="lab migrations per mode")
    parser.add_argument("--watched", type=int, default=4, help="more, with the switch watched")
    parser.add_argument("--interval", type=float, default=0.002, help="seconds between pings")
    parser.add_argument("--quick", action="store_true", help="3 reps, 4 + 2 moves per mode")
    parser.add_argument("--skip-rules", action="store_true")
    parser.add_argument("--skip-ping", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.reps, args.moves, args.watched = 3, 4, 2
    if os.geteuid() != 0:
        sys.exit("needs root (the lab)")
    figures: dict[str, Any] = {"bench": "policy_move"}
    if not args.skip_rules:
        figures["target_ms_at_1000"] = 100
        figures["reps"] = args.reps
        figures["rule_moves"] = rule_moves(args.reps)
    if not args.skip_ping:
        with_redirect = ping_moves(True, args.moves, args.watched, args.interval)
        without = ping_moves(False, args.moves, args.watched, args.interval)
        lost = {
            mode: sum(result[peer]["lost"] for peer in ("peer2", "peer3"))
            for mode, result in (("on", with_redirect), ("off", without))
        }
        figures["ping"] = {
            "interval_s": args.interval,
            "redirect_on": with_redirect,
            "redirect_off": without,
            "ratio_lost_on_over_off": round(lost["on"] / lost["off"], 2) if lost["off"] else None,
        }
    print(json.dumps(figures))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
