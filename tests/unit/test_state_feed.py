"""StateFeed's bookkeeping: which of events, full reads and notes it believes, fed by hand."""
from __future__ import annotations

import pytest

from etcdha.supervisord import RESYNC, StateFeed

pytestmark = pytest.mark.unit


@pytest.fixture
def feed(tmp_path):
    f = StateFeed(tmp_path / "events.sock", lambda: None)
    yield f
    f.sock.close()


def ev(feed: StateFeed, serial: int, state: str, name: str = "web") -> None:
    feed._apply(f"{serial} {state} {name}".encode())


def test_nothing_is_trusted_before_a_full_read(feed):
    ev(feed, 1, "RUNNING")
    assert feed.current(0.0) is None
    feed.load({"web": "RUNNING"}, feed.events, 0.0)
    assert feed.current(1.0) == {"web": "RUNNING"}
    assert feed.current(RESYNC + 0.5) is None  # the safety net: read everything again


def test_events_that_came_during_a_full_read_are_applied_on_top_of_it(feed):
    feed.load({}, feed.events, 0.0)
    before = feed.events
    ev(feed, 1, "STARTING")
    ev(feed, 2, "STOPPING", "db")
    ev(feed, 3, "STOPPED", "db")
    feed.load({"web": "STOPPED", "db": "RUNNING", "cache": "RUNNING"}, before, 1.0)
    assert feed.current(1.0) == {"web": "STARTING", "db": "STOPPED", "cache": "RUNNING"}


def test_a_full_read_during_which_a_datagram_went_missing_is_not_trusted(feed):
    feed.load({}, feed.events, 0.0)
    ev(feed, 1, "RUNNING")
    before = feed.events
    ev(feed, 3, "STOPPED")  # 2 never came
    feed.load({"web": "STOPPED"}, before, 1.0)
    assert feed.current(1.0) is None
    feed.load({"web": "STOPPED"}, feed.events, 2.0)  # the next read, with no gap during it, is
    assert feed.current(2.0) == {"web": "STOPPED"}


@pytest.mark.parametrize("serials, trusted", [
    ([1, 2, 3], True),
    ([1, 3], False),   # a datagram was dropped
    ([5, 1], False),   # a new supervisord starts its pool serials again
])
def test_a_gap_in_the_pool_serial_asks_for_a_full_read(feed, serials, trusted):
    feed.load({}, feed.events, 0.0)
    for serial in serials:
        ev(feed, serial, "RUNNING")
    assert (feed.current(0.0) is not None) is trusted


@pytest.mark.parametrize("events_before_note, noted, events_after_note, expected", [
    ([], "STARTING", [], "STARTING"),                                   # the start's own event still to come
    ([], "STARTING", ["STARTING", "RUNNING"], "RUNNING"),              # and then it came, and more
    (["STOPPING"], "STOPPED", [], "STOPPED"),                           # a stale STOPPING came before the note
    ([], "STOPPED", ["STOPPING"], "STOPPED"),                           # ...or after it: still ignored
    ([], "STOPPED", ["STOPPING", "STOPPED", "STARTING"], "STARTING"),  # until the awaited one; then events rule
    (["STOPPING", "STOPPED", "STARTING"], "STOPPED", [], "STARTING"),  # newer than the note already: kept
])
def test_a_note_is_believed_until_its_own_event_comes(feed, events_before_note, noted, events_after_note, expected):
    feed.load({"web": "RUNNING"}, feed.events, 0.0)
    serial = 0
    mark = feed.events
    for state in events_before_note:
        serial += 1
        ev(feed, serial, state)
    feed.note("web", noted, mark)
    for state in events_after_note:
        serial += 1
        ev(feed, serial, state)
    assert feed.current(0.0)["web"] == expected


@pytest.mark.parametrize("events_before_read, read, events_after_read, expected", [
    ([], "RUNNING", [], "RUNNING"),                            # news: its event is still in supervisord's queue
    ([], "RUNNING", ["STARTING"], "RUNNING"),                  # the stale STARTING behind it is ignored
    ([], "RUNNING", ["STARTING", "RUNNING", "EXITED"], "EXITED"),  # once its own event came, events rule
    (["RUNNING"], "RUNNING", ["EXITED"], "EXITED"),            # not news: nothing awaited, the exit counts
    (["RUNNING", "EXITED"], "RUNNING", [], "EXITED"),          # an event came during the read: it is newer
])
def test_a_direct_read_is_believed_only_where_it_is_news(feed, events_before_read, read, events_after_read,
                                                         expected):
    feed.load({}, feed.events, 0.0)
    ev(feed, 1, "STARTING")
    serial, mark = 1, feed.events
    for state in events_before_read:
        serial += 1
        ev(feed, serial, state)
    feed.refresh({"web": read}, mark)
    for state in events_after_read:
        serial += 1
        ev(feed, serial, state)
    assert feed.current(0.0)["web"] == expected


def test_due_programs_and_when_the_next_one_is(feed, monkeypatch):
    import etcdha.supervisord as sd
    clock = [100.0]
    monkeypatch.setattr(sd.time, "monotonic", lambda: clock[0])
    feed.load({"web": "RUNNING", "db": "STOPPED"}, feed.events, 100.0)
    assert feed.due(100.0, {}) == [] and feed.next_due(100.0, {}) is None  # nothing pending
    ev(feed, 1, "STARTING", "web")
    ev(feed, 2, "STOPPING", "db")
    startsecs = {"web": 0.4}
    assert feed.due(100.0, startsecs) == [] and feed.next_due(100.0, startsecs) == pytest.approx(0.4)
    assert feed.due(100.5, startsecs) == ["web"] and feed.next_due(100.5, startsecs) == 0.0
    assert sorted(feed.due(101.0, startsecs)) == ["db", "web"]  # STOPPING: a second


def test_the_late_event_of_a_noted_start_does_not_push_its_due_time(feed, monkeypatch):
    """During a takeover the STARTING event comes up to half a second after the start was noted: RUNNING
    is due startsecs after the start, not after the event."""
    import etcdha.supervisord as sd
    clock = [100.0]
    monkeypatch.setattr(sd.time, "monotonic", lambda: clock[0])
    feed.load({"web": "STOPPED"}, feed.events, 100.0)
    feed.note("web", "STARTING", feed.events)
    clock[0] = 100.6
    ev(feed, 1, "STARTING")
    assert feed.next_due(100.6, {"web": 1.0}) == pytest.approx(0.4)
    ev(feed, 2, "RUNNING")
    ev(feed, 3, "EXITED")
    assert feed.current(100.6)["web"] == "EXITED"
