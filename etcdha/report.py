"""ClusterView -> the stable status JSON and the human table built from it."""
from __future__ import annotations

import time
from typing import Any, Optional

from etcdha.model import ClusterView


def _iso(ts: float) -> Optional[str]:
    try:
        return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts)) if ts else None
    except (OverflowError, ValueError, OSError):
        return None  # a garbage timestamp in etcd must not break `status`


def status(view: ClusterView) -> dict[str, Any]:
    """Stable shape: {"services": {NAME: {"owner": NODE|null, ...}}, "nodes": {NAME: {...}}, ...}."""
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
        }
    return {"revision": view.revision, "services": services, "nodes": nodes, "problems": list(view.problems)}


def table(doc: dict[str, Any]) -> str:
    """Two aligned tables (services, nodes) plus any problems found in etcd."""
    def render(header: list[str], rows: list[list[str]]) -> list[str]:
        widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
        return ["  ".join(str(x).ljust(w) for x, w in zip(row, widths)).rstrip() for row in [header, *rows]]

    svc_rows = [[name, s["owner"] or "-", s["state"], s["vip"] or "-", str(s["fencing_token"] or "-"),
                 s["since"] or "-", ",".join(s["candidates"]) or "-"] for name, s in doc["services"].items()]
    node_rows = [[name, "yes" if n["alive"] else "NO", ",".join(n["owns"]) or "-", n["started"] or "-"]
                 for name, n in doc["nodes"].items()]
    lines = render(["SERVICE", "OWNER", "STATE", "VIP", "TOKEN", "SINCE", "CANDIDATES"], svc_rows)
    lines += [""] + render(["NODE", "ALIVE", "OWNS", "STARTED"], node_rows)
    lines += [f"problem: {p}" for p in doc["problems"]]
    return "\n".join(lines)
