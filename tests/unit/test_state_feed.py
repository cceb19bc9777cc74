"""StateFeed's bookkeeping: which of events, full reads and answers it believes, fed by hand.

The listener hears only the changes the agent did not cause (exits, backoffs, stops) and the
agent's markers; every answer the agent gets (a start, a stop, a read) is followed in the same
round trip by a marker, and a program's events before that marker are older than the answer.
"""
from __future__ import annotations

import pytest

from etcdha.supervisord import RESYNC, StateFeed


pytestmark = pytest.mark.unit


@pytest.fixture
def feed(tmp_path):
    f = StateFeed(tmp_path / "events.sock", lambda: None)
    yield f
    f.sock.close()


class Stream:
    """supervisord's side: pool serials in order, state events and markers."""

    def __init__(self, feed: StateFeed):
        self.feed, self.serial = feed, 0

    def ev(self, state: str, name: str = "web") -> None:
        self.serial += 1
        self.feed._apply(f"{self.serial} {state} {name}".encode())

    def mark(self, number: int) -> None:
        self.serial += 1
        self.feed._apply(f"{self.serial} MARK {number}".encode())

    def skip(self) -> None:
        self.serial += 1  # a datagram that never came


def test_nothing_is_trusted_before_a_full_read(feed):
    s = Stream(feed)
    s.ev("EXITED")
    assert feed.current(0.0) is None
    feed.load({"web": "RUNNING"}, 1, 0.0)
    assert feed.current(1.0) == {"web": "RUNNING"}
    assert feed.current(RESYNC + 0.5) is None  # the safety net: read everything again


def test_a_full_read_takes_events_after_its_marker_and_not_those_before(feed):
    s = Stream(feed)
    s.ev("EXITED", "web")      # before the marker: older than the read
    s.mark(1)
    s.ev("STOPPED", "db")      # after it: newer
    feed.load({"web": "RUNNING", "db": "RUNNING", "cache": "RUNNING"}, 1, 1.0)
    assert feed.current(1.0) == {"web": "RUNNING", "db": "STOPPED", "cache": "RUNNING"}


def test_until_a_full_reads_marker_comes_the_events_before_it_are_ignored(feed):
    s = Stream(feed)
    feed.load({"web": "RUNNING", "db": "RUNNING"}, 1, 0.0)
    s.ev("EXITED", "web")      # queued before the read was answered
    assert feed.current(0.0) == {"web": "RUNNING", "db": "RUNNING"}
    s.mark(1)
    s.ev("EXITED", "db")
    assert feed.current(0.0) == {"web": "RUNNING", "db": "EXITED"}


@pytest.mark.parametrize("before_read, after_read, trusted", [
    (["skip", "mark"], [], True),           # a datagram lost before the marker: the read covers it
    (["mark", "skip", "ev"], [], False),    # lost after it: not trusted
    ([], ["skip", "mark"], False),          # the marker still on its way: any loss means another full read
    ([], ["mark", "skip", "ev"], False),    # (one before it would be covered; telling them apart is not worth it)
])
def test_a_lost_datagram_makes_a_full_read_untrusted_only_after_its_marker(feed, before_read, after_read, trusted):
    s = Stream(feed)
    feed.load({}, 99, 0.0)
    s.mark(99)

    def play(steps: list[str]) -> None:
        for step in steps:
            {"skip": s.skip, "mark": lambda: s.mark(1), "ev": lambda: s.ev("EXITED")}[step]()

    play(before_read)
    feed.load({"web": "RUNNING"}, 1, 1.0)
    play(after_read)
    assert (feed.current(1.0) is not None) is trusted


@pytest.mark.parametrize("serials, trusted", [
    ([1, 2, 3], True),
    ([1, 3], False),   # a datagram was dropped
    ([5, 1], False),   # a new supervisord starts its pool serials again
])
def test_a_gap_in_the_pool_serial_asks_for_a_full_read(feed, serials, trusted):
    feed.load({}, 1, 0.0)
    for serial in serials:
        feed._apply(f"{serial} EXITED web".encode())
    assert (feed.current(0.0) is not None) is trusted


def test_an_event_for_nobody_keeps_the_serials_in_line_and_changes_nothing(feed):
    feed.load({"web": "RUNNING"}, 1, 0.0)
    feed._apply(b"1 MARK 1")
    feed._apply(b"2 OTHER -")
    feed._apply(b"3 EXITED web")
    assert feed.current(0.0) == {"web": "EXITED"}


@pytest.mark.parametrize("marker_first, before_marker, noted, after_marker, expected", [
    (False, [], "STARTING", [], "STARTING"),                # a start: nothing else came
    (False, ["EXITED"], "RUNNING", [], "RUNNING"),          # the last life's exit, queued: ignored
    (False, ["STOPPED"], "RUNNING", ["EXITED"], "EXITED"),  # after the marker the events rule
    (False, ["BACKOFF", "FATAL"], "STOPPED", ["BACKOFF"], "BACKOFF"),
    (True, ["EXITED"], "RUNNING", [], "RUNNING"),           # the marker came before the answer was taken
    (True, [], "RUNNING", ["EXITED"], "EXITED"),            # ... and an exit after it: newer than the answer
])
def test_an_answer_is_believed_over_the_events_before_its_marker(feed, marker_first, before_marker, noted,
                                                                  after_marker, expected):
    s = Stream(feed)
    feed.load({"web": "STOPPED"}, 1, 0.0)
    s.mark(1)
    for state in before_marker:
        s.ev(state)
    if marker_first:
        s.mark(2)
        for state in after_marker:
            s.ev(state)
        feed.note("web", noted, 2)
    else:
        feed.note("web", noted, 2)
        s.mark(2)
        for state in after_marker:
            s.ev(state)
    assert feed.current(0.0)["web"] == expected
    assert not feed._awaiting


def test_markers_release_only_their_own_programs(feed):
    """Two start round trips in flight: each chunk's programs wait for their own marker."""
    s = Stream(feed)
    feed.load({"a": "STOPPED", "b": "STOPPED"}, 1, 0.0)
    s.mark(1)
    feed.note("a", "RUNNING", 2)
    feed.note("b", "RUNNING", 3)
    s.mark(3)                      # the second chunk's marker came first
    s.ev("EXITED", "a")            # stale for a (its marker 2 is still on its way)
    s.ev("EXITED", "b")            # after b's marker: b exited
    assert feed.current(0.0) == {"a": "RUNNING", "b": "EXITED"}
    s.mark(2)
    s.ev("EXITED", "a")
    assert feed.current(0.0) == {"a": "EXITED", "b": "EXITED"}


def test_due_programs_and_when_the_next_one_is(feed, monkeypatch):
    import etcdha.supervisord as sd
    clock = [100.0]
    monkeypatch.setattr(sd.time, "monotonic", lambda: clock[0])
    s = Stream(feed)
    feed.load({"web": "RUNNING", "db": "STOPPED"}, 1, 100.0)
    s.mark(1)
    assert feed.due(100.0, {}) == [] and feed.next_due(100.0, {}) is None  # nothing pending
    feed.note("web", "STARTING", 2)
    s.ev("BACKOFF", "db")
    startsecs = {"web": 0.4}
    assert feed.due(100.0, startsecs) == [] and feed.next_due(100.0, startsecs) == pytest.approx(0.4)
    assert feed.due(100.5, startsecs) == ["web"] and feed.next_due(100.5, startsecs) == 0.0
    assert sorted(feed.due(101.0, startsecs)) == ["db", "web"]  # BACKOFF: a second


def test_a_direct_read_that_is_no_news_keeps_the_due_time(feed, monkeypatch):
    """A STARTING program asked about before supervisord's loop turned is still STARTING: it stays due
    from its start, not from the read."""
    import etcdha.supervisord as sd
    clock = [100.0]
    monkeypatch.setattr(sd.time, "monotonic", lambda: clock[0])
    s = Stream(feed)
    feed.load({"web": "STOPPED"}, 1, 100.0)
    s.mark(1)
    feed.note("web", "STARTING", 2)
    s.mark(2)
    clock[0] = 101.0
    feed.refresh({"web": "STARTING"}, 3)
    assert feed.next_due(101.0, {"web": 1.0}) == 0.0
    feed.refresh({"web": "RUNNING"}, 4)
    assert feed.current(101.0)["web"] == "RUNNING" and feed.next_due(101.0, {"web": 1.0}) is None
