"""etcd on the nodes themselves: the crash of the node that is both the owner and the etcd leader.

Its own lab (Lab(colocated=True)): no etcd namespace, one etcd member in each node's namespace,
with the settings of deploy/etcd-colocated.example (heartbeat 50 ms, election 300 ms) and agents
to match (etcd.election_timeout 0.3, keepalive_interval 0.25, their own member listed first). The crash kills every
process of the node at once, its etcd member included, so the service waits for an etcd election
and then for the dead owner's lease; the survivors must renew through that election, not fence.
"""
from __future__ import annotations

import json
import time

import lab as L
import pytest
from lab import wait_until

pytestmark = pytest.mark.e2e

TTL = 2


@pytest.fixture(scope="module")
def colab(lab, request):  # after the session lab exists, so skips and ordering are shared
    with L.Lab(colocated=True, name="c") as the_lab:
        members = []
        try:
            members = L.start_colocated_etcd(the_lab)
            the_lab.members = members
            yield the_lab
        finally:
            for member in members:
                member.stop()
            the_lab.keep_files = bool(request.session.testsfailed)  # logs stay only to read a failure


def test_crash_of_the_owner_that_is_the_etcd_leader(colab):
    members = {m.role: m for m in colab.members}
    prefix = "/colo"
    cluster = L.Cluster(colab, members["n1"], prefix, {"lease_ttl": TTL}, L.colocated_settings(colab, prefix))
    probe = L.Probe(colab)
    try:
        with L.Sampler(colab) as sampler:
            cluster.start()
            owner = wait_until(sampler.holder, 30, "an owner of web")
            wait_until(lambda: probe.last() == owner, 10, f"the VIP to answer from {owner}")
            # whoever leads etcd now, make it another node first, then the owner: two elections the
            # agents must ride through (checked below), and the owner is the etcd leader
            L.move_etcd_leader(colab.members, next(m for n, m in members.items() if n != owner))
            L.move_etcd_leader(colab.members, members[owner])
            time.sleep(1)
            assert sampler.holder() == owner and L.etcd_leader(colab.members) is members[owner]
            token = cluster.status()["services"]["web"]["fencing_token"]
            marks = L.log_sizes(cluster)

            t0 = time.monotonic()
            L.crash_node(cluster.nodes[owner])
            assert not members[owner].alive(), "the crash took the node's etcd member with it"
            took = wait_until(lambda: probe.first_answer_after(t0, exclude=owner), 15,
                              "another node to answer on the VIP") - t0
            new = wait_until(sampler.holder, 5, "one node to hold web")
            assert new != owner
            time.sleep(2)  # keep sampling: nobody fences late, nobody starts a second copy

            survivors = [n for n in colab.node_names if n != owner]
            assert L.fenced_since(cluster, marks, exclude=[owner]) == {}, \
                "a surviving node fenced itself or lost its lease"
            assert L.fenced_since(cluster, {}, exclude=[owner]) == {}, "fenced before the crash (the leader move)"
            assert all(cluster.nodes[n].alive() for n in survivors)
            status = cluster.status()
            assert status["services"]["web"]["owner"] == new
            assert status["services"]["web"]["fencing_token"] > token
            history = cluster.cli("history", "web", "--json")
            assert history.returncode == 0, history.stderr
            events = json.loads(history.stdout)
            assert [e for e in events if e["event"] == "fenced"] == [], history.stdout
            assert [e["node"] for e in events if e["event"] == "claimed"][-1] == new
            assert sampler.violations == []
            assert sampler.samples > 100
            print(f"colocated crash of {owner} (owner + etcd leader): {new} answered after {took:.2f}s")
    except BaseException:
        print(cluster.logs())
        raise
    finally:
        probe.stop()
        cluster.stop()
