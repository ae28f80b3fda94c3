"""tools/bench_sd.py stays runnable: a tiny CPU run, the GPU path's dry run, and the clean no-CUDA note."""

from __future__ import annotations

import pytest
import torch
from tool_support import load_tool, run_json

pytestmark = pytest.mark.slow



@pytest.fixture(scope="module")
def bench():
    return load_tool("bench_sd")


def run(bench, capsys, *argv) -> dict:
    return run_json(bench, capsys, *argv)


def test_cpu_figures_and_the_engine_computes_what_the_plain_loop_computes(bench, capsys):
    report = run(bench, capsys, "--size", "64", "--steps", "2", "--repeats", "1", "--prompts", "10")
    overhead, memory = report["overhead"], report["memory"]
    assert overhead["max_pixel_diff"] <= 1  # same noise, sigmas, timesteps and CFG: the same picture
    assert overhead["engine_s"] > 0 and overhead["plain_s"] > 0 and overhead["ratio"] > 0
    assert overhead["engine_sampler_node_s"] <= overhead["engine_s"]
    assert memory["cache_within_budget"] and 0 < memory["cache_bytes"] <= memory["cache_budget"]
    assert memory["model_loads"] == 1 and memory["rss_after_10_mb"] > 0
    small = report["memory_small_cache"]
    assert small["cache_evictions"] > 0 and small["cache_bytes"] <= small["cache_budget"] == 1 << 18


def test_gpu_path_dry_run_on_cpu(bench, capsys):
    gpu = run(bench, capsys, "--gpu-dry-run")["gpu"]
    assert gpu["dry_run"] and gpu["engine_it_s"] > 0 and gpu["pipeline_it_s"] > 0
    assert not gpu["pipeline_nonfinite_latents"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the real GPU comparison is a benchmark, not a test")
def test_gpu_without_cuda_exits_cleanly_with_a_note(bench, capsys):
    gpu = run(bench, capsys, "--gpu")["gpu"]
    assert gpu["skipped"] and "CUDA" in gpu["note"]
