"""Metrics and /health served by real agents, scraped from the client namespace during a failover."""
from __future__ import annotations

import json
import re
import signal
import sys

import pytest
from lab import wait_until

pytestmark = pytest.mark.e2e

PORT = 9477
SCRAPE = ("import sys, urllib.request as u, urllib.error as e\n"
          "try:\n r = u.build_opener(u.ProxyHandler({})).open(sys.argv[1], timeout=3); print(r.status); "
          "print(r.read().decode())\n"
          "except e.HTTPError as x:\n print(x.code); print(x.read().decode())\n")


def get(cluster, node: str, path: str) -> tuple[int, str]:
    res = cluster.lab.run("cl", [sys.executable, "-c", SCRAPE, f"http://{cluster.lab.node_ip(node)}:{PORT}{path}"])
    assert res.returncode == 0, res.stderr
    status, _, body = res.stdout.partition("\n")
    return int(status), body


def value(text: str, name: str, **labels: str) -> float:
    """One sample of a scrape (0 if absent)."""
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        m = re.fullmatch(rf"{re.escape(name)}(?:\{{(.*)\}})? (\S+)", line)
        if m and ",".join(sorted((m.group(1) or "").split(","))) == want:
            return float(m.group(2))
    return 0.0


def test_metrics_move_with_a_failover_and_health_follows_the_lease(make_cluster, sampler, probe):
    cluster = make_cluster({"metrics": {"listen": f"0.0.0.0:{PORT}"}})
    wait_until(lambda: sampler.holder() == "n1" and probe.last() == "n1", 30, "n1 to serve web")
    wait_until(lambda: value(get(cluster, "n1", "/metrics")[1], "etcdha_service_running", service="web") == 1, 10,
               "n1's metrics to show web RUNNING")
    _, before = get(cluster, "n2", "/metrics")
    assert value(before, "etcdha_services_owned") == 0
    assert value(before, "etcdha_lease_state", state="OK") == 1
    assert value(before, "etcdha_etcd_request_seconds_count", method="keepalive") > 0
    status, body = get(cluster, "n2", "/health")
    assert status == 200 and json.loads(body) == {"healthy": True, "node": "n2", "reason": "ok"}

    cluster.nodes["n1"].signal(signal.SIGKILL)
    wait_until(lambda: sampler.holder() == "n2", 15, "n2 to take over")
    wait_until(lambda: value(get(cluster, "n2", "/metrics")[1], "etcdha_service_running", service="web") == 1, 10,
               "n2's metrics to show web RUNNING")
    _, after = get(cluster, "n2", "/metrics")
    assert value(after, "etcdha_services_owned") == 1
    assert value(after, "etcdha_service_owned", service="web") == 1
    assert value(after, "etcdha_transitions_total", event="claimed", reason="vacant") == 1
    assert value(after, "etcdha_transitions_total", event="started", reason="owner") == 1
    assert value(after, "etcdha_takeover_seconds_count") == 1
    assert value(after, "etcdha_claim_to_running_seconds_count") == 1
    assert 0 < value(after, "etcdha_claim_to_running_seconds_sum") < 30
    assert 0 < value(after, "etcdha_lease_ttl_left_seconds") <= 2
    assert value(after, "etcdha_fence_firings_total") == 0

    # cut off from etcd, n2 cannot renew: /health turns 503 before its lease runs out (and its fence fires)
    cluster.nodes["n2"].cut_etcd_link()
    try:
        wait_until(lambda: get(cluster, "n2", "/health")[0] == 503, 10, "n2's /health to turn unhealthy")
        reason = json.loads(get(cluster, "n2", "/health")[1])["reason"]
        assert reason.startswith("lease "), reason
        wait_until(lambda: sampler.holder() == "n3", 15, "n3 to take over from the cut-off n2")
    finally:
        cluster.nodes["n2"].heal()
    wait_until(lambda: get(cluster, "n2", "/health")[0] == 200, 30, "n2 healthy again after the link is back")
    wait_until(lambda: value(get(cluster, "n2", "/metrics")[1], "etcdha_fence_firings_total") == 1, 10,
               "n2's fence firing to be counted (recorded when it rejoined)")
    _, text = get(cluster, "n2", "/metrics")
    assert value(text, "etcdha_etcd_errors_total", code="DEADLINE_EXCEEDED", method="keepalive") + \
        value(text, "etcdha_etcd_errors_total", code="UNAVAILABLE", method="keepalive") > 0
    assert sampler.violations == []
