"""tools/bench_compare.py stays runnable and reports what it claims: a tiny CPU run through every part (a cold
`latentloom run`, the server, one process with and without the model code prepared, memory over distinct
prompts), the GPU comparison's dry run, and the clean no-CUDA note."""

from __future__ import annotations

import pytest
import torch
from tool_support import load_tool, run_json

pytestmark = pytest.mark.slow



@pytest.fixture(scope="module")
def bench():
    return load_tool("bench_compare")


def run(bench, capsys, *argv) -> dict:
    return run_json(bench, capsys, *argv)


def test_cpu_figures_at_tiny_size(bench, capsys):
    report = run(bench, capsys, "--graphs", "txt2img", "--repeats", "1", "--steps", "2", "--prompts", "12")
    figures = report["graphs"]["txt2img"]
    assert figures["cold"]["run_s"] > 0 and figures["cold"]["run_cpu_s"] > 0
    plain, prepared = figures["in_process"], figures["in_process_prepared"]
    assert plain["first_s"] > 0 and plain["warm_s"] > 0 and plain["prepare_s"] == 0
    # Preparing moves the model code's import out of the first image: seconds of imports against a load.
    assert prepared["prepare_s"] > 0 and prepared["first_s"] < plain["first_s"]
    serve = figures["serve"]
    assert serve["ready_s"] > 0 and serve["first_s"] > 0 and serve["warm_s"] > 0
    assert figures["ratios"]["serve_first_over_warm"] == serve["first_over_warm"]
    memory = report["memory"]
    # With the default budget the outputs no recent prompt needed age out: by prompt 12 those of prompts 1-3 are
    # gone and the cache holds as many prompts' outputs as after prompt 10.
    default = memory["default_cache"]
    assert default["cache_evictions"] > 0 and default["cache_within_budget"]
    assert abs(default["cache_growth_mb"]) < 0.01
    floor = report["import_floor"]
    assert 0 < floor["torch_s"] < floor["model_classes_s"]
    for label in ("serve_default_cache", "serve_small_cache"):
        assert memory[label]["prompts"] == 12 and memory[label]["rss_after_10_mb"] > 0
    small = memory["small_cache"]
    assert small["cache_within_budget"] and small["cache_evictions"] > 0 and small["cache_budget"] == 1 << 18


def test_gpu_path_dry_run_on_cpu(bench, capsys):
    gpu = run(bench, capsys, "--gpu-dry-run")["gpu"]
    assert gpu["dry_run"]
    for family in ("sd15", "sdxl"):
        figures = gpu[family]
        assert figures["engine_eager"]["it_s"] > 0 and figures["pipeline_eager"]["it_s"] > 0
        assert figures["pipeline_eager"]["finite_latents"] and figures["engine_vs_pipeline_eager"] > 0
    assert gpu["sdxl"]["unet_parameters"] != gpu["sd15"]["unet_parameters"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the real GPU comparison is a benchmark, not a test")
def test_gpu_without_cuda_exits_cleanly_with_a_note(bench, capsys):
    gpu = run(bench, capsys, "--gpu")["gpu"]
    assert gpu["skipped"] and "CUDA" in gpu["note"]


def test_other_graphs_and_models_reach_every_timed_process(bench, monkeypatch, tmp_path):
    (tmp_path / "mine.json").write_text('{"1": {"class_type": "KSampler", "inputs": {"steps": 20}}}')
    monkeypatch.setenv(bench.GRAPHS_DIR_VARIABLE, str(tmp_path))
    monkeypatch.setenv(bench.MODELS_DIR_VARIABLE, str(tmp_path / "models"))
    assert bench.load_graph("mine", 3) == {"1": {"class_type": "KSampler", "inputs": {"steps": 3}}}
    assert bench.models_flags() == ["--models-dir", str(tmp_path / "models")]
    assert bench.child_env(1)[bench.MODELS_DIR_VARIABLE] == str(tmp_path / "models")  # children inherit them
    monkeypatch.delenv(bench.MODELS_DIR_VARIABLE)
    assert bench.models_flags() == [] and bench.models_dir() is None
