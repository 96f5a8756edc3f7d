"""The prefill pacer: its feedback loop on step times, and the engine sizing chunks with it."""

from mlx_lm.generate_utils import BatchStats

from moed.daemon.engine.core import EngineCore
from moed.daemon.engine.loader import load_paged
from moed.daemon.engine.pacer import PrefillPacer
from moed.ipc.messages import Finished, Generate, Token


def step(p: PrefillPacer, decode_s: float, fixed_s: float, token_s: float, decoding: bool = True) -> int:
    """One step of a machine whose prefill costs fixed + n x token seconds; returns the chunk used."""
    n = p.chunk(decoding)
    prompt_s = fixed_s + n * token_s
    p.observe(BatchStats(prompt_tokens=n, prompt_time=prompt_s, generation_tokens=int(decoding),
                         generation_steps=int(decoding), decode_time=decode_s if decoding else 0.0,
                         wall_time=prompt_s + (decode_s if decoding else 0.0)))
    return n


def test_nothing_decoding_gets_the_largest_chunk():
    p = PrefillPacer(512, 2.0)
    assert [step(p, 0.008, 0.008, 0.003, decoding=False) for _ in range(3)] == [512] * 3


def test_the_chunk_converges_to_the_budget_whatever_the_fixed_cost():
    for fixed, token in ((0.0, 0.001), (0.008, 0.0025), (0.004, 0.0001)):
        p = PrefillPacer(512, 2.0)
        for _ in range(40):
            n = step(p, 0.008, fixed, token)
        target = (2.0 * 0.008 - fixed) / token  # prefill time = budget x decode time
        assert abs(n - target) <= max(1.0, 0.1 * target), (fixed, token, n, target)


def test_it_moves_at_most_2x_a_step_and_never_below_one_token():
    p = PrefillPacer(512, 2.0)
    seen = [step(p, 0.008, 0.0, 0.00001) for _ in range(12)]  # prefill nearly free: grows to the largest
    assert all(b <= 2 * a + 1 for a, b in zip(seen, seen[1:])) and seen[-1] == 512
    for _ in range(20):
        n = step(p, 0.008, 0.05, 0.01)  # a chunk's fixed cost alone is over the budget: one token a step
    assert n == 1


def test_a_stream_decoding_gets_paced_chunks_and_the_tokens_stay_exact(tiny_models):
    """B's long prompt arrives while A decodes: B is prefilled in chunks below the largest while A runs,
    in the largest once A is done, and both get the tokens they get alone with fixed chunks."""
    with load_paged(tiny_models["qwen3_moe"], cache_fraction=0.25) as pm:
        long_prompt = " ".join(f"page {i} of the expert cache" for i in range(120))

        def run(budget: float) -> tuple[dict, list[int]]:
            core = EngineCore(pm.model, pm.tokenizer, max_batch=4, max_queue=4, context=4096, prefill_chunk=256,
                              prefill_budget=budget)
            core.add(Generate("a", prompt="Once upon a time", max_tokens=160))
            out, chunks = {"a": [], "b": []}, []
            while core.has_work():
                if "b" not in core.requests and len(out["a"]) == 4 and not out["b"]:
                    core.add(Generate("b", prompt=long_prompt, max_tokens=8))
                b_prefilling = "b" in core.requests and not core.requests["b"].t_first
                for ev in core.step():
                    if isinstance(ev, Token):
                        out[ev.req_id].append(ev.token)
                    elif isinstance(ev, Finished):
                        assert ev.reason == "length", ev
                if b_prefilling:
                    chunks.append(core.gen.prefill_step_size)
            return out, chunks

        paced, chunks = run(2.0)
        fixed, fixed_chunks = run(0.0)
        assert set(fixed_chunks) == {256}
        assert paced == fixed
        assert min(chunks) < 256 and len(chunks) > len(fixed_chunks), chunks
