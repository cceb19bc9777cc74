"""systemd integration: the unit file verifies, and a real agent speaks the notify protocol.

The agent runs with a process-only service (no VIP, no root needed) against the
fixture's etcd, with NOTIFY_SOCKET pointing at a datagram socket this test reads.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import yaml

from .conftest import stop_process, wait_for

pytestmark = pytest.mark.store

REPO = Path(__file__).resolve().parents[2]


def unit_settings(unit: str) -> dict[str, str]:
    """KEY=VALUE of the [Service] section (the last one wins, as in systemd)."""
    found, section = {}, ""
    for line in unit.splitlines():
        line = line.strip()
        if line.startswith("["):
            section = line
        elif section == "[Service]" and "=" in line and not line.startswith("#"):
            key, value = line.split("=", 1)
            found[key.strip()] = value.strip()
    return found


def test_unit_file_verifies(tmp_path):
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed (package systemd)")
    etcdha = Path(sys.executable).with_name("etcdha")
    unit = (REPO / "deploy" / "etcdha.service").read_text()
    assert "Type=notify" in unit and "WatchdogSec=" in unit and "Restart=always" in unit
    service = unit_settings(unit)
    # containment in production: the services live in the unit's delegated cgroup, so when the agent
    # dies (its fence with it) systemd SIGKILLs everything left there before restarting it
    assert service["Delegate"] == "yes"
    assert service["KillMode"] == "mixed"
    assert service.get("ProtectControlGroups", "no") == "no", "the agent must be able to write its cgroups"
    # whatever the unit restricts, it restricts for every supervised service too: none of it is set
    for reaches_services in ("CapabilityBoundingSet", "AmbientCapabilities", "NoNewPrivileges", "ProtectSystem",
                             "ProtectHome", "PrivateTmp", "PrivateDevices", "ProtectKernelTunables",
                             "RestrictAddressFamilies", "ReadOnlyPaths", "InaccessiblePaths", "SystemCallFilter"):
        assert reaches_services not in service, f"{reaches_services}= would reach the services"
    # an agent crash under systemd is a handoff too: after the kill, stop-post revokes the lease
    assert service["ExecStopPost"].split()[1:] == ["stop-post", "--config", "/etc/etcdha/agent.yaml"]
    # verify the shipped file with ExecStart pointing at this checkout's etcdha (the only local change)
    local = tmp_path / "etcdha.service"
    local.write_text(unit.replace("/opt/etcdha/venv/bin/etcdha", str(etcdha)))  # ExecStart and ExecStopPost
    res = subprocess.run(["systemd-analyze", "verify", str(local)], capture_output=True, text=True, timeout=60)
    problems = [line for line in (res.stdout + res.stderr).splitlines()
                if str(local) in line or "etcdha.service" in line]
    assert res.returncode == 0 and not problems, res.stdout + res.stderr


def test_agent_speaks_the_notify_protocol(etcd_server, tmp_path, cgroup_root):
    sock_path = tmp_path / "notify.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(str(sock_path))
    listener.settimeout(0.5)
    config = tmp_path / "agent.yaml"
    config.write_text(yaml.safe_dump({
        "node": "sd1", "etcd": {"endpoints": [etcd_server.endpoint], "prefix": f"/sd-{uuid.uuid4().hex[:8]}"},
        "run_dir": str(tmp_path / "run"), "cgroup_root": str(cgroup_root), "startup_grace": 0,
        "services": {"sleeper": {"command": ["sleep", "300"], "startsecs": 0}},
    }))
    env = {**os.environ, "NOTIFY_SOCKET": str(sock_path), "WATCHDOG_USEC": "2000000"}
    agent = subprocess.Popen([sys.executable, "-m", "etcdha", "agent", "--config", str(config)], env=env,
                             stdout=subprocess.DEVNULL, stderr=(tmp_path / "agent.log").open("wb"))
    messages: list[str] = []

    def read_until(predicate, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                messages.extend(listener.recv(4096).decode().split("\n"))
            except socket.timeout:
                pass
            if predicate():
                return True
        return False

    try:
        assert read_until(lambda: "READY=1" in messages, 20), f"no READY=1; got {messages}"
        ready_at = messages.index("READY=1")
        assert read_until(lambda: messages[ready_at:].count("WATCHDOG=1") >= 3, 10), \
            f"no repeated WATCHDOG=1 after READY; got {messages}"
        agent.send_signal(signal.SIGTERM)
        assert read_until(lambda: "STOPPING=1" in messages, 10), f"no STOPPING=1; got {messages}"
        assert agent.wait(30) == 0
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.wait(10)
        listener.close()
        print((tmp_path / "agent.log").read_text()[-3000:])


def test_under_a_delegated_unit_the_agent_moves_to_a_leaf_and_services_go_beside_it(etcd_server, tmp_path,
                                                                                    cgroup_root):
    """What Delegate=yes gives the agent, reproduced without systemd: a unit cgroup marked as delegated
    (the trusted.delegate xattr systemd sets) and INVOCATION_ID in the environment, no cgroup_root."""
    unit = cgroup_root / "etcdha-test.service"
    unit.mkdir(parents=True)
    os.setxattr(unit, "trusted.delegate", b"1")
    config = tmp_path / "agent.yaml"
    config.write_text(yaml.safe_dump({
        "node": "sd2", "etcd": {"endpoints": [etcd_server.endpoint], "prefix": f"/sd-{uuid.uuid4().hex[:8]}"},
        "run_dir": str(tmp_path / "run"), "startup_grace": 0,
        "services": {"sleeper": {"command": ["sleep", "300"], "startsecs": 0}},
    }))
    env = {**os.environ, "INVOCATION_ID": uuid.uuid4().hex}
    # enter the "unit" first, as systemd starts a service inside its cgroup
    agent = subprocess.Popen(["sh", "-c", f'echo $$ > "{unit}/cgroup.procs" && exec "$@"', "sh",
                              sys.executable, "-m", "etcdha", "agent", "--config", str(config)], env=env,
                             stdout=subprocess.DEVNULL, stderr=(tmp_path / "agent.log").open("wb"))
    try:
        wait_for(lambda: (unit / "services" / "sleeper" / "cgroup.procs").exists() and
                 (unit / "services" / "sleeper" / "cgroup.procs").read_text().split(), 20,
                 what="the service to run in UNIT/services/sleeper")
        own = Path(f"/proc/{agent.pid}/cgroup").read_text()
        assert f"0::/{unit.relative_to(cgroup_root.parent)}/agent\n" in own, own
        assert (unit / "cgroup.procs").read_text().split() == [], "no process left in the unit's inner node"
    finally:
        stop_process(agent)
    assert agent.returncode == 0, (tmp_path / "agent.log").read_text()
    assert not (unit / "services" / "sleeper").exists(), "a graceful stop gives the service cgroups back"


def _agent_under_journald(tmp_path: Path, cgroup_root: Path, name: str, endpoint: str, until: str) -> list[str]:
    """Run an agent whose stderr JOURNAL_STREAM names, until its log says `until`; SIGTERM it; its lines."""
    config = tmp_path / f"{name}.yaml"
    config.write_text(yaml.safe_dump({
        "node": name, "etcd": {"endpoints": [endpoint], "prefix": f"/jd-{uuid.uuid4().hex[:8]}"},
        "run_dir": str(tmp_path / f"{name}-run"), "cgroup_root": str(cgroup_root),
        "services": {"sleeper": {"command": ["sleep", "300"], "startsecs": 0}},
    }))
    log = tmp_path / f"{name}.log"
    with log.open("wb") as stderr:
        st = os.fstat(stderr.fileno())
        env = {**os.environ, "JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}
        agent = subprocess.Popen([sys.executable, "-m", "etcdha", "agent", "--config", str(config)], env=env,
                                 stdout=subprocess.DEVNULL, stderr=stderr)
    try:
        deadline = time.monotonic() + 20
        while until not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.1)
        agent.send_signal(signal.SIGTERM)
        assert agent.wait(30) == 0
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.wait(10)
    return log.read_text().splitlines()


def test_under_journald_every_line_has_a_priority(etcd_server, tmp_path, cgroup_root):
    """With JOURNAL_STREAM naming its stderr (what systemd sets), warnings are <4>, errors <3>, the rest <6>,
    the fence's own lines included; `journalctl -p warning` then shows what matters."""
    waiting = _agent_under_journald(tmp_path, cgroup_root, "jd1", "http://127.0.0.1:1", "cannot join yet")  # nobody answers
    joined = _agent_under_journald(tmp_path, cgroup_root, "jd2", etcd_server.endpoint, "joined as jd2")
    for lines in (waiting, joined):
        ours = [line for line in lines if "etcdha" in line]
        # nothing of ours without a priority (supervisord's own lines are its business)
        assert all(line[:3] in ("<2>", "<3>", "<4>", "<6>", "<7>") for line in ours
                   if line.startswith(("etcdha", "<"))), lines
    assert any(line.startswith("<4>etcdha.agent: cannot join yet") for line in waiting), waiting
    assert any(line.startswith("<6>etcdha.agent: agent jd1 starting") for line in waiting), waiting
    # it never joined, so it started no fence and no supervisord, and stopping says nothing about them
    assert not any("supervisord" in line or "etcdha-fence[" in line for line in waiting), waiting
    assert any(line.startswith("<6>etcdha-fence[") and line.endswith("quit") for line in joined), joined



def test_a_service_under_the_units_capability_bounding_set_can_bind_a_low_port():
    """What the unit allows is what a service gets: run a bind to port 80 as root under the unit's bounding set
    (all capabilities when the unit sets none), in a network namespace of its own."""
    if shutil.which("setpriv") is None or shutil.which("unshare") is None:
        pytest.skip("needs setpriv and unshare (util-linux)")
    if os.geteuid() != 0:
        pytest.skip("needs root")
    bounding = unit_settings((REPO / "deploy" / "etcdha.service").read_text()).get("CapabilityBoundingSet")
    caps = ["-all"] + [f"+{c.lower().removeprefix('cap_')}" for c in bounding.split()] if bounding else ["+all"]
    bind = "import socket; s = socket.socket(); s.bind(('0.0.0.0', 80)); print('bound')"
    res = subprocess.run(["unshare", "--net", "setpriv", f"--bounding-set={','.join(caps)}", "--",
                          sys.executable, "-c", bind], capture_output=True, text=True, timeout=30)
    assert res.returncode == 0 and res.stdout.strip() == "bound", res.stderr
    # and the check can fail: without CAP_NET_BIND_SERVICE in the set, the same bind is refused
    res = subprocess.run(["unshare", "--net", "setpriv", "--bounding-set=-net_bind_service",
                          "--", sys.executable, "-c", bind], capture_output=True, text=True, timeout=30)
    assert res.returncode != 0 and "Permission denied" in res.stderr, res.stdout + res.stderr
