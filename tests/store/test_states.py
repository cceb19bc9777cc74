"""Program states from supervisord's event stream (listener.py -> StateFeed), with a real supervisord.

A cycle must learn of starts, crashes and stops without asking supervisord about
every program; a gap in the events must make it ask once.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import tempfile
import threading
import time
from pathlib import Path

import pytest

from etcdha.cgroup import NodeCgroups, Placement
from etcdha.config import Config, EtcdConfig, Service
from etcdha.fence import FenceClient
from etcdha.supervisord import LISTENER_NAME, Supervisor

from .conftest import kill_pid, wait_for

pytestmark = pytest.mark.store

SERVICES = {name: Service(name=name, command=("sleep", "300"), startsecs=0, startretries=0, stopwaitsecs=2)
            for name in ("a", "b", "c", "d", "e", "f", "g", "h")}
SLOW = {name: Service(name=name, command=("sleep", "300"), startsecs=1, startretries=0, stopwaitsecs=2)
        for name in ("slow1", "slow2", "slow3")}
SERVICES.update(SLOW)
PATIENT = Service(name="patient", command=("sleep", "300"), startsecs=0, startretries=0, stopwaitsecs=10)
SERVICES["patient"] = PATIENT


class Counting(Supervisor):
    """The real driver; counts the full reads (getAllProcessInfo)."""

    full_reads = 0

    def processes(self, mark=None):
        self.full_reads += 1
        return super().processes(mark)


@pytest.fixture
def sup(request, cgroup_root):
    run_dir = Path(tempfile.mkdtemp(prefix="ehs-", dir="/tmp"))
    config = Config(node="n1", etcd=EtcdConfig(), services=SERVICES, run_dir=run_dir)
    cgroups = NodeCgroups(Placement(cgroup_root), list(SERVICES))
    cgroups.setup()
    supervisor = Counting(config)
    supervisor.prepare()
    woken = threading.Event()
    supervisor.listen(woken.set)
    fence = FenceClient(0.3, [], cgroups.services_dir, supervisor.command())

    def cleanup() -> None:
        supervisor.close()
        fence.quit()
        if fence.proc is not None and fence.proc.poll() is None:
            fence.proc.kill()
        cgroups.release()
        shutil.rmtree(run_dir, ignore_errors=True)

    request.addfinalizer(cleanup)
    supervisor.pid = fence.start()
    supervisor.cgroups = cgroups
    supervisor.woken = woken
    supervisor.fence_client = fence
    supervisor.wait_ready(timeout=10)
    # the first full read is trusted once the listener's own start has been told
    wait_for(lambda: supervisor.states() is not None and supervisor.feed.current(_now()) is not None, 5,
             interval=0.05, what="the event feed to be current")
    return supervisor


def _now() -> float:
    return time.monotonic()


def _start(sup: Counting, name: str) -> None:
    sup.start(SERVICES[name], 7, sup.cgroups.group(name), sup.pid)


def test_starts_crashes_and_stops_are_known_without_reading_every_program(sup):
    reads = sup.full_reads
    _start(sup, "a")
    assert sup.states()["a"] in ("STARTING", "RUNNING")  # at once, before any event
    wait_for(lambda: sup.states()["a"] == "RUNNING", 5, interval=0.02, what="a RUNNING from its event")
    pid = sup.processes()["a"]["pid"]
    reads = sup.full_reads
    sup.woken.clear()
    kill_pid(pid)
    wait_for(sup.woken.is_set, 5, interval=0.01, what="the crash event to wake the agent")
    wait_for(lambda: sup.states()["a"] == "EXITED", 5, interval=0.02, what="a EXITED from its event")
    sup.stop(SERVICES["a"])
    _start(sup, "b")
    sup.stop(SERVICES["b"])
    assert sup.states()["b"] == "STOPPED" and sup.states()["c"] == "STOPPED"
    assert sup.full_reads == reads, "states() asked supervisord for every program"


def test_a_gap_in_the_events_makes_one_full_read(sup):
    reads = sup.full_reads
    sup.states()
    assert sup.full_reads == reads
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:  # a datagram from nowhere: serial out of line
        s.sendto(b"999999 RUNNING c", str(sup.events_socket))
    wait_for(lambda: sup.feed.current(_now()) is None, 5, interval=0.02, what="the gap to be noticed")
    assert sup.states()["c"] == "STOPPED"  # the truth, from one full read
    assert sup.full_reads == reads + 1


def test_a_killed_listener_is_restarted_and_states_stay_true(sup):
    listener = sup.processes()[LISTENER_NAME]["pid"]
    os.kill(listener, signal.SIGKILL)
    wait_for(lambda: sup.processes()[LISTENER_NAME]["pid"] not in (0, listener), 10, interval=0.05,
             what="supervisord to restart the listener")
    _start(sup, "c")
    wait_for(lambda: sup.states()["c"] == "RUNNING", 5, interval=0.02, what="c RUNNING after the listener restart")
    kill_pid(sup.processes()["c"]["pid"])
    wait_for(lambda: sup.states()["c"] == "EXITED", 5, interval=0.02, what="c EXITED after the listener restart")


def test_supervisord_exits_at_once_after_the_agent_stopped_everything(sup):
    """The listener is stopped first: last, it held supervisord's exit a second per program group."""
    for name in SERVICES:
        _start(sup, name)
    sup.stop_all()
    started = _now()
    assert sup.fence_client.quit() is not None
    assert _now() - started < 4.0, "supervisord took a second per program to exit"


def test_running_is_known_soon_after_startsecs_not_at_supervisords_next_idle_wakeup(sup):
    """supervisord declares RUNNING only when its loop turns (idle: once a second, in step with its
    last wake-up); reading the states nudges it while a program is STARTING, so each program is
    RUNNING about startsecs after its own start. Starts a quarter second apart put the loop out of
    step with some of them."""
    started, running = {}, {}
    deadline = _now() + 6
    for name in SLOW:
        started[name] = _now()
        _start(sup, name)
        pause = _now() + 0.35
        while _now() < pause:
            sup.states()
            time.sleep(0.05)
    while len(running) < len(SLOW) and _now() < deadline:
        for name, state in sup.states().items():
            if name in SLOW and state == "RUNNING" and name not in running:
                running[name] = _now()
        time.sleep(0.05)
    late = {name: round(running.get(name, deadline) - started[name], 2) for name in SLOW}
    assert max(late.values()) < 1.45, f"seconds from each start to RUNNING (startsecs 1): {late}"


def test_a_stopped_program_stops_at_once_when_resumed_after_the_stop_signal(sup):
    """SIGSTOPped (hung in a debugger, or a test of a hang): SIGTERM waits until SIGCONT, so the actuator resumes
    the cgroup right after supervisord's stop signal, as systemd does; else it would sit out stopwaitsecs (10 s)."""
    from etcdha import cgroup

    group = sup.cgroups.group("patient")
    sup.start(PATIENT, 7, group, sup.pid)
    pid = wait_for(lambda: cgroup.pids(group), 5, what="patient to run")[0]
    os.kill(pid, signal.SIGSTOP)
    began = time.monotonic()
    sup.stop(PATIENT, lambda: cgroup.signal_all(group, signal.SIGCONT))
    assert time.monotonic() - began < 5, "the stop waited for stopwaitsecs"
    assert not cgroup.populated(group)


def test_a_few_programs_are_asked_about_directly_not_with_a_full_read(sup):
    _start(sup, "d")
    wait_for(lambda: sup.states()["d"] == "RUNNING", 5, interval=0.02, what="d RUNNING")
    reads = sup.full_reads
    kill_pid(sup.processes()["d"]["pid"])
    reads += 1
    wait_for(lambda: sup.states_of(["d", "e"]) == {"d": "EXITED", "e": "STOPPED"}, 5, interval=0.02,
             what="d EXITED when asked directly")
    assert sup.states_of(["no-such-program"]) == {}
    assert sup.full_reads == reads


def test_running_is_known_while_the_events_are_held_up_and_events_rule_again_after(sup):
    """In a takeover supervisord's event queue drains one event per turn of its loop, behind the
    spawns: a program past its startsecs is asked about directly, so RUNNING does not wait for the
    queue. Here the listener is frozen, so no event comes at all until it is resumed."""
    listener = sup.processes()[LISTENER_NAME]["pid"]
    reads = sup.full_reads
    os.kill(listener, signal.SIGSTOP)
    try:
        _start(sup, "slow1")
        started = _now()
        wait_for(lambda: sup.states()["slow1"] == "RUNNING", 5, interval=0.05, what="slow1 RUNNING, events held up")
        assert _now() - started >= 0.9, "RUNNING before its startsecs (1 s)"
        assert sup.feed.current(_now()) is not None and sup.full_reads == reads, "not a full read: one direct ask"
    finally:
        os.kill(listener, signal.SIGCONT)
    wait_for(lambda: not sup.feed._awaiting, 5, interval=0.05,
             what="the held-up events to come (the stale STARTING passed over, then RUNNING awaited)")
    assert sup.states()["slow1"] == "RUNNING"
    kill_pid(sup.processes()["slow1"]["pid"])
    wait_for(lambda: sup.states()["slow1"] == "EXITED", 5, interval=0.02, what="slow1 EXITED from its event")


def test_a_startsecs_0_program_is_running_as_soon_as_its_start_returns(sup):
    """supervisord makes a startsecs-0 program RUNNING inside startProcess; the state read in the same
    round trip says so, so the agent publishes RUNNING without waiting for an event (here none can
    come: the listener is frozen) or a direct read a moment later."""
    listener = sup.processes()[LISTENER_NAME]["pid"]
    reads = sup.full_reads
    os.kill(listener, signal.SIGSTOP)
    try:
        sup._next_refresh = _now() + 3600  # no direct read of due programs either: the start's own answer only
        failed = sup.start_many([(SERVICES[n], 7, sup.cgroups.group(n)) for n in ("b", "c", "slow2")], sup.pid)
        assert failed == {}
        states = sup.states()
        assert (states["b"], states["c"]) == ("RUNNING", "RUNNING"), states
        assert states["slow2"] == "STARTING", "startsecs 1: RUNNING only after a second"
        assert sup.full_reads == reads, "known from the start's own answer, not from a full read"
    finally:
        sup._next_refresh = 0.0
        os.kill(listener, signal.SIGCONT)
    wait_for(lambda: not sup.feed._awaiting, 5, interval=0.05, what="the held-up events to come")
    assert sup.states()["b"] == "RUNNING"


def test_a_start_puts_one_marker_in_the_event_stream_not_an_event_per_program(sup):
    """supervisord spent about a millisecond of its loop per event it handed the listener: the starts
    the agent makes are known from their answers, so a chunk of them costs one event (its marker)."""
    names = ["a", "b", "c", "d", "e", "f", "g", "h"]
    wait_for(lambda: not sup.feed._awaiting, 5, interval=0.02, what="the first full read's marker")
    before = sup.feed.events
    failed = sup.start_many([(SERVICES[n], 7, sup.cgroups.group(n)) for n in names], sup.pid)
    assert failed == {}
    wait_for(lambda: sup.feed.events > before and not sup.feed._awaiting, 5, interval=0.02, what="the marker")
    time.sleep(0.3)  # anything else would have come by now
    assert sup.feed.events - before == 1
    assert all(sup.states()[n] == "RUNNING" for n in names)


def test_an_exit_queued_before_a_restart_does_not_undo_the_restart(sup):
    """The exit of a program's last life can still be in supervisord's queue when the agent starts it
    again (during a takeover the listener is far behind): it comes before the start's marker, so it
    is older than the start's answer and ignored; an exit after the marker counts."""
    _start(sup, "e")
    wait_for(lambda: sup.states()["e"] == "RUNNING", 5, interval=0.02, what="e RUNNING")
    listener = sup.processes()[LISTENER_NAME]["pid"]
    os.kill(listener, signal.SIGSTOP)
    try:
        kill_pid(sup.processes()["e"]["pid"])
        wait_for(lambda: sup.states_of(["e"]) == {"e": "EXITED"}, 5, interval=0.02, what="supervisord to see e exit")
        _start(sup, "e")
        assert sup.states()["e"] == "RUNNING"
    finally:
        os.kill(listener, signal.SIGCONT)
    wait_for(lambda: not sup.feed._awaiting, 5, interval=0.05, what="the held-up exit and the marker to come")
    assert sup.states()["e"] == "RUNNING", "the last life's exit undid the restart"
    kill_pid(sup.processes()["e"]["pid"])
    wait_for(lambda: sup.states()["e"] == "EXITED", 5, interval=0.02, what="e EXITED from its event")
