"""Health checks as facts and the restart-then-migrate policy: CheckState counters, fail counts, decide tables."""
from __future__ import annotations

import pytest

from etcdha import decide
from etcdha.config import Check
from etcdha.decide import Kind, Reason
from etcdha.health import CheckState, Health, Outcome
from etcdha.lease import LeaseState
from etcdha.model import KV, Failures, Owner, build_view, decode_failures, encode_failures, failures_key

from planning import ME, MY_LEASE, facts, kinds, view

pytestmark = pytest.mark.unit

OK, BAD = Outcome(True, "fine"), Outcome(False, "HTTP 500")


# ---- CheckState: thresholds in a row -------------------------------------------------------------

def run(state: CheckState, outcomes: list[Outcome]) -> list:
    return [state.record(o) for o in outcomes]


def test_failing_after_failure_threshold_in_a_row_only():
    s = CheckState(Check("http", "http", failure_threshold=3))
    assert run(s, [BAD, BAD, OK, BAD, BAD]) == [None, None, Health.PASSING, None, None]
    assert s.health is Health.PASSING and s.failures == 2
    assert s.record(BAD) is Health.FAILING
    assert s.record(BAD) is None  # already failing: one transition
    assert s.output == "HTTP 500"


def test_healthy_again_after_success_threshold_in_a_row():
    s = CheckState(Check("tcp", "tcp", failure_threshold=1, success_threshold=2))
    assert run(s, [BAD, OK, BAD, OK, OK, OK]) == [Health.FAILING, None, None, None, Health.PASSING, None]


def test_pending_until_the_first_verdict():
    s = CheckState(Check("exec", "exec", failure_threshold=2, success_threshold=2))
    assert s.record(OK) is None and s.health is Health.PENDING
    assert s.record(BAD) is None and s.health is Health.PENDING  # one failure: not yet failing


# ---- Failures: counts that expire -----------------------------------------------------------------

def test_failures_count_only_within_their_timeout():
    f = Failures(times=(100.0, 500.0, 900.0), timeout=600)
    assert f.count(1000.0) == 2  # 100 expired at 700
    assert f.count(1101.0) == 1
    assert f.count(1600.0) == 0


def test_adding_a_failure_drops_expired_ones_and_stays_bounded():
    f = Failures(times=(100.0, 500.0), timeout=600).add(1000.0, 600, "http", "HTTP 500")
    assert f.times == (500.0, 1000.0) and f.check == "http" and f.output == "HTTP 500"
    many = Failures()
    for t in range(300):
        many = many.add(float(t), 10_000, "c", "")
    assert len(many.times) == 100 and many.times[-1] == 299.0


@pytest.mark.parametrize("value", [b"garbage", b"[]", b'{"times": "x"}', b'{"times": [1, "a"]}',
                                   b'{"times": [true]}'])
def test_garbage_failure_records_count_as_none_and_are_reported(value):
    v = build_view("/p", 5, [KV(failures_key("/p", "web", "b"), value, 1, 1, 0)])
    assert v.failures == {} and len(v.problems) == 1 and "/p/failures/web/b" in v.problems[0]


def test_failure_record_round_trips_and_clips_output():
    f = Failures(times=(1.5, 2.5), timeout=60, check="http", output="x" * 1000)
    back = decode_failures(KV("/p/failures/web/b", encode_failures(f), 1, 1, 0), [])
    assert back is not None and back.times == (1.5, 2.5) and back.timeout == 60 and len(back.output) == 300


# ---- decide: restart in place, then migrate --------------------------------------------------------

def mine(**extra):
    return view(candidates={"web": {"a": 50, "b": 100}},
                owners={"web": Owner(node=ME, lease=MY_LEASE, token=42)}, **extra)


def failed_here(*times: float, timeout: float = 600) -> dict:
    return {("web", ME): Failures(times=times, timeout=timeout)}


@pytest.mark.parametrize("recent, max_restarts, expected", [
    ((), 3, Kind.RESTART),                        # first failure: restart in place
    ((90.0, 95.0), 3, Kind.RESTART),              # third failure, 3 allowed
    ((80.0, 90.0, 95.0), 3, Kind.RELEASE),        # fourth: migrate
    ((), 0, Kind.RELEASE),                        # max_restarts 0: migrate at once
    ((-900.0, -800.0, -700.0), 3, Kind.RESTART),  # old failures expired (failure_timeout 600)
])
def test_unhealthy_service_restarts_until_max_restarts_then_migrates(recent, max_restarts, expected):
    p = decide.plan(mine(failures=failed_here(*recent)),
                    facts(programs={"web": "RUNNING"}, unhealthy=frozenset({"web"}), max_restarts={"web": max_restarts}))
    assert kinds(p) == [(expected, "web", Reason.UNHEALTHY)]
    assert p.actions[0].token == 42


def test_failures_of_another_node_do_not_count_here():
    v = mine(failures={("web", "a"): Failures(times=(90.0, 95.0, 99.0))})
    p = decide.plan(v, facts(programs={"web": "RUNNING"}, unhealthy=frozenset({"web"}), max_restarts={"web": 1}))
    assert kinds(p) == [(Kind.RESTART, "web", Reason.UNHEALTHY)]


@pytest.mark.parametrize("why", ["paused", "lease", "not running", "not mine"])
def test_no_health_action_when_paused_suspended_stopped_or_not_ours(why):
    v = mine(paused={"web": object()}) if why == "paused" else mine()
    if why == "not mine":
        v = view(candidates={"web": {"a": 50, "b": 100}}, owners={"web": Owner(node="a", lease=0xA1, token=7)})
    f = facts(programs={"web": "STOPPED" if why == "not running" else "RUNNING"}, unhealthy=frozenset({"web"}),
              max_restarts={"web": 3}, lease_state=LeaseState.SUSPENDED if why == "lease" else LeaseState.OK)
    p = decide.plan(v, f)
    assert not any(a.reason is Reason.UNHEALTHY for a in p.actions), p


def test_a_pending_move_wins_over_a_restart():
    from etcdha.model import Move
    v = mine(moves={"web": Move(service="web", to="a", source=ME, token=42)})
    p = decide.plan(v, facts(programs={"web": "RUNNING"}, unhealthy=frozenset({"web"}), max_restarts={"web": 3}))
    assert kinds(p) == [(Kind.HANDOFF, "web", Reason.MOVED)]


def test_a_fatal_program_is_released_as_failed_not_restarted():
    p = decide.plan(mine(), facts(programs={"web": "FATAL"}, unhealthy=frozenset({"web"}), max_restarts={"web": 3}))
    assert kinds(p) == [(Kind.RELEASE, "web", Reason.FAILED)]


# ---- node health: an unhealthy node behaves as drained, and nobody counts on it -------------------

def sick(view_, node: str, why: str = "flag: exit 1"):
    from dataclasses import replace
    return replace(view_, nodes={**view_.nodes, node: replace(view_.nodes[node], unhealthy=why)})


def test_an_unhealthy_node_requests_moves_away_with_its_own_reason():
    v = mine()
    p = decide.plan(v, facts(programs={"web": "RUNNING"}, node_unhealthy=True))
    assert [(a.kind, a.reason, a.target) for a in p.actions] == [(Kind.REQUEST_MOVE, Reason.NODE_UNHEALTHY, "a")]


def test_an_unhealthy_node_hands_over_when_its_move_exists_and_claims_nothing():
    from etcdha.model import Move
    v = mine(moves={"web": Move(service="web", to="a", source=ME, token=42)})
    p = decide.plan(v, facts(programs={"web": "RUNNING"}, node_unhealthy=True))
    assert kinds(p) == [(Kind.HANDOFF, "web", Reason.NODE_UNHEALTHY)]
    vacant = view(candidates={"web": {"b": 300}})
    assert decide.plan(vacant, facts(now=1000.0, vacant_since={"web": 0.0}, node_unhealthy=True)).actions == ()


def test_an_unhealthy_node_keeps_a_service_nobody_else_can_run():
    v = view(candidates={"web": {"b": 100}}, owners={"web": Owner(node=ME, lease=MY_LEASE, token=42)})
    p = decide.plan(v, facts(programs={"web": "RUNNING"}, node_unhealthy=True))
    assert p.actions == ()


def test_other_nodes_skip_an_unhealthy_node_in_ranks_homes_and_moves():
    v = sick(view(candidates={"web": {"a": 300, "b": 100}}), "a")
    assert [c.node for c in v.eligible("web")] == [ME]
    assert decide.claim_rank(v, "web", ME) == 0
    owned = sick(view(candidates={"web": {"a": 300, "b": 100, "c": 50}},
                      owners={"web": Owner(node="c", lease=0xC1, token=5)}), "a")
    assert decide.move_target(owned, "web", None, 0.0) == (ME, None)
    assert decide.move_target(owned, "web", "a", 0.0) == (None, "a is unhealthy: flag: exit 1")
