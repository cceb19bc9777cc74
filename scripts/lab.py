"""A multi-node etcdha cluster on one machine, in network namespaces (shared by tests, demo, bench).

Topology, all inside namespaces this module creates (the root namespace is never touched):

    <tag>-sw    a "switch": bridge br0, one veth per member
    <tag>-etcd  etcd at 198.18.0.2 (with etcd_members=3 also <tag>-etcd2, -etcd3 at .3 and .4)
    <tag>-n1..  nodes at 198.18.0.11.., each running a real agent, supervisord and the sample service
                (with colocated=True there is no etcd namespace: each node also runs one etcd
                member, at the node's own address, and a node crash takes its member with it)
    <tag>-cl    a client at 198.18.0.50 that probes the VIP

Each node's agent contains its services in cgroups under MOUNT/<tag>/<cluster>/<node>
(cgroup v2; `cgroup_root` in its config). Only 198.18.0.0/24 (benchmark range) is
used. Every wait is bounded; cleanup kills the processes it started by PID (every
PID inside our namespaces), kills and removes our cgroup subtree, and deletes the
namespaces by name.
"""
from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import yaml

REPO = Path(__file__).resolve().parent.parent
NET = "198.18.0"
NET6 = "2001:2::"  # every member also has NET6 + its IPv4 address's last number, /64 (the IPv6 benchmarking range)
VIP6 = "2001:2::100"
CLIENT_IP = f"{NET}.50"
VIP = f"{NET}.100"
PORT = 8080
TAG_PREFIX = "ehl"


def sh(*argv: str, check: bool = True, timeout: float = 20) -> subprocess.CompletedProcess:
    return subprocess.run(argv, check=check, timeout=timeout, capture_output=True, text=True)


def wait_until(cond: Callable[[], object], timeout: float, what: str, interval: float = 0.05):
    """Poll `cond` until it returns something truthy; raise TimeoutError naming `what`."""
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(interval)


def netns_pids(ns: str) -> list[int]:
    out = sh("ip", "netns", "pids", ns, check=False).stdout
    return [int(p) for p in out.split() if p.isdigit()]


def stale_namespaces() -> list[str]:
    """Our namespaces whose creating process is gone (an interrupted run)."""
    out = sh("ip", "netns", "list", check=False).stdout
    stale = []
    for line in out.splitlines():
        name = line.split()[0] if line.split() else ""
        if name.startswith(TAG_PREFIX) and "-" in name:
            pid = re.match(r"\d*", name[len(TAG_PREFIX):]).group()
            if pid and not Path(f"/proc/{pid}").exists():
                stale.append(name)
    return stale


def cgroup_mount() -> Path:
    for line in Path("/proc/mounts").read_text().splitlines():
        fields = line.split()
        if len(fields) >= 3 and fields[2] == "cgroup2":
            return Path(fields[1])
    raise RuntimeError("no cgroup v2 mount in /proc/mounts: etcdha needs one to contain services")


def destroy_cgroup(root: Path) -> None:
    """Kill every process in the subtree `root` (one cgroup.kill write) and remove it, deepest first."""
    if not root.exists():
        return
    with contextlib.suppress(OSError):
        (root / "cgroup.kill").write_text("1")
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and "populated 1" in (root / "cgroup.events").read_text():
        time.sleep(0.02)
    for directory, _dirs, _files in sorted(os.walk(root), key=lambda w: -len(w[0])):
        with contextlib.suppress(OSError):
            os.rmdir(directory)


def stale_cgroups() -> list[Path]:
    """Our cgroup subtrees whose creating process is gone (an interrupted run)."""
    try:
        entries = list(cgroup_mount().iterdir())
    except (OSError, RuntimeError):
        return []
    stale = []
    for entry in entries:
        m = re.match(re.escape(TAG_PREFIX) + r"(\d+)", entry.name)
        if m and entry.is_dir() and not Path(f"/proc/{m.group(1)}").exists():
            stale.append(entry)
    return stale


def running(pid: int) -> bool:
    """True if `pid` exists and is not a zombie (a killed process may wait a while to be reaped)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return False
    return stat[stat.rindex(b")") + 2:].split()[0] not in (b"Z", b"X")


def child_with(parent: int, marker: bytes) -> Optional[int]:
    """The PID of a child of `parent` whose command line contains `marker`, if any (one /proc scan)."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_bytes()
            if int(stat[stat.rindex(b")") + 2:].split()[1]) == parent and \
                    marker in Path(f"/proc/{entry}/cmdline").read_bytes():
                return int(entry)
        except (OSError, ValueError):
            continue
    return None


def parent_of(pid: int) -> Optional[int]:
    """The parent PID of `pid` (from /proc/PID/stat), or None if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
        return int(stat[stat.rindex(b")") + 2:].split()[1])
    except (OSError, ValueError):
        return None


# A process of a service that supervisord does not know about, as a daemonizing program leaves
# behind: detached (setsid, double fork), SIGTERM ignored, in the service's cgroup. It stays only
# if the cgroup already held a process (the service runs there); only then does it take the
# --name= marker the Sampler looks for. argv: cgroup directory, service name.
STRAY = r"""
import os, signal, sys
group, name = sys.argv[1], sys.argv[2]
if os.fork():
    os._exit(0)
os.setsid()
if os.fork():
    os._exit(0)
signal.signal(signal.SIGTERM, signal.SIG_IGN)
try:
    with open(os.path.join(group, "cgroup.procs"), "w") as f:
        f.write(str(os.getpid()))
    with open(os.path.join(group, "cgroup.procs")) as f:
        others = [p for p in f.read().split() if p != str(os.getpid())]
except OSError as exc:
    print("error", exc, flush=True)
    os._exit(1)
if not others:
    print("refused", flush=True)
    os._exit(0)
print("placed", os.getpid(), flush=True)
null = os.open(os.devnull, os.O_RDWR)
for fd in (0, 1, 2):
    os.dup2(null, fd)
os.execv(sys.executable, [sys.executable, "-c", "import time\nfor _ in range(3600):\n    time.sleep(1)",
                          "--name=" + name])
"""


def destroy_namespace(ns: str) -> None:
    """Kill every process inside `ns` (by PID) and delete it."""
    for _ in range(5):
        pids = netns_pids(ns)
        if not pids:
            break
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.1)
    sh("ip", "netns", "del", ns, check=False)


class Lab:
    """The namespaces and links. Use as a context manager: everything is removed on exit."""

    def __init__(self, nodes: int = 3, workdir: Optional[Path] = None, etcd_members: int = 1, name: str = "",
                 colocated: bool = False):
        self.tag = f"{TAG_PREFIX}{os.getpid()}{name}"
        self.node_names = [f"n{i}" for i in range(1, nodes + 1)]
        # colocated: one etcd member per node, in the node's namespace (etcd_members is ignored)
        self.colocated = colocated
        self.etcd_roles = list(self.node_names) if colocated else \
            ["etcd"] + [f"etcd{i}" for i in range(2, etcd_members + 1)]
        self.colocated_etcd: dict[str, "Etcd"] = {}  # node -> its member, once started (Node.stop spares it)
        self.workdir = Path(workdir or f"/tmp/etcdha-lab-{self.tag}")
        # logs and data under workdir stay for reading afterwards unless the user sets this to False (tests
        # do when nothing failed); a workdir passed in is never removed
        self.keep_files = True
        self._own_workdir = workdir is None
        self.created: list[str] = []
        self.holders: dict[str, subprocess.Popen] = {}
        self.cgroups = cgroup_mount() / self.tag  # every node's service cgroups live below

    def ns(self, role: str) -> str:
        return f"{self.tag}-{role}"

    def node_ip(self, name: str) -> str:
        return f"{NET}.{10 + int(name[1:])}"

    def etcd_ip(self, role: str) -> str:
        """etcd members at .2, .3, .4 ("etcd", "etcd2", "etcd3"); colocated, at the node's own address."""
        if self.colocated:
            return self.node_ip(role)
        return f"{NET}.{1 + self.etcd_roles.index(role) + 1}"

    def up(self) -> "Lab":
        for old in stale_namespaces():
            destroy_namespace(old)
        for old_group in stale_cgroups():
            destroy_cgroup(old_group)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.cgroups.mkdir(exist_ok=True)
        sw = self.ns("sw")
        self._add_ns(sw)
        sh("ip", "-n", sw, "link", "add", "br0", "type", "bridge")
        sh("ip", "-n", sw, "link", "set", "br0", "up")
        members = {**{role: self.etcd_ip(role) for role in self.etcd_roles}, "cl": CLIENT_IP,
                   **{n: self.node_ip(n) for n in self.node_names}}
        for role, ip in members.items():
            ns = self.ns(role)
            self._add_ns(ns)
            # created inside the switch namespace, one end moved straight into the member's namespace
            sh("ip", "-n", sw, "link", "add", role, "type", "veth", "peer", "name", "eth0", "netns", ns)
            sh("ip", "-n", sw, "link", "set", role, "master", "br0", "up")
            sh("ip", "-n", ns, "link", "set", "lo", "up")
            sh("ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", "eth0")
            sh("ip", "-n", ns, "addr", "add", f"{NET6}{ip.rsplit('.', 1)[1]}/64", "dev", "eth0", "nodad")
            sh("ip", "-n", ns, "link", "set", "eth0", "up")
        for name in self.node_names:
            # a long-lived process per node namespace whose /proc/PID/net shows that namespace
            self.holders[name] = self.popen(name, ["sleep", "7200"], stdout=subprocess.DEVNULL)
        return self

    def _add_ns(self, ns: str) -> None:
        sh("ip", "netns", "add", ns)
        self.created.append(ns)

    def enter(self, role: str) -> list[str]:
        """The prefix that runs a command in a member's network namespace and nothing else.

        `nsenter --net` rather than `ip netns exec`: the latter also gives the command a
        private /sys without the cgroup mounts, and agents need cgroup v2 as on a real host.
        Both exec, so the PID is the command's.
        """
        return ["nsenter", f"--net=/run/netns/{self.ns(role)}", "--"]

    def popen(self, role: str, argv: list[str], **kwargs) -> subprocess.Popen:
        """Start a process inside a member's network namespace."""
        kwargs.setdefault("stdin", subprocess.DEVNULL)
        return subprocess.Popen([*self.enter(role), *argv], **kwargs)

    def run(self, role: str, argv: list[str], timeout: float = 20) -> subprocess.CompletedProcess:
        return sh(*self.enter(role), *argv, check=False, timeout=timeout)

    def down(self) -> None:
        for ns in reversed(self.created):
            destroy_namespace(ns)
        self.created.clear()
        destroy_cgroup(self.cgroups)
        if not self.keep_files and self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> "Lab":
        try:
            return self.up()
        except BaseException:
            self.down()
            raise

    def __exit__(self, *exc: object) -> None:
        self.down()

    # ---- observing a node without entering it -------------------------------------------------

    def vip_on(self, name: str, ip: str = VIP) -> bool:
        """Is `ip` a local address in node `name`'s namespace? (/proc/PID/net/fib_trie or if_inet6 of its holder)"""
        if ":" in ip:
            try:
                text = Path(f"/proc/{self.holders[name].pid}/net/if_inet6").read_text()
            except OSError:
                return False
            wanted = ipaddress.IPv6Address(ip).packed.hex()
            return any(line.split()[0] == wanted for line in text.splitlines() if line.strip())
        try:
            lines = Path(f"/proc/{self.holders[name].pid}/net/fib_trie").read_text().splitlines()
        except OSError:
            return False
        for i, line in enumerate(lines):
            if line.strip() == f"|-- {ip}":
                for follow in lines[i + 1:]:
                    if not follow.strip().startswith("/"):
                        break
                    if "host LOCAL" in follow:
                        return True
        return False

    def netns_inodes(self) -> dict[int, str]:
        """Network namespace inode -> node name."""
        found = {}
        for name, holder in self.holders.items():
            with contextlib.suppress(OSError):
                found[os.stat(f"/proc/{holder.pid}/ns/net").st_ino] = name
        return found

    def contained(self, service: str) -> dict[str, list[int]]:
        """node -> PIDs in `service`'s cgroup on that node (any cluster): what supervisord may not know about."""
        found: dict[str, list[int]] = {n: [] for n in self.node_names}
        for procs in self.cgroups.glob(f"*/*/services/{service}/cgroup.procs"):
            node = procs.parent.parent.parent.name
            with contextlib.suppress(OSError, ValueError):
                found.setdefault(node, []).extend(int(p) for p in procs.read_text().split())
        return found

    def programs(self, marker: str = "sample_service", inodes: Optional[dict[int, str]] = None) -> dict[str, list[int]]:
        """node -> PIDs of processes whose command line contains `marker` (one /proc scan)."""
        inodes = self.netns_inodes() if inodes is None else inodes
        found: dict[str, list[int]] = {n: [] for n in self.node_names}
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    if marker.encode() not in f.read():
                        continue
                node = inodes.get(os.stat(f"/proc/{entry}/ns/net").st_ino)
            except OSError:
                continue
            if node:
                found[node].append(int(entry))
        return found


class Etcd:
    """One etcd member inside its own namespace, or a node's (Lab(colocated=True): role is the node's name).

    A cluster of all the lab's etcd roles when there are several; `flags` are passed to etcd as they
    are (e.g. COLOCATED_ETCD_FLAGS).
    """

    def __init__(self, lab: Lab, role: str = "etcd", flags: Sequence[str] = ()):
        self.lab = lab
        self.role = role
        self.flags = list(flags)
        self.ip = lab.etcd_ip(role)
        self.name = f"e{lab.etcd_roles.index(role) + 1}"
        self.data = lab.workdir / f"{role}-data"
        self.log = lab.workdir / f"{role}.log"
        self.proc: Optional[subprocess.Popen] = None
        self.endpoint = f"http://{self.ip}:2379"
        clustered = len(lab.etcd_roles) > 1
        self.peer = f"http://{self.ip if clustered else '127.0.0.1'}:2380"
        self.initial_cluster = ",".join(f"e{i + 1}=http://{lab.etcd_ip(r) if clustered else '127.0.0.1'}:2380"
                                        for i, r in enumerate(lab.etcd_roles))

    def start(self, timeout: float = 30, wait: bool = True) -> None:
        url = self.endpoint
        self.proc = self.lab.popen(self.role, [
            "etcd", "--name", self.name, "--data-dir", str(self.data),
            "--listen-client-urls", url, "--advertise-client-urls", url,
            "--listen-peer-urls", self.peer, "--initial-advertise-peer-urls", self.peer,
            "--initial-cluster", self.initial_cluster, "--logger", "zap", "--log-outputs", "stderr",
            *self.flags,
        ], stdout=self.log.open("ab"), stderr=subprocess.STDOUT)
        if self.role in self.lab.node_names:
            self.lab.colocated_etcd[self.role] = self
        if wait:
            wait_until(self.healthy, timeout, f"etcd {self.name} to answer", interval=0.1)

    def healthy(self) -> bool:
        if self.proc is None or self.proc.poll() is not None:
            raise RuntimeError(f"etcd exited; see {self.log}")
        res = self.lab.run(self.role, ["etcdctl", "--endpoints", self.endpoint, "--command-timeout=1s",
                                       "endpoint", "health"], timeout=5)
        return res.returncode == 0

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def restart(self) -> None:
        self.stop()
        self.start()

    def is_leader(self) -> bool:
        status = json.loads(self.etcdctl("endpoint", "status", "-w", "json"))[0]["Status"]
        return status["leader"] == status["header"]["member_id"]

    def member_id(self) -> int:
        return json.loads(self.etcdctl("endpoint", "status", "-w", "json"))[0]["Status"]["header"]["member_id"]

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def etcdctl(self, *args: str) -> str:
        res = self.lab.run(self.role, ["etcdctl", "--endpoints", self.endpoint, *args])
        if res.returncode:
            raise RuntimeError(f"etcdctl {' '.join(args)}: {res.stderr.strip()}")
        return res.stdout


def sample_service_command(name: str = "web", port: int = PORT, *flags: str) -> list[str]:
    """The sample HTTP service; `--name=NAME` doubles as the marker the sampler looks for.

    `flags` make it misbehave: --daemonize, --orphan, --child-ignores-term (see sample_service.py).
    """
    return [sys.executable, str(REPO / "scripts" / "sample_service.py"), f"--port={port}", f"--name={name}",
            *flags]


def services(*names: str, priorities: Optional[dict[str, int]] = None) -> dict:
    """Config for sample services: the first on VIP .100, the next on .101, ...; each on its own port."""
    found = {}
    for i, name in enumerate(names):
        found[name] = {"command": sample_service_command(name, PORT + i), "vip": f"{NET}.{100 + i}/24",
                       "interface": "eth0", "priority": (priorities or {}).get(name, 100)}
    return found


@dataclass
class Node:
    """One agent in its namespace."""

    lab: Lab
    name: str
    prefix: str
    settings: dict = field(default_factory=dict)
    proc: Optional[subprocess.Popen] = None

    @property
    def dir(self) -> Path:
        return self.lab.workdir / self.prefix.strip("/").replace("/", "_") / self.name

    @property
    def cgroup(self) -> Path:
        """This agent's cgroup subtree (its services are in SUBTREE/services/NAME)."""
        return self.lab.cgroups / self.prefix.strip("/").replace("/", "_") / self.name

    @property
    def log(self) -> Path:
        return self.dir / "agent.log"

    def config(self) -> dict:
        base = {
            "node": self.name,
            "etcd": {"endpoints": [f"http://{self.lab.etcd_ip(r)}:2379" for r in self.lab.etcd_roles],
                     "prefix": self.prefix},
            "lease_ttl": 2,
            "run_dir": str(self.dir / "run"),
            "cgroup_root": str(self.cgroup),
            "services": {"web": {"command": sample_service_command(), "vip": f"{VIP}/24", "interface": "eth0",
                                 "priority": 100}},
        }
        for key, value in self.settings.items():
            base[key] = value
        # n1 is preferred over n2 over n3 for every service (on top of the configured priority)
        base["services"] = {name: {**svc, "priority": svc.get("priority", 100) + 10 * (len(self.lab.node_names)
                                                                                    - int(self.name[1:]))}
                            for name, svc in base["services"].items()}
        return base

    def write_config(self) -> Path:
        self.dir.mkdir(parents=True, exist_ok=True)
        cfg = self.dir / "agent.yaml"
        cfg.write_text(yaml.safe_dump(self.config(), sort_keys=False))
        return cfg

    def start(self, write_config: bool = True) -> None:
        """Start the agent, on a freshly written config unless `write_config` is False (written already)."""
        cfg = self.write_config() if write_config else self.dir / "agent.yaml"
        self.proc = self.lab.popen(self.name, [sys.executable, "-m", "etcdha", "agent", "--config", str(cfg)],
                                   stdout=self.log.open("ab"), stderr=subprocess.STDOUT,
                                   env={**os.environ, "PYTHONUNBUFFERED": "1"})

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def signal(self, sig: int) -> None:
        os.kill(self.pid, sig)

    def fence_pid(self) -> Optional[int]:
        """The agent's fence process (its child)."""
        return child_with(self.pid, b"etcdha.fence")

    def supervisord_pid(self) -> Optional[int]:
        """The agent's supervisord (the fence's child)."""
        fence = self.fence_pid()
        return child_with(fence, b"etcdha/spawn.py") if fence else None

    def service_pids(self, service: str = "web") -> list[int]:
        """Every process in the service's cgroup on this node."""
        try:
            return [int(p) for p in (self.cgroup / "services" / service / "cgroup.procs").read_text().split()]
        except OSError:
            return []

    def program_pid(self, service: str = "web") -> Optional[int]:
        """The process supervisord started for `service` (its child in the service's cgroup), if any."""
        supervisord = self.supervisord_pid()
        return next((p for p in self.service_pids(service) if supervisord and parent_of(p) == supervisord), None)

    def inject_stray(self, service: str = "web", timeout: float = 5) -> Optional[int]:
        """Leave a process of `service` here that supervisord does not know about (see STRAY); its PID.

        None if the service's cgroup here held no process (the stray then exits at once: a
        process of a service that does not run here would be a second copy of our own making).
        """
        proc = self.lab.popen(self.name, [sys.executable, "-c", STRAY, str(self.cgroup / "services" / service),
                                          service], stdout=subprocess.PIPE, text=True)
        try:
            line = proc.stdout.readline() if select.select([proc.stdout], [], [], timeout)[0] else ""
        finally:
            proc.stdout.close()
            try:
                proc.wait(timeout)  # the first process exits at once; the stray is its grandchild
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        words = line.split()
        return int(words[1]) if words[:1] == ["placed"] and len(words) == 2 else None

    def cut_etcd_link(self) -> None:
        """Silently drop everything this node sends to etcd (the VIP stays reachable for clients)."""
        for role in self.lab.etcd_roles:
            sh("ip", "-n", self.lab.ns(self.name), "route", "add", "blackhole", f"{self.lab.etcd_ip(role)}/32")

    def heal(self) -> None:
        for role in self.lab.etcd_roles:
            sh("ip", "-n", self.lab.ns(self.name), "route", "del", "blackhole", f"{self.lab.etcd_ip(role)}/32",
               check=False)

    def stop(self, timeout: float = 20) -> None:
        """SIGTERM (graceful), then SIGKILL; then kill anything left in the namespace but the holder
        (and the node's own etcd member in a colocated lab: crash_node is what kills that too)."""
        if self.proc and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGCONT)
                self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.heal()
        holder = self.lab.holders[self.name].pid
        member = self.lab.colocated_etcd.get(self.name)  # the node's etcd member is not the agent's: it stays
        spare = {holder} | ({member.proc.pid} if member and member.alive() else set())
        for pid in netns_pids(self.lab.ns(self.name)):
            if pid not in spare:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        destroy_cgroup(self.cgroup)
        self.lab.run(self.name, ["ip", "addr", "del", f"{VIP}/24", "dev", "eth0"])


class Cluster:
    """Agents on every lab node, sharing one key prefix (unique per cluster)."""

    def __init__(self, lab: Lab, etcd: Etcd, prefix: str, settings: Optional[dict] = None,
                 per_node: Optional[dict[str, dict]] = None):
        self.lab, self.etcd, self.prefix = lab, etcd, prefix
        self.nodes = {n: Node(lab, n, prefix, {**(settings or {}), **(per_node or {}).get(n, {})})
                      for n in lab.node_names}

    def start(self, write_config: bool = True) -> None:
        for node in self.nodes.values():
            node.start(write_config)

    def write_configs(self) -> None:
        """Write every agent's config now, e.g. so a timed start does not include dumping 500 services as YAML."""
        for node in self.nodes.values():
            node.write_config()

    def stop(self) -> None:
        for node in self.nodes.values():
            if node.alive():
                with contextlib.suppress(ProcessLookupError):
                    node.signal(signal.SIGCONT)
                    node.proc.terminate()
        for node in self.nodes.values():
            node.stop()

    def cli(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        """Run `etcdha ARGS` against this cluster from the client namespace."""
        endpoints = ",".join(f"http://{self.lab.etcd_ip(r)}:2379" for r in self.lab.etcd_roles)
        return self.lab.run("cl", [sys.executable, "-m", "etcdha", "--endpoints", endpoints,
                                   "--prefix", self.prefix, *args], timeout=timeout)

    def status(self) -> dict:
        """`etcdha status --json`, run from the client namespace."""
        res = self.cli("status", "--json")
        if res.returncode:
            raise RuntimeError(f"etcdha status failed: {res.stderr.strip()}")
        return json.loads(res.stdout)

    def owner(self, service: str = "web") -> Optional[str]:
        return self.status()["services"].get(service, {}).get("owner")

    def fenced(self) -> list[str]:
        """Nodes whose fence has fired during this cluster's life (from the agents' logs)."""
        return [n.name for n in self.nodes.values() if n.log.exists() and "fired" in n.log.read_text()]

    def logs(self) -> str:
        parts = []
        for node in self.nodes.values():
            with contextlib.suppress(OSError):
                parts.append(f"===== {node.name} =====\n" + node.log.read_text()[-6000:])
        return "\n".join(parts)


class Probe:
    """Asks the VIP (or `url`) who answers, every `interval` seconds, from the client namespace.

    Each answer is (monotonic time, node or None); the monotonic clock is system-wide,
    so times compare with the test's own.
    """

    def __init__(self, lab: Lab, interval: float = 0.02, duration: float = 600, url: Optional[str] = None):
        self.answers: list[tuple[float, Optional[str]]] = []
        self.url = url or f"http://{VIP}:{PORT}/"  # another service's VIP and port, e.g. http://198.18.0.101:8081/
        self.proc = lab.popen("cl", [sys.executable, str(REPO / "scripts" / "probe.py"), self.url,
                                     "--interval", str(interval), "--duration", str(duration)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            t, who = line.split()[:2]
            self.answers.append((float(t), None if who == "-" else who))

    def last(self) -> Optional[str]:
        return self.answers[-1][1] if self.answers else None

    def first_answer_after(self, t0: float, exclude: Optional[str] = None) -> Optional[float]:
        """Time of the first answer after t0 from a node other than `exclude`."""
        for t, who in self.answers:
            if t > t0 and who is not None and who != exclude:
                return t
        return None

    def longest_gap(self, t0: float, t1: float) -> float:
        """Longest stretch in [t0, t1] with no successful answer."""
        last_ok, gap = t0, 0.0
        for t, who in self.answers:
            if t < t0 or t > t1:
                continue
            if who is not None:
                gap = max(gap, t - last_ok)
                last_ok = t
        return max(gap, t1 - last_ok) if self.answers else t1 - t0

    def stop(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._thread.join(5)


class Sampler:
    """Samples every node's VIPs and service processes continuously; records any double copy.

    `services` maps service name -> its VIP (or None); a service's processes are found by
    the `--name=SERVICE` marker on the sample service's command line (in any process of
    the node's network namespace, contained or not) and by membership of the service's
    cgroup on that node (whatever it runs, even if supervisord does not know about it).
    """

    def __init__(self, lab: Lab, interval: float = 0.02, services: Optional[dict[str, Optional[str]]] = None):
        self.lab = lab
        self.interval = interval
        self.services = services or {"web": VIP}
        self.samples = 0
        self.violations: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "Sampler":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def sample(self, service: str = "web") -> dict[str, tuple[bool, bool]]:
        """node -> (VIP present, service process running) for one service."""
        return self.sample_all()[service]

    def sample_all(self) -> dict[str, dict[str, tuple[bool, bool]]]:
        inodes = self.lab.netns_inodes()
        found: dict[str, dict[str, tuple[bool, bool]]] = {}
        for svc, vip in self.services.items():
            programs = self.lab.programs(f"--name={svc}\0", inodes)
            contained = self.lab.contained(svc)
            found[svc] = {n: (bool(vip) and self.lab.vip_on(n, vip), bool(programs[n] or contained.get(n)))
                          for n in self.lab.node_names}
        return found

    def _run(self) -> None:
        deadline = time.monotonic() + 1800  # bounded even if a test forgets to stop us
        while not self._stop.is_set() and time.monotonic() < deadline:
            for svc, state in self.sample_all().items():
                vips = [n for n, (v, _) in state.items() if v]
                procs = [n for n, (_, p) in state.items() if p]
                if len(vips) > 1 or len(procs) > 1:
                    self.violations.append(f"t={time.monotonic():.3f} {svc}: VIP on {vips}, running on {procs}")
            self.samples += 1
            self._stop.wait(self.interval)

    def holder(self, service: str = "web") -> Optional[str]:
        """The single node that runs `service` (with its VIP, if it has one), if exactly one does."""
        needs_vip = bool(self.services.get(service))
        full = [n for n, (v, p) in self.sample(service).items() if p and (v or not needs_vip)]
        return full[0] if len(full) == 1 else None

    def holders(self) -> dict[str, Optional[str]]:
        return {svc: self.holder(svc) for svc in self.services}

    def nobody(self) -> bool:
        return not any(v or p for state in self.sample_all().values() for v, p in state.values())


# ---- scale: many services, observed cheaply (used by `scripts/bench --services N`) ----------------

SCALE_MARKER = "LAB_SERVICE"  # environment variable naming the service in every scale program


def scale_vip(k: int, count: int) -> str:
    """The k-th of `count` VIPs: spread round-robin over /24s 198.18.1.0/24, .2.0/24, ... (at least
    three, more when one would hold over 250), never in the nodes' own 198.18.0.0/24."""
    subnets = max(3, -(-count // 250))
    third = 1 + k % subnets
    if third > 255 + 256:
        raise ValueError(f"too many VIPs for 198.18.0.0/15: {count}")
    return f"198.{18 + third // 256}.{third % 256}.{1 + k // subnets}/24"


def scale_services(count: int, vip_every: int = 2, command: tuple[str, ...] = ("sleep", "1000000"),
                   startsecs: Optional[int] = None) -> dict:
    """`count` distinct services s0001.. all running `command`, every `vip_every`-th one (the first
    included) with a VIP from scale_vip on eth0. Each program carries LAB_SERVICE=NAME in its
    environment, which is how ScaleSampler finds it outside its cgroup."""
    width = max(4, len(str(count)))
    with_vip = (count + vip_every - 1) // vip_every
    found = {}
    for i in range(count):
        name = f"s{i + 1:0{width}d}"
        svc: dict = {"command": list(command), "environment": {SCALE_MARKER: name}}
        if i % vip_every == 0:
            svc.update(vip=scale_vip(i // vip_every, with_vip), interface="eth0")
        if startsecs is not None:
            svc["startsecs"] = startsecs
        found[name] = svc
    return found


def proc_status_kib(pid: int, field_name: str = "VmRSS") -> Optional[int]:
    """A /proc/PID/status field in KiB (VmRSS by default), or None if the process is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def proc_cpu_seconds(pid: int) -> Optional[float]:
    """utime + stime of PID (all its threads) in seconds, or None if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
        fields = stat[stat.rindex(b")") + 2:].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def local_addresses(lab: Lab, name: str) -> set[str]:
    """Every local IPv4 address in node `name`'s namespace (one read of its holder's fib_trie)."""
    try:
        lines = Path(f"/proc/{lab.holders[name].pid}/net/fib_trie").read_text().splitlines()
    except OSError:
        return set()
    found, last = set(), None
    for line in lines:
        s = line.strip()
        if s.startswith("|-- "):
            last = s[4:]
        elif last and s.startswith("/32 host LOCAL"):
            found.add(last)
    return found


def interface_bytes(lab: Lab, name: str, interface: str = "eth0") -> Optional[int]:
    """Received + transmitted bytes of `interface` in node `name`'s namespace (its holder's /proc/PID/net/dev)."""
    try:
        for line in Path(f"/proc/{lab.holders[name].pid}/net/dev").read_text().splitlines():
            head, _, rest = line.partition(":")
            if head.strip() == interface:
                fields = rest.split()
                return int(fields[0]) + int(fields[8])
    except (OSError, ValueError, IndexError):
        return None
    return None


METRIC_LINE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)")


def etcd_metrics(etcd: Etcd, timeout: float = 10) -> dict[str, float]:
    """etcd's Prometheus /metrics as {'name{labels}': value}, fetched from inside etcd's own namespace
    (so the fetch crosses no node's link) with curl."""
    res = etcd.lab.run(etcd.role, ["curl", "-sS", "--max-time", str(timeout), f"{etcd.endpoint}/metrics"],
                       timeout=timeout + 5)
    if res.returncode:
        raise RuntimeError(f"cannot read {etcd.endpoint}/metrics: {res.stderr.strip()}")
    found = {}
    for line in res.stdout.splitlines():
        m = METRIC_LINE.match(line)
        if m:
            with contextlib.suppress(ValueError):
                found[m.group(1) + (m.group(2) or "")] = float(m.group(3))
    return found


def crash_node(node: Node) -> None:
    """The whole node dies at once: every process in its namespace but the holder is stopped
    (SIGSTOP, so nothing - the fence included - can act on the others' deaths), then killed;
    its cgroup subtree is destroyed and every address on eth0 but the node's own removed (one
    `ip -batch`). Nothing is revoked or released: the node's lease has to run out. In a colocated
    lab the node's etcd member dies with it (restart_member brings it back)."""
    lab = node.lab
    holder = lab.holders[node.name].pid
    pids = [p for p in netns_pids(lab.ns(node.name)) if p != holder]
    for sig in (signal.SIGSTOP, signal.SIGKILL):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
    if node.proc is not None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            node.proc.wait(5)
    destroy_cgroup(node.cgroup)
    own = lab.node_ip(node.name)
    out = sh("ip", "-n", lab.ns(node.name), "-4", "-o", "addr", "show", "dev", "eth0", check=False).stdout
    extra = [w for line in out.splitlines() for w in line.split()[3:4] if w.split("/")[0] != own]
    if extra:
        subprocess.run(["ip", "-n", lab.ns(node.name), "-force", "-batch", "-"], check=False, timeout=20,
                       input="".join(f"addr del {c} dev eth0\n" for c in extra), capture_output=True, text=True)


_MARKERS = (b"--name=", (SCALE_MARKER + "=").encode())


def marked_services(data: bytes) -> list[str]:
    """Services named in a NUL-separated cmdline or environ: every word starting with `--name=` or
    LAB_SERVICE=. A substring search, not a split into words: one sample reads a thousand of these."""
    found = []
    for marker in _MARKERS:
        at = -1
        while True:
            at = data.find(marker, at + 1)
            if at < 0:
                break
            if at == 0 or data[at - 1] == 0:  # the start of a word
                end = data.find(b"\0", at)
                found.append(data[at + len(marker):end if end >= 0 else len(data)].decode(errors="replace"))
    return found


def _read_bytes(path: str) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        chunks = []
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def _subdirs(top: Union[str, Path], depth: int) -> list[str]:
    """Directories exactly `depth` levels below `top` (none if it is missing)."""
    level = [str(top)]
    for _ in range(depth):
        below = []
        for d in level:
            with contextlib.suppress(OSError), os.scandir(d) as it:
                below += [e.path for e in it if e.is_dir(follow_symlinks=False)]
        level = below
    return level


class ScaleSampler(Sampler):
    """The Sampler's invariant for hundreds of services at a bounded cost.

    Same checks as Sampler - per service, its VIP on at most one node, and its processes (found
    by membership of the service's cgroup on a node, or by the `--name=SERVICE` marker on the
    command line or LAB_SERVICE=SERVICE in the environment of any other process of a node
    namespace: one that escaped or was never contained) on at most one node - but one sample is
    one cgroup.procs read per service cgroup, one /proc scan and one fib_trie read per node,
    whatever the number of services (Sampler scans /proc once per service). A process in a
    service's cgroup counts for that service and its markers are not read: reading another
    process's environ takes its memory map's lock, which the fork and exec of hundreds of starts
    also take, and it was most of a sample's cost. The pause between samples adapts so that sampling takes at most `duty`
    of one core (never less than `interval`); `periods` records it. Violations are counted in
    full, the first `keep` kept as text.
    """

    def __init__(self, lab: Lab, interval: float = 0.02, services: Optional[dict[str, Optional[str]]] = None,
                 duty: float = 0.25, duration: float = 4 * 3600, keep: int = 200):
        super().__init__(lab, interval, services)
        self.duty, self.duration, self.keep = duty, duration, keep
        self.violation_count = 0
        self.errors = 0
        self.costs: list[float] = []   # seconds one sample took (CPU, thread time)
        self.first_sample: Optional[float] = None
        self.last_sample: Optional[float] = None

    def sample_all(self) -> dict[str, dict[str, tuple[bool, bool]]]:
        inodes = self.lab.netns_inodes()
        nodes = self.lab.node_names
        local = {n: local_addresses(self.lab, n) for n in nodes}
        running: set[tuple[str, str]] = set()  # (service, node)
        contained: set[bytes] = set()  # pids in a service's cgroup: that membership already places them
        for node_dir in _subdirs(self.lab.cgroups, 2):  # PREFIX/NODE, as Node.cgroup lays them out
            for group in _subdirs(os.path.join(node_dir, "services"), 1):
                with contextlib.suppress(OSError):
                    pids = _read_bytes(os.path.join(group, "cgroup.procs")).split()
                    if pids:
                        running.add((os.path.basename(group), os.path.basename(node_dir)))
                        contained.update(pids)
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or entry.encode() in contained:
                continue
            try:
                node = inodes.get(os.stat(f"/proc/{entry}/ns/net").st_ino)
                if node is None:
                    continue
                for source in ("cmdline", "environ"):
                    for name in marked_services(_read_bytes(f"/proc/{entry}/{source}")):
                        running.add((name, node))
            except OSError:
                continue
        return {svc: {n: (bool(vip) and vip in local[n], (svc, n) in running) for n in nodes}
                for svc, vip in self.services.items()}

    def _run(self) -> None:
        deadline = time.monotonic() + self.duration  # bounded even if the caller forgets to stop us
        while not self._stop.is_set() and time.monotonic() < deadline:
            started = time.thread_time()
            try:
                sample = self.sample_all()
            except Exception:  # noqa: BLE001 - a vanished file mid-scan must not end the sampling
                self.errors += 1
                self._stop.wait(self.interval)
                continue
            now = time.monotonic()
            for svc, state in sample.items():
                vips = [n for n, (v, _) in state.items() if v]
                procs = [n for n, (_, p) in state.items() if p]
                if len(vips) > 1 or len(procs) > 1:
                    self.violation_count += 1
                    if len(self.violations) < self.keep:
                        self.violations.append(f"t={now:.3f} {svc}: VIP on {vips}, running on {procs}")
            self.samples += 1
            self.first_sample = self.first_sample or now
            self.last_sample = now
            cost = time.thread_time() - started
            self.costs.append(cost)
            self._stop.wait(max(self.interval, cost * (1 / self.duty - 1)))


# ---- etcd on the nodes themselves: Lab(colocated=True) ----------------------------------------------

# deploy/etcd-colocated.example. When the node that is both an owner and the etcd leader dies, the
# survivors cannot renew until the other members have elected a leader (raft waits 1-2 election
# timeouts), and the new leader extends every lease by one election timeout before the dead owner's
# can run out. With etcd's defaults (100/1000 ms) every survivor fences itself at lease_ttl 2
# (issue 7); at 50/500 ms with the default keepalive_interval (0.5 s) a survivor still fenced in 4-5
# of 10 trials and the service was back after ~3.8 s (median); at 50/300 ms with renewals every
# 0.25 s none fenced and it was back after ~3.3 s (scripts/bench --scenarios colocated-crash).
COLOCATED_ETCD_FLAGS = ("--heartbeat-interval", "50", "--election-timeout", "300")
COLOCATED_ELECTION_TIMEOUT = 0.3  # the agents' etcd.election_timeout that matches them
COLOCATED_KEEPALIVE = 0.25        # the agents' keepalive_interval: a renewal soon after the election


def start_colocated_etcd(lab: Lab, flags: Sequence[str] = COLOCATED_ETCD_FLAGS, timeout: float = 60) -> list[Etcd]:
    """One etcd member per node, in the node's namespace, all started before any is waited for (each
    needs a quorum to answer)."""
    assert lab.colocated, "start_colocated_etcd needs Lab(colocated=True)"
    members = [Etcd(lab, name, flags) for name in lab.node_names]
    for member in members:
        member.start(wait=False)
    for member in members:
        wait_until(member.healthy, timeout, f"etcd member {member.name} on {member.role} to be healthy", interval=0.2)
    return members


def colocated_settings(lab: Lab, prefix: str, election_timeout: float = COLOCATED_ELECTION_TIMEOUT,
                       keepalive: float = COLOCATED_KEEPALIVE) -> dict[str, dict]:
    """Cluster's per_node settings for a colocated lab: each agent lists its own node's member first
    (an agent then loses its etcd endpoint only with its own node), knows etcd's election timeout
    and renews every `keepalive` s."""
    def endpoints(node: str) -> list[str]:
        order = [node] + [n for n in lab.node_names if n != node]
        return [f"http://{lab.etcd_ip(n)}:2379" for n in order]
    return {n: {"etcd": {"endpoints": endpoints(n), "prefix": prefix, "election_timeout": election_timeout},
                "keepalive_interval": keepalive}
            for n in lab.node_names}


def etcd_leader(members: Sequence[Etcd]) -> Optional[Etcd]:
    """The member that is leader now, if a running one says so."""
    for member in members:
        if member.alive():
            with contextlib.suppress(RuntimeError, ValueError, KeyError, IndexError, subprocess.TimeoutExpired):
                if member.is_leader():
                    return member
    return None


def move_etcd_leader(members: Sequence[Etcd], to: Etcd, timeout: float = 15) -> None:
    """Make `to` the etcd leader (`etcdctl move-leader`, asked of the current leader) and wait until it is."""
    def moved() -> bool:
        leader = etcd_leader(members)
        if leader is to:
            return True
        if leader is not None:
            with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
                leader.etcdctl("move-leader", f"{to.member_id():x}")
        return etcd_leader(members) is to
    wait_until(moved, timeout, f"etcd leadership to move to {to.name} on {to.role}", interval=0.2)


def restart_member(member: Etcd, timeout: float = 60) -> None:
    """Start a member again after its node crashed (same data dir: it rejoins as itself)."""
    if member.proc is not None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            member.proc.wait(5)  # reap the killed one
    member.start(timeout=timeout)


FENCE_MARKS = ("fence: fired", "rejoining with a new lease")  # the fence acted, or the lease was lost


def log_sizes(cluster: Cluster) -> dict[str, int]:
    """Every agent log's size now: a mark for fenced_since."""
    return {name: node.log.stat().st_size if node.log.exists() else 0 for name, node in cluster.nodes.items()}


def fenced_since(cluster: Cluster, sizes: dict[str, int], exclude: Sequence[str] = ()) -> dict[str, list[str]]:
    """Nodes (but `exclude`) whose fence fired or whose lease was lost since `sizes` (log_sizes):
    node -> those log lines."""
    found = {}
    for name, node in cluster.nodes.items():
        if name in exclude or not node.log.exists():
            continue
        with node.log.open("rb") as f:
            f.seek(sizes.get(name, 0))
            text = f.read().decode(errors="replace")
        lines = [line for line in text.splitlines() if any(mark in line for mark in FENCE_MARKS)]
        if lines:
            found[name] = lines
    return found
