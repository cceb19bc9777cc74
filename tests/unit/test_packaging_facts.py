"""Declared facts match the code: every dependency is imported, the README's numbers are the code's."""
from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

from etcdha import vip

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
MODULES = {"python3-etcd3": "etcd3", "supervisor": "supervisor", "click": "click", "PyYAML": "yaml",
           "prometheus-client": "prometheus_client"}


def dependencies() -> list[str]:
    if sys.version_info >= (3, 11):
        import tomllib
        doc = tomllib.loads((ROOT / "pyproject.toml").read_text())
        return [re.split(r"[<>=!~ ;\[]", d)[0] for d in doc["project"]["dependencies"]]
    pytest.skip("tomllib needs Python 3.11")


def test_every_declared_dependency_is_imported_by_etcdha_and_nothing_else_is_needed():
    declared = dependencies()
    assert sorted(declared) == sorted(MODULES), "a new dependency needs its module name here"
    code = "\n".join(p.read_text() for p in (ROOT / "etcdha").glob("*.py"))
    for dist, module in MODULES.items():
        imported = re.search(rf"^\s*(import {module}\b|from {module}\b)", code, re.M)
        assert imported, f"{dist} is declared, never imported"


def test_the_readme_says_how_many_gratuitous_arp_rounds_the_code_sends():
    readme = (ROOT / "README.md").read_text()
    words = {3: "three", 4: "four", 5: "five", 6: "six"}
    rounds, span = len(vip.GARP_SCHEDULE), vip.GARP_SCHEDULE[-1]
    assert f"in {words[rounds]} rounds over {span:g} s" in readme


def test_the_suite_installs_exactly_the_declared_floors():
    """tests/floors.txt (what scripts/setup-env installs) pins each dependency at pyproject's lower bound."""
    if sys.version_info < (3, 11):
        pytest.skip("tomllib needs Python 3.11")
    import tomllib

    declared = {}
    for dep in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]:
        name, floor = re.fullmatch(r"([A-Za-z0-9_.-]+)>=([0-9.]+)", dep.replace(" ", "")).groups()
        declared[name.lower()] = floor
    pinned = {}
    for line in (ROOT / "tests" / "floors.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, version = line.split("==")
            pinned[name.strip().lower()] = version.strip()
    def version(text: str) -> tuple[int, ...]:
        parts = [int(x) for x in text.split(".")]
        return tuple(parts + [0] * (3 - len(parts)))

    assert {n: version(v) for n, v in pinned.items()} == {n: version(v) for n, v in declared.items()}
    setup_env = (ROOT / "scripts" / "setup-env").read_text()
    assert "-c \"$REPO/tests/floors.txt\"" in setup_env
