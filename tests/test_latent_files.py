"""SaveLatent / LoadLatent (nodes/latent_files.py): ComfyUI's `.latent` files (safetensors with `latent_tensor` and
the `latent_format_version_0` marker), old-format scaling, naming, validation and fingerprints; and the latent ops
in graphs through the engine, in API and editor (UI) format."""

from __future__ import annotations

import json
import os
import time

import pytest
import safetensors.torch
import torch
from node_context import make_context, run_node
from safetensors import safe_open

from latentloom.engine.inputs import MissingInputFile
from latentloom.engine.workflow import api_to_ui
from latentloom.nodes import create_engine
from latentloom.nodes.latent_files import LoadLatent, SaveLatent


@pytest.fixture
def ctx(tmp_path):
    return make_context(tmp_path)


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_save_then_load_round_trip_with_comfyui_naming_and_metadata(ctx):
    ctx.prompt = {"7": {"class_type": "SaveLatent", "inputs": {}}}
    ctx.extra_data = {"extra_pnginfo": {"workflow": {"nodes": [1, 2]}}}
    samples = randn(2, 4, 5, 6)
    first = run_node(SaveLatent, ctx, samples={"samples": samples, "batch_index": [0, 1]},
                     filename_prefix="latents/ComfyUI")
    second = run_node(SaveLatent, ctx, samples={"samples": samples.half()}, filename_prefix="latents/ComfyUI")
    assert first.ui == {"latents": [{"filename": "ComfyUI_00001_.latent", "subfolder": "latents", "type": "output"}]}
    assert second.ui["latents"][0]["filename"] == "ComfyUI_00002_.latent"
    path = ctx.env.output_dir / "latents" / "ComfyUI_00001_.latent"
    with safe_open(str(path), framework="pt") as handle:
        assert sorted(handle.keys()) == ["latent_format_version_0", "latent_tensor"]
        assert handle.get_tensor("latent_format_version_0").shape == (0,)
        assert torch.equal(handle.get_tensor("latent_tensor"), samples)
        assert json.loads(handle.metadata()["prompt"]) == ctx.prompt
        assert json.loads(handle.metadata()["workflow"]) == {"nodes": [1, 2]}
    assert sorted(p.name for p in path.parent.iterdir()) == ["ComfyUI_00001_.latent", "ComfyUI_00002_.latent"]
    (loaded,) = run_node(LoadLatent, ctx, latent="latents/ComfyUI_00001_.latent [output]")
    assert loaded.keys() == {"samples"} and loaded["samples"].dtype == torch.float32
    assert torch.equal(loaded["samples"], samples)
    (half,) = run_node(LoadLatent, ctx, latent="latents/ComfyUI_00002_.latent [output]")
    assert half["samples"].dtype == torch.float32 and torch.equal(half["samples"], samples.half().float())


def test_files_written_the_old_way_are_unscaled_on_load(ctx):
    samples = randn(1, 4, 3, 3)
    # Before the marker existed, SaveLatent stored samples multiplied by 0.18215.
    safetensors.torch.save_file({"latent_tensor": samples * 0.18215}, str(ctx.env.input_dir / "old.latent"))
    (loaded,) = run_node(LoadLatent, ctx, latent="old.latent")
    torch.testing.assert_close(loaded["samples"], samples * 0.18215 * (1.0 / 0.18215), rtol=0, atol=0)
    torch.testing.assert_close(loaded["samples"], samples, rtol=1e-6, atol=1e-6)
    safetensors.torch.save_file({"latent_tensor": samples, "latent_format_version_0": torch.tensor([])},
                                str(ctx.env.input_dir / "new.latent"))
    assert torch.equal(run_node(LoadLatent, ctx, latent="new.latent")[0]["samples"], samples)


def test_counter_continues_after_existing_files_and_prefixes_stay_inside(ctx):
    folder = ctx.env.output_dir / "runs"
    folder.mkdir()
    (folder / "x_00007_.latent").write_bytes(b"")
    (folder / "y_00099_.latent").write_bytes(b"")
    result = run_node(SaveLatent, ctx, samples={"samples": torch.zeros(1, 4, 2, 2)}, filename_prefix="runs/x")
    assert result.ui["latents"][0] == {"filename": "x_00008_.latent", "subfolder": "runs", "type": "output"}
    with pytest.raises(ValueError, match=r"SaveLatent \(#1\): input 'filename_prefix': saving outside"):
        run_node(SaveLatent, ctx, samples={"samples": torch.zeros(1, 4, 2, 2)}, filename_prefix="../escape")


def test_load_latent_lists_validates_and_fingerprints_files(ctx):
    env = ctx.env
    latent_bytes = safetensors.torch.save({"latent_tensor": torch.ones(1, 4, 2, 2),
                                           "latent_format_version_0": torch.tensor([])})
    for name in ("b.latent", "a.latent"):
        (env.input_dir / name).write_bytes(latent_bytes)
    (env.input_dir / "image.png").write_bytes(b"")
    (env.input_dir / "dir.latent").mkdir()
    assert LoadLatent.input_specs()["latent"].resolve_choices(env) == ["a.latent", "b.latent"]
    assert LoadLatent.validate_inputs(env, {"latent": "a.latent"}, {}) is True
    assert LoadLatent.validate_inputs(env, {"latent": "gone.latent"}, {}) == "Invalid latent file: gone.latent"
    assert LoadLatent.validate_inputs(env, {"latent": "../a.latent"}, {}) == "Invalid latent file: ../a.latent"
    before = LoadLatent.fingerprint(env, {"latent": "a.latent"})
    os.utime(env.input_dir / "a.latent", (time.time() + 100, time.time() + 100))
    assert LoadLatent.fingerprint(env, {"latent": "a.latent"}) == before  # a touch is not a change
    (env.input_dir / "a.latent").write_bytes(safetensors.torch.save({"latent_tensor": torch.zeros(1, 4, 2, 2)}))
    assert LoadLatent.fingerprint(env, {"latent": "a.latent"}) != before
    with pytest.raises(MissingInputFile, match=r"LoadLatent \(#1\): input 'latent': latent file 'gone.latent'"):
        run_node(LoadLatent, ctx, latent="gone.latent")
    (env.input_dir / "junk.latent").write_bytes(b"not safetensors")
    with pytest.raises(ValueError, match=r"input 'latent': 'junk.latent' is not a readable latent file"):
        run_node(LoadLatent, ctx, latent="junk.latent")
    (env.input_dir / "other.latent").write_bytes(safetensors.torch.save({"weights": torch.zeros(2)}))
    with pytest.raises(ValueError, match=r"input 'latent': 'other.latent' holds no 'latent_tensor'"):
        run_node(LoadLatent, ctx, latent="other.latent")


# Through the engine --------------------------------------------------------------------------------------------


@pytest.fixture
def engine(tmp_path):
    return create_engine(models_dir=tmp_path / "models", input_dir=tmp_path / "input",
                         output_dir=tmp_path / "output", temp_dir=tmp_path / "temp", entry_points=False)


def read_saved(engine, ui_entry) -> torch.Tensor:
    path = engine.env.output_dir / ui_entry["subfolder"] / ui_entry["filename"]
    return safetensors.torch.load_file(str(path))["latent_tensor"]


def test_latent_ops_graph_saves_and_a_second_run_loads_it(engine):
    seed = randn(2, 4, 8, 8, seed=3)
    engine.env.input_dir.mkdir(parents=True)
    safetensors.torch.save_file({"latent_tensor": seed, "latent_format_version_0": torch.tensor([])},
                                str(engine.env.input_dir / "seed.latent"))
    prompt = {
        "1": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 48, "batch_size": 1}},
        "2": {"class_type": "LoadLatent", "inputs": {"latent": "seed.latent"}},
        "3": {"class_type": "LatentMultiply", "inputs": {"samples": ["2", 0], "multiplier": 0.5}},
        "4": {"class_type": "LatentBatch", "inputs": {"samples1": ["1", 0], "samples2": ["3", 0]}},
        "5": {"class_type": "LatentFlip", "inputs": {"samples": ["4", 0], "flip_method": "y-axis: horizontally"}},
        "6": {"class_type": "LatentAdd", "inputs": {"samples1": ["5", 0], "samples2": ["2", 0]}},
        "7": {"class_type": "SaveLatent", "inputs": {"samples": ["6", 0], "filename_prefix": "latents/ComfyUI"}},
    }
    result = engine.run(prompt)
    assert result.status == "success", result.error
    (entry,) = result.outputs["7"]["latents"]
    assert entry == {"filename": "ComfyUI_00001_.latent", "subfolder": "latents", "type": "output"}
    # 8x8 -> 6x8: one row off the top and bottom (centre crop to the aspect ratio), no resampling left to do.
    middle = seed[:, :, 1:7, :]
    expected = torch.cat([torch.zeros(1, 4, 6, 8), 0.5 * middle]).flip(3) + middle[[0, 1, 0]]
    torch.testing.assert_close(read_saved(engine, entry), expected, rtol=0, atol=1e-6)

    second = {
        "1": {"class_type": "LoadLatent", "inputs": {"latent": "latents/ComfyUI_00001_.latent [output]"}},
        "2": {"class_type": "LatentCut", "inputs": {"samples": ["1", 0], "dim": "x", "index": -3, "amount": 2}},
        "3": {"class_type": "SaveLatent", "inputs": {"samples": ["2", 0], "filename_prefix": "latents/ComfyUI"}},
    }
    result = engine.run(second)
    assert result.status == "success", result.error
    (entry,) = result.outputs["3"]["latents"]
    assert entry["filename"] == "ComfyUI_00002_.latent"
    torch.testing.assert_close(read_saved(engine, entry), expected[..., 5:7], rtol=0, atol=1e-6)


def test_rebatch_in_a_graph_saves_one_file_per_batch(engine):
    prompt = {
        "1": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 5}},
        "2": {"class_type": "LatentOperationTonemapReinhard", "inputs": {"multiplier": 1.0}},
        "3": {"class_type": "LatentApplyOperation", "inputs": {"samples": ["1", 0], "operation": ["2", 0]}},
        "4": {"class_type": "RebatchLatents", "inputs": {"latents": ["3", 0], "batch_size": 2}},
        "5": {"class_type": "SaveLatent", "inputs": {"samples": ["4", 0], "filename_prefix": "rebatched"}},
    }
    result = engine.run(prompt)
    assert result.status == "success", result.error
    entries = result.outputs["5"]["latents"]
    assert [e["filename"] for e in entries] == [f"rebatched_{n:05}_.latent" for n in (1, 2, 3)]
    assert [tuple(read_saved(engine, e).shape) for e in entries] == [(2, 4, 8, 8), (2, 4, 8, 8), (1, 4, 8, 8)]


def test_an_editor_workflow_with_save_and_load_latent_converts_validates_and_runs(engine, tmp_path):
    engine.env.input_dir.mkdir(parents=True)
    safetensors.torch.save_file({"latent_tensor": torch.full((1, 4, 12, 10), 2.0)},  # old format: 2 / 0.18215
                                str(engine.env.input_dir / "old.latent"))
    prompt = {
        "1": {"class_type": "LoadLatent", "inputs": {"latent": "old.latent"}},
        "2": {"class_type": "LatentOperationSharpen", "inputs": {"sharpen_radius": 2, "sigma": 1.0, "alpha": 0.5}},
        "3": {"class_type": "LatentApplyOperation", "inputs": {"samples": ["1", 0], "operation": ["2", 0]}},
        "4": {"class_type": "LatentCrop", "inputs": {"samples": ["3", 0], "width": 64, "height": 64, "x": 8,
                                                     "y": 16}},
        "5": {"class_type": "SaveLatent", "inputs": {"samples": ["4", 0], "filename_prefix": "ui/run"}},
    }
    workflow = api_to_ui(prompt, engine.catalogue())
    saved = next(n for n in workflow["nodes"] if n["type"] == "SaveLatent")
    assert saved["widgets_values"] == ["ui/run"]
    path = tmp_path / "workflow.json"
    path.write_text(json.dumps(workflow))
    loaded = engine.load(path)
    assert engine.validate(loaded).ok
    result = engine.run(loaded)
    assert result.status == "success", result.error
    (entry,) = result.outputs["5"]["latents"]
    # A flat latent stays flat under sharpening (the kernel sums to one); the crop is 8x8 of the 12x10.
    torch.testing.assert_close(read_saved(engine, entry), torch.full((1, 4, 8, 8), 2.0 / 0.18215), rtol=1e-5,
                               atol=0)
