"""Fixtures for the store suite: a real etcd server (session scope) and a Store per test.

The server is a real `etcd` binary on 127.0.0.1 with free ports and a temporary
data dir (default), or an etcd container when ETCDHA_TEST_ETCD=testcontainers.
Every wait here is bounded; processes are only ever stopped by their own PID.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from pathlib import Path
from typing import Callable, Optional

import grpc
import pytest
from etcd3 import etcdrpc

from etcdha.config import EtcdConfig
from etcdha.store import Store

READY_TIMEOUT = 20.0
STOP_TIMEOUT = 10.0
ETCD_IMAGE = "quay.io/coreos/etcd:v3.4.23"


# ---- small helpers shared by the test modules ---------------------------------------------

def wait_for(predicate: Callable[[], object], timeout: float, interval: float = 0.02,
             what: str = "condition") -> object:
    """Poll `predicate` until it returns a truthy value; fail after `timeout` seconds.

    Bounded both in time and in the number of polls.
    """
    deadline = time.monotonic() + timeout
    max_polls = int(timeout / interval) + 10
    for _ in range(max_polls):
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            break
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def etcd_answers(endpoint: str, timeout: float = 1.0) -> bool:
    """True if a Range against `endpoint` succeeds (i.e. there is a leader and the KV works)."""
    target = endpoint.split("://", 1)[-1]
    channel = grpc.insecure_channel(target)
    try:
        etcdrpc.KVStub(channel).Range(etcdrpc.RangeRequest(key=b"/ready-probe"), timeout=timeout)
        return True
    except grpc.RpcError as exc:
        # with authentication on, etcd answers an anonymous read with this once it serves requests
        return "user name is empty" in (exc.details() or "") if hasattr(exc, "details") else False
    finally:
        channel.close()


def wait_ready(endpoint: str, timeout: float = READY_TIMEOUT, alive: Callable[[], bool] = lambda: True,
               log: Optional[Path] = None) -> None:
    deadline = time.monotonic() + timeout
    for _ in range(int(timeout / 0.1) + 10):
        if etcd_answers(endpoint, timeout=0.5):
            return
        if not alive():
            break
        if time.monotonic() >= deadline:
            break
        time.sleep(0.1)
    tail = ""
    if log is not None and log.exists():
        tail = "\n" + "\n".join(log.read_text(errors="replace").splitlines()[-20:])
    raise RuntimeError(f"etcd at {endpoint} did not become ready within {timeout:g}s{tail}")


def pid_alive(pid: int) -> bool:
    """True if `pid` exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return False
    state = stat[stat.rindex(b")") + 2:].split()[0]
    return state not in (b"Z", b"X")


def stop_process(proc: Optional[subprocess.Popen], timeout: float = 30) -> None:
    """SIGTERM (an agent stops its programs gracefully), then SIGKILL; by our own handle only."""
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


def kill_pid(pid: Optional[int]) -> None:
    if pid and pid_alive(pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


# ---- cgroups -------------------------------------------------------------------------------------

@pytest.fixture
def cgroup_root():
    """A fresh cgroup v2 directory of our own for one test; killed and removed afterwards."""
    from etcdha import cgroup

    mount = cgroup.cgroup2_mount(Path("/proc/mounts").read_text())
    if os.geteuid() != 0 or mount is None:
        pytest.skip("needs root and a cgroup v2 mount (service containment)")
    for stale in mount.glob("etcdha-test-*-*"):  # left by an interrupted run (its pytest is gone)
        pid = stale.name.split("-")[2]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            cgroup.kill(stale)
            cgroup.wait_empty(stale, 5)
            cgroup.remove(stale)
    root = mount / f"etcdha-test-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        yield root
    finally:
        if root.exists():
            cgroup.kill(root)
            cgroup.wait_empty(root, 5)
            cgroup.remove(root)


# ---- etcd servers ------------------------------------------------------------------------------

def find_etcd() -> Optional[str]:
    found = shutil.which("etcd")
    if found:
        return found
    if os.access("/usr/bin/etcd", os.X_OK):
        return "/usr/bin/etcd"
    return None


class _Server:
    """What both etcd backends share; each defines start/stop/running."""

    def restart(self) -> None:
        self.stop()
        self.start()

    def ensure_running(self) -> None:
        if not self.running():
            self.start()


class LocalEtcd(_Server):
    """A real etcd process on 127.0.0.1; keeps its data dir and ports across restarts."""

    def __init__(self, binary: str):
        self.binary = binary
        self.dir = Path(tempfile.mkdtemp(prefix="etcdha-store-"))
        self.data_dir = self.dir / "data"
        self.log_path = self.dir / "etcd.log"
        self.client_port = free_port()
        self.peer_port = free_port()
        while self.peer_port == self.client_port:
            self.peer_port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.client_port}"
        self.peer_url = f"http://127.0.0.1:{self.peer_port}"
        self.proc: Optional[subprocess.Popen] = None
        self._log = None

    @property
    def pid(self) -> Optional[int]:
        return self.proc.pid if self.proc is not None else None

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> None:
        if self.running():
            return
        argv = [
            self.binary,
            "--name", "store-test",
            "--data-dir", str(self.data_dir),
            "--listen-client-urls", self.endpoint,
            "--advertise-client-urls", self.endpoint,
            "--listen-peer-urls", self.peer_url,
            "--initial-advertise-peer-urls", self.peer_url,
            "--initial-cluster", f"store-test={self.peer_url}",
            "--initial-cluster-state", "new",
            "--initial-cluster-token", f"etcdha-{uuid.uuid4().hex[:8]}",
        ]
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        wait_ready(self.endpoint, alive=self.running, log=self.log_path)

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if self._log is not None:
            self._log.close()
            self._log = None

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()  # by PID, via our own Popen handle
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                pass
        if self._log is not None:
            self._log.close()
        shutil.rmtree(self.dir, ignore_errors=True)


class ContainerEtcd(_Server):
    """etcd in a container (ETCDHA_TEST_ETCD=testcontainers); restart keeps the container."""

    pid = None

    def __init__(self):
        try:
            from testcontainers.core.container import DockerContainer
        except ImportError as exc:
            pytest.skip(f"ETCDHA_TEST_ETCD=testcontainers but testcontainers is not importable: {exc}")
        try:  # building the container already talks to the Docker engine
            self.container = (DockerContainer(ETCD_IMAGE).with_exposed_ports(2379).with_command(
                "etcd --listen-client-urls http://0.0.0.0:2379 --advertise-client-urls http://127.0.0.1:2379"))
            self.container.start()
        except Exception as exc:  # noqa: BLE001 - no Docker engine answers: skip, do not error
            pytest.skip(f"ETCDHA_TEST_ETCD=testcontainers but no Docker engine answered: {exc}")
        self._resolve()
        wait_ready(self.endpoint)

    def _resolve(self) -> None:
        host = self.container.get_container_host_ip()
        self.endpoint = f"http://{host}:{self.container.get_exposed_port(2379)}"

    def running(self) -> bool:
        return etcd_answers(self.endpoint)

    def stop(self) -> None:
        self.container.get_wrapped_container().stop(timeout=int(STOP_TIMEOUT))

    def start(self) -> None:
        self.container.get_wrapped_container().start()
        self.container.get_wrapped_container().reload()
        self._resolve()
        wait_ready(self.endpoint)

    def close(self) -> None:
        self.container.stop()


@pytest.fixture(scope="session")
def etcd_server():
    if os.environ.get("ETCDHA_TEST_ETCD") == "testcontainers":
        server = ContainerEtcd()
    else:
        binary = find_etcd()
        if binary is None:
            pytest.skip("no etcd binary on PATH or at /usr/bin/etcd (install etcd-server)")
        server = LocalEtcd(binary)
        try:
            server.start()
        except Exception:
            server.close()
            raise
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def store_factory(etcd_server):
    """Make Stores on the test server (or elsewhere); all are closed after the test."""
    made: list[Store] = []

    def make(prefix: Optional[str] = None, endpoint: Optional[str] = None, timeout: float = 2.0) -> Store:
        s = Store(EtcdConfig(endpoints=(endpoint or etcd_server.endpoint,),
                             prefix=prefix or f"/t-{uuid.uuid4().hex}", timeout=timeout))
        made.append(s)
        return s

    yield make
    for s in made:
        s.close()


@pytest.fixture
def store(etcd_server, store_factory):
    etcd_server.ensure_running()  # a previous test may have left it stopped after a failure
    return store_factory()
