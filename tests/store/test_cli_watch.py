"""`etcdha status --watch` redraws when etcd changes (a real etcd, a real CLI process)."""
from __future__ import annotations

import os
import re
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from etcdha import model

pytestmark = pytest.mark.store


def test_status_watch_redraws_on_change(etcd_server, store):
    lease, _ = store.grant(30)
    store.register("w1", lease, model.encode_node("w1", lease, 1, time.time(), {}),
                   {"web": model.encode_candidate(100)}, {"web": model.encode_service(None)})
    proc = subprocess.Popen([sys.executable, "-m", "etcdha", "--endpoints", etcd_server.endpoint,
                             "--prefix", store.prefix, "status", "--watch"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, "TERM": "dumb"})
    seen = b""

    def read_until(pattern: bytes, timeout: float) -> bool:
        nonlocal seen
        deadline = time.monotonic() + timeout
        while not re.search(pattern, seen) and time.monotonic() < deadline:
            if select.select([proc.stdout], [], [], 0.2)[0]:
                chunk = os.read(proc.stdout.fileno(), 65536)
                if not chunk:
                    break
                seen += chunk
        return bool(re.search(pattern, seen))

    try:
        assert read_until(b"w1", 10), seen
        seen = b""
        store.claim("web", "w1", lease, time.time())
        # the redraw comes from the watch, well before the 5 s periodic refresh
        started = time.monotonic()
        assert read_until(rb"\nweb +w1 ", 4), seen  # the service row now names its owner
        assert time.monotonic() - started < 4
        proc.send_signal(signal.SIGINT)
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        store.revoke(lease)


def test_shell_completion_offers_service_and_node_names_from_etcd(etcd_server, store):
    lease, _ = store.grant(30)
    store.register("node-a", lease, model.encode_node("node-a", lease, 1, time.time(), {}),
                   {"web": model.encode_candidate(100), "worker": model.encode_candidate(100)},
                   {"web": model.encode_service(None), "worker": model.encode_service(None)})

    def complete(words: str) -> list[str]:
        line = f"etcdha --endpoints {etcd_server.endpoint} --prefix {store.prefix} {words}"
        env = {**os.environ, "COMP_WORDS": line, "COMP_CWORD": str(len(line.split()) - (0 if line.endswith(" ")
                                                                                           else 1)),
               "_ETCDHA_COMPLETE": "bash_complete"}
        script = str(Path(sys.executable).with_name("etcdha"))  # the console script, as a shell runs it
        out = subprocess.run([script], env=env, capture_output=True, text=True, timeout=30)
        return [item.split(",", 1)[1] for item in out.stdout.split() if item.startswith("plain,")]

    try:
        assert complete("move w") == ["web", "worker"]
        assert complete("move web --to n") == ["node-a"]
        assert complete("drain ") == ["node-a"]
    finally:
        store.revoke(lease)
