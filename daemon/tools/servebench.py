"""`moed bench --workload chat|agent|contention`: moed's daemon and `mlx_lm.server` side by side on the same
model in the same run, over the OpenAI HTTP API with streaming (time to first token, inter-token latency).

- chat: a 10-turn conversation, the whole history resent each turn: TTFT per turn, total time.
- agent: a fixed ~2,000-token system prompt and tool list, then calls with short user turns: TTFT per call,
  the very first prompt repeated, and (moed, `--prompt-cache-dir`) the first call after a daemon restart
  versus the cold first call.
- contention: stream A decoding alone, then again while B sends a ~4,000-token prompt: A's inter-token
  latency p50/p99 in the window of B's prefill versus A alone, B's TTFT, and B's TTFT alone (what the
  chunking costs a lone long prompt); for each `--prefill-chunk`.

Each server runs as its own subprocess on a free loopback port (moed: `moed daemon --http`, private
runtime dir); every request is greedy, EOS and the think/tool-call markers banned by logit_bias, so both servers do the same work.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from statistics import median

from moed.daemon.tools.bench import PROMPT_TEXT

WORKLOADS = ("chat", "agent", "contention")
CHAT_TURNS = 10
AGENT_CALLS = 10
AGENT_SYSTEM_TOKENS = 2000
CONTENTION_PROMPT_TOKENS = 4000
PREFILL_CHUNKS = (64, 128, 256, 512)
TOOLS = [{"type": "function", "function": {
    "name": name, "description": desc, "parameters": {"type": "object", "properties": {
        p: {"type": "string", "description": f"the {p}"} for p in params}, "required": list(params)}}}
    for name, desc, params in (
        ("read_file", "Read a file of the repository and return its text.", ("path",)),
        ("write_file", "Replace a file of the repository with new text.", ("path", "text")),
        ("search", "Search the repository for a regular expression; returns matching lines.", ("pattern", "glob")),
        ("run_tests", "Run the test suite, or the tests matching a selector, and return the report.", ("selector",)),
        ("shell", "Run a shell command in the repository's root and return its output.", ("command",)))]
USER_TURNS = ["Open the config module.", "Where is the cache evicted?", "Run the failing test.",
              "Explain that traceback.", "Fix the off-by-one.", "Search for other callers.", "Rename the helper.",
              "Run the tests again.", "Write a changelog line.", "Summarise what changed."]


def quantiles(xs: list[float]) -> dict:
    """p50 and p99 (nearest rank) of xs, in ms."""
    if not xs:
        return {"n": 0, "p50_ms": None, "p99_ms": None, "max_ms": None}
    s = sorted(xs)
    p99 = s[max(0, math.ceil(0.99 * len(s)) - 1)]
    return {"n": len(s), "p50_ms": 1000 * median(s), "p99_ms": 1000 * p99, "max_ms": 1000 * s[-1]}


# ------------------------------------------------------------------------------------------ the servers


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def server(kind: str, model: str, cache_fraction: float, extra: list[str] = (), runtime: str | None = None,
           log=print):
    """A running server on a free loopback port: yields {"kind", "url", "load_s", "pid"}; stopped after.

    kind "moed": `moed daemon --http` (its runtime dir `runtime`, else a private one); "mlx-lm":
    `python -m mlx_lm server` (the model resident)."""
    import httpx

    port = free_port()
    own_runtime = runtime is None
    runtime = runtime or tempfile.mkdtemp(prefix="moed-servebench-")
    env = dict(os.environ, MOED_RUNTIME_DIR=runtime, PYTHONUNBUFFERED="1")
    if kind == "moed":
        cmd = [sys.executable, "-m", "moed.client.cli", "daemon", "--model", model, "--cache-fraction",
               str(cache_fraction), "--http", f"127.0.0.1:{port}", *extra]
        ready = f"http://127.0.0.1:{port}/health"
    else:
        cmd = [sys.executable, "-m", "mlx_lm", "server", "--model", model, "--port", str(port),
               "--log-level", "WARNING", *extra]
        ready = f"http://127.0.0.1:{port}/v1/models"
    errlog = tempfile.TemporaryFile()
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=errlog, start_new_session=True)
    try:
        deadline = time.monotonic() + 600
        while True:
            try:
                if httpx.get(ready, timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                errlog.seek(0)
                raise RuntimeError(f"{kind} server failed to start: {errlog.read()[-3000:].decode(errors='replace')}")
            time.sleep(0.2)
        if kind == "mlx-lm":  # its first request loads the model: not part of any measurement
            chat_stream(f"http://127.0.0.1:{port}", [{"role": "user", "content": "warm up"}], 2)
        load_s = time.perf_counter() - t0
        log(f"{kind} serving on port {port} ({load_s:.1f} s) {' '.join(extra)}")
        yield {"kind": kind, "url": f"http://127.0.0.1:{port}", "load_s": load_s, "pid": proc.pid}
    finally:
        stop(kind, proc, runtime)
        errlog.close()
        if own_runtime:
            shutil.rmtree(runtime, ignore_errors=True)


def stop(kind: str, proc: subprocess.Popen, runtime: str) -> None:
    """moed: `stop` over its socket (it removes its shared memory and files); mlx-lm: SIGTERM."""
    if proc.poll() is None:
        try:
            if kind == "moed":
                from moed.client.client import Client

                with Client(runtime) as c:
                    c.stop_daemon()
            else:
                proc.terminate()
            proc.wait(60)
        except Exception:
            proc.kill()
            proc.wait()


# ------------------------------------------------------------------------------------------ one request


def chat_stream(url: str, messages: list[dict], max_tokens: int, tools=None, eos=(), stop_when=None,
                t_sent: list | None = None) -> dict:
    """One streamed, greedy chat completion: {"ttft_s", "times" (each content chunk's arrival, s after
    sending), "text", "chunks", "cached_tokens" (moed's usage), "wall_s"}. `stop_when(result)` -> True
    closes the stream early (the server aborts it)."""
    import httpx

    body = {"messages": messages, "max_tokens": max_tokens, "temperature": 0.0,
            "stream": True, "stream_options": {"include_usage": True}}
    if tools:
        body["tools"] = tools
    if eos:
        body["logit_bias"] = {str(t): -100 for t in eos}
    out = {"ttft_s": None, "times": [], "text": "", "chunks": 0, "cached_tokens": None, "prompt_tokens": None}
    out["t0"] = t0 = time.perf_counter()
    if t_sent is not None:
        t_sent.append(t0)
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=1800) as r:
        if r.status_code != 200:
            raise RuntimeError(f"{url}: HTTP {r.status_code}: {r.read()[:500]!r}")
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            ev = json.loads(line[6:])
            if ev.get("usage"):
                u = ev["usage"]
                out["prompt_tokens"] = u.get("prompt_tokens")
                out["cached_tokens"] = (u.get("prompt_tokens_details") or {}).get("cached_tokens")
            for ch in ev.get("choices") or []:
                d = ch.get("delta") or {}
                piece = (d.get("content") or "") + (d.get("reasoning") or d.get("reasoning_content") or "")
                if piece or d.get("tool_calls"):
                    now = time.perf_counter() - t0
                    out["ttft_s"] = now if out["ttft_s"] is None else out["ttft_s"]
                    out["times"].append(now)
                    out["text"] += piece
                    out["chunks"] += 1
            if stop_when is not None and stop_when(out):
                break
    out["wall_s"] = time.perf_counter() - t0
    return out


def banned_ids(model: str) -> list[int]:
    """EOS and the tokenizer's think and tool-call markers: a random-weight model that samples a marker
    would turn the rest of its reply into reasoning or a buffered tool call, and its content chunks
    (what the latencies are timed on) would stop."""
    from mlx_lm.utils import load_tokenizer

    tok = load_tokenizer(Path(model))
    markers = [getattr(tok, a, None) for a in ("think_start", "think_end", "tool_call_start", "tool_call_end")]
    ids = {tok.convert_tokens_to_ids(m) for m in markers if m}
    return sorted(set(tok.eos_token_ids) | {i for i in ids if isinstance(i, int) and i >= 0})


def text_of_tokens(model: str, n: int, seed_text: str = PROMPT_TEXT, messages_around=None, tools=None) -> str:
    """A text that makes the rendered chat prompt (system = the text, the tools) about n tokens long."""
    from mlx_lm.utils import load_tokenizer

    tok = load_tokenizer(Path(model))
    words = (seed_text * (2 + n // 100)).split()  # ~140 tokens a copy
    lo, hi = 1, len(words)
    while lo < hi:  # the fewest words that reach n tokens
        mid = (lo + hi) // 2
        msgs = [{"role": "system", "content": " ".join(words[:mid])}, *(messages_around or [])]
        k = len(tok.apply_chat_template(msgs, tools=tools, add_generation_prompt=True))
        lo, hi = (mid + 1, hi) if k < n else (lo, mid)
    return " ".join(words[:lo])


# ------------------------------------------------------------------------------------------ workloads


def chat_workload(url: str, model: str, turns: int, max_tokens: int, eos, log) -> dict:
    """A conversation of `turns` turns, the whole history resent each time."""
    sys_text = "You are a patient tutor. Answer in short paragraphs. " + PROMPT_TEXT[:400]
    history = [{"role": "system", "content": sys_text}]
    per, t0 = [], time.perf_counter()
    for i in range(turns):
        history.append({"role": "user", "content": f"Question {i + 1}: " + PROMPT_TEXT[40 * i % 300:][:260]})
        r = chat_stream(url, history, max_tokens, eos=eos)
        history.append({"role": "assistant", "content": r["text"]})
        per.append({"turn": i + 1, "ttft_s": r["ttft_s"], "wall_s": r["wall_s"], "chunks": r["chunks"],
                    "prompt_tokens": r["prompt_tokens"], "cached_tokens": r["cached_tokens"]})
        log(f"  turn {i + 1}: ttft {r['ttft_s'] * 1000:.0f} ms, prompt {r['prompt_tokens']}, cached "
            f"{r['cached_tokens']}")
    total = time.perf_counter() - t0
    return {"turns": per, "total_s": total, "ttft_turn1_s": per[0]["ttft_s"], "ttft_last_s": per[-1]["ttft_s"],
            "last_over_first": per[-1]["ttft_s"] / per[0]["ttft_s"]}


def agent_messages(system: str, i: int) -> list[dict]:
    return [{"role": "system", "content": system}, {"role": "user", "content": USER_TURNS[i % len(USER_TURNS)]}]


def agent_calls(url: str, system: str, calls: int, max_tokens: int, eos, log, repeat_first: bool) -> list[dict]:
    out = []
    order = [0, *([0] if repeat_first else []), *range(1, calls)]
    for n, i in enumerate(order):
        r = chat_stream(url, agent_messages(system, i), max_tokens, tools=TOOLS, eos=eos)
        what = "first" if n == 0 else ("first, repeated" if repeat_first and n == 1 else f"call {i + 1}")
        out.append({"call": what, "ttft_s": r["ttft_s"], "wall_s": r["wall_s"], "prompt_tokens": r["prompt_tokens"],
                    "cached_tokens": r["cached_tokens"]})
        log(f"  {what}: ttft {r['ttft_s'] * 1000:.0f} ms, prompt {r['prompt_tokens']}, cached {r['cached_tokens']}")
    return out


def agent_summary(calls: list[dict]) -> dict:
    first, rest = calls[0]["ttft_s"], [c["ttft_s"] for c in calls[1:] if c["call"] != "first, repeated"]
    rep = next((c["ttft_s"] for c in calls if c["call"] == "first, repeated"), None)
    return {"ttft_first_s": first, "ttft_repeat_s": rep, "repeat_over_first": rep / first if rep else None,
            "ttft_later_median_s": median(rest) if rest else None,
            "later_over_first": median(rest) / first if rest else None}


def contention_once(url: str, a_msgs, b_msgs, a_tokens: int, eos, after: int = 6) -> dict:
    """A streams; after its `after`-th token B sends its long prompt; A is closed a few tokens after B's
    first token. A's gaps inside B's window [B sent, B's first token] and B's TTFT."""
    b_box, b_sent = {}, []
    started = threading.Event()

    def b_run():
        started.wait()
        b_box.update(chat_stream(url, b_msgs, 1, eos=eos, t_sent=b_sent))

    tb = threading.Thread(target=b_run)
    tb.start()

    def stop_a(r) -> bool:  # B is sent at A's `after`-th token; A closes 0.5 s after B's first token
        if len(r["times"]) >= after:
            started.set()
        return b_box.get("ttft_s") is not None and r["t0"] + r["times"][-1] > b_sent[0] + b_box["ttft_s"] + 0.5

    try:
        res = chat_stream(url, a_msgs, a_tokens, eos=eos, stop_when=stop_a)
    finally:
        started.set()
        tb.join()
    t0 = res["t0"]
    times = [t0 + t for t in res["times"]]
    gaps = [(times[k - 1], times[k]) for k in range(1, len(times))]
    if not b_sent or b_box.get("ttft_s") is None:
        raise RuntimeError("B did not complete while A streamed (raise the A token budget)")
    lo, hi = b_sent[0], b_sent[0] + b_box["ttft_s"]
    window = [b - a for a, b in gaps if b > lo and a < hi]  # A's gaps that overlap B's prefill
    return {"b_ttft_s": b_box["ttft_s"], "b_prompt_tokens": b_box["prompt_tokens"], "a_tokens": len(times),
            "a_itl_window": quantiles(window), "a_itl_all": quantiles([b - a for a, b in gaps]),
            "a_gaps_in_window_ms": [1000 * g for g in window]}


def contention_workload(url: str, model: str, prompt_tokens: int, a_tokens: int, eos, log, rounds: int) -> dict:
    """A alone, then A with B's long prompt arriving, `rounds` times; each round's prompts are new (no
    prompt cache hit)."""
    rows = []
    for rnd in range(rounds):
        nonce = uuid.uuid4().hex[:8]
        a_msgs = [{"role": "user", "content": f"[{nonce}] Tell me a long story about caches."}]
        alone = chat_stream(url, a_msgs, 48, eos=eos)
        gaps = [alone["times"][k] - alone["times"][k - 1] for k in range(1, len(alone["times"]))]
        b_text = text_of_tokens(model, prompt_tokens)
        solo = chat_stream(url, [{"role": "system", "content": f"[{uuid.uuid4().hex[:8]}] {b_text}"}], 1, eos=eos)
        b_text = f"[{nonce}] {b_text}"
        a_msgs = [{"role": "user", "content": f"[{nonce}] Tell me another long story about pages."}]
        with_b = contention_once(url, a_msgs, [{"role": "system", "content": b_text}], a_tokens, eos)
        row = {"round": rnd, "a_alone": quantiles(gaps), "b_alone_ttft_s": solo["ttft_s"], **with_b}
        w, al = row["a_itl_window"], row["a_alone"]
        row["p99_over_alone"] = w["p99_ms"] / al["p99_ms"] if w["n"] else None
        row["p50_over_alone"] = w["p50_ms"] / al["p50_ms"] if w["n"] else None
        log(f"  round {rnd}: A alone p50 {al['p50_ms']:.1f} / p99 {al['p99_ms']:.1f} ms; with B p50 "
            f"{w['p50_ms'] or 0:.1f} / p99 {w['p99_ms'] or 0:.1f} ms ({w['n']} gaps); B ttft {row['b_ttft_s']:.2f} s "
            f"(alone {solo['ttft_s']:.2f} s)")
        rows.append(row)
    return {"rounds": rows, "p99_over_alone": median(r["p99_over_alone"] for r in rows if r["p99_over_alone"]),
            "b_ttft_s": median(r["b_ttft_s"] for r in rows),
            "b_alone_ttft_s": median(r["b_alone_ttft_s"] for r in rows),
            "a_alone_p50_ms": median(r["a_alone"]["p50_ms"] for r in rows),
            "a_alone_p99_ms": median(r["a_alone"]["p99_ms"] for r in rows),
            "a_window_max_ms": median(r["a_itl_window"]["max_ms"] for r in rows),
            "a_window_p50_ms": median(r["a_itl_window"]["p50_ms"] for r in rows),
            "a_window_p99_ms": median(r["a_itl_window"]["p99_ms"] for r in rows)}


# ------------------------------------------------------------------------------------------ the run


def run(workload: str, model: str, out: str, cache_fraction: float = 0.25, repeat: int = 1,
        max_tokens: int = 16, prefill_chunks=PREFILL_CHUNKS, skip_mlx_lm: bool = False, turns: int = CHAT_TURNS,
        calls: int = AGENT_CALLS, system_tokens: int = AGENT_SYSTEM_TOKENS,
        prompt_tokens: int = CONTENTION_PROMPT_TOKENS, a_tokens: int = 4000, log=None) -> dict:
    """Run one workload on both servers and write its provenance file; returns the document."""
    from moed.daemon.engine.checkpoint import resolve_model
    from moed.daemon.tools.bench import git_commit, machine, versions

    log = log or (lambda m: print(m, file=sys.stderr, flush=True))
    if workload not in WORKLOADS:
        raise ValueError(f"--workload must be one of {', '.join(WORKLOADS)}, got {workload!r}")
    model = str(resolve_model(model))
    eos = banned_ids(model)
    kinds = ["moed"] + ([] if skip_mlx_lm else ["mlx-lm"])
    results: dict = {}
    config = {"workload": workload, "model": model, "cache_fraction": cache_fraction, "repeat": repeat,
              "max_tokens": max_tokens, "temperature": 0.0, "banned_ids": eos, "servers": kinds}
    if workload == "chat":
        config["turns"] = turns
        for kind in kinds:
            results[kind] = []
            for rnd in range(repeat):
                with server(kind, model, cache_fraction, log=log) as s:
                    log(f"{kind} chat round {rnd}")
                    results[kind].append({"round": rnd, **chat_workload(s["url"], model, turns, max_tokens, eos, log)})
    elif workload == "agent":
        system = text_of_tokens(model, system_tokens, messages_around=[{"role": "user", "content": USER_TURNS[0]}],
                                tools=TOOLS)
        config.update(calls=calls, system_tokens=system_tokens, tools=[t["function"]["name"] for t in TOOLS])
        for kind in kinds:
            results[kind] = []
            for rnd in range(repeat):
                disk = tempfile.mkdtemp(prefix="moed-servebench-pc-")
                extra = ["--prompt-cache-dir", disk] if kind == "moed" else []
                try:
                    with server(kind, model, cache_fraction, extra, log=log) as s:
                        log(f"{kind} agent round {rnd}")
                        cs = agent_calls(s["url"], system, calls, max_tokens, eos, log, repeat_first=True)
                    row = {"round": rnd, "calls": cs, **agent_summary(cs)}
                    # a restart: the first call of a fresh server (moed: the same --prompt-cache-dir)
                    with server(kind, model, cache_fraction, extra, log=log) as s:
                        r = chat_stream(s["url"], agent_messages(system, 1), max_tokens, tools=TOOLS, eos=eos)
                    row.update(ttft_after_restart_s=r["ttft_s"], cached_after_restart=r["cached_tokens"],
                               restart_over_cold=r["ttft_s"] / row["ttft_first_s"])
                    log(f"  after restart: ttft {r['ttft_s'] * 1000:.0f} ms, cached {r['cached_tokens']} "
                        f"({row['restart_over_cold']:.1%} of cold)")
                    results[kind].append(row)
                finally:
                    shutil.rmtree(disk, ignore_errors=True)
    else:
        config.update(prompt_tokens=prompt_tokens, a_tokens=a_tokens, prefill_chunks=list(prefill_chunks))
        for kind in kinds:
            for spec in (prefill_chunks if kind == "moed" else [None]):
                chunk, _, budget = str(spec).partition(":")  # CHUNK or CHUNK:BUDGET (--prefill-budget)
                extra = (["--prefill-chunk", chunk] + (["--prefill-budget", budget] if budget else [])) if spec else []
                with server(kind, model, cache_fraction, extra, log=log) as s:
                    log(f"{kind} contention {' '.join(extra)}")
                    r = contention_workload(s["url"], model, prompt_tokens, a_tokens, eos, log, repeat)
                results.setdefault(kind, []).append({"prefill_chunk": int(chunk) if spec else None,
                                                     "prefill_budget": float(budget) if budget else None, **r})
    doc = {"kind": "moed-serve-bench", "created": time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime()),
           "command": " ".join(["moed", *sys.argv[1:]]), "config": config, "machine": machine(),
           "versions": versions(), **git_commit(), "results": results, "summary": summary(workload, results)}
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(doc, indent=2))
    log(json.dumps(doc["summary"], indent=1))
    log(f"wrote {out}")
    return doc


def summary(workload: str, results: dict) -> dict:
    """Median over the rounds of the figures the README quotes, per server (and --prefill-chunk)."""
    def med(rows, key):
        vals = [r[key] for r in rows if r.get(key) is not None]
        return median(vals) if vals else None

    out = {}
    for kind, rows in results.items():
        if workload == "chat":
            out[kind] = {k: med(rows, k) for k in ("ttft_turn1_s", "ttft_last_s", "last_over_first", "total_s")}
            out[kind]["ttft_per_turn_s"] = [median(r["turns"][i]["ttft_s"] for r in rows)
                                            for i in range(len(rows[0]["turns"]))]
        elif workload == "agent":
            out[kind] = {k: med(rows, k) for k in ("ttft_first_s", "ttft_repeat_s", "repeat_over_first",
                                                   "ttft_later_median_s", "later_over_first",
                                                   "ttft_after_restart_s", "restart_over_cold")}
        else:
            out[kind] = [{k: r.get(k) for k in ("prefill_chunk", "prefill_budget", "a_alone_p50_ms", "a_alone_p99_ms", "a_window_p50_ms",
                                            "a_window_p99_ms", "a_window_max_ms", "p99_over_alone", "b_ttft_s",
                                            "b_alone_ttft_s")}
                         for r in rows]
    return out


def main(a) -> int:
    """`moed bench --workload chat|agent|contention` (daemon/verbs.py)."""
    chunks = [x for x in str(a.prefill_chunks).split(",") if x] if getattr(a, "prefill_chunks", None) \
        else list(PREFILL_CHUNKS)
    run(a.workload, a.model, a.out, float(str(a.cache_fractions).split(",")[0]), a.repeat, a.max_tokens, chunks,
        a.skip_mlx_lm,  # --prompt-tokens (B's prompt) when given; the bench's 32-token default means "not given"
        prompt_tokens=a.prompt_tokens if a.prompt_tokens != 32 else CONTENTION_PROMPT_TOKENS)
    return 0
