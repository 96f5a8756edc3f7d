"""The prompt cache in the engine core: reused prefixes give the tokens a full prefill gives, for
attention-only (trimmable) and hybrid (Gated-DeltaNet) models, from memory and from disk."""

import pytest

from moed.daemon.engine.core import EngineCore
from moed.daemon.engine.loader import load_paged
from moed.daemon.engine.prompt_cache import DiskPrefixes, PromptCache, model_fingerprint
from moed.ipc.messages import Finished, Generate, Token

SYSTEM = "You are a careful assistant for the paged expert cache. " * 12
ARCHS = ["qwen3_moe", "qwen3_5_moe", "mixtral"]


@pytest.fixture(scope="module", params=ARCHS)
def paged(request, tiny_models):
    with load_paged(tiny_models[request.param], cache_fraction=0.25) as pm:
        yield pm


def new_core(pm, cache=None, **kw):
    return EngineCore(pm.model, pm.tokenizer, max_batch=4, max_queue=8, context=4096, prefill_chunk=64,
                      prompt_cache=cache, **kw)


def run(core, *gens) -> dict:
    for g in gens:
        core.add(g)
    out = {g.req_id: {"tokens": [], "end": None} for g in gens}
    while core.has_work():
        for ev in core.step():
            if isinstance(ev, Token):
                out[ev.req_id]["tokens"].append(ev.token)
            elif isinstance(ev, Finished):
                out[ev.req_id]["end"] = ev
    return out


def chat(*turns):
    msgs = [{"role": "system", "content": SYSTEM}]
    for i, t in enumerate(turns):
        msgs.append({"role": "user" if i % 2 == 0 else "assistant", "content": t})
    return msgs


def test_reuse_gives_the_same_tokens(paged):
    fp = model_fingerprint(paged.path)
    plain, cached = new_core(paged), new_core(paged, PromptCache(1 << 30, fp))
    convo = [chat("What is paging?"), chat("What is paging?", "It moves experts.", "And the cache?"),
             chat("Something else entirely.")]
    for i, msgs in enumerate(convo):
        for repeat in range(2):  # the second time the whole prompt (less its last token) is cached
            g = dict(req_id=f"c{i}{repeat}", messages=msgs, max_tokens=8)
            ref = run(plain, Generate(**g))[g["req_id"]]
            got = run(cached, Generate(**g))[g["req_id"]]
            assert got["tokens"] == ref["tokens"], (i, repeat)
            if repeat:
                assert got["end"].cached_tokens >= got["end"].prompt_tokens - 2  # trimmed: one less
    st = cached.snapshot().prompt_cache
    assert st.hits >= 4 and st.hit_tokens > 0
    # a second conversation shares the system prompt: reused, partially
    ends = run(cached, Generate("s", messages=chat("Unrelated question about disks."), max_tokens=4))
    assert 0 < ends["s"]["end"].cached_tokens < ends["s"]["end"].prompt_tokens - 1


def test_raw_prompt_partial_reuse_and_batch(paged):
    fp = model_fingerprint(paged.path)
    plain, cached = new_core(paged), new_core(paged, PromptCache(1 << 30, fp))
    base = SYSTEM + " Question one."
    run(cached, Generate("warm", prompt=base, max_tokens=6))
    gens = [Generate(f"b{i}", prompt=SYSTEM + f" Question {w}.", max_tokens=6)
            for i, w in enumerate(["one", "two", "three"])]
    ref = run(plain, *gens)
    got = run(cached, *[Generate(g.req_id, prompt=g.prompt, max_tokens=6) for g in gens])
    assert {k: v["tokens"] for k, v in got.items()} == {k: v["tokens"] for k, v in ref.items()}
    assert got["b0"]["end"].cached_tokens > 0


def test_bytes_stay_within_the_bound_and_evicted_prefixes_are_recomputed(paged):
    fp = model_fingerprint(paged.path)
    probe = PromptCache(1 << 30, fp)
    run(new_core(paged, probe), Generate("p", prompt=SYSTEM, max_tokens=4))
    one = probe.lru.nbytes  # roughly one prompt's entries
    bound = int(one * 1.5)
    cache = PromptCache(bound, fp)
    core, plain = new_core(paged, cache), new_core(paged)
    for i in range(4):
        run(core, Generate(f"e{i}", prompt=f"{i} " + SYSTEM, max_tokens=4))
        assert cache.lru.nbytes <= bound
    # the first prompt was evicted: recomputed, same tokens
    again = run(core, Generate("x", prompt="0 " + SYSTEM, max_tokens=6))["x"]
    assert again["tokens"] == run(plain, Generate("x", prompt="0 " + SYSTEM, max_tokens=6))["x"]["tokens"]


def test_disk_prefixes_survive_a_restart_and_never_cross_models(paged, tmp_path, tiny_models):
    fp = model_fingerprint(paged.path)
    msgs = chat("First call of the agent.")
    first = run(new_core(paged, PromptCache(1 << 30, fp, DiskPrefixes(tmp_path, fp, 1 << 30, min_tokens=32))),
                Generate("a", messages=msgs, max_tokens=6))["a"]
    disk = DiskPrefixes(tmp_path, fp, 1 << 30, min_tokens=32)  # "after a restart": a fresh index of the folder
    assert disk.entries
    restarted = new_core(paged, PromptCache(1 << 30, fp, disk))
    again = run(restarted, Generate("b", messages=chat("A later call of the agent."), max_tokens=6))["b"]
    assert again["end"].cached_tokens > 0 and disk.hits == 1
    ref = run(new_core(paged), Generate("b", messages=chat("A later call of the agent."), max_tokens=6))["b"]
    assert again["tokens"] == ref["tokens"] and first["tokens"]
    # another model's fingerprint sees nothing of this folder
    other = model_fingerprint(next(p for p in tiny_models.values() if p != paged.path))
    assert other != fp and not DiskPrefixes(tmp_path, other, 1 << 30).entries
    for e in disk.entries.values():  # nor a file of this model copied into the other model's folder
        (tmp_path / other / e.path.name).write_bytes(e.path.read_bytes())
    assert not DiskPrefixes(tmp_path, other, 1 << 30).entries


def test_a_corrupt_file_is_removed_and_the_request_succeeds(paged, tmp_path):
    fp = model_fingerprint(paged.path)
    run(new_core(paged, PromptCache(1 << 30, fp, DiskPrefixes(tmp_path, fp, 1 << 30, min_tokens=32))),
        Generate("a", messages=chat("Corrupt me."), max_tokens=4))
    files = sorted((tmp_path / fp).glob("*.safetensors"))
    assert files
    for f in files:  # same size, flipped bytes at the end (tensor data, not the header)
        data = bytearray(f.read_bytes())
        data[-8:] = bytes(b ^ 0xFF for b in data[-8:])
        f.write_bytes(bytes(data))
    disk = DiskPrefixes(tmp_path, fp, 1 << 30, min_tokens=32)
    core = new_core(paged, PromptCache(1 << 30, fp, disk))
    out = run(core, Generate("b", messages=chat("Corrupt me."), max_tokens=6))["b"]
    ref = run(new_core(paged), Generate("b", messages=chat("Corrupt me."), max_tokens=6))["b"]
    assert out["tokens"] == ref["tokens"] and out["end"].cached_tokens == 0
    assert disk.refused == len(files)  # each tried, refused, removed; the request wrote good ones again
    fresh = DiskPrefixes(tmp_path, fp, 1 << 30, min_tokens=32)
    assert fresh.entries and all(fresh.load(e) is not None for e in list(fresh.entries.values()))


def test_seeded_request_is_the_same_alone_and_in_a_batch(paged):
    core = new_core(paged)
    g = dict(prompt="Once upon a time", max_tokens=16, temperature=1.0, seed=1234)
    alone = run(core, Generate("s", **g))["s"]["tokens"]
    others = [Generate(f"o{i}", prompt=f"Other prompt {i}", max_tokens=16, temperature=1.0, seed=i)
              for i in range(3)]
    batch = run(core, Generate("s", **g), *others)
    assert batch["s"]["tokens"] == alone
    assert run(core, Generate("t", **{**g, "seed": 99}))["t"]["tokens"] != alone
