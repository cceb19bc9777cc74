"""etcdha.store.Store against a real etcd: claims, leases, fencing tokens, garbage, errors."""
from __future__ import annotations

import threading
import time
import uuid
from concurrent import futures

import grpc
import pytest
from etcd3 import etcdrpc
from etcd3.etcdrpc import kv_pb2

from etcdha import model
from etcdha.config import EtcdConfig
from etcdha.errors import StoreError, Unavailable
from etcdha.store import Store, prefix_end

from .conftest import free_port, wait_for

pytestmark = pytest.mark.store


def _register(store: Store, node: str, lease: int, service: str = "web") -> None:
    store.register(node, lease, model.encode_node(node, lease, pid=123, started=1.0, services={service: "RUNNING"}),
                   candidates={service: model.encode_candidate(100)},
                   services={service: model.encode_service(None)})


def _watch_events(store: Store, start_revision: int, count: int, timeout: float) -> list:
    """Collect the first `count` watch events under the store's prefix from `start_revision` (bounded)."""
    key = (store.prefix + "/").encode()
    done = threading.Event()

    def requests():
        yield etcdrpc.WatchRequest(create_request=etcdrpc.WatchCreateRequest(
            key=key, range_end=prefix_end(key), start_revision=start_revision))
        done.wait(timeout + 5)

    call = store.watch_stub.Watch(requests(), timeout=timeout)
    events = []
    try:
        for resp in call:
            events.extend(resp.events)
            if len(events) >= count:
                break
    finally:
        done.set()
        call.cancel()
    return events


# ---- 1. claim race -----------------------------------------------------------------------------

def test_claim_race_has_exactly_one_winner(store):
    n = 20
    leases = [store.grant(10)[0] for _ in range(n)]
    barrier = threading.Barrier(n, timeout=10)
    results: dict[int, object] = {}

    def contend(i: int) -> None:
        try:
            barrier.wait()
            results[i] = store.claim("web", f"node{i}", leases[i], since=time.time())
        except Exception as exc:  # noqa: BLE001 - reported by the assertion below
            results[i] = exc

    threads = [threading.Thread(target=contend, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(15)
    try:
        assert not any(t.is_alive() for t in threads), "a claim did not return"
        errors = [r for r in results.values() if isinstance(r, Exception)]
        assert not errors, errors
        winners = {i: tok for i, tok in results.items() if tok is not None}
        assert len(results) == n
        assert len(winners) == 1, results
        (winner, token), = winners.items()
        assert isinstance(token, int) and token > 0

        view = store.snapshot()
        owner = view.owners["web"]
        assert owner.token == token  # token is the owner key's create_revision
        assert owner.node == f"node{winner}"
        assert owner.lease == leases[winner]
    finally:
        for lease in leases:
            store.revoke(lease)


# ---- 2. revoke deletes everything on the lease at once -----------------------------------------

def test_revoke_deletes_owner_node_and_candidate_in_one_revision(store):
    lease, _ = store.grant(10)
    _register(store, "a", lease)
    token = store.claim("web", "a", lease, since=time.time())
    assert token is not None

    view = store.snapshot()
    assert set(view.nodes) == {"a"}
    assert set(view.candidates["web"]) == {"a"}
    assert view.owners["web"].node == "a"
    assert view.problems == ()

    before = store.revision()
    store.revoke(lease)

    view = store.snapshot()
    assert view.nodes == {}
    assert view.candidates == {}
    assert view.owners == {}
    # keys without a lease stay: the node is still a member, the service still known
    assert view.members == frozenset({"a"})
    assert view.services == {"web": None}

    events = _watch_events(store, before + 1, 3, timeout=5)
    deleted = {ev.kv.key.decode(): ev.kv.mod_revision for ev in events if ev.type == kv_pb2.Event.DELETE}
    p = store.prefix
    assert set(deleted) == {model.owner_key(p, "web"), model.node_key(p, "a"), model.candidate_key(p, "web", "a")}
    assert len(set(deleted.values())) == 1, f"deleted in several revisions: {deleted}"

    store.revoke(lease)  # revoking again (lease not found) is not an error


# ---- 3. lease expiry ---------------------------------------------------------------------------

def test_owner_key_disappears_when_the_lease_expires(store):
    granted_at = time.monotonic()
    lease, ttl = store.grant(2)
    assert ttl == 2
    assert store.claim("web", "a", lease, since=time.time()) is not None

    wait_for(lambda: "web" not in store.snapshot().owners, timeout=ttl + 3, interval=0.1,
             what="the owner key to expire with its lease")
    elapsed = time.monotonic() - granted_at
    assert elapsed >= 1.0, f"owner key vanished after {elapsed:.2f}s, before the {ttl}s TTL"
    assert store.lease_ttl_left(lease) == -1


# ---- 4. keepalive ------------------------------------------------------------------------------

def test_keepalive_returns_ttl_while_alive_and_zero_after_revoke(store):
    lease, ttl = store.grant(5)
    assert store.keepalive(lease) == ttl
    assert store.keepalive(lease, timeout=1.0) == ttl
    assert 0 < store.lease_ttl_left(lease) <= ttl
    store.revoke(lease)
    assert store.keepalive(lease) == 0
    assert store.lease_ttl_left(lease) == -1


# ---- 5. release is conditional on the lease ------------------------------------------------------

def test_release_only_deletes_the_owner_key_on_our_lease(store):
    ours, _ = store.grant(10)
    theirs, _ = store.grant(10)
    try:
        assert store.release("web", ours) is False  # nothing to release
        token = store.claim("web", "a", ours, since=time.time())
        assert token is not None

        assert store.release("web", theirs) is False
        assert store.snapshot().owners["web"].token == token

        assert store.release("web", ours) is True
        assert "web" not in store.snapshot().owners
        assert store.release("web", ours) is False
    finally:
        store.revoke(ours)
        store.revoke(theirs)


# ---- 6. fencing tokens -------------------------------------------------------------------------

def test_fencing_token_strictly_increases_across_owners(store):
    tokens = []
    for i in range(5):
        lease, _ = store.grant(10)
        token = store.claim("web", f"node{i}", lease, since=time.time())
        assert token is not None
        assert store.snapshot().owners["web"].token == token
        # someone else cannot claim while it is owned
        other, _ = store.grant(10)
        assert store.claim("web", "intruder", other, since=time.time()) is None
        store.revoke(other)
        tokens.append(token)
        if i % 2:
            store.revoke(lease)
        else:
            assert store.release("web", lease) is True
            store.revoke(lease)
    assert all(a < b for a, b in zip(tokens, tokens[1:])), tokens


# ---- 7. garbage values -------------------------------------------------------------------------

def test_garbage_values_are_problems_not_exceptions(store):
    p = store.prefix
    lease, _ = store.grant(10)
    _register(store, "good", lease, service="db")
    store.put(model.owner_key(p, "web"), b"\xff\xfe{not json")
    store.put(model.candidate_key(p, "web", "bad"), b"not json at all")
    store.put(model.node_key(p, "bad"), b"\x00\x01\x02")
    store.put(model.owner_key(p, "list"), b"[1, 2, 3]")
    store.put(model.owner_key(p, "noname"), b'{"lease": "1"}')
    store.put(model.candidate_key(p, "web", "strprio"), b'{"priority": "high"}')

    view = store.snapshot()

    problem_keys = {pr.split(": ", 1)[0] for pr in view.problems}
    assert {model.owner_key(p, "web"), model.candidate_key(p, "web", "bad"), model.node_key(p, "bad"),
            model.owner_key(p, "list"), model.owner_key(p, "noname"),
            model.candidate_key(p, "web", "strprio")} <= problem_keys, view.problems
    # a garbage owner key still counts as owned, by an unknown node
    for svc in ("web", "list", "noname"):
        assert view.owners[svc].node == model.UNKNOWN_OWNER
        assert view.owners[svc].token > 0
    # garbage node and candidates are treated as absent; the good ones are intact
    assert set(view.nodes) == {"good"}
    assert "web" not in view.candidates
    assert set(view.candidates["db"]) == {"good"}
    assert view.live_candidates("db")[0].node == "good"
    store.revoke(lease)


def test_node_program_states_do_not_leak_into_service_vips(store):
    """Regression: build_view once reused the name `services` for a node's program states,
    so they leaked into ClusterView.services as if they were VIPs (fixed in 8e34d24)."""
    lease, _ = store.grant(10)
    # The node reports a program ('old') that is no longer a configured service.
    store.register("a", lease, model.encode_node("a", lease, pid=1, started=1.0,
                                                 services={"old": "RUNNING", "web": "RUNNING"}),
                   candidates={"web": model.encode_candidate(100, "10.0.0.1/24")},
                   services={"web": model.encode_service("10.0.0.1/24")})
    view = store.snapshot()
    store.revoke(lease)
    assert view.services == {"web": "10.0.0.1/24"}


# ---- 10. unreachable etcd ----------------------------------------------------------------------

@pytest.mark.parametrize("call", ["snapshot", "grant", "claim"])
def test_unreachable_etcd_raises_unavailable_quickly(call):
    port = free_port()  # bound then closed: nothing listens there
    endpoint = f"http://127.0.0.1:{port}"
    timeout = 1.0
    s = Store(EtcdConfig(endpoints=(endpoint,), prefix=f"/t-{uuid.uuid4().hex}", timeout=timeout))
    try:
        ops = {"snapshot": lambda: s.snapshot(), "grant": lambda: s.grant(5),
               "claim": lambda: s.claim("web", "a", 1, since=0.0)}
        started = time.monotonic()
        with pytest.raises(Unavailable) as info:
            ops[call]()
        took = time.monotonic() - started
        assert took < timeout + 1.0, f"{call} took {took:.2f}s"
        assert endpoint in str(info.value)
    finally:
        s.close()


def test_a_dead_endpoint_is_skipped_within_the_same_call(etcd_server):
    """A member that refuses connections (nothing applied) is passed over at once: the call succeeds."""
    dead = f"http://127.0.0.1:{free_port()}"
    s = Store(EtcdConfig(endpoints=(dead, etcd_server.endpoint), prefix=f"/t-{uuid.uuid4().hex}", timeout=1.0))
    try:
        assert s.revision() > 0
        assert s.endpoint == etcd_server.endpoint
        lease, _ = s.grant(5)
        assert s.claim("web", "a", lease, since=time.time()) is not None
    finally:
        s.close()


def test_every_endpoint_dead_names_the_one_that_failed():
    dead = [f"http://127.0.0.1:{free_port()}" for _ in range(2)]
    s = Store(EtcdConfig(endpoints=tuple(dead), prefix=f"/t-{uuid.uuid4().hex}", timeout=1.0))
    try:
        with pytest.raises(Unavailable) as info:
            s.snapshot()
        assert dead[1] in str(info.value), "the message names the endpoint that failed last"
    finally:
        s.close()


class _HungEtcd:
    """A gRPC server speaking etcd's KV and Lease services that never answers (a hung etcd).

    Unlike a dead port, the connection and HTTP/2 handshake succeed, so only the per-call
    deadline can end a call.
    """

    def __init__(self):
        self.release = threading.Event()
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
        hang = self._hang

        class KV(etcdrpc.KVServicer):
            Range = Txn = Put = DeleteRange = hang

        class Lease(etcdrpc.LeaseServicer):
            LeaseGrant = LeaseRevoke = LeaseTimeToLive = hang

            def LeaseKeepAlive(self, request_iterator, context):  # noqa: N802 - gRPC API
                hang(None, context)
                return iter(())

        etcdrpc.add_KVServicer_to_server(KV(), self.server)
        etcdrpc.add_LeaseServicer_to_server(Lease(), self.server)
        port = self.server.add_insecure_port("127.0.0.1:0")
        self.endpoint = f"http://127.0.0.1:{port}"
        self.server.start()

    def _hang(self, request, context):
        self.release.wait(10)
        context.abort(grpc.StatusCode.UNAVAILABLE, "released")

    def close(self) -> None:
        self.release.set()
        self.server.stop(0)


@pytest.mark.parametrize("call", ["snapshot", "grant", "claim", "keepalive", "revoke"])
def test_hung_etcd_times_out_with_unavailable(call):
    hung = _HungEtcd()
    timeout = 0.5
    s = Store(EtcdConfig(endpoints=(hung.endpoint,), prefix=f"/t-{uuid.uuid4().hex}", timeout=timeout))
    try:
        ops = {"snapshot": lambda: s.snapshot(), "grant": lambda: s.grant(5),
               "claim": lambda: s.claim("web", "a", 1, since=0.0),
               "keepalive": lambda: s.keepalive(1), "revoke": lambda: s.revoke(1)}
        started = time.monotonic()
        with pytest.raises(Unavailable) as info:
            ops[call]()
        took = time.monotonic() - started
        assert timeout * 0.8 <= took < timeout + 1.0, f"{call} took {took:.2f}s"
        assert "DEADLINE_EXCEEDED" in str(info.value)
        assert hung.endpoint in str(info.value)
    finally:
        s.close()
        hung.close()


def test_a_hung_endpoint_is_not_retried_in_the_call_but_the_next_call_moves_on(etcd_server):
    """A timeout may have been applied, so it is not repeated; the following call uses the next member."""
    hung = _HungEtcd()
    s = Store(EtcdConfig(endpoints=(hung.endpoint, etcd_server.endpoint), prefix=f"/t-{uuid.uuid4().hex}",
                         timeout=0.5))
    try:
        with pytest.raises(Unavailable) as info:
            s.grant(5)
        assert hung.endpoint in str(info.value) and "DEADLINE_EXCEEDED" in str(info.value)
        assert s.revision() > 0
        assert s.endpoint == etcd_server.endpoint
    finally:
        s.close()
        hung.close()


def test_claim_on_a_dead_lease_is_an_error_not_a_claim(store):
    lease, _ = store.grant(5)
    store.revoke(lease)
    with pytest.raises(StoreError) as info:
        store.claim("web", "a", lease, since=time.time())
    assert not isinstance(info.value, Unavailable)
    assert "web" not in store.snapshot().owners


def test_history_pruning_deletes_only_its_own_history_keys(store_factory):
    """Cluster B's prefix lies inside cluster A's history of web: A's pruning must not touch B."""
    a = store_factory()
    b = store_factory(prefix=f"{a.prefix}/history/web")
    lease, _ = b.grant(30)
    b.register("n1", lease, model.encode_node("n1", lease, 1, 0.0, {}), {"db": model.encode_candidate(100, None)},
               {"db": model.encode_service(None)})
    assert b.claim("db", "n1", lease, time.time())
    b.record(model.Event("db", time.time(), "n1", "claimed", "vacant", 1))
    b_keys = sorted(kv.key for kv in b.list()[1])
    t0 = time.time()
    for i in range(6):
        a.record(model.Event("web", t0 + i, "a", "claimed", "vacant", i + 1), keep=3)
    after = {kv.key for kv in b.list()[1]}  # B's listing now also holds A's 3 newest entries of web
    assert set(b_keys) <= after, f"A's history pruning deleted B's keys {sorted(set(b_keys) - after)}"
    assert [e.token for e in a.history("web")] == [4, 5, 6]
    assert b.snapshot().owners["db"].node == "n1"
    b.revoke(lease)


def test_registration_of_500_services_fits_etcds_default_transaction_limit(store):
    """2 + 2N operations in one transaction broke at N = 63 with etcd's default --max-txn-ops (128)."""
    names = [f"svc{i:03d}" for i in range(500)]
    lease, _ = store.grant(10)
    held = store.register("a", lease, model.encode_node("a", lease, 1, 0.0, {}),
                          {n: model.encode_candidate(100, None) for n in names}, {n: model.encode_service(None) for n in names})
    assert held is None
    view = store.snapshot()
    assert set(view.services) == set(names)
    assert all(set(view.candidates[n]) == {"a"} for n in names)
    other, _ = store.grant(10)
    held = store.register("a", other, model.encode_node("a", other, 2, 0.0, {}), {"x": model.encode_candidate(1, None)},
                          {"x": model.encode_service(None)})
    assert held is not None and held.lease == lease, "a second agent with our name is refused"
    assert "x" not in store.snapshot().services, "and writes nothing"
    store.revoke(lease)
    store.revoke(other)


def test_owners_reads_the_current_owner_keys_in_one_go(store):
    lease, _ = store.grant(10)
    names = [f"s{i}" for i in range(150)]  # more than one transaction's worth
    tokens = {n: store.claim(n, "a", lease, time.time()) for n in names[::2]}
    found = store.owners(names)
    assert set(found) == set(names[::2])
    assert all(found[n].create_revision == tokens[n] and found[n].lease == lease for n in found)
    assert store.last_change == max(tokens.values())
    assert store.release("s0", lease)
    assert store.last_change > max(tokens.values()), "a release is a change an agent must see before planning"
    assert "s0" not in store.owners(["s0", "s2"]) and "s2" in store.owners(["s0", "s2"])
    store.revoke(lease)


def test_history_writer_writes_in_order_in_the_background_and_flushes_on_close(store):
    from etcdha.history import HistoryWriter

    writer = HistoryWriter(store, keep=100)
    t0 = time.time()
    for i in range(30):
        writer.record(model.Event("web", t0 + i / 1000, "a", "claimed", "vacant", i + 1))
    writer.close(timeout=10)
    assert [e.token for e in store.history("web")] == list(range(1, 31))


def test_last_watched_change_is_the_newest_state_write_not_a_history_write(store):
    """The first claims wait for the watch to reach this: it must be a revision the watch will see."""
    assert store.last_watched_change() == 0  # nothing under the prefix yet
    first = store.put(f"{store.prefix}/candidates/web/a", b"{}")
    newest = store.put(f"{store.prefix}/nodes/a", b"{}")
    store.put(f"{store.prefix}/history/web/0001", b"{}")  # later, but never on the watch
    assert first < newest < store.revision()
    assert store.last_watched_change() == newest


def test_history_of_many_services_is_written_in_a_few_requests_and_pruned_per_service(store):
    t0 = time.time()
    events = [model.Event(f"s{i % 150}", t0 + i * 0.001, "a", "claimed", "vacant", i + 1) for i in range(450)]
    calls = []
    real = store._txn
    store._txn = lambda *args, **kw: calls.append(1) or real(*args, **kw)
    try:
        store.record_many(events, keep=2)
    finally:
        store._txn = real
    assert len(calls) <= 5 + 2 + 3, f"{len(calls)} transactions for 450 entries"  # puts, listings, deletes
    for s in ("s0", "s77", "s149"):
        kept = store.history(s)
        assert [e.token for e in kept] == [e.token for e in events if e.service == s][-2:]
    store.record(model.Event("s0", t0 + 10, "b", "claimed", "vacant", 999), keep=2)
    assert [e.token for e in store.history("s0")] == [301, 999]
