"""ToolCallStream (daemon/service/tools.py) over every tool-call format mlx-lm's parsers read: the model's text,
whole or in chunks of any size, comes back as the right calls, with the text around them and the reasoning
apart. Each format is a real TokenizerWrapper (mlx-lm's loader, with the checkpoint naming its parser)."""

import json
import shutil

import pytest

from moed.daemon.service.tools import Segment, ToolCall, ToolCallStream, forced_call_grammar, initial_state, \
    template_messages, tool_format
from moed.daemon.tools.synthetic_tokenizer import save_tokenizer

ARGS = {"a": 12234585, "b": 48838483920}
# the text each format puts between its start and end markers for multiply(a=12234585, b=48838483920)
# (mlx-lm's own test strings, tests/test_tool_parsing.py, and each parser's documented shape)
CALLS = {
    "json_tools": '\n{"name": "multiply", "arguments": {"a": 12234585, "b": 48838483920}}\n',
    "qwen3_coder": "\n<function=multiply>\n<parameter=a>\n12234585\n</parameter>\n<parameter=b>\n48838483920\n"
                   "</parameter>\n</function>\n",
    "function_gemma": "call:multiply{a:12234585,b:48838483920}",
    "gemma4": "call:multiply{a:12234585,b:48838483920}",
    "glm47": "multiply<arg_key>a</arg_key><arg_value>12234585</arg_value><arg_key>b</arg_key>"
             "<arg_value>48838483920</arg_value>",
    "laguna": "multiply<arg_key>a</arg_key><arg_value>12234585</arg_value><arg_key>b</arg_key>"
              "<arg_value>48838483920</arg_value>",
    "longcat": "multiply<longcat_arg_key>a</longcat_arg_key>\n<longcat_arg_value>12234585</longcat_arg_value>\n"
               "<longcat_arg_key>b</longcat_arg_key>\n<longcat_arg_value>48838483920</longcat_arg_value>",
    "minimax_m2": '\n<invoke name="multiply">\n<parameter name="a">12234585</parameter>\n'
                  '<parameter name="b">48838483920</parameter>\n</invoke>\n',
    "pythonic": "[multiply(a=12234585, b=48838483920)]",
    "mistral": 'multiply[ARGS]{"a": 12234585, "b": 48838483920}',
    "kimi_k2": '<|tool_call_begin|>functions.multiply:0<|tool_call_argument_begin|>{"a": 12234585, '
               '"b": 48838483920}<|tool_call_end|>',
    "kimi_k3": '<|open|>call tool="multiply" index="1"<|sep|><|open|>json type="object"<|sep|>'
               '{"a": 12234585, "b": 48838483920}<|close|>json<|sep|><|close|>call<|sep|>',
    "minicpm5": '"multiply"><param name="a">12234585</param><param name="b">48838483920</param>',
    "muse_spark": '<atem:invoke name="multiply"><atem:parameter name="a">12234585</atem:parameter>'
                  '<atem:parameter name="b">48838483920</atem:parameter></atem:invoke>',
}
TOOLS = [{"type": "function", "function": {"name": "multiply", "description": "Multiply two numbers.", "parameters": {
    "type": "object", "required": ["a", "b"],
    "properties": {"a": {"type": "number"}, "b": {"type": "number"}}}}}]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    save_tokenizer(d, 1000)
    return d


def tokenizer_for(base, tmp_path, fmt: str | None):
    """The synthetic tokenizer with tokenizer_config naming `fmt` as its tool parser (as converted checkpoints
    do), loaded by mlx-lm."""
    from mlx_lm.tokenizer_utils import load

    d = tmp_path / (fmt or "default")
    shutil.copytree(base, d)
    if fmt is not None:
        cfg = json.loads((d / "tokenizer_config.json").read_text())
        (d / "tokenizer_config.json").write_text(json.dumps({**cfg, "tool_parser_type": fmt}))
    return load(d, eos_token_ids=[2])


def run(tok, text: str, chunk: int | None, **kw):
    """Feed `text` in chunks of `chunk` characters (None: at once): (content, reasoning, calls)."""
    s = ToolCallStream(tok, TOOLS, **kw)
    events = []
    for i in range(0, len(text), chunk or len(text)):
        events += s.feed(text[i:i + (chunk or len(text))])
    events += s.finish()
    content = "".join(e.text for e in events if isinstance(e, Segment) and e.kind == "content")
    reasoning = "".join(e.text for e in events if isinstance(e, Segment) and e.kind == "reasoning")
    return content, reasoning, [e for e in events if isinstance(e, ToolCall)]


def test_every_mlx_lm_parser_is_covered():
    import pkgutil

    import mlx_lm.tool_parsers as parsers

    assert {m.name for m in pkgutil.iter_modules(parsers.__path__)} == set(CALLS)


@pytest.mark.parametrize("fmt", sorted(CALLS))
def test_calls_in_each_format_streamed_and_not(base, tmp_path, fmt):
    tok = tokenizer_for(base, tmp_path, fmt)
    assert tok.has_tool_calling and tool_format(tok) == fmt
    text = "Let me compute. " + tok.tool_call_start + CALLS[fmt] + tok.tool_call_end
    for chunk in (None, 1, 2, 5, 13):
        content, reasoning, calls = run(tok, text, chunk)
        assert content.strip() == "Let me compute." and reasoning == "", (fmt, chunk, content)
        assert [(c.index, c.name) for c in calls] == [(0, "multiply")], (fmt, chunk)
        assert {k: float(v) for k, v in calls[0].arguments.items()} == ARGS, (fmt, chunk, calls[0].arguments)
        out = calls[0].openai(streaming=True)
        assert out["index"] == 0 and out["type"] == "function" and out["id"]
        assert {k: float(v) for k, v in json.loads(out["function"]["arguments"]).items()} == ARGS


@pytest.mark.parametrize("fmt", ["json_tools", "qwen3_coder", "minimax_m2"])
def test_two_calls_and_parallel_false(base, tmp_path, fmt):
    tok = tokenizer_for(base, tmp_path, fmt)
    one = tok.tool_call_start + CALLS[fmt] + tok.tool_call_end
    for chunk in (None, 3):
        content, _, calls = run(tok, one + "\n" + one, chunk)
        assert [c.index for c in calls] == [0, 1] and len({c.id for c in calls}) == 2 and content.strip() == ""
    _, _, calls = run(tok, one + "\n" + one, 4, parallel=False)
    assert len(calls) == 1


def test_qwen_family_reasoning_and_calls(base, tmp_path):
    """The synthetic Qwen tokenizer (default: no parser named) is what mlx-lm makes of Qwen3's: json_tools
    inferred from its chat template, <think> markers from its vocabulary."""
    tok = tokenizer_for(base, tmp_path, None)
    assert tok.has_thinking and tok.think_start == "<think>" and tool_format(tok) == "json_tools"
    text = "<think>I should call it.</think>Calling." + "<tool_call>" + CALLS["json_tools"] + "</tool_call>"
    for chunk in (None, 1, 4):
        content, reasoning, calls = run(tok, text, chunk)
        assert (content, reasoning, [c.name for c in calls]) == ("Calling.", "I should call it.", ["multiply"])
    # a template that opens the think block leaves the answer in it
    assert initial_state(tok, "<|im_start|>assistant\n<think>\n") == "reasoning"
    assert initial_state(tok, "<|im_start|>assistant\n<think>\n\n</think>\n\n") == "normal"
    content, reasoning, _ = run(tok, "still thinking</think>the answer", 3, initial="reasoning")
    assert (content, reasoning) == ("the answer", "still thinking")


def test_unparsable_calls_and_no_tools_stay_text(base, tmp_path):
    tok = tokenizer_for(base, tmp_path, None)
    broken = "<tool_call>\n{not json\n</tool_call>"
    for chunk in (None, 2):
        content, _, calls = run(tok, "a" + broken + "b", chunk)
        assert calls == [] and content == "a" + broken + "b"
        content, _, calls = run(tok, "x<tool_call>" + CALLS["json_tools"] + "</tool_call>", chunk, parse=False)
        assert calls == [] and content == "x<tool_call>" + CALLS["json_tools"] + "</tool_call>"
    # cut off inside a call (max_tokens): what there is, as text
    content, _, calls = run(tok, 'ok<tool_call>\n{"name": "multi', 3)
    assert calls == [] and content == 'ok<tool_call>\n{"name": "multi'
    # a call without its end marker that parses is a call
    content, _, calls = run(tok, "<tool_call>" + CALLS["json_tools"], 5)
    assert [c.name for c in calls] == ["multiply"]
    # text that only looks like the start of a marker is not held back at the end
    content, _, calls = run(tok, "a <tool", 2)
    assert content == "a <tool" and calls == []


def test_forced_call_grammar_and_template_messages(base, tmp_path):
    tok = tokenizer_for(base, tmp_path, None)
    assert forced_call_grammar(TOOLS, "required", tok) == {"type": "tool_call", "tools": TOOLS,
                                                           "tool_choice": "required", "format": "json_tools"}
    assert forced_call_grammar(TOOLS, "multiply", "qwen3_coder")["tool_choice"] == {"name": "multiply"}
    msgs = template_messages([{"role": "assistant", "content": None, "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "multiply", "arguments": json.dumps(ARGS)}}]}])
    assert msgs[0]["content"] == "" and msgs[0]["tool_calls"][0]["function"]["arguments"] == ARGS
    rendered = tok.apply_chat_template(msgs, tokenize=False)
    assert '<tool_call>\n{"name": "multiply", "arguments": {"a": 12234585, "b": 48838483920}}\n</tool_call>' \
        in rendered
