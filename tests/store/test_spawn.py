"""supervisord through etcdha/spawn.py: programs started with posix_spawn, exactly as its own fork would.

Real supervisord processes over their unix socket; stock supervisord is the control for
what "as its own fork would" and "without forking" mean.
"""
from __future__ import annotations

import http.client
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import xmlrpc.client
from pathlib import Path
from typing import Callable, Iterator

import pytest

from etcdha.supervisord import SPAWN

from .conftest import stop_process, wait_for

pytestmark = pytest.mark.store

STOCK = [sys.executable, "-m", "supervisor.supervisord"]
OURS = [sys.executable, str(SPAWN)]


class _Connection(http.client.HTTPConnection):
    def __init__(self, path: str):
        super().__init__("localhost", timeout=10)
        self.path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(10)
        self.sock.connect(self.path)


class _Transport(xmlrpc.client.Transport):
    def __init__(self, path: str):
        super().__init__()
        self.path = path

    def make_connection(self, host):  # noqa: ANN001 - xmlrpc API
        return _Connection(self.path)


class Supervisord:
    """One supervisord with the given program sections, holding an inheritable descriptor its programs must not get."""

    def __init__(self, command: list[str], programs: dict[str, str]):
        self.dir = Path(tempfile.mkdtemp(prefix="ehsp-", dir="/tmp"))
        self.sock = self.dir / "s.sock"
        conf = [f"[unix_http_server]\nfile={self.sock}\n[supervisord]\nnodaemon=true\nminfds=64\n"
                f"logfile={self.dir}/supervisord.log\npidfile={self.dir}/supervisord.pid\n"
                f"childlogdir={self.dir}\n"  # AUTO stderr logs too: nothing left in /tmp
                "[rpcinterface:supervisor]\nsupervisor.rpcinterface_factory = "
                "supervisor.rpcinterface:make_main_rpcinterface\n"]
        for name, body in programs.items():
            conf.append(f"[program:{name}]\nautostart=false\nstartretries=0\nstdout_logfile={self.dir}/{name}.log\n"
                        + body + "\n")
        (self.dir / "supervisord.conf").write_text("".join(conf))
        self.leak_r, self.leak_w = os.pipe()  # inheritable in supervisord only: pass_fds
        self.proc = subprocess.Popen([*command, "-n", "-c", str(self.dir / "supervisord.conf")],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     pass_fds=(self.leak_r, self.leak_w))
        self.rpc = xmlrpc.client.ServerProxy("http://localhost", transport=_Transport(str(self.sock)))

    def wait_ready(self) -> None:
        wait_for(lambda: self._state() == "RUNNING", 20, what="supervisord to answer")

    def _state(self) -> str:
        try:
            return self.rpc.supervisor.getState()["statename"]
        except (OSError, http.client.HTTPException, xmlrpc.client.Error):
            return ""

    def info(self, name: str) -> dict:
        return self.rpc.supervisor.getProcessInfo(name)

    def close(self) -> None:
        try:
            self.rpc.supervisor.stopAllProcesses()
        except (OSError, http.client.HTTPException, xmlrpc.client.Error):
            pass
        stop_process(self.proc)
        os.close(self.leak_r)
        os.close(self.leak_w)
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def supervisords() -> Iterator[Callable[[list[str], dict[str, str]], Supervisord]]:
    made: list[Supervisord] = []

    def make(command: list[str], programs: dict[str, str]) -> Supervisord:
        made.append(Supervisord(command, programs))  # stopped at the end even if it never answers
        made[-1].wait_ready()
        return made[-1]

    yield make
    for s in made:
        s.close()


def _stat_field(pid: int, index: int) -> int:
    """A field of /proc/PID/stat, counted after the command name (0: state)."""
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[index])


def _what_a_program_got(s: Supervisord, name: str) -> dict:
    pid = s.info(name)["pid"]
    environ = dict(e.split("=", 1) for e in Path(f"/proc/{pid}/environ").read_text().split("\0") if "=" in e)
    return {
        "fds": sorted(int(fd) for fd in os.listdir(f"/proc/{pid}/fd")),
        "parent is supervisord": _stat_field(pid, 1) == s.proc.pid,
        "own process group": os.getpgid(pid) == pid,
        "cwd": os.readlink(f"/proc/{pid}/cwd"),
        "env": {k: v.replace(str(s.dir), "DIR") for k, v in environ.items() if k.startswith(("SUPERVISOR_", "HA_"))},
    }


PROGRAMS = {
    "plain": "command=/bin/sh -c 'echo out; echo err >&2; exec sleep 300'\nredirect_stderr=true\nenvironment=HA_X=\"1\"",
    "split": "command=/bin/sh -c 'echo out; echo err >&2; exec sleep 300'\nstderr_logfile=%(here)s/split.err",
    "elsewhere": "command=/bin/sleep 300\ndirectory=/tmp",  # supervisord's own fork does directory=
}


def test_a_program_gets_what_stock_supervisord_gives_it(supervisords):
    """Descriptors (the pipes on 0-2 only, not what supervisord inherited), parent, process group,
    directory, environment and output: the same through spawn.py as through stock supervisord."""
    got = {}
    for label, command in (("stock", STOCK), ("ours", OURS)):
        s = supervisords(command, PROGRAMS)
        for name in PROGRAMS:
            s.rpc.supervisor.startProcess(name, True)
        got[label] = {name: _what_a_program_got(s, name) for name in PROGRAMS}
        wait_for(lambda: "err" in (s.dir / "plain.log").read_text() and (s.dir / "split.err").exists()
                 and "err" in (s.dir / "split.err").read_text(), 10, what="the programs' output")
        got[label]["logs"] = {"plain": sorted((s.dir / "plain.log").read_text().split()),
                              "split": (s.dir / "split.log").read_text().split(),
                              "split.err": (s.dir / "split.err").read_text().split()}
    assert got["ours"] == got["stock"]
    plain = got["ours"]["plain"]
    assert plain["fds"] == [0, 1, 2] and plain["parent is supervisord"] and plain["own process group"]
    assert plain["env"]["SUPERVISOR_PROCESS_NAME"] == "plain" and plain["env"]["HA_X"] == "1"
    assert got["ours"]["logs"] == {"plain": ["err", "out"], "split": ["out"], "split.err": ["err"]}
    assert got["ours"]["elsewhere"]["cwd"] == "/tmp"


def test_a_start_does_not_fork_supervisord(supervisords):
    """Copy-on-write faults in supervisord per start: hundreds after a fork, next to none after posix_spawn."""
    programs = {f"p{i}": "command=/bin/sleep 300\nstartsecs=0" for i in range(30)}
    faults = {}
    for label, command in (("stock", STOCK), ("ours", OURS)):
        s = supervisords(command, programs)
        before = _stat_field(s.proc.pid, 7)  # minflt
        s.rpc.system.multicall([{"methodName": "supervisor.startProcess", "params": [name, False]}
                                for name in programs])
        faults[label] = (_stat_field(s.proc.pid, 7) - before) / len(programs)
        assert {s.info(name)["statename"] for name in programs} == {"RUNNING"}
    assert faults["stock"] > 5 * max(faults["ours"], 10), faults


def test_a_program_that_cannot_be_executed_fails_as_under_stock_supervisord(supervisords, tmp_path):
    """posix_spawn refuses it (no #! line): supervisord's own fork tries, and reports it as ever."""
    garbage = tmp_path / "garbage"
    garbage.write_bytes(b"\x00\x01not a program\n")
    garbage.chmod(0o755)
    for command in (STOCK, OURS):
        s = supervisords(command, {"bad": f"command={garbage}\nstartsecs=1\nredirect_stderr=true", "good": "command=/bin/sleep 300"})
        with pytest.raises(xmlrpc.client.Fault):
            s.rpc.supervisor.startProcess("bad", True)
        wait_for(lambda: s.info("bad")["statename"] == "FATAL", 10, what="the bad program to be FATAL")
        s.rpc.supervisor.startProcess("good", True)
        assert s.info("good")["statename"] == "RUNNING"
        assert "couldn't exec" in (s.dir / "bad.log").read_text(), command
