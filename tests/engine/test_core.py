"""The engine core in-process (no sockets): batching, admission, stop conditions, aborts."""

import pytest

from moed.daemon.engine.core import EngineCore, RequestRejected
from moed.daemon.engine.generate import SamplingParams, run
from moed.daemon.engine.loader import load_paged
from moed.ipc.messages import Finished, Generate, Token

PROMPTS = ["The paged expert cache", "Once upon a time, in a land of small memories and large models,",
           "def fetch(layer, expert):", "hi"]


@pytest.fixture(scope="module")
def paged(tiny_models):
    with load_paged(tiny_models["qwen3_moe"], cache_fraction=0.25) as pm:
        yield pm


@pytest.fixture
def core(paged):
    return EngineCore(paged.model, paged.tokenizer, max_batch=4, max_queue=4, context=256)


def drain(core) -> dict:
    out = {}
    while core.has_work():
        for ev in core.step():
            rec = out.setdefault(ev.req_id, {"tokens": [], "text": "", "end": None})
            if isinstance(ev, Token):
                rec["tokens"].append(ev.token)
                rec["text"] += ev.text
            else:
                rec["end"] = ev
    return out


def test_batch_equals_alone_and_mlx_lm_stream(core, paged):
    alone = {}
    for i, p in enumerate(PROMPTS):
        core.add(Generate(str(i), prompt=p, max_tokens=32))
        alone.update(drain(core))
    for i, p in enumerate(PROMPTS):
        core.add(Generate(str(i), prompt=p, max_tokens=32))
    batched = drain(core)
    assert core.totals["peak_active"] == len(PROMPTS)
    for i, p in enumerate(PROMPTS):
        assert batched[str(i)]["tokens"] == alone[str(i)]["tokens"]
        assert batched[str(i)]["end"].reason == "length"
        # and both equal mlx-lm's own stream_generate on the same paged model
        ref = run(paged.model, paged.tokenizer, p, SamplingParams(max_tokens=32))
        assert alone[str(i)]["tokens"] == ref.tokens
        assert alone[str(i)]["text"] == ref.text


def test_join_mid_batch_and_mixed_sampling(core):
    core.add(Generate("g", prompt=PROMPTS[1], max_tokens=24))
    ref = drain(core)["g"]["tokens"]
    core.add(Generate("r", prompt=PROMPTS[0], max_tokens=40, temperature=1.0, seed=3))
    early = 0
    while early < 3:
        early += sum(isinstance(ev, Token) for ev in core.step())
    core.add(Generate("g", prompt=PROMPTS[1], max_tokens=24))  # joins a running batch
    out = drain(core)
    assert out["g"]["tokens"] == ref
    assert len(out["r"]["tokens"]) == 37  # 3 tokens were consumed before drain


def test_stop_string_and_abort(core):
    core.add(Generate("a", prompt=PROMPTS[0], max_tokens=20))
    full = drain(core)["a"]["text"]
    stop = full[5:8]
    core.add(Generate("a", prompt=PROMPTS[0], max_tokens=20, stop=[stop]))
    out = drain(core)["a"]
    assert out["end"].reason == "stop" and out["text"] == full[: full.find(stop)]
    assert out["end"].stop_sequence == stop
    core.add(Generate("b", prompt=PROMPTS[2], max_tokens=50))
    core.add(Generate("c", prompt=PROMPTS[3], max_tokens=10))
    core.step()
    (ev,) = core.abort("b")
    assert isinstance(ev, Finished) and ev.reason == "abort"
    out = drain(core)
    assert "b" not in out and out["c"]["end"].reason == "length"
    assert core.totals["aborted"] == 1 and not core.has_work()


@pytest.mark.parametrize("req,code,match", [
    (Generate("x", prompt="hi", max_tokens=0), "bad_request", "max_tokens"),
    (Generate("x", max_tokens=5), "bad_request", "prompt or messages"),
    (Generate("x", prompt="", max_tokens=5), "bad_request", "empty"),
    (Generate("x", prompt="hi", temperature=-1), "bad_request", "temperature"),
    (Generate("x", messages=[{"role": "wizard", "content": "hi"}]), "bad_request", "chat message"),
    (Generate("x", prompt="word " * 400), "context_length_exceeded", "context of 256"),
    (Generate("x", prompt="word " * 100, max_tokens=200), "context_length_exceeded", "max_tokens 200"),
    (Generate("x", prompt="hi", top_k=-1), "bad_request", "top_k"),
    (Generate("x", prompt="hi", logit_bias=[(10 ** 7, 1.0)]), "bad_request", "logit_bias"),
    (Generate("x", prompt="hi", logprobs=21), "bad_request", "top_logprobs"),
])
def test_bad_requests_are_rejected_with_reason(core, req, code, match):
    with pytest.raises(RequestRejected, match=match) as e:
        core.add(req)
    assert e.value.code == code and not core.has_work()


def test_queue_full_rejects_and_recovers(core):
    for i in range(4):
        core.add(Generate(str(i), prompt="hi", max_tokens=4))
    with pytest.raises(RequestRejected, match="queue full") as e:
        core.add(Generate("5", prompt="hi", max_tokens=4))
    assert e.value.code == "rejected"
    assert len(drain(core)) == 4
    core.add(Generate("5", prompt="hi", max_tokens=4))
    assert drain(core)["5"]["end"].completion_tokens == 4


def test_chat_template(core, paged):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}]
    ids = paged.tokenizer.apply_chat_template(msgs, add_generation_prompt=True)
    core.add(Generate("c", messages=msgs, max_tokens=6))
    out = drain(core)["c"]
    assert out["end"].prompt_tokens == len(ids)
