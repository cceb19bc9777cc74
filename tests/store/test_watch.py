"""etcdha.store.Watcher and Informer against a real etcd: wakes, the kept copy, etcd restarts, compaction, staleness."""
from __future__ import annotations

import threading
import time

import pytest
from etcd3 import etcdrpc

from etcdha.errors import Unavailable
from etcdha.store import Store, Watcher

from .conftest import wait_for

pytestmark = pytest.mark.store

WAKE_WITHIN = 2.0


class Recorder:
    """The watcher's wake callback: records the watcher's revision at every call.

    The watcher raises `revision` *before* it calls wake() for events, so a wake that
    records revision >= R proves the watch delivered the change at R (a reconnect-only
    wake records the old revision).

    While `gate` is armed, a wake made while the watcher is disconnected blocks until
    released: that holds the watcher off etcd for as long as the test needs.
    """

    def __init__(self):
        self.watcher: Watcher | None = None
        self.revisions: list[int] = []
        self.lock = threading.Lock()
        self.gate_armed = False
        self.gate_entered = threading.Event()
        self.gate_release = threading.Event()

    def __call__(self) -> None:
        w = self.watcher
        with self.lock:
            self.revisions.append(w.revision)
        if self.gate_armed and not w.connected.is_set():
            self.gate_entered.set()
            self.gate_release.wait(30)

    def count(self) -> int:
        with self.lock:
            return len(self.revisions)

    def woke_at(self, revision: int, after: int = 0) -> bool:
        with self.lock:
            return any(r >= revision for r in self.revisions[after:])


def put_retrying(store: Store, key: str, value: bytes, timeout: float = 10.0) -> int:
    """A put right after an etcd restart: the client channel may still be in its reconnect backoff."""
    deadline = time.monotonic() + timeout
    for _ in range(200):
        try:
            return store.put(key, value)
        except Unavailable:
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.05)
    raise AssertionError("put did not succeed")


class RecordingWatchStub:
    """Wraps the store's WatchStub to record every watch the watcher creates (its start revision)."""

    def __init__(self, inner):
        self.inner = inner
        self.creates: list[int] = []

    def Watch(self, requests, *args, **kwargs):  # noqa: N802 - gRPC stub API
        def tee():
            for req in requests:
                if req.HasField("create_request"):
                    self.creates.append(req.create_request.start_revision)
                yield req

        return self.inner.Watch(tee(), *args, **kwargs)


@pytest.fixture
def watch(store):
    started: list[Watcher] = []
    store.watch_stub = RecordingWatchStub(store.watch_stub)

    def make(revision: int = 0) -> tuple[Watcher, Recorder]:
        rec = Recorder()
        w = store.watcher(rec)
        rec.watcher = w
        w.revision = revision
        started.append(w)
        w.start()
        return w, rec

    yield make
    for w in started:
        w.stop()
        w.join(5)
        assert not w.is_alive(), "the watcher thread did not stop"


def test_watcher_wakes_on_a_change(store, watch):
    w, rec = watch()
    wait_for(w.connected.is_set, 5, what="the watch to be established")
    rev = store.put(store.prefix + "/x", b"1")
    wait_for(lambda: rec.woke_at(rev), WAKE_WITHIN, what=f"a wake for revision {rev}")
    # a key outside the prefix does not move the watcher
    other = store.put(store.prefix + "-other/x", b"1")
    time.sleep(0.3)
    assert w.revision < other


def test_watcher_resumes_after_etcd_restart(etcd_server, store, watch):
    w, rec = watch()
    wait_for(w.connected.is_set, 5, what="the watch to be established")
    rev = store.put(store.prefix + "/before", b"1")
    wait_for(lambda: rec.woke_at(rev), WAKE_WITHIN, what="a wake before the restart")

    # 1. plain restart: once reconnected, a new change wakes the callback through the watch.
    restarts = w.restarts
    etcd_server.restart()
    wait_for(lambda: w.restarts > restarts and w.connected.is_set(), 10,
             what="the watcher to notice the restart and reconnect")
    mark = rec.count()
    rev = put_retrying(store, store.prefix + "/after-restart", b"1")
    wait_for(lambda: rec.woke_at(rev, after=mark), WAKE_WITHIN, what="a wake for a change after the restart")

    # 2. a change made after etcd is back but before the watcher reconnected is not lost.
    rec.gate_armed = True
    restarts = w.restarts
    etcd_server.stop()
    assert rec.gate_entered.wait(10), "the watcher did not notice etcd going away"
    assert not w.connected.is_set()
    etcd_server.start()
    gap_rev = put_retrying(store, store.prefix + "/during-gap", b"1")
    assert not w.connected.is_set(), "the watcher reconnected before the change; the gap was not tested"
    assert w.revision < gap_rev
    mark = rec.count()
    creates = len(store.watch_stub.creates)
    rec.gate_armed = False
    rec.gate_release.set()
    wait_for(lambda: w.restarts > restarts and w.connected.is_set(), 10, what="the watcher to reconnect")
    resumed_from = store.watch_stub.creates[creates:]
    assert resumed_from and all(r <= gap_rev for r in resumed_from), (
        f"the watch was re-created from revisions {resumed_from}, after the change at {gap_rev}: "
        "it did not resume from the last revision it saw")
    wait_for(lambda: rec.woke_at(gap_rev, after=mark), WAKE_WITHIN,
             what="the change made during the gap to be replayed (resume from the last revision)")

    # and it keeps watching afterwards
    mark = rec.count()
    rev = store.put(store.prefix + "/later", b"1")
    wait_for(lambda: rec.woke_at(rev, after=mark), WAKE_WITHIN, what="a wake after the resumed watch")


def test_watcher_recovers_from_a_compacted_start_revision(store, watch):
    first = store.put(store.prefix + "/c", b"0")
    for i in range(5):
        store.put(store.prefix + "/c", str(i).encode())
    compact_at = store.put(store.prefix + "/c", b"last")
    store.kv.Compact(etcdrpc.CompactionRequest(revision=compact_at, physical=True), timeout=5)

    # Start watching from a revision etcd no longer has.
    w, rec = watch(revision=first)
    wait_for(lambda: w.restarts >= 1 and w.connected.is_set(), 10,
             what="the watcher to restart after the compaction and reconnect")
    assert w.revision >= compact_at, "after a compaction the watcher re-reads from now"
    assert rec.count() >= 1, "a compaction must wake the agent to re-read the full state"

    for i in range(2):
        mark = rec.count()
        rev = store.put(store.prefix + f"/after-compaction-{i}", b"1")
        wait_for(lambda: rec.woke_at(rev, after=mark), WAKE_WITHIN, what="a wake after the compaction")


# ---- the Informer: the agent's copy of the cluster, kept from the watch ------------------------

@pytest.fixture
def informer(store):
    woke = threading.Event()
    inf = store.informer(woke.set)
    inf.start()
    wait_for(lambda: inf.synced.is_set() and inf.connected.is_set(), 10, what="the informer to list and watch")
    yield inf
    inf.stop()
    inf.join(10)


def current(inf, predicate, what: str, timeout: float = WAKE_WITHIN):
    """Wait until the informer's view satisfies `predicate`; returns that view."""
    return wait_for(lambda: (lambda v: v if v is not None and predicate(v) else None)(inf.view(30)), timeout,
                    what=what)


def test_informer_applies_puts_and_deletes_and_ignores_history(store, informer):
    from etcdha import model

    lease, _ = store.grant(30)
    store.put(model.service_key(store.prefix, "web"), model.encode_service("198.18.0.100/24"))
    store.put(model.candidate_key(store.prefix, "web", "a"), model.encode_candidate(100, None), lease)
    current(informer, lambda v: "a" in v.candidates.get("web", {}), "the candidate to appear")
    store.record(model.Event("web", time.time(), "a", "claimed", "vacant", 1))
    before = informer.view(30)
    time.sleep(0.3)
    assert informer.view(30) is before, "a history write neither changes nor rebuilds the view"
    store.delete(model.candidate_key(store.prefix, "web", "a"))
    current(informer, lambda v: "web" not in v.candidates, "the delete to be applied")
    store.put(model.candidate_key(store.prefix, "web", "b"), model.encode_candidate(50, None), lease)
    store.revoke(lease)  # deletes b's candidate key with the lease
    view = current(informer, lambda v: v.revision >= store.revision() - 1 and "web" not in v.candidates,
                   "the revoke to be applied")
    assert view.services == {"web": "198.18.0.100/24"}
    assert informer.lists == 1, "events only, no re-listing"


def test_informer_view_matches_a_fresh_snapshot_after_many_changes(store, informer):
    from etcdha import model

    lease, _ = store.grant(30)
    for i in range(60):
        store.put(model.candidate_key(store.prefix, f"s{i % 7}", f"n{i % 5}"), model.encode_candidate(i, None), lease)
        if i % 3 == 0:
            store.delete(model.candidate_key(store.prefix, f"s{(i + 2) % 7}", f"n{(i + 1) % 5}"))
    fresh = store.snapshot()
    view = current(informer, lambda v: v.candidates == fresh.candidates, "the informer to converge on the snapshot")
    assert view.candidates == fresh.candidates
    store.revoke(lease)


def test_informer_keeps_every_change_across_an_etcd_restart(etcd_server, store, informer):
    from etcdha import model

    etcd_server.stop()
    wait_for(lambda: not informer.connected.is_set(), 10, what="the informer to notice etcd is gone")
    etcd_server.start()
    put_retrying(store, model.service_key(store.prefix, "after"), model.encode_service(None))
    current(informer, lambda v: "after" in v.services, "the change made after the restart", timeout=15)
    assert informer.lists == 1, "it resumed from its revision instead of listing again"


def test_informer_lists_again_after_a_compaction(store, informer):
    from etcdha import model

    informer.stop()  # hold it off while the history it would resume from is compacted away
    informer.join(10)
    inf = store.informer(lambda: None)
    inf.revision = 1  # as if it had stopped long ago
    store.put(model.service_key(store.prefix, "x"), model.encode_service(None))
    rev = store.revision()
    store.kv.Compact(etcdrpc.CompactionRequest(revision=rev, physical=True), timeout=5)
    inf.start()
    try:
        current(inf, lambda v: "x" in v.services, "the informer to list again after the compaction", timeout=10)
        assert inf.lists == 1
    finally:
        inf.stop()
        inf.join(10)


def test_informer_view_goes_stale_when_the_stream_stops_answering(etcd_server, store, informer):
    """A watch that silently stops (here: etcd frozen with SIGSTOP) must not feed decisions."""
    import os
    import signal

    informer.request_progress()
    wait_for(lambda: informer.view(1.0) is not None, 2, what="a fresh view")
    os.kill(etcd_server.pid, signal.SIGSTOP)
    try:
        time.sleep(1.2)
        informer.request_progress()
        wait_for(lambda: informer.view(1.0) is None, 3, what="the view to be reported stale")
    finally:
        os.kill(etcd_server.pid, signal.SIGCONT)
    informer.request_progress()
    wait_for(lambda: informer.view(1.0) is not None, 5, what="a fresh view once etcd answers again")
