"""decide.plan / track_vacancy / claim_rank: hand-built cluster views in, actions and reasons out."""
from __future__ import annotations


import pytest

from etcdha import decide
from etcdha.decide import Action, Kind, Plan, Reason
from etcdha.lease import LeaseState
from etcdha.model import UNKNOWN_OWNER, ClusterView, Owner

from planning import LEASES, ME, MY_LEASE, facts, kinds, of_kind, view

pytestmark = pytest.mark.unit


# ---- vacant services: who claims, and when -------------------------------------------------

def test_vacant_service_preferred_candidate_claims_at_once():
    v = view(candidates={"web": {"a": 50, "b": 100, "c": 70}})
    p = decide.plan(v, facts(vacant_since={"web": 100.0}))
    assert kinds(p) == [(Kind.CLAIM, "web", Reason.VACANT)]


def test_vacant_without_recorded_vacancy_preferred_claims_at_once():
    v = view(candidates={"web": {"a": 50, "b": 100}})
    p = decide.plan(v, facts())
    assert kinds(p) == [(Kind.CLAIM, "web", Reason.VACANT)]


def test_priority_tie_broken_by_node_name():
    # a and b have the same priority: a sorts first, so a is preferred and b waits one claim_delay
    v = view(candidates={"web": {"a": 100, "b": 100}})
    assert decide.claim_rank(v, "web", "a") == 0
    assert decide.claim_rank(v, "web", "b") == 1
    p = decide.plan(v, facts(vacant_since={"web": 100.0}, claim_delay=0.5))
    assert of_kind(p, Kind.CLAIM) == []
    assert p.wake_in == pytest.approx(0.5)
    p_a = decide.plan(v, facts(me="a", lease=LEASES["a"], vacant_since={"web": 100.0}))
    assert kinds(p_a) == [(Kind.CLAIM, "web", Reason.VACANT)]


def test_lower_ranked_candidate_waits_rank_times_claim_delay_from_vacant_since():
    # b is third (rank 2): due at vacant_since + 2 * 0.5 = 11.0
    v = view(alive=("a", "b", "c"), candidates={"web": {"a": 300, "c": 200, "b": 100}})
    assert decide.claim_rank(v, "web", ME) == 2
    since = {"web": 10.0}

    early = decide.plan(v, facts(now=10.25, vacant_since=since, claim_delay=0.5))
    assert early.actions == ()
    assert early.wake_in == pytest.approx(0.75)

    almost = decide.plan(v, facts(now=10.999, vacant_since=since, claim_delay=0.5))
    assert of_kind(almost, Kind.CLAIM) == []
    assert almost.wake_in == pytest.approx(0.001)

    due = decide.plan(v, facts(now=11.0, vacant_since=since, claim_delay=0.5))
    assert kinds(due) == [(Kind.CLAIM, "web", Reason.VACANT)]
    assert due.wake_in is None

    later = decide.plan(v, facts(now=50.0, vacant_since=since, claim_delay=0.5))
    assert kinds(later) == [(Kind.CLAIM, "web", Reason.VACANT)]


@pytest.mark.parametrize("state", [LeaseState.SUSPENDED, LeaseState.LOST])
def test_no_claim_and_no_enroll_unless_lease_ok(state):
    v = view(candidates={"web": {"b": 100}})
    p = decide.plan(v, facts(lease_state=state, vacant_since={"web": 0.0}))
    assert of_kind(p, Kind.CLAIM) == []
    assert p.actions == ()
    # not enrolled either: an unhealthy node must not register itself
    p2 = decide.plan(view(candidates={}), facts(lease_state=state))
    assert p2.actions == ()


def test_no_view_changes_nothing():
    p = decide.plan(None, facts(programs={"web": "RUNNING"}, vips_up=frozenset({"web"})))
    assert p.actions == ()
    assert p.wake_in == decide.FAST_TICK


def test_not_a_candidate_yet_enrolls_but_does_not_claim():
    v = view(candidates={"web": {"a": 10}})
    p = decide.plan(v, facts(vacant_since={"web": 0.0}))
    assert kinds(p) == [(Kind.ENROLL, "web", Reason.CANDIDATE)]


def test_dead_candidates_are_not_counted_in_rank():
    # a and c rank above b but have no node key (dead): b is the preferred live candidate
    v = view(alive=("b",), candidates={"web": {"a": 300, "c": 200, "b": 100}})
    assert [c.node for c in v.live_candidates("web")] == ["b"]
    assert decide.claim_rank(v, "web", ME) == 0
    p = decide.plan(v, facts(vacant_since={"web": 100.0}))
    assert kinds(p) == [(Kind.CLAIM, "web", Reason.VACANT)]


def test_claim_rank_none_when_not_a_live_candidate():
    v = view(alive=("a",), candidates={"web": {"a": 1, "b": 100}})
    assert decide.claim_rank(v, "web", "b") is None  # candidate key but no node key
    assert decide.claim_rank(v, "db", "a") is None   # no candidates at all
    p = decide.plan(v, facts(vacant_since={"web": 0.0}))
    assert of_kind(p, Kind.CLAIM) == []


# ---- owned by me ---------------------------------------------------------------------------

def test_owner_is_me_and_program_stopped_starts_with_owner_token():
    v = view(candidates={"web": {"b": 100}}, owners={"web": Owner(node=ME, lease=MY_LEASE, token=4711)})
    p = decide.plan(v, facts(programs={"web": "STOPPED"}))
    assert p.actions == (Action(Kind.START, "web", Reason.OWNER, token=4711),)
    assert p.wake_in == decide.FAST_TICK


def test_owner_is_me_and_program_unknown_to_supervisord_starts():
    v = view(candidates={"web": {"b": 100}}, owners={"web": Owner(node=ME, lease=MY_LEASE, token=9)})
    p = decide.plan(v, facts(programs={}))
    assert p.actions == (Action(Kind.START, "web", Reason.OWNER, token=9),)


def test_owner_is_me_but_lease_not_ok_does_not_start():
    v = view(candidates={"web": {"b": 100}}, owners={"web": Owner(node=ME, lease=MY_LEASE, token=9)})
    p = decide.plan(v, facts(lease_state=LeaseState.SUSPENDED, programs={"web": "STOPPED"}))
    assert of_kind(p, Kind.START) == []
    assert of_kind(p, Kind.STOP) == []


def test_owner_is_me_running_keeps_running():
    v = view(candidates={"web": {"b": 100}}, owners={"web": Owner(node=ME, lease=MY_LEASE, token=9)})
    p = decide.plan(v, facts(programs={"web": "RUNNING"}))
    assert p.actions == ()


def test_owner_names_me_on_old_lease_is_not_mine():
    # a previous incarnation of this node owned it; the key hangs on a lease that is not ours
    old = Owner(node=ME, lease=0xDEAD, token=7)
    v = view(candidates={"web": {"b": 100}}, owners={"web": old})
    assert not decide.is_mine(old, facts())
    running = decide.plan(v, facts(programs={"web": "RUNNING"}, vacant_since={"web": 0.0}))
    assert kinds(running) == [(Kind.STOP, "web", Reason.NOT_OWNER)]
    stopped = decide.plan(v, facts(programs={"web": "STOPPED"}, vacant_since={"web": 0.0}))
    assert stopped.actions == ()  # neither START (not mine) nor CLAIM (owned)


def test_owner_on_my_lease_but_other_name_is_not_mine():
    o = Owner(node="a", lease=MY_LEASE, token=7)
    assert not decide.is_mine(o, facts())
    assert not decide.is_mine(None, facts())
    assert decide.is_mine(Owner(node=ME, lease=MY_LEASE, token=1), facts())


def test_fatal_while_mine_releases():
    v = view(candidates={"web": {"b": 100}}, owners={"web": Owner(node=ME, lease=MY_LEASE, token=9)})
    p = decide.plan(v, facts(programs={"web": "FATAL"}))
    assert kinds(p) == [(Kind.RELEASE, "web", Reason.FAILED)]
    # even with a failing lease: give it up rather than sit on a dead service
    p2 = decide.plan(v, facts(programs={"web": "FATAL"}, lease_state=LeaseState.SUSPENDED))
    assert kinds(p2) == [(Kind.RELEASE, "web", Reason.FAILED)]


def test_running_without_vip_on_vip_service_starts_again():
    v = view(candidates={"web": {"b": 100}}, owners={"web": Owner(node=ME, lease=MY_LEASE, token=12)})
    p = decide.plan(v, facts(programs={"web": "RUNNING"}, with_vip=frozenset({"web"}), vips_up=frozenset()))
    assert p.actions == (Action(Kind.START, "web", Reason.OWNER, token=12),)


def test_running_with_vip_up_does_nothing():
    v = view(candidates={"web": {"b": 100}}, owners={"web": Owner(node=ME, lease=MY_LEASE, token=12)})
    p = decide.plan(v, facts(programs={"web": "RUNNING"}, with_vip=frozenset({"web"}),
                             vips_up=frozenset({"web"})))
    assert p.actions == ()


def test_running_service_without_vip_does_nothing():
    v = view(candidates={"web": {"b": 100}}, owners={"web": Owner(node=ME, lease=MY_LEASE, token=12)})
    p = decide.plan(v, facts(programs={"web": "RUNNING"}, with_vip=frozenset(), vips_up=frozenset()))
    assert p.actions == ()


def test_stopping_program_with_vip_missing_is_not_restarted():
    v = view(candidates={"web": {"b": 100}}, owners={"web": Owner(node=ME, lease=MY_LEASE, token=12)})
    p = decide.plan(v, facts(programs={"web": "STOPPING"}, with_vip=frozenset({"web"})))
    assert of_kind(p, Kind.START) == []
    assert p.wake_in == decide.FAST_TICK  # transitional: look again soon


# ---- owned by someone else -----------------------------------------------------------------

@pytest.mark.parametrize("program,vips_up", [
    ("RUNNING", frozenset()),
    ("STARTING", frozenset()),
    ("BACKOFF", frozenset()),
    ("STOPPED", frozenset({"web"})),   # only the VIP is left here
    ("EXITED", frozenset({"web"})),
])
def test_someone_else_owns_and_it_runs_here_stops(program, vips_up):
    v = view(candidates={"web": {"a": 100, "b": 200}}, owners={"web": Owner(node="a", lease=LEASES["a"], token=3)})
    p = decide.plan(v, facts(programs={"web": program}, vips_up=vips_up))
    assert kinds(p) == [(Kind.STOP, "web", Reason.NOT_OWNER)]


def test_someone_else_owns_and_nothing_here_does_nothing():
    v = view(candidates={"web": {"a": 100, "b": 200}}, owners={"web": Owner(node="a", lease=LEASES["a"], token=3)})
    p = decide.plan(v, facts(programs={"web": "STOPPED"}, vacant_since={"web": 0.0}))
    assert p.actions == ()


def test_no_failback_when_higher_priority_node_appears():
    # a (priority 10) owns web; b (priority 1000) comes up: b must not claim or start it
    v = view(candidates={"web": {"a": 10, "b": 1000}}, owners={"web": Owner(node="a", lease=LEASES["a"], token=3)})
    assert decide.claim_rank(v, "web", ME) == 0
    p = decide.plan(v, facts(priorities={"web": 1000}, vacant_since={"web": 0.0}))
    assert p.actions == ()


def test_unknown_owner_blocks_claim():
    v = view(candidates={"web": {"b": 100}}, owners={"web": Owner(node=UNKNOWN_OWNER, lease=0, token=3)})
    p = decide.plan(v, facts(vacant_since={"web": 0.0}))
    assert of_kind(p, Kind.CLAIM) == []


def test_vacant_but_my_program_still_running_stops_first_and_claims_next_cycle():
    # nobody owns web (our old owner key expired) but a copy still runs here: stop it (verified empty),
    # and claim only in the next cycle, never in the same plan as a stop that might not hold
    v = view(candidates={"web": {"b": 100}})
    p = decide.plan(v, facts(programs={"web": "RUNNING"}, vacant_since={"web": 100.0}))
    assert kinds(p) == [(Kind.STOP, "web", Reason.NOT_OWNER)]
    assert p.wake_in == pytest.approx(decide.FAST_TICK)
    after = decide.plan(v, facts(programs={"web": "STOPPED"}, processes={"web": 0}, vacant_since={"web": 100.0}))
    assert kinds(after) == [(Kind.CLAIM, "web", Reason.VACANT)]


# ---- containment: what the service's cgroup says, beyond supervisord ------------------------

MINE = {"web": Owner(node=ME, lease=MY_LEASE, token=7)}


@pytest.mark.parametrize("program, processes, expected", [
    # supervisord has no process but the cgroup does: the program daemonized (or left children behind)
    ("EXITED", 2, [(Kind.RELEASE, "web", Reason.DAEMONIZED)]),
    ("FATAL", 1, [(Kind.RELEASE, "web", Reason.DAEMONIZED)]),
    ("STOPPED", 1, [(Kind.RELEASE, "web", Reason.DAEMONIZED)]),
    # an ordinary exit with an empty cgroup: start it again here; FATAL and empty: give it up
    ("EXITED", 0, [(Kind.START, "web", Reason.OWNER)]),
    ("FATAL", 0, [(Kind.RELEASE, "web", Reason.FAILED)]),
    # supervisord is about to respawn (BACKOFF) or runs it: processes in the cgroup are expected
    ("BACKOFF", 1, []),
    ("RUNNING", 3, []),
    ("STARTING", 1, []),
])
def test_owner_decides_from_program_state_and_cgroup(program, processes, expected):
    v = view(candidates={"web": {"b": 100}}, owners=MINE)
    p = decide.plan(v, facts(programs={"web": program}, processes={"web": processes}, vips_up=frozenset({"web"}),
                             with_vip=frozenset({"web"})))
    assert kinds(p) == expected
    if expected and expected[0][0] is Kind.RELEASE:
        assert p.actions[0].token == 7


@pytest.mark.parametrize("program", ["STOPPED", "EXITED", "FATAL", "RUNNING"])
def test_processes_in_the_cgroup_of_a_service_we_do_not_own_are_stopped_and_block_a_claim(program):
    for owners in ({}, {"web": Owner(node="a", lease=LEASES["a"], token=9)}):
        v = view(candidates={"web": {"b": 100}}, owners=owners)
        p = decide.plan(v, facts(programs={"web": program}, processes={"web": 1}, vacant_since={"web": 0.0}))
        assert kinds(p) == [(Kind.STOP, "web", Reason.NOT_OWNER)], owners


def test_paused_service_with_leftover_processes_is_left_alone():
    v = view(candidates={"web": {"b": 100}}, owners=MINE, paused={"web": None})
    p = decide.plan(v, facts(programs={"web": "EXITED"}, processes={"web": 2}))
    assert of_kind(p, Kind.RELEASE) == [] and of_kind(p, Kind.STOP) == []


# ---- cooldown and enrolment ----------------------------------------------------------------

def test_cooldown_withdraws_when_enrolled_and_does_not_claim():
    v = view(candidates={"web": {"b": 100}}, cooldowns={("web", ME): 130.0})
    p = decide.plan(v, facts(now=100.0, vacant_since={"web": 0.0}))
    assert kinds(p) == [(Kind.WITHDRAW, "web", Reason.COOLDOWN)]
    assert p.wake_in == pytest.approx(30.0)


def test_cooldown_not_enrolled_does_nothing_and_wakes_when_it_ends():
    v = view(candidates={"web": {"a": 100}}, cooldowns={("web", ME): 105.5})
    p = decide.plan(v, facts(now=100.0, vacant_since={"web": 0.0}))
    assert p.actions == ()
    assert p.wake_in == pytest.approx(5.5)


def test_after_cooldown_enrolls_again():
    v = view(candidates={"web": {"a": 100}}, cooldowns={("web", ME): 130.0})
    p = decide.plan(v, facts(now=131.0, vacant_since={"web": 0.0}))
    assert kinds(p) == [(Kind.ENROLL, "web", Reason.CANDIDATE)]


def test_cooldown_ends_exactly_at_its_time():
    v = view(candidates={"web": {"a": 100}}, cooldowns={("web", ME): 130.0})
    p = decide.plan(v, facts(now=130.0))
    assert kinds(p) == [(Kind.ENROLL, "web", Reason.CANDIDATE)]


def test_not_enrolled_and_healthy_enrolls():
    v = view(candidates={})
    p = decide.plan(v, facts())
    assert kinds(p) == [(Kind.ENROLL, "web", Reason.CANDIDATE)]


def test_enrolled_and_healthy_does_not_enroll_again():
    v = view(candidates={"web": {"b": 100}}, owners={"web": Owner(node="a", lease=LEASES["a"], token=1)})
    assert decide.plan(v, facts()).actions == ()


def test_services_are_planned_in_name_order_and_independently():
    v = view(candidates={"web": {"b": 100}, "db": {"a": 100}},
             owners={"db": Owner(node="a", lease=LEASES["a"], token=5)})
    p = decide.plan(v, facts(priorities={"web": 100, "db": 100, "cache": 1},
                             programs={"db": "RUNNING"}, vacant_since={"web": 0.0, "cache": 0.0}))
    assert kinds(p) == [
        (Kind.ENROLL, "cache", Reason.CANDIDATE),
        (Kind.ENROLL, "db", Reason.CANDIDATE),
        (Kind.STOP, "db", Reason.NOT_OWNER),
        (Kind.CLAIM, "web", Reason.VACANT),
    ]


def test_services_not_configured_here_are_ignored():
    v = view(candidates={"other": {"b": 100}})
    p = decide.plan(v, facts(priorities={}, programs={"other": "RUNNING"}))
    assert p.actions == ()


def test_plan_and_action_render():
    a = Action(Kind.START, "web", Reason.OWNER, token=42)
    assert str(a) == "start web (owner token=42)"
    assert str(Action(Kind.CLAIM, "web", Reason.VACANT)) == "claim web (vacant)"
    assert str(Plan()) == "nothing to do"
    assert str(Plan((a, Action(Kind.STOP, "db", Reason.NOT_OWNER)))) == "start web (owner token=42); stop db (not-owner)"


# ---- track_vacancy -------------------------------------------------------------------------

def test_track_vacancy_records_first_seen_and_keeps_it():
    services = {"web": 100, "db": 100}
    v = view(owners={"db": Owner(node="a", lease=LEASES["a"], token=1)})
    first = decide.track_vacancy({}, v, services, now=5.0)
    assert first == {"web": 5.0}
    second = decide.track_vacancy(first, v, services, now=9.0)
    assert second == {"web": 5.0}


def test_track_vacancy_forgets_owned_and_restarts_when_vacant_again():
    services = {"web": 100}
    owned = view(owners={"web": Owner(node="a", lease=LEASES["a"], token=1)})
    assert decide.track_vacancy({"web": 1.0}, owned, services, now=2.0) == {}
    vacant = view()
    assert decide.track_vacancy({}, vacant, services, now=3.0) == {"web": 3.0}


def test_track_vacancy_only_for_our_services():
    v = view()
    assert decide.track_vacancy({"gone": 1.0}, v, {"web": 1}, now=2.0) == {"web": 2.0}


def test_track_vacancy_feeds_plan_rank_delay():
    # end to end of the two pure functions: rank 1 waits one claim_delay after first seen vacant
    v = view(candidates={"web": {"a": 200, "b": 100}})
    since = decide.track_vacancy({}, v, {"web": 100}, now=20.0)
    assert decide.plan(v, facts(now=20.0, vacant_since=since, claim_delay=0.5)).wake_in == pytest.approx(0.5)
    since = decide.track_vacancy(since, v, {"web": 100}, now=20.5)
    assert kinds(decide.plan(v, facts(now=20.5, vacant_since=since, claim_delay=0.5))) == [
        (Kind.CLAIM, "web", Reason.VACANT)]


def test_cold_start_a_lower_candidate_waits_for_a_better_one_that_registered_just_now():
    # b (rank 1) started first and has seen web vacant since 10.0; a (preferred) registered at 11.8
    # and claims from 11.8 + startup_grace 2 = 13.8. b must not take it at 10.5 nor at 13.8, only
    # one claim_delay after a could have claimed.
    v = view(candidates={"web": {"a": 200, "b": 100}})
    seen = decide.track_candidates({("web", "b"): 10.0}, v, now=11.8)
    assert seen == {("web", "a"): 11.8, ("web", "b"): 10.0}
    common = dict(vacant_since={"web": 10.0}, claims_from=12.0, candidate_since=seen, startup_grace=2.0,
                  claim_delay=0.5)
    for now in (12.0, 13.8, 14.29):
        p = decide.plan(v, facts(now=now, **common))
        assert of_kind(p, Kind.CLAIM) == [], now
        assert p.wake_in == pytest.approx(14.3 - now)
    assert kinds(decide.plan(v, facts(now=14.3, **common))) == [(Kind.CLAIM, "web", Reason.VACANT)]


def test_on_a_failover_nobody_waits_for_a_better_candidate_that_just_came_back():
    # web was owned (by a, which crashed); a rejoined at 11.8: b takes over, it does not wait for a's grace
    v = view(candidates={"web": {"a": 200, "b": 100}})
    p = decide.plan(v, facts(now=12.0, vacant_since={"web": 11.0}, claims_from=0.0, startup_grace=2.0,
                             candidate_since={("web", "a"): 11.8, ("web", "b"): 1.0}, claim_delay=0.5,
                             seen_owned=frozenset({"web"})))
    assert kinds(p) == [(Kind.CLAIM, "web", Reason.VACANT)]


def test_a_better_candidate_registered_long_ago_does_not_delay_anyone():
    v = view(candidates={"web": {"a": 200, "b": 100}})
    p = decide.plan(v, facts(now=100.5, vacant_since={"web": 100.0}, candidate_since={("web", "a"): 5.0},
                             startup_grace=2.0, claim_delay=0.5))
    assert kinds(p) == [(Kind.CLAIM, "web", Reason.VACANT)]


def test_track_candidates_forgets_keys_that_are_gone_and_restarts_count_anew():
    v = view(candidates={"web": {"a": 200, "b": 100}})
    seen = decide.track_candidates({("web", "a"): 1.0, ("web", "b"): 1.0, ("db", "c"): 1.0}, v, now=9.0)
    assert seen == {("web", "a"): 1.0, ("web", "b"): 1.0}
    gone = view(alive=("b", "c"), candidates={"web": {"b": 100}})  # a's agent died: its key went with its lease
    back = decide.track_candidates(decide.track_candidates(seen, gone, now=10.0), v, now=12.0)
    assert back[("web", "a")] == 12.0


# ---- move_target: where a planned move goes, or why it is refused ---------------------------

def _move_view(**extra) -> ClusterView:
    return view(candidates={"web": {"a": 100, "b": 90, "c": 80}},
                owners={"web": Owner(node="a", lease=LEASES["a"], token=7)}, **extra)


def test_move_target_defaults_to_the_best_other_candidate():
    assert decide.move_target(_move_view(), "web", None, 0.0) == ("b", None)


def test_move_target_skips_drained_and_cooling_nodes():
    from etcdha.model import Mark
    v = _move_view(drained={"b": Mark()}, cooldowns={("web", "c"): 50.0})
    target, why = decide.move_target(v, "web", None, 10.0)
    assert target is None and "no other live, undrained candidate" in why
    assert decide.move_target(v, "web", None, 60.0) == ("c", None)  # c's cooldown is over


@pytest.mark.parametrize("requested,words", [
    ("a", "already runs on a"),
    ("d", "d is not alive"),
])
def test_move_target_refuses_with_a_reason(requested, words):
    target, why = decide.move_target(_move_view(), "web", requested, 0.0)
    assert target is None and words in why


def test_move_target_refuses_vacant_paused_or_pending():
    from etcdha.model import ALL_SERVICES, Mark, Move
    assert "has no owner" in decide.move_target(view(candidates={"web": {"a": 1}}), "web", None, 0.0)[1]
    assert "is paused" in decide.move_target(_move_view(paused={ALL_SERVICES: Mark()}), "web", None, 0.0)[1]
    pending = _move_view(moves={"web": Move(service="web", to="c", source="a", token=7)})
    assert "already pending" in decide.move_target(pending, "web", "b", 0.0)[1]


def test_vacancy_counts_from_when_the_service_became_claimable():
    from etcdha.model import ALL_SERVICES, Mark, Move
    moving = view(candidates={"web": {"a": 1}}, moves={"web": Move(service="web", to="c", source="a", token=3)})
    assert decide.track_vacancy({"web": 5.0}, moving, {"web": 1}, 50.0) == {}
    paused = view(candidates={"web": {"a": 1}}, paused={ALL_SERVICES: Mark()})
    assert decide.track_vacancy({"web": 5.0}, paused, {"web": 1}, 50.0) == {}
    # the move request expired at 60: ranks count from then, not from when the owner let go
    free = view(candidates={"web": {"a": 1}})
    assert decide.track_vacancy({}, free, {"web": 1}, 60.0) == {"web": 60.0}
