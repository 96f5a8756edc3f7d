"""The OpenAI chat/completions translation: request fields -> native Generate keywords, events -> responses.

Every field of OpenAI's chat and completions request schemas is in one of three tables below: honoured,
accepted with no effect on the answer (and why: the README's table), or refused with a 400 naming it.
A field in none of them is a 400 naming it. Output is split by daemon/service/tools.py (reasoning,
content, tool calls with mlx-lm's parsers).
"""

from __future__ import annotations

import asyncio
import json
import math
from dataclasses import dataclass, field
from typing import Any

from moed.daemon.service import tools as tool_calls
from moed.daemon.service.api import ApiError
from moed.ipc.messages import Finished, Token

COMMON = {"model", "frequency_penalty", "logit_bias", "max_tokens", "n", "presence_penalty", "seed", "stop",
          "stream", "stream_options", "temperature", "top_p", "user",
          # extensions (llama.cpp, vLLM and mlx_lm.server accept them)
          "top_k", "min_p", "repetition_penalty", "cache_prompt"}
CHAT = COMMON | {"messages", "max_completion_tokens", "logprobs", "top_logprobs", "tools", "tool_choice",
                 "parallel_tool_calls", "response_format", "reasoning_effort", "chat_template_kwargs",
                 "modalities", "metadata", "store", "service_tier", "prompt_cache_key", "prompt_cache_retention",
                 "prompt_cache_options", "safety_identifier", "prediction"}
COMPLETIONS = COMMON | {"prompt", "logprobs", "echo", "suffix", "best_of"}
# accepted, no effect on the answer (see README: accounting, storage, routing and caching hints)
NO_EFFECT = {"user", "metadata", "store", "service_tier", "prompt_cache_key", "prompt_cache_retention",
             "prompt_cache_options", "safety_identifier", "prediction"}
# in OpenAI's schema, refused here (a 400 naming the field) unless null
REFUSED = {"audio": "audio output is not supported (text-only model)",
           "functions": "the deprecated 'functions' is not supported: use 'tools'",
           "function_call": "the deprecated 'function_call' is not supported: use 'tool_choice'",
           "web_search_options": "web search is not supported",
           "verbosity": "'verbosity' is not supported (no model here is trained for it)",
           "moderation": "moderation is not supported (nothing here scores or blocks content)"}
MESSAGE_KEYS = {"role", "content", "name", "tool_calls", "tool_call_id", "reasoning_content", "refusal", "audio",
                "function_call"}
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant", "tool": "tool"}
MAX_N = 16


@dataclass
class Plan:
    """One HTTP request as native Generates: `kw` for each choice (seed + i), and how to answer."""

    kw: dict
    chat: bool
    n: int = 1
    prompts: list[str] = field(default_factory=list)  # completions: one choice set per prompt
    stream: bool = False
    include_usage: bool = False
    tools: list | None = None
    parse_tools: bool = False
    parallel: bool = True
    logprobs: int = -1
    echo: bool = False
    initial: str = "normal"


def bad(field_: str, why: str) -> ApiError:
    return ApiError(400, f"'{field_}' {why}", code="invalid_value")


# ------------------------------------------------------------------------------------------ fields


def check_fields(body: dict, allowed: set) -> None:
    unknown = sorted(k for k in body if k not in allowed and k not in REFUSED)
    if unknown:
        raise ApiError(400, f"unknown field(s): {', '.join(repr(k) for k in unknown)} (not in OpenAI's schema "
                            "nor in this server's extensions)", code="unknown_field")
    for k, why in REFUSED.items():
        if body.get(k) is not None:
            raise ApiError(400, f"'{k}': {why}", code="unsupported_field")


def number(body: dict, key: str, lo: float, hi: float, kind=float, default=None):
    v = body.get(key)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (kind is int and not isinstance(v, int)):
        raise bad(key, f"must be {'an integer' if kind is int else 'a number'}, got {json.dumps(v)[:40]}")
    if not lo <= v <= hi or (isinstance(v, float) and not math.isfinite(v)):
        raise bad(key, f"must be between {lo} and {hi}, got {v}")
    return kind(v)


def boolean(body: dict, key: str, default: bool = False) -> bool:
    v = body.get(key)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise bad(key, f"must be a boolean, got {json.dumps(v)[:40]}")
    return v


def sampling(body: dict, default_max: int, vocab_size: int | None) -> dict:
    """The sampling fields both endpoints share, validated, as Generate keywords (seed apart)."""
    max_key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None and (not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop)):
        raise bad("stop", "must be a string or a list of non-empty strings")
    kw = {"max_tokens": number(body, max_key, 1, 1 << 20, int, default_max),
          "temperature": number(body, "temperature", 0.0, 2.0, default=1.0),
          "top_p": number(body, "top_p", 0.0, 1.0, default=1.0), "stop": stop or None,
          "top_k": number(body, "top_k", 0, 1 << 30, int, 0), "min_p": number(body, "min_p", 0.0, 1.0, default=0.0)}
    for key in ("presence_penalty", "frequency_penalty"):
        v = number(body, key, -2.0, 2.0)
        if v:  # 0 is OpenAI's default: no processor
            kw[key] = v
    rep = number(body, "repetition_penalty", 0.0, 10.0)
    if rep is not None:
        if rep <= 0:
            raise bad("repetition_penalty", "must be > 0")
        if rep != 1.0:
            kw["repetition_penalty"] = rep
    kw["seed"] = seed_of(body)
    bias = body.get("logit_bias")
    if bias is not None:
        kw["logit_bias"] = logit_bias(bias, vocab_size)
    if body.get("cache_prompt") is not None:
        kw["cache_prompt"] = boolean(body, "cache_prompt")
    return kw


def logit_bias(bias, vocab_size: int | None) -> list[tuple[int, float]]:
    if not isinstance(bias, dict):
        raise bad("logit_bias", "must be an object mapping token ids to biases")
    out = []
    for k, v in bias.items():
        try:
            tok = int(k)
        except ValueError:
            raise bad("logit_bias", f"keys must be token ids, got {k!r}") from None
        if tok < 0 or (vocab_size is not None and tok >= vocab_size):
            raise bad("logit_bias", f"token {tok} is outside the vocabulary (0..{(vocab_size or 1) - 1})")
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not -100 <= v <= 100:
            raise bad("logit_bias", f"the bias of token {k} must be a number in [-100, 100], got {v!r}")
        out.append((tok, float(v)))
    return out


def vocab_size(tokenizer) -> int | None:
    """Token ids the tokenizer knows, added tokens included (the engine checks the model's own size too)."""
    hf = getattr(tokenizer, "_tokenizer", None)
    return len(hf) if hf is not None else None


def seed_of(body: dict) -> int | None:
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise bad("seed", "must be an integer")
    return seed


def stream_fields(body: dict) -> tuple[bool, bool]:
    stream = boolean(body, "stream")
    opts = body.get("stream_options")
    if opts is None:
        return stream, False
    if not stream:
        raise bad("stream_options", "is only allowed with 'stream': true")
    if not isinstance(opts, dict) or set(opts) - {"include_usage", "include_obfuscation"}:
        raise bad("stream_options", "must be an object with 'include_usage' (and 'include_obfuscation')")
    for k in opts:
        boolean(opts, k)
    return stream, bool(opts.get("include_usage"))


# ------------------------------------------------------------------------------------------ chat


def text_content(content, where: str, role: str) -> str | None:
    """A message's content as one string: text parts joined; anything else (images, audio, files) a 400."""
    if content is None or isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise bad(where, "must be a string, null or a list of content parts")
    out = []
    for j, p in enumerate(content):
        kind = p.get("type") if isinstance(p, dict) else None
        if kind == "text" and isinstance(p.get("text"), str):
            out.append(p["text"])
        elif kind == "refusal" and role == "assistant" and isinstance(p.get("refusal"), str):
            out.append(p["refusal"])
        elif kind in ("image_url", "input_image", "image"):
            raise bad(f"{where}[{j}]", "is an image: this model has no vision (text parts only)")
        elif kind in ("input_audio", "file"):
            raise bad(f"{where}[{j}]", f"is a {kind} part: this model reads text parts only")
        else:
            raise bad(f"{where}[{j}]", "must be a text part {\"type\": \"text\", \"text\": ...}")
    return "".join(out)


def chat_messages(body: dict) -> list[dict]:
    """OpenAI messages -> the engine's message dicts (developer = system; tool calls and tool results kept)."""
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise bad("messages", "must be a non-empty list")
    out = []
    for i, m in enumerate(msgs):
        where = f"messages[{i}]"
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise bad(f"{where}.role", f"must be one of {', '.join(ROLES)}")
        extra = sorted(set(m) - MESSAGE_KEYS)
        if extra:
            raise bad(where, f"has unknown field(s) {', '.join(extra)}")
        role = ROLES[m["role"]]
        if m.get("audio") is not None or m.get("function_call") is not None:
            raise bad(f"{where}.{'audio' if m.get('audio') is not None else 'function_call'}", "is not supported")
        msg: dict[str, Any] = {"role": role, "content": text_content(m.get("content"), f"{where}.content", role)}
        if msg["content"] is None and not (role == "assistant" and m.get("tool_calls")):
            if "content" not in m or role != "assistant":
                raise bad(f"{where}.content", "is required")
        if m.get("name") is not None:
            if not isinstance(m["name"], str):
                raise bad(f"{where}.name", "must be a string")
            msg["name"] = m["name"]
        if m.get("reasoning_content") is not None:
            if role != "assistant" or not isinstance(m["reasoning_content"], str):
                raise bad(f"{where}.reasoning_content", "must be a string, on an assistant message")
            msg["reasoning_content"] = m["reasoning_content"]
        if m.get("tool_calls") is not None:
            if role != "assistant":
                raise bad(f"{where}.tool_calls", "is only allowed on assistant messages")
            msg["tool_calls"] = history_calls(m["tool_calls"], f"{where}.tool_calls")
        if role == "tool":
            if not isinstance(m.get("tool_call_id"), str):
                raise bad(f"{where}.tool_call_id", "is required on a tool message")
            msg["tool_call_id"] = m["tool_call_id"]
        elif m.get("tool_call_id") is not None:
            raise bad(f"{where}.tool_call_id", "is only allowed on tool messages")
        out.append(msg)
    return tool_calls.template_messages(out)


def history_calls(calls, where: str) -> list[dict]:
    if not isinstance(calls, list):
        raise bad(where, "must be a list")
    out = []
    for j, c in enumerate(calls):
        fn = c.get("function") if isinstance(c, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or c.get("type", "function") != "function":
            raise bad(f"{where}[{j}]", "must be {\"id\", \"type\": \"function\", \"function\": "
                                       "{\"name\", \"arguments\"}}")
        args = fn.get("arguments", "{}")
        if not isinstance(args, (str, dict)):
            raise bad(f"{where}[{j}].function.arguments", "must be a JSON string")
        out.append({"id": str(c.get("id", "")), "type": "function",
                    "function": {"name": fn["name"], "arguments": args}})
    return out


def check_tools(body: dict) -> list | None:
    tools = body.get("tools")
    if tools is None:
        return None
    if not isinstance(tools, list):
        raise bad("tools", "must be a list")
    for i, t in enumerate(tools):
        if not isinstance(t, dict) or t.get("type") != "function":
            raise bad(f"tools[{i}].type", "must be 'function' (custom tools are not supported)")
        fn = t.get("function")
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise bad(f"tools[{i}].function.name", "is required")
        if fn.get("parameters") is not None and not isinstance(fn["parameters"], dict):
            raise bad(f"tools[{i}].function.parameters", "must be a JSON schema object")
        extra = sorted(set(fn) - {"name", "description", "parameters", "strict"})
        if extra:
            raise bad(f"tools[{i}].function", f"has unknown field(s) {', '.join(extra)}")
    return tools or None


def check_tool_choice(body: dict, tools: list | None) -> str:
    """"auto", "none", "required" or the forced function's name."""
    choice = body.get("tool_choice")
    if choice is None:
        return "auto" if tools else "none"
    if not tools:
        raise bad("tool_choice", "is only allowed when 'tools' are given")
    if choice in ("auto", "none", "required"):
        return choice
    names = [t["function"]["name"] for t in tools]
    if isinstance(choice, dict) and choice.get("type") == "function" and isinstance(choice.get("function"), dict):
        name = choice["function"].get("name")
        if name not in names:
            raise bad("tool_choice.function.name", f"names no tool given in 'tools' ({', '.join(names)})")
        return name
    raise bad("tool_choice", "must be 'auto', 'none', 'required' or {\"type\": \"function\", \"function\": "
                             "{\"name\": ...}} (allowed_tools and custom tools are not supported)")


def response_format(body: dict) -> dict | None:
    """response_format -> Generate.grammar (compiled by daemon/engine/grammar.py; a schema it cannot compile
    comes back as a 400 naming it)."""
    rf = body.get("response_format")
    if rf is None:
        return None
    kind = rf.get("type") if isinstance(rf, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "json_object"}
    if kind == "json_schema":
        js = rf.get("json_schema")
        if not isinstance(js, dict) or not isinstance(js.get("schema", {}), dict):
            raise bad("response_format.json_schema", "must be {\"name\", \"schema\": {...}, \"strict\"}")
        return {"type": "json_schema", "schema": js.get("schema", {}), "strict": bool(js.get("strict"))}
    raise bad("response_format.type", "must be 'text', 'json_object' or 'json_schema'")


def template_kwargs(body: dict) -> dict | None:
    ctk = body.get("chat_template_kwargs")
    if ctk is not None and not isinstance(ctk, dict):
        raise bad("chat_template_kwargs", "must be an object")
    ctk = dict(ctk or {})
    effort = body.get("reasoning_effort")
    if effort is not None:
        if effort not in ("none", "minimal", "low", "medium", "high", "xhigh"):
            raise bad("reasoning_effort", "must be none, minimal, low, medium, high or xhigh")
        # templates that read it get it (gpt-oss); Qwen-style ones think or not
        ctk.setdefault("reasoning_effort", effort)
        ctk.setdefault("enable_thinking", effort not in ("none", "minimal"))
    return ctk or None


def chat_plan(body: dict, tokenizer) -> Plan:
    check_fields(body, CHAT)
    if body.get("modalities") not in (None, ["text"]):
        raise bad("modalities", "must be [\"text\"]: this model writes text only")
    stream, include_usage = stream_fields(body)
    messages = chat_messages(body)
    tools = check_tools(body)
    choice = check_tool_choice(body, tools)
    vocab = vocab_size(tokenizer)
    kw: dict[str, Any] = {"messages": messages, **sampling(body, 256, vocab)}
    plan = Plan(kw, chat=True, stream=stream, include_usage=include_usage,
                parallel=boolean(body, "parallel_tool_calls", True))
    if tools and choice != "none":
        if tool_calls.tool_format(tokenizer) is None:
            raise bad("tools", "given, but this model's chat template has no tool-call format")
        kw["tools"] = plan.tools = tools
        plan.parse_tools = True
        if choice != "auto":
            kw["grammar"] = tool_calls.forced_call_grammar(tools, choice, tokenizer)
    grammar = response_format(body)
    if grammar is not None:
        if "grammar" in kw:
            raise bad("response_format", "cannot be combined with a forced 'tool_choice'")
        kw["grammar"] = grammar
    ctk = template_kwargs(body)
    if ctk is not None:
        kw["chat_template_kwargs"] = ctk
    lp = boolean(body, "logprobs")
    top = number(body, "top_logprobs", 0, 20, int)
    if top is not None and not lp:
        raise bad("top_logprobs", "needs 'logprobs': true")
    plan.logprobs = (top or 0) if lp else -1
    if lp:
        kw["logprobs"] = plan.logprobs
    plan.n = n_of(body, stream)
    return plan


def n_of(body: dict, stream: bool) -> int:
    n = number(body, "n", 1, MAX_N, int, 1)
    if n > 1 and stream:
        raise bad("n", "greater than 1 cannot be streamed here (send n requests, or stream: false)")
    return n


# ------------------------------------------------------------------------------------------ completions


def completions_plan(body: dict, tokenizer) -> Plan:
    check_fields(body, COMPLETIONS)
    stream, include_usage = stream_fields(body)
    prompt = body.get("prompt")
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise bad("prompt", "must be a string or a list of strings (token-id prompts are not supported)")
    if body.get("suffix") not in (None, ""):
        raise bad("suffix", "is not supported (no fill-in-the-middle template)")
    vocab = vocab_size(tokenizer)
    plan = Plan(sampling(body, 16, vocab), chat=False, stream=stream, include_usage=include_usage, prompts=prompts)
    plan.n = n_of(body, stream)
    best_of = number(body, "best_of", 1, MAX_N, int)
    if best_of is not None and best_of != plan.n:
        raise bad("best_of", "other than n is not supported (the server would have to rank candidates)")
    if stream and len(prompts) > 1:
        raise bad("prompt", "with several prompts cannot be streamed here")
    lp = number(body, "logprobs", 0, 20, int)
    if lp is not None:
        plan.kw["logprobs"] = plan.logprobs = lp
    plan.echo = boolean(body, "echo")
    if plan.echo and lp is not None:
        raise bad("echo", "with 'logprobs' is not supported (prompt tokens' logprobs are not computed)")
    return plan


# ------------------------------------------------------------------------------------------ output


class TokenText:
    """A token id's text and bytes, for logprobs (byte-level BPE: its exact bytes, via mlx-lm's byte map)."""

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.cache: dict[int, tuple[str, list[int]]] = {}
        try:
            from mlx_lm.tokenizer_utils import BPEStreamingDetokenizer, _byte_decoder

            self.bytemap = _byte_decoder() if isinstance(tokenizer._detokenizer, BPEStreamingDetokenizer) else None
        except (ImportError, AttributeError):
            self.bytemap = None

    def __call__(self, tid: int) -> tuple[str, list[int]]:
        got = self.cache.get(tid)
        if got is None:
            piece = self.tok._tokenizer.convert_ids_to_tokens(tid) if self.bytemap is not None else None
            if isinstance(piece, str) and all(c in self.bytemap for c in piece):
                b = bytes(self.bytemap[c] for c in piece)
            else:
                b = self.tok.decode([tid]).encode()
            got = self.cache[tid] = (b.decode("utf-8", "replace"), list(b))
        return got


@dataclass
class Choice:
    """One sequence's answer, built from its events."""

    index: int
    content: str = ""
    reasoning: str = ""
    calls: list = field(default_factory=list)
    tokens: list = field(default_factory=list)  # Token events (for logprobs)
    finished: Finished | None = None

    def finish_reason(self) -> str:
        fin = self.finished
        if fin is not None and fin.reason == "length":
            return "length"
        return "tool_calls" if self.calls else "stop"


def chat_logprobs(tokens: list[Token], text_of: TokenText) -> dict:
    content = []
    for t in tokens:
        s, b = text_of(t.token)
        top = [{"token": text_of(i)[0], "logprob": lp, "bytes": text_of(i)[1]} for i, lp in (t.top_logprobs or [])]
        content.append({"token": s, "logprob": t.logprob, "bytes": b, "top_logprobs": top})
    return {"content": content, "refusal": None}


def legacy_logprobs(tokens: list[Token], text_of: TokenText, offset: int = 0) -> dict:
    out: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for t in tokens:
        s = text_of(t.token)[0]
        out["tokens"].append(s)
        out["token_logprobs"].append(t.logprob)
        out["top_logprobs"].append({text_of(i)[0]: lp for i, lp in (t.top_logprobs or [])} or None)
        out["text_offset"].append(offset)
        offset += len(t.text)
    return out


def usage(fins: list[Finished], n: int = 1) -> dict:
    """Usage of a request's choices, n per prompt: each prompt counted once (its n choices share it)."""
    prompt = sum(f.prompt_tokens for f in fins[::n])
    cached = sum(f.cached_tokens for f in fins[::n])
    completion = sum(f.completion_tokens for f in fins)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}


async def collect(gen, choice: Choice, stream: tool_calls.ToolCallStream | None) -> Choice:
    """Run one Generate to its end into `choice`."""
    async for ev in gen:
        if isinstance(ev, Token):
            choice.tokens.append(ev)
            if stream is None:
                choice.content += ev.text
            else:
                add_events(choice, stream.feed(ev.text))
        else:
            choice.finished = ev
    if stream is not None:
        add_events(choice, stream.finish())
    return choice


def add_events(choice: Choice, events) -> None:
    for ev in events:
        if isinstance(ev, tool_calls.ToolCall):
            choice.calls.append(ev)
        elif ev.kind == "reasoning":
            choice.reasoning += ev.text
        else:
            choice.content += ev.text


def chat_message(c: Choice) -> dict:
    msg: dict[str, Any] = {"role": "assistant", "content": c.content if (c.content or not c.calls) else None}
    if c.reasoning:
        msg["reasoning_content"] = c.reasoning
    if c.calls:
        msg["tool_calls"] = [call.openai() for call in c.calls]
    return msg


async def gather_cancelling(coros) -> list:
    """Run coroutines together; when one fails (or this is cancelled) the others are cancelled (aborted)."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        return await asyncio.gather(*tasks)
    finally:
        for t in tasks:
            if not t.done():
                t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
