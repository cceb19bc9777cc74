"""The fence: a separate small process that enforces the lease deadline even if the agent cannot.

The agent starts it (`python -m etcdha.fence ...`) with a pipe; the fence starts
supervisord as its child (which dies with it: PR_SET_PDEATHSIG) and becomes a
child subreaper. The agent feeds it `deadline T` lines (monotonic seconds, from
the lease). The fence fires when

- the deadline minus the margin passes (agent hung, SIGSTOPped, or etcd unreachable),
- the pipe closes (the agent died), or supervisord exits (seen at once through a
  pidfd), or the agent asks (`fire`).

When the agent died (its pipe closed) and the fence verified that every service
process is dead and every VIP gone, it also revokes the agent's lease (the agent
tells it `lease ID` after each grant) through etcd's JSON gateway, so another node
takes over at once: an agent crash is a handoff, not a TTL wait. `stop_post` does
the same for systemd's ExecStopPost=, when systemd killed the unit (fence included).

Firing stops supervisord from spawning (SIGSTOP), kills the node's whole service
cgroup subtree with one `cgroup.kill` write, SIGKILLs its own descendants (a
launcher between fork and entering its cgroup is one), kills the subtree once
more, removes every configured VIP with one netlink request each, verifies that
the subtree is empty, prints `fired REASON ...` and exits 3. Safety wins over
grace: a program gets no SIGTERM from the fence. `quit` is the graceful path:
supervisord is asked to stop, leftovers are killed, and the fence exits 0.

It runs with oom_score_adj -1000 (the OOM killer picks a program, never the
fence; supervisord goes back to 0), imports only the stdlib, and starts no threads.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import logging
import os
import select
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

from etcdha import cgroup, gateway, netlink
from etcdha.errors import ActuatorError

log = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36
FIRED_EXIT = 3
VERIFY_TIMEOUT = 2.0  # how long the fence waits for the killed subtree to be empty


def _prctl(option: int, value: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(option, value, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl failed")


def _oom_score_adj(value: int) -> None:
    with open("/proc/self/oom_score_adj", "w") as f:
        f.write(str(value))


def _supervisord_preexec() -> None:
    """In supervisord before exec: die with the fence; be an ordinary OOM victim again."""
    _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    try:
        _oom_score_adj(0)
    except OSError:
        pass


def _children(pid: int) -> Optional[list[int]]:
    """Children of `pid` from /proc/PID/task/*/children (CONFIG_PROC_CHILDREN); None if the kernel lacks it."""
    found: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return []  # gone meanwhile
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/children", "rb") as f:
                found.extend(int(c) for c in f.read().split())
        except FileNotFoundError:
            if not os.path.exists(f"/proc/{pid}/task"):
                return found  # the process went away
            return None  # the process is there, the file is not: no CONFIG_PROC_CHILDREN
        except (OSError, ValueError):
            continue
    return found


def descendants(root: int, depth: int = 64) -> list[int]:
    """PIDs below `root` in the process tree, down to `depth` generations.

    Walked down from `root` through /proc/PID/task/*/children: a file per process of the
    tree, not a stat file per process on the host. Kernels without CONFIG_PROC_CHILDREN:
    every /proc/PID/stat is read instead.
    """
    found: list[int] = []
    level = [root]
    for _ in range(depth):
        below: list[int] = []
        for pid in level:
            children = _children(pid)
            if children is None:
                return _descendants_from_stat(root, depth)
            below.extend(children)
        if not below:
            break
        found.extend(below)
        level = below
    return found


def _descendants_from_stat(root: int, depth: int) -> list[int]:
    """descendants() from every /proc/PID/stat (parent PIDs), for kernels without the children files."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(b")") + 2:].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    found: list[int] = []
    level = [root]
    for _ in range(depth):
        level = [child for pid in level for child in children.get(pid, [])]
        if not level:
            break
        found.extend(level)
    return found


LOG_FORMAT = "text"  # of our stderr lines: text, journal (`<N>` priorities) or json, as the agent's (--log-format)


def listed(removed: Sequence[str], most: int = 4) -> str:
    """The VIPs a fence removed, for its one log line: at most `most` named, then how many more."""
    if not removed:
        return "no VIPs"
    named = ", ".join(removed[:most])
    more = f" and {len(removed) - most} more" if len(removed) > most else ""
    return f"{len(removed)} VIP{'s' if len(removed) != 1 else ''} ({named}{more})"


def priority(message: str) -> int:
    """syslog priority of one of our messages: 3 (error) when processes survive or something failed,
    4 (warning) when the fence fired or warns, 6 (info) otherwise."""
    if "SURVIVE" in message or message.startswith(("error", "stop-post: error")):
        return 3
    if message.startswith(("fired", "warning")):
        return 4
    return 6


def log_line(message: str, fmt: str, pid: int, now: float) -> str:
    """One stderr line for `message` in the agent's log format (pure, for tests)."""
    if fmt == "journal":
        return f"<{priority(message)}>etcdha-fence[{pid}]: {message}"
    if fmt == "json":
        level = {3: "error", 4: "warning", 6: "info"}[priority(message)]
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now * 1000) % 1000:03d}Z"
        return json.dumps({"time": stamp, "level": level, "priority": priority(message), "logger": "etcdha.fence",
                           "pid": pid, "message": message})
    return f"etcdha-fence[{pid}]: {message}"


def say(message: str) -> None:
    """Tell the agent (stdout) and the log (stderr); the agent may already be gone."""
    for stream in (sys.stdout, sys.stderr):
        try:
            print(message if stream is sys.stdout else log_line(message, LOG_FORMAT, os.getpid(), time.time()),
                  file=stream, flush=True)
        except (BrokenPipeError, OSError, ValueError):
            pass


def revoke_if_clean(etcd: Optional[dict], lease: int, empty: bool, vip_errors: Sequence[str]) -> str:
    """Revoke `lease` only if nothing of the node's services can still run or answer; says what happened."""
    if not lease or not etcd or not etcd.get("endpoints"):
        return "no lease to hand over"
    if not empty or vip_errors:
        return f"not handing lease {lease:x} over: the node is not verified clean; it runs out after its TTL"
    ok, what = gateway.revoke(etcd["endpoints"], lease, etcd.get("timeout", 1.0), etcd.get("ca_cert"),
                              etcd.get("cert"), etcd.get("key"), etcd.get("username"), etcd.get("password_file"))
    return f"handed over: {what}" if ok else f"handoff failed, the lease runs out after its TTL: {what}"


class Fence:
    def __init__(self, margin: float, vips: Sequence[tuple[str, str]], services: Path, command: Sequence[str],
                 etcd: Optional[dict] = None):
        self.margin = margin
        self.etcd = etcd  # endpoints, timeout, TLS files: where to revoke the lease after a crash
        self.lease = 0
        self.clean = False  # the last fire verified every service process dead and every VIP gone
        self.vips = list(vips)
        self.services = services  # the node's service cgroup subtree
        self.command = list(command)
        self.deadline: Optional[float] = None
        self.child: Optional[subprocess.Popen] = None
        self.child_exited = False
        self.pidfd = -1
        self.vip_errors: list[str] = []
        self.warnings: list[str] = []  # said after "ready" (the agent reads that line first)

    def start_child(self) -> None:
        self.child = subprocess.Popen(
            self.command, stdin=subprocess.DEVNULL, stdout=sys.stderr, start_new_session=True,
            preexec_fn=_supervisord_preexec)
        try:
            self.pidfd = os.pidfd_open(self.child.pid)  # readable the moment supervisord exits
        except (AttributeError, OSError):
            self.pidfd = -1  # Python < 3.9 or kernel < 5.3: the 0.2 s poll below still notices

    def reap(self) -> None:
        """Collect exited children (we are a subreaper, orphans land here)."""
        for _ in range(10000):
            try:
                pid, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            if self.child is not None and pid == self.child.pid:
                self.child_exited = True

    def kill_descendants(self, depth: int = 64) -> set[int]:
        """SIGKILL every process below us down to `depth` generations; their PIDs."""
        victims = descendants(os.getpid(), depth)
        for pid in victims:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return set(victims)

    def kill_everything(self) -> tuple[int, bool]:
        """Stop supervisord spawning, kill the service subtree and our descendants; (processes, empty?).

        Right after the subtree's kill only supervisord and its children are walked (a launcher
        not yet in its cgroup is one; it forks nothing before it is inside): the full tree is
        walked once the subtree is empty, when it is small. At hundreds of services, walking
        the whole tree first (and counting the subtree) was most of the time between an
        agent's crash and the handoff.
        """
        if self.child is not None and not self.child_exited:
            try:
                os.kill(self.child.pid, signal.SIGSTOP)
            except ProcessLookupError:
                pass
        errors = []
        killed: set[int] = set()
        for first in (True, False):  # the subtree again: a program may have forked before its SIGKILL
            try:
                cgroup.kill(self.services)
            except ActuatorError as exc:
                errors.append(str(exc))
            if first:
                killed = self.kill_descendants(depth=2)  # supervisord (or orphans), and supervisord's children
        empty = cgroup.wait_empty(self.services, VERIFY_TIMEOUT)
        killed |= self.kill_descendants()  # anything left anywhere below us (e.g. moved out of its cgroup)
        for error in errors:
            say(f"error {error}")
        return len(killed), empty

    def fire(self, reason: str) -> int:
        started = time.monotonic()
        late = "" if self.deadline is None else f", {self.deadline - started:.3f}s before the lease deadline"
        killed, empty = self.kill_everything()
        removed, errors = netlink.delete_addresses(self.vips)
        self.reap()
        took = (time.monotonic() - started) * 1000
        self.clean = empty and not errors
        self.vip_errors = errors
        left = "" if empty else f"; {len(cgroup.pids(self.services))} PROCESSES SURVIVE in {self.services}"
        failed = "" if not errors else f"; VIP removal failed: {'; '.join(errors)}"
        say(f"fired {reason}: killed {killed} processes, removed {listed(removed)} "
            f"in {took:.0f}ms{late}{left}{failed}")
        return FIRED_EXIT

    def quit(self) -> int:
        """Graceful: ask supervisord to stop its programs, then make sure nothing is left."""
        if self.child is not None and not self.child_exited:
            self.child.send_signal(signal.SIGTERM)
            end = time.monotonic() + 30
            while not self.child_exited and time.monotonic() < end:
                self.reap()
                time.sleep(0.05)
        _, empty = self.kill_everything()
        netlink.delete_addresses(self.vips)
        self.reap()
        say("quit" if empty else f"quit; {len(cgroup.pids(self.services))} PROCESSES SURVIVE in {self.services}")
        return 0

    def run(self) -> int:
        stdin = sys.stdin.fileno()
        buf = b""
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # the agent handles ^C and tells us to quit
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(self.fire("fence got SIGTERM")))
        self.start_child()
        say(f"ready {self.child.pid}")
        for warning in self.warnings:
            say(f"warning: {warning}")
        watched = [stdin] + ([self.pidfd] if self.pidfd >= 0 else [])
        while True:
            now = time.monotonic()
            wait = 0.2 if self.deadline is None else min(0.2, max(0.0, self.deadline - self.margin - now))
            readable, _, _ = select.select(watched, [], [], wait)
            if self.pidfd in readable:
                self.reap()
                return self.fire("supervisord exited")
            if stdin in readable:
                data = os.read(stdin, 4096)
                if not data:
                    code = self.fire("agent gone (its pipe closed)")
                    say(revoke_if_clean(self.etcd, self.lease, self.clean, self.vip_errors))
                    return code
                buf += data
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    words = line.decode(errors="replace").split()
                    if words[:1] == ["deadline"] and len(words) == 2:
                        self.deadline = float(words[1])
                    elif words[:1] == ["lease"] and len(words) == 2:
                        self.lease = int(words[1], 16)
                    elif words == ["fire"]:
                        return self.fire("asked by the agent")
                    elif words == ["quit"]:
                        return self.quit()
            self.reap()
            if self.deadline is not None and time.monotonic() >= self.deadline - self.margin:
                return self.fire("lease deadline reached without renewal")
            if self.child_exited:
                return self.fire("supervisord exited")


def stop_post(state_file: Path) -> int:
    """After systemd stopped the unit (ExecStopPost=), fence included: verify, drop VIPs, hand the lease over.

    `state_file` is what the agent wrote at its last lease grant (see Actuator.lease_granted).
    """
    try:
        state = json.loads(state_file.read_text())
        services, vips = Path(state["services"]), [tuple(v) for v in state["vips"]]
        lease = int(state["lease"], 16)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        say(f"stop-post: nothing to hand over ({exc})")
        return 0
    try:
        cgroup.kill(services)
    except ActuatorError as exc:
        say(f"stop-post: error {exc}")
    empty = cgroup.wait_empty(services, VERIFY_TIMEOUT)
    removed, errors = netlink.delete_addresses(vips)
    say(f"stop-post: {'no service process left' if empty else 'SERVICE PROCESSES SURVIVE'} in {services}; "
        f"removed {listed(removed)}" + (f"; VIP removal failed: {'; '.join(errors)}" if errors else ""))
    say(revoke_if_clean(state.get("etcd"), lease, empty, errors))
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="etcdha-fence", description=__doc__.splitlines()[0])
    parser.add_argument("--margin", type=float, required=True)
    parser.add_argument("--cgroup", type=Path, required=True, help="the node's service cgroup subtree")
    parser.add_argument("--vip", nargs=2, action="append", default=[], metavar=("INTERFACE", "CIDR"))
    parser.add_argument("--etcd", type=json.loads, default=None,
                        help='JSON {"endpoints": [...], "timeout": S, "ca_cert", "cert", "key"}: for the handoff')
    parser.add_argument("--log-format", choices=("text", "journal", "json"), default="text")
    parser.add_argument("command", nargs="+")
    args = parser.parse_args(argv)
    global LOG_FORMAT
    LOG_FORMAT = args.log_format
    _prctl(PR_SET_CHILD_SUBREAPER, 1)
    fence = Fence(args.margin, [tuple(v) for v in args.vip], args.cgroup, args.command, args.etcd)
    try:
        _oom_score_adj(-1000)
    except OSError as exc:
        fence.warnings.append(f"cannot set oom_score_adj -1000 ({exc.strerror}; needs CAP_SYS_RESOURCE): "
                              "the OOM killer may pick the fence")
    return fence.run()


class FenceClient:
    """The agent's side: start the fence (and through it supervisord), feed it, stop it.

    `on_exit(client)` runs on the reader thread the moment the fence's stdout closes
    (it exited, fired or was killed): the agent empties the service cgroups from
    there at once instead of waiting for its loop. `exit_requested` tells whether
    we asked for that exit (fire, quit).
    """

    def __init__(self, margin: float, vips: Sequence[tuple[str, str]], services: Path,
                 supervisord_command: Sequence[str],
                 on_exit: Callable[["FenceClient"], None] = lambda client: None, etcd: Optional[dict] = None,
                 log_format: str = "text"):
        argv = [sys.executable, "-m", "etcdha.fence", "--margin", repr(margin), "--cgroup", str(services),
                "--log-format", log_format]
        if etcd:
            argv += ["--etcd", json.dumps(etcd)]
        for interface, cidr in vips:
            argv += ["--vip", interface, cidr]
        self.argv = argv + ["--", *supervisord_command]
        self.proc: Optional[subprocess.Popen] = None
        self.messages: list[str] = []
        self.on_exit = on_exit
        self.exit_requested = False
        self._reader: Optional[threading.Thread] = None
        self._lock = threading.Lock()

    def start(self, timeout: float = 10.0) -> int:
        """Start the fence; returns supervisord's pid. No preexec_fn here: the agent has gRPC threads."""
        self.proc = subprocess.Popen(self.argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     start_new_session=True, close_fds=True)
        poller = select.poll()  # not select(): an agent with hundreds of services holds fds above 1024
        poller.register(self.proc.stdout, select.POLLIN)
        ready = poller.poll(timeout * 1000)
        line = self.proc.stdout.readline().decode().split() if ready else []
        if line[:1] != ["ready"]:
            self.proc.kill()
            raise ActuatorError(f"the fence did not start within {timeout:g}s (said {line!r})")
        self._reader = threading.Thread(target=self._read, name="etcdha-fence-out", daemon=True)
        self._reader.start()
        return int(line[1])

    def _read(self) -> None:
        for raw in self.proc.stdout:
            msg = raw.decode(errors="replace").strip()
            self.messages.append(msg)
            if msg.startswith("fired") or "SURVIVE" in msg or msg.startswith(("error", "warning")):
                log.warning("fence: %s", msg)
            else:
                log.info("fence: %s", msg)
        self.on_exit(self)

    def _send(self, line: str) -> bool:
        with self._lock:
            if self.proc is None or self.proc.stdin is None:
                return False  # not started (yet)
            try:
                self.proc.stdin.write(line.encode() + b"\n")
                self.proc.stdin.flush()
                return True
            except (BrokenPipeError, ValueError, OSError):
                return False

    def feed(self, deadline: float) -> None:
        """Move the fence's deadline (monotonic seconds)."""
        self._send(f"deadline {deadline:.6f}")

    def lease(self, lease: int) -> None:
        """The lease to revoke if the agent dies and the node is verified clean."""
        self._send(f"lease {lease:x}")

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def exit_reason(self, timeout: float = 1.0) -> str:
        """Why the fence exited: its signal, or its `fired ...` line (all of its output read first)."""
        if self.proc is None:
            return "not started"
        if self._reader is not None and self._reader is not threading.current_thread():
            self._reader.join(timeout)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return "still running"
        if code < 0:
            return f"killed by {signal.Signals(-code).name}"
        fired = [m for m in self.messages if m.startswith("fired")]
        if code == FIRED_EXIT and fired:
            return fired[-1]
        return f"exited with status {code}" + (f" ({self.messages[-1]})" if self.messages else "")

    def _finish(self, command: str, timeout: float) -> Optional[int]:
        if self.proc is None:
            return None
        self.exit_requested = True
        self._send(command)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(5)

    def fire(self, timeout: float = 5.0) -> Optional[int]:
        """Make the fence kill everything now and wait for it."""
        return self._finish("fire", timeout)

    def quit(self, timeout: float = 40.0) -> Optional[int]:
        """Graceful stop of supervisord and the fence."""
        return self._finish("quit", timeout)


if __name__ == "__main__":
    sys.exit(main())
