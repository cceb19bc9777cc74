"""Log formats: journald priority prefixes on every line, JSON lines, and when `auto` picks the journal."""
from __future__ import annotations

import io
import json
import logging
import os

import pytest

from etcdha import fence, logs

pytestmark = pytest.mark.unit


def record(level: int, msg: str, exc: bool = False) -> logging.LogRecord:
    exc_info = None
    if exc:
        try:
            raise ValueError("boom")
        except ValueError:
            import sys
            exc_info = sys.exc_info()
    return logging.LogRecord("etcdha.agent", level, __file__, 1, msg, None, exc_info)


@pytest.mark.parametrize("level, prefix", [(logging.CRITICAL, "<2>"), (logging.ERROR, "<3>"),
                                           (logging.WARNING, "<4>"), (logging.INFO, "<6>"), (logging.DEBUG, "<7>")])
def test_journal_prefix_per_level(level, prefix):
    assert logs.JournalFormatter().format(record(level, "hello")) == f"{prefix}etcdha.agent: hello"


def test_journal_prefixes_every_line_of_a_traceback():
    lines = logs.JournalFormatter().format(record(logging.ERROR, "unexpected", exc=True)).splitlines()
    assert len(lines) > 3 and all(line.startswith("<3>") for line in lines)
    assert lines[-1] == "<3>ValueError: boom"


def test_json_lines():
    doc = json.loads(logs.JsonFormatter().format(record(logging.WARNING, "etcd unreachable")))
    assert doc["level"] == "warning" and doc["priority"] == 4 and doc["logger"] == "etcdha.agent"
    assert doc["message"] == "etcd unreachable" and doc["time"].endswith("Z")
    one = logs.JsonFormatter().format(record(logging.ERROR, "x", exc=True))
    assert "\n" not in one and "ValueError: boom" in json.loads(one)["traceback"]


def test_auto_picks_the_journal_only_when_stderr_is_the_announced_stream(tmp_path):
    with open(tmp_path / "err", "w") as stream, open(tmp_path / "other", "w") as other:
        st = os.fstat(stream.fileno())
        announced = {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}
        assert logs.stderr_is_journal(stream, announced)
        assert not logs.stderr_is_journal(other, announced)  # stderr redirected elsewhere: no prefixes
        assert not logs.stderr_is_journal(stream, {})
        assert not logs.stderr_is_journal(stream, {"JOURNAL_STREAM": "garbage"})
        assert not logs.stderr_is_journal(io.StringIO(), announced)


@pytest.mark.parametrize("message, prio", [("ready 42", 6), ("quit", 6), ("warning: cannot set oom_score_adj", 4),
                                           ("fired lease deadline: killed 3 processes", 4),
                                           ("error cannot kill", 3), ("quit; 2 PROCESSES SURVIVE in /x", 3),
                                           ("stop-post: error x", 3)])
def test_fence_lines_carry_the_same_priorities(message, prio):
    assert fence.log_line(message, "journal", 7, 0.0) == f"<{prio}>etcdha-fence[7]: {message}"
    doc = json.loads(fence.log_line(message, "json", 7, 1700000000.5))
    assert doc["priority"] == prio and doc["message"] == message and doc["time"] == "2023-11-14T22:13:20.500Z"
    assert fence.log_line(message, "text", 7, 0.0) == f"etcdha-fence[7]: {message}"


def test_fence_says_in_text_by_default(capsys):
    """Imported (stop-post, the agent's own use), not run as the fence: its lines are text until told."""
    import importlib

    fresh = importlib.reload(fence)
    fresh.say("fired asked by the agent: killed 3 processes, removed no VIPs in 5ms")
    out, err = capsys.readouterr()
    assert out == "fired asked by the agent: killed 3 processes, removed no VIPs in 5ms\n"
    assert err.startswith("etcdha-fence[") and err.rstrip().endswith("removed no VIPs in 5ms")
