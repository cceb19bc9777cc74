"""Carrying out a plan on this node: claims, handoffs, stops, restarts, releases and starts.

`decide.plan` says what to do and the agent's loop gathers the facts and publishes;
this module does it, through the store (one-key transactions), the actuator (cgroups,
supervisord, VIPs) and the event seam (history, hook, metrics, log). Its rule: nothing is
released or handed over unless the stop before it held, and a program is started only
where etcd itself still says the service is ours; when a stop does not hold, the caller
(the agent) fences this node.
"""
from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from typing import Callable, Mapping, Optional

from etcdha import events, health, metrics, model
from etcdha.actuator import Actuator, Local
from etcdha.config import Config, Service
from etcdha.decide import Action, Kind, Reason
from etcdha.errors import ActuatorError, ConfigError, EtcdhaError, StoreError
from etcdha.lease import Lease, LeaseState
from etcdha.store import Store

log = logging.getLogger("etcdha.agent")  # its lines are the agent's, as before the split

# claims (or handoffs) in flight at once: a cold start or a takeover of hundreds of services waits for
# one etcd round trip per CLAIM_WORKERS claims instead of one per claim; a drain stops as many at once
CLAIM_WORKERS = 8
# claimed services start in batches of this many while the other claims are still running; the first
# batch is one round of claims: supervisord spawns one program at a time, and every program of a
# takeover waits for the first spawn, so it starts as soon as there is something to start
FIRST_BATCH = CLAIM_WORKERS
START_BATCH = 32


def candidate_value(service: Service) -> bytes:
    """Our candidate key's value for `service`: its priority here and its VIP."""
    return model.encode_candidate(service.priority, str(service.vip) if service.vip else None)


class Executor:
    """The agent's actions, one at a time or many together; owns what a cycle claimed and started."""

    def __init__(self, config: Config, store: Store, hands: Actuator, prober: health.Prober,
                 events_: events.Events, wake: threading.Event, lease: Callable[[], Lease],
                 local: Callable[[], Local], vacant_since: Callable[[], Mapping[str, float]],
                 publish: Callable[..., None], recover: Callable[[str], None], clock: Callable[[], float],
                 metrics_: Optional[metrics.Metrics] = None):
        self.config, self.store, self.hands, self.prober, self.events = config, store, hands, prober, events_
        self.wake, self._lease, self._local, self._vacant_since = wake, lease, local, vacant_since
        self.publish, self.recover, self.clock, self.metrics = publish, recover, clock, metrics_
        self.starts: dict[str, tuple[int, float]] = {}  # service -> (token, monotonic time) of our last start
        self.claimed_at: dict[str, float] = {}  # service -> when we claimed it (monotonic): claim-to-running
        self.claimed: list[tuple[str, int]] = []  # (service, token) claimed (or restarted) in this cycle: started in it too
        self.failing: dict[str, tuple[str, str]] = {}  # service -> (check, output), as planned on in this cycle
        self.claimed_lock = threading.Lock()
        self.workers = ThreadPoolExecutor(max_workers=CLAIM_WORKERS, thread_name_prefix="etcdha-act")

    @property
    def lease(self) -> Lease:
        return self._lease()

    @property
    def local(self) -> Local:
        return self._local()

    @property
    def vacant_since(self) -> Mapping[str, float]:
        return self._vacant_since()

    def close(self) -> None:
        self.workers.shutdown(wait=True)

    def record(self, service: str, event: str, reason: str, token: int = 0, detail: str = "",
               at: Optional[float] = None) -> None:
        self.events.emit(service, event, reason, token, detail, at)

    def execute(self, action: Action) -> bool:
        """Carry out one action; False if we had to fence ourselves (the rest of the plan is void)."""
        failure = self.attempt(action)
        if failure is not None:  # a stop that did not hold: nothing may be released
            self.recover(f"{action} failed, fencing this node: {failure}")
            return False
        return True

    def execute_together(self, actions: list[Action]) -> bool:
        """Claims and handoffs of different services, CLAIM_WORKERS at a time; False if we fenced ourselves.

        A drain hands over dozens of services and a takeover claims hundreds: one after
        another they waited for each other's stop or etcd round trip. While the workers
        claim, what is already claimed starts here (FIRST_BATCH, then START_BATCH or more at
        a time, each batch checked against etcd by start_all): a takeover of hundreds no
        longer waits for its last claim before its first program starts.
        """
        lease = self.lease.id
        self.hands.probe_ahead([self.config.services[a.service] for a in actions if a.kind is Kind.CLAIM])
        futures = [self.workers.submit(self.attempt, a, lease) for a in actions]
        pending = set(futures)
        failed = fenced = False
        batch_size = FIRST_BATCH
        while pending:
            done, pending = wait(pending, timeout=0.05, return_when=FIRST_COMPLETED)
            failed = failed or any(not f.cancelled() and f.result() is not None for f in done)
            if not (failed or fenced) and len(self.claimed) >= batch_size:
                batch_size = START_BATCH
                with self.claimed_lock:  # workers append meanwhile
                    batch, self.claimed = self.claimed, []
                if not self.start_all([Action(Kind.START, svc, Reason.OWNER, token=token) for svc, token in batch]):
                    fenced = True  # we fenced ourselves and rejoined: what is left of this plan is void
                    for f in pending:
                        f.cancel()
        if fenced:
            return False
        failures = [(a, f.result()) for a, f in zip(actions, futures) if f.result() is not None]
        if failures:
            action, failure = failures[0]
            self.recover(f"{action} failed, fencing this node: {failure}")
            return False
        return True

    def attempt(self, action: Action, planned_on: Optional[int] = None) -> Optional[EtcdhaError]:
        """Carry out one action (not START: see start_all); the error if a stop did not hold (the caller must
        fence), else None. With `planned_on`, nothing is done once our lease is no longer that one."""
        service = self.config.services[action.service]
        prefix, me, lease = self.config.etcd.prefix, self.config.node, self.lease.id
        if planned_on is not None and lease != planned_on:
            return None  # we fenced ourselves and rejoined since this was planned
        if action.kind in (Kind.CLAIM, Kind.START, Kind.RESTART) and not (
                self.hands.runtime_alive() and self.lease.poll() is LeaseState.OK):
            # we may have stalled since planning (e.g. SIGSTOP): the plan is stale, take nothing
            log.warning("not doing %s: the lease is no longer healthy", action)
            self.wake.set()
            return None
        try:
            if action.kind is Kind.ENROLL:
                self.store.put(model.candidate_key(prefix, service.name, me), candidate_value(service), lease)
                self.store.delete(model.cooldown_key(prefix, service.name, me))
            elif action.kind is Kind.WITHDRAW:
                self.store.delete(model.candidate_key(prefix, service.name, me))
            elif action.kind is Kind.CLAIM:
                token = self.store.claim(service.name, me, lease, time.time(),
                                         complete_move=action.reason is Reason.MOVED)
                log.info("%s %s", "claimed" if token else "lost the race for", service.name)
                if token:
                    self.record(service.name, "claimed", action.reason.value, token)
                    with self.claimed_lock:
                        self.claimed.append((service.name, token))
                    self.claimed_at[service.name] = self.clock()
                    if self.metrics is not None and action.reason is Reason.VACANT:
                        self.metrics.takeover.observe(max(0.0, self.clock() - self.vacant_since.get(service.name,
                                                                                                 self.clock())))
            elif action.kind is Kind.STOP:
                self.hands.stop(service)
                self.record(service.name, "stopped", action.reason.value)
            elif action.kind is Kind.RESTART:
                self.restart(service, action.token)
            elif action.kind is Kind.RELEASE:
                if action.reason is Reason.UNHEALTHY:
                    self.count_failure(service, action.token)
                self.release(service, self.failure(action), action.token,
                             "migrated" if action.reason is Reason.UNHEALTHY else "failed")
            elif action.kind is Kind.HANDOFF:
                self.prober.forget(service.name)
                self.hands.stop(service)  # raises unless the cgroup is empty and the VIP gone
                self.record(service.name, "stopped", action.reason.value, action.token)
                # the move happens when the release commits: the new owner may claim and record that before
                # our answer comes back, so the time is taken before (history lists events by time)
                released_at = time.time()
                if self.store.release(service.name, lease):
                    log.info("handed %s over to %s (%s)", service.name, action.target, action.reason.value)
                    self.record(service.name, "moved", action.reason.value, action.token, f"to {action.target}",
                                at=released_at)
            elif action.kind is Kind.REQUEST_MOVE:
                if self.store.request_move(service.name, me, action.target, action.token, self.config.move_timeout):
                    log.info("drained: asked to move %s to %s", service.name, action.target)
        except (ConfigError, ActuatorError) as exc:
            return exc
        except StoreError as exc:
            log.error("%s failed: %s", action, exc)
        return None

    def start_all(self, actions: list[Action]) -> bool:
        """START actions as one batch: only what etcd itself still says is ours; failures are released.

        The owner keys are read from etcd (linearizable, one transaction) right before:
        a view that lags behind can never start a program we no longer own. False if we
        had to fence ourselves.
        """
        if not (self.hands.runtime_alive() and self.lease.poll() is LeaseState.OK):
            log.warning("not starting %s: the lease is no longer healthy", ", ".join(a.service for a in actions))
            self.wake.set()
            return True
        try:
            owners = self.store.owners([a.service for a in actions])
        except StoreError as exc:
            log.error("not starting %s: %s", ", ".join(a.service for a in actions), exc)
            return True
        ours = []
        for a in actions:
            owner = owners.get(a.service)
            if owner is not None and owner.lease == self.lease.id and owner.create_revision == a.token:
                ours.append(a)
            else:
                log.warning("not starting %s: etcd says its owner key is %s, not ours with token %d", a.service,
                            "gone" if owner is None else f"on lease {owner.lease:x} token {owner.create_revision}",
                            a.token)
                self.wake.set()
        if ours:
            self.publish(None, self.local, frozenset(a.service for a in ours))
        failed = self.hands.start_many([(self.config.services[a.service], a.token) for a in ours])
        started = self.clock()
        for a in ours:
            if a.service not in failed:
                self.starts[a.service] = (a.token, started)
                self.record(a.service, "started", a.reason.value, a.token)
        for a in ours:
            if a.service in failed:
                log.error("%s failed: %s", a, failed[a.service])
                try:
                    self.release(self.config.services[a.service], str(failed[a.service]), a.token)
                except (ConfigError, ActuatorError) as exc:  # the stop did not hold: nothing may be released
                    self.recover(f"{a} failed and its stop did not hold, fencing this node: {exc}")
                    return False
        return True

    def failure(self, action: Action) -> str:
        """The reason recorded in history when we give a service up."""
        if action.reason is Reason.UNHEALTHY:
            check, output = self.failing.get(action.service, ("?", ""))
            service = self.config.services[action.service]
            return (f"check {check} failed after {service.max_restarts} restart(s) within "
                    f"{service.failure_timeout:g}s: {output}")
        if action.reason is Reason.DAEMONIZED:
            left = self.local.processes.get(action.service, 0)
            return (f"program daemonized: supervisord's process exited while {left} process(es) remain in its "
                    "cgroup; run it in the foreground (e.g. nginx -g 'daemon off;')")
        return "supervisord reports FATAL"

    def count_failure(self, service: Service, token: int) -> model.Failures:
        """A failed health check, counted in etcd (raises StoreError: then we do nothing yet) and recorded."""
        check, output = self.failing.get(service.name, ("?", ""))
        failures = self.store.add_failure(service.name, self.config.node, time.time(), service.failure_timeout,
                                          check, output)
        count = failures.count(time.time())
        log.warning("%s: check %s failed (failure %d within %gs): %s", service.name, check, count,
                    service.failure_timeout, output)
        self.record(service.name, "check-failed", "unhealthy", token, f"{check}: {output}")
        return failures

    def restart(self, service: Service, token: int) -> None:
        """Restart in place after failed checks: count it, stop (verified: raises if it did not hold), start again."""
        count = self.count_failure(service, token).count(time.time())
        self.prober.restarting(service.name)
        self.hands.stop(service)
        self.record(service.name, "stopped", "unhealthy", token)
        self.claimed.append((service.name, token))  # started in this cycle's batch, after a check of the owner key
        self.record(service.name, "restarted", "unhealthy", token,
                    f"restart {count} of at most {service.max_restarts} within {service.failure_timeout:g}s")

    def release(self, service: Service, why: str, token: int = 0, event: str = "failed") -> None:
        """Give up a service that fails here: stop (verified), step aside for a while, delete the owner key.

        Raises ActuatorError if the stop did not hold: then the key stays ours and the
        caller fences this node.
        """
        self.prober.forget(service.name)
        self.hands.stop(service)
        self.record(service.name, "stopped", event, token)
        prefix, me = self.config.etcd.prefix, self.config.node
        until = time.time() + self.config.failure_cooldown
        try:
            self.store.put(model.cooldown_key(prefix, service.name, me), model.encode_cooldown(until, why),
                           self.lease.id)
            self.store.delete(model.candidate_key(prefix, service.name, me))
            self.store.release(service.name, self.lease.id)
        except StoreError as exc:  # e.g. our lease is gone: the owner key went with it
            log.error("releasing %s in etcd: %s", service.name, exc)
            return
        self.record(service.name, event, why, token)
        log.warning("released %s: %s; not taking it here again for %gs (etcdha cleanup %s clears this)",
                    service.name, why, self.config.failure_cooldown, service.name)
