"""etcdha.lease.Lease against a real etcd: renewals, then SUSPENDED and LOST when etcd goes away."""
from __future__ import annotations

import threading
import time

import pytest

from etcdha.lease import Lease, LeaseState

from .conftest import wait_for

pytestmark = pytest.mark.store


def test_lease_renews_then_suspends_and_is_lost_without_etcd(etcd_server, store):
    renewals: list[float] = []
    changes: list[LeaseState] = []
    lock = threading.Lock()

    def on_renew(deadline: float) -> None:
        with lock:
            renewals.append(deadline)

    def on_change(state: LeaseState) -> None:
        with lock:
            changes.append(state)

    lease = Lease(store, ttl=2, interval=0.5, on_renew=on_renew, on_change=on_change)
    try:
        granted_at = time.monotonic()
        lease_id = lease.grant()
        assert lease_id > 0
        assert lease.state is LeaseState.OK
        assert lease.deadline <= granted_at + 2 + 0.1

        wait_for(lambda: len(renewals) >= 4, 4, what="several renewals")
        with lock:
            seen = list(renewals)
        assert all(a <= b for a, b in zip(seen, seen[1:])), seen
        assert seen[-1] > seen[0]
        assert seen[-1] <= time.monotonic() + 2  # never beyond now + ttl
        assert lease.state is LeaseState.OK
        assert lease.poll() is LeaseState.OK
        assert store.lease_ttl_left(lease_id) > 0
        assert changes == []

        etcd_server.stop()
        stopped_at = time.monotonic()
        # lease.state is pure; on_change must come from the renewal thread itself
        wait_for(lambda: lease.state is LeaseState.SUSPENDED, 2, what="SUSPENDED after renewals fail")
        wait_for(lambda: LeaseState.SUSPENDED in changes, 1.5, what="on_change(SUSPENDED)")
        wait_for(lambda: lease.state is LeaseState.LOST, 3, what="LOST once the deadline passes")
        lost_at = time.monotonic()
        with lock:
            last_deadline = renewals[-1]
        assert lost_at >= last_deadline, "LOST reported before the local deadline"
        assert lost_at - stopped_at <= 2 + 1, "LOST reported long after ttl"
        wait_for(lambda: LeaseState.LOST in changes, 1.5, what="on_change(LOST)")
        assert lease.poll() is LeaseState.LOST
        with lock:
            assert changes == [LeaseState.SUSPENDED, LeaseState.LOST], changes
        # the renewal thread ends once the lease is lost
        lease.stop()
        assert lease._thread is not None and not lease._thread.is_alive()
    finally:
        lease.stop()
        etcd_server.ensure_running()


def test_etcd_never_expires_the_lease_before_the_local_deadline(store):
    """The safety relation the fence relies on: our deadline is never later than etcd's expiry."""
    lease = Lease(store, ttl=2, interval=0.5, on_renew=lambda d: None, on_change=lambda s: None)
    lease.grant()
    try:
        assert store.claim("web", "a", lease.id, since=time.time()) is not None
        start = time.monotonic()
        wait_for(lambda: time.monotonic() - start > 1.2, 2, what="a few renewals")
        lease.stop()  # renewals stop: etcd will expire the lease on its own
        deadline = lease.deadline
        assert 1.0 < deadline - time.monotonic() <= 2.0, "the last renewal should be recent"

        observations = []  # (finished_at, present)
        end = deadline + 3
        for _ in range(1000):
            present = "web" in store.snapshot().owners
            finished = time.monotonic()
            observations.append((finished, present))
            if not present or finished > end:
                break
            time.sleep(0.02)
        gone = [t for t, present in observations if not present]
        assert gone, "the owner key outlived its lease by more than 3 s"
        early = [t for t in gone if t < deadline]
        assert not early, f"etcd deleted the key {deadline - early[0]:.3f}s before the local deadline"
    finally:
        lease.stop()
        if lease.id:
            store.revoke(lease.id)
