"""tools/bench_lora.py reports a speedup only when both change costs stand out of the run-to-run noise."""

import pytest
from tool_support import load_tool


@pytest.fixture(scope="module")
def bench():
    return load_tool("bench_lora")


FLOOR = [1.00, 1.04, 0.97, 1.01, 1.03]  # seed-change runs: spread of a few hundredths of a second


def figures(bench, strength_extra, checkpoint_extra, floor=FLOOR):
    strength = bench.change_cost([f + e for f, e in zip(floor, strength_extra, strict=True)], floor)
    checkpoint = bench.change_cost([f + e for f, e in zip(floor, checkpoint_extra, strict=True)], floor)
    return bench.speedup_figures(checkpoint, strength, 10.0)


def test_resolved_costs_give_the_ratio(bench):
    result = figures(bench, [0.21, 0.19, 0.2, 0.2, 0.22], [3.1, 2.9, 3.0, 3.05, 2.95])
    assert result["speedup"] == pytest.approx(3.0 / 0.2, rel=1e-3)
    assert result["speedup_note"] is None
    assert 0 < result["speedup_at_least"] < result["speedup"]
    assert result["meets_target"] is (result["speedup_at_least"] >= 10)


def test_cost_inside_the_noise_gives_no_ratio(bench):
    # The strength change costs nothing measurable: medians of noise would give any ratio, even a negative one.
    result = figures(bench, [0.01, -0.02, 0.0, 0.015, -0.01], [3.1, 2.9, 3.0, 3.05, 2.95])
    assert result["speedup"] is None
    assert "strength change cost" in result["speedup_note"] and "noise" in result["speedup_note"]
    # The bound puts the strength cost at the top of its noise, so it is finite and positive.
    noise = result["strength_change_cost_noise_s"]
    assert noise > 0
    assert result["speedup_at_least"] == pytest.approx((3.0 - result["checkpoint_change_cost_noise_s"])
                                                       / (0.0 + noise), rel=0.02)


def test_an_outlier_run_does_not_hide_a_resolved_cost(bench):
    result = figures(bench, [0.21, 0.19, 0.2, 2.5, 0.22], [3.1, 2.9, 3.0, 3.05, 2.95])
    assert result["speedup"] == pytest.approx(3.0 / 0.21, rel=1e-3)


def test_too_few_repeats_give_no_ratio(bench):
    result = figures(bench, [0.2, 0.2], [3.0, 3.0], floor=[1.0, 1.0])
    assert result["speedup"] is None and result["speedup_at_least"] is None and not result["meets_target"]
    assert "repeats" in result["speedup_note"]
