"""The event seam: one Event to every subscriber, a failing subscriber hides nothing; the hook's environment."""
from __future__ import annotations

import pytest

from etcdha import events
from etcdha.model import Event

pytestmark = pytest.mark.unit


def test_every_subscriber_gets_the_same_event_even_after_one_fails():
    got: list[tuple[str, Event]] = []

    def broken(e: Event) -> None:
        raise RuntimeError("bug")

    seam = events.Events("n1", [lambda e: got.append(("first", e)), broken, lambda e: got.append(("last", e))],
                         clock=lambda: 1700000000.5)
    e = seam.emit("web", "claimed", "vacant", 42, "detail")
    assert e == Event(service="web", time=1700000000.5, node="n1", event="claimed", reason="vacant", token=42,
                      detail="detail")
    assert got == [("first", e), ("last", e)]


def test_an_event_can_carry_the_time_it_happened_at():
    """A handoff's "moved" is stamped when the release was sent: the next owner may claim and record
    before the release's answer is back, and history lists events by time."""
    seam = events.Events("n1", [], clock=lambda: 1700000002.0)
    assert seam.emit("web", "moved", "moved", 42, "to n3", at=1700000001.25).time == 1700000001.25
    assert seam.emit("web", "claimed", "vacant").time == 1700000002.0


def test_hook_environment():
    env = events.hook_environment(Event("web", 1700000000.25, "n1", "started", "owner", 42, "x"))
    assert env == {"ETCDHA_EVENT": "started", "ETCDHA_SERVICE": "web", "ETCDHA_NODE": "n1", "ETCDHA_REASON": "owner",
                   "ETCDHA_FENCING_TOKEN": "42", "ETCDHA_TIME": "1700000000.250000",
                   "ETCDHA_TIME_ISO": "2023-11-14T22:13:20Z", "ETCDHA_DETAIL": "x"}
    node = events.hook_environment(Event(events.NODE_EVENTS, 1.0, "n1", "node-unhealthy", "flag"))
    assert node["ETCDHA_SERVICE"] == "" and node["ETCDHA_FENCING_TOKEN"] == ""
