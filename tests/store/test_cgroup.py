"""NodeCgroups against the real kernel (root, cgroup v2): refusals, the lock, stop semantics, leftovers."""
from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import pytest

from etcdha import cgroup
from etcdha.cgroup import ContainmentError, NodeCgroups, Placement
from etcdha.errors import ConfigError

pytestmark = pytest.mark.store


def start_in(group: Path, script: str) -> subprocess.Popen:
    """A shell that enters `group` first, then runs `script` (its children stay in the cgroup)."""
    return subprocess.Popen(["sh", "-c", f'echo $$ > "{group}/cgroup.procs" && {script}'],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)


def stop_watching(node: NodeCgroups, watcher: cgroup.EventsWatcher, procs: list[subprocess.Popen]) -> None:
    """Teardown of the events-watcher tests: the watcher, every process started, the subtree."""
    watcher.stop()
    watcher.join(5)
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait(5)
    node.empty_all(5.0)
    node.release()


def wait_count(group: Path, n: int, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while len(cgroup.pids(group)) < n:
        assert time.monotonic() < deadline, f"expected {n} processes in {group}, got {cgroup.pids(group)}"
        time.sleep(0.01)


def test_a_root_outside_the_cgroup2_mount_is_refused_and_nothing_is_created(tmp_path, cgroup_root):
    where = tmp_path / "not-a-cgroup"
    with pytest.raises(ConfigError, match="not a directory below the cgroup v2 mount"):
        NodeCgroups(Placement(where, None, "test"), ["web"]).setup()
    assert not where.exists()


def test_a_second_owner_of_the_same_subtree_is_refused(cgroup_root):
    first = NodeCgroups(Placement(cgroup_root), ["web"])
    first.setup()
    try:
        with pytest.raises(ConfigError, match="another etcdha agent already uses the cgroup"):
            NodeCgroups(Placement(cgroup_root), ["web"]).setup()
    finally:
        first.release()
    again = NodeCgroups(Placement(cgroup_root), ["web"])
    again.setup()  # released: the next agent may take it
    again.release()


def test_stop_sigterms_then_kills_what_ignores_it_and_returns_only_when_empty(cgroup_root):
    node = NodeCgroups(Placement(cgroup_root), ["web"])
    node.setup()
    group = node.group("web")
    polite = start_in(group, "exec sleep 300")
    stubborn = start_in(group, "trap '' TERM; while :; do sleep 0.05; done")
    wait_count(group, 3)
    began = time.monotonic()
    node.stop("web", grace=5.0, deadline=began + 1.0)
    took = time.monotonic() - began
    assert not cgroup.populated(group)
    assert 0.9 <= took < 3.0, f"the stubborn shell should be killed at the deadline (1 s), took {took:.2f}s"
    assert polite.wait(5) == -signal.SIGTERM, "the polite one got SIGTERM first"
    assert stubborn.wait(5) == -signal.SIGKILL
    node.release()


def test_leftovers_are_found_even_for_services_no_longer_configured(cgroup_root):
    old = NodeCgroups(Placement(cgroup_root), ["web", "gone"])
    old.setup()
    procs = [start_in(old.group("gone"), "exec sleep 300"), start_in(old.group("web"), "exec sleep 300")]
    wait_count(old.group("gone"), 1)
    wait_count(old.group("web"), 1)
    old.release()  # the lock goes; the processes stay, as after a crash
    new = NodeCgroups(Placement(cgroup_root), ["web"])
    new.setup()
    assert new.leftovers() == {"gone": 1, "web": 1}
    assert new.counts() == {"web": 1}
    assert new.empty_all(5.0)
    assert [p.wait(5) for p in procs] == [-signal.SIGKILL, -signal.SIGKILL]
    assert new.leftovers() == {}
    new.release()


def test_kill_all_reaches_processes_in_nested_cgroups(cgroup_root):
    node = NodeCgroups(Placement(cgroup_root), ["web"])
    node.setup()
    nested = node.group("web") / "inner"
    nested.mkdir()
    proc = start_in(nested, "exec sleep 300")
    wait_count(node.group("web"), 1)
    assert node.counts() == {"web": 1}
    assert node.empty_all(5.0)
    assert proc.wait(5) == -signal.SIGKILL
    cgroup.remove(node.group("web"))
    node.release()


def test_stop_raises_when_the_kill_does_not_empty_the_cgroup(cgroup_root, monkeypatch):
    """A process stuck in the kernel survives SIGKILL; a frozen cgroup stands in for it here."""
    node = NodeCgroups(Placement(cgroup_root), ["web"])
    node.setup()
    group = node.group("web")
    start_in(group, "trap '' TERM; while :; do sleep 0.05; done")
    wait_count(group, 1)
    monkeypatch.setattr(cgroup, "kill", lambda g: None)  # the kill "does nothing", as for a D-state process
    with pytest.raises(ContainmentError, match="survive SIGKILL"):
        node.stop("web", grace=0.3, deadline=time.monotonic() + 0.1)
    monkeypatch.undo()
    assert node.empty_all(5.0)
    node.release()


def test_events_watcher_wakes_when_a_service_cgroup_fills_and_empties(cgroup_root):
    import threading

    node = NodeCgroups(Placement(cgroup_root), ["web", "db"])
    node.setup()
    woke = threading.Event()
    watcher = node.watch(woke.set)
    try:
        time.sleep(0.2)
        woke.clear()
        proc = start_in(node.group("db"), "exec sleep 300")
        assert woke.wait(2), "no wake when the cgroup filled"
        wait_count(node.group("db"), 1)
        woke.clear()
        proc.kill()
        proc.wait(5)
        assert woke.wait(2), "no wake when the cgroup emptied (a crash)"
    finally:
        watcher.stop()
        watcher.join(5)
        node.release()


def test_counts_follow_the_events_watcher_and_read_only_populated_cgroups(cgroup_root, monkeypatch):
    names = [f"s{i}" for i in range(20)]
    node = NodeCgroups(Placement(cgroup_root), names)
    node.setup()
    woken = []
    watcher = node.watch(lambda: woken.append(1))
    procs = []
    try:
        deadline = time.monotonic() + 5
        while len(watcher.populated) < len(names):  # armed: every group's state read once
            assert time.monotonic() < deadline, "the events watcher did not arm"
            time.sleep(0.01)
        reads = []
        real = cgroup.populated
        monkeypatch.setattr(cgroup, "populated", lambda g: reads.append(g) or real(g))
        assert node.counts() == {n: 0 for n in names}
        assert reads == [], "empty cgroups the watcher knows were read again"
        procs.append(start_in(node.group("s3"), "{ sleep 300 & } ; exec sleep 300"))
        deadline = time.monotonic() + 5
        while node.counts()["s3"] != 2:
            assert time.monotonic() < deadline, f"counts never saw s3 fill: {node.counts()['s3']}"
            time.sleep(0.01)
        assert woken, "filling a cgroup did not wake the agent"
        cgroup.kill(node.group("s3"))
        deadline = time.monotonic() + 5
        while node.counts()["s3"] != 0:
            assert time.monotonic() < deadline, "counts never saw s3 empty"
            time.sleep(0.01)
        assert procs[0].wait(5) == -signal.SIGKILL
    finally:
        stop_watching(node, watcher, procs)
    assert node.counts()["s3"] == 0  # the watcher gone: read from the files again


def test_running_counts_are_reused_for_a_while_but_never_when_empty(cgroup_root, monkeypatch):
    """A count passed as reusable comes from the last read for up to COUNT_MAX_AGE while the watcher
    says populated; one not passed, or an emptied cgroup, is read (or known 0) at once."""
    names = ["s1", "s2"]
    node = NodeCgroups(Placement(cgroup_root), names)
    node.setup()
    watcher = node.watch(lambda: None)
    procs = []
    try:
        deadline = time.monotonic() + 5
        while len(watcher.populated) < len(names):
            assert time.monotonic() < deadline, "the events watcher did not arm"
            time.sleep(0.01)
        procs += [start_in(node.group("s1"), "exec sleep 300"), start_in(node.group("s2"), "exec sleep 300")]
        wait_count(node.group("s1"), 1)
        wait_count(node.group("s2"), 1)
        monkeypatch.setattr(cgroup, "COUNT_MAX_AGE", 3600.0)
        assert node.counts() == {"s1": 1, "s2": 1}
        procs += [start_in(node.group("s1"), "exec sleep 300"), start_in(node.group("s2"), "exec sleep 300")]
        wait_count(node.group("s1"), 2)
        wait_count(node.group("s2"), 2)
        assert node.counts(reuse={"s1"}) == {"s1": 1, "s2": 2}, "s1 reused within its age, s2 read"
        monkeypatch.setattr(cgroup, "COUNT_MAX_AGE", 0.0)
        assert node.counts(reuse={"s1"}) == {"s1": 2, "s2": 2}, "too old: read again"
        monkeypatch.setattr(cgroup, "COUNT_MAX_AGE", 3600.0)
        cgroup.kill(node.group("s1"))
        deadline = time.monotonic() + 5
        while watcher.populated.get(node.group("s1")) is not False:
            assert time.monotonic() < deadline, "the watcher never saw s1 empty"
            time.sleep(0.01)
        assert node.counts(reuse={"s1"})["s1"] == 0, "an emptied cgroup must never keep its old count"
    finally:
        stop_watching(node, watcher, procs)
