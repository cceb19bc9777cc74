"""Pure decisions: one cluster snapshot plus local facts in, a plan of actions out.

Nothing here does I/O or reads a clock; tests build a view and assert the plan.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Mapping, Optional

from etcdha.lease import LeaseState
from etcdha.model import ClusterView, Owner

# supervisord state names that mean "a copy may be running"
ACTIVE = frozenset({"STARTING", "RUNNING", "BACKOFF", "STOPPING"})
# states where we should look again soon, because supervisord is about to decide
TRANSITIONAL = frozenset({"STARTING", "BACKOFF", "STOPPING"})
# states in which supervisord has no process of the program and will not start one by itself
# (BACKOFF is left out: supervisord respawns from it, so a process may be seen before its state)
NO_PROCESS = frozenset({"STOPPED", "EXITED", "FATAL"})
FAST_TICK = 0.2
# how soon we look again at a program we run, as a safety net: its cgroup emptying (a crash) wakes us
# at once, and a daemonizing program (exits, its cgroup stays populated) is found by this poll
PROGRAM_POLL = 2.0


class Kind(enum.Enum):
    ENROLL = "enroll"      # put our candidate key
    WITHDRAW = "withdraw"  # delete our candidate key (cooldown after a failure)
    CLAIM = "claim"        # create the owner key if absent
    START = "start"        # VIP up + gratuitous ARP, then program start
    STOP = "stop"          # program stop, then VIP down
    RELEASE = "release"    # stop, VIP down, delete the owner key, cooldown
    RESTART = "restart"    # failed its health checks: count the failure, stop (verified), start again
    HANDOFF = "handoff"    # planned move away: stop, VIP down, delete the owner key (the target claims)
    REQUEST_MOVE = "request-move"  # drained: ask for one of our services to move to `target`


class Reason(enum.Enum):
    VACANT = "vacant"            # nobody owns it and we are next in line
    OWNER = "owner"              # we own it; it should run here
    NOT_OWNER = "not-owner"      # someone else (or nobody) owns it; it must not run here
    FAILED = "failed"            # supervisord gave up on the program (FATAL)
    DAEMONIZED = "daemonized"    # the program exited but processes it started live on in its cgroup
    COOLDOWN = "cooldown"        # failed here recently; let other nodes take it
    CANDIDATE = "candidate"      # we can run it and are not yet registered
    MOVED = "moved"              # an operator asked for a planned move
    DRAINED = "drained"          # this node is drained: hand everything over
    UNHEALTHY = "unhealthy"      # a health check failed failure_threshold times in a row
    NODE_UNHEALTHY = "node-unhealthy"  # a node check fails here (or a VIP interface lost carrier): hand over


@dataclass(frozen=True)
class Action:
    kind: Kind
    service: str
    reason: Reason
    token: int = 0  # fencing token for START, HANDOFF and REQUEST_MOVE
    target: str = ""  # REQUEST_MOVE: where to

    def __str__(self) -> str:
        tok = f" token={self.token}" if self.token else ""
        to = f" to {self.target}" if self.target else ""
        return f"{self.kind.value} {self.service}{to} ({self.reason.value}{tok})"


@dataclass(frozen=True)
class Facts:
    """What the agent knows locally at the moment of deciding."""

    me: str
    lease: int
    lease_state: LeaseState
    now: float
    priorities: Mapping[str, int]                     # services this node can run
    programs: Mapping[str, str] = field(default_factory=dict)  # service -> supervisord state
    processes: Mapping[str, int] = field(default_factory=dict)  # service -> processes in its cgroup (read after programs)
    vips_up: frozenset[str] = frozenset()             # services whose VIP is on our interface
    with_vip: frozenset[str] = frozenset()            # services that have a VIP at all
    wall_now: float = 0.0                             # wall clock, for cooldowns written to etcd
    vacant_since: Mapping[str, float] = field(default_factory=dict)
    claim_delay: float = 0.5
    claims_from: float = 0.0  # no claims before this (startup grace: let peers register first)
    candidate_since: Mapping[tuple[str, str], float] = field(default_factory=dict)  # (service, node) -> first seen
    seen_owned: frozenset[str] = frozenset()  # services this agent has seen owned since it started
    startup_grace: float = 0.0  # a peer that just registered claims nothing for this long (same config assumed)
    drain_concurrency: int = 32  # moves a drained node has pending at once
    unhealthy: frozenset[str] = frozenset()  # services whose health checks failed since their last start here
    max_restarts: Mapping[str, int] = field(default_factory=dict)  # restarts in place before migrating
    node_unhealthy: bool = False  # a node check fails here: behave as drained until it passes


@dataclass(frozen=True)
class Plan:
    actions: tuple[Action, ...] = ()
    wake_in: Optional[float] = None  # seconds until a decision may change without any event

    def __str__(self) -> str:
        return "; ".join(map(str, self.actions)) or "nothing to do"


def is_mine(owner: Optional[Owner], f: Facts) -> bool:
    """Ours only if it names us *and* hangs on our current lease (not a previous incarnation's)."""
    return owner is not None and owner.node == f.me and owner.lease == f.lease


def track_vacancy(previous: Mapping[str, float], view: ClusterView, services: Mapping[str, int],
                  now: float) -> dict[str, float]:
    """When each of our services was first seen claimable: no owner, no pending move, not paused.

    Rank delays count from then, so when a move request expires or a pause ends the
    preferred node still claims first instead of everyone at once.
    """
    return {s: previous.get(s, now) for s in services
            if s not in view.owners and s not in view.moves and not view.is_paused(s)}


def track_candidates(previous: Mapping[tuple[str, str], float], view: ClusterView,
                     now: float) -> dict[tuple[str, str], float]:
    """When each live candidate key was first seen here (a restarted peer's key counts anew)."""
    return {(svc, c.node): previous.get((svc, c.node), now)
            for svc in view.candidates for c in view.live_candidates(svc)}


def claim_rank(view: ClusterView, service: str, me: str) -> Optional[int]:
    """Our position among live, undrained candidates (0 = preferred); None if we are not one."""
    for i, cand in enumerate(view.eligible(service)):
        if cand.node == me:
            return i
    return None


def _next_home(view: ClusterView, service: str, me: str, wall_now: float) -> Optional[str]:
    """The best live, undrained, not cooling candidate other than us: where a drained node sends `service`."""
    return next((c.node for c in view.eligible(service)
                 if c.node != me and view.cooldowns.get((service, c.node), 0.0) <= wall_now), None)


def plan(view: Optional[ClusterView], f: Facts) -> Plan:
    """Decide what this node should do now.

    Without a view (etcd unreachable) we change nothing: running services stay until
    the fence stops them at the lease deadline; nothing new is claimed or started.
    A paused service is left exactly as it is (no start, stop, claim, release or move).
    """
    if view is None:
        return Plan(wake_in=FAST_TICK)
    actions: list[Action] = []
    wakes: list[float] = []
    healthy = f.lease_state is LeaseState.OK
    # an unhealthy node behaves as drained (hands over, claims nothing) and is no one's candidate (view.eligible)
    drained = f.me in view.drained or f.node_unhealthy
    away = Reason.DRAINED if f.me in view.drained else Reason.NODE_UNHEALTHY
    # a drained node moves up to drain_concurrency services at once (each a full stop and start elsewhere)
    moving_away = sum(1 for m in view.moves.values() if m.source == f.me)
    for svc in sorted(f.priorities):
        owner = view.owners.get(svc)
        move = view.moves.get(svc)
        program = f.programs.get(svc, "STOPPED")
        processes = f.processes.get(svc, 0)
        # supervisord has no process, yet its cgroup does: something the program started lives on
        leftover = processes > 0 and program in NO_PROCESS
        running_here = program in ACTIVE or svc in f.vips_up or processes > 0
        cool_until = view.cooldowns.get((svc, f.me), 0.0)
        cooling = cool_until > f.wall_now
        if program in TRANSITIONAL:
            wakes.append(FAST_TICK)

        enrolled = f.me in view.candidates.get(svc, {})
        if healthy and cooling and enrolled:
            actions.append(Action(Kind.WITHDRAW, svc, Reason.COOLDOWN))
        elif healthy and not cooling and not enrolled:
            actions.append(Action(Kind.ENROLL, svc, Reason.CANDIDATE))
        if cooling:
            wakes.append(cool_until - f.wall_now)
        if view.is_paused(svc):
            continue

        if is_mine(owner, f):
            assert owner is not None
            # a drained node moves a bounded number at a time; one nobody else can run stays (and runs) here
            home = (_next_home(view, svc, f.me, f.wall_now)
                    if drained and healthy and move is None and moving_away < f.drain_concurrency else None)
            if leftover:
                actions.append(Action(Kind.RELEASE, svc, Reason.DAEMONIZED, token=owner.token))
            elif program == "FATAL":
                actions.append(Action(Kind.RELEASE, svc, Reason.FAILED, token=owner.token))
            elif move is not None and move.source == f.me and move.token == owner.token and move.to != f.me:
                actions.append(Action(Kind.HANDOFF, svc, away if drained else Reason.MOVED,
                                      token=owner.token, target=move.to))
            elif svc in f.unhealthy and program in ACTIVE and healthy:
                # Pacemaker's on-fail=restart with a migration-threshold: restart here while the failures that
                # still count (failure_timeout) are fewer than max_restarts, then step aside for the next candidate
                failures = view.failures.get((svc, f.me))
                count = failures.count(f.wall_now) if failures else 0
                kind = Kind.RESTART if count < f.max_restarts.get(svc, 0) else Kind.RELEASE
                actions.append(Action(kind, svc, Reason.UNHEALTHY, token=owner.token))
            elif home is not None:
                actions.append(Action(Kind.REQUEST_MOVE, svc, away, token=owner.token, target=home))
                moving_away += 1
            elif healthy and (program not in ACTIVE or (svc in f.with_vip and svc not in f.vips_up
                                                          and program != "STOPPING")):
                actions.append(Action(Kind.START, svc, Reason.OWNER, token=owner.token))
                wakes.append(FAST_TICK)  # watch it through STARTING
            elif program in ACTIVE:
                wakes.append(PROGRAM_POLL)
            continue
        if running_here:
            actions.append(Action(Kind.STOP, svc, Reason.NOT_OWNER))
            wakes.append(FAST_TICK)  # claim only once it is verified stopped here: next cycle
            continue
        if owner is not None or not healthy or cooling or drained:
            continue
        if move is not None:
            if move.to == f.me:  # the target of a planned move claims at once, ahead of everyone
                actions.append(Action(Kind.CLAIM, svc, Reason.MOVED))
            continue  # others wait for the target; the request expires by itself if it fails
        rank = claim_rank(view, svc, f.me)
        if rank is None:
            continue  # our candidate key is not (yet) there; ENROLL above fixes that
        # cold start (never seen owned): a better candidate that registered moments ago claims only after
        # its startup grace; wait for it too, or whoever started first would win instead of the preferred
        # node. Not on a failover: a node that just came back is the last one to wait for.
        better_ready = 0.0
        if svc not in f.seen_owned:
            better_ready = max((f.candidate_since[(svc, c.node)] + f.startup_grace
                                for c in view.eligible(svc)[:rank] if (svc, c.node) in f.candidate_since),
                               default=0.0)
        due = max(f.vacant_since.get(svc, f.now), f.claims_from, better_ready) + rank * f.claim_delay
        if f.now >= due:
            actions.append(Action(Kind.CLAIM, svc, Reason.VACANT))
        else:
            wakes.append(due - f.now)
    return Plan(tuple(actions), min(wakes) if wakes else None)


def move_target(view: ClusterView, service: str, requested: Optional[str],
                wall_now: float) -> tuple[Optional[str], Optional[str]]:
    """Where a planned move of `service` should go: (target, None), or (None, why it is refused).

    Without `requested`, the best live, undrained candidate that is not cooling down.
    """
    owner = view.owners.get(service)
    if owner is None:
        return None, f"{service} has no owner: nothing to move (see etcdha status)"
    if view.is_paused(service):
        return None, f"{service} is paused: agents do not move it (etcdha resume {service})"
    if service in view.moves:
        return None, f"a move of {service} to {view.moves[service].to} is already pending"
    fine = [c.node for c in view.eligible(service)
            if c.node != owner.node and view.cooldowns.get((service, c.node), 0) <= wall_now]
    if requested is None:
        if not fine:
            return None, f"no other live, undrained candidate can take {service}"
        return fine[0], None
    if requested == owner.node:
        return None, f"{service} already runs on {requested}"
    if requested not in view.nodes:
        return None, f"{requested} is not alive (no agent holds a lease there)"
    if requested not in view.candidates.get(service, {}):
        return None, (f"{requested} is not a candidate for {service} (not in its config, or cooling down "
                      f"after a failure: etcdha cleanup {service})")
    if requested in view.drained:
        return None, f"{requested} is drained (etcdha undrain {requested} first)"
    if view.nodes[requested].unhealthy:
        return None, f"{requested} is unhealthy: {view.nodes[requested].unhealthy}"
    if requested not in fine:
        return None, (f"{requested} is cooling down after {service} failed there "
                      f"(etcdha cleanup {service} --node {requested})")
    return requested, None
