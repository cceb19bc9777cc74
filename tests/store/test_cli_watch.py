"""`etcdha status --watch` redraws when etcd changes (a real etcd, a real CLI process)."""
from __future__ import annotations

import os
import re
import select
import signal
import subprocess
import sys
import time

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
