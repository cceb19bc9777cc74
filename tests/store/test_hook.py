"""The notification hook with real processes: in order, exactly once each, a hanging call killed with its children."""
from __future__ import annotations

import json
import logging
import sys
import time

import pytest

from etcdha import cgroup
from etcdha.events import Hook
from etcdha.model import Event

pytestmark = pytest.mark.store

RECORD = ("import json, os, sys; open(sys.argv[1], 'a').write(json.dumps([os.environ['ETCDHA_EVENT'], "
          "os.environ['ETCDHA_SERVICE']]) + chr(10))")


def event(name: str, service: str = "web") -> Event:
    return Event(service=service, time=time.time(), node="n1", event=name, reason="r", token=7)


def lines(path) -> list:
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def test_calls_come_in_order_exactly_once_without_blocking_the_caller(tmp_path):
    out = tmp_path / "calls"
    hook = Hook([sys.executable, "-c", RECORD, str(out)], timeout=5)
    began = time.monotonic()
    for name in ("claimed", "started", "stopped", "released"):
        hook(event(name))
    assert time.monotonic() - began < 0.1, "emitting never waits for the command"
    hook.close(timeout=20)
    assert lines(out) == [["claimed", "web"], ["started", "web"], ["stopped", "web"], ["released", "web"]]


def test_a_hanging_call_is_killed_with_what_it_started_and_the_next_one_runs(tmp_path, cgroup_root, caplog):
    out = tmp_path / "calls"
    script = f'[ "$ETCDHA_EVENT" = claimed ] && {{ sleep 100 & sleep 100; }}; echo "$ETCDHA_EVENT" >> {out}'
    group = cgroup_root / "_hooks"
    hook = Hook(["/bin/sh", "-c", script], timeout=0.3, group=group)
    with caplog.at_level(logging.ERROR, logger="etcdha.events"):
        began = time.monotonic()
        hook(event("claimed"))
        hook(event("started"))
        hook.close(timeout=10)
    assert out.read_text().split() == ["started"]
    assert time.monotonic() - began < 5
    assert not cgroup.populated(group), cgroup.pids(group)
    assert "notification hook for claimed web: killed after its timeout of 0.3s" in caplog.text


def test_a_failing_or_missing_command_is_logged_and_the_next_call_still_runs(tmp_path, caplog):
    out = tmp_path / "calls"
    hook = Hook(["/bin/sh", "-c", f'echo "$ETCDHA_EVENT" >> {out}; [ "$ETCDHA_EVENT" != claimed ] || exit 4'],
                timeout=5)
    missing = Hook(["/no/such/hook"], timeout=5)
    with caplog.at_level(logging.ERROR, logger="etcdha.events"):
        hook(event("claimed"))
        hook(event("started"))
        missing(event("claimed"))
        hook.close(timeout=10)
        missing.close(timeout=10)
    assert out.read_text().split() == ["claimed", "started"]
    assert "notification hook for claimed web: exit 4" in caplog.text
    assert "notification hook for claimed web: cannot run /no/such/hook" in caplog.text


def test_closing_kills_a_call_still_running(tmp_path, cgroup_root):
    group = cgroup_root / "_hooks"
    hook = Hook(["/bin/sh", "-c", "sleep 100 & sleep 100"], timeout=60, group=group)
    hook(event("claimed"))
    deadline = time.monotonic() + 5
    while len(cgroup.pids(group) if group.exists() else []) < 2:
        assert time.monotonic() < deadline, "the call did not start"
        time.sleep(0.02)
    began = time.monotonic()
    hook.close(timeout=0.5)
    assert time.monotonic() - began < 5
    assert not cgroup.populated(group), cgroup.pids(group)
