"""Every mlx-lm architecture that routes through SwitchGLU/SwitchMLP pages exactly, or is refused.

Each tiny checkpoint (daemon/zoo.py: our configs, mlx-lm's classes, 4-bit) decodes greedily with
mlx-lm resident, then with moed at 25% cache with --lookahead (where it applies), with the default
options (no lookahead) and with every expert cached: same tokens, last step's logits to 1e-5.
The whole list takes ~45 s here, so `make test` (and CI) runs all of it; the longer variant
(three prompts x 48 tokens, greedy and seeded sampling, at the minimum cache of top-k slots) carries
the `slow` marker (`make test-all`).
"""

import mlx.core as mx
import numpy as np
import pytest

from moed.daemon.engine.generate import SamplingParams, run
from moed.daemon.engine.index import CheckpointError
from moed.daemon.engine.loader import load_paged, load_resident
from moed.daemon.engine.modules import find_switches
from moed.daemon.tools.zoo import LOOKAHEAD_OFF, METAL_ONLY, REFUSED, ZOO, make_tiny

PROMPT = "The paged expert cache"
PARAMS = SamplingParams(max_tokens=20, ignore_eos=True)


@pytest.mark.parametrize("arch", sorted(ZOO))
def test_architecture_pages_exactly(arch, tmp_path):
    if arch in METAL_ONLY and not mx.metal.is_available():
        pytest.skip(f"{arch}: {METAL_ONLY[arch]}")
    path = make_tiny(tmp_path / arch, arch)
    if arch in REFUSED:
        with pytest.raises(CheckpointError, match=arch):
            load_paged(path, cache_fraction=0.25, workers=1)
        return
    model, tok = load_resident(path)
    assert find_switches(model), f"{arch}: no SwitchGLU/SwitchMLP in the tiny model"
    ref = run(model, tok, PROMPT, PARAMS)
    del model
    runs = [("lookahead", 0.25, {"lookahead": True}), ("default", 0.25, {}), ("all cached", 1.0, {})]
    for mode, fraction, options in runs:
        with load_paged(path, cache_fraction=fraction, workers=1, **options) as pm:
            r = run(pm.model, pm.tokenizer, PROMPT, PARAMS)
            st = pm.store.stats
            assert r.tokens == ref.tokens, f"{arch} {mode}"
            np.testing.assert_allclose(np.array(r.logprobs), np.array(ref.logprobs), atol=1e-5, rtol=0)
            if mode == "default":  # lookahead is opt-in
                assert st.misses > 0 and not pm.info["lookahead"], f"{arch}: a 25% cache paged nothing"
            if mode == "lookahead":
                assert st.misses > 0, f"{arch}: a 25% cache paged nothing"
                assert pm.info["lookahead"] == (arch not in LOOKAHEAD_OFF), f"{arch} lookahead"
                if pm.info["lookahead"]:
                    assert st.prefetched > 0 and st.prefetch_used > 0, f"{arch}: lookahead predicted nothing"
            if mode == "all cached":
                assert st.misses == 0 and st.bytes_read == 0


@pytest.mark.parametrize("arch,applies", [("deepseek_v3", True), ("gpt_oss", True), ("kimi_linear", False),
                                          ("llama4", False)])
def test_top_k_override_applies_or_is_refused(arch, applies, tmp_path):
    """--top-k changes the routing as mlx-lm with the same override does, or is refused by name
    (never silently ignored: some routers read their top-k from elsewhere)."""
    path = make_tiny(tmp_path / arch, arch)
    if not applies:
        with pytest.raises(ValueError, match=f"--top-k.*not supported for {arch}"):
            load_paged(path, cache_fraction=0.25, workers=1, top_k=2)
        return
    ref = run(*load_resident(path, top_k=2), PROMPT, PARAMS)
    full = run(*load_resident(path), PROMPT, PARAMS)
    with load_paged(path, cache_fraction=0.25, workers=1, top_k=2) as pm:
        r = run(pm.model, pm.tokenizer, PROMPT, PARAMS)
    assert r.tokens == ref.tokens and r.tokens != full.tokens


def test_a_checkpoint_mlx_lm_cannot_build_is_refused_by_name(tmp_path):
    """A config mlx-lm's classes reject (here: a required field missing) gets a one-line error naming
    the architecture, from the API and from the CLI (no traceback)."""
    import json
    import subprocess
    import sys

    path = make_tiny(tmp_path / "m", "qwen3_moe")
    config = json.loads((path / "config.json").read_text())
    del config["num_experts"]
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="cannot load this qwen3_moe checkpoint"):
        load_paged(path, cache_fraction=0.25, workers=1)
    r = subprocess.run([sys.executable, "-m", "moed.client.cli", "generate", "--model", str(path),
                        "--prompt", "hi", "--max-tokens", "2"], capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "qwen3_moe" in r.stderr and "Traceback" not in r.stderr, r.stderr


LONG_PROMPTS = ["The paged expert cache", "Once upon a time, in a land of small memories and large models,",
                "def fetch(layer, expert):"]


@pytest.mark.slow
@pytest.mark.parametrize("arch", sorted(ZOO))
def test_architecture_pages_exactly_long(arch, tmp_path):
    """Longer decodes, seeded sampling too, with only top-k slots per layer (every step evicts)."""
    if arch in METAL_ONLY and not mx.metal.is_available():
        pytest.skip(f"{arch}: {METAL_ONLY[arch]}")
    path = make_tiny(tmp_path / arch, arch)
    params = [SamplingParams(max_tokens=48, ignore_eos=True), SamplingParams(max_tokens=48, temp=1.0, seed=3)]
    model, tok = load_resident(path)
    refs = [run(model, tok, p, q) for p in LONG_PROMPTS for q in params]
    del model
    with load_paged(path, cache_fraction=1e-9, workers=2) as pm:  # clamped up to top-k slots
        got = [run(pm.model, pm.tokenizer, p, q) for p in LONG_PROMPTS for q in params]
        assert pm.store.evictions() > 0
    for r, ref in zip(got, refs):
        assert r.tokens == ref.tokens, arch
        np.testing.assert_allclose(np.array(r.logprobs), np.array(ref.logprobs), atol=1e-5, rtol=0)
