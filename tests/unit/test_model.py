"""model.build_view: decoding keys, tolerating garbage, ordering candidates."""
from __future__ import annotations

import json

import pytest

from etcdha import model
from etcdha.model import KV, UNKNOWN_OWNER, build_view

pytestmark = pytest.mark.unit

P = "/etcdha"


def kv(key: str, value, lease: int = 0, create: int = 1, mod: int = 0) -> KV:
    raw = value if isinstance(value, bytes) else (value.encode() if isinstance(value, str) else model.encode(value))
    return KV(key=P + key, value=raw, create_revision=create, mod_revision=mod or create, lease=lease)


def healthy_kvs() -> list[KV]:
    return [
        kv("/candidates/web/a", model.encode_candidate(200, "198.18.0.100/24"), lease=0xA),
        kv("/candidates/web/b", model.encode_candidate(100, "198.18.0.100/24"), lease=0xB),
        kv("/members/a", b"{}"),
        kv("/members/b", b"{}"),
        kv("/members/c", b"{}"),
        kv("/nodes/a", model.encode_node("a", 0xA, 1234, 1700000000.5, {"web": "RUNNING"}), lease=0xA),
        kv("/nodes/b", model.encode_node("b", 0xB, 99, 1700000001.0, {"web": "STOPPED"}), lease=0xB),
        kv("/owners/web", model.encode_owner("a", 0xA, 1700000002.25), lease=0xA, create=41, mod=41),
        kv("/services/web", model.encode_service("198.18.0.100/24")),
    ]


def test_key_schema():
    assert model.node_key(P, "a") == "/etcdha/nodes/a"
    assert model.member_key(P, "a") == "/etcdha/members/a"
    assert model.service_key(P, "web") == "/etcdha/services/web"
    assert model.candidate_key(P, "web", "a") == "/etcdha/candidates/web/a"
    assert model.owner_key(P, "web") == "/etcdha/owners/web"


def test_codecs_are_compact_sorted_json():
    assert model.encode({"b": 1, "a": None}) == b'{"a":null,"b":1}'
    assert json.loads(model.encode_owner("a", 255, 1.23456)) == {"node": "a", "lease": "ff", "since": 1.235}
    assert json.loads(model.encode_candidate(5)) == {"priority": 5, "vip": None}
    assert json.loads(model.encode_service("10.0.0.1/24")) == {"vip": "10.0.0.1/24"}


def test_healthy_keys_decode():
    v = build_view(P, 77, healthy_kvs())
    assert v.revision == 77
    assert v.problems == ()
    assert set(v.nodes) == {"a", "b"}
    a = v.nodes["a"]
    assert (a.node, a.lease, a.pid, a.started) == ("a", 0xA, 1234, 1700000000.5)
    assert dict(a.services) == {"web": "RUNNING"}
    assert v.members == frozenset({"a", "b", "c"})
    owner = v.owners["web"]
    assert (owner.node, owner.lease, owner.token, owner.since) == ("a", 0xA, 41, 1700000002.25)
    cands = v.candidates["web"]
    assert cands["a"] == model.Candidate(node="a", priority=200, vip="198.18.0.100/24")
    assert cands["b"].priority == 100
    assert v.services == {"web": "198.18.0.100/24"}


def test_owner_token_is_create_revision_not_mod_revision():
    v = build_view(P, 90, [kv("/owners/web", model.encode_owner("a", 1, 0), lease=1, create=12, mod=88)])
    assert v.owners["web"].token == 12


def test_nodes_appear_as_members_even_without_member_key():
    v = build_view(P, 1, [kv("/nodes/x", model.encode_node("x", 1, 1, 0, {}), lease=1)])
    assert v.members == frozenset({"x"})


def test_keys_outside_prefix_ignored():
    kvs = [
        KV("/other/nodes/a", model.encode_node("a", 1, 1, 0, {}), 1, 1, 1),
        KV("/etcdha2/owners/web", model.encode_owner("a", 1, 0), 1, 1, 1),
        KV("/etcdha", b"{}", 1, 1, 0),
        kv("/owners", b"{}"),                    # kind without a name
        kv("/owners/web/extra", b"{}"),          # too deep
        kv("/candidates/web", b"{}"),            # too shallow
        kv("/whatever/x", b"garbage"),           # unknown kind
    ]
    v = build_view(P, 1, kvs)
    assert v.nodes == {} and v.owners == {} and v.candidates == {} and v.services == {}
    assert v.members == frozenset()
    assert v.problems == ()


def test_services_known_from_candidates_only():
    v = build_view(P, 1, [kv("/candidates/db/a", model.encode_candidate(1, "10.0.0.9/24"), lease=1)])
    assert v.services == {"db": None}


@pytest.mark.parametrize("raw,fragment", [
    (b"not json", "value is not JSON"),
    (b"\xff\xfe", "value is not JSON"),
    (b"[1, 2]", "expected a JSON object"),
    (b'"a string"', "expected a JSON object"),
    (b"null", "expected a JSON object"),
])
@pytest.mark.parametrize("key", ["/nodes/a", "/candidates/web/a", "/services/web", "/owners/web"])
def test_garbage_values_are_problems_not_exceptions(key, raw, fragment):
    v = build_view(P, 3, [kv(key, raw, lease=5)])
    assert len(v.problems) == 1
    assert v.problems[0].startswith(P + key + ": ")
    assert fragment in v.problems[0]
    if key == "/nodes/a":
        assert v.nodes == {}
    if key == "/candidates/web/a":
        assert v.candidates == {}


@pytest.mark.parametrize("raw", [b"not json", b"[1]", b"{}", b'{"node": 5}', b'{"node": ""}',
                                 b'{"node": "a/b"}', b"\x00\x01"])
def test_owner_with_garbage_value_still_counts_as_owned(raw):
    v = build_view(P, 3, [kv("/owners/web", raw, lease=9, create=30)])
    owner = v.owners["web"]
    assert owner.node == UNKNOWN_OWNER
    assert owner.lease == 9 and owner.token == 30
    assert len(v.problems) == 1 and v.problems[0].startswith("/etcdha/owners/web: ")


def test_owner_with_garbage_value_blocks_claims():
    from etcdha import decide
    from etcdha.lease import LeaseState
    kvs = [kv("/owners/web", b"garbage", lease=9, create=30),
           kv("/nodes/b", model.encode_node("b", 0xB, 1, 0, {}), lease=0xB),
           kv("/candidates/web/b", model.encode_candidate(100), lease=0xB)]
    v = build_view(P, 3, kvs)
    p = decide.plan(v, decide.Facts(me="b", lease=0xB, lease_state=LeaseState.OK, now=10.0,
                                    priorities={"web": 100}, vacant_since={"web": 0.0}))
    assert p.actions == ()


@pytest.mark.parametrize("raw,fragment", [
    (b'{"vip": null}', "expected an integer priority, got None"),
    (b'{"priority": "high"}', "expected an integer priority, got 'high'"),
    (b'{"priority": 1.5}', "expected an integer priority, got 1.5"),
    (b'{"priority": true}', "expected an integer priority, got True"),
    (b"{}", "expected an integer priority, got None"),
])
def test_candidate_without_integer_priority(raw, fragment):
    v = build_view(P, 3, [kv("/candidates/web/a", raw, lease=1)])
    assert v.candidates == {}
    assert v.problems == (f"/etcdha/candidates/web/a: {fragment}",)


def test_candidate_with_non_string_vip_keeps_candidate():
    v = build_view(P, 3, [kv("/candidates/web/a", b'{"priority": 3, "vip": 17}', lease=1)])
    assert v.candidates["web"]["a"] == model.Candidate(node="a", priority=3, vip=None)


def test_node_with_odd_fields_decodes_with_defaults():
    v = build_view(P, 3, [kv("/nodes/a", b'{"pid": "x", "started": true, "services": [1]}', lease=4)])
    a = v.nodes["a"]
    assert (a.pid, a.started, dict(a.services), a.lease) == (0, 0.0, {}, 4)
    assert v.problems == ()


def test_node_process_counts_round_trip_and_garbage_counts_are_zero():
    v = build_view(P, 3, [kv("/nodes/a", model.encode_node("a", 4, 1, 0, {"web": "RUNNING"}, {"web": 3}), lease=4),
                          kv("/nodes/b", b'{"processes": {"web": "x", "db": NaN, "x": -1, "y": 1e400}}', lease=5),
                          kv("/nodes/c", b'{"processes": [1, 2]}', lease=6)])
    assert dict(v.nodes["a"].processes) == {"web": 3}
    assert dict(v.nodes["b"].processes) == {"web": 0, "db": 0, "x": 0, "y": 0}
    assert dict(v.nodes["c"].processes) == {}


@pytest.mark.parametrize("raw", [b'{"pid": Infinity}', b'{"pid": NaN}', b'{"pid": 1e400}'])
def test_node_with_non_finite_pid_never_raises(raw):
    v = build_view(P, 3, [kv("/nodes/a", raw, lease=4)])
    assert "a" in v.nodes or v.problems


def test_garbage_does_not_hide_good_keys():
    kvs = healthy_kvs() + [kv("/nodes/z", b"{{{"), kv("/candidates/web/z", b"[]")]
    v = build_view(P, 3, kvs)
    assert set(v.nodes) == {"a", "b"}
    assert set(v.candidates["web"]) == {"a", "b"}
    assert v.owners["web"].node == "a"
    assert len(v.problems) == 2


def test_live_candidates_order_and_liveness():
    kvs = [
        kv("/candidates/web/c", model.encode_candidate(100), lease=3),
        kv("/candidates/web/a", model.encode_candidate(100), lease=1),
        kv("/candidates/web/b", model.encode_candidate(300), lease=2),
        kv("/candidates/web/dead", model.encode_candidate(999), lease=4),  # no node key
        kv("/candidates/web/d", model.encode_candidate(5), lease=5),
    ]
    kvs += [kv(f"/nodes/{n}", model.encode_node(n, i, 1, 0, {}), lease=i)
            for i, n in enumerate(["a", "b", "c", "d"], start=1)]
    v = build_view(P, 3, kvs)
    assert [c.node for c in v.live_candidates("web")] == ["b", "a", "c", "d"]
    assert v.live_candidates("nothing") == []


def test_node_program_states_do_not_leak_into_services_sorted_listing():
    # etcd returns keys sorted: candidates < members < nodes < owners < services
    kvs = [
        kv("/candidates/db/a", model.encode_candidate(100), lease=1),
        kv("/nodes/a", model.encode_node("a", 1, 1, 0, {"db": "STOPPED", "web": "RUNNING"}), lease=1),
        kv("/services/web", model.encode_service("198.18.0.100/24")),
    ]
    v = build_view(P, 3, kvs)
    assert v.services == {"db": None, "web": "198.18.0.100/24"}


def test_service_keys_survive_a_later_node_key():
    kvs = [
        kv("/services/web", model.encode_service("198.18.0.100/24")),
        kv("/nodes/a", model.encode_node("a", 1, 1, 0, {}), lease=1),
    ]
    v = build_view(P, 3, kvs)
    assert v.services == {"web": "198.18.0.100/24"}


def test_service_value_garbage_keeps_the_service_without_vip():
    v = build_view(P, 3, [kv("/services/web", b'{"vip": 5}'), kv("/services/db", b"nope")])
    assert v.services == {"web": None, "db": None}
    assert len(v.problems) == 1 and v.problems[0].startswith("/etcdha/services/db: ")


def _garbage_and_valid(i: int) -> list[KV]:
    """Keys of every kind, some valid, some garbage, some misshapen or outside the prefix."""
    return [
        kv("/candidates/web/a", model.encode_candidate(200 - i, "198.18.0.100/24"), lease=0xA, mod=i + 1),
        kv("/candidates/web/b", b"{not json", lease=0xB, mod=i + 1),
        kv("/candidates/db/c", model.encode_candidate(i), lease=0xC, mod=i + 1),
        kv("/members/a", b"{}"), kv("/members/x", b"{}"),
        kv("/nodes/a", model.encode_node("a", 0xA, 1, 0, {"web": "RUNNING" if i % 2 else "STOPPED"}), lease=0xA,
           mod=i + 1),
        kv("/nodes/c", b'{"pid": "x", "services": [1]}', lease=0xC, mod=i + 1),
        kv("/owners/web", model.encode_owner("a", 0xA, 1.0), lease=0xA, create=40 + i, mod=40 + i),
        kv("/owners/db", b"\xff garbage", lease=7, create=40),
        kv("/services/web", model.encode_service("198.18.0.100/24")), kv("/services/db", b"nope"),
        kv("/drain/c", b"{}"), kv("/pause/db", b"{}"),
        kv("/moves/web", model.encode_move("a", "b", 41, 1700000000.25), lease=0x5E),
        kv("/cooldowns/web/b", b"[]"),
        kv("/owners/web/extra", b"{}"), KV(key="/elsewhere/owners/web", value=b"{}", create_revision=1,
                                            mod_revision=1, lease=0),
    ]


def test_a_view_kept_key_by_key_equals_one_decoded_from_the_whole_listing():
    import random
    rng = random.Random(7)
    builder = model.ViewBuilder(P)
    current: dict[str, KV] = {}
    builder.reset([])
    for step in range(300):
        pool = _garbage_and_valid(step)
        for _ in range(rng.randint(1, 6)):
            if current and rng.random() < 0.35:
                key = rng.choice(sorted(current))
                del current[key]
                builder.delete(key)
            else:
                chosen = rng.choice(pool)
                current[chosen.key] = chosen
                builder.put(chosen)
        if step % 50 == 49:  # a re-list after a compaction starts over from the same keys
            builder.reset(list(current.values()))
        kept = builder.view(step)
        fresh = build_view(P, step, sorted(current.values(), key=lambda k: k.key))
        assert kept == fresh, f"step {step}"
        assert kept.problems == fresh.problems


def test_a_view_handed_out_does_not_change_with_later_keys():
    builder = model.ViewBuilder(P)
    builder.reset(healthy_kvs())
    before = builder.view(50)
    builder.delete(P + "/candidates/web/b")
    builder.put(kv("/nodes/a", {"services": {"web": "STOPPED"}}, lease=0xA, create=3, mod=60))
    builder.put(kv("/owners/db", b"\xff garbage", lease=7, create=61))
    after = builder.view(61)
    assert before == build_view(P, 50, healthy_kvs()) and before.problems == ()
    assert [c.node for c in before.live_candidates("web")] == ["a", "b"]
    assert [c.node for c in after.live_candidates("web")] == ["a"]
    assert after.nodes["a"].services == {"web": "STOPPED"} and before.nodes["a"].services == {"web": "RUNNING"}
    assert len(after.problems) == 1 and after.problems[0].startswith("/etcdha/owners/db")
    builder.delete(P + "/owners/db")
    assert builder.view(62).problems == ()  # a garbage key's problem goes with the key
