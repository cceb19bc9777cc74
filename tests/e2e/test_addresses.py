"""VIP hygiene: leftovers from a crash are removed; a VIP answered by a foreign host is never duplicated."""
from __future__ import annotations

import time

import pytest
from lab import VIP, wait_until

pytestmark = pytest.mark.e2e


def test_leftover_vip_is_removed_at_start(lab, make_cluster, sampler, probe):
    lab.run("n2", ["ip", "addr", "add", f"{VIP}/24", "dev", "eth0"])  # as if n2 had crashed holding it
    assert lab.vip_on("n2")
    cluster = make_cluster()
    wait_until(lambda: not lab.vip_on("n2"), 15, "n2's agent to remove the leftover VIP")
    wait_until(lambda: sampler.holder() == "n1", 30, "n1 to hold the service")
    assert "removed leftover VIP" in cluster.nodes["n2"].log.read_text()
    assert sampler.violations == []


def test_vip_answered_by_a_foreign_host_is_not_duplicated(lab, make_cluster, sampler, probe):
    lab.run("cl", ["ip", "addr", "add", f"{VIP}/24", "dev", "eth0"])  # some other machine has the address
    try:
        cluster = make_cluster({"failure_cooldown": 3})
        wait_until(lambda: "already answered" in cluster.nodes["n1"].log.read_text(), 30,
                   "n1 to detect the address conflict")
        time.sleep(1)
        assert not any(lab.vip_on(n) for n in lab.node_names), "no node may add a VIP that answers elsewhere"
    finally:
        lab.run("cl", ["ip", "addr", "del", f"{VIP}/24", "dev", "eth0"])
    # once the foreign address is gone, the cluster takes the service (after the cooldown)
    wait_until(lambda: sampler.holder() is not None, 30, "a node to take the service once the conflict is gone")
    wait_until(lambda: probe.last() is not None, 10, "the VIP to answer")
    assert sampler.violations == []
