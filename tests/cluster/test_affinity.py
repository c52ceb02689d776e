"""The session router's decisions (engine/serve/cluster/affinity.py) as plain Python: sessions stick
to one replica, rendezvous homes move only the sessions of a replica that left or joined, an
overloaded home spills the session to the least loaded replica and the session stays there,
and requests without a session take the shorter of two queues."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from engine.serve.cluster.affinity import SessionAffinity, rendezvous_order

REPLICAS = ["r0", "r1", "r2", "r3"]
SESSIONS = [f"session-{i}" for i in range(400)]


def idle(_replica: str) -> int:
    return 0


def test_a_session_stays_on_one_replica_and_sessions_spread_evenly():
    affinity = SessionAffinity()
    homes = {s: {affinity.choose(s, REPLICAS, idle).replica for _ in range(5)} for s in SESSIONS}
    assert all(len(h) == 1 for h in homes.values())
    per_replica = Counter(next(iter(h)) for h in homes.values())
    assert set(per_replica) == set(REPLICAS)
    assert max(per_replica.values()) <= 1.4 * len(SESSIONS) / len(REPLICAS)


def test_homes_do_not_depend_on_the_order_replicas_are_listed_in():
    shuffled = REPLICAS[::-1]
    for s in SESSIONS[:50]:
        assert rendezvous_order(s, REPLICAS)[0] == rendezvous_order(s, shuffled)[0]


def test_a_replica_leaving_or_joining_moves_only_its_own_sessions():
    before = {s: rendezvous_order(s, REPLICAS)[0] for s in SESSIONS}
    without_r2 = {s: rendezvous_order(s, [r for r in REPLICAS if r != "r2"])[0]
                  for s in SESSIONS}
    moved = {s for s in SESSIONS if before[s] != without_r2[s]}
    assert moved == {s for s in SESSIONS if before[s] == "r2"}
    with_r4 = {s: rendezvous_order(s, [*REPLICAS, "r4"])[0] for s in SESSIONS}
    moved = {s for s in SESSIONS if before[s] != with_r4[s]}
    assert all(with_r4[s] == "r4" for s in moved)
    assert 0.1 < len(moved) / len(SESSIONS) < 0.3  # about 1/5 of them


def test_an_overloaded_home_spills_to_the_least_loaded_and_the_session_stays_there():
    affinity = SessionAffinity(abs_slack=4, rel_slack=1.5)
    session = SESSIONS[0]
    home = affinity.choose(session, REPLICAS, idle).replica
    loads = dict.fromkeys(REPLICAS, 1)
    loads[home] = 1 + 4  # at the bound: still home
    assert affinity.choose(session, REPLICAS, loads.get).replica == home
    loads[home] = 1 + 5  # past it
    loads[REPLICAS[(REPLICAS.index(home) + 1) % 4]] = 0
    spill = affinity.choose(session, REPLICAS, loads.get)
    assert spill.reason == "spill" and spill.replica != home and loads[spill.replica] == 0
    assert affinity.spills == 1
    loads = dict.fromkeys(REPLICAS, 0)  # the old home is idle again: the warm one wins
    again = affinity.choose(session, REPLICAS, loads.get)
    assert again.replica == spill.replica and again.reason == "remembered"


def test_the_bound_grows_with_the_mean_queue():
    affinity = SessionAffinity(abs_slack=4, rel_slack=1.5)
    session = SESSIONS[1]
    home = affinity.choose(session, REPLICAS, idle).replica
    loads = dict.fromkeys(REPLICAS, 10)
    loads[home] = 10 + 15  # mean 13.75: bound 10 + 20.6
    assert affinity.choose(session, REPLICAS, loads.get).replica == home


def test_a_dead_or_vanished_replica_sends_its_sessions_to_their_next_choice():
    affinity = SessionAffinity()
    session = SESSIONS[2]
    order = rendezvous_order(session, REPLICAS)
    assert affinity.choose(session, REPLICAS, idle).replica == order[0]
    rest = [r for r in REPLICAS if r != order[0]]
    assert affinity.choose(session, rest, idle).replica == order[1]
    affinity.forget_replica(order[1])
    assert affinity.remembered(session) is None


def test_unknown_queue_lengths_count_as_idle():
    affinity = SessionAffinity()
    session = SESSIONS[3]
    assert affinity.choose(session, REPLICAS, lambda r: None).replica == \
        rendezvous_order(session, REPLICAS)[0]


def test_without_a_session_the_shorter_of_two_random_queues_wins():
    affinity = SessionAffinity(rng=random.Random(3))
    loads = {"r0": 9, "r1": 0, "r2": 9, "r3": 9}
    picks = Counter(affinity.choose(None, REPLICAS, loads.get).replica for _ in range(300))
    assert picks["r1"] > 100  # every pair holding r1 picks it: half of the pairs
    assert affinity.choose("", REPLICAS, idle).reason == "two-choice"
    assert len(affinity) == 0  # nothing remembered for sessionless requests
    assert affinity.choose(None, ["only"], idle).replica == "only"


def test_memory_is_bounded_and_idle_sessions_expire():
    now = [0.0]
    affinity = SessionAffinity(memory=10, ttl_s=60, clock=lambda: now[0])
    for s in SESSIONS[:25]:
        affinity.choose(s, REPLICAS, idle)
    assert len(affinity) == 10 and affinity.remembered(SESSIONS[0]) is None
    assert affinity.remembered(SESSIONS[24]) is not None
    now[0] = 61.0
    assert affinity.remembered(SESSIONS[24]) is None


def test_bad_settings_are_refused():
    with pytest.raises(ValueError):
        SessionAffinity(abs_slack=-1)
    with pytest.raises(ValueError):
        SessionAffinity().choose("s", [], idle)
