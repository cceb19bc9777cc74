"""etcd with authentication on, set up by deploy/etcd-auth.sh: the agent's role works, the read-only role serves
the CLI's read commands, a wrong password or a role that cannot write is one clear line, and no password is
ever printed, put on a command line or written to a file of ours."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from etcdha import gateway, model
from etcdha.cli import main
from etcdha.config import EtcdConfig
from etcdha.errors import AuthError
from etcdha.store import Store

from .conftest import LocalEtcd, find_etcd, wait_for

pytestmark = pytest.mark.store

REPO = Path(__file__).resolve().parents[2]
PREFIX = "/authtest"
AGENT_PW, READER_PW, ROOT_PW = "agent-s3cret-Q7", "reader-s3cret-K2", "root-s3cret-Z9"


@pytest.fixture(scope="module")
def auth_etcd(tmp_path_factory):
    binary = find_etcd()
    if binary is None:
        pytest.skip("no etcd binary (install etcd-server)")
    secrets = tmp_path_factory.mktemp("secrets")
    files = {}
    for name, pw in (("agent", AGENT_PW), ("reader", READER_PW), ("root", ROOT_PW), ("wrong", "not-it")):
        files[name] = secrets / f"{name}.pw"
        files[name].write_text(pw + "\n")
        files[name].chmod(0o600)
    server = LocalEtcd(binary)
    server.start()
    try:
        env = {**os.environ, "AGENT_PASSWORD_FILE": str(files["agent"]), "READER_PASSWORD_FILE": str(files["reader"]),
               "ROOT_PASSWORD_FILE": str(files["root"]), "ENDPOINTS": server.endpoint, "PREFIX": PREFIX}
        res = subprocess.run(["sh", str(REPO / "deploy" / "etcd-auth.sh")], env=env, capture_output=True, text=True,
                             timeout=60)
        assert res.returncode == 0, res.stdout + res.stderr
        assert "authentication enabled" in res.stdout
        again = subprocess.run(["sh", str(REPO / "deploy" / "etcd-auth.sh")], env=env, capture_output=True,
                               text=True, timeout=60)
        assert again.returncode == 0, again.stdout + again.stderr  # running it twice changes nothing
        server.files = files
        yield server
    finally:
        server.close()


def store_as(server, user, password_file) -> Store:
    return Store(EtcdConfig(endpoints=(server.endpoint,), prefix=PREFIX, timeout=2.0, username=user,
                            password_file=str(password_file) if password_file else None))


def cli(server, *args, user="etcdha-reader", pw="reader"):
    opts = ["--endpoints", server.endpoint, "--prefix", PREFIX]
    if user:
        opts += ["--user", user, "--password-file", str(server.files[pw])]
    return CliRunner().invoke(main, [*opts, *args], env={"ETCDHA_ETCD_PASSWORD": None, "ETCDHA_CONFIG": None})


def test_the_agent_role_reads_writes_watches_leases_and_logs_in_again_after_a_restart(auth_etcd):
    store = store_as(auth_etcd, "etcdha", auth_etcd.files["agent"])
    try:
        lease, _ = store.grant(5)
        assert store.register("a1", lease, model.encode_node("a1", lease, 1, 1.0, {}), {"web": model.encode_candidate(100)},
                              {"web": model.encode_service(None)}) is None
        woken = threading.Event()
        informer = store.informer(woken.set)
        informer.start()
        try:
            token = store.claim("web", "a1", lease, time.time())
            assert token
            view = wait_for(lambda: (v := informer.view(10)) and "web" in v.owners and v, 10, what="the watch")
            assert view.owners["web"].node == "a1"
        finally:
            informer.stop()
        auth_etcd.restart()  # simple tokens live in etcd's memory: ours is gone now
        wait_for(lambda: store.revision() > 0, 20, what="a call after the restart (logging in again)")
        store.keepalive(lease)
        assert store.release("web", lease)
        store.revoke(lease)
    finally:
        store.close()


def test_the_read_only_role_serves_read_commands_and_refuses_writes_in_one_line(auth_etcd):
    for args in (["status", "--json"], ["keys"], ["history"]):
        res = cli(auth_etcd, *args)
        assert res.exit_code == 0, (args, res.output)
    json.loads(cli(auth_etcd, "status", "--json").stdout)
    res = cli(auth_etcd, "pause")  # maintenance for every service: a write
    assert res.exit_code == 1
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and "denies" in lines[0] and "'etcdha-reader'" in lines[0], res.output


def test_a_wrong_password_or_no_user_is_one_clear_line(auth_etcd):
    res = cli(auth_etcd, "status", pw="wrong")
    assert res.exit_code == 1 and res.output.strip().count("\n") == 0, res.output
    assert "refused user 'etcdha-reader': wrong user name or password" in res.output
    assert "not-it" not in res.output
    res = cli(auth_etcd, "status", user=None)
    assert res.exit_code == 1 and "requires authentication" in res.output, res.output
    with pytest.raises(AuthError, match="wrong user name or password"):
        store_as(auth_etcd, "etcdha", auth_etcd.files["wrong"]).revision()


def test_credentials_in_an_endpoint_url_are_refused_without_printing_them(auth_etcd):
    res = CliRunner().invoke(main, ["--endpoints", f"http://etcdha:{AGENT_PW}@127.0.0.1:2379", "status"])
    assert res.exit_code != 0 and AGENT_PW not in res.output and "etcdha:***@" in res.output, res.output


def run_agent(tmp_path, cgroup_root, server, user, password_file=None, env_password=None, seconds=None):
    config = tmp_path / "agent.yaml"
    etcd = {"endpoints": [server.endpoint], "prefix": PREFIX, "username": user}
    if password_file:
        etcd["password_file"] = str(password_file)
    config.write_text(yaml.safe_dump({"node": "au1", "etcd": etcd, "run_dir": str(tmp_path / "run"),
                                      "cgroup_root": str(cgroup_root), "startup_grace": 0,
                                      "services": {"sleeper": {"command": ["sleep", "300"], "startsecs": 0}}}))
    env = {k: v for k, v in os.environ.items() if k != "ETCDHA_ETCD_PASSWORD"}
    if env_password:
        env["ETCDHA_ETCD_PASSWORD"] = env_password
    log = tmp_path / "agent.log"
    agent = subprocess.Popen([sys.executable, "-m", "etcdha", "-v", "agent", "--config", str(config)], env=env,
                             stdout=subprocess.DEVNULL, stderr=log.open("wb"))
    return agent, log


def test_an_agent_with_the_read_only_user_exits_with_one_clear_line(auth_etcd, tmp_path, cgroup_root):
    agent, log = run_agent(tmp_path, cgroup_root, auth_etcd, "etcdha-reader", auth_etcd.files["reader"])
    try:
        assert agent.wait(30) == 1
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.wait(10)
    errors = [line for line in log.read_text().splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "denies" in errors[0] and "read-only user serves the CLI" in errors[0], \
        log.read_text()[-2000:]
    assert "cannot join yet" not in log.read_text(), "retried instead of exiting"


def test_an_agent_with_a_wrong_password_exits_with_one_clear_line(auth_etcd, tmp_path, cgroup_root):
    agent, log = run_agent(tmp_path, cgroup_root, auth_etcd, "etcdha", env_password="not-it")
    try:
        assert agent.wait(30) == 1
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.wait(10)
    text = log.read_text()
    assert "Error: etcd at" in text and "wrong user name or password" in text and "not-it" not in text, text[-2000:]


def test_the_agent_works_with_its_role_and_never_shows_its_password(auth_etcd, tmp_path, cgroup_root):
    agent, log = run_agent(tmp_path, cgroup_root, auth_etcd, "etcdha", env_password=AGENT_PW)
    try:
        wait_for(lambda: "started sleeper" in log.read_text(), 30, what="the agent to claim and start its service")
        fence = next(int(p) for p in os.listdir("/proc") if p.isdigit() and
                     Path(f"/proc/{p}/stat").exists() and _parent(int(p)) == agent.pid and
                     b"etcdha.fence" in Path(f"/proc/{p}/cmdline").read_bytes())
        cmdline = Path(f"/proc/{fence}/cmdline").read_bytes().decode()
        assert '"username": "etcdha"' in cmdline.replace("\0", " ") and AGENT_PW not in cmdline
        handoff = (tmp_path / "run" / "handoff.json").read_text()
        assert json.loads(handoff)["etcd"]["username"] == "etcdha" and AGENT_PW not in handoff
        status = cli(auth_etcd, "status", "--json")
        assert json.loads(status.stdout)["services"]["sleeper"]["owner"] == "au1"
        agent.send_signal(signal.SIGTERM)
        assert agent.wait(30) == 0
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.wait(10)
    text = log.read_text()
    assert AGENT_PW not in text and "joined as au1" in text
    assert "cannot write" not in text, "the lease was not in handoff.json from the start"


def _parent(pid: int) -> int:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return int(stat[stat.rindex(")") + 2:].split()[1])
    except (OSError, ValueError, IndexError):
        return -1


def test_the_fence_can_hand_a_lease_over_through_the_gateway_with_its_user(auth_etcd):
    store = store_as(auth_etcd, "etcdha", auth_etcd.files["agent"])
    try:
        lease, _ = store.grant(30)
        store.put(f"{PREFIX}/owners/gw", b'{"node": "x"}', lease)
        ok, what = gateway.revoke([auth_etcd.endpoint], lease, 2.0, username="etcdha",
                                  password_file=str(auth_etcd.files["wrong"]))
        assert not ok and "refused user 'etcdha'" in what and "not-it" not in what
        ok, what = gateway.revoke([auth_etcd.endpoint], lease, 2.0, username="etcdha",
                                  password_file=str(auth_etcd.files["agent"]))
        assert ok, what
        assert store.lease_ttl_left(lease) == -1
    finally:
        store.close()
