"""Failover scenarios on a real 3-node cluster: real agents, etcd, supervisord and VIPs in namespaces.

Each test samples every node's VIP and service processes continuously (`sampler`)
and asserts that they were never on two nodes at once. Bounds are generous: the
benchmark (scripts/bench) measures the actual times.
"""
from __future__ import annotations

import signal
import time

import pytest
from lab import wait_until

pytestmark = pytest.mark.e2e

TTL = 2


def settle(cluster, sampler, probe, expect="n1", timeout=30.0):
    """Wait until exactly `expect` holds VIP + service and answers on the VIP."""
    wait_until(lambda: sampler.holder() == expect, timeout, f"{expect} to hold the VIP and the service")
    wait_until(lambda: probe.last() == expect, 10, f"the VIP to answer from {expect}")


def gone_from(sampler, node):
    return not any(sampler.sample()[node])


def test_start_elects_the_preferred_node(make_cluster, sampler, probe):
    cluster = make_cluster()
    settle(cluster, sampler, probe, "n1")
    status = cluster.status()
    assert status["services"]["web"]["owner"] == "n1"
    assert status["services"]["web"]["candidates"] == ["n1", "n2", "n3"]
    assert all(n["alive"] for n in status["nodes"].values())
    answer = cluster.lab.run("cl", ["python3", "-c", "import urllib.request as u; print(u.build_opener("
                                    "u.ProxyHandler({})).open('http://198.18.0.100:8080/').read().decode())"])
    assert answer.stdout.split() == ["n1", str(status["services"]["web"]["fencing_token"])], \
        "the program sees its fencing token in ETCDHA_FENCING_TOKEN"
    time.sleep(1)  # keep sampling a little: nobody else starts a copy
    assert sampler.violations == []


@pytest.mark.parametrize("fault", [signal.SIGKILL, signal.SIGSTOP], ids=["kill-9", "sigstop"])
def test_dead_or_hung_agent_loses_its_service_before_takeover(make_cluster, sampler, probe, fault):
    cluster = make_cluster()
    settle(cluster, sampler, probe, "n1")
    token_before = cluster.status()["services"]["web"]["fencing_token"]
    owner = cluster.nodes["n1"]
    t0 = time.monotonic()
    owner.signal(fault)
    wait_until(lambda: gone_from(sampler, "n1"), TTL, "n1's service and VIP to be gone within the lease TTL")
    t_gone = time.monotonic()
    wait_until(lambda: probe.first_answer_after(t0, exclude="n1"), TTL + 5, "another node to answer on the VIP")
    assert probe.first_answer_after(t0, exclude="n1") > t_gone
    new = sampler.holder()
    assert new == "n2", "the next preferred node takes over"
    assert cluster.status()["services"]["web"]["fencing_token"] > token_before
    if fault == signal.SIGSTOP:
        owner.signal(signal.SIGCONT)  # the agent wakes up fenced and must not start a second copy
        wait_until(lambda: "rejoining" in owner.log.read_text(), 10, "n1 to notice it was fenced")
        wait_until(lambda: cluster.status()["nodes"]["n1"]["alive"], 10, "n1 to rejoin")
        time.sleep(2)
        assert sampler.holder() == "n2"
    assert sampler.violations == []


def test_cut_from_etcd_fences_itself_and_does_not_come_back(make_cluster, sampler, probe):
    cluster = make_cluster()
    settle(cluster, sampler, probe, "n1")
    owner = cluster.nodes["n1"]
    t0 = time.monotonic()
    owner.cut_etcd_link()  # the VIP stays reachable for clients: only the fence prevents two copies
    wait_until(lambda: gone_from(sampler, "n1"), TTL, "n1 to fence itself within the lease TTL")
    wait_until(lambda: probe.first_answer_after(t0, exclude="n1"), TTL + 5, "another node to answer on the VIP")
    assert sampler.holder() == "n2"
    owner.heal()
    wait_until(lambda: cluster.status()["nodes"]["n1"]["alive"], 15, "n1 to rejoin after the link returns")
    time.sleep(2)
    assert sampler.holder() == "n2", "no failback, no second copy"
    assert sampler.violations == []


def test_sigterm_hands_over_at_once(make_cluster, sampler, probe):
    cluster = make_cluster({"lease_ttl": 6})
    settle(cluster, sampler, probe, "n1")
    t0 = time.monotonic()
    cluster.nodes["n1"].signal(signal.SIGTERM)
    wait_until(lambda: probe.first_answer_after(t0, exclude="n1"), 6, "another node to answer on the VIP")
    took = probe.first_answer_after(t0, exclude="n1") - t0
    assert took < 3.0, f"graceful hand-over took {took:.2f}s, expected well under the 6 s TTL"
    assert sampler.holder() == "n2"
    wait_until(lambda: not cluster.nodes["n1"].alive(), 10, "n1's agent to exit")
    assert cluster.nodes["n1"].proc.returncode == 0
    assert sampler.violations == []


def test_etcd_restart_changes_nothing_and_watches_resume(lab, make_cluster, sampler, probe):
    # a long reconcile interval: after the restart, only a working watch explains a quick takeover
    cluster = make_cluster({"lease_ttl": 8, "reconcile_interval": 60})
    settle(cluster, sampler, probe, "n1")
    before = cluster.status()["services"]["web"]
    lab.etcd.restart()
    time.sleep(3)
    after = cluster.status()["services"]["web"]
    assert (after["owner"], after["fencing_token"]) == (before["owner"], before["fencing_token"])
    assert sampler.holder() == "n1"
    assert cluster.fenced() == [], "fence fired across an etcd restart"
    t0 = time.monotonic()
    cluster.nodes["n1"].signal(signal.SIGTERM)
    wait_until(lambda: probe.first_answer_after(t0, exclude="n1"), 8, "takeover after the etcd restart")
    assert probe.first_answer_after(t0, exclude="n1") - t0 < 4.0, "the watch did not resume after the restart"
    assert sampler.violations == []


def test_program_that_cannot_stay_up_moves_to_another_node(make_cluster, sampler, probe):
    broken = {"web": {"command": ["false"], "vip": "198.18.0.100/24", "interface": "eth0", "priority": 120,
                      "startretries": 1}}
    cluster = make_cluster(per_node={"n1": {"services": broken}})
    settle(cluster, sampler, probe, "n2", timeout=40)
    status = cluster.status()["services"]["web"]
    assert status["owner"] == "n2"
    assert "n1" not in status["candidates"], "n1 steps aside while it cools down"
    assert "released web" in cluster.nodes["n1"].log.read_text()
    assert not any(sampler.sample()["n1"])
    assert sampler.violations == []


def test_after_etcd_was_down_longer_than_the_ttl_fenced_nodes_rejoin_at_once(lab, make_cluster, sampler, probe):
    """Owners fence themselves while etcd is down; when it is back, etcd still holds their old
    leases (it extends leases on restart). An agent revokes its own abandoned lease at once
    instead of waiting for it to expire as if another agent held its name."""
    cluster = make_cluster()
    settle(cluster, sampler, probe, "n1")
    lab.etcd.stop()
    wait_until(lambda: "n1" in cluster.fenced(), TTL + 3, "the owner to fence itself while etcd is down")
    lab.etcd.start()
    back = time.monotonic()
    wait_until(lambda: all(n["alive"] for n in cluster.status()["nodes"].values()), 10, "every node to rejoin")
    rejoined = time.monotonic() - back
    wait_until(lambda: sampler.holder() is not None, 15, "a node to run web again")
    assert "revoked our previous lease" in cluster.nodes["n1"].log.read_text()
    assert "(our previous run?)" not in cluster.nodes["n1"].log.read_text()
    assert rejoined < TTL + 3, f"rejoining took {rejoined:.1f}s after etcd came back"
    assert sampler.violations == []
