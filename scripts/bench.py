#!/usr/bin/env python3
"""Failover benchmark (not a test): repeats faults on a 3-node namespace cluster and prints percentiles.

For each trial it takes the current owner, injects the fault, and measures from the
fault to the first answer on the VIP from another node ("takeover"), and the longest
stretch without any answer ("gap"). The faulted agent is then restarted so every trial
sees three nodes. The invariant sampler runs throughout; any double copy is reported.

With --services N[,N...] it runs the scale benchmark instead (see scale_main): per N, a fresh
3-node cluster with N services, cold start, agent kill -9 and whole-node crash of the node
owning about N/3, a drain, and the steady-state cost of the agents.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import select
import signal
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import lab as L

# how each fault is injected on the owner: a signal to its agent, kill -9 of one of its helpers, or a move;
# "colocated-crash" runs in a lab of its own (colocated_crash): etcd on the nodes, owner + etcd leader crashed
SCENARIOS = {"kill-9": signal.SIGKILL, "node-crash": "node", "sigterm": signal.SIGTERM, "fence-kill-9": "fence",
             "supervisord-kill-9": "supervisord", "move": None, "colocated-crash": "colocated",
             "hang-restart": "health", "hang-migrate": "health"}
# hang-*: the program is SIGSTOPped (it keeps its socket and answers nothing) and its http check notices;
# hang-restart restarts it in place, hang-migrate (max_restarts 0) hands it to the next node
HEALTH_CHECK = {"interval": 1.0, "timeout": 0.5, "failure_threshold": 2}


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(p / 100 * len(ordered) + 0.5) - 1))]


def summary(name: str, values: list[float]) -> str:
    if not values:
        return f"{name:<28} no data"
    return (f"{name:<28} n={len(values):<3} min {min(values):6.3f}  median {statistics.median(values):6.3f}  "
            f"p90 {pct(values, 90):6.3f}  max {max(values):6.3f}")


def trial(cluster: L.Cluster, sampler: L.Sampler, probe: L.Probe, sig, ttl: float) -> tuple[float, float]:
    owner = L.wait_until(sampler.holder, 30, "an owner")
    L.wait_until(lambda: probe.last() == owner, 10, f"the VIP to answer from {owner}")
    time.sleep(0.3)
    t0 = time.monotonic()
    if sig is None:  # planned move: the CLI from the client namespace, to the best other candidate
        res = cluster.cli("move", "web", "--no-wait")
        if res.returncode:
            raise RuntimeError(f"etcdha move failed: {res.stderr.strip()}")
    elif sig == "node":  # the whole node dies: every process at once and its addresses; no handoff possible
        node = cluster.nodes[owner]
        holder = cluster.lab.holders[owner].pid
        for pid in L.netns_pids(cluster.lab.ns(owner)):
            if pid != holder:
                with L.contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        L.destroy_cgroup(node.cgroup)
        cluster.lab.run(owner, ["ip", "addr", "del", f"{L.VIP}/24", "dev", "eth0"])
    elif sig == "fence":
        os.kill(cluster.nodes[owner].fence_pid(), signal.SIGKILL)
    elif sig == "supervisord":
        os.kill(cluster.nodes[owner].supervisord_pid(), signal.SIGKILL)
    else:
        cluster.nodes[owner].signal(sig)
    first = L.wait_until(lambda: probe.first_answer_after(t0, exclude=owner), ttl + 15, "takeover")
    time.sleep(0.2)
    gap = probe.longest_gap(t0, first)
    if sig is None:
        return first - t0, gap  # nothing was killed: every node stays in the game
    # bring the faulted node back as a candidate for the next trial
    node = cluster.nodes[owner]
    node.stop()
    node.start()
    L.wait_until(lambda: cluster.status()["nodes"].get(owner, {}).get("alive"), 30, f"{owner} to rejoin")
    time.sleep(cluster.nodes[owner].config().get("startup_grace", ttl) + 0.5)
    return first - t0, gap


@dataclass
class ColocatedResult:
    takeover: list[float] = field(default_factory=list)
    gap: list[float] = field(default_factory=list)
    fenced: list[str] = field(default_factory=list)    # "trial N: NODE: first log line", one per surviving node that fenced
    samples: int = 0
    load: list[float] = field(default_factory=list)   # 1-minute load average at each trial's start
    violations: list[str] = field(default_factory=list)
    workdir: str = ""


@dataclass(frozen=True)
class ColocatedTiming:
    """etcd's heartbeat and election timeout (ms) and the agents' keepalive_interval (s) for colocated-crash."""

    heartbeat: int = int(L.COLOCATED_ETCD_FLAGS[1])
    election: int = int(L.COLOCATED_ETCD_FLAGS[3])
    keepalive: float = L.COLOCATED_KEEPALIVE

    @classmethod
    def parse(cls, text: str) -> "ColocatedTiming":
        """'HEARTBEAT_MS/ELECTION_MS[/KEEPALIVE_S]', e.g. 50/500/0.5."""
        parts = text.split("/")
        if len(parts) not in (2, 3):
            raise ValueError(text)
        return cls(int(parts[0]), int(parts[1]), float(parts[2]) if len(parts) == 3 else cls.keepalive)

    def flags(self) -> tuple[str, ...]:
        return ("--heartbeat-interval", str(self.heartbeat), "--election-timeout", str(self.election))

    def __str__(self) -> str:
        return (f"{' '.join(self.flags())}; agents: etcd.election_timeout {self.election / 1000:g}, "
                f"keepalive_interval {self.keepalive:g}")


def colocated_crash(trials: int, ttl: float, timing: ColocatedTiming = ColocatedTiming()) -> ColocatedResult:
    """etcd on the nodes themselves (deploy/etcd-colocated.example): each trial makes the owner the etcd
    leader too (`etcdctl move-leader`), crashes that whole node (agent, fence, supervisord, service and
    its etcd member, by PID), measures the fault -> first answer on the VIP from another node, and
    records any surviving node whose fence fired or whose lease was lost. Between trials the node's
    etcd member and agent are restarted, so every trial starts from three nodes and three members."""
    result = ColocatedResult()
    with L.Lab(colocated=True, name="bc") as lab:
        result.workdir = str(lab.workdir)
        members: list[L.Etcd] = []
        cluster: Optional[L.Cluster] = None
        probe: Optional[L.Probe] = None
        try:
            members = L.start_colocated_etcd(lab, timing.flags())
            by_node = {m.role: m for m in members}
            prefix = "/bench-colocated"
            cluster = L.Cluster(lab, members[0], prefix, {"lease_ttl": ttl},
                                L.colocated_settings(lab, prefix, timing.election / 1000, timing.keepalive))
            with L.Sampler(lab, interval=0.05) as sampler:
                cluster.start()
                probe = L.Probe(lab, duration=7200)
                for i in range(trials):
                    owner = L.wait_until(sampler.holder, 30, "an owner")
                    with contextlib.suppress(OSError, ValueError, IndexError):
                        result.load.append(float(Path("/proc/loadavg").read_text().split()[0]))
                    marks = L.log_sizes(cluster)  # from before the leader move: it is an election too
                    L.move_etcd_leader(members, by_node[owner])
                    time.sleep(1.0)
                    L.wait_until(lambda: probe.last() == owner, 10, f"the VIP to answer from {owner}")
                    t0 = time.monotonic()
                    L.crash_node(cluster.nodes[owner])
                    first = L.wait_until(lambda: probe.first_answer_after(t0, exclude=owner), ttl + 15, "takeover")
                    time.sleep(ttl + 1)  # a survivor that could not renew through the election has fenced by now
                    result.takeover.append(first - t0)
                    result.gap.append(probe.longest_gap(t0, first))
                    # the node comes back: its etcd member (same data dir), then its agent
                    node = cluster.nodes[owner]
                    node.stop()
                    L.restart_member(by_node[owner])
                    node.start()
                    L.wait_until(lambda: cluster.status()["nodes"].get(owner, {}).get("alive"), 30,
                                 f"{owner} to rejoin")
                    time.sleep(node.config().get("startup_grace", ttl) + 0.5)
                    fenced = L.fenced_since(cluster, marks, exclude=[owner])
                    result.fenced += [f"trial {i + 1}: {n}: {lines[0].strip()[:240]}" for n, lines in fenced.items()]
                    print(f"colocated-crash trial {i + 1}/{trials}: {owner} (owner + etcd leader) crashed, takeover "
                          f"{first - t0:.3f}s, gap {result.gap[-1]:.3f}s, surviving nodes fenced: "
                          f"{', '.join(fenced) or 'none'}", flush=True)
            result.samples = sampler.samples
            result.violations = list(sampler.violations)
        finally:
            if probe:
                probe.stop()
            if cluster:
                cluster.stop()
            for member in members:
                member.stop()
    return result


@dataclass
class HealthResult:
    times: dict[str, list[float]] = field(default_factory=dict)  # scenario -> hang -> first answer from the new copy
    samples: int = 0
    violations: list[str] = field(default_factory=list)
    load: list[float] = field(default_factory=list)


def health_trial(cluster: L.Cluster, sampler: L.Sampler, probe: L.Probe, migrate: bool) -> float:
    """SIGSTOP the owner's program; seconds until the first answer from its restarted copy (or another node)."""
    owner = L.wait_until(sampler.holder, 30, "an owner")
    node = cluster.nodes[owner]
    L.wait_until(lambda: cluster.status()["services"]["web"]["health"] == "passing", 30, "web's check to pass")
    L.wait_until(lambda: probe.last() == owner, 10, f"the VIP to answer from {owner}")
    hung = L.wait_until(node.program_pid, 10, f"{owner}'s program")
    t0 = time.monotonic()
    os.kill(hung, signal.SIGSTOP)
    if migrate:
        first = L.wait_until(lambda: probe.first_answer_after(t0, exclude=owner), 30, "another node to answer")
    else:
        # the first answer after the new process exists can only come from it: the old one is stopped
        L.wait_until(lambda: node.program_pid() not in (None, hung), 30, f"{owner} to restart web", interval=0.01)
        restarted = time.monotonic()
        first = L.wait_until(lambda: probe.first_answer_after(restarted), 30, "the restarted copy to answer")
    with contextlib.suppress(ProcessLookupError):
        os.kill(hung, signal.SIGCONT)  # already killed by the restart or the handoff; never leave one stopped
    return first - t0


def health_lab(scenarios: list[str], trials: int, ttl: int) -> HealthResult:
    """hang-restart and hang-migrate on a cluster of their own, web with an http check (HEALTH_CHECK)."""
    result = HealthResult()
    with L.Lab(name="bh") as lab:
        etcd = L.Etcd(lab)
        check = {"http": f"http://{L.VIP}:{L.PORT}/", **HEALTH_CHECK}
        probe = None
        cluster = None
        try:
            etcd.start()
            with L.Sampler(lab, interval=0.05) as sampler:
                probe = L.Probe(lab, duration=7200)
                for name in scenarios:
                    migrate = name == "hang-migrate"
                    web = {"command": L.sample_service_command(), "vip": f"{L.VIP}/24", "interface": "eth0",
                           "checks": [check], "max_restarts": 0 if migrate else 100, "failure_timeout": 3600}
                    cluster = L.Cluster(lab, etcd, f"/bench-{name}", {"lease_ttl": ttl, "failure_cooldown": 1,
                                                                     "services": {"web": web}})
                    cluster.start()
                    times = result.times.setdefault(name, [])
                    for i in range(trials):
                        with contextlib.suppress(OSError, ValueError, IndexError):
                            result.load.append(float(Path("/proc/loadavg").read_text().split()[0]))
                        times.append(health_trial(cluster, sampler, probe, migrate))
                        print(f"{name} trial {i + 1}/{trials}: first answer {times[-1]:.3f}s after the hang",
                              flush=True)
                        time.sleep(1.5)  # the cooldown (1 s) of a migration ends: every node is a candidate again
                    cluster.stop()
                    cluster = None
            result.samples = sampler.samples
            result.violations = list(sampler.violations)
        finally:
            if probe:
                probe.stop()
            if cluster:
                cluster.stop()
            etcd.stop()
    return result


# ---- scale mode: `--services N[,N...]` ---------------------------------------------------------

# the scale sampler's share of one core: its pauses stretch so that sampling uses at most this. At
# N = 500 a sample costs 15-25 ms (55-100 ms when it read every service process's environment and
# split it into words), so 0.1 keeps the period of the earlier published runs (~0.2 s) while the
# sampler takes a tenth of a core instead of a quarter from the takeovers it watches; at N = 10 and
# 100 the 20 ms floor sets the period
SAMPLER_DUTY = 0.1
LINE_EVERY = 0.02      # the watch feed's shortest pause between lines (changes in between make one line)
HEARTBEAT = 0.5       # ... and a line at least this often, changed or not
SETTLE_QUIET = 2.0    # "quiet": every service RUNNING on a live owner and no change seen for this long


def watch_status(argv: list[str]) -> int:
    """`bench.py watch-status ENDPOINTS PREFIX DURATION`: the scale benchmark's view of the cluster.

    Runs in the client namespace. Lists the prefix once, then applies etcd's watch events
    (etcdha's own Watcher: it resumes a broken stream and lists again after a compaction) to
    the keys that make `etcdha status`'s owner and state columns: owners/, nodes/ (each node's
    program states) and drain/, decoded by etcdha's own model. Prints one JSON line per batch
    of changes, at most every LINE_EVERY s, and at least every HEARTBEAT s:
    {"ts": when the batch's last change came, "t": the same (monotonic; the state held by
    then), "s": {SERVICE: [owner, state]} for the services that changed since the previous
    line, "gone": [...], "n": {NODE: [alive, drained]}}, or {"ts", "t", "error"}.
    Polling `etcdha status --json` instead cost 60 ms of CPU a poll at N = 500 (half a core
    at five polls a second, on a 2-core machine whose takeovers are CPU-bound) and saw a
    change up to a poll period late; a watch costs in proportion to the changes and sees
    each when etcd sends it; idle, it sends etcd nothing. EOF on stdin ends it, and so does
    DURATION seconds.
    """
    from etcdha import model
    from etcdha.config import EtcdConfig
    from etcdha.store import Store, Watcher

    endpoints, prefix, duration = argv[0], argv[1], float(argv[2])
    store = Store(EtcdConfig(endpoints=tuple(endpoints.split(",")), prefix=prefix, timeout=2.0))
    lock = threading.Lock()
    owners: dict[str, str] = {}
    states: dict[str, dict[str, str]] = {}  # node -> service -> program state
    drained: set[str] = set()
    mark = {"at": 0.0}
    changed = threading.Event()

    def put(kv: model.KV) -> None:
        kind, _, rest = kv.key[len(prefix) + 1:].partition("/")
        if kind == "owners":
            owner = model.build_view(prefix, 0, [kv]).owners.get(rest)
            owners[rest] = owner.node if owner else model.UNKNOWN_OWNER
        elif kind == "nodes":
            node = model.build_view(prefix, 0, [kv]).nodes.get(rest)
            states[rest] = dict(node.services) if node else {}
        elif kind == "drain":
            drained.add(rest)

    def delete(key: str) -> None:
        kind, _, rest = key[len(prefix) + 1:].partition("/")
        {"owners": owners, "nodes": states}.get(kind, {}).pop(rest, None)
        if kind == "drain":
            drained.discard(rest)

    class Keys(Watcher):
        trust_progress = False  # resume only after the last event applied: never skip one

        def _start_over(self) -> None:
            revision, kvs = self.store.listing()
            with lock:
                owners.clear(), states.clear(), drained.clear()
                for kv in kvs:
                    put(kv)
                self.revision = revision
                mark["at"] = time.monotonic()
            changed.set()

        def _apply(self, events) -> None:  # noqa: ANN001 - protobuf repeated field
            with lock:
                for ev in events:
                    if ev.type == ev.DELETE:
                        delete(ev.kv.key.decode(errors="replace"))
                    else:
                        put(store._kvs([ev.kv])[0])
                mark["at"] = time.monotonic()
            changed.set()

    watcher = Keys(store, lambda: None)
    watcher.start()
    end = time.monotonic() + duration
    last: dict[str, list] = {}
    last_line = 0.0
    try:
        while time.monotonic() < end:
            if select.select([sys.stdin], [], [], LINE_EVERY)[0] and not os.read(sys.stdin.fileno(), 4096):
                return 0
            if not watcher.connected.is_set() and watcher.restarts and time.monotonic() - last_line >= HEARTBEAT:
                now = time.monotonic()
                print(json.dumps({"ts": now, "t": now, "error": f"watch not connected ({watcher.restarts} restarts)"}),
                      flush=True)
                last_line = now
                continue
            dirty = changed.is_set()
            if not watcher.connected.is_set() or (not dirty and time.monotonic() - last_line < HEARTBEAT):
                continue
            changed.clear()
            with lock:
                at = mark["at"]
                now = {name: [node, states.get(node, {}).get(name, "UNKNOWN")] for name, node in owners.items()}
                nodes = {name: [True, name in drained] for name in states}
                nodes.update({name: [False, True] for name in drained if name not in states})
            stamp = at if dirty else time.monotonic()
            line = {"ts": stamp, "t": stamp, "s": {k: v for k, v in now.items() if last.get(k) != v},
                    "gone": [k for k in last if k not in now], "n": nodes}
            last = now
            last_line = time.monotonic()
            print(json.dumps(line), flush=True)
    finally:
        watcher.stop()
        store.close()
    return 0


class Watch:
    """The first feed line at or after `after` in which `pred(services, nodes)` held."""

    def __init__(self, pred: Callable[[dict, dict], bool], after: float):
        self.pred, self.after = pred, after
        self.at: Optional[float] = None   # that line's time (the state was reached by then)
        self.done = threading.Event()


class Feed:
    """The watch feed's lines, applied to a current view: services {NAME: (owner, state)}, nodes {NAME: (alive, drained)}."""

    def __init__(self, cluster: L.Cluster, duration: float):
        endpoints = ",".join(f"http://{cluster.lab.etcd_ip(r)}:2379" for r in cluster.lab.etcd_roles)
        self.services: dict[str, tuple] = {}
        self.nodes: dict[str, tuple] = {}
        self.polls = 0
        self.errors = 0
        self.last_error = ""
        self.started = time.monotonic()
        self.cpu = 0.0  # share of one core the feed used, known after stop()
        self.last_change = 0.0
        self.last_poll = 0.0
        self._lock = threading.Lock()
        self._watches: list[Watch] = []
        self.proc = cluster.lab.popen("cl", [sys.executable, str(Path(__file__).resolve()), "watch-status", endpoints,
                                             cluster.prefix, str(duration)],
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        for text in self.proc.stdout:
            try:
                line = json.loads(text)
            except ValueError:
                continue
            with self._lock:
                self.polls += 1
                if "error" in line:
                    self.errors += 1
                    self.last_error = line["error"]
                    continue
                nodes = {k: tuple(v) for k, v in line["n"].items()}
                if line["s"] or line["gone"] or nodes != self.nodes:
                    self.last_change = line["t"]
                for name, value in line["s"].items():
                    self.services[name] = tuple(value)
                for name in line["gone"]:
                    self.services.pop(name, None)
                self.nodes = nodes
                self.last_poll = line["t"]
                for w in self._watches:
                    if not w.done.is_set() and line["ts"] >= w.after and w.pred(self.services, self.nodes):
                        w.at = line["t"]
                        w.done.set()

    def watch(self, pred: Callable[[dict, dict], bool], after: float) -> Watch:
        w = Watch(pred, after)
        with self._lock:
            self._watches.append(w)
        return w

    def forget(self, *watches: Watch) -> None:
        with self._lock:
            self._watches = [w for w in self._watches if w not in watches]

    def view(self) -> tuple[dict, dict]:
        with self._lock:
            return dict(self.services), dict(self.nodes)

    def stop(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(OSError, ValueError, IndexError):
                fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
                used = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime
                self.cpu = used / max(1e-9, time.monotonic() - self.started)
            with contextlib.suppress(OSError):
                self.proc.stdin.close()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._thread.join(5)


def wait_watches(watches: list[Watch], deadline: float) -> None:
    for w in watches:
        w.done.wait(max(0.0, deadline - time.monotonic()))


def all_running(names: list[str], avoid: Optional[str] = None) -> Callable[[dict, dict], bool]:
    """Every service in `names` owned by a live node other than `avoid`, and RUNNING there."""
    def pred(services: dict, nodes: dict) -> bool:
        for name in names:
            owner, state = services.get(name, (None, None))
            if owner is None or owner == avoid or state != "RUNNING" or not nodes.get(owner, (False,))[0]:
                return False
        return True
    return pred


def all_owned(names: list[str], avoid: Optional[str] = None) -> Callable[[dict, dict], bool]:
    """Every service in `names` owned by a node other than `avoid`."""
    def pred(services: dict, nodes: dict) -> bool:
        return all(services.get(name, (None,))[0] not in (None, avoid) for name in names)
    return pred


def leftover(feed: Feed, names: list[str], avoid: Optional[str]) -> str:
    """Why `all_running(names, avoid)` does not hold now: counts of owner/state combinations."""
    services, nodes = feed.view()
    counts: dict[str, int] = {}
    for name in names:
        owner, state = services.get(name, (None, None))
        if owner is not None and owner != avoid and state == "RUNNING" and nodes.get(owner, (False,))[0]:
            continue
        key = ("no owner" if owner is None else f"owner {owner}" + (" (the faulted node)" if owner == avoid else "")
               + f" {state}")
        counts[key] = counts.get(key, 0) + 1
    return ", ".join(f"{n} {k}" for k, n in sorted(counts.items(), key=lambda kv: -kv[1])) or "nothing"


@dataclass
class Phase:
    """One timed phase: seconds from its start to each milestone, None when not reached within `timeout`."""

    moved: int = 0
    victim: str = ""
    times: dict[str, Optional[float]] = field(default_factory=dict)
    timeout: float = 0.0
    note: str = ""


@dataclass
class ScaleResult:
    n: int
    vips: int = 0
    workdir: str = ""
    spread: dict[str, int] = field(default_factory=dict)
    cold: Optional[Phase] = None
    colds: list[Phase] = field(default_factory=list)  # every cold start (the first one is `cold`)
    trials: dict[str, list[Phase]] = field(default_factory=lambda: {"agent-kill-9": [], "node-crash": []})
    drain: Optional[Phase] = None
    idle: dict = field(default_factory=dict)
    samples: int = 0
    sample_period: float = 0.0
    sample_cost: float = 0.0
    plain_sample_cost: float = 0.0
    violations: int = 0
    violation_lines: list[str] = field(default_factory=list)
    feed_cpu: float = 0.0  # share of a core the watch feed used
    problems: list[str] = field(default_factory=list)
    evidence: list[str] = field(default_factory=list)
    handoffs: dict[str, int] = field(default_factory=dict)     # node -> fence firings after its agent was killed
    others: set[str] = field(default_factory=set)              # other etcdha labs seen running meanwhile
    load: list[float] = field(default_factory=list)            # 1-minute load average at each phase start


def note_load(result: ScaleResult, own_tag: str) -> None:
    """Remember the load average and any other etcdha lab (tests, another bench) sharing the machine."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        result.load.append(float(Path("/proc/loadavg").read_text().split()[0]))
    out = L.sh("ip", "netns", "list", check=False).stdout
    for line in out.splitlines():
        name = line.split()[0] if line.split() else ""
        if name.startswith(L.TAG_PREFIX) and not name.startswith(own_tag + "-"):
            result.others.add(name.rsplit("-", 1)[0])


def settle(feed: Feed, names: list[str], nodes: list[str], timeout: float) -> Optional[str]:
    """Wait until every node is alive, every service RUNNING on a live owner and nothing changed for
    SETTLE_QUIET s. None when quiet; otherwise what was still wrong."""
    deadline = time.monotonic() + timeout
    pred = all_running(names)
    while time.monotonic() < deadline:
        services, alive = feed.view()
        now = time.monotonic()
        if (all(alive.get(n, (False,))[0] for n in nodes) and pred(services, alive)
                and now - feed.last_change >= SETTLE_QUIET and feed.last_poll > now - 5):
            return None
        time.sleep(0.2)
    services, alive = feed.view()
    dead = [n for n in nodes if not alive.get(n, (False,))[0]]
    return (f"not quiet after {timeout:g}s: " + (f"nodes not alive: {', '.join(dead)}; " if dead else "")
            + f"not RUNNING on a live owner: {leftover(feed, names, None)}")


def pick_victim(feed: Feed, n: int) -> tuple[str, list[str]]:
    """The node whose number of owned services is closest to N/3 (ties: the one owning more), and those services.

    There is no failback, so after a fault one node holds about 2N/3; choosing by closeness to N/3
    keeps every trial moving about a third of the services.
    """
    services, _ = feed.view()
    owned: dict[str, list[str]] = {}
    for name, (owner, _state) in services.items():
        if owner is not None:
            owned.setdefault(owner, []).append(name)
    victim = min(owned, key=lambda node: (abs(len(owned[node]) - n / 3), -len(owned[node]), node))
    return victim, sorted(owned[victim])


def timed(feed: Feed, names: list[str], victim: Optional[str], timeout: float,
          fault: Callable[[], None]) -> Phase:
    """Inject `fault` and time it until every service in `names` is owned elsewhere, then RUNNING elsewhere."""
    t0 = time.monotonic()
    owned = feed.watch(all_owned(names, victim), t0)
    running = feed.watch(all_running(names, victim), t0)
    fault()
    wait_watches([owned, running], t0 + timeout)
    feed.forget(owned, running)
    phase = Phase(moved=len(names), victim=victim or "", timeout=timeout,
                  times={"owned": owned.at - t0 if owned.at else None, "running": running.at - t0 if running.at else None})
    if running.at is None:
        phase.note = f"after {timeout:g}s: {leftover(feed, names, victim)}"
    return phase


def restart(cluster: L.Cluster, feed: Feed, node: str, names: list[str], timeout: float, ttl: float) -> Optional[str]:
    """Bring a faulted node back as a candidate and wait for a quiet cluster; None, or what went wrong."""
    cluster.nodes[node].stop()
    cluster.nodes[node].start()
    try:
        L.wait_until(lambda: feed.view()[1].get(node, (False,))[0], 60, f"{node} to rejoin", interval=0.1)
    except TimeoutError as exc:
        return str(exc)
    time.sleep(ttl + 0.5)  # its startup grace: a rejoined agent claims nothing before it ends
    return settle(feed, names, list(cluster.nodes), timeout)


def idle_cost(cluster: L.Cluster, etcd: L.Etcd, feed: Feed, seconds: float) -> dict:
    """RSS and CPU of every agent, fence and supervisord, eth0 bytes per node and etcd's gRPC
    messages over `seconds` of idle (the watch feed sends etcd nothing meanwhile)."""
    settled = writes_settle(etcd, WRITE_SETTLE_LIMIT)
    procs = {}
    for name, node in cluster.nodes.items():
        procs[name] = {"agent": node.pid, "fence": node.fence_pid(), "supervisord": node.supervisord_pid()}

    def cpu() -> dict:
        return {(n, k): L.proc_cpu_seconds(p) if p else None for n, ps in procs.items() for k, p in ps.items()}

    def received(metrics: dict[str, float]) -> dict[str, float]:
        by_method: dict[str, float] = {}
        for key, value in metrics.items():
            if key.startswith("grpc_server_msg_received_total{"):
                method = key.split('grpc_method="', 1)[1].split('"', 1)[0]
                by_method[method] = by_method.get(method, 0.0) + value
        return by_method

    # every key written meanwhile, by kind (the watch's one request is made before the window opens)
    watch = cluster.lab.popen("cl", ["etcdctl", "--endpoints", etcd.endpoint, "watch", "--prefix", cluster.prefix + "/",
                                     "-w", "json"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    time.sleep(1.0)
    m0, c0, b0 = received(L.etcd_metrics(etcd)), cpu(), {n: L.interface_bytes(cluster.lab, n) for n in cluster.nodes}
    t0 = time.monotonic()
    time.sleep(seconds)
    m1, c1, b1 = received(L.etcd_metrics(etcd)), cpu(), {n: L.interface_bytes(cluster.lab, n) for n in cluster.nodes}
    window = time.monotonic() - t0
    watch.terminate()
    try:
        watched, _ = watch.communicate(timeout=10)
    except subprocess.TimeoutExpired:
        watch.kill()
        watched, _ = watch.communicate()
    result = {"window": window, "rss": {}, "cpu": {}, "bytes": {}, "settled": settled,
              "writes": written_keys(watched, cluster.prefix)}
    for (n, kind), before in c0.items():
        after = c1[(n, kind)]
        result["cpu"][(n, kind)] = None if before is None or after is None else 100 * (after - before) / window
        pid = procs[n][kind]
        result["rss"][(n, kind)] = L.proc_status_kib(pid) if pid else None
    for n in cluster.nodes:
        result["bytes"][n] = None if b0[n] is None or b1[n] is None else (b1[n] - b0[n]) / window
    methods = {m: (m1.get(m, 0.0) - m0.get(m, 0.0)) / window for m in m1}
    result["methods"] = {m: r for m, r in sorted(methods.items(), key=lambda kv: -kv[1]) if r > 0}
    result["requests"] = sum(methods.values()) / len(cluster.nodes)
    return result


WRITES = ("Put", "Txn", "DeleteRange", "LeaseGrant", "LeaseRevoke")
WRITE_SETTLE_LIMIT = 60.0


def writes_settle(etcd: L.Etcd, limit: float, quiet: float = 4.0) -> float:
    """Wait (at most `limit` s) until etcd has received no write for `quiet` s; the seconds waited,
    or -1 if writes were still coming after `limit` (history, status updates left over from a busy start)."""
    def writes() -> float:
        metrics = L.etcd_metrics(etcd)
        return sum(v for k, v in metrics.items() if k.startswith("grpc_server_msg_received_total{")
                   and any(f'grpc_method="{m}"' in k for m in WRITES))
    start = time.monotonic()
    last, since = writes(), time.monotonic()
    while time.monotonic() - start < limit:
        time.sleep(1.0)
        now = writes()
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet:
            return time.monotonic() - start
    return -1.0


def written_keys(watched: str, prefix: str) -> dict[str, int]:
    """`etcdctl watch -w json` output -> {"put nodes": 3, "delete cooldowns": 7, ...} (by the key's first segment)."""
    import base64

    counts: dict[str, int] = {}
    for line in watched.splitlines():
        with contextlib.suppress(ValueError, KeyError, TypeError):
            for event in json.loads(line).get("Events") or []:
                key = base64.b64decode(event["kv"]["key"]).decode(errors="replace")
                kind = key[len(prefix) + 1:].split("/", 1)[0] if key.startswith(prefix + "/") else "?"
                what = f"{'delete' if event.get('type') == 1 else 'put'} {kind}"
                counts[what] = counts.get(what, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: -kv[1]))


def scan_logs(cluster: L.Cluster, result: ScaleResult) -> None:
    """Agent tracebacks and fence firings (each node's agent.log) as problems, with excerpts."""
    for node in cluster.nodes.values():
        try:
            lines = node.log.read_text(errors="replace").splitlines()
        except OSError:
            continue
        tracebacks = [i for i, line in enumerate(lines) if line.startswith("Traceback")]
        fired = [line for line in lines if "fired" in line]
        if tracebacks:
            result.problems.append(f"{node.name}: {len(tracebacks)} traceback(s) in {node.log}")
            i = tracebacks[0]
            end = next((j for j in range(i + 1, min(len(lines), i + 60)) if lines[j] and not lines[j][0].isspace()
                        and not lines[j].startswith("Traceback")), min(len(lines), i + 30))
            result.evidence.append(f"{node.name} {node.log}:\n    " + "\n    ".join(lines[max(0, i - 2):end + 1]))
        # after our kill -9 of the agent the fence fires by design ("agent gone"): the handoff
        unexpected = [line for line in fired if "agent gone" not in line]
        if unexpected:
            result.problems.append(f"{node.name}: the fence fired {len(unexpected)} time(s) other than after an agent "
                                   f"kill (e.g. {unexpected[0].strip()[:300]})")
        result.handoffs[node.name] = len(fired) - len(unexpected)


class ScaleRun:
    """One N: a fresh lab, etcd and cluster (prefix /scaleN); every phase bounded by `timeout`."""

    def __init__(self, lab: L.Lab, n: int, trials: int, ttl: int, idle: float, timeout: float,
                 startsecs: Optional[int], result: ScaleResult, fallback: str = "spread"):
        self.lab, self.n, self.trials, self.ttl, self.idle, self.timeout = lab, n, trials, ttl, idle, timeout
        self.fallback = fallback
        self.result = result
        config = L.scale_services(n, startsecs=startsecs)
        self.names = sorted(config)
        self.vips = {name: svc["vip"].split("/")[0] if "vip" in svc else None for name, svc in config.items()}
        result.vips = sum(1 for v in self.vips.values() if v)
        result.workdir = str(lab.workdir)
        self.etcd = L.Etcd(lab)
        # service i prefers node i % 3 (200); the lab's own 0-20 per rank changes no order, and a cold
        # start spreads them N/3 per node. Its second choice (150, the last 100): with fallback "next",
        # the next node, so a fault moves the victim's third to one survivor, and the third that node
        # then holds alone comes back to the restarted one when its own node is hit next (pick_victim);
        # with "spread", the next node for every other group of six services and the one after for the
        # rest, so the victim's third (VIPs too: every other service has one) moves half to each
        # survivor, as an operator spreads fallbacks; each trial then starts from a fresh cold start.
        def priority(i: int, k: int) -> int:
            ranks = (200, 150, 100) if fallback == "next" or (i // 6) % 2 == 0 else (200, 100, 150)
            return ranks[(k - i) % 3]

        per_node = {node: {"services": {name: {**svc, "priority": priority(i, k)}
                                        for i, (name, svc) in enumerate(config.items())}}
                    for k, node in enumerate(lab.node_names)}
        self.cluster = L.Cluster(lab, self.etcd, f"/scale{n}", {"lease_ttl": ttl}, per_node)
        self.feed: Optional[Feed] = None

    def out(self, text: str) -> None:
        print(f"[N={self.n}] {text}", flush=True)

    def settle(self) -> Optional[str]:
        return settle(self.feed, self.names, list(self.cluster.nodes), self.timeout)

    def run(self) -> None:
        result = self.result
        sampler = None
        try:
            self.etcd.start()
            self.feed = Feed(self.cluster, duration=6 * 3600)
            L.wait_until(lambda: self.feed.polls > 0, 30, "the watch feed's first line", interval=0.1)
            with L.ScaleSampler(self.lab, interval=0.02, services=self.vips, duty=SAMPLER_DUTY) as sampler:
                self.out(f"{self.n} services ({result.vips} with a VIP), lab {self.lab.workdir}")
                if self.cold_start():
                    self.steady_state()  # first, while the services are spread N/3 per node
                    for scenario in ("agent-kill-9", "node-crash"):
                        self.faults(scenario)
                    self.drain()
                    while len(self.result.colds) < self.trials:  # one start is one sample: start them all again
                        if not self.cold_again():
                            break
        except Exception as exc:  # noqa: BLE001 - report what was measured so far, then clean up
            result.problems.append(f"the run stopped: {type(exc).__name__}: {exc}")
        finally:
            if sampler is not None:
                result.samples = sampler.samples
                result.violations = sampler.violation_count
                result.violation_lines = list(sampler.violations)
                if sampler.samples > 1 and sampler.last_sample and sampler.first_sample:
                    result.sample_period = (sampler.last_sample - sampler.first_sample) / (sampler.samples - 1)
                result.sample_cost = statistics.median(sampler.costs) if sampler.costs else 0.0
                if sampler.errors:
                    result.problems.append(f"{sampler.errors} samples failed")
            if self.feed:
                self.feed.stop()
                result.feed_cpu = self.feed.cpu
                if self.feed.errors:
                    result.problems.append(f"(instrument) {self.feed.errors} of {self.feed.polls} feed lines were errors "
                                           f"(last: {self.feed.last_error[:200]})")
            scan_logs(self.cluster, result)
            self.cluster.stop()
            self.etcd.stop()

    def cold_start(self) -> bool:
        """1. From starting the three agents to every service owned, then RUNNING. True if the cluster got quiet."""
        result, feed = self.result, self.feed
        note_load(result, self.lab.tag)
        self.cluster.write_configs()  # an operator's configs are there before the agents start
        t0 = time.monotonic()
        owned, running = feed.watch(all_owned(self.names), t0), feed.watch(all_running(self.names), t0)
        self.cluster.start(write_config=False)
        wait_watches([owned, running], t0 + self.timeout)
        feed.forget(owned, running)
        cold = Phase(moved=self.n, timeout=self.timeout, times={
            "owned": owned.at - t0 if owned.at else None, "running": running.at - t0 if running.at else None})
        if running.at is None:
            cold.note = f"after {self.timeout:g}s: {leftover(feed, self.names, None)}"
        result.colds.append(cold)
        self.out(f"cold start {len(result.colds)}: {fmt_phase(cold)}")
        if result.cold is not None:
            return running.at is not None and not self.settle()
        result.cold = cold
        conf = self.cluster.nodes["n1"].dir / "run" / "supervisord.conf"  # names the code's listener.py
        if CODE_DIR and (not conf.exists() or str(CODE_DIR) not in conf.read_text(errors="replace")):
            result.problems.append(f"(instrument) {conf} does not name the copied code in {CODE_DIR}: "
                                   "the agents may run the working tree as it changes")
        quiet = self.settle()
        services, _ = feed.view()
        for node in self.cluster.nodes:
            result.spread[node] = sum(1 for owner, _ in services.values() if owner == node)
        self.out("services per node: " + ", ".join(f"{k} {v}" for k, v in result.spread.items()))
        if quiet:
            result.problems.append(f"after the cold start: {quiet}; nothing else measured")
        return not quiet

    def steady_state(self) -> None:
        """5. Idle cost, with what lab.Sampler (one /proc scan per service) would cost per sample here."""
        started = time.thread_time()
        L.Sampler(self.lab, services=self.vips).sample_all()
        self.result.plain_sample_cost = time.thread_time() - started
        time.sleep(3)
        note_load(self.result, self.lab.tag)
        self.result.idle = idle_cost(self.cluster, self.etcd, self.feed, self.idle)
        self.out(f"idle {self.result.idle['window']:.0f}s: {fmt_idle(self.result.idle)}")

    def faults(self, scenario: str) -> None:
        """2, 3. Agent kill -9 or whole-node crash of the node owning about N/3, `trials` times."""
        result = self.result
        for i in range(self.trials):
            quiet = self.settle()
            if quiet:
                result.problems.append(f"{scenario}: trial {i + 1} not started, {quiet}")
                return
            for node in self.cluster.nodes.values():
                if not node.alive():
                    result.problems.append(f"{node.name}: the agent exited by itself (restarted)")
                    restart(self.cluster, self.feed, node.name, self.names, self.timeout, self.ttl)
            note_load(result, self.lab.tag)
            victim, moved = pick_victim(self.feed, self.n)
            node = self.cluster.nodes[victim]
            fault = (lambda: node.signal(signal.SIGKILL)) if scenario == "agent-kill-9" else (lambda: L.crash_node(node))
            phase = timed(self.feed, moved, victim, self.timeout, fault)
            result.trials[scenario].append(phase)
            self.out(f"{scenario} trial {i + 1}/{self.trials}, {victim} with {len(moved)} services: {fmt_phase(phase)}")
            if self.fallback == "spread":  # no failback: only a new cold start spreads them N/3 per node again
                if not self.cold_again():
                    return
                continue
            problem = restart(self.cluster, self.feed, victim, self.names, self.timeout, self.ttl)
            if problem:
                result.problems.append(f"{scenario} trial {i + 1}, after restarting {victim}: {problem}")
                return

    def cold_again(self) -> bool:
        """5. Stop every agent (gracefully: leases revoked), wait until nothing is owned, start them all again."""
        self.cluster.stop()
        try:
            L.wait_until(lambda: not any(owner for owner, _ in self.feed.view()[0].values())
                         and not any(alive for alive, _ in self.feed.view()[1].values()), self.timeout,
                         "every agent gone and nothing owned", interval=0.1)
        except TimeoutError as exc:
            self.result.problems.append(f"no further cold start: {exc}")
            return False
        return self.cold_start()

    def drain(self) -> None:
        """4. `etcdha drain NODE --wait` of the node owning about N/3; then undrain."""
        result, feed, lab = self.result, self.feed, self.lab
        quiet = self.settle()
        if quiet:
            result.problems.append(f"drain not started: {quiet}")
            return
        note_load(result, lab.tag)
        victim, moved = pick_victim(feed, self.n)
        endpoints = ",".join(f"http://{lab.etcd_ip(r)}:2379" for r in lab.etcd_roles)
        cli: dict = {}

        def start() -> None:
            cli["proc"] = lab.popen("cl", [sys.executable, "-m", "etcdha", "--endpoints", endpoints, "--prefix",
                                           self.cluster.prefix, "drain", victim, "--wait", "--timeout",
                                           f"{self.timeout:g}"],
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

            def reap() -> None:
                text, _ = cli["proc"].communicate()
                cli["output"] = text.splitlines()
                cli["at"] = time.monotonic()
            threading.Thread(target=reap, daemon=True).start()

        t0 = time.monotonic()
        nothing = feed.watch(lambda services, _nodes: all(owner != victim for owner, _ in services.values()), t0)
        phase = timed(feed, moved, victim, self.timeout, start)
        wait_watches([nothing], t0 + self.timeout)
        feed.forget(nothing)
        with contextlib.suppress(TimeoutError):
            L.wait_until(lambda: "at" in cli, max(0.0, t0 + self.timeout - time.monotonic()) + 30,
                         "etcdha drain --wait to return", interval=0.1)
        if "at" not in cli:
            cli["proc"].kill()
            phase.note += "; `etcdha drain --wait` did not return (killed)"
        elif cli["proc"].returncode:
            phase.note += (f"; `etcdha drain --wait` exit {cli['proc'].returncode}: "
                           + " | ".join(cli["output"][-2:])[:300])
        ok = "at" in cli and cli["proc"].returncode == 0
        phase.times = {"nothing": nothing.at - t0 if nothing.at else None, **phase.times,
                       "cli": cli["at"] - t0 if ok else None}
        phase.note = phase.note.lstrip("; ")
        result.drain = phase
        self.out(f"drain of {victim} with {len(moved)} services: {fmt_phase(phase)}")
        res = self.cluster.cli("undrain", victim)
        if res.returncode:
            result.problems.append(f"undrain {victim}: {res.stderr.strip()}")
        quiet = self.settle()
        if quiet:
            result.problems.append(f"after the drain and undrain: {quiet}")


def scale_run(n: int, trials: int, ttl: int, idle: float, timeout: float, startsecs: Optional[int],
              fallback: str) -> ScaleResult:
    """One N in a lab of its own; the lab removes every namespace, cgroup and process on exit."""
    result = ScaleResult(n=n)
    with L.Lab(name=f"s{n}") as lab:
        ScaleRun(lab, n, trials, ttl, idle, timeout, startsecs, result, fallback).run()
    return result


def seconds(value: Optional[float], timeout: float) -> str:
    return f"{value:.2f}" if value is not None else f"not done after {timeout:g}s"


def fmt_phase(phase: Phase) -> str:
    labels = {"nothing": "owns nothing", "owned": "all owned", "running": "all RUNNING", "cli": "drain --wait returned"}
    text = ", ".join(f"{labels[k]} {seconds(v, phase.timeout)}" for k, v in phase.times.items())
    return text + (f" ({phase.note})" if phase.note else "")


def fmt_idle(idle: dict) -> str:
    rss = {k: v for k, v in idle["rss"].items()}
    parts = []
    for kind in ("agent", "fence", "supervisord"):
        parts.append(f"{kind} RSS " + "/".join(f"{rss[(n, k)] / 1024:.1f}" if rss[(n, k)] else "-"
                                                 for (n, k) in rss if k == kind) + " MiB")
    parts.append("CPU % agent " + "/".join(f"{v:.1f}" if v is not None else "-"
                                         for (n, k), v in idle["cpu"].items() if k == "agent"))
    parts.append("bytes/s " + "/".join(f"{v:.0f}" if v is not None else "-" for v in idle["bytes"].values()))
    parts.append(f"etcd requests/s per node (avg) {idle['requests']:.1f}")
    parts.append("window opened " + (f"{idle['settled']:.0f}s after etcd writes stopped" if idle["settled"] >= 0
                                     else f"with etcd writes still coming after {WRITE_SETTLE_LIMIT:g}s"))
    parts.append("keys written in the window: " + (", ".join(f"{k} {v}" for k, v in idle["writes"].items()) or "none"))
    return "; ".join(parts)


def trial_cell(phases: list[Phase], key: str) -> str:
    if not phases:
        return "-"
    values = [p.times.get(key) for p in phases]
    got = [v for v in values if v is not None]
    text = (f"{min(got):.2f} / {statistics.median(got):.2f} / {max(got):.2f} ({len(got)})" if len(got) > 1
            else f"{got[0]:.2f}" if got else "")
    missing = len(values) - len(got)
    if missing:
        text += ("; " if text else "") + f"{missing} not done after {phases[0].timeout:g}s"
    return text


def scale_table(results: list[ScaleResult], trials: int, ttl: int, idle: float, startsecs: Optional[int],
                code: str, fallback: str = "spread") -> str:
    etcd_version = "etcd " + subprocess.run(["etcd", "--version"], capture_output=True,
                                            text=True).stdout.split("\n")[0].rsplit(" ", 1)[-1]
    lines = [f"etcdha scale benchmark, {time.strftime('%Y-%m-%d')}, {platform.node()}, {platform.machine()}, "
             f"{os.cpu_count()} cores, 3 nodes, lease_ttl {ttl}s, {etcd_version} with default settings",
             f"code: {code}",
             "programs: `sleep 1000000` through etcdha's launcher, every other one with a VIP on eth0 "
             f"(198.18.1-3.x/24), startsecs {1 if startsecs is None else startsecs}"
             + (" (so RUNNING comes >= 1 s after a start)" if startsecs in (None, 1) else ""),
             "second choices: " + ("every service's the node after its preferred one (a fault moves the victim's "
                                   "third to one survivor)" if fallback == "next" else
                                   "alternating between the two other nodes (a fault moves the victim's third half to "
                                   "each survivor; every fault trial starts from a cold start)"),
             "seconds from the fault (cold start: from starting the agents; drain: from launching "
             "`etcdha drain --wait`, Python start-up included)",
             "as seen by a watch on the cluster's keys (owner, and the program state in the owner's node key, as "
             "`etcdha status` shows them), at the time etcd's event reached the client namespace;",
             f"faults hit the node owning about N/3; trials as min / median / max (count), {trials} per fault", ""]
    header = [""] + [f"N={r.n}" for r in results]
    rows: list[list[str]] = []

    def row(label: str, cells: list[str]) -> None:
        rows.append([label, *cells])

    def moved(phases: list[Phase]) -> str:
        return "/".join(str(p.moved) for p in phases) or "-"

    row("services with a VIP", [str(r.vips) for r in results])
    row("cold start: all owned", [trial_cell(r.colds, "owned") for r in results])
    row("cold start: all RUNNING", [trial_cell(r.colds, "running")
                                    for r in results])
    row("services per node after it", ["/".join(str(v) for v in r.spread.values()) or "-" for r in results])
    for scenario, title in (("agent-kill-9", "agent kill -9"), ("node-crash", "whole-node crash")):
        row(f"{title}: services moved", [moved(r.trials[scenario]) for r in results])
        row("  all owned elsewhere", [trial_cell(r.trials[scenario], "owned") for r in results])
        row("  all RUNNING elsewhere", [trial_cell(r.trials[scenario], "running") for r in results])
    row("drain: services moved", [str(r.drain.moved) if r.drain else "-" for r in results])
    for key, label in (("nothing", "  node owns nothing"), ("running", "  all RUNNING elsewhere"),
                       ("cli", "  `drain --wait` returned")):
        row(label, [seconds(r.drain.times.get(key), r.drain.timeout) if r.drain else "-" for r in results])

    def per_node(r: ScaleResult, what: str, kind: str, scale: float, form: str) -> str:
        if not r.idle:
            return "-"
        values = [v for (n, k), v in r.idle[what].items() if k == kind]
        return "/".join(form.format(v * scale) if v is not None else "-" for v in values)

    row(f"idle ~{idle:g}s, per node n1/n2/n3:", ["" for _ in results])
    row("  agent RSS MiB", [per_node(r, "rss", "agent", 1 / 1024, "{:.0f}") for r in results])
    row("  fence RSS MiB", [per_node(r, "rss", "fence", 1 / 1024, "{:.0f}") for r in results])
    row("  supervisord RSS MiB", [per_node(r, "rss", "supervisord", 1 / 1024, "{:.0f}") for r in results])
    row("  agent CPU %", [per_node(r, "cpu", "agent", 1, "{:.1f}") for r in results])
    row("  fence CPU %", [per_node(r, "cpu", "fence", 1, "{:.1f}") for r in results])
    row("  supervisord CPU %", [per_node(r, "cpu", "supervisord", 1, "{:.1f}") for r in results])
    row("  eth0 bytes/s (all etcd)", ["/".join(f"{v:.0f}" if v is not None else "-" for v in r.idle["bytes"].values())
                                      if r.idle else "-" for r in results])
    row("  etcd requests/s per node, avg", [f"{r.idle['requests']:.1f}" if r.idle else "-" for r in results])
    row("two-copy samples", [f"{r.violations} of {r.samples}" for r in results])
    row("  sample every (cost)", [f"{r.sample_period:.2f}s ({r.sample_cost * 1000:.0f} ms)" if r.samples else "-"
                                  for r in results])
    row("  lab.Sampler would cost", [f"{r.plain_sample_cost:.2f}s a sample" if r.plain_sample_cost else "-"
                                     for r in results])
    row("watch feed CPU % of a core", [f"{r.feed_cpu * 100:.1f}" if r.feed_cpu else "-" for r in results])
    row("fence handoffs (agent kills)", [str(sum(r.handoffs.values())) for r in results])
    row("load average at phase starts", [f"{min(r.load):.1f}-{max(r.load):.1f}" if r.load else "-" for r in results])
    row("other etcdha labs meanwhile", [str(len(r.others)) for r in results])
    row("problems (see below)", [str(len(r.problems)) for r in results])
    widths = [max(len(x[i]) for x in [header, *rows]) for i in range(len(header))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(x, widths)).rstrip() for x in [header, *rows]]
    lines += ["etcd requests = gRPC messages etcd received (unary calls, keepalives and watch requests), all nodes, "
              "divided by 3;", "eth0 bytes = received + sent on the node's only link (etcd is all it talks to when idle)"]
    for r in results:
        if r.idle:
            top = ", ".join(f"{m} {v:.1f}" for m, v in list(r.idle["methods"].items())[:6])
            lines.append(f"N={r.n}: etcd messages/s by method, all nodes: {top}")
            writes = ", ".join(f"{k} {v}" for k, v in r.idle["writes"].items()) or "none"
            waited = (f"opened {r.idle['settled']:.0f}s after etcd's last write" if r.idle["settled"] >= 0
                      else f"opened with etcd writes still coming after {WRITE_SETTLE_LIMIT:g}s")
            lines.append(f"N={r.n}: idle window {waited}; keys written in it: {writes}")
    for r in results:
        if r.others:
            lines.append(f"N={r.n}: CPU shared with other etcdha labs running meanwhile ({', '.join(sorted(r.others))}):"
                         " its times are not those of an idle machine")
        for p in r.problems:
            lines.append(f"N={r.n} problem: {p}")
        for phase in r.colds + r.trials["agent-kill-9"] + r.trials["node-crash"] + \
                ([r.drain] if r.drain else []):
            if phase.note:
                lines.append(f"N={r.n} {phase.victim or 'cold start'}: {phase.note}")
        for v in r.violation_lines[:20]:
            lines.append(f"N={r.n} two copies: {v}")
        for e in r.evidence:
            lines.append(f"N={r.n} log excerpt: {e}")
        lines.append(f"N={r.n} logs: {r.workdir}")
    return "\n".join(lines)


def snapshot_code() -> tuple[Path, str]:
    """Copy etcdha/ as it is now and put the copy first on every child's PYTHONPATH.

    The package is installed editable and may be edited while the benchmark runs; agents
    restarted between trials would otherwise run other code than the ones started before.
    Returns the copy's directory and a description of what was copied.
    """
    import compileall
    import hashlib
    import shutil
    import tempfile

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(L.REPO), *args], capture_output=True, text=True).stdout

    head = git("log", "-1", "--format=%h %ad", "--date=format:%Y-%m-%d %H:%M").strip()
    changed = [line[3:].removeprefix("etcdha/") for line in git("status", "--porcelain", "--", "etcdha").splitlines()]
    dest = Path(tempfile.mkdtemp(prefix="etcdha-bench-code-"))
    shutil.copytree(L.REPO / "etcdha", dest / "etcdha", ignore=shutil.ignore_patterns("__pycache__"))
    # byte-compiled, as pip installs it: without it every agent (PYTHONDONTWRITEBYTECODE may be set) compiled
    # the whole package at each start, a second of CPU at a cold start when three start at once
    compileall.compile_dir(str(dest / "etcdha"), quiet=1)
    digest = hashlib.sha1()
    for path in sorted((dest / "etcdha").rglob("*.py")):
        digest.update(path.name.encode() + path.read_bytes())
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(dest), os.environ.get("PYTHONPATH")]))
    os.chdir(dest)  # `python -m etcdha` puts its working directory first on sys.path: it must not be the checkout
    text = f"{head}" + (f" plus uncommitted changes to {', '.join(changed)}" if changed else "")
    return dest, f"{text} (etcdha/*.py sha1 {digest.hexdigest()[:10]}, copied when the benchmark started)"


CODE_DIR: Optional[Path] = None


def scale_main(counts: list[int], trials: int, ttl: int, idle: float, phase_timeout: Optional[float],
               startsecs: Optional[int], fallback: str = "spread") -> int:
    global CODE_DIR
    import shutil

    cwd = os.getcwd()
    CODE_DIR, code = snapshot_code()
    try:
        return scale_all(counts, trials, ttl, idle, phase_timeout, startsecs, code, fallback)
    finally:
        os.chdir(cwd)
        shutil.rmtree(CODE_DIR, ignore_errors=True)


def scale_all(counts: list[int], trials: int, ttl: int, idle: float, phase_timeout: Optional[float],
              startsecs: Optional[int], code: str, fallback: str = "spread") -> int:
    results = []
    for n in counts:
        timeout = phase_timeout or 60 + n / 2
        try:
            results.append(scale_run(n, trials, ttl, idle, timeout, startsecs, fallback))
        except Exception as exc:  # noqa: BLE001 - e.g. the lab could not be built: report it, go on
            results.append(ScaleResult(n=n, problems=[f"no run: {type(exc).__name__}: {exc}"]))
    print()
    print(scale_table(results, trials, ttl, idle, startsecs, code, fallback))
    return 1 if any(r.violations for r in results) else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=None, help="trials per scenario (default 20; 3 with --services)")
    parser.add_argument("--ttl", type=int, default=2, help="lease_ttl in seconds (default 2)")
    parser.add_argument("--scenarios", default=",".join(SCENARIOS), help="comma-separated: " + ", ".join(SCENARIOS))
    parser.add_argument("--services", metavar="N[,N...]",
                        help="scale mode: for each N (e.g. 10,100,500), a fresh cluster with N services; prints cold "
                             "start, agent kill -9, node crash, drain and idle cost (the scenarios above are not run)")
    parser.add_argument("--colocated-timing", metavar="HB/EL[/KA]",
                        default=f"{ColocatedTiming.heartbeat}/{ColocatedTiming.election}/{ColocatedTiming.keepalive:g}",
                        help="colocated-crash: etcd --heartbeat-interval and --election-timeout in ms and the agents' "
                             "keepalive_interval in s (default %(default)s, deploy/etcd-colocated.example)")
    parser.add_argument("--idle", type=float, default=25.0, help="scale mode: idle window in seconds (default 25)")
    parser.add_argument("--phase-timeout", type=float, default=None,
                        help="scale mode: seconds each phase may take before it is reported as not done "
                             "(default 60 + N/2)")
    parser.add_argument("--fallback", choices=("spread", "next"), default="spread",
                        help="scale mode: each service's second choice alternates between the two other nodes "
                             "(spread, the default) or is always the next node (next: a fault moves a node's whole "
                             "third to one survivor)")
    parser.add_argument("--startsecs", type=int, default=None,
                        help="scale mode: startsecs of every program (default: etcdha's default, 1 s, so RUNNING "
                             "comes at least 1 s after the start)")
    args = parser.parse_args()
    if args.services is not None:
        try:
            counts = [int(x) for x in args.services.split(",") if x.strip()]
        except ValueError:
            counts = []
        if not counts or min(counts) < 1 or max(counts) > 5000:
            parser.error(f"--services: expected comma-separated counts of 1-5000, got {args.services!r}")
        return scale_main(counts, 3 if args.trials is None else args.trials, args.ttl, args.idle,
                          args.phase_timeout, args.startsecs, args.fallback)
    if args.trials is None:
        args.trials = 20
    scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    for s in scenarios:
        if s not in SCENARIOS:
            parser.error(f"--scenarios: unknown scenario {s!r}; expected some of {', '.join(SCENARIOS)}")
    try:
        timing = ColocatedTiming.parse(args.colocated_timing)
    except ValueError:
        parser.error(f"--colocated-timing: expected HEARTBEAT_MS/ELECTION_MS[/KEEPALIVE_S], got {args.colocated_timing!r}")
    colocated = [s for s in scenarios if SCENARIOS[s] == "colocated"]
    hangs = [s for s in scenarios if SCENARIOS[s] == "health"]
    scenarios = [s for s in scenarios if s not in colocated and s not in hangs]
    results: dict[str, tuple[list[float], list[float]]] = {s: ([], []) for s in scenarios}
    violations: list[str] = []
    if scenarios:
        violations = shared_lab(scenarios, args.trials, args.ttl, results)
    colo = colocated_crash(args.trials, args.ttl, timing) if colocated else None
    health = health_lab(hangs, args.trials, args.ttl) if hangs else None
    if scenarios:
        print(f"\netcdha failover benchmark, {time.strftime('%Y-%m-%d')}, {platform.node()}, "
              f"{platform.machine()}, {L.os.cpu_count()} cores, lease_ttl {args.ttl}s, etcd default settings")
        print("seconds from fault (or from launching `etcdha move`, Python start-up included) to the first answer\n"
              "on the VIP from another node (takeover), and the longest window without any answer (gap):")
        for name in scenarios:
            print(summary(f"{name} takeover", results[name][0]))
            print(summary(f"{name} gap", results[name][1]))
        print(f"invariant samples with two copies: {len(violations)}")
        for v in violations:
            print("  ", v)
    if colo is not None:
        print(f"\netcdha colocated-etcd benchmark, {time.strftime('%Y-%m-%d')}, {platform.node()}, "
              f"{platform.machine()}, {L.os.cpu_count()} cores, lease_ttl {args.ttl}s, one etcd member per node "
              f"({timing})" + (f", load average {min(colo.load):.1f}-{max(colo.load):.1f}" if colo.load else ""))
        print("crash of the node that is both the owner and the etcd leader (every process in it, its etcd member\n"
              "included); seconds from the crash to the first answer on the VIP from another node:")
        print(summary("colocated-crash takeover", colo.takeover))
        print(summary("colocated-crash gap", colo.gap))
        print(f"surviving nodes that fenced themselves or lost their lease: {len(colo.fenced)} "
              f"(in {len({f.split(':')[0] for f in colo.fenced})} of {len(colo.takeover)} trials)")
        for line in colo.fenced:
            print("  ", line)
        print(f"invariant samples with two copies: {len(colo.violations)} of {colo.samples}")
        for v in colo.violations:
            print("  ", v)
        print(f"logs: {colo.workdir}")
    if health is not None:
        c = HEALTH_CHECK
        target = c["interval"] * c["failure_threshold"] + 1
        print(f"\netcdha health-check benchmark, {time.strftime('%Y-%m-%d')}, {platform.node()}, "
              f"{platform.machine()}, {L.os.cpu_count()} cores, lease_ttl {args.ttl}s"
              + (f", load average {min(health.load):.1f}-{max(health.load):.1f}" if health.load else ""))
        print(f"web's program SIGSTOPped (it keeps its socket, answers nothing); its check: http every "
              f"{c['interval']:g}s, timeout {c['timeout']:g}s, failure_threshold {c['failure_threshold']};\n"
              f"seconds from the hang to the first answer on the VIP from the restarted copy (max_restarts 100) or "
              f"from another node (max_restarts 0); target for a restart: interval x failure_threshold + 1 = "
              f"{target:g}s:")
        for name, times in health.times.items():
            print(summary(f"{name} answer", times))
        print(f"invariant samples with two copies: {len(health.violations)} of {health.samples}")
        for v in health.violations:
            print("  ", v)
    return 1 if violations or (colo and (colo.violations or colo.fenced)) or (health and health.violations) else 0


def shared_lab(scenarios: list[str], trials: int, ttl: int,
               results: dict[str, tuple[list[float], list[float]]]) -> list[str]:
    """Every scenario but colocated-crash, one after the other on one cluster with a separate etcd;
    fills `results`, returns the two-copy samples."""
    with L.Lab() as lab:
        etcd = L.Etcd(lab)
        cluster = L.Cluster(lab, etcd, "/bench", {"lease_ttl": ttl})
        probe = None
        try:
            etcd.start()
            with L.Sampler(lab, interval=0.05) as sampler:
                cluster.start()
                probe = L.Probe(lab, duration=7200)
                for name in scenarios:
                    for i in range(trials):
                        took, gap = trial(cluster, sampler, probe, SCENARIOS[name], ttl)
                        results[name][0].append(took)
                        results[name][1].append(gap)
                        print(f"{name} trial {i + 1}/{trials}: takeover {took:.3f}s, gap {gap:.3f}s", flush=True)
                return list(sampler.violations)
        finally:
            if probe:
                probe.stop()
            cluster.stop()
            etcd.stop()


if __name__ == "__main__":
    sys.exit(watch_status(sys.argv[2:]) if sys.argv[1:2] == ["watch-status"] else main())
