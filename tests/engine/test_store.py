"""The expert store's paging protocol: resident_lut, load -> Visit (ready now, wait() for the rest),
the lookahead read behind a visit, groups, and observers (trace, heat).

Real parts: a tiny checkpoint on disk, the real fetcher and its worker processes; the reader is
only wrapped to keep the order of its submits.
"""

import numpy as np
import pytest

from moed.daemon.engine.checkpoint import expert_index
from moed.daemon.engine.experts import HEAT_DECAY, ExpertStore, Heat
from moed.daemon.engine.generate import SamplingParams, run
from moed.daemon.engine.loader import load_paged
from moed.daemon.io.fetcher import Fetcher
from moed.daemon.tools.trace import Recorder


class Ordered:
    """The real fetcher, keeping the ranges of each submit in order."""

    def __init__(self, fetcher: Fetcher):
        self.fetcher, self.submits, self.files = fetcher, [], fetcher.files

    def submit(self, ranges):
        self.submits.append(list(ranges))
        return self.fetcher.submit(ranges)

    def wait(self, ticket):
        return self.fetcher.wait(ticket)


class Visits:
    """An observer keeping every visit it is told of."""

    every_visit = False

    def __init__(self):
        self.seen = []

    def visit(self, layer, experts, decode):
        self.seen.append((layer, experts.tolist(), decode))


@pytest.fixture
def make_store(tiny_models, tmp_path):
    """`make_store(n_slots) -> (store, reader, holds)` over the tiny mixtral (4 MoE layers of 16
    experts); `holds(layer, expert, slot)`: that slot holds the expert's bytes, as on disk."""
    table, layers, _ = expert_index(tiny_models["mixtral"])
    started = []

    def make(n_slots):
        f = Fetcher([str(p) for p in table.files], workers=2, staging_bytes=4 << 20, runtime_dir=tmp_path).start()
        started.append(f)
        reader = Ordered(f)
        store = ExpertStore(layers, n_slots, reader)
        return store, reader, lambda layer, expert, slot: on_disk(store, table.files, layer, expert, slot)

    yield make
    for f in started:
        f.close()


def on_disk(store: ExpertStore, files, layer: int, expert: int, slot: int) -> bool:
    for pool, (fi, off, n) in zip(store.pools[layer], store.layers[layer].ranges(expert)):
        with open(files[fi], "rb") as f:
            f.seek(off)
            if np.array(pool.array[int(slot)]).tobytes() != f.read(n):
                return False
    return True


def pairs(*tokens):
    """The routing of one sequence: each token's chosen experts, shape (1, tokens, k)."""
    return np.array([list(tokens)], dtype=np.int64)


def test_load_on_misses_hits_and_both(make_store):
    store, reader, holds = make_store([4] * 4)
    v = store.load(0, pairs([3, 5]))  # nothing resident
    assert not v.all_ready and not v.ready.any() and (v.slots == -1).all() and v.groups is None
    at = v.wait()
    assert at.shape == (1, 1, 2) and (at >= 0).all() and at[0, 0, 0] != at[0, 0, 1]
    assert holds(0, 3, at[0, 0, 0]) and holds(0, 5, at[0, 0, 1])
    st = store.stats
    assert (st.hits, st.misses, st.bytes_read) == (0, 2, 2 * store.layers[0].expert_nbytes)
    slot5 = at[0, 0, 1]

    v = store.load(0, pairs([5, 9]))  # 5 resident and ready now, 9 read by wait()
    assert v.ready.tolist() == [[[True, False]]] and v.slots[0, 0, 0] == slot5 and v.slots[0, 0, 1] == -1
    at = v.wait()
    assert at[0, 0, 0] == slot5 and holds(0, 9, at[0, 0, 1])
    assert (st.hits, st.misses, st.layer_hits[0], st.layer_misses[0]) == (1, 3, 1, 3)

    n_reads = len(reader.submits)
    v = store.load(0, np.array([[[9, 5]], [[5, 3]]]))  # a batch of two decode steps, all resident
    assert v.all_ready and (v.slots >= 0).all()
    np.testing.assert_array_equal(v.wait(), v.slots)
    assert len(reader.submits) == n_reads and (st.hits, st.misses) == (4, 3)  # distinct experts
    with pytest.raises(RuntimeError, match="already finished"):
        v.wait()


def test_resident_lut_only_for_a_full_layer(make_store):
    store, _, holds = make_store([16, 4, 4, 4])
    assert store.resident_lut(0, 8) is None  # nothing resident yet: load() it
    store.ensure(0, np.arange(16))
    hits = store.stats.hits
    lut = np.array(store.resident_lut(0, 8))
    assert sorted(lut.tolist()) == list(range(16)) and all(holds(0, e, lut[e]) for e in (0, 7, 15))
    assert store.stats.hits == hits + 8 and store.stats.layer_hits[0] == hits + 8
    assert store.resident_lut(1, 8) is None  # 4 slots for 16 experts: never full


def test_lookahead_read_is_queued_behind_and_settled_by_the_next_visit(make_store):
    store, reader, holds = make_store([4, 4, 16, 4])
    store.load(0, pairs([1, 2]), ahead=np.array([[[8, 7]]])).wait()
    layers = store.layers
    assert reader.submits == [layers[0].ranges(1) + layers[0].ranges(2),  # the layer's own read first
                              layers[1].ranges(7) + layers[1].ranges(8)]  # then the next layer's
    assert (store.stats.misses, store.stats.prefetched) == (2, 2)
    v = store.load(1, pairs([8, 7]))
    assert v.all_ready  # and settled: the bytes are in place before anything computes
    assert holds(1, 8, v.slots[0, 0, 0]) and holds(1, 7, v.slots[0, 0, 1])
    v.wait()
    st = store.stats
    assert (st.hits, st.misses, st.prefetch_used) == (2, 2, 2)

    # an ahead read that completes a layer: its fast path settles it first
    store.ensure(2, np.arange(14))
    store.load(1, pairs([7, 8]), ahead=np.array([[[14, 15]]])).wait()
    lut = store.resident_lut(2, 2)
    assert lut is not None and holds(2, 14, np.array(lut)[14]) and holds(2, 15, np.array(lut)[15])


def test_groups_when_a_visit_needs_more_experts_than_slots(make_store):
    store, _, holds = make_store([4] * 4)
    idx = pairs([0, 1], [2, 3], [4, 5], [1, 6])  # a prompt of 4 tokens: 7 experts for 4 slots
    v = store.load(3, idx)
    assert not v.all_ready and v.groups is not None and len(v.groups) == 2
    flat, seen = idx.reshape(-1), []
    for rows, at in v.by_group():
        assert all(holds(3, flat[r], at[r]) for r in rows)  # resident while the group computes
        seen += rows.tolist()
    assert sorted(seen) == list(range(flat.size))  # each pair exactly once
    assert store.stats.misses == 7


def test_observers_are_told_each_visit(make_store):
    store, _, _ = make_store([4] * 4)
    seen = store.observe(Visits())
    store.ensure(2, np.array([0, 1]))  # warm-up style: not a visit
    store.load(0, pairs([3, 1])).wait()  # misses
    store.load(0, pairs([3, 1])).wait()  # all resident: still a visit
    store.load(1, pairs([0, 1], [2, 1], [0, 3])).wait()  # a prompt of three tokens: not decode
    v = store.load(3, pairs([0, 1], [2, 3], [4, 5]))
    for _ in v.by_group():
        pass
    assert seen.seen == [(0, [1, 3], True), (0, [1, 3], True), (1, [0, 1, 2, 3], False),
                         (3, [0, 1, 2, 3, 4, 5], False)]

    heat = store.observe(Heat([16] * 4))
    store.load(1, pairs([2, 5])).wait()
    assert heat.values[1, 2] == heat.values[1, 5] == 1 and heat.values.sum() == 2
    store.load(0, pairs([3, 1])).wait()  # layer 0 starts a model step: decay, then count
    assert heat.values[1, 2] == pytest.approx(HEAT_DECAY) and heat.values[0, 3] == 1
    assert len(seen.seen) == 6  # both observers told
    store.unobserve(seen)
    store.load(0, pairs([3, 1])).wait()
    assert len(seen.seen) == 6 and heat.values[0, 3] == pytest.approx(1 + HEAT_DECAY)


def test_no_recording_observer_keeps_the_fast_path(make_store):
    """No observer (or only heat): a full layer answers resident_lut with no host sync. A recording
    (every_visit) turns it off so that every visit reaches the host, and on again once removed."""
    store, _, _ = make_store([16, 4, 4, 4])
    store.ensure(0, np.arange(16))
    assert not store.recording and store.resident_lut(0, 2) is not None
    store.observe(Heat([16] * 4))
    assert not store.recording and store.resident_lut(0, 2) is not None
    rec = store.observe(Recorder())
    assert store.recording and store.resident_lut(0, 2) is None
    v = store.load(0, pairs([4, 9]))
    assert v.all_ready
    v.wait()
    assert rec.steps == [(0, [4, 9])]
    store.unobserve(rec)
    assert not store.recording and store.resident_lut(0, 2) is not None


def test_a_fully_resident_model_visits_only_when_recorded(tiny_models):
    """Through the real model: with every expert resident, heat sees no visit (each layer takes the
    fast path), while a recording sees every decode visit of every layer; outputs are the same."""
    params = SamplingParams(max_tokens=6)
    with load_paged(tiny_models["mixtral"], cache_fraction=1.0, workers=1) as pm:
        heat = pm.store.observe(Heat(pm.info["experts_per_layer"]))
        plain = run(pm.model, pm.tokenizer, [7], params)
        assert heat.values.sum() == 0 and pm.store.stats.misses == 0 and pm.store.stats.hits > 0
        rec = pm.store.observe(Recorder())
        recorded = run(pm.model, pm.tokenizer, [7], params)
        pm.store.unobserve(rec)
    assert recorded.tokens == plain.tokens
    n_layers = pm.info["moe_layers"]
    assert len(rec.steps) >= len(plain.tokens) * n_layers
    assert [layer for layer, _ in rec.steps[:n_layers]] == list(range(n_layers))
    assert heat.values.sum() > 0  # it saw the recorded visits
