"""Train a tiny qwen3_moe on real offline text (``moed train``), saved in mlx-lm's exact format.

The corpus is Python's own standard library (``/usr/lib/python3.*``: code, docstrings and comments,
English prose among them): real text every Debian/Ubuntu machine ships, no download. Files are split
by a hash of their path into train and held-out (``--holdout`` of them), so held-out perplexity is
measured on files the model never saw.

The tokenizer is a byte-level BPE trained on the training split with ``tokenizers``; the special
tokens and ChatML template are the synthetic tokenizer's (daemon/tools/synthetic_tokenizer.py), so
every moed verb treats the trained model like the synthetic ones.

The model is mlx-lm's own ``qwen3_moe`` ``Model``, trained in float32 with AdamW on random windows,
plus a Switch-Transformer load-balancing loss (``--balance``; Qwen3 trains with one too) so the router
spreads tokens over experts like a real model instead of collapsing onto a few. It is then quantized
with mlx-lm's ``quantize_model`` (4-bit, group 64; the model's own predicate keeps routers at 8 bits)
and written with ``save_model``/``save_config``: ``mlx_lm.load`` reads it unchanged.
"""

import contextlib
import hashlib
import io
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import List, Tuple

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx_lm.models import qwen3_moe
from mlx_lm.utils import quantize_model, save_config, save_model

from moed.daemon.tools import synthetic_tokenizer
from moed.daemon.tools.synthetic import _qwen3_moe_config

SKIP_DIRS = ("test", "tests", "idlelib", "lib2to3", "site-packages", "dist-packages", "__pycache__", "turtledemo")


@dataclass
class TrainConfig:
    """The shape and the schedule; every field lands in the provenance file."""

    hidden: int = 128
    layers: int = 4
    heads: int = 4
    kv_heads: int = 2
    head_dim: int = 32
    experts: int = 64
    top_k: int = 8
    moe_inter: int = 64
    vocab: int = 2048
    seq_len: int = 128
    batch: int = 16
    steps: int = 300
    lr: float = 3e-3
    warmup: int = 20
    weight_decay: float = 0.01
    balance: float = 0.01
    minutes: float = 20.0
    holdout: float = 0.05
    corpus_bytes: int = 12_000_000
    seed: int = 0


# ---------------------------------------------------------------------------
# Corpus
# ---------------------------------------------------------------------------


def stdlib_root() -> Path:
    """The running interpreter's standard library (the venv's base), e.g. /usr/lib/python3.11."""
    return Path(os.__file__).resolve().parent


def corpus_files(root: Path) -> List[Path]:
    """Every .py file of the standard library outside tests and bundled packages, sorted."""
    files = []
    for p in sorted(root.rglob("*.py")):
        if any(part in SKIP_DIRS for part in p.relative_to(root).parts[:-1]):
            continue
        files.append(p)
    return files


def is_heldout(path: Path, root: Path, fraction: float) -> bool:
    """A stable split: a file is held out when the hash of its relative path falls under ``fraction``."""
    h = hashlib.sha256(str(path.relative_to(root)).encode()).digest()
    return int.from_bytes(h[:4], "little") / 2**32 < fraction


def prepare_corpus(root: Path, fraction: float, max_bytes: int) -> Tuple[List[str], List[str]]:
    """Read the corpus and split it by file into (train texts, held-out texts)."""
    train, held, total = [], [], 0
    for p in corpus_files(root):
        try:
            text = p.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        (held if is_heldout(p, root, fraction) else train).append(text)
        total += len(text)
        if total >= max_bytes:
            break
    return train, held


# ---------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------


def train_tokenizer(out_dir: Path, texts: List[str], vocab_size: int):
    """Byte-level BPE on ``texts``, saved with the synthetic tokenizer's special tokens and configs.

    ``synthetic_tokenizer.save_tokenizer`` writes tokenizer_config.json, special_tokens_map.json and
    generation_config.json; the special tokens come first in both vocabularies (ids 0, 1, 2), so
    replacing its tokenizer.json by the one trained here keeps those files true.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    ids = synthetic_tokenizer.save_tokenizer(out_dir, vocab_size)  # its configs; its tokenizer.json is replaced
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(synthetic_tokenizer.SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    for t in synthetic_tokenizer.SPECIAL_TOKENS:
        assert tok.token_to_id(t) == ids[{"<|im_end|>": "eos_token_id", "<|endoftext|>": "pad_token_id"}.get(
            t, "im_start_id")], t
    markers = getattr(synthetic_tokenizer, "MARKER_TOKENS", ())  # the template's added tokens, if any
    tok.add_tokens([AddedToken(t, normalized=False, special=False) for t in markers])
    tok.save(str(out_dir / "tokenizer.json"))
    # the added-token table must name this vocabulary's ids
    cfg_path = out_dir / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["added_tokens_decoder"] = {
        str(i): {"content": t.content, "lstrip": t.lstrip, "normalized": t.normalized, "rstrip": t.rstrip,
                 "single_word": t.single_word, "special": t.special}
        for i, t in sorted(tok.get_added_tokens_decoder().items())}
    cfg_path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False))
    return tok, ids


def encode(tok, texts: List[str], eos: int) -> np.ndarray:
    """All texts as one token stream, each file followed by the end-of-text token."""
    out = []
    for enc in tok.encode_batch(texts):
        out.extend(enc.ids)
        out.append(eos)
    return np.asarray(out, dtype=np.int32)


# ---------------------------------------------------------------------------
# Model and training
# ---------------------------------------------------------------------------


def model_config(cfg: TrainConfig, vocab_size: int) -> dict:
    """A qwen3_moe config.json (the synthetic builder's layout) for this shape."""
    return _qwen3_moe_config(
        {
            "hidden": cfg.hidden,
            "layers": cfg.layers,
            "dense_inter": cfg.hidden * 2,
            "heads": cfg.heads,
            "kv_heads": cfg.kv_heads,
            "head_dim": cfg.head_dim,
            "experts": cfg.experts,
            "top_k": cfg.top_k,
            "moe_inter": cfg.moe_inter,
            "vocab": vocab_size,
        }
    )


class _TapGate(nn.Linear):
    """The router's Linear, recording its logits so the loss can add the load-balancing term."""

    taps: List[mx.array] = []

    def __call__(self, x):
        y = super().__call__(x)
        _TapGate.taps.append(y)
        return y


def tap_routers(model: nn.Module):
    """Swap every MoE block's gate for a recording one (same parameter names)."""
    for layer in model.model.layers:
        g = layer.mlp.gate
        tap = _TapGate(g.weight.shape[1], g.weight.shape[0], bias=False)
        tap.weight = g.weight
        layer.mlp.gate = tap


def untap_routers(model: nn.Module):
    for layer in model.model.layers:
        g = layer.mlp.gate
        plain = nn.Linear(g.weight.shape[1], g.weight.shape[0], bias=False)
        plain.weight = g.weight
        layer.mlp.gate = plain


def balance_loss(logits: mx.array, top_k: int) -> mx.array:
    """Switch Transformer's auxiliary loss: E x sum_i(fraction routed to i x mean probability of i)."""
    n = logits.shape[-1]
    probs = mx.softmax(logits.reshape(-1, n), axis=-1)
    inds = mx.argpartition(probs, kth=-top_k, axis=-1)[:, -top_k:]
    counts = mx.zeros((n,)).at[inds.reshape(-1)].add(1.0)
    frac = mx.stop_gradient(counts / inds.size)
    return n * mx.sum(frac * probs.mean(axis=0))


def loss_fn(model, x, y, top_k: int, balance: float):
    _TapGate.taps = []
    logits = model(x)
    ce = nn.losses.cross_entropy(logits, y, reduction="mean")
    aux = sum(balance_loss(t, top_k) for t in _TapGate.taps) / max(1, len(_TapGate.taps))
    _TapGate.taps = []
    return ce + balance * aux, ce


def batches(tokens: np.ndarray, seq_len: int, batch: int, rng: np.random.Generator):
    """Endless random windows of ``seq_len + 1`` tokens."""
    hi = len(tokens) - seq_len - 1
    while True:
        starts = rng.integers(0, hi, size=batch)
        w = np.stack([tokens[s : s + seq_len + 1] for s in starts])
        yield mx.array(w[:, :-1]), mx.array(w[:, 1:])


def evaluate(model, tokens: np.ndarray, seq_len: int, max_windows: int = 64) -> float:
    """Mean cross entropy (nats/token) over consecutive held-out windows."""
    n = min(max_windows, (len(tokens) - 1) // seq_len)
    total = 0.0
    for i in range(0, n, 8):
        w = np.stack([tokens[j * seq_len : j * seq_len + seq_len + 1] for j in range(i, min(n, i + 8))])
        logits = model(mx.array(w[:, :-1]))
        ce = nn.losses.cross_entropy(logits, mx.array(w[:, 1:]), reduction="sum")
        total += ce.item()
    return total / (n * seq_len)


def lr_at(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


def train(cfg: TrainConfig, train_tokens: np.ndarray, held_tokens: np.ndarray, vocab_size: int, log=print):
    """Train the model; returns (model, config dict, history)."""
    mx.random.seed(cfg.seed)
    config = model_config(cfg, vocab_size)
    model = qwen3_moe.Model(qwen3_moe.ModelArgs.from_dict(config))
    tap_routers(model)
    opt = optim.AdamW(learning_rate=cfg.lr, weight_decay=cfg.weight_decay)
    step_fn = nn.value_and_grad(model, lambda m, x, y: loss_fn(m, x, y, cfg.top_k, cfg.balance))
    rng = np.random.default_rng(cfg.seed)
    data = batches(train_tokens, cfg.seq_len, cfg.batch, rng)
    history, t0 = [], time.monotonic()
    for step in range(cfg.steps):
        opt.learning_rate = lr_at(step, cfg)
        x, y = next(data)
        (loss, ce), grads = step_fn(model, x, y)
        grads, _ = optim.clip_grad_norm(grads, 1.0)
        opt.update(model, grads)
        mx.eval(model.parameters(), opt.state, loss, ce)
        elapsed = time.monotonic() - t0
        if step % 10 == 0 or step == cfg.steps - 1:
            rec = {"step": step, "loss": round(loss.item(), 4), "ce": round(ce.item(), 4), "s": round(elapsed, 1)}
            if step % 100 == 0 or step == cfg.steps - 1:
                rec["held_ce"] = round(evaluate(model, held_tokens, cfg.seq_len, 16), 4)
            history.append(rec)
            log(json.dumps(rec))
        if elapsed > cfg.minutes * 60:
            log(f"time budget reached at step {step}")
            break
    untap_routers(model)
    return model, config, history


def save(model, config: dict, out_dir: Path, bits: int = 4, group_size: int = 64) -> dict:
    """Quantize with mlx-lm's quantize_model (the model's own predicate) and save in mlx-lm's format."""
    with contextlib.redirect_stdout(io.StringIO()):
        model, config = quantize_model(model, config, group_size, bits, quant_predicate=model.quant_predicate)
    save_model(out_dir, model)
    save_config(config, out_dir / "config.json")
    return config


def _provenance() -> dict:
    from moed.daemon.tools.bench import git_commit, machine

    return {"command": " ".join(sys.argv), "machine": machine(), **git_commit()}


def main(args) -> int:
    cfg = TrainConfig(**{k: getattr(args, k) for k in ("steps", "minutes", "seed") if getattr(args, k, None)})
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    root = stdlib_root()
    train_texts, held_texts = prepare_corpus(root, cfg.holdout, cfg.corpus_bytes)
    tok, ids = train_tokenizer(out, train_texts, cfg.vocab)
    vocab_size = tok.get_vocab_size()
    train_tokens = encode(tok, train_texts, ids["pad_token_id"])
    held_tokens = encode(tok, held_texts, ids["pad_token_id"])
    print(f"corpus {root}: {len(train_texts)} train files, {len(held_texts)} held out; "
          f"{len(train_tokens)} / {len(held_tokens)} tokens; vocab {vocab_size}", flush=True)
    t0 = time.monotonic()
    model, config, history = train(cfg, train_tokens, held_tokens, vocab_size,
                                   log=lambda s: print(s, flush=True))
    train_s = time.monotonic() - t0
    held_ce = evaluate(model, held_tokens, cfg.seq_len)
    config = save(model, config, out)
    nbytes = sum(p.stat().st_size for p in out.iterdir() if p.is_file())
    prov = {
        "what": "tiny qwen3_moe trained on Python's standard library sources (moed train)",
        "config": asdict(cfg),
        "corpus": {"root": str(root), "train_files": len(train_texts), "heldout_files": len(held_texts),
                   "train_tokens": int(len(train_tokens)), "heldout_tokens": int(len(held_tokens))},
        "vocab_size": vocab_size,
        "train_seconds": round(train_s, 1),
        "steps_done": history[-1]["step"] + 1 if history else 0,
        "heldout_ce_float32": round(held_ce, 4),
        "heldout_ppl_float32": round(math.exp(held_ce), 2),
        "checkpoint_bytes": nbytes,
        "history": history,
        "python": sys.version.split()[0],
        "mlx": mx.__version__,
        **_provenance(),
    }
    if args.provenance:
        Path(args.provenance).parent.mkdir(parents=True, exist_ok=True)
        Path(args.provenance).write_text(json.dumps(prov, indent=1))
    print(json.dumps({k: v for k, v in prov.items() if k != "history"}), flush=True)
    return 0


def heldout_tokens(model_dir: Path, cfg: TrainConfig = TrainConfig()) -> np.ndarray:
    """The held-out split (files the model never saw), tokenized with the model's own tokenizer."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(Path(model_dir) / "tokenizer.json"))
    _, held = prepare_corpus(stdlib_root(), cfg.holdout, cfg.corpus_bytes)
    return encode(tok, held, tok.token_to_id(synthetic_tokenizer.PAD_TOKEN))


def top_k_quality(model_dir: str, ks: List[int], windows: int = 48, seq_len: int = 128) -> List[dict]:
    """Held-out perplexity and top-1 agreement with the model's own top-k, per top-k override.

    The quantized checkpoint as moed serves it (mlx-lm's load, `set_top_k`), on `windows` consecutive
    held-out windows of `seq_len` tokens.
    """
    from moed.daemon.engine.loader import load_resident

    tokens = heldout_tokens(Path(model_dir))
    n = min(windows, (len(tokens) - 1) // seq_len)
    w = np.stack([tokens[j * seq_len : j * seq_len + seq_len + 1] for j in range(n)])
    x, y = mx.array(w[:, :-1]), mx.array(w[:, 1:])
    rows, ref = [], None
    for k in ks:
        model, _ = load_resident(model_dir, top_k=k)
        total, top1 = 0.0, []
        for i in range(0, n, 8):
            logits = model(x[i : i + 8])
            total += nn.losses.cross_entropy(logits, y[i : i + 8], reduction="sum").item()
            top1.append(np.array(mx.argmax(logits, axis=-1)))
        top1 = np.concatenate(top1)
        ref = top1 if ref is None else ref
        ce = total / (n * seq_len)
        rows.append({"top_k": k, "heldout_ce": ce, "heldout_ppl": math.exp(ce),
                     "top1_agreement_with_first": float((top1 == ref).mean()), "tokens": n * seq_len})
    return rows


def quick_speed(n: int = 5) -> float:
    """Seconds per training step at the default shape (for sizing ``--steps``)."""
    cfg = TrainConfig(steps=n)
    tokens = np.random.default_rng(0).integers(0, cfg.vocab, size=100_000).astype(np.int32)
    t0 = time.monotonic()
    train(cfg, tokens, tokens, cfg.vocab, log=lambda s: None)
    return (time.monotonic() - t0) / n


def _cli():
    import argparse

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out")
    p.add_argument("--steps", type=int)
    p.add_argument("--minutes", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--provenance")
    p.add_argument("--speed", action="store_true")
    p.add_argument("--top-k", help="with OUT a trained model: held-out quality per top-k, e.g. 8,6,4,2")
    a = p.parse_args()
    if a.top_k:
        rows = top_k_quality(a.out, [int(k) for k in a.top_k.split(",")])
        doc = {"kind": "moed-top-k-quality", "model": a.out, "rows": rows, **_provenance()}
        if a.provenance:
            Path(a.provenance).write_text(json.dumps(doc, indent=1))
        print(json.dumps(doc, indent=1))
        return 0
    if a.speed:
        print(quick_speed())
        return 0
    return main(a)


if __name__ == "__main__":
    sys.exit(_cli())

