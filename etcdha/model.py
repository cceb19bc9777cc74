"""Key schema, JSON codecs and the immutable cluster snapshot the agent decides on.

Decoding never raises: a garbage value in etcd becomes a recorded problem and
the key is treated as absent (or, for an owner key, as owned by an unknown
node, so nobody starts a second copy on the strength of a corrupt key).
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Optional

UNKNOWN_OWNER = "?"  # node name used for an owner key whose value cannot be decoded


@dataclass(frozen=True)
class KV:
    """One etcd key as read, independent of the client library."""

    key: str
    value: bytes
    create_revision: int
    mod_revision: int
    lease: int


# ---- key schema: one function per key kind -------------------------------------------------

def node_key(prefix: str, node: str) -> str:
    """Liveness and status of one agent; attached to its lease."""
    return f"{prefix}/nodes/{node}"


def member_key(prefix: str, node: str) -> str:
    """A node that has ever joined (no lease): lets status show dead nodes as not alive."""
    return f"{prefix}/members/{node}"


def service_key(prefix: str, service: str) -> str:
    """A service some agent was configured with (no lease): status lists it even with no node alive."""
    return f"{prefix}/services/{service}"


def candidate_key(prefix: str, service: str, node: str) -> str:
    """`node` can run `service`; attached to the node's lease."""
    return f"{prefix}/candidates/{service}/{node}"


def owner_key(prefix: str, service: str) -> str:
    """Who runs `service`; created only if absent, attached to the owner's lease."""
    return f"{prefix}/owners/{service}"


def move_key(prefix: str, service: str) -> str:
    """A planned hand-over of `service` to a node; on its own short lease, so it expires by itself."""
    return f"{prefix}/moves/{service}"


def drain_key(prefix: str, node: str) -> str:
    """`node` is drained (no lease: persists across agent restarts until undrain)."""
    return f"{prefix}/drain/{node}"


ALL_SERVICES = "*"  # pause key name meaning every service (not a valid service name)


def pause_key(prefix: str, service: str = ALL_SERVICES) -> str:
    """Maintenance mode for `service` (or every service); no lease."""
    return f"{prefix}/pause/{service}"


def cooldown_key(prefix: str, service: str, node: str) -> str:
    """`node` failed to run `service` and stays out of its election until `until`; on the node's lease."""
    return f"{prefix}/cooldowns/{service}/{node}"


def failures_key(prefix: str, service: str, node: str) -> str:
    """When `service` failed its health checks on `node` (no lease: an agent restart must not forget)."""
    return f"{prefix}/failures/{service}/{node}"


def history_prefix(prefix: str, service: str = "") -> str:
    """Ownership transitions; kept out of snapshots and watches (see store.py), bounded in size."""
    return f"{prefix}/history/{service + '/' if service else ''}"


HISTORY_ID_RE = re.compile(r"[0-9]{17}-[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")


def history_id(event: "Event") -> str:
    """The last segment of a history key: microseconds (sortable) and the node."""
    return f"{int(event.time * 1e6):017d}-{event.node}"


def is_history_id(segment: str) -> bool:
    """True only for the segments `history_id` writes (pruning touches nothing else)."""
    return HISTORY_ID_RE.fullmatch(segment) is not None


# ---- value objects -----------------------------------------------------------------------

@dataclass(frozen=True)
class Owner:
    """The owner key's content; `token` is its create_revision (the fencing token)."""

    node: str
    lease: int
    token: int
    since: float = 0.0


@dataclass(frozen=True)
class Candidate:
    node: str
    priority: int
    vip: Optional[str] = None


@dataclass(frozen=True)
class NodeInfo:
    node: str
    lease: int
    pid: int = 0
    started: float = 0.0
    services: Mapping[str, str] = field(default_factory=dict)  # service -> local program state
    processes: Mapping[str, int] = field(default_factory=dict)  # service -> processes in its cgroup
    health: Mapping[str, str] = field(default_factory=dict)  # service -> passing / failing / pending (owner only)
    unhealthy: str = ""  # why a node check fails ("" while they pass): the node hands over and claims nothing


FAILURES_KEPT = 100  # failure times one record keeps (more than any max_restarts)


@dataclass(frozen=True)
class Failures:
    """Health-check failures of one service on one node: each counts for `timeout` seconds."""

    times: tuple[float, ...] = ()  # wall clock, oldest first
    timeout: float = 600.0
    check: str = ""
    output: str = ""

    def count(self, now: float) -> int:
        """Failures that still count at wall time `now` (Pacemaker's fail count after failure-timeout)."""
        return sum(1 for t in self.times if t + self.timeout > now)

    def last(self) -> float:
        return self.times[-1] if self.times else 0.0

    def add(self, when: float, timeout: float, check: str, output: str) -> "Failures":
        """This record plus one failure; expired ones are dropped, at most FAILURES_KEPT kept."""
        kept = tuple(t for t in self.times if t + timeout > when)[-(FAILURES_KEPT - 1):]
        return Failures(times=kept + (when,), timeout=timeout, check=check, output=output)


@dataclass(frozen=True)
class Move:
    """A requested hand-over; valid only while the owner still has `token`."""

    service: str
    to: str
    source: str
    token: int
    lease: int = 0
    requested: float = 0.0


@dataclass(frozen=True)
class Mark:
    """A drain or pause mark (presence is what counts; garbage values still count)."""

    since: float = 0.0
    by: str = ""


@dataclass(frozen=True)
class Event:
    """One history entry."""

    service: str
    time: float
    node: str
    event: str      # claimed, released, fenced, moved, failed
    reason: str
    token: int = 0
    detail: str = ""


@dataclass(frozen=True)
class ClusterView:
    """Everything under the prefix at one revision."""

    revision: int
    nodes: Mapping[str, NodeInfo] = field(default_factory=dict)
    candidates: Mapping[str, Mapping[str, Candidate]] = field(default_factory=dict)
    owners: Mapping[str, Owner] = field(default_factory=dict)
    members: frozenset[str] = frozenset()
    services: Mapping[str, Optional[str]] = field(default_factory=dict)  # every known service -> VIP
    moves: Mapping[str, Move] = field(default_factory=dict)
    drained: Mapping[str, Mark] = field(default_factory=dict)
    paused: Mapping[str, Mark] = field(default_factory=dict)  # service or ALL_SERVICES -> mark
    cooldowns: Mapping[tuple[str, str], float] = field(default_factory=dict)  # (service, node) -> until
    failures: Mapping[tuple[str, str], Failures] = field(default_factory=dict)  # (service, node) -> failures
    problems: tuple[str, ...] = ()
    # live_candidates by service, filled on first use: a view is immutable, and a cycle asks for every
    # service's order several times (track_candidates, claim ranks, next homes)
    _ranked: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def live_candidates(self, service: str) -> list[Candidate]:
        """Candidates of `service` whose node is alive, best first (priority desc, then name). A fresh list."""
        ranked = self._ranked.get(service)
        if ranked is None:
            found = [c for c in self.candidates.get(service, {}).values() if c.node in self.nodes]
            ranked = self._ranked[service] = tuple(sorted(found, key=lambda c: (-c.priority, c.node)))
        return list(ranked)

    def eligible(self, service: str) -> list[Candidate]:
        """Live candidates that are neither drained nor unhealthy: who may take `service`, best first."""
        return [c for c in self.live_candidates(service)
                if c.node not in self.drained and not self.nodes[c.node].unhealthy]

    def is_paused(self, service: str) -> bool:
        return service in self.paused or ALL_SERVICES in self.paused


# ---- codecs -------------------------------------------------------------------------------

def encode(obj: Mapping[str, Any]) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def encode_owner(node: str, lease: int, since: float) -> bytes:
    return encode({"node": node, "lease": f"{lease:x}", "since": round(since, 3)})


def encode_candidate(priority: int, vip: Optional[str] = None) -> bytes:
    return encode({"priority": priority, "vip": vip})


def encode_service(vip: Optional[str]) -> bytes:
    return encode({"vip": vip})


def encode_node(node: str, lease: int, pid: int, started: float, services: Mapping[str, str],
                processes: Mapping[str, int] = {}, health: Mapping[str, str] = {},  # noqa: B006 - read only
                unhealthy: str = "") -> bytes:
    return encode({"node": node, "lease": f"{lease:x}", "pid": pid, "started": round(started, 3),
                   "services": dict(services), "processes": dict(processes), "health": dict(health),
                   "unhealthy": unhealthy})


OUTPUT_BYTES = 300  # of a check's output kept in etcd (history detail, failure record)


def encode_failures(f: Failures) -> bytes:
    return encode({"times": [round(t, 3) for t in f.times], "timeout": f.timeout, "check": f.check,
                   "output": f.output[-OUTPUT_BYTES:]})


def decode_failures(kv: KV, problems: list[str]) -> Optional[Failures]:
    """A failure record, or None (problem recorded): garbage counts as no failures."""
    data = _json(kv, problems)
    if data is None:
        return None
    times = data.get("times")
    if not isinstance(times, list) or not all(isinstance(t, (int, float)) and not isinstance(t, bool)
                                              for t in times):
        problems.append(f"{kv.key}: expected a list of failure times in 'times'")
        return None
    timeout = _num(data.get("timeout")) or 600.0
    return Failures(times=tuple(sorted(_num(t) for t in times))[-FAILURES_KEPT:], timeout=timeout,
                    check=str(data.get("check", ""))[:64], output=str(data.get("output", ""))[-OUTPUT_BYTES:])


def encode_move(to: str, source: str, token: int, requested: float) -> bytes:
    return encode({"to": to, "from": source, "token": token, "requested": round(requested, 3)})


def encode_mark(since: float, by: str) -> bytes:
    return encode({"since": round(since, 3), "by": by})


def encode_cooldown(until: float, reason: str) -> bytes:
    return encode({"until": round(until, 3), "reason": reason})


def encode_event(e: Event) -> bytes:
    return encode({"time": round(e.time, 6), "node": e.node, "event": e.event, "reason": e.reason,
                   "token": e.token, "detail": e.detail})


def decode_events(prefix: str, kvs: list[KV]) -> tuple[list[Event], list[str]]:
    """History entries in key order (oldest first), plus problems for undecodable ones."""
    problems: list[str] = []
    events = []
    for kv in kvs:
        rest = kv.key[len(history_prefix(prefix)):].split("/")
        data = _json(kv, problems)
        if data is None or len(rest) != 2:
            continue
        events.append(Event(service=rest[0], time=_num(data.get("time")), node=str(data.get("node", "?")),
                            event=str(data.get("event", "?")), reason=str(data.get("reason", "")),
                            token=int(_num(data.get("token"))), detail=str(data.get("detail", ""))))
    return events, problems


def _json(kv: KV, problems: list[str]) -> Optional[dict]:
    try:
        value = json.loads(kv.value.decode())
    except (UnicodeDecodeError, ValueError):
        problems.append(f"{kv.key}: value is not JSON: {kv.value[:60]!r}")
        return None
    if not isinstance(value, dict):
        problems.append(f"{kv.key}: expected a JSON object, got {value!r:.60}")
        return None
    return value


def _str(value: Any) -> Optional[str]:
    return value if isinstance(value, str) and value and "/" not in value else None


def _num(value: Any) -> float:
    """A finite, non-negative number below 2**53, else 0 (garbage never raises)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value < 2 ** 53:
        return float(value)
    return 0.0


_SKIP = object()  # a key whose value cannot be used at all
_SHAPES = {"nodes": 1, "candidates": 2, "members": 1, "services": 1, "moves": 1, "drain": 1, "pause": 1,
           "cooldowns": 2, "failures": 2, "owners": 1}  # kind -> path segments after it


def _decode_entry(kind: str, rest: list[str], kv: KV) -> tuple[Any, tuple[str, ...]]:
    """One key's value object (or _SKIP) and what was wrong with it: garbage is recorded, never raised."""
    problems: list[str] = []
    value: Any = _SKIP
    if kind == "nodes":
        data = _json(kv, problems)
        if data is not None:
            states = data.get("services") if isinstance(data.get("services"), dict) else {}
            counts = data.get("processes") if isinstance(data.get("processes"), dict) else {}
            health = data.get("health") if isinstance(data.get("health"), dict) else {}
            value = NodeInfo(node=rest[0], lease=kv.lease, pid=int(_num(data.get("pid"))),
                             started=_num(data.get("started")),
                             services={str(k): str(v) for k, v in states.items()},
                             processes={str(k): int(_num(v)) for k, v in counts.items()},
                             health={str(k): str(v) for k, v in health.items()},
                             unhealthy=str(data.get("unhealthy") or "")[:OUTPUT_BYTES])
    elif kind == "candidates":
        data = _json(kv, problems)
        prio = data.get("priority") if data else None
        if not isinstance(prio, int) or isinstance(prio, bool):
            if data is not None:
                problems.append(f"{kv.key}: expected an integer priority, got {prio!r}")
        else:
            vip = data.get("vip") if isinstance(data.get("vip"), str) else None
            value = Candidate(node=rest[1], priority=prio, vip=vip)
    elif kind == "members":
        value = rest[0]
    elif kind == "services":
        data = _json(kv, problems)
        value = data.get("vip") if data and isinstance(data.get("vip"), str) else None
    elif kind == "moves":
        data = _json(kv, problems)
        to, source = (_str(data.get("to")), _str(data.get("from"))) if data else (None, None)
        token = data.get("token") if data else None
        if to is None or source is None or not isinstance(token, int) or isinstance(token, bool):
            problems.append(f"{kv.key}: expected {{to, from, token}}; ignoring this move request")
        else:
            value = Move(service=rest[0], to=to, source=source, token=token, lease=kv.lease,
                         requested=_num(data.get("requested")))
    elif kind in ("drain", "pause"):
        data = _json(kv, problems) or {}  # a garbage mark still counts: it only ever holds back
        value = Mark(since=_num(data.get("since")), by=str(data.get("by", "")))
    elif kind == "cooldowns":
        data = _json(kv, problems)
        until = _num(data.get("until")) if data else 0.0
        value = until or float("inf")  # garbage: cool until cleaned up
    elif kind == "failures":
        record = decode_failures(kv, problems)
        value = record if record is not None else _SKIP
    elif kind == "owners":
        data = _json(kv, problems)
        node = _str(data.get("node")) if data else None
        if node is None:
            if data is not None:
                problems.append(f"{kv.key}: expected a node name in 'node', got {data.get('node')!r}")
            node = UNKNOWN_OWNER  # keep the service owned: a corrupt key must not cause a 2nd copy
        value = Owner(node=node, lease=kv.lease, token=kv.create_revision,
                      since=_num(data.get("since")) if data else 0.0)
    return value, tuple(problems)


def build_view(prefix: str, revision: int, kvs: list[KV]) -> ClusterView:
    """Decode a prefix listing into a ClusterView, recording (not raising on) garbage."""
    builder = ViewBuilder(prefix)
    builder.reset(kvs)
    return builder.view(revision)


class ViewBuilder:
    """A ClusterView kept key by key: the informer's copy of the cluster between cycles.

    `put`/`delete` only note a key as changed (the watch thread calls them, and must not
    stall); `view` decodes what changed since the last view and copies the containers.
    Decoding every key each time the cluster changed (2,000 keys at 500 services) was
    the largest part of an agent cycle; now a view costs the keys that changed plus a
    copy of a few dicts. Same result as decoding the whole listing (problems in key order).
    """

    def __init__(self, prefix: str):
        self.start = prefix + "/"
        self._pending: dict[str, Optional[KV]] = {}  # key -> its new KV, or None: deleted
        self._placed: dict[str, tuple[str, Any]] = {}  # key -> (kind, slot) it fills
        self._problems: dict[str, tuple[str, ...]] = {}  # key -> what was wrong with its value
        self._kinds: dict[str, dict] = {kind: {} for kind in _SHAPES}  # candidates: service -> node -> value

    def reset(self, kvs: Iterable[KV]) -> None:
        """Start over from a listing."""
        self._pending.clear()
        self._placed.clear()
        self._problems.clear()
        for container in self._kinds.values():
            container.clear()
        for kv in kvs:
            self._pending[kv.key] = kv

    def put(self, kv: KV) -> None:
        self._pending[kv.key] = kv

    def delete(self, key: str) -> None:
        self._pending[key] = None

    def _remove(self, key: str) -> None:
        self._problems.pop(key, None)
        placed = self._placed.pop(key, None)
        if placed is None:
            return
        kind, slot = placed
        container = self._kinds[kind]
        if kind == "candidates":
            inner = container.get(slot[0], {})
            inner.pop(slot[1], None)
            if not inner:
                container.pop(slot[0], None)
        else:
            container.pop(slot, None)

    def _place(self, kv: KV) -> None:
        if not kv.key.startswith(self.start):
            return
        parts = kv.key[len(self.start):].split("/")
        kind, rest = parts[0], parts[1:]
        if _SHAPES.get(kind) != len(rest):
            return
        value, wrong = _decode_entry(kind, rest, kv)
        if wrong:
            self._problems[kv.key] = wrong
        if value is _SKIP:
            return
        if kind == "candidates":
            self._kinds[kind].setdefault(rest[0], {})[rest[1]] = value
            slot: Any = (rest[0], rest[1])
        elif kind == "members":
            slot = kv.key
            self._kinds[kind][slot] = value
        elif kind in ("cooldowns", "failures"):
            slot = (rest[0], rest[1])
            self._kinds[kind][slot] = value
        else:
            slot = rest[0]
            self._kinds[kind][slot] = value
        self._placed[kv.key] = (kind, slot)

    def view(self, revision: int) -> ClusterView:
        """The cluster as of the changes noted so far, at `revision`."""
        for key, kv in self._pending.items():
            self._remove(key)
            if kv is not None:
                self._place(kv)
        self._pending.clear()
        k = self._kinds
        nodes, candidates, services = dict(k["nodes"]), {s: dict(c) for s, c in k["candidates"].items()}, k["services"]
        return ClusterView(revision=revision, nodes=nodes, candidates=candidates, owners=dict(k["owners"]),
                           members=frozenset(set(k["members"].values()) | set(nodes)),
                           services={**{s: None for s in candidates}, **services}, moves=dict(k["moves"]),
                           drained=dict(k["drain"]), paused=dict(k["pause"]), cooldowns=dict(k["cooldowns"]),
                           failures=dict(k["failures"]),
                           problems=tuple(p for key in sorted(self._problems) for p in self._problems[key]))
