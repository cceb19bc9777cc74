"""A 3-member etcd cluster: losing the etcd leader changes nothing for the services.

Its own lab (three etcd namespaces beside the nodes); agents list all three endpoints.
"""
from __future__ import annotations

import signal
import time

import lab as L
import pytest
from lab import wait_until

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def lab3(lab, request):  # after the session lab exists, so skips and ordering are shared
    with L.Lab(etcd_members=3, name="x") as the_lab:
        members = [L.Etcd(the_lab, role) for role in the_lab.etcd_roles]
        for member in members:
            member.start(wait=False)  # each waits for a quorum: start all, then wait
        try:
            for member in members:
                wait_until(member.healthy, 60, f"etcd member {member.name} to be healthy", interval=0.2)
            the_lab.members = members
            yield the_lab
        finally:
            for member in members:
                member.stop()
            the_lab.keep_files = bool(request.session.testsfailed)  # logs stay only to read a failure


def test_losing_the_etcd_leader_changes_no_owner(lab3):
    cluster = L.Cluster(lab3, lab3.members[0], "/ha", {"lease_ttl": 5})
    probe = L.Probe(lab3)
    try:
        with L.Sampler(lab3) as sampler:
            cluster.start()
            wait_until(lambda: sampler.holder() == "n1", 30, "n1 to hold web")
            wait_until(lambda: probe.last() == "n1", 10, "the VIP to answer from n1")
            before = cluster.status()["services"]["web"]
            leader = next(m for m in lab3.members if m.is_leader())
            leader.stop(signal.SIGKILL)
            time.sleep(7)  # longer than lease_ttl: every owner would have been fenced by now
            after = cluster.status()["services"]["web"]
            assert (after["owner"], after["fencing_token"]) == (before["owner"], before["fencing_token"])
            assert sampler.holder() == "n1"
            assert cluster.fenced() == [], "fenced by an etcd leader change"
            # the agents still work through the two remaining members
            t0 = time.monotonic()
            cluster.nodes["n1"].signal(signal.SIGTERM)
            wait_until(lambda: probe.first_answer_after(t0, exclude="n1"), 10, "n2 to take over")
            assert sampler.holder() == "n2"
            leader.start()
            assert sampler.violations == []
    except AssertionError:
        print(cluster.logs())  # who fenced, and why: the lab is gone after the test
        raise
    finally:
        probe.stop()
        cluster.stop()
