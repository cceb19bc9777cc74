"""supervisord.program_section: the generated [program:x] section, checked as text and as supervisord reads it."""
from __future__ import annotations

import configparser
import ipaddress
import shlex
from pathlib import Path

import pytest

from etcdha.config import Service
from etcdha.supervisord import program_section

pytestmark = pytest.mark.unit

TRICKY = ("/bin/sh", "-c", """echo "hello world" 'single' it's 50% %(here)s $HOME""", "a b", '"', "'", "back\\slash")


def service(**kw) -> Service:
    base = dict(name="web", command=("/usr/bin/python3", "-m", "http.server", "8080"),
                vip=ipaddress.ip_interface("198.18.0.100/24"), interface="eth0",
                environment={"GREETING": "hello"}, startsecs=3, startretries=4, stopwaitsecs=5)
    base.update(kw)
    return Service(**base)


def section(svc: Service, token: int = 4711, log_dir: Path = Path("/run/etcdha/n1/logs")) -> dict[str, str]:
    text = program_section(svc, "n1", token, log_dir)
    parser = configparser.RawConfigParser()
    parser.optionxform = str
    parser.read_string(text)
    assert parser.sections() == [f"program:{svc.name}"]
    return dict(parser[f"program:{svc.name}"])


def unescape(value: str) -> str:
    return value.replace("%%", "%")


def test_safety_settings():
    s = section(service())
    assert s["autostart"] == "false"        # a restarted supervisord never starts a copy by itself
    assert s["stopasgroup"] == "true"
    assert s["killasgroup"] == "true"
    assert (s["startsecs"], s["startretries"], s["stopwaitsecs"]) == ("3", "4", "5")
    assert s["stdout_logfile"] == "/run/etcdha/n1/logs/web.log"


def test_fencing_token_and_identity_in_environment():
    env = section(service(), token=4711)["environment"]
    assert 'ETCDHA_FENCING_TOKEN="4711"' in env.split(",")
    assert 'ETCDHA_SERVICE="web"' in env.split(",")
    assert 'ETCDHA_NODE="n1"' in env.split(",")
    assert 'ETCDHA_VIP="198.18.0.100"' in env.split(",")
    assert 'GREETING="hello"' in env.split(",")


def test_no_vip_no_vip_variable():
    env = section(service(vip=None, interface=None))["environment"]
    assert "ETCDHA_VIP" not in env


def test_percent_escaped_in_command():
    s = section(service(command=("/bin/echo", "50%", "%(here)s")))
    assert "50%%" in s["command"] and "%%(here)s" in s["command"]
    assert "%" not in s["command"].replace("%%", "")  # no lone % left for supervisord to expand
    assert shlex.split(unescape(s["command"])) == ["/bin/echo", "50%", "%(here)s"]


def test_quotes_in_arguments_survive():
    s = section(service(command=TRICKY))
    assert shlex.split(unescape(s["command"])) == list(TRICKY)


def test_directory_escaped():
    s = section(service(directory="/srv/100%"))
    assert s["directory"] == "/srv/100%%"


def test_percent_in_environment_escaped():
    env = section(service(environment={"P": "100%"}))["environment"]
    assert 'P="100%%"' in env.split(",")


# ---- the section as supervisord itself reads it (supervisor's parser; no process is started) ----

def supervisord_reads(svc: Service, tmp_path: Path, token: int = 4711):
    from supervisor.options import ServerOptions, UnhosedConfigParser

    parser = UnhosedConfigParser()
    parser.read_string(program_section(svc, "n1", token, tmp_path))
    options = ServerOptions()
    options.here = str(tmp_path)
    (group,) = options.process_groups_from_parser(parser)
    (proc,) = group.process_configs
    return proc


def test_supervisord_reads_command_and_flags(tmp_path):
    proc = supervisord_reads(service(command=TRICKY), tmp_path)
    assert shlex.split(proc.command) == list(TRICKY)
    assert proc.autostart is False
    assert proc.stopasgroup is True and proc.killasgroup is True
    assert proc.stopwaitsecs == 5


def test_supervisord_reads_environment(tmp_path):
    env = {"GREETING": "hello", "LIST": "a,b", "SPACED": "a b", "PCT": "100%", "EQ": "x=y", "APOS": "it's"}
    proc = supervisord_reads(service(environment=env), tmp_path, token=99)
    assert proc.environment["ETCDHA_FENCING_TOKEN"] == "99"
    assert proc.environment["ETCDHA_SERVICE"] == "web"
    assert proc.environment["ETCDHA_NODE"] == "n1"
    assert proc.environment["ETCDHA_VIP"] == "198.18.0.100"
    for k, v in env.items():
        assert proc.environment[k] == v


def test_supervisord_environment_backslash(tmp_path):
    proc = supervisord_reads(service(environment={"WIN": "C:\\temp"}), tmp_path)
    assert proc.environment["WIN"] == "C:\\temp"


def test_supervisord_environment_double_quote(tmp_path):
    # representable for supervisord (e.g. MSG='a "b" c'); values ending in a quote are not, since it strips them
    proc = supervisord_reads(service(environment={"MSG": 'a "b" c'}), tmp_path)
    assert proc.environment["MSG"] == 'a "b" c'
