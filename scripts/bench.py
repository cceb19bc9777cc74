#!/usr/bin/env python3
"""Failover benchmark (not a test): repeats faults on a 3-node namespace cluster and prints percentiles.

For each trial it takes the current owner, injects the fault, and measures from the
fault to the first answer on the VIP from another node ("takeover"), and the longest
stretch without any answer ("gap"). The faulted agent is then restarted so every trial
sees three nodes. The invariant sampler runs throughout; any double copy is reported.
"""
from __future__ import annotations

import argparse
import os
import platform
import signal
import statistics
import sys
import time

import lab as L

# how each fault is injected on the owner: a signal to its agent, kill -9 of one of its helpers, or a move
SCENARIOS = {"kill-9": signal.SIGKILL, "node-crash": "node", "sigterm": signal.SIGTERM, "fence-kill-9": "fence",
             "supervisord-kill-9": "supervisord", "move": None}


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(p / 100 * len(ordered) + 0.5) - 1))]


def summary(name: str, values: list[float]) -> str:
    if not values:
        return f"{name:<28} no data"
    return (f"{name:<28} n={len(values):<3} min {min(values):6.3f}  median {statistics.median(values):6.3f}  "
            f"p90 {pct(values, 90):6.3f}  max {max(values):6.3f}")


def trial(cluster: L.Cluster, sampler: L.Sampler, probe: L.Probe, sig, ttl: float) -> tuple[float, float]:
    owner = L.wait_until(sampler.holder, 30, "an owner")
    L.wait_until(lambda: probe.last() == owner, 10, f"the VIP to answer from {owner}")
    time.sleep(0.3)
    t0 = time.monotonic()
    if sig is None:  # planned move: the CLI from the client namespace, to the best other candidate
        res = cluster.cli("move", "web", "--no-wait")
        if res.returncode:
            raise RuntimeError(f"etcdha move failed: {res.stderr.strip()}")
    elif sig == "node":  # the whole node dies: every process at once and its addresses; no handoff possible
        node = cluster.nodes[owner]
        holder = cluster.lab.holders[owner].pid
        for pid in L.netns_pids(cluster.lab.ns(owner)):
            if pid != holder:
                with L.contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        L.destroy_cgroup(node.cgroup)
        cluster.lab.run(owner, ["ip", "addr", "del", f"{L.VIP}/24", "dev", "eth0"])
    elif sig == "fence":
        os.kill(cluster.nodes[owner].fence_pid(), signal.SIGKILL)
    elif sig == "supervisord":
        os.kill(cluster.nodes[owner].supervisord_pid(), signal.SIGKILL)
    else:
        cluster.nodes[owner].signal(sig)
    first = L.wait_until(lambda: probe.first_answer_after(t0, exclude=owner), ttl + 15, "takeover")
    time.sleep(0.2)
    gap = probe.longest_gap(t0, first)
    if sig is None:
        return first - t0, gap  # nothing was killed: every node stays in the game
    # bring the faulted node back as a candidate for the next trial
    node = cluster.nodes[owner]
    node.stop()
    node.start()
    L.wait_until(lambda: cluster.status()["nodes"].get(owner, {}).get("alive"), 30, f"{owner} to rejoin")
    time.sleep(cluster.nodes[owner].config().get("startup_grace", ttl) + 0.5)
    return first - t0, gap


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=20, help="trials per scenario (default 20)")
    parser.add_argument("--ttl", type=int, default=2, help="lease_ttl in seconds (default 2)")
    parser.add_argument("--scenarios", default=",".join(SCENARIOS), help="comma-separated: " + ", ".join(SCENARIOS))
    args = parser.parse_args()
    scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    for s in scenarios:
        if s not in SCENARIOS:
            parser.error(f"--scenarios: unknown scenario {s!r}; expected some of {', '.join(SCENARIOS)}")
    results: dict[str, tuple[list[float], list[float]]] = {s: ([], []) for s in scenarios}
    with L.Lab() as lab:
        etcd = L.Etcd(lab)
        cluster = L.Cluster(lab, etcd, "/bench", {"lease_ttl": args.ttl})
        probe = None
        try:
            etcd.start()
            with L.Sampler(lab, interval=0.05) as sampler:
                cluster.start()
                probe = L.Probe(lab, duration=7200)
                for name in scenarios:
                    for i in range(args.trials):
                        took, gap = trial(cluster, sampler, probe, SCENARIOS[name], args.ttl)
                        results[name][0].append(took)
                        results[name][1].append(gap)
                        print(f"{name} trial {i + 1}/{args.trials}: takeover {took:.3f}s, gap {gap:.3f}s", flush=True)
                violations = list(sampler.violations)
        finally:
            if probe:
                probe.stop()
            cluster.stop()
            etcd.stop()
    print(f"\netcdha failover benchmark, {time.strftime('%Y-%m-%d')}, {platform.node()}, "
          f"{platform.machine()}, {L.os.cpu_count()} cores, lease_ttl {args.ttl}s, etcd default settings")
    print("seconds from fault (or from launching `etcdha move`, Python start-up included) to the first answer\n"
          "on the VIP from another node (takeover), and the longest window without any answer (gap):")
    for name in scenarios:
        print(summary(f"{name} takeover", results[name][0]))
        print(summary(f"{name} gap", results[name][1]))
    print(f"invariant samples with two copies: {len(violations)}")
    for v in violations:
        print("  ", v)
    return 1 if violations else 0


if __name__ == "__main__":
    sys.exit(main())
