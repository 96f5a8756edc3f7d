"""The Anthropic Messages API (/v1/messages, /v1/messages/count_tokens): a translation layer like the OpenAI one.

A Messages request becomes the same native Generate the OpenAI layer sends (chat messages in OpenAI's
shape, `tools` for the chat template, the grammar that forces a tool call), through the HTTP API's own
AsyncClient, so both APIs share one engine path. The model's output is split with mlx-lm's own parts:
its TextStateMachine (the tokenizer's think and tool-call markers) into thinking, text and tool calls,
and its tool parser (chosen by the tokenizer) into tool_use blocks.

The tokenizer is loaded once, lazily, in this process from the checkpoint the daemon serves (mlx-lm's
load_tokenizer, as the engine loads it): count_tokens renders the chat template exactly as the engine
does, and the splitter needs the markers and the parser. Plugged into the app with
`routes(api)` (see daemon/service/http.py make_app).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import uuid
from typing import Any, AsyncIterator

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from moed.client.client import DaemonDied, RequestRejected
from moed.daemon.service import tools as tool_calls
from moed.daemon.service.api import ApiError, parse_json_object, read_json_body, ticking
from moed.ipc.messages import Finished, Token

MAX_BODY_BYTES = 32 << 20
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 413: "request_too_large", 415: "invalid_request_error", 429: "rate_limit_error",
               500: "api_error", 503: "overloaded_error", 529: "overloaded_error"}
NATIVE_STATUS = {"bad_request": 400, "context_length_exceeded": 400, "rejected": 429, "unauthorized": 401,
                 "shutdown": 503, "internal": 500}
# request fields: honoured, or accepted because they change nothing here (see the README table)
# (temperature/top_p/top_k are gone from the newest SDK's signature; older SDKs and agents still send them)
FIELDS = {"model", "messages", "max_tokens", "system", "stop_sequences", "temperature", "top_p", "top_k",
          "stream", "tools", "tool_choice", "thinking", "output_config",
          "metadata", "service_tier", "cache_control", "speed", "inference_geo", "diagnostics", "user_profile_id",
          "workspace_id"}
NO_EFFECT = {"metadata", "service_tier", "cache_control", "speed", "inference_geo", "diagnostics", "user_profile_id",
             "workspace_id"}  # accounting, routing and caching hints with nothing to do on one local model
COUNT_FIELDS = {"model", "messages", "system", "tools", "tool_choice", "thinking", "output_config", "cache_control"}
BLOCK_TYPES = {"text", "tool_use", "tool_result", "thinking", "redacted_thinking"}
PING_S = 10.0


class AnthropicError(Exception):
    def __init__(self, status: int, message: str, kind: str | None = None):
        super().__init__(message)
        self.status, self.kind = status, kind or ERROR_TYPES.get(status, "api_error")

    def body(self) -> dict:
        return {"type": "error", "error": {"type": self.kind, "message": str(self)}}


def routes(api) -> list[Route]:
    """The Messages API's routes on the HTTP API object (`api`: daemon/service/http.py Api)."""
    m = Messages(api)
    return [Route("/v1/messages", m.wrap(m.create), methods=["POST"]),
            Route("/v1/messages/count_tokens", m.wrap(m.count_tokens), methods=["POST"])]


# ------------------------------------------------------------------------------------------ request


def bad(msg: str) -> AnthropicError:
    return AnthropicError(400, msg)


def number(body: dict, key: str, lo: float, hi: float, kind=float):
    v = body.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (kind is int and not isinstance(v, int)):
        raise bad(f"{key}: must be {'an integer' if kind is int else 'a number'}")
    if not lo <= v <= hi:
        raise bad(f"{key}: must be between {lo} and {hi}, got {v}")
    return kind(v)


def text_of(blocks, where: str) -> str:
    """A string, or a list of text blocks, as one string."""
    if isinstance(blocks, str):
        return blocks
    if not isinstance(blocks, list):
        raise bad(f"{where}: must be a string or a list of text blocks")
    out = []
    for i, b in enumerate(blocks):
        if not isinstance(b, dict) or b.get("type") != "text" or not isinstance(b.get("text"), str):
            kind = b.get("type") if isinstance(b, dict) else type(b).__name__
            raise bad(f"{where}.{i}: only text blocks are supported here, got {kind!r}")
        out.append(b["text"])
    return "".join(out)


def chat_messages(body: dict) -> list[dict]:
    """Anthropic system + messages -> OpenAI-style chat dicts (assistant tool_calls, role "tool")."""
    out: list[dict] = []
    if body.get("system") is not None:
        out.append({"role": "system", "content": text_of(body["system"], "system")})
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise bad("messages: must be a non-empty list")
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get("role") not in ("user", "assistant"):
            raise bad(f"messages.{i}.role: must be 'user' or 'assistant'")
        extra = set(m) - {"role", "content"}
        if extra:
            raise bad(f"messages.{i}: unknown field(s) {', '.join(sorted(extra))}")
        content = m.get("content")
        if isinstance(content, str):
            out.append({"role": m["role"], "content": content})
            continue
        if not isinstance(content, list):
            raise bad(f"messages.{i}.content: must be a string or a list of content blocks")
        out.extend(translate_blocks(m["role"], content, f"messages.{i}.content"))
    return out


def translate_blocks(role: str, blocks: list, where: str) -> list[dict]:
    """One Anthropic message's blocks as chat messages: text, then tool calls (assistant) or tool results
    (user: each a "tool" message, in order with the text around them)."""
    out: list[dict] = []
    text, thinking, calls = [], [], []

    def flush_user():
        if text:
            out.append({"role": "user", "content": "".join(text)})
            text.clear()

    for j, b in enumerate(blocks):
        kind = b.get("type") if isinstance(b, dict) else None
        if kind not in BLOCK_TYPES:
            raise bad(f"{where}.{j}.type: {kind!r} blocks are not supported (supported: text, tool_use, "
                      "tool_result, thinking)")
        if kind == "text":
            if not isinstance(b.get("text"), str):
                raise bad(f"{where}.{j}.text: must be a string")
            text.append(b["text"])
        elif kind == "tool_use":
            if role != "assistant":
                raise bad(f"{where}.{j}: tool_use blocks belong to assistant messages")
            if not isinstance(b.get("name"), str) or not isinstance(b.get("input", {}), dict):
                raise bad(f"{where}.{j}: a tool_use block needs a 'name' and an 'input' object")
            calls.append({"id": str(b.get("id") or "toolu_" + uuid.uuid4().hex[:24]), "type": "function",
                          "function": {"name": b["name"], "arguments": b.get("input", {})}})
        elif kind == "tool_result":
            if role != "user":
                raise bad(f"{where}.{j}: tool_result blocks belong to user messages")
            flush_user()
            content = b.get("content", "")
            result = content if isinstance(content, str) else text_of(content, f"{where}.{j}.content")
            if b.get("is_error"):
                result = "Error: " + result
            out.append({"role": "tool", "tool_call_id": str(b.get("tool_use_id", "")), "content": result})
        elif kind == "thinking":
            if role != "assistant":
                raise bad(f"{where}.{j}: thinking blocks belong to assistant messages")
            thinking.append(str(b.get("thinking", "")))
        # redacted_thinking: another model's encrypted reasoning, nothing this model can read
    if role == "user":
        flush_user()
        return out
    msg: dict[str, Any] = {"role": "assistant", "content": "".join(text) if text or not calls else None}
    if calls:
        msg["tool_calls"] = calls
    if thinking:
        msg["reasoning_content"] = "".join(thinking)
    return [msg]


def openai_tools(body: dict) -> list[dict] | None:
    """Anthropic custom tools -> OpenAI function tools, as the chat template takes them."""
    tools = body.get("tools")
    if tools is None:
        return None
    if not isinstance(tools, list):
        raise bad("tools: must be a list")
    out = []
    for i, t in enumerate(tools):
        if not isinstance(t, dict) or t.get("type") not in (None, "custom"):
            kind = t.get("type") if isinstance(t, dict) else None
            raise bad(f"tools.{i}.type: server tool {kind!r} is not supported (only custom tools)")
        if not isinstance(t.get("name"), str) or not isinstance(t.get("input_schema"), dict):
            raise bad(f"tools.{i}: a tool needs a 'name' and an 'input_schema' object")
        fn = {"name": t["name"], "parameters": t["input_schema"]}
        if t.get("description") is not None:
            fn["description"] = str(t["description"])
        out.append({"type": "function", "function": fn})
    return out


def tool_choice_of(body: dict, tools: list | None) -> tuple[str, str | None, bool]:
    """(auto | any | tool | none, the forced tool's name, disable_parallel_tool_use)."""
    tc = body.get("tool_choice")
    if tc is None:
        return "auto", None, False
    if not isinstance(tc, dict) or tc.get("type") not in ("auto", "any", "tool", "none"):
        raise bad("tool_choice.type: must be one of auto, any, tool, none")
    kind, name = tc["type"], tc.get("name")
    if kind in ("any", "tool") and not tools:
        raise bad(f"tool_choice: {kind!r} needs tools")
    if kind == "tool" and name not in {t["function"]["name"] for t in tools}:
        raise bad(f"tool_choice.name: {name!r} is not among the tools")
    return kind, name if kind == "tool" else None, bool(tc.get("disable_parallel_tool_use"))


def thinking_kwargs(body: dict, max_tokens: int | None) -> dict | None:
    """`thinking` -> the chat template's enable_thinking (Qwen's and others' templates)."""
    th = body.get("thinking")
    if th is None:
        return None
    if not isinstance(th, dict) or th.get("type") not in ("enabled", "disabled", "adaptive"):
        raise bad("thinking.type: must be 'enabled', 'disabled' or 'adaptive'")
    if th["type"] == "enabled":
        budget = th.get("budget_tokens")
        if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1024:
            raise bad("thinking.budget_tokens: must be an integer >= 1024")
        if max_tokens is not None and budget >= max_tokens:
            raise bad("thinking.budget_tokens: must be less than max_tokens")
    return {"enable_thinking": th["type"] != "disabled"}


def output_format(body: dict) -> dict | None:
    """output_config.format (structured outputs): the JSON schema the answer must follow."""
    oc = body.get("output_config")
    if oc is None:
        return None
    if not isinstance(oc, dict) or set(oc) - {"effort", "format"}:
        raise bad("output_config: only 'effort' and 'format' are known")
    if oc.get("effort") not in (None, "low", "medium", "high", "xhigh", "max"):
        raise bad("output_config.effort: must be low, medium, high, xhigh or max")
    fmt = oc.get("format")
    if fmt is None:
        return None
    if not isinstance(fmt, dict) or fmt.get("type") != "json_schema" or not isinstance(fmt.get("schema"), dict):
        raise bad("output_config.format: must be {'type': 'json_schema', 'schema': {...}}")
    return fmt["schema"]


# ------------------------------------------------------------------------------------------ output


class Splitter:
    """The model's text as Anthropic content, with the OpenAI layer's ToolCallStream (mlx-lm's
    TextStateMachine and tool parser, daemon/service/tools.py): `feed` and `finish` return
    ("thinking" | "text", str) and ("tool_use", {"name", "input"}) events."""

    def __init__(self, tokenizer, tools: list | None, initial: str, parse_tools: bool, parallel: bool = True):
        self.stream = tool_calls.ToolCallStream(tokenizer, tools, initial=initial, parse=parse_tools,
                                                parallel=parallel)

    def feed(self, text: str) -> list:
        return self._events(self.stream.feed(text))

    def finish(self, reason: str = "stop") -> list:
        return self._events(self.stream.finish())

    @staticmethod
    def _events(evs) -> list:
        out = []
        for ev in evs:
            if isinstance(ev, tool_calls.ToolCall):
                args = ev.arguments if isinstance(ev.arguments, dict) else {"arguments": ev.arguments}
                out.append(("tool_use", {"name": ev.name, "input": args}))
            else:
                out.append(("thinking" if ev.kind == "reasoning" else "text", ev.text))
        return out


def stop_reason(fin: Finished, used_tool: bool, stop: list | None) -> tuple[str, str | None]:
    seq = fin.stop_sequence
    if used_tool:
        return "tool_use", None
    if fin.reason == "length":
        return "max_tokens", None
    if seq is not None:
        return "stop_sequence", seq
    return "end_turn", None


def usage(fin: Finished) -> dict:
    return {"input_tokens": fin.prompt_tokens - fin.cached_tokens, "output_tokens": fin.completion_tokens,
            "cache_read_input_tokens": fin.cached_tokens, "cache_creation_input_tokens": 0}


# ------------------------------------------------------------------------------------------ handlers


class Messages:
    def __init__(self, api):
        self.api = api

    def wrap(self, fn):
        async def handler(request: Request) -> Response:
            try:
                self.check_auth(request)
                return await fn(request)
            except AnthropicError as e:
                return JSONResponse(e.body(), status_code=e.status)
            except (RequestRejected, DaemonDied) as e:
                err = native_error(e)
                return JSONResponse(err.body(), status_code=err.status)
        return handler

    def check_auth(self, request: Request) -> None:
        key = getattr(self.api, "api_key", None)
        if key is None:
            return
        got = request.headers.get("x-api-key") or request.headers.get("authorization", "").removeprefix("Bearer ")
        if not hmac.compare_digest(got.encode(), key.encode()):
            raise AnthropicError(401, "invalid x-api-key")

    async def body(self, request: Request, fields: set) -> dict:
        try:
            raw = await read_json_body(request, MAX_BODY_BYTES)  # 415 unless JSON, 413 as it passes the cap
        except ApiError as e:
            raise AnthropicError(e.status, str(e)) from None
        try:
            body = parse_json_object(raw)  # the OpenAI layer's checks: JSON object, valid Unicode
        except ApiError as e:
            raise bad(str(e)) from None
        unknown = set(body) - fields
        if unknown:
            raise bad(f"{', '.join(sorted(unknown))}: not supported by this server")
        if not isinstance(body.get("model"), str) or not body["model"]:
            raise bad("model: field required")
        return body

    async def tokenizer(self):
        """mlx-lm's tokenizer of the served checkpoint: the HTTP API's (loaded once, shared with OpenAI's)."""
        return await self.api.tokenizer()

    async def translate(self, body: dict, counting: bool = False) -> tuple[dict, Any, list[int]]:
        """(Generate keyword arguments, tokenizer, prompt ids as the engine will render them)."""
        max_tokens = None
        if not counting:
            if body.get("max_tokens") is None:
                raise bad("max_tokens: field required")
            max_tokens = number(body, "max_tokens", 1, 1 << 20, int)
        messages = chat_messages(body)
        tools = openai_tools(body)
        kind, name, _ = tool_choice_of(body, tools)
        template = thinking_kwargs(body, max_tokens)
        messages = tool_calls.template_messages(messages)
        kw: dict[str, Any] = {"messages": messages}
        if tools and kind != "none":
            kw["tools"] = tools
        if template is not None:
            kw["chat_template_kwargs"] = template
        tok = await self.tokenizer()
        targs = dict(template or {})
        if kw.get("tools"):
            targs["tools"] = kw["tools"]
        try:
            ids = list(await asyncio.to_thread(tok.apply_chat_template, messages, add_generation_prompt=True, **targs))
        except Exception as e:  # a template's own check (e.g. roles must alternate)
            raise bad(f"messages: the chat template refused them: {e}") from None
        if counting:
            return kw, tok, ids
        if kind in ("any", "tool"):
            if tool_calls.tool_format(tok) is None:
                raise bad(f"tool_choice: {kind!r} needs a tool-call format, and this model's tokenizer has none")
            kw["grammar"] = tool_calls.forced_call_grammar(tools, name if kind == "tool" else "required", tok)
        fmt_schema = output_format(body)
        if fmt_schema is not None:
            if "grammar" in kw:
                raise bad("output_config.format: cannot be combined with a forced tool_choice")
            kw["grammar"] = {"type": "json_schema", "schema": fmt_schema, "strict": True}
        stop = body.get("stop_sequences")
        if stop is not None and (not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop)):
            raise bad("stop_sequences: must be a list of non-empty strings")
        for key in ("metadata", "cache_control", "diagnostics"):
            if body.get(key) is not None and not isinstance(body[key], dict):
                raise bad(f"{key}: must be an object")
        if body.get("service_tier") not in (None, "auto", "standard_only"):
            raise bad("service_tier: must be 'auto' or 'standard_only'")
        if body.get("speed") not in (None, "standard", "fast"):
            raise bad("speed: must be 'standard' or 'fast'")
        temperature = number(body, "temperature", 0.0, 1.0)
        kw.update(max_tokens=max_tokens, temperature=1.0 if temperature is None else temperature,
                  top_p=number(body, "top_p", 0.0, 1.0) or 1.0, top_k=number(body, "top_k", 0, 1 << 30, int) or 0,
                  stop=stop)
        return kw, tok, ids

    async def count_tokens(self, request: Request) -> Response:
        body = await self.body(request, COUNT_FIELDS)
        _, _, ids = await self.translate(body, counting=True)
        return JSONResponse({"input_tokens": len(ids)})

    async def create(self, request: Request) -> Response:
        body = await self.body(request, FIELDS)
        kw, tok, ids = await self.translate(body)
        if body.get("stream") not in (None, True, False):
            raise bad("stream: must be a boolean")
        _, _, single = tool_choice_of(body, kw.get("tools"))
        initial = tool_calls.initial_state(tok, tok.decode(ids[-64:]))  # the template may open a think block
        splitter = Splitter(tok, kw.get("tools"), initial, parse_tools=bool(kw.get("tools")), parallel=not single)
        client = await self.api.native()
        gen = client.generate(**kw)
        try:
            first = await gen.__anext__()  # errors before the first token are HTTP errors
        except (RequestRejected, DaemonDied) as e:
            raise native_error(e) from None
        msg_id = "msg_" + uuid.uuid4().hex[:24]
        model = body["model"]
        if body.get("stream"):
            return StreamingResponse(self.events(first, gen, splitter, msg_id, model, len(ids),
                                                 body.get("stop_sequences")),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        blocks, fin = [], None
        async for ev in chain(first, gen):
            if isinstance(ev, Token):
                add_blocks(blocks, splitter.feed(ev.text))
            else:
                fin = ev
                add_blocks(blocks, splitter.finish(ev.reason))
        reason, seq = stop_reason(fin, any(b["type"] == "tool_use" for b in blocks), body.get("stop_sequences"))
        return JSONResponse({"id": msg_id, "type": "message", "role": "assistant", "model": model,
                             "content": blocks, "stop_reason": reason, "stop_sequence": seq, "usage": usage(fin)})

    async def events(self, first, gen, splitter: Splitter, msg_id: str, model: str, n_prompt: int,
                     stop: list | None) -> AsyncIterator[str]:
        """Anthropic's SSE: message_start, ping, content blocks (start, deltas, stop), message_delta, message_stop."""
        yield sse("message_start", {"type": "message_start", "message": {
            "id": msg_id, "type": "message", "role": "assistant", "model": model, "content": [],
            "stop_reason": None, "stop_sequence": None,
            "usage": {"input_tokens": n_prompt, "output_tokens": 0}}})
        yield sse("ping", {"type": "ping"})
        stream = BlockStream()
        try:
            async for ev in ticking(chain(first, gen), PING_S):
                if ev is None:
                    yield sse("ping", {"type": "ping"})
                elif isinstance(ev, Token):
                    for out in stream.add(splitter.feed(ev.text)):
                        yield out
                else:
                    for out in stream.add(splitter.finish(ev.reason)):
                        yield out
                    for out in stream.close():
                        yield out
                    reason, seq = stop_reason(ev, stream.used_tool, stop)
                    yield sse("message_delta", {"type": "message_delta",
                                                "delta": {"stop_reason": reason, "stop_sequence": seq},
                                                "usage": usage(ev)})
                    yield sse("message_stop", {"type": "message_stop"})
        except (RequestRejected, DaemonDied) as e:
            yield sse("error", native_error(e).body())


class BlockStream:
    """Content events -> content_block_start/delta/stop events, one block per run of one kind."""

    def __init__(self):
        self.index, self.open, self.used_tool = -1, None, False

    def add(self, events: list) -> list[str]:
        out = []
        for kind, value in events:
            if kind == "tool_use":
                out += self.close()
                self.index += 1
                self.used_tool = True
                block = {"type": "tool_use", "id": "toolu_" + uuid.uuid4().hex[:24], "name": value["name"],
                         "input": {}}
                out.append(sse("content_block_start", {"type": "content_block_start", "index": self.index,
                                                       "content_block": block}))
                out.append(sse("content_block_delta", {"type": "content_block_delta", "index": self.index, "delta": {
                    "type": "input_json_delta", "partial_json": json.dumps(value["input"])}}))
                out += self.close(force=True)
                continue
            if self.open != kind:
                out += self.close()
                self.index += 1
                self.open = kind
                start = {"type": "text", "text": ""} if kind == "text" else {"type": "thinking", "thinking": "",
                                                                             "signature": ""}
                out.append(sse("content_block_start", {"type": "content_block_start", "index": self.index,
                                                       "content_block": start}))
            delta = {"type": "text_delta", "text": value} if kind == "text" else {"type": "thinking_delta",
                                                                                  "thinking": value}
            out.append(sse("content_block_delta", {"type": "content_block_delta", "index": self.index,
                                                   "delta": delta}))
        return out

    def close(self, force: bool = False) -> list[str]:
        if self.open is None and not force:
            return []
        out = []
        if self.open == "thinking":
            out.append(sse("content_block_delta", {"type": "content_block_delta", "index": self.index,
                                                   "delta": {"type": "signature_delta", "signature": ""}}))
        self.open = None
        out.append(sse("content_block_stop", {"type": "content_block_stop", "index": self.index}))
        return out


def add_blocks(blocks: list, events: list) -> None:
    for kind, value in events:
        if kind == "tool_use":
            blocks.append({"type": "tool_use", "id": "toolu_" + uuid.uuid4().hex[:24], **value})
        elif blocks and blocks[-1]["type"] == kind:
            blocks[-1][kind] += value
        else:
            blocks.append({"type": "text", "text": value} if kind == "text"
                          else {"type": "thinking", "thinking": value, "signature": ""})


def native_error(e: Exception) -> AnthropicError:
    if isinstance(e, DaemonDied):
        return AnthropicError(529, str(e))
    code = getattr(e, "code", "internal")
    return AnthropicError(NATIVE_STATUS.get(code, 400), getattr(e, "reason", str(e)))


def sse(event: str, data: dict) -> str:
    return f"event: {event}\ndata: {json.dumps(data)}\n\n"


async def chain(first, gen):
    yield first
    if not isinstance(first, Finished):
        async for ev in gen:
            yield ev
