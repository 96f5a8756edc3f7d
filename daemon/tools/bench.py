"""`moed bench`: mlx-lm resident vs moed at several cache sizes, in one run, with provenance.

Each measurement runs in a fresh process (`python -m moed.daemon.tools.bench --one SPEC`), so peak RSS
and the page cache state belong to that measurement alone.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

import psutil

from moed.daemon.tools.iobench import drop_page_cache
from moed.ipc.config import PagingConfig

PROMPT_TEXT = (
    "The history of computing is a story of memory. Every generation of machines has been limited "
    "less by how fast it could calculate than by how much it could remember and how quickly it could "
    "fetch what it had forgotten. Engineers learned to keep the most useful things close at hand and "
    "to leave the rest on slower, larger storage, moving pages back and forth as the work demanded. "
)


def bench_prompt(tokenizer, n_tokens: int) -> list[int]:
    """A fixed prompt of exactly n_tokens tokens."""
    ids: list[int] = []
    while len(ids) < n_tokens:
        ids += tokenizer.encode(PROMPT_TEXT, add_special_tokens=False)
    return ids[:n_tokens]


def with_paging(spec: dict, **options) -> dict:
    """`spec` with these paging options set over its own (checked here, before a process starts)."""
    return {**spec, "paging": replace(paging_of(spec), **options).as_dict()}


def paging_of(spec: dict) -> PagingConfig:
    return PagingConfig.from_dict(spec["paging"])


def measure(spec: dict) -> dict:
    """One measurement, in this process: load, generate, report figures."""
    import mlx.core as mx

    from moed.daemon.engine.generate import SamplingParams, peak_rss_bytes, run
    from moed.daemon.engine.loader import load_paged, load_resident

    params = SamplingParams(max_tokens=spec["max_tokens"], temp=1.0 if spec["sampling"] == "random" else 0.0,
                            seed=spec["seed"], ignore_eos=True)
    t0 = time.perf_counter()
    if spec["engine"] == "quality":
        return top_k_quality(spec)
    if spec["engine"] == "io":
        return io_probe(spec)
    if spec["engine"] == "plan":
        return plan_forecast(spec)
    if spec["engine"] == "lookahead":
        from moed.daemon.tools import recall

        return recall.measure(spec["model"], PROMPT_TEXT, params)
    paging = paging_of(spec)
    if spec["engine"] == "mlx-lm":
        model, tokenizer = load_resident(spec["model"], paging.dtype, top_k=paging.top_k)
        pm = None
    else:
        pm = load_paged(spec["model"], paging)
        model, tokenizer = pm.model, pm.tokenizer
        if spec.get("routing"):  # the trace's experts, not the model's: the tokens are not the model's
            from moed.daemon.engine.routing import force_routing, load_routing

            force_routing(pm, load_routing(spec["routing"]))
    load_s = time.perf_counter() - t0
    try:
        res = run(model, tokenizer, bench_prompt(tokenizer, spec["prompt_tokens"]), params)
        out = {
            "engine": spec["engine"], "cache_fraction": paging.cache_fraction, "sampling": spec["sampling"],
            "top_k": paging.top_k,
            "decode_tps": res.decode_tps, "prefill_tps": res.prefill_tps, "ttft_s": res.ttft_s,
            "generated_tokens": len(res.tokens), "prompt_tokens": res.prompt_tokens,
            "load_s": load_s, "peak_rss_bytes": peak_rss_bytes(), "tokens": res.tokens,
            "mlx_peak_memory_bytes": mx.get_peak_memory(),
        }
        if pm is not None:
            st = pm.store.stats
            out.update({
                "hit_rate": st.hit_rate, "bytes_read": st.bytes_read,
                "bytes_read_per_token": st.bytes_read / max(1, len(res.tokens) + res.prompt_tokens),
                "read_gbps": st.bytes_read / st.read_seconds / 1e9 if st.read_seconds else 0.0,
                "read_seconds": st.read_seconds, "cache_bytes": pm.info["cache_bytes"],
                "verify_seconds": st.verify_seconds,  # packed records' checksums, checked as read
                "verify_share": st.verify_seconds / (res.ttft_s + len(res.tokens) / res.decode_tps)
                if res.decode_tps else 0.0,
                "slots_per_layer": pm.info["slots_per_layer"][0], "non_expert_bytes": pm.non_expert_bytes,
                "expert_bytes": pm.expert_bytes, "packed": pm.info["packed"], "direct": pm.fetcher.direct,
                "lookahead": pm.info["lookahead"], "prefetched": st.prefetched,
                "prefetch_used": st.prefetch_used, "routing": spec.get("routing"), "eviction": paging.eviction,
                "tokens_are_the_models": not spec.get("routing"),
            })
        else:
            out.update({"hit_rate": 1.0, "bytes_read": 0, "bytes_read_per_token": 0.0, "read_gbps": 0.0})
        return out
    finally:
        if pm is not None:
            pm.close()


def plan_forecast(spec: dict) -> dict:
    """`moed plan`'s profile of this machine and its forecast for each cache size measured."""
    from moed.daemon.tools.plan import forecast, make_plan, measure_profile, measured_machine, read_checkpoint

    paging = paging_of(spec)
    ck = read_checkpoint(spec["model"])
    profile = measure_profile(ck, dtype=paging.dtype)
    plans = {f: make_plan(ck, replace(paging, cache_fraction=f)) for f in spec["fractions"]}
    return {"engine": "plan", "profile": profile,
            "forecasts": {str(f): forecast(p, measured_machine(p, profile)) for f, p in plans.items()}}


IO_REPS = 3  # raw and fetch path alternate this many times; the medians are reported (the disk is noisy)


def io_compare(files: list[str], visits: list[list], workers: int, direct: bool, reps: int) -> dict:
    """Raw parallel reads vs the fetch path (1 and 2 visits in flight) on the same misses, each from
    a cold page cache, alternating `reps` times; medians and every repetition."""
    from statistics import median

    from moed.daemon.tools.iobench import coalesce, path_read, raw_read

    nbytes = sum(n for v in visits for _, _, n in v)
    reads = [r for v in visits for r in coalesce(v)]
    raw, path = [], {"1": [], "2": []}
    for _ in range(reps):
        drop_page_cache()
        raw.append(raw_read(files, reads, direct=direct))
        for n in path:
            state = drop_page_cache()
            path[n].append(path_read(files, visits, workers, direct=direct, in_flight=int(n)))

    def gbps(seconds: float) -> float:
        return nbytes / seconds / 1e9

    return {"raw_gbps": gbps(median(raw)), "io_path_gbps": {n: gbps(median(t)) for n, t in path.items()},
            "io_path_fraction_of_raw": {n: median(r / p for r, p in zip(raw, t)) for n, t in path.items()},
            "raw_seconds": raw, "io_path_seconds": path, "cache_state": state}


def io_probe(spec: dict) -> dict:
    """Record a routing trace, then raw parallel reads vs the fetch path on its misses, cold: for
    the stacked safetensors layout (buffered) and, when `moed pack` made one, the packed one
    (buffered, and direct: every byte from the disk)."""
    from moed.daemon.engine.checkpoint import expert_index, top_k_of
    from moed.daemon.engine.generate import SamplingParams
    from moed.daemon.tools.iobench import RAW_THREADS, coalesce, miss_ranges, path_read, path_read_cpu
    from moed.daemon.tools.trace import record_trace, save_trace

    workers = paging_of(spec).workers
    trace = record_trace(spec["model"], PROMPT_TEXT, SamplingParams(max_tokens=spec["max_tokens"], temp=1.0,
                                                                     seed=spec["seed"], ignore_eos=True), workers)
    save_trace(trace, spec["trace_out"])
    out = {"engine": "io", "trace": spec["trace_out"], "visits": len(trace["steps"]), "raw_threads": RAW_THREADS,
           "reps": IO_REPS, "layouts": {}}
    indexes = {}
    for layout in ("stacked", "packed"):
        table, layers, config = expert_index(spec["model"], packed=layout == "packed")
        if layout == "packed" and not table.packed:
            continue
        files = [str(f) for f in table.files]
        indexes[layout] = files, layers, config
        per = out["layouts"][layout] = {}
        for fraction in spec["fractions"]:
            visits = miss_ranges(trace, layers, fraction, top_k_of(config))
            experts = sum(len(v) for v in visits) // len(layers[0].tensors)
            reads = sum(len(coalesce(v)) for v in visits)
            r = per[str(fraction)] = {
                "bytes": sum(n for v in visits for _, _, n in v), "visits_with_misses": len(visits),
                "experts_read": experts, "reads": reads, "reads_per_expert": reads / max(1, experts)}
            for mode in ("buffered", "direct") if layout == "packed" else ("buffered",):
                r[mode] = io_compare(files, visits, workers, mode == "direct",
                                     IO_REPS if layout == "packed" else 1)
    out["per_fraction"] = out["layouts"].get("packed") or out["layouts"]["stacked"]  # what the engine reads
    # queue depth per worker, on the layout the engine reads, at the first cache size
    layout = "packed" if "packed" in indexes else "stacked"
    files, layers, config = indexes[layout]
    visits = miss_ranges(trace, layers, spec["fractions"][0], top_k_of(config))
    nbytes = sum(n for v in visits for _, _, n in v)
    out["queue_depth"] = {"layout": layout, "cache_fraction": spec["fractions"][0], "bytes": nbytes,
                          "io_path_gbps": {}}
    for depth in (1, 2, 4, 8):
        drop_page_cache()
        out["queue_depth"]["io_path_gbps"][str(depth)] = nbytes / path_read(files, visits, workers, depth) / 1e9
    # buffered vs direct (O_DIRECT / F_NOCACHE): speed, and the workers' CPU (the cores compute needs)
    out["direct"] = {"layout": layout, "cache_fraction": spec["fractions"][0], "bytes": nbytes}
    for mode in ("buffered", "direct"):
        state = drop_page_cache()
        wall, cpu = path_read_cpu(files, visits, workers, direct=mode == "direct")
        out["direct"][mode] = {"io_path_gbps": nbytes / wall / 1e9, "worker_cpu_s_per_gb": cpu / (nbytes / 1e9),
                               "cache_state": state}
    return out


QUALITY_PROMPTS = [
    "The history of computing is a story of memory.",
    "Once upon a time, in a land of small memories and large models, a wizard kept",
    "def fetch(layer, expert):\n    return cache.get((layer, expert))",
    "Rain fell on the old city all night, and by morning the river had",
]


def top_k_quality(spec: dict) -> dict:
    """Top-1 agreement and mean KL(full || K) of next-token distributions, teacher-forced over the
    fixed prompts followed by the full model's own greedy continuation."""
    import mlx.core as mx

    from moed.daemon.engine.checkpoint import hidden_size_of, top_k_of
    from moed.daemon.engine.generate import SamplingParams, run
    from moed.daemon.engine.loader import load_resident
    from moed.daemon.engine.routing import set_top_k

    model, tok = load_resident(spec["model"], paging_of(spec).dtype)
    config = json.loads((Path(spec["model"]) / "config.json").read_text())
    full_k = top_k_of(config)
    seqs = []
    for p in QUALITY_PROMPTS:
        ids = tok.encode(p)
        seqs.append(ids + run(model, tok, ids, SamplingParams(max_tokens=24, ignore_eos=True)).tokens)

    def logprobs(k: int) -> list:
        set_top_k(model, k, hidden_size_of(config))
        out = []
        for ids in seqs:
            logits = model(mx.array(ids)[None])[0].astype(mx.float32)
            out.append(logits - mx.logsumexp(logits, axis=-1, keepdims=True))
        return out

    ref = logprobs(full_k)
    result = {"engine": "quality", "full_top_k": full_k, "positions": sum(len(s) for s in seqs), "per_k": {}}
    for k in spec["top_ks"]:
        got = logprobs(k)
        kl = sum(float(mx.sum(mx.exp(r) * (r - g))) for r, g in zip(ref, got)) / result["positions"]
        agree = sum(int(mx.sum(mx.argmax(r, -1) == mx.argmax(g, -1))) for r, g in zip(ref, got))
        result["per_k"][str(k)] = {"mean_kl": kl, "top1_agreement": agree / result["positions"]}
    return result


def main_top_k(a, console, model: str, base: dict) -> int:
    from rich.table import Table

    ks = [int(k) for k in str(a.top_ks).split(",") if k]
    fraction = float(str(a.cache_fractions).split(",")[0])
    quality = run_one({**base, "engine": "quality", "top_ks": ks, "sampling": "greedy"}, cold=False)
    runs = [run_one({**base, "engine": "mlx-lm", "sampling": "random"}, a.cold)]
    for k in ks:
        console.print(f"[bold]moed[/] cache={fraction} top-k={k} ...")
        r = run_one(with_paging({**base, "engine": "moed", "sampling": "random"}, cache_fraction=fraction, top_k=k),
                    a.cold)
        r.update(quality["per_k"][str(k)])
        r["decode_ratio_vs_mlx_lm"] = r["decode_tps"] / runs[0]["decode_tps"]
        runs.append(r)
    runs[0]["decode_ratio_vs_mlx_lm"] = 1.0
    write_provenance(a, model, base, runs + [quality], {"top_ks": ks, "cache_fraction": fraction})
    t = Table(title=f"moed bench --top-k: {Path(model).name}, cache {fraction}, model top-k {quality['full_top_k']}")
    for c in ("engine", "top-k", "decode tok/s", "x mlx-lm", "hit rate", "MB read/tok", "top-1 agree", "mean KL"):
        t.add_column(c, justify="right")
    for r in runs:
        t.add_row(r["engine"], str(r.get("top_k") or quality["full_top_k"]), f"{r['decode_tps']:.2f}",
                  f"{r['decode_ratio_vs_mlx_lm']:.2f}", f"{r['hit_rate']:.1%}",
                  f"{r['bytes_read_per_token'] / 1e6:.1f}",
                  f"{r['top1_agreement']:.1%}" if "top1_agreement" in r else "-",
                  f"{r['mean_kl']:.4f}" if "mean_kl" in r else "-")
    from rich.console import Console

    Console(width=170).print(t)
    console.print(f"wrote {a.out}")
    return 0


def machine() -> dict:
    from moed.daemon.engine.budget import cgroup_available

    vm = psutil.virtual_memory()
    return {
        "platform": platform.platform(), "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(), "ram_bytes": vm.total, "python": platform.python_version(),
        "cgroup_available_bytes": cgroup_available(),  # a memory limit the run was under (None: none)
    }


def versions() -> dict:
    from importlib.metadata import version

    return {p: version(p) for p in ("mlx", "mlx-lm", "pyzmq", "msgpack")}


def git_commit() -> dict:
    """The commit measured, and any tracked files that differed from it."""
    root = Path(__file__).resolve().parent.parent

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True).stdout

    try:
        sha = git("rev-parse", "HEAD").strip()
        changed = [line[3:] for line in git("status", "--porcelain", "--untracked-files=no").splitlines()]
    except OSError:
        sha, changed = "", []
    return {"git_commit": sha or "unknown", "git_dirty": bool(changed), "git_changed_files": changed}


def run_one(spec: dict, cold: bool) -> dict:
    cold_method = drop_page_cache() if cold else "warm"
    proc = subprocess.run([sys.executable, "-m", "moed.daemon.tools.bench", "--one", json.dumps(spec)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"bench run {spec} failed:\n{proc.stderr[-4000:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out["cache_state"] = cold_method
    return out


def concurrency_run(model: str, fraction: float, n: int, spec: dict, cold: bool) -> dict:
    """N client threads against a fresh daemon: aggregate decode tok/s through the real path."""
    import tempfile
    import threading

    from moed.client.client import Client
    from moed.ipc.messages import Token

    cache_state = drop_page_cache() if cold else "warm"
    runtime = tempfile.mkdtemp(prefix="moed-bench-")
    env = dict(os.environ, MOED_RUNTIME_DIR=runtime, PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "moed.client.cli", "daemon", "--model", model,
           *replace(paging_of(spec), cache_fraction=fraction).to_argv(), "--max-batch", str(max(n, 1))]
    daemon = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.monotonic() + 600
        while True:
            try:
                with Client(runtime) as c:
                    if c.status().state == "ready":
                        break
            except Exception:
                pass
            if daemon.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"daemon failed: {daemon.stderr.read()[-2000:] if daemon.stderr else ''}")
            time.sleep(0.2)
        prompt = PROMPT_TEXT.split(". ")[0]  # short: this measures decode, not prefill
        results: list = [None] * n
        counts = [0] * n  # tokens so far, per stream
        barrier = threading.Barrier(n + 1)

        def stream(i: int) -> None:
            with Client(runtime, name=f"bench-{i}") as c:
                barrier.wait()
                t0 = time.perf_counter()
                kw = {"temperature": 1.0, "seed": spec["seed"] + i} if spec["sampling"] == "random" else {}
                for ev in c.generate(f"{prompt} ({i})", max_tokens=spec["max_tokens"], **kw):
                    if isinstance(ev, Token):
                        counts[i] += 1
                    else:
                        fin = ev
                results[i] = {"tokens": counts[i], "decode_tps": fin.decode_tps, "ttft_s": fin.ttft_s,
                              "wall_s": time.perf_counter() - t0, "t_end": time.perf_counter(), "t0": t0}

        threads = [threading.Thread(target=stream, args=(i,)) for i in range(n)]
        for t in threads:
            t.start()
        barrier.wait()
        # once every stream decodes (a snapshot may lag a step): the counters, so decode's work alone counts
        while min(counts) < 3 and any(t.is_alive() for t in threads):  # past the prefill step
            time.sleep(0.002)
        with Client(runtime) as c:
            mid = c.status()  # its counters and its token count are of the same moment
        for t in threads:
            t.join()
        with Client(runtime) as c:
            snap = c.status()
        start = min(r["t0"] for r in results)
        end = max(r["t_end"] for r in results)
        decoding = min(r["t0"] + r["ttft_s"] for r in results)  # the first token of any stream
        tokens = sum(r["tokens"] for r in results)
        wall = end - start
        # a paged layer's visit counts each distinct expert it touched once (hit or miss): the expert work
        visits = snap.cache.hits + snap.cache.misses - mid.cache.hits - mid.cache.misses
        decode_tokens = snap.totals.generated_tokens - mid.totals.generated_tokens
        return {"engine": "moed-daemon", "cache_fraction": fraction, "sampling": spec["sampling"], "concurrency": n,
                "aggregate_tps": tokens / wall, "aggregate_decode_tps": tokens / (end - decoding),
                "streams": results, "wall_s": wall, "expert_visits": visits,
                "decode_tokens_counted": decode_tokens,
                "distinct_experts_per_token": visits / max(1, decode_tokens) / max(1, len(snap.cache.slots_per_layer)),
                "hit_rate": snap.cache.hit_rate, "bytes_read": snap.cache.bytes_read,
                "daemon_rss_bytes": snap.rss_bytes, "peak_active": snap.totals.peak_active,
                "cache_state": cache_state}
    finally:
        try:
            with Client(runtime) as c:
                c.stop_daemon()
            daemon.wait(60)
        except Exception:
            daemon.kill()
            daemon.wait()
        shutil.rmtree(runtime, ignore_errors=True)


def sweep(a, console, option: str, run, model: str, base: dict) -> tuple[list[int], float, list]:
    """`--OPTION 1,2,4` at the first cache fraction: run(model, fraction, n, spec, cold) per sampling x n."""
    levels = [int(x) for x in str(getattr(a, option)).split(",") if x]
    fraction = float(str(a.cache_fractions).split(",")[0])
    runs = []
    for sampling in [s for s in a.sampling.split(",") if s]:
        for n in levels:
            console.print(f"[bold]moed[/] cache={fraction} {option}={n} sampling={sampling} ...")
            runs.append(run(model, fraction, n, {**base, "sampling": sampling}, a.cold))
    return levels, fraction, runs


def main_concurrency(a, console, model: str, base: dict) -> int:
    from rich.table import Table

    levels, fraction, runs = sweep(a, console, "concurrency", concurrency_run, model, base)
    for r in runs:
        one = next(x for x in runs if x["concurrency"] == 1 and x["sampling"] == r["sampling"])
        r["aggregate_ratio_vs_1"] = r["aggregate_decode_tps"] / one["aggregate_decode_tps"]
        # the bound: 1 stream's rate of expert work, spent on this run's distinct experts per token (a step
        # costs what its distinct experts cost; sharing the rest of the step is not counted)
        r["bound_aggregate_tps"] = one["aggregate_decode_tps"] * (
            one["distinct_experts_per_token"] / r["distinct_experts_per_token"])
        r["aggregate_over_bound"] = r["aggregate_decode_tps"] / r["bound_aggregate_tps"]
    write_provenance(a, model, base, runs, {"concurrency": levels, "cache_fraction": fraction})
    t = Table(title=f"moed bench --concurrency: {Path(model).name}, cache {fraction}")
    for c in ("sampling", "streams", "aggregate tok/s", "x 1 stream", "experts/token/layer", "bound tok/s",
              "x bound", "per-stream tok/s", "hit rate", "wall s"):
        t.add_column(c, justify="right")
    for r in runs:
        t.add_row(r["sampling"], str(r["concurrency"]), f"{r['aggregate_decode_tps']:.2f}",
                  f"{r['aggregate_ratio_vs_1']:.2f}", f"{r['distinct_experts_per_token']:.2f}",
                  f"{r['bound_aggregate_tps']:.2f}", f"{r['aggregate_over_bound']:.2f}",
                  f"{sum(s['decode_tps'] for s in r['streams']) / r['concurrency']:.2f}",
                  f"{r['hit_rate']:.1%}", f"{r['wall_s']:.1f}")
    from rich.console import Console

    Console(width=170).print(t)
    console.print(f"wrote {a.out}")
    return 0


def ranks_run(model: str, fraction: float, n: int, spec: dict, cold: bool) -> dict:
    """`moed generate --ranks N` (N=1: one process, no split): decode speed and hit rate per rank."""
    cache_state = drop_page_cache() if cold else "warm"
    temp = "1.0" if spec["sampling"] == "random" else "0.0"
    cmd = [sys.executable, "-m", "moed.client.cli", "generate", "--model", model, "--json", "--ignore-eos",
           "--prompt", PROMPT_TEXT.split(". ")[0], "--max-tokens", str(spec["max_tokens"]), "--temp", temp,
           "--seed", str(spec["seed"]), *replace(paging_of(spec), cache_fraction=fraction).to_argv()]
    proc = subprocess.run(cmd + (["--ranks", str(n)] if n > 1 else []), capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"moed generate --ranks {n} failed:\n{proc.stderr[-4000:]}")
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    per_rank = r["ranks"] or [{"rank": 0, "layers": [0, len(r["slots_per_layer"])], "hits": None, "misses": None,
                               "bytes_read": r["bytes_read"], "peak_rss_bytes": r["peak_rss_bytes"],
                               "non_expert_bytes": r["non_expert_bytes"], "cache_bytes": r["cache_bytes"]}]
    for x in per_rank:
        if x["hits"] is not None:
            x["hit_rate"] = x["hits"] / max(1, x["hits"] + x["misses"])
    return {"engine": "moed", "ranks": n, "cache_fraction": fraction, "sampling": spec["sampling"],
            "decode_tps": r["decode_tps"], "prefill_tps": r["prefill_tps"], "ttft_s": r["ttft_s"],
            "hit_rate": r["hit_rate"], "bytes_read": r["bytes_read"], "generated_tokens": len(r["tokens"]),
            "tokens": r["tokens"], "per_rank": per_rank,
            "max_peak_rss_bytes": max(x["peak_rss_bytes"] for x in per_rank), "cache_state": cache_state}


def main_ranks(a, console, model: str, base: dict) -> int:
    from rich.table import Table

    levels, fraction, runs = sweep(a, console, "ranks", ranks_run, model, base)
    for r in runs:
        one = next(x for x in runs if x["ranks"] == min(levels) and x["sampling"] == r["sampling"])
        r["decode_ratio_vs_fewest_ranks"] = r["decode_tps"] / one["decode_tps"]
        r["same_tokens_as_fewest_ranks"] = r["tokens"] == one["tokens"]
    write_provenance(a, model, base, runs, {"ranks": levels, "cache_fraction": fraction})
    t = Table(title=f"moed bench --ranks: {Path(model).name}, {fraction:.0%} of each rank's layers' experts cached")
    for c in ("sampling", "ranks", "decode tok/s", f"x {min(levels)} rank", "hit rate", "hit rate per rank",
              "peak RSS MB per rank", "same tokens"):
        t.add_column(c, justify="right")
    for r in runs:
        t.add_row(r["sampling"], str(r["ranks"]), f"{r['decode_tps']:.2f}", f"{r['decode_ratio_vs_fewest_ranks']:.2f}",
                  f"{r['hit_rate']:.1%}",
                  " / ".join(f"{x['hit_rate']:.1%}" for x in r["per_rank"] if "hit_rate" in x) or "-",
                  " / ".join(f"{x['peak_rss_bytes'] / 1e6:.0f}" for x in r["per_rank"]),
                  str(r["same_tokens_as_fewest_ranks"]))
    from rich.console import Console

    Console(width=170).print(t)
    console.print(f"wrote {a.out}")
    return 0


def repeat_summary(runs: list) -> list[dict]:
    """Per configuration over the rounds: median decode tok/s and median of the paired ratios."""
    from statistics import median

    groups: dict[str, list] = {}
    for r in runs:
        if r["engine"] == "moed" and "decode_ratio_vs_mlx_lm" in r:
            key = (f"cache {r['cache_fraction']} {r['sampling']} " + ("packed" if r.get("packed") else "stacked")
                   + (" direct" if r.get("direct") else "") + (" lookahead" if r.get("lookahead") else "")
                   + (f" {r['eviction']}" if r.get("eviction", "lru") != "lru" else ""))
            groups.setdefault(key, []).append(r)
    return [{"engine": "summary", "config": k, "rounds": len(rs), "cache_fraction": rs[0]["cache_fraction"],
             "sampling": rs[0]["sampling"], "decode_tps": median(r["decode_tps"] for r in rs),
             "ratios": [r["decode_ratio_vs_mlx_lm"] for r in rs],
             "decode_ratio_vs_mlx_lm": median(r["decode_ratio_vs_mlx_lm"] for r in rs)} for k, rs in groups.items()]


def write_provenance(a, model: str, base: dict, runs: list, extra: dict) -> None:
    config = json.loads((Path(model) / "config.json").read_text())
    cfg = config.get("text_config", config)
    doc = {
        "kind": "moed-bench", "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["moed", *sys.argv[1:]]),
        "config": {**base, **extra, "sampling": a.sampling.split(","), "cold": a.cold,
                   "model_config": {"model_type": config.get("model_type"),
                                    **{k: cfg.get(k) for k in ("hidden_size", "num_hidden_layers", "num_experts",
                                                               "num_local_experts", "num_experts_per_tok",
                                                               "moe_intermediate_size")}}},
        "machine": machine(), "versions": versions(), **git_commit(), "runs": runs,
    }
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(doc, indent=2))


def main(a) -> int:
    """Run every configuration, print a table, write the provenance file."""
    from rich.console import Console
    from rich.table import Table

    from moed.daemon.engine.checkpoint import resolve_model

    console = Console(stderr=True)
    model = str(resolve_model(a.model))
    fractions = [float(f) for f in str(a.cache_fractions).split(",") if f]
    samplings = [s for s in a.sampling.split(",") if s]
    base = {"model": model, "max_tokens": a.max_tokens, "prompt_tokens": a.prompt_tokens, "seed": 0,
            # --workers, --dtype; each run sets the rest; no warm start: a run must not depend on the last ones
            "paging": {**PagingConfig.from_args(a).as_dict(), "warm_start": False}}
    if getattr(a, "routing", None):
        base["routing"] = str(Path(a.routing).resolve())
        console.print(f"[bold yellow]--routing {a.routing}[/]: moed's experts come from the trace, so its tokens "
                      "are not the model's (mlx-lm keeps the model's routing)")
    if a.concurrency:
        return main_concurrency(a, console, model, base)
    if a.ranks:
        return main_ranks(a, console, model, base)
    if a.top_ks:
        return main_top_k(a, console, model, base)
    specs = [] if a.skip_mlx_lm else [{**base, "engine": "mlx-lm", "sampling": s} for s in samplings]
    layouts = [x for x in a.layouts.split(",") if x]
    ios = [x for x in a.io.split(",") if x]
    aheads = [{"on": True, "off": False}.get(x) for x in a.lookahead.split(",") if x]
    evictions = [x for x in getattr(a, "evictions", "lru").split(",") if x]
    specs += [with_paging({**base, "engine": "moed", "sampling": s}, cache_fraction=f, packed=lay == "packed",
                          direct=io == "direct", lookahead=ahead, eviction=ev)
              for s in samplings for lay in layouts for io in ios for ahead in aheads for ev in evictions
              for f in fractions]
    runs = []
    for rnd in range(a.repeat):  # whole rounds, so a drift of the machine hits every configuration alike
        for spec in specs:
            console.print(f"[bold]{spec['engine']}[/] cache={paging_of(spec).cache_fraction} "
                          f"sampling={spec['sampling']}"
                          + (f" round {rnd + 1}/{a.repeat}" if a.repeat > 1 else "") + " ...")
            runs.append({**run_one(spec, a.cold), "round": rnd})
    console.print("[bold]moed plan forecast[/] (profile of this machine) ...")
    plan = run_one({**base, "engine": "plan", "fractions": fractions, "sampling": "-"}, cold=False)
    for r in runs:
        f = plan["forecasts"][str(r["cache_fraction"])] if r["engine"] == "moed" else None
        if f is None and r["engine"] == "mlx-lm":
            f = {"decode_tps": next(iter(plan["forecasts"].values()))["resident_decode_tps"]}
        r["forecast_decode_tps"] = f["decode_tps"]
        r["measured_over_forecast"] = r["decode_tps"] / f["decode_tps"]
    extra = []
    if True in aheads:
        console.print("[bold]lookahead recall[/] (next layer's router on this layer's input) ...")
        extra.append(run_one({**base, "engine": "lookahead", "sampling": "random"}, cold=False))
        console.print("recall of the lookahead {recall_lookahead:.1%}, of the previous token's experts "
                      "{recall_previous_token:.1%}, chance {chance:.1%}".format(**extra[-1]))
    partial = [f for f in fractions if f < 1 and not a.skip_io]
    io = None
    if partial:
        console.print("[bold]I/O path alone vs raw parallel reads[/] ...")
        io = run_one({**base, "engine": "io", "fractions": partial, "sampling": "random",
                      "trace_out": str(Path(a.out).with_name(Path(a.out).stem + "-trace.json"))}, cold=False)
    resident = {(r["sampling"], r["round"]): r for r in runs if r["engine"] == "mlx-lm"}
    for r in runs:
        ref = resident.get((r["sampling"], r["round"]))
        if ref is not None:
            r["decode_ratio_vs_mlx_lm"] = r["decode_tps"] / ref["decode_tps"]
            r["prefill_ratio_vs_mlx_lm"] = r["prefill_tps"] / ref["prefill_tps"]
            r["same_tokens_as_mlx_lm"] = r["tokens"] == ref["tokens"] if not r.get("routing") else None
    summary = repeat_summary(runs) if a.repeat > 1 else []
    write_provenance(a, model, base, runs + [plan] + extra + ([io] if io else []) + summary,
                     {"cache_fractions": fractions, "layouts": layouts, "io": ios, "lookahead": aheads,
                      "evictions": evictions, "repeat": a.repeat})
    t = Table(title=f"moed bench: {Path(model).name}")
    for c in ("engine", "layout", "cache", "sampling", "decode tok/s", "x mlx-lm", "forecast", "prefill tok/s",
              "ttft s", "hit rate", "MB read/tok", "read GB/s", "peak RSS MB"):
        t.add_column(c, justify="right")
    for r in runs:
        layout = "-" if "packed" not in r else ("packed" if r["packed"] else "stacked") + (
            ", direct" if r.get("direct") else "") + (", lookahead" if r.get("lookahead") else "") + (
            f", {r['eviction']}" if r.get("eviction", "lru") != "lru" else "")
        t.add_row(r["engine"], layout, str(r["cache_fraction"] or "-"), r["sampling"], f"{r['decode_tps']:.2f}",
                  f"{r['decode_ratio_vs_mlx_lm']:.2f}" if "decode_ratio_vs_mlx_lm" in r else "-",
                  f"{r['forecast_decode_tps']:.2f}", f"{r['prefill_tps']:.1f}", f"{r['ttft_s']:.2f}",
                  f"{r['hit_rate']:.1%}", f"{r['bytes_read_per_token'] / 1e6:.2f}", f"{r['read_gbps']:.2f}",
                  f"{r['peak_rss_bytes'] / 1e6:.0f}")
    Console(width=170).print(t)
    if base.get("routing"):
        console.print(f"routing forced from {a.routing}: moed's tokens are not the model's")
    for sm in summary:
        console.print(f"median of {sm['rounds']} rounds: {sm['config']}: {sm['decode_tps']:.2f} tok/s, "
                      f"x mlx-lm {sm['decode_ratio_vs_mlx_lm']:.3f} (rounds: "
                      + ", ".join(f"{x:.3f}" for x in sm["ratios"]) + ")")
    if io:
        for layout, per in io["layouts"].items():
            for f, r in per.items():
                for mode in ("buffered", "direct"):
                    if mode in r:
                        m = r[mode]
                        console.print(
                            f"I/O ({layout}, {mode}) at cache {f}: raw {m['raw_gbps']:.2f} GB/s, fetch path "
                            + ", ".join(f"{n} in flight {m['io_path_gbps'][n]:.2f} GB/s = "
                                        f"{m['io_path_fraction_of_raw'][n]:.0%}" for n in ("1", "2"))
                            + f" of raw ({r['bytes'] / 1e6:.0f} MB, {r['reads_per_expert']:.1f} reads per expert)")
        qd = io["queue_depth"]
        console.print(f"fetch path by reads in flight per worker ({qd['layout']}, cache {qd['cache_fraction']}): "
                      + ", ".join(f"{d}: {g:.2f} GB/s" for d, g in qd["io_path_gbps"].items()))
        console.print("fetch path buffered vs direct: " + ", ".join(
            f"{m} {io['direct'][m]['io_path_gbps']:.2f} GB/s ({io['direct'][m]['worker_cpu_s_per_gb']:.2f} worker CPU-s/GB)"
            for m in ("buffered", "direct")))
    console.print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--one":
        print(json.dumps(measure(json.loads(sys.argv[2]))))
    else:
        sys.exit("usage: python -m moed.daemon.tools.bench --one SPEC_JSON (use `moed bench`)")
