"""A LoRA graph run again through the engine: the UNet keeps its patch while the same LoRA is asked for (a warm run
re-patches nothing), swaps it once when the strength changes, and is restored bit-exactly for the plain graph."""

from __future__ import annotations

import pytest
import torch
from adapter_support import kohya_lora_for_all, save_safetensors, tiny_objects
from node_context import StubContext
from tiny_models import write_tiny_checkpoint

from latentloom import nodes
from latentloom.engine.memory import ModelManager
from latentloom.nodes.diffusion import lora as lora_math
from latentloom.nodes.loaders import CheckpointLoaderSimple

pytestmark = pytest.mark.slow


def lora_graph(seed: int, strength: float = 1.0, with_lora: bool = True) -> dict:
    source = "2" if with_lora else "1"
    graph = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "tiny.safetensors"}},
        "2": {"class_type": "LoraLoader", "inputs": {
            "model": ["1", 0], "clip": ["1", 1], "lora_name": "all.safetensors", "strength_model": strength,
            "strength_clip": strength}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "a cat", "clip": [source, 1]}},
        "4": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": [source, 1]}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "6": {"class_type": "KSampler", "inputs": {
            "model": [source, 0], "positive": ["3", 0], "negative": ["4", 0], "latent_image": ["5", 0], "seed": seed,
            "steps": 2, "cfg": 7.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        "7": {"class_type": "VAEDecode", "inputs": {"samples": ["6", 0], "vae": ["1", 2]}},
        "8": {"class_type": "SaveImage", "inputs": {"images": ["7", 0], "filename_prefix": f"s{seed}_{strength}"}},
    }
    if not with_lora:
        del graph["2"]
    return graph


def new_engine(root, name: str):
    engine = nodes.create_engine(models_dir=root / "models", input_dir=root / "in", output_dir=root / name,
                                 temp_dir=root / "tmp", entry_points=False)
    engine.env.register(ModelManager(device="cpu"))
    return engine


def loaded_unet(engine) -> torch.nn.Module:
    """The UNet the engine's memory manager holds for tiny.safetensors (the loader node hits the loaded entry)."""
    model, _, _ = CheckpointLoaderSimple.model_construct(ckpt_name="tiny.safetensors").run(StubContext(engine.env))
    return model.unet


def saved_name(result) -> str:
    (image,) = result.outputs["8"]["images"]
    return image["filename"]


def test_warm_lora_runs_patch_nothing_and_changes_swap_exactly(tmp_path, monkeypatch):
    write_tiny_checkpoint(tmp_path / "models" / "checkpoints" / "tiny.safetensors", "sd1")
    model, clip = tiny_objects("sd1")
    save_safetensors(kohya_lora_for_all(model, clip), tmp_path / "models" / "loras" / "all.safetensors")
    patched_modules: list[torch.nn.Module] = []
    real_apply = lora_math.LoraPatch.apply

    def counting_apply(patch, module):
        patched_modules.append(module)
        return real_apply(patch, module)

    monkeypatch.setattr(lora_math.LoraPatch, "apply", counting_apply)
    engine = new_engine(tmp_path, "out")
    assert engine.run(lora_graph(seed=1, with_lora=False)).status == "success"
    unet = loaded_unet(engine)
    assert engine.env.models.stats().loads == 1
    pristine = {name: value.clone() for name, value in unet.state_dict().items()}

    def unet_patches() -> int:
        return sum(module is unet for module in patched_modules)

    first = engine.run(lora_graph(seed=1))
    assert first.status == "success", first.error
    assert unet_patches() == 1
    assert any(not torch.equal(value, pristine[name]) for name, value in unet.state_dict().items())
    for seed in (2, 3):  # warm: new seeds re-sample with the patch already on the UNet
        warm = engine.run(lora_graph(seed=seed))
        assert warm.status == "success", warm.error
    assert unet_patches() == 1

    # The warm run's image is the one a fresh engine (patching once, cold) gives for the same seed.
    fresh = new_engine(tmp_path, "fresh").run(lora_graph(seed=3))
    assert (tmp_path / "out" / saved_name(warm)).read_bytes() == \
        (tmp_path / "fresh" / saved_name(fresh)).read_bytes()

    assert engine.run(lora_graph(seed=3, strength=0.5)).status == "success"  # another strength: one swap
    assert unet_patches() == 2
    assert engine.run(lora_graph(seed=4, with_lora=False)).status == "success"  # the plain graph: pristine
    assert all(torch.equal(value, pristine[name]) for name, value in unet.state_dict().items())
    assert unet_patches() == 2
