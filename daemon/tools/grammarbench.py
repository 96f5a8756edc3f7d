"""The grammar's cost per generated token: moed's engine with and without a grammar, at batch 1 and 4.

Two parts, in one run (`run(model_path, out_json, repeat)`, or `python -m moed.daemon.tools.grammarbench`):

- engine: EngineCore in-process on the paged model, `batch` sequences sampled at temperature 1 (EOS
  banned by a logit bias in every configuration, so all run max_tokens), each with no grammar, a JSON
  string that never closes in time (the widest mask: nearly every token allowed) or an endless array
  of structured objects (keys, enums, numbers); decode ms per step and per token over the steps where
  every sequence is decoding. Rounds interleave the configurations (`repeat`).
- mask: the mask alone per token, following one fixed token path, for each grammar engine installed
  (llguidance; outlines-core when present) on the model's tokenizer and on a 32k byte-level BPE trained
  here on Python's own sources (the synthetic checkpoints have a 1k vocabulary, real ones 32k-150k).
"""

from __future__ import annotations

import argparse
import json
import sys
import sysconfig
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from statistics import median

OBJECT = {"type": "object", "properties": {
    "ok": {"type": "boolean"}, "n": {"type": "integer", "minimum": 0, "maximum": 999},
    "color": {"enum": ["red", "green", "blue"]}, "tag": {"type": "string", "maxLength": 12}},
    "required": ["ok", "n", "color", "tag"], "additionalProperties": False}
WORKLOADS = {
    "none": None,
    "string": {"type": "json_schema", "schema": {"type": "object", "properties": {
        "text": {"type": "string", "minLength": 100000}}, "required": ["text"]}},
    "objects": {"type": "json_schema", "schema": {"type": "array", "items": OBJECT, "minItems": 10000}},
}
BATCHES = (1, 4)


# ------------------------------------------------------------------------------------------ engine


def engine_once(core, tokenizer, workload: str, batch: int, max_tokens: int, rnd: int) -> dict:
    """One configuration: `batch` requests together; decode time over the all-decoding steps."""
    from moed.ipc.messages import Finished, Generate, Token

    spec = WORKLOADS[workload]
    # EOS banned everywhere, so every configuration decodes `batch` sequences for max_tokens steps (a
    # grammar here never completes in time; the plain runs would end at random); mlx-lm's logit-bias
    # processor is one add per step, the same in every configuration
    ban = [(t, -1e9) for t in sorted(tokenizer.eos_token_ids)]
    for i in range(batch):
        core.add(Generate(f"{workload}-{batch}-{rnd}-{i}", prompt=f"Request {i}: write the record.",
                          max_tokens=max_tokens, temperature=1.0, seed=1000 * (rnd + 1) + i, grammar=spec,
                          logit_bias=ban))
    started, t0, steps, tokens, reasons = set(), None, 0, 0, []
    while core.has_work():
        t = time.perf_counter()
        events = core.step()
        dt = time.perf_counter() - t
        if t0 is not None:
            steps += 1
            tokens += sum(isinstance(e, Token) for e in events)
            t0 += dt
        started |= {e.req_id for e in events if isinstance(e, Token)}
        reasons += [e.reason for e in events if isinstance(e, Finished)]
        if t0 is None and len(started) == batch:
            t0 = 0.0  # from the next step on, every sequence is decoding
    return {"workload": workload, "batch": batch, "round": rnd, "steps": steps, "tokens": tokens,
            "decode_s": t0 or 0.0, "ms_per_step": 1000 * (t0 or 0) / max(steps, 1),
            "ms_per_token": 1000 * (t0 or 0) / max(tokens, 1), "finish": sorted(set(reasons))}


def engine_part(model_path: str, repeat: int, max_tokens: int, cache_fraction: float, log) -> list[dict]:
    from moed.daemon.engine.core import EngineCore
    from moed.daemon.engine.loader import load_paged

    runs = []
    with load_paged(model_path, cache_fraction=cache_fraction) as pm:
        core = EngineCore(pm.model, pm.tokenizer, max_batch=max(BATCHES), max_queue=16, context=4096)
        engine_once(core, pm.tokenizer, "none", 1, 8, -1)  # warm-up
        for rnd in range(repeat):
            for batch in BATCHES:
                for workload in WORKLOADS:
                    r = engine_once(core, pm.tokenizer, workload, batch, max_tokens, rnd)
                    log(f"engine {workload:8s} batch {batch} round {rnd}: {r['ms_per_token']:.3f} ms/token "
                        f"({r['ms_per_step']:.3f} ms/step, {r['tokens']} tokens, {r['finish']})")
                    runs.append(r)
    return runs


def engine_summary(runs: list[dict]) -> list[dict]:
    """Per (batch, workload): median ms/step and ms/token, and the grammar's cost over no grammar."""
    out = []
    for batch in BATCHES:
        base = median(r["ms_per_step"] for r in runs if r["batch"] == batch and r["workload"] == "none")
        for workload in WORKLOADS:
            rs = [r for r in runs if r["batch"] == batch and r["workload"] == workload]
            step = median(r["ms_per_step"] for r in rs)
            out.append({"batch": batch, "workload": workload, "rounds": len(rs), "ms_per_step": step,
                        "ms_per_token": median(r["ms_per_token"] for r in rs),
                        "grammar_ms_per_token": (step - base) / batch, "step_ratio_vs_none": step / base})
    return out


# ------------------------------------------------------------------------------------------ mask alone


def trained_tokenizer(vocab_size: int, folder: Path):
    """A byte-level BPE of `vocab_size` trained on the standard library's sources (offline)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    files = sorted(str(p) for p in Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train(files, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|im_end|>"],
                                         initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tok.save(str(folder / "tokenizer.json"))
    return PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"), eos_token="<|im_end|>")


def token_path(hf, schema: dict, n: int, seed: int = 0) -> list[int]:
    """A fixed path of n tokens through the schema's grammar (random allowed tokens, never EOS)."""
    import llguidance
    import llguidance.hf
    import numpy as np

    rng = np.random.default_rng(seed)
    llt = llguidance.hf.from_tokenizer(hf, eos_token=hf.eos_token_id)
    m = llguidance.LLMatcher(llt, llguidance.LLMatcher.grammar_from_json_schema(schema, overrides={
        "whitespace_flexible": False}))
    words = np.zeros((llt.vocab_size + 31) // 32, dtype=np.int32)
    path = []
    for _ in range(n):
        m.unsafe_compute_mask_ptr(words.ctypes.data, words.nbytes)
        allowed = np.nonzero(np.unpackbits(words.view(np.uint8), bitorder="little")[:llt.vocab_size])[0]
        allowed = allowed[~np.isin(allowed, llt.eos_tokens)]
        if not len(allowed):
            break
        t = int(rng.choice(allowed))
        assert m.consume_token(t)
        path.append(t)
    return path


def mask_llguidance(hf, schema: dict, path: list[int]) -> dict:
    import llguidance
    import llguidance.hf
    import numpy as np

    t = time.perf_counter()
    llt = llguidance.hf.from_tokenizer(hf, eos_token=hf.eos_token_id)
    t_vocab = time.perf_counter() - t
    t = time.perf_counter()
    m = llguidance.LLMatcher(llt, llguidance.LLMatcher.grammar_from_json_schema(schema, overrides={
        "whitespace_flexible": False}))
    t_compile = time.perf_counter() - t
    words = np.zeros((llt.vocab_size + 31) // 32, dtype=np.int32)
    t = time.perf_counter()
    for tok in path:
        m.unsafe_compute_mask_ptr(words.ctypes.data, words.nbytes)
        m.consume_token(tok)
    per = (time.perf_counter() - t) / len(path)
    return {"engine": "llguidance", "vocab_s": t_vocab, "compile_s": t_compile, "ms_per_token": 1000 * per}


def byte_level_vocab(hf) -> dict[bytes, list[int]]:
    """token bytes -> ids, undoing the GPT-2 byte-to-unicode map of a byte-level BPE."""
    bs = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    cs = bs[:]
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + len(cs) - 188)
    dec = {chr(c): b for b, c in zip(bs, cs)}
    specials = set(hf.all_special_ids)
    out: dict[bytes, list[int]] = {}
    for s, i in hf.get_vocab().items():
        if i not in specials and all(ch in dec for ch in s):
            out.setdefault(bytes(dec[ch] for ch in s), []).append(i)
    return out


def unbounded(schema):
    """The schema without its minLength/minItems: the path stays inside it, and a DFA engine would unroll
    a bound of 10^4-10^5 repetitions (minutes of compilation)."""
    if isinstance(schema, dict):
        return {k: unbounded(v) for k, v in schema.items() if k not in ("minLength", "minItems")}
    if isinstance(schema, list):
        return [unbounded(v) for v in schema]
    return schema


def mask_outlines(hf, schema: dict, path: list[int]) -> dict | None:
    try:
        from outlines_core import Guide, Index, Vocabulary
        from outlines_core.json_schema import build_regex_from_schema
    except ImportError:
        return None
    import numpy as np

    t = time.perf_counter()
    vocab = Vocabulary(hf.eos_token_id, byte_level_vocab(hf))
    t_vocab = time.perf_counter() - t
    t = time.perf_counter()
    index = Index(build_regex_from_schema(json.dumps(unbounded(schema)), whitespace_pattern=""), vocab)
    t_compile = time.perf_counter() - t
    guide = Guide(index)
    words = np.zeros((len(hf) + 31) // 32, dtype=np.int32)
    t, n = time.perf_counter(), 0
    for tok in path:
        guide.write_mask_into(words.ctypes.data, words.size, 4)
        if tok not in guide.get_tokens():  # outlines' JSON regex differs (e.g. key order): stop there
            break
        guide.advance(tok, return_tokens=False)
        n += 1
    per = (time.perf_counter() - t) / max(n, 1)
    return {"engine": "outlines-core", "vocab_s": t_vocab, "compile_s": t_compile, "ms_per_token": 1000 * per,
            "tokens_followed": n}


def mask_part(model_path: str, n_tokens: int, log) -> list[dict]:
    from mlx_lm.utils import load_tokenizer

    from moed.daemon.engine.checkpoint import resolve_model

    out = []
    with tempfile.TemporaryDirectory() as tmp:
        tokenizers = {"model": load_tokenizer(resolve_model(model_path))._tokenizer,
                      "bpe-32k": trained_tokenizer(32000, Path(tmp))}
        for tname, hf in tokenizers.items():
            for wname in ("string", "objects"):
                schema = WORKLOADS[wname]["schema"]
                path = token_path(hf, schema, n_tokens)
                for fn in (mask_llguidance, mask_outlines):
                    r = fn(hf, schema, path)
                    if r is None:
                        continue
                    r.update(tokenizer=tname, vocab_size=len(hf), workload=wname, path_tokens=len(path))
                    log(f"mask {r['engine']:13s} {tname:7s} (vocab {len(hf)}) {wname:8s}: "
                        f"{r['ms_per_token']:.4f} ms/token, compile {r['compile_s'] * 1000:.1f} ms")
                    out.append(r)
    return out


# ------------------------------------------------------------------------------------------ the run


def run(model_path: str, out_json: str, repeat: int = 3, max_tokens: int = 48, cache_fraction: float = 1.0,
        mask_tokens: int = 200) -> dict:
    """Measure both parts and write the provenance file; returns its document."""
    from importlib.metadata import PackageNotFoundError, version

    from moed.daemon.engine.checkpoint import resolve_model
    from moed.daemon.tools.bench import git_commit, machine

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    model = str(resolve_model(model_path))
    runs = engine_part(model, repeat, max_tokens, cache_fraction, log)
    masks = mask_part(model, mask_tokens, log)
    vers = {}
    for p in ("mlx", "mlx-lm", "llguidance", "outlines-core", "xgrammar"):
        try:
            vers[p] = version(p)
        except PackageNotFoundError:
            vers[p] = None
    doc = {"kind": "moed-grammar-bench", "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
           "command": " ".join(sys.argv),
           "config": {"model": model, "repeat": repeat, "max_tokens": max_tokens, "cache_fraction": cache_fraction,
                      "batches": list(BATCHES), "workloads": WORKLOADS, "mask_tokens": mask_tokens,
                      "temperature": 1.0},
           "machine": machine(), "versions": vers, **git_commit(),
           "summary": engine_summary(runs), "engine_runs": runs, "mask": masks}
    Path(out_json).parent.mkdir(parents=True, exist_ok=True)
    Path(out_json).write_text(json.dumps(doc, indent=2))
    for s in doc["summary"]:
        log(f"batch {s['batch']} {s['workload']:8s}: {s['ms_per_step']:.2f} ms/step, "
            f"grammar {s['grammar_ms_per_token']:+.3f} ms/token ({s['step_ratio_vs_none']:.3f}x)")
    return doc


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="moed bench --workload grammar", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="models/med-qwen3_moe")
    p.add_argument("--out", default="bench/results/grammar.json")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--cache-fraction", type=float, default=1.0)
    a = p.parse_args(argv)
    run(a.model, a.out, a.repeat, a.max_tokens, a.cache_fraction)
    return 0


if __name__ == "__main__":
    sys.exit(main())
