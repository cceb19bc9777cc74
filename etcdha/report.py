"""ClusterView -> the stable status JSON and the human table built from it."""
from __future__ import annotations

import time
from typing import Any, Mapping, Optional

from etcdha.model import ClusterView, Event


def _iso(ts: float) -> Optional[str]:
    try:
        return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts)) if ts else None
    except (OverflowError, ValueError, OSError):
        return None  # a garbage timestamp in etcd must not break `status`


def status(view: ClusterView, ttl_left: Optional[Mapping[int, int]] = None,
           now: Optional[float] = None) -> dict[str, Any]:
    """Stable shape: {"services": {NAME: {"owner": NODE|null, ...}}, "nodes": {NAME: {...}}, ...}.

    `ttl_left` maps lease ids to seconds left (from etcd); `now` is the wall clock for cooldowns.
    """
    ttl_left = ttl_left or {}
    now = time.time() if now is None else now
    names = sorted(set(view.services) | set(view.owners))
    services: dict[str, Any] = {}
    for name in names:
        owner = view.owners.get(name)
        cands = view.candidates.get(name, {})
        node = view.nodes.get(owner.node) if owner else None
        vip = view.services.get(name) or next((c.vip for c in cands.values() if c.vip), None)
        services[name] = {
            "owner": owner.node if owner else None,
            "state": (node.services.get(name, "UNKNOWN") if node else ("UNKNOWN" if owner else "STOPPED")),
            "vip": vip,
            "since": _iso(owner.since) if owner else None,
            "fencing_token": owner.token if owner else None,
            "candidates": [c.node for c in view.live_candidates(name)],
            "paused": view.is_paused(name),
            "moving_to": view.moves[name].to if name in view.moves else None,
            "cooling_down": sorted(n for (s, n), until in view.cooldowns.items() if s == name and until > now),
            # processes in the service's cgroup, per live node that has any: a non-owner here is a leftover
            "processes": {n: info.processes[name] for n, info in sorted(view.nodes.items())
                          if info.processes.get(name, 0) > 0},
            # the owner's health checks: passing, failing, pending (start grace); null without checks
            "health": node.health.get(name) if node else None,
            # health-check failures that still count, per node (etcdha cleanup clears them)
            "failures": {n: {"count": f.count(now), "last": _iso(f.last()), "check": f.check, "output": f.output}
                         for (s, n), f in sorted(view.failures.items()) if s == name and f.count(now) > 0},
        }
    nodes: dict[str, Any] = {}
    for name in sorted(view.members):
        info = view.nodes.get(name)
        nodes[name] = {
            "alive": info is not None,
            "pid": info.pid if info else None,
            "started": _iso(info.started) if info else None,
            "lease": f"{info.lease:x}" if info else None,
            "owns": sorted(s for s, o in view.owners.items() if o.node == name),
            "drained": name in view.drained,
            "unhealthy": (info.unhealthy or None) if info else None,  # why a node check fails
            "lease_ttl_left": ttl_left.get(info.lease) if info else None,
            "processes": {s: n for s, n in sorted(info.processes.items()) if n > 0} if info else {},
        }
    return {"revision": view.revision, "services": services, "nodes": nodes, "problems": list(view.problems)}


def table(doc: dict[str, Any]) -> str:
    """Two aligned tables (services, nodes) plus any problems found in etcd."""
    def render(header: list[str], rows: list[list[str]]) -> list[str]:
        widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
        return ["  ".join(str(x).ljust(w) for x, w in zip(row, widths)).rstrip() for row in [header, *rows]]

    def notes(s: dict[str, Any]) -> str:
        parts = (["PAUSED"] if s["paused"] else []) + ([f"moving to {s['moving_to']}"] if s["moving_to"] else [])
        parts += [f"cooling down on {','.join(s['cooling_down'])}"] if s["cooling_down"] else []
        parts += [f"LEFTOVER processes on {n} ({c})" for n, c in s["processes"].items() if n != s["owner"]]
        parts += [f"{f['count']} check failure(s) on {n} ({f['check']})" for n, f in s["failures"].items()]
        return "; ".join(parts) or "-"

    svc_rows = [[name, s["owner"] or "-", s["state"], str(s["processes"].get(s["owner"], 0) if s["owner"] else "-"),
                 s["health"] or "-", s["vip"] or "-", str(s["fencing_token"] or "-"), s["since"] or "-", ",".join(s["candidates"]) or "-",
                 notes(s)] for name, s in doc["services"].items()]
    node_rows = [[name, "yes" if n["alive"] else "NO", "DRAINED" if n["drained"] else "-",
                  "UNHEALTHY" if n["unhealthy"] else "-",
                  "-" if n["lease_ttl_left"] is None else f"{n['lease_ttl_left']}s",
                  ",".join(n["owns"]) or "-", n["started"] or "-"] for name, n in doc["nodes"].items()]
    lines = render(["SERVICE", "OWNER", "STATE", "PROCS", "HEALTH", "VIP", "TOKEN", "SINCE", "CANDIDATES", "NOTES"], svc_rows)
    lines += [""] + render(["NODE", "ALIVE", "DRAINED", "HEALTH", "LEASE", "OWNS", "STARTED"], node_rows)
    lines += [f"node {name} is unhealthy: {n['unhealthy']}" for name, n in doc["nodes"].items() if n["unhealthy"]]
    lines += [f"problem: {p}" for p in doc["problems"]]
    return "\n".join(lines)


def history_rows(events: list[Event]) -> str:
    """History as an aligned table, oldest first."""
    rows = [["TIME", "SERVICE", "EVENT", "NODE", "REASON", "TOKEN", "DETAIL"]]
    rows += [[time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(e.time)) + f".{int(e.time * 1000) % 1000:03d}",
              e.service, e.event, e.node, e.reason, str(e.token or "-"), e.detail or "-"] for e in events]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)
