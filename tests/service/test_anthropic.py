"""The Anthropic Messages API against a real daemon, with the real anthropic SDK: create, stream, forced
tool_use (the grammar) whose input validates, tool_result history, count_tokens, errors, auth."""

import json

import anthropic
import httpx
import jsonschema
import pytest
from daemon_util import assert_nothing_left, env_for, free_port, moed, status


KEY = "test-key-123"
WEATHER = {"name": "get_weather", "description": "The weather in a city", "input_schema": {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                     "unit": {"enum": ["celsius", "fahrenheit"]},
                                     "days": {"type": "integer", "minimum": 1, "maximum": 7}},
    "required": ["city", "unit", "days"], "additionalProperties": False}}
CLOCK = {"name": "get_time", "input_schema": {"type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}},
                                              "required": ["zone"], "additionalProperties": False}}
USER = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def daemon(tiny_model, tmp_path_factory):
    """A daemon with the HTTP API and an API key, on tiny qwen3_moe (Qwen3's chat template and markers: mlx-lm
    picks its json_tools parser and finds <think>)."""
    runtime = tmp_path_factory.mktemp("rt")
    env, port = env_for(runtime), free_port()
    moed(env, "start", "--model", str(tiny_model("qwen3_moe")), "--cache-fraction", "0.5", "--http",
         f"127.0.0.1:{port}", "--api-key", KEY)
    try:
        yield {"port": port, "env": env}
    finally:
        snap = status(env)
        moed(env, "stop")
        assert_nothing_left(runtime, [snap["pid"]] + [w["pid"] for w in snap["workers"]], snap["pid"])


@pytest.fixture(scope="module")
def client(daemon):
    return anthropic.Anthropic(base_url=f"http://127.0.0.1:{daemon['port']}", api_key=KEY, max_retries=0)


def count(client, **kw) -> int:
    return client.messages.count_tokens(model="tiny", **kw).input_tokens


def test_create_text_usage_and_count_tokens(client):
    msg = client.messages.create(model="tiny", max_tokens=8, messages=USER, extra_body={"temperature": 0})
    assert msg.type == "message" and msg.role == "assistant" and msg.id.startswith("msg_")
    assert msg.stop_reason in ("max_tokens", "end_turn")
    assert [b.type for b in msg.content] in (["text"], [])
    assert 0 < msg.usage.output_tokens <= 8
    assert (msg.stop_reason == "max_tokens") == (msg.usage.output_tokens == 8)
    # count_tokens renders the template as the engine does: the same number of prompt tokens
    assert count(client, messages=USER) == msg.usage.input_tokens + (msg.usage.cache_read_input_tokens or 0)
    # the same request again, greedy: the same text
    again = client.messages.create(model="tiny", max_tokens=8, messages=USER, extra_body={"temperature": 0})
    assert again.content[0].text == msg.content[0].text


def test_system_multi_turn_sampling_fields_and_stop_sequences(client):
    system = [{"type": "text", "text": "You are terse."}, {"type": "text", "text": " Answer in one word."}]
    turns = USER + [{"role": "assistant", "content": [{"type": "text", "text": "Sunny."}]},
                    {"role": "user", "content": "And tomorrow?"}]
    assert count(client, messages=turns, system=system) > count(client, messages=turns) > count(client, messages=USER)
    msg = client.messages.create(model="tiny", max_tokens=40, messages=turns, system=system, metadata={"user_id": "u1"},
                                 stop_sequences=["e"], extra_body={"temperature": 0.7, "top_p": 0.9, "top_k": 20})
    text = "".join(b.text for b in msg.content if b.type == "text")
    assert "e" not in text
    full = "".join(b.text for b in client.messages.create(
        model="tiny", max_tokens=40, messages=turns, system=system, extra_body={"temperature": 0}).content
        if b.type == "text")
    stop = full[len(full) // 2:][:2]  # a stop string the greedy answer reaches
    assert stop.strip(), full
    stopped = client.messages.create(model="tiny", max_tokens=40, messages=turns, system=system,
                                     stop_sequences=["never-seen-anywhere", stop], extra_body={"temperature": 0})
    assert stopped.stop_reason == "stop_sequence" and stopped.stop_sequence == stop
    assert "".join(b.text for b in stopped.content if b.type == "text") == full[:full.find(stop)]


def test_stream_text_events_equal_the_final_message(client):
    with client.messages.stream(model="tiny", max_tokens=12, messages=USER, extra_body={"temperature": 0}) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert final.content[0].text == text and text
    ref = client.messages.create(model="tiny", max_tokens=12, messages=USER, extra_body={"temperature": 0})
    assert ref.content[0].text == text and final.stop_reason == ref.stop_reason == "max_tokens"
    assert final.usage.output_tokens == 12


def test_stream_raw_event_order(daemon):
    body = {"model": "tiny", "max_tokens": 5, "messages": USER, "stream": True}
    with httpx.stream("POST", f"http://127.0.0.1:{daemon['port']}/v1/messages", json=body,
                      headers={"x-api-key": KEY}, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line[len("event: "):] for line in r.iter_lines() if line.startswith("event: ")]
    assert events[0] == "message_start" and events[-2:] == ["message_delta", "message_stop"] and "ping" in events
    body_events = [e for e in events if e != "ping"]
    assert body_events[1] == "content_block_start" and body_events[-3] == "content_block_stop"


def validate_tool_use(msg, name=None):
    uses = [b for b in msg.content if b.type == "tool_use"]
    assert msg.stop_reason == "tool_use" and len(uses) == 1, msg
    schema = {"get_weather": WEATHER, "get_time": CLOCK}[uses[0].name]["input_schema"]
    jsonschema.validate(uses[0].input, schema)
    assert name is None or uses[0].name == name
    assert uses[0].id.startswith("toolu_")
    return uses[0]


def test_forced_tool_use_validates_create_and_stream(client):
    for seed_temp in (0.0, 1.0):
        msg = client.messages.create(model="tiny", max_tokens=120, messages=USER, tools=[WEATHER, CLOCK],
                                     tool_choice={"type": "tool", "name": "get_weather"},
                                     extra_body={"temperature": seed_temp})
        validate_tool_use(msg, "get_weather")
    msg = client.messages.create(model="tiny", max_tokens=120, messages=USER, tools=[WEATHER, CLOCK],
                                 tool_choice={"type": "any"}, extra_body={"temperature": 1.0})
    validate_tool_use(msg)
    with client.messages.stream(model="tiny", max_tokens=120, messages=USER, tools=[WEATHER],
                                tool_choice={"type": "tool", "name": "get_weather"}) as stream:
        final = stream.get_final_message()
    use = validate_tool_use(final, "get_weather")
    # tools change the prompt (the template renders them); tool_choice none leaves them out
    assert count(client, messages=USER, tools=[WEATHER]) > count(client, messages=USER)
    assert count(client, messages=USER, tools=[WEATHER], tool_choice={"type": "none"}) == count(client, messages=USER)

    # the second turn: the call in the history, its result as a tool_result block
    history = USER + [{"role": "assistant", "content": [{"type": "tool_use", "id": use.id, "name": use.name,
                                                        "input": use.input}]},
                      {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id,
                                                    "content": "18 degrees, clear"}]}]
    assert count(client, messages=history, tools=[WEATHER]) > count(client, messages=USER, tools=[WEATHER]) + 10
    reply = client.messages.create(model="tiny", max_tokens=10, messages=history, tools=[WEATHER],
                                   tool_choice={"type": "none"})
    assert reply.stop_reason in ("max_tokens", "end_turn")


def test_thinking_reaches_the_template(client):
    on = {"type": "enabled", "budget_tokens": 1024}
    n_off = count(client, messages=USER, thinking={"type": "disabled"})
    assert n_off > count(client, messages=USER, thinking=on)  # Qwen's template closes an empty think block
    msg = client.messages.create(model="tiny", max_tokens=4, messages=USER, thinking={"type": "disabled"})
    assert msg.usage.input_tokens + (msg.usage.cache_read_input_tokens or 0) == n_off


def test_structured_output_format(client):
    schema = WEATHER["input_schema"]
    for _ in range(2):
        msg = client.messages.create(model="tiny", max_tokens=100, messages=USER, cache_control={"type": "ephemeral"},
                                     output_config={"format": {"type": "json_schema", "schema": schema}})
        assert msg.stop_reason == "end_turn" and [b.type for b in msg.content] == ["text"]
        jsonschema.validate(json.loads(msg.content[0].text), schema)


def test_errors_in_anthropic_shape(client, daemon):
    url = f"http://127.0.0.1:{daemon['port']}/v1/messages"
    cases = [
        ({"model": "tiny", "messages": USER}, "max_tokens"),
        ({"model": "tiny", "max_tokens": 5, "messages": USER, "frequency_penalty": 1}, "frequency_penalty"),
        ({"model": "tiny", "max_tokens": 5, "messages": [{"role": "user", "content": [
            {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AA=="}}]}]}, "image"),
        ({"model": "tiny", "max_tokens": 5, "messages": USER, "temperature": 1.5}, "temperature"),
        ({"model": "tiny", "max_tokens": 5, "messages": USER, "tools": [WEATHER],
          "tool_choice": {"type": "tool", "name": "nope"}}, "nope"),
        ({"model": "tiny", "max_tokens": 5, "messages": USER,
          "tools": [{"type": "web_search_20250305", "name": "web_search"}]}, "web_search_20250305"),
        ({"model": "tiny", "max_tokens": 5, "messages": [{"role": "user", "content": "a\ud800"}]},
         "messages[0].content"),
        ({"model": "tiny", "max_tokens": 5, "messages": USER, "container": "c1"}, "container"),
    ]
    for body, needle in cases:
        r = httpx.post(url, content=json.dumps(body), timeout=60,  # ASCII JSON: a lone surrogate as \ud800
                       headers={"x-api-key": KEY, "content-type": "application/json"})
        assert r.status_code == 400, (body, r.text)
        err = r.json()
        assert err["type"] == "error" and err["error"]["type"] == "invalid_request_error", err
        assert needle in err["error"]["message"], (needle, err)
    with pytest.raises(anthropic.BadRequestError) as e:
        client.messages.create(model="tiny", max_tokens=5, messages=[{"role": "system", "content": "x"}])
    assert "messages.0.role" in str(e.value)
    with pytest.raises(anthropic.BadRequestError, match="budget_tokens"):
        client.messages.create(model="tiny", max_tokens=2000, messages=USER,
                               thinking={"type": "enabled", "budget_tokens": 4000})


def test_auth_x_api_key_or_bearer(daemon):
    base = f"http://127.0.0.1:{daemon['port']}"
    bad = anthropic.Anthropic(base_url=base, api_key="wrong", max_retries=0)
    with pytest.raises(anthropic.AuthenticationError) as e:
        bad.messages.create(model="tiny", max_tokens=2, messages=USER)
    assert e.value.body["type"] == "error" and e.value.body["error"]["type"] == "authentication_error"
    r = httpx.post(base + "/v1/messages/count_tokens", json={"model": "tiny", "messages": USER}, timeout=30)
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    bearer = anthropic.Anthropic(base_url=base, auth_token=KEY, max_retries=0)
    assert bearer.messages.create(model="tiny", max_tokens=2, messages=USER).usage.output_tokens > 0


@pytest.fixture(scope="module")
def marker_tokenizer(tmp_path_factory):
    """mlx-lm's TokenizerWrapper on a small BPE with Qwen's think and tool-call tokens, and its json_tools
    parser (as mlx-lm's load picks them for Qwen3)."""
    from mlx_lm.tokenizer_utils import TokenizerWrapper
    from mlx_lm.tool_parsers import json_tools
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    tok.train_from_iterator(["the weather in paris is sunny", '{"name": "x", "arguments": {}}'],
                            trainers.BpeTrainer(vocab_size=300, special_tokens=["<|im_end|>", "<think>", "</think>",
                                                                               "<tool_call>", "</tool_call>"],
                                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>")
    return TokenizerWrapper(hf, tool_parser=json_tools.parse_tool_call, tool_call_start=json_tools.tool_call_start,
                            tool_call_end=json_tools.tool_call_end)


@pytest.mark.parametrize("chunk", [1, 3, 1000])
def test_splitter_thinking_text_and_tool_calls_in_any_chunking(marker_tokenizer, chunk):
    from moed.daemon.service.anthropic import BlockStream, Splitter, add_blocks

    tok = marker_tokenizer
    assert tok.has_thinking and tok.has_tool_calling
    out = ('let me see</think>Checking.<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", '
           '"unit": "celsius", "days": 2}}\n</tool_call><tool_call>\n{"name": "get_time", "arguments": '
           '{"zone": "UTC"}}\n</tool_call>')
    tools = [{"type": "function", "function": {"name": t["name"], "parameters": t["input_schema"]}}
             for t in (WEATHER, CLOCK)]
    sp = Splitter(tok, tools, "reasoning", parse_tools=True)  # the prompt ended inside <think>
    events = [e for i in range(0, len(out), chunk) for e in sp.feed(out[i:i + chunk])] + sp.finish("stop")
    blocks = []
    add_blocks(blocks, events)
    assert [b["type"] for b in blocks] == ["thinking", "text", "tool_use", "tool_use"]
    assert blocks[0]["thinking"] == "let me see" and blocks[1]["text"] == "Checking."
    assert blocks[2]["name"] == "get_weather" and blocks[2]["input"] == {"city": "Paris", "unit": "celsius",
                                                                         "days": 2}
    assert blocks[3]["input"] == {"zone": "UTC"}
    sse = "".join(BlockStream().add(events))
    assert sse.count('"type": "tool_use"') == 2 and '"thinking_delta"' in sse and '"text_delta"' in sse
    one = Splitter(tok, tools, "reasoning", parse_tools=True, parallel=False)  # disable_parallel_tool_use
    assert [k for k, _ in one.feed(out) + one.finish()].count("tool_use") == 1
    # a call cut off by max_tokens stays text
    sp = Splitter(tok, tools, "normal", parse_tools=True)
    cut = sp.feed('Hi <tool_call>\n{"name": "get_wea') + sp.finish()
    assert all(kind == "text" for kind, _ in cut) and "".join(v for _, v in cut) == 'Hi <tool_call>\n{"name": "get_wea'
