"""A real supervisord under the real fence process (no root, no VIPs, no etcd needed)."""
from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from etcdha.config import Config, EtcdConfig, Service
from etcdha.fence import FIRED_EXIT, FenceClient
from etcdha.supervisord import Supervisor

from .conftest import kill_pid, pid_alive, wait_for

pytestmark = pytest.mark.store

SERVICE = Service(name="sleeper", command=("sleep", "300"), startsecs=0, startretries=0, stopwaitsecs=2)


@dataclass
class Stack:
    config: Config
    supervisor: Supervisor
    fence: FenceClient
    supervisord_pid: int
    program_pid: int = 0


@pytest.fixture
def stack(request):
    # A short path of our own: supervisord's unix socket path must fit in 108 bytes.
    run_dir = Path(tempfile.mkdtemp(prefix="ehf-", dir="/tmp"))
    config = Config(node="n1", etcd=EtcdConfig(), services={SERVICE.name: SERVICE}, run_dir=run_dir)
    supervisor = Supervisor(config)
    supervisor.prepare()
    fence = FenceClient(0.3, [], supervisor.command())
    pids: list[int] = []

    def cleanup() -> None:
        if fence.proc is not None and fence.proc.poll() is None:
            fence.proc.kill()
            try:
                fence.proc.wait(5)
            except subprocess.TimeoutExpired:
                pass
        for pid in pids:
            kill_pid(pid)
        shutil.rmtree(run_dir, ignore_errors=True)

    request.addfinalizer(cleanup)
    supervisord_pid = fence.start()
    pids.append(supervisord_pid)
    supervisor.wait_ready(timeout=10)
    s = Stack(config, supervisor, fence, supervisord_pid)

    supervisor.start(SERVICE, token=42)
    wait_for(lambda: supervisor.states().get(SERVICE.name) == "RUNNING", 5, interval=0.05,
             what="the program to reach RUNNING")
    s.program_pid = supervisor.pids()[SERVICE.name]
    pids.append(s.program_pid)
    # startsecs=0: RUNNING is reported at fork; wait until the child has exec'd the program.
    wait_for(lambda: _cmdline(s.program_pid)[:2] == [b"sleep", b"300"], 5, interval=0.01,
             what="the program to be exec'd")
    return s


def _cmdline(pid: int) -> list[bytes]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return []


def _dead(*pids: int) -> bool:
    return not any(pid_alive(p) for p in pids)


def test_program_runs_with_the_fencing_token(stack):
    environ = Path(f"/proc/{stack.program_pid}/environ").read_bytes().split(b"\0")
    assert b"ETCDHA_FENCING_TOKEN=42" in environ
    assert b"ETCDHA_SERVICE=sleeper" in environ
    assert b"ETCDHA_NODE=n1" in environ
    assert _cmdline(stack.program_pid)[:2] == [b"sleep", b"300"]
    assert pid_alive(stack.supervisord_pid)
    assert stack.fence.alive()


def test_fence_fires_at_the_deadline_minus_margin(stack):
    fed_at = time.monotonic()
    stack.fence.feed(fed_at + 1.0)  # margin 0.3: fires about 0.7 s from now
    wait_for(lambda: _dead(stack.program_pid, stack.supervisord_pid), 2, interval=0.02,
             what="the program and supervisord to be killed")
    died_after = time.monotonic() - fed_at
    assert died_after >= 0.5, f"the fence fired {died_after:.2f}s after the feed, before deadline - margin"
    assert stack.fence.proc.wait(2) == FIRED_EXIT
    wait_for(lambda: any(m.startswith("fired lease deadline") for m in stack.fence.messages), 2,
             what="the fence to report why it fired")


def test_renewed_deadline_keeps_the_fence_quiet(stack):
    end = time.monotonic() + 1.5
    for _ in range(40):
        if time.monotonic() >= end:
            break
        stack.fence.feed(time.monotonic() + 1.0)
        time.sleep(0.1)
    assert stack.fence.alive()
    assert pid_alive(stack.program_pid)
    assert stack.fence.quit(timeout=20) == 0


def test_closing_the_fence_pipe_kills_the_program_at_once(stack):
    closed_at = time.monotonic()
    stack.fence.proc.stdin.close()
    wait_for(lambda: _dead(stack.program_pid), 1.0, interval=0.01, what="the program to be killed")
    assert time.monotonic() - closed_at < 1.0
    assert stack.fence.proc.wait(2) == FIRED_EXIT
    assert _dead(stack.supervisord_pid)
    wait_for(lambda: any("agent gone" in m for m in stack.fence.messages), 2,
             what="the fence to report the closed pipe")


def test_quit_stops_everything_and_exits_zero(stack):
    assert stack.fence.quit(timeout=20) == 0
    wait_for(lambda: _dead(stack.program_pid, stack.supervisord_pid), 2, what="everything to be gone")
    assert "quit" in stack.fence.messages or wait_for(lambda: "quit" in stack.fence.messages, 2,
                                                        what="the fence to say quit")
