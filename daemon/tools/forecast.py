"""A forecast on paper: decode tok/s of a model on a machine neither of which is here.

`python -m moed.daemon.tools.forecast --out bench/results/forecast-published.json` (`make bench-routing`).

The step model is `moed plan`'s (daemon/tools/plan.py: Machine, layer_s, forecast), with the hit rate of each layer taken
from a routing trace instead of the cached share: per MoE layer and token, the misses are read while
the resident experts compute, then copied into their slots and computed, plus the layer's non-expert
work:

    t_layer = max(m * read, (k - m) * compute) + m * (compute + copy) + dense,  m = (1 - hit) * k

with read = expert bytes / disk GB/s, compute = expert bytes / the GB/s at which the matmuls stream
expert weights, copy = expert bytes / memory copy GB/s. The hit rate is the policy simulator's
(daemon/tools/policy.py) on a calibrated synthetic trace for the model's shape (tools/tracesynth.py),
under the cache that config has (an own cache: frequency-weighted LRU, moed's default; the OS page
cache alone: LRU).

Checked against the published figures in their own configuration (the machines' profiles come from
their spec sheets and the engines' own per-layer timings; each figure names its source), then moed's
forecast for the same machines at the model's exact top-10.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

from moed.daemon.tools.plan import Machine, layer_s


@dataclass(frozen=True)
class Shape:
    name: str
    moe_layers: int
    experts: int
    top_k: int
    expert_bytes: int
    resident_gb: float  # non-expert weights
    source: str


QWEN35_397B = Shape("Qwen3.5-397B-A17B, 4-bit", 60, 512, 10, 7_077_888, 5.5,
                    "Flash-MoE: 60 layers, 512 experts, 7,077,888-byte records, ~5.5 GB resident (ANCHORS.md)")
# Flash-MoE's per-layer GPU time at K=4 (1.77 ms) less 4 experts streamed at ~300 GB/s (0.09 ms) is
# the non-expert part; the M3 Max's 400 GB/s of memory bandwidth at ~75% for the experts.
M3_MAX_48 = Machine("M3 Max 48 GB", 48, 17.5, 300.0, 100.0, 1.68,
                    "Flash-MoE: SSD ~17.5 GB/s, GPU 1.77 ms per layer at K=4 (ANCHORS.md); 400 GB/s memory (spec)")
# M1 Ultra: 800 GB/s memory (spec), SSD ~7.4 GB/s (spec); the non-expert time taken as the M3 Max's
# (no per-layer figure published): an assumption.
M1_ULTRA_64 = Machine("M1 Ultra 64 GB", 64, 7.4, 600.0, 100.0, 1.68,
                      "spec sheet: SSD ~7.4 GB/s, 800 GB/s memory; per-layer dense time assumed = M3 Max's")

PUBLISHED = [
    {"engine": "Flash-MoE", "machine": M3_MAX_48, "top_k": 4, "cache": "page", "tps": 4.36,
     "source": "4.36 tok/s, 4-bit, K=4, no expert cache of its own: the OS page cache (ANCHORS.md)"},
    {"engine": "Flash-MoE", "machine": M3_MAX_48, "top_k": 10, "cache": "page", "tps": 1.20,
     "source": "K=10: 1.20 tok/s (its K sweep, ANCHORS.md)"},
    {"engine": "Outlier", "machine": M1_ULTRA_64, "top_k": 10, "cache": "lru", "slots": 20, "tps": 1.59,
     "source": "1.59 tok/s, LRU of 20 experts per layer (cache_gb 8), 14 GB peak RSS (ANCHORS.md); "
               "the model taken to be Qwen3.5-397B at top-10 (8 GB / 60 layers / 20 = its 7 MB records)"},
]
OS_AND_APPS_GB = 8.0  # memory a laptop keeps for the OS and the user's apps (assumption)


def hit_rate(shape: Shape, top_k: int, slots: int, policy: str, tokens: int = 256, layers: int = 16) -> float:
    """The policy simulator's hit rate on a calibrated synthetic trace of this shape (16 layers
    stand for all: the generator draws the layers alike)."""
    from moed.daemon.tools.policy import simulate
    from moed.daemon.tools.tracesynth import synth

    if slots >= shape.experts:
        return 1.0
    trace = synth(shape.experts, top_k, layers, tokens, predictions=False)
    return simulate(trace, policy, "per_layer", slots / shape.experts)["hit_rate"]


def step_s(shape: Shape, m: Machine, top_k: int, hit: float) -> float:
    """Seconds per decoded token (see the module docstring)."""
    return shape.moe_layers * layer_s(shape.expert_bytes, m, top_k, hit)


def page_cache_slots(shape: Shape, m: Machine) -> int:
    """Experts per layer the OS page cache holds when nothing else caches them."""
    free = (m.memory_gb - shape.resident_gb - OS_AND_APPS_GB) * 1e9
    return max(0, int(free / shape.expert_bytes / shape.moe_layers))


def moed_slots(shape: Shape, m: Machine, share: float = 0.5) -> int:
    """moed's cache: `share` of the memory left beside the resident weights and the OS (the rest
    stays page cache, ds4's lesson); at least top-k."""
    free = (m.memory_gb - shape.resident_gb - OS_AND_APPS_GB) * 1e9 * share
    return max(shape.top_k, int(free / shape.expert_bytes / shape.moe_layers))


def calibrated(shape: Shape, m: Machine, top_k: int, hit: float, tps: float) -> Machine:
    """`m` with the disk GB/s at which `step_s` gives `tps` (bisection): the effective read rate a
    published figure implies (per-expert reads are latency-bound, below the spec sheet's sequential rate)."""
    lo, hi = 0.01, 1000.0
    for _ in range(100):
        mid = (lo * hi) ** 0.5
        if 1 / step_s(shape, Machine(**{**asdict(m), "disk_gbps": mid}), top_k, hit) < tps:
            lo = mid
        else:
            hi = mid
    return Machine(**{**asdict(m), "disk_gbps": round(lo, 3), "name": m.name + " (calibrated)",
                      "source": m.source + f"; disk GB/s fitted to {tps} tok/s"})


def _row(kind: str, engine: str, m: Machine, k: int, slots: int, policy: str, hit: float, **extra) -> dict:
    t = step_s(QWEN35_397B, m, k, hit)
    return {"kind": kind, "engine": engine, "machine": m.name, "disk_gbps": m.disk_gbps, "top_k": k,
            "slots_per_layer": slots, "policy": policy, "hit_rate": hit, "forecast_tps": 1 / t, **extra}


def run(out: str) -> dict:
    """Check the forecast against every published figure with the spec-sheet profiles and with the
    M3 Max's disk calibrated on Flash-MoE's headline figure; then moed's forecast at top-10."""
    from moed.daemon.tools.bench import git_commit, machine, versions

    shape, rows, profiles = QWEN35_397B, [], {}
    for cal in (False, True):
        for p in PUBLISHED:
            m, k = p["machine"], p["top_k"]
            slots = page_cache_slots(shape, m) if p["cache"] == "page" else p["slots"]
            hit = hit_rate(shape, k, slots, "lru")  # the page cache and Outlier's cache: LRU
            if p["cache"] == "page":
                m = Machine(**{**asdict(m), "copy_gbps": 0.0})  # reads land in the GPU's buffers
            if cal:
                if m.name not in profiles:  # the first figure of a machine calibrates it
                    profiles[m.name] = calibrated(shape, m, k, hit, p["tps"])
                m = profiles[m.name]
            r = _row("check", p["engine"], m, k, slots, "lru", hit, published_tps=p["tps"], source=p["source"])
            r["forecast_over_published"] = r["forecast_tps"] / p["tps"]
            rows.append(r)
    for m in (M3_MAX_48, M1_ULTRA_64, profiles[M3_MAX_48.name], profiles[M1_ULTRA_64.name]):
        m = Machine(**{**asdict(m), "copy_gbps": 100.0})  # moed copies shared memory into slots
        slots = moed_slots(shape, m)
        rows.append(_row("moed", "moed", m, 10, slots, "fwlru", hit_rate(shape, 10, slots, "fwlru"),
                         cache_gb=slots * shape.moe_layers * shape.expert_bytes / 1e9))
    doc = {"kind": "moed-forecast", "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
           "command": " ".join(["python -m moed.daemon.tools.forecast", *sys.argv[1:]]),
           "model": asdict(shape), "machines": [asdict(M3_MAX_48), asdict(M1_ULTRA_64)],
           "calibrated": [asdict(m) for m in profiles.values()], "os_and_apps_gb": OS_AND_APPS_GB, "rows": rows,
           "machine": machine(), "versions": versions(), **git_commit()}
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(doc, indent=2))
    return doc


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m moed.daemon.tools.forecast", description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    doc = run(ap.parse_args(argv).out)
    for r in doc["rows"]:
        pub = f", published {r['published_tps']:.2f} (x{r['forecast_over_published']:.2f})" if "published_tps" in r else ""
        print(f"{r['engine']:9s} {r['machine']:28s} {r['disk_gbps']:6.2f} GB/s top-{r['top_k']:<2d} {r['slots_per_layer']:4d} slots/layer "
              f"{r['policy']:5s} hit {r['hit_rate']:.1%}: forecast {r['forecast_tps']:.2f} tok/s{pub}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
