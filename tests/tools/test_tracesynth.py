"""`moed trace synth`: the generator's statistics match the published targets it is calibrated to."""

import json
import subprocess
import sys
from dataclasses import replace

import pytest

from moed.daemon.tools import tracesynth as ts
from moed.daemon.tools.policy import simulate, validate_trace


@pytest.fixture(scope="module")
def checked():
    return ts.check(layers=8)


def test_lru_curve_within_5_points_of_flash_moe(checked):
    got = checked["flash_moe_512_top4"]["lru"]
    for size, target in ts.FLASH_MOE_LRU.items():
        assert abs(got[size] - target) <= 0.05, (size, got[size], target)


def test_overlap_skew_and_ceiling(checked):
    a, b = checked["flash_moe_512_top4"], checked["slotstream_512_top10"]
    ov = a["overlap"]
    assert 0.08 <= ov["min_layer"] and ov["max_layer"] <= 0.40 and abs(ov["mean"] - ts.FLASH_MOE_OVERLAP) <= 0.05
    assert abs(b["top10_share"] - ts.SLOTSTREAM_TOP10_SHARE) <= 0.05
    assert abs(b["lru_30"] - ts.SLOTSTREAM_LRU_30) <= 0.05
    assert abs(b["belady_89"] - 0.848) <= 0.05
    for size in ts.FLASH_MOE_LRU:  # Belady is the ceiling
        assert a["belady"][size] >= a["lru"][size]


@pytest.mark.parametrize("recall", [0.3, ts.SLOTSTREAM_RECALL, 0.9])
def test_prediction_recall_is_settable(recall):
    t = ts.synth(128, 8, 6, tokens=120, params=replace(ts.DEFAULTS, recall=recall), seed=2)
    assert abs(ts.prediction_recall(t) - recall) <= 0.03


def test_trace_is_a_valid_moed_trace_and_replays():
    t = ts.synth(64, 4, 3, tokens=50, seed=0)
    v = validate_trace(t)
    assert len(v["steps"]) == 150 and all(len(e) == 4 for _, e in v["steps"])
    assert len(t["predictions"]) == len(t["steps"]) and t["predictions"][2] is None
    assert simulate(v, "lru", "per_layer", 0.25)["hit_rate"] > 0.25  # reuse: more than the cache fraction
    assert ts.synth(64, 4, 3, tokens=50, seed=0) == t  # deterministic


def test_cli_writes_a_trace(tmp_path):
    out = tmp_path / "t.json"
    p = subprocess.run([sys.executable, "-m", "moed.client.cli", "trace", "synth", "--experts", "256", "--top-k", "4",
                        "--layers", "3", "--tokens", "40", "--out", str(out)], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    t = json.loads(out.read_text())
    assert t["num_experts"] == [256] * 3 and t["top_k"] == 4 and "per-layer LRU" in p.stdout
