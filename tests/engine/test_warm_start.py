"""Warm start (daemon/engine/warmstart.py): a run's expert use counts are saved at close and the next
load fills the cache with the most used experts (what that is worth: `moed bench --workload warm-start`)."""

from pathlib import Path

import numpy as np
import pytest

from moed.daemon.engine.loader import load_paged
from moed.daemon.engine.warmstart import WarmStart
from moed.daemon.tools import warmbench
from moed.ipc.config import PagingConfig

MODEL = Path(__file__).resolve().parents[2] / "models" / "stdlib-qwen3_moe"
pytestmark = pytest.mark.skipif(not (MODEL / "config.json").exists(), reason=f"{MODEL} not present")


def heat_files(runtime: Path) -> list[Path]:
    return sorted((runtime / "heat").glob("*.npy"))


def test_counts_saved_at_close_fill_the_next_load(tmp_path):
    rt = str(tmp_path / "rt")
    cold = warmbench.one(str(MODEL), 0.25, rt, True, warmbench.RECORD_PROMPT, 48)
    assert not cold["warm_from_counts"]
    (f,) = heat_files(tmp_path / "rt")
    counts = np.load(f)
    assert counts.shape == (4, 64) and counts.sum() > 0
    with warmbench.runtime_dir(rt), load_paged(MODEL, PagingConfig(cache_fraction=0.25, warm_start=True)) as pm:
        assert pm.info["warm_from_counts"]
        n = pm.info["slots_per_layer"][0]
        for layer in range(4):
            top = np.argsort(-counts[layer], kind="stable")[:n]
            assert set(pm.store.resident(layer).tolist()) == set(top.tolist())
    # saved again: this run's counts (none: no request) + half the ones read at load, never counted twice
    assert np.allclose(np.load(f), 0.5 * counts)


def test_other_shapes_and_damaged_files_are_not_used(tmp_path):
    path = tmp_path / "heat" / "x.npy"
    ws = WarmStart(path, [8, 8])
    assert ws.order() is None
    ws.save(np.arange(16, dtype=np.float64).reshape(2, 8))
    assert [o.tolist()[:2] for o in WarmStart(path, [8, 8]).order()] == [[7, 6], [7, 6]]
    assert WarmStart(path, [8, 8, 8]).order() is None  # another model's layers: ignored
    path.write_bytes(b"not an array")
    assert WarmStart(path, [8, 8]).order() is None and not path.exists()  # damaged: removed
    with pytest.raises(ValueError):
        PagingConfig(warm_start="yes")
