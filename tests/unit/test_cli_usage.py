"""cli: usage errors and help texts through click's CliRunner (no etcd is contacted)."""
from __future__ import annotations

import pytest
from click.testing import CliRunner

from etcdha import cli

pytestmark = pytest.mark.unit

CLEAN_ENV = {k: None for k in ("ETCDHA_CONFIG", "ETCDHA_ENDPOINTS", "ETCDHA_PREFIX", "ETCDHA_TIMEOUT")}


def run(*args: str, env=None):
    return CliRunner().invoke(cli.main, list(args), env={**CLEAN_ENV, **(env or {})})


def clean_exit(result, code: int) -> None:
    """Exited with `code` through click (SystemExit), not through an unhandled exception."""
    assert result.exit_code == code, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output


def test_agent_without_config_is_usage_error():
    r = run("agent")
    clean_exit(r, 2)
    assert "--config" in r.output
    assert "Usage:" in r.output


def test_bad_endpoint_url_is_clear_error():
    r = run("--endpoints", "notaurl:xx", "status")
    assert r.exit_code in (1, 2)
    clean_exit(r, r.exit_code)
    assert "--endpoints" in r.output
    assert "notaurl:xx" in r.output
    assert "port" in r.output


def test_bad_endpoint_scheme_is_clear_error():
    r = run("--endpoints", "http://10.0.0.5:2379,ftp://x:1", "status")
    clean_exit(r, 2)
    assert "ftp://x:1" in r.output and "http://HOST:2379" in r.output


def test_bad_endpoint_from_environment():
    r = run("status", env={"ETCDHA_ENDPOINTS": "notaurl:xx"})
    clean_exit(r, 2)
    assert "notaurl:xx" in r.output


def test_bad_prefix_is_clear_error():
    r = run("--prefix", "no-slash", "status")
    clean_exit(r, 2)
    assert "--prefix" in r.output and "no-slash" in r.output


@pytest.mark.parametrize("args", [
    ["agent", "--config", "/nonexistent.yaml"],
    ["--config", "/nonexistent.yaml", "agent"],
])
def test_agent_with_missing_config_file(args):
    r = run(*args)
    clean_exit(r, 1)
    assert "/nonexistent.yaml" in r.output
    assert "cannot read the config file" in r.output


def test_agent_config_from_environment():
    r = run("agent", env={"ETCDHA_CONFIG": "/nonexistent-env.yaml"})
    clean_exit(r, 1)
    assert "/nonexistent-env.yaml" in r.output


def test_agent_with_invalid_config_names_file_and_key(tmp_path):
    path = tmp_path / "agent.yaml"
    path.write_text("node: n1\nlease_ttl: 1\n")
    r = run("agent", "--config", str(path))
    clean_exit(r, 1)
    assert f"{path}: lease_ttl: expected a whole number of seconds between 2 and 600 (got 1)" in r.output


def test_status_with_missing_config_file():
    r = run("--config", "/nonexistent.yaml", "status")
    clean_exit(r, 1)
    assert "/nonexistent.yaml" in r.output


@pytest.mark.parametrize("args", [["--help"], ["-h"]] + [[name, "--help"] for name in sorted(cli.main.commands)])
def test_help_has_examples(args):
    r = run(*args)
    clean_exit(r, 0)
    assert "Example" in r.output
    assert "etcdha" in r.output


def test_main_help_lists_commands_and_options():
    r = run("--help")
    clean_exit(r, 0)
    for word in ("agent", "status", "--config", "--endpoints", "--prefix", "--timeout"):
        assert word in r.output


def test_timeout_out_of_range():
    r = run("--timeout", "0", "status")
    clean_exit(r, 2)
    assert "--timeout" in r.output


def test_version():
    r = run("--version")
    clean_exit(r, 0)
    assert "etcdha" in r.output


# ---- check-config --------------------------------------------------------------------------------

GOOD = "node: n1\nservices:\n  web: {command: /bin/sh -c true}\n  db: {command: [sh, -c, 'true']}\n"


def write(tmp_path, text: str):
    path = tmp_path / "agent.yaml"
    path.write_text(text)
    return path


def test_check_config_ok(tmp_path):
    path = write(tmp_path, GOOD)
    r = run("check-config", str(path))
    clean_exit(r, 0)
    assert r.stdout == f"{path}: OK (2 services: db, web)\n"
    assert r.stderr == ""


def test_check_config_one_service_singular(tmp_path):
    path = write(tmp_path, "node: n1\nservices: {web: {command: /bin/sh}}\n")
    r = run("check-config", str(path))
    clean_exit(r, 0)
    assert r.stdout == f"{path}: OK (1 service: web)\n"


def test_check_config_prints_every_error_on_stderr(tmp_path):
    path = write(tmp_path, "node: n1\nfence_margin: .nan\nlease_ttl: 10000\nrun_dir: run\n"
                           "services: {web: {command: /bin/sh}}\n")
    r = run("check-config", str(path))
    clean_exit(r, 1)
    assert r.stdout == ""
    lines = r.stderr.splitlines()
    assert [ln.split(": ")[1] for ln in lines] == ["lease_ttl", "fence_margin", "run_dir"]
    assert all(ln.startswith(f"{path}: ") for ln in lines)  # no "Error:" prefix: each line is grep-able
    assert "(got nan)" in lines[1]


def test_check_config_yaml_problem(tmp_path):
    path = write(tmp_path, "a0: &a0 [" + ", ".join(["x"] * 9) + "]\n" + "".join(
        f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]\n" for i in range(1, 10)))
    r = run("check-config", str(path))
    clean_exit(r, 1)
    assert r.stderr == f"{path}: too many nodes after expanding aliases (more than 100000; a config needs a few " \
                       "hundred)\n"


def test_check_config_empty_file(tmp_path):
    path = write(tmp_path, "# nothing yet\n")
    r = run("check-config", str(path))
    clean_exit(r, 1)
    assert "expected a mapping with at least a services: section" in r.stderr


def test_check_config_missing_file(tmp_path):
    r = run("check-config", str(tmp_path / "nope.yaml"))
    clean_exit(r, 1)
    assert r.stderr.startswith(f"{tmp_path / 'nope.yaml'}: cannot read the config file: ")


def test_check_config_host_problems(tmp_path):
    path = write(tmp_path, "node: n1\nservices:\n  web: {command: /nonexistent/prog, vip: 198.18.0.100/24, "
                           "interface: nosuchif9z}\n")
    r = run("check-config", str(path))
    clean_exit(r, 1)
    lines = r.stderr.splitlines()
    assert len(lines) == 2
    assert lines[0].startswith(f"{path}: services.web.interface: expected a network interface")
    assert lines[1].startswith(f"{path}: services.web.command: expected an executable program")
    r = run("check-config", "--no-host-checks", str(path))
    clean_exit(r, 0)
    assert r.stdout == f"{path}: OK (1 service: web)\n"


def test_check_config_does_not_need_etcd(tmp_path):
    path = write(tmp_path, GOOD.replace("node: n1\n", "node: n1\netcd: {endpoints: ['http://192.0.2.1:1']}\n"))
    r = run("--timeout", "0.1", "check-config", str(path))
    clean_exit(r, 0)


def test_check_config_file_from_global_config(tmp_path):
    path = write(tmp_path, GOOD)
    r = run("--config", str(path), "check-config")
    clean_exit(r, 0)
    assert r.stdout.startswith(f"{path}: OK")
    r = run("check-config", env={"ETCDHA_CONFIG": str(path)})
    clean_exit(r, 0)


def test_check_config_without_file_is_usage_error():
    r = run("check-config")
    clean_exit(r, 2)
    assert "check-config PATH" in r.output


def test_agent_reports_every_config_error(tmp_path):
    path = write(tmp_path, "node: n1\nlease_ttl: 1\nclaim_delay: -1\nservices: {web: {command: /bin/sh}}\n")
    r = run("agent", "--config", str(path))
    clean_exit(r, 1)
    assert f"{path}: lease_ttl: expected" in r.output and f"{path}: claim_delay: expected" in r.output
