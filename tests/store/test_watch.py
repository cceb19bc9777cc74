"""etcdha.store.Watcher against a real etcd: wakes, resumption after an etcd restart, compaction."""
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
