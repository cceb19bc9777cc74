"""The agent's own supervisord: static program sections, launch specs, XML-RPC over a unix socket.

supervisord itself is started by the fence process (so the fence can kill it);
this module writes its config and drives it. Every program section is the same
safe line - `/bin/sh` with the path of the service's launcher script (`launch.py`) -
written once when supervisord starts, so a start is "write the script, startProcess"
(no reloadConfig) and no value of the operator's config ever passes through
supervisord's ini parser (no `%` expansion, no inline `;` comments, no injected
sections). The launcher puts the program in its service's cgroup before exec.
Starts go in multicalls of at most START_CHUNK, so one slow batch never looks
like a dead supervisord. Program states come from the answers to the agent's own
calls and from supervisord's event stream for the rest (`listener.py` -> `StateFeed`,
the two ordered by markers): a cycle costs nothing per service, and the full
getAllProcessInfo is only asked for after a gap, at start, and every RESYNC seconds.

Programs are generated with autostart=false and autorestart=false: a restarted
supervisord never starts a copy on its own, and restarting a crashed program is
the agent's decision (it must not happen while the service is paused).
Supervisor faults are mapped to outcomes in `_call` only.
"""
from __future__ import annotations

import contextlib
import http.client
import logging
import os
import resource
import shlex
import socket
import sys
import threading
import time
import xmlrpc.client
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Mapping, Optional

from etcdha import launch
from etcdha.config import Config, Service
from etcdha.errors import ActuatorError, ConfigError

log = logging.getLogger(__name__)

# supervisor.xmlrpc.Faults
BAD_NAME, NO_FILE, NOT_EXECUTABLE, FAILED = 10, 20, 21, 30
ABNORMAL_TERMINATION, SPAWN_ERROR, ALREADY_STARTED, NOT_RUNNING = 40, 50, 60, 70
SUCCESS_FAULTS = {ALREADY_STARTED, NOT_RUNNING}
LISTENER = Path(__file__).with_name("listener.py")
SPAWN = Path(__file__).with_name("spawn.py")  # supervisord's main here: it starts programs with posix_spawn
LISTENER_NAME = "_etcdha_events"  # never a service name (those start with a letter or digit)
# what the listener hears: the state changes the agent did not cause, and its markers (see StateFeed)
EVENTS = ("PROCESS_STATE_BACKOFF", "PROCESS_STATE_EXITED", "PROCESS_STATE_FATAL", "PROCESS_STATE_STOPPED",
          "PROCESS_STATE_UNKNOWN", "REMOTE_COMMUNICATION")
MARK_TYPE = "etcdha-mark"  # sendRemoteCommEvent type of our markers
MARK = "MARK"  # how the listener forwards one: "SERIAL MARK NUMBER"
OTHER = "OTHER"  # an event for nobody (another REMOTE_COMMUNICATION): "SERIAL OTHER -", counted for the serials
MARKS_KEPT = 256
RESYNC = 30.0  # seconds between full reads of every program's state, as a safety net under the events
# states supervisord leaves only on a turn of its loop (startsecs passed, a retry due, stopwaitsecs over)
PENDING = frozenset({"STARTING", "BACKOFF", "STOPPING"})
COALESCE = 0.05  # seconds of program events gathered into one wake-up of the agent
REFRESH = 0.1  # seconds between direct reads of the programs due to leave one of them (each wakes supervisord's loop)
# open files supervisord holds per running program (stdin and stdout pipes, the log file, one spare) and
# beside them; the agent holds one per service (its cgroup.events) and a few hundred of its own
FDS_PER_PROGRAM, FDS_SPARE = 4, 512
# supervisord closes every fd below minfds in each child before exec, one Python call each (at 1024,
# 167 spawns took 0.85 s instead of 0.65 s on an idle machine): it needs no more, since every fd supervisord opens is non-inheritable (PEP 446)
# and the fence starts it with close_fds. The open-files limit it would raise we raise ourselves.
MINFDS = 64
# startProcess calls per multicall: supervisord forks them one after another (about 40 a second on
# a busy 2-core machine), so a chunk answers well within the call timeout
START_CHUNK = 16


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float):
        super().__init__("localhost", timeout=timeout)
        self.path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self.path)


class _UnixTransport(xmlrpc.client.Transport):
    """XML-RPC over a unix socket with a timeout on every call (supervisor's own has none)."""

    def __init__(self, path: str, timeout: float):
        super().__init__()
        self.path, self.timeout = path, timeout

    def make_connection(self, host):  # noqa: ANN001 - xmlrpc API
        return _UnixConnection(self.path, self.timeout)


def _quote_value(value: str) -> str:
    """A value for supervisord's ini: `%` starts its own expansions."""
    return value.replace("%", "%%")


def launcher_command(spec: Path) -> list[str]:
    """How supervisord runs a service: the shell, on the launcher script the agent writes before each start."""
    return [launch.SHELL, str(spec)]


def program_section(service: Service, spec: Path, log_dir: Path) -> str:
    """The [program:x] section for one service: only names and paths etcdha controls."""
    lines = [
        f"[program:{service.name}]",
        f"command={_quote_value(shlex.join(launcher_command(spec)))}",
        "autostart=false",
        "autorestart=false",  # the agent restarts it (and does not while the service is paused)
        f"startsecs={service.startsecs}",
        f"startretries={service.startretries}",
        f"stopwaitsecs={service.stopwaitsecs}",
        "stopasgroup=true",
        "killasgroup=true",
        "redirect_stderr=true",
        f"stdout_logfile={_quote_value(str(log_dir / (service.name + '.log')))}",
        "stdout_logfile_maxbytes=1MB",
        "stdout_logfile_backups=2",
    ]
    return "\n".join(lines) + "\n"


def raise_open_files_limit(services: int) -> int:
    """Raise this process's soft RLIMIT_NOFILE (inherited by the fence and supervisord) to what `services`
    running programs need; returns the limit now in force.

    systemd gives services a soft limit of 1024: supervisord (3 fds a running program) then
    failed to spawn past about 330 programs ("too many open files"). Raises ConfigError if
    the hard limit is too low, naming the unit setting that fixes it.
    """
    need = FDS_PER_PROGRAM * services + FDS_SPARE
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < need:
        if hard != resource.RLIM_INFINITY and hard < need:
            raise ConfigError(f"{services} services need about {need} open files, and this process may open at "
                              f"most {hard} (RLIMIT_NOFILE hard limit): raise it, e.g. LimitNOFILE={need} in "
                              "etcdha.service")
        resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))
        soft = need
    return soft


def service_environment(service: Service, node: str, token: int) -> dict[str, str]:
    """What etcdha adds to a program's environment (and its exec checks'): its config's, plus who and which start."""
    env = {**service.environment, "ETCDHA_SERVICE": service.name, "ETCDHA_NODE": node,
           "ETCDHA_FENCING_TOKEN": str(token)}
    if service.vip:
        env["ETCDHA_VIP"] = str(service.vip.ip)
    return env


def launch_spec(service: Service, node: str, token: int, cgroup: Path, parent: int) -> str:
    """The launcher script for one start: argv, environment (with the fencing token), cgroup, parent."""
    env = service_environment(service, node, token)
    identity = launch.resolve_identity(service.user, service.group)  # LookupError: checked at agent start, gone since
    return launch.script(service.command, env, service.directory, cgroup, parent, launch.pdeathsig_tool(), identity)


def _pending_for(name: str, state: str, startsecs: Mapping[str, float]) -> float:
    """How long supervisord keeps a program in a PENDING state before a turn of its loop moves it on."""
    return startsecs.get(name, 1.0) if state == "STARTING" else 1.0


class StateFeed(threading.Thread):
    """Every program's supervisord state, kept from the event listener's datagrams.

    The listener hears only the changes nobody asked for (EVENTS: a program exited,
    backed off, gave up, stopped) and our own markers. What the agent causes itself -
    a start, a stop, a direct read - it learns from the answer to its own call, which
    carries a marker (MARK_TYPE, a number) as its last call: supervisord queues events
    in the order they happen, so an event about that program before the marker is older
    than the answer, and one after it newer. `note`/`refresh`/`load` take the answer
    and ignore the program's events until its marker comes. (Subscribed to every state,
    supervisord spent about a millisecond of its loop per event, two events per start:
    a fifth of its CPU in a takeover of hundreds of services.)

    `current()` is None until a full read was loaded, after a gap in the pool serial
    (a dropped datagram, supervisord restarted) and RESYNC seconds after the last
    full read; the caller then loads one with `load`.
    """

    def __init__(self, path: Path, wake: Callable[[], None]):
        super().__init__(name="etcdha-states", daemon=True)
        self.path = path
        self.wake = wake
        self.stopping = threading.Event()
        self._lock = threading.Lock()
        self._states: dict[str, str] = {}
        self._recent: dict[str, list[tuple[int, str]]] = {}  # program -> its last events (index, state)
        self._awaiting: dict[str, int] = {}  # program -> the marker after which its events are news again
        self._marks: dict[int, int] = {}  # marker -> `events` when it came (the last MARKS_KEPT)
        self._since: dict[str, float] = {}  # program -> monotonic time it was last seen to change state
        self._serial: Optional[int] = None  # pool serial of the last datagram (None: any is next)
        self._gap = 0  # `events` when a datagram was last found missing: a full read made before it is not enough
        self._synced_at: Optional[float] = None  # monotonic time of the last full read loaded
        self.events = 0  # datagrams received
        if path.exists() or path.is_symlink():
            path.unlink()
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        os.chmod(path, 0o600)
        self.sock.settimeout(0.5)

    def stop(self) -> None:
        self.stopping.set()

    def run(self) -> None:
        """Apply datagrams as they come; wake the agent once per COALESCE window, not once per event.

        A takeover of hundreds of services is two or three events each: woken for every one,
        the agent would plan back to back and take the CPU the starts need.
        """
        try:
            while not self.stopping.is_set():
                try:
                    self._receive(0.5)
                    until = time.monotonic() + COALESCE
                    with contextlib.suppress(socket.timeout):
                        while (left := until - time.monotonic()) > 0:
                            self._receive(left)
                except socket.timeout:
                    continue
                except OSError:
                    return
                self.wake()
        finally:
            self.sock.close()

    def _receive(self, timeout: float) -> None:
        """Apply one datagram; socket.timeout if none comes within `timeout` s."""
        self.sock.settimeout(timeout)
        self._apply(self.sock.recv(4096))

    def _apply(self, data: bytes) -> None:
        try:
            serial_text, state, name = data.decode(errors="replace").split(" ", 2)
            serial = int(serial_text)
            mark = int(name) if state == MARK else None
        except ValueError:
            serial, state, name, mark = -1, "", "", None
        with self._lock:
            self.events += 1
            if (self._serial is not None and serial != self._serial + 1) or not name:
                self._synced_at = None  # something was missed (or supervisord restarted): read everything
                self._gap = self.events
            self._serial = serial
            if mark is not None:
                self._marks[mark] = self.events
                if len(self._marks) > MARKS_KEPT:
                    del self._marks[min(self._marks)]
                for program in [p for p, m in self._awaiting.items() if m == mark]:
                    del self._awaiting[program]
            elif name and state != OTHER:
                recent = self._recent.setdefault(name, [])
                recent.append((self.events, state))
                del recent[:-8]
                if name not in self._awaiting:  # else older than what an answer told us: its marker comes later
                    if self._states.get(name) != state:
                        self._since[name] = time.monotonic()
                    self._states[name] = state

    def current(self, now: float) -> Optional[dict[str, str]]:
        """A copy of the states if they can be trusted now, else None."""
        with self._lock:
            if self._synced_at is None or now - self._synced_at > RESYNC:
                return None
            return dict(self._states)

    def due(self, now: float, startsecs: Mapping[str, float]) -> list[str]:
        """Programs waiting for a turn of supervisord's loop: STARTING for their startsecs, or
        BACKOFF or STOPPING for a second."""
        with self._lock:
            return [name for name, state in self._states.items()
                    if state in PENDING and now - self._since.get(name, now) >= _pending_for(name, state, startsecs)]

    def next_due(self, now: float, startsecs: Mapping[str, float]) -> Optional[float]:
        """Seconds until the next pending program is due (0 if one is), None if none is pending."""
        with self._lock:
            waits = [self._since.get(name, now) + _pending_for(name, state, startsecs) - now
                     for name, state in self._states.items() if state in PENDING]
        return max(0.0, min(waits)) if waits else None

    def load(self, states: Mapping[str, str], mark: int, now: float) -> None:
        """Take a full read, answered just before marker `mark`.

        Events that came after the marker are newer and go on top; the read is trusted unless a
        datagram went missing after the marker (one missing before it is covered by the read).
        If the marker is still on its way, every program's events are ignored until it comes.
        """
        with self._lock:
            merged = dict(states)
            at = self._marks.get(mark)
            if at is None:
                self._awaiting = {name: mark for name in merged}  # a gap found from now on clears _synced_at
            else:
                self._awaiting.clear()
                for name, recent in self._recent.items():
                    newer = [state for index, state in recent if index > at]
                    if newer:
                        merged[name] = newer[-1]
            trusted = at is None or self._gap <= at
            self._states = merged
            self._since = {name: now for name in merged}
            self._synced_at = now if trusted else None

    def note(self, name: str, state: str, mark: int) -> None:
        """What a call answered just before marker `mark` told us about `name` (a start, a stop)."""
        self.refresh({name: state}, mark, changed_only=False)

    def refresh(self, states: Mapping[str, str], mark: int, changed_only: bool = True) -> None:
        """States of a few programs, answered just before marker `mark`.

        Taken unless an event about the program came after the marker (that one is newer);
        its events until the marker are ignored (older than the answer). `changed_only`: a
        program whose state is no news keeps its due time (direct reads of due programs).
        """
        with self._lock:
            at = self._marks.get(mark)
            for name, state in states.items():
                if at is not None and any(i > at for i, _ in self._recent.get(name, ())):
                    continue
                if at is None:
                    self._awaiting[name] = mark
                if changed_only and state == self._states.get(name):
                    continue
                self._states[name] = state
                self._since[name] = time.monotonic()

    def invalidate(self) -> None:
        with self._lock:
            self._synced_at = None
            self._serial = None
            self._awaiting.clear()  # a new supervisord: the old one's markers never come


class Supervisor:
    """Drives one supervisord instance that lives under `run_dir`."""

    def __init__(self, config: Config, timeout: float = 5.0):
        self.config = config
        self.dir = config.run_dir
        self.conf = self.dir / "supervisord.conf"
        self.socket = self.dir / "supervisor.sock"
        self.programs = self.dir / "programs"
        self.logs = self.dir / "logs"
        self.events_socket = self.dir / "events.sock"
        self.timeout = timeout
        self.feed: Optional[StateFeed] = None
        self._next_refresh = 0.0
        self._startsecs = {name: float(s.startsecs) for name, s in config.services.items()}
        self._mark = 0  # the last marker number handed out (StateFeed)
        self._mark_lock = threading.Lock()

    def command(self) -> list[str]:
        """How to run supervisord in the foreground (the fence starts it): through spawn.py, which saves
        a third to a half of the CPU each start costs."""
        return [sys.executable, str(SPAWN), "-n", "-c", str(self.conf)]

    def prepare(self) -> None:
        """Write a fresh config: the main sections and one static program section per configured service.

        One file, not an include per service: supervisord reads 500 sections from one
        file in a fifth of the time it takes to open 500 includes.
        """
        for d in (self.dir, self.programs, self.logs):
            d.mkdir(parents=True, exist_ok=True, mode=0o700)
        for old in [*self.programs.glob("*.conf"), *self.programs.glob("*.json"), *self.programs.glob("*.sh")]:
            old.unlink()
        if self.socket.exists():
            self.socket.unlink()
        self.conf.write_text("\n".join([
            "[unix_http_server]",
            f"file={_quote_value(str(self.socket))}",
            "chmod=0700",
            "[supervisord]",
            "nodaemon=true",
            f"minfds={MINFDS}",
            f"logfile={_quote_value(str(self.logs / 'supervisord.log'))}",
            "logfile_maxbytes=1MB",
            f"pidfile={_quote_value(str(self.dir / 'supervisord.pid'))}",
            f"childlogdir={_quote_value(str(self.logs))}",
            "[rpcinterface:supervisor]",
            "supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface",
            f"[eventlistener:{LISTENER_NAME}]",
            f"command={_quote_value(shlex.join([sys.executable, '-I', '-S', str(LISTENER), str(self.events_socket)]))}",
            f"events={','.join(EVENTS)}",
            f"buffer_size={max(100, 4 * len(self.config.services))}",  # exits and markers queue while it spawns
            "autostart=true",
            "autorestart=true",
            "startsecs=0",
            "priority=1000",  # stopped first when supervisord exits: else its exit waits a second per program
            f"stderr_logfile={_quote_value(str(self.logs / 'listener.log'))}",
            "stderr_logfile_maxbytes=1MB",
            "",
            *(program_section(service, self.spec_path(service.name), self.logs)
              for service in self.config.services.values()),
        ]))

    def spec_path(self, service: str) -> Path:
        return self.programs / f"{service}.sh"

    def _call(self, method: str, *args, timeout: float = 0.0):
        """One XML-RPC call; supervisor faults that mean 'already so' are success (None)."""
        proxy = xmlrpc.client.ServerProxy(
            "http://localhost", transport=_UnixTransport(str(self.socket), timeout or self.timeout))
        try:
            return getattr(proxy.supervisor, method)(*args)
        except xmlrpc.client.Fault as fault:
            if fault.faultCode in SUCCESS_FAULTS:
                return None
            if fault.faultCode in (NO_FILE, NOT_EXECUTABLE):
                raise ConfigError(f"supervisord cannot run {args[0] if args else ''}: {fault.faultString}") from None
            raise ActuatorError(f"supervisord {method}{args!r}: {fault.faultString}") from None
        except (OSError, http.client.HTTPException, xmlrpc.client.ProtocolError) as exc:
            raise ActuatorError(f"supervisord at {self.socket} did not answer {method}: {exc}") from None

    def wait_ready(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                if self._call("getState")["statename"] == "RUNNING":
                    return
            except ActuatorError:
                pass
            if time.monotonic() > deadline:
                raise ActuatorError(f"supervisord did not come up on {self.socket} within {timeout:g}s")
            time.sleep(0.05)

    def listen(self, wake: Callable[[], None]) -> None:
        """Receive supervisord's state events from now on (before supervisord starts: none is missed)."""
        if self.feed is None:
            self.feed = StateFeed(self.events_socket, wake)
            self.feed.start()
        self.feed.invalidate()  # a new supervisord: its pool serials start again

    def close(self) -> None:
        if self.feed is not None:
            self.feed.stop()

    def states(self) -> dict[str, str]:
        """service -> supervisord state name, for the programs supervisord knows.

        From the event feed when it is current (programs due to change state asked about
        directly); otherwise one getAllProcessInfo, loaded into the feed (with the events
        that came in meanwhile on top).
        """
        feed, now = self.feed, time.monotonic()
        if feed is not None:
            known = feed.current(now)
            if known is not None:
                if now >= self._next_refresh:
                    due = feed.due(now, self._startsecs)
                    if due:
                        self._refresh(feed, due, now)
                        known = feed.current(now) or known
                return known
        mark = self._next_mark()
        states = {name: p["statename"] for name, p in self.processes(mark).items()}
        if feed is not None:
            feed.load(states, mark, now)
            merged = feed.current(now)
            if merged is not None:
                return merged
        return states

    def _refresh(self, feed: StateFeed, names: list[str], now: float) -> None:
        """Ask supervisord about programs due to change state, at most every REFRESH seconds.

        The call also wakes supervisord's loop, which moves STARTING programs to RUNNING
        (and BACKOFF, STOPPING along) only when it turns; idle, it sleeps up to a second.
        Only due programs: each turn walks every program, at hundreds of services the CPU
        that starts elsewhere need."""
        self._next_refresh = now + REFRESH
        mark = self._next_mark()
        try:
            feed.refresh(self.states_of(names, mark), mark)
        except ActuatorError:
            pass  # supervisord's death is the fence's business; the next full read says more

    def next_due(self) -> Optional[float]:
        """Seconds until a program is due to change state without an event (see `states`); None if none."""
        if self.feed is None:
            return None
        now = time.monotonic()
        wait = self.feed.next_due(now, self._startsecs)
        return None if wait is None else max(wait, self._next_refresh - now, 0.0)

    def states_of(self, names: list[str], mark: Optional[int] = None) -> dict[str, str]:
        """The current state of a few programs, asked directly (one round trip, not all of them);
        with `mark`, that marker follows the answers in supervisord's event stream (see StateFeed)."""
        calls = [{"methodName": "supervisor.getProcessInfo", "params": [name]} for name in names]
        results = self._multicall(calls + self._marker(mark))
        return {name: r["statename"] for name, r in zip(names, results) if isinstance(r, dict) and "statename" in r}

    def processes(self, mark: Optional[int] = None) -> Mapping[str, Mapping]:
        """service -> supervisord's process info (statename, pid), one call for all (then `mark`, if given)."""
        if mark is None:
            return {p["name"]: p for p in self._call("getAllProcessInfo")}
        found = self._multicall([{"methodName": "supervisor.getAllProcessInfo", "params": []}, *self._marker(mark)])[0]
        if not isinstance(found, list):
            raise ActuatorError(f"supervisord getAllProcessInfo: {found!r}")
        return {p["name"]: p for p in found}

    def _next_mark(self) -> int:
        with self._mark_lock:
            self._mark += 1
            return self._mark

    @staticmethod
    def _marker(mark: Optional[int]) -> list[dict]:
        """The call that puts marker `mark` into the event stream, to end a multicall with (none for None)."""
        return [] if mark is None else [{"methodName": "supervisor.sendRemoteCommEvent",
                                         "params": [MARK_TYPE, str(mark)]}]

    def start(self, service: Service, token: int, cgroup: Path, parent: int) -> None:
        """Write the launcher with this fencing token, then start the program without waiting.

        `parent` is supervisord's pid: the launcher refuses to run under any other parent.
        """
        failed = self.start_many([(service, token, cgroup)], parent)
        if service.name in failed:
            raise failed[service.name]

    def start_many(self, items: list[tuple[Service, int, Path]], parent: int) -> dict[str, ActuatorError]:
        """Start several programs, START_CHUNK per XML-RPC round trip (system.multicall), two round
        trips in flight; returns the failures.

        A chunk that times out may still have started its programs: we ask supervisord
        for their states, and only those it does not show starting or running fail.
        """
        failed: dict[str, ActuatorError] = {}
        for service, token, cgroup in items:
            try:
                text = launch_spec(service, self.config.node, token, cgroup, parent)
            except LookupError as exc:  # its user or group was removed since the agent started
                failed[service.name] = ActuatorError(f"cannot start {service.name}: {exc}")
                continue
            spec = self.spec_path(service.name)
            tmp = spec.with_suffix(".tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(text)
            os.replace(tmp, spec)
        items = [item for item in items if item[0].name not in failed]
        names = [service.name for service, _, _ in items]
        chunks = [names[i:i + START_CHUNK] for i in range(0, len(names), START_CHUNK)]
        def attempt(chunk: list[str]):
            try:
                return self._start_chunk(chunk)
            except ActuatorError as exc:
                return exc

        if len(chunks) > 1:
            # two chunks in flight: supervisord reads the next request while it spawns the current
            # one's programs, instead of idling through our round trip between chunks
            with ThreadPoolExecutor(max_workers=2, thread_name_prefix="etcdha-spawn") as pool:
                outcomes = list(pool.map(attempt, chunks))
        else:
            outcomes = [attempt(chunk) for chunk in chunks]
        states: Optional[Mapping[str, str]] = None
        for chunk, outcome in zip(chunks, outcomes):
            if isinstance(outcome, ActuatorError):
                if states is None:  # it may have started them all the same: what does supervisord say?
                    try:
                        states = self.states()
                    except ActuatorError:
                        states = {}
                failed.update({name: outcome for name in chunk if states.get(name) not in ("STARTING", "RUNNING")})
                continue
            results, infos, mark = outcome
            for name, result, info in zip(chunk, results, infos):
                if isinstance(result, dict) and "faultCode" in result and result["faultCode"] not in SUCCESS_FAULTS:
                    failed[name] = ActuatorError(f"supervisord startProcess({name!r}): {result.get('faultString')}")
                elif self.feed is not None:
                    state = info.get("statename") if isinstance(info, dict) else None
                    # as read right after the spawn (RUNNING already with startsecs 0); STARTING if unreadable
                    self.feed.note(name, state if isinstance(state, str) and state else "STARTING", mark)
        return failed

    def _start_chunk(self, names: list[str]) -> tuple[list, list, int]:
        """One round trip: each start followed by a read of its state (with startsecs 0 supervisord has
        made it RUNNING already), then a marker; returns the starts' and reads' answers and the marker."""
        mark = self._next_mark()
        replies = self._multicall([{"methodName": method, "params": params} for name in names
                                   for method, params in (("supervisor.startProcess", [name, False]),
                                                          ("supervisor.getProcessInfo", [name]))]
                                  + self._marker(mark))
        return replies[0:2 * len(names):2], replies[1:2 * len(names):2], mark

    def _multicall(self, calls: list[dict]) -> list:
        if not calls:
            return []
        proxy = xmlrpc.client.ServerProxy("http://localhost", transport=_UnixTransport(str(self.socket), self.timeout))
        try:
            return proxy.system.multicall(calls)
        except (OSError, http.client.HTTPException, xmlrpc.client.ProtocolError, xmlrpc.client.Fault) as exc:
            raise ActuatorError(f"supervisord at {self.socket} did not answer multicall: {exc}") from None

    def stop(self, service: Service, signalled: Callable[[], None] = lambda: None) -> None:
        """Stop a program and wait until it is down (supervisord escalates to SIGKILL after stopwaitsecs).

        `signalled` runs once supervisord has sent the stop signal (the caller resumes stopped
        processes there). We poll instead of stopProcess(wait=True), which only returns on
        supervisord's 1 s tick.
        """
        try:
            self._call("stopProcess", service.name, False)
        except ActuatorError as exc:
            if "BAD_NAME" in str(exc):
                return
            raise
        signalled()
        deadline = time.monotonic() + service.stopwaitsecs + self.timeout
        while self._call("getProcessInfo", service.name)["statename"] in ("STOPPING", "RUNNING", "STARTING"):
            if time.monotonic() > deadline:
                raise ActuatorError(f"{service.name} did not stop within {service.stopwaitsecs}s + SIGKILL")
            time.sleep(0.02)
        if self.feed is not None:  # what it is now, ordered against the events: the stop's are older
            mark = self._next_mark()
            state = self.states_of([service.name], mark).get(service.name)
            if state is not None:
                self.feed.note(service.name, state, mark)

    def stop_all(self, signalled: Callable[[], None] = lambda: None) -> None:
        """Stop every program; all get SIGTERM at once (then `signalled` runs), then we wait for each."""
        states = self.states()
        running = [s for s in self.config.services.values()
                   if states.get(s.name) in ("RUNNING", "STARTING", "BACKOFF")]
        for s in running:
            self._call("stopProcess", s.name, False)
        signalled()
        for s in running:
            self.stop(s)

    def shutdown(self) -> None:
        try:
            self._call("shutdown")
        except ActuatorError:
            pass

