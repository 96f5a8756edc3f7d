"""The real SDKs against a real daemon: openai, LangChain's ChatOpenAI, litellm. A random-weight model writes
no sensible text, so tool calls and JSON come through forcing (tool_choice / response_format, the grammar)."""

import json
import os

import jsonschema
import pytest

from daemon_util import http_daemon

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # litellm: no download of its price list

openai = pytest.importorskip("openai")

USER = [{"role": "user", "content": "What is the weather in Paris?"}]
# bounded values, no extra keys: a random-weight model, forced into a string, writes until max_tokens
CITY = {"type": "string", "enum": ["Paris", "London", "Tokyo"]}
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": CITY}, "required": ["city"],
                   "additionalProperties": False}}}
SCHEMA = WEATHER["function"]["parameters"]


@pytest.fixture(scope="module")
def daemon(tiny_models, tmp_path_factory):
    with http_daemon(tiny_models["qwen3_moe"], tmp_path_factory.mktemp("rt"), 0.5) as d:
        d["base"] = f"http://127.0.0.1:{d['port']}/v1"
        d["name"] = os.path.basename(d["model"])
        yield d


@pytest.fixture(scope="module")
def client(daemon):
    with openai.OpenAI(base_url=daemon["base"], api_key="unused", max_retries=0) as c:
        yield c


@pytest.fixture(scope="module")
def forcing(client, daemon) -> bool:
    """Whether the grammar (daemon/engine/grammar.py) forces a tool call in this tokenizer's format yet."""
    r = client.chat.completions.create(model=daemon["name"], messages=USER, tools=[WEATHER], tool_choice="required",
                                       max_tokens=60, temperature=0)
    return bool(r.choices[0].message.tool_calls)


def need(forcing: bool):
    if not forcing:
        pytest.skip("daemon/engine/grammar.py does not force a tool call in this tokenizer's format yet")


# ------------------------------------------------------------------------------------------ openai


def test_openai_chat_stream_and_usage(client, daemon):
    r = client.chat.completions.create(model=daemon["name"], messages=USER, max_tokens=5, temperature=0)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 5
    assert r.usage.prompt_tokens_details.cached_tokens >= 0
    text, usage = "", None
    for chunk in client.chat.completions.create(model=daemon["name"], messages=USER, max_tokens=5, temperature=0,
                                                stream=True, stream_options={"include_usage": True}):
        if chunk.choices and chunk.choices[0].delta.content:
            text += chunk.choices[0].delta.content
        usage = chunk.usage or usage
    assert text == r.choices[0].message.content and usage.completion_tokens == 5


def test_openai_tools_render_and_a_tool_history_is_accepted(client, daemon):
    base = client.chat.completions.create(model=daemon["name"], messages=USER, max_tokens=2)
    tooled = client.chat.completions.create(model=daemon["name"], messages=USER, max_tokens=2, tools=[WEATHER])
    assert tooled.usage.prompt_tokens > base.usage.prompt_tokens
    history = USER + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]
    r = client.chat.completions.create(model=daemon["name"], messages=history, tools=[WEATHER], max_tokens=3)
    assert r.usage.prompt_tokens > tooled.usage.prompt_tokens and r.choices[0].message.role == "assistant"


def test_openai_logprobs_and_n(client, daemon):
    r = client.chat.completions.create(model=daemon["name"], messages=USER, max_tokens=5, temperature=0,
                                       logprobs=True, top_logprobs=2)
    for e in r.choices[0].logprobs.content:
        assert e.top_logprobs[0].token == e.token and e.top_logprobs[0].logprob == pytest.approx(e.logprob)
    r = client.chat.completions.create(model=daemon["name"], messages=USER, max_tokens=4, n=2, seed=3)
    assert [c.index for c in r.choices] == [0, 1] and r.usage.completion_tokens == 8


def test_openai_errors(client, daemon):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=daemon["name"], prompt="word " * 40000, max_tokens=2)
    assert e.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=daemon["name"], messages=USER, max_tokens=40000)
    assert e.value.code == "context_length_exceeded"
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-17", messages=USER, max_tokens=2)
    assert e.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=daemon["name"], messages=USER, max_tokens=2, extra_body={"mirostat": 2})
    assert "mirostat" in e.value.message
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-17")
    assert client.models.retrieve(daemon["name"]).id == daemon["name"]
    assert [m.id for m in client.models.list()][0] == daemon["name"]


def test_openai_forced_tool_calls_validate(client, daemon, forcing):
    need(forcing)
    for choice in ("required", {"type": "function", "function": {"name": "get_weather"}}):
        r = client.chat.completions.create(model=daemon["name"], messages=USER, tools=[WEATHER], tool_choice=choice,
                                           max_tokens=80, temperature=0)
        (call,) = r.choices[0].message.tool_calls
        assert call.function.name == "get_weather"
        jsonschema.validate(json.loads(call.function.arguments), SCHEMA)
    with client.chat.completions.stream(model=daemon["name"], messages=USER, tools=[WEATHER], tool_choice="required",
                                        max_tokens=80, temperature=0) as s:
        final = s.get_final_completion()
    (call,) = final.choices[0].message.tool_calls
    jsonschema.validate(json.loads(call.function.arguments), SCHEMA)


def test_openai_parse_with_a_pydantic_model(client, daemon):
    from typing import Literal

    from pydantic import BaseModel

    class Sky(BaseModel):  # bounded fields: a random model cannot ramble inside them
        sky: Literal["clear", "cloudy", "rain"]
        sunny: bool

    r = client.chat.completions.parse(model=daemon["name"], messages=USER, response_format=Sky, max_tokens=60,
                                      temperature=0)
    assert isinstance(r.choices[0].message.parsed, Sky)


# ------------------------------------------------------------------------------------------ LangChain


def test_langchain_bind_tools_and_a_two_turn_loop(daemon, forcing):
    lc = pytest.importorskip("langchain_openai")
    from langchain_core.messages import HumanMessage, ToolMessage
    from typing import Literal

    from langchain_core.tools import tool

    @tool
    def get_weather(city: Literal["Paris", "London", "Tokyo"]) -> str:
        """The weather in a city."""
        return f"sunny in {city}"

    llm = lc.ChatOpenAI(base_url=daemon["base"], api_key="unused", model=daemon["name"], max_tokens=80,
                        temperature=0, max_retries=0)
    plain = llm.invoke("hello")
    assert plain.usage_metadata["output_tokens"] == 80 or plain.response_metadata["finish_reason"] == "stop"
    need(forcing)
    bound = llm.bind_tools([get_weather], tool_choice="required", strict=True)  # strict: no extra keys
    ai = bound.invoke([HumanMessage("What is the weather in Paris?")])
    (call,) = ai.tool_calls
    assert call["name"] == "get_weather" and isinstance(call["args"].get("city"), str)
    # second turn: the AI message with its tool call (content "") and the ToolMessage go back in the history
    result = get_weather.invoke(call["args"])
    turn2 = llm.bind_tools([get_weather]).invoke([HumanMessage("What is the weather in Paris?"), ai,
                                                  ToolMessage(result, tool_call_id=call["id"])])
    assert turn2.response_metadata["finish_reason"] in ("stop", "length", "tool_calls")
    assert turn2.usage_metadata["input_tokens"] > ai.usage_metadata["input_tokens"]
    chunks = list(bound.stream([HumanMessage("What is the weather in Paris?")]))
    merged = chunks[0]
    for c in chunks[1:]:
        merged += c
    assert merged.tool_calls and merged.tool_calls[0]["name"] == "get_weather"


# ------------------------------------------------------------------------------------------ litellm


def test_litellm_tools_and_context_window_error(daemon, forcing):
    litellm = pytest.importorskip("litellm")
    kw = {"model": f"openai/{daemon['name']}", "api_base": daemon["base"], "api_key": "unused", "num_retries": 0}
    r = litellm.completion(messages=USER, max_tokens=4, temperature=0, **kw)
    assert r.choices[0].message.content is not None and r.usage.completion_tokens == 4
    with pytest.raises(litellm.ContextWindowExceededError):
        litellm.completion(messages=[{"role": "user", "content": "word " * 40000}], max_tokens=2, **kw)
    need(forcing)
    r = litellm.completion(messages=USER, tools=[WEATHER], tool_choice="required", max_tokens=80, temperature=0, **kw)
    (call,) = r.choices[0].message.tool_calls
    assert call.function.name == "get_weather"
    jsonschema.validate(json.loads(call.function.arguments), SCHEMA)
