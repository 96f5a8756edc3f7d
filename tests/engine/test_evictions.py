"""The engine's eviction policies (daemon/engine/slots.EVICTIONS) decide exactly as the simulator's
(daemon/tools/policy.py) on realistic traces, keep their slot tables consistent, and never change
the tokens: only which experts are read."""

from pathlib import Path

import numpy as np
import pytest

from moed.daemon.engine.generate import SamplingParams, run
from moed.daemon.engine.loader import load_paged
from moed.daemon.engine.slots import EVICTIONS, HotLRUSlots, make_slots
from moed.daemon.tools import policy, warmbench
from moed.daemon.tools.policy import HotLRU, _Prepared, simulate
from moed.daemon.tools.tracesynth import synth
from moed.ipc.config import PagingConfig

ROOT = Path(__file__).resolve().parents[2]
STDLIB_TRACE = ROOT / "bench" / "results" / "stdlib-trace-256.json"  # the trained model's routing
TRAINED = ROOT / "models" / "stdlib-qwen3_moe"
NEW = ("lfuda", "dlfu", "hotlru")


def traces():
    out = {"synth-64-top8": synth(64, 8, 4, tokens=300, seed=2, predictions=False),
           "synth-128-top4": synth(128, 4, 3, tokens=300, seed=5, predictions=False)}
    if STDLIB_TRACE.exists():
        out["stdlib"] = policy.load_trace(STDLIB_TRACE)
    return out


TRACES = traces()


def check_table(t, visit: list[int], before: np.ndarray) -> None:
    """Slots within bounds, the lut one-to-one with the policy's residents, the visit resident and
    none of its experts moved out of its slot."""
    lut = t.lut
    held = np.flatnonzero(lut >= 0)
    assert t.used == len(held) <= t.n_slots
    slots = lut[held]
    assert len(set(slots.tolist())) == len(held) and ((0 <= slots) & (slots < t.n_slots)).all()
    assert len(t._free) + len(held) == t.n_slots and not set(t._free) & set(slots.tolist())
    assert set(held.tolist()) == set(t.policy.resident())
    assert (lut[visit] >= 0).all()
    was = before[visit]
    assert (lut[visit][was >= 0] == was[was >= 0]).all(), "an expert of the visit was evicted"


def replay(trace, tables) -> list[int]:
    hits = [0] * len(tables)
    for layer, ex in trace["steps"]:
        t = tables[layer]
        before = t.lut.copy()
        h, filled = t.assign(np.array(ex, dtype=np.int64))
        assert len(filled) == len(ex) - h
        hits[layer] += h
        check_table(t, ex, before)
    return hits


@pytest.mark.parametrize("name", sorted(TRACES))
@pytest.mark.parametrize("eviction", NEW)
@pytest.mark.parametrize("fraction", [0.125, 0.25, 0.5])
def test_slot_table_decides_as_the_simulator(eviction, name, fraction):
    trace = TRACES[name]
    sim = simulate(trace, eviction, "per_layer", fraction)
    prep = _Prepared(trace)
    tables = []
    for layer, (n, n_exp) in enumerate(zip(sim["slots_per_layer"], trace["num_experts"])):
        if eviction == "hotlru":  # the simulator's offline hot set: the whole trace's counts
            off = prep.offsets[layer]
            counts = {k - off: c for k, c in prep.counts.items() if prep.layer_of(k) == layer}
            tables.append(make_slots(eviction, n, n_exp, top_k=prep.largest[layer], counts=counts))
        else:
            tables.append(make_slots(eviction, n, n_exp))
    hits = replay(trace, tables)
    assert hits == sim["layer_hits"]
    total = [0] * len(tables)
    for layer, ex in trace["steps"]:
        total[layer] += len(ex)
    assert [n - h for n, h in zip(total, hits)] == sim["layer_misses"]
    assert sum(t.evictions for t in tables) == sim["evictions"]


@pytest.mark.parametrize("name", sorted(TRACES))
@pytest.mark.parametrize("fraction", [0.125, 0.25])
def test_online_hot_set_decides_as_the_simulator(name, fraction):
    """No saved counts (the engine's cold start): the hot set from the first visits' counts."""
    trace = TRACES[name]
    prep = _Prepared(trace)
    k = trace["top_k"]
    slots = prep.slots(fraction)
    tables = [make_slots("hotlru", n, n_exp, top_k=k) for n, n_exp in zip(slots, trace["num_experts"])]
    sims = [HotLRU(n, None, k) for n in slots]
    want = [0] * len(slots)
    for layer, ex in trace["steps"]:
        want[layer] += sims[layer].visit(ex, 0)
    assert replay(trace, tables) == want
    for t in tables:
        assert t.policy.n_hot == min(t.n_slots // 2, t.n_slots - k)  # 0 at top-k slots: then it is LRU
        assert t.policy.hot is not None and len(t.policy.hot) == t.policy.n_hot
        assert t.policy.loaded <= t.policy.hot and len(t.policy.lru) <= t.n_slots - t.policy.n_hot
    assert want != [sum(len(ex) for layer, ex in trace["steps"] if layer == i) for i in range(len(slots))]


@pytest.mark.parametrize("eviction", NEW)
def test_groups_and_forget_keep_the_table_consistent(eviction):
    rng = np.random.default_rng(0)
    t = make_slots(eviction, 12, 64, top_k=4)
    for i in range(200):
        size = 30 if i % 37 == 5 else 4  # now and then a prefill visit larger than the slots
        experts = np.sort(rng.choice(64, size=size, replace=False))
        for g in t.groups(experts):
            assert len(g) <= t.n_slots
            before = t.lut.copy()
            h, filled = t.assign(g)
            check_table(t, g.tolist(), before)
            if i % 29 == 3 and filled:  # a failed read: its experts are dropped
                t.forget([e for e, _ in filled])
                assert (t.lut[[e for e, _ in filled]] < 0).all()
                assert t.used == int((t.lut >= 0).sum()) and set(np.flatnonzero(t.lut >= 0)) == t.policy.resident()
    if eviction == "hotlru":
        assert t.policy.hot


def test_hot_set_comes_from_saved_counts():
    counts = np.zeros(16)
    counts[[9, 3, 12, 5]] = [50, 40, 30, 20]
    t = make_slots("hotlru", 8, 16, top_k=2, counts=counts)
    assert isinstance(t, HotLRUSlots) and t.policy.hot == {9, 3, 12, 5} and t.policy.lru.capacity == 4
    assert make_slots("hotlru", 8, 16, top_k=2, counts=np.zeros(16)).policy.hot is None  # never counted: online
    # the warm fill (most used first) is one group: the hot set, then as many as the LRU part holds
    order = np.argsort(-counts, kind="stable")[:8]
    assert len(t.groups(order)) == 1
    t.assign(order)
    assert t.used == 8 and t.policy.loaded == {9, 3, 12, 5}


@pytest.mark.skipif(not (TRAINED / "config.json").exists(), reason=f"{TRAINED} not present")
def test_engine_hot_set_is_the_warm_starts_heat_map(tmp_path):
    rt = str(tmp_path / "rt")
    warmbench.one(str(TRAINED), 0.25, rt, True, warmbench.RECORD_PROMPT, 24)  # saves this run's counts
    (f,) = sorted((tmp_path / "rt" / "heat").glob("*.npy"))
    counts = np.load(f)
    paging = PagingConfig(cache_fraction=0.25, warm_start=True, eviction="hotlru")
    with warmbench.runtime_dir(rt), load_paged(TRAINED, paging) as pm:
        for layer, t in enumerate(pm.store.slots):
            n_hot = t.policy.n_hot
            assert n_hot == min(t.n_slots // 2, t.n_slots - pm.top_k) > 0
            top = np.argsort(-counts[layer], kind="stable")[:n_hot]
            assert t.policy.hot == set(top.tolist()) <= set(pm.store.resident(layer).tolist())
        run(pm.model, pm.tokenizer, "def main(argv):", SamplingParams(max_tokens=16, ignore_eos=True))
        for layer, t in enumerate(pm.store.slots):
            assert t.policy.hot <= set(pm.store.resident(layer).tolist())  # pinned: never evicted


@pytest.mark.parametrize("eviction", sorted(set(EVICTIONS) - {"lru"}))
def test_eviction_never_changes_the_tokens(tiny_model, eviction):
    """Every policy pages different experts but computes the same tokens as LRU (greedy and sampled)."""
    path = tiny_model("qwen3_moe")
    params = [SamplingParams(max_tokens=24, ignore_eos=True), SamplingParams(max_tokens=24, temp=1.0, seed=3,
                                                                             ignore_eos=True)]
    got = {}
    for ev in ("lru", eviction):
        with load_paged(path, cache_fraction=0.5, warm=False, workers=1, eviction=ev) as pm:
            assert type(pm.store.slots[0]) is EVICTIONS[ev]
            got[ev] = [run(pm.model, pm.tokenizer, "The paged expert cache", p).tokens for p in params]
            assert pm.store.evictions() > 0
    assert got[eviction] == got["lru"]


def test_unknown_eviction_is_refused_naming_the_option():
    with pytest.raises(ValueError, match="--eviction"):
        PagingConfig(eviction="leaststale")
