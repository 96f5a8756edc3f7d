"""`moed plan`: header-only figures match what loading really takes; configurations that cannot fit
are refused before anything is read."""

from __future__ import annotations

import json

import mlx.core as mx
import pytest
from daemon_util import env_for, moed
from mlx_lm.models.cache import KVCache, make_prompt_cache

from moed.daemon.engine.loader import load_paged
from moed.daemon.tools.plan import (Machine, forecast, layer_s, load_machine, make_plan, measure_profile,
                                    measured_machine, trace_hit_rate)
from moed.daemon.tools.policy import simulate
from moed.daemon.tools.tracesynth import synth


def test_plan_matches_the_loaded_model(tiny_model):
    model = tiny_model("qwen3_5_moe")
    plan = make_plan(model, cache_fraction=0.5, context=256, max_batch=1)
    with load_paged(model, cache_fraction=0.5, workers=1) as pm:
        assert plan.non_expert_bytes == pm.non_expert_bytes
        assert plan.cache_bytes == pm.info["cache_bytes"]
        assert plan.slots_per_layer == pm.info["slots_per_layer"]
        assert plan.expert_bytes == pm.expert_bytes
        cache = make_prompt_cache(pm.model)
        mx.eval(pm.model(mx.zeros((1, 256), dtype=mx.int32), cache=cache))
        kv = sum(c.nbytes for c in cache if isinstance(c, KVCache))
    assert plan.kv_bytes == kv  # 256 tokens of KV cache, as mlx-lm allocates it


def test_forecast_orders_cache_sizes_and_profile_is_measured(tiny_model):
    model = tiny_model("qwen3_moe")
    profile = measure_profile(model, read_mb=4, cold=False)  # dropping the page cache would disturb other tests
    assert profile["expert_layer_s"] > 0 and profile["disk_gbps"] > 0
    plans = [make_plan(model, cache_fraction=f) for f in (1.0, 0.5, 0.25)]
    tps = [forecast(p, measured_machine(p, profile))["decode_tps"] for p in plans]
    assert tps[0] >= tps[1] >= tps[2] > 0


def test_configurations_that_do_not_fit_are_refused(tiny_model, tmp_path):
    model = str(tiny_model("qwen3_moe"))
    env = env_for(tmp_path / "rt")
    out = moed(env, "plan", "--model", model, "--ram", "0.1", "--no-measure", "--json", check=False)
    doc = json.loads(out.stdout)
    assert out.returncode == 1 and not doc["fits"] and doc["total_bytes"] > 0.1e9
    assert doc["largest_fitting_fraction"] is None
    small = dict(env, MOED_RAM_GB="0.2")  # what `available` reports, for this test
    gen = moed(small, "generate", "--model", model, "--prompt", "hi", check=False)
    assert gen.returncode == 2 and "needs" in gen.stderr and "available" in gen.stderr
    start = moed(small, "start", "--model", model, check=False)
    assert start.returncode == 1 and "needs" in start.stderr + start.stdout
    assert not (tmp_path / "rt" / "daemon.json").exists()


def test_plan_counts_the_prompt_cache(tiny_model):
    from moed.daemon.engine.prompt_cache import default_bytes

    model = tiny_model("qwen3_moe")
    given = make_plan(model, cache_fraction=0.5, context=256, prompt_cache_gb=0.5, ram_gb=8)
    off = make_plan(model, cache_fraction=0.5, context=256, prompt_cache_gb=0, ram_gb=8)
    assert given.prompt_cache_bytes == 500_000_000 and off.prompt_cache_bytes == 0
    assert given.total_bytes - off.total_bytes == 500_000_000
    assert "prompt cache" in [name for name, *_ in given.lines()]
    auto = make_plan(model, cache_fraction=0.5, context=256, ram_gb=8)  # what the daemon sizes itself
    assert auto.prompt_cache_bytes == default_bytes(auto.non_expert_bytes + auto.cache_bytes, 8_000_000_000)


def test_plan_counts_kv_for_max_batch_sequences_and_a_prefill_chunk(tiny_model, tmp_path):
    model = tiny_model("qwen3_5_moe")
    one = make_plan(model, cache_fraction=0.5, context=256, max_batch=1, ram_gb=8)
    eight = make_plan(model, cache_fraction=0.5, context=256, max_batch=8, ram_gb=8)
    long = make_plan(model, cache_fraction=0.5, context=1024, max_batch=8, ram_gb=8)
    assert one.kv_bytes > 0 and eight.kv_bytes == 8 * one.kv_bytes and long.kv_bytes == 4 * eight.kv_bytes
    assert eight.prefill_bytes > one.prefill_bytes > 0 and long.prefill_bytes > eight.prefill_bytes
    small = make_plan(model, cache_fraction=0.5, context=1024, max_batch=8, prefill_chunk=64, ram_gb=8)
    assert small.prefill_bytes < long.prefill_bytes and small.prefill_chunk == 64
    assert long.total_bytes - one.total_bytes == (long.kv_bytes + long.prefill_bytes
                                                  - one.kv_bytes - one.prefill_bytes)
    names = [name for name, *_ in long.lines()]
    assert "KV cache" in names and "prefill activations" in names
    out = moed(env_for(tmp_path / "rt"), "plan", "--model", str(model), "--context", "1024", "--max-batch", "8",
               "--no-measure", "--json", "--ram", "8", check=False)
    doc = json.loads(out.stdout)
    assert doc["kv_bytes"] == long.kv_bytes and doc["max_batch"] == 8 and doc["prefill_chunk"] == 512
    text = moed(env_for(tmp_path / "rt"), "plan", "--model", str(model), "--context", "1024", "--max-batch", "8",
                "--no-measure", "--ram", "8", check=False).stdout
    assert "8 sequences x 1024 tokens" in text and "prefill activations" in text


M3 = {"name": "M3 Max", "memory_gb": 48, "disk_gbps": 17.5, "expert_gbps": 300, "copy_gbps": 100, "dense_ms": 1.68}


def _write(path, doc):
    path.write_text(json.dumps(doc))
    return str(path)


def test_plan_forecasts_another_machine_on_a_routing_trace(tiny_model, tmp_path):
    """`--profile` (nothing measured here) and `--trace` (its hit rate under --eviction at the plan's
    slots): the forecast is plan.layer_s at the simulator's hit rate; a trace with more reuse
    forecasts more tok/s; uniform routing without --trace."""
    model = tiny_model("qwen3_moe")
    plan = make_plan(model, cache_fraction=0.5, ram_gb=48)
    L, E, k = plan.moe_layers, plan.experts_per_layer, plan.top_k
    hot = _write(tmp_path / "hot.json", synth(E, k, L, tokens=200, seed=1, predictions=False))
    spread = {"kind": "moed-trace", "model": "uniform", "top_k": k, "num_experts": [E] * L,  # every expert in turn
              "steps": [[layer, [(t * k + j) % E for j in range(k)]] for t in range(200) for layer in range(L)]}
    uniform = _write(tmp_path / "spread.json", spread)
    prof = _write(tmp_path / "m3.json", M3)
    m = load_machine(prof)
    assert m == Machine(source=prof, **M3)
    env = env_for(tmp_path / "rt")
    docs = {}
    for name, extra in {"hot": ["--trace", hot], "spread": ["--trace", uniform], "none": [],
                        "lru": ["--trace", hot, "--eviction", "lru"]}.items():
        out = moed(env, "plan", "--model", str(model), "--cache-fraction", "0.5", "--profile", prof, "--json", *extra)
        docs[name] = json.loads(out.stdout)
    f = docs["hot"]["forecast"]
    hit = simulate(hot, "fwlru", "per_layer", 0.5)["hit_rate"]
    assert f["hit_rate"] == pytest.approx(hit) and f["routing"] == "trace"
    assert f["decode_tps"] == pytest.approx(1 / (L * layer_s(plan.expert_nbytes, m, k, hit)))
    assert docs["hot"]["ram_bytes"] == 48_000_000_000 and docs["hot"]["profile"] is None  # nothing measured
    assert f["machine"]["name"] == "M3 Max"
    assert docs["lru"]["forecast"]["hit_rate"] == pytest.approx(simulate(hot, "lru", "per_layer", 0.5)["hit_rate"])
    assert docs["spread"]["forecast"]["decode_tps"] < f["decode_tps"]  # no reuse: every expert read
    assert docs["none"]["forecast"]["routing"] == "uniform" and docs["none"]["forecast"]["hit_rate"] == 0.5
    text = " ".join(moed(env, "plan", "--model", str(model), "--profile", prof, "--trace", hot).stdout.split())
    assert "machine: M3 Max" in text and f"(routing: {hot} under fwlru)" in text


def test_plan_refuses_bad_profiles_and_traces_by_name(tiny_model, tmp_path):
    model = str(tiny_model("qwen3_moe"))
    env = env_for(tmp_path / "rt")
    plan = make_plan(model, cache_fraction=0.5, ram_gb=8)
    wrong = _write(tmp_path / "wrong.json", synth(plan.experts_per_layer * 2, plan.top_k, plan.moe_layers, tokens=8,
                                                   predictions=False))
    with pytest.raises(ValueError, match="the model has"):
        trace_hit_rate(plan, wrong, "fwlru")
    cases = {
        "missing": (["--profile", _write(tmp_path / "a.json", {k: v for k, v in M3.items() if k != "disk_gbps"})],
                    "missing disk_gbps"),
        "unknown": (["--profile", _write(tmp_path / "b.json", {**M3, "gpu": 1})], "unknown field(s) gpu"),
        "negative": (["--profile", _write(tmp_path / "c.json", {**M3, "expert_gbps": -1})], "expert_gbps must be"),
        "shape": (["--profile", _write(tmp_path / "d.json", M3), "--trace", wrong], "the model has"),
        "no forecast": (["--no-measure", "--trace", wrong], "--trace needs a forecast"),
        "eviction alone": (["--profile", _write(tmp_path / "e.json", M3), "--eviction", "lru"], "--eviction changes only"),
        "no file": (["--profile", str(tmp_path / "none.json")], "--profile"),
    }
    for name, (args, says) in cases.items():
        out = moed(env, "plan", "--model", model, *args, check=False)
        assert out.returncode == 2 and says in out.stderr, (name, out.stderr)
