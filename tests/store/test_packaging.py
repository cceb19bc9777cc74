"""The sdist and wheel as an operator gets them: license metadata, classifiers, deploy/ and the license file."""
from __future__ import annotations

import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.package

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def dist(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    res = subprocess.run([sys.executable, "-m", "build", "--sdist", "--wheel", "--outdir", str(out), str(ROOT)],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return out


def test_sdist_carries_deploy_license_scripts_and_tests(dist):
    (sdist,) = dist.glob("etcdha-*.tar.gz")
    with tarfile.open(sdist) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
        pkg_info = tar.extractfile(next(n for n in tar.getnames() if n.endswith("/PKG-INFO"))).read().decode()
    for wanted in ("LICENSE", "README.md", "deploy/etcdha.service", "deploy/agent.yaml",
                   "deploy/etcd-default.example", "deploy/etcd-colocated.example", "deploy/prometheus-rules.yml", "deploy/etcd-auth.sh", "scripts/lab.py", "scripts/test",
                   "tests/unit/test_decide.py", "etcdha/agent.py"):
        assert wanted in names, f"{wanted} missing from {sdist.name}"
    assert not any("__pycache__" in n for n in names)
    assert "License-Expression: Apache-2.0" in pkg_info
    assert "License-File: LICENSE" in pkg_info
    assert "Classifier: Operating System :: POSIX :: Linux" in pkg_info
    assert "tenacity" not in pkg_info


def test_wheel_metadata_and_license_file(dist):
    (wheel,) = dist.glob("etcdha-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        metadata = z.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names), names
    assert "License-Expression: Apache-2.0" in metadata
    requires = sorted(line.split(":", 1)[1].strip().split(";")[0] for line in metadata.splitlines()
                      if line.startswith("Requires-Dist:") and "extra ==" not in line)
    assert requires == sorted(["python3-etcd3>=0.13", "supervisor>=4.2", "click>=8", "PyYAML>=6",
                                "prometheus-client>=0.16"])
