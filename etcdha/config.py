"""Agent config: YAML -> frozen dataclasses, validated once at load.

Every error names the file, the key path and what was expected, so an operator
can fix the file without reading this code. Timing relations that protect the
at-most-one-copy invariant are checked here, not discovered at run time.
"""
from __future__ import annotations

import ipaddress
import re
import shlex
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional
from urllib.parse import urlparse

import yaml

from etcdha.errors import ConfigError

DEFAULT_PREFIX = "/etcdha"
# etcd (default heartbeat/election settings) raises any TTL below this to it.
ETCD_MIN_TTL = 2
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")  # always used with fullmatch
NAME_RULE = "1-63 characters of letters, digits, '_', '.', '-', starting with a letter or digit (no '/' or whitespace)"


@dataclass(frozen=True)
class EtcdConfig:
    """Where the cluster state lives."""

    endpoints: tuple[str, ...] = ("http://127.0.0.1:2379",)
    prefix: str = DEFAULT_PREFIX
    timeout: float = 1.0  # per RPC; a call never blocks longer
    ca_cert: Optional[str] = None
    cert: Optional[str] = None
    key: Optional[str] = None


@dataclass(frozen=True)
class Service:
    """One supervised program plus its optional virtual IP."""

    name: str
    command: tuple[str, ...]
    vip: Optional[ipaddress.IPv4Interface] = None
    interface: Optional[str] = None
    priority: int = 100
    startsecs: int = 1
    startretries: int = 2
    stopwaitsecs: int = 2
    directory: Optional[str] = None
    environment: Mapping[str, str] = field(default_factory=dict)


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
    run_dir: Path = Path("/run/etcdha/default")
    source: str = "<config>"

    @property
    def vips(self) -> tuple[tuple[str, str], ...]:
        """(interface, cidr) of every configured VIP: what the fence may remove."""
        return tuple((s.interface, str(s.vip)) for s in self.services.values() if s.vip and s.interface)


class _Reader:
    """Typed access to a YAML mapping that reports errors as file: key.path: expectation."""

    def __init__(self, source: str):
        self.source = source

    def fail(self, path: str, expected: str, got: Any = None) -> ConfigError:
        shown = "" if got is None else f" (got {got!r})"
        return ConfigError(f"{self.source}: {path}: expected {expected}{shown}")

    def mapping(self, value: Any, path: str) -> Mapping[str, Any]:
        if not isinstance(value, dict):
            raise self.fail(path, "a mapping", value)
        return value

    def number(self, data: Mapping[str, Any], key: str, path: str, default: float,
               minimum: float = 0.0, integer: bool = False) -> Any:
        value = data.get(key, default)
        kind = int if integer else (int, float)
        if isinstance(value, bool) or not isinstance(value, kind):
            raise self.fail(f"{path}{key}", "an integer" if integer else "a number of seconds", value)
        if value < minimum:
            raise self.fail(f"{path}{key}", f"a value >= {minimum}", value)
        return value

    def name(self, value: Any, path: str) -> str:
        if not isinstance(value, str) or not NAME_RE.fullmatch(value):
            raise self.fail(path, f"a name of {NAME_RULE}", value)
        return value

    def unknown_keys(self, data: Mapping[str, Any], allowed: set[str], path: str) -> None:
        extra = sorted(set(data) - allowed)
        if extra:
            raise self.fail(f"{path}{extra[0]}", f"one of the known keys {sorted(allowed)}", "unknown key")


def parse_endpoint(value: Any, where: str = "endpoint") -> tuple[str, int, bool]:
    """'http://host:port' -> (host, port, tls); raises ConfigError naming `where`."""
    if not isinstance(value, str):
        raise ConfigError(f"{where}: expected a URL like http://HOST:2379 (got {value!r})")
    url = urlparse(value if "://" in value else f"http://{value}")
    if url.scheme not in ("http", "https") or not url.hostname:
        raise ConfigError(f"{where}: expected a URL like http://HOST:2379 (got {value!r})")
    try:
        port = url.port or 2379
    except ValueError:
        raise ConfigError(f"{where}: expected a port number in {value!r}") from None
    return url.hostname, port, url.scheme == "https"


def parse_command(value: Any, path: str, reader: _Reader) -> tuple[str, ...]:
    """A command is a shell-like string or a list of arguments; it is run without a shell."""
    if isinstance(value, str):
        try:
            argv = shlex.split(value)
        except ValueError as exc:
            raise reader.fail(path, f"a command line with balanced quotes ({exc})", value) from None
    elif isinstance(value, list) and all(isinstance(a, str) for a in value):
        argv = list(value)
    else:
        raise reader.fail(path, "a command string or a list of strings", value)
    if not argv or any("\n" in a or "\0" in a for a in argv):
        raise reader.fail(path, "a non-empty command without newlines", value)
    return tuple(argv)


def _service(name: Any, data: Any, r: _Reader) -> Service:
    path = f"services.{name}"
    r.name(name, path)
    data = r.mapping(data, path)
    r.unknown_keys(data, {"command", "vip", "interface", "priority", "startsecs", "startretries",
                          "stopwaitsecs", "directory", "environment"}, path + ".")
    if "command" not in data:
        raise r.fail(f"{path}.command", "a command to run")
    vip = None
    interface = data.get("interface")
    if data.get("vip") is not None:
        try:
            vip = ipaddress.ip_interface(str(data["vip"]))
        except ValueError:
            raise r.fail(f"{path}.vip", "an address with prefix length like 198.18.0.100/24", data["vip"]) from None
        if vip.version != 4:
            raise r.fail(f"{path}.vip", "an IPv4 address (IPv6 VIPs are not supported yet)", data["vip"])
        if "/" not in str(data["vip"]):
            raise r.fail(f"{path}.vip", "an explicit prefix length, e.g. 198.18.0.100/24", data["vip"])
        if not isinstance(interface, str) or not re.fullmatch(r"[^/\s]{1,15}", interface):
            raise r.fail(f"{path}.interface", "the network interface name to put the VIP on", interface)
    env = data.get("environment") or {}
    if not isinstance(env, dict) or not all(isinstance(k, str) and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", k)
                                            for k in env):
        raise r.fail(f"{path}.environment", "a mapping of VARIABLE: value", env)
    for k, v in env.items():
        v = str(v)
        # supervisord's environment= syntax cannot carry these (it has no escapes)
        quoted_end = v[:1] in ("'", '"') or v[-1:] in ("'", '"')
        if "\n" in v or "\0" in v or ('"' in v and "'" in v) or quoted_end:
            raise r.fail(f"{path}.environment.{k}", "a value without newlines, not starting or ending with a "
                         "quote, and not containing both kinds of quotes", v)
    directory = data.get("directory")
    if directory is not None and not isinstance(directory, str):
        raise r.fail(f"{path}.directory", "a directory path", directory)
    return Service(
        name=name,
        command=parse_command(data["command"], f"{path}.command", r),
        vip=vip,
        interface=interface if vip else None,
        priority=r.number(data, "priority", path + ".", 100, minimum=0, integer=True),
        startsecs=r.number(data, "startsecs", path + ".", 1, minimum=0, integer=True),
        startretries=r.number(data, "startretries", path + ".", 2, minimum=0, integer=True),
        stopwaitsecs=r.number(data, "stopwaitsecs", path + ".", 2, minimum=1, integer=True),
        directory=directory,
        environment={k: str(v) for k, v in env.items()},
    )


def parse(data: Any, source: str = "<config>") -> Config:
    """Validate a decoded YAML document; raise ConfigError naming source and key path."""
    r = _Reader(source)
    data = r.mapping(data if data is not None else {}, "(top level)")
    r.unknown_keys(data, {"node", "etcd", "lease_ttl", "keepalive_interval", "fence_margin",
                          "reconcile_interval", "claim_delay", "startup_grace", "failure_cooldown", "run_dir",
                          "move_timeout", "history_size",
                          "services"}, "")
    node = r.name(data.get("node") or socket.gethostname().split(".")[0], "node")

    etcd_data = r.mapping(data.get("etcd") or {}, "etcd")
    r.unknown_keys(etcd_data, {"endpoints", "prefix", "timeout", "ca_cert", "cert", "key"}, "etcd.")
    endpoints = etcd_data.get("endpoints", list(EtcdConfig.endpoints))
    if isinstance(endpoints, str):
        endpoints = [endpoints]
    if not isinstance(endpoints, list) or not endpoints:
        raise r.fail("etcd.endpoints", "a non-empty list of URLs like http://HOST:2379", endpoints)
    for i, ep in enumerate(endpoints):
        parse_endpoint(ep, f"{source}: etcd.endpoints[{i}]")
    prefix = check_prefix(etcd_data.get("prefix", DEFAULT_PREFIX), f"{source}: etcd.prefix")
    tls = {k: etcd_data.get(k) for k in ("ca_cert", "cert", "key")}
    for k, v in tls.items():
        if v is not None and not isinstance(v, str):
            raise r.fail(f"etcd.{k}", "a file path", v)
    etcd = EtcdConfig(endpoints=tuple(endpoints), prefix=prefix,
                      timeout=r.number(etcd_data, "timeout", "etcd.", 1.0, minimum=0.05), **tls)

    ttl = r.number(data, "lease_ttl", "", 2, minimum=ETCD_MIN_TTL, integer=True)
    keepalive = r.number(data, "keepalive_interval", "", ttl / 4, minimum=0.05)
    margin = r.number(data, "fence_margin", "", min(0.6, ttl / 3), minimum=0.1)
    if keepalive > ttl / 3:
        raise r.fail("keepalive_interval", f"at most lease_ttl/3 = {ttl / 3:.2f}s so a lost renewal can be retried",
                     keepalive)
    if margin + keepalive >= ttl:
        raise r.fail("fence_margin", f"less than lease_ttl - keepalive_interval = {ttl - keepalive:.2f}s, "
                     "or the fence would fire between two healthy renewals", margin)
    if etcd.timeout >= ttl - margin:
        raise r.fail("etcd.timeout", f"less than lease_ttl - fence_margin = {ttl - margin:.2f}s", etcd.timeout)

    services_data = r.mapping(data.get("services") or {}, "services")
    services = {name: _service(name, sdata, r) for name, sdata in services_data.items()}
    seen: dict[str, str] = {}
    for s in services.values():
        if s.vip:
            other = seen.setdefault(str(s.vip.ip), s.name)
            if other != s.name:
                raise r.fail(f"services.{s.name}.vip", f"an address not already used by service {other!r}", str(s.vip))

    run_dir = data.get("run_dir") or f"/run/etcdha/{node}"
    if not isinstance(run_dir, str):
        raise r.fail("run_dir", "a directory path", run_dir)
    return Config(
        node=node, etcd=etcd, services=services, lease_ttl=ttl, keepalive_interval=float(keepalive),
        fence_margin=float(margin),
        reconcile_interval=float(r.number(data, "reconcile_interval", "", 2.0, minimum=0.1)),
        claim_delay=float(r.number(data, "claim_delay", "", 0.5, minimum=0.0)),
        startup_grace=float(r.number(data, "startup_grace", "", float(ttl), minimum=0.0)),
        failure_cooldown=float(r.number(data, "failure_cooldown", "", 30.0, minimum=0.0)),
        move_timeout=r.number(data, "move_timeout", "", 10, minimum=ETCD_MIN_TTL, integer=True),
        history_size=r.number(data, "history_size", "", 100, minimum=1, integer=True),
        run_dir=Path(run_dir), source=source,
    )


def check_prefix(prefix: Any, where: str) -> str:
    """A key prefix is an absolute path-like string without a trailing slash."""
    if not isinstance(prefix, str) or not re.fullmatch(r"/[A-Za-z0-9_./-]*[A-Za-z0-9_.-]", prefix):
        raise ConfigError(f"{where}: expected a key prefix like /etcdha (got {prefix!r})")
    return prefix


def load(path: str | Path) -> Config:
    """Read and validate a config file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the config file: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not a UTF-8 text file (byte {exc.start})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{path}: not valid YAML{where}: {getattr(exc, 'problem', exc)}") from None
    return parse(data, str(path))
