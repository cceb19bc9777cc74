"""`status` never contradicts what runs: once a program answers on the VIP, its owner's state is not STOPPED.

The agent writes its node key with STARTING before it starts programs, and again after it
acted (not with the states it read before), so a reader can never see STOPPED for a
program that already answers. Checked with the benchmark's watch feed, which sees every
version of the owner and node keys that `etcdha status` renders, not only those a poll hits.
"""
from __future__ import annotations

import json
import subprocess
import sys
import threading
import time

import pytest
from lab import REPO, wait_until

pytestmark = pytest.mark.e2e


class Poller:
    """`bench.py watch-status` in the client namespace: (time seen, owner, state) of web, at every change
    and at least every 0.5 s."""

    def __init__(self, cluster):
        endpoints = ",".join(f"http://{cluster.lab.etcd_ip(r)}:2379" for r in cluster.lab.etcd_roles)
        self.proc = cluster.lab.popen("cl", [sys.executable, str(REPO / "scripts" / "bench.py"), "watch-status",
                                             endpoints, cluster.prefix, "600"],
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.polls: list[tuple[float, str, str]] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        web = [None, None]
        for line in self.proc.stdout:
            doc = json.loads(line)
            if "error" in doc:
                continue
            web = doc["s"].get("web", web)
            self.polls.append((doc["ts"], web[0], web[1]))

    def stop(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(10)


def judged(polls: list[tuple[float, str, str]], starts: list[tuple[float, str]]) -> list[tuple[float, str, str]]:
    """(seconds after it answered, node, state) of every feed line that shows the node whose program
    answered on the VIP, from its first answer until the next owner's."""
    bounds = [t for t, _ in starts[1:]] + [float("inf")]
    return [(ts - answered, node, state) for (answered, node), until in zip(starts, bounds)
            for ts, owner, state in list(polls) if answered < ts < until and owner == node]


def test_status_never_says_stopped_once_the_program_answers(make_cluster, sampler, probe):
    cluster = make_cluster()
    poller = Poller(cluster)
    try:
        wait_until(lambda: probe.last() == "n1", 30, "n1 to answer on the VIP")
        starts = [(probe.first_answer_after(0, exclude=None), "n1")]
        for target in ("n2", "n3", "n1"):
            previous = starts[-1][1]
            t0 = time.monotonic()
            res = cluster.cli("move", "web", "--to", target, "--wait", "--timeout", "20")
            assert res.returncode == 0, res.stderr
            starts.append((wait_until(lambda: probe.first_answer_after(t0, exclude=previous), 10,
                                      f"{target} to answer"), target))
            time.sleep(1.0)
        # evidence: the feed writes a line at least every 0.5 s, so the last owner's window fills up
        wait_until(lambda: len(judged(poller.polls, starts)) >= 10, 20, "ten feed lines while a program answered")
    finally:
        poller.stop()
    seen = judged(poller.polls, starts)
    wrong = [(round(after, 3), node, state) for after, node, state in seen if state not in ("STARTING", "RUNNING")]
    assert len(seen) >= 10, poller.polls
    assert wrong == [], f"status contradicted a program that already answered: {wrong}"
    assert sampler.violations == []
