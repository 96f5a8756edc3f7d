"""Constrained decoding: a request's grammar as a per-request logits processor, with llguidance.

A spec (Generate.grammar) is compiled into an llguidance grammar and checked against the tokenizer; a
matcher per request then masks every token the grammar does not allow next. Once the grammar is
complete only EOS is allowed, so generation stops. Specs:

    {"type": "json_object"}                             any JSON object
    {"type": "json_schema", "schema": {...}, "strict": bool}
    {"type": "regex", "pattern": "..."}
    {"type": "lark", "grammar": "..."}                  llguidance's Lark dialect (%json {...} inside)
    {"type": "tool_call", "tools": [...], "tool_choice": "required" | {"name": ...}, "format": FAMILY}
                                                        one call in the family's tool-call format
                                                        (mlx-lm's tool parser names: json_tools,
                                                        qwen3_coder), arguments matching the tool's schema

JSON is compact (no free whitespace), so a model cannot pad it forever. strict=True refuses a schema
keyword llguidance does not implement; strict=False ignores it (lenient).
"""

from __future__ import annotations

import json
import threading
import weakref
from typing import Any

import mlx.core as mx
import numpy as np


class GrammarError(ValueError):
    """A spec that cannot be compiled; the message names it (sampling.processors makes it a BadSampling)."""


JSON_OPTIONS = {"whitespace_flexible": False}
TOOL_FORMATS = ("json_tools", "qwen3_coder")

_tokenizers: "weakref.WeakKeyDictionary[Any, Any]" = weakref.WeakKeyDictionary()
_lock = threading.Lock()


def ll_tokenizer(tokenizer):
    """llguidance's token table for an mlx-lm TokenizerWrapper (or HF tokenizer), built once per tokenizer."""
    import llguidance.hf

    hf = getattr(tokenizer, "_tokenizer", tokenizer)
    with _lock:
        llt = _tokenizers.get(hf)
        if llt is None:
            eos = sorted(getattr(tokenizer, "eos_token_ids", None) or [hf.eos_token_id])
            llt = _tokenizers[hf] = llguidance.hf.from_tokenizer(hf, eos_token=eos)
        return llt


def make_processor(spec: dict, tokenizer) -> "GrammarProcessor":
    """The logits processor enforcing `spec` (see the module doc) for one request.

    Raises:
        GrammarError: the spec is malformed or llguidance cannot compile it; the message names it.
    """
    import llguidance

    llt = ll_tokenizer(tokenizer)
    grammar = compile_spec(spec, tokenizer)
    error = llguidance.LLMatcher.validate_grammar(grammar, llt)
    if error:
        raise GrammarError(f"{describe(spec)} cannot be compiled: {first_line(error)}")
    matcher = llguidance.LLMatcher(llt, grammar, log_level=0)
    if matcher.is_error():
        raise GrammarError(f"{describe(spec)} cannot be compiled: {first_line(matcher.get_error())}")
    return GrammarProcessor(matcher, llt)


def compile_spec(spec: dict, tokenizer=None) -> str:
    """The llguidance grammar (a JSON string) of a spec."""
    import llguidance

    if not isinstance(spec, dict):
        raise GrammarError(f"grammar must be an object, got {type(spec).__name__}")
    kind = spec.get("type")
    try:
        if kind == "json_object":
            return llguidance.LLMatcher.grammar_from_json_schema({"type": "object"}, overrides=JSON_OPTIONS)
        if kind == "json_schema":
            schema = spec.get("schema")
            if not isinstance(schema, (dict, bool)):
                raise GrammarError("json_schema needs a 'schema' object")
            options = dict(JSON_OPTIONS, lenient=not spec.get("strict", False))
            return llguidance.LLMatcher.grammar_from_json_schema(schema, overrides=options)
        if kind == "regex":
            if not isinstance(spec.get("pattern"), str):
                raise GrammarError("regex grammar needs a 'pattern' string")
            return llguidance.LLMatcher.grammar_from_regex(spec["pattern"])
        if kind == "lark":
            if not isinstance(spec.get("grammar"), str):
                raise GrammarError("lark grammar needs a 'grammar' string")
            return llguidance.LLMatcher.grammar_from_lark(spec["grammar"])
        if kind == "tool_call":
            return llguidance.LLMatcher.grammar_from_lark(tool_call_lark(spec, tokenizer))
    except ValueError as e:
        if isinstance(e, GrammarError):
            raise
        raise GrammarError(f"{describe(spec)} cannot be compiled: {first_line(str(e))}") from None
    raise GrammarError(f"grammar type {kind!r} is not supported (json_object, json_schema, regex, lark, tool_call)")


# ------------------------------------------------------------------------------------------ tool calls


def tool_call_lark(spec: dict, tokenizer=None) -> str:
    """A Lark grammar for exactly one tool call in the family's format, arguments per the tool's schema.

    spec: {"tools": OpenAI function tools, "tool_choice": "required" | {"name"} | {"function": {"name"}},
    "format": mlx-lm tool parser name (default: the tokenizer's)}.
    """
    tools = [t.get("function", t) for t in spec.get("tools") or [] if isinstance(t, dict)]
    if not tools or not all(isinstance(t.get("name"), str) for t in tools):
        raise GrammarError("tool_call grammar needs 'tools' with named functions")
    name = choice_name(spec.get("tool_choice", "required"))
    if name is not None:
        tools = [t for t in tools if t["name"] == name]
        if not tools:
            raise GrammarError(f"tool_choice names {name!r}, which is not among the tools")
    fmt = spec.get("format") or tool_format_of(tokenizer)
    if fmt == "json_tools":
        calls = [json_tools_call(t) for t in tools]
        return f"start: {wrap(tokenizer)}\ncall: " + "\n    | ".join(calls) + "\n"
    if fmt == "qwen3_coder":
        rules, alts = [], []
        for i, t in enumerate(tools):
            alts.append(f"fn{i}")
            rules.extend(qwen3_coder_call(t, f"fn{i}"))
        head = f"start: {wrap(tokenizer)}\ncall: " + " | ".join(alts)
        return head + "\n" + "\n".join(rules) + "\n"
    raise GrammarError(f"tool-call format {fmt!r} cannot be forced (supported: {', '.join(TOOL_FORMATS)})")


def wrap(tokenizer) -> str:
    """`<tool_call>\\n call \\n</tool_call>`, each marker as the tokenizer has it: an added token (Qwen's
    tokenizers add both) is one token to llguidance, named `<[ID]>` in its Lark, not the text's bytes."""
    return f"{marker(tokenizer, '<tool_call>')} \"\\n\" call \"\\n\" {marker(tokenizer, '</tool_call>')}"


def marker(tokenizer, text: str) -> str:
    if tokenizer is not None:
        ids = tokenizer.encode(text, add_special_tokens=False)
        if len(ids) == 1 and ll_tokenizer(tokenizer).is_special_token(ids[0]):
            return f"<[{ids[0]}]>"
    return f"\"{lark_str(text)}\""


def choice_name(choice) -> str | None:
    """The forced function's name of a tool_choice, or None for any tool ('required')."""
    if choice in ("required", "any", None):
        return None
    if isinstance(choice, dict):
        name = choice.get("name") or (choice.get("function") or {}).get("name")
        if isinstance(name, str):
            return name
    raise GrammarError(f"tool_choice {choice!r} cannot be forced")


def tool_format_of(tokenizer) -> str | None:
    kwargs = getattr(tokenizer, "init_kwargs", None) or {}
    return kwargs.get("tool_parser_type")


def parameters_of(tool: dict) -> dict:
    params = tool.get("parameters")
    if params is None:
        return {"type": "object", "properties": {}}
    if not isinstance(params, dict):
        raise GrammarError(f"tool {tool['name']!r} parameters must be a JSON schema object")
    return params


def json_tools_call(tool: dict) -> str:
    """`{"name": "NAME", "arguments": {...}}` as the json_tools parser (Qwen's) reads it."""
    schema = {"type": "object", "properties": {"name": {"const": tool["name"]}, "arguments": parameters_of(tool)},
              "required": ["name", "arguments"], "additionalProperties": False}
    return "%json " + json.dumps(dict(schema, **{"x-guidance": JSON_OPTIONS}))


def qwen3_coder_call(tool: dict, rule: str) -> list[str]:
    """`<function=NAME>\\n<parameter=P>\\nVALUE\\n</parameter>\\n...</function>` as qwen3_coder reads it:
    properties in schema order, the required ones always, the others optionally; a string value is raw
    text without '<' (an enum: one of its values), any other value compact JSON of its schema."""
    params = parameters_of(tool)
    props = params.get("properties") or {}
    required = set(params.get("required") or ())
    parts, rules = [], []
    for j, (pname, pschema) in enumerate(props.items()):
        sub = f"{rule}_p{j}"
        value = qwen3_coder_value(pschema if isinstance(pschema, dict) else {})
        rules.append(f"{sub}: \"<parameter={lark_str(pname)}>\\n\" {value} \"\\n</parameter>\\n\"")
        parts.append(sub if pname in required else f"{sub}?")
    body = " ".join(parts)
    rules.insert(0, f"{rule}: \"<function={lark_str(tool['name'])}>\\n\" {body} \"</function>\"")
    return rules


def qwen3_coder_value(schema: dict) -> str:
    """One parameter's value as qwen3_coder's parser converts it: raw text for a string (or a string
    enum without a type, which it also keeps raw), JSON otherwise."""
    enum = schema.get("enum", [schema["const"]] if "const" in schema else None)
    if enum and all(isinstance(v, str) for v in enum) and schema.get("type") in ("string", None):
        return "(" + " | ".join(f"\"{lark_str(v)}\"" for v in enum) + ")"
    if schema.get("type") == "string":
        hi = schema.get("maxLength")
        lo = schema.get("minLength", 0)
        n = f"{{{lo},{hi}}}" if hi is not None else ("+" if lo else "*")
        return f"/[^<\\n]{n}/"
    return "%json " + json.dumps(dict(schema, **{"x-guidance": JSON_OPTIONS}))


def lark_str(s: str) -> str:
    """s inside a Lark double-quoted literal."""
    return json.dumps(s)[1:-1]


def describe(spec: dict) -> str:
    kind = spec.get("type") if isinstance(spec, dict) else None
    if kind == "json_schema":
        name = spec.get("name")
        return f"json_schema {name!r}" if name else "json_schema"
    return f"grammar {kind!r}"


def first_line(msg: str) -> str:
    return msg.strip().splitlines()[0] if msg.strip() else "unknown error"


# ------------------------------------------------------------------------------------------ processor


class GrammarProcessor:
    """mlx-lm logits processor `(tokens, logits) -> logits` for one request and its matcher.

    `tokens` is the request's context so far: the first call sees the prompt, each later call one more
    token (the one sampled last), which is consumed before the next mask is computed. A token the
    matcher refuses (only possible if something after this processor changed the draw) or a complete
    grammar leaves EOS as the only choice.
    """

    def __init__(self, matcher, llt):
        self.matcher, self.llt = matcher, llt
        self.eos = np.array(llt.eos_tokens, dtype=np.int64)
        self.seen: int | None = None
        self.words = np.full((llt.vocab_size + 31) // 32, -1, dtype=np.int32)

    def __call__(self, tokens: mx.array, logits: mx.array) -> mx.array:
        n = tokens.size
        if self.seen is not None and n > self.seen:
            for t in tokens[self.seen:].tolist():
                if not self.matcher.consume_token(t):
                    break
        self.seen = n
        return mx.where(mx.array(self.mask(logits.shape[-1])), logits, -mx.inf)

    def mask(self, vocab: int) -> np.ndarray:
        """The allowed tokens as a bool row of the logits' width."""
        allowed = np.zeros(vocab, dtype=np.bool_)
        if self.matcher.is_error():
            allowed[self.eos[self.eos < vocab]] = True
            return allowed
        self.matcher.unsafe_compute_mask_ptr(self.words.ctypes.data, self.words.nbytes)
        bits = np.unpackbits(self.words.view(np.uint8), bitorder="little")
        k = min(vocab, self.llt.vocab_size)
        allowed[:k] = bits[:k]
        if not allowed.any():  # nothing can follow: end the request rather than sample from -inf
            allowed[self.eos[self.eos < vocab]] = True
        return allowed

    @property
    def done(self) -> bool:
        return self.matcher.is_stopped()
