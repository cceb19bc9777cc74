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


def _separate_stderr_on_old_click() -> None:
    """click < 8.2 (tests/floors.txt pins 8.0) either mixes stderr into a CliRunner's stdout or leaves it out of
    `output`; the suite reads them as click >= 8.2 gives them: `stdout` and `stderr` apart, `output` both."""
    import inspect

    from click import testing

    if "mix_stderr" not in inspect.signature(testing.CliRunner.__init__).parameters:
        return
    original = testing.CliRunner.__init__

    def init(self, *args, mix_stderr: bool = False, **kwargs) -> None:
        original(self, *args, mix_stderr=mix_stderr, **kwargs)

    testing.CliRunner.__init__ = init
    testing.Result.output = property(lambda self: self.stdout + (self.stderr if self.stderr_bytes else ""))


_separate_stderr_on_old_click()
