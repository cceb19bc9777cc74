"""The agent's own supervisord: generated config files and XML-RPC over a unix socket.

supervisord itself is started by the fence process (so the fence can kill it and
everything below it); this module writes its config and drives it. Programs are
generated with autostart=false and autorestart=false: a restarted supervisord
never starts a copy on its own, and restarting a crashed program is the agent's
decision (it must not happen while the service is paused). Supervisor faults are mapped to outcomes in `_call` only.
"""
from __future__ import annotations

import http.client
import logging
import shlex
import socket
import sys
import time
import xmlrpc.client
from pathlib import Path

from etcdha.config import Config, Service
from etcdha.errors import ActuatorError, ConfigError

log = logging.getLogger(__name__)

# supervisor.xmlrpc.Faults
BAD_NAME, NO_FILE, NOT_EXECUTABLE, FAILED = 10, 20, 21, 30
ABNORMAL_TERMINATION, SPAWN_ERROR, ALREADY_STARTED, NOT_RUNNING = 40, 50, 60, 70
SUCCESS_FAULTS = {ALREADY_STARTED, NOT_RUNNING}


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float):
        super().__init__("localhost", timeout=timeout)
        self.path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self.path)


class _UnixTransport(xmlrpc.client.Transport):
    """XML-RPC over a unix socket with a timeout on every call (supervisor's own has none)."""

    def __init__(self, path: str, timeout: float):
        super().__init__()
        self.path, self.timeout = path, timeout

    def make_connection(self, host):  # noqa: ANN001 - xmlrpc API
        return _UnixConnection(self.path, self.timeout)


def _quote_value(value: str) -> str:
    """A value for supervisord's ini: `%` starts its own expansions."""
    return value.replace("%", "%%")


def _env_quote(value: str) -> str:
    return f"'{value}'" if '"' in value else f'"{value}"'


def program_section(service: Service, node: str, token: int, log_dir: Path) -> str:
    """The [program:x] section for one service, with the fencing token in its environment."""
    env = {**service.environment, "ETCDHA_SERVICE": service.name, "ETCDHA_NODE": node,
           "ETCDHA_FENCING_TOKEN": str(token)}
    if service.vip:
        env["ETCDHA_VIP"] = str(service.vip.ip)
    # supervisord splits this with a non-POSIX shlex: no escapes, quotes kept then stripped.
    # config.py rejects values that cannot be written this way.
    env_items = ",".join(f"{k}={_env_quote(_quote_value(v))}" for k, v in sorted(env.items()))
    lines = [
        f"[program:{service.name}]",
        f"command={_quote_value(shlex.join(service.command))}",
        "autostart=false",
        "autorestart=false",  # the agent restarts it (and does not while the service is paused)
        f"startsecs={service.startsecs}",
        f"startretries={service.startretries}",
        f"stopwaitsecs={service.stopwaitsecs}",
        "stopasgroup=true",
        "killasgroup=true",
        "redirect_stderr=true",
        f"stdout_logfile={_quote_value(str(log_dir / (service.name + '.log')))}",
        "stdout_logfile_maxbytes=1MB",
        "stdout_logfile_backups=2",
        f"environment={env_items}",
    ]
    if service.directory:
        lines.append(f"directory={_quote_value(service.directory)}")
    return "\n".join(lines) + "\n"


class Supervisor:
    """Drives one supervisord instance that lives under `run_dir`."""

    def __init__(self, config: Config, timeout: float = 5.0):
        self.config = config
        self.dir = config.run_dir
        self.conf = self.dir / "supervisord.conf"
        self.socket = self.dir / "supervisor.sock"
        self.programs = self.dir / "programs"
        self.logs = self.dir / "logs"
        self.timeout = timeout

    def command(self) -> list[str]:
        """How to run supervisord in the foreground (the fence starts it)."""
        return [sys.executable, "-m", "supervisor.supervisord", "-n", "-c", str(self.conf)]

    def prepare(self) -> None:
        """Write a fresh main config and an empty program directory."""
        for d in (self.dir, self.programs, self.logs):
            d.mkdir(parents=True, exist_ok=True, mode=0o700)
        for old in self.programs.glob("*.conf"):
            old.unlink()
        if self.socket.exists():
            self.socket.unlink()
        self.conf.write_text("\n".join([
            "[unix_http_server]",
            f"file={_quote_value(str(self.socket))}",
            "chmod=0700",
            "[supervisord]",
            "nodaemon=true",
            f"logfile={_quote_value(str(self.logs / 'supervisord.log'))}",
            "logfile_maxbytes=1MB",
            f"pidfile={_quote_value(str(self.dir / 'supervisord.pid'))}",
            f"childlogdir={_quote_value(str(self.logs))}",
            "[rpcinterface:supervisor]",
            "supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface",
            "[include]",
            f"files={_quote_value(str(self.programs))}/*.conf",
            "",
        ]))

    def _call(self, method: str, *args, timeout: float = 0.0):
        """One XML-RPC call; supervisor faults that mean 'already so' are success (None)."""
        proxy = xmlrpc.client.ServerProxy(
            "http://localhost", transport=_UnixTransport(str(self.socket), timeout or self.timeout))
        try:
            return getattr(proxy.supervisor, method)(*args)
        except xmlrpc.client.Fault as fault:
            if fault.faultCode in SUCCESS_FAULTS:
                return None
            if fault.faultCode in (NO_FILE, NOT_EXECUTABLE):
                raise ConfigError(f"supervisord cannot run {args[0] if args else ''}: {fault.faultString}") from None
            raise ActuatorError(f"supervisord {method}{args!r}: {fault.faultString}") from None
        except (OSError, http.client.HTTPException, xmlrpc.client.ProtocolError) as exc:
            raise ActuatorError(f"supervisord at {self.socket} did not answer {method}: {exc}") from None

    def wait_ready(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                if self._call("getState")["statename"] == "RUNNING":
                    return
            except ActuatorError:
                pass
            if time.monotonic() > deadline:
                raise ActuatorError(f"supervisord did not come up on {self.socket} within {timeout:g}s")
            time.sleep(0.05)

    def states(self) -> dict[str, str]:
        """service -> supervisord state name, for the programs supervisord knows."""
        return {p["name"]: p["statename"] for p in self._call("getAllProcessInfo")}

    def pids(self) -> dict[str, int]:
        return {p["name"]: p["pid"] for p in self._call("getAllProcessInfo") if p["pid"]}

    def start(self, service: Service, token: int) -> None:
        """(Re)write the program with this fencing token and start it without waiting."""
        path = self.programs / f"{service.name}.conf"
        path.write_text(program_section(service, self.config.node, token, self.logs))
        self._apply_config()
        self._call("startProcess", service.name, False)

    def _apply_config(self) -> None:
        added, changed, removed = self._call("reloadConfig")[0]
        for name in removed + changed:
            self._call("stopProcessGroup", name, True)
            self._call("removeProcessGroup", name)
        for name in added + changed:
            self._call("addProcessGroup", name)

    def stop(self, service: Service) -> None:
        """Stop a program and wait until it is down (supervisord escalates to SIGKILL after stopwaitsecs).

        We poll instead of stopProcess(wait=True), which only returns on supervisord's 1 s tick.
        """
        try:
            self._call("stopProcess", service.name, False)
        except ActuatorError as exc:
            if "BAD_NAME" in str(exc):
                return
            raise
        deadline = time.monotonic() + service.stopwaitsecs + self.timeout
        while self._call("getProcessInfo", service.name)["statename"] in ("STOPPING", "RUNNING", "STARTING"):
            if time.monotonic() > deadline:
                raise ActuatorError(f"{service.name} did not stop within {service.stopwaitsecs}s + SIGKILL")
            time.sleep(0.02)

    def stop_all(self) -> None:
        """Stop every program; all get SIGTERM at once, then we wait for each."""
        states = self.states()
        running = [s for s in self.config.services.values()
                   if states.get(s.name) in ("RUNNING", "STARTING", "BACKOFF")]
        for s in running:
            self._call("stopProcess", s.name, False)
        for s in running:
            self.stop(s)

    def shutdown(self) -> None:
        try:
            self._call("shutdown")
        except ActuatorError:
            pass

