"""Agent config: YAML -> frozen dataclasses, validated once at load.

Every error names the file, the key path and what was expected, so an operator
can fix the file without reading this code; every error in a file is reported
at once. Timing relations that protect the at-most-one-copy invariant are
checked here, not discovered at run time. Nothing that reaches a path, argv or
the environment may carry control characters, and no number may be NaN,
infinite or absurd: bad input must never weaken safety.
"""
from __future__ import annotations

import ipaddress
import os
import re
import shlex
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence
from urllib.parse import urlparse

import yaml

from etcdha.errors import ConfigError

DEFAULT_PREFIX = "/etcdha"
PASSWORD_ENV = "ETCDHA_ETCD_PASSWORD"  # the etcd password when etcd.password_file is not set
# etcd (default heartbeat/election settings) raises any TTL below this to it.
ETCD_MIN_TTL = 2
# A lease outliving 10 minutes would keep a dead node's services down that long.
MAX_TTL = 600
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")  # always used with fullmatch
NAME_RULE = "1-63 characters of letters, digits, '_', '.', '-', starting with a letter or digit (no '/' or whitespace)"
ENV_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# C0, DEL, C1 and the Unicode line/paragraph separators: each can end a line in some reader.
CONTROL_RE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
CONTROL_RULE = "no control characters (newline, tab, NUL, ...)"
IFNAME_RE = re.compile(r"[^/:\s]{1,15}")  # the kernel's dev_valid_name(); length checked in bytes too
# supervisord's socket is RUN_DIR/supervisor.sock; sun_path holds 108 bytes with the NUL.
MAX_RUN_DIR_BYTES = 80
MAX_FILE_BYTES = 1 << 20  # a config is a few kilobytes
MAX_NODES = 100_000       # YAML nodes after expanding aliases
MAX_DEPTH = 32            # nesting levels; a config needs about 5
_MERGE_TAG = "tag:yaml.org,2002:merge"
_UNSET: Any = object()


class ConfigErrors(ConfigError):
    """Every problem found in one config file, each a complete `FILE: key.path: ...` line."""

    def __init__(self, errors: Sequence[str]):
        self.errors: list[str] = [_one_line(e) for e in errors]
        super().__init__("\n".join(self.errors))


@dataclass(frozen=True)
class EtcdConfig:
    """Where the cluster state lives."""

    endpoints: tuple[str, ...] = ("http://127.0.0.1:2379",)
    prefix: str = DEFAULT_PREFIX
    timeout: float = 1.0  # per RPC; a call never blocks longer
    ca_cert: Optional[str] = None
    cert: Optional[str] = None
    key: Optional[str] = None
    election_timeout: float = 1.0  # etcd's --election-timeout (s): for the ride-through check only
    username: Optional[str] = None  # etcd auth (RBAC); the password comes from password_file or PASSWORD_ENV
    password_file: Optional[str] = None

    def password(self) -> Optional[str]:
        """The etcd password: password_file's first line, else $ETCDHA_ETCD_PASSWORD; None without a username.

        Raises ConfigError naming the file if it cannot be read. Never logged, never on a command line.
        """
        if self.username is None:
            return None
        if self.password_file:
            try:
                with open(self.password_file, encoding="utf-8") as f:
                    return f.readline().rstrip("\r\n")
            except (OSError, UnicodeDecodeError) as exc:
                raise ConfigError(f"etcd.password_file: cannot read {self.password_file} "
                                  f"({getattr(exc, 'strerror', None) or exc})") from None
        value = os.environ.get(PASSWORD_ENV)
        if value is None:
            raise ConfigError(f"etcd.username is {self.username!r} but there is no password: set etcd.password_file "
                              f"or the environment variable {PASSWORD_ENV}")
        return value

    def access(self) -> dict:
        """What a helper needs to reach etcd without our config (the fence, stop-post): never the password itself."""
        return {"endpoints": list(self.endpoints), "timeout": self.timeout, "ca_cert": self.ca_cert, "cert": self.cert,
                "key": self.key, "username": self.username, "password_file": self.password_file}


def election_ride_through(lease_ttl: float, fence_margin: float, keepalive: float, election: float) -> bool:
    """Can an owner renew across an etcd leader election without its fence firing?

    Renewals stop until a new leader is elected: raft followers wait one to two
    election timeouts (randomized) before they campaign, plus a reconnect (~0.3 s);
    the last renewal may be one keepalive interval old when it starts, and the fence
    fires fence_margin before the deadline. Measured with etcd on the nodes, lease_ttl 2,
    keepalive 0.5: with --election-timeout 500 a survivor fenced itself in 4 of 10 crashes
    of the leader's node, with 300 and keepalive 0.25 in none of 20.
    """
    return lease_ttl - fence_margin - keepalive > 2 * election + 0.3


CHECK_KINDS = ("http", "tcp", "exec")
CHECK_KEYS = {"name", *CHECK_KINDS, "expect_status", "expect_body", "interval", "timeout", "failure_threshold",
              "success_threshold", "start_grace"}


@dataclass(frozen=True)
class Check:
    """One health check of a service: a Kubernetes liveness probe, a Pacemaker monitor operation.

    Run only by the owner, every `interval` once the program is RUNNING and `start_grace` has
    passed since the agent started it; `failure_threshold` failures in a row make the service
    unhealthy (restart, then migrate: see Service), `success_threshold` passes in a row healthy again.
    """

    name: str
    kind: str                             # http, tcp or exec
    target: str = ""                      # http: the URL; tcp: HOST:PORT
    command: tuple[str, ...] = ()         # exec: argv, run in the service's directory and environment
    expect_status: Optional[int] = None   # http: this status, or any 2xx/3xx when None
    expect_body: Optional[str] = None     # http: a substring of the first 64 KiB of the body
    interval: float = 5.0
    timeout: float = 2.0
    failure_threshold: int = 3
    success_threshold: int = 1
    start_grace: float = 0.0


@dataclass(frozen=True)
class Service:
    """One supervised program plus its optional virtual IP and health checks."""

    name: str
    command: tuple[str, ...]
    vip: Optional[ipaddress.IPv4Interface | ipaddress.IPv6Interface] = None
    interface: Optional[str] = None
    priority: int = 100
    startsecs: int = 1
    startretries: int = 2
    stopwaitsecs: int = 2
    directory: Optional[str] = None
    environment: Mapping[str, str] = field(default_factory=dict)
    user: Optional[str] = None     # run as this user (name or uid) instead of root; the agent stays root
    group: Optional[str] = None    # and this group (default: the user's primary group)
    checks: tuple[Check, ...] = ()
    max_restarts: int = 3          # restarts in place after failed checks before migrating (within failure_timeout)
    failure_timeout: float = 600.0  # a failure counts for this long (Pacemaker's failure-timeout)


@dataclass(frozen=True)
class Config:
    """Everything an agent needs; built only by `load`/`parse`."""

    node: str
    etcd: EtcdConfig
    services: Mapping[str, Service]
    lease_ttl: int = 2
    keepalive_interval: float = 0.5
    fence_margin: float = 0.6
    reconcile_interval: float = 2.0
    claim_delay: float = 0.5
    startup_grace: float = 2.0
    failure_cooldown: float = 30.0
    move_timeout: int = 10
    history_size: int = 100
    drain_concurrency: int = 32  # services a drained node moves at once
    run_dir: Path = Path("/run/etcdha/default")
    source: str = "<config>"
    cgroup_root: Optional[Path] = None  # None: the agent finds its own cgroup
    node_checks: tuple[Check, ...] = ()  # while one fails, this node hands its services over and claims nothing
    track_interfaces: bool = True  # a VIP interface without carrier makes this node unhealthy too
    notify_command: tuple[str, ...] = ()  # run once per transition, with the event in its environment
    notify_timeout: float = 10.0
    metrics_listen: Optional[tuple[str, int]] = None  # serve /metrics and /health here; None: off

    @property
    def vips(self) -> tuple[tuple[str, str], ...]:
        """(interface, cidr) of every configured VIP: what the fence may remove."""
        return tuple((s.interface, str(s.vip)) for s in self.services.values() if s.vip and s.interface)


# ---- rendering values in one line ---------------------------------------------------------------

def _escape(match: re.Match) -> str:
    return repr(match.group())[1:-1]


def _one_line(text: str) -> str:
    """Control characters escaped, so one error is exactly one terminal line."""
    return CONTROL_RE.sub(_escape, text)


def _show(value: Any, limit: int = 80) -> str:
    """repr() for an error message: short, one line, and never failing (huge ints cannot be printed)."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 200:
        return f"an integer of {value.bit_length()} bits"
    try:
        text = repr(value)
    except (ValueError, RecursionError):
        text = f"a {type(value).__name__}"
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _key(key: Any) -> str:
    """A mapping key as a component of a key path: verbatim if plain text, else its repr."""
    if isinstance(key, str) and key and not CONTROL_RE.search(key) and len(key) <= 100:
        return key
    return _show(key)


def _num(x: float) -> str:
    return f"{x:g}" if isinstance(x, float) else str(x)


class _Reader:
    """Typed access to a YAML mapping; records every error as `file: key.path: expectation (got value)`."""

    def __init__(self, source: str):
        self.source = source
        self.errors: list[str] = []

    def error(self, path: str, expected: str, got: Any = _UNSET) -> None:
        shown = "" if got is _UNSET else f" (got {_show(got)})"
        self.errors.append(f"{self.source}: {path}: expected {expected}{shown}")

    def raise_if_any(self) -> None:
        if self.errors:
            raise ConfigErrors(self.errors)

    def mapping(self, value: Any, path: str) -> Optional[Mapping[Any, Any]]:
        if not isinstance(value, dict):
            self.error(path, "a mapping", value)
            return None
        return value

    def number(self, data: Mapping[str, Any], key: str, path: str, default: float, low: float, high: float,
               kind: str = "seconds") -> Any:
        """A number within [low, high], or None (error recorded). kind: seconds, whole seconds or count.

        The bounds also keep out NaN (every comparison with it is false), the infinities and booleans.
        """
        value = data.get(key, default)
        integer = kind != "seconds"
        ok = not isinstance(value, bool) and isinstance(value, int if integer else (int, float))
        if not ok or not low <= value <= high:
            unit = {"seconds": "a number of seconds", "whole seconds": "a whole number of seconds",
                    "count": "an integer"}[kind]
            self.error(f"{path}{key}", f"{unit} between {_num(low)} and {_num(high)}", value)
            return None
        return value

    def name(self, value: Any, path: str, hint: str = "") -> Optional[str]:
        if not isinstance(value, str) or not NAME_RE.fullmatch(value):
            self.error(path, f"a name of {NAME_RULE}{hint}", value)
            return None
        return value

    def text(self, value: Any, path: str, what: str) -> Optional[str]:
        """A string without control characters (they would end a line in a config, log or argv)."""
        if not isinstance(value, str):
            self.error(path, what, value)
            return None
        if CONTROL_RE.search(value):
            self.error(path, f"{what} with {CONTROL_RULE}", value)
            return None
        return value

    def path(self, value: Any, path: str, what: str, no_space: bool = False) -> Optional[str]:
        """An absolute path: a relative one would depend on whichever directory the agent runs in."""
        value = self.text(value, path, what)
        if value is None:
            return None
        if not value.startswith("/"):
            self.error(path, "an absolute path (starting with /)", value)
            return None
        if no_space and re.search(r"\s", value):
            self.error(path, f"{what} without whitespace", value)
            return None
        return value

    def unknown_keys(self, data: Mapping[Any, Any], allowed: set[str], path: str) -> None:
        for extra in sorted(set(data) - allowed, key=str):
            self.error(f"{path}{_key(extra)}", f"one of the known keys {sorted(allowed)}", "unknown key")


# ---- values usable outside a config file too (CLI options) --------------------------------------

def redact(url: str) -> str:
    """`url` with any password in it replaced by ***, for error messages and logs."""
    return re.sub(r"(?<=://)([^/@\s]*?):[^/@\s]*@", r"\1:***@", url)


def parse_endpoint(value: Any, where: str = "endpoint") -> tuple[str, int, bool]:
    """'http://host:port' -> (host, port, tls); raises ConfigError naming `where`."""
    if isinstance(value, str) and "@" in value.split("/")[2 if "://" in value else 0]:
        raise ConfigError(f"{where}: expected a URL without user or password (got {_show(redact(value))}): "
                          "credentials in a URL show in process lists and logs; use etcd.username and "
                          f"etcd.password_file (or {PASSWORD_ENV})")
    expected = f"{where}: expected a URL like http://HOST:2379 (got {_show(value)})"
    if not isinstance(value, str):
        raise ConfigError(expected)
    if CONTROL_RE.search(value) or re.search(r"\s", value):
        # urlparse silently drops tabs and newlines, so check before it sees them
        raise ConfigError(f"{where}: expected a URL like http://HOST:2379 without whitespace or control "
                          f"characters (got {_show(value)})")
    url = urlparse(value if "://" in value else f"http://{value}")
    if url.scheme not in ("http", "https") or not url.hostname:
        raise ConfigError(expected)
    try:
        port = url.port
    except ValueError:
        port = 0
    if port == 0 or (port is None and url.netloc.endswith(":")):
        raise ConfigError(f"{where}: expected a port number from 1 to 65535 in {_show(value)}")
    return url.hostname, port or 2379, url.scheme == "https"


def check_prefix(prefix: Any, where: str) -> str:
    """A key prefix is an absolute path-like string without a trailing slash."""
    if not isinstance(prefix, str) or not re.fullmatch(r"/[A-Za-z0-9_./-]{0,200}[A-Za-z0-9_.-]", prefix):
        raise ConfigError(f"{where}: expected a key prefix like /etcdha (got {_show(prefix)})")
    return prefix


# ---- sections -----------------------------------------------------------------------------------

def parse_command(value: Any, path: str, reader: _Reader) -> Optional[tuple[str, ...]]:
    """A command is a shell-like string or a list of arguments; it is run without a shell."""
    if isinstance(value, str):
        try:
            argv = shlex.split(value)
        except ValueError as exc:
            reader.error(path, f"a command line with balanced quotes ({exc})", value)
            return None
    elif isinstance(value, list) and all(isinstance(a, str) for a in value):
        argv = list(value)
    else:
        reader.error(path, "a command string or a list of strings", value)
        return None
    if not argv or not argv[0]:
        reader.error(path, "a non-empty command", value)
        return None
    if any(CONTROL_RE.search(a) for a in argv):
        reader.error(path, f"a command with {CONTROL_RULE} in its arguments", value)
        return None
    return tuple(argv)


def _interface(value: Any, path: str, r: _Reader) -> Optional[str]:
    expected = "the network interface name to put the VIP on (1-15 bytes, no '/', ':', whitespace)"
    if (not isinstance(value, str) or not IFNAME_RE.fullmatch(value) or CONTROL_RE.search(value)
            or value in (".", "..") or len(value.encode()) > 15):
        r.error(path, expected, value)
        return None
    return value


def _environment(value: Any, path: str, r: _Reader) -> Optional[dict[str, str]]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        r.error(path, "a mapping of VARIABLE: value", value)
        return None
    env: dict[str, str] = {}
    for k, v in value.items():
        where = f"{path}.{_key(k)}"
        if not isinstance(k, str) or not ENV_NAME_RE.fullmatch(k):
            r.error(where, "a variable name of letters, digits and '_', not starting with a digit", k)
            continue
        if isinstance(v, bool) or (isinstance(v, (int, float)) and abs(v) < 10 ** 100):
            v = str(v)  # e.g. PORT: 8080
        if not isinstance(v, str):
            r.error(where, "a string value (quote it: VARIABLE: \"value\")", v)
        elif CONTROL_RE.search(v):
            r.error(where, f"a value with {CONTROL_RULE}", v)
        else:
            env[k] = v
    return env


ACCOUNT_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]{0,31}\$?|[0-9]{1,10}")


def _account(value: Any, path: str, kind: str, r: _Reader) -> Optional[str]:
    """A user or group: a name as useradd accepts it, or a number (YAML may give an int)."""
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2 ** 32 - 1:
        return str(value)
    if not isinstance(value, str) or not ACCOUNT_RE.fullmatch(value) or (value.isdigit() and int(value) >= 2 ** 32 - 1):
        r.error(path, f"a {kind} name (letters, digits, '_', '.', '-', up to 32) or a numeric id", value)
        return None
    return value


def _http_url(value: Any, path: str, r: _Reader) -> Optional[str]:
    expected = "an http:// or https:// URL like http://127.0.0.1:8080/health"
    value = r.text(value, path, expected)
    if value is None:
        return None
    url = urlparse(value)
    try:
        port = url.port
    except ValueError:
        port = -1
    if url.scheme not in ("http", "https") or not url.hostname or re.search(r"\s", value) or port in (0, -1):
        r.error(path, expected, value)
        return None
    return value


def _host_port(value: Any, path: str, r: _Reader) -> Optional[str]:
    expected = "HOST:PORT like 127.0.0.1:5432 or [::1]:5432"
    value = r.text(value, path, expected)
    if value is None:
        return None
    host, _, port = value.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not host or re.search(r"[\s/\[\]]", host) or not port.isdigit() or not 1 <= int(port) <= 65535:
        r.error(path, expected, value)
        return None
    return value


def _check(data: Any, path: str, r: _Reader, default_name: Callable[[str], str]) -> Optional[Check]:
    """One entry of a service's checks: exactly one of http/tcp/exec plus its timing."""
    before = len(r.errors)
    data = r.mapping(data, path)
    if data is None:
        return None
    r.unknown_keys(data, CHECK_KEYS, path + ".")
    kinds = [k for k in CHECK_KINDS if k in data]
    if len(kinds) != 1:
        r.error(path, "exactly one of http: URL, tcp: HOST:PORT or exec: COMMAND",
                ", ".join(kinds) if kinds else "none")
        return None
    kind = kinds[0]
    target, command = "", ()
    if kind == "http":
        target = _http_url(data["http"], f"{path}.http", r) or ""
    elif kind == "tcp":
        target = _host_port(data["tcp"], f"{path}.tcp", r) or ""
    else:
        command = parse_command(data["exec"], f"{path}.exec", r) or ()
    name = r.name(data.get("name", default_name(kind)), f"{path}.name")
    status = None
    if data.get("expect_status") is not None:
        if kind != "http":
            r.error(f"{path}.expect_status", "no expect_status (only http checks have one)", data["expect_status"])
        status = r.number(data, "expect_status", path + ".", 200, 100, 599, "count")
    body = None
    if data.get("expect_body") is not None:
        if kind != "http":
            r.error(f"{path}.expect_body", "no expect_body (only http checks have one)", data["expect_body"])
        body = r.text(data["expect_body"], f"{path}.expect_body", "a text to find in the response body")
        if body is not None and not 0 < len(body.encode()) <= 1024:
            r.error(f"{path}.expect_body", "a text of 1 to 1024 bytes", body)
    interval = r.number(data, "interval", path + ".", 5.0, 0.1, 3600)
    timeout = r.number(data, "timeout", path + ".", min(2.0, float(interval or 5.0)), 0.05, 3600)
    if interval is not None and timeout is not None and timeout > interval:
        r.error(f"{path}.timeout", f"at most the interval ({_num(interval)}s): one check at a time", timeout)
    failures = r.number(data, "failure_threshold", path + ".", 3, 1, 100, "count")
    successes = r.number(data, "success_threshold", path + ".", 1, 1, 100, "count")
    grace = r.number(data, "start_grace", path + ".", 0.0, 0, 3600)
    if len(r.errors) > before:
        return None
    return Check(name=name, kind=kind, target=target, command=command, expect_status=status, expect_body=body,
                 interval=float(interval), timeout=float(timeout), failure_threshold=failures,
                 success_threshold=successes, start_grace=float(grace))


def _checks(value: Any, path: str, r: _Reader) -> tuple[Check, ...]:
    if value is None:
        return ()
    if isinstance(value, dict):
        value = [value]  # one check may be given without the list
    if not isinstance(value, list):
        r.error(path, "a list of checks like [{http: http://127.0.0.1:8080/health}]", value)
        return ()
    if len(value) > 16:
        r.error(path, "at most 16 checks", f"{len(value)} checks")
        return ()
    kinds = [next((k for k in CHECK_KINDS if isinstance(item, dict) and k in item), "") for item in value]
    found = [_check(item, f"{path}[{i}]", r, lambda kind, i=i: kind if kinds.count(kind) == 1 else f"{kind}{i + 1}")
             for i, item in enumerate(value)]
    checks = tuple(c for c in found if c is not None)
    seen: set[str] = set()
    for i, c in enumerate(checks):
        if c.name in seen:
            r.error(f"{path}[{i}].name", "a name no other check of this service has", c.name)
        seen.add(c.name)
    return checks


def _service(name: Any, data: Any, r: _Reader) -> Optional[Service]:
    path = f"services.{_key(name)}"
    before = len(r.errors)
    r.name(name, path)
    data = r.mapping(data, path)
    if data is None:
        return None
    r.unknown_keys(data, {"command", "vip", "interface", "priority", "startsecs", "startretries",
                          "stopwaitsecs", "directory", "environment", "checks", "max_restarts",
                          "failure_timeout", "user", "group"}, path + ".")
    command = None
    if "command" not in data:
        r.error(f"{path}.command", "a command to run")
    else:
        command = parse_command(data["command"], f"{path}.command", r)
    vip = None
    interface = data.get("interface")
    if data.get("vip") is not None:
        raw = data["vip"]
        try:
            vip = ipaddress.ip_interface(raw) if isinstance(raw, str) else None
        except ValueError:
            vip = None
        if vip is None:
            r.error(f"{path}.vip", "an address with prefix length like 198.18.0.100/24 or 2001:db8::100/64", raw)
        elif "/" not in raw:
            r.error(f"{path}.vip", "an explicit prefix length, e.g. 198.18.0.100/24 or 2001:db8::100/64", raw)
        elif (vip.ip.is_unspecified or vip.ip.is_multicast or vip.ip.is_loopback
              or vip.ip == ipaddress.IPv4Address("255.255.255.255")):
            r.error(f"{path}.vip", "a unicast address a host can own", raw)
        elif vip.version == 6 and vip.ip.is_link_local:
            r.error(f"{path}.vip", "a global or unique-local IPv6 address (a link-local one cannot move between "
                    "hosts)", raw)
        elif vip.version == 6 and vip.ip.ipv4_mapped is not None:
            r.error(f"{path}.vip", "an IPv6 address that is not IPv4-mapped (write the IPv4 address)", raw)
        _interface(interface, f"{path}.interface", r)
    elif interface is not None:
        _interface(interface, f"{path}.interface", r)  # dropped without a vip, but still not garbage
    directory = data.get("directory")
    if directory is not None:
        r.path(directory, f"{path}.directory", "a directory path")
    environment = _environment(data.get("environment"), f"{path}.environment", r)
    priority = r.number(data, "priority", path + ".", 100, 0, 1_000_000, "count")
    startsecs = r.number(data, "startsecs", path + ".", 1, 0, 3600, "whole seconds")
    startretries = r.number(data, "startretries", path + ".", 2, 0, 100, "count")
    stopwaitsecs = r.number(data, "stopwaitsecs", path + ".", 2, 1, 3600, "whole seconds")
    user = _account(data.get("user"), f"{path}.user", "user", r)
    group = _account(data.get("group"), f"{path}.group", "group", r)
    checks = _checks(data.get("checks"), f"{path}.checks", r)
    max_restarts = r.number(data, "max_restarts", path + ".", 3, 0, 100, "count")
    failure_timeout = r.number(data, "failure_timeout", path + ".", 600.0, 1, 30 * 24 * 3600)
    if len(r.errors) > before:
        return None
    return Service(name=name, command=command, vip=vip, interface=interface if vip else None, priority=priority,
                   startsecs=startsecs, startretries=startretries, stopwaitsecs=stopwaitsecs, directory=directory,
                   environment=environment, user=user, group=group, checks=checks, max_restarts=max_restarts,
                   failure_timeout=float(failure_timeout))


def _metrics(data: Any, r: _Reader) -> Optional[tuple[str, int]]:
    """metrics: {listen: HOST:PORT} -> (host, port); None (off) when absent."""
    if data is None or r.mapping(data, "metrics") is None:
        return None
    r.unknown_keys(data, {"listen"}, "metrics.")
    listen = _host_port(data.get("listen"), "metrics.listen", r)
    if listen is None:
        return None
    host, _, port = listen.rpartition(":")
    host = host[1:-1] if host.startswith("[") else host
    try:
        ipaddress.ip_address(host)
    except ValueError:
        r.error("metrics.listen", "an IP address to listen on, like 127.0.0.1:9477 or [::1]:9477 (not a name)",
                listen)
        return None
    return host, int(port)


def _notify(data: Any, r: _Reader) -> tuple[tuple[str, ...], float]:
    """notify: {command: COMMAND, timeout: S} -> (argv, timeout); () when absent."""
    if data is None:
        return (), 10.0
    if r.mapping(data, "notify") is None:
        return (), 10.0
    r.unknown_keys(data, {"command", "timeout"}, "notify.")
    command: tuple[str, ...] = ()
    if "command" not in data:
        r.error("notify.command", "a command to run for every transition")
    else:
        command = parse_command(data["command"], "notify.command", r) or ()
    timeout = r.number(data, "timeout", "notify.", 10.0, 0.1, 3600)
    return command, float(timeout or 10.0)


def _etcd(data: Any, r: _Reader) -> Optional[EtcdConfig]:
    before = len(r.errors)
    data = r.mapping({} if data is None else data, "etcd")
    if data is None:
        return None
    if "password" in data:
        r.error("etcd.password", f"no password in the config file: etcd.password_file (a file only root reads) or "
                f"the environment variable {PASSWORD_ENV}", "a password")
        data = {k: v for k, v in data.items() if k != "password"}
    r.unknown_keys(data, {"endpoints", "prefix", "timeout", "ca_cert", "cert", "key", "election_timeout", "username",
                          "password_file"}, "etcd.")
    endpoints = data.get("endpoints", list(EtcdConfig.endpoints))
    if isinstance(endpoints, str):
        endpoints = [endpoints]
    if not isinstance(endpoints, list) or not endpoints:
        r.error("etcd.endpoints", "a non-empty list of URLs like http://HOST:2379", endpoints)
    else:
        for i, ep in enumerate(endpoints):
            try:
                parse_endpoint(ep, f"{r.source}: etcd.endpoints[{i}]")
            except ConfigError as exc:
                r.errors.append(str(exc))
    prefix = data.get("prefix", DEFAULT_PREFIX)
    try:
        check_prefix(prefix, f"{r.source}: etcd.prefix")
    except ConfigError as exc:
        r.errors.append(str(exc))
    tls = {k: data.get(k) for k in ("ca_cert", "cert", "key")}
    for k, v in tls.items():
        if v is not None:
            r.path(v, f"etcd.{k}", "a file path")
    timeout = r.number(data, "timeout", "etcd.", 1.0, 0.05, 60)
    election = r.number(data, "election_timeout", "etcd.", 1.0, 0.01, 60)
    username = data.get("username")
    if username is not None and (not isinstance(username, str) or not username or CONTROL_RE.search(username)
                                 or len(username) > 128):
        r.error("etcd.username", "an etcd user name (1-128 characters, no control characters)", username)
    password_file = data.get("password_file")
    if password_file is not None:
        r.path(password_file, "etcd.password_file", "a file path")
        if username is None:
            r.error("etcd.password_file", "etcd.username as well (a password without a user is never used)",
                    password_file)
    if len(r.errors) > before:
        return None
    return EtcdConfig(endpoints=tuple(endpoints), prefix=prefix, timeout=float(timeout),
                      election_timeout=float(election), username=username, password_file=password_file, **tls)


def _run_dir(value: Any, r: _Reader) -> Optional[str]:
    value = r.path(value, "run_dir", "a directory path")
    if value is None:
        return None
    if re.search(r"[\s;#%]", value):
        r.error("run_dir", "a path without whitespace, ';', '#' or '%' (supervisord's config would read the "
                "first three as the start of a comment, and expands '%' in log file names twice)", value)
        return None
    if len(value.encode()) > MAX_RUN_DIR_BYTES:
        r.error("run_dir", f"a path of at most {MAX_RUN_DIR_BYTES} bytes, not {len(value.encode())}, so that "
                "RUN_DIR/supervisor.sock fits the 108 bytes of a unix socket address", value)
        return None
    return value


TOP_KEYS = {"node", "etcd", "lease_ttl", "keepalive_interval", "fence_margin", "reconcile_interval", "claim_delay",
            "startup_grace", "failure_cooldown", "run_dir", "move_timeout", "history_size", "cgroup_root",
            "drain_concurrency", "node_checks", "track_interfaces", "notify", "metrics",
            "services"}


def parse(data: Any, source: str = "<config>") -> Config:
    """Validate a decoded YAML document; raise ConfigErrors listing every problem, each naming source and key."""
    r = _Reader(source)
    config = None
    if data is None:
        r.error("(top level)", "a mapping with at least a services: section", "an empty document")
    elif r.mapping(data, "(top level)") is not None:
        config = _parse_mapping(data, r)
    r.raise_if_any()
    assert config is not None
    return config


def _parse_mapping(data: Mapping[Any, Any], r: _Reader) -> Optional[Config]:
    """The whole top-level mapping; a Config only if no error was recorded."""
    r.unknown_keys(data, TOP_KEYS, "")
    if data.get("node") is not None:
        node = r.name(data["node"], "node")
    else:
        node = r.name(socket.gethostname().split(".")[0], "node",
                      "; the hostname is not one, so set node: explicitly")
    etcd = _etcd(data.get("etcd"), r)

    ttl = r.number(data, "lease_ttl", "", 2, ETCD_MIN_TTL, MAX_TTL, "whole seconds")
    t = ETCD_MIN_TTL if ttl is None else ttl  # defaults only; relations below need the real ttl
    # keepalive_interval and fence_margin are also bounded by lease_ttl, checked just below
    keepalive = r.number(data, "keepalive_interval", "", t / 4, 0.05, MAX_TTL / 3)
    margin = r.number(data, "fence_margin", "", min(0.6, t / 3), 0.1, MAX_TTL)
    if ttl is not None and keepalive is not None and keepalive > ttl / 3:
        r.error("keepalive_interval", f"at most lease_ttl/3 = {ttl / 3:.2f}s so a lost renewal can be retried",
                keepalive)
    if ttl is not None and keepalive is not None and margin is not None and margin + keepalive >= ttl:
        r.error("fence_margin", f"less than lease_ttl - keepalive_interval = {ttl - keepalive:.2f}s, "
                "or the fence would fire between two healthy renewals", margin)
    if ttl is not None and margin is not None and etcd is not None and etcd.timeout >= ttl - margin:
        r.error("etcd.timeout", f"less than lease_ttl - fence_margin = {ttl - margin:.2f}s", etcd.timeout)
    reconcile = r.number(data, "reconcile_interval", "", 2.0, 0.1, 3600)
    claim_delay = r.number(data, "claim_delay", "", 0.5, 0, 60)
    grace = r.number(data, "startup_grace", "", float(t), 0, 3600)
    cooldown = r.number(data, "failure_cooldown", "", 30.0, 0, 7 * 24 * 3600)
    move_timeout = r.number(data, "move_timeout", "", 10, ETCD_MIN_TTL, 3600, "whole seconds")
    history_size = r.number(data, "history_size", "", 100, 1, 10_000, "count")
    drain_concurrency = r.number(data, "drain_concurrency", "", 32, 1, 1000, "count")

    services: dict[str, Service] = {}
    services_data = data.get("services")
    if not services_data and not isinstance(services_data, list):
        expected = "at least one service, like services: {web: {command: ...}} (an agent without services does nothing)"
        if services_data is None:
            r.error("services", expected)
        else:
            r.error("services", expected, services_data)
    elif r.mapping(services_data, "services") is not None:
        for name, sdata in services_data.items():
            s = _service(name, sdata, r)
            if s is not None:
                services[name] = s
    seen: dict[str, str] = {}
    for s in services.values():
        if s.vip:
            other = seen.setdefault(str(s.vip.ip), s.name)
            if other != s.name:
                r.error(f"services.{s.name}.vip", f"an address not already used by service {other!r}", str(s.vip))

    node_checks = _checks(data.get("node_checks"), "node_checks", r)
    track = data.get("track_interfaces", True)
    if not isinstance(track, bool):
        r.error("track_interfaces", "true or false", track)
    notify_command, notify_timeout = _notify(data.get("notify"), r)
    metrics_listen = _metrics(data.get("metrics"), r)
    run_dir = _run_dir(data["run_dir"], r) if data.get("run_dir") is not None else f"/run/etcdha/{node}"
    cgroup_root = None
    if data.get("cgroup_root") is not None:
        cgroup_root = r.path(data["cgroup_root"], "cgroup_root", "a cgroup directory path", no_space=True)
    if r.errors:
        return None
    return Config(
        node=node, etcd=etcd, services=services, lease_ttl=ttl, keepalive_interval=float(keepalive),
        fence_margin=float(margin), reconcile_interval=float(reconcile), claim_delay=float(claim_delay),
        startup_grace=float(grace), failure_cooldown=float(cooldown), move_timeout=move_timeout,
        history_size=history_size, drain_concurrency=drain_concurrency, run_dir=Path(run_dir), source=r.source,
        cgroup_root=None if cgroup_root is None else Path(cgroup_root), node_checks=node_checks,
        track_interfaces=bool(track), notify_command=notify_command, notify_timeout=notify_timeout,
        metrics_listen=metrics_listen,
    )


# ---- YAML: strict and bounded -------------------------------------------------------------------

class _Refused(Exception):
    """Valid YAML that no config can be: too deep, too big after aliases, or self-referring."""


class _Limited:
    """Stops composing past MAX_DEPTH levels or MAX_NODES nodes.

    PyYAML composes recursively, so nesting is bounded before Python's recursion
    limit is reached; aliases are not expanded here (see `_measure`).
    """

    _depth = 0
    _nodes = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        self._depth += 1
        self._nodes += 1
        try:
            if self._depth > MAX_DEPTH:
                line = self.peek_event().start_mark.line + 1
                raise _Refused(f"line {line}: nested deeper than {MAX_DEPTH} levels (a config needs about 5)")
            if self._nodes > MAX_NODES:
                raise _Refused(f"more than {MAX_NODES} YAML nodes (a config needs a few hundred)")
            return yaml.composer.Composer.compose_node(self, parent, index)
        finally:
            self._depth -= 1


class _Loader(_Limited, yaml.SafeLoader):
    """SafeLoader with the limits: pure Python, and the source of every error message we show."""


try:
    from yaml._yaml import CParser as _CParser  # libyaml, where PyYAML was built with it
except ImportError:  # pragma: no cover - PyYAML without libyaml
    _CParser = None

if _CParser is not None:
    class _FastLoader(_Limited, yaml.composer.Composer, _CParser, yaml.constructor.SafeConstructor,
                      yaml.resolver.Resolver):
        """libyaml's scanner and parser (a 500-service config: 25 ms instead of 300), PyYAML's composer.

        Not CSafeLoader: its composer is recursive C, and a deeply nested document crashes the
        process; ours keeps the limits. Only for documents it reads without complaint: any
        error is reported by `_Loader`, whose messages the tests and operators know.
        """

        def __init__(self, stream: str):
            _CParser.__init__(self, stream)
            yaml.composer.Composer.__init__(self)
            yaml.constructor.SafeConstructor.__init__(self)
            yaml.resolver.Resolver.__init__(self)


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    return []


def _measure(root: yaml.Node) -> None:
    """Refuse a node graph whose expansion is too big or too deep (billion laughs) or cyclic.

    Iterative, memoized per node: linear in the composed graph however many times aliases repeat it.
    """
    count: dict[int, int] = {}
    depth: dict[int, int] = {}
    open_: set[int] = set()  # on the current path: reaching one again is a cycle
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, finished = stack.pop()
        nid = id(node)
        if finished:
            kids = _children(node)
            count[nid] = 1 + sum(count[id(k)] for k in kids)
            depth[nid] = 1 + max((depth[id(k)] for k in kids), default=0)
            open_.discard(nid)
            if count[nid] > MAX_NODES:
                raise _Refused(f"too many nodes after expanding aliases (more than {MAX_NODES}; "
                               "a config needs a few hundred)")
            if depth[nid] > MAX_DEPTH:
                raise _Refused(f"line {node.start_mark.line + 1}: nested deeper than {MAX_DEPTH} levels after "
                               "expanding aliases (a config needs about 5)")
            continue
        if nid in count:
            continue
        if nid in open_:
            raise _Refused(f"line {node.start_mark.line + 1}: an alias refers to a collection that contains it")
        open_.add(nid)
        stack.append((node, True))
        stack.extend((k, False) for k in _children(node) if id(k) not in count)


def _duplicate_keys(loader: Any, root: yaml.Node, source: str) -> list[str]:
    """Keys given twice in one mapping: YAML would silently keep the last one. Merge keys (<<) may override."""
    problems: list[tuple[int, str]] = []
    walked: set[int] = set()
    stack: list[tuple[yaml.Node, str]] = [(root, "")]
    while stack:
        node, path = stack.pop()
        if id(node) in walked:
            continue
        walked.add(id(node))
        todo: list[tuple[yaml.Node, str]] = []
        if isinstance(node, yaml.SequenceNode):
            todo = [(item, f"{path}[{i}]") for i, item in enumerate(node.value)]
        elif isinstance(node, yaml.MappingNode):
            first: dict[Any, int] = {}
            for key_node, value_node in node.value:
                if key_node.tag == _MERGE_TAG:
                    todo.append((value_node, path))
                    continue
                if not isinstance(key_node, yaml.ScalarNode):
                    todo.append((value_node, f"{path}.?" if path else "?"))
                    continue
                key = loader.construct_object(key_node)
                child = f"{path}.{_key(key)}" if path else _key(key)
                line = key_node.start_mark.line + 1
                if key in first:
                    problems.append((line, f"{source}: line {line}: duplicate key {child} (first at line "
                                           f"{first[key]}; YAML would silently keep only the last)"))
                else:
                    first[key] = line
                todo.append((value_node, child))
        stack.extend(reversed(todo))
    return [text for _, text in sorted(problems)]


def _yaml_error(source: str, exc: yaml.YAMLError) -> str:
    if isinstance(exc, yaml.reader.ReaderError):
        return (f"{source}: not valid YAML at character {exc.position + 1}: unacceptable character "
                f"#x{exc.character if isinstance(exc.character, int) else ord(exc.character):04x}")
    mark = getattr(exc, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
    problem = getattr(exc, "problem", None) or str(exc)
    context = getattr(exc, "context", None)
    if context and problem and context.startswith("expected"):  # e.g. "expected a single document ..., but found"
        problem = f"{context}, {problem}"
    return f"{source}: not valid YAML{where}: {problem}"


def _decode(text: str, source: str) -> tuple[Any, list[str]]:
    """YAML text -> (data, duplicate-key errors); raises ConfigErrors if it cannot be decoded at all."""
    if _CParser is not None:
        fast = None
        try:
            fast = _FastLoader(text)
            node = fast.get_single_node()
            if node is not None:
                _measure(node)
                duplicates = _duplicate_keys(fast, node, source)  # before constructing: that flattens merges
                return fast.construct_document(node), duplicates
        except Exception:  # noqa: BLE001 - anything odd: the pure-Python loader reads it and says what is wrong
            pass
        finally:
            if fast is not None:
                fast.dispose()
    loader = None
    try:
        loader = _Loader(text)  # its reader refuses unprintable characters right here
        node = loader.get_single_node()
        if node is None:
            return None, []
        _measure(node)
        duplicates = _duplicate_keys(loader, node, source)
        return loader.construct_document(node), duplicates
    except _Refused as exc:
        raise ConfigErrors([f"{source}: {exc}"]) from None
    except RecursionError:
        raise ConfigErrors([f"{source}: nested too deeply to read"]) from None
    except yaml.YAMLError as exc:
        raise ConfigErrors([_yaml_error(source, exc)]) from None
    except (ValueError, OverflowError, TypeError) as exc:  # e.g. a 5000-digit integer, a 13th month
        raise ConfigErrors([f"{source}: a value cannot be read: {exc}"]) from None
    finally:
        if loader is not None:
            loader.dispose()


def loads(text: str, source: str = "<config>") -> Config:
    """Decode and validate config text; raise ConfigErrors listing every problem."""
    data, duplicates = _decode(text, source)
    try:
        config = parse(data, source)
    except ConfigErrors as exc:
        raise ConfigErrors(duplicates + exc.errors) from None
    if duplicates:
        raise ConfigErrors(duplicates)
    return config


def load(path: str | Path) -> Config:
    """Read and validate a config file; raise ConfigErrors listing every problem."""
    path = Path(path)
    try:
        with path.open("rb") as f:
            raw = f.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise ConfigErrors([f"{path}: cannot read the config file: {exc.strerror or exc}"]) from None
    if len(raw) > MAX_FILE_BYTES:
        raise ConfigErrors([f"{path}: larger than {MAX_FILE_BYTES // (1 << 20)} MiB; a config is a few kilobytes"])
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigErrors([f"{path}: not a UTF-8 text file (byte {exc.start})"]) from None
    return loads(text, str(path))


# ---- facts of this host -------------------------------------------------------------------------

def _executable(path: Path) -> Optional[str]:
    """Why `path` cannot be executed, or None. (os.path's checks never raise, e.g. on EACCES.)"""
    if not os.path.exists(path):
        return "no such file"
    if os.path.isdir(path):
        return "a directory"
    if not os.path.isfile(path):
        return "not a regular file"
    if not os.access(path, os.X_OK):
        return "not executable"
    return None


def _program_problems(src: str, where: str, program: str, base: Path, directory_ok: bool,
                      environment: Mapping[str, str], checked: Optional[dict[Path, Optional[str]]] = None) -> list[str]:
    """Why `program` (argv[0] of a command run in `base`) cannot be run here: [] if it can.

    `checked` remembers paths already looked at (500 services running `sleep` search the PATH once).
    """
    checked = {} if checked is None else checked

    def _why(path: Path) -> Optional[str]:
        if path not in checked:
            checked[path] = _executable(path)
        return checked[path]

    if "/" in program:
        if program.startswith("/") or directory_ok:
            why = _why(base / program)
            if why:
                return [f"{src}: {where}: expected an executable program (got {_show(program)}: {why})"]
        return []
    search = environment.get("PATH", os.environ.get("PATH", os.defpath))
    if not any(_why(base / (d or ".") / program) is None for d in search.split(os.pathsep)):
        return [f"{src}: {where}: expected a program found on the PATH (got {_show(program)}; "
                f"PATH={_show(search, 120)})"]
    return []


def host_problems(config: Config) -> list[str]:
    """What in a valid config does not fit this host (interfaces, programs, directories, TLS files).

    Checked where the agent starts, so a node that cannot run a service says so at once instead of
    claiming it and failing. Looks only at this host: no network traffic.
    """
    src = config.source
    problems: list[str] = []
    checked: dict[Path, Optional[str]] = {}
    try:
        cwd = Path.cwd()  # where a service without `directory` starts
    except OSError:
        cwd = Path("/")
    for s in config.services.values():
        path = f"services.{s.name}"
        if s.vip and s.interface:
            try:
                socket.if_nametoindex(s.interface)
            except OSError:
                problems.append(f"{src}: {path}.interface: expected a network interface of this host's network "
                                f"namespace (got {s.interface!r}: no such interface)")
        directory_ok = True
        if s.directory is not None:
            d = s.directory
            why = None if os.path.isdir(d) else "not a directory" if os.path.exists(d) else "no such directory"
            if why is None and not os.access(d, os.X_OK):
                why = "not accessible"
            if why:
                directory_ok = False
                problems.append(f"{src}: {path}.directory: expected an existing directory (got {_show(s.directory)}: "
                                f"{why})")
        if s.user is not None or s.group is not None:
            from etcdha import launch  # stdlib only; imported here to keep config's imports small
            try:
                launch.resolve_identity(s.user, s.group)
            except LookupError as exc:
                key = "user" if s.user is not None and f"user {s.user!r}" in str(exc) else "group"
                problems.append(f"{src}: {path}.{key}: expected a {key} of this host ({exc})")
            if launch.setpriv_tool() is None:
                problems.append(f"{src}: {path}.user: running a service as another user needs setpriv "
                                "(util-linux) on the PATH")
        base = Path(s.directory) if s.directory else cwd
        commands = [(f"{path}.command", s.command)] + [(f"{path}.checks[{i}].exec", c.command)
                                                       for i, c in enumerate(s.checks) if c.kind == "exec"]
        for where, command in commands:
            problems += _program_problems(src, where, command[0], base, directory_ok, s.environment, checked)
    others = [(f"node_checks[{i}].exec", c.command) for i, c in enumerate(config.node_checks) if c.kind == "exec"]
    others += [("notify.command", config.notify_command)] if config.notify_command else []
    for where, command in others:
        problems += _program_problems(src, where, command[0], cwd, True, {})
    if config.etcd.username is not None:
        try:
            config.etcd.password()
        except ConfigError as exc:
            problems.append(f"{src}: {exc}")
    for key in ("ca_cert", "cert", "key"):
        name = getattr(config.etcd, key)
        if name is None:
            continue
        why = None if os.path.isfile(name) else "not a regular file" if os.path.exists(name) else "no such file"
        if why is None:
            try:
                with open(name, "rb") as f:
                    f.read(1)
            except OSError as exc:
                why = (exc.strerror or str(exc)).lower()
        if why:
            problems.append(f"{src}: etcd.{key}: expected a readable file (got {_show(name)}: {why})")
    return problems
