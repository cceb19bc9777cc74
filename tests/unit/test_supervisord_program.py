"""supervisord.program_section and launch_spec: what supervisord reads, and what the launcher does.

The operator's command, environment and directory never pass through supervisord's
ini parser: they go into the launcher script, each value quoted for sh. The section
holds only names and paths etcdha controls, checked here as supervisord itself reads
it; the script is run by the real /bin/sh and must hand argv and environment over verbatim.
"""
from __future__ import annotations

import ipaddress
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from etcdha.config import Service
from etcdha import launch
from etcdha.supervisord import launch_spec, launcher_command, program_section

pytestmark = pytest.mark.unit

# arguments that supervisord's ini parser would mangle: inline comments (" ;", " #"), % expansion,
# quotes, and an attempt to inject a section
TRICKY = ("/bin/sh", "-c", """echo "hello world" 'single' it's 50% %(here)s $HOME ; echo b # c""", "a b", '"',
          "'", "back\\slash", "x\n[program:evil]\ncommand=/bin/evil", "$(touch /tmp/pwned) `id` \\$", "")
SPEC = Path("/run/etcdha/n1/programs/web.sh")


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
    assert shlex.split(proc.command) == ["/bin/sh", str(SPEC)]
    assert launcher_command(SPEC) == shlex.split(proc.command)
    assert "X" not in (proc.environment or {}) and proc.directory is None


def test_percent_in_the_spec_path_is_escaped(tmp_path):
    # (run_dir itself may not hold '%': supervisord expands log file names twice)
    spec = Path("/run/etcdha/100%/programs/web.sh")
    proc = supervisord_reads(service(), tmp_path, spec=spec)
    assert shlex.split(proc.command)[-1] == str(spec)


def test_nothing_from_the_operator_reaches_the_section():
    text = program_section(service(command=TRICKY, environment={"EVIL": "x\n[program:evil]"}), SPEC, Path("/l"))
    assert text.count("[program:") == 1 and "evil" not in text and "GREETING" not in text


DUMP = (sys.executable, "-c", "import json, os, sys; print(json.dumps([sys.argv[1:], dict(os.environ), os.getcwd()]))")


def run_launcher(tmp_path: Path, svc: Service, parent: int = 0, token: int = 4711) -> tuple[subprocess.CompletedProcess, Path]:
    """Run the launcher script with the real sh; a plain file stands in for cgroup.procs."""
    group = tmp_path / "cg"
    group.mkdir(exist_ok=True)
    (group / "cgroup.procs").write_text("")
    spec = tmp_path / "web.sh"
    spec.write_text(launch_spec(svc, "n1", token, group, parent or os.getpid()))
    return subprocess.run(launcher_command(spec), capture_output=True, text=True, timeout=10), group


def test_launcher_hands_argv_environment_and_token_over_verbatim(tmp_path):
    env = {"GREETING": "hello", "PCT": "100%", "SEMI": "a ; b", "Q": '"x\'y', "NL": "a\nb", "DOLLAR": "$HOME `id`"}
    directory = tmp_path / "with space"
    directory.mkdir()
    res, group = run_launcher(tmp_path, service(command=DUMP + TRICKY, environment=env, directory=str(directory)))
    assert res.returncode == 0, res.stderr
    argv, seen, cwd = json.loads(res.stdout)
    assert argv == list(TRICKY)
    assert {k: seen.get(k) for k in env} == env
    assert (seen["ETCDHA_SERVICE"], seen["ETCDHA_NODE"], seen["ETCDHA_FENCING_TOKEN"]) == ("web", "n1", "4711")
    assert seen["ETCDHA_VIP"] == "198.18.0.100"
    assert cwd == str(directory)
    assert group.joinpath("cgroup.procs").read_text().strip().isdigit()  # it entered "the cgroup" first
    assert not Path("/tmp/pwned").exists()


def test_launcher_refuses_another_parent_and_a_missing_directory(tmp_path):
    res, _ = run_launcher(tmp_path, service(command=DUMP), parent=1)
    assert res.returncode == launch.GONE and "is gone; not starting" in res.stderr and not res.stdout
    res, _ = run_launcher(tmp_path, service(command=DUMP, directory=str(tmp_path / "nope")))
    assert res.returncode == launch.SETUP and "cannot change to directory" in res.stderr and not res.stdout


def test_launcher_runs_the_program_with_a_parent_death_signal_where_setpriv_has_one():
    # that it works is shown with a real supervisord in tests/store/test_fence.py (killing the fence)
    if launch.pdeathsig_tool() is None:
        pytest.skip("no setpriv with --pdeathsig on this machine")
    spec = launch_spec(service(), "n1", 1, Path("/cg"), 1)
    assert f"exec {launch.pdeathsig_tool()} --pdeathsig KILL -- /usr/bin/python3 -m http.server 8080" in spec


def test_no_vip_no_vip_variable(tmp_path):
    res, _ = run_launcher(tmp_path, service(command=DUMP, vip=None, interface=None))
    assert "ETCDHA_VIP" not in json.loads(res.stdout)[1]


@pytest.mark.skipif(os.geteuid() != 0, reason="changing to another user needs root")
def test_a_service_with_a_user_runs_as_that_user_with_its_home(tmp_path):
    import pwd

    nobody = pwd.getpwnam("nobody")
    tmp_path.chmod(0o755)
    res, group = run_launcher(tmp_path, service(
        command=(sys.executable, "-c", "import json, os; print(json.dumps([os.getuid(), os.getgid(), os.getgroups(), "
                                       "os.environ.get('HOME'), os.environ.get('USER'), os.environ['GREETING']]))"),
        environment={"GREETING": "hi"}, user="nobody"))
    assert res.returncode == 0, res.stderr
    uid, gid, groups, home, user, greeting = json.loads(res.stdout)
    assert (uid, gid, home, user, greeting) == (nobody.pw_uid, nobody.pw_gid, nobody.pw_dir, "nobody", "hi")
    assert 0 not in groups, "no supplementary group of root's is kept"
    assert group.joinpath("cgroup.procs").read_text().strip().isdigit()  # the cgroup was entered first, as root


def test_a_numeric_user_without_a_passwd_entry_and_an_explicit_group():
    spec = launch_spec(service(user="4242", group="0"), "n1", 1, Path("/cg"), 1)
    assert "--reuid=4242 --regid=0 --clear-groups" in spec
    assert "export HOME=/" in spec and "USER=" not in spec


def test_an_unknown_user_is_a_lookup_error_naming_it():
    with pytest.raises(LookupError, match="no user 'no-such-user-xyz'"):
        launch_spec(service(user="no-such-user-xyz"), "n1", 1, Path("/cg"), 1)
