"""A service as an ordinary user: its processes (what it forks included) and its exec checks run as that user,
while the agent keeps what needs root (the cgroup, the VIP)."""
from __future__ import annotations

import pwd
from pathlib import Path

import pytest
from lab import PORT, VIP, sample_service_command, wait_until

pytestmark = pytest.mark.e2e


def uid_of(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            return int(line.split()[1])
    raise AssertionError(f"no Uid line for {pid}")


def test_a_service_runs_as_nobody_with_its_checks(make_cluster, sampler, probe):
    nobody = pwd.getpwnam("nobody")
    check = {"exec": ["/bin/sh", "-c", f'test "$(id -u)" = {nobody.pw_uid} && test "$HOME" = "{nobody.pw_dir}"'],
             "interval": 0.5, "timeout": 0.5, "failure_threshold": 2}
    web = {"command": sample_service_command("web", PORT, "--orphan"), "vip": f"{VIP}/24", "interface": "eth0",
           "user": "nobody", "checks": [check]}
    cluster = make_cluster({"services": {"web": web}})
    wait_until(lambda: sampler.holder() == "n1" and probe.last() == "n1", 30, "n1 to serve web as nobody")
    n1 = cluster.nodes["n1"]
    wait_until(lambda: len(n1.service_pids()) >= 2, 10, "web and its detached helper")
    assert {uid_of(pid) for pid in n1.service_pids()} == {nobody.pw_uid}
    wait_until(lambda: cluster.status()["services"]["web"]["health"] == "passing", 15,
               "the exec check (run as nobody too) to pass")
    assert sampler.violations == []
