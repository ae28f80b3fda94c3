"""Stable Diffusion graphs end to end through `latentloom run`: ComfyUI API-format graphs of core nodes on tiny
random SD1.5-, SD2-v- and SDXL-shaped checkpoints in MODELS/checkpoints, writing PNGs.

The tiny VAE is random: its GroupNorm and attention layers mix the whole image, so a change anywhere in the latent
moves every pixel a little. Where a property is exact (inpainting keeps the latent outside the mask) it is checked
in latent space through a probe node (tests/sd_probe_nodes.py, installed as a custom_nodes module); in pixel space
the checks compare against the VAE round trip of the input.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_models import write_tiny_checkpoint

from latentloom.server.cli import main

pytestmark = pytest.mark.slow

TESTS = Path(__file__).resolve().parent
SIZE = 64
HOLE = slice(16, 48)  # the transparent square of the input image: the inpainting mask (mask = 1 - alpha)

TXT2IMG = {
    "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd1.safetensors"}},
    "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a lighthouse at dusk, (oil painting:1.2)",
                                                     "clip": ["4", 1]}},
    "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["4", 1]}},
    "5": {"class_type": "EmptyLatentImage", "inputs": {"width": SIZE, "height": SIZE, "batch_size": 1}},
    "3": {"class_type": "KSampler", "inputs": {
        "seed": 11, "steps": 3, "cfg": 6.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0,
        "model": ["4", 0], "positive": ["6", 0], "negative": ["7", 0], "latent_image": ["5", 0]}},
    "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
    "9": {"class_type": "SaveImage", "inputs": {"filename_prefix": "txt2img", "images": ["8", 0]}},
}


def graph(*replacements: dict, without: tuple[str, ...] = ()) -> dict:
    """TXT2IMG with nodes replaced or added (dicts of node id -> node) and some removed."""
    result = copy.deepcopy(TXT2IMG)
    for nodes in replacements:
        result.update(copy.deepcopy(nodes))
    for node_id in without:
        del result[node_id]
    return result


def sampler_inputs(**changes) -> dict:
    return {"class_type": "KSampler", "inputs": {**TXT2IMG["3"]["inputs"], **changes}}


LOAD = {"10": {"class_type": "LoadImage", "inputs": {"image": "photo.png"}}}
ENCODE = {"11": {"class_type": "VAEEncode", "inputs": {"pixels": ["10", 0], "vae": ["4", 2]}}}


def probe(node_id: str, label: str) -> dict:
    return {f"probe_{label}": {"class_type": "LatentProbe", "inputs": {"samples": [node_id, 0], "label": label}}}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("sd_e2e")
    for family in ("sd1", "sd2_v", "sdxl"):
        write_tiny_checkpoint(root / "models" / "checkpoints" / f"{family}.safetensors", family=family, seed=0)
    (root / "custom_nodes").mkdir()
    shutil.copy(TESTS / "sd_probe_nodes.py", root / "custom_nodes" / "sd_probe_nodes.py")
    (root / "input").mkdir()
    y, x = np.mgrid[0:SIZE, 0:SIZE]
    rgb = np.stack([x * 4, y * 4, 255 - (x + y) * 2], axis=-1).astype(np.uint8)
    alpha = np.full((SIZE, SIZE), 255, dtype=np.uint8)
    alpha[HOLE, HOLE] = 0
    Image.fromarray(np.dstack([rgb, alpha]), "RGBA").save(root / "input" / "photo.png")
    Image.fromarray(255 - rgb).save(root / "input" / "negative.png")
    return root


def cli(workspace: Path, capsys, document: dict | Path, *extra: str) -> tuple[int, dict | str]:
    """Run `latentloom run` in-process; returns the exit code and the JSON summary (or stderr without --json)."""
    if isinstance(document, dict):
        path = workspace / "graph.json"
        path.write_text(json.dumps(document))
    else:
        path = document
    args = ["run", str(path), "--models-dir", str(workspace / "models"), "--input-dir", str(workspace / "input"),
            "--output-dir", str(workspace / "output"), "--temp-dir", str(workspace / "temp"),
            "--custom-nodes", str(workspace / "custom_nodes"), *extra]
    code = main(args)
    captured = capsys.readouterr()
    return code, (json.loads(captured.out) if "--json" in extra else captured.err)


def run_ok(workspace: Path, capsys, document: dict | Path) -> dict:
    code, summary = cli(workspace, capsys, document, "--json")
    assert code == 0 and summary["status"] == "success", summary
    return summary


def pixels(path: str) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"), dtype=np.float32)


def probes(summary: dict) -> dict[str, dict]:
    found = {}
    for text in summary["text"]:
        entry = json.loads(text)
        found[entry["label"]] = {"samples": torch.tensor(entry["samples"]),
                                 "noise_mask": None if entry["noise_mask"] is None
                                 else torch.tensor(entry["noise_mask"])}
    return found


# --- txt2img ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["sd1", "sd2_v", "sdxl"])
def test_txt2img_writes_a_png_for_each_family(workspace, capsys, family):
    summary = run_ok(workspace, capsys, graph({"4": {"class_type": "CheckpointLoaderSimple",
                                                     "inputs": {"ckpt_name": f"{family}.safetensors"}}}))
    assert summary["executed"] == len(TXT2IMG) and summary["cached"] == 0
    (output,) = summary["outputs"]
    assert Path(output).parent == workspace / "output" and Path(output).name.startswith("txt2img_")
    image = pixels(output)
    assert image.shape == (SIZE, SIZE, 3) and image.std() > 1.0  # a picture, not a flat fill
    memory = summary["memory"]
    assert memory["loads"] == 1 and memory["entries"][0]["key"].count(f"{family}.safetensors") == 1
    assert memory["bytes_by_device"]["cpu"] > 0


def test_same_seed_same_bytes_other_seed_other_image(workspace, capsys):
    first = run_ok(workspace, capsys, TXT2IMG)["outputs"][0]
    second = run_ok(workspace, capsys, TXT2IMG)["outputs"][0]
    assert first != second  # a new file each run (the counter moves on) ...
    assert Path(first).read_bytes() == Path(second).read_bytes()  # ... with the very same bytes
    other = run_ok(workspace, capsys, graph({"3": sampler_inputs(seed=12)}))["outputs"][0]
    assert np.abs(pixels(other) - pixels(first)).mean() > 1.0


def test_png_metadata_holds_prompt_and_ui_workflow(workspace, capsys):
    api_path = workspace / "api.json"
    api_path.write_text(json.dumps(TXT2IMG))
    ui_path = workspace / "workflow_ui.json"
    assert main(["convert", str(api_path), "--to", "ui", "-o", str(ui_path), "--custom-nodes", "none"]) == 0
    capsys.readouterr()
    workflow = json.loads(ui_path.read_text())

    from_ui = run_ok(workspace, capsys, ui_path)
    assert from_ui["format"] != "api_json"
    with Image.open(from_ui["outputs"][0]) as image:
        chunks = dict(image.text)
    prompt = json.loads(chunks["prompt"])
    assert {entry["class_type"] for entry in prompt.values()} == {entry["class_type"] for entry in TXT2IMG.values()}
    sampler = next(entry for entry in prompt.values() if entry["class_type"] == "KSampler")
    assert sampler["inputs"]["seed"] == 11 and sampler["inputs"]["steps"] == 3
    saved_workflow = json.loads(chunks["workflow"])
    assert len(saved_workflow["nodes"]) == len(workflow["nodes"]) == len(TXT2IMG)
    assert saved_workflow["links"] == workflow["links"]
    # The same graph from the UI file and from the API file gives the same picture; the API file has no workflow.
    from_api = run_ok(workspace, capsys, api_path)
    assert np.array_equal(pixels(from_ui["outputs"][0]), pixels(from_api["outputs"][0]))
    with Image.open(from_api["outputs"][0]) as image:
        assert "prompt" in image.text and "workflow" not in image.text
    # A saved PNG is itself a workflow file: running it makes the same picture again.
    again = run_ok(workspace, capsys, Path(from_ui["outputs"][0]))
    assert again["format"] != "api_json"
    assert np.array_equal(pixels(again["outputs"][0]), pixels(from_ui["outputs"][0]))


# --- img2img, inpaint, hires fix, custom sampling ---------------------------------------------------------------

def test_img2img_at_denoise_0_6_is_the_schedule_tail_of_a_longer_run(workspace, capsys):
    img2img = graph(LOAD, ENCODE, {"3": sampler_inputs(latent_image=["11", 0], steps=4, denoise=0.6)},
                    without=("5",))
    result = pixels(run_ok(workspace, capsys, img2img)["outputs"][0])
    # ComfyUI's rule: denoise d over n steps runs the last n of int(n/d) = 6 steps, i.e. KSamplerAdvanced from
    # step 2 of 6 with the same seed's noise added at that step's sigma.
    advanced = graph(LOAD, ENCODE, {"3": {"class_type": "KSamplerAdvanced", "inputs": {
        "add_noise": "enable", "noise_seed": 11, "steps": 6, "cfg": 6.0, "sampler_name": "euler",
        "scheduler": "normal", "start_at_step": 2, "end_at_step": 10000, "return_with_leftover_noise": "disable",
        "model": ["4", 0], "positive": ["6", 0], "negative": ["7", 0], "latent_image": ["11", 0]}}},
                     without=("5",))
    assert np.array_equal(result, pixels(run_ok(workspace, capsys, advanced)["outputs"][0]))
    txt2img = pixels(run_ok(workspace, capsys, graph({"3": sampler_inputs(steps=4)}))["outputs"][0])
    assert np.abs(result - txt2img).mean() > 1.0
    # The input image matters.
    other_input = graph(img2img, {"10": {"class_type": "LoadImage", "inputs": {"image": "negative.png"}}},
                        without=("5",))
    assert np.abs(pixels(run_ok(workspace, capsys, other_input)["outputs"][0]) - result).mean() > 1.0


@pytest.mark.parametrize("method", ["SetLatentNoiseMask", "VAEEncodeForInpaint"])
def test_inpaint_keeps_what_is_outside_the_mask(workspace, capsys, method):
    if method == "SetLatentNoiseMask":
        masked = {**ENCODE, "12": {"class_type": "SetLatentNoiseMask",
                                   "inputs": {"samples": ["11", 0], "mask": ["10", 1]}}}
    else:
        masked = {"12": {"class_type": "VAEEncodeForInpaint",
                         "inputs": {"pixels": ["10", 0], "vae": ["4", 2], "mask": ["10", 1], "grow_mask_by": 6}}}
    inpaint = graph(LOAD, masked, {"3": sampler_inputs(latent_image=["12", 0])}, probe("12", "input"),
                    probe("3", "output"), without=("5",))
    summary = run_ok(workspace, capsys, inpaint)
    latents = probes(summary)
    source, result = latents["input"]["samples"], latents["output"]["samples"]
    mask = latents["input"]["noise_mask"]
    assert mask is not None and latents["output"]["noise_mask"] is not None
    # The mask at latent resolution (the sampler's bilinear resize); the hole's cells are 2..5 (grown: 1..6).
    cells = torch.nn.functional.interpolate(mask.reshape(1, 1, *mask.shape[-2:]), size=source.shape[-2:],
                                            mode="bilinear")[0, 0]
    assert set(cells.unique().tolist()) == {0.0, 1.0}
    keep = cells == 0
    assert keep.sum() >= 28 and (~keep).sum() >= 16
    assert torch.allclose(result[..., keep], source[..., keep], atol=1e-5)
    assert (result[..., ~keep] - source[..., ~keep]).abs().mean() > 0.1

    # In pixels: against the input's VAE round trip, the image changed far less outside the hole than inside.
    round_trip = graph(LOAD, {"12": masked["12"]} if method == "VAEEncodeForInpaint" else masked,
                       {"8": {"class_type": "VAEDecode", "inputs": {"samples": ["12", 0], "vae": ["4", 2]}}},
                       without=("3", "5", "6", "7"))
    reference = pixels(run_ok(workspace, capsys, round_trip)["outputs"][0])
    change = np.abs(pixels(summary["outputs"][0]) - reference).mean(axis=-1)
    hole = np.zeros((SIZE, SIZE), dtype=bool)
    hole[HOLE, HOLE] = True
    assert change[~hole].mean() < 0.6 * change[hole].mean()


def test_hires_fix_upscales_the_latent_and_samples_again(workspace, capsys):
    hires = graph({"20": {"class_type": "LatentUpscaleBy", "inputs": {
                       "samples": ["3", 0], "upscale_method": "nearest-exact", "scale_by": 1.5}},
                   "21": sampler_inputs(latent_image=["20", 0], steps=2, denoise=0.5, seed=12),
                   "8": {"class_type": "VAEDecode", "inputs": {"samples": ["21", 0], "vae": ["4", 2]}}},
                  probe("20", "upscaled"), probe("21", "second"))
    summary = run_ok(workspace, capsys, hires)
    assert pixels(summary["outputs"][0]).shape == (96, 96, 3)
    latents = probes(summary)
    upscaled, second = latents["upscaled"]["samples"], latents["second"]["samples"]
    assert upscaled.shape == second.shape == (1, 4, 12, 12)
    change = (second - upscaled).abs().mean()
    assert change > 0.01
    # At denoise 0.5 the second pass starts from the upscaled latent: it changes it less than a full pass does.
    full = graph(hires, {"21": sampler_inputs(latent_image=["20", 0], steps=2, denoise=1.0, seed=12)})
    assert (probes(run_ok(workspace, capsys, full))["second"]["samples"] - upscaled).abs().mean() > change


def test_sampler_custom_advanced_equals_ksampler(workspace, capsys):
    custom = graph({
        "30": {"class_type": "RandomNoise", "inputs": {"noise_seed": 11}},
        "31": {"class_type": "CFGGuider", "inputs": {"model": ["4", 0], "positive": ["6", 0], "negative": ["7", 0],
                                                     "cfg": 6.0}},
        "32": {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}},
        "33": {"class_type": "BasicScheduler", "inputs": {"model": ["4", 0], "scheduler": "normal", "steps": 3,
                                                          "denoise": 1.0}},
        "34": {"class_type": "SamplerCustomAdvanced", "inputs": {
            "noise": ["30", 0], "guider": ["31", 0], "sampler": ["32", 0], "sigmas": ["33", 0],
            "latent_image": ["5", 0]}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["34", 0], "vae": ["4", 2]}},
    }, without=("3",))
    from_custom = pixels(run_ok(workspace, capsys, custom)["outputs"][0])
    from_ksampler = pixels(run_ok(workspace, capsys, TXT2IMG)["outputs"][0])
    assert np.array_equal(from_custom, from_ksampler)
    ddim = graph(custom, {"32": {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "dpmpp_2m"}}})
    assert np.abs(pixels(run_ok(workspace, capsys, ddim)["outputs"][0]) - from_ksampler).mean() > 0.5


# --- caching and model sharing ------------------------------------------------------------------------------------

def test_rerun_executes_nothing_and_a_new_seed_keeps_the_checkpoint(workspace):
    from latentloom import nodes

    engine = nodes.create_engine(models_dir=workspace / "models", input_dir=workspace / "input",
                                 output_dir=workspace / "output_engine", temp_dir=workspace / "temp",
                                 entry_points=False)
    manager = engine.env.models
    first = engine.run(copy.deepcopy(TXT2IMG))
    assert first.status == "success" and len(first.executed) == len(TXT2IMG)
    again = engine.run(copy.deepcopy(TXT2IMG))
    assert again.status == "success" and again.executed == [] and len(again.cached) == len(TXT2IMG)
    reseeded = engine.run(graph({"3": sampler_inputs(seed=99)}))
    assert reseeded.status == "success"
    assert sorted(reseeded.executed) == ["3", "8", "9"]  # sampler, decode, save; loader and prompts cached
    stats = manager.stats()
    assert stats.loads == 1 and len(stats.entries) == 1 and stats.drops == 0
    assert len(list((workspace / "output_engine").glob("txt2img_*.png"))) == 2


# --- errors -----------------------------------------------------------------------------------------------------

def checkpoint(name: str, node_id: str = "4") -> dict:
    return {node_id: {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": name}}}


RUNTIME_ERRORS = {
    # An 8-channel latent for a 4-channel model.
    "wide_latent": ({"5": {"class_type": "WideEmptyLatent", "inputs": {"channels": 8, "width": SIZE,
                                                                       "height": SIZE}}},
                    "KSampler (#3): input 'latent_image': has 8 channels", "4-channel"),
    # The SDXL model sampled with prompts encoded by the SD1 checkpoint's CLIP (32 wide; the tiny SDXL takes 64).
    "foreign_conditioning": ({**checkpoint("sdxl.safetensors"), **checkpoint("sd1.safetensors", "40"),
                              "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a cat", "clip": ["40", 1]}}},
                             "KSampler (#3): input 'positive': holds 32-wide text embeddings", "64-wide"),
}


@pytest.mark.parametrize("case", sorted(RUNTIME_ERRORS))
def test_runtime_error_exits_1_and_names_the_node(workspace, capsys, case):
    changes, *phrases = RUNTIME_ERRORS[case]
    broken = graph(changes)
    code, summary = cli(workspace, capsys, broken, "--json")
    assert code == 1 and summary["status"] == "error"
    assert summary["error"]["node_id"] == "3" and summary["error"]["node_type"] == "KSampler"
    message = summary["error"]["exception_message"]
    assert all(phrase in message for phrase in phrases), message
    assert summary["outputs"] == []
    code, err = cli(workspace, capsys, broken)
    assert code == 1 and "error in node #3 KSampler" in err and "Traceback" not in err


def test_missing_checkpoint_exits_2_naming_node_and_input(workspace, capsys):
    missing = graph({"4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "nowhere.safetensors"}}})
    code, err = cli(workspace, capsys, missing)
    assert code == 2
    assert "node #4 CheckpointLoaderSimple" in err and "ckpt_name" in err and "nowhere.safetensors" in err
    assert "Traceback" not in err
    code, summary = cli(workspace, capsys, missing, "--json")
    assert code == 2 and summary["node_errors"]["4"]["class_type"] == "CheckpointLoaderSimple"
    assert not list((workspace / "output").glob("*nowhere*"))
