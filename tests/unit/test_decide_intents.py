"""Operator intents in the planner and the model: planned moves, drain and pause marks, cooldowns, history.

decide.plan with hand-built views (moves, drained, paused, cooldowns), model.build_view decoding of
the intent keys (garbage tolerated, history never in a view), and report.history_rows.
"""
from __future__ import annotations


import pytest

from etcdha import decide, model, report
from etcdha.decide import Action, Kind, Reason
from etcdha.lease import LeaseState
from etcdha.model import ALL_SERVICES, KV, Event, Mark, Move, Owner, build_view

from planning import LEASES, ME, MY_LEASE, facts, kinds, of_kind, view

pytestmark = pytest.mark.unit

P = "/etcdha"


def mine(token: int = 7) -> Owner:
    return Owner(node=ME, lease=MY_LEASE, token=token)


def owned_by(node: str, token: int = 7) -> Owner:
    return Owner(node=node, lease=LEASES[node], token=token)


def move(to: str, source: str, token: int = 7, service: str = "web") -> Move:
    return Move(service=service, to=to, source=source, token=token, lease=0x77)


# ---- the owner and a planned move ------------------------------------------------------------

def test_owner_hands_off_to_the_move_target_with_reason_moved():
    v = view(candidates={"web": {"a": 100, "b": 200}}, owners={"web": mine(7)},
             moves={"web": move(to="a", source=ME, token=7)})
    p = decide.plan(v, facts(programs={"web": "RUNNING"}, vips_up=frozenset({"web"})))
    assert p.actions == (Action(Kind.HANDOFF, "web", Reason.MOVED, token=7, target="a"),)
    assert str(p.actions[0]) == "handoff web to a (moved token=7)"


def test_drained_owner_hands_off_with_reason_drained():
    v = view(candidates={"web": {"a": 100, "b": 200}}, owners={"web": mine(7)},
             moves={"web": move(to="a", source=ME, token=7)}, drained={ME: Mark()})
    p = decide.plan(v, facts(programs={"web": "RUNNING"}))
    assert p.actions == (Action(Kind.HANDOFF, "web", Reason.DRAINED, token=7, target="a"),)


def test_handoff_happens_even_if_the_program_is_stopped():
    # the owner key is what moves; a stopped program must not keep the service here
    v = view(candidates={"web": {"a": 100, "b": 200}}, owners={"web": mine(7)},
             moves={"web": move(to="a", source=ME, token=7)})
    p = decide.plan(v, facts(programs={"web": "STOPPED"}))
    assert kinds(p) == [(Kind.HANDOFF, "web", Reason.MOVED)]
    assert of_kind(p, Kind.START) == []


@pytest.mark.parametrize("stale", [
    move(to="a", source=ME, token=6),    # requested against a previous ownership (token differs)
    move(to="a", source="c", token=7),   # names another source
    move(to=ME, source=ME, token=7),     # to ourselves: nothing to hand over
])
def test_owner_ignores_a_move_that_is_not_for_its_current_ownership(stale):
    v = view(candidates={"web": {"a": 100, "b": 200}}, owners={"web": mine(7)}, moves={"web": stale})
    running = decide.plan(v, facts(programs={"web": "RUNNING"}))
    assert running.actions == ()
    assert running.wake_in == decide.PROGRAM_POLL
    stopped = decide.plan(v, facts(programs={"web": "STOPPED"}))
    assert stopped.actions == (Action(Kind.START, "web", Reason.OWNER, token=7),)


def test_fatal_owner_releases_rather_than_hands_off():
    v = view(candidates={"web": {"a": 100, "b": 200}}, owners={"web": mine(7)},
             moves={"web": move(to="a", source=ME, token=7)})
    p = decide.plan(v, facts(programs={"web": "FATAL"}))
    assert kinds(p) == [(Kind.RELEASE, "web", Reason.FAILED)]


# ---- the move target and everybody else ------------------------------------------------------

def test_move_target_claims_at_once_regardless_of_rank_delay_and_startup_grace():
    # b is the lowest-ranked live candidate (rank 2), the vacancy is brand new, the claim delay is
    # long and our startup grace has not ended: as the move's target we claim anyway
    v = view(candidates={"web": {"a": 300, "c": 200, "b": 100}}, moves={"web": move(to=ME, source="a")})
    assert decide.claim_rank(v, "web", ME) == 2
    p = decide.plan(v, facts(now=100.0, vacant_since={"web": 100.0}, claim_delay=5.0, claims_from=500.0))
    assert kinds(p) == [(Kind.CLAIM, "web", Reason.MOVED)]


def test_move_target_not_yet_vacant_waits_for_the_handoff():
    v = view(candidates={"web": {"a": 300, "b": 100}}, owners={"web": owned_by("a")},
             moves={"web": move(to=ME, source="a")})
    assert decide.plan(v, facts(vacant_since={})).actions == ()


def test_move_target_stops_a_stale_local_copy_then_claims():
    v = view(candidates={"web": {"a": 300, "b": 100}}, moves={"web": move(to=ME, source="a")})
    p = decide.plan(v, facts(programs={"web": "RUNNING"}))
    assert kinds(p) == [(Kind.STOP, "web", Reason.NOT_OWNER)]
    p = decide.plan(v, facts(programs={"web": "STOPPED"}))
    assert kinds(p) == [(Kind.CLAIM, "web", Reason.MOVED)]


@pytest.mark.parametrize("state", [LeaseState.SUSPENDED, LeaseState.LOST])
def test_move_target_with_an_unhealthy_lease_does_not_claim(state):
    v = view(candidates={"web": {"a": 300, "b": 100}}, moves={"web": move(to=ME, source="a")})
    assert of_kind(decide.plan(v, facts(lease_state=state)), Kind.CLAIM) == []


def test_other_candidates_wait_while_a_move_is_pending_even_at_rank_0():
    v = view(candidates={"web": {"a": 10, "b": 300, "c": 20}}, moves={"web": move(to="c", source="a")})
    assert decide.claim_rank(v, "web", ME) == 0
    p = decide.plan(v, facts(now=1000.0, vacant_since={"web": 0.0}, claims_from=0.0))
    assert p.actions == ()
    assert of_kind(p, Kind.CLAIM) == []


def test_normal_election_resumes_once_the_move_key_is_gone():
    with_move = view(candidates={"web": {"a": 10, "b": 300, "c": 20}}, moves={"web": move(to="c", source="a")})
    without = view(candidates={"web": {"a": 10, "b": 300, "c": 20}})
    f = facts(now=1000.0, vacant_since={"web": 990.0})
    assert of_kind(decide.plan(with_move, f), Kind.CLAIM) == []
    assert kinds(decide.plan(without, f)) == [(Kind.CLAIM, "web", Reason.VACANT)]
    # and a lower-ranked node goes back to waiting its rank x claim_delay
    lower = view(candidates={"web": {"a": 10, "b": 300, "c": 400}})
    p = decide.plan(lower, facts(now=1000.0, vacant_since={"web": 1000.0}, claim_delay=0.5))
    assert p.actions == () and p.wake_in == pytest.approx(0.5)


# ---- drained nodes ---------------------------------------------------------------------------

def test_drained_node_claims_nothing():
    v = view(candidates={"web": {"b": 300}}, drained={ME: Mark()})
    p = decide.plan(v, facts(now=1000.0, vacant_since={"web": 0.0}))
    assert p.actions == ()
    # not even as the target of a move
    v2 = view(candidates={"web": {"b": 300}}, drained={ME: Mark()}, moves={"web": move(to=ME, source="a")})
    assert of_kind(decide.plan(v2, facts(now=1000.0)), Kind.CLAIM) == []


def test_drained_node_still_stops_a_copy_it_does_not_own():
    v = view(candidates={"web": {"a": 100, "b": 300}}, drained={ME: Mark()})
    p = decide.plan(v, facts(programs={"web": "RUNNING"}, vacant_since={"web": 0.0}))
    assert kinds(p) == [(Kind.STOP, "web", Reason.NOT_OWNER)]


def test_drained_nodes_are_excluded_from_ranks():
    v = view(candidates={"web": {"a": 300, "c": 200, "b": 100}}, drained={"a": Mark(), "c": Mark()})
    assert decide.claim_rank(v, "web", ME) == 0
    assert decide.claim_rank(v, "web", "a") is None
    assert decide.claim_rank(v, "web", "c") is None
    assert [c.node for c in v.eligible("web")] == [ME]
    p = decide.plan(v, facts(vacant_since={"web": 100.0}, claim_delay=5.0))
    assert kinds(p) == [(Kind.CLAIM, "web", Reason.VACANT)]


def test_drained_owner_requests_one_move_to_the_best_live_undrained_other_candidate():
    # web: b owns it; a (priority 300) is drained, d (400) is dead, c (200) is the best home
    v = view(alive=("a", "b", "c"), candidates={"web": {"a": 300, "b": 500, "c": 200, "d": 400}},
             owners={"web": mine(11)}, drained={ME: Mark(), "a": Mark()})
    p = decide.plan(v, facts(programs={"web": "RUNNING"}))
    assert p.actions == (Action(Kind.REQUEST_MOVE, "web", Reason.DRAINED, token=11, target="c"),)


def test_drained_owner_requests_moves_up_to_its_concurrency():
    services = {f"s{i}": 100 for i in range(5)}
    owners = {s: mine(20 + i) for i, s in enumerate(sorted(services))}
    v = view(candidates={s: {"a": 50, "b": 100} for s in services}, owners=owners, drained={ME: Mark()})
    p = decide.plan(v, facts(priorities=services, programs={s: "RUNNING" for s in services}, drain_concurrency=3))
    assert of_kind(p, Kind.REQUEST_MOVE) == [Action(Kind.REQUEST_MOVE, s, Reason.DRAINED, token=20 + i, target="a")
                                             for i, s in enumerate(["s0", "s1", "s2"])]
    assert of_kind(p, Kind.STOP) == [] and of_kind(p, Kind.HANDOFF) == []
    assert p.wake_in == decide.PROGRAM_POLL  # the others keep running (and are polled) meanwhile
    one = decide.plan(v, facts(priorities=services, programs={s: "RUNNING" for s in services}, drain_concurrency=1))
    assert [a.service for a in of_kind(one, Kind.REQUEST_MOVE)] == ["s0"]


def test_drained_owner_counts_its_pending_moves_against_the_concurrency():
    services = {"api": 100, "db": 100, "web": 100}
    v = view(candidates={s: {"a": 50, "b": 100} for s in services},
             owners={"web": mine(30), "db": mine(31)}, drained={ME: Mark()},
             moves={"api": move(to="a", source=ME, token=29, service="api")})  # api's hand-over in flight
    running = {"web": "RUNNING", "db": "RUNNING"}
    p = decide.plan(v, facts(priorities=services, programs=running, drain_concurrency=1))
    assert p.actions == ()
    p = decide.plan(v, facts(priorities=services, programs=running, drain_concurrency=2))
    assert [a.service for a in of_kind(p, Kind.REQUEST_MOVE)] == ["db"]


def test_drained_owner_requests_nothing_while_a_move_of_the_same_service_is_pending():
    # a stale move (old token) of web still exists: wait for it to expire before asking again
    v = view(candidates={"web": {"a": 50, "b": 100}}, owners={"web": mine(30)}, drained={ME: Mark()},
             moves={"web": move(to="a", source="c", token=3)})
    assert of_kind(decide.plan(v, facts(programs={"web": "RUNNING"})), Kind.REQUEST_MOVE) == []


@pytest.mark.parametrize("others", [
    {},                       # nobody else can run it
    {"a": 500},               # the only other candidate is drained too
    {"d": 500},               # the only other candidate is dead
])
def test_drained_owner_keeps_a_service_no_other_node_can_run(others):
    v = view(candidates={"web": {"b": 100, **others}}, owners={"web": mine(9)},
             drained={ME: Mark(), "a": Mark()})
    running = decide.plan(v, facts(programs={"web": "RUNNING"}))
    assert running.actions == ()
    assert running.wake_in == decide.PROGRAM_POLL
    stopped = decide.plan(v, facts(programs={"web": "STOPPED"}))
    assert stopped.actions == (Action(Kind.START, "web", Reason.OWNER, token=9),)


def test_drained_owner_with_unhealthy_lease_requests_no_move():
    v = view(candidates={"web": {"a": 50, "b": 100}}, owners={"web": mine(9)}, drained={ME: Mark()})
    p = decide.plan(v, facts(programs={"web": "RUNNING"}, lease_state=LeaseState.SUSPENDED))
    assert of_kind(p, Kind.REQUEST_MOVE) == []


def test_another_nodes_drain_mark_does_not_hold_us_back():
    v = view(candidates={"web": {"a": 50, "b": 100}}, owners={"web": mine(9)}, drained={"a": Mark()})
    assert decide.plan(v, facts(programs={"web": "RUNNING"})).actions == ()


# ---- paused services -------------------------------------------------------------------------

PAUSE_MARKS = [pytest.param({"web": Mark()}, id="by-name"), pytest.param({ALL_SERVICES: Mark()}, id="all")]


@pytest.mark.parametrize("paused", PAUSE_MARKS)
@pytest.mark.parametrize("owner,program,vips_up", [
    (None, "STOPPED", frozenset()),                 # vacant, we are rank 0: no CLAIM
    (None, "RUNNING", frozenset({"web"})),          # vacant but running here: no STOP
    ("mine", "FATAL", frozenset()),                 # FATAL: no RELEASE
    ("mine", "STOPPED", frozenset()),               # ours but stopped: no START
    ("mine", "RUNNING", frozenset()),               # ours, VIP missing: no START
    ("other", "RUNNING", frozenset({"web"})),       # a copy on a non-owner: no STOP
])
def test_paused_service_is_left_exactly_as_it_is(paused, owner, program, vips_up):
    owners = {"web": mine(5)} if owner == "mine" else {"web": owned_by("a", 5)} if owner == "other" else {}
    v = view(candidates={"web": {"a": 10, "b": 100}}, owners=owners, paused=paused)
    p = decide.plan(v, facts(now=1000.0, vacant_since={"web": 0.0}, programs={"web": program}, vips_up=vips_up,
                             with_vip=frozenset({"web"})))
    assert p.actions == ()


@pytest.mark.parametrize("paused", PAUSE_MARKS)
def test_paused_service_gets_no_handoff_request_or_move_claim(paused):
    handoff = view(candidates={"web": {"a": 10, "b": 100}}, owners={"web": mine(5)}, paused=paused,
                   moves={"web": move(to="a", source=ME, token=5)})
    assert decide.plan(handoff, facts(programs={"web": "RUNNING"})).actions == ()
    drained = view(candidates={"web": {"a": 10, "b": 100}}, owners={"web": mine(5)}, paused=paused,
                   drained={ME: Mark()})
    assert decide.plan(drained, facts(programs={"web": "RUNNING"})).actions == ()
    target = view(candidates={"web": {"a": 10, "b": 100}}, paused=paused, moves={"web": move(to=ME, source="a")})
    assert decide.plan(target, facts(programs={"web": "STOPPED"})).actions == ()


@pytest.mark.parametrize("paused", PAUSE_MARKS)
def test_paused_service_still_enrolls_and_withdraws(paused):
    not_enrolled = view(candidates={"web": {"a": 10}}, paused=paused)
    assert kinds(decide.plan(not_enrolled, facts(vacant_since={"web": 0.0}))) == [
        (Kind.ENROLL, "web", Reason.CANDIDATE)]
    cooling = view(candidates={"web": {"a": 10, "b": 100}}, paused=paused, cooldowns={("web", ME): 500.0})
    assert kinds(decide.plan(cooling, facts(now=100.0))) == [(Kind.WITHDRAW, "web", Reason.COOLDOWN)]


def test_pause_of_one_service_leaves_the_others_alone():
    v = view(candidates={"web": {"b": 100}, "db": {"b": 100}}, paused={"web": Mark()})
    p = decide.plan(v, facts(priorities={"web": 100, "db": 100}, vacant_since={"web": 0.0, "db": 0.0}))
    assert kinds(p) == [(Kind.CLAIM, "db", Reason.VACANT)]
    assert v.is_paused("web") and not v.is_paused("db")
    assert view(paused={ALL_SERVICES: Mark()}).is_paused("anything")


# ---- cooldowns from the view, against the wall clock ------------------------------------------

def test_cooldown_is_read_against_wall_now_not_the_monotonic_now():
    v = view(candidates={"web": {"b": 100}}, cooldowns={("web", ME): 1500.0})
    # monotonic now is small, the wall clock is before `until`: cooling (withdraw, wake when it ends)
    cooling = decide.plan(v, facts(now=5.0, wall_now=1200.0, vacant_since={"web": 0.0}))
    assert kinds(cooling) == [(Kind.WITHDRAW, "web", Reason.COOLDOWN)]
    assert cooling.wake_in == pytest.approx(300.0)
    # monotonic now is past `until` but the wall clock is not: still cooling
    assert kinds(decide.plan(v, facts(now=9999.0, wall_now=1499.0, vacant_since={"web": 0.0}))) == [
        (Kind.WITHDRAW, "web", Reason.COOLDOWN)]
    # the wall clock passed `until`: back to normal (claims; the monotonic clock is irrelevant)
    done = decide.plan(v, facts(now=5.0, wall_now=1501.0, vacant_since={"web": 0.0}))
    assert kinds(done) == [(Kind.CLAIM, "web", Reason.VACANT)]


def test_cooling_node_does_not_claim_even_as_move_target():
    v = view(candidates={"web": {"a": 10}}, cooldowns={("web", ME): 1500.0}, moves={"web": move(to=ME, source="a")})
    assert of_kind(decide.plan(v, facts(wall_now=1000.0)), Kind.CLAIM) == []


def test_another_nodes_cooldown_does_not_affect_us():
    v = view(candidates={"web": {"a": 300, "b": 100}}, cooldowns={("web", "a"): float("inf"), ("db", ME): 1e12})
    p = decide.plan(v, facts(vacant_since={"web": 100.0}, claim_delay=0.5))
    assert p.actions == () and p.wake_in == pytest.approx(0.5)  # a still ranks first; we wait our turn


def test_infinite_cooldown_from_a_garbage_key_never_ends():
    v = view(candidates={"web": {"b": 100}}, cooldowns={("web", ME): float("inf")})
    for wall in (1e10, 2.0 ** 52):
        p = decide.plan(v, facts(wall_now=wall, vacant_since={"web": 0.0}))
        assert kinds(p) == [(Kind.WITHDRAW, "web", Reason.COOLDOWN)]


# ---- wake-ups while we run a program ---------------------------------------------------------

def test_program_poll_wake_while_a_program_we_own_is_running():
    v = view(candidates={"web": {"b": 100}}, owners={"web": mine(3)})
    p = decide.plan(v, facts(programs={"web": "RUNNING"}))
    assert p.actions == ()
    assert p.wake_in == decide.PROGRAM_POLL


def test_no_program_poll_when_we_own_nothing_running():
    v = view(candidates={"web": {"a": 200, "b": 100}}, owners={"web": owned_by("a")})
    assert decide.plan(v, facts(programs={"web": "STOPPED"})).wake_in is None


def test_transitional_state_wakes_sooner_than_program_poll():
    v = view(candidates={"web": {"b": 100}, "db": {"b": 100}}, owners={"web": mine(3), "db": mine(4)})
    p = decide.plan(v, facts(priorities={"web": 100, "db": 100}, programs={"web": "RUNNING", "db": "BACKOFF"}))
    assert p.wake_in == decide.FAST_TICK < decide.PROGRAM_POLL


# ---- model.build_view: intent keys ---------------------------------------------------------------

def kv(key: str, value, lease: int = 0, create: int = 1, mod: int = 0) -> KV:
    raw = value if isinstance(value, bytes) else model.encode(value)
    return KV(key=P + key, value=raw, create_revision=create, mod_revision=mod or create, lease=lease)


def test_intent_key_schema():
    assert model.move_key(P, "web") == "/etcdha/moves/web"
    assert model.drain_key(P, "n1") == "/etcdha/drain/n1"
    assert model.pause_key(P, "web") == "/etcdha/pause/web"
    assert model.pause_key(P) == "/etcdha/pause/*" and ALL_SERVICES == "*"
    assert model.cooldown_key(P, "web", "n1") == "/etcdha/cooldowns/web/n1"
    assert model.history_prefix(P) == "/etcdha/history/"
    assert model.history_prefix(P, "web") == "/etcdha/history/web/"


def test_move_decodes_with_its_lease():
    v = build_view(P, 5, [kv("/moves/web", model.encode_move("b", "a", 41, 1700000000.25), lease=0x5E)])
    assert v.moves == {"web": Move(service="web", to="b", source="a", token=41, lease=0x5E,
                                   requested=1700000000.25)}
    assert v.problems == ()


@pytest.mark.parametrize("raw", [
    b"not json",
    b"\xff",
    b"[1]",
    b"{}",
    b'{"to": "b", "from": "a"}',                         # no token
    b'{"to": "b", "from": "a", "token": "41"}',          # token not an integer
    b'{"to": "b", "from": "a", "token": 4.5}',
    b'{"to": "", "from": "a", "token": 41}',             # empty node name
    b'{"to": "x/y", "from": "a", "token": 41}',          # not a node name
    b'{"to": "b", "from": 7, "token": 41}',
    b'{"from": "a", "token": 41}',
])
def test_garbage_move_is_a_problem_and_ignored(raw):
    v = build_view(P, 5, [kv("/moves/web", raw, lease=0x5E)])
    assert v.moves == {}
    assert v.problems and all(p.startswith("/etcdha/moves/web: ") for p in v.problems)


def test_garbage_move_is_ignored_by_the_planner():
    kvs = [kv("/moves/web", b'{"to": "b"}', lease=0x5E),
           kv("/nodes/a", model.encode_node("a", 0xA1, 1, 0, {}), lease=0xA1),
           kv("/nodes/b", model.encode_node("b", MY_LEASE, 1, 0, {}), lease=MY_LEASE),
           kv("/candidates/web/a", model.encode_candidate(100), lease=0xA1),
           kv("/candidates/web/b", model.encode_candidate(50), lease=MY_LEASE)]
    v = build_view(P, 5, kvs)
    p = decide.plan(v, facts(vacant_since={"web": 100.0}, claim_delay=0.5))
    assert p.actions == () and p.wake_in == pytest.approx(0.5)  # normal election: a first, we wait


def test_drain_and_pause_marks_decode():
    kvs = [kv("/drain/n1", model.encode_mark(1700000000.5, "root@host"), create=3),
           kv("/pause/web", model.encode_mark(1700000001.0, "ops@box"), create=4),
           kv("/pause/*", model.encode_mark(1700000002.0, "ops@box"), create=5)]
    v = build_view(P, 9, kvs)
    assert v.drained == {"n1": Mark(since=1700000000.5, by="root@host")}
    assert v.paused == {"web": Mark(since=1700000001.0, by="ops@box"), ALL_SERVICES: Mark(since=1700000002.0,
                                                                                          by="ops@box")}
    assert v.is_paused("db")  # through the "*" mark
    assert v.problems == ()


@pytest.mark.parametrize("raw", [b"", b"garbage", b"\xff\xfe", b"[]", b"null", b'{"since": "yesterday"}',
                                 b'{"since": -1, "by": 5}'])
@pytest.mark.parametrize("kind", ["drain", "pause"])
def test_garbage_drain_or_pause_mark_still_counts(kind, raw):
    v = build_view(P, 9, [kv(f"/{kind}/n1", raw)])
    marks = v.drained if kind == "drain" else v.paused
    assert set(marks) == {"n1"}
    assert marks["n1"].since == 0.0
    other = v.paused if kind == "drain" else v.drained
    assert other == {}
    for p in v.problems:
        assert p.startswith(f"/etcdha/{kind}/n1: ")


def test_garbage_pause_all_mark_still_pauses_everything():
    v = build_view(P, 9, [kv("/pause/*", b"x")])
    assert v.is_paused("web") and v.is_paused("db")
    assert len(v.problems) == 1


def test_cooldowns_decode_to_until():
    kvs = [kv("/cooldowns/web/a", model.encode_cooldown(1700000030.5, "FATAL"), lease=0xA1),
           kv("/cooldowns/db/b", model.encode_cooldown(1700000099.0, "x"), lease=0xB1)]
    v = build_view(P, 9, kvs)
    assert v.cooldowns == {("web", "a"): 1700000030.5, ("db", "b"): 1700000099.0}
    assert v.problems == ()


@pytest.mark.parametrize("raw", [b"garbage", b"\xff", b"[1]", b"{}", b'{"until": "soon"}', b'{"until": -5}',
                                 b'{"until": true}', b'{"until": 1e300}', b'{"until": 0}'])
def test_garbage_cooldown_is_infinite(raw):
    v = build_view(P, 9, [kv("/cooldowns/web/a", raw, lease=0xA1)])
    assert v.cooldowns == {("web", "a"): float("inf")}


@pytest.mark.parametrize("key", ["/moves/web/extra", "/moves", "/drain/n1/x", "/pause", "/cooldowns/web",
                                 "/cooldowns/web/a/b"])
def test_intent_keys_with_wrong_depth_are_ignored(key):
    v = build_view(P, 9, [kv(key, model.encode_mark(1, "x"))])
    assert (v.moves, v.drained, v.paused, v.cooldowns, v.problems) == ({}, {}, {}, {}, ())


def test_history_keys_never_appear_in_a_view():
    base = [
        kv("/nodes/a", model.encode_node("a", 0xA1, 1, 0, {"web": "RUNNING"}), lease=0xA1),
        kv("/candidates/web/a", model.encode_candidate(100), lease=0xA1),
        kv("/owners/web", model.encode_owner("a", 0xA1, 1.0), lease=0xA1, create=40),
        kv("/services/web", model.encode_service(None)),
    ]
    ev = Event(service="web", time=1700000000.0, node="a", event="claimed", reason="vacant", token=40)
    history = [
        kv("/history/web/01700000000000000-a", model.encode_event(ev)),
        kv("/history/db/01700000000000001-a", model.encode_event(ev)),   # a service known only from history
        kv("/history/nodes/x", model.encode_node("x", 1, 1, 0, {})),      # looks like other kinds below history/
        kv("/history/owners/web", model.encode_owner("z", 1, 0)),
        kv("/history/web/garbage", b"\xffnot json"),                       # garbage history: not even a problem
        kv("/history", b"{}"),
    ]
    plain = build_view(P, 50, base)
    with_history = build_view(P, 50, base[:2] + history + base[2:])
    assert with_history == plain
    assert set(with_history.services) == {"web"} and with_history.problems == ()


# ---- history: decoding and the table ---------------------------------------------------------

def test_decode_events_in_key_order_with_problems_for_garbage():
    e1 = Event(service="web", time=1700000000.5, node="a", event="claimed", reason="vacant", token=3)
    e2 = Event(service="web", time=1700000001.0, node="b", event="moved", reason="moved", token=9, detail="to c")
    kvs = [kv("/history/web/01700000000500000-a", model.encode_event(e1)),
           kv("/history/web/01700000001000000-b", model.encode_event(e2)),
           kv("/history/web/01700000002000000-c", b"nope")]
    events, problems = model.decode_events(P, kvs)
    assert events == [e1, e2]
    assert len(problems) == 1 and problems[0].startswith("/etcdha/history/web/01700000002000000-c: ")


T0 = 1700000000.0  # 2023-11-14 22:13:20 UTC


def test_history_rows_formatting():
    events = [
        Event(service="web", time=T0 + 0.123, node="a", event="claimed", reason="vacant", token=41),
        Event(service="web", time=T0 + 65.5, node="node-b", event="moved", reason="drained", token=0,
              detail="to c"),
    ]
    expected = "\n".join([
        "TIME                     SERVICE  EVENT    NODE    REASON   TOKEN  DETAIL",
        "2023-11-14 22:13:20.123  web      claimed  a       vacant   41     -",
        "2023-11-14 22:14:25.500  web      moved    node-b  drained  -      to c",
    ])
    assert report.history_rows(events) == expected


def test_history_rows_empty_is_the_header_only():
    assert report.history_rows([]) == "TIME  SERVICE  EVENT  NODE  REASON  TOKEN  DETAIL"


@pytest.mark.parametrize("frac,shown", [(0.0, ".000"), (0.001, ".001"), (0.999, ".999"), (0.5, ".500")])
def test_history_rows_milliseconds(frac, shown):
    row = report.history_rows([Event("web", T0 + frac, "a", "claimed", "vacant")]).splitlines()[1]
    assert row.startswith("2023-11-14 22:13:20" + shown + " ")


def test_history_rows_survive_garbage_times():
    # decode_events turns garbage into 0 (or anything below 2**53): the table must still render
    for t in (0.0, 2.0 ** 52):
        out = report.history_rows([Event("web", t, "?", "?", "")])
        assert len(out.splitlines()) == 2
