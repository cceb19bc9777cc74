"""Two agents configured with the same node name: the second refuses to run, the first is unharmed.

Real agents (process-only services, no VIP; root for their cgroups) against the fixture's etcd.
"""
from __future__ import annotations

import subprocess
import sys
import time

import pytest
import yaml

from etcdha import cgroup

from .conftest import stop_process, wait_for

pytestmark = pytest.mark.store


def owner_of(store, service: str):
    owner = store.snapshot().owners.get(service)
    return owner.node if owner else None


def stop(*procs) -> None:
    for proc in procs:
        stop_process(proc, timeout=20)


def agent(tmp_path, endpoint, prefix, run: str, cgroup_root) -> subprocess.Popen:
    """An agent named "same"; `cgroup_root` tells whether two of them share a host (same subtree)."""
    config = tmp_path / f"{run}.yaml"
    config.write_text(yaml.safe_dump({
        "node": "same", "etcd": {"endpoints": [endpoint], "prefix": prefix}, "run_dir": str(tmp_path / run),
        "cgroup_root": str(cgroup_root), "lease_ttl": 2, "startup_grace": 0,
        "services": {"sleeper": {"command": ["sleep", "300"]}}}))
    return subprocess.Popen([sys.executable, "-m", "etcdha", "agent", "--config", str(config)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def test_a_second_agent_with_the_same_node_name_refuses(etcd_server, store, tmp_path, cgroup_root):
    first = agent(tmp_path, etcd_server.endpoint, store.prefix, "a", cgroup_root / "host-a")
    second = None
    try:
        wait_for(lambda: owner_of(store, "sleeper") == "same", 20, what="the first agent to own sleeper")
        token = store.snapshot().owners["sleeper"].token
        started = time.monotonic()
        second = agent(tmp_path, etcd_server.endpoint, store.prefix, "b", cgroup_root / "host-b")
        assert second.wait(30) == 1
        took = time.monotonic() - started
        err = second.stderr.read()
        assert "another agent is running as 'same'" in err and "Traceback" not in err
        assert 4 <= took < 20, f"refused after {took:.1f}s: it must first wait for a stale key to expire"
        assert first.poll() is None
        assert store.snapshot().owners["sleeper"].token == token, "the first agent kept its service"
    finally:
        stop(first, second)


def test_a_second_agent_on_the_same_host_refuses_at_once_and_kills_nothing(etcd_server, store, tmp_path,
                                                                          cgroup_root):
    first = agent(tmp_path, etcd_server.endpoint, store.prefix, "a", cgroup_root)
    second = None
    try:
        wait_for(lambda: cgroup.pids(cgroup_root / "services" / "sleeper"), 20, what="the first agent to run sleeper")
        running = cgroup.pids(cgroup_root / "services" / "sleeper")
        second = agent(tmp_path, etcd_server.endpoint, store.prefix, "b", cgroup_root)
        assert second.wait(15) == 1
        err = second.stderr.read()
        assert f"another etcdha agent already uses the cgroup {cgroup_root}" in err and "Traceback" not in err
        assert cgroup.pids(cgroup_root / "services" / "sleeper") == running, "the second agent killed nothing"
        assert first.poll() is None
    finally:
        stop(first, second)


def test_a_restart_after_a_crash_waits_for_its_old_lease_and_joins(etcd_server, store, tmp_path, cgroup_root):
    first = agent(tmp_path, etcd_server.endpoint, store.prefix, "a", cgroup_root)
    second = None
    try:
        wait_for(lambda: "same" in store.snapshot().nodes, 20, what="the first agent to join")
        first.kill()  # its node key lives until the lease expires
        first.wait(10)
        second = agent(tmp_path, etcd_server.endpoint, store.prefix, "b", cgroup_root)
        wait_for(lambda: store.snapshot().owners.get("sleeper") is not None and
                 store.snapshot().nodes.get("same") is not None and
                 store.snapshot().owners["sleeper"].lease == store.snapshot().nodes["same"].lease,
                 20, what="the restarted agent to join and own sleeper")
        assert second.poll() is None
    finally:
        stop(first, second)

