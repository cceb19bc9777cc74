"""Health-check config: defaults, names, and one clear error per bad value."""
from __future__ import annotations

import pytest

from etcdha import config
from etcdha.config import ConfigErrors

pytestmark = pytest.mark.unit


def load(checks: str, extra: str = "") -> config.Service:
    text = f"node: n1\nservices:\n  web:\n    command: sleep 1\n    checks: {checks}\n{extra}"
    return config.loads(text, "agent.yaml").services["web"]


def errors(checks: str, extra: str = "") -> list[str]:
    with pytest.raises(ConfigErrors) as exc:
        load(checks, extra)
    return exc.value.errors


def test_defaults_and_names():
    svc = load("[{http: 'http://127.0.0.1:8080/health'}, {tcp: '[::1]:5432'}, {exec: pg_isready -q}]")
    http, tcp, exe = svc.checks
    assert (http.name, http.kind, http.target, http.expect_status, http.expect_body) == (
        "http", "http", "http://127.0.0.1:8080/health", None, None)
    assert (http.interval, http.timeout, http.failure_threshold, http.success_threshold, http.start_grace) == (
        5.0, 2.0, 3, 1, 0.0)
    assert (tcp.name, tcp.target) == ("tcp", "[::1]:5432")
    assert (exe.name, exe.command) == ("exec", ("pg_isready", "-q"))
    assert (svc.max_restarts, svc.failure_timeout) == (3, 600.0)


def test_one_check_without_a_list_and_repeated_kinds_get_numbered_names():
    assert load("{tcp: 'db:5432'}").checks[0].name == "tcp"
    assert [c.name for c in load("[{tcp: 'a:1'}, {tcp: 'b:2'}]").checks] == ["tcp1", "tcp2"]


def test_policy_values():
    svc = load("{tcp: 'a:1'}", "    max_restarts: 0\n    failure_timeout: 3600\n")
    assert (svc.max_restarts, svc.failure_timeout) == (0, 3600.0)


@pytest.mark.parametrize("checks, extra, expected", [
    ("{tcp: a:1, http: 'http://a/'}", "", "services.web.checks[0]: expected exactly one of http"),
    ("{}", "", "services.web.checks[0]: expected exactly one of http"),
    ("{http: 'ftp://a/'}", "", "services.web.checks[0].http: expected an http:// or https:// URL"),
    ("{http: 'http://a:0/'}", "", "services.web.checks[0].http: expected an http:// or https:// URL"),
    ("{http: \"http://a/\\n\"}", "", "services.web.checks[0].http: expected an http:// or https:// URL"),
    ("{tcp: 'nohost'}", "", "services.web.checks[0].tcp: expected HOST:PORT"),
    ("{tcp: 'a:99999'}", "", "services.web.checks[0].tcp: expected HOST:PORT"),
    ("{exec: ''}", "", "services.web.checks[0].exec: expected a non-empty command"),
    ("{tcp: 'a:1', interval: .nan}", "", "services.web.checks[0].interval: expected a number of seconds"),
    ("{tcp: 'a:1', interval: .inf}", "", "services.web.checks[0].interval: expected a number of seconds"),
    ("{tcp: 'a:1', interval: 1, timeout: 2}", "", "services.web.checks[0].timeout: expected at most the interval"),
    ("{tcp: 'a:1', failure_threshold: 0}", "", "services.web.checks[0].failure_threshold: expected an integer"),
    ("{tcp: 'a:1', success_threshold: 100000000000000000000}", "",
     "services.web.checks[0].success_threshold: expected an integer"),
    ("{tcp: 'a:1', expect_status: 200}", "", "services.web.checks[0].expect_status: expected no expect_status"),
    ("{http: 'http://a/', expect_status: 42}", "", "services.web.checks[0].expect_status: expected an integer"),
    ("{http: 'http://a/', expect_body: ''}", "", "services.web.checks[0].expect_body: expected a text of 1"),
    ("{tcp: 'a:1', bogus: 1}", "", "services.web.checks[0].bogus: expected one of the known keys"),
    ("[{tcp: 'a:1', name: x}, {tcp: 'a:2', name: x}]", "", "services.web.checks[1].name: expected a name no other"),
    ("{tcp: 'a:1', name: 'a/b'}", "", "services.web.checks[0].name: expected a name of"),
    ("3", "", "services.web.checks: expected a list of checks"),
    ("{tcp: 'a:1'}", "    max_restarts: -1\n", "services.web.max_restarts: expected an integer between 0 and 100"),
    ("{tcp: 'a:1'}", "    failure_timeout: 0\n", "services.web.failure_timeout: expected a number of seconds"),
])
def test_bad_checks_name_the_key(checks, extra, expected):
    found = errors(checks, extra)
    assert any(e.startswith(f"agent.yaml: {expected}") for e in found), found


def test_an_exec_check_program_missing_on_this_host_is_a_host_problem():
    c = config.loads("node: n1\nservices:\n  web:\n    command: sleep 1\n    checks: {exec: no-such-program-xyz}\n",
                     "agent.yaml")
    problems = config.host_problems(c)
    assert problems == [f"agent.yaml: services.web.checks[0].exec: expected a program found on the PATH (got "
                        f"'no-such-program-xyz'; PATH={config._show(__import__('os').environ['PATH'], 120)})"]
