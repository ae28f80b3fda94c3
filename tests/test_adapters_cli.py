"""End to end through `latentloom run`: LoRA + two chained ControlNets (one fed by Canny) + an embedding prompt,
on tiny files in DIR/loras, DIR/controlnet, DIR/embeddings."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from adapter_support import kohya_lora_for_all, save_safetensors, tiny_controlnet, tiny_objects, write_controlnet
from PIL import Image
from tiny_models import write_tiny_checkpoint

from latentloom.server.cli import main

pytestmark = pytest.mark.slow

GRAPH = {
    "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "tiny.safetensors"}},
    "2": {"class_type": "LoraLoader", "inputs": {"model": ["1", 0], "clip": ["1", 1], "lora_name": "style.safetensors",
                                                 "strength_model": 0.8, "strength_clip": 0.6}},
    "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["2", 1],
                                                     "text": "a photo of embedding:kitty, (embedding:kitty:1.2)"}},
    "4": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["2", 1], "text": "blurry"}},
    "5": {"class_type": "LoadImage", "inputs": {"image": "hint.png"}},
    "6": {"class_type": "Canny", "inputs": {"image": ["5", 0], "low_threshold": 0.2, "high_threshold": 0.5}},
    "7": {"class_type": "ControlNetLoader", "inputs": {"control_net_name": "edges.safetensors"}},
    "8": {"class_type": "ControlNetApplyAdvanced", "inputs": {
        "positive": ["3", 0], "negative": ["4", 0], "control_net": ["7", 0], "image": ["6", 0], "strength": 0.9,
        "start_percent": 0.0, "end_percent": 0.8}},
    "9": {"class_type": "ControlNetLoader", "inputs": {"control_net_name": "depth.safetensors"}},
    "10": {"class_type": "ControlNetApplyAdvanced", "inputs": {
        "positive": ["8", 0], "negative": ["8", 1], "control_net": ["9", 0], "image": ["5", 0], "strength": 0.5,
        "start_percent": 0.2, "end_percent": 1.0}},
    "11": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
    "12": {"class_type": "KSampler", "inputs": {
        "model": ["2", 0], "positive": ["10", 0], "negative": ["10", 1], "latent_image": ["11", 0], "seed": 7,
        "steps": 3, "cfg": 5.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
    "13": {"class_type": "VAEDecode", "inputs": {"samples": ["12", 0], "vae": ["1", 2]}},
    "14": {"class_type": "SaveImage", "inputs": {"images": ["13", 0], "filename_prefix": "e2e"}},
}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    models = root / "models"
    write_tiny_checkpoint(models / "checkpoints" / "tiny.safetensors", family="sd1", seed=0)
    model, clip = tiny_objects("sd1", seed=0)
    save_safetensors(kohya_lora_for_all(model, clip, seed=3), models / "loras" / "style.safetensors")
    write_controlnet(models / "controlnet" / "edges.safetensors", tiny_controlnet("sd1", seed=1), "ldm")
    write_controlnet(models / "controlnet" / "depth.safetensors", tiny_controlnet("sd1", seed=2), "diffusers")
    save_safetensors({"emb_params": torch.randn((2, 32), generator=torch.Generator().manual_seed(4))},
                     models / "embeddings" / "kitty.safetensors")
    (root / "input").mkdir()
    pixels = np.zeros((64, 64, 3), dtype=np.uint8)
    pixels[16:48, 20:44] = 255
    Image.fromarray(pixels).save(root / "input" / "hint.png")
    (root / "graph.json").write_text(json.dumps(GRAPH))
    return root


def run_graph(workspace, capsys, *overrides) -> tuple[dict, np.ndarray]:
    args = ["run", str(workspace / "graph.json"), "--json", "--models-dir", str(workspace / "models"),
            "--input-dir", str(workspace / "input"), "--output-dir", str(workspace / "output"),
            "--temp-dir", str(workspace / "temp"), "--custom-nodes", str(workspace / "none")]
    for override in overrides:
        args += ["--set", override]
    code = main(args)
    summary = json.loads(capsys.readouterr().out)
    assert code == 0, summary
    return summary, np.asarray(Image.open(summary["outputs"][0]), dtype=np.float32)


def test_lora_two_controlnets_and_embedding_run_end_to_end(workspace, capsys):
    summary, image = run_graph(workspace, capsys)
    assert summary["status"] == "success" and summary["warnings"] == []
    assert image.shape == (64, 64, 3)
    memory = str(summary["memory"])  # the manager's stats: every model went through it
    assert memory.count("('controlnet'") == 2 and "('lora'" in memory and "('checkpoint'" in memory
    # Each ingredient changes the picture: without the LoRA, without the ControlNets, without the embedding.
    for overrides in (("2.strength_model=0", "2.strength_clip=0"), ("8.strength=0", "10.strength=0"),
                      ("3.text=a photo of",)):
        _, other = run_graph(workspace, capsys, *overrides)
        assert np.abs(other - image).max() > 0, overrides
    _, again = run_graph(workspace, capsys)
    assert np.array_equal(again, image)  # and nothing of those changes was left behind


def test_missing_embedding_is_a_run_warning(workspace, capsys):
    summary, _ = run_graph(workspace, capsys, "3.text=a photo of embedding:nobody")
    assert any("nobody" in warning for warning in summary["warnings"])
