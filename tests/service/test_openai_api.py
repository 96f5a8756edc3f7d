"""The OpenAI-compatible API over HTTP against a real daemon: every request field honoured or refused by name,
tools rendered and parsed, structured output, logprobs, n, reasoning, model names, errors, CORS, disconnects
and keep-alive comments. (The SDKs' own view is tests/service/test_sdks.py.)"""

import asyncio
import json

import httpx
import jsonschema
import pytest

from daemon_util import http_daemon, status, wait_until
from moed.daemon.service import openai as oai
from moed.daemon.service.tools import load_tokenizer
from moed.daemon.tools.synthetic import make_model

HF_ID = "moed-test/tiny-qwen3-moe"
ALIAS = "my-model"
ORIGIN = "http://localhost:5173"
USER = [{"role": "user", "content": "What is the weather in Paris?"}]
# bounded values, no extra keys: a random-weight model, forced into a string, writes until max_tokens
CITY = {"type": "string", "enum": ["Paris", "London", "Tokyo"]}
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": CITY, "unit": {"enum": ["C", "F"]}},
                   "required": ["city"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"],
    "additionalProperties": False}}}


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """A tiny qwen3_moe whose config names its Hugging Face id (as a converted checkpoint's does)."""
    path = tmp_path_factory.mktemp("named") / "tiny-named"
    make_model(path, "qwen3_moe", "tiny", seed=0, progress=False)
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**cfg, "_name_or_path": HF_ID}))
    return path


@pytest.fixture(scope="module")
def daemon(model, tmp_path_factory):
    with http_daemon(model, tmp_path_factory.mktemp("rt"), 0.5, "--alias", ALIAS, "--cors-origin", ORIGIN) as d:
        d["base"] = f"http://127.0.0.1:{d['port']}"
        d["http"] = httpx.Client(base_url=d["base"], timeout=120)
        yield d
        d["http"].close()


@pytest.fixture(scope="module")
def tok(model):
    return load_tokenizer(model)


def chat(d, **body):
    return d["http"].post("/v1/chat/completions", json={"messages": USER, "max_tokens": 4, **body})


def ok(r: httpx.Response) -> dict:
    assert r.status_code == 200, r.text
    return r.json()


def refused(r: httpx.Response, name: str, status: int = 400) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "code"} and name in err["message"], err
    return err


def sse(r: httpx.Response) -> list:
    assert r.status_code == 200, r.text
    events = [e for e in r.text.split("\n\n") if e and not e.startswith(":")]
    assert events[-1] == "data: [DONE]"
    return [json.loads(e[len("data: "):]) for e in events[:-1]]


def grammar_forces_calls(d) -> bool:
    """Whether daemon/engine/grammar.py forces a tool call yet (its tool_call spec may still be incomplete)."""
    r = chat(d, tools=[WEATHER], tool_choice="required", max_tokens=60, temperature=0)
    return r.status_code == 200 and bool(r.json()["choices"][0]["message"].get("tool_calls"))


# ------------------------------------------------------------------------------------------ fields


def test_every_schema_field_is_in_a_table():
    """OpenAI's chat and completions request fields (openai SDK's own TypedDicts) are each honoured,
    accepted-with-no-effect or refused by name: none falls through."""
    from openai.types import completion_create_params as cp
    from openai.types.chat import completion_create_params as ccp

    chat_fields = set(ccp.CompletionCreateParamsBase.__annotations__)
    comp_fields = set(cp.CompletionCreateParamsBase.__annotations__)
    assert chat_fields - oai.CHAT - set(oai.REFUSED) == set()
    assert comp_fields - oai.COMPLETIONS - set(oai.REFUSED) == set()
    assert oai.NO_EFFECT <= oai.CHAT


def test_unknown_and_refused_fields_are_400s_naming_them(daemon):
    refused(chat(daemon, frobnicate=1), "frobnicate")
    for name, value in (("audio", {"voice": "alloy", "format": "wav"}), ("functions", [{"name": "f"}]),
                        ("function_call", "auto"), ("web_search_options", {}), ("verbosity", "low"),
                        ("moderation", {"input": {"mode": "block"}})):
        refused(chat(daemon, **{name: value}), name)
    refused(chat(daemon, modalities=["text", "audio"]), "modalities")
    refused(chat(daemon, stream="no"), "stream")
    refused(chat(daemon, stream_options={"include_usage": True}), "stream_options")  # without stream
    refused(chat(daemon, n=2, stream=True), "n")
    refused(chat(daemon, top_logprobs=2), "top_logprobs")  # without logprobs
    refused(chat(daemon, top_logprobs=21, logprobs=True), "top_logprobs")
    refused(chat(daemon, logit_bias={"x": 1}), "logit_bias")
    refused(chat(daemon, logit_bias={"5": 101}), "logit_bias")
    refused(chat(daemon, logit_bias={"99999999": 1}), "logit_bias")
    refused(chat(daemon, presence_penalty=3), "presence_penalty")
    refused(chat(daemon, frequency_penalty=-2.5), "frequency_penalty")
    refused(chat(daemon, max_completion_tokens=0), "max_completion_tokens")
    refused(chat(daemon, response_format={"type": "yaml"}), "response_format")
    refused(chat(daemon, tool_choice="required"), "tool_choice")  # no tools
    refused(chat(daemon, tools=[{"type": "custom", "custom": {"name": "x"}}]), "tools[0].type")
    refused(chat(daemon, tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "nope"}}),
            "tool_choice.function.name")
    refused(chat(daemon, reasoning_effort="extreme"), "reasoning_effort")
    refused(chat(daemon, messages=[{"role": "user", "content": "hi", "colour": "red"}]), "messages[0]")
    refused(chat(daemon, messages=[{"role": "wizard", "content": "hi"}]), "messages[0].role")
    refused(chat(daemon, messages=[{"role": "tool", "content": "42"}]), "messages[0].tool_call_id")
    refused(chat(daemon, messages=[{"role": "user", "content": [
        {"type": "text", "text": "what is this?"}, {"type": "image_url", "image_url": {"url": "data:,"}}]}]),
        "messages[0].content[1]")
    comp = daemon["http"].post
    refused(comp("/v1/completions", json={"prompt": "a", "suffix": "b"}), "suffix")
    refused(comp("/v1/completions", json={"prompt": "a", "best_of": 3}), "best_of")
    refused(comp("/v1/completions", json={"prompt": [1, 2, 3]}), "prompt")
    refused(comp("/v1/completions", json={"prompt": "a", "echo": True, "logprobs": 1}), "echo")
    refused(comp("/v1/completions", json={"prompt": "a", "messages": USER}), "messages")
    # accepted, no effect on the answer (README): same greedy tokens with and without them
    base = ok(chat(daemon, temperature=0, max_tokens=6))["choices"][0]["message"]["content"]
    hints = ok(chat(daemon, temperature=0, max_tokens=6, user="u1", metadata={"k": "v"}, store=False,
                    service_tier="auto", prompt_cache_key="k", safety_identifier="s", modalities=["text"],
                    prediction={"type": "content", "content": "x"}, parallel_tool_calls=True))
    assert hints["choices"][0]["message"]["content"] == base


def test_sampling_fields_change_the_answer_as_specified(daemon, tok):
    greedy = ok(chat(daemon, temperature=0, max_tokens=8, logprobs=True))["choices"][0]
    first = greedy["logprobs"]["content"][0]
    ids = tok.encode(first["token"], add_special_tokens=False)
    # logit_bias: -100 bans the greedy first token, +100 forces another one
    banned = ok(chat(daemon, temperature=0, max_tokens=8, logprobs=True, logit_bias={str(ids[0]): -100}))
    assert banned["choices"][0]["logprobs"]["content"][0]["token"] != first["token"]
    forced_id = tok.encode(" river", add_special_tokens=False)[0]
    forced = ok(chat(daemon, temperature=0, max_tokens=3, logprobs=True, logit_bias={str(forced_id): 100}))
    assert all(e["token"] == tok.decode([forced_id]) for e in forced["choices"][0]["logprobs"]["content"])
    # the penalties are mlx-lm's logits processors: a strong one changes a greedy answer of 24 tokens
    long = {"temperature": 0, "max_tokens": 24}
    plain = ok(chat(daemon, **long))["choices"][0]["message"]["content"]
    for field, value in (("frequency_penalty", 2.0), ("presence_penalty", 2.0), ("repetition_penalty", 1.8)):
        assert ok(chat(daemon, **long, **{field: value}))["choices"][0]["message"]["content"] != plain, field
    # top_k=1 is greedy whatever the temperature; seed makes sampling reproducible
    assert ok(chat(daemon, temperature=1.5, top_k=1, max_tokens=24))["choices"][0]["message"]["content"] == plain
    a = ok(chat(daemon, temperature=1.0, seed=7, max_tokens=12))["choices"][0]["message"]["content"]
    b = ok(chat(daemon, temperature=1.0, seed=7, max_tokens=12))["choices"][0]["message"]["content"]
    assert a == b
    assert ok(chat(daemon, temperature=1.0, min_p=0.5, seed=7, max_tokens=12))["choices"][0]["message"]["content"]
    # stop ends the answer before the stop string
    text = ok(chat(daemon, **long))["choices"][0]["message"]["content"]
    cut = text[len(text) // 2:][:3]
    stopped = ok(chat(daemon, **long, stop=[cut]))["choices"][0]
    assert stopped["finish_reason"] == "stop" and cut not in stopped["message"]["content"]


def test_n_choices_with_distinct_seeds(daemon):
    j = ok(chat(daemon, n=3, seed=11, temperature=1.0, max_tokens=10))
    assert [c["index"] for c in j["choices"]] == [0, 1, 2]
    texts = [c["message"]["content"] for c in j["choices"]]
    assert len(set(texts)) > 1
    again = ok(chat(daemon, n=3, seed=11, temperature=1.0, max_tokens=10))
    assert [c["message"]["content"] for c in again["choices"]] == texts  # seed + i: reproducible
    one = ok(chat(daemon, seed=12, temperature=1.0, max_tokens=10))  # choice 1 is seed 12
    assert one["choices"][0]["message"]["content"] == texts[1]
    assert j["usage"]["completion_tokens"] == 30 and j["usage"]["prompt_tokens"] == one["usage"]["prompt_tokens"]
    comp = ok(daemon["http"].post("/v1/completions", json={"prompt": ["one", "two"], "n": 2, "max_tokens": 3}))
    assert [c["index"] for c in comp["choices"]] == [0, 1, 2, 3]


def test_logprobs_match_the_sampled_tokens(daemon, tok):
    j = ok(chat(daemon, temperature=0, max_tokens=6, logprobs=True, top_logprobs=3))
    ch = j["choices"][0]
    entries = ch["logprobs"]["content"]
    # (the detokenizer drops the answer's leading space; the token keeps it)
    assert len(entries) == 6 and "".join(e["token"] for e in entries).lstrip() == ch["message"]["content"].lstrip()
    for e in entries:
        assert len(e["top_logprobs"]) == 3 and e["top_logprobs"][0]["token"] == e["token"]  # greedy: the top one
        assert e["logprob"] == pytest.approx(e["top_logprobs"][0]["logprob"]) and e["logprob"] <= 0
        assert bytes(e["bytes"]).decode("utf-8", "replace") == e["token"]
        lps = [t["logprob"] for t in e["top_logprobs"]]
        assert lps == sorted(lps, reverse=True)
    comp = ok(daemon["http"].post("/v1/completions", json={"prompt": "The river", "max_tokens": 4,
                                                           "temperature": 0, "logprobs": 2}))
    lp = comp["choices"][0]["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == 4
    assert "".join(lp["tokens"]).lstrip() == comp["choices"][0]["text"].lstrip()
    assert all(max(top.values()) == pytest.approx(v) for top, v in zip(lp["top_logprobs"], lp["token_logprobs"]))
    assert lp["text_offset"][0] == 0 and lp["text_offset"] == sorted(lp["text_offset"])
    chunks = sse(daemon["http"].post("/v1/chat/completions", json={
        "messages": USER, "max_tokens": 5, "temperature": 0, "stream": True, "logprobs": True}))
    streamed = [e for c in chunks for ch in c["choices"] for e in (ch.get("logprobs") or {}).get("content", [])]
    assert [e["token"] for e in streamed] == [e["token"] for e in entries[:5]]


def test_echo_and_prompt_lists(daemon):
    r = ok(daemon["http"].post("/v1/completions", json={"prompt": "The river", "max_tokens": 3, "echo": True,
                                                        "temperature": 0}))
    plain = ok(daemon["http"].post("/v1/completions", json={"prompt": "The river", "max_tokens": 3,
                                                            "temperature": 0}))
    assert r["choices"][0]["text"] == "The river" + plain["choices"][0]["text"]


# ------------------------------------------------------------------------------------------ tools


def test_tools_are_rendered_and_history_with_tool_calls_is_accepted(daemon, tok):
    plain = ok(chat(daemon))["usage"]["prompt_tokens"]
    one = ok(chat(daemon, tools=[WEATHER]))["usage"]["prompt_tokens"]
    two = ok(chat(daemon, tools=[WEATHER, TIME]))["usage"]["prompt_tokens"]
    assert plain < one < two
    assert ok(chat(daemon, tools=[WEATHER, TIME], tool_choice="none"))["usage"]["prompt_tokens"] == plain
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    history = USER + [{"role": "assistant", "content": None, "tool_calls": [call]},
                      {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 C"}]
    j = ok(chat(daemon, messages=history, tools=[WEATHER]))
    rendered = tok.apply_chat_template(oai.chat_messages({"messages": history}), tools=[WEATHER], tokenize=False,
                                       add_generation_prompt=True)
    assert '"arguments": {"city": "Paris"}' in rendered and "<tool_response>\nsunny, 21 C" in rendered
    assert j["usage"]["prompt_tokens"] == len(tok.encode(rendered, add_special_tokens=False))
    # developer is a system message: the same prompt
    sys_ = ok(chat(daemon, messages=[{"role": "system", "content": "Be brief."}] + USER))["usage"]["prompt_tokens"]
    dev = ok(chat(daemon, messages=[{"role": "developer", "content": "Be brief."}] + USER))["usage"]["prompt_tokens"]
    assert sys_ == dev > plain


def test_forced_tool_calls_validate_streamed_and_not(daemon):
    if not grammar_forces_calls(daemon):
        pytest.skip("daemon/engine/grammar.py does not force a tool call in this tokenizer's format yet")
    schema = WEATHER["function"]["parameters"]
    for choice in ("required", {"type": "function", "function": {"name": "get_weather"}}):
        j = ok(chat(daemon, tools=[TIME, WEATHER] if choice != "required" else [WEATHER], tool_choice=choice,
                    max_tokens=80, temperature=0))
        ch = j["choices"][0]
        assert ch["finish_reason"] == "tool_calls" and ch["message"]["content"] is None
        (call,) = ch["message"]["tool_calls"]
        assert call["type"] == "function" and call["id"].startswith("call_")
        assert call["function"]["name"] == "get_weather"
        jsonschema.validate(json.loads(call["function"]["arguments"]), schema)
    chunks = sse(daemon["http"].post("/v1/chat/completions", json={
        "messages": USER, "tools": [WEATHER], "tool_choice": "required", "max_tokens": 80, "stream": True,
        "temperature": 0}))
    deltas = [tc for c in chunks for ch in c["choices"] for tc in ch["delta"].get("tool_calls", [])]
    assert len(deltas) == 1 and deltas[0]["index"] == 0 and deltas[0]["function"]["name"] == "get_weather"
    jsonschema.validate(json.loads(deltas[0]["function"]["arguments"]), schema)
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"


def test_response_format_json(daemon):
    j = ok(chat(daemon, response_format={"type": "json_object"}, max_tokens=60, temperature=0))
    assert isinstance(json.loads(j["choices"][0]["message"]["content"]), dict)
    schema = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
              "required": ["name", "age"], "additionalProperties": False}
    j = ok(chat(daemon, response_format={"type": "json_schema", "json_schema": {
        "name": "person", "schema": schema, "strict": True}}, max_tokens=80, temperature=0))
    ch = j["choices"][0]
    if ch["finish_reason"] == "stop":
        jsonschema.validate(json.loads(ch["message"]["content"]), schema)
    # a schema the grammar engine cannot compile is a 400 naming it
    r = chat(daemon, response_format={"type": "json_schema", "json_schema": {
        "name": "bad", "schema": {"type": "object", "properties": {"a": {"type": "no-such-type"}}}, "strict": True}})
    assert r.status_code == 400 and "schema" in r.json()["error"]["message"], r.text


def test_reasoning_is_kept_apart_and_template_kwargs_pass_through(daemon, tok):
    thinking = ok(chat(daemon))["usage"]["prompt_tokens"]
    off = ok(chat(daemon, chat_template_kwargs={"enable_thinking": False}))["usage"]["prompt_tokens"]
    assert off == thinking + len(tok.encode("<think>\n\n</think>\n\n", add_special_tokens=False))
    assert ok(chat(daemon, reasoning_effort="none"))["usage"]["prompt_tokens"] == off
    # the model opens a think block (forced by a bias): what follows is reasoning, not content
    think = tok.encode("<think>", add_special_tokens=False)
    assert len(think) == 1
    j = ok(chat(daemon, temperature=0, max_tokens=3, logit_bias={str(think[0]): 100}))
    msg = j["choices"][0]["message"]
    assert msg["content"] == "" and msg["reasoning_content"] == "<think>" * 2
    chunks = sse(daemon["http"].post("/v1/chat/completions", json={
        "messages": USER, "max_tokens": 3, "temperature": 0, "stream": True, "logit_bias": {str(think[0]): 100}}))
    deltas = [ch["delta"] for c in chunks for ch in c["choices"]]
    assert "".join(d.get("reasoning_content", "") for d in deltas) == "<think>" * 2
    assert not any(d.get("content") for d in deltas)


# ------------------------------------------------------------------------------------------ models, errors


def test_model_names_and_model_routes(daemon, model):
    h = daemon["http"]
    ids = [m["id"] for m in ok(h.get("/v1/models"))["data"]]
    assert ids == [model.name, HF_ID, ALIAS]
    for name in ids:
        assert ok(h.get(f"/v1/models/{name}"))["id"] == name
        assert ok(chat(daemon, model=name))["model"] == model.name
    refused(h.get("/v1/models/gpt-17"), "gpt-17", 404)
    assert refused(chat(daemon, model="gpt-17"), "gpt-17", 404)["code"] == "model_not_found"


def test_errors_are_openai_json(daemon):
    h = daemon["http"]
    assert refused(h.get("/v1/nothing"), "/v1/nothing", 404)["code"] == "not_found"
    assert refused(h.get("/v1/chat/completions"), "GET", 405)["code"] == "method_not_allowed"
    err = refused(chat(daemon, max_tokens=-1), "max_tokens")
    assert "'m'" not in err["message"]
    refused(chat(daemon, max_completion_tokens="4"), "max_completion_tokens")
    err = refused(chat(daemon, max_tokens=32768), "max_tokens")
    assert err["code"] == "context_length_exceeded"
    err = refused(daemon["http"].post("/v1/completions", json={"prompt": "word " * 40000, "max_tokens": 2}),
                  "context")
    assert err["code"] == "context_length_exceeded"
    r = h.post("/v1/chat/completions", content=b'{"messages": [{"role": "user", "content": "a\\ud800b"}]}',
               headers={"content-type": "application/json"})
    refused(r, "messages[0].content")
    r = h.post("/v1/chat/completions", content=b'{"messages": "\xff\xfe"}',
               headers={"content-type": "application/json"})
    refused(r, "JSON")
    assert ok(chat(daemon))["choices"]  # serves on


def test_cors_for_the_given_origin_only(daemon):
    h = daemon["http"]
    pre = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization,content-type"}
    r = h.options("/v1/chat/completions", headers={"Origin": ORIGIN, **pre})
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == ORIGIN
    assert "POST" in r.headers["access-control-allow-methods"]
    r = h.post("/v1/chat/completions", json={"messages": USER, "max_tokens": 2}, headers={"Origin": ORIGIN})
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == ORIGIN
    r = h.options("/v1/chat/completions", headers={"Origin": "http://evil.example", **pre})
    assert "access-control-allow-origin" not in r.headers


# ------------------------------------------------------------------------------------------ streams, disconnects


def test_stream_usage_only_when_asked_and_cached_tokens(daemon):
    body = {"messages": USER, "max_tokens": 3, "stream": True, "temperature": 0}
    chunks = sse(daemon["http"].post("/v1/chat/completions", json={**body, "stream_options": {"include_usage": True}}))
    *body_chunks, last = chunks
    assert last["choices"] == [] and last["usage"]["completion_tokens"] == 3
    assert "cached_tokens" in last["usage"]["prompt_tokens_details"]
    assert all("usage" not in c for c in body_chunks)


def test_a_disconnected_request_is_aborted(daemon):
    before = status(daemon["env"])["totals"]
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{daemon['base']}/v1/chat/completions", json={"messages": USER, "max_tokens": 4000,
                                                                 "temperature": 0}, timeout=1.0)
    after = wait_until(lambda: (s := status(daemon["env"]))["totals"]["aborted"] > before["aborted"]
                       and not s["requests"] and s["totals"], timeout=10)
    assert after["completion_tokens"] - before["completion_tokens"] < 4000  # stopped, not run to the end


def test_streams_send_keep_alive_comments(daemon):
    """With a short interval (the daemon's is 5 s) comments come between tokens; clients ignore them."""
    from moed.daemon.service.http import Api, make_app

    async def go():
        api = Api(daemon["runtime"], None)
        api.keepalive_s = 0.0005
        try:
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=make_app(api)),
                                         base_url="http://127.0.0.1", timeout=60) as c:
                r = await c.post("/v1/chat/completions", json={"messages": USER, "max_tokens": 8, "stream": True,
                                                                "temperature": 0})
        finally:
            for task in api._clients.values():
                if task.done() and not task.cancelled() and task.exception() is None:
                    await task.result().close()
        return r

    r = asyncio.run(go())
    assert ": keep-alive\n\n" in r.text
    chunks = sse(r)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


# ------------------------------------------------------------------------------------------ moed run


def test_moed_run_reads_stdin_chats_by_default_raw_and_json_schema(daemon, tmp_path):
    import subprocess

    from daemon_util import CLI

    def run(*args, stdin=""):
        return subprocess.run([*CLI, "run", *args], input=stdin, env=daemon["env"], capture_output=True, text=True,
                              timeout=120)

    before = status(daemon["env"])["totals"]["prompt_tokens"]
    p = run("Hello", "--max-tokens", "4", "-v")  # an argument (stdin is an empty pipe here)
    assert p.returncode == 0 and "4 tokens" in p.stderr, p.stderr
    chat_tokens = status(daemon["env"])["totals"]["prompt_tokens"] - before
    p = run("Hello", "--max-tokens", "4", "--raw")
    raw_tokens = status(daemon["env"])["totals"]["prompt_tokens"] - before - chat_tokens
    assert p.returncode == 0 and raw_tokens < chat_tokens  # chat renders the template around it
    before = status(daemon["env"])["totals"]["prompt_tokens"]
    assert run("-", "--max-tokens", "2", stdin="Hello").returncode == 0  # '-' reads stdin: the same prompt
    assert status(daemon["env"])["totals"]["prompt_tokens"] - before == chat_tokens
    before = status(daemon["env"])["totals"]["prompt_tokens"]
    assert run("Summarize:", "--max-tokens", "2", "--system", "Be brief.", stdin="a long text").returncode == 0
    assert status(daemon["env"])["totals"]["prompt_tokens"] - before > chat_tokens  # system + piped text
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
              "additionalProperties": False}
    (tmp_path / "s.json").write_text(json.dumps(schema))
    p = run("Answer in JSON", "--json-schema", str(tmp_path / "s.json"), "--max-tokens", "30")
    assert p.returncode == 0, p.stderr
    jsonschema.validate(json.loads(p.stdout), schema)
    assert run("x", "--raw", "--system", "y").returncode == 2
    p = run("-", stdin="")
    assert p.returncode == 2 and "empty" in p.stderr
    p = run("Hi", "--max-tokens", "40000")
    assert p.returncode == 1 and "context" in p.stderr
