"""Node health and notification hooks on a real 3-node cluster.

A failing node check (or a VIP interface losing carrier) makes a node hand every service
over and claim nothing until it passes; every transition calls the hook exactly once.
The sampler runs throughout: never two copies.
"""
from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import pytest
from lab import PORT, VIP, sample_service_command, wait_until

pytestmark = pytest.mark.e2e


def services(interface: str = "eth0") -> dict:
    return {"web": {"command": sample_service_command("web", PORT), "vip": f"{VIP}/24", "interface": interface},
            "api": {"command": sample_service_command("api", PORT + 1)}}


def owners(cluster) -> dict:
    return {name: s["owner"] for name, s in cluster.status()["services"].items()}


def node_history(cluster) -> list[dict]:
    res = cluster.cli("history", "--json")
    return [e for e in json.loads(res.stdout) if e["service"] == "*"] if res.returncode == 0 else []


def test_a_failing_node_check_hands_everything_over_and_claims_nothing_until_it_passes(make_cluster, sampler,
                                                                                      tmp_path):
    flag = tmp_path / "n1-sick"
    # every node has the check; only n1's flag is ever set
    test = f'test ! -e {tmp_path}/"$ETCDHA_NODE"-sick || {{ echo "maintenance flag"; exit 1; }}'
    check = {"exec": ["/bin/sh", "-c", test],
             "name": "flag", "interval": 0.3, "timeout": 0.3, "failure_threshold": 2}
    cluster = make_cluster({"services": services(), "node_checks": [check]})
    wait_until(lambda: owners(cluster) == {"web": "n1", "api": "n1"}, 30, "n1 to own web and api")
    wait_until(lambda: sampler.holder() == "n1", 10, "n1 to hold web")
    flag.write_text("")
    wait_until(lambda: owners(cluster) == {"web": "n2", "api": "n2"}, 20, "n1 to hand both over to n2")
    wait_until(lambda: sampler.holder() == "n2", 10, "n2 to hold web")
    node = cluster.status()["nodes"]["n1"]
    assert node["unhealthy"] == "flag: exit 1: maintenance flag" and node["alive"]
    assert "node n1 is unhealthy: flag: exit 1: maintenance flag" in cluster.cli("status").stdout
    # n1 claims nothing while sick: when n2 dies, n3 takes over although n1 is preferred
    cluster.nodes["n2"].signal(signal.SIGKILL)
    wait_until(lambda: owners(cluster) == {"web": "n3", "api": "n3"}, 20, "n3 (not the sick n1) to take over")
    flag.unlink()
    wait_until(lambda: cluster.status()["nodes"]["n1"]["unhealthy"] is None, 20, "n1 to be healthy again")
    assert owners(cluster) == {"web": "n3", "api": "n3"}, "no failback: services stay where they are"
    res = cluster.cli("move", "web", "--to", "n1", "--wait", "--timeout", "20")
    assert res.returncode == 0, res.stderr  # a candidate again
    wait_until(lambda: sampler.holder() == "n1", 10, "n1 to hold web again")
    events = [(e["event"], e["node"]) for e in node_history(cluster)]
    assert events == [("node-unhealthy", "n1"), ("node-healthy", "n1")], events
    assert sampler.violations == []


def test_a_vip_interface_without_carrier_makes_the_node_hand_over(make_cluster, sampler, lab):
    # the VIP on an interface of its own (a veth pair inside the node), so etcd stays reachable over eth0;
    # taking the peer down takes vip0's carrier away while vip0 itself stays up: a pulled cable
    for node in lab.node_names:
        lab.run(node, ["ip", "link", "del", "vip0"])
        assert lab.run(node, ["ip", "link", "add", "vip0", "type", "veth", "peer", "name", "vip0p"]).returncode == 0
        for dev in ("vip0", "vip0p"):
            assert lab.run(node, ["ip", "link", "set", dev, "up"]).returncode == 0
    try:
        cluster = make_cluster({"services": services("vip0")})
        wait_until(lambda: sampler.holder() == "n1", 30, "n1 to hold web")
        assert lab.run("n1", ["ip", "link", "set", "vip0p", "down"]).returncode == 0
        wait_until(lambda: owners(cluster) == {"web": "n2", "api": "n2"}, 20, "n1 to hand everything to n2")
        wait_until(lambda: sampler.holder() == "n2", 10, "n2 to hold web")
        assert "vip0 has no carrier" in cluster.status()["nodes"]["n1"]["unhealthy"]
        assert lab.run("n1", ["ip", "link", "set", "vip0p", "up"]).returncode == 0
        wait_until(lambda: cluster.status()["nodes"]["n1"]["unhealthy"] is None, 20, "n1 healthy again")
        assert sampler.violations == []
    finally:
        for node in lab.node_names:
            lab.run(node, ["ip", "link", "del", "vip0"])


RECORDER = ("import json, os, sys; open(sys.argv[1], 'a').write(json.dumps("
            "{k: v for k, v in os.environ.items() if k.startswith('ETCDHA_')}) + chr(10))")


def calls(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_every_transition_of_a_failover_calls_the_hook_exactly_once(make_cluster, sampler, tmp_path):
    per_node = {n: {"notify": {"command": [sys.executable, "-c", RECORDER, str(tmp_path / f"{n}.jsonl")],
                               "timeout": 5}} for n in ("n1", "n2", "n3")}
    cluster = make_cluster({"services": {"web": services()["web"]}}, per_node=per_node)
    wait_until(lambda: [c["ETCDHA_EVENT"] for c in calls(tmp_path / "n1.jsonl")] == ["claimed", "started"], 30,
               "n1's hook to be called for claimed and started")
    token1 = cluster.status()["services"]["web"]["fencing_token"]
    cluster.nodes["n1"].proc.terminate()  # graceful: stop, release; n2 claims and starts
    cluster.nodes["n1"].proc.wait(20)
    wait_until(lambda: [c["ETCDHA_EVENT"] for c in calls(tmp_path / "n2.jsonl")] == ["claimed", "started"], 20,
               "n2's hook to be called for claimed and started")
    time.sleep(1)  # nothing more comes
    n1 = calls(tmp_path / "n1.jsonl")
    assert [c["ETCDHA_EVENT"] for c in n1] == ["claimed", "started", "stopped", "released"], n1
    n2 = calls(tmp_path / "n2.jsonl")
    assert [c["ETCDHA_EVENT"] for c in n2] == ["claimed", "started"], n2
    assert calls(tmp_path / "n3.jsonl") == []
    assert all(c["ETCDHA_SERVICE"] == "web" for c in n1 + n2)
    assert {c["ETCDHA_NODE"] for c in n1} == {"n1"} and {c["ETCDHA_NODE"] for c in n2} == {"n2"}
    assert {c["ETCDHA_FENCING_TOKEN"] for c in n1} == {str(token1)}
    assert int(n2[0]["ETCDHA_FENCING_TOKEN"]) > token1 and n2[0]["ETCDHA_REASON"] == "vacant"
    assert n1[-1]["ETCDHA_REASON"] == "agent stopped"
    assert all(abs(float(c["ETCDHA_TIME"]) - time.time()) < 120 and c["ETCDHA_TIME_ISO"].endswith("Z")
               for c in n1 + n2)
    assert sampler.violations == []


def test_a_hook_that_hangs_is_killed_at_its_timeout_and_nothing_waits_for_it(make_cluster, sampler, probe, lab):
    hang = ["/bin/sh", "-c", "sleep 987 & sleep 987"]
    cluster = make_cluster({"services": {"web": services()["web"]}, "notify": {"command": hang, "timeout": 0.5}})
    wait_until(lambda: sampler.holder() == "n1", 30, "n1 to hold web despite its hanging hooks")
    t0 = time.monotonic()
    cluster.nodes["n1"].signal(signal.SIGKILL)
    wait_until(lambda: probe.first_answer_after(t0, exclude="n1"), 10, "n2 to answer on the VIP")
    assert probe.first_answer_after(t0, exclude="n1") - t0 < 5, "the takeover did not wait for hooks"

    def hooks_left() -> list[int]:
        found = []
        for pid in os.listdir("/proc"):
            try:
                if pid.isdigit() and Path(f"/proc/{pid}/cmdline").read_bytes() == b"sleep\x00987\x00":
                    found.append(int(pid))
            except OSError:
                pass
        return found

    wait_until(lambda: not hooks_left(), 5, "every hanging hook (and its child) to be killed")
    assert "killed after its timeout of 0.5s" in cluster.logs()
    assert sampler.violations == []
