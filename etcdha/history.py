"""Ownership history, written in the background: best effort, in order, never in a decision's way.

A takeover of many services records a "claimed" entry for each; written inline,
each costs two or three etcd round trips (put, list, prune) before the next claim.
The agent hands entries to this writer instead; it writes them in order on its own
thread, and `close` flushes what is left (bounded) when the agent stops.
"""
from __future__ import annotations

import logging
import queue
import threading
from typing import Optional

from etcdha import model
from etcdha.errors import StoreError
from etcdha.store import Store

log = logging.getLogger(__name__)

BATCH = 64  # entries per write


class HistoryWriter:
    def __init__(self, store: Store, keep: int, capacity: int = 10000):
        self.store = store
        self.keep = keep
        self._queue: "queue.Queue[Optional[model.Event]]" = queue.Queue(capacity)
        self._thread = threading.Thread(target=self._run, name="etcdha-history", daemon=True)
        self._thread.start()

    def record(self, event: model.Event) -> None:
        """Queue an entry; if the writer is hopelessly behind (etcd down for long), drop it and say so."""
        try:
            self._queue.put_nowait(event)
        except queue.Full:
            log.warning("history writer is behind; not recording %s %s", event.event, event.service)

    def _run(self) -> None:
        """Write what has queued up, up to BATCH entries at a time: a takeover of hundreds of services
        records two entries each, and one at a time they cost etcd two requests each."""
        while True:
            batch = [self._queue.get()]
            while batch[-1] is not None and len(batch) < BATCH:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            events = [e for e in batch if e is not None]
            if events:
                try:
                    self.store.record_many(events, keep=self.keep)
                except StoreError as exc:
                    log.warning("could not record %d history entries (%s %s first): %s", len(events),
                                events[0].event, events[0].service, exc)
                except Exception:  # noqa: BLE001 - history must never take the agent down
                    log.exception("history: unexpected error")
            if batch[-1] is None:
                return

    def close(self, timeout: float = 5.0) -> None:
        """Write what is queued (for at most `timeout` seconds), then stop."""
        try:
            self._queue.put(None, timeout=timeout)
        except queue.Full:
            return
        self._thread.join(timeout)
