"""Operator commands on a real 3-node cluster: move, drain, pause, history, keys, cleanup.

Every test samples all services on all nodes continuously and fails on any double copy.
"""
from __future__ import annotations

import os
import signal
import time

import lab as L
import pytest
from lab import wait_until

pytestmark = pytest.mark.e2e

THREE = L.services("web", "api", "jobs")


@pytest.fixture
def sampler3(lab):
    with L.Sampler(lab, services={name: s["vip"].split("/")[0] for name, s in THREE.items()}) as s:
        yield s


def settle(sampler, probe, node="n1"):
    wait_until(lambda: sampler.holder() == node, 30, f"{node} to hold web")
    wait_until(lambda: probe.last() == node, 10, f"the VIP to answer from {node}")


def ok(res):
    assert res.returncode == 0, f"exit {res.returncode}: {res.stdout}{res.stderr}"
    return res.stdout


def refused(res, *words):
    assert res.returncode == 1, f"expected exit 1, got {res.returncode}: {res.stdout}{res.stderr}"
    for word in words:
        assert word in res.stderr, f"{word!r} not in {res.stderr!r}"
    assert "Traceback" not in res.stderr


def test_move_with_and_without_target(make_cluster, sampler, probe):
    cluster = make_cluster()
    settle(sampler, probe, "n1")
    out = ok(cluster.cli("move", "web", "--to", "n3"))
    assert "now runs on n3" in out
    wait_until(lambda: sampler.holder() == "n3" and probe.last() == "n3", 10, "the VIP to answer from n3")
    assert "/moves/" not in ok(cluster.cli("keys", "--raw")), "a completed move leaves nothing behind"
    out = ok(cluster.cli("move", "web"))  # the best other live candidate: n1
    assert "now runs on n1" in out
    wait_until(lambda: probe.last() == "n1", 10, "the VIP to answer from n1")
    events = [(e.split()[3], e.split()[4], e.split()[5])
              for e in ok(cluster.cli("history", "web")).splitlines()[1:]
              if e.split()[3] not in ("started", "stopped")]  # ownership only: starts and stops have their tests
    assert events == [("claimed", "n1", "vacant"), ("moved", "n1", "moved"), ("claimed", "n3", "moved"),
                      ("moved", "n3", "moved"), ("claimed", "n1", "moved")]
    # later failovers follow the normal rules: kill n1, the preferred survivor n2 takes it
    cluster.nodes["n1"].signal(signal.SIGKILL)
    wait_until(lambda: sampler.holder() == "n2", 15, "n2 to take over after the move and a crash")
    assert sampler.violations == []


def test_move_to_a_dead_drained_or_wrong_node_is_refused(make_cluster, sampler, probe):
    cluster = make_cluster()
    settle(sampler, probe, "n1")
    cluster.nodes["n3"].stop()
    wait_until(lambda: not cluster.status()["nodes"]["n3"]["alive"], 10, "n3 to be gone")
    refused(cluster.cli("move", "web", "--to", "n3"), "n3 is not alive")
    ok(cluster.cli("drain", "n2"))
    refused(cluster.cli("move", "web", "--to", "n2"), "n2 is drained")
    refused(cluster.cli("move", "web"), "no other live, undrained candidate")
    refused(cluster.cli("move", "web", "--to", "n1"), "already runs on n1")
    res = cluster.cli("move", "nosuch")
    assert res.returncode == 2 and "unknown service 'nosuch'" in res.stderr
    time.sleep(1)
    assert sampler.holder() == "n1", "a refused move changes nothing"
    assert sampler.violations == []


def test_drain_moves_every_service_and_persists_until_undrain(make_cluster, sampler3):
    cluster = make_cluster({"services": THREE})
    wait_until(lambda: all(h == "n1" for h in sampler3.holders().values()), 40, "n1 to run all three")
    out = ok(cluster.cli("drain", "n1", "--wait", "--timeout", "60"))
    assert "n1 owns nothing now" in out
    assert {svc: o["owner"] for svc, o in cluster.status()["services"].items()} == \
        {"web": "n2", "api": "n2", "jobs": "n2"}
    wait_until(lambda: all(h == "n2" for h in sampler3.holders().values()), 10, "n2 to run all three")
    assert len([e for e in ok(cluster.cli("history")).splitlines() if " moved " in e and "drained" in e]) == 3
    plans = [line for line in cluster.nodes["n1"].log.read_text().splitlines() if "plan at revision" in line]
    assert max(line.count("request-move") for line in plans) == 3, "the three moves are requested at once"
    # the mark survives an agent restart: n1 claims nothing new even when n2 goes away
    cluster.nodes["n1"].stop()
    cluster.nodes["n1"].start()
    wait_until(lambda: cluster.status()["nodes"]["n1"]["alive"], 15, "n1 to rejoin")
    assert cluster.status()["nodes"]["n1"]["drained"] is True
    time.sleep(2.5)  # past n1's startup grace
    cluster.nodes["n2"].signal(signal.SIGTERM)
    wait_until(lambda: all(h == "n3" for h in sampler3.holders().values()), 20, "n3 (not drained n1) to take all")
    ok(cluster.cli("undrain", "n1"))
    cluster.nodes["n3"].signal(signal.SIGTERM)
    wait_until(lambda: all(h == "n1" for h in sampler3.holders().values()), 20, "undrained n1 to take all")
    assert sampler3.violations == []


def test_pause_leaves_a_killed_program_alone_until_resume(lab, make_cluster, sampler, probe):
    cluster = make_cluster()
    settle(sampler, probe, "n1")
    # past startsecs: a program that dies while STARTING is retried by supervisord (startretries)
    wait_until(lambda: cluster.status()["services"]["web"]["state"] == "RUNNING", 10, "web to be RUNNING")
    ok(cluster.cli("pause", "web"))
    assert cluster.status()["services"]["web"]["paused"] is True
    for pid in lab.programs("--name=web\0")["n1"]:
        os.kill(pid, signal.SIGKILL)  # the operator works on it by hand
    wait_until(lambda: not lab.programs("--name=web\0")["n1"], 5, "the program to die")
    time.sleep(3)
    assert not any(p for p in lab.programs("--name=web\0").values()), "nobody restarts or moves a paused service"
    assert lab.vip_on("n1"), "the agent does not touch the VIP while paused"
    assert cluster.status()["services"]["web"]["owner"] == "n1"
    ok(cluster.cli("resume", "web"))
    wait_until(lambda: sampler.holder() == "n1", 10, "n1 to restart web after resume")
    wait_until(lambda: probe.last() == "n1", 10, "the VIP to answer again")
    assert sampler.violations == []


def test_a_crashed_program_is_restarted_by_its_owner(lab, make_cluster, sampler, probe):
    cluster = make_cluster()
    settle(sampler, probe, "n1")
    token = cluster.status()["services"]["web"]["fencing_token"]
    for pid in lab.programs("--name=web\0")["n1"]:
        os.kill(pid, signal.SIGKILL)
    wait_until(lambda: lab.programs("--name=web\0")["n1"] and probe.last() == "n1", 10, "web to be restarted on n1")
    assert cluster.status()["services"]["web"]["fencing_token"] == token, "same owner, same token"
    assert sampler.violations == []


def test_keys_agree_with_etcdctl_and_cleanup_clears_a_cooldown(lab, make_cluster, sampler, probe):
    broken = {"web": {"command": ["false"], "vip": f"{L.VIP}/24", "interface": "eth0", "startretries": 0}}
    cluster = make_cluster({"failure_cooldown": 600}, per_node={"n1": {"services": broken}})
    settle(sampler, probe, "n2")
    wait_until(lambda: cluster.status()["services"]["web"]["cooling_down"] == ["n1"], 10, "n1's cooldown to show")
    assert ok(cluster.cli("keys", "--raw")) == lab.etcd.etcdctl("get", "--prefix", cluster.prefix + "/")
    decoded = ok(cluster.cli("keys"))
    assert f"{cluster.prefix}/owners/web" in decoded and "s left)" in decoded
    assert [e.split()[3] for e in ok(cluster.cli("history", "web")).splitlines()[1:]
            if e.split()[3] not in ("started", "stopped")][:3] == ["claimed", "failed", "claimed"]
    assert "cleared 1 cooldown" in ok(cluster.cli("cleanup", "web"))
    wait_until(lambda: "n1" in cluster.status()["services"]["web"]["candidates"], 10, "n1 to be a candidate again")
    assert cluster.status()["services"]["web"]["cooling_down"] == []
    assert sampler.violations == []


def test_cli_against_unreachable_etcd_fails_fast(lab):
    started = time.monotonic()
    res = lab.run("cl", [L.sys.executable, "-m", "etcdha", "--endpoints",
                         "http://198.18.0.9:2379", "--timeout", "2", "status"], timeout=30)
    took = time.monotonic() - started
    refused(res, "198.18.0.9:2379")
    assert took < 10, f"took {took:.1f}s"


def test_move_to_a_target_that_hangs_expires_and_normal_election_resumes(make_cluster, sampler, probe):
    cluster = make_cluster()
    settle(sampler, probe, "n1")
    cluster.nodes["n3"].signal(signal.SIGSTOP)  # alive in etcd for up to its TTL, but it will never claim
    try:
        started = time.monotonic()
        refused(cluster.cli("move", "web", "--to", "n3", "--timeout", "3"), "n3 did not take web within 3s")
        assert time.monotonic() - started < 15
        # the request expired by itself; the preferred live node (n1, not drained) took web back
        wait_until(lambda: sampler.holder() == "n1", 15, "normal election to give web to n1 again")
        assert "/moves/" not in ok(cluster.cli("keys", "--raw"))
    finally:
        cluster.nodes["n3"].signal(signal.SIGCONT)
    assert sampler.violations == []
