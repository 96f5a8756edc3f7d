"""The trained checkpoint (models/stdlib-qwen3_moe, `python -m moed.daemon.tools.train`) loads in mlx-lm
and in moed exactly: same greedy tokens, and a few MB at 4 bits."""

import json
from pathlib import Path

import pytest

from moed.daemon.engine.generate import SamplingParams, run
from moed.daemon.engine.loader import load_paged, load_resident

MODEL = Path(__file__).resolve().parents[2] / "models" / "stdlib-qwen3_moe"
pytestmark = pytest.mark.skipif(not (MODEL / "config.json").exists(), reason=f"{MODEL} not present")


def test_trained_checkpoint_is_mlx_lm_format_and_small():
    cfg = json.loads((MODEL / "config.json").read_text())
    assert cfg["model_type"] == "qwen3_moe" and cfg["quantization"]["bits"] == 4
    assert cfg["num_experts"] == 64 and cfg["num_experts_per_tok"] == 8
    size = sum(p.stat().st_size for p in MODEL.iterdir() if p.is_file())
    assert size < 8e6
    for f in ("model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (MODEL / f).exists()


@pytest.mark.parametrize("prompt", ["def __init__(self", "import os\n"])
def test_trained_model_greedy_tokens_equal_in_mlx_lm_and_moed(prompt):
    params = SamplingParams(max_tokens=24, temp=0.0, ignore_eos=True)
    model, tok = load_resident(MODEL)
    ref = run(model, tok, prompt, params)
    with load_paged(MODEL, cache_fraction=0.25, warm=False) as pm:
        got = run(pm.model, pm.tokenizer, prompt, params)
        assert pm.store.stats.misses > 0  # it paged
    assert got.tokens == ref.tokens
    assert got.text.strip()  # it decodes to text


def test_trained_model_sampled_tokens_equal():
    params = SamplingParams(max_tokens=24, temp=1.0, seed=7, ignore_eos=True)
    model, tok = load_resident(MODEL)
    ref = run(model, tok, "class ", params)
    with load_paged(MODEL, cache_fraction=0.5, warm=False) as pm:
        got = run(pm.model, pm.tokenizer, "class ", params)
    assert got.tokens == ref.tokens
