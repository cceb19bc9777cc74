"""Metrics: /health's verdict from the agent's last cycle, and what a scrape shows (no HTTP, no agent)."""
from __future__ import annotations

import pytest
from prometheus_client.exposition import generate_latest

from etcdha import metrics
from etcdha.metrics import Metrics, Snapshot
from etcdha.model import Event

pytestmark = pytest.mark.unit

FRESH = Snapshot(at=100.0, lease_state="OK", lease_left=1.5, owned=frozenset({"web"}),
                 programs={"web": "RUNNING", "db": "STOPPED"}, processes={"web": 3}, health={"web": "passing"},
                 failures={"web": 2}, etcd_ok=True)


@pytest.mark.parametrize("snapshot, now, healthy, why", [
    (Snapshot(), 100.0, False, "starting: no cycle yet"),
    (FRESH, 105.0, True, "ok"),
    (FRESH, 111.0, False, "the agent's loop has not run for 11.0s"),
    (Snapshot(at=100.0, lease_state="SUSPENDED"), 100.5, False, "lease SUSPENDED"),
    (Snapshot(at=100.0, lease_state="OK", node_unhealthy=True), 100.5, False, "a node check fails"),
])
def test_health_verdicts(snapshot, now, healthy, why):
    assert metrics.health(snapshot, now, stale_after=10.0) == (healthy, why)


def test_a_scrape_shows_state_counters_and_histograms():
    m = Metrics("n1", stale_after=10.0, clock=lambda: 101.0)
    m.update(FRESH)
    m.event(Event("web", 1.0, "n1", "claimed", "vacant", 5))
    m.event(Event("web", 2.0, "n1", "fenced", "lease lost", 5))
    m.etcd_call("claim", 0.004, None)
    m.etcd_call("put", 1.0, "UNAVAILABLE")
    m.claim_to_running.observe(1.2)
    text = generate_latest(m.registry).decode()
    for line in ('etcdha_lease_state{state="OK"} 1.0', 'etcdha_lease_state{state="LOST"} 0.0',
                 "etcdha_lease_ttl_left_seconds 1.5", "etcdha_services_owned 1.0", "etcdha_healthy 1.0",
                 'etcdha_service_owned{service="web"} 1.0', 'etcdha_service_owned{service="db"} 0.0',
                 'etcdha_service_running{service="web"} 1.0', 'etcdha_service_program_state{service="db",state="STOPPED"} 1.0',
                 'etcdha_service_processes{service="web"} 3.0', 'etcdha_service_check_healthy{service="web"} 1.0',
                 'etcdha_service_check_failures{service="web"} 2.0',
                 'etcdha_transitions_total{event="claimed",reason="vacant"} 1.0', "etcdha_fence_firings_total 1.0",
                 'etcdha_etcd_request_seconds_count{method="claim"} 1.0',
                 'etcdha_etcd_errors_total{code="UNAVAILABLE",method="put"} 1.0',
                 "etcdha_claim_to_running_seconds_count 1.0"):
        assert line in text, line


def test_the_example_alert_rules_use_only_metrics_the_agent_exports():
    import re
    from pathlib import Path

    import yaml

    rules = yaml.safe_load((Path(__file__).resolve().parents[2] / "deploy" / "prometheus-rules.yml").read_text())
    exprs = [r["expr"] for g in rules["groups"] for r in g["rules"]]
    m = Metrics("n1", stale_after=10.0, clock=lambda: 101.0)
    m.update(FRESH)
    m.event(Event("web", 1.0, "n1", "migrated", "unhealthy", 5))
    m.etcd_call("put", 1.0, "UNAVAILABLE")
    exported = {line.split("{")[0].split(" ")[0] for line in generate_latest(m.registry).decode().splitlines()
                if line and not line.startswith("#")}
    used = {name for e in exprs for name in re.findall(r"\betcdha_[a-z_]+", e)}
    assert used and used <= exported, used - exported
