"""Routing traces that look like a real model's (`moed trace synth`), calibrated to published figures.

Random-weight checkpoints route with no reuse (per-layer LRU hits about the cache fraction) and
barely change the hidden state between layers (lookahead recalls ~93%). Real models differ; this
generator reproduces, for any experts/top-k/layers shape, what was measured on real ones
(/work/shared/ANCHORS.md, "Real routing, measured by others"):

| statistic | target | source |
|---|---|---|
| per-layer LRU hit at 16/32/64/128 cached of 512, top-4 | 49/59/68/71% | Flash-MoE's Qwen3.5-397B traces |
| experts shared by consecutive tokens in a layer | 8-34%, 29.5% mean | Flash-MoE (CUDA paper) |
| accesses served by the top 10% of experts (512, top-10) | 70.9% | slotstream, 220 decode steps |
| experts touched at all in 220 steps (512, top-10) | 40.5% | slotstream |
| LRU / Belady at 30 slots per layer (512, top-10) | 0.568 / (ceiling) | slotstream |
| next layer's router on this layer's input: exact top-k recall | 59.5% (settable, `recall`) | slotstream |

The model, per MoE layer (layers independent; each its own random permutation of experts):

- **Popularity**: expert of rank r (in the layer's permutation) has weight (r + 1) ** -`skew`; a
  context (prompt, topic) only uses a `active` share of the experts at all (the rest weigh 0):
  slotstream touched 40.5% of experts in 220 steps, so most experts sit out a given request.
- **Stickiness**: each of a token's k choices repeats one of the previous token's experts with
  probability `repeat` (consecutive-token overlap; it also makes the LRU curve steep at small sizes),
  else it is drawn from the popularity law (the hot set: the curve's long tail).
- **Drift**: every token, each active expert is swapped for an inactive one with probability
  `drift` (the context moves on; two thirds of slotstream's misses re-fetch an evicted expert).
- **Cold draws**: an access is a one-off draw from all experts with probability `cold` (0 fits best).
- **Predictions** (lookahead): for each visit, a guess of the next layer's k experts at the same
  token that contains each true expert with probability `recall`, the rest drawn from the next
  layer's popularity law (plausible wrong guesses).

`calibrate()` fits `skew`, `repeat`, `active`, `drift` and `cold` to the targets above by a small
grid search (deterministic); `DEFAULTS` holds its result (bench/results/synth-calibration.json), and
`check()` reports each statistic against its target (tests/tools/test_tracesynth.py asserts the LRU
curve within 5 points). One assumption: Flash-MoE does not publish its traces' length, and the LRU
curve depends on it (compulsory misses). The two sources agree with one set of knobs when that
curve is read over ~100 decode steps (`FLASH_MOE_TOKENS`): over 256 steps the same knobs give
51/62/73/81%, because a longer trace hits more at large caches.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from moed.daemon.tools.policy import LRU, TRACE_KIND, Belady, Future

# Published targets (ANCHORS.md); shapes are (experts, top_k).
FLASH_MOE_SHAPE = (512, 4)
FLASH_MOE_LRU = {16: 0.49, 32: 0.59, 64: 0.68, 128: 0.71}
FLASH_MOE_OVERLAP = 0.295  # mean; range 0.08-0.34
FLASH_MOE_TOKENS = 100  # the length of Flash-MoE's traces is not published: fitted (see calibrate)
SLOTSTREAM_SHAPE = (512, 10)
SLOTSTREAM_STEPS = 220
SLOTSTREAM_TOP10_SHARE = 0.709
SLOTSTREAM_TOUCHED = 0.405
SLOTSTREAM_LRU_30 = 0.568
SLOTSTREAM_BELADY = 0.906
SLOTSTREAM_RECALL = 0.595


@dataclass(frozen=True)
class SynthParams:
    """The generator's knobs (see the module docstring); `DEFAULTS` is the calibrated set."""

    skew: float = 1.0
    repeat: float = 0.25
    active: float = 0.45
    drift: float = 0.002
    cold: float = 0.0
    recall: float = SLOTSTREAM_RECALL


DEFAULTS = SynthParams()


def _popularity(n: int, skew: float) -> np.ndarray:
    w = (np.arange(n, dtype=np.float64) + 1.0) ** -skew
    return w


def _layer(rng: np.random.Generator, n: int, k: int, tokens: int, p: SynthParams) -> np.ndarray:
    """(tokens, k) distinct experts of one layer."""
    perm = rng.permutation(n)
    base = _popularity(n, p.skew)
    n_active = max(k * 2, int(round(p.active * n)))
    active = np.zeros(n, dtype=bool)
    active[:n_active] = True  # by rank: the popular experts are the active ones to start with
    out = np.empty((tokens, k), dtype=np.int64)
    prev: np.ndarray | None = None
    for t in range(tokens):
        if p.drift > 0 and t:
            flip = np.flatnonzero(active & (rng.random(n) < p.drift))
            if len(flip):
                idle = np.flatnonzero(~active)
                if len(idle):
                    new = rng.choice(idle, size=min(len(flip), len(idle)), replace=False)
                    active[flip[: len(new)]] = False
                    active[new] = True
        w = np.where(active, base, 0.0)
        chosen: list[int] = []
        if prev is not None and p.repeat > 0:
            n_rep = int((rng.random(k) < p.repeat).sum())
            if n_rep:
                chosen = list(rng.choice(prev, size=min(n_rep, len(prev)), replace=False))
        while len(chosen) < k and p.cold > 0 and rng.random() < p.cold:  # a one-off: any expert at all
            e = int(rng.integers(n))
            if e not in chosen:
                chosen.append(e)
        if len(chosen) < k:
            wv = w.copy()
            wv[chosen] = 0.0
            if (wv > 0).sum() < k - len(chosen):
                wv = np.where(wv > 0, wv, 1e-12)
                wv[chosen] = 0.0
            extra = rng.choice(n, size=k - len(chosen), replace=False, p=wv / wv.sum())
            chosen.extend(extra.tolist())
        ranks = np.asarray(chosen, dtype=np.int64)
        prev = ranks
        out[t] = perm[ranks]
    return out


def _predict(rng: np.random.Generator, true_next: np.ndarray, n: int, skew: float, recall: float,
             perm_weights: np.ndarray) -> list[list[int]]:
    """Per token, a k-guess of the next layer's experts holding each true one with prob `recall`."""
    tokens, k = true_next.shape
    out = []
    for t in range(tokens):
        keep = true_next[t][rng.random(k) < recall].tolist()
        w = perm_weights.copy()
        w[true_next[t]] = 0.0
        fill = rng.choice(n, size=k - len(keep), replace=False, p=w / w.sum()) if len(keep) < k else []
        out.append(sorted(keep + list(map(int, fill))))
    return out


def synth(num_experts: int, top_k: int, layers: int, tokens: int = 256, params: SynthParams = DEFAULTS,
          seed: int = 0, predictions: bool = True) -> dict:
    """A moed-trace (tools/policy.py's format) of `tokens` decode steps over `layers` MoE layers.

    Steps are in the engine's call order (token by token, layer by layer); with `predictions`, the
    trace carries `predictions`: per step, the guessed experts of the next MoE layer (null for the last).
    """
    if not 0 < top_k <= num_experts:
        raise ValueError(f"top_k {top_k} must be in [1, {num_experts}]")
    rng = np.random.default_rng(seed)
    routes = [_layer(rng, num_experts, top_k, tokens, params) for _ in range(layers)]
    preds = None
    if predictions:
        preds = []
        for layer in range(layers - 1):
            # the wrong guesses follow the next layer's own popularity (its counts in this trace)
            counts = np.bincount(routes[layer + 1].reshape(-1), minlength=num_experts).astype(np.float64) + 0.1
            preds.append(_predict(rng, routes[layer + 1], num_experts, params.skew, params.recall, counts))
    steps, step_preds = [], []
    for t in range(tokens):
        for layer in range(layers):
            steps.append([layer, sorted(routes[layer][t].tolist())])
            step_preds.append(preds[layer][t] if preds is not None and layer + 1 < layers else None)
    trace = {"kind": TRACE_KIND, "model": f"synthetic {num_experts} experts top-{top_k}", "source": "moed trace synth",
             "top_k": top_k, "num_experts": [num_experts] * layers, "tokens": tokens,
             "synth": {**asdict(params), "seed": seed}, "steps": steps}
    if predictions:
        trace["predictions"] = step_preds
    return trace


# ---------------------------------------------------------------------------- statistics


def per_layer(trace: dict) -> list[list[tuple[int, ...]]]:
    """Each layer's visits (sorted expert tuples), in order."""
    out: list[list[tuple[int, ...]]] = [[] for _ in trace["num_experts"]]
    for layer, experts in trace["steps"]:
        out[layer].append(tuple(experts))
    return out


def lru_hit(visits: list[list[tuple]], slots: int) -> float:
    hits = total = 0
    for vs in visits:
        c = LRU(slots)
        for t, v in enumerate(vs):
            hits += c.visit(v, t)
            total += len(v)
    return hits / total if total else 0.0


def belady_hit(visits: list[list[tuple]], slots: int) -> float:
    hits = total = 0
    for vs in visits:
        c = Belady(slots, Future(vs))
        for t, v in enumerate(vs):
            hits += c.visit(v, t)
            total += len(v)
    return hits / total if total else 0.0


def overlap(visits: list[list[tuple]]) -> dict:
    """Share of a token's experts the previous token of the same layer also used: mean, per-layer range."""
    per = []
    for vs in visits:
        shared = [len(set(a) & set(b)) / len(b) for a, b in zip(vs, vs[1:])]
        if shared:
            per.append(float(np.mean(shared)))
    return {"mean": float(np.mean(per)) if per else 0.0, "min_layer": min(per, default=0.0),
            "max_layer": max(per, default=0.0)}


def skew(visits: list[list[tuple]], num_experts: list[int], top: float = 0.1) -> dict:
    """Share of accesses served by the top `top` of (layer, expert) pairs; share of pairs touched."""
    counts = np.concatenate([np.bincount(np.concatenate([np.asarray(v) for v in vs]), minlength=n)
                             for vs, n in zip(visits, num_experts) if vs])
    order = np.sort(counts)[::-1]
    n_top = max(1, int(round(top * len(counts))))
    return {"top_share": float(order[:n_top].sum() / counts.sum()), "touched": float((counts > 0).mean())}


def prediction_recall(trace: dict) -> float | None:
    """Mean share of each visit's experts the previous layer's prediction named."""
    preds = trace.get("predictions")
    if preds is None:
        return None
    last: dict[int, list] = {}
    got = tot = 0
    for (layer, experts), pr in zip(trace["steps"], preds):
        guess = last.pop(layer, None)
        if guess is not None:
            got += len(set(guess) & set(experts))
            tot += len(experts)
        if pr is not None:
            last[layer + 1] = pr
    return got / tot if tot else None


def stats(trace: dict, sizes=(16, 32, 64, 128)) -> dict:
    """LRU and Belady per-layer hit rates at `sizes` slots per layer, overlap, skew, recall."""
    v = per_layer(trace)
    n = trace["num_experts"]
    sizes = [s for s in sizes if s <= min(n)]
    return {"lru": {s: lru_hit(v, s) for s in sizes}, "belady": {s: belady_hit(v, s) for s in sizes},
            "overlap": overlap(v), "skew": skew(v, n), "recall": prediction_recall(trace)}


def check(params: SynthParams = DEFAULTS, layers: int = 8, seed: int = 0, lru_tokens: int | None = None) -> dict:
    """Every statistic against its target, at the targets' own shapes (Flash-MoE's LRU curve over
    `lru_tokens` decode steps, default FLASH_MOE_TOKENS)."""
    a = synth(*FLASH_MOE_SHAPE, layers, tokens=lru_tokens or FLASH_MOE_TOKENS, params=params, seed=seed)
    b = synth(*SLOTSTREAM_SHAPE, layers, tokens=SLOTSTREAM_STEPS, params=params, seed=seed + 1)
    sa, sb = stats(a), stats(b, sizes=(30, 89))
    return {
        "params": asdict(params), "layers": layers, "seed": seed,
        "flash_moe_512_top4": {"lru": sa["lru"], "lru_target": FLASH_MOE_LRU, "belady": sa["belady"],
                               "overlap": sa["overlap"], "overlap_target": FLASH_MOE_OVERLAP,
                               "recall": sa["recall"]},
        "slotstream_512_top10": {"top10_share": sb["skew"]["top_share"], "top10_share_target": SLOTSTREAM_TOP10_SHARE,
                                 "touched": sb["skew"]["touched"], "touched_target": SLOTSTREAM_TOUCHED,
                                 "lru_30": sb["lru"][30], "lru_30_target": SLOTSTREAM_LRU_30,
                                 "belady_30": sb["belady"][30], "lru_89": sb["lru"][89], "lru_89_target": 0.705,
                                 "belady_89": sb["belady"][89], "belady_89_target": 0.848,
                                 "recall": sb["recall"], "recall_target": params.recall},
    }


def _loss(c: dict) -> float:
    a, b = c["flash_moe_512_top4"], c["slotstream_512_top10"]
    err = [a["lru"][s] - t for s, t in FLASH_MOE_LRU.items()]
    err += [0.5 * (a["overlap"]["mean"] - FLASH_MOE_OVERLAP)]
    err += [0.5 * (b["top10_share"] - SLOTSTREAM_TOP10_SHARE), 0.5 * (b["touched"] - SLOTSTREAM_TOUCHED),
            0.5 * (b["lru_30"] - SLOTSTREAM_LRU_30)]
    return float(np.sqrt(np.mean(np.square(err))))


def calibrate(grid: dict | None = None, layers: int = 4,
              lru_tokens: int | None = None) -> tuple[SynthParams, float, list]:
    """Grid search of the knobs against the targets; returns (best params, its loss, every row)."""
    import itertools

    grid = grid or {"skew": [0.8, 1.0, 1.2], "repeat": [0.2, 0.25], "active": [0.3, 0.45], "drift": [0.002, 0.005],
                    "cold": [0.0, 0.05, 0.1]}
    rows = []
    best, best_loss = None, float("inf")
    names = list(grid)
    for values in itertools.product(*(grid[k] for k in names)):
        p = replace(DEFAULTS, **dict(zip(names, values)))
        loss = _loss(check(p, layers=layers, lru_tokens=lru_tokens))
        rows.append({"params": asdict(p), "loss": loss})
        if loss < best_loss:
            best, best_loss = p, loss
    return best, best_loss, rows


# ---------------------------------------------------------------------------- command line


def shape_of_model(model: str) -> tuple[int, int, int]:
    """(experts, top_k, MoE layers) from a checkpoint's config.json."""
    from moed.daemon.engine.checkpoint import resolve_model

    cfg = json.loads((Path(resolve_model(model)) / "config.json").read_text())
    cfg = cfg.get("text_config", cfg)
    n = cfg.get("num_experts") or cfg.get("num_local_experts") or cfg.get("n_routed_experts")
    k = cfg.get("num_experts_per_tok")
    layers = cfg["num_hidden_layers"]
    dense = set(cfg.get("mlp_only_layers") or [])
    first_dense = int(cfg.get("first_k_dense_replace") or 0)
    step = int(cfg.get("decoder_sparse_step") or 1)
    moe = [i for i in range(layers) if i not in dense and i >= first_dense and (i + 1) % step == 0]
    return int(n), int(k), len(moe)


def main(a: argparse.Namespace) -> int:
    """`moed trace synth`: write a calibrated trace for a shape (or a model's shape)."""
    if a.model:
        n, k, layers = shape_of_model(a.model)
    else:
        n, k, layers = a.experts, a.synth_top_k, a.layers
    params = replace(DEFAULTS, recall=a.recall) if a.recall is not None else DEFAULTS
    trace = synth(n, k, layers, tokens=a.tokens, params=params, seed=a.seed)
    if a.model:
        trace["model"] = f"synthetic routing for {a.model}"
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(trace))
    s = stats(trace, sizes=sorted({max(k, round(f * n)) for f in (0.03125, 0.0625, 0.125, 0.25)}))
    lru = ", ".join(f"{sz}: {h:.1%}" for sz, h in s["lru"].items())
    recall = f"; prediction recall {s['recall']:.1%}" if s["recall"] is not None else ""
    print(f"wrote {a.out}: {n} experts top-{k}, {layers} MoE layers, {a.tokens} tokens; per-layer LRU at "
          f"{lru}; consecutive-token overlap {s['overlap']['mean']:.1%}; top 10% of experts serve "
          f"{s['skew']['top_share']:.1%} of accesses{recall}")
    return 0


def report(traces: dict[str, str], recall_model: str | None = None) -> dict:
    """Routing statistics of recorded traces next to the published targets and the generator's.

    Args:
        traces: name -> moed-trace file (e.g. the trained model's, a random-weight model's).
        recall_model: a checkpoint whose lookahead recall (tools/recall.py) to measure.
    """
    from moed.daemon.tools.bench import git_commit, machine
    from moed.daemon.tools.policy import load_trace

    doc: dict = {"kind": "moed-routing-stats", "published": {
        "flash_moe_qwen3.5_397b_512_top4": {"lru_per_layer": FLASH_MOE_LRU, "overlap_mean": FLASH_MOE_OVERLAP,
                                            "overlap_range": [0.08, 0.34]},
        "slotstream_512_top10_220_steps": {"top10_share": SLOTSTREAM_TOP10_SHARE, "touched": SLOTSTREAM_TOUCHED,
                                           "lru_30": SLOTSTREAM_LRU_30, "belady": SLOTSTREAM_BELADY,
                                           "recall_next_layer": SLOTSTREAM_RECALL}},
        "synthetic": check(layers=8), "recorded": {}, "machine": machine(), **git_commit()}
    for name, path in traces.items():
        t = load_trace(path)
        n = min(t["num_experts"])
        sizes = sorted({max(t["top_k"], round(f * n)) for f in (0.125, 0.25, 0.5)})
        doc["recorded"][name] = {"file": str(path), "model": t.get("model"), "experts": n, "top_k": t["top_k"],
                                 "moe_layers": len(t["num_experts"]), "visits": len(t["steps"]),
                                 **stats(t, sizes=sizes)}
    if recall_model:
        from moed.daemon.engine.generate import SamplingParams
        from moed.daemon.tools import recall
        from moed.daemon.tools.bench import PROMPT_TEXT

        doc["lookahead_recall"] = recall.measure(recall_model, PROMPT_TEXT, SamplingParams(max_tokens=64, temp=1.0))
    return doc


def _cli(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m moed.daemon.tools.tracesynth")
    ap.add_argument("what", choices=["check", "calibrate", "report"])
    ap.add_argument("--out")
    ap.add_argument("--trace", action="append", default=[], help="report: NAME=FILE, repeatable")
    ap.add_argument("--recall-model", help="report: measure this checkpoint's lookahead recall")
    a = ap.parse_args(argv)
    if a.what == "report":
        doc = report(dict(t.split("=", 1) for t in a.trace), a.recall_model)
    elif a.what == "check":
        doc = check()
    else:
        best, loss, rows = calibrate()
        doc = {"best": asdict(best), "loss": loss, "check": check(best), "rows": rows}
    text = json.dumps(doc, indent=1, default=str)
    if a.out:
        Path(a.out).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(_cli())
