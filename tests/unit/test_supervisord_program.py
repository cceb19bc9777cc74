"""supervisord.program_section and launch_spec: what supervisord reads, and what the launcher gets.

The operator's command, environment and directory never pass through supervisord's
ini parser: they go to the launcher in a JSON spec. The section holds only names
and paths etcdha controls; both are checked here as supervisord itself reads them.
"""
from __future__ import annotations

import ipaddress
import json
import shlex
import sys
from pathlib import Path

import pytest

from etcdha.config import Service
from etcdha.supervisord import LAUNCHER, launch_spec, launcher_command, program_section

pytestmark = pytest.mark.unit

# arguments that supervisord's ini parser would mangle: inline comments (" ;", " #"), % expansion,
# quotes, and an attempt to inject a section
TRICKY = ("/bin/sh", "-c", """echo "hello world" 'single' it's 50% %(here)s $HOME ; echo b # c""", "a b", '"',
          "'", "back\\slash", "x\n[program:evil]\ncommand=/bin/evil")
SPEC = Path("/run/etcdha/n1/programs/web.json")


def service(**kw) -> Service:
    base = dict(name="web", command=("/usr/bin/python3", "-m", "http.server", "8080"),
                vip=ipaddress.ip_interface("198.18.0.100/24"), interface="eth0",
                environment={"GREETING": "hello"}, startsecs=3, startretries=4, stopwaitsecs=5)
    base.update(kw)
    return Service(**base)


def supervisord_reads(svc: Service, tmp_path: Path, spec: Path = SPEC):
    """The program config exactly as supervisord builds it from our section (no process is started)."""
    from supervisor.options import ServerOptions, UnhosedConfigParser

    parser = UnhosedConfigParser()
    parser.read_string(program_section(svc, spec, tmp_path))
    options = ServerOptions()
    options.here = str(tmp_path)
    (group,) = options.process_groups_from_parser(parser)
    (proc,) = group.process_configs
    return proc


def test_safety_settings(tmp_path):
    proc = supervisord_reads(service(), tmp_path)
    assert proc.autostart is False          # a restarted supervisord never starts a copy by itself
    assert proc.autorestart is False        # restarting is the agent's decision (not while paused)
    assert proc.stopasgroup is True and proc.killasgroup is True
    assert (proc.startsecs, proc.startretries, proc.stopwaitsecs) == (3, 4, 5)
    assert proc.stdout_logfile == str(tmp_path / "web.log")


def test_supervisord_runs_the_launcher_with_the_spec_only(tmp_path):
    proc = supervisord_reads(service(command=TRICKY, environment={"X": "1 ; 2"}, directory="/srv/100%"), tmp_path)
    assert shlex.split(proc.command) == [sys.executable, "-I", "-S", str(LAUNCHER), str(SPEC)]
    assert launcher_command(SPEC) == shlex.split(proc.command)
    assert "X" not in (proc.environment or {}) and proc.directory is None


def test_percent_in_the_spec_path_is_escaped(tmp_path):
    # (run_dir itself may not hold '%': supervisord expands log file names twice)
    spec = Path("/run/etcdha/100%/programs/web.json")
    proc = supervisord_reads(service(), tmp_path, spec=spec)
    assert shlex.split(proc.command)[-1] == str(spec)


def test_nothing_from_the_operator_reaches_the_section():
    text = program_section(service(command=TRICKY, environment={"EVIL": "x\n[program:evil]"}), SPEC, Path("/l"))
    assert text.count("[program:") == 1 and "evil" not in text and "GREETING" not in text


def test_spec_carries_argv_environment_and_token_verbatim():
    svc = service(command=TRICKY, environment={"GREETING": "hello", "PCT": "100%", "SEMI": "a ; b", "Q": '"x"'},
                  directory="/srv/with space")
    spec = json.loads(json.dumps(launch_spec(svc, "n1", 4711, Path("/cg/services/web"), 1234)))
    assert spec["argv"] == list(TRICKY)
    assert spec["env"] == {"GREETING": "hello", "PCT": "100%", "SEMI": "a ; b", "Q": '"x"', "ETCDHA_SERVICE": "web",
                           "ETCDHA_NODE": "n1", "ETCDHA_FENCING_TOKEN": "4711", "ETCDHA_VIP": "198.18.0.100"}
    assert spec["directory"] == "/srv/with space"
    assert (spec["cgroup"], spec["parent"]) == ("/cg/services/web", 1234)


def test_no_vip_no_vip_variable():
    spec = launch_spec(service(vip=None, interface=None), "n1", 1, Path("/cg"), 1)
    assert "ETCDHA_VIP" not in spec["env"]
