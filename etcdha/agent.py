"""The agent loop: wait -> snapshot -> plan -> execute -> publish.

Woken by a watch event, a lease state change, a signal or a tick. Deciding is
`decide.plan`; this module only gathers facts and carries out actions. The lease
is renewed by its own thread and feeds the fence directly, so a slow action here
never delays renewal, and a hung agent (all threads stopped) is fenced.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import socket
import threading
import time
from typing import Callable, Optional

from etcdha import decide, model, vip
from etcdha.config import Config, Service
from etcdha.decide import Action, Kind, Reason
from etcdha.errors import ActuatorError, ConfigError, EtcdhaError, StoreError
from etcdha.fence import FenceClient
from etcdha.lease import Lease, LeaseState
from etcdha.store import Store
from etcdha.supervisord import Supervisor

log = logging.getLogger(__name__)


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
        self.supervisor = Supervisor(config)
        self.fence: Optional[FenceClient] = None
        self.lease: Optional[Lease] = None
        self.watcher = None
        self.owned: dict[str, int] = {}  # service -> fencing token, as of the last view
        self.announcing: dict[str, threading.Event] = {}  # service -> cancels its gratuitous ARP rounds
        self.vacant_since: dict[str, float] = {}
        self.published: Optional[dict[str, str]] = None
        self.known_pids: dict[str, int] = {}
        self.etcd_ok = True
        self.problems: set[str] = set()  # garbage keys already reported
        self.started = time.time()
        self._next_wait = 0.0
        self.claims_from = 0.0
        self.ready = False

    # ---- lifecycle ----------------------------------------------------------------------------

    def request_stop(self, *_: object) -> None:
        self.stopping.set()
        self.wake.set()

    def run(self) -> int:
        """Run until SIGTERM/SIGINT; returns the process exit code."""
        signal.signal(signal.SIGTERM, self.request_stop)
        signal.signal(signal.SIGINT, self.request_stop)
        c = self.config
        log.info("agent %s starting: services %s, lease_ttl %ss, fence margin %ss, etcd %s%s",
                 c.node, ", ".join(c.services) or "(none)", c.lease_ttl, c.fence_margin,
                 ",".join(c.etcd.endpoints), c.etcd.prefix)
        if len(c.etcd.endpoints) > 1 and c.lease_ttl < 3:
            log.warning("lease_ttl %ss with a multi-member etcd: renewals stop for the ~1-1.5 s of an etcd leader "
                        "election, so every owner will fence itself when the etcd leader changes; use >= 3", c.lease_ttl)
        for removed in vip.remove_all(c.vips):
            log.warning("removed leftover VIP %s (we own nothing yet)", removed)
        self.start_runtime()
        try:
            if not self.join():
                return 0
            self.watcher = self.store.watcher(self.wake.set)
            self.watcher.start()
            while not self.stopping.is_set():
                try:
                    self.cycle()
                except Exception:  # noqa: BLE001 - the loop never dies; the fence guards safety meanwhile
                    log.exception("unexpected error in the agent loop; carrying on")
                    self._next_wait = decide.FAST_TICK
        finally:
            self.shutdown()
        return 0

    def start_runtime(self) -> None:
        """Fence first, supervisord under it: nothing can run here that the fence cannot kill."""
        self.supervisor.prepare()
        self.fence = FenceClient(self.config.fence_margin, self.config.vips, self.supervisor.command())
        pid = self.fence.start()
        self.supervisor.wait_ready()
        log.info("fence pid %d, supervisord pid %d", self.fence.proc.pid, pid)

    def feed_fence(self, deadline: float) -> None:
        if self.fence is not None:
            self.fence.feed(deadline)

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
                                   on_renew=self.feed_fence, on_change=lambda _s: self.wake.set(),
                                   clock=self.clock)
                lease_id = self.lease.grant()
                held = self.store.register(self.config.node, lease_id, self.node_value({}), {
                    s.name: self.candidate_value(s) for s in self.config.services.values()}, {
                    s.name: model.encode_service(str(s.vip) if s.vip else None)
                    for s in self.config.services.values()})
                if held is not None:
                    self.lease.revoke()
                    self.name_taken(held, first_seen)
                    self.stopping.wait(0.5)
                    continue
                self.published = {}
                self.claims_from = self.clock() + self.config.startup_grace
                log.info("joined as %s with lease %x; claiming from %gs on", self.config.node, lease_id,
                         self.config.startup_grace)
                return True
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
        """LOST: make sure nothing runs here, then start again with a new lease."""
        log.error("%s: stopping everything here and rejoining with a new lease", why)
        self.lease.stop()
        if self.fence.alive():
            self.fence.fire()
        else:
            self.kill_known_programs()
        for removed in vip.remove_all(self.config.vips):
            log.warning("removed VIP %s", removed)
        try:
            self.store.revoke(self.lease.id)  # if etcd still has it, let others take over at once
        except StoreError:
            pass
        self.start_runtime()
        if self.join():
            for service, token in self.owned.items():
                self.record(service, "fenced", why, token)
        self.owned = {}

    def kill_known_programs(self) -> None:
        """The fence is gone (killed?): kill the program groups we last saw ourselves."""
        for name, pid in self.known_pids.items():
            try:
                os.killpg(pid, signal.SIGKILL)
                log.warning("killed the process group of %s (pid %d)", name, pid)
            except (ProcessLookupError, PermissionError):
                pass

    def shutdown(self) -> None:
        """Graceful: stop programs, drop VIPs, then revoke the lease so others take over at once."""
        log.info("shutting down: stopping services and handing them over")
        sd_notify("STOPPING=1")
        if self.watcher is not None:
            self.watcher.stop()
        try:
            self.supervisor.stop_all()
        except EtcdhaError as exc:
            log.warning("stopping programs: %s", exc)
        for removed in vip.remove_all(self.config.vips):
            log.info("removed VIP %s", removed)
        for service, token in self.owned.items():
            self.record(service, "released", "agent stopped", token)
        if self.lease is not None and self.lease.id:
            try:
                self.lease.revoke()
                log.info("revoked lease %x", self.lease.id)
            except StoreError as exc:
                log.warning("could not revoke the lease (others take over after its TTL): %s", exc)
        if self.fence is not None:
            self.fence.quit()
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
            programs = self.supervisor.states()
            self.known_pids = self.supervisor.pids()
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
            self.vacant_since = decide.track_vacancy(self.vacant_since, view, self.priorities(), now)
            self.owned = {svc: o.token for svc, o in view.owners.items()
                          if svc in self.config.services and o.node == self.config.node and o.lease == self.lease.id}
        facts = decide.Facts(
            me=self.config.node, lease=self.lease.id, lease_state=state, now=now,
            priorities=self.priorities(), programs=programs, vips_up=self.vips_up(),
            with_vip=frozenset(n for n, s in self.config.services.items() if s.vip),
            wall_now=time.time(), vacant_since=dict(self.vacant_since),
            claim_delay=self.config.claim_delay, claims_from=self.claims_from)
        plan = decide.plan(view, facts)
        if plan.actions:
            log.info("plan at revision %s: %s", view.revision if view else "?", plan)
        for action in plan.actions:
            self.execute(action)
        if view is not None:
            self.publish(view, programs)
            if not self.ready:
                self.ready = True
                sd_notify(f"READY=1\nSTATUS=joined as {self.config.node}")
        sd_notify("WATCHDOG=1")  # only from the loop: a stuck loop gets restarted by systemd
        wait = self.config.reconcile_interval if plan.wake_in is None else min(plan.wake_in,
                                                                               self.config.reconcile_interval)
        self._next_wait = 0.0 if any(a.kind is Kind.CLAIM for a in plan.actions) else max(0.01, wait)

    def lost(self) -> bool:
        """If the fence has fired or the lease is gone, recover (True); nothing else may run then."""
        if not self.fence.alive():
            self.recover("the fence process exited (" + "; ".join(self.fence.messages[-1:]) + ")")
            return True
        if self.lease.poll() is LeaseState.LOST:
            self.recover(f"lease {self.lease.id:x} lost")
            return True
        return False

    def read_view(self) -> Optional[model.ClusterView]:
        try:
            view = self.store.snapshot()
        except StoreError as exc:
            if self.etcd_ok:
                log.warning("etcd unreachable, claiming nothing until it answers: %s", exc)
            self.etcd_ok = False
            return None
        if not self.etcd_ok:
            log.info("etcd reachable again at revision %d", view.revision)
        self.etcd_ok = True
        for problem in set(view.problems) - self.problems:  # once each, not every cycle
            log.warning("bad key in etcd: %s", problem)
        self.problems = set(view.problems)
        return view

    def priorities(self) -> dict[str, int]:
        return {name: s.priority for name, s in self.config.services.items()}

    def vips_up(self) -> frozenset[str]:
        up = set()
        by_interface: dict[str, set[str]] = {}
        for s in self.config.services.values():
            if s.vip is None:
                continue
            if s.interface not in by_interface:
                try:
                    by_interface[s.interface] = {a.split("/")[0] for a in vip.addresses(s.interface)}
                except ActuatorError:
                    by_interface[s.interface] = set()
            if str(s.vip.ip) in by_interface[s.interface]:
                up.add(s.name)
        return frozenset(up)

    # ---- actions --------------------------------------------------------------------------------

    def candidate_value(self, service: Service) -> bytes:
        return model.encode_candidate(service.priority, str(service.vip) if service.vip else None)

    def node_value(self, programs: dict[str, str]) -> bytes:
        return model.encode_node(self.config.node, self.lease.id if self.lease else 0, os.getpid(),
                                 self.started, programs)

    def execute(self, action: Action) -> None:
        service = self.config.services[action.service]
        prefix, me, lease = self.config.etcd.prefix, self.config.node, self.lease.id
        if action.kind in (Kind.CLAIM, Kind.START) and not (self.fence.alive() and
                                                              self.lease.poll() is LeaseState.OK):
            # we may have stalled since planning (e.g. SIGSTOP): the plan is stale, take nothing
            log.warning("not doing %s: the lease is no longer healthy", action)
            self.wake.set()
            return
        try:
            if action.kind is Kind.ENROLL:
                self.store.put(model.candidate_key(prefix, service.name, me), self.candidate_value(service), lease)
                self.store.delete(model.cooldown_key(prefix, service.name, me))
            elif action.kind is Kind.WITHDRAW:
                self.store.delete(model.candidate_key(prefix, service.name, me))
            elif action.kind is Kind.CLAIM:
                token = self.store.claim(service.name, me, lease, time.time(),
                                         complete_move=action.reason is Reason.MOVED)
                log.info("%s %s", "claimed" if token else "lost the race for", service.name)
                if token:
                    self.record(service.name, "claimed", action.reason.value, token)
            elif action.kind is Kind.START:
                self.start(service, action.token)
            elif action.kind is Kind.STOP:
                self.stop(service)
            elif action.kind is Kind.RELEASE:
                self.release(service, "supervisord reports FATAL", action.token)
            elif action.kind is Kind.HANDOFF:
                self.stop(service)
                if self.store.release(service.name, lease):
                    log.info("handed %s over to %s (%s)", service.name, action.target, action.reason.value)
                    self.record(service.name, "moved", action.reason.value, action.token, f"to {action.target}")
            elif action.kind is Kind.REQUEST_MOVE:
                if self.store.request_move(service.name, me, action.target, action.token, self.config.move_timeout):
                    log.info("drained: asked to move %s to %s", service.name, action.target)
        except (ConfigError, ActuatorError) as exc:
            log.error("%s failed: %s", action, exc)
            if action.kind is Kind.START:
                self.release(service, str(exc), action.token)
        except StoreError as exc:
            log.error("%s failed: %s", action, exc)

    def record(self, service: str, event: str, reason: str, token: int = 0, detail: str = "") -> None:
        """Append to the service's history in etcd; history is best effort, never blocks a decision."""
        try:
            self.store.record(model.Event(service=service, time=time.time(), node=self.config.node, event=event,
                                          reason=reason, token=token, detail=detail),
                              keep=self.config.history_size)
        except StoreError as exc:
            log.warning("could not record %s %s in history: %s", event, service, exc)

    def start(self, service: Service, token: int) -> None:
        if service.vip:
            cidr = str(service.vip)
            if not vip.present(service.interface, cidr):
                other = vip.in_use_elsewhere(service.interface, cidr)
                if other:
                    raise ActuatorError(f"VIP {service.vip.ip} is already answered on {service.interface} by "
                                        f"{other} (not an etcdha owner?); refusing to add a duplicate")
            if vip.add(service.interface, cidr):
                log.info("added VIP %s on %s", service.vip, service.interface)
            self.announcing[service.name] = vip.announce(service.interface, cidr)
        self.supervisor.start(service, token)
        log.info("started %s (fencing token %d)", service.name, token)

    def stop(self, service: Service) -> None:
        self.supervisor.stop(service)
        if service.name in self.announcing:
            self.announcing.pop(service.name).set()
        if service.vip and vip.remove(service.interface, str(service.vip)):
            log.info("removed VIP %s from %s", service.vip, service.interface)
        log.info("stopped %s", service.name)

    def release(self, service: Service, why: str, token: int = 0) -> None:
        """Give up a service that fails here: stop, drop VIP, step aside for a while, delete the owner key."""
        try:
            self.stop(service)
        except ActuatorError as exc:
            log.error("stopping %s: %s", service.name, exc)
            if service.vip:
                vip.remove(service.interface, str(service.vip))
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
        self.record(service.name, "failed", why, token)
        log.warning("released %s: %s; not taking it here again for %gs (etcdha cleanup %s clears this)",
                    service.name, why, self.config.failure_cooldown, service.name)

    def publish(self, view: model.ClusterView, programs: dict[str, str]) -> None:
        """Keep our node key current (program states), re-creating it if it vanished."""
        states = {s: programs.get(s, "STOPPED") for s in self.config.services}
        if states == self.published and self.config.node in view.nodes:
            return
        try:
            self.store.put(model.node_key(self.config.etcd.prefix, self.config.node),
                           self.node_value(states), self.lease.id)
            self.published = states
        except StoreError as exc:
            log.debug("publishing status: %s", exc)
