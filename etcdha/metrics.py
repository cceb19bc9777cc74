"""Prometheus metrics and a /health endpoint, served by the agent when `metrics.listen` is set.

State (lease, services owned, program states, health checks, fail counts) is read at
scrape time from the agent's last cycle: nothing is computed while nobody scrapes, so
the idle cost does not grow with the number of services. Counters and histograms
(transitions, fence firings, etcd calls, claim-to-running, takeovers) are updated where
they happen: transitions through the event seam, etcd calls through the store's observer.
"""
from __future__ import annotations

import json
import logging
import socket
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable, Iterator, Mapping, Optional

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from etcdha import model

log = logging.getLogger(__name__)

LEASE_STATES = ("OK", "SUSPENDED", "LOST")


@dataclass(frozen=True)
class Snapshot:
    """What the agent knew at the end of its last cycle (monotonic `at`)."""

    at: float = 0.0
    lease_state: str = "LOST"
    lease_left: float = 0.0           # seconds until our conservative lease deadline
    owned: frozenset[str] = frozenset()
    programs: Mapping[str, str] = field(default_factory=dict)
    processes: Mapping[str, int] = field(default_factory=dict)
    health: Mapping[str, str] = field(default_factory=dict)      # service -> passing/failing/pending
    failures: Mapping[str, int] = field(default_factory=dict)    # service -> fail count here that still counts
    node_unhealthy: bool = False
    etcd_ok: bool = False


def health(snapshot: Snapshot, now: float, stale_after: float) -> tuple[bool, str]:
    """Is this agent fit to own services? Its loop ran lately, its lease is OK, its node checks pass (pure)."""
    if snapshot.at == 0.0:
        return False, "starting: no cycle yet"
    if snapshot.lease_state != "OK":  # first: a node rejoining after LOST is not a stalled loop
        return False, f"lease {snapshot.lease_state}"
    if now - snapshot.at > stale_after:
        return False, f"the agent's loop has not run for {now - snapshot.at:.1f}s"
    if snapshot.node_unhealthy:
        return False, "a node check fails"
    return True, "ok"


class Metrics:
    """The agent's metrics: a registry of its own, updated from the agent, served over HTTP."""

    def __init__(self, node: str, stale_after: float, clock: Callable[[], float] = time.monotonic):
        self.node = node
        self.stale_after = stale_after
        self.clock = clock
        self.snapshot = Snapshot()
        self.registry = CollectorRegistry()
        self.transitions = Counter("etcdha_transitions", "Transitions recorded by this agent (history events)",
                                   ["event", "reason"], registry=self.registry)
        self.fence_firings = Counter("etcdha_fence_firings", "Times this node fenced itself (everything killed)",
                                     registry=self.registry)
        self.etcd_requests = Histogram("etcdha_etcd_request_seconds", "etcd calls by method, with their latency",
                                       ["method"], registry=self.registry,
                                       buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5))
        self.etcd_errors = Counter("etcdha_etcd_errors", "etcd calls that failed, by method and gRPC code",
                                   ["method", "code"], registry=self.registry)
        self.claim_to_running = Histogram("etcdha_claim_to_running_seconds",
                                          "From claiming a service to its program RUNNING here",
                                          registry=self.registry,
                                          buckets=(.05, .1, .25, .5, 1, 1.5, 2, 3, 5, 10, 30, 60))
        self.takeover = Histogram("etcdha_takeover_seconds",
                                  "From a service seen without owner (or moved to us) to our claim of it",
                                  registry=self.registry, buckets=(.01, .05, .1, .25, .5, 1, 2, 3, 5, 10, 30))
        self.registry.register(_StateCollector(self))
        self._server: Optional[ThreadingHTTPServer] = None

    # ---- fed by the agent ----

    def event(self, event: model.Event) -> None:
        """An event-seam subscriber."""
        self.transitions.labels(event.event, event.reason).inc()
        if event.event == "fenced":
            self.fence_firings.inc()

    def etcd_call(self, method: str, seconds: float, error: Optional[str]) -> None:
        """The store's observer: every etcd call, its latency and its error code (None if it succeeded)."""
        self.etcd_requests.labels(method).observe(seconds)
        if error is not None:
            self.etcd_errors.labels(method, error).inc()

    def update(self, snapshot: Snapshot) -> None:
        self.snapshot = snapshot

    def health(self) -> tuple[bool, str]:
        return health(self.snapshot, self.clock(), self.stale_after)

    # ---- HTTP ----

    def serve(self, host: str, port: int) -> tuple[str, int]:
        """Serve /metrics and /health on a thread of our own; returns the address bound (port 0: any)."""
        metrics = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server API
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    body, status, kind = generate_latest(metrics.registry), 200, CONTENT_TYPE_LATEST
                elif path == "/health":
                    ok, why = metrics.health()
                    body = json.dumps({"healthy": ok, "node": metrics.node, "reason": why}).encode() + b"\n"
                    status, kind = (200 if ok else 503), "application/json"
                else:
                    body, status, kind = b"see /metrics and /health\n", 404, "text/plain"
                self.send_response(status)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        class Server(ThreadingHTTPServer):
            address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
            allow_reuse_address = True

        server = Server((host, port), Handler)
        server.daemon_threads = True
        self._server = server
        threading.Thread(target=server.serve_forever, name="etcdha-metrics", daemon=True).start()
        return server.server_address[0], server.server_address[1]

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()


class _StateCollector:
    """Gauges built at scrape time from the agent's last snapshot."""

    def __init__(self, metrics: Metrics):
        self.metrics = metrics

    def collect(self) -> Iterator[GaugeMetricFamily]:
        s = self.metrics.snapshot
        state = GaugeMetricFamily("etcdha_lease_state", "1 for the lease's current state", labels=["state"])
        for name in LEASE_STATES:
            state.add_metric([name], 1.0 if s.lease_state == name else 0.0)
        yield state
        yield GaugeMetricFamily("etcdha_lease_ttl_left_seconds", "Seconds until this node's lease deadline "
                                "(from the last answered keepalive; the fence acts fence_margin before it)",
                                value=max(0.0, s.lease_left))
        yield GaugeMetricFamily("etcdha_services_owned", "Services this node owns", value=len(s.owned))
        ok, _ = health(s, self.metrics.clock(), self.metrics.stale_after)
        yield GaugeMetricFamily("etcdha_healthy", "1 if /health says healthy", value=1.0 if ok else 0.0)
        yield GaugeMetricFamily("etcdha_node_unhealthy", "1 while a node check fails", value=float(s.node_unhealthy))
        yield GaugeMetricFamily("etcdha_etcd_reachable", "1 if the last cycle had a current view of etcd",
                                value=float(s.etcd_ok))
        owned = GaugeMetricFamily("etcdha_service_owned", "1 if this node owns the service", labels=["service"])
        running = GaugeMetricFamily("etcdha_service_running", "1 if the service's program is RUNNING here",
                                    labels=["service"])
        programs = GaugeMetricFamily("etcdha_service_program_state", "1 for the program's supervisord state here",
                                     labels=["service", "state"])
        processes = GaugeMetricFamily("etcdha_service_processes", "Processes in the service's cgroup here",
                                      labels=["service"])
        checks = GaugeMetricFamily("etcdha_service_check_healthy",
                                   "Health checks of a service owned here: 1 passing, 0 failing, -1 pending",
                                   labels=["service"])
        fails = GaugeMetricFamily("etcdha_service_check_failures",
                                  "Health-check failures of the service here that still count (failure_timeout)",
                                  labels=["service"])
        for name in sorted(s.programs):
            owned.add_metric([name], 1.0 if name in s.owned else 0.0)
            running.add_metric([name], 1.0 if s.programs[name] == "RUNNING" else 0.0)
            programs.add_metric([name, s.programs[name]], 1.0)
            processes.add_metric([name], float(s.processes.get(name, 0)))
            fails.add_metric([name], float(s.failures.get(name, 0)))
        for name, word in sorted(s.health.items()):
            checks.add_metric([name], {"passing": 1.0, "failing": 0.0}.get(word, -1.0))
        yield from (owned, running, programs, processes, checks, fails)
