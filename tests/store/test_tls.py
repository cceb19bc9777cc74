"""etcd over TLS with client certificates: the store and the CLI connect with the config's CA and cert.

Certificates are made here with the openssl command line (a throwaway CA, a server
certificate for 127.0.0.1 and a client certificate); etcd requires client certs.
"""
from __future__ import annotations

import shutil
import subprocess
import time
import uuid
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from etcdha.cli import main
from etcdha.config import EtcdConfig
from etcdha.errors import StoreError
from etcdha.store import Store

from .conftest import find_etcd, free_port

pytestmark = pytest.mark.store


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def make_certs(d: Path) -> None:
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=etcdha-test-ca",
            "-keyout", "ca.key", "-out", "ca.crt", cwd=d)
    (d / "san.cnf").write_text("subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth,clientAuth\n")
    for name in ("server", "client"):
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}", "-keyout", f"{name}.key",
                "-out", f"{name}.csr", cwd=d)
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
                "-days", "2", "-extfile", "san.cnf", "-out", f"{name}.crt", cwd=d)


@pytest.fixture(scope="module")
def tls_etcd(tmp_path_factory):
    binary = find_etcd()
    if binary is None or shutil.which("openssl") is None:
        pytest.skip("needs etcd and openssl")
    d = tmp_path_factory.mktemp("tls")
    make_certs(d)
    client, peer = free_port(), free_port()
    url = f"https://127.0.0.1:{client}"
    proc = subprocess.Popen([
        binary, "--name", "tls", "--data-dir", str(d / "data"),
        "--listen-client-urls", url, "--advertise-client-urls", url,
        "--listen-peer-urls", f"http://127.0.0.1:{peer}", "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer}",
        "--initial-cluster", f"tls=http://127.0.0.1:{peer}",
        "--cert-file", str(d / "server.crt"), "--key-file", str(d / "server.key"),
        "--client-cert-auth", "--trusted-ca-file", str(d / "ca.crt"),
    ], stdout=(d / "etcd.log").open("wb"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    good = EtcdConfig(endpoints=(url,), prefix=f"/tls-{uuid.uuid4().hex[:6]}", timeout=1.0,
                      ca_cert=str(d / "ca.crt"), cert=str(d / "client.crt"), key=str(d / "client.key"))
    try:
        deadline = time.monotonic() + 20
        while True:
            store = Store(good)
            try:
                store.revision()
                break
            except StoreError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError("TLS etcd did not come up:\n" + (d / "etcd.log").read_text()[-2000:])
                time.sleep(0.2)
            finally:
                store.close()
        yield d, good
    finally:
        proc.kill()
        proc.wait(10)


def test_store_speaks_tls_with_a_client_certificate(tls_etcd):
    _, good = tls_etcd
    store = Store(good)
    try:
        lease, _ = store.grant(5)
        assert store.claim("web", "n1", lease, time.time()) is not None
        assert store.snapshot().owners["web"].node == "n1"
    finally:
        store.close()


def test_without_the_client_certificate_etcd_refuses_with_a_clear_error(tls_etcd):
    d, good = tls_etcd
    no_cert = EtcdConfig(endpoints=good.endpoints, prefix=good.prefix, timeout=1.0, ca_cert=str(d / "ca.crt"))
    store = Store(no_cert)
    try:
        with pytest.raises(StoreError) as info:
            store.snapshot()
        assert good.endpoints[0] in str(info.value)
    finally:
        store.close()


def test_cli_reads_tls_settings_from_the_agent_config(tls_etcd, tmp_path):
    d, good = tls_etcd
    config = tmp_path / "agent.yaml"
    config.write_text(yaml.safe_dump({
        "node": "n1", "etcd": {"endpoints": list(good.endpoints), "prefix": good.prefix, "ca_cert": str(d / "ca.crt"),
                               "cert": str(d / "client.crt"), "key": str(d / "client.key")},
        "services": {"web": {"command": "sleep 1"}}}))
    result = CliRunner().invoke(main, ["--config", str(config), "status", "--json"])
    assert result.exit_code == 0, result.output
    missing = tmp_path / "bad.yaml"
    missing.write_text(config.read_text().replace(str(d / "client.key"), str(d / "nope.key")))
    result = CliRunner().invoke(main, ["--config", str(missing), "status"])
    assert result.exit_code == 1 and "nope.key" in result.output and "Traceback" not in result.output


def test_the_fences_handoff_revokes_over_tls_with_the_client_certificate(tls_etcd):
    """gateway.revoke (the fence and stop-post, stdlib only) speaks TLS with the config's CA and cert."""
    from etcdha import gateway

    d, good = tls_etcd
    store = Store(good)
    try:
        lease, _ = store.grant(30)
        ok, what = gateway.revoke(good.endpoints, lease, 2.0, good.ca_cert, good.cert, good.key)
        assert ok and what.startswith(f"revoked lease {lease:x}"), what
        assert store.keepalive(lease) <= 0
        ok, what = gateway.revoke(good.endpoints, lease, 2.0, good.ca_cert, good.cert, good.key)
        assert ok and "already gone" in what
        other, _ = store.grant(30)
        ok, what = gateway.revoke(good.endpoints, other, 2.0, good.ca_cert)  # no client certificate
        assert not ok and good.endpoints[0] in what
        assert store.keepalive(other) > 0
    finally:
        store.close()
