#!/usr/bin/env python3
"""Demo: a 3-node etcdha cluster in network namespaces, then two failovers, narrated.

Brings up etcd and three agents that share one service (an HTTP server on VIP
198.18.0.100 that also leaves a detached helper process behind, as daemons do),
shows `etcdha status`, hangs the program (SIGSTOP) so its health check restarts it in place,
kills the owner's agent with SIGKILL and shows who answers
on the VIP over time, kills the next owner's fence to show that every process of
the service - the detached one too - dies with its cgroup, moves the service by
hand (`etcdha move`), then stops the owner's agent gracefully.
Everything is removed at the end (or on Ctrl-C). `--keep` leaves the cluster
running until Ctrl-C so you can poke at it.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
import time

import lab as L


STUBBORN = ("   (a graceful hand-over waits for the stop: web's detached helper ignores SIGTERM, so it is killed\n"
            "   only after stopwaitsecs, 2 s; a program that exits on SIGTERM hands over in about 0.3 s, see the README)")


def say(text: str) -> None:
    print(f"\n\033[1m==> {text}\033[0m", flush=True)


def timeline(probe: L.Probe, t0: float, t1: float) -> str:
    """Compress the probe's answers into 'from +Xs: who' lines."""
    lines, current = [], object()
    for t, who in probe.answers:
        if t0 <= t <= t1 and who != current:
            lines.append(f"   +{t - t0:6.3f}s  {'answered by ' + who if who else 'no answer'}")
            current = who
    return "\n".join(lines)


def failover(cluster: L.Cluster, sampler: L.Sampler, probe: L.Probe, sig: int, label: str) -> None:
    owner = sampler.holder()
    say(f"{label}: sending {signal.Signals(sig).name} to the agent of the owner, {owner}")
    t0 = time.monotonic()
    cluster.nodes[owner].signal(sig)
    L.wait_until(lambda: probe.first_answer_after(t0, exclude=owner), 20, "another node to answer")
    time.sleep(1)
    print(timeline(probe, t0 - 0.2, time.monotonic()))
    took = probe.first_answer_after(t0, exclude=owner) - t0
    print(f"   the VIP answered from {sampler.holder()} {took:.2f}s after the fault "
          f"(lease_ttl is {cluster.nodes[owner].config()['lease_ttl']}s)")
    if sig == signal.SIGTERM:
        print(STUBBORN)
    print(L.sh(sys.executable, "-m", "etcdha", "--version").stdout.strip(), "status now:")
    show_status(cluster)


def fence_killed(cluster: L.Cluster, sampler: L.Sampler, probe: L.Probe) -> None:
    owner = sampler.holder()
    node = cluster.nodes[owner]
    L.wait_until(lambda: len(node.service_pids()) >= 2, 10, "web and its detached helper")
    pids = node.service_pids()
    say(f"containment: kill -9 of {owner}'s fence while web runs {len(pids)} processes in its cgroup "
        "(one detached with setsid, unknown to supervisord)")
    t0 = time.monotonic()
    os.kill(node.fence_pid(), signal.SIGKILL)
    L.wait_until(lambda: not any(L.running(p) for p in pids), 5, "web's processes to die", interval=0.005)
    gone = time.monotonic() - t0
    L.wait_until(lambda: probe.first_answer_after(t0, exclude=owner), 20, "another node to answer")
    time.sleep(0.5)
    print(timeline(probe, t0 - 0.2, time.monotonic()))
    print(f"   all {len(pids)} processes of web on {owner} were gone {gone * 1000:.0f} ms after its fence died; "
          f"{sampler.holder()} answered {probe.first_answer_after(t0, exclude=owner) - t0:.2f}s after it")


def hung_program(cluster: L.Cluster, sampler: L.Sampler, probe: L.Probe) -> None:
    owner = sampler.holder()
    node = cluster.nodes[owner]
    L.wait_until(lambda: cluster.status()["services"]["web"]["health"] == "passing", 20, "web's check to pass")
    hung = L.wait_until(node.program_pid, 10, "web's program")
    say(f"a hung program: SIGSTOP to web on {owner} (pid {hung}); it keeps its socket and its VIP, supervisord "
        "still says RUNNING, and it answers nothing; its http check (every 1s, 2 failures) notices")
    t0 = time.monotonic()
    os.kill(hung, signal.SIGSTOP)
    L.wait_until(lambda: node.program_pid() not in (None, hung), 20, f"{owner} to restart web")
    restarted = time.monotonic()
    L.wait_until(lambda: probe.first_answer_after(restarted), 20, "the restarted web to answer")
    time.sleep(1.5)
    print(timeline(probe, t0 - 0.2, time.monotonic()))
    print(f"   restarted in place on {owner}: answering again {probe.first_answer_after(restarted) - t0:.2f}s after "
          f"the hang (new pid {node.program_pid()}; the hung one was killed)")
    res = cluster.cli("history", "web", "--limit", "6")
    print("   etcdha history web --limit 6:\n   " + res.stdout.strip().replace("\n", "\n   "))
    show_status(cluster)


def planned_move(cluster: L.Cluster, sampler: L.Sampler, probe: L.Probe) -> None:
    owner = sampler.holder()
    say(f"planned move: etcdha move web (from {owner} to the best other live candidate)")
    t0 = time.monotonic()
    res = cluster.cli("move", "web")
    print("   " + (res.stdout + res.stderr).strip().replace("\n", "\n   "))
    L.wait_until(lambda: probe.first_answer_after(t0, exclude=owner), 20, "the target to answer")
    time.sleep(0.5)
    print(timeline(probe, t0 - 0.2, time.monotonic()))
    print(STUBBORN)
    res = cluster.cli("history", "web")
    print("   etcdha history web:\n   " + res.stdout.strip().replace("\n", "\n   "))


def show_status(cluster: L.Cluster) -> None:
    res = cluster.cli("status")
    print("   " + (res.stdout or res.stderr).strip().replace("\n", "\n   "))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", action="store_true", help="keep the cluster running until Ctrl-C")
    args = parser.parse_args()
    say("creating network namespaces (switch, etcd, client, n1..n3) on 198.18.0.0/24")
    with L.Lab() as lab:
        etcd = L.Etcd(lab)
        web = {"command": L.sample_service_command("web", L.PORT, "--orphan"), "vip": f"{L.VIP}/24",
               "interface": "eth0", "max_restarts": 3,
               "checks": [{"http": f"http://{L.VIP}:{L.PORT}/", "interval": 1, "timeout": 0.5, "failure_threshold": 2}]}
        cluster = L.Cluster(lab, etcd, "/etcdha", {"services": {"web": web}})
        probe = None
        try:
            etcd.start()
            print(f"   etcd is up at {etcd.endpoint} in namespace {lab.ns('etcd')}")
            say("starting three agents; n1 has the highest priority for service 'web'")
            with L.Sampler(lab) as sampler:
                cluster.start()
                probe = L.Probe(lab)
                L.wait_until(lambda: sampler.holder(), 30, "an owner")
                L.wait_until(lambda: probe.last(), 10, "the VIP to answer")
                print(f"   {L.VIP}:{L.PORT} answers from {probe.last()}")
                show_status(cluster)
                hung_program(cluster, sampler, probe)
                failover(cluster, sampler, probe, signal.SIGKILL, "crash")
                fence_killed(cluster, sampler, probe)
                planned_move(cluster, sampler, probe)
                failover(cluster, sampler, probe, signal.SIGTERM, "agent stopped")
                say(f"invariant: {sampler.samples} samples of every node's VIP and processes, "
                    f"{len(sampler.violations)} with two copies")
                for v in sampler.violations:
                    print("   VIOLATION", v)
                if args.keep:
                    say("cluster left running; try, in another shell:")
                    print(f"   ip netns exec {lab.ns('cl')} {sys.executable} -m etcdha "
                          f"--endpoints {etcd.endpoint} status\n   Ctrl-C here tears everything down")
                    signal.sigwait({signal.SIGINT, signal.SIGTERM})
                lab.keep_files = bool(sampler.violations)  # the logs stay only to read a failure
                return 1 if sampler.violations else 0
        finally:
            say("tearing down" + (f"; logs and data stay in {lab.workdir}" if lab.keep_files else ""))
            if probe:
                probe.stop()
            cluster.stop()
            etcd.stop()


if __name__ == "__main__":
    sys.exit(main())
