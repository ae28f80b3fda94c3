"""The remaining model-family nodes (nodes/family_extras.py) against ComfyUI's formulas, written out here: Stable
Cascade's conditioning / latent helpers, PixArt-α's resolution options, HunyuanImage's refiner latent, and
DiffSynth's Qwen-Image ControlNet (model patch) against diffusers' Qwen-Image transformer with the control added
after each block by forward hooks. Nodes whose networks are not built must refuse clearly."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).parent))

from node_context import StubContext, make_env, run_node  # noqa: E402
from qwen_image_support import tiny_qwen_transformer, tiny_qwen_vae, wan_vae_original  # noqa: E402
from tiny_models import save_state, write_tiny_checkpoint  # noqa: E402

from latentloom.engine.inputs import InputError  # noqa: E402
from latentloom.nodes.conditioning import CLIPTextEncode  # noqa: E402
from latentloom.nodes.diffusion import dit_qwen_image  # noqa: E402
from latentloom.nodes.family_extras import (  # noqa: E402
    CLIPTextEncodeHunyuanDiT,
    CLIPTextEncodePixArtAlpha,
    HunyuanRefinerLatent,
    ModelPatchLoader,
    QwenImageDiffsynthControlnet,
    StableCascade_StageB_Conditioning,
    StableCascade_StageC_VAEEncode,
    StableCascade_SuperResolutionControlnet,
    USOStyleReference,
)
from latentloom.nodes.loaders import CheckpointLoaderSimple, UNETLoader, VAELoader  # noqa: E402
from latentloom.nodes.model_families import EmptySD3LatentImage  # noqa: E402
from latentloom.nodes.sampling import KSampler  # noqa: E402

PROMPT = "a photo of a cat"
DIM = 256  # the tiny Qwen-Image transformer's width (2 heads x 128)


# Each test builds tiny diffusers/transformers models and compares with their pipeline: seconds apiece.
pytestmark = pytest.mark.slow


def _diffsynth_state(seed: int, blocks: int, mask_channels: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)

    def rand(*shape: int, scale: float = 0.05) -> torch.Tensor:
        return torch.randn(*shape, generator=generator) * scale

    state = {"img_in.weight": rand(DIM, 64 + 4 * mask_channels), "img_in.bias": rand(DIM)}
    for i in range(blocks):
        state |= {f"controlnet_blocks.{i}.x_rms.weight": 1 + rand(DIM), f"controlnet_blocks.{i}.y_rms.weight":
                  1 + rand(DIM), f"controlnet_blocks.{i}.input_proj.weight": rand(DIM, DIM),
                  f"controlnet_blocks.{i}.input_proj.bias": rand(DIM),
                  f"controlnet_blocks.{i}.output_proj.weight": rand(DIM, DIM),
                  f"controlnet_blocks.{i}.output_proj.bias": rand(DIM)}
    return state


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("extras") / "models"
    write_tiny_checkpoint(root / "checkpoints" / "sd1.safetensors", "sd1", seed=3)
    transformer = tiny_qwen_transformer(41)
    save_state(transformer.state_dict(), root / "diffusion_models" / "qwen_image_tiny.safetensors")
    save_state(wan_vae_original(tiny_qwen_vae(42)), root / "vae" / "qwen_image_vae.safetensors")
    save_state(_diffsynth_state(43, 2), root / "model_patches" / "diffsynth_canny.safetensors")
    save_state(_diffsynth_state(44, 2, mask_channels=1), root / "model_patches" / "diffsynth_inpaint.safetensors")
    save_state(_diffsynth_state(45, 1), root / "model_patches" / "diffsynth_short.safetensors")
    save_state({"feature_embedder.mid_layer_norm.bias": torch.zeros(8)}, root / "model_patches" / "uso.safetensors")
    save_state({"something.weight": torch.zeros(2)}, root / "model_patches" / "other.safetensors")
    return root


@pytest.fixture
def ctx(models) -> StubContext:
    return StubContext(make_env(models_dir=models))


@pytest.fixture
def sd(ctx):
    return run_node(CheckpointLoaderSimple, ctx, ckpt_name="sd1.safetensors")


def test_stage_b_conditioning_and_refiner_latent_follow_comfyui(ctx, sd):
    _, clip, _ = sd
    (positive,) = run_node(CLIPTextEncode, ctx, text=PROMPT, clip=clip)
    (negative,) = run_node(CLIPTextEncode, ctx, text="", clip=clip)
    prior = torch.randn(2, 16, 3, 4)
    (staged,) = run_node(StableCascade_StageB_Conditioning, ctx, conditioning=positive, stage_c={"samples": prior})
    assert len(staged) == len(positive) and staged[0][0] is positive[0][0]
    assert staged[0][1]["stable_cascade_prior"] is prior
    assert {k: v for k, v in staged[0][1].items() if k != "stable_cascade_prior"}.keys() == positive[0][1].keys()
    assert "stable_cascade_prior" not in positive[0][1]  # the input is left as it was

    latent = torch.randn(2, 64, 6, 5)
    pos, neg, out = run_node(HunyuanRefinerLatent, ctx, positive=positive, negative=negative,
                             latent={"samples": latent}, noise_augmentation=0.25)
    for result in (pos, neg):
        assert result[0][1]["concat_latent_image"] is latent and result[0][1]["noise_augmentation"] == 0.25
    assert pos[0][0] is positive[0][0] and neg[0][0] is negative[0][0]
    # ComfyUI: zeros [batch, 32, latent.shape[-3], latent.shape[-2], latent.shape[-1]].
    assert out["samples"].shape == (2, 32, 64, 6, 5) and not out["samples"].any()


def test_pixart_alpha_encode_adds_the_resolution(ctx, sd):
    _, clip, _ = sd
    (plain,) = run_node(CLIPTextEncode, ctx, text=PROMPT, clip=clip)
    (pixart,) = run_node(CLIPTextEncodePixArtAlpha, ctx, width=768, height=512, text=PROMPT, clip=clip)
    torch.testing.assert_close(pixart[0][0], plain[0][0], rtol=0, atol=0)
    torch.testing.assert_close(pixart[0][1]["pooled_output"], plain[0][1]["pooled_output"], rtol=0, atol=0)
    assert pixart[0][1]["width"] == 768 and pixart[0][1]["height"] == 512


def test_stage_c_vae_encode_resizes_then_encodes(ctx, sd):
    _, _, vae = sd
    image = torch.rand(1, 90, 64, 3)
    stage_c, stage_b = run_node(StableCascade_StageC_VAEEncode, ctx, image=image, vae=vae, compression=16)
    # ComfyUI: target (w // compression, h // compression) · downscale; centre crop to the target's aspect, bicubic.
    out_w, out_h = (64 // 16) * 8, (90 // 16) * 8
    crop = round((90 - 90 * ((64 / 90) / (out_w / out_h))) / 2)  # old aspect < new: rows are cut
    resized = F.interpolate(image.movedim(-1, 1)[:, :, crop:90 - crop], size=(out_h, out_w), mode="bicubic")
    expected = vae.encode(resized.movedim(1, -1))
    assert stage_c["samples"].shape == (1, 4, out_h // 8, out_w // 8)
    torch.testing.assert_close(stage_c["samples"], expected, rtol=0, atol=1e-6)
    assert stage_b["samples"].shape == (1, 4, (90 // 8) * 2, (64 // 8) * 2) and not stage_b["samples"].any()
    with pytest.raises(InputError, match=r"StableCascade_StageC_VAEEncode.*'compression'.*no latent cell"):
        run_node(StableCascade_StageC_VAEEncode, ctx, image=torch.rand(1, 40, 64, 3), vae=vae, compression=64)


def test_super_resolution_controlnet_outputs(ctx, sd):
    _, _, vae = sd
    image = torch.rand(2, 48, 64, 4)
    hint, stage_c, stage_b = run_node(StableCascade_SuperResolutionControlnet, ctx, image=image, vae=vae)
    torch.testing.assert_close(hint, vae.encode(image[..., :3]).movedim(1, -1), rtol=0, atol=1e-6)
    assert stage_c["samples"].shape == (2, 16, 3, 4) and stage_b["samples"].shape == (2, 4, 24, 32)
    assert not stage_c["samples"].any() and not stage_b["samples"].any()


def test_unbuilt_networks_are_refused_clearly(ctx, sd):
    model, clip, _ = sd
    with pytest.raises(InputError, match=r"CLIPTextEncodeHunyuanDiT.*'clip'.*BERT \+ mT5-XL.*not supported yet"):
        run_node(CLIPTextEncodeHunyuanDiT, ctx, clip=clip, bert=PROMPT, mt5xl=PROMPT)
    with pytest.raises(InputError, match=r"ModelPatchLoader.*'name'.*uso\.safetensors.*USO.*not supported yet"):
        run_node(ModelPatchLoader, ctx, name="uso.safetensors")
    with pytest.raises(InputError, match=r"ModelPatchLoader.*'name'.*other\.safetensors.*not a model patch"):
        run_node(ModelPatchLoader, ctx, name="other.safetensors")
    (patch,) = run_node(ModelPatchLoader, ctx, name="diffsynth_canny.safetensors")
    with pytest.raises(InputError, match=r"USOStyleReference.*'model_patch'.*USO style references are not supported"):
        run_node(USOStyleReference, ctx, model=model, model_patch=patch, clip_vision_output=object())


def _rms(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * weight


def _pack(latent: torch.Tensor) -> torch.Tensor:
    n, c, h, w = latent.shape
    return latent.view(n, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(n, h * w // 4, c * 4)


def _reference_output(network, state, control_latent, strength, x, sigma, context):
    """diffusers' transformer with ComfyUI's DiffSynth formula added to each block's image output by hooks."""
    control = _pack(control_latent) @ state["img_in.weight"].T + state["img_in.bias"]

    def hook(index):
        def add(module, args, output):
            txt, img = output
            p = f"controlnet_blocks.{index}."
            y = _rms(img, state[p + "x_rms.weight"]) + _rms(control, state[p + "y_rms.weight"])
            y = F.gelu(y @ state[p + "input_proj.weight"].T + state[p + "input_proj.bias"])
            y = y @ state[p + "output_proj.weight"].T + state[p + "output_proj.bias"]
            return txt, img + strength * y
        return add

    handles = [block.register_forward_hook(hook(i)) for i, block in enumerate(network.transformer_blocks)]
    try:
        with torch.no_grad():
            out = network(hidden_states=_pack(x), encoder_hidden_states=context, timestep=sigma,
                          img_shapes=[[(1, x.shape[-2] // 2, x.shape[-1] // 2)]] * x.shape[0]).sample
    finally:
        for handle in handles:
            handle.remove()
    return dit_qwen_image.unpack(out, 16, x.shape[-2], x.shape[-1])


def test_diffsynth_controlnet_matches_the_formula_on_diffusers(ctx, models):
    from safetensors.torch import load_file

    (model,) = run_node(UNETLoader, ctx, unet_name="qwen_image_tiny.safetensors", weight_dtype="default")
    (vae,) = run_node(VAELoader, ctx, vae_name="qwen_image_vae.safetensors")
    network = tiny_qwen_transformer(41)
    config = tiny_qwen_vae(42).config  # diffusers' Wan 2.1 latent statistics
    mean = torch.tensor(config.latents_mean).view(1, 16, 1, 1)
    std = torch.tensor(config.latents_std).view(1, 16, 1, 1)
    generator = torch.Generator().manual_seed(7)
    x = torch.randn(2, 16, 8, 12, generator=generator)
    context = torch.randn(2, 5, 256, generator=generator)
    sigma = torch.tensor([0.6, 0.6])
    image = torch.rand(1, 64, 96, 3, generator=generator)
    raw = vae.encode(image)

    (patch,) = run_node(ModelPatchLoader, ctx, name="diffsynth_canny.safetensors")
    (patched,) = run_node(QwenImageDiffsynthControlnet, ctx, model=model, model_patch=patch, vae=vae, image=image,
                          strength=0.8)
    with torch.no_grad():
        ours = dit_qwen_image.forward(patched.unet, x, sigma, context, {}, patched.options["transformer_options"])
        plain = dit_qwen_image.forward(model.unet, x, sigma, context, {}, model.options.get("transformer_options", {}))
    state = load_file(models / "model_patches" / "diffsynth_canny.safetensors")
    expected = _reference_output(network, state, (raw - mean) / std, 0.8, x, sigma, context)
    difference = (ours - expected).abs().max().item()
    print(f"DiffSynth ControlNet call max |diff| = {difference:.3g}")
    assert difference <= 1e-5 and (ours - plain).abs().max() > 1e-3
    assert "transformer_options" not in model.options or not model.options["transformer_options"].get("patches")

    # The inpainting variant reads an inverted mask, bilinearly resized to the latent, as a fifth latent channel.
    mask = torch.zeros(1, 64, 96)
    mask[:, 16:48, 24:72] = 1.0
    (patch,) = run_node(ModelPatchLoader, ctx, name="diffsynth_inpaint.safetensors")
    (patched,) = run_node(QwenImageDiffsynthControlnet, ctx, model=model, model_patch=patch, vae=vae, image=image,
                          strength=1.0, mask=mask)
    with torch.no_grad():
        ours = dit_qwen_image.forward(patched.unet, x, sigma, context, {}, patched.options["transformer_options"])
    kept = F.interpolate((1.0 - mask)[:, None], size=(8, 12), mode="bilinear")
    state = load_file(models / "model_patches" / "diffsynth_inpaint.safetensors")
    expected = _reference_output(network, state, torch.cat([(raw - mean) / std, kept], dim=1), 1.0, x, sigma,
                                 context)
    difference = (ours - expected).abs().max().item()
    print(f"DiffSynth inpainting ControlNet call max |diff| = {difference:.3g}")
    assert difference <= 1e-5

    # An image of another size is area-resized (centre crop to the latent's aspect) before encoding.
    large = torch.rand(1, 128, 160, 3, generator=generator)
    (patch,) = run_node(ModelPatchLoader, ctx, name="diffsynth_canny.safetensors")
    (patched,) = run_node(QwenImageDiffsynthControlnet, ctx, model=model, model_patch=patch, vae=vae, image=large,
                          strength=0.5)
    with torch.no_grad():
        ours = dit_qwen_image.forward(patched.unet, x, sigma, context, {}, patched.options["transformer_options"])
    crop = round((128 - 128 * ((160 / 128) / (96 / 64))) / 2)  # old aspect < new: rows are cut
    resized = F.interpolate(large.movedim(-1, 1)[:, :, crop:128 - crop], size=(64, 96), mode="area")
    state = load_file(models / "model_patches" / "diffsynth_canny.safetensors")
    latent = (vae.encode(resized.movedim(1, -1)) - mean) / std
    difference = (ours - _reference_output(network, state, latent, 0.5, x, sigma, context)).abs().max().item()
    assert difference <= 1e-5

    # Through KSampler: the hook reaches the sampler's model calls.
    (empty,) = run_node(EmptySD3LatentImage, ctx, width=96, height=64, batch_size=1)
    positive, negative = [[context[:1], {}]], [[torch.zeros(1, 5, 256), {}]]
    sampled = [run_node(KSampler, ctx, model=m, seed=3, steps=2, cfg=2.0, sampler_name="euler", scheduler="simple",
                        positive=positive, negative=negative, latent_image=empty, denoise=1.0)[0]["samples"]
               for m in (model, patched)]
    assert sampled[0].shape == (1, 16, 8, 12) and (sampled[0] - sampled[1]).abs().max() > 1e-3


def test_diffsynth_controlnet_refuses_what_it_cannot_patch(ctx, sd):
    sd_model, _, sd_vae = sd
    (model,) = run_node(UNETLoader, ctx, unet_name="qwen_image_tiny.safetensors", weight_dtype="default")
    (vae,) = run_node(VAELoader, ctx, vae_name="qwen_image_vae.safetensors")
    (patch,) = run_node(ModelPatchLoader, ctx, name="diffsynth_canny.safetensors")
    (short,) = run_node(ModelPatchLoader, ctx, name="diffsynth_short.safetensors")
    image = torch.rand(1, 32, 32, 3)
    with pytest.raises(InputError, match=r"QwenImageDiffsynthControlnet.*'model'.*sd1 model"):
        run_node(QwenImageDiffsynthControlnet, ctx, model=sd_model, model_patch=patch, vae=vae, image=image)
    with pytest.raises(InputError, match=r"'model_patch'.*1 blocks.*2 blocks"):
        run_node(QwenImageDiffsynthControlnet, ctx, model=model, model_patch=short, vae=vae, image=image)
    with pytest.raises(InputError, match=r"'vae'.*4-channel"):
        run_node(QwenImageDiffsynthControlnet, ctx, model=model, model_patch=patch, vae=sd_vae, image=image)
