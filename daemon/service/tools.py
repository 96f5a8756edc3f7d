"""Tool calls and reasoning in a model's output, with mlx-lm's own parts; shared by the HTTP APIs.

The tokenizer (mlx-lm's TokenizerWrapper of the served checkpoint, loaded once per process by
`load_tokenizer`) knows the family's markers: `has_thinking` / `think_start` / `think_end`, and
`has_tool_calling` / `tool_call_start` / `tool_call_end` / `tool_parser` (the module of
mlx_lm/tool_parsers that mlx-lm chose for it: `tool_format`). `ToolCallStream` splits the decoded
text with mlx-lm's TextStateMachine (as mlx_lm.server does) and reads each call with the parser:

    stream = ToolCallStream(tokenizer, tools, initial=initial_state(tokenizer, prompt_text))
    for text in token_texts:
        for ev in stream.feed(text):      # Segment("content" | "reasoning", text) or ToolCall
            ...
    for ev in stream.finish():            # what the buffer held; a call left open is parsed too
        ...

A call the parser cannot read comes back as content text, markers included (nothing is lost).
`forced_call_grammar` is the Generate.grammar spec that forces a call (daemon/engine/grammar.py
compiles it).
"""

from __future__ import annotations

import json
import threading
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

_tokenizers: dict[str, Any] = {}
_lock = threading.Lock()
PARSE_ERRORS = (ValueError, KeyError, TypeError, AttributeError, IndexError)


def load_tokenizer(model: str | Path):
    """mlx-lm's TokenizerWrapper for the checkpoint `model` (a folder or HF id in the local cache), as the
    engine loads it; one per process and model (loading takes a while: call it from a thread)."""
    from moed.daemon.engine.checkpoint import resolve_model

    path = resolve_model(model)
    with _lock:
        tok = _tokenizers.get(str(path))
        if tok is None:
            from mlx_lm.utils import load_config, load_tokenizer as mlx_load_tokenizer

            tok = _tokenizers[str(path)] = mlx_load_tokenizer(path, eos_token_ids=load_config(path).get("eos_token_id"))
        return tok


def tool_format(tokenizer) -> str | None:
    """The name of the mlx_lm/tool_parsers module mlx-lm chose for this tokenizer (None: no tool calling)."""
    if not tokenizer.has_tool_calling:
        return None
    return (getattr(tokenizer, "init_kwargs", None) or {}).get("tool_parser_type")


def initial_state(tokenizer, prompt_text: str) -> str:
    """"reasoning" when the rendered prompt leaves the model inside a think block (a template that opens
    one), else "normal"; the tokenizer's own response format decides first (as mlx_lm.server does)."""
    state = "normal"
    if tokenizer.has_thinking and prompt_text.rfind(tokenizer.think_start) > prompt_text.rfind(tokenizer.think_end):
        state = "reasoning"
    return tokenizer.response_initial_state or state


def forced_call_grammar(tools: list[dict], tool_choice: str | dict, tokenizer_info) -> dict:
    """The Generate.grammar spec that forces one tool call in the model's own tool-call format.

    Args:
        tools: the request's OpenAI function tools, [{"type": "function", "function": {"name", "parameters",
            ...}}], as given to the chat template.
        tool_choice: "required" (any of the tools) or a tool's name (that one).
        tokenizer_info: the TokenizerWrapper (its `tool_format`), or a format name directly.

    Returns:
        {"type": "tool_call", "tools": tools, "tool_choice": "required" | {"name": NAME}, "format": FORMAT}
        where FORMAT names the mlx_lm/tool_parsers module (e.g. "json_tools", "qwen3_coder"); the grammar
        emits the call with its start/end markers and arguments valid against the tool's "parameters".

    Raises:
        ValueError: the model has no tool-call format.
    """
    fmt = tokenizer_info if isinstance(tokenizer_info, str) else tool_format(tokenizer_info)
    if fmt is None:
        raise ValueError("this model's tokenizer has no tool-call format")
    choice = "required" if tool_choice == "required" else {"name": tool_choice}
    return {"type": "tool_call", "tools": tools, "tool_choice": choice, "format": fmt}


def template_messages(messages: list[dict]) -> list[dict]:
    """OpenAI chat messages as chat templates expect them (as mlx_lm.server passes them): content None is
    "", and tool-call arguments are dicts (a JSON string is parsed; one that is not JSON stays a string)."""
    out = []
    for m in messages:
        m = dict(m)
        if m.get("content") is None:
            m["content"] = ""
        if m.get("tool_calls"):
            calls = []
            for c in m["tool_calls"]:
                c = dict(c)
                fn = dict(c.get("function") or {})
                if isinstance(fn.get("arguments"), str):
                    try:
                        fn["arguments"] = json.loads(fn["arguments"]) if fn["arguments"].strip() else {}
                    except ValueError:
                        pass
                c["function"] = fn
                calls.append(c)
            m["tool_calls"] = calls
        out.append(m)
    return out


@dataclass
class Segment:
    """Text of the answer ("content") or of the model's reasoning ("reasoning")."""

    kind: str
    text: str


@dataclass
class ToolCall:
    """One parsed call, numbered from 0 in the response."""

    index: int
    name: str
    arguments: Any  # as the parser read them (a dict for every mlx-lm parser)
    id: str = field(default_factory=lambda: "call_" + uuid.uuid4().hex[:24])

    def openai(self, streaming: bool = False) -> dict:
        """OpenAI's tool_calls entry (with "index" when streamed); arguments as a JSON string."""
        args = self.arguments if isinstance(self.arguments, str) else json.dumps(self.arguments, ensure_ascii=False)
        out = {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": args}}
        return {"index": self.index, **out} if streaming else out


class ToolCallStream:
    """Decoded text in, Segments and ToolCalls out (see the module doc).

    Args:
        tokenizer: mlx-lm's TokenizerWrapper (markers, parser).
        tools: the request's tools (given to the parser, which may read argument types from them).
        initial: the state the answer starts in ("normal" or "reasoning": `initial_state`).
        parse: False when the request had no tools (or tool_choice "none"): calls stay content text.
        parallel: False keeps only the first call (OpenAI's parallel_tool_calls=false).
    """

    def __init__(self, tokenizer, tools: list | None = None, initial: str = "normal", parse: bool = True,
                 parallel: bool = True):
        from mlx_lm.generate import make_text_state_machine

        self.state = make_text_state_machine(tokenizer).make_state(initial)
        self.parser = tokenizer.tool_parser if parse and tokenizer.has_tool_calling else None
        self.start, self.end = tokenizer.tool_call_start or "", tokenizer.tool_call_end or ""
        self.tools, self.parallel = tools, parallel
        self.calls: list[ToolCall] = []
        self._call: str | None = None  # the text of the call being read

    def feed(self, text: str) -> list[Segment | ToolCall]:
        from mlx_lm.generate import TextStateMachine

        self.state, segments = TextStateMachine.split(self.state, text)
        return self._events(segments)

    def finish(self) -> list[Segment | ToolCall]:
        """The rest: held-back text, and a call without its end marker (cut off, or a format without one)."""
        from mlx_lm.generate import TextStateMachine

        self.state, rest, current = TextStateMachine.flush(self.state)
        out = self._events([(current, rest)])
        if self._call is not None:
            out += self._close(closed=False)
        return out

    def _events(self, segments) -> list[Segment | ToolCall]:
        out: list[Segment | ToolCall] = []
        for state, text in segments:
            if state == "tool":
                self._call = (self._call or "") + text
                continue
            if self._call is not None:
                out += self._close(closed=True)
            if text:
                out.append(Segment("reasoning" if state == "reasoning" else "content", text))
        return out

    def _close(self, closed: bool) -> list[Segment | ToolCall]:
        raw, self._call = self._call or "", None
        as_text = [Segment("content", self.start + raw + (self.end if closed else ""))]
        if self.parser is None:
            return as_text
        try:
            parsed = self.parser(raw, self.tools)
            calls = parsed if isinstance(parsed, list) else [parsed]
            new = [ToolCall(len(self.calls) + i, str(c["name"]), c.get("arguments", {})) for i, c in enumerate(calls)]
            for call, c in zip(new, calls):  # a format that numbers its calls (kimi) keeps its ids, as in mlx-lm
                call.id = str(c.get("id") or call.id)
        except PARSE_ERRORS:  # not a call after all (or cut off mid-call): keep the text
            return as_text
        if not self.parallel:
            new = new[:max(0, 1 - len(self.calls))]
        self.calls += new
        return list(new)
