"""The paper forecast (daemon/tools/forecast.py): its step model's limits and its calibration."""

from dataclasses import replace

import pytest

from moed.daemon.tools import forecast as fc


def test_step_model_limits():
    shape, m = fc.QWEN35_397B, fc.M3_MAX_48
    resident = fc.step_s(shape, m, 10, 1.0)
    assert resident == pytest.approx(shape.moe_layers * (10 * shape.expert_bytes / (m.expert_gbps * 1e9) + m.dense_ms / 1e3))
    assert fc.step_s(shape, m, 10, 0.5) > resident  # misses cost reads
    assert fc.step_s(shape, replace(m, disk_gbps=2 * m.disk_gbps), 10, 0.5) < fc.step_s(shape, m, 10, 0.5)


def test_calibration_reproduces_its_figure_and_hit_rates_follow_the_cache():
    shape = fc.QWEN35_397B
    m = fc.calibrated(shape, fc.M3_MAX_48, 4, 0.76, 4.36)
    assert 1 / fc.step_s(shape, m, 4, 0.76) == pytest.approx(4.36, rel=0.01)
    assert m.disk_gbps < fc.M3_MAX_48.disk_gbps
    small, large = (fc.hit_rate(shape, 10, s, "fwlru", tokens=64, layers=2) for s in (16, 128))
    assert 0 < small < large < 1 and fc.hit_rate(shape, 10, 512, "fwlru") == 1.0
