"""Builders shared by the planner tests: hand-made cluster views and local facts.

Node names are letters; this node is "b". Imported by test modules in this folder
(pytest puts the folder on sys.path).
"""
from __future__ import annotations

from typing import Iterable, Mapping, Optional

from etcdha.decide import Action, Facts, Kind, Plan, Reason
from etcdha.lease import LeaseState
from etcdha.model import Candidate, ClusterView, NodeInfo, Owner

ME = "b"
MY_LEASE = 0xB1
LEASES = {"a": 0xA1, "b": MY_LEASE, "c": 0xC1, "d": 0xD1}


def view(alive: Iterable[str] = ("a", "b", "c"),
         candidates: Optional[Mapping[str, Mapping[str, int]]] = None,
         owners: Optional[Mapping[str, Owner]] = None,
         revision: int = 10, **extra) -> ClusterView:
    """A view where `alive` nodes have node keys and `candidates` is service -> {node: priority}."""
    cands = {svc: {n: Candidate(node=n, priority=p) for n, p in by_node.items()}
             for svc, by_node in (candidates or {}).items()}
    return ClusterView(revision=revision,
                       nodes={n: NodeInfo(node=n, lease=LEASES.get(n, 0x99)) for n in alive},
                       candidates=cands, owners=dict(owners or {}),
                       members=frozenset(alive), **extra)


def facts(**kw) -> Facts:
    base = dict(me=ME, lease=MY_LEASE, lease_state=LeaseState.OK, now=100.0, priorities={"web": 100})
    base.update(kw)
    base.setdefault("wall_now", base["now"])  # tests use one clock for both
    return Facts(**base)


def kinds(p: Plan) -> list[tuple[Kind, str, Reason]]:
    return [(a.kind, a.service, a.reason) for a in p.actions]


def of_kind(p: Plan, kind: Kind) -> list[Action]:
    return [a for a in p.actions if a.kind is kind]
