"""The engine verbs of `moed`: the ones that run MLX in this process (make-model, plan, pack,
generate, trace, policy, bench, daemon). `moed.client.cli` parses every verb and dispatches these by
name, importing this module only when one of them runs, so the client verbs never load the daemon.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
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
    if not launch.wants_launch(a):
        return None
    return launch.run(launch.strip_rank_args(a.argv), a.ranks, a.hosts)


def cmd_plan(a: argparse.Namespace) -> int:
    from dataclasses import replace
    from functools import partial

    from rich.console import Console
    from rich.table import Table

    from moed.daemon.engine.budget import mb
    from moed.daemon.tools.plan import (forecast, largest_fraction, load_machine, make_plan, measure_profile,
                                        measured_machine, read_checkpoint, trace_hit_rate)

    paging = PagingConfig.from_args(a)
    ck = read_checkpoint(a.model)
    from moed.ipc.config import ServingConfig

    serving = ServingConfig.from_args(a)
    if a.trace and not (a.measure or a.profile):
        raise ValueError("--trace needs a forecast: give --profile FILE or drop --no-measure")
    if paging.eviction != PagingConfig().eviction and not a.trace:
        raise ValueError("--eviction changes only a --trace forecast's hit rate: give --trace FILE")
    machine = load_machine(a.profile) if a.profile else None  # another machine: nothing measured here
    ram = a.ram if a.ram is not None or machine is None else machine.memory_gb
    plan_for = partial(make_plan, ck, context=a.context, ram_gb=ram, prompt_cache_gb=serving.prompt_cache_gb,
                       max_batch=serving.max_batch, prefill_chunk=serving.prefill_chunk)
    plan = plan_for(paging)
    hit = trace_hit_rate(plan, a.trace, paging.eviction) if a.trace else None  # refused before measuring
    profile = measure_profile(ck, dtype=paging.dtype) if a.measure and machine is None else None
    fits_at = largest_fraction(lambda f: plan_for(replace(paging, cache_fraction=f, cache_gb=None)), plan.ram_bytes)
    if profile:
        machine = measured_machine(plan, profile)
    if machine is not None:
        plan.forecast = forecast(plan, machine, hit)
    if a.json:
        print(json.dumps({**plan.as_dict(), "profile": profile, "largest_fitting_fraction": fits_at}))
        return 0 if plan.fits else 1
    t = Table(title=f"moed plan: {plan.model}", title_justify="left")
    for c in ("", "bytes", ""):
        t.add_column(c, justify="right" if c == "bytes" else "left")
    for name, n, note in plan.lines():
        t.add_row(name, mb(n), note)
    t.add_row("[bold]total[/]", f"[bold]{mb(plan.total_bytes)}[/]",
              f"of {mb(plan.ram_bytes)} {'given' if ram else 'available'}: "
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
    elif machine is not None:
        con.print(f"machine: {machine.name} ({machine.source}): reads {machine.disk_gbps:g} GB/s, experts computed at "
                  f"{machine.expert_gbps:g} GB/s, copies {machine.copy_gbps:g} GB/s, {machine.dense_ms:g} ms a layer's rest")
    if machine is not None:
        f = plan.forecast
        routing = f"{a.trace} under {paging.eviction}" if a.trace else "uniform: each layer's cached share"
        con.print(f"forecast: [bold]{f['decode_tps']:.2f} tok/s[/] decode (all resident: {f['resident_decode_tps']:.2f}), "
                  f"hit rate {f['hit_rate']:.1%} (routing: {routing})")
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
        if getattr(a, "routing", None):
            from moed.daemon.engine.loader import log
            from moed.daemon.engine.routing import force_routing, load_routing

            force_routing(pm, load_routing(a.routing), log)
            log(f"--routing {a.routing}: each MoE layer's experts come from the trace; the tokens are not the model's")
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
               "worker_pids": pm.fetcher.pids, "ranks": ranks, "routing": getattr(a, "routing", None)}
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
    if a.action == "synth":
        from moed.daemon.tools.tracesynth import main as synth_main

        return synth_main(a)
    if not a.model:
        sys.exit("moed trace: --model is required (or `moed trace synth`)")
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
    if a.workload == "warm-start":
        from moed.daemon.tools import warmbench

        warmbench.run_all(a.model, [float(f) for f in str(a.cache_fractions).split(",") if f], a.max_tokens,
                          record_tokens=256, out=a.out, routing=a.routing)
        return 0
    if getattr(a, "workload", "decode") == "grammar":
        from moed.daemon.tools import grammarbench

        grammarbench.run(a.model, a.out, a.repeat, a.max_tokens, float(str(a.cache_fractions).split(",")[0]))
        return 0
    if getattr(a, "workload", "decode") in ("chat", "agent", "contention"):
        from moed.daemon.tools import servebench

        return servebench.main(a)
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


def _note_stop_signals() -> list[int]:
    """Until the supervisor installs its own handlers (first thing in Supervisor.run), a SIGTERM/SIGINT
    is only noted (raising here could land inside an extension's initialisation): the supervisor then
    stops at once, cleanly, with exit 0. Returns the list the signals are noted in."""
    noted: list[int] = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: noted.append(signum))
    return noted


def cmd_daemon(a: argparse.Namespace) -> int:
    paging = PagingConfig.from_args(a)
    from moed.ipc.config import ServingConfig

    if (code := _launched(a)) is not None:
        return code
    # the rank that serves notes early stop signals; ranks > 0 keep the default actions
    noted = _note_stop_signals() if os.environ.get("MLX_RANK", "0") == "0" else []
    from moed.daemon.dist.ranks import link
    from moed.daemon.service.supervisor import DaemonConfig
    from moed.daemon.service.supervisor import main as supervise

    from moed.ipc.config import API_KEY_ENV, api_key_of

    model = demo_model() if a.demo else a.model
    if not model:
        raise ValueError("give --model DIR (or --demo)")
    api_key = api_key_of(a)
    os.environ.pop(API_KEY_ENV, None)  # the I/O workers and other children do not need it
    return supervise(DaemonConfig(model=model, paging=paging, serving=ServingConfig.from_args(a),
                                  http=a.http, api_key=api_key, aliases=a.alias or [],
                                  cors_origins=a.cors_origin or []), link(), stopped=lambda: bool(noted))
