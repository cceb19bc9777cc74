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
