"""Many services on a real 3-node cluster (issue 7): a whole-node crash with 100 services, and a
drain that moves several services at once.

Both tests run lab.ScaleSampler for their whole length: every node's addresses and every process
of every node namespace (found by the LAB_SERVICE marker in its environment, or by membership of
the service's cgroup, so a process supervisord does not know about counts too), and fail on any
sample in which a service runs, or has its VIP, on two nodes. Service i prefers node i % 3, then
the next node (as in `scripts/bench --services`), so a cold start spreads the services a third
per node and a fault moves about a third of them.
"""
from __future__ import annotations

import base64
import contextlib
import json
import subprocess
import time
from typing import Callable, NamedTuple, Optional

import lab as L
import pytest
from lab import wait_until

pytestmark = pytest.mark.e2e


def spread(config: dict, nodes: list[str]) -> dict:
    """per_node settings: service i prefers node i % 3 (200), then the next node (150), then the last (100)."""
    return {node: {"services": {name: {**svc, "priority": (200, 150, 100)[(k - i) % len(nodes)]}
                                for i, (name, svc) in enumerate(config.items())}}
            for k, node in enumerate(nodes)}


def vips_of(config: dict) -> dict[str, Optional[str]]:
    return {name: svc["vip"].split("/")[0] if "vip" in svc else None for name, svc in config.items()}


def status(cluster: L.Cluster) -> Optional[dict]:
    """`etcdha status --json`, or None if this one call failed (a slow etcd on a busy machine)."""
    res = cluster.cli("status", "--json", timeout=60)
    if res.returncode:
        return None
    try:
        return json.loads(res.stdout)
    except ValueError:
        return None


def not_running(doc: Optional[dict], names: list[str], avoid: Optional[str] = None) -> Optional[list[str]]:
    """The services in `names` not RUNNING on a live owner other than `avoid`; None without a status."""
    if doc is None:
        return None
    nodes = doc["nodes"]
    left = []
    for name in names:
        svc = doc["services"].get(name, {})
        owner = svc.get("owner")
        if owner is None or owner == avoid or svc.get("state") != "RUNNING" or not nodes.get(owner, {}).get("alive"):
            left.append(name)
    return left


def settled(cluster: L.Cluster, names: list[str], avoid: Optional[str], seen: dict) -> Optional[dict]:
    """The status if every service in `names` is RUNNING on a live owner other than `avoid`; remembers the last one."""
    doc = status(cluster)
    left = not_running(doc, names, avoid)
    if doc is not None:
        seen["doc"], seen["left"] = doc, left
    return doc if left == [] else None


def wait_settled(cluster: L.Cluster, names: list[str], timeout: float, what: str,
                 avoid: Optional[str] = None) -> dict:
    seen: dict = {}
    try:
        return wait_until(lambda: settled(cluster, names, avoid, seen), timeout, what, interval=0.5)
    except TimeoutError as exc:
        left = seen.get("left")
        detail = "no status answered" if left is None else (
            f"{len(left)} not RUNNING on a live owner" + (f" other than {avoid}" if avoid else "") + ": "
            + ", ".join(f"{n} ({seen['doc']['services'].get(n, {}).get('owner')}, "
                        f"{seen['doc']['services'].get(n, {}).get('state')})" for n in left[:10]))
        raise AssertionError(f"{exc}; {detail}") from None


def owned_by(doc: dict) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for name, svc in doc["services"].items():
        if svc.get("owner"):
            found.setdefault(svc["owner"], []).append(name)
    return {node: sorted(names) for node, names in found.items()}


def third(doc: dict, count: int) -> tuple[str, list[str]]:
    """The node owning closest to count/3 services (ties: more, then by name), and those services."""
    owned = owned_by(doc)
    victim = min(owned, key=lambda n: (abs(len(owned[n]) - count / 3), -len(owned[n]), n))
    return victim, owned[victim]


def sampled_where(sampler: L.ScaleSampler, doc: dict) -> list[str]:
    """Services the sampler does not see running (with its VIP, if it has one) on exactly their owner."""
    sample = sampler.sample_all()
    wrong = []
    for name, state in sample.items():
        owner = doc["services"][name]["owner"]
        full = [n for n, (vip, proc) in state.items() if proc and (vip or not sampler.services[name])]
        if full != [owner]:
            wrong.append(f"{name}: owner {owner}, runs on {full}")
    return wrong


def test_the_sampler_reads_service_markers_as_whole_words():
    """ScaleSampler's marker search (a substring search over each process's cmdline and environ):
    only a word that starts with the marker names a service, wherever it is in the block."""
    assert L.marked_services(b"python3\0sample_service.py\0--name=web\0--port\08080\0") == ["web"]
    assert L.marked_services(b"HOME=/\0LAB_SERVICE=s0042\0PATH=/bin") == ["s0042"]
    assert L.marked_services(b"LAB_SERVICE=s0001") == ["s0001"]  # first word, no trailing NUL
    assert L.marked_services(b"X=LAB_SERVICE=no\0echo --name=no\0") == []  # inside a word: not a marker
    assert sorted(L.marked_services(b"--name=a\0LAB_SERVICE=b\0--name=c\0")) == ["a", "b", "c"]
    assert L.marked_services(b"") == []


def test_the_sampler_counts_a_copy_outside_every_cgroup_and_one_inside_a_cgroup(lab):
    """The sampler's own check can fail: a marked process loose in n2's namespace and an unmarked
    one in the service's cgroup on n1 are two copies; each alone is one."""
    group = lab.cgroups / "sampler_test" / "n1" / "services" / "s0001"
    group.mkdir(parents=True)
    procs: list[subprocess.Popen] = []
    sampler = L.ScaleSampler(lab, services={"s0001": None, "s0002": None})
    try:
        procs.append(lab.popen("n2", ["env", f"{L.SCALE_MARKER}=s0001", "sleep", "60"]))
        procs.append(lab.popen("n1", ["sh", "-c", f"echo $$ > {group}/cgroup.procs && exec sleep 60"]))
        wait_until(lambda: sampler.sample_all()["s0001"] == {"n1": (False, True), "n2": (False, True),
                                                             "n3": (False, False)},
                   10, "the sampler to see s0001 on n1 (cgroup) and n2 (marker)")
        assert not any(p for _, p in sampler.sample_all()["s0002"].values())
        procs.pop(0).kill()
        wait_until(lambda: sampler.sample_all()["s0001"]["n2"] == (False, False), 10, "the loose copy to be gone")
    finally:
        for p in procs:
            p.kill()
            p.wait(10)
        wait_until(lambda: not (group / "cgroup.procs").read_text().strip(), 10, "the cgroup to empty")
        for d in (group, group.parent, group.parent.parent, group.parent.parent.parent):
            d.rmdir()


def clean_logs(cluster: L.Cluster, nodes: list[str]) -> list[str]:
    """Fence firings and tracebacks in the agents' logs of `nodes`."""
    found = []
    for name in nodes:
        text = cluster.nodes[name].log.read_text(errors="replace")
        found += [f"{name}: {line.strip()[:300]}" for line in text.splitlines()
                  if "fired" in line or line.startswith("Traceback")]
    return found


class KeyEvent(NamedTuple):
    revision: int
    kind: str               # "owners" or "moves"
    op: str                 # "put" or "delete"
    service: str
    node: Optional[str]     # the owner a put of an owner key names


class KeyWatch:
    """Every put and delete of owner and move keys under the cluster's prefix while inside `with`,
    in etcd's revision order (exact: no clocks involved).

    `etcdctl watch --rev` replays from the revision current on entering, so nothing written
    after that is missed however late the watch connects.
    """

    def __init__(self, cluster: L.Cluster):
        self.cluster = cluster
        self.events: list[KeyEvent] = []
        self.proc: Optional[subprocess.Popen] = None

    def __enter__(self) -> "KeyWatch":
        etcd = self.cluster.etcd
        revision = json.loads(etcd.etcdctl("endpoint", "status", "-w", "json"))[0]["Status"]["header"]["revision"]
        self.proc = self.cluster.lab.popen(etcd.role, [
            "etcdctl", "--endpoints", etcd.endpoint, "watch", "--prefix", f"{self.cluster.prefix}/",
            "--rev", str(revision + 1), "-w", "json"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        return self

    def __exit__(self, *exc: object) -> None:
        time.sleep(0.5)  # what was written by now has been delivered
        self.proc.terminate()
        try:
            out, _ = self.proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, _ = self.proc.communicate(timeout=10)
        for line in out.splitlines():
            with contextlib.suppress(ValueError, KeyError, TypeError, AttributeError):
                for event in json.loads(line).get("Events") or []:
                    kv = event["kv"]
                    key = base64.b64decode(kv["key"]).decode()[len(self.cluster.prefix) + 1:]
                    kind, _, service = key.partition("/")
                    if kind not in ("owners", "moves"):
                        continue
                    deleted = event.get("type") == 1  # DELETE; a PUT's type (0) is left out of the JSON
                    node = None if deleted else json.loads(base64.b64decode(kv["value"])).get("node")
                    self.events.append(KeyEvent(int(kv["mod_revision"]), kind, "delete" if deleted else "put",
                                                service, node))
        self.events.sort()

    def most_at_once(self, opens: Callable[[KeyEvent], bool], closes: Callable[[KeyEvent], bool]) -> int:
        """The largest number of services that were, at one revision, past an event that `opens`
        their span and not yet past one that `closes` it."""
        open_now: set[str] = set()
        most = 0
        for event in self.events:
            if closes(event):
                open_now.discard(event.service)
            if opens(event):
                open_now.add(event.service)
            most = max(most, len(open_now))
        return most


def test_node_crash_with_100_services_all_back_never_two_copies(lab, make_cluster):
    """100 services (50 with a VIP), lease_ttl 2: the node owning a third of them dies at once (every
    process killed, addresses gone: no handoff); the other two take all of them over, nobody fences."""
    config = L.scale_services(100)
    names = sorted(config)
    with L.ScaleSampler(lab, services=vips_of(config)) as sampler:
        cluster = make_cluster({"lease_ttl": 2}, spread(config, lab.node_names))
        t0 = time.monotonic()
        doc = wait_settled(cluster, names, 120, "all 100 services owned and RUNNING after a cold start")
        cold = time.monotonic() - t0
        wait_until(lambda: not sampled_where(sampler, doc), 10, "the sampler to see each service on its owner only")
        victim, moved = third(doc, len(names))
        assert len(moved) >= 20, f"the cold start did not spread the services: {owned_by(doc)}"
        survivors = [n for n in lab.node_names if n != victim]
        t1 = time.monotonic()
        L.crash_node(cluster.nodes[victim])
        doc = wait_settled(cluster, names, 60, f"all 100 services RUNNING on {' and '.join(survivors)} "
                           f"after the crash of {victim}", avoid=victim)
        back = time.monotonic() - t1
        wait_until(lambda: not sampled_where(sampler, doc), 10, "the sampler to see each service on its owner only")
        time.sleep(1.0)  # a last stretch of samples once everything is back
    print(f"cold start {cold:.1f}s; crash of {victim} with {len(moved)} services: all RUNNING elsewhere after "
          f"{back:.1f}s; {sampler.samples} samples, {sampler.errors} failed")
    assert sampler.violation_count == 0, f"{sampler.violation_count} two-copy samples: {sampler.violations[:20]}"
    assert sampler.samples >= 20 and sampler.errors <= sampler.samples // 10, \
        f"the sampler hardly sampled: {sampler.samples} samples, {sampler.errors} failed"
    assert clean_logs(cluster, survivors) == [], "a surviving node fenced itself or logged a traceback"


def test_drain_moves_several_services_at_once(lab, make_cluster):
    """24 services: a drain of the node owning 8 moves them all, several at once (drain_concurrency 32, the default).

    Measured exactly, in etcd's revision order: at some revision two or more move requests from
    the drained node were pending, and two or more of its services were released and not yet
    claimed by their new owner. Moving one service at a time makes both 1.
    """
    config = L.scale_services(24)
    names = sorted(config)
    with L.ScaleSampler(lab, services=vips_of(config)) as sampler:
        cluster = make_cluster({"lease_ttl": 2}, spread(config, lab.node_names))
        doc = wait_settled(cluster, names, 60, "all 24 services owned and RUNNING after a cold start")
        wait_until(lambda: not sampled_where(sampler, doc), 10, "the sampler to see each service on its owner only")
        victim, moved = third(doc, len(names))
        assert len(moved) >= 6, f"the cold start did not spread the services: {owned_by(doc)}"
        t0 = time.monotonic()
        with KeyWatch(cluster) as keys:
            res = cluster.cli("drain", victim, "--wait", "--timeout", "60", timeout=90)
            drained = time.monotonic() - t0
            assert res.returncode == 0, f"etcdha drain exit {res.returncode}: {res.stdout}{res.stderr}"
            doc = wait_settled(cluster, names, 30, f"all 24 services RUNNING off drained {victim}", avoid=victim)
        wait_until(lambda: not sampled_where(sampler, doc), 10, "the sampler to see each service on its owner only")
        time.sleep(0.5)
    # a move is pending from its request until the target's claim deletes it (in the claim's transaction)
    requests = keys.most_at_once(lambda e: e.kind == "moves" and e.op == "put" and e.service in moved,
                                 lambda e: e.kind == "moves" and e.op == "delete")
    # a service is in flight from the drained node's release (its owner key deleted) until another node claims it
    in_flight = keys.most_at_once(lambda e: e.kind == "owners" and e.op == "delete" and e.service in moved,
                                  lambda e: e.kind == "owners" and e.op == "put")
    claims = {e.service: e.node for e in keys.events if e.kind == "owners" and e.op == "put" and e.service in moved}
    print(f"drain of {victim} with {len(moved)} services: {drained:.2f}s (etcdha drain --wait); at most {requests} "
          f"move requests pending and {in_flight} services released but not yet claimed at once")
    assert sampler.violation_count == 0, f"{sampler.violation_count} two-copy samples: {sampler.violations[:20]}"
    assert sampler.samples >= 10 and sampler.errors <= sampler.samples // 10, \
        f"the sampler hardly sampled: {sampler.samples} samples, {sampler.errors} failed"
    assert sorted(claims) == sorted(moved) and victim not in claims.values(), f"claims seen: {claims}"
    # one move at a time (drain_concurrency 1) makes both 1: the next request comes only once the previous
    # move's claim deleted its request, so the next release comes only after the previous claim
    assert requests >= 2, f"the drained node asked for one move at a time: {keys.events}"
    assert in_flight >= 2, \
        f"the drained node released each service only once the previous one was claimed: {keys.events}"
    assert clean_logs(cluster, lab.node_names) == [], "a node fenced itself or logged a traceback"
