"""The `moed` command line.

Verbs that run the engine in this process (make-model, generate, bench) import the MLX side
lazily, so the client-side verbs stay light.
"""

from __future__ import annotations

import argparse
import json
import sys

from moed.client import launch
from moed.ipc.config import PagingConfig


def cmd_make_model(a: argparse.Namespace) -> int:
    from pathlib import Path

    from moed.daemon.tools.synthetic import make_model

    if a.skip_existing and (Path(a.dir) / "config.json").exists():
        print(f"{a.dir} exists, kept")
        return 0
    s = make_model(a.dir, a.arch, a.preset, size_gb=a.size_gb, dtype=a.dtype, seed=a.seed)
    print(f"wrote {s['path']}: {s['arch']} {s['preset']}, {s['total_bytes'] / 1e6:.1f} MB "
          f"({s['expert_bytes'] / 1e6:.1f} MB experts) in {s['shards']} shards")
    return 0


def _launched(a: argparse.Namespace) -> int | None:
    """With --ranks/--hosts: run this very command on every rank, in the foreground."""
    from moed.client import launch

    if not launch.wants_launch(a):
        return None
    return launch.run(launch.strip_rank_args(a.argv), a.ranks, a.hosts)


def cmd_plan(a: argparse.Namespace) -> int:
    from dataclasses import replace
    from functools import partial

    from rich.console import Console
    from rich.table import Table

    from moed.daemon.engine.budget import mb
    from moed.daemon.tools.plan import forecast, largest_fraction, make_plan, measure_profile, read_checkpoint

    paging = PagingConfig.from_args(a)
    ck = read_checkpoint(a.model)
    plan_for = partial(make_plan, ck, context=a.context, ram_gb=a.ram)
    plan = plan_for(paging)
    profile = measure_profile(ck, dtype=paging.dtype) if a.measure else None
    fits_at = largest_fraction(lambda f: plan_for(replace(paging, cache_fraction=f, cache_gb=None)), plan.ram_bytes)
    if profile:
        plan.forecast = forecast(plan, profile)
    if a.json:
        print(json.dumps({**plan.as_dict(), "profile": profile, "largest_fitting_fraction": fits_at}))
        return 0 if plan.fits else 1
    t = Table(title=f"moed plan: {plan.model}", title_justify="left")
    for c in ("", "bytes", ""):
        t.add_column(c, justify="right" if c == "bytes" else "left")
    for name, n, note in plan.lines():
        t.add_row(name, mb(n), note)
    t.add_row("[bold]total[/]", f"[bold]{mb(plan.total_bytes)}[/]",
              f"of {mb(plan.ram_bytes)} {'given' if a.ram else 'available'}: "
              + ("[green]fits[/]" if plan.fits else "[red]does not fit[/]"))
    con = Console()
    con.print(t)
    con.print(f"largest cache fraction that fits: {fits_at if fits_at is not None else 'none'}"
              f" (experts on disk: {mb(plan.expert_bytes)})")
    if profile:
        f = plan.forecast
        con.print(f"this machine: one token's {plan.top_k} experts of a layer in {profile['expert_layer_s'] * 1e3:.2f} ms "
                  f"({profile['expert_compute_gbps']:.2f} GB/s of weights), parallel reads {profile['disk_gbps']:.2f} GB/s "
                  f"({profile['disk_cache_state']})")
        con.print(f"forecast: [bold]{f['decode_tps']:.2f} tok/s[/] decode (all resident: {f['resident_decode_tps']:.2f}), "
                  f"hit rate ~{f['hit_rate']:.0%}")
    return 0 if plan.fits else 1


def cmd_pack(a: argparse.Namespace) -> int:
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from moed.daemon.tools.pack import pack

    with Progress(TextColumn("[bold]moed pack[/] {task.description}"), BarColumn(),
                  TextColumn("{task.percentage:>3.0f}%"), TimeElapsedColumn(), transient=True) as bar:
        task = bar.add_task("reading headers", total=1.0)
        s = pack(a.dir, progress=lambda phase, done: bar.update(task, description=phase, completed=done))
    print(f"wrote {s['dir']}: {s['layers']} layers, {s['packed_bytes'] / 1e6:.1f} MB "
          f"({s['expert_bytes'] / 1e6:.1f} MB of experts, page-aligned records), verified")
    return 0


def cmd_generate(a: argparse.Namespace) -> int:
    paging = PagingConfig.from_args(a)  # refused here, before any rank starts
    if (code := _launched(a)) is not None:
        return code
    from dataclasses import asdict

    from moed.daemon.dist.ranks import link, rank_status
    from moed.daemon.engine.generate import SamplingParams, encode_prompt, peak_rss_bytes, run
    from moed.daemon.engine.loader import load_paged

    lk = link()
    rank = lk.rank if lk else 0
    with load_paged(a.model, paging, group=lk.group if lk else None) as pm:
        prompt = encode_prompt(pm.tokenizer, a.prompt, chat=a.chat)
        params = SamplingParams(max_tokens=a.max_tokens, temp=a.temp, seed=a.seed, ignore_eos=a.ignore_eos)
        echo = None if a.json or rank else (lambda t: print(t, end="", flush=True))
        res = run(pm.model, pm.tokenizer, prompt, params, on_text=echo)
        ranks = [asdict(s) for s in lk.gather(rank_status(pm, rank))] if lk else []
        st = pm.store.stats
        hits, misses = (sum(r["hits"] for r in ranks), sum(r["misses"] for r in ranks)) if ranks else (st.hits, st.misses)
        out = {**res.as_dict(), "hit_rate": hits / max(1, hits + misses),
               "bytes_read": sum(r["bytes_read"] for r in ranks) if ranks else st.bytes_read,
               "peak_rss_bytes": peak_rss_bytes(), "cache_bytes": pm.info["cache_bytes"],
               "non_expert_bytes": pm.non_expert_bytes, "expert_bytes": pm.expert_bytes,
               "slots_per_layer": pm.info["slots_per_layer"], "workers": paging.workers,
               "worker_pids": pm.fetcher.pids, "ranks": ranks}
    if rank:
        return 0
    if a.json:
        print(json.dumps(out))
    else:
        print(f"\n\n[moed] {len(res.tokens)} tokens | prefill {res.prefill_tps:.1f} tok/s | "
              f"decode {res.decode_tps:.2f} tok/s | hit rate {st.hit_rate:.1%} | "
              f"read {st.bytes_read / 1e6:.1f} MB | cache {out['cache_bytes'] / 1e6:.1f} MB | "
              f"peak RSS {out['peak_rss_bytes'] / 1e6:.0f} MB", file=sys.stderr)
    return 0


def cmd_trace(a: argparse.Namespace) -> int:
    from moed.daemon.engine.generate import SamplingParams
    from moed.daemon.tools.trace import record_trace, save_trace

    params = SamplingParams(max_tokens=a.max_tokens, temp=a.temp, seed=a.seed, ignore_eos=True)
    trace = record_trace(a.model, a.prompt, params, workers=PagingConfig.from_args(a).workers)
    save_trace(trace, a.out)
    print(f"wrote {a.out}: {trace['tokens']} tokens, {len(trace['steps'])} layer visits")
    return 0


def cmd_policy(a: argparse.Namespace) -> int:
    from moed.daemon.tools.policy import main as policy_main

    return policy_main([a.trace, *a.args])


def cmd_bench(a: argparse.Namespace) -> int:
    from moed.daemon.tools.bench import main as bench_main

    return bench_main(a)


DEMO_ARCH = "qwen3_5_moe"


def demo_model() -> str:
    """The tiny demo checkpoint, built on first use under the user cache."""
    import os
    from pathlib import Path

    home = Path(os.environ.get("MOED_HOME") or Path.home() / ".cache" / "moed")
    path = home / "models" / f"tiny-{DEMO_ARCH}"
    if not (path / "config.json").exists():
        from moed.daemon.tools.synthetic import make_model

        make_model(path, DEMO_ARCH, "tiny", seed=0)
    return str(path)


def _daemon_args(a: argparse.Namespace) -> list[str]:
    """The `moed daemon` arguments equivalent to these `start` options."""
    paging = PagingConfig.from_args(a)  # refused here, before a daemon starts
    model = demo_model() if a.demo else a.model
    if not model:
        raise ValueError("give --model DIR (or --demo)")
    out = ["--model", model, *paging.to_argv(), "--max-batch", str(a.max_batch),
           "--max-queue", str(a.max_queue)]
    for flag, v in (("--http", a.http), ("--api-key", a.api_key)):
        if v is not None:
            out += [flag, str(v)]
    return out


def cmd_start(a: argparse.Namespace) -> int:
    from moed.client import control

    return control.start(_daemon_args(a), ranks=a.ranks, hosts=a.hosts)


def cmd_daemon(a: argparse.Namespace) -> int:
    paging = PagingConfig.from_args(a)
    if (code := _launched(a)) is not None:
        return code
    from moed.daemon.dist.ranks import link
    from moed.daemon.service.supervisor import DaemonConfig
    from moed.daemon.service.supervisor import main as supervise

    model = demo_model() if a.demo else a.model
    if not model:
        raise ValueError("give --model DIR (or --demo)")
    return supervise(DaemonConfig(model=model, paging=paging, max_batch=a.max_batch, max_queue=a.max_queue,
                                  http=a.http, api_key=a.api_key), link())


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
    from moed.client.client import Client
    from moed.ipc.messages import Finished

    with Client(name="moed run") as c:
        kw = {"messages": [{"role": "user", "content": a.prompt}]} if a.chat else {"prompt": a.prompt}
        fin = None
        for ev in c.generate(**kw, **_sampling(a)):
            if isinstance(ev, Finished):
                fin = ev
            else:
                print(ev.text, end="", flush=True)
    print()
    if a.verbose and fin is not None:
        print(f"[moed] {fin.completion_tokens} tokens, {fin.decode_tps:.2f} tok/s, ttft {fin.ttft_s:.2f} s, "
              f"finish: {fin.reason}", file=sys.stderr)
    return 0


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
    m.set_defaults(fn=cmd_make_model)

    pl = sub.add_parser("plan", help="memory a configuration needs (headers only) and forecast decode tok/s")
    pl.add_argument("--model", required=True)
    pl.add_argument("--ram", type=float, metavar="GB", help="plan for this much memory (default: available now)")
    pl.add_argument("--context", type=int, help="tokens of KV cache to plan for (default: the model's context)")
    pl.add_argument("--no-measure", dest="measure", action="store_false",
                    help="no forecast (skip measuring this machine's compute and disk)")
    pl.add_argument("--json", action="store_true")
    PagingConfig.add_args(pl, only=PagingConfig.sizing())  # and refuses the flags it would ignore
    pl.set_defaults(fn=cmd_plan)

    pk = sub.add_parser("pack", help="repack the experts into page-aligned records (one read per expert)")
    pk.add_argument("dir", help="checkpoint dir or Hugging Face repo id (local cache); writes DIR/moed-pack")
    pk.set_defaults(fn=cmd_pack)

    g = sub.add_parser("generate", help="generate in this process through the paged engine")
    g.add_argument("--model", required=True, help="checkpoint dir or Hugging Face repo id (local cache)")
    g.add_argument("--prompt", required=True)
    g.add_argument("--max-tokens", type=int, default=64)
    g.add_argument("--temp", type=float, default=0.0)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--chat", action="store_true", help="apply the model's chat template")
    g.add_argument("--json", action="store_true", help="print one JSON object instead of streaming")
    g.add_argument("--ignore-eos", action="store_true", help="always generate --max-tokens (benchmarks)")
    PagingConfig.add_args(g)
    launch.add_rank_args(g)
    g.set_defaults(fn=cmd_generate)

    tr = sub.add_parser("trace", help="record which experts each layer needs per decode step")
    tr.add_argument("--model", required=True)
    tr.add_argument("--out", required=True, help="trace JSON file to write")
    tr.add_argument("--prompt", default="The history of computing is a story of memory.")
    tr.add_argument("--max-tokens", type=int, default=256)
    tr.add_argument("--temp", type=float, default=1.0)
    tr.add_argument("--seed", type=int, default=0)
    PagingConfig.add_args(tr, only=["workers"])  # the trace's cache is its own: the smallest
    tr.set_defaults(fn=cmd_trace)
    po = sub.add_parser("policy", help="replay a trace under LRU/LFU/LFUDA/Belady, per-layer or global pools")
    po.add_argument("trace")
    po.add_argument("args", nargs=argparse.REMAINDER, help="--fractions 0.1,0.25,0.5 --out FILE.json ...")
    po.set_defaults(fn=cmd_policy)

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
    b.add_argument("--layouts", default="packed",
                   help="comma list of packed (the `moed pack` store when present), stacked (the shards)")
    b.add_argument("--ranks", help="e.g. 1,2: the model split across N local ranks (first cache fraction)")
    b.add_argument("--skip-mlx-lm", action="store_true", help="no resident baseline (a model larger than RAM)")
    b.add_argument("--skip-io", action="store_true", help="no I/O probe (another run of the same model has it)")
    b.add_argument("--repeat", type=int, default=1,
                   help="run the whole sweep N times, interleaved; ratios pair each run with its round's mlx-lm")
    b.add_argument("--top-k", dest="top_ks", help="e.g. 10,8,6,4: speed and quality (KL, top-1 agreement) per K")
    b.set_defaults(fn=cmd_bench)

    for name, fn, hlp in (("start", cmd_start, "start the daemon in the background and wait until it serves"),
                          ("daemon", cmd_daemon, "run the daemon in the foreground (Procfile, debugging)")):
        d = sub.add_parser(name, help=hlp)
        d.add_argument("--model", help="checkpoint dir or Hugging Face repo id (local cache)")
        d.add_argument("--demo", action="store_true", help="serve the tiny synthetic model (built on first use)")
        PagingConfig.add_args(d)
        d.add_argument("--max-batch", type=int, default=8, help="sequences decoded together (default 8)")
        d.add_argument("--max-queue", type=int, default=32, help="requests admitted before rejecting (default 32)")
        d.add_argument("--http", metavar="HOST:PORT", help="serve the OpenAI-compatible API, e.g. 127.0.0.1:8000")
        d.add_argument("--api-key", help="require this bearer token on the HTTP API")
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

    r = sub.add_parser("run", help="stream an answer from the running daemon")
    r.add_argument("prompt")
    r.add_argument("--chat", action="store_true", help="apply the chat template")
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
    except (ValueError, FileNotFoundError) as e:  # CheckpointError is a ValueError
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
