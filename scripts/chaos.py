#!/usr/bin/env python3
"""Chaos run: random faults against a 3-node cluster running 3 services, checked for safety and liveness.

The cluster: agents n1..n3 (lease_ttl 2 s, failure_cooldown 10 s), each able to run
    web   on 198.18.0.100:8080   a well-behaved program
    api   on 198.18.0.101:8081   --orphan: leaves a detached helper that only its cgroup holds
    jobs  on 198.18.0.102:8082   --child-ignores-term: a child that survives SIGTERM
so every stop has to deal with processes supervisord does not know about.

Faults, one every 2-6 s; kind, node, service and durations are drawn from a seeded RNG:
    agent-kill        kill -9 of the agent; started again 0.5-5 s later (as systemd's Restart= would)
    agent-stop        SIGSTOP of the agent; SIGCONT 0.5-5 s later
    link-cut          the node's route to etcd blackholed; healed 1-6 s later
    fence-kill        kill -9 of the agent's fence process
    supervisord-kill  kill -9 of the agent's supervisord
    program-crash     kill -9 of a service's program where it runs (now and then another process of it)
    stray             a daemonizing program: a detached process (setsid, double fork, SIGTERM ignored)
                      left in the cgroup of a service where it runs, unknown to supervisord
    etcd-restart      etcd stopped and started again (at most one per ETCD_SPACING s)

At most one node is disturbed at a time: a node fault (the first five kinds) starts only when
no other node fault is in progress or ended less than RECOVER s ago, no etcd restart ended less
than RECOVER s ago, and status shows every node alive. Program crashes, strays and etcd restarts
come at any time. So two nodes can always run every service, except while etcd restarts. At the
end every fault is healed (agents started, SIGCONT, links restored) and within FINAL_TIMEOUT s
every service must be owned and answer on its VIP from its owner, and every node be alive.

Checks; any failure fails the run:
  (a) no two copies: the Sampler (every node's VIPs, and every process of a service found by its
      --name= marker or its cgroup) never sees a service on two nodes at once;
  (b) nothing stuck: no service is unowned for longer than lease_ttl + 5 s while a healthy
      candidate exists. Ownership comes from `etcdha status --json`, polled every POLL_INTERVAL s
      (in one process, see poll_status). Node N is a healthy candidate for service S at time t when
        - etcd is up and was not being restarted within ETCD_SETTLE s before t (a lease that
          could not be revoked while etcd was down lives on for lease_ttl + an election after);
        - no fault injected on N is in progress at t or ended within SETTLE s before t (an
          instant fault such as a fence kill ends when it is injected);
        - status shows N alive, with a lease first seen at least startup_grace (= lease_ttl) s
          before t (a rejoined agent claims nothing earlier);
        - status does not list N in S's cooling_down.
      Counted are continuous stretches in which S had no owner and some node was a healthy
      candidate at every point (a 0.1 s grid); a failed poll ends a stretch.
      Likewise S must not stay owned by a node that is up (the first two conditions, and alive)
      while nobody answers on S's VIP (no probe answer within SILENCE s) for lease_ttl + 5 s:
      an owner that never starts its service is as stuck as no owner at all.
  (c) at the end: every service owned and answering, every node alive (FINAL_TIMEOUT s);
  (d) no agent exits by itself (it is started again, as systemd would, and reported);
  (e) no Python traceback in any agent's log.

The seed fixes the choices (kinds, targets, delays); the timeline also depends on timing, so a
replay repeats the choices, not necessarily the exact interleaving.

Usage: scripts/chaos [--seconds 180] [--seed N]     (exit 1 on any failed check)
"""
from __future__ import annotations

import argparse
import bisect
import collections
import contextlib
import json
import math
import os
import random
import re
import select
import signal
import subprocess
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import lab as L

NAMES = ("web", "api", "jobs")
FLAGS = {"web": (), "api": ("--orphan",), "jobs": ("--child-ignores-term",)}
TTL = 2
COOLDOWN = 10.0
ALLOWED_UNOWNED = TTL + 5.0   # (b): longest stretch unowned while a healthy candidate exists
SETTLE = 2.0                  # a node counts as healthy only this long after its last fault
ETCD_SETTLE = TTL + 1.5       # ... and this long after etcd answered again (old leases live on meanwhile)
RECOVER = TTL + 3.0           # no new node fault until this long after the last one ended
ETCD_SPACING = 15.0
FAULT_GAP = (2.0, 6.0)
RESTART_DELAY = (0.5, 5.0)
STOP_DELAY = (0.5, 5.0)
CUT_DELAY = (1.0, 6.0)
FINAL_TIMEOUT = 30.0
SETUP_TIMEOUT = 60.0
GRID = 0.1
POLL_INTERVAL = 0.25
SILENCE = 1.0                 # a VIP with no answer for this long counts as not answering
SAMPLE_INTERVAL = 0.02
PROBE_INTERVAL = 0.05
NODE_KINDS = ("agent-kill", "agent-stop", "link-cut", "fence-kill", "supervisord-kill")
WEIGHTS = {"agent-kill": 1.0, "agent-stop": 1.0, "link-cut": 1.0, "fence-kill": 1.0, "supervisord-kill": 1.0,
           "program-crash": 1.5, "stray": 1.0, "etcd-restart": 0.5}
LOG_TIME = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3}) ")


def services() -> dict:
    """web, api, jobs on VIPs .100-.102 and ports 8080-8082; api leaves an orphan, jobs a SIGTERM-proof child."""
    found = L.services(*NAMES)
    for i, name in enumerate(NAMES):
        found[name]["command"] = L.sample_service_command(name, L.PORT + i, *FLAGS[name])
    return found


def settings() -> dict:
    return {"lease_ttl": TTL, "failure_cooldown": COOLDOWN, "services": services()}


def seed_from_env() -> int:
    """ETCDHA_CHAOS_SEED if set (to replay a run), else a fresh random seed."""
    value = os.environ.get("ETCDHA_CHAOS_SEED", "").strip()
    return int(value) if value else random.SystemRandom().randrange(1, 10 ** 9)


def seconds_from_env(default: float = 180.0) -> float:
    value = os.environ.get("ETCDHA_CHAOS_SECONDS", "").strip()
    return float(value) if value else default


@dataclass
class Event:
    t: float       # monotonic
    kind: str
    target: str
    detail: str = ""


class StatusFeed:
    """`etcdha status --json` every POLL_INTERVAL s, from the client namespace, in one long-lived process.

    The poller (this script's `poll-status` mode) calls the CLI in-process, so a poll costs no
    Python start-up. `docs` holds (monotonic time the poll finished, document), or (time, None)
    when a poll failed (etcd down); `errors` counts those.
    """

    def __init__(self, cluster: L.Cluster, duration: float):
        self.cluster = cluster
        self.docs: list[tuple[float, Optional[dict]]] = []
        self.errors = 0
        self.last_error = ""
        endpoints = ",".join(f"http://{cluster.lab.etcd_ip(r)}:2379" for r in cluster.lab.etcd_roles)
        self.proc = cluster.lab.popen("cl", [sys.executable, str(Path(__file__).resolve()), "poll-status", endpoints,
                                             cluster.prefix, str(POLL_INTERVAL), str(duration)],
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            with contextlib.suppress(ValueError, KeyError):
                poll = json.loads(line)
                self.docs.append((poll["t"], poll.get("doc")))
                if poll.get("doc") is None:
                    self.errors += 1
                    self.last_error = poll.get("error", "")

    def latest(self) -> Optional[dict]:
        return self.docs[-1][1] if self.docs else None

    def stop(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._thread.join(5)


def poll_status(argv: list[str]) -> int:
    """`chaos.py poll-status ENDPOINTS PREFIX INTERVAL DURATION`: the StatusFeed's poller.

    Runs `etcdha --endpoints E --prefix P status --json` in-process every INTERVAL s and prints
    one JSON line per poll, {"t": MONOTONIC, "doc": STATUS} or {"t": MONOTONIC, "error": WHY}.
    Bounded: stops after DURATION s or when its stdin closes.
    """
    import io

    from etcdha import cli  # the command line itself, with its own arguments: the stable interface

    endpoints, prefix, interval, duration = argv[0], argv[1], float(argv[2]), float(argv[3])
    args = ["--endpoints", endpoints, "--prefix", prefix, "--timeout", "2", "status", "--json"]
    end = time.monotonic() + duration
    while time.monotonic() < end:
        started = time.monotonic()
        out = io.StringIO()
        try:
            with contextlib.redirect_stdout(out):
                cli.main(args, prog_name="etcdha", standalone_mode=False)
            line = {"t": time.monotonic(), "doc": json.loads(out.getvalue())}
        except Exception as exc:  # noqa: BLE001 - a ClickException (etcd unreachable) or anything: status unknown
            line = {"t": time.monotonic(), "error": f"{type(exc).__name__}: {exc}"}
        print(json.dumps(line), flush=True)
        rest = interval - (time.monotonic() - started)
        if select.select([sys.stdin], [], [], max(0.0, rest))[0] and not sys.stdin.read(1):
            return 0
    return 0


@dataclass
class Stretch:
    length: float = 0.0
    start: float = 0.0
    end: float = 0.0
    candidates: tuple[str, ...] = ()


@dataclass
class Report:
    seed: int
    seconds: float
    faults: collections.Counter = field(default_factory=collections.Counter)
    skipped: collections.Counter = field(default_factory=collections.Counter)
    timeline: list[str] = field(default_factory=list)
    takeovers: dict[str, int] = field(default_factory=dict)
    claims: dict[str, int] = field(default_factory=dict)
    unowned: dict[str, Stretch] = field(default_factory=dict)       # longest, by status
    stuck: dict[str, Stretch] = field(default_factory=dict)         # longest unowned with a healthy candidate
    silent: dict[str, Stretch] = field(default_factory=dict)        # longest owned by a healthy node, no answer
    probe_gap: dict[str, tuple[float, float]] = field(default_factory=dict)  # longest with no answer: (length, start)
    samples: int = 0
    violations: list[str] = field(default_factory=list)             # two copies (Sampler)
    problems: list[str] = field(default_factory=list)               # everything else that fails the run
    converged_after: Optional[float] = None
    status_docs: int = 0
    status_errors: int = 0
    status_last_error: str = ""
    evidence: list[str] = field(default_factory=list)               # agent log lines around failures
    feed_file: Optional[Path] = None                                 # the status feed, one line per document

    @property
    def ok(self) -> bool:
        return not self.violations and not self.problems

    def text(self, timeline: bool = True) -> str:
        lines = [f"etcdha chaos: seed {self.seed} (replay: ETCDHA_CHAOS_SEED={self.seed} or scripts/chaos "
                 f"--seed {self.seed}), {self.seconds:g} s of faults, lease_ttl {TTL} s, failure_cooldown "
                 f"{COOLDOWN:g} s"]
        if timeline and self.timeline:
            lines += ["fault timeline (seconds from the start of the chaos, wall clock as in the agent logs):"]
            lines += ["  " + t for t in self.timeline]
        kinds = ", ".join(f"{k} {self.faults[k]}" for k in WEIGHTS if self.faults[k])
        lines += [f"faults injected: {sum(self.faults.values())} ({kinds or 'none'})"]
        if self.skipped:
            lines += ["skipped (no target at that moment): " + ", ".join(f"{k} {n}" for k, n in self.skipped.items())]
        lines += [f"{'service':<8}{'takeovers':>10}{'claims':>8}{'unowned':>10}{'unowned+cand':>14}"
                  f"{'silent owner':>14}{'probe gap':>11}"]
        for name in NAMES:
            length = {k: getattr(self, k).get(name, Stretch()).length for k in ("unowned", "stuck", "silent")}
            gap, gap_at = self.probe_gap.get(name, (math.nan, 0.0))
            lines += [f"{name:<8}{self.takeovers.get(name, 0):>10}{self.claims.get(name, 0):>8}"
                      f"{length['unowned']:>9.1f}s{length['stuck']:>13.1f}s{length['silent']:>13.1f}s"
                      f"{gap:>10.2f}s (from +{gap_at:.1f}s)"]
        lines += ["  longest stretches: unowned (status); unowned while a healthy candidate existed; owned by a "
                  "healthy node",
                  f"  that did not answer on the VIP (the last two allowed {ALLOWED_UNOWNED:g} s); the longest time "
                  "without any answer on the VIP (probe)",
                  f"status polls: {self.status_docs} answered, {self.status_errors} failed (the last failure: "
                  f"{self.status_last_error[:160] or '-'}); one line each in {self.feed_file}",
                  f"invariant samples: {self.samples}, samples with two copies: {len(self.violations)}"]
        lines += [f"  two copies: {v}" for v in self.violations[:10]]
        if len(self.violations) > 10:
            lines += [f"  ... and {len(self.violations) - 10} more"]
        lines += [f"converged after the heal in {self.converged_after:.1f} s" if self.converged_after is not None
                  else "did not converge after the heal"]
        lines += [f"PROBLEM: {p}" for p in self.problems]
        if self.evidence:
            lines += ["agent log lines around the failures:"] + ["  " + e for e in self.evidence]
        lines += ["result: " + ("PASS" if self.ok else "FAIL")]
        return "\n".join(lines)


class Chaos:
    def __init__(self, lab: L.Lab, cluster: L.Cluster, seconds: float, seed: int,
                 say: Callable[[str], None] = lambda s: print(s, flush=True)):
        self.lab, self.cluster = lab, cluster
        self.nodes = cluster.nodes
        self.seconds, self.seed = seconds, seed
        self.rng = random.Random(seed)
        self.say = say
        self.vips = {name: s["vip"].split("/")[0] for name, s in services().items()}
        self.events: list[Event] = []
        self.faults: collections.Counter = collections.Counter()
        self.skipped: collections.Counter = collections.Counter()
        self.node_faults: dict[str, list[list]] = {n: [] for n in self.nodes}  # [start, end or None]
        self.etcd_down: list[list] = []
        self.pending: list[tuple[float, Callable[[], None]]] = []
        self.killed: set[str] = set()  # agents we killed and have not started again yet
        self.problems: list[str] = []
        self.problem_times: list[float] = []
        self.t0 = self.wall0 = self.t_chaos_end = self.t_end = 0.0
        self.converged_after: Optional[float] = None
        self.probes: dict[str, L.Probe] = {}
        self.sampler = L.Sampler(lab, interval=SAMPLE_INTERVAL, services=self.vips)
        self.feed: Optional[StatusFeed] = None

    # ---- the run --------------------------------------------------------------------------------

    def run(self) -> Report:
        """Start the cluster, settle, inject faults for `seconds`, heal, check; the report (also on failure)."""
        self.say(f"chaos: seed {self.seed}, {self.seconds:g} s (replay with ETCDHA_CHAOS_SEED={self.seed})")
        with self.sampler:
            try:
                for i, (name, vip) in enumerate(self.vips.items()):
                    self.probes[name] = L.Probe(self.lab, interval=PROBE_INTERVAL, duration=self.seconds + 1800,
                                                url=f"http://{vip}:{L.PORT + i}/")
                self.cluster.start()
                self.feed = StatusFeed(self.cluster, self.seconds + 1800)
                began = time.monotonic()
                L.wait_until(lambda: self.why_not_converged() is None, SETUP_TIMEOUT,
                             "every service to be owned and answering on its VIP before the chaos")
                self.t0, self.wall0 = time.monotonic(), time.time()
                self.say(f"chaos: cluster up in {self.t0 - began:.1f} s; injecting faults for {self.seconds:g} s")
                self.chaos()
                self.t_chaos_end = time.monotonic()
                self.heal_all()
                self.final()
                self.t_end = time.monotonic()
            except Exception as exc:  # noqa: BLE001 - a cluster that never came up, a harness error: a report anyway
                self.problem(time.monotonic(), f"the chaos run stopped: {type(exc).__name__}: {exc}\n"
                             + traceback.format_exc())
                with contextlib.suppress(Exception):
                    self.run_due(everything=True)  # SIGCONT, links back, agents started: leave no fault behind
            finally:
                self.t_end = self.t_end or time.monotonic()
                if self.feed is not None:
                    self.feed.stop()
                for probe in self.probes.values():
                    probe.stop()
        return self.report()

    def chaos(self) -> None:
        end = self.t0 + self.seconds
        next_fault = self.t0 + self.rng.uniform(1.0, 3.0)
        while time.monotonic() < end:
            self.run_due()
            self.watch_agents()
            if time.monotonic() >= next_fault:
                kind = self.pick_kind()
                if self.inject(kind):
                    self.faults[kind] += 1
                    next_fault = time.monotonic() + self.rng.uniform(*FAULT_GAP)
                else:
                    self.skipped[kind] += 1
                    next_fault = time.monotonic() + 0.3
            time.sleep(0.05)

    def pick_kind(self) -> str:
        now = time.monotonic()
        kinds = dict(WEIGHTS)
        if not self.node_fault_allowed(now):
            for kind in NODE_KINDS:
                kinds.pop(kind)
        if any(e is None or now - e < ETCD_SPACING for _, e in self.etcd_down[-1:]):
            kinds.pop("etcd-restart")
        return self.rng.choices(list(kinds), weights=list(kinds.values()))[0]

    def node_fault_allowed(self, now: float) -> bool:
        """One node at a time: nothing in progress or recovering, etcd settled, every node alive in status."""
        for spans in [*self.node_faults.values(), self.etcd_down]:
            if any(e is None or now - e < RECOVER for _, e in spans):
                return False
        doc = self.feed.latest()
        return doc is not None and all(doc["nodes"].get(n, {}).get("alive") for n in self.nodes)

    def inject(self, kind: str) -> bool:
        """Inject one fault; False if it had no target just now (e.g. no fence to kill)."""
        if kind in NODE_KINDS:
            node = self.nodes[self.rng.choice(sorted(self.nodes))]
            return getattr(self, "fault_" + kind.replace("-", "_"))(node)
        return getattr(self, "fault_" + kind.replace("-", "_"))()

    # ---- faults ---------------------------------------------------------------------------------

    def fault_agent_kill(self, node: L.Node) -> bool:
        t, pid = time.monotonic(), node.pid
        node.signal(signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            node.proc.wait(5)
        self.killed.add(node.name)
        self.node_faults[node.name].append([t, None])
        delay = self.rng.uniform(*RESTART_DELAY)
        self.record(t, "agent-kill", node.name, f"pid {pid}; started again in {delay:.1f} s")
        self.later(delay, lambda: self.restart_agent(node))
        return True

    def restart_agent(self, node: L.Node) -> None:
        node.start()
        self.killed.discard(node.name)
        self.end_fault(node.name)
        self.record(time.monotonic(), "  agent-start", node.name, f"pid {node.pid}")

    def fault_agent_stop(self, node: L.Node) -> bool:
        t = time.monotonic()
        node.signal(signal.SIGSTOP)
        self.node_faults[node.name].append([t, None])
        delay = self.rng.uniform(*STOP_DELAY)
        self.record(t, "agent-stop", node.name, f"SIGSTOP pid {node.pid}; SIGCONT in {delay:.1f} s")

        def cont() -> None:
            with contextlib.suppress(ProcessLookupError):
                node.signal(signal.SIGCONT)
            self.end_fault(node.name)
            self.record(time.monotonic(), "  agent-cont", node.name, "SIGCONT")
        self.later(delay, cont)
        return True

    def fault_link_cut(self, node: L.Node) -> bool:
        t = time.monotonic()
        node.cut_etcd_link()
        self.node_faults[node.name].append([t, None])
        delay = self.rng.uniform(*CUT_DELAY)
        self.record(t, "link-cut", node.name, f"etcd link cut; healed in {delay:.1f} s")

        def heal() -> None:
            node.heal()
            self.end_fault(node.name)
            self.record(time.monotonic(), "  link-heal", node.name, "etcd link back")
        self.later(delay, heal)
        return True

    def _kill_helper(self, node: L.Node, kind: str, find: Callable[[], Optional[int]]) -> bool:
        pid = find()
        if not pid:
            return False
        t = time.monotonic()
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            return False
        self.node_faults[node.name].append([t, t])
        self.record(t, kind, node.name, f"pid {pid}")
        return True

    def fault_fence_kill(self, node: L.Node) -> bool:
        return self._kill_helper(node, "fence-kill", node.fence_pid)

    def fault_supervisord_kill(self, node: L.Node) -> bool:
        return self._kill_helper(node, "supervisord-kill", node.supervisord_pid)

    def running(self, service: str) -> list[L.Node]:
        return [node for node in self.nodes.values() if node.service_pids(service)]

    def fault_program_crash(self) -> bool:
        service = self.rng.choice(NAMES)
        where = self.running(service)
        if not where:
            return False
        node = self.rng.choice(where)
        main, pids = node.program_pid(service), node.service_pids(service)
        if not pids:
            return False
        pid = main if main and self.rng.random() < 0.75 else self.rng.choice(pids)
        t = time.monotonic()
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            return False
        self.record(t, "program-crash", node.name,
                    f"{service}: pid {pid} ({'its program' if pid == main else 'another of its processes'})")
        return True

    def fault_stray(self) -> bool:
        service = self.rng.choice(NAMES)
        where = self.running(service)
        if not where:
            return False
        node = self.rng.choice(where)
        t = time.monotonic()
        pid = node.inject_stray(service)
        if pid is None:
            return False
        self.record(t, "stray", node.name, f"{service}: detached pid {pid} in its cgroup, unknown to supervisord")
        return True

    def fault_etcd_restart(self) -> bool:
        t = time.monotonic()
        span = [t, None]
        self.etcd_down.append(span)
        try:
            self.lab.etcd.restart()
        finally:
            span[1] = time.monotonic()
        self.record(t, "etcd-restart", "etcd", f"answering again after {span[1] - t:.1f} s")
        return True

    # ---- bookkeeping ----------------------------------------------------------------------------

    def record(self, t: float, kind: str, target: str, detail: str = "") -> None:
        self.events.append(Event(t, kind, target, detail))

    def later(self, delay: float, heal: Callable[[], None]) -> None:
        self.pending.append((time.monotonic() + delay, heal))

    def end_fault(self, node: str) -> None:
        for span in self.node_faults[node]:
            if span[1] is None:
                span[1] = time.monotonic()

    def run_due(self, everything: bool = False) -> None:
        now = time.monotonic()
        due = sorted((p for p in self.pending if everything or p[0] <= now), key=lambda p: p[0])
        for item in due:
            self.pending.remove(item)
            item[1]()

    def heal_all(self) -> None:
        self.run_due(everything=True)
        self.record(time.monotonic(), "heal-all", "-", "every fault healed; waiting for the cluster to converge")

    def watch_agents(self) -> None:
        """An agent that exited without our kill is a failure; start it again as systemd would."""
        for node in self.nodes.values():
            if node.name not in self.killed and not node.alive():
                t = time.monotonic()
                code = node.proc.returncode if node.proc else None
                self.problem(t, f"agent {node.name} exited by itself (exit code {code}); started again")
                self.node_faults[node.name].append([t, t])
                node.start()
                self.record(t, "AGENT-EXITED", node.name, f"exit code {code}; started again")

    def problem(self, t: float, what: str) -> None:
        self.problems.append(f"+{t - self.t0:.1f}s {self.wall(t)} {what}" if self.t0 else what)
        self.problem_times.append(t)

    def wall(self, t: float) -> str:
        w = self.wall0 + (t - self.t0)
        return time.strftime("%H:%M:%S", time.localtime(w)) + f".{int(w * 1000) % 1000:03d}"

    # ---- the end --------------------------------------------------------------------------------

    def why_not_converged(self) -> Optional[str]:
        """None when every node is alive and every service is owned and answers from its owner."""
        try:
            doc = self.cluster.status()
        except (RuntimeError, subprocess.TimeoutExpired, ValueError) as exc:
            return f"status failed: {exc}"
        down = [n for n in self.nodes if not doc["nodes"].get(n, {}).get("alive") or not self.nodes[n].alive()]
        if down:
            return f"node(s) not alive: {', '.join(down)}"
        for name in NAMES:
            owner = doc["services"].get(name, {}).get("owner")
            if owner is None:
                return f"{name} has no owner"
            last = self.probes[name].last() if name in self.probes else owner
            if last != owner:
                return f"{name} is owned by {owner} but its VIP answers from {last or 'nobody'}"
        return None

    def final(self) -> None:
        began = time.monotonic()
        why = "not checked"
        while time.monotonic() - began < FINAL_TIMEOUT:
            self.watch_agents()
            why = self.why_not_converged()
            if why is None:
                self.converged_after = time.monotonic() - began
                return
            time.sleep(0.5)
        self.problem(time.monotonic(), f"not converged {FINAL_TIMEOUT:g} s after every fault was healed: {why}")

    # ---- analysis -------------------------------------------------------------------------------

    def report(self) -> Report:
        rep = Report(self.seed, self.seconds, self.faults, self.skipped)
        rep.timeline = [f"{e.t - self.t0:7.2f}s {self.wall(e.t)}  {e.kind:<17} {e.target:<5} {e.detail}"
                        for e in sorted(self.events, key=lambda e: e.t)]
        rep.samples = self.sampler.samples
        rep.violations = list(self.sampler.violations)
        rep.status_docs = sum(1 for _, d in self.docs if d is not None)
        rep.status_errors = sum(1 for _, d in self.docs if d is None)
        rep.status_last_error = self.feed.last_error if self.feed is not None else ""
        rep.converged_after = self.converged_after
        rep.problems = list(self.problems)
        end = self.t_chaos_end or self.t_end
        for name, probe in self.probes.items():
            if self.t0:
                rep.probe_gap[name] = longest_gap(list(probe.answers), self.t0, end)
        self.ownership(rep)
        self.stuck(rep)
        rep.problems += self.tracebacks()
        times = list(self.problem_times)
        times += [float(v.split()[0][2:]) for v in rep.violations[:1]]
        times += [s.start for s in [*rep.stuck.values(), *rep.silent.values()] if s.length > ALLOWED_UNOWNED]
        rep.evidence = self.log_excerpts(times)
        rep.feed_file = self.dump_feed()
        return rep

    @property
    def docs(self) -> list[tuple[float, Optional[dict]]]:
        return list(self.feed.docs) if self.feed is not None else []

    def dump_feed(self) -> Optional[Path]:
        """The status feed, one line per document (owners, cooling, nodes and leases), for evidence."""
        path = self.lab.workdir / f"chaos-feed-{self.cluster.prefix.strip('/')}.txt"
        lines = []
        for t, doc in self.docs:
            if doc is None:
                lines.append(f"{t - self.t0:8.2f}s  (status failed)")
                continue
            owners = " ".join(f"{n}={s.get('owner') or '-'}/{s.get('fencing_token') or '-'}"
                              + (f"(cooling:{','.join(s['cooling_down'])})" if s.get("cooling_down") else "")
                              for n, s in sorted(doc["services"].items()))
            nodes = " ".join(f"{n}:{i.get('lease') or '-'}" if i.get("alive") else f"{n}:DEAD"
                             for n, i in sorted(doc["nodes"].items()))
            lines.append(f"{t - self.t0:8.2f}s  {owners}  |  {nodes}")
        try:
            path.write_text("\n".join(lines) + "\n")
        except OSError:
            return None
        return path

    def ownership(self, rep: Report) -> None:
        """Takeovers (the owner became another node) and claims (a new fencing token) per service, from t0 on."""
        for name in NAMES:
            last_owner, tokens = None, set()
            rep.takeovers[name] = rep.claims[name] = 0
            for t, doc in self.docs:
                svc = doc["services"].get(name, {}) if doc is not None else {}
                owner, token = svc.get("owner"), svc.get("fencing_token")
                if owner is None:
                    continue
                if t >= self.t0 and last_owner is not None and owner != last_owner:
                    rep.takeovers[name] += 1
                if t >= self.t0 and token not in tokens:
                    rep.claims[name] += 1
                last_owner = owner
                tokens.add(token)

    def stuck(self, rep: Report) -> None:
        """(b): the longest stretches per service, and a problem for each one longer than allowed."""
        answered = {name: [t for t, who in list(probe.answers) if who is not None]
                    for name, probe in self.probes.items()}
        best = stretches(self.docs, answered, self.node_faults, self.etcd_down, self.t0, self.t_end)
        rep.unowned, rep.stuck, rep.silent = best["unowned"], best["stuck"], best["silent"]
        for name in NAMES:
            s = rep.stuck[name]
            if s.length > ALLOWED_UNOWNED:
                rep.problems.append(f"{name} had no owner for {s.length:.1f} s (+{s.start - self.t0:.1f}s "
                                    f"{self.wall(s.start)} to +{s.end - self.t0:.1f}s) while a healthy candidate "
                                    f"existed throughout (at first: {', '.join(s.candidates)}); allowed "
                                    f"{ALLOWED_UNOWNED:g} s")
            s = rep.silent[name]
            if s.length > ALLOWED_UNOWNED:
                rep.problems.append(f"{name} was owned by healthy {s.candidates[0]} but nobody answered on its VIP "
                                    f"for {s.length:.1f} s (+{s.start - self.t0:.1f}s {self.wall(s.start)} to "
                                    f"+{s.end - self.t0:.1f}s); allowed {ALLOWED_UNOWNED:g} s")

    def tracebacks(self) -> list[str]:
        found = []
        for node in self.nodes.values():
            with contextlib.suppress(OSError):
                text = node.log.read_text(errors="replace")
                count = text.count("Traceback (most recent call last)")
                if count:
                    at = text.index("Traceback (most recent call last)")
                    head = text[max(0, text.rfind("\n", 0, max(0, at - 1)) + 1):at + 1500]
                    found.append(f"{count} traceback(s) in {node.log}; the first:\n{head}")
        return found

    def log_excerpts(self, times: list[float], before: float = 4.0, after: float = 2.0,
                     limit: int = 120) -> list[str]:
        """Agent log lines (all nodes, by their timestamps) from `before` s before to `after` s after each time."""
        if not times or not self.t0:
            return []
        windows = [(self.wall0 + (t - self.t0) - before, self.wall0 + (t - self.t0) + after) for t in sorted(times)[:3]]
        picked: list[tuple[float, str]] = []
        for node in self.nodes.values():
            try:
                lines = node.log.read_text(errors="replace").splitlines()
            except OSError:
                continue
            stamp = 0.0
            for line in lines:
                m = LOG_TIME.match(line)
                if m:
                    stamp = time.mktime(time.strptime(m.group(1), "%Y-%m-%d %H:%M:%S")) + int(m.group(2)) / 1000
                if any(a <= stamp <= b for a, b in windows):
                    picked.append((stamp, f"{node.name}: {line}"))
        picked.sort(key=lambda p: p[0])
        if len(picked) > limit:
            picked = picked[:limit] + [(0, f"... {len(picked) - limit} more lines; see the agent logs")]
        return [p[1] for p in picked] + [f"logs: {', '.join(str(n.log) for n in self.nodes.values())}"]


def disturbed(spans: list[list], t: float, settle: float = SETTLE) -> bool:
    """Is a fault of `spans` ([start, end or None]) in progress at t, or did one end less than `settle` s before?"""
    return any(s <= t <= (math.inf if e is None else e) + settle for s, e in spans)


def longest_gap(answers: list[tuple[float, Optional[str]]], t0: float, t1: float) -> tuple[float, float]:
    """The longest stretch in [t0, t1] without an answer on a VIP: (length, its start relative to t0)."""
    last_ok, best = t0, (0.0, 0.0)
    for t, who in answers:
        if t0 <= t <= t1 and who is not None:
            best = max(best, (t - last_ok, last_ok - t0))
            last_ok = t
    return max(best, (t1 - last_ok, last_ok - t0))


def stretches(docs: list[tuple[float, Optional[dict]]], answered: dict[str, list[float]],
              node_faults: dict[str, list[list]], etcd_down: list[list], t0: float,
              t_end: float) -> dict[str, dict[str, Stretch]]:
    """The checker of (b), pure: per service the longest stretch (on a GRID from t0 to t_end) that it was
    "unowned" (any), "stuck" (unowned while a healthy candidate existed) and "silent" (owned by a node
    that is up, with no answer on its VIP in the last SILENCE s); see the module's docstring.

    `docs`: (time, status document or None for a failed poll), in order; `answered`: per service, the
    sorted times of probe answers; `node_faults`: per node, [start, end or None] of injected faults;
    `etcd_down`: the same for etcd.
    """
    first_seen: dict[tuple[str, str], float] = {}
    states: list[tuple[float, Optional[dict], dict[str, float]]] = []
    for t, doc in docs:
        since: dict[str, float] = {}  # node -> when its current lease was first seen
        if doc is not None:
            for node, info in doc["nodes"].items():
                if info.get("alive") and info.get("lease"):
                    since[node] = first_seen.setdefault((node, info["lease"]), t)
        states.append((t, doc, since))
    kinds = ("unowned", "stuck", "silent")
    best = {k: {name: Stretch() for name in NAMES} for k in kinds}
    runs: dict[str, dict] = {k: {name: None for name in NAMES} for k in kinds}
    i = -1
    for k in range(int((t_end - t0) / GRID) + 1 if t0 else 0):
        g = t0 + k * GRID
        while i + 1 < len(states) and states[i + 1][0] <= g:
            i += 1
        _, doc, since = states[i] if i >= 0 else (g, None, {})
        etcd_ok = not disturbed(etcd_down, g, ETCD_SETTLE)
        up = {n for n in node_faults if etcd_ok and doc is not None and doc["nodes"].get(n, {}).get("alive")
              and not disturbed(node_faults[n], g)}
        for name in NAMES:
            svc = doc["services"].get(name) if doc is not None else None
            owner = svc.get("owner") if svc is not None else None
            healthy: tuple[str, ...] = ()
            if svc is not None and owner is None:
                healthy = tuple(n for n in sorted(up) if n in since and g - since[n] >= TTL  # startup_grace
                                and n not in svc.get("cooling_down", []))
            times = answered.get(name, [])
            j = bisect.bisect_right(times, g)
            silent = owner in up and not (j and g - times[j - 1] <= SILENCE)
            extend(best["unowned"][name], runs["unowned"], name, svc is not None and owner is None, g, ())
            extend(best["stuck"][name], runs["stuck"], name, bool(healthy), g, healthy)
            extend(best["silent"][name], runs["silent"], name, silent, g, (owner,) if silent else ())
    return best


def extend(best: Stretch, open_runs: dict, name: str, on: bool, g: float, cands: tuple[str, ...]) -> None:
    """Grid point g is (`on`) or is not part of a stretch for `name`; keep the longest in `best`."""
    if not on:
        open_runs[name] = None
        return
    if open_runs[name] is None:
        open_runs[name] = (g, cands)
    start, first = open_runs[name]
    if g - start >= best.length:
        best.length, best.start, best.end, best.candidates = g - start, start, g, first


def cleanup_vips(lab: L.Lab) -> None:
    """Remove the chaos VIPs from every node (a later test must not find one left over)."""
    for node in lab.node_names:
        for name, s in services().items():
            lab.run(node, ["ip", "addr", "del", s["vip"], "dev", "eth0"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=seconds_from_env(),
                        help="how long to inject faults (default 180, or ETCDHA_CHAOS_SECONDS)")
    parser.add_argument("--seed", type=int, default=None, help="replay a run (default: ETCDHA_CHAOS_SEED or random)")
    args = parser.parse_args()
    if args.seconds <= 0:
        parser.error("--seconds must be positive")
    seed = args.seed if args.seed is not None else seed_from_env()
    with L.Lab(name="c") as lab:
        etcd = L.Etcd(lab)
        etcd.start()
        lab.etcd = etcd
        cluster = L.Cluster(lab, etcd, "/chaos", settings())
        report = None
        try:
            report = Chaos(lab, cluster, args.seconds, seed).run()
        finally:
            cluster.stop()
            cleanup_vips(lab)
            etcd.stop()
            if report is None or not report.ok:
                print(cluster.logs())
        print(report.text())
        return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(poll_status(sys.argv[2:]) if sys.argv[1:2] == ["poll-status"] else main())
