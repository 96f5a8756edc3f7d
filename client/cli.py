"""The `moed` command line: every verb's arguments, the client verbs (start, stop, ps, logs, run,
chat, top), and a table of the engine verbs (moed.daemon.verbs, imported only when one runs), so the
client verbs never load MLX or the daemon.
"""

from __future__ import annotations

import argparse
import json
import sys

from moed.client import launch
from moed.ipc.config import API_KEY_ENV, PagingConfig, ServingConfig, api_key_of


# The verbs that run MLX in this process live in moed.daemon.verbs, imported only when one runs.
ENGINE_VERBS = {"make-model": "cmd_make_model", "plan": "cmd_plan", "pack": "cmd_pack", "generate": "cmd_generate",
                "trace": "cmd_trace", "policy": "cmd_policy", "bench": "cmd_bench", "daemon": "cmd_daemon"}


def engine_verb(name: str):
    """The `fn` of engine verb `name`: imports moed.daemon.verbs when called."""
    def run(a: argparse.Namespace) -> int:
        from importlib import import_module

        return getattr(import_module("moed.daemon.verbs"), ENGINE_VERBS[name])(a)

    return run


def demo_model() -> str:
    from moed.daemon.verbs import demo_model

    return demo_model()


def _daemon_args(a: argparse.Namespace) -> list[str]:
    """The `moed daemon` arguments equivalent to these `start` options."""
    paging = PagingConfig.from_args(a)  # refused here, before a daemon starts
    model = demo_model() if a.demo else a.model
    if not model:
        raise ValueError("give --model DIR (or --demo)")
    out = ["--model", model, *paging.to_argv(), *ServingConfig.from_args(a).to_argv()]
    if a.http is not None:
        out += ["--http", str(a.http)]  # the API key goes in the daemon's environment (cmd_start), not here
    for flag, vs in (("--alias", a.alias), ("--cors-origin", a.cors_origin)):
        for v in vs or []:
            out += [flag, v]
    return out


def cmd_start(a: argparse.Namespace) -> int:
    from moed.client import control

    key = api_key_of(a)
    return control.start(_daemon_args(a), ranks=a.ranks, hosts=a.hosts,
                         secrets={API_KEY_ENV: key} if key is not None else None)


def cmd_stop(a: argparse.Namespace) -> int:
    from moed.client import control

    return control.stop()


def cmd_ps(a: argparse.Namespace) -> int:
    from dataclasses import asdict

    from rich.console import Console

    from moed.client import control
    from moed.client.ps import ps_view

    snap = control.status()
    if a.json:  # codec.from_plain(DaemonStatus, json.loads(...)) reads it back
        print(json.dumps(asdict(snap)))
    else:
        Console().print(ps_view(snap))
    return 0


def cmd_logs(a: argparse.Namespace) -> int:
    from moed.client import control

    return control.logs(follow=a.follow, lines=a.lines)


def _sampling(a: argparse.Namespace) -> dict:
    return {"max_tokens": a.max_tokens, "temperature": a.temp, "seed": a.seed}


def cmd_run(a: argparse.Namespace) -> int:
    from moed.client.chat import read_prompt, run_once, run_request

    try:
        kw = run_request(read_prompt(a.prompt), raw=a.raw, system=a.system, json_schema=a.json_schema,
                         sampling=_sampling(a))
    except ValueError as e:
        print(f"moed run: {e}", file=sys.stderr)
        return 2
    return run_once(kw, verbose=a.verbose)


def cmd_top(a: argparse.Namespace) -> int:
    from moed.client.top import main as top_main

    return top_main(interval=a.interval)


def cmd_chat(a: argparse.Namespace) -> int:
    from moed.client.chat import chat_loop

    return chat_loop(_sampling(a), system=a.system)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="moed", description="Paged Mixture-of-Experts inference on MLX")
    sub = p.add_subparsers(dest="cmd", required=True)

    m = sub.add_parser("make-model", help="write a synthetic checkpoint in mlx-lm format")
    m.add_argument("dir")
    m.add_argument("--arch", default="qwen3_moe", choices=["qwen3_moe", "qwen3_5_moe", "mixtral"])
    m.add_argument("--preset", default="tiny", choices=["tiny", "small", "med"])
    m.add_argument("--size-gb", type=float, help="scale the experts so the checkpoint is about this big")
    m.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--skip-existing", action="store_true", help="do nothing if DIR already holds a model")
    m.set_defaults(fn=engine_verb("make-model"))

    pl = sub.add_parser("plan", help="memory a configuration needs (headers only) and forecast decode tok/s")
    pl.add_argument("--model", required=True)
    pl.add_argument("--ram", type=float, metavar="GB", help="plan for this much memory (default: available now)")
    pl.add_argument("--context", type=int, help="tokens of KV cache to plan for (default: the model's context)")
    pl.add_argument("--no-measure", dest="measure", action="store_false",
                    help="no forecast (skip measuring this machine's compute and disk)")
    pl.add_argument("--profile", metavar="FILE", help="forecast for another machine: a JSON hardware profile "
                    "(name, memory_gb, disk_gbps, expert_gbps, copy_gbps, dense_ms; nothing is measured; "
                    "memory_gb is the default --ram)")
    pl.add_argument("--trace", metavar="FILE", help="forecast on a routing trace (`moed trace`, tracesynth): its hit "
                    "rate under --eviction at this plan's slots, instead of uniform routing")
    pl.add_argument("--json", action="store_true")
    PagingConfig.add_args(pl, only=(*PagingConfig.sizing(), "eviction"))  # and refuses the flags it would ignore
    ServingConfig.add_args(pl, only=["prompt_cache_gb", "max_batch", "prefill_chunk"])
    pl.set_defaults(fn=engine_verb("plan"))

    pk = sub.add_parser("pack", help="repack the experts into page-aligned records (one read per expert)")
    pk.add_argument("dir", help="checkpoint dir or Hugging Face repo id (local cache); writes DIR/moed-pack")
    pk.set_defaults(fn=engine_verb("pack"))

    g = sub.add_parser("generate", help="generate in this process through the paged engine")
    g.add_argument("--model", required=True, help="checkpoint dir or Hugging Face repo id (local cache)")
    g.add_argument("--prompt", required=True)
    g.add_argument("--max-tokens", type=int, default=64)
    g.add_argument("--temp", type=float, default=0.0)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--chat", action="store_true", help="apply the model's chat template")
    g.add_argument("--json", action="store_true", help="print one JSON object instead of streaming")
    g.add_argument("--ignore-eos", action="store_true", help="always generate --max-tokens (benchmarks)")
    g.add_argument("--routing", metavar="FILE", help="force each MoE layer's experts from this routing trace "
                   "(moed trace / moed trace synth): pages what it asks; the tokens are then not the model's")
    PagingConfig.add_args(g)
    launch.add_rank_args(g)
    g.set_defaults(fn=engine_verb("generate"))

    tr = sub.add_parser("trace", help="record which experts each layer needs per decode step; "
                        "`moed trace synth`: a trace calibrated to real models' routing")
    tr.add_argument("action", nargs="?", choices=["synth"], help="synth: generate instead of recording")
    tr.add_argument("--model", help="the model to record (synth: take its experts/top-k/layers)")
    tr.add_argument("--out", required=True, help="trace JSON file to write")
    tr.add_argument("--experts", type=int, default=512, help="synth: experts per MoE layer (default 512)")
    tr.add_argument("--top-k", dest="synth_top_k", type=int, default=4, help="synth: experts per token (default 4)")
    tr.add_argument("--layers", type=int, default=60, help="synth: MoE layers (default 60)")
    tr.add_argument("--tokens", type=int, default=256, help="synth: decode steps (default 256)")
    tr.add_argument("--recall", type=float, help="synth: next-layer prediction recall (default 0.595)")
    tr.add_argument("--prompt", default="The history of computing is a story of memory.")
    tr.add_argument("--max-tokens", type=int, default=256)
    tr.add_argument("--temp", type=float, default=1.0)
    tr.add_argument("--seed", type=int, default=0)
    PagingConfig.add_args(tr, only=["workers"])  # the trace's cache is its own: the smallest
    tr.set_defaults(fn=engine_verb("trace"))
    po = sub.add_parser("policy", help="replay a trace under LRU/LFU/LFUDA/Belady, per-layer or global pools")
    po.add_argument("trace")
    po.add_argument("args", nargs=argparse.REMAINDER, help="--fractions 0.1,0.25,0.5 --out FILE.json ...")
    po.set_defaults(fn=engine_verb("policy"))

    b = sub.add_parser("bench", help="mlx-lm resident vs moed at several cache sizes, one run")
    b.add_argument("--model", required=True)
    b.add_argument("--out", required=True, help="provenance JSON file to write")
    b.add_argument("--cache-fractions", default="1,0.5,0.25,0.1")
    b.add_argument("--sampling", default="random", help="comma list of greedy,random")
    b.add_argument("--cold", action="store_true", help="drop the page cache before each run")
    b.add_argument("--max-tokens", type=int, default=64)
    b.add_argument("--prompt-tokens", type=int, default=32, help="length of the benchmark prompt")
    PagingConfig.add_args(b, only=["workers", "dtype"])  # the sweeps below set the others per run
    b.add_argument("--concurrency", help="e.g. 1,2,4: N concurrent streams through a daemon (first cache fraction)")
    b.add_argument("--lookahead", default="auto", help="comma list of auto, off, on (lookahead reads)")
    b.add_argument("--io", default="buffered", help="comma list of buffered, direct (O_DIRECT / F_NOCACHE reads)")
    b.add_argument("--evictions", default=PagingConfig().eviction,
                   help="comma list of fwlru, lru, lfuda, dlfu, hotlru (the cache's eviction policy; "
                   "default: the engine's)")
    b.add_argument("--layouts", default="packed",
                   help="comma list of packed (the `moed pack` store when present), stacked (the shards)")
    b.add_argument("--ranks", help="e.g. 1,2: the model split across N local ranks (first cache fraction)")
    b.add_argument("--skip-mlx-lm", action="store_true", help="no resident baseline (a model larger than RAM)")
    b.add_argument("--skip-io", action="store_true", help="no I/O probe (another run of the same model has it)")
    b.add_argument("--repeat", type=int, default=1,
                   help="run the whole sweep N times, interleaved; ratios pair each run with its round's mlx-lm")
    b.add_argument("--top-k", dest="top_ks", help="e.g. 10,8,6,4: speed and quality (KL, top-1 agreement) per K")
    b.add_argument("--routing", metavar="FILE", help="force every moed run's experts from this routing trace "
                   "(the tokens are then not the model's; the mlx-lm baseline keeps its own routing)")
    b.add_argument("--workload", choices=["decode", "grammar", "warm-start", "chat", "agent", "contention"],
                   default="decode",
                   help="grammar: the grammar's cost per token at batch 1 and 4 (first cache fraction, --repeat); "
                   "warm-start: the cache's hit rate over the first --max-tokens, cold versus warm-started; "
                   "chat, agent, contention: moed's HTTP API next to mlx_lm.server's (daemon/tools/servebench.py)")
    b.add_argument("--prefill-chunks", help="--workload contention: comma list of moed --prefill-chunk values, "
                   "each CHUNK or CHUNK:BUDGET (with --prefill-budget BUDGET) (default 64,128,256,512)")
    b.set_defaults(fn=engine_verb("bench"))

    for name, fn, hlp in (("start", cmd_start, "start the daemon in the background and wait until it serves"),
                          ("daemon", engine_verb("daemon"), "run the daemon in the foreground (Procfile, debugging)")):
        d = sub.add_parser(name, help=hlp)
        d.add_argument("--model", help="checkpoint dir or Hugging Face repo id (local cache)")
        d.add_argument("--demo", action="store_true", help="serve the tiny synthetic model (built on first use)")
        PagingConfig.add_args(d)
        ServingConfig.add_args(d)
        d.add_argument("--http", metavar="HOST:PORT", help="serve the OpenAI-compatible API, e.g. 127.0.0.1:8000")
        d.add_argument("--api-key-file", metavar="PATH",
                       help="require the bearer token in this file on the HTTP API (or set $MOED_API_KEY)")
        d.add_argument("--api-key", help="the same, given on the command line (readable by every local user: "
                       "prefer --api-key-file or $MOED_API_KEY)")
        d.add_argument("--alias", action="append", metavar="NAME",
                       help="another name the HTTP API's model answers to (repeatable)")
        d.add_argument("--cors-origin", action="append", metavar="ORIGIN",
                       help="let a browser page from ORIGIN call the HTTP API, e.g. http://localhost:3000 (repeatable)")
        launch.add_rank_args(d)
        d.set_defaults(fn=fn)

    sub.add_parser("stop", help="stop the daemon").set_defaults(fn=cmd_stop)
    for name in ("ps", "status"):
        s_ = sub.add_parser(name, help="model, cache, workers, requests of the running daemon")
        s_.add_argument("--json", action="store_true")
        s_.set_defaults(fn=cmd_ps)
    t = sub.add_parser("top", help="live dashboard of the running daemon (q to quit)")
    t.add_argument("--interval", type=float, default=0.5, help="seconds between refreshes")
    t.set_defaults(fn=cmd_top)
    lg = sub.add_parser("logs", help="show (and follow) the daemon's log")
    lg.add_argument("-f", "--follow", action="store_true")
    lg.add_argument("-n", "--lines", type=int, default=50)
    lg.set_defaults(fn=cmd_logs)

    r = sub.add_parser("run", help="stream one answer from the running daemon (chat; prompt from stdin: - or a pipe)")
    r.add_argument("prompt", nargs="?", help="the prompt; '-' or none reads stdin (piped text is appended to it)")
    r.add_argument("--raw", action="store_true", help="plain completion of the text (no chat template)")
    r.add_argument("--chat", action="store_true", help=argparse.SUPPRESS)  # the default now; kept for old scripts
    r.add_argument("--system", help="system prompt (chat)")
    r.add_argument("--json-schema", metavar="FILE", help="answer as JSON valid against this JSON schema file")
    r.add_argument("-v", "--verbose", action="store_true", help="print timing after the answer")
    c = sub.add_parser("chat", help="interactive chat with the running daemon")
    c.add_argument("--system", help="system prompt")
    for q in (r, c):
        q.add_argument("--max-tokens", type=int, default=256)
        q.add_argument("--temp", type=float, default=0.0)
        q.add_argument("--seed", type=int)
    r.set_defaults(fn=cmd_run)
    c.set_defaults(fn=cmd_chat)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    args.argv = argv
    try:
        return args.fn(args) or 0
    except KeyboardInterrupt:
        return 130
    except (ValueError, FileNotFoundError, PermissionError) as e:  # CheckpointError is a ValueError
        print(f"moed: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:
        from moed.client.client import MoedError

        if not isinstance(e, MoedError):
            raise
        print(f"moed: {type(e).__name__}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
