"""Health probes against real sockets, servers and processes; the Prober's timing rules on its own threads."""
from __future__ import annotations

import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from etcdha import cgroup
from etcdha.config import Check, Service
from etcdha.health import Health, Prober, probe_exec, probe_http, probe_tcp

pytestmark = pytest.mark.store


class Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 - http.server API
        if self.path == "/hang":
            time.sleep(3)
        status, body = {"/ok": (200, b"all good"), "/fail": (500, b"broken"), "/moved": (302, b"")}.get(
            self.path, (404, b"no such page"))
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(url: str, **kw) -> Check:
    return Check("http", "http", target=url, **{"timeout": 1.0, **kw})


def test_http_status_and_body(server):
    assert probe_http(http(server + "/ok")).ok
    assert probe_http(http(server + "/moved")).ok  # any 2xx/3xx by default, like Kubernetes
    failed = probe_http(http(server + "/fail"))
    assert not failed.ok and failed.output == "HTTP 500 (expected 2xx/3xx): broken"
    assert not probe_http(http(server + "/ok", expect_status=201)).ok
    assert probe_http(http(server + "/ok", expect_body="good")).ok
    lacking = probe_http(http(server + "/ok", expect_body="great"))
    assert not lacking.ok and "body lacks 'great'" in lacking.output


def test_http_that_does_not_answer_fails_at_its_timeout(server):
    began = time.monotonic()
    out = probe_http(http(server + "/hang", timeout=0.3))
    assert not out.ok and "timed out" in out.output
    assert time.monotonic() - began < 2


def test_http_refused():
    out = probe_http(http(f"http://127.0.0.1:{closed_port()}/"))
    assert not out.ok and "refused" in out.output.lower()


def test_tcp():
    with socket.socket() as listening:
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        assert probe_tcp(Check("tcp", "tcp", target=f"127.0.0.1:{listening.getsockname()[1]}", timeout=1)).ok
    out = probe_tcp(Check("tcp", "tcp", target=f"127.0.0.1:{closed_port()}", timeout=1))
    assert not out.ok and "refused" in out.output.lower()


def test_exec_exit_codes_output_and_environment(cgroup_root):
    group = cgroup_root / "c1"
    ok = probe_exec(Check("e", "exec", command=("/bin/sh", "-c", 'echo "hello $WHO"'), timeout=2),
                    {"WHO": "etcdha", "PATH": "/usr/bin:/bin"}, None, group)
    assert ok.ok and ok.output == "hello etcdha"
    bad = probe_exec(Check("e", "exec", command=("/bin/sh", "-c", "echo nope; exit 3"), timeout=2),
                     {"PATH": "/usr/bin:/bin"}, "/tmp", group)
    assert not bad.ok and bad.output == "exit 3: nope"
    missing = probe_exec(Check("e", "exec", command=("/no/such/program",), timeout=2), {}, None, group)
    assert not missing.ok and "exit 127" in missing.output


def test_a_hanging_exec_check_is_killed_with_everything_it_started(cgroup_root):
    group = cgroup_root / "c2"
    began = time.monotonic()
    out = probe_exec(Check("e", "exec", command=("/bin/sh", "-c", "sleep 100 & setsid sleep 100 & sleep 100"),
                           timeout=0.3), {"PATH": "/usr/bin:/bin"}, None, group)
    assert not out.ok and out.output.startswith("timed out after 0.3s (killed)")
    assert time.monotonic() - began < 3
    assert not cgroup.populated(group), cgroup.pids(group)


def test_what_an_exec_check_leaves_behind_is_killed_even_when_it_succeeds(cgroup_root):
    group = cgroup_root / "c3"
    out = probe_exec(Check("e", "exec", command=("/bin/sh", "-c", "setsid sleep 100 >/dev/null 2>&1 & exit 0"),
                           timeout=1), {"PATH": "/usr/bin:/bin"}, None, group)
    assert out.ok
    assert not cgroup.populated(group)


# ---- the Prober ------------------------------------------------------------------------------------

def prober(*checks: Check, cgroup_dir) -> Prober:
    svc = Service(name="web", command=("true",), checks=checks)
    return Prober({"web": svc}, cgroup_dir, lambda s, token: {"PATH": "/usr/bin:/bin"})


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def test_unhealthy_after_failure_threshold_and_only_after_the_start_grace(tmp_path):
    check = Check("tcp", "tcp", target=f"127.0.0.1:{closed_port()}", interval=0.1, timeout=0.1,
                  failure_threshold=2, start_grace=0.6)
    p = prober(check, cgroup_dir=tmp_path)
    try:
        began = time.monotonic()
        p.track({"web": (7, began)}, frozenset({"web"}))
        assert p.health() == {"web": "pending"}
        wait_for(lambda: "web" in p.unhealthy(), 5, "web to be unhealthy")
        assert time.monotonic() - began >= 0.6 + 0.1, "no probe before the start grace"
        check_name, output = p.unhealthy()["web"]
        assert check_name == "tcp" and "refused" in output.lower()
        assert p.health() == {"web": "failing"}
        p.track({}, frozenset({"web"}))  # not RUNNING any more: not probed, no facts
        assert p.unhealthy() == {} and p.health() == {}
    finally:
        p.stop()


def test_a_hung_probe_counts_as_failed_at_its_timeout_while_it_still_hangs(server, tmp_path):
    check = http(server + "/hang", interval=0.2, timeout=0.15, failure_threshold=2)
    # the server answers after 3 s: only the Prober's own timeout can make this fail quickly
    p = prober(check, cgroup_dir=tmp_path)
    try:
        began = time.monotonic()
        p.track({"web": (7, began)}, frozenset({"web"}))
        wait_for(lambda: "web" in p.unhealthy(), 5, "web to be unhealthy")
        assert time.monotonic() - began < 2.5
    finally:
        p.stop()


def test_recovery_is_reported_once_after_a_restart(tmp_path):
    listening = socket.socket()
    listening.bind(("127.0.0.1", 0))
    port = listening.getsockname()[1]
    check = Check("tcp", "tcp", target=f"127.0.0.1:{port}", interval=0.1, timeout=0.1, failure_threshold=1,
                  success_threshold=2)
    p = prober(check, cgroup_dir=tmp_path)
    try:
        p.track({"web": (7, time.monotonic())}, frozenset({"web"}))
        wait_for(lambda: "web" in p.unhealthy(), 5, "web to be unhealthy (nothing listens yet)")
        p.restarting("web")
        assert p.unhealthy() == {}
        listening.listen()
        p.track({"web": (7, time.monotonic())}, frozenset({"web"}))  # the new start
        found = wait_for(p.recovered, 5, "the recovery")
        assert [(r.service, r.check, r.token) for r in found] == [("web", "tcp", 7)]
        time.sleep(0.5)
        assert p.recovered() == [] and p.health() == {"web": "passing"}
    finally:
        p.stop()
        listening.close()


def test_stopping_the_prober_kills_a_check_still_running(cgroup_root):
    check = Check("slow", "exec", command=("/bin/sh", "-c", "sleep 100 & sleep 100"), interval=10, timeout=9)
    p = prober(check, cgroup_dir=cgroup_root)
    group = cgroup_root / "web" / "slow"
    p.track({"web": (7, time.monotonic())}, frozenset({"web"}))
    wait_for(lambda: group.exists() and len(cgroup.pids(group)) >= 2, 5, "the check to run")
    p.stop()
    assert not cgroup.populated(group), cgroup.pids(group)
