"""Log lines for people and for journald: plain text, journald priority prefixes, or JSON lines.

Under systemd, stderr goes to the journal, which reads a `<N>` prefix on each line as
that line's priority (sd-daemon(3)): without it every line, fence firings included, is
`info`, and `journalctl -p warning` shows nothing. systemd tells a service its stderr is
the journal with JOURNAL_STREAM=DEV:INODE, which `auto` compares with stderr itself (a
child whose stderr was redirected elsewhere must not prefix).
"""
from __future__ import annotations

import json
import logging
import os
import sys
import time
from typing import Optional, TextIO

FORMATS = ("auto", "text", "journal", "json")
TEXT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def syslog_priority(levelno: int) -> int:
    """Python level -> syslog priority: CRITICAL 2, ERROR 3, WARNING 4, INFO 6, DEBUG 7."""
    if levelno >= logging.CRITICAL:
        return 2
    if levelno >= logging.ERROR:
        return 3
    if levelno >= logging.WARNING:
        return 4
    if levelno >= logging.INFO:
        return 6
    return 7


def stderr_is_journal(stream: TextIO = sys.stderr, environ: Optional[dict] = None) -> bool:
    """True if `stream` is the journal stream systemd announced in JOURNAL_STREAM."""
    value = (os.environ if environ is None else environ).get("JOURNAL_STREAM", "")
    try:
        dev, ino = (int(x) for x in value.split(":"))
        st = os.fstat(stream.fileno())
    except (ValueError, OSError, AttributeError):
        return False
    return (st.st_dev, st.st_ino) == (dev, ino)


class JournalFormatter(logging.Formatter):
    """`<N>` before every line of a record (a traceback's lines too): journald adds the time itself."""

    def __init__(self) -> None:
        super().__init__("%(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        prefix = f"<{syslog_priority(record.levelno)}>"
        return "\n".join(prefix + line for line in super().format(record).splitlines() or [""])


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, priority, logger, message (and the traceback, if any)."""

    def format(self, record: logging.LogRecord) -> str:
        doc = {"time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
               + f".{int(record.msecs):03d}Z",
               "level": record.levelname.lower(), "priority": syslog_priority(record.levelno),
               "logger": record.name, "message": record.getMessage()}
        if record.exc_info:
            doc["traceback"] = self.formatException(record.exc_info)
        return json.dumps(doc, ensure_ascii=False)


def setup(fmt: str, level: int, stream: TextIO = sys.stderr) -> str:
    """Configure the root logger; returns the format chosen (`auto` resolved)."""
    if fmt == "auto":
        fmt = "journal" if stderr_is_journal(stream) else "text"
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JournalFormatter() if fmt == "journal" else JsonFormatter() if fmt == "json"
                         else logging.Formatter(TEXT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    global _chosen
    _chosen = fmt
    return fmt


_chosen = "text"


def chosen() -> str:
    """The format `setup` chose: the fence (a child process) writes its own lines the same way."""
    return _chosen
