"""One seam for every transition: history in etcd, the notification hook and the log see the same events.

The agent calls `Events.emit` once per transition (claimed, started, stopped, released,
moved, failed, fenced, check-failed, restarted, migrated, recovered, node-unhealthy,
node-healthy); nothing reaches one subscriber and not the others. Subscribers never
block the caller: history is written by its own thread (history.py), hooks run on
another, one at a time in order, each killed at its timeout.
"""
from __future__ import annotations

import collections
import logging
import os
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Callable, Mapping, Optional, Sequence

from etcdha import cgroup, model

log = logging.getLogger(__name__)

NODE_EVENTS = model.ALL_SERVICES  # the "service" of node-level events (node-unhealthy, node-healthy) in history
BACKLOG_WARNING = 1000  # hook calls waiting: say so (they are still all made, in order)


def hook_environment(event: model.Event) -> dict[str, str]:
    """What a hook gets besides the agent's environment: one variable per field of the event."""
    return {
        "ETCDHA_EVENT": event.event,
        "ETCDHA_SERVICE": "" if event.service == NODE_EVENTS else event.service,
        "ETCDHA_NODE": event.node,
        "ETCDHA_REASON": event.reason,
        "ETCDHA_FENCING_TOKEN": str(event.token) if event.token else "",
        "ETCDHA_TIME": f"{event.time:.6f}",
        "ETCDHA_TIME_ISO": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(event.time)),
        "ETCDHA_DETAIL": event.detail,
    }


class Hook:
    """Runs the operator's notification command once per event, in order, on its own thread.

    Every event is delivered (the queue is not bounded: a transition is never skipped);
    a call that outlives `timeout` is killed with everything it started (its cgroup, or
    its process group without one), and the next one starts. In the services' subtree,
    the fence kills a call with everything else when the agent dies. Failures are logged, never raised. Calls run one at a time so a
    receiver sees transitions in the order they happened.
    """

    def __init__(self, command: Sequence[str], timeout: float, group: Optional[Path] = None,
                 environment: Optional[Mapping[str, str]] = None):
        self.command = tuple(command)
        self.group = group  # a cgroup for the calls: a call killed (or orphaned by a crash) leaves nothing behind
        self.timeout = timeout
        self.environment = dict(os.environ if environment is None else environment)
        self._queue: collections.deque[Optional[model.Event]] = collections.deque()
        self._ready = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="etcdha-hook", daemon=True)
        self._thread.start()

    def __call__(self, event: model.Event) -> None:
        with self._ready:
            self._queue.append(event)
            if len(self._queue) == BACKLOG_WARNING:
                log.warning("%d notification hook calls are waiting (each may take up to %gs)", BACKLOG_WARNING,
                            self.timeout)
            self._ready.notify()

    def close(self, timeout: float = 5.0) -> None:
        """Deliver what is queued for at most `timeout` seconds, then stop; a call still running is killed."""
        with self._ready:
            self._queue.append(None)
            self._ready.notify()
        self._thread.join(timeout)
        if self._thread.is_alive() and self.group is not None:
            log.warning("notification hook: stopping with calls still queued or running; killing the running one")
            cgroup.empty(self.group)

    def _run(self) -> None:
        while True:
            with self._ready:
                while not self._queue:
                    self._ready.wait()
                event = self._queue.popleft()
            if event is None:
                return
            try:
                self.call(event)
            except Exception:  # noqa: BLE001 - a hook must never take the agent down
                log.exception("notification hook: unexpected error")

    def call(self, event: model.Event) -> None:
        began = time.monotonic()
        what = f"notification hook for {event.event} {event.service}"
        try:
            argv = cgroup.contained(self.group, self.command) if self.group else self.command
            proc = subprocess.Popen(argv, env={**self.environment, **hook_environment(event)},
                                    stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        except OSError as exc:
            log.error("%s: cannot run %s: %s", what, self.command[0], exc.strerror or exc)
            return
        try:
            out, _ = proc.communicate(timeout=self.timeout)
        except subprocess.TimeoutExpired:
            # not reaped yet (or a member of its group holds the output open): the group id is still its own
            if self.group is not None:
                cgroup.empty(self.group)
            _kill_group(proc.pid)
            try:
                proc.communicate(timeout=5)
            except subprocess.TimeoutExpired:
                pass
            log.error("%s: killed after its timeout of %gs", what, self.timeout)
            return
        text = " ".join(out[-500:].decode("utf-8", "replace").split())
        if proc.returncode != 0:
            log.error("%s: exit %s after %.2fs: %s", what, proc.returncode, time.monotonic() - began, text or "-")
        else:
            log.debug("%s: done in %.2fs", what, time.monotonic() - began)


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


class Events:
    """The seam: `emit` builds one Event and hands it to every subscriber (history, hook, log)."""

    def __init__(self, node: str, subscribers: Sequence[Callable[[model.Event], None]] = (),
                 clock: Callable[[], float] = time.time):
        self.node = node
        self.subscribers = list(subscribers)
        self.clock = clock

    def emit(self, service: str, event: str, reason: str, token: int = 0, detail: str = "",
             at: Optional[float] = None) -> model.Event:
        """`at`: when it happened, if that was before now (wall clock; default now)."""
        e = model.Event(service=service, time=self.clock() if at is None else at, node=self.node, event=event,
                        reason=reason, token=token, detail=detail)
        for subscriber in self.subscribers:
            try:
                subscriber(e)
            except Exception:  # noqa: BLE001 - one subscriber's bug must not hide the event from the others
                log.exception("event subscriber %r failed on %s %s", subscriber, event, service)
        return e
