"""Suite-wide: under ETCDHA_STRICT=1 (scripts/test) a skipped test fails the run.

scripts/test installs everything the suite needs, so a skip there means a test
silently did not run. Skips that name an optional backend (testcontainers) are allowed.
"""
from __future__ import annotations

import os

ALLOWED_SKIPS = ("testcontainers", "docker")


def pytest_sessionfinish(session, exitstatus):
    if os.environ.get("ETCDHA_STRICT") != "1":
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    skipped = reporter.stats.get("skipped", []) if reporter else []
    bad = [r for r in skipped if not any(word in str(r.longrepr).lower() for word in ALLOWED_SKIPS)]
    if bad and exitstatus == 0:
        reporter.write_line(f"ETCDHA_STRICT: {len(bad)} test(s) skipped; every test must run here:", red=True)
        for r in bad:
            reporter.write_line(f"  {r.nodeid}: {r.longrepr}", red=True)
        session.exitstatus = 1
