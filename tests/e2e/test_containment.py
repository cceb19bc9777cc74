"""Containment on a real 3-node cluster: no process of a service outlives its ownership, whatever dies.

The services here misbehave on purpose (sample_service.py flags): they leave a
detached helper behind (setsid + double fork, so neither supervisord nor a
process group holds it, only the service's cgroup), daemonize, or start children
that ignore SIGTERM. The sampler finds every such process on every node, by its
command-line marker and by cgroup membership, and fails on any second copy.
"""
from __future__ import annotations

import os
import signal
import sys
import time

import pytest
from lab import VIP, sample_service_command, wait_until

pytestmark = pytest.mark.e2e


def web(*flags: str, **extra) -> dict:
    return {"services": {"web": {"command": sample_service_command("web", 8080, *flags), "vip": f"{VIP}/24",
                                 "interface": "eth0", **extra}}}


def settle(sampler, probe, expect="n1", timeout=30.0):
    wait_until(lambda: sampler.holder() == expect, timeout, f"{expect} to hold the VIP and the service")
    wait_until(lambda: probe.last() == expect, 10, f"the VIP to answer from {expect}")


def gone(sampler, node) -> bool:
    return not any(sampler.sample()[node])


def test_killing_the_owners_fence_kills_every_service_process_before_anyone_claims(make_cluster, sampler, probe):
    cluster = make_cluster(web("--orphan"))
    settle(sampler, probe)
    n1 = cluster.nodes["n1"]
    wait_until(lambda: len(n1.service_pids()) >= 2, 10, "web and its detached helper to run on n1")
    fence, supervisord = n1.fence_pid(), n1.supervisord_pid()
    assert fence and supervisord
    t0 = time.monotonic()
    os.kill(fence, signal.SIGKILL)
    wait_until(lambda: gone(sampler, "n1"), 1.0, "every process of web (the detached helper too) and the VIP "
                                                 "to be gone from n1 within 1 s of its fence's death")
    t_gone = time.monotonic()
    wait_until(lambda: probe.first_answer_after(t0, exclude="n1"), 10, "another node to answer on the VIP")
    assert probe.first_answer_after(t0, exclude="n1") > t_gone
    wait_until(lambda: cluster.status()["nodes"]["n1"]["alive"], 15, "n1 to rejoin with a new fence")
    assert n1.fence_pid() not in (None, fence)
    time.sleep(1)
    assert sampler.violations == []


def test_killing_the_owners_supervisord_ten_times_never_makes_two_copies(make_cluster, sampler, probe):
    cluster = make_cluster(web("--orphan"))
    settle(sampler, probe)
    for round_ in range(10):
        owner = wait_until(sampler.holder, 20, f"round {round_}: one node to hold web")
        node = cluster.nodes[owner]
        supervisord = wait_until(node.supervisord_pid, 10, f"round {round_}: {owner}'s supervisord")
        os.kill(supervisord, signal.SIGKILL)
        wait_until(lambda: gone(sampler, owner), 2, f"round {round_}: web to be gone from {owner}")
        wait_until(lambda: sampler.holder() not in (None, owner), 15, f"round {round_}: another node to take web")
        wait_until(lambda: cluster.status()["nodes"][owner]["alive"], 15, f"round {round_}: {owner} to rejoin")
    assert sampler.violations == []
    assert sampler.samples > 100


def test_a_daemonizing_program_never_runs_twice_and_history_says_why(make_cluster, sampler):
    cluster = make_cluster({**web("--daemonize", startsecs=1, startretries=1), "failure_cooldown": 60})
    wait_until(lambda: any(e["event"] == "failed" for e in history(cluster)), 40,
               "a node to give web up as a daemonizing program")
    failed = [e for e in history(cluster) if e["event"] == "failed"]
    assert "program daemonized" in failed[0]["reason"] and "foreground" in failed[0]["reason"]
    wait_until(lambda: len({e["node"] for e in history(cluster) if e["event"] == "failed"}) >= 2, 60,
               "the next node to try and give it up too")
    wait_until(lambda: not any(node.service_pids() for node in cluster.nodes.values() if
                               node.name in {e["node"] for e in history(cluster) if e["event"] == "failed"}),
               10, "the daemons of the nodes that gave web up to be dead")
    assert sampler.violations == []


def history(cluster) -> list[dict]:
    import json

    res = cluster.cli("history", "web", "--json")
    return json.loads(res.stdout) if res.returncode == 0 else []


def test_children_that_ignore_sigterm_are_killed_before_a_planned_move(make_cluster, sampler, probe):
    cluster = make_cluster(web("--child-ignores-term", stopwaitsecs=1))
    settle(sampler, probe)
    n1 = cluster.nodes["n1"]
    wait_until(lambda: len(n1.service_pids()) >= 2, 10, "web and its stubborn child to run on n1")
    t0 = time.monotonic()
    res = cluster.cli("move", "web", "--to", "n2", "--wait", "--timeout", "20")
    assert res.returncode == 0, res.stderr
    wait_until(lambda: probe.first_answer_after(t0, exclude="n1"), 10, "n2 to answer on the VIP")
    assert probe.first_answer_after(t0, exclude="n1") - t0 >= 1.0, "the move waited for stopwaitsecs"
    assert n1.service_pids() == []
    assert sampler.holder() == "n2"
    assert sampler.violations == []


def test_leftovers_of_a_killed_agent_and_fence_die_when_the_agent_starts_again(make_cluster, sampler, probe):
    # Without systemd nothing kills them before the restart (in production the unit's KillMode does);
    # the agent must kill them before it joins, so the next owner never runs beside them.
    cluster = make_cluster({**web("--orphan"), "lease_ttl": 4})
    settle(sampler, probe)
    n1 = cluster.nodes["n1"]
    wait_until(lambda: len(n1.service_pids()) >= 2, 10, "web and its detached helper to run on n1")
    fence = n1.fence_pid()
    os.kill(n1.pid, signal.SIGKILL)
    os.kill(fence, signal.SIGKILL)
    n1.proc.wait(5)
    wait_until(lambda: n1.service_pids(), 2, "the detached helper to outlive its agent, fence and supervisord")
    n1.start()  # as systemd's Restart= would
    wait_until(lambda: not n1.service_pids(), 5, "the restarted agent to kill the leftover")
    wait_until(lambda: sampler.holder() is not None, 20, "a node to run web again")
    wait_until(lambda: n1.log.read_text().count("joined as n1") == 2, 20, "the restarted n1 to join")
    log = n1.log.read_text()
    restart = log.rindex("agent n1 starting")
    killed = log.index("killing leftover processes from a previous run", restart)
    joined = log.index("joined as n1", restart)
    assert killed < joined
    time.sleep(1)
    assert sampler.violations == []


# ---- an agent crash is a handoff, not a TTL wait -----------------------------------------------

def test_an_agent_crash_is_a_handoff_not_a_ttl_wait(make_cluster, sampler, probe):
    """kill -9 of the agent: the fence kills and verifies, then revokes the lease; n2 takes over
    at once, long before the 6 s TTL would have run out."""
    cluster = make_cluster({**web("--orphan"), "lease_ttl": 6})
    settle(sampler, probe)
    t0 = time.monotonic()
    cluster.nodes["n1"].signal(signal.SIGKILL)
    wait_until(lambda: probe.first_answer_after(t0, exclude="n1"), 6, "another node to answer on the VIP")
    took = probe.first_answer_after(t0, exclude="n1") - t0
    assert took < 2.0, f"takeover took {took:.2f}s after an agent crash; the TTL is 6 s"
    assert sampler.holder() == "n2"
    assert "handed over: revoked lease" in cluster.nodes["n1"].log.read_text()
    time.sleep(0.5)
    assert sampler.violations == []


def test_stop_post_hands_over_when_agent_and_fence_died_together(make_cluster, sampler, probe):
    """What systemd's ExecStopPost= runs after it killed the unit: here the agent and fence die
    together and a detached helper survives; `etcdha stop-post` kills it, drops the VIP and
    revokes the lease, so n2 takes over long before the 6 s TTL."""
    cluster = make_cluster({**web("--orphan"), "lease_ttl": 6})
    settle(sampler, probe)
    n1 = cluster.nodes["n1"]
    wait_until(lambda: len(n1.service_pids()) >= 2, 10, "web and its detached helper to run on n1")
    fence = n1.fence_pid()
    os.kill(n1.pid, signal.SIGKILL)
    os.kill(fence, signal.SIGKILL)
    n1.proc.wait(5)
    t0 = time.monotonic()
    res = cluster.lab.run("n1", [sys.executable, "-m", "etcdha", "stop-post", "--config", str(n1.dir / "agent.yaml")])
    assert res.returncode == 0, res.stderr
    assert "handed over: revoked lease" in res.stderr, res.stderr
    assert not n1.service_pids() and not cluster.lab.vip_on("n1")
    wait_until(lambda: probe.first_answer_after(t0, exclude="n1"), 6, "another node to answer on the VIP")
    assert probe.first_answer_after(t0, exclude="n1") - t0 < 2.0
    time.sleep(0.5)
    assert sampler.violations == []


def test_a_crashed_program_is_restarted_at_once_not_at_the_next_poll(make_cluster, sampler, probe):
    """The cgroup emptying wakes the agent: a restart well before the 2 s safety-net poll."""
    cluster = make_cluster()
    settle(sampler, probe)
    n1 = cluster.nodes["n1"]
    wait_until(lambda: cluster.status()["services"]["web"]["state"] == "RUNNING", 10, "web to be RUNNING")
    old = n1.service_pids()
    t0 = time.monotonic()
    for pid in old:
        os.kill(pid, signal.SIGKILL)
    wait_until(lambda: (lambda now: now and not set(now) & set(old))(n1.service_pids()), 3,
               "a new web process on n1")
    took = time.monotonic() - t0
    assert took < 1.0, f"the restart began {took:.2f}s after the crash"
    wait_until(lambda: probe.last() == "n1", 10, "the VIP to answer from n1 again")
    assert sampler.violations == []
