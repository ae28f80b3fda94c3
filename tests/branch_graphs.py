"""Two-branch graphs for the model-patch tests: one tiny SD1 checkpoint, a "plain" KSampler on the loader's MODEL
and a "patched" one on a patch node's MODEL, each followed by a LatentProbe, so one run compares both branches."""

from __future__ import annotations

import json
from typing import Any

import torch


def probe_engine(tmp_path_factory: Any, name: str) -> Any:
    """An engine over a models folder with one tiny SD1 checkpoint (sd1.safetensors), LatentProbe registered."""
    from sd_probe_nodes import LatentProbe
    from tiny_models import write_tiny_checkpoint

    from latentloom.nodes import create_engine

    root = tmp_path_factory.mktemp(name)
    write_tiny_checkpoint(root / "models" / "checkpoints" / "sd1.safetensors", family="sd1", seed=0)
    engine = create_engine(models_dir=root / "models", output_dir=root / "out", temp_dir=root / "temp",
                           entry_points=False)
    engine.registry.register(LatentProbe)
    return engine


def branches_graph(patch_nodes: dict, patched_from: str | None, size: int = 128, mask_value: float | None = None,
                   sampler: str = "euler", scheduler: str = "normal") -> dict:
    """The plain branch, and the patched one sampling `patched_from`'s MODEL (None: the plain branch only).
    mask_value: the latent carries a solid noise mask of that value."""
    graph = {
        "ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd1.safetensors"}},
        "pos": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["ckpt", 1], "text": "a red square"}},
        "neg": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["ckpt", 1], "text": "blurry"}},
        "latent": {"class_type": "EmptyLatentImage", "inputs": {"width": size, "height": size, "batch_size": 1}},
        **patch_nodes,
    }
    latent = ["latent", 0]
    if mask_value is not None:
        graph["mask"] = {"class_type": "SolidMask", "inputs": {"value": mask_value, "width": size, "height": size}}
        graph["masked"] = {"class_type": "SetLatentNoiseMask", "inputs": {"samples": latent, "mask": ["mask", 0]}}
        latent = ["masked", 0]
    branches = [("plain", ["ckpt", 0])] + ([("patched", [patched_from, 0])] if patched_from else [])
    for name, model in branches:
        graph[name] = {"class_type": "KSampler", "inputs": {
            "model": model, "positive": ["pos", 0], "negative": ["neg", 0], "latent_image": latent,
            "seed": 3, "steps": 3, "cfg": 5.0, "sampler_name": sampler, "scheduler": scheduler, "denoise": 1.0}}
        graph[f"probe_{name}"] = {"class_type": "LatentProbe", "inputs": {"samples": [name, 0], "label": name}}
    return graph


def probed_latents(result: Any) -> dict[str, torch.Tensor]:
    """The latents the LatentProbe nodes of a successful run reported, by label."""
    assert result.status == "success" and not result.node_errors, (result.error, result.node_errors)
    found = {}
    for ui in result.outputs.values():
        for text in ui.get("text", []):
            entry = json.loads(text)
            found[entry["label"]] = torch.tensor(entry["samples"])
    return found
