"""A real supervisord under the real fence process, programs in real cgroups (root; no VIPs, no etcd)."""
from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from etcdha import cgroup
from etcdha.cgroup import NodeCgroups, Placement
from etcdha.config import Config, EtcdConfig, Service
from etcdha.fence import FIRED_EXIT, FenceClient
from etcdha.supervisord import Supervisor, launch_spec, launcher_command

from .conftest import kill_pid, pid_alive, wait_for

pytestmark = pytest.mark.store

SERVICE = Service(name="sleeper", command=("sleep", "300"), startsecs=0, startretries=0, stopwaitsecs=2)


@dataclass
class Stack:
    config: Config
    supervisor: Supervisor
    fence: FenceClient
    supervisord_pid: int
    cgroups: NodeCgroups
    program_pid: int = 0


@pytest.fixture
def stack(request, cgroup_root):
    # A short path of our own: supervisord's unix socket path must fit in 108 bytes.
    run_dir = Path(tempfile.mkdtemp(prefix="ehf-", dir="/tmp"))
    config = Config(node="n1", etcd=EtcdConfig(), services={SERVICE.name: SERVICE}, run_dir=run_dir)
    cgroups = NodeCgroups(Placement(cgroup_root), [SERVICE.name])
    cgroups.setup()
    supervisor = Supervisor(config)
    supervisor.prepare()
    fence = FenceClient(0.3, [], cgroups.services_dir, supervisor.command())
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
        cgroups.release()
        shutil.rmtree(run_dir, ignore_errors=True)

    request.addfinalizer(cleanup)
    supervisord_pid = fence.start()
    pids.append(supervisord_pid)
    supervisor.wait_ready(timeout=10)
    s = Stack(config, supervisor, fence, supervisord_pid, cgroups)

    supervisor.start(SERVICE, 42, cgroups.group(SERVICE.name), supervisord_pid)
    wait_for(lambda: supervisor.states().get(SERVICE.name) == "RUNNING", 5, interval=0.05,
             what="the program to reach RUNNING")
    s.program_pid = supervisor.processes()[SERVICE.name]["pid"]
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
    assert stack.fence.exit_reason().startswith("fired lease deadline reached without renewal: killed")


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


# ---- containment: the program and whatever it forks live in the service's cgroup -------------

def _spawn_escapee(stack) -> int:
    """Start a process in the service's cgroup that leaves the process tree and group (setsid, double fork)."""
    out = subprocess.run(["sh", "-c", f"echo $$ > {stack.cgroups.group(SERVICE.name)}/cgroup.procs && "
                          "setsid sh -c 'sleep 300 >/dev/null 2>&1 & echo $!' </dev/null"],
                         capture_output=True, text=True, timeout=10)
    pid = int(out.stdout.split()[-1])
    assert pid in cgroup.pids(stack.cgroups.group(SERVICE.name))
    return pid


def test_the_program_runs_in_its_own_cgroup(stack):
    assert cgroup.pids(stack.cgroups.group(SERVICE.name)) == [stack.program_pid]
    assert stack.cgroups.counts() == {SERVICE.name: 1}
    assert stack.supervisord_pid not in cgroup.pids(stack.cgroups.services_dir), "supervisord stays out of it"


def test_firing_kills_processes_that_left_the_process_tree(stack):
    escapee = _spawn_escapee(stack)
    stack.fence.fire()
    assert _dead(stack.program_pid, escapee, stack.supervisord_pid)
    assert not cgroup.populated(stack.cgroups.services_dir)
    assert any(m.startswith("fired asked by the agent") and "SURVIVE" not in m for m in stack.fence.messages)


def test_killing_the_fence_kills_supervisord_and_the_program_with_it(stack):
    """kill -9 of the fence: PDEATHSIG takes supervisord, and supervisord's death the program (launcher)."""
    stack.fence.proc.kill()
    wait_for(lambda: _dead(stack.supervisord_pid, stack.program_pid), 1.0, interval=0.01,
             what="supervisord and the program to die with the fence")
    assert stack.fence.exit_reason() == "killed by SIGKILL"


def test_supervisord_death_fires_the_fence_at_once(stack):
    escapee = _spawn_escapee(stack)
    killed_at = time.monotonic()
    kill_pid(stack.supervisord_pid)
    wait_for(lambda: _dead(stack.program_pid, escapee), 1.0, interval=0.01, what="every service process to die")
    assert time.monotonic() - killed_at < 1.0
    assert stack.fence.proc.wait(2) == FIRED_EXIT
    wait_for(lambda: any("fired supervisord exited" in m for m in stack.fence.messages), 2,
             what="the fence to say why it fired")


def _has_cap_sys_resource() -> bool:
    caps = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith("CapEff"))
    return bool(int(caps.split()[1], 16) & (1 << 24))


def test_fence_is_spared_by_the_oom_killer_and_supervisord_is_not(stack):
    fence_adj = Path(f"/proc/{stack.fence.proc.pid}/oom_score_adj").read_text().strip()
    if _has_cap_sys_resource():
        assert fence_adj == "-1000"
    else:  # e.g. a sandbox without CAP_SYS_RESOURCE: the fence must say it could not
        wait_for(lambda: any("oom_score_adj -1000" in m and "CAP_SYS_RESOURCE" in m for m in stack.fence.messages),
                 2, what="the fence to warn that it could not protect itself from the OOM killer")
    assert Path(f"/proc/{stack.supervisord_pid}/oom_score_adj").read_text().strip() == "0"
    assert Path(f"/proc/{stack.program_pid}/oom_score_adj").read_text().strip() == "0"


def test_launcher_refuses_to_start_under_another_parent(stack, tmp_path):
    spec = tmp_path / "web.sh"
    spec.write_text(launch_spec(SERVICE, "n1", 1, stack.cgroups.group(SERVICE.name), 1))
    res = subprocess.run(launcher_command(spec), capture_output=True, text=True, timeout=10)
    assert res.returncode == 125 and "is gone; not starting" in res.stderr
    assert cgroup.pids(stack.cgroups.group(SERVICE.name)) == [stack.program_pid]


def test_launcher_never_runs_a_program_outside_its_cgroup(tmp_path):
    spec = tmp_path / "web.sh"
    spec.write_text(launch_spec(SERVICE, "n1", 1, tmp_path / "no-such-cgroup", os.getpid()))
    res = subprocess.run(launcher_command(spec), capture_output=True, text=True, timeout=10)
    assert res.returncode == 126 and "not starting uncontained" in res.stderr


# ---- an agent crash is a handoff: the fence revokes the lease once the node is verified clean ---

@pytest.fixture
def handoff_stack(request, cgroup_root, etcd_server, store):
    """A fence that knows where etcd is, fed a real lease of `store`."""
    run_dir = Path(tempfile.mkdtemp(prefix="ehh-", dir="/tmp"))
    config = Config(node="n1", etcd=EtcdConfig(), services={SERVICE.name: SERVICE}, run_dir=run_dir)
    cgroups = NodeCgroups(Placement(cgroup_root), [SERVICE.name])
    cgroups.setup()
    supervisor = Supervisor(config)
    supervisor.prepare()
    fence = FenceClient(0.3, [], cgroups.services_dir, supervisor.command(),
                        etcd={"endpoints": [etcd_server.endpoint], "timeout": 1.0})
    pid = fence.start()

    def cleanup() -> None:
        if fence.proc.poll() is None:
            fence.proc.kill()
            fence.proc.wait(5)
        kill_pid(pid)
        cgroups.release()
        shutil.rmtree(run_dir, ignore_errors=True)

    request.addfinalizer(cleanup)
    supervisor.wait_ready(timeout=10)
    supervisor.start(SERVICE, 1, cgroups.group(SERVICE.name), pid)
    wait_for(lambda: cgroup.pids(cgroups.group(SERVICE.name)), 5, what="the program to run")
    lease, _ = store.grant(30)
    fence.lease(lease)
    fence.feed(time.monotonic() + 30)
    return fence, cgroups, lease


def test_when_the_agent_dies_the_fence_kills_verifies_and_revokes_its_lease(handoff_stack, store):
    fence, cgroups, lease = handoff_stack
    escapee_group = cgroups.group(SERVICE.name)
    assert store.keepalive(lease) > 0
    fence.proc.stdin.close()  # what the agent's death looks like to the fence
    assert fence.proc.wait(5) == FIRED_EXIT
    assert not cgroup.populated(escapee_group)
    assert store.keepalive(lease) <= 0, "the lease is revoked: other nodes take over at once"
    wait_for(lambda: any(m.startswith(f"handed over: revoked lease {lease:x}") for m in fence.messages), 2,
             what="the fence to report the handoff")


def test_a_fence_that_fires_on_its_deadline_does_not_revoke(handoff_stack, store):
    """The agent is alive then (hung or cut off): the lease runs out by itself, nothing is revoked early."""
    fence, _, lease = handoff_stack
    fence.feed(time.monotonic() + 0.4)
    assert fence.proc.wait(5) == FIRED_EXIT
    assert store.keepalive(lease) > 0
    assert not any("handed over" in m for m in fence.messages)
