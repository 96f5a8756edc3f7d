"""The grammar engine (llguidance) as a per-request logits processor: exact masks, outputs that parse and
validate on a random-weight model, several grammars in one batch, refusals by name, and the daemon."""

import json
import threading

import jsonschema
import mlx.core as mx
import pytest
from daemon_util import http_daemon

from moed.daemon.engine.grammar import GrammarError, make_processor
from moed.daemon.engine.sampling import BadSampling, processors
from moed.ipc.messages import Generate

SCHEMA = {
    "type": "object",
    "properties": {
        "ok": {"type": "boolean"},
        "n": {"type": "integer", "minimum": 0, "maximum": 99},
        "color": {"enum": ["red", "green", "blue"]},
        "tag": {"type": "string", "maxLength": 6},
        "xs": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9}, "maxItems": 3},
    },
    "required": ["ok", "n", "color", "tag", "xs"],
    "additionalProperties": False,
}
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 10},
                                     "unit": {"enum": ["celsius", "fahrenheit"]},
                                     "days": {"type": "integer", "minimum": 1, "maximum": 7}},
    "required": ["city", "unit", "days"], "additionalProperties": False}}}
CLOCK = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"],
    "additionalProperties": False}}}  # (without it a random model may add keys until max_tokens)


@pytest.fixture(scope="module")
def lm(tiny_model):
    from mlx_lm import load

    return load(str(tiny_model("qwen3_moe")))


def generate(lm, specs: list[dict], max_tokens: int = 80, seed: int = 0) -> list[tuple[str, str]]:
    """Sample (temperature 1) one sequence per spec in one mlx-lm batch: [(text, finish reason)]."""
    from mlx_lm.generate import BatchGenerator
    from mlx_lm.sample_utils import make_sampler

    model, tok = lm
    mx.random.seed(seed)
    gen = BatchGenerator(model, stop_tokens=[[t] for t in sorted(tok.eos_token_ids)])
    prompts = [tok.encode(f"prompt number {i}: the river") for i in range(len(specs))]
    procs = [[make_processor(s, tok)] for s in specs]
    uids = gen.insert(prompts, max_tokens=[max_tokens] * len(specs), samplers=[make_sampler(temp=1.0)] * len(specs),
                      logits_processors=procs)
    out, fin = {u: [] for u in uids}, {}
    while len(fin) < len(uids):
        for r in gen.next()[1]:
            if r.token not in tok.eos_token_ids:
                out[r.uid].append(r.token)
            if r.finish_reason:
                fin[r.uid] = r.finish_reason
    gen.close()
    return [(tok.decode(out[u]), fin[u]) for u in uids]


def test_schema_outputs_parse_and_validate_in_one_batch(lm):
    specs = [{"type": "json_schema", "schema": SCHEMA, "strict": True}] * 3 + [{"type": "regex", "pattern": "[ab]{3}c"}]
    for seed in (0, 1):
        results = generate(lm, specs, seed=seed)
        for text, finish in results[:3]:
            assert finish == "stop", (text, finish)  # ended by EOS, the only token allowed at the end
            jsonschema.validate(json.loads(text), SCHEMA)
        text, finish = results[3]
        assert finish == "stop" and len(text) == 4 and set(text[:3]) <= {"a", "b"} and text[3] == "c"


def test_lark_and_a_batch_without_grammar_beside(lm):
    from mlx_lm.generate import BatchGenerator

    model, tok = lm
    lark = 'start: "yes" | "no" | num\nnum: /[0-9]{2}/'
    (text, finish), = generate(lm, [{"type": "lark", "grammar": lark}])
    assert finish == "stop" and (text in ("yes", "no") or (len(text) == 2 and text.isdigit())), text
    gen = BatchGenerator(model, stop_tokens=[[t] for t in sorted(tok.eos_token_ids)])
    uids = gen.insert([tok.encode("a"), tok.encode("b")], max_tokens=[6, 6],
                      logits_processors=[[make_processor({"type": "regex", "pattern": "zz"}, tok)], []])
    out = {u: [] for u in uids}
    done = set()
    while len(done) < 2:
        for r in gen.next()[1]:
            out[r.uid].append(r.token)
            if r.finish_reason:
                done.add(r.uid)
    gen.close()
    assert tok.decode([t for t in out[uids[0]] if t not in tok.eos_token_ids]) == "zz"
    assert len(out[uids[1]]) == 6  # the unconstrained neighbour ran to its length


@pytest.mark.parametrize("fmt", ["json_tools", "qwen3_coder"])
def test_forced_tool_call_parses_with_mlx_lm_parser_and_validates(lm, fmt):
    import importlib

    parser = importlib.import_module(f"mlx_lm.tool_parsers.{fmt}")
    tools = [WEATHER, CLOCK]
    named = {"type": "tool_call", "tools": tools, "tool_choice": {"name": "get_weather"}, "format": fmt}
    anyone = {"type": "tool_call", "tools": tools, "tool_choice": "required", "format": fmt}
    for text, finish in generate(lm, [named, named, anyone, anyone], max_tokens=160):
        assert finish == "stop", (text, finish)
        assert text.startswith(parser.tool_call_start) and text.endswith(parser.tool_call_end), text
        call = parser.parse_tool_call(text[len(parser.tool_call_start):-len(parser.tool_call_end)], tools)
        schema = {t["function"]["name"]: t["function"]["parameters"] for t in tools}[call["name"]]
        jsonschema.validate(call["arguments"], schema)
    assert all(parser.parse_tool_call(t[11:-12], tools)["name"] == "get_weather"
               for t, _ in generate(lm, [named] * 2, max_tokens=160, seed=3))


def test_mask_is_exact_and_only_eos_once_complete(lm):
    _, tok = lm
    proc = make_processor({"type": "json_object"}, tok)
    vocab = 1 << 10
    logits = mx.zeros((1, vocab))
    prompt = tok.encode("hi")
    allowed = lambda out: {i for i, v in enumerate(out[0].tolist()) if v > -float("inf")}  # noqa: E731
    first = allowed(proc(mx.array(prompt), logits))
    assert first and all(tok.decode([t]).lstrip().startswith("{") for t in first), [tok.decode([t]) for t in first]
    ctx = list(prompt)
    for t in tok.encode("{}"):
        ctx.append(t)
        out = proc(mx.array(ctx), logits)
    assert allowed(out) == set(tok.eos_token_ids) & set(range(vocab))


@pytest.mark.parametrize("spec,needle", [
    ({"type": "json_schema", "name": "Bad", "schema": {"type": "bogus"}}, "json_schema 'Bad'"),
    ({"type": "json_schema", "schema": {"type": "string", "format": "nonsense-format"}, "strict": True},
     "json_schema"),
    ({"type": "regex", "pattern": "(unclosed"}, "regex"),
    ({"type": "lark", "grammar": "start: missing_rule"}, "lark"),
    ({"type": "xml"}, "xml"),
    ({"type": "tool_call", "tools": [WEATHER], "tool_choice": {"name": "nope"}, "format": "json_tools"}, "nope"),
    ({"type": "tool_call", "tools": [WEATHER], "format": "mistral"}, "mistral"),
])
def test_uncompilable_spec_is_bad_sampling_naming_it(lm, spec, needle):
    with pytest.raises(GrammarError, match=needle.replace("(", r"\(")):
        make_processor(spec, lm[1])
    with pytest.raises(BadSampling, match=needle.replace("(", r"\(")):  # as the engine builds processors
        processors(Generate("r", prompt="x", grammar=spec), lm[1])


def test_lenient_when_not_strict(lm):
    schema = {"type": "string", "format": "nonsense-format", "maxLength": 3}
    make_processor({"type": "json_schema", "schema": schema, "strict": False}, lm[1])


def test_daemon_batches_grammar_requests_and_refuses_bad_schema(tiny_model, tmp_path, monkeypatch):
    from moed.client.client import Client, RequestRejected

    with http_daemon(tiny_model("qwen3_moe"), tmp_path / "rt", 0.5) as d:
        monkeypatch.setenv("MOED_RUNTIME_DIR", str(d["runtime"]))
        results = {}

        def one(i):
            with Client(name=f"grammar-{i}") as c:
                results[i] = c.complete(messages=[{"role": "user", "content": f"item {i}"}], max_tokens=120,
                                        temperature=1.0, seed=i,
                                        grammar={"type": "json_schema", "schema": SCHEMA, "strict": True})
        threads = [threading.Thread(target=one, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert sorted(results) == [0, 1, 2]
        for text, _, fin in results.values():
            assert fin.reason == "stop"
            jsonschema.validate(json.loads(text), SCHEMA)
        with Client() as c, pytest.raises(RequestRejected, match="json_schema 'Bad'"):
            c.complete("x", grammar={"type": "json_schema", "name": "Bad", "schema": {"type": "bogus"}})
