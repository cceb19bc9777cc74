"""The node's etcd lease: grant, background keepalive, and a conservative local deadline.

The deadline is `send time of the last answered keepalive + ttl` on the monotonic
clock. etcd restarts the TTL when it *receives* a keepalive, which is after we
sent it, so our deadline is never later than etcd's expiry. (A leader change
only extends leases, which keeps the deadline conservative.)
"""
from __future__ import annotations

import enum
import logging
import threading
import time
from dataclasses import dataclass
from typing import Callable, Optional

from etcdha.errors import StoreError
from etcdha.store import Store

log = logging.getLogger(__name__)

RETRY = 0.1  # seconds before another keepalive after one failed (renewal resumes right after an election)


class LeaseState(enum.Enum):
    """After kazoo's session states."""

    OK = "ok"                # renewed recently
    SUSPENDED = "suspended"  # renewals failing, deadline not reached: claim nothing
    LOST = "lost"            # deadline passed or etcd says the lease is gone: everything must stop


@dataclass(frozen=True)
class LeaseClock:
    """Pure timing math of one lease, testable with any `now`."""

    ttl: float
    interval: float

    def deadline(self, last_ok_send: float) -> float:
        return last_ok_send + self.ttl

    def state(self, now: float, last_ok_send: float, expired: bool = False) -> LeaseState:
        if expired or now >= self.deadline(last_ok_send):
            return LeaseState.LOST
        if now - last_ok_send > 1.5 * self.interval:
            return LeaseState.SUSPENDED
        return LeaseState.OK


class Lease:
    """One granted lease, renewed by a background thread every `interval` seconds.

    `on_renew(deadline)` is called after every answered keepalive (the agent feeds
    the fence from it); `on_change(state)` whenever the state changes.
    """

    def __init__(self, store: Store, ttl: int, interval: float,
                 on_renew: Callable[[float], None], on_change: Callable[[LeaseState], None],
                 clock: Callable[[], float] = time.monotonic):
        self.store = store
        self.interval = interval
        self.on_renew = on_renew
        self.on_change = on_change
        self.clock = clock
        self.requested_ttl = ttl
        self.id = 0
        self._clock_math = LeaseClock(ttl, interval)
        self._last_ok_send = 0.0
        self._expired = False
        self._state = LeaseState.LOST
        self._stop = threading.Event()
        self._notice_lock = threading.Lock()  # the renewal thread and poll() both report changes
        self._thread: Optional[threading.Thread] = None

    def grant(self) -> int:
        """Grant a lease and start renewing it. Raises StoreError if etcd is unreachable."""
        sent = self.clock()
        self.id, granted = self.store.grant(self.requested_ttl)
        # Conservative: the shorter of what we asked and what etcd granted.
        self._clock_math = LeaseClock(min(self.requested_ttl, granted), self.interval)
        self._last_ok_send, self._expired = sent, False
        self._state = LeaseState.OK
        self.on_renew(self.deadline)
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="etcdha-lease", daemon=True)
        self._thread.start()
        return self.id

    @property
    def deadline(self) -> float:
        return self._clock_math.deadline(self._last_ok_send)

    @property
    def state(self) -> LeaseState:
        return self._clock_math.state(self.clock(), self._last_ok_send, self._expired)

    def _run(self) -> None:
        next_at = self.clock()
        while not self._stop.is_set():
            next_at += self.interval
            sent = self.clock()
            renewed = False
            try:
                ttl = self.store.keepalive(self.id, timeout=self.interval)
                if ttl <= 0:
                    self._expired = True
                    log.error("etcd says lease %x has expired", self.id)
                else:
                    renewed = True
                    self._last_ok_send = max(self._last_ok_send, sent)
                    self._clock_math = LeaseClock(min(self.requested_ttl, ttl), self.interval)
                    self.on_renew(self.deadline)
            except StoreError as exc:
                log.debug("keepalive failed: %s", exc)
            except Exception:  # noqa: BLE001 - a dying renewal thread would silently fence us
                log.exception("keepalive: unexpected error")
            self._notice()
            if self._expired or self.state is LeaseState.LOST:
                return
            if not renewed:  # e.g. an etcd leader election: try again soon, not a whole interval later
                next_at = min(next_at, self.clock() + RETRY)
            self._stop.wait(max(0.0, next_at - self.clock()))
            next_at = max(next_at, self.clock() - self.interval)

    def _notice(self) -> None:
        with self._notice_lock:
            self._notice_locked()

    def _notice_locked(self) -> None:
        state = self.state
        if state is not self._state:
            level = logging.INFO if state is LeaseState.OK else logging.WARNING
            log.log(level, "lease %x: %s -> %s (%.2fs to deadline)", self.id, self._state.value, state.value,
                    self.deadline - self.clock())
            self._state = state
            self.on_change(state)

    def poll(self) -> LeaseState:
        """Current state; also reports a change the renewal thread has not noticed yet."""
        self._notice()
        return self._state

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=self.interval * 2 + 1)

    def revoke(self) -> None:
        """Stop renewing and revoke: etcd deletes all our keys at once (graceful hand-over)."""
        self.stop()
        if self.id:
            self.store.revoke(self.id)
        self._expired = True
