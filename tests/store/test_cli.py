"""The operator commands against a real etcd: status, move, drain/undrain, pause/resume, keys, history, cleanup.

No agents run: each test seeds the cluster with store calls (leases, node/candidate/service keys,
owner keys) under its own prefix, then drives `etcdha.cli.main` through click's CliRunner. Where an
agent would act (the move target claiming), the test does it itself with the same store calls.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import threading
import time
from typing import Optional

import pytest
from click.testing import CliRunner, Result

from etcdha import model
from etcdha.cli import main
from etcdha.errors import StoreError
from etcdha.store import Store

from .conftest import free_port, wait_for

pytestmark = pytest.mark.store

LEASE_TTL = 30
ETCDHA_ENV = ("ETCDHA_CONFIG", "ETCDHA_ENDPOINTS", "ETCDHA_PREFIX", "ETCDHA_TIMEOUT")


class Cluster:
    """Seeds etcd as agents would, and runs the CLI against it; revokes its leases afterwards."""

    def __init__(self, endpoint: str, store):
        self.endpoint = endpoint
        self.store = store
        self.prefix = store.prefix
        self.leases: dict[str, int] = {}
        self.runner = CliRunner(env={name: None for name in ETCDHA_ENV})

    def join(self, node: str, services: dict[str, int], states: Optional[dict[str, str]] = None) -> int:
        """Register `node` on a fresh lease as a candidate for `services` (name -> priority)."""
        lease, _ = self.store.grant(LEASE_TTL)
        self.leases[node] = lease
        self.store.register(node, lease, model.encode_node(node, lease, 4000 + len(self.leases), time.time(),
                                                           states or {s: "STOPPED" for s in services}),
                            {s: model.encode_candidate(p) for s, p in services.items()},
                            {s: model.encode_service(None) for s in services})
        return lease

    def die(self, node: str) -> None:
        """The node's lease ends: node, candidate and owner keys go; the member key stays."""
        self.store.revoke(self.leases.pop(node))

    def own(self, service: str, node: str) -> int:
        token = self.store.claim(service, node, self.leases[node], time.time())
        assert token, f"{node} could not claim {service}"
        return token

    def cool(self, service: str, node: str, seconds: float = 300.0) -> None:
        self.store.put(model.cooldown_key(self.prefix, service, node),
                       model.encode_cooldown(time.time() + seconds, "FATAL"), self.leases[node])

    def get(self, key: str) -> Optional[model.KV]:
        _, kvs = self.store.list()
        return next((kv for kv in kvs if kv.key == key), None)

    def cli(self, *args: str, timeout: float = 2.0) -> Result:
        return self.runner.invoke(main, ["--endpoints", self.endpoint, "--prefix", self.prefix,
                                         "--timeout", str(timeout), *args])

    def close(self) -> None:
        for lease in self.leases.values():
            try:
                self.store.revoke(lease)
            except StoreError:
                pass


@pytest.fixture
def cluster(etcd_server, store):
    c = Cluster(etcd_server.endpoint, store)
    yield c
    c.close()


def ok(result: Result) -> str:
    assert result.exit_code == 0, (result.exit_code, result.output, result.exception)
    return result.output


def refused(result: Result, *words: str) -> str:
    """Exit 1 through a ClickException (not a crash: CliRunner also reports crashes as exit 1)."""
    assert result.exit_code == 1, (result.exit_code, result.output)
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    assert result.stderr.startswith("Error: ") and len(result.stderr.splitlines()) == 1, result.stderr
    for w in words:
        assert w in result.output, (w, result.output)
    return result.output


def usage_error(result: Result, *words: str) -> str:
    assert result.exit_code == 2, (result.exit_code, result.output)
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    for w in words:
        assert w in result.output, (w, result.output)
    return result.output


def web_cluster(c: Cluster) -> int:
    """a owns web (priority 100); b (90) and c (80) are candidates; d is alive but runs only db;
    e has joined before and is dead. Returns a's fencing token."""
    c.join("a", {"web": 100}, {"web": "RUNNING"})
    c.join("b", {"web": 90})
    c.join("c", {"web": 80})
    c.join("d", {"db": 50})
    c.join("e", {"web": 999})
    c.die("e")
    return c.own("web", "a")


# ---- status --json -------------------------------------------------------------------------------

def test_status_json_shape_and_lease_time_left(cluster):
    token = web_cluster(cluster)
    cluster.store.put(model.drain_key(cluster.prefix, "c"), model.encode_mark(time.time(), "t"))
    cluster.store.put(model.pause_key(cluster.prefix, "db"), model.encode_mark(time.time(), "t"))
    cluster.cool("web", "d")
    assert cluster.store.request_move("web", "a", "b", token, 20)

    doc = json.loads(ok(cluster.cli("status", "--json")))
    assert set(doc) == {"services", "nodes", "revision", "problems"}
    assert doc["problems"] == []
    assert doc["revision"] >= token
    assert set(doc["services"]) == {"web", "db"}
    web = doc["services"]["web"]
    assert set(web) == {"owner", "state", "vip", "since", "fencing_token", "candidates", "paused", "moving_to",
                        "cooling_down", "processes", "health", "failures"}
    assert web["owner"] == "a" and web["state"] == "RUNNING" and web["fencing_token"] == token
    assert web["candidates"] == ["a", "b", "c"]  # live ones, best first; e is dead
    assert web["moving_to"] == "b" and web["paused"] is False and web["cooling_down"] == ["d"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", web["since"])
    db = doc["services"]["db"]
    assert db["owner"] is None and db["state"] == "STOPPED" and db["paused"] is True and db["fencing_token"] is None

    assert set(doc["nodes"]) == {"a", "b", "c", "d", "e"}
    for name, n in doc["nodes"].items():
        assert set(n) == {"alive", "drained", "unhealthy", "lease_ttl_left", "pid", "started", "lease", "owns",
                          "processes"}
    a = doc["nodes"]["a"]
    assert a["alive"] is True and a["owns"] == ["web"] and a["lease"] == f"{cluster.leases['a']:x}"
    assert isinstance(a["lease_ttl_left"], int) and 0 < a["lease_ttl_left"] <= LEASE_TTL
    assert doc["nodes"]["c"]["drained"] is True and doc["nodes"]["a"]["drained"] is False
    e = doc["nodes"]["e"]
    assert e == {"alive": False, "drained": False, "unhealthy": None, "lease_ttl_left": None, "pid": None,
                 "started": None, "lease": None, "owns": [], "processes": {}}


def test_status_json_counts_garbage_intents_and_lists_them_as_problems(cluster):
    web_cluster(cluster)
    cluster.store.put(model.drain_key(cluster.prefix, "b"), b"not json")
    cluster.store.put(model.pause_key(cluster.prefix, "web"), b"[]")
    cluster.store.put(model.move_key(cluster.prefix, "web"), b'{"to": "c"}')
    cluster.store.put(model.cooldown_key(cluster.prefix, "web", "c"), b"???", cluster.leases["c"])
    doc = json.loads(ok(cluster.cli("status", "--json")))
    web = doc["services"]["web"]
    assert web["paused"] is True and web["moving_to"] is None and web["cooling_down"] == ["c"]
    assert doc["nodes"]["b"]["drained"] is True
    for key in ("drain/b", "pause/web", "moves/web", "cooldowns/web/c"):
        assert any(p.startswith(f"{cluster.prefix}/{key}: ") for p in doc["problems"]), (key, doc["problems"])


def test_status_table_names_owner_and_nodes(cluster):
    web_cluster(cluster)
    out = ok(cluster.cli("status"))
    assert re.search(r"^web +a +RUNNING ", out, re.M), out
    assert re.search(r"^e +NO ", out, re.M), out


# ---- move: refusals ------------------------------------------------------------------------------

def _no_owner(c: Cluster) -> list[str]:
    web_cluster(c)
    c.store.release("web", c.leases["a"])
    return ["move", "web", "--to", "b"]


def _dead_target(c: Cluster) -> list[str]:
    web_cluster(c)
    return ["move", "web", "--to", "e"]


def _unknown_target(c: Cluster) -> list[str]:
    web_cluster(c)
    return ["move", "web", "--to", "zz"]


def _not_candidate(c: Cluster) -> list[str]:
    web_cluster(c)
    return ["move", "web", "--to", "d"]


def _drained_target(c: Cluster) -> list[str]:
    web_cluster(c)
    c.store.put(model.drain_key(c.prefix, "b"), model.encode_mark(time.time(), "t"))
    return ["move", "web", "--to", "b"]


def _target_is_owner(c: Cluster) -> list[str]:
    web_cluster(c)
    return ["move", "web", "--to", "a"]


def _cooling_target(c: Cluster) -> list[str]:
    web_cluster(c)
    c.cool("web", "c")
    return ["move", "web", "--to", "c"]


def _paused(c: Cluster) -> list[str]:
    web_cluster(c)
    c.store.put(model.pause_key(c.prefix, "web"), model.encode_mark(time.time(), "t"))
    return ["move", "web", "--to", "b"]


def _all_paused(c: Cluster) -> list[str]:
    web_cluster(c)
    c.store.put(model.pause_key(c.prefix), model.encode_mark(time.time(), "t"))
    return ["move", "web"]


def _pending(c: Cluster) -> list[str]:
    token = web_cluster(c)
    assert c.store.request_move("web", "a", "c", token, 30)
    return ["move", "web", "--to", "b"]


def _nobody_else(c: Cluster) -> list[str]:
    c.join("a", {"web": 100})
    c.join("b", {"web": 90})
    c.own("web", "a")
    c.store.put(model.drain_key(c.prefix, "b"), model.encode_mark(time.time(), "t"))
    return ["move", "web"]


@pytest.mark.parametrize("seed,words", [
    pytest.param(_no_owner, ["web has no owner"], id="no-owner"),
    pytest.param(_dead_target, ["e is not alive"], id="target-dead"),
    pytest.param(_unknown_target, ["zz is not alive"], id="target-unknown"),
    pytest.param(_not_candidate, ["d is not a candidate for web"], id="target-not-candidate"),
    pytest.param(_drained_target, ["b is drained"], id="target-drained"),
    pytest.param(_target_is_owner, ["web already runs on a"], id="target-is-owner"),
    pytest.param(_cooling_target, ["c is cooling down", "etcdha cleanup web --node c"], id="target-cooling"),
    pytest.param(_paused, ["web is paused"], id="paused"),
    pytest.param(_all_paused, ["web is paused"], id="all-paused"),
    pytest.param(_pending, ["a move of web to c is already pending"], id="pending"),
    pytest.param(_nobody_else, ["no other live, undrained candidate can take web"], id="no-other-candidate"),
])
def test_move_is_refused_with_the_reason(cluster, seed, words):
    args = seed(cluster)
    before = cluster.get(model.move_key(cluster.prefix, "web"))
    started = time.monotonic()
    refused(cluster.cli(*args), *words)
    assert time.monotonic() - started < 5  # refusals do not wait
    after = cluster.get(model.move_key(cluster.prefix, "web"))
    # a refusal writes nothing (a pending move stays exactly as it was)
    assert (before and (before.value, before.mod_revision)) == (after and (after.value, after.mod_revision))


def test_move_of_an_unknown_service_is_a_usage_error(cluster):
    web_cluster(cluster)
    usage_error(cluster.cli("move", "nosuch", "--to", "b"), "unknown service 'nosuch'", "web")


def test_move_refused_when_the_owner_changes_meanwhile_and_its_lease_is_revoked(cluster, monkeypatch):
    """Between the CLI's snapshot and its request another node takes over: the request must fail cleanly."""
    web_cluster(cluster)
    granted: list[int] = []
    real_grant, real_request = Store.grant, Store.request_move

    def grant(self, ttl):
        lease, got = real_grant(self, ttl)
        granted.append(lease)
        return lease, got

    def request_move(self, service, source, to, token, timeout):
        assert cluster.store.release("web", cluster.leases["a"])
        cluster.own("web", "c")
        return real_request(self, service, source, to, token, timeout)

    monkeypatch.setattr(Store, "grant", grant)
    monkeypatch.setattr(Store, "request_move", request_move)
    refused(cluster.cli("move", "web", "--to", "b"), "the owner of web changed meanwhile")
    assert cluster.get(model.move_key(cluster.prefix, "web")) is None
    assert len(granted) == 1 and cluster.store.lease_ttl_left(granted[0]) == -1  # no lease left behind


# ---- move: requests and waiting -------------------------------------------------------------------

def test_move_no_wait_writes_a_request_on_its_own_short_lease(cluster):
    token = web_cluster(cluster)
    started = time.time()
    out = ok(cluster.cli("move", "web", "--to", "b", "--no-wait", "--timeout", "5"))
    assert "moving web from a to b" in out
    kv = cluster.get(model.move_key(cluster.prefix, "web"))
    assert kv is not None
    value = json.loads(kv.value)
    assert (value["to"], value["from"], value["token"]) == ("b", "a", token)
    assert started - 1 <= value["requested"] <= time.time() + 1
    assert kv.lease and kv.lease not in cluster.leases.values()
    assert 0 < cluster.store.lease_ttl_left(kv.lease) <= 5
    assert cluster.store.snapshot().owners["web"].node == "a"  # the CLI itself moves nothing


def test_move_without_to_picks_the_best_other_live_candidate(cluster):
    cluster.join("a", {"web": 100})
    cluster.join("b", {"web": 50})
    cluster.join("c", {"web": 80})
    cluster.join("z", {"web": 500})
    cluster.die("z")  # the best by priority, but dead
    cluster.own("web", "a")
    out = ok(cluster.cli("move", "web", "--no-wait"))
    assert "moving web from a to c" in out
    assert json.loads(cluster.get(model.move_key(cluster.prefix, "web")).value)["to"] == "c"


def test_move_without_to_skips_drained_and_cooling_candidates(cluster):
    cluster.join("a", {"web": 100})
    cluster.join("b", {"web": 50})
    cluster.join("c", {"web": 80})
    cluster.join("d", {"web": 90})
    cluster.own("web", "a")
    cluster.store.put(model.drain_key(cluster.prefix, "d"), model.encode_mark(time.time(), "t"))
    cluster.cool("web", "c")
    ok(cluster.cli("move", "web", "--no-wait"))
    assert json.loads(cluster.get(model.move_key(cluster.prefix, "web")).value)["to"] == "b"


def test_move_wait_times_out_when_nobody_acts_and_the_request_expires(cluster):
    web_cluster(cluster)
    started = time.monotonic()
    out = refused(cluster.cli("move", "web", "--to", "b", "--timeout", "2"),
                  "b did not take web within 2s", "owner now: a")
    elapsed = time.monotonic() - started
    assert 2 <= elapsed < 8, elapsed
    assert "moving web from a to b" in out
    move_key = model.move_key(cluster.prefix, "web")
    wait_for(lambda: cluster.get(move_key) is None, 5, interval=0.1, what="the expired move request to vanish")
    assert cluster.store.snapshot().owners["web"].node == "a"


def test_move_wait_returns_once_the_target_owns_it(cluster):
    """The agents' part is played by a thread: a hands off, b claims completing the move."""
    web_cluster(cluster)
    move_key = model.move_key(cluster.prefix, "web")
    claimed: list[int] = []

    def agents() -> None:
        wait_for(lambda: cluster.get(move_key) is not None, 10, what="the move request")
        assert cluster.store.release("web", cluster.leases["a"])
        claimed.append(cluster.store.claim("web", "b", cluster.leases["b"], time.time(), complete_move=True))

    t = threading.Thread(target=agents, daemon=True)
    t.start()
    out = ok(cluster.cli("move", "web", "--to", "b", "--timeout", "10"))
    t.join(10)
    assert claimed and claimed[0], "the simulated target could not claim"
    assert "web now runs on b" in out and f"fencing token {claimed[0]}" in out
    assert cluster.get(move_key) is None  # the claim completed (deleted) the request
    assert cluster.store.snapshot().owners["web"].node == "b"


# ---- drain / undrain -------------------------------------------------------------------------------

def test_drain_and_undrain_write_and_delete_the_mark(cluster):
    web_cluster(cluster)
    key = model.drain_key(cluster.prefix, "b")
    assert "b is drained" in ok(cluster.cli("drain", "b"))
    kv = cluster.get(key)
    assert kv is not None and kv.lease == 0  # persists: no lease
    mark = json.loads(kv.value)
    assert set(mark) == {"since", "by"} and abs(mark["since"] - time.time()) < 30 and "@" in mark["by"]
    assert cluster.store.snapshot().drained.keys() == {"b"}

    assert "b is no longer drained" in ok(cluster.cli("undrain", "b"))
    assert cluster.get(key) is None
    assert "b was not drained" in ok(cluster.cli("undrain", "b"))


def test_drain_of_a_dead_member_is_allowed(cluster):
    web_cluster(cluster)
    ok(cluster.cli("drain", "e"))
    assert cluster.get(model.drain_key(cluster.prefix, "e")) is not None


def test_drain_of_an_unknown_node_is_a_usage_error(cluster):
    web_cluster(cluster)
    usage_error(cluster.cli("drain", "nosuch"), "unknown node 'nosuch'")
    assert cluster.get(model.drain_key(cluster.prefix, "nosuch")) is None


def test_drain_wait_times_out_naming_what_the_node_still_owns(cluster):
    web_cluster(cluster)
    started = time.monotonic()
    out = refused(cluster.cli("drain", "a", "--wait", "--timeout", "2"), "a still owns web after 2s",
                  "stays drained")
    assert 2 <= time.monotonic() - started < 8
    assert "a still owns: web" in out  # the progress line
    assert cluster.get(model.drain_key(cluster.prefix, "a")) is not None


def test_drain_wait_says_when_no_other_node_can_run_a_service(cluster):
    cluster.join("a", {"solo": 100})
    cluster.join("b", {"web": 100})
    cluster.own("solo", "a")
    out = refused(cluster.cli("drain", "a", "--wait", "--timeout", "1"), "a still owns solo")
    assert "no other node can run: solo" in out


def test_drain_wait_returns_at_once_for_a_node_owning_nothing(cluster):
    web_cluster(cluster)
    started = time.monotonic()
    out = ok(cluster.cli("drain", "b", "--wait", "--timeout", "30"))
    assert time.monotonic() - started < 3
    assert "b owns nothing now" in out


# ---- pause / resume ---------------------------------------------------------------------------------

def test_pause_and_resume_one_service_and_all(cluster):
    web_cluster(cluster)
    one, every = model.pause_key(cluster.prefix, "web"), model.pause_key(cluster.prefix)
    assert "paused web" in ok(cluster.cli("pause", "web"))
    assert cluster.get(one) is not None and cluster.get(one).lease == 0 and cluster.get(every) is None
    assert set(json.loads(cluster.get(one).value)) == {"since", "by"}
    assert "paused every service" in ok(cluster.cli("pause"))
    assert cluster.get(every) is not None
    doc = json.loads(ok(cluster.cli("status", "--json")))
    assert doc["services"]["web"]["paused"] is True and doc["services"]["db"]["paused"] is True

    assert "resumed web" in ok(cluster.cli("resume", "web"))
    assert cluster.get(one) is None and cluster.get(every) is not None
    # web is still paused through the pause of every service: resume web says how to lift that
    refused(cluster.cli("resume", "web"), "because every service is")
    assert "resumed every service" in ok(cluster.cli("resume"))
    assert cluster.store.snapshot().paused == {}
    assert "nothing was paused" in ok(cluster.cli("resume"))


def test_resume_without_service_ends_every_pause_mark(cluster):
    web_cluster(cluster)
    ok(cluster.cli("pause", "web"))
    ok(cluster.cli("pause", "db"))
    out = ok(cluster.cli("resume"))
    assert "db" in out and "web" in out
    assert cluster.store.snapshot().paused == {}


def test_pause_of_an_unknown_service_is_a_usage_error(cluster):
    web_cluster(cluster)
    usage_error(cluster.cli("pause", "nosuch"), "unknown service 'nosuch'")
    assert cluster.store.snapshot().paused == {}


# ---- keys ---------------------------------------------------------------------------------------------

def _varied_keys(c: Cluster) -> None:
    token = web_cluster(c)
    c.store.put(model.drain_key(c.prefix, "b"), model.encode_mark(time.time(), "t"))
    c.store.put(model.pause_key(c.prefix), model.encode_mark(time.time(), "t"))
    c.cool("web", "c")
    assert c.store.request_move("web", "a", "b", token, 20)
    c.store.record(model.Event("web", time.time(), "a", "claimed", "vacant", token))
    c.store.put(c.prefix + "/junk/binary", b"\xff\x00not json\nsecond line")
    c.store.put(c.prefix + "/junk/empty", b"")
    c.store.put(c.prefix + "/junk/padded", b"  spaces and a newline \n")


def test_keys_raw_is_byte_identical_to_etcdctl(cluster):
    _varied_keys(cluster)
    result = cluster.cli("keys", "--raw")
    ok(result)
    proc = subprocess.run(["etcdctl", "--endpoints", cluster.endpoint, "get", "--prefix", cluster.prefix + "/"],
                          env={**os.environ, "ETCDCTL_API": "3"}, capture_output=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count(b"\n") > 20  # we really compare something
    assert result.stdout_bytes == proc.stdout


def test_keys_show_decoded_values_leases_and_ttl(cluster):
    _varied_keys(cluster)
    out = ok(cluster.cli("keys"))
    lease_a = cluster.leases["a"]
    m = re.search(rf"^{re.escape(cluster.prefix)}/owners/web  \[lease {lease_a:x} \((\d+)s left\), rev \d+\]$",
                  out, re.M)
    assert m, out
    assert 0 < int(m.group(1)) <= LEASE_TTL
    m = re.search(rf"^{re.escape(cluster.prefix)}/moves/web  \[lease ([0-9a-f]+) \((\d+)s left\)", out, re.M)
    assert m and 0 < int(m.group(2)) <= 20, out
    assert re.search(rf"^{re.escape(cluster.prefix)}/members/a  \[no lease, rev \d+\]$", out, re.M), out
    assert re.search(rf"^{re.escape(cluster.prefix)}/history/web/\d+-a  \[no lease", out, re.M), out
    assert "NOT JSON: b'\\xff\\x00not json\\nsecond line'" in out
    # decoded JSON, keys sorted
    assert '"from": "a", "requested": ' in out and '"to": "b"' in out


# ---- history --------------------------------------------------------------------------------------------

def test_history_limit_and_json_are_oldest_first(cluster):
    web_cluster(cluster)
    t0 = time.time() - 100
    events = [model.Event("web", t0 + i, "a" if i % 2 else "b", ev, "vacant", 10 + i)
              for i, ev in enumerate(["claimed", "released", "claimed", "moved", "fenced"])]
    events[3] = model.Event("web", t0 + 3, "b", "moved", "moved", 13, "to a")
    for e in reversed(events):  # recorded out of order: the listing still goes by time
        cluster.store.record(e)
    cluster.store.record(model.Event("db", t0 + 2.5, "d", "claimed", "vacant", 99))

    out = ok(cluster.cli("history", "web", "--limit", "2"))
    lines = out.splitlines()
    assert lines[0].split() == ["TIME", "SERVICE", "EVENT", "NODE", "REASON", "TOKEN", "DETAIL"]
    assert len(lines) == 3
    assert lines[1].split()[2:] == ["web", "moved", "b", "moved", "13", "to", "a"]
    assert lines[2].split()[2:] == ["web", "fenced", "b", "vacant", "14", "-"]

    doc = json.loads(ok(cluster.cli("history", "web", "--json")))
    assert [d["token"] for d in doc] == [10, 11, 12, 13, 14]
    assert [d["time"] for d in doc] == sorted(d["time"] for d in doc)
    assert doc[3] == {"service": "web", "time": pytest.approx(t0 + 3, abs=1e-5), "node": "b", "event": "moved",
                      "reason": "moved", "token": 13, "detail": "to a"}

    every = json.loads(ok(cluster.cli("history", "--json", "--limit", "3")))
    assert [(d["service"], d["token"]) for d in every] == [("db", 99), ("web", 13), ("web", 14)]


def test_history_is_not_part_of_a_snapshot(cluster):
    web_cluster(cluster)
    cluster.store.put(model.history_prefix(cluster.prefix, "web") + "garbage", b"\xffnot json")
    cluster.store.record(model.Event("ghost", time.time(), "a", "claimed", "vacant", 1))
    view = cluster.store.snapshot()
    assert view.problems == () and "ghost" not in view.services
    doc = json.loads(ok(cluster.cli("status", "--json")))
    assert doc["problems"] == [] and "ghost" not in doc["services"]


def test_record_keeps_at_most_keep_entries_per_service(cluster):
    t0 = time.time() - 100
    for i in range(7):
        cluster.store.record(model.Event("web", t0 + i, "a", "claimed", "vacant", i + 1), keep=3)
        _, kvs = cluster.store.list("history/web/")
        assert len(kvs) == min(i + 1, 3)
    cluster.store.record(model.Event("db", t0, "a", "claimed", "vacant", 50), keep=3)
    assert [e.token for e in cluster.store.history("web")] == [5, 6, 7]  # the newest three
    assert [e.token for e in cluster.store.history("db")] == [50]  # another service's history is untouched


def test_history_of_an_unknown_service_is_a_usage_error(cluster):
    web_cluster(cluster)
    usage_error(cluster.cli("history", "nosuch"), "unknown service 'nosuch'")


# ---- cleanup ----------------------------------------------------------------------------------------------

def test_cleanup_clears_cooldowns_of_every_node_or_one(cluster):
    cluster.join("a", {"web": 100, "web2": 100})
    cluster.join("b", {"web": 90})
    cluster.join("c", {"web": 80})
    for node in ("a", "b", "c"):
        cluster.cool("web", node)
    cluster.cool("web2", "a")  # another service whose name starts alike: untouched
    key = lambda s, n: model.cooldown_key(cluster.prefix, s, n)  # noqa: E731

    assert "cleared 1 cooldown(s) and 0 fail count(s) of web" in ok(cluster.cli("cleanup", "web", "--node", "a"))
    assert cluster.get(key("web", "a")) is None
    assert cluster.get(key("web", "b")) is not None and cluster.get(key("web", "c")) is not None

    assert "cleared 2 cooldown(s) and 0 fail count(s) of web" in ok(cluster.cli("cleanup", "web"))
    assert cluster.get(key("web", "b")) is None and cluster.get(key("web", "c")) is None
    assert cluster.get(key("web2", "a")) is not None
    assert set(cluster.store.snapshot().cooldowns) == {("web2", "a")}
    assert "cleared 0 cooldown(s) and 0 fail count(s) of web" in ok(cluster.cli("cleanup", "web"))


def test_cleanup_clears_health_check_fail_counts_and_status_shows_them(cluster):
    cluster.join("a", {"web": 100, "web2": 100})
    cluster.join("b", {"web": 90})
    now = time.time()
    for node in ("a", "b"):
        cluster.store.add_failure("web", node, now - 5, 600, "http", "HTTP 500: broken")
    record = cluster.store.add_failure("web", "a", now, 600, "http", "HTTP 500: broken")
    assert record.count(now) == 2
    cluster.store.add_failure("web2", "a", now, 600, "tcp", "refused")  # a service whose name starts alike
    failures = json.loads(ok(cluster.cli("status", "--json")))["services"]["web"]["failures"]
    assert {n: f["count"] for n, f in failures.items()} == {"a": 2, "b": 1}
    assert failures["a"]["check"] == "http" and failures["a"]["output"] == "HTTP 500: broken"
    assert "2 check failure(s) on a (http)" in ok(cluster.cli("status"))

    assert "cleared 0 cooldown(s) and 1 fail count(s) of web" in ok(cluster.cli("cleanup", "web", "--node", "b"))
    assert set(cluster.store.snapshot().failures) == {("web", "a"), ("web2", "a")}
    assert "cleared 0 cooldown(s) and 1 fail count(s) of web" in ok(cluster.cli("cleanup", "web"))
    assert set(cluster.store.snapshot().failures) == {("web2", "a")}
    # counting again after a cleanup starts from nothing: the cleared failures do not come back
    assert cluster.store.add_failure("web", "a", time.time(), 600, "http", "x").times == (pytest.approx(time.time(),
                                                                                                       abs=5),)


def test_cleanup_of_an_unknown_service_is_a_usage_error(cluster):
    cluster.join("a", {"web": 100})
    usage_error(cluster.cli("cleanup", "nosuch"), "unknown service 'nosuch'")


# ---- etcd unreachable ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("args", [["status"], ["status", "--json"], ["move", "web", "--to", "b"], ["drain", "a"],
                                  ["undrain", "a"], ["pause"], ["resume"], ["keys"], ["keys", "--raw"],
                                  ["history"], ["cleanup", "web"]], ids=" ".join)
def test_unreachable_etcd_is_one_clear_line_and_exit_1(args):
    port = free_port()  # bound and closed again: nothing listens there
    endpoint = f"http://127.0.0.1:{port}"
    runner = CliRunner(env={name: None for name in ETCDHA_ENV})
    started = time.monotonic()
    result = runner.invoke(main, ["--endpoints", endpoint, "--timeout", "1", *args])
    elapsed = time.monotonic() - started
    assert elapsed < 5, elapsed
    refused(result, f"127.0.0.1:{port}")
    assert len(result.output.strip().splitlines()) == 1, result.output


def test_wait_follows_the_watch_instead_of_rereading_the_cluster_on_each_change(store, monkeypatch):
    """--wait (drain, move) during hundreds of changes: the view comes from the watch; the cluster is read
    from etcd at most while the watch is not yet listed, not once per change."""
    from etcdha import cli

    reads: list[int] = []
    snapshot = store.snapshot
    monkeypatch.setattr(store, "snapshot", lambda: reads.append(1) or snapshot())
    changes = 300
    started = threading.Event()

    def write() -> None:
        started.wait(5)
        for i in range(changes):
            store.put(model.drain_key(store.prefix, f"x{i:03d}"), model.encode_mark(time.time(), "test"))
            time.sleep(0.002)  # a drain's pace: many wake-ups, each of which used to cost a full read

    writer = threading.Thread(target=write, daemon=True)
    writer.start()

    def done(view: model.ClusterView) -> bool:
        started.set()
        return len(view.drained) == changes

    view = cli.wait_for(store, done, timeout=30)
    writer.join(10)
    assert view is not None and len(view.drained) == changes
    assert len(reads) <= 3, f"{len(reads)} full reads of the cluster for {changes} changes"
