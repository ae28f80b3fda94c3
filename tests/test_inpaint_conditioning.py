"""InpaintModelConditioning (ComfyUI's nodes.py) and the sampler's use of its `concat_latent_image` / `concat_mask`
for 9-channel inpainting UNets: the pixel and mask formulas, the extra UNet input channels, and a graph through the
engine on the tiny SD1 inpainting checkpoint."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from image_support import LocalAutoencoder
from node_context import StubContext, make_env, run_node
from PIL import Image
from tiny_models import write_tiny_checkpoint

from latentloom.engine.inputs import InputError
from latentloom.nodes import create_engine
from latentloom.nodes.conditioning import InpaintModelConditioning
from latentloom.nodes.diffusion.vae import VAEModel
from latentloom.nodes.image import LoadImage
from latentloom.nodes.loaders import CheckpointLoaderSimple
from latentloom.nodes.sampling import KSampler

TESTS = Path(__file__).resolve().parent
SIZE = 64
HOLE = slice(16, 48)  # the transparent square of the input picture: the mask (1 - alpha)


def conditioning(value: float, **options):
    return [[torch.full((1, 77, 32), value), {"pooled_output": torch.zeros(1, 32), **options}]]


@pytest.fixture
def local_vae():
    return VAEModel(LocalAutoencoder())  # latent = 1x1 conv of the 8x8 pixel means: linear and exact


def centred_crop(height: int, width: int) -> tuple[slice, slice]:
    top, left = (height % 8) // 2, (width % 8) // 2
    return slice(top, top + height // 8 * 8), slice(left, left + width // 8 * 8)


# --- the node's formulas -------------------------------------------------------------------------------------

def test_masked_pixels_mask_and_latent(local_vae):
    torch.manual_seed(0)
    pixels = torch.rand(2, 35, 42, 3)  # 35 % 8 = 3 -> rows 1..33; 42 % 8 = 2 -> columns 1..41
    mask = torch.rand(2, 20, 21)
    positive, negative = conditioning(1.0, strength=0.5), conditioning(2.0)
    pos, neg, latent = run_node(InpaintModelConditioning, positive=positive, negative=negative, vae=local_vae,
                                pixels=pixels, mask=mask, noise_mask=True)

    rows, cols = centred_crop(35, 42)
    resized = F.interpolate(mask[:, None], size=(35, 42), mode="bilinear", align_corners=False)[:, :, rows, cols]
    cropped = pixels[:, rows, cols]
    masked = torch.where(resized.movedim(1, -1) >= 0.5, torch.full_like(cropped, 0.5), cropped)
    assert torch.equal(local_vae.encode(masked), pos[0][1]["concat_latent_image"])
    assert torch.allclose(pos[0][1]["concat_mask"], resized) and pos[0][1]["concat_mask"].shape == (2, 1, 32, 40)
    assert torch.equal(latent["samples"], local_vae.encode(pixels))  # the whole picture, unmasked
    assert torch.equal(latent["noise_mask"], pos[0][1]["concat_mask"])  # unrounded, at pixel resolution
    # Both conditionings get the same values; everything else is kept and the inputs are not changed.
    for out_cond, given in ((pos, positive), (neg, negative)):
        assert out_cond[0][0] is given[0][0]
        assert out_cond[0][1]["concat_latent_image"] is pos[0][1]["concat_latent_image"]
        assert set(out_cond[0][1]) == set(given[0][1]) | {"concat_latent_image", "concat_mask"}
        assert "concat_mask" not in given[0][1]
    assert pos[0][1]["strength"] == 0.5


def test_mask_is_rounded_before_greying(local_vae):
    pixels = torch.rand(1, 16, 16, 3)
    for level, grey in ((0.49, False), (0.5, False), (0.51, True)):  # round half to even: 0.5 -> 0
        pos, _, _ = run_node(InpaintModelConditioning, positive=conditioning(0), negative=conditioning(0),
                             vae=local_vae, pixels=pixels, mask=torch.full((16, 16), level))
        expected = torch.full_like(pixels, 0.5) if grey else pixels
        assert torch.equal(pos[0][1]["concat_latent_image"], local_vae.encode(expected)), level


def test_noise_mask_off_leaves_the_latent_unmasked(local_vae):
    _, _, latent = run_node(InpaintModelConditioning, positive=conditioning(0), negative=conditioning(0),
                            vae=local_vae, pixels=torch.rand(1, 16, 16, 3), mask=torch.ones(16, 16),
                            noise_mask=False)
    assert set(latent) == {"samples"}


def test_mask_batch_must_match(local_vae):
    with pytest.raises(InputError) as caught:
        run_node(InpaintModelConditioning, positive=conditioning(0), negative=conditioning(0), vae=local_vae,
                 pixels=torch.rand(2, 16, 16, 3), mask=torch.ones(3, 16, 16))
    assert "input 'mask'" in str(caught.value) and "InpaintModelConditioning (#1)" in str(caught.value)


# --- on the tiny SD1 inpainting checkpoint --------------------------------------------------------------------

@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("inpaint")
    write_tiny_checkpoint(root / "models" / "checkpoints" / "inpaint.safetensors", family="sd1_inpaint", seed=0)
    (root / "custom_nodes").mkdir()
    shutil.copy(TESTS / "sd_probe_nodes.py", root / "custom_nodes" / "sd_probe_nodes.py")
    (root / "input").mkdir()
    y, x = np.mgrid[0:SIZE, 0:SIZE]
    rgb = np.stack([x * 4, y * 4, 255 - (x + y) * 2], axis=-1).astype(np.uint8)
    alpha = np.full((SIZE, SIZE), 255, dtype=np.uint8)
    alpha[HOLE, HOLE] = 0
    Image.fromarray(np.dstack([rgb, alpha]), "RGBA").save(root / "input" / "photo.png")
    return root


@pytest.mark.slow  # writing the tiny checkpoint takes a few seconds
def test_unet_gets_the_conditioning_mask_and_masked_picture_channels(workspace):
    ctx = StubContext(env=make_env(workspace, models_dir=workspace / "models"))
    model, clip, vae = run_node(CheckpointLoaderSimple, ctx, ckpt_name="inpaint.safetensors")
    pixels, mask = run_node(LoadImage, ctx, image="photo.png")
    assert model.unet.config.in_channels == 9
    seen: list[torch.Tensor] = []
    hook = model.unet.register_forward_pre_hook(lambda module, args: seen.append(args[0].clone()))
    try:
        for noise_mask in (True, False):
            seen.clear()
            pos, neg, latent = run_node(InpaintModelConditioning, ctx, positive=conditioning(0.3),
                                        negative=conditioning(-0.3), vae=vae, pixels=pixels, mask=mask,
                                        noise_mask=noise_mask)
            run_node(KSampler, ctx, model=model, seed=3, steps=2, cfg=3.0, sampler_name="euler",
                     scheduler="normal", positive=pos, negative=neg, latent_image=latent, denoise=1.0)
            sample = seen[0]
            assert sample.shape == (2, 9, 8, 8)  # [uncond, cond] x [latent, mask, masked picture]
            # The mask channel: the pixel mask bilinearly to 8x8 and rounded (the hole is cells 2..5).
            expected_mask = F.interpolate(mask[None], size=(8, 8), mode="bilinear").round()[:, 0]
            assert torch.equal(expected_mask[0, 2:6, 2:6], torch.ones(4, 4)) and expected_mask.sum() == 16
            assert torch.equal(sample[:, 4], expected_mask.expand(2, 8, 8))
            # The masked-picture channels: the VAE latent of the picture with the hole grey, scaled like any
            # latent entering the UNet (0.18215) but not by c_in.
            grey = pixels.clone()
            grey[:, HOLE, HOLE, :3] = 0.5
            expected_image = vae.encode(grey) * 0.18215
            assert torch.allclose(sample[:, 5:], expected_image.expand(2, 4, 8, 8), atol=1e-6)
    finally:
        hook.remove()


@pytest.mark.slow
def test_inpaint_graph_through_the_engine(workspace):
    engine = create_engine(models_dir=workspace / "models", input_dir=workspace / "input",
                           output_dir=workspace / "output", custom_nodes_dir=workspace / "custom_nodes",
                           entry_points=False)
    prompt = {
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "inpaint.safetensors"}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a red door", "clip": ["4", 1]}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["4", 1]}},
        "10": {"class_type": "LoadImage", "inputs": {"image": "photo.png"}},
        "12": {"class_type": "InpaintModelConditioning", "inputs": {
            "positive": ["6", 0], "negative": ["7", 0], "vae": ["4", 2], "pixels": ["10", 0], "mask": ["10", 1],
            "noise_mask": True}},
        "3": {"class_type": "KSampler", "inputs": {
            "seed": 5, "steps": 3, "cfg": 4.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0,
            "model": ["4", 0], "positive": ["12", 0], "negative": ["12", 1], "latent_image": ["12", 2]}},
        "20": {"class_type": "LatentProbe", "inputs": {"samples": ["3", 0], "label": "out"}},
        "21": {"class_type": "LatentProbe", "inputs": {"samples": ["12", 2], "label": "in"}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
        "9": {"class_type": "SaveImage", "inputs": {"filename_prefix": "inpaint", "images": ["8", 0]}},
    }
    result = engine.run(prompt)
    assert result.status == "success", result.error
    probes = {}
    for node_id in ("20", "21"):
        entry = json.loads(result.outputs[node_id]["text"][0])
        probes[entry["label"]] = torch.tensor(entry["samples"])
    source, sampled = probes["in"], probes["out"]
    assert sampled.shape == source.shape == (1, 4, 8, 8)
    # The noise mask keeps every latent cell the mask does not touch (up to the latent scaling's round trip);
    # the hole is repainted.
    outside = torch.ones(8, 8, dtype=torch.bool)
    outside[1:7, 1:7] = False
    assert torch.allclose(sampled[..., outside], source[..., outside], atol=1e-5)
    assert (sampled[..., 2:6, 2:6] - source[..., 2:6, 2:6]).abs().mean() > 0.1
    (image,) = result.outputs["9"]["images"]
    assert (workspace / "output" / image["filename"]).exists()

    # Without the noise mask the whole latent is sampled anew.
    prompt["12"]["inputs"]["noise_mask"] = False
    whole = engine.run(prompt)
    assert whole.status == "success", whole.error
    probe = {json.loads(whole.outputs[n]["text"][0])["label"]: torch.tensor(json.loads(whole.outputs[n]["text"][0])
                                                                            ["samples"]) for n in ("20", "21")}
    assert (probe["out"][..., outside] - probe["in"][..., outside]).abs().mean() > 0.1
