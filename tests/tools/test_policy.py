"""The offline cache-policy simulator (moed.daemon.tools.policy): hand-checked traces, optimality, pinning."""

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moed.daemon.engine.slots import LayerSlots
from moed.daemon.tools.policy import (
    LFU,
    LFUDA,
    LRU,
    POLICIES,
    Belady,
    Future,
    best_online,
    load_trace,
    main,
    random_trace,
    simulate,
    sweep,
    validate_trace,
)

ONLINE = ("lru", "lfu", "lfuda")


def make_trace(num_experts, steps, top_k=1):
    return {"kind": "moed-trace", "model": "hand", "top_k": top_k, "num_experts": list(num_experts),
            "steps": [[layer, list(ex)] for layer, ex in steps]}


def single_layer(seq, num_experts):
    return make_trace([num_experts], [(0, [e]) for e in seq])


# ---------------------------------------------------------------- hand-checked answers


def test_cyclic_lru_zero_belady_textbook():
    # 4 keys cycled 3 times through 3 slots: LRU always evicts the next one needed.
    tr = single_layer([0, 1, 2, 3] * 3, 4)
    for layout in ("per_layer", "global"):
        lru = simulate(tr, "lru", layout, 0.75)
        assert lru["slots"] == 3
        assert (lru["hits"], lru["misses"], lru["hit_rate"]) == (0, 12, 0.0)
        # MIN: 4 compulsory misses, then evicts 3, 2, 1 in turn: misses at t=3,6,9 -> 6 hits
        opt = simulate(tr, "belady", layout, 0.75)
        assert (opt["hits"], opt["misses"]) == (6, 6)
        assert opt["hit_rate"] == 0.5 and opt["layer_hit_rates"] == [0.5]


def test_skewed_lfu_beats_lru():
    # A hot key, then a scan of cold pairs each followed by the hot key, 2 slots.
    seq = [0, 0, 0]
    for i in range(5):
        seq += [1 + 2 * i, 2 + 2 * i, 0]
    tr = single_layer(seq, 20)  # fraction 0.1 -> 2 slots
    res = {p: simulate(tr, p, "per_layer", 0.1) for p in POLICIES}
    assert res["lru"]["slots"] == 2
    assert res["lru"]["hits"] == 2  # the scan pushes the hot key out every round
    assert res["lfu"]["hits"] == 7  # the hot key stays: 2 + one hit per round
    assert res["lfuda"]["hits"] == 7  # aging is slower than the hot key's count grows
    assert res["belady"]["hits"] == 7  # every other access is compulsory
    assert all(r["hits"] + r["misses"] == len(seq) for r in res.values())


def test_lfuda_ages_out_a_once_hot_key():
    # Key 0 is hot early, then never again; then keys 1 and 2 alternate with a third cold key.
    # LFU keeps the dead key 0 forever (1 slot left for 3 keys); LFUDA ages it out.
    seq = [0] * 10
    for i in range(30):
        seq += [1, 2, 3 + i]
    tr = single_layer(seq, 100)  # fraction 0.03 -> 3 slots
    lfu = simulate(tr, "lfu", "per_layer", 0.03)
    lfuda = simulate(tr, "lfuda", "per_layer", 0.03)
    assert lfu["slots"] == 3
    # LFU: 0 (count 10) holds a slot forever; 1, 2 and the cold key evict each other: no hits.
    assert lfu["hits"] == 9
    # LFUDA (by hand): L climbs by about one per eviction; in round 6 it reaches 0's priority 10,
    # 0 (oldest of equals) goes, and 1 and 2 hit in each of the remaining 23 rounds.
    assert lfuda["hits"] == 9 + 2 * 23


def test_capacity_all_experts_only_compulsory_misses():
    tr = random_trace(n_layers=3, n_steps=40, top_k=4, num_experts=16, skew=0.5, seed=3)
    distinct = len({(layer, e) for layer, ex in tr["steps"] for e in ex})
    for p in POLICIES:
        for layout in ("per_layer", "global"):
            r = simulate(tr, p, layout, 1.0)
            assert r["misses"] == distinct, (p, layout)
            assert r["evictions"] == 0


def test_hot_layer_global_beats_per_layer():
    # Layer 0 cycles 4 experts, layers 1-3 always want expert 0; 2 slots per layer, 8 in all.
    steps = []
    for s in range(50):
        steps.append((0, [s % 4]))
        steps += [(layer, [0]) for layer in (1, 2, 3)]
    tr = make_trace([8] * 4, steps)
    for p in POLICIES:
        per = simulate(tr, p, "per_layer", 0.25)
        glob = simulate(tr, p, "global", 0.25)
        assert per["slots"] == glob["slots"] == 8
        assert glob["misses"] == 7  # 4 + 3 compulsory: everything fits the shared pool
        assert glob["hit_rate"] > per["hit_rate"], p
        assert per["layer_hit_rates"][1:] == [49 / 50] * 3
    assert simulate(tr, "lru", "per_layer", 0.25)["layer_hit_rates"][0] == 0.0


def test_slots_floor_and_per_layer_counts():
    # fraction 0.1 of 8 experts rounds to 1 slot, but a visit of 3 forces 3 (top_k 2 alone would give 2).
    tr = make_trace([8, 8], [(0, [0, 1, 2]), (1, [4, 5]), (0, [0, 1]), (1, [6])], top_k=2)
    r = simulate(tr, "lru", "per_layer", 0.1)
    assert r["slots_per_layer"] == [3, 2]
    assert r["layer_hits"] == [2, 0] and r["layer_misses"] == [3, 3]
    assert r["hits"] == 2 and r["misses"] == 6
    g = simulate(tr, "lru", "global", 0.1)
    assert g["slots"] == 5 and g["slots_per_layer"] is None


def test_unvisited_layer_rate_is_none():
    tr = make_trace([4, 4], [(0, [1]), (0, [1])])
    r = simulate(tr, "lfu", "per_layer", 0.5)
    assert r["layer_hit_rates"] == [0.5, None]


# ---------------------------------------------------------------- pinning


@pytest.mark.parametrize("cls", [LFU, LFUDA])
def test_lfu_never_evicts_a_pinned_low_count_key(cls):
    pol = cls(2)
    pol.visit(("A",), 0)
    for t in range(1, 6):
        pol.visit(("B",), t)  # B far more frequent than A
    assert pol.visit(("A", "C"), 6) == 1  # A hits; C must evict B, not the pinned A
    assert pol.resident() == {"A", "C"}


def test_belady_never_evicts_a_pinned_key():
    visits = [("A",), ("B",), ("A", "C"), ("B",)]  # at t=2, A is never used again, B soon
    pol = Belady(2, visits)
    assert [pol.visit(v, t) for t, v in enumerate(visits[:3])] == [0, 0, 1]
    assert pol.resident() == {"A", "C"}  # B (next use t=3) went, not the pinned A (never used again)
    assert pol.visit(visits[3], 3) == 0 and "B" in pol


def test_lru_pinned_oldest():
    pol = LRU(2)
    pol.visit(("A",), 0)
    pol.visit(("B",), 1)
    assert pol.visit(("C", "A"), 2) == 1  # A is the oldest but needed now: B goes
    assert pol.resident() == {"A", "C"}


visit_lists = st.integers(1, 3).flatmap(lambda n_layers: st.tuples(
    st.just(n_layers),
    st.lists(st.integers(3, 8), min_size=n_layers, max_size=n_layers),
    st.lists(st.tuples(st.integers(0, n_layers - 1), st.lists(st.integers(0, 7), min_size=1, max_size=3)),
             min_size=1, max_size=60),
))


def as_trace(n_layers, num_experts, raw):
    steps = []
    for layer, ex in raw:
        ex = sorted({e % num_experts[layer] for e in ex})
        steps.append((layer, ex))
    return make_trace(num_experts, steps, top_k=1)


@settings(max_examples=60, deadline=None)
@given(visit_lists, st.integers(3, 6))
def test_visits_end_resident_and_within_capacity(data, capacity):
    n_layers, num_experts, raw = data
    tr = as_trace(n_layers, num_experts, raw)
    visits = [tuple((layer, e) for e in ex) for layer, ex in tr["steps"]]
    pols = [LRU(capacity), LFU(capacity), LFUDA(capacity), Belady(capacity, visits)]
    for pol in pols:
        for t, keys in enumerate(visits):
            before = set(pol.resident())
            hits = pol.visit(keys, t)
            assert hits == sum(k in before for k in keys)
            assert all(k in pol for k in keys), (pol.name, t)
            assert len(pol) <= capacity


# ---------------------------------------------------------------- optimality


@settings(max_examples=80, deadline=None)
@given(visit_lists, st.sampled_from([0.2, 0.35, 0.5, 0.75]))
def test_belady_is_optimal(data, fraction):
    n_layers, num_experts, raw = data
    tr = as_trace(n_layers, num_experts, raw)
    distinct = len({(layer, e) for layer, ex in tr["steps"] for e in ex})
    opt = {}
    for layout in ("per_layer", "global"):
        opt[layout] = simulate(tr, "belady", layout, fraction)
        assert opt[layout]["misses"] >= distinct
        for p in ONLINE:
            r = simulate(tr, p, layout, fraction)
            assert r["misses"] >= opt[layout]["misses"], (p, layout)
            for a, b in zip(r["layer_hits"], r["layer_misses"]):
                assert a >= 0 and b >= 0
    # the shared pool (same slots) can do anything the split pools can
    assert opt["global"]["hits"] >= opt["per_layer"]["hits"]


def brute_force_min_misses(visits, capacity):
    """The true minimum misses over every eviction choice (tiny inputs only)."""
    from itertools import combinations

    best = {frozenset(): 0}
    for keys in visits:
        nxt = {}
        for cache, cost in best.items():
            miss = [k for k in keys if k not in cache]
            over = len(cache) + len(miss) - capacity
            victims = [k for k in cache if k not in keys]
            for out in combinations(victims, max(over, 0)):
                state = (cache - set(out)) | set(miss)
                if nxt.get(state, 1 << 30) > cost + len(miss):
                    nxt[state] = cost + len(miss)
        best = nxt
    return min(best.values())


def test_belady_matches_brute_force_optimum():
    rng = np.random.default_rng(0)
    for _ in range(40):
        capacity = int(rng.integers(2, 5))
        visits = [tuple(sorted(rng.choice(6, size=int(rng.integers(1, capacity + 1)), replace=False).tolist()))
                  for _ in range(10)]
        pol = Belady(capacity, visits)
        misses = sum(len(v) - pol.visit(v, t) for t, v in enumerate(visits))
        assert misses == brute_force_min_misses(visits, capacity), (visits, capacity)


def test_belady_optimal_on_seeded_random_traces():
    for seed in range(4):
        tr = random_trace(n_layers=4, n_steps=60, top_k=4, num_experts=16, skew=1.0, seed=seed)
        rows = sweep(tr, fractions=(0.25, 0.5))
        for r in rows:
            assert r["gap_to_belady"] >= 0 and r["gap_to_best"] >= r["gap_to_belady"] - 1e-12
            if r["policy"] == "belady":
                assert r["gap_to_belady"] == 0


def test_lru_matches_engine_layer_slots():
    tr = random_trace(n_layers=2, n_steps=100, top_k=4, num_experts=16, skew=0.8, seed=7)
    r = simulate(tr, "lru", "per_layer", 0.5)
    engine = [LayerSlots(n, 16) for n in r["slots_per_layer"]]
    hits = [0, 0]
    for layer, ex in tr["steps"]:
        h, _ = engine[layer].assign(np.array(ex))
        hits[layer] += h
    assert hits == r["layer_hits"]


def test_future_next_use():
    fut = Future([("a", "b"), ("c",), ("b",), ("a", "c")])
    big = max(max(x) for x in fut.next_use)
    assert fut.next_use[0] == [3, 2] and fut.next_use[1] == [3]
    assert fut.next_use[2] == [big] and fut.next_use[3] == [big, big]


def test_belady_requires_the_given_future():
    pol = Belady(2, [("a",), ("b",)])
    with pytest.raises(ValueError, match="not the one"):
        pol.visit(("b",), 0)


def test_visit_larger_than_capacity():
    with pytest.raises(ValueError, match="does not fit"):
        LRU(2).visit((1, 2, 3), 0)


# ---------------------------------------------------------------- sweep, best_online, CLI


def test_sweep_rows_and_best_online():
    tr = random_trace(n_layers=3, n_steps=50, top_k=2, num_experts=16, skew=1.2, seed=1)
    rows = sweep(tr, fractions=(0.25, 0.5), policies=("lru", "lfu", "belady"))
    assert len(rows) == 2 * 2 * 3
    for f in (0.25, 0.5):
        pol, lay = best_online(rows, f)
        assert pol != "belady"
        at = [r for r in rows if r["fraction"] == f and r["policy"] != "belady"]
        best = next(r for r in at if (r["policy"], r["layout"]) == (pol, lay))
        assert best["hit_rate"] == max(r["hit_rate"] for r in at)
    with pytest.raises(ValueError, match="no online"):
        best_online(rows, 0.9)
    with pytest.raises(ValueError, match="unknown policy"):
        sweep(tr, policies=("fifo",))
    with pytest.raises(ValueError, match="unknown layout"):
        simulate(tr, "lru", "striped", 0.5)
    with pytest.raises(ValueError, match="fraction"):
        simulate(tr, "lru", "global", 0.0)


def test_main_prints_table_and_writes_rows(tmp_path, capsys):
    tr = random_trace(n_layers=2, n_steps=30, top_k=2, num_experts=8, seed=2)
    path = tmp_path / "t.json"
    path.write_text(json.dumps(tr))
    out = tmp_path / "rows.json"
    assert main([str(path), "--fractions", "0.25,0.5", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert len(rows) == 2 * 2 * len(POLICIES)
    assert {r["policy"] for r in rows} == set(POLICIES)
    text = capsys.readouterr().out
    assert "belady" in text and "lfuda" in text and "per_layer" in text


def test_main_bad_trace(tmp_path, capsys):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"kind": "nope"}))
    assert main([str(path)]) == 2
    assert "kind" in capsys.readouterr().err


# ---------------------------------------------------------------- validation


def good():
    return make_trace([4, 4], [(0, [0, 1]), (1, [3])], top_k=2)


@pytest.mark.parametrize("mutate, match", [
    (lambda t: t.update(kind="other"), "kind"),
    (lambda t: t.pop("kind"), "kind"),
    (lambda t: t.update(num_experts=[]), "num_experts"),
    (lambda t: t.update(num_experts=[4, 0]), r"num_experts\[1\]"),
    (lambda t: t.update(top_k=0), "top_k"),
    (lambda t: t.update(top_k=5), "top_k"),
    (lambda t: t.update(steps={}), "steps"),
    (lambda t: t["steps"].append([0]), r"steps\[2\].*pair"),
    (lambda t: t["steps"].append([2, [0]]), r"steps\[2\]: layer 2 out of range"),
    (lambda t: t["steps"].append([True, [0]]), r"steps\[2\]: layer"),
    (lambda t: t["steps"].append([1, [4]]), r"steps\[2\]: expert 4 out of range \[0, 4\) of layer 1"),
    (lambda t: t["steps"].append([1, [-1]]), r"steps\[2\]: expert -1"),
    (lambda t: t["steps"].append([1, [1, 1]]), r"steps\[2\]: duplicate"),
    (lambda t: t["steps"].append([1, []]), r"steps\[2\]: experts must be a non-empty"),
    (lambda t: t.update(model=3), "model"),
])
def test_validation_errors(mutate, match):
    t = good()
    mutate(t)
    with pytest.raises(ValueError, match=match):
        validate_trace(t)


def test_validate_normalises_and_load_trace(tmp_path):
    t = good()
    t["steps"].append([1, [3, 0]])
    v = validate_trace(t)
    assert v["steps"][-1] == [1, [0, 3]]
    path = tmp_path / "t.json"
    path.write_text(json.dumps(t))
    assert load_trace(path) == v
    path.write_text("{not json")
    with pytest.raises(ValueError, match="t.json: not valid JSON"):
        load_trace(path)
    path.write_text(json.dumps({**t, "num_experts": [4]}))
    with pytest.raises(ValueError, match=r"t.json: .*layer 1 out of range"):
        load_trace(path)
    with pytest.raises(ValueError, match="capacity"):
        LRU(0)
