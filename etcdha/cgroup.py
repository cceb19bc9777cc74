"""Containment: every service is a cgroup v2 of its own, and "stopped" means that cgroup is empty.

A process group or a subreaper is not containment (anything can `setsid`, and nothing
below a dead subreaper is caught); a cgroup is: a process cannot leave it without
writing to `cgroup.procs` elsewhere, every fork stays inside, and `cgroup.kill`
SIGKILLs the whole subtree in one write, concurrent forks included.

Layout under the node's root (owned by one agent, locked with flock):

    ROOT/services/SERVICE   one leaf per configured service (the launcher moves the program in)
    ROOT/agent              under a systemd unit with Delegate=yes only: the agent, fence and
                            supervisord (the delegated root must not hold processes itself)

Stdlib only: the fence and the launcher import this module, and the fence must stay small.
"""
from __future__ import annotations

import errno
import fcntl
import os
import select
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Collection, Iterable, Mapping, Optional, Sequence

from etcdha.errors import ActuatorError, ConfigError

SERVICES = "services"
AGENT = "agent"
COUNT_MAX_AGE = 1.0  # seconds a running service's process count may be reused (see NodeCgroups.counts)
DELEGATE_XATTRS = ("trusted.delegate", "user.delegate")  # systemd marks Delegate=yes cgroups with one


class ContainmentError(ActuatorError):
    """A service's cgroup could not be emptied: its processes may still run."""


def cgroup2_mount(mounts: str) -> Optional[Path]:
    """Where cgroup v2 is mounted, from the text of /proc/mounts (unified or hybrid host)."""
    for line in mounts.splitlines():
        fields = line.split()
        if len(fields) >= 3 and fields[2] == "cgroup2":
            return Path(fields[1].replace("\\040", " "))
    return None


def own_cgroup(proc_self_cgroup: str) -> Optional[str]:
    """Our cgroup v2 path (e.g. '/system.slice/etcdha.service'), from /proc/self/cgroup."""
    for line in proc_self_cgroup.splitlines():
        if line.startswith("0::"):
            return line[3:].strip() or "/"
    return None


@dataclass(frozen=True)
class Placement:
    """Where this agent's subtree is, and where the agent itself must move first (if anywhere)."""

    root: Path
    move_self_to: Optional[Path] = None
    why: str = ""


def choose_placement(configured: Optional[Path], mount: Optional[Path], own: Optional[str],
                     under_systemd: bool, delegated: bool, node: str) -> Placement:
    """Pure: configured root > the systemd unit's delegated cgroup > MOUNT/etcdha/NODE.

    Under systemd with Delegate=yes the unit's cgroup is ours: the agent moves into
    ROOT/agent (no processes in an inner node) and services go to ROOT/services.
    Under systemd without delegation we still use MOUNT/etcdha/NODE, which works but
    leaves the services outside the unit's cgroup: systemd's own stop then does not
    reach them, so the unit ships with Delegate=yes.
    """
    if configured is not None:
        return Placement(configured, None, "cgroup_root from the config")
    if mount is None:
        raise ConfigError("no cgroup v2 hierarchy is mounted (see /proc/mounts): etcdha contains every "
                          "service in a cgroup of its own and needs cgroup2, e.g. at /sys/fs/cgroup")
    if under_systemd and delegated and own not in (None, "/"):
        unit = mount / own.lstrip("/")
        return Placement(unit, unit / AGENT, "the systemd unit's delegated cgroup")
    return Placement(mount / "etcdha" / node, None, f"{mount}/etcdha/NODE (no delegated systemd cgroup)")


def detect_placement(configured: Optional[Path], node: str) -> Placement:
    """`choose_placement` with the facts read from this host."""
    mount = cgroup2_mount(_read("/proc/mounts"))
    own = own_cgroup(_read("/proc/self/cgroup"))
    under_systemd = bool(os.environ.get("INVOCATION_ID")) and bool(own and own.endswith(".service"))
    delegated = False
    if under_systemd and mount is not None and own:
        delegated = any(_has_xattr(mount / own.lstrip("/"), name) for name in DELEGATE_XATTRS)
    return choose_placement(configured, mount, own, under_systemd, delegated, node)


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""


def _inside(path: Path, mount: Path) -> bool:
    resolved = Path(os.path.realpath(path))
    return resolved != mount and (mount in resolved.parents)


def _has_xattr(path: Path, name: str) -> bool:
    try:
        return os.getxattr(path, name) not in (b"", b"0")
    except OSError:
        return False


def populated(group: Path) -> bool:
    """True while any process lives in `group` or below (cgroup.events); False if it is gone."""
    try:
        with open(group / "cgroup.events") as f:
            return "populated 1" in f.read()
    except FileNotFoundError:
        return False


def pids(group: Path) -> list[int]:
    """Every process in `group` and its descendant cgroups."""
    found: list[int] = []
    for directory, _subdirs, _files in os.walk(group):
        try:
            with open(os.path.join(directory, "cgroup.procs")) as f:
                found.extend(int(p) for p in f.read().split())
        except (FileNotFoundError, ValueError):
            continue
    return found


def kill(group: Path) -> None:
    """SIGKILL everything in `group` and below in one write (kernel >= 5.14); no escape."""
    try:
        with open(group / "cgroup.kill", "w") as f:
            f.write("1")
    except FileNotFoundError:
        if group.exists():
            raise
    except OSError as exc:
        raise ContainmentError(f"cannot kill cgroup {group}: {exc.strerror}") from None


def contained(group: Path, argv: Sequence[str]) -> list[str]:
    """argv wrapped so the process enters `group` (created if missing) before `argv` runs: exit 126 if it cannot.

    For helpers the agent runs itself (exec checks, notification hooks): whatever they
    fork stays in `group`, so one `empty` kills all of it.
    """
    group.mkdir(parents=True, exist_ok=True)
    return ["/bin/sh", "-c", 'echo $$ >"$0" || exit 126; exec "$@"', str(group / "cgroup.procs"), *argv]


def empty(group: Path, timeout: float = 5.0) -> bool:
    """Kill whatever is left in `group` and wait for it to be gone; True if it is empty. Never raises."""
    try:
        if populated(group):
            kill(group)
            return wait_empty(group, timeout)
    except (OSError, ActuatorError):
        return False
    return True


def signal_all(group: Path, sig: int) -> int:
    """Send `sig` to every process in `group` (e.g. SIGTERM before the final kill); how many."""
    sent = 0
    for pid in pids(group):
        try:
            os.kill(pid, sig)
            sent += 1
        except (ProcessLookupError, PermissionError):
            pass
    return sent


def wait_empty(group: Path, timeout: float) -> bool:
    """Wait until `group` holds no process; True if it is empty. Woken by cgroup.events changes."""
    deadline = time.monotonic() + timeout
    try:
        fd = os.open(group / "cgroup.events", os.O_RDONLY)
    except FileNotFoundError:
        return True
    try:
        poller = select.poll()
        poller.register(fd, select.POLLPRI | select.POLLERR)
        for _ in range(100000):  # bounded: each round waits or the deadline passes
            os.lseek(fd, 0, os.SEEK_SET)
            if b"populated 0" in os.read(fd, 256):
                return True
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            poller.poll(min(left, 0.05) * 1000)  # a notification wakes us; 50 ms is the safety net
        return False
    finally:
        os.close(fd)


def remove(group: Path) -> None:
    """rmdir `group` and its descendant cgroups (they must be empty), deepest first."""
    if not group.exists():
        return
    for directory, _subdirs, _files in sorted(os.walk(group), key=lambda w: -len(w[0])):
        try:
            os.rmdir(directory)
        except FileNotFoundError:
            pass


def enter(group: Path, pid: int = 0) -> None:
    """Move `pid` (0: the caller) into `group`."""
    with open(group / "cgroup.procs", "w") as f:
        f.write(str(pid or os.getpid()))


class EventsWatcher(threading.Thread):
    """Wakes the agent the moment a service's cgroup changes (cgroup.events: populated 0/1).

    A crashed program empties its cgroup: the agent hears of it at once instead of
    polling supervisord for every program twice a second.
    """

    def __init__(self, groups: list[Path], on_change: Callable[[], None]):
        super().__init__(name="etcdha-cgroups", daemon=True)
        self.groups = groups
        self.on_change = on_change
        self.stopping = threading.Event()
        self.populated: dict[Path, bool] = {}  # as of each group's last notification (see NodeCgroups.counts)

    def stop(self) -> None:
        self.stopping.set()

    def run(self) -> None:
        # epoll, not poll: poll() hands the kernel every fd on each call, and during a takeover of
        # hundreds of services this thread woke once per program started, each time for all of them
        poller = select.epoll()
        fds: dict[int, Path] = {}
        try:
            for group in self.groups:
                try:
                    fd = os.open(group / "cgroup.events", os.O_RDONLY)
                except OSError:
                    continue
                self.populated[group] = b"populated 1" in os.read(fd, 256)  # arms: notifications come after a read
                poller.register(fd, select.EPOLLPRI | select.EPOLLERR)
                fds[fd] = group
            while not self.stopping.is_set():
                ready = poller.poll(0.5)
                for fd, _ in ready:
                    os.lseek(fd, 0, os.SEEK_SET)
                    self.populated[fds[fd]] = b"populated 1" in os.read(fd, 256)
                if ready:
                    self.on_change()
        finally:
            poller.close()
            for fd in fds:
                os.close(fd)


class NodeCgroups:
    """This node's cgroup subtree: one leaf per service, killed and checked as a unit."""

    def __init__(self, placement: Placement, services: Iterable[str]):
        self.placement = placement
        self.root = placement.root
        self.services_dir = self.root / SERVICES
        self.names = tuple(services)
        # one Path per service, made once: counts() looks each up every cycle, and building 500 Paths (and
        # hashing them for the watcher's map) was a third of an idle cycle's CPU at N = 500
        self._groups = {name: self.services_dir / name for name in self.names}
        self._lock_fd: Optional[int] = None
        self._events: Optional[EventsWatcher] = None
        self._counted: dict[str, tuple[int, float]] = {}  # service -> (processes, monotonic time read)

    def group(self, service: str) -> Path:
        found = self._groups.get(service)
        return found if found is not None else self.services_dir / service

    def setup(self) -> None:
        """Create the subtree, lock it, check it can kill; move the agent to its leaf under systemd.

        Raises ConfigError naming what is missing, so the agent refuses to start rather
        than run services it could not contain.
        """
        mount = cgroup2_mount(_read("/proc/mounts"))
        if mount is None or not _inside(self.root, mount):
            raise ConfigError(f"{self.root} ({self.placement.why}) is not a directory below the cgroup v2 mount "
                              f"({mount or 'none'}; see /proc/mounts): etcdha contains every service in a cgroup "
                              "v2 of its own, e.g. cgroup_root: /sys/fs/cgroup/etcdha")
        try:
            self.services_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"cannot create the cgroup {self.services_dir} ({exc.strerror}; chosen from "
                              f"{self.placement.why}): etcdha needs a writable cgroup v2 subtree (run as root, "
                              "or set cgroup_root to a delegated cgroup)") from None
        if not (self.services_dir / "cgroup.procs").exists():
            raise ConfigError(f"{self.root} is not in a cgroup v2 hierarchy (no cgroup.procs); set cgroup_root "
                              "to a directory under the cgroup2 mount (see /proc/mounts)")
        if not (self.services_dir / "cgroup.kill").exists():
            raise ConfigError(f"{self.services_dir} has no cgroup.kill: etcdha needs Linux >= 5.14 to kill a "
                              f"service's every process at once (this kernel is {os.uname().release})")
        self._lock()
        if self.placement.move_self_to is not None:
            self.placement.move_self_to.mkdir(exist_ok=True)
            enter(self.placement.move_self_to)
        for name in self.names:
            self.group(name).mkdir(exist_ok=True)

    def _lock(self) -> None:
        fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise ConfigError(f"another etcdha agent already uses the cgroup {self.root} (same node name "
                                  "on this host?); every agent needs its own node name or cgroup_root") from None
            raise
        self._lock_fd = fd

    def counts(self, reuse: Collection[str] = frozenset()) -> dict[str, int]:
        """service -> number of processes in its cgroup (0 for an empty or missing one).

        Every cycle: a cgroup the events watcher last saw empty counts 0 without a read (it
        tells us within microseconds when one fills); every other one is read now (one read,
        the subtree walked only if the service made cgroups of its own). So a count above
        zero is never older than the program states read before it (decide's daemonized
        rule), and 500 services cost a read per running one, not two reads each.

        `reuse`: services whose count may be one read in the last COUNT_MAX_AGE seconds, while
        the watcher still says populated (the agent passes those supervisord shows RUNNING:
        for them decide needs only "populated", the number is for status). A takeover of
        hundreds runs many cycles in a second; each re-read every running cgroup.
        """
        found = {}
        events = self._events
        known = events.populated if events is not None and events.is_alive() else {}
        now = time.monotonic()
        for name in self.names:
            group = self.group(name)
            seen = known.get(group)
            if seen is False or (seen is None and not populated(group)):
                found[name] = 0
                self._counted.pop(name, None)
                continue
            cached = self._counted.get(name)
            if seen and name in reuse and cached is not None and now - cached[1] < COUNT_MAX_AGE:
                found[name] = cached[0]
                continue
            try:
                with open(group / "cgroup.procs") as f:
                    found[name] = len(f.read().split())
            except FileNotFoundError:
                found[name] = 0
            if found[name] == 0:  # populated, but not directly: nested cgroups of the service's own
                found[name] = len(pids(group))
            self._counted[name] = (found[name], now)
        return found

    def watch(self, on_change: Callable[[], None]) -> "EventsWatcher":
        """Call `on_change` whenever any service's cgroup empties or fills (a program exits, a start lands)."""
        watcher = EventsWatcher([self.group(name) for name in self.names], on_change)
        watcher.start()
        self._events = watcher
        return watcher

    def leftovers(self) -> Mapping[str, int]:
        """Services (configured or not) whose cgroup still holds processes."""
        found = {}
        try:
            entries = list(self.services_dir.iterdir())
        except FileNotFoundError:
            return {}
        for group in entries:
            if group.is_dir() and populated(group):
                found[group.name] = len(pids(group))
        return found

    def kill_all(self) -> None:
        """One write: every process of every service of this node gets SIGKILL."""
        kill(self.services_dir)

    def empty_all(self, timeout: float = 5.0) -> bool:
        """Kill every service process and wait until none is left."""
        self.kill_all()
        return wait_empty(self.services_dir, timeout)

    def stop(self, service: str, grace: float, deadline: float) -> None:
        """After the program's own stop: SIGTERM what remains, cgroup.kill at `deadline`, wait for empty.

        `deadline` is monotonic (the start of the stop plus stopwaitsecs). Raises
        ContainmentError if the cgroup is still populated after the kill (D-state processes).
        """
        group = self.group(service)
        if not populated(group):
            return
        signal_all(group, signal.SIGTERM)
        signal_all(group, signal.SIGCONT)  # a stopped process acts on SIGTERM only once resumed (as systemd does)
        if wait_empty(group, max(0.0, deadline - time.monotonic())):
            return
        kill(group)
        if not wait_empty(group, grace):
            raise ContainmentError(f"{len(pids(group))} processes of {service} survive SIGKILL in {group} "
                                   f"(uninterruptible sleep?)")

    def release(self) -> None:
        """Graceful end: remove our (empty) cgroups and the lock; never raises."""
        groups = [self.group(name) for name in self.names]
        try:  # and whatever else is below (health checks' cgroups), deepest first
            groups += sorted((p for p in self.services_dir.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts))
        except OSError:
            pass
        for group in groups:
            try:
                os.rmdir(group)
            except OSError:
                pass
        try:
            os.rmdir(self.services_dir)
        except OSError:
            pass
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
