"""report.status JSON shape and report.table rows, from hand-built views."""
from __future__ import annotations

import json

import pytest

from etcdha import report
from etcdha.model import UNKNOWN_OWNER, Candidate, ClusterView, Failures, NodeInfo, Owner

pytestmark = pytest.mark.unit

T0 = 1700000000.0  # 2023-11-14T22:13:20Z


def cluster() -> ClusterView:
    return ClusterView(
        revision=123,
        nodes={"a": NodeInfo(node="a", lease=0xA1, pid=4242, started=T0, services={"web": "RUNNING"},
                             processes={"web": 3}),
               "b": NodeInfo(node="b", lease=0xB1, pid=77, started=T0 + 60, services={"web": "STOPPED"},
                             processes={"web": 0})},
        candidates={"web": {"a": Candidate("a", 200, "198.18.0.100/24"), "b": Candidate("b", 100, "198.18.0.100/24"),
                            "c": Candidate("c", 999, "198.18.0.100/24")},
                    "db": {"b": Candidate("b", 1)}},
        owners={"web": Owner(node="a", lease=0xA1, token=57, since=T0 + 5)},
        members=frozenset({"a", "b", "c"}),
        services={"web": "198.18.0.100/24", "db": None, "idle": None},
        problems=("/etcdha/nodes/z: value is not JSON: b'x'",),
    )


def test_status_shape():
    doc = report.status(cluster())
    assert set(doc) >= {"services", "nodes"}
    assert doc["revision"] == 123
    assert set(doc["services"]) == {"web", "db", "idle"}
    assert set(doc["nodes"]) == {"a", "b", "c"}
    json.dumps(doc)  # JSON-serialisable as is


def test_status_owned_service():
    web = report.status(cluster())["services"]["web"]
    assert web == {
        "owner": "a",
        "state": "RUNNING",
        "vip": "198.18.0.100/24",
        "since": "2023-11-14T22:13:25Z",
        "fencing_token": 57,
        "candidates": ["a", "b"],  # c is dead: not a live candidate
        "paused": False,
        "moving_to": None,
        "cooling_down": [],
        "processes": {"a": 3},  # b's empty cgroup is not listed
        "health": None,  # no checks configured
        "failures": {},
    }


def test_status_health_and_failures_that_still_count():
    now = T0 + 1000
    base = cluster()
    view = ClusterView(
        revision=5, nodes={"a": NodeInfo(node="a", lease=0xA1, services={"web": "RUNNING"}, health={"web": "failing"})},
        candidates=base.candidates, owners=base.owners, members=base.members, services=base.services,
        failures={("web", "a"): Failures(times=(now - 700, now - 30), timeout=600, check="http",
                                         output="HTTP 500: broken"),
                  ("web", "b"): Failures(times=(now - 900,), timeout=600, check="tcp", output="refused")})
    doc = report.status(view, now=now)
    web = doc["services"]["web"]
    assert web["health"] == "failing"
    # the failure 700 s ago no longer counts (failure_timeout 600); b's only one expired: not listed
    assert web["failures"] == {"a": {"count": 1, "last": report._iso(now - 30), "check": "http",
                                     "output": "HTTP 500: broken"}}
    row = next(line.split() for line in report.table(doc).splitlines() if line.startswith("web "))
    assert row[:5] == ["web", "a", "RUNNING", "0", "failing"]
    assert "1 check failure(s) on a (http)" in " ".join(row)


def test_status_vacant_services():
    services = report.status(cluster())["services"]
    assert services["db"]["owner"] is None
    assert services["db"]["state"] == "STOPPED"
    assert services["db"]["fencing_token"] is None and services["db"]["since"] is None
    assert services["db"]["candidates"] == ["b"]
    assert services["idle"]["owner"] is None and services["idle"]["candidates"] == []


def test_status_nodes_alive_and_dead():
    nodes = report.status(cluster())["nodes"]
    assert nodes["a"] == {"alive": True, "pid": 4242, "started": "2023-11-14T22:13:20Z", "lease": "a1",
                          "owns": ["web"], "drained": False, "unhealthy": None, "lease_ttl_left": None,
                          "processes": {"web": 3}}
    assert nodes["b"]["alive"] is True and nodes["b"]["owns"] == []
    assert nodes["c"] == {"alive": False, "pid": None, "started": None, "lease": None, "owns": [],
                          "drained": False, "unhealthy": None, "lease_ttl_left": None, "processes": {}}


def test_owner_on_dead_node_state_unknown():
    v = ClusterView(revision=1, owners={"web": Owner(node="gone", lease=5, token=9)},
                    members=frozenset({"gone"}), services={"web": None})
    doc = report.status(v)
    assert doc["services"]["web"]["owner"] == "gone"
    assert doc["services"]["web"]["state"] == "UNKNOWN"
    assert doc["nodes"]["gone"]["alive"] is False
    assert doc["nodes"]["gone"]["owns"] == ["web"]


def test_service_known_only_from_owner_and_vip_from_candidate():
    v = ClusterView(revision=1, owners={"x": Owner(node=UNKNOWN_OWNER, lease=5, token=9)},
                    candidates={"y": {"a": Candidate("a", 1, "10.0.0.9/24")}}, services={"y": None})
    services = report.status(v)["services"]
    assert services["x"]["owner"] == UNKNOWN_OWNER
    assert services["x"]["since"] is None  # since 0 means unknown
    assert services["y"]["vip"] == "10.0.0.9/24"


def test_status_problems_listed():
    assert report.status(cluster())["problems"] == ["/etcdha/nodes/z: value is not JSON: b'x'"]


def test_empty_view():
    assert report.status(ClusterView(revision=0)) == {"revision": 0, "services": {}, "nodes": {}, "problems": []}


def test_table_contains_rows():
    text = report.table(report.status(cluster()))
    lines = text.splitlines()
    assert lines[0].split() == ["SERVICE", "OWNER", "STATE", "PROCS", "HEALTH", "VIP", "TOKEN", "SINCE",
                                "CANDIDATES", "NOTES"]
    rows = {line.split()[0]: line.split() for line in lines if line}
    assert rows["web"] == ["web", "a", "RUNNING", "3", "-", "198.18.0.100/24", "57", "2023-11-14T22:13:25Z", "a,b",
                           "-"]
    assert rows["db"] == ["db", "-", "STOPPED", "-", "-", "-", "-", "-", "b", "-"]
    assert rows["idle"] == ["idle", "-", "STOPPED", "-", "-", "-", "-", "-", "-", "-"]
    assert rows["NODE"] == ["NODE", "ALIVE", "DRAINED", "HEALTH", "LEASE", "OWNS", "STARTED"]
    assert rows["a"] == ["a", "yes", "-", "-", "-", "web", "2023-11-14T22:13:20Z"]
    assert rows["c"] == ["c", "NO", "-", "-", "-", "-", "-"]
    assert "problem: /etcdha/nodes/z: value is not JSON: b'x'" in lines


def test_table_columns_aligned():
    lines = report.table(report.status(cluster())).splitlines()
    header, web = lines[0], next(line for line in lines if line.startswith("web"))
    assert header.index("OWNER") == web.index(" a ") + 1
    assert header.index("STATE") == web.index("RUNNING")


def test_status_survives_absurd_timestamps():
    v = ClusterView(revision=1, owners={"web": Owner(node="a", lease=1, token=2, since=1e300)},
                    nodes={"a": NodeInfo(node="a", lease=1, started=1e300)}, members=frozenset({"a"}))
    doc = report.status(v)
    assert doc["services"]["web"]["owner"] == "a"


def test_status_shows_intents_and_lease_time_left():
    from etcdha.model import Mark, Move
    base = cluster()
    v = ClusterView(revision=base.revision, nodes=base.nodes, candidates=base.candidates, owners=base.owners,
                    members=base.members, services=base.services,
                    moves={"web": Move(service="web", to="b", source="a", token=57)},
                    drained={"b": Mark()}, paused={"db": Mark()},
                    cooldowns={("db", "b"): 2000.0, ("db", "a"): 500.0})
    doc = report.status(v, ttl_left={0xA1: 2}, now=1000.0)
    assert doc["services"]["web"]["moving_to"] == "b"
    assert doc["services"]["db"]["paused"] is True and doc["services"]["web"]["paused"] is False
    assert doc["services"]["db"]["cooling_down"] == ["b"]  # a's cooldown has passed
    assert doc["nodes"]["b"]["drained"] is True and doc["nodes"]["a"]["drained"] is False
    assert doc["nodes"]["a"]["lease_ttl_left"] == 2
    text = report.table(doc)
    assert "moving to b" in text and "PAUSED" in text and "DRAINED" in text


def test_leftover_processes_on_a_node_that_does_not_own_the_service_are_shown():
    base = cluster()
    nodes = dict(base.nodes)
    nodes["b"] = NodeInfo(node="b", lease=0xB1, services={"web": "EXITED"}, processes={"web": 2})
    v = ClusterView(revision=1, nodes=nodes, candidates=base.candidates, owners=base.owners, members=base.members,
                    services=base.services)
    doc = report.status(v)
    assert doc["services"]["web"]["processes"] == {"a": 3, "b": 2}
    assert doc["nodes"]["b"]["processes"] == {"web": 2}
    web = next(line for line in report.table(doc).splitlines() if line.startswith("web"))
    assert "LEFTOVER processes on b (2)" in web
