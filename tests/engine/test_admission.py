"""Memory admission (daemon/engine/admission.py): the per-token KV figure from a real tiny model's
config is what mlx-lm allocates; requests beyond the budget wait until running ones release theirs;
one that never fits gets a message with the figures."""

from __future__ import annotations

import inspect
from collections import deque

import mlx.core as mx
import pytest
from mlx_lm.models.cache import BatchKVCache, KVCache, make_prompt_cache

from moed.daemon.engine.admission import KV_STEP, Admission, kv_bytes_per_token, prefill_bytes
from moed.daemon.engine.checkpoint import lazy_model
from moed.daemon.engine.core import EngineCore
from moed.daemon.engine.loader import load_paged
from moed.daemon.tools.plan import read_checkpoint
from moed.ipc.messages import Finished, Generate


@pytest.mark.parametrize("arch", ["qwen3_moe", "qwen3_5_moe"])  # qwen3_5_moe: hybrid, some layers without KV
def test_kv_per_token_is_what_mlx_lm_allocates(tiny_model, arch):
    path = tiny_model(arch)
    ck = read_checkpoint(path)
    net, config = lazy_model(path)
    cache = make_prompt_cache(net)
    assert ck.attn_layers == sum(isinstance(c, KVCache) for c in cache)
    if arch == "qwen3_5_moe":
        assert ck.attn_layers < len(cache)  # only the attention layers count
    mx.eval(net(mx.zeros((1, KV_STEP), dtype=mx.int32), cache=cache))
    kv = sum(c.nbytes for c in cache if isinstance(c, KVCache))
    per_token = kv_bytes_per_token(config, ck.attn_layers, 4)  # float32 checkpoint
    assert per_token * KV_STEP == kv
    adm = Admission.for_model(config, ck.attn_layers, 10**9, 64, 4)
    fixed, scores = prefill_bytes(config, 64, 4)
    need = adm.need(100, 20)  # 120 tokens: one 256-token KV allocation
    assert need.kv == kv and need.prefill == fixed + scores * 100 and fixed > 0 and scores > 0


def test_requests_beyond_the_budget_wait_until_running_ones_finish():
    adm = Admission(budget_bytes=3 * 1000 * KV_STEP + 1, kv_bytes_per_token=1000, prefill_bytes=0)
    waiting, running = deque(f"r{i}" for i in range(5)), []

    def admit():  # FIFO, as the engine's waiting queue: the head waits until it fits
        while waiting and adm.fits(KV_STEP - 10, 10):
            adm.reserve(rid := waiting.popleft(), KV_STEP - 10, 10)
            running.append(rid)

    admit()
    assert running == ["r0", "r1", "r2"] and list(waiting) == ["r3", "r4"]
    assert adm.reserved == 3 * 1000 * KV_STEP and not adm.fits(1, 1)
    adm.release("r1")
    admit()
    assert running == ["r0", "r1", "r2", "r3"] and list(waiting) == ["r4"]
    adm.release("r0")
    adm.release("r2")
    admit()
    assert not waiting and adm.status()["requests"] == 2
    adm.clear()
    assert adm.reserved == 0


def test_a_batch_of_mixed_lengths_holds_each_padded_to_the_longest():
    """mlx-lm's BatchKVCache pads every sequence to the longest: a short request beside a long one
    holds the long one's KV (was: the sum of their own, less than mlx-lm allocates)."""
    heads, dim, short, long = 2, 8, 100, 600
    per_token = 2 * heads * dim * 4  # one layer, float32
    caches = []
    for n in (short, long):
        c = BatchKVCache([0])
        c.update_and_fetch(mx.zeros((1, heads, n, dim)), mx.zeros((1, heads, n, dim)))
        caches.append(c)
    caches[0].extend(caches[1])  # the long one joins the running batch
    mx.eval(caches[0].keys, caches[0].values)
    allocated = caches[0].keys.nbytes + caches[0].values.nbytes
    adm = Admission(budget_bytes=allocated, kv_bytes_per_token=per_token, prefill_bytes=0)
    adm.reserve("short", short, 0)
    assert adm.fits(long, 0)  # exactly what mlx-lm allocates for the two
    adm.reserve("long", long, 0)
    assert adm.reserved == allocated > adm.need(short, 0).kv + adm.need(long, 0).kv
    assert not adm.fits(1, 0)  # a third sequence, however short, is padded to 600 too
    adm.release("long")
    assert adm.reserved == adm.need(short, 0).kv


def test_prefill_activations_are_held_until_the_prompt_is_prefilled():
    adm = Admission(budget_bytes=1000 * KV_STEP * 2 + 5000, kv_bytes_per_token=1000, prefill_bytes=4000,
                    score_bytes_per_token=10)
    adm.reserve("a", 100, 50)  # KV 256 tokens + prefill 4000 + 10 x 100
    assert adm.reserved == 1000 * KV_STEP + 5000
    assert not adm.fits(100, 50)  # a second one's prefill does not fit beside the first's
    adm.prefilled("a")
    assert adm.reserved == 1000 * KV_STEP and adm.fits(100, 50)
    adm.release("a")
    adm.release("unknown")  # releasing twice, or what was never reserved, is harmless
    assert adm.reserved == 0


def test_a_request_that_never_fits_is_named_with_its_figures():
    adm = Admission(budget_bytes=50_000_000, kv_bytes_per_token=4096, prefill_bytes=2_000_000)
    assert adm.never_fits(1000, 1000) is None
    msg = adm.never_fits(16_000, 384)  # 16384 tokens x 4096 = 67 MB of KV
    assert msg is not None and "67 MB" in msg and "50 MB" in msg and "16000 tokens" in msg
    assert "--kv-budget-gb" in msg


def test_for_loaded_budget_from_the_option_and_the_loaded_model(tiny_model):
    with load_paged(tiny_model("qwen3_5_moe"), cache_fraction=0.5, workers=1) as pm:
        given = Admission.for_loaded(pm, 512, 0.25, prompt_cache_bytes=0, workers=1)
        auto = Admission.for_loaded(pm, 512, None, prompt_cache_bytes=100_000_000, workers=1)
    ck = read_checkpoint(tiny_model("qwen3_5_moe"))
    assert given.budget == 250_000_000
    assert given.kv_per_token == kv_bytes_per_token(ck.config, ck.attn_layers, 4)
    assert 0 < auto.budget  # what is available now, less the prompt cache and the runtime


@pytest.mark.skipif("admission" not in inspect.signature(EngineCore).parameters,
                    reason="EngineCore does not take admission= yet (the lead applies it)")
def test_engine_core_queues_until_memory_frees_and_rejects_what_never_fits(tiny_model):
    from moed.daemon.engine.core import RequestRejected

    with load_paged(tiny_model("qwen3_moe"), cache_fraction=0.5, workers=1) as pm:
        ck = read_checkpoint(pm.path)
        per_token = kv_bytes_per_token(pm.config, ck.attn_layers, 4)
        adm = Admission(per_token * KV_STEP * 2, per_token, 0)  # room for two short requests
        core = EngineCore(pm.model, pm.tokenizer, max_batch=4, max_queue=8, context=1024, admission=adm)
        with pytest.raises(RequestRejected, match="budget"):
            core.add(Generate("big", prompt="hi " * 300, max_tokens=300))
        for i in range(4):
            core.add(Generate(str(i), prompt="The paged expert cache", max_tokens=8))
        peak, done = 0, []
        while core.has_work():
            for ev in core.step():
                if isinstance(ev, Finished):
                    done.append(ev.req_id)
            peak = max(peak, len(adm.held))
            assert adm.reserved <= adm.budget
        assert peak == 2 and sorted(done) == ["0", "1", "2", "3"] and adm.reserved == 0
        for i in range(3):  # the third waits; aborted there, it leaves no trace
            core.add(Generate(f"w{i}", prompt="The paged expert cache", max_tokens=8))
        assert [r.state for r in core.snapshot().requests] == ["prefill", "prefill", "waiting"]
        (fin,) = core.abort("w2")
        assert fin.reason == "abort" and not core.waiting and len(adm.held) == 2
        core.shutdown()
        assert adm.reserved == 0 and not core.requests


def test_the_daemon_gives_its_core_the_budget(tiny_model):
    from moed.daemon.service.supervisor import DaemonConfig, new_core
    from moed.ipc.config import ServingConfig

    with load_paged(tiny_model("qwen3_moe"), cache_fraction=0.5, workers=1) as pm:
        cfg = DaemonConfig(str(pm.path), serving=ServingConfig(kv_budget_gb=0.125, prefill_chunk=128))
        core = new_core(cfg, pm, None)
        auto = new_core(DaemonConfig(str(pm.path)), pm, None)
    ck = read_checkpoint(pm.path)
    want = Admission.for_model(pm.config, ck.attn_layers, 125_000_000, 128, 4)
    assert core.admission.budget == 125_000_000
    assert (core.admission.kv_per_token, core.admission.prefill) == (want.kv_per_token, want.prefill)
    assert 0 < auto.admission.budget < core.admission.budget * 10**4


@pytest.mark.slow
@pytest.mark.skipif("admission" not in inspect.signature(EngineCore).parameters,
                    reason="EngineCore does not take admission= yet (the lead applies it)")
def test_a_daemon_under_a_kv_budget_queues_concurrent_requests_and_rejects_a_huge_one(tiny_model, tmp_path):
    import threading

    from daemon_util import env_for, moed

    from moed.client.client import Client, RequestRejected

    model = tiny_model("qwen3_moe")
    ck = read_checkpoint(model)
    room = 2 * kv_bytes_per_token(ck.config, ck.attn_layers, 4) * KV_STEP
    adm = Admission.for_model(ck.config, ck.attn_layers, 0, 64, 4)
    budget = room + 2 * adm.need(32, 32).prefill  # two short requests at a time
    env = env_for(tmp_path / "rt")
    moed(env, "start", "--model", str(model), "--cache-fraction", "0.5", "--prefill-chunk", "64",
         "--kv-budget-gb", f"{budget / 1e9:.9f}", "--prompt-cache-gb", "0")
    try:
        results, errors = {}, []

        def one(i):
            try:
                with Client(str(tmp_path / "rt")) as c:
                    results[i] = c.complete("The paged expert cache", max_tokens=24)[2]
            except Exception as e:  # noqa: BLE001 - reported below
                errors.append(e)

        threads = [threading.Thread(target=one, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert not errors and len(results) == 6 and all(f.completion_tokens == 24 for f in results.values())
        with Client(str(tmp_path / "rt")) as c:
            with pytest.raises(RequestRejected) as e:
                c.complete("hi " * 600, max_tokens=200)
            assert "budget" in e.value.reason and "MB" in e.value.reason
            assert c.complete("hi", max_tokens=4)[2].completion_tokens == 4  # and it serves on
    finally:
        moed(env, "stop")
