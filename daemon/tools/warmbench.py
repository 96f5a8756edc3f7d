"""Warm start measured: the expert cache's hit rate over the first tokens, cold versus warm.

`moed bench --workload warm-start --model M --cache-fractions F,... --max-tokens N --out FILE`. For each
cache fraction, three loads in one process, each with its own fresh runtime directory where needed:
- empty: no fill at load (`--no-warm`);
- cold: the fill a first start does, experts 0..n-1 of each layer;
- warm: the fill from the counts a previous run saved (daemon/engine/warmstart.py), where that run
  generated from another prompt (RECORD_PROMPT, `record_tokens` tokens), so the measured tokens are
  not the ones that made the counts.
Each measures greedy decoding of N tokens from MEASURE_PROMPT: the hit rate over the prompt and
the N tokens (the statistics start from zero after the fill). With `--routing TRACE` the experts
are the trace's (forced): its first half makes the counts, its second half is measured.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

RECORD_PROMPT = "import os\nimport sys\n\n\ndef main(argv):\n    "
MEASURE_PROMPT = "class Config:\n    \"\"\"Settings read from a file.\"\"\"\n\n    def __init__(self, path):\n"


@contextmanager
def runtime_dir(path: str):
    """MOED_RUNTIME_DIR set to `path` (where the counts are kept) for the block."""
    was = os.environ.get("MOED_RUNTIME_DIR")
    os.environ["MOED_RUNTIME_DIR"] = path
    try:
        yield
    finally:
        if was is None:
            del os.environ["MOED_RUNTIME_DIR"]
        else:
            os.environ["MOED_RUNTIME_DIR"] = was


def halves(trace: dict) -> tuple[dict, dict]:
    """A routing trace cut in two at its middle token: the same routing statistics, other tokens."""
    steps, n_layers = trace["steps"], len(trace["num_experts"])
    cut = n_layers * (trace["tokens"] // 2)
    preds = trace.get("predictions")
    return tuple({**trace, "steps": steps[a:b], "tokens": (b - a) // n_layers,
                  **({"predictions": preds[a:b]} if preds is not None else {})}
                 for a, b in ((0, cut), (cut, len(steps))))


def one(model: str, fraction: float, runtime: str, warm: bool, prompt: str, max_tokens: int,
        routing: dict | None = None) -> dict:
    """Load, generate greedily, close (which saves the counts); the cache's figures of the run.
    `routing`: a trace forced on the experts (engine.routing), as `moed bench --routing`."""
    from moed.daemon.engine.generate import SamplingParams, run
    from moed.daemon.engine.loader import load_paged
    from moed.daemon.engine.routing import RoutingTrace, force_routing
    from moed.ipc.config import PagingConfig

    paging = PagingConfig(cache_fraction=fraction, warm=warm, warm_start=True)
    with runtime_dir(runtime), load_paged(model, paging) as pm:
        if routing is not None:
            force_routing(pm, RoutingTrace(routing))
        res = run(pm.model, pm.tokenizer, prompt, SamplingParams(max_tokens=max_tokens, ignore_eos=True))
        st = pm.store.stats  # from zero after the fill
        return {"warm_from_counts": pm.info["warm_from_counts"], "hit_rate": st.hit_rate, "hits": st.hits,
                "misses": st.misses, "bytes_read": st.bytes_read, "prompt_tokens": res.prompt_tokens,
                "tokens": len(res.tokens), "slots_per_layer": pm.info["slots_per_layer"][0]}


def run_all(model: str, fractions: list[float], max_tokens: int, record_tokens: int, out: str,
            routing: str | None = None) -> dict:
    """`routing`: a trace file; its first half makes the counts, its second half is measured."""
    from moed.daemon.tools.bench import git_commit, machine, versions
    from moed.daemon.tools.policy import load_trace

    first, second = halves(load_trace(routing)) if routing else (None, None)
    rows = []
    for f in fractions:
        with tempfile.TemporaryDirectory(prefix="moed-warm-") as tmp:
            empty = one(model, f, f"{tmp}/empty", False, MEASURE_PROMPT, max_tokens, second)
            cold = one(model, f, f"{tmp}/cold", True, MEASURE_PROMPT, max_tokens, second)
            one(model, f, f"{tmp}/warm", True, RECORD_PROMPT, record_tokens, first)  # the previous run: saves counts
            warm = one(model, f, f"{tmp}/warm", True, MEASURE_PROMPT, max_tokens, second)
        assert warm["warm_from_counts"] and not cold["warm_from_counts"]
        for name, r in (("empty", empty), ("cold", cold), ("warm", warm)):
            rows.append({"cache_fraction": f, "start": name, **r})
            print(f"cache {f}: {name:5s} hit rate {r['hit_rate']:.1%} over {r['tokens']} tokens "
                  f"({r['bytes_read'] / 1e6:.1f} MB read)", file=sys.stderr)
    doc = {"kind": "moed-bench-warm-start", "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
           "command": " ".join(["moed", *sys.argv[1:]]),
           "config": {"model": model, "cache_fractions": fractions, "max_tokens": max_tokens,
                      "record_tokens": record_tokens, "record_prompt": RECORD_PROMPT,
                      "measure_prompt": MEASURE_PROMPT, "sampling": "greedy", "routing": routing,
                      "tokens_are_the_models": routing is None},
           "machine": machine(), "versions": versions(), **git_commit(), "runs": rows}
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(doc, indent=2))
    return doc
