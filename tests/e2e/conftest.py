"""Multi-node fixtures: one namespace lab + etcd per session, a fresh cluster (own key prefix) per test."""
from __future__ import annotations

import os
import shutil
import sys
import uuid
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
import lab as lablib  # noqa: E402


def _missing() -> str:
    if os.geteuid() != 0:
        return "needs root (network namespaces)"
    for tool in ("ip", "etcd", "etcdctl"):
        if shutil.which(tool) is None:
            return f"needs {tool} on PATH"
    return ""


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    setattr(item, "rep_" + rep.when, rep)


@pytest.fixture(scope="session")
def lab(request):
    why = _missing()
    if why:
        pytest.skip(why)
    with lablib.Lab() as the_lab:
        etcd = lablib.Etcd(the_lab)
        etcd.start()
        the_lab.etcd = etcd
        try:
            yield the_lab
        finally:
            etcd.stop()
            the_lab.keep_files = bool(request.session.testsfailed)  # logs stay only to read a failure


@pytest.fixture
def make_cluster(lab, request):
    """make_cluster(settings=None, per_node=None) -> a started Cluster with its own key prefix."""
    made: list[lablib.Cluster] = []

    def make(settings=None, per_node=None, start=True) -> lablib.Cluster:
        cluster = lablib.Cluster(lab, lab.etcd, f"/t{uuid.uuid4().hex[:8]}", settings, per_node)
        made.append(cluster)
        if start:
            cluster.start()
        return cluster

    yield make
    for cluster in made:
        cluster.stop()
        failed = getattr(request.node, "rep_call", None)
        if failed is not None and failed.failed:
            print(cluster.logs())


@pytest.fixture
def sampler(lab):
    with lablib.Sampler(lab) as s:
        yield s


@pytest.fixture
def probe(lab):
    p = lablib.Probe(lab)
    yield p
    p.stop()
