"""Health checks: probes of the services this node runs, turned into facts for `decide.plan`.

Only the owner probes, and only a program supervisord says is RUNNING, `start_grace`
after the agent started it. Probes run on a small thread pool of their own, never on
the agent's loop and never near the lease thread; each is bounded by its timeout:
a probe still running at its timeout counts as a failure then (an exec check's whole
cgroup is killed), and no second probe of the same check starts while one runs.

What comes out is facts, not actions: which services failed `failure_threshold` times
in a row since their last start (`unhealthy`), a one-word health per service for the
node key, and transitions (failing, recovered) for history. Restarting or migrating is
a decision, in `decide`.
"""
from __future__ import annotations

import enum
import fcntl
import http.client
import logging
import socket
import ssl
import struct
import subprocess
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Optional
from urllib.parse import urlparse

from etcdha import cgroup, launch
from etcdha.config import Check, Service

log = logging.getLogger(__name__)

BODY_BYTES = 64 * 1024  # of an http answer read for expect_body
OUTPUT_CHARS = 300      # of a probe's output kept (history, status)
WORKERS = 16            # probes running at once on one node
CHECKS_DIR = "_checks"  # under the services cgroup: the fence's kill reaches exec checks too
NODE = "_node"  # the pseudo-service carrying the node checks (no service name starts with '_')
SIOCGIFFLAGS, IFF_UP, IFF_RUNNING = 0x8913, 0x1, 0x40


@dataclass(frozen=True)
class Outcome:
    ok: bool
    output: str


class Health(enum.Enum):
    PENDING = "pending"   # in its start grace, or not yet enough results
    PASSING = "passing"
    FAILING = "failing"   # failure_threshold failures in a row since the last start


@dataclass
class CheckState:
    """Consecutive results of one check since the service's last start (pure: no I/O, no clock)."""

    check: Check
    health: Health = Health.PENDING
    failures: int = 0   # in a row
    successes: int = 0  # in a row
    output: str = ""

    def record(self, outcome: Outcome) -> Optional[Health]:
        """Count one result; the new health if this result changed it, else None."""
        self.output = outcome.output
        if outcome.ok:
            self.failures, self.successes = 0, self.successes + 1
            if self.health is not Health.PASSING and self.successes >= self.check.success_threshold:
                self.health = Health.PASSING
                return self.health
        else:
            self.failures, self.successes = self.failures + 1, 0
            if self.health is not Health.FAILING and self.failures >= self.check.failure_threshold:
                self.health = Health.FAILING
                return self.health
        return None


# ---- probes (I/O) ---------------------------------------------------------------------------------

def _clip(text: str) -> str:
    text = " ".join(text.split())  # one line
    return text if len(text) <= OUTPUT_CHARS else text[:OUTPUT_CHARS - 3] + "..."


def probe_http(check: Check) -> Outcome:
    """GET the URL: the expected status (or any 2xx/3xx) and, if given, the text in the body.

    https is not verified (like Kubernetes' httpGet probes): a check asks "does it answer",
    and a service's certificate is usually for its public name, not 127.0.0.1.
    """
    url = urlparse(check.target)
    port = url.port or (443 if url.scheme == "https" else 80)
    if url.scheme == "https":
        context = ssl.create_default_context()
        context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
        conn: http.client.HTTPConnection = http.client.HTTPSConnection(url.hostname, port, timeout=check.timeout,
                                                                       context=context)
    else:
        conn = http.client.HTTPConnection(url.hostname, port, timeout=check.timeout)
    try:
        conn.request("GET", (url.path or "/") + (f"?{url.query}" if url.query else ""),
                     headers={"User-Agent": "etcdha-check", "Connection": "close"})
        resp = conn.getresponse()
        body = resp.read(BODY_BYTES).decode("utf-8", "replace")
    except (OSError, http.client.HTTPException) as exc:
        return Outcome(False, _clip(f"GET {check.target}: {exc or type(exc).__name__}"))
    finally:
        conn.close()
    status_ok = resp.status == check.expect_status if check.expect_status else 200 <= resp.status < 400
    body_ok = check.expect_body is None or check.expect_body in body
    why = "" if status_ok else (f" (expected {check.expect_status})" if check.expect_status else " (expected 2xx/3xx)")
    if status_ok and not body_ok:
        why = f" (body lacks {check.expect_body!r})"
    return Outcome(status_ok and body_ok, _clip(f"HTTP {resp.status}{why}: {body}"))


def probe_tcp(check: Check) -> Outcome:
    """A TCP connection to HOST:PORT is accepted within the timeout."""
    host, _, port = check.target.rpartition(":")
    host = host.strip("[]")
    try:
        with socket.create_connection((host, int(port)), timeout=check.timeout):
            return Outcome(True, f"connected to {check.target}")
    except OSError as exc:
        return Outcome(False, _clip(f"connect to {check.target}: {exc.strerror or exc or 'timed out'}"))


def probe_carrier(check: Check) -> Outcome:
    """The interface is up and has carrier (IFF_RUNNING: the kernel's operational state), like keepalived's
    track_interface. Read in the agent's own network namespace."""
    name = check.target
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            raw = fcntl.ioctl(sock.fileno(), SIOCGIFFLAGS, struct.pack("16sH14x", name.encode()[:15], 0))
    except OSError as exc:
        return Outcome(False, _clip(f"{name}: {exc.strerror or exc}"))
    flags = struct.unpack_from("H", raw, 16)[0]
    if not flags & IFF_UP:
        return Outcome(False, f"{name} is down")
    if not flags & IFF_RUNNING:
        return Outcome(False, f"{name} has no carrier")
    return Outcome(True, f"{name} is up with carrier")


def carrier_checks(interfaces: "list[str]") -> tuple[Check, ...]:
    """One carrier check per interface: every 0.5 s, two results in a row to change (a flap is not a move)."""
    return tuple(Check(f"carrier-{name}", "carrier", target=name, interval=0.5, timeout=0.5, failure_threshold=2,
                       success_threshold=2) for name in sorted(set(interfaces)))


def node_service(checks: "tuple[Check, ...]") -> Service:
    """The node checks as the checks of a pseudo-service, so one Prober runs them like any other."""
    return Service(name=NODE, command=("true",), checks=checks)


def probe_exec(check: Check, env: Mapping[str, str], directory: Optional[str], group: Path,
               identity: Optional[launch.Identity] = None) -> Outcome:
    """Run the command in a cgroup of its own (as the service's user); exit 0 is healthy. At the timeout,
    the whole cgroup is killed.

    Whatever the command leaves behind is killed too, so a check never accumulates processes.
    """
    argv = list(check.command)
    if identity is not None:
        argv = identity.argv(launch.setpriv_tool() or "setpriv") + ["--", *argv]
        env = {**env, **identity.environment()}
    try:
        proc = subprocess.Popen(cgroup.contained(group, argv), cwd=directory or None, env=dict(env), stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    except OSError as exc:
        return Outcome(False, _clip(f"cannot run {check.command[0]}: {exc.strerror or exc}"))
    timed_out = False
    try:
        out, _ = proc.communicate(timeout=check.timeout)
    except subprocess.TimeoutExpired:
        timed_out = proc.poll() is None  # exited, but something it started holds the output open: not a hang
        cgroup.empty(group)
        try:
            out, _ = proc.communicate(timeout=5)
        except subprocess.TimeoutExpired:  # survives SIGKILL (D state): leave it to the fence
            proc.kill()
            out = b""
    if not cgroup.empty(group):
        log.warning("check %s: processes it started survive SIGKILL in %s", check.name, group)
    text = out[-4096:].decode("utf-8", "replace").strip()
    if timed_out:
        return Outcome(False, _clip(f"timed out after {check.timeout:g}s (killed): {text}"))
    code = proc.returncode
    if code == 0:
        return Outcome(True, _clip(text or "exit 0"))
    return Outcome(False, _clip(f"exit {code}: {text}" if code > 0 else f"killed by signal {-code}: {text}"))


# ---- the prober ------------------------------------------------------------------------------------

@dataclass
class _Running:
    """One check of one started program: its counters, schedule and probe in flight."""

    state: CheckState
    generation: tuple[int, float]  # (fencing token, when the agent started it): a new start resets everything
    due: float
    future: Optional[Future] = None
    began: float = 0.0
    timed_out: bool = False  # the probe in flight was already counted as a failure


@dataclass(frozen=True)
class Recovered:
    """Every check of a service passes again after one failed: worth a line in history."""

    service: str
    check: str
    output: str
    token: int


class Prober:
    """Runs the checks of the services `track` names, on its own threads; the agent reads the facts."""

    def __init__(self, services: Mapping[str, Service], checks_dir: Path, environment: Callable[[Service, int], dict],
                 on_change: Callable[[], None] = lambda: None, clock: Callable[[], float] = time.monotonic):
        self.services = {name: s for name, s in services.items() if s.checks}
        self.checks_dir = checks_dir
        self.environment = environment
        self.on_change = on_change
        self.clock = clock
        self._lock = threading.Condition()
        self._tracked: dict[str, dict[str, _Running]] = {}  # service -> check name -> its state
        self._recovering: set[str] = set()  # a check failed since the service last passed every check
        self._transitions: list[Recovered] = []
        self._stopped = False
        self._pool = ThreadPoolExecutor(max_workers=min(WORKERS, max(1, sum(len(s.checks) for s in
                                                                          self.services.values()))),
                                        thread_name_prefix="etcdha-check")
        self._thread = threading.Thread(target=self._run, name="etcdha-prober", daemon=True)
        if self.services:
            self._thread.start()

    # ---- what the agent calls ----

    def track(self, running: Mapping[str, tuple[int, float]], owned: frozenset[str]) -> None:
        """Probe exactly these services: name -> (fencing token, monotonic time the agent started it).

        The agent passes the services it owns whose program is RUNNING, and all it owns. A new
        start (another token or time) starts the counts over, after the check's start grace;
        a service no longer owned here is forgotten.
        """
        with self._lock:
            self._recovering &= owned
            for name in list(self._tracked):
                if name not in running:
                    self._tracked.pop(name)
            for name, generation in running.items():
                service = self.services.get(name)
                if service is None:
                    continue
                first = next(iter(self._tracked.get(name, {}).values()), None)
                if first is not None and first.generation == generation:
                    continue
                self._tracked[name] = {c.name: _Running(CheckState(c), generation, generation[1] + c.start_grace)
                                       for c in service.checks}
            self._lock.notify_all()

    def restarting(self, name: str) -> None:
        """The agent restarts `name`: its results so far are void (a recovery is still reported)."""
        with self._lock:
            self._tracked.pop(name, None)

    def forget(self, name: str) -> None:
        """The agent gives `name` up here (migrated, moved, released): nothing of it is reported any more."""
        with self._lock:
            self._tracked.pop(name, None)
            self._recovering.discard(name)

    def unhealthy(self) -> dict[str, tuple[str, str]]:
        """Services with a FAILING check since their last start: name -> (check, its last output)."""
        with self._lock:
            found = {}
            for name, checks in self._tracked.items():
                failing = next((r.state for r in checks.values() if r.state.health is Health.FAILING), None)
                if failing is not None:
                    found[name] = (failing.check.name, failing.output)
            return found

    def health(self) -> dict[str, str]:
        """One word per tracked service (failing > pending > passing), for the node key and `status`."""
        with self._lock:
            found = {}
            for name, checks in self._tracked.items():
                states = {r.state.health for r in checks.values()}
                if states:
                    found[name] = next(h.value for h in (Health.FAILING, Health.PENDING, Health.PASSING)
                                       if h in states)
            return found

    def recovered(self) -> list[Recovered]:
        """Recoveries since the last call, oldest first."""
        with self._lock:
            found, self._transitions = self._transitions, []
            return found

    def stop(self) -> None:
        """No more probes; an exec check still running is killed with its cgroup (the agent is stopping)."""
        with self._lock:
            self._stopped = True
            self._tracked.clear()
            self._lock.notify_all()
        self._pool.shutdown(wait=False, cancel_futures=True)
        for group in [self.checks_dir / name for name in self.services]:
            if group.exists():
                cgroup.empty(group)

    # ---- the scheduler thread ----

    def _run(self) -> None:
        while True:
            with self._lock:
                if self._stopped:
                    return
                now = self.clock()
                wait = 1.0
                for name, checks in self._tracked.items():
                    for running in checks.values():
                        wait = min(wait, self._step(name, checks, running, now))
                self._lock.wait(max(0.01, wait))

    def _step(self, name: str, checks: dict[str, _Running], running: _Running, now: float) -> float:
        """Start a due probe, or count one past its timeout as failed; seconds until this check needs us again."""
        check = running.state.check
        if running.future is not None:
            if not running.timed_out and now - running.began >= check.timeout + 0.05:
                running.timed_out = True
                self._result(name, checks, running, Outcome(False, f"no answer within {check.timeout:g}s"))
                running.due = now + check.interval  # nothing new starts before the hung one returns
            return 0.05 if not running.timed_out else max(0.05, running.due - now)
        if now < running.due:
            return running.due - now
        running.began, running.due, running.timed_out = now, now + check.interval, False
        service = self.services[name]
        running.future = self._pool.submit(self._probe, service, check, running.generation[0])
        running.future.add_done_callback(lambda f, n=name, r=running: self._done(n, r, f))
        return check.timeout

    def _probe(self, service: Service, check: Check, token: int) -> Outcome:
        try:
            if check.kind == "http":
                return probe_http(check)
            if check.kind == "tcp":
                return probe_tcp(check)
            if check.kind == "carrier":
                return probe_carrier(check)
            try:
                identity = launch.resolve_identity(service.user, service.group)
            except LookupError as exc:
                return Outcome(False, f"cannot run as the service's user: {exc}")
            return probe_exec(check, {**self.environment(service, token), "ETCDHA_CHECK": check.name},
                              service.directory, self.checks_dir / service.name / check.name, identity)
        except Exception as exc:  # noqa: BLE001 - a probe's own bug is a failed check, never a dead prober
            log.exception("check %s of %s", check.name, service.name)
            return Outcome(False, _clip(f"check error: {type(exc).__name__}: {exc}"))

    def _done(self, name: str, running: _Running, future: Future) -> None:
        with self._lock:
            running.future = None
            checks = self._tracked.get(name)
            if checks is None or checks.get(running.state.check.name) is not running:
                return  # forgotten or restarted meanwhile: a result about an older start
            if future.cancelled():
                return
            if not running.timed_out:
                self._result(name, checks, running, future.result())
            self._lock.notify_all()

    def _result(self, name: str, checks: dict[str, _Running], running: _Running, outcome: Outcome) -> None:
        state = running.state
        changed = state.record(outcome)
        check = state.check
        if not outcome.ok:
            log.warning("check %s of %s failed (%d in a row, failure_threshold %d): %s", check.name, name,
                        state.failures, check.failure_threshold, outcome.output)
        if changed is Health.FAILING:
            self._recovering.add(name)  # the agent records the failure when it acts on it
        elif changed is Health.PASSING and name in self._recovering and all(
                r.state.health is Health.PASSING for r in checks.values()):
            self._recovering.discard(name)
            self._transitions.append(Recovered(name, check.name, outcome.output, running.generation[0]))
        if changed is not None:
            self.on_change()  # decide (failing), and the node key shows health
