"""config.host_problems: what a valid config needs from this host (interfaces, programs,
directories, TLS files), each problem one line naming file and key path."""
from __future__ import annotations

import os
import shutil
import tempfile
import json
import socket
from pathlib import Path

import pytest

from etcdha import config

pytestmark = pytest.mark.unit

SRC = "/etc/etcdha/agent.yaml"
MISSING_IF = "nosuchif9z"


def executable(path: Path, body: str = "#!/bin/sh\nexit 0\n") -> Path:
    path.write_text(body)
    path.chmod(0o755)
    return path


def cfg(services: dict, **top) -> config.Config:
    return config.parse({"node": "n1", "services": services, **top}, SRC)


def problems(services: dict, **top) -> list[str]:
    found = config.host_problems(cfg(services, **top))
    for line in found:
        assert line.startswith(f"{SRC}: ") and "\n" not in line, line
    return found


def test_missing_interface_is_assumed_absent():
    with pytest.raises(OSError):
        socket.if_nametoindex(MISSING_IF)


def test_all_present(tmp_path):
    prog = executable(tmp_path / "prog")
    assert problems({"web": {"command": [str(prog), "--flag"], "vip": "198.18.0.100/24", "interface": "lo",
                             "directory": str(tmp_path)},
                     "sh": {"command": "sh -c true"}}) == []


def test_interface_missing_in_this_namespace():
    assert problems({"web": {"command": "/bin/sh", "vip": "198.18.0.100/24", "interface": MISSING_IF}}) == [
        f"{SRC}: services.web.interface: expected a network interface of this host's network namespace "
        f"(got '{MISSING_IF}': no such interface)"]


def test_absolute_program_missing(tmp_path):
    prog = tmp_path / "nope"
    assert problems({"web": {"command": [str(prog)]}}) == [
        f"{SRC}: services.web.command: expected an executable program (got '{prog}': no such file)"]


def test_program_not_executable(tmp_path):
    prog = tmp_path / "script"
    prog.write_text("#!/bin/sh\n")
    prog.chmod(0o644)  # no execute bit: refused even to root
    assert problems({"web": {"command": [str(prog)]}}) == [
        f"{SRC}: services.web.command: expected an executable program (got '{prog}': not executable)"]


def test_program_is_a_directory(tmp_path):
    assert problems({"web": {"command": [str(tmp_path)]}}) == [
        f"{SRC}: services.web.command: expected an executable program (got '{tmp_path}': a directory)"]


def test_relative_program_is_found_from_directory(tmp_path, monkeypatch):
    executable(tmp_path / "run.sh")
    monkeypatch.chdir("/")
    assert problems({"web": {"command": "./run.sh", "directory": str(tmp_path)}}) == []
    assert problems({"web": {"command": "./other.sh", "directory": str(tmp_path)}}) == [
        f"{SRC}: services.web.command: expected an executable program (got './other.sh': no such file)"]


def test_relative_program_without_directory_is_relative_to_cwd(tmp_path, monkeypatch):
    executable(tmp_path / "run.sh")
    monkeypatch.chdir(tmp_path)
    assert problems({"web": {"command": "./run.sh"}}) == []
    monkeypatch.chdir("/")
    assert len(problems({"web": {"command": "./run.sh"}})) == 1


def test_bare_name_uses_the_service_path(tmp_path, monkeypatch):
    bindir = tmp_path / "bin"
    bindir.mkdir()
    executable(bindir / "mytool")
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    assert problems({"web": {"command": "mytool", "environment": {"PATH": f"/nonexistent:{bindir}"}}}) == []
    found = problems({"web": {"command": "mytool"}})
    assert found == [f"{SRC}: services.web.command: expected a program found on the PATH (got 'mytool'; "
                     "PATH='/usr/bin:/bin')"]


def test_bare_name_uses_the_agent_path(tmp_path, monkeypatch):
    executable(tmp_path / "mytool")
    monkeypatch.setenv("PATH", str(tmp_path))
    assert problems({"web": {"command": "mytool --x"}}) == []
    (tmp_path / "mytool").chmod(0o644)
    assert len(problems({"web": {"command": "mytool --x"}})) == 1


def test_bare_name_without_any_path_uses_defpath(monkeypatch):
    monkeypatch.delenv("PATH", raising=False)
    assert os.defpath and problems({"web": {"command": "sh -c true"}}) == []
    assert "PATH=" in problems({"web": {"command": "surely-not-a-program-9z"}})[0]


def test_directory_missing_or_a_file(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("")
    found = problems({"a": {"command": "/bin/sh", "directory": str(tmp_path / "gone")},
                      "b": {"command": "/bin/sh", "directory": str(afile)}})
    assert found == [
        f"{SRC}: services.a.directory: expected an existing directory (got '{tmp_path / 'gone'}': no such directory)",
        f"{SRC}: services.b.directory: expected an existing directory (got '{afile}': not a directory)"]


def test_relative_program_in_missing_directory_reported_once(tmp_path):
    found = problems({"a": {"command": "./run.sh", "directory": str(tmp_path / "gone")}})
    assert len(found) == 1 and "services.a.directory" in found[0]


def test_tls_files(tmp_path):
    ca = tmp_path / "ca.pem"
    ca.write_text("x")
    etcd = {"ca_cert": str(ca), "cert": str(tmp_path / "missing.pem"), "key": str(tmp_path)}
    found = problems({"web": {"command": "/bin/sh"}}, etcd=etcd)
    assert found == [
        f"{SRC}: etcd.cert: expected a readable file (got '{tmp_path / 'missing.pem'}': no such file)",
        f"{SRC}: etcd.key: expected a readable file (got '{tmp_path}': not a regular file)"]


def test_unreadable_tls_file():
    where = Path(tempfile.mkdtemp(prefix="ehk-", dir="/tmp"))  # not under pytest's 0700 tmp dir
    try:
        where.chmod(0o755)
        key = where / "key.pem"
        key.write_text("x")
        key.chmod(0)
        cfg_ = cfg({"web": {"command": "/bin/sh"}}, etcd={"key": str(key)})
        expected = [f"{SRC}: etcd.key: expected a readable file (got '{key}': permission denied)"]
        if os.geteuid() != 0:
            assert config.host_problems(cfg_) == expected
            return
        # root reads any file: check as an unprivileged user instead, in a forked child
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            try:
                os.setgid(65534)
                os.setuid(65534)
                os.write(write_end, json.dumps(config.host_problems(cfg_)).encode())
            finally:
                os._exit(0)
        os.close(write_end)
        with os.fdopen(read_end) as f:
            got = f.read()
        os.waitpid(pid, 0)
        assert json.loads(got) == expected
    finally:
        shutil.rmtree(where, ignore_errors=True)


def test_every_problem_reported(tmp_path):
    found = problems({"web": {"command": str(tmp_path / "x"), "vip": "198.18.0.100/24", "interface": MISSING_IF,
                              "directory": str(tmp_path / "d")}},
                     etcd={"ca_cert": str(tmp_path / "ca.pem")})
    assert [line.split(": ")[1] for line in found] == [
        "services.web.interface", "services.web.directory", "services.web.command", "etcd.ca_cert"]
