"""lease.LeaseClock: deadline and OK / SUSPENDED / LOST with any `now` (no real clock, no etcd)."""
from __future__ import annotations

import time

import pytest

from etcdha.errors import StoreError
from etcdha.lease import Lease, LeaseClock, LeaseState

pytestmark = pytest.mark.unit


def test_deadline_is_last_answered_send_plus_ttl():
    c = LeaseClock(ttl=2.0, interval=0.5)
    assert c.deadline(100.0) == 102.0
    assert LeaseClock(ttl=5, interval=1).deadline(0.25) == 5.25


@pytest.mark.parametrize("now,expected", [
    (100.0, LeaseState.OK),          # just renewed
    (100.5, LeaseState.OK),          # one interval: the next renewal is due
    (100.75, LeaseState.OK),         # exactly 1.5 intervals is still OK
    (100.76, LeaseState.SUSPENDED),  # a renewal is overdue
    (101.99, LeaseState.SUSPENDED),
    (102.0, LeaseState.LOST),        # at the deadline
    (150.0, LeaseState.LOST),
])
def test_state_over_time(now, expected):
    c = LeaseClock(ttl=2.0, interval=0.5)
    assert c.state(now, last_ok_send=100.0) is expected


def test_expired_is_lost_at_once():
    c = LeaseClock(ttl=2.0, interval=0.5)
    assert c.state(100.0, last_ok_send=100.0, expired=True) is LeaseState.LOST
    assert c.state(100.1, last_ok_send=100.0, expired=False) is LeaseState.OK


def test_lost_wins_over_suspended_when_ttl_is_short():
    # ttl shorter than 1.5 intervals: past the deadline it is LOST, never SUSPENDED
    c = LeaseClock(ttl=1.0, interval=1.0)
    assert c.state(10.9, last_ok_send=10.0) is LeaseState.OK
    assert c.state(11.0, last_ok_send=10.0) is LeaseState.LOST
    assert c.state(11.6, last_ok_send=10.0) is LeaseState.LOST


def test_renewal_moves_the_deadline():
    c = LeaseClock(ttl=2.0, interval=0.5)
    assert c.state(101.0, last_ok_send=100.0) is LeaseState.SUSPENDED
    assert c.state(101.0, last_ok_send=100.9) is LeaseState.OK
    assert c.deadline(100.9) == pytest.approx(102.9)


class _FlakyStore:
    """A store whose keepalives fail `failures` times, then succeed; records when each was sent."""

    def __init__(self, failures: int):
        self.failures = failures
        self.sent: list[float] = []

    def grant(self, ttl: int) -> tuple[int, int]:
        return 7, ttl

    def keepalive(self, lease: int, timeout: float) -> int:
        self.sent.append(time.monotonic())
        if len(self.sent) <= self.failures:
            raise StoreError("no leader")
        return 6


def test_a_failed_renewal_is_retried_at_once_not_an_interval_later():
    """After an etcd leader election renewals must resume at once: an interval later may be past the fence."""
    store = _FlakyStore(failures=2)
    lease = Lease(store, 6, 1.0, on_renew=lambda _d: None, on_change=lambda _s: None)
    lease.grant()
    try:
        deadline = time.monotonic() + 5
        while len(store.sent) < 4 and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        lease.stop()
    gaps = [b - a for a, b in zip(store.sent, store.sent[1:])]
    assert gaps[0] < 0.5 and gaps[1] < 0.5, gaps   # retries after the failures: RETRY, not the 1 s interval
    assert gaps[2] > 0.8, gaps                     # renewed: back to the interval
