"""The agent loop: wait -> snapshot -> plan -> execute -> publish.

Woken by a watch event, a lease state change, a signal or a tick. Deciding is
`decide.plan` and doing is `executor.Executor`; this module gathers the facts, hands
the plan over and publishes what came of it, and owns joining, fencing and rejoining,
and the graceful stop. The lease
is renewed by its own thread and feeds the fence directly, so a slow action here
never delays renewal, and a hung agent (all threads stopped) is fenced.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import socket
import threading
import time
from typing import Callable, Optional

from etcdha import decide, events, health, metrics, model
from etcdha.actuator import Actuator, Local
from etcdha.config import Config, election_ride_through, host_problems
from etcdha.decide import Action, Kind, Reason
from etcdha.executor import Executor, candidate_value
from etcdha.errors import ActuatorError, AuthError, ConfigError, StoreError
from etcdha.history import HistoryWriter
from etcdha.lease import Lease, LeaseState
from etcdha.store import Store
from etcdha.supervisord import service_environment

log = logging.getLogger(__name__)


def log_event(event: model.Event) -> None:
    """The log's copy of every transition: one line, greppable as `event:`."""
    log.info("event: %s %s (%s)%s%s", event.event, event.service, event.reason,
             f" token={event.token}" if event.token else "", f": {event.detail}" if event.detail else "")


def sd_notify(message: str) -> None:
    """Tell systemd (Type=notify, WatchdogSec=) how we are; a no-op outside systemd."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.connect(address)
            sock.sendall(message.encode())
    except OSError as exc:
        log.debug("sd_notify: %s", exc)


class Agent:
    def __init__(self, config: Config, clock: Callable[[], float] = time.monotonic):
        self.config = config
        self.clock = clock
        self.wake = threading.Event()
        self.stopping = threading.Event()
        self.store = Store(config.etcd)
        self.hands = Actuator(config, wake=self.wake.set)
        self.prober = health.Prober(config.services, self.hands.cgroups.services_dir / health.CHECKS_DIR,
                                    lambda service, token: {**os.environ, **service_environment(service, config.node,
                                                                                                token)},
                                    on_change=self.wake.set, clock=clock)
        self.history = HistoryWriter(self.store, config.history_size)
        self.hook = (events.Hook(config.notify_command, config.notify_timeout,
                                 self.hands.cgroups.services_dir / "_hooks")
                     if config.notify_command else None)
        self.events = events.Events(config.node, [self.history.record, log_event] + ([self.hook] if self.hook else []))
        node_checks = config.node_checks + (health.carrier_checks([i for i, _ in config.vips])
                                            if config.track_interfaces else ())
        self.node_prober = health.Prober({health.NODE: health.node_service(node_checks)},
                                         self.hands.cgroups.services_dir / health.CHECKS_DIR,
                                         lambda service, token: {**os.environ, "ETCDHA_NODE": config.node},
                                         on_change=self.wake.set, clock=clock)
        self.node_unhealthy = ""  # why a node check fails, as published; "" while they pass
        self.metrics: Optional[metrics.Metrics] = None
        if config.metrics_listen is not None:
            # /health is stale once the loop has missed a few turns: it runs at least every reconcile_interval
            self.metrics = metrics.Metrics(config.node, 3 * config.reconcile_interval + config.etcd.timeout + 2,
                                           clock=clock)
            self.events.subscribers.append(self.metrics.event)
            self.store.observer = self.metrics.etcd_call
        self.my_failures: dict[str, int] = {}  # service -> health-check fail count here, as of the last view
        self.lease: Optional[Lease] = None
        self.watcher = None  # the Informer: our copy of the cluster, kept from the watch
        self.cgroup_events = None  # wakes us when a service's cgroup empties (a crash) or fills
        self._next_check = 0.0
        self.owned: dict[str, int] = {}  # service -> fencing token, as of the last view
        self.vacant_since: dict[str, float] = {}
        self.candidate_since: dict[tuple[str, str], float] = {}
        self.seen_owned: set[str] = set()  # services seen with an owner since this agent started
        self._tracked: Optional[model.ClusterView] = None  # the view the three above were last updated from
        self.published: Optional[dict] = None
        self.local = Local({}, {}, frozenset())
        self.abandoned: set[int] = set()  # our own earlier leases, given up after everything here was killed
        self.etcd_ok = True
        self.problems: set[str] = set()  # garbage keys already reported
        self.started = time.time()
        self._next_wait = 0.0
        self.claims_from = 0.0
        self.view_floor = 0  # the first claims wait for a view at least this new (see read_view)
        self.executor = Executor(config, self.store, self.hands, self.prober, self.events, self.wake,
                                 lease=lambda: self.lease, local=lambda: self.local,
                                 vacant_since=lambda: self.vacant_since, publish=self.publish, recover=self.recover,
                                 clock=clock, metrics_=self.metrics)
        self.ready = False

    # ---- lifecycle ----------------------------------------------------------------------------

    def request_stop(self, *_: object) -> None:
        """Ask the loop to stop (from any thread; not from a signal handler, see stop_on_signals)."""
        self.stopping.set()
        self.wake.set()

    def stop_on_signals(self) -> None:
        """SIGTERM and SIGINT stop the loop, relayed through a pipe to a thread of their own.

        A handler that set the Events itself runs in the main thread between two bytecodes,
        possibly inside Event.wait or clear while their lock is held: setting the same Event
        then waits for that lock forever (seen once under load: an agent deaf to SIGTERM).
        """
        read_end, write_end = os.pipe()
        os.set_blocking(write_end, False)

        def handler(*_: object) -> None:
            try:
                os.write(write_end, b"x")
            except OSError:  # the pipe is full: a stop is already on its way
                pass

        def relay() -> None:
            while os.read(read_end, 1):
                self.request_stop()

        threading.Thread(target=relay, name="etcdha-signals", daemon=True).start()
        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGINT, handler)

    def run(self) -> int:
        """Run until SIGTERM/SIGINT; returns the process exit code."""
        self.stop_on_signals()
        c = self.config
        log.info("agent %s starting: services %s, lease_ttl %ss, fence margin %ss, etcd %s%s",
                 c.node, ", ".join(c.services) or "(none)", c.lease_ttl, c.fence_margin,
                 ",".join(c.etcd.endpoints), c.etcd.prefix)
        if len(c.etcd.endpoints) > 1 and not election_ride_through(c.lease_ttl, c.fence_margin, c.keepalive_interval,
                                                                     c.etcd.election_timeout):
            log.warning("lease_ttl %ss with keepalive_interval %ss cannot ride through an etcd leader election "
                        "(etcd.election_timeout %ss): renewals stop for up to two election timeouts, so owners may "
                        "fence themselves when the etcd leader changes; raise lease_ttl, or lower etcd's "
                        "--election-timeout and keepalive_interval (deploy/etcd-default.example, "
                        "deploy/etcd-colocated.example)", c.lease_ttl, c.keepalive_interval, c.etcd.election_timeout)
        problems = host_problems(c)  # e.g. a missing program: refuse now, not at every node's claim in turn
        if problems:
            raise ConfigError("\n".join(problems))
        if self.metrics is not None and c.metrics_listen is not None:
            host, port = c.metrics_listen
            try:
                bound = self.metrics.serve(host, port)
            except OSError as exc:
                raise ConfigError(f"{c.source}: metrics.listen: cannot listen on {host}:{port} "
                                  f"({exc.strerror or exc})") from None
            log.info("serving /metrics and /health on %s:%d", *bound[:2])
        self.hands.prepare()  # leftovers of a previous run die before we can join
        try:
            # join first, then start the fence and supervisord during the startup grace (nothing is
            # claimed before it ends, and the loop runs only once they are up): with hundreds of
            # services their start took a second that every node's cold start waited for
            if not self.join():
                return 0
            self.hands.start_runtime()
            self.hands.lease_granted(self.lease.id)  # the new fence learns the lease: a crash is a handoff
            self.hands.feed(self.lease.deadline)
            self.watcher = self.store.informer(self.wake.set)
            self.watcher.start()
            self.node_prober.track({health.NODE: (0, self.clock())}, frozenset({health.NODE}))
            self.cgroup_events = self.hands.cgroups.watch(self.wake.set)
            while not self.stopping.is_set():
                try:
                    self.cycle()
                except Exception:  # noqa: BLE001 - the loop never dies; the fence guards safety meanwhile
                    log.exception("unexpected error in the agent loop; carrying on")
                    self._next_wait = decide.FAST_TICK
        finally:
            self.shutdown()
        return 0

    def join(self) -> bool:
        """Grant our lease and register; retry until etcd answers. False if asked to stop meanwhile.

        If another lease holds our node key we wait for it to expire (our own previous
        incarnation after a crash); if it is still renewed after 2 TTLs, another agent
        uses our name and we refuse to run (ConfigError).
        """
        backoff = 0.2
        first_seen: list[float] = []
        while not self.stopping.is_set():
            try:
                self.lease = Lease(self.store, self.config.lease_ttl, self.config.keepalive_interval,
                                   on_renew=self.hands.feed, on_change=lambda _s: self.wake.set(),
                                   clock=self.clock)
                lease_id = self.lease.grant()
                held = self.store.register(self.config.node, lease_id, self.node_value({}), {
                    s.name: candidate_value(s) for s in self.config.services.values()}, {
                    s.name: model.encode_service(str(s.vip) if s.vip else None)
                    for s in self.config.services.values()})
                if held is not None:
                    self.lease.revoke()
                    if held.lease in self.abandoned:  # ours, given up when etcd could not be told: end it now
                        self.store.revoke(held.lease)
                        log.info("revoked our previous lease %x, which etcd still held", held.lease)
                        continue
                    self.name_taken(held, first_seen)
                    self.stopping.wait(0.5)
                    continue
                self.hands.lease_granted(lease_id)  # an agent crash from now on is a handoff
                self.published = {}
                self.claims_from = self.clock() + self.config.startup_grace
                self.view_floor = -1  # taken when the grace ends
                log.info("joined as %s with lease %x; claiming from %gs on", self.config.node, lease_id,
                         self.config.startup_grace)
                return True
            except AuthError:
                if self.lease is not None:
                    self.lease.stop()
                raise  # wrong password, or a user that may not write: waiting cannot fix it, the operator must
            except StoreError as exc:
                if self.lease is not None:
                    self.lease.stop()
                log.warning("cannot join yet: %s", exc)
                sd_notify("WATCHDOG=1\nSTATUS=waiting for etcd")  # alive, just waiting: no restart loop
                self.stopping.wait(backoff)
                backoff = min(backoff * 2, 2.0)
        return False

    def name_taken(self, held: model.KV, first_seen: list[float]) -> None:
        """Our node key belongs to another lease: wait for a stale one, refuse a live duplicate."""
        if not first_seen:
            first_seen.append(self.clock())
            log.warning("node key %s is held by lease %x: waiting for it to expire (our previous run?)",
                        held.key, held.lease)
        elif self.clock() - first_seen[0] > 2 * self.config.lease_ttl + 1:
            try:
                pid = json.loads(held.value.decode()).get("pid", "?")
            except (ValueError, UnicodeDecodeError, AttributeError):
                pid = "?"
            raise ConfigError(f"{self.config.source}: node: another agent is running as {self.config.node!r} "
                              f"(pid {pid}, lease {held.lease:x}); every agent needs its own node name")
        sd_notify("WATCHDOG=1\nSTATUS=waiting for the node name to be free")

    def recover(self, why: str) -> None:
        """LOST or fenced: make sure nothing runs here, then start again with a new lease.

        The lease is revoked (others take over at once) only after every service cgroup
        is verified empty; while processes survive SIGKILL we neither revoke nor rejoin,
        and the lease simply runs out.
        """
        log.error("%s: stopping everything here and rejoining with a new lease", why)
        if self.metrics is not None:  # until we have rejoined, /health says why we are not fit
            self.metrics.update(dataclasses.replace(self.metrics.snapshot, at=self.clock(), lease_state="LOST",
                                                    owned=frozenset(), lease_left=0.0))
        self.lease.stop()
        for attempt in range(1, 1_000_000):  # bounded; each round waits up to KILL_GRACE
            if self.hands.fence_now():
                break
            log.error("service processes survive SIGKILL in %s (attempt %d): not rejoining while they run",
                      self.hands.cgroups.services_dir, attempt)
            sd_notify("WATCHDOG=1\nSTATUS=waiting for service processes to die")
            if self.stopping.wait(1.0):
                return
        self.abandoned.add(self.lease.id)  # nothing of it runs here any more: join() may revoke it later
        try:
            self.store.revoke(self.lease.id)  # if etcd still has it, let others take over at once
        except StoreError:
            pass
        self.hands.start_runtime()
        if self.join():
            for service, token in self.owned.items():
                self.record(service, "fenced", why, token)
        self.owned = {}

    def shutdown(self) -> None:
        """Graceful: stop programs (cgroups verified empty), drop VIPs, then revoke the lease."""
        log.info("shutting down: stopping services and handing them over")
        sd_notify("STOPPING=1")
        self.prober.stop()
        self.node_prober.stop()
        if self.watcher is not None:
            self.watcher.stop()
        if self.cgroup_events is not None:
            self.cgroup_events.stop()
        empty = self.hands.stop_all() or self.hands.fence_now()
        if empty:
            for service, token in self.owned.items():
                self.record(service, "stopped", "agent stopped", token)
                self.record(service, "released", "agent stopped", token)
        if self.lease is not None and not empty:
            self.lease.stop()
            log.error("service processes survive SIGKILL: not revoking the lease (it runs out after its TTL)")
        elif self.lease is not None and self.lease.id:
            try:
                self.lease.revoke()
                log.info("revoked lease %x", self.lease.id)
            except StoreError as exc:
                log.warning("could not revoke the lease (others take over after its TTL): %s", exc)
        elif self.lease is not None:
            self.lease.stop()  # never granted (etcd was unreachable): nothing to revoke
        if self.hook is not None:
            self.hook.close()  # before the fence's quit, which checks that nothing of ours is left
        if self.metrics is not None:
            self.metrics.close()
        self.hands.shutdown()
        self.executor.close()
        self.history.close()
        self.store.close()

    # ---- one cycle --------------------------------------------------------------------------------

    def cycle(self) -> None:
        self.wake.wait(self._next_wait)
        self.wake.clear()
        if self.stopping.is_set():
            return
        if self.lost():
            return
        view = self.read_view()
        try:
            self.local = local = self.hands.observe()
        except ActuatorError as exc:
            log.error("cannot read program states: %s", exc)
            self._next_wait = decide.FAST_TICK
            return
        # the lease state is taken after the slow reads: a stall during them must not leave it stale
        if self.lost():
            return
        state = self.lease.poll()
        now = self.clock()
        if view is not None:
            if view is not self._tracked:  # the informer hands out the same view until something changes
                self.vacant_since = decide.track_vacancy(self.vacant_since, view, self.priorities(), now)
                self.candidate_since = decide.track_candidates(self.candidate_since, view, now)
                self.seen_owned |= set(view.owners)
                self._tracked = view
            self.owned = {svc: o.token for svc, o in view.owners.items()
                          if svc in self.config.services and o.node == self.config.node and o.lease == self.lease.id}
            # probe what we own and supervisord says is RUNNING, counted from our own start of it
            started = self.executor.starts
            self.prober.track({svc: started[svc] for svc, token in self.owned.items()
                               if local.programs.get(svc) == "RUNNING" and started.get(svc, (0, 0))[0] == token},
                              frozenset(self.owned))
        for r in self.prober.recovered():
            self.record(r.service, "recovered", "checks pass", r.token, f"{r.check}: {r.output}")
        unhealthy = self.prober.unhealthy()
        self.node_health()
        facts = decide.Facts(
            me=self.config.node, lease=self.lease.id, lease_state=state, now=now,
            priorities=self.priorities(), programs=local.programs, processes=local.processes,
            vips_up=local.vips_up,
            with_vip=frozenset(n for n, s in self.config.services.items() if s.vip),
            wall_now=time.time(), vacant_since=dict(self.vacant_since),
            claim_delay=self.config.claim_delay, claims_from=self.claims_from,
            candidate_since=dict(self.candidate_since), startup_grace=self.config.startup_grace,
            seen_owned=frozenset(self.seen_owned),
            drain_concurrency=self.config.drain_concurrency, unhealthy=frozenset(unhealthy),
            max_restarts={n: s.max_restarts for n, s in self.config.services.items()},
            node_unhealthy=bool(self.node_unhealthy))
        plan = decide.plan(view, facts)
        if plan.actions:
            log.info("plan at revision %s: %s", view.revision if view else "?", plan)
        starts = [a for a in plan.actions if a.kind is Kind.START]
        together = [a for a in plan.actions if a.kind in (Kind.CLAIM, Kind.HANDOFF)]
        # the rest in order, then claims and handoffs several at a time (each its own one-key transaction or
        # stop), then the starts as one batch: they concern different services, so their order does not matter
        fenced = False
        act = self.executor
        act.claimed = []
        act.failing = unhealthy
        for action in plan.actions:
            if action.kind not in (Kind.START, Kind.CLAIM, Kind.HANDOFF) and not act.execute(action):
                fenced = True
                break  # we fenced ourselves: the rest of the plan is void
        if not fenced and together:
            fenced = not (act.execute_together(together) if len(together) > 1 else act.execute(together[0]))
        # what we just claimed starts in this same batch: the next plan would say START (a claim is only
        # planned where nothing of it runs here), and start_all checks each owner key in etcd first
        starts += [Action(Kind.START, service, Reason.OWNER, token=token) for service, token in act.claimed]
        if starts and not fenced:
            act.start_all(starts)
        if view is not None:
            if plan.actions or starts:
                # what we just did, not what ran before it: `status` must never say STOPPED for a program that
                # already answers (the states come from the event feed, which our own starts and stops noted)
                try:
                    local = self.local = self.hands.observe()
                except ActuatorError as exc:
                    log.debug("re-reading program states after acting: %s", exc)
            self.publish(view, local)
            if not self.ready:
                self.ready = True
                sd_notify(f"READY=1\nSTATUS=joined as {self.config.node}")
        self.measure(view, local)  # every cycle, etcd reachable or not: /health must say what this node knows
        sd_notify("WATCHDOG=1")  # only from the loop: a stuck loop gets restarted by systemd
        wait = self.config.reconcile_interval if plan.wake_in is None else min(plan.wake_in,
                                                                               self.config.reconcile_interval)
        due = self.hands.next_change()  # a program RUNNING after its startsecs is news for status: read it then
        if due is not None:
            wait = min(wait, due)
        self._next_wait = 0.0 if any(a.kind is Kind.CLAIM for a in plan.actions) else max(0.01, wait)

    def measure(self, view: Optional[model.ClusterView], local: Local) -> None:
        """Hand the metrics what this cycle knows (read only when scraped); time claims until RUNNING."""
        claimed_at = self.executor.claimed_at
        for svc, since in list(claimed_at.items()):
            owner = view.owners.get(svc) if view else None  # (the view is from before this cycle's claims)
            if local.programs.get(svc) == "RUNNING":
                if self.metrics is not None:
                    self.metrics.claim_to_running.observe(self.clock() - since)
                claimed_at.pop(svc)
            elif (owner is not None and (owner.node, owner.lease) != (self.config.node, self.lease.id)) \
                    or self.clock() - since > 3600:
                claimed_at.pop(svc)  # given up or lost before it ran: nothing to time
        if self.metrics is None:
            return
        wall = time.time()
        if view is not None:
            self.my_failures = {svc: f.count(wall) for (svc, node), f in view.failures.items()
                                if node == self.config.node and svc in self.config.services}
        mine = self.my_failures
        self.metrics.update(metrics.Snapshot(
            at=self.clock(), lease_state=self.lease.poll().name, lease_left=self.lease.deadline - self.clock(),
            owned=frozenset(self.owned), programs={s: local.programs.get(s, "STOPPED") for s in self.config.services},
            processes=dict(local.processes), health=self.prober.health(), failures=mine,
            node_unhealthy=bool(self.node_unhealthy), etcd_ok=self.etcd_ok))

    def node_health(self) -> None:
        """Follow the node checks: while one fails this node hands over and claims nothing (decide), and says why."""
        failing = self.node_prober.unhealthy().get(health.NODE)
        why = f"{failing[0]}: {failing[1]}" if failing else ""
        if why and not self.node_unhealthy:
            log.warning("node check %s: handing services over and claiming nothing until it passes", why)
            self.record(events.NODE_EVENTS, "node-unhealthy", failing[0], detail=why)
        elif not why and self.node_unhealthy:
            log.info("node checks pass again: this node is a candidate again")
            self.record(events.NODE_EVENTS, "node-healthy", "checks pass", detail=self.node_unhealthy)
        self.node_unhealthy = why

    def lost(self) -> bool:
        """If the fence has fired or the lease is gone, recover (True); nothing else may run then."""
        if not self.hands.runtime_alive():
            self.recover(f"the fence process exited ({self.hands.runtime_exit()})")
            return True
        if self.lease.poll() is LeaseState.LOST:
            self.recover(f"lease {self.lease.id:x} lost")
            return True
        return False

    def read_view(self) -> Optional[model.ClusterView]:
        """The cluster as the watch has told it; None while etcd is unreachable or the watch is not current.

        Every reconcile_interval: a linearizable read (fails without a leader) and a
        progress request on the watch stream, whose answer keeps the copy "current";
        nothing else goes to etcd, so an idle agent's cost does not grow with services.
        """
        now = self.clock()
        first_claims = self.view_floor < 0 and now >= self.claims_from
        if now >= self._next_check or first_claims:
            try:
                self.store.revision()
                self.watcher.request_progress()
                if first_claims:
                    # our first claims see every peer that registered while we waited, even when the watch
                    # lags behind a burst of registrations: else the first agent up would take everything
                    self.view_floor = self.store.last_watched_change()
                self._next_check = now + self.config.reconcile_interval
            except StoreError as exc:
                self._next_check = now + min(decide.FAST_TICK, self.config.reconcile_interval)
                return self.etcd_unreachable(str(exc))
        floor = max(self.store.last_change, self.view_floor)
        stale_after = 2 * self.config.reconcile_interval + self.config.etcd.timeout + 1
        # never plan on a view older than our own last claim or release (nor, at first, our join)
        if self.watcher.synced.is_set() and self.watcher.connected.is_set() and not self.watcher.caught_up(floor, 2.0):
            return self.etcd_unreachable(f"the watch is behind revision {floor}")
        view = self.watcher.view(stale_after)
        if view is None:
            if self.watcher.synced.is_set() and self.watcher.connected.is_set():
                self.watcher.restart()  # it stopped answering (a member cut off from its leader?)
                return self.etcd_unreachable("the watch stopped answering; restarting it")
            if self.watcher.synced.is_set():
                return self.etcd_unreachable("the watch is not connected")
            return None  # just started: the first listing is on its way (and wakes us)
        if not self.etcd_ok:
            log.info("etcd reachable again at revision %d", view.revision)
        self.etcd_ok = True
        for problem in set(view.problems) - self.problems:  # once each, not every cycle
            log.warning("bad key in etcd: %s", problem)
        self.problems = set(view.problems)
        return view

    def etcd_unreachable(self, why: str) -> None:
        if self.etcd_ok:
            log.warning("etcd unreachable, claiming nothing until it answers: %s", why)
        self.etcd_ok = False
        return None

    def priorities(self) -> dict[str, int]:
        return {name: s.priority for name, s in self.config.services.items()}

    # ---- what we publish -------------------------------------------------------------------------

    def node_value(self, programs: dict[str, str], processes: Optional[dict[str, int]] = None,
                   checks: Optional[dict[str, str]] = None) -> bytes:
        return model.encode_node(self.config.node, self.lease.id if self.lease else 0, os.getpid(),
                                 self.started, programs, processes or {}, checks or {}, self.node_unhealthy)

    def record(self, service: str, event: str, reason: str, token: int = 0, detail: str = "") -> None:
        """One transition to every subscriber: history in etcd, the notification hook, the log. Never blocks."""
        self.events.emit(service, event, reason, token, detail)

    def publish(self, view: Optional[model.ClusterView], local: Local, starting: frozenset[str] = frozenset()) -> None:
        """Keep our node key current (program states, processes per cgroup), re-creating it if it vanished.

        `starting`: services about to be started, shown as STARTING (written before the start, so a
        program can never answer while our key still says STOPPED); without a view, write regardless.
        """
        states = {s: "STARTING" if s in starting else local.programs.get(s, "STOPPED") for s in self.config.services}
        processes = {s: local.processes.get(s, 0) for s in self.config.services}
        checks = self.prober.health()
        now = {"states": states, "processes": processes, "health": checks, "unhealthy": self.node_unhealthy}
        if now == self.published and (view is None or self.config.node in view.nodes):
            return
        try:
            self.store.put(model.node_key(self.config.etcd.prefix, self.config.node),
                           self.node_value(states, processes, checks), self.lease.id)
            self.published = now
        except StoreError as exc:
            log.debug("publishing status: %s", exc)
