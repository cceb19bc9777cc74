"""Health checks on a real 3-node cluster: a hung or broken program is restarted in place, then migrated.

The sampler runs throughout (every node's VIP and every process of the service, in its
cgroup or not): a restart or a migration never leaves two copies.
"""
from __future__ import annotations

import json
import os
import signal
import sys
import time

import pytest
from lab import PORT, VIP, sample_service_command, wait_until

pytestmark = pytest.mark.e2e

URL = f"http://{VIP}:{PORT}/"


def web(checks: list[dict], *flags: str, **extra) -> dict:
    return {"services": {"web": {"command": sample_service_command("web", PORT, *flags), "vip": f"{VIP}/24",
                                 "interface": "eth0", "checks": checks, **extra}}}


def history(cluster) -> list[dict]:
    res = cluster.cli("history", "web", "--json")
    return json.loads(res.stdout) if res.returncode == 0 else []


def events(cluster, node: str = "") -> list[str]:
    return [e["event"] for e in history(cluster) if not node or e["node"] == node]


def settle(sampler, probe, expect="n1"):
    wait_until(lambda: sampler.holder() == expect, 30, f"{expect} to hold the VIP and the service")
    wait_until(lambda: probe.last() == expect, 10, f"the VIP to answer from {expect}")


def no_fence(cluster) -> None:
    """Nobody fenced itself or lost its lease while checks failed, hung or were killed."""
    assert "fenced" not in events(cluster)
    logs = cluster.logs()
    for sign in ("fencing this node", "the fence exited", "has expired", "lost: stopping everything"):
        assert sign not in logs, f"{sign!r} in the agents' logs"


def test_a_hung_program_is_restarted_in_place_and_answers_again(make_cluster, sampler, probe):
    checks = [{"http": URL, "interval": 0.5, "timeout": 0.4, "failure_threshold": 2}]
    cluster = make_cluster(web(checks, max_restarts=2))
    settle(sampler, probe)
    n1 = cluster.nodes["n1"]
    wait_until(lambda: cluster.status()["services"]["web"]["health"] == "passing", 15, "web's check to pass")
    hung = n1.program_pid()
    os.kill(hung, signal.SIGSTOP)  # keeps its socket, answers nothing: what a deadlock looks like from outside
    wait_until(lambda: n1.program_pid() not in (None, hung), 15, "n1 to restart web")
    restarted = time.monotonic()
    wait_until(lambda: probe.first_answer_after(restarted) and probe.last() == "n1", 15, "web to answer from n1 again")
    assert not os.path.exists(f"/proc/{hung}"), "the hung process was killed, not left behind"
    status = cluster.status()["services"]["web"]
    assert status["owner"] == "n1"
    assert status["failures"]["n1"]["count"] == 1 and status["failures"]["n1"]["check"] == "http"
    wait_until(lambda: "recovered" in events(cluster, "n1"), 15, "the recovery in history")
    seen = events(cluster, "n1")
    assert seen.index("check-failed") < seen.index("restarted") < seen.index("recovered")
    failed = next(e for e in history(cluster) if e["event"] == "check-failed")
    assert failed["detail"].startswith("http: "), failed
    assert sampler.violations == []
    no_fence(cluster)


def test_a_broken_program_is_restarted_then_migrated_and_cleanup_clears_the_count(make_cluster, sampler, probe):
    checks = [{"http": URL, "interval": 0.5, "timeout": 0.4, "failure_threshold": 2}]
    cluster = make_cluster(
        {"failure_cooldown": 600},
        per_node={"n1": web(checks, "--status=500", max_restarts=2), "n2": web(checks, max_restarts=2),
                  "n3": web(checks, max_restarts=2)})
    wait_until(lambda: "migrated" in events(cluster, "n1"), 60, "n1 to give web up after its restarts")
    assert events(cluster, "n1").count("restarted") == 2, events(cluster, "n1")
    settle(sampler, probe, "n2")
    status = cluster.status()["services"]["web"]
    assert status["owner"] == "n2"
    assert status["failures"]["n1"]["count"] == 3  # two restarts, then the failure that migrated it
    assert "HTTP 500" in status["failures"]["n1"]["output"]
    assert status["cooling_down"] == ["n1"]
    assert "n1" not in status["candidates"]
    assert "3 check failure(s) on n1 (http)" in cluster.cli("status").stdout
    res = cluster.cli("cleanup", "web")
    assert res.returncode == 0 and "cleared 1 cooldown(s) and 1 fail count(s)" in res.stdout, res
    wait_until(lambda: "n1" in cluster.status()["services"]["web"]["candidates"], 10, "n1 to be a candidate again")
    status = cluster.status()["services"]["web"]
    assert status["failures"] == {} and status["cooling_down"] == [] and status["owner"] == "n2"
    assert sampler.violations == []
    no_fence(cluster)


@pytest.mark.parametrize("kind", ["tcp", "exec"])
def test_a_tcp_or_exec_check_fails_and_recovers(make_cluster, sampler, probe, lab, tmp_path, kind):
    """The check's target breaks (a port closes, a command fails), the agent restarts web, the target heals."""
    flag = tmp_path / "broken"
    if kind == "tcp":
        check = {"tcp": f"{VIP}:8099"}
    else:
        check = {"exec": ["/bin/sh", "-c", f'test ! -e {flag} || {{ echo "flag is up"; exit 3; }}']}
    cluster = make_cluster(web([{**check, "interval": 0.5, "timeout": 0.4, "failure_threshold": 2}],
                               max_restarts=20))
    listener = None

    def listen():
        return lab.popen("n1", [sys.executable, "-c", "import socket,time; s=socket.socket(); "
                                f"s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind(('{VIP}', 8099)); "
                                "s.listen(); time.sleep(600)"])
    try:
        settle(sampler, probe)
        if kind == "tcp":
            listener = listen()
        wait_until(lambda: cluster.status()["services"]["web"]["health"] == "passing", 20, "the check to pass")
        if kind == "tcp":
            listener.kill()
            listener.wait(5)
        else:
            flag.write_text("")
        wait_until(lambda: "restarted" in events(cluster, "n1"), 20, f"the {kind} check to fail and web to restart")
        failed = next(e for e in history(cluster) if e["event"] == "check-failed")
        assert failed["detail"].startswith(f"{kind}: "), failed
        if kind == "exec":
            assert "exit 3" in failed["detail"] and "flag is up" in failed["detail"], failed
        if kind == "tcp":
            listener = listen()
        else:
            flag.unlink()
        wait_until(lambda: "recovered" in events(cluster, "n1"), 20, "the check to pass again")
        assert cluster.status()["services"]["web"]["owner"] == "n1"
        wait_until(lambda: cluster.status()["services"]["web"]["health"] == "passing", 10, "status to say passing")
    finally:
        if listener is not None:
            listener.kill()
            listener.wait(5)
    assert sampler.violations == []
    no_fence(cluster)


def test_a_hanging_check_counts_as_failed_is_killed_and_never_delays_the_lease(make_cluster, sampler, probe):
    checks = [{"exec": ["/bin/sh", "-c", "sleep 1000 & sleep 1000"], "name": "stuck", "interval": 0.3,
               "timeout": 0.2, "failure_threshold": 3}]
    cluster = make_cluster(web(checks, max_restarts=1))
    wait_until(lambda: "restarted" in events(cluster, "n1"), 30, "the hanging check to fail and web to restart")
    failed = next(e for e in history(cluster) if e["event"] == "check-failed")
    assert "stuck: " in failed["detail"] and ("timed out" in failed["detail"] or "no answer" in failed["detail"])
    wait_until(lambda: "migrated" in events(cluster, "n1"), 30, "n1 to give web up after its restart")
    n1 = cluster.nodes["n1"]
    checks_dir = n1.cgroup / "services" / "_checks"
    wait_until(lambda: not any(p.read_text().split() for p in checks_dir.rglob("cgroup.procs")), 10,
               "every hung check (and what it started) to be killed")
    lease_left = [cluster.status()["nodes"]["n1"]["lease_ttl_left"] for _ in range(3)]
    assert all(left is not None and left >= 1 for left in lease_left), lease_left
    assert sampler.violations == []
    no_fence(cluster)
