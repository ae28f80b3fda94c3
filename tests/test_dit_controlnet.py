"""SD3 and Flux ControlNets through ControlNetLoader and the apply nodes, against diffusers' ControlNet pipelines.

Tiny random SD3ControlNetModel / FluxControlNetModel nets are written in the layouts ComfyUI users download
(SD3 InstantX and Flux InstantX files use diffusers' own names; XLabs Flux files BFL's names plus the net's own
parts), loaded through ControlNetLoader and sampled with KSampler after ControlNetApplySD3 /
ControlNetApplyAdvanced. The references are StableDiffusion3ControlNetPipeline and FluxControlNetPipeline built
from the same weights, run with the same noise, sigmas and text embeddings (passed directly) and compared in the
network's latent space. The VAEs' encoders get a negligible variance (log-variance −30) so that the pipelines'
sampled control latents equal the mean ComfyUI encodes.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import dataclasses  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from node_context import StubContext, make_env, run_node  # noqa: E402
from test_family_loading import _perturbed, flux_original, folder  # noqa: E402
from test_flux_sampling import tiny_flux_for_text  # noqa: E402
from test_sd3_sampling import (  # noqa: E402
    JOINT_WIDTH,
    NEGATIVE,
    POOLED_WIDTH,
    PROMPT,
    STEPS,
    comfy_noise,
    embeds,
    encode,
    ksample,
    load,
    pipeline,
    tiny_parts,
    unshifted_sigmas,
    write_files,
)
from tiny_models import save_state  # noqa: E402

from latentloom.nodes.controlnet import ControlNetApplyAdvanced, ControlNetLoader  # noqa: E402
from latentloom.nodes.diffusion import convert, dit_flux  # noqa: E402
from latentloom.nodes.diffusion.latent_formats import FLUX_LATENT, SD3_LATENT  # noqa: E402
from latentloom.nodes.family_controlnets import ControlNetApplySD3, ControlNetInpaintingAliMamaApply  # noqa: E402
from latentloom.nodes.loaders import UNETLoader, VAELoader  # noqa: E402
from latentloom.nodes.sampling import BasicScheduler, KSampler  # noqa: E402

# Each test builds tiny diffusers/transformers models and compares with their pipeline: seconds apiece.
pytestmark = pytest.mark.slow


def _strong(module: torch.nn.Module, prefixes: tuple[str, ...], seed: int) -> torch.nn.Module:
    """The zero-initialised parts of a fresh ControlNet given weights large enough to matter."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in module.named_parameters():
            if name.startswith(prefixes):
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)
    return module


def _near_deterministic(vae: torch.nn.Module) -> torch.nn.Module:
    """The encoder's log-variance channels constant −30: its samples equal its mean to ~1e-7."""
    conv = vae.encoder.conv_out
    half = conv.out_channels // 2
    with torch.no_grad():
        conv.weight[half:] = 0
        conv.bias[half:] = -30.0
    return vae


def hint_image(height: int, width: int, seed: int) -> torch.Tensor:
    return torch.rand(1, height, width, 3, generator=torch.Generator().manual_seed(seed))


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


@pytest.fixture
def ctx(tmp_path) -> StubContext:
    return StubContext(make_env(tmp_path, models_dir=tmp_path / "models"))


# SD3 -------------------------------------------------------------------------------------------------------------

def sd3_controlnet(seed: int, extra_channels: int = 0) -> torch.nn.Module:
    from diffusers import SD3ControlNetModel

    torch.manual_seed(seed)
    net = SD3ControlNetModel(sample_size=8, patch_size=2, in_channels=16, num_layers=2, attention_head_dim=64,
                             num_attention_heads=2, joint_attention_dim=JOINT_WIDTH, caption_projection_dim=128,
                             pooled_projection_dim=POOLED_WIDTH, out_channels=16, pos_embed_max_size=12,
                             extra_conditioning_channels=extra_channels)
    return _strong(_perturbed(net, seed), ("controlnet_blocks.", "pos_embed_input."), seed)


def sd3_parts(seed: int):
    """test_sd3_sampling's tiny SD3 with four joint blocks (two per ControlNet block) and a near-deterministic VAE."""
    from diffusers import SD3Transformer2DModel

    parts = tiny_parts(seed, "sd3")
    torch.manual_seed(seed)
    transformer = _perturbed(SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=16, num_layers=4, attention_head_dim=64, num_attention_heads=2,
        joint_attention_dim=JOINT_WIDTH, caption_projection_dim=128, pooled_projection_dim=POOLED_WIDTH,
        out_channels=16, pos_embed_max_size=12), seed)
    return dataclasses.replace(parts, transformer=transformer, vae=_near_deterministic(parts.vae))


def test_sd3_controlnet_sampling_matches_the_controlnet_pipeline(ctx):
    from diffusers import StableDiffusion3ControlNetPipeline

    parts, net = sd3_parts(60), sd3_controlnet(61)
    write_files(ctx.env, parts, "sd3.safetensors")
    save_state(net.state_dict(), folder(ctx.env, "controlnet") / "sd3_canny.safetensors")
    loaded = load(ctx, "sd3.safetensors")
    (control_net,) = run_node(ControlNetLoader, ctx, control_net_name="sd3_canny.safetensors")
    assert (control_net.family, control_net.kind) == ("sd3", "sd3")
    positive, negative = encode(ctx, loaded.clip, PROMPT), encode(ctx, loaded.clip, NEGATIVE)
    image = hint_image(16, 16, 62)  # the tiny VAE halves once: latent 8×8
    latent = {"samples": torch.zeros(1, 16, 8, 8)}
    noise = comfy_noise((1, 16, 8, 8), 63)
    plain = SD3_LATENT.process_in(ksample(ctx, loaded.model, positive, negative, 4.0, 63, latent))

    pipe = StableDiffusion3ControlNetPipeline(**pipeline(parts).components, controlnet=net)
    cond, pooled = embeds(positive)
    uncond, uncond_pooled = embeds(negative)
    differences = {}
    for strength in (0.8, 2.0):
        controlled = run_node(ControlNetApplySD3, ctx, positive=positive, negative=negative,
                              control_net=control_net, vae=loaded.vae, image=image, strength=strength,
                              start_percent=0.0, end_percent=1.0)
        ours = SD3_LATENT.process_in(ksample(ctx, loaded.model, *controlled, 4.0, 63, latent))
        with torch.no_grad():
            theirs = pipe(prompt_embeds=cond, pooled_prompt_embeds=pooled, negative_prompt_embeds=uncond,
                          negative_pooled_prompt_embeds=uncond_pooled, guidance_scale=4.0,
                          sigmas=unshifted_sigmas(STEPS), latents=noise, height=16, width=16,
                          control_image=image.movedim(-1, 1) * 2 - 1, controlnet_conditioning_scale=strength,
                          output_type="latent").images
        differences[strength] = max_diff(ours, theirs)
        assert max_diff(ours, plain) > 1e-2  # the ControlNet changed the result
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-4)
    print(f"SD3 ControlNet: max |latent difference| by strength {differences}")

    # The same through ControlNetApplyAdvanced with its vae input; strength 0 is no ControlNet at all.
    advanced = run_node(ControlNetApplyAdvanced, ctx, positive=positive, negative=negative, control_net=control_net,
                        image=image, strength=0.8, start_percent=0.0, end_percent=1.0, vae=loaded.vae)
    via_sd3 = run_node(ControlNetApplySD3, ctx, positive=positive, negative=negative, control_net=control_net,
                       vae=loaded.vae, image=image, strength=0.8, start_percent=0.0, end_percent=1.0)
    torch.testing.assert_close(ksample(ctx, loaded.model, *advanced, 4.0, 63, latent),
                               ksample(ctx, loaded.model, *via_sd3, 4.0, 63, latent), rtol=0, atol=0)
    off = run_node(ControlNetApplySD3, ctx, positive=positive, negative=negative, control_net=control_net,
                   vae=loaded.vae, image=image, strength=0.0, start_percent=0.0, end_percent=1.0)
    torch.testing.assert_close(SD3_LATENT.process_in(ksample(ctx, loaded.model, *off, 4.0, 63, latent)), plain,
                               rtol=0, atol=0)
    # A σ window that ends before the first step leaves the result as without the ControlNet.
    late = run_node(ControlNetApplySD3, ctx, positive=positive, negative=negative, control_net=control_net,
                    vae=loaded.vae, image=image, strength=1.0, start_percent=0.99, end_percent=1.0)
    torch.testing.assert_close(SD3_LATENT.process_in(ksample(ctx, loaded.model, *late, 4.0, 63, latent)), plain,
                               rtol=0, atol=1e-6)
    # No VAE: a clear error naming the input.
    with pytest.raises(ValueError, match=r"ControlNetApplyAdvanced \(#1\): input 'vae': .*VAE"):
        run_node(ControlNetApplyAdvanced, ctx, positive=positive, negative=negative, control_net=control_net,
                 image=image, strength=1.0, start_percent=0.0, end_percent=1.0)


def test_sd3_inpainting_controlnet_reads_the_masked_hint_and_the_kept_area(ctx):
    """ControlNetInpaintingAliMamaApply: the hint pixels under the mask blanked, then (1 − mask) resized to the
    latent as the 17th hint channel (ComfyUI's extra_concat), fed to the net's patch embedder."""
    from latentloom.nodes.diffusion.denoiser import ModelCall
    from latentloom.nodes.diffusion.dit_sd3 import conditioning
    from latentloom.nodes.diffusion.schedules import schedule_for

    parts, net = sd3_parts(64), sd3_controlnet(65, extra_channels=1)
    write_files(ctx.env, parts, "sd3.safetensors")
    save_state(net.state_dict(), folder(ctx.env, "controlnet") / "sd3_inpaint.safetensors")
    loaded = load(ctx, "sd3.safetensors")
    (control_net,) = run_node(ControlNetLoader, ctx, control_net_name="sd3_inpaint.safetensors")
    assert control_net.concat_mask
    positive = encode(ctx, loaded.clip, PROMPT)
    image, mask = hint_image(16, 16, 66), torch.zeros(1, 16, 16)
    mask[:, 4:12, 2:10] = 1.0
    pos, _ = run_node(ControlNetInpaintingAliMamaApply, ctx, positive=positive, negative=positive,
                      control_net=control_net, vae=loaded.vae, image=image, mask=mask, strength=1.5,
                      start_percent=0.0, end_percent=1.0)
    applied = pos[0][1]["control"]
    generator = torch.Generator().manual_seed(67)
    x, sigma = torch.randn(1, 16, 8, 8, generator=generator), torch.tensor([0.7])
    cond, pooled = embeds(positive)
    added = conditioning({"pooled_output": pooled}, x.shape, torch.device("cpu"))
    call = ModelCall(loaded.model, loaded.model.unet, schedule_for(loaded.model.sampling))
    with torch.no_grad():
        ours = call(x, sigma, cond, added, control=applied)
        keep = 1.0 - mask[:, None]
        pixels = image.movedim(-1, 1) * keep
        latent = parts.vae.encode(pixels * 2 - 1).latent_dist.mean * SD3_LATENT.scale_factor
        hint = torch.cat([latent, torch.nn.functional.interpolate(keep, size=(8, 8), mode="nearest-exact")], 1)
        samples = net(hidden_states=x, controlnet_cond=hint, conditioning_scale=1.5, timestep=sigma * 1000,
                      encoder_hidden_states=cond, pooled_projections=torch.zeros(1, POOLED_WIDTH),
                      return_dict=False)[0]
        velocity = parts.transformer(hidden_states=x, timestep=sigma * 1000, encoder_hidden_states=cond,
                                     pooled_projections=pooled, block_controlnet_hidden_states=samples,
                                     return_dict=False)[0]
        plain = call(x, sigma, cond, added)
    torch.testing.assert_close(ours, x - 0.7 * velocity, rtol=0, atol=1e-5)
    assert max_diff(ours, plain) > 1e-3


# Flux ------------------------------------------------------------------------------------------------------------

def flux_vae(seed: int) -> torch.nn.Module:
    """A 16-channel VAE that downsamples 8× as Flux's does (the hint size is 8× the latent for every net)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    vae = _perturbed(AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(32, 32, 32, 32), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32,
        use_quant_conv=False, use_post_quant_conv=False), seed)
    vae.register_to_config(scaling_factor=FLUX_LATENT.scale_factor, shift_factor=FLUX_LATENT.shift_factor)
    return _near_deterministic(vae)


def flux_controlnet(seed: int, xlabs: bool = False, **config) -> torch.nn.Module:
    from diffusers import FluxControlNetModel

    torch.manual_seed(seed)
    base = dict(patch_size=2 if xlabs else 1, in_channels=64, num_layers=1, num_single_layers=0 if xlabs else 2,
                attention_head_dim=128, num_attention_heads=2, joint_attention_dim=96, pooled_projection_dim=32,
                guidance_embeds=True, axes_dims_rope=(16, 56, 56))
    if xlabs:
        base["conditioning_embedding_channels"] = 16
    net = _perturbed(FluxControlNetModel(**{**base, **config}), seed)
    return _strong(net, ("controlnet_blocks.", "controlnet_single_blocks.", "controlnet_x_embedder.",
                         "input_hint_block.conv_out"), seed)


def xlabs_file(net: torch.nn.Module) -> dict[str, torch.Tensor]:
    """An XLabs file: the transformer part in BFL names (written through a Flux transformer of the same shape),
    controlnet_blocks.*, pos_embed_input.* and the hint encoder as a Sequential (convs at the even indices)."""
    from diffusers import FluxTransformer2DModel

    config = {k: v for k, v in net.config.items() if k in (
        "in_channels", "num_layers", "num_single_layers", "attention_head_dim", "num_attention_heads",
        "joint_attention_dim", "pooled_projection_dim", "guidance_embeds", "axes_dims_rope")}
    shell = FluxTransformer2DModel(patch_size=1, **config)
    shell.load_state_dict(net.state_dict(), strict=False)
    state = {k: v for k, v in flux_original(shell).items() if not k.startswith("final_layer.")}
    sd = net.state_dict()
    names = ["conv_in"] + [f"blocks.{i}" for i in range(6)] + ["conv_out"]
    for leaf in ("weight", "bias"):
        for i in range(net.config.num_layers):
            state[f"controlnet_blocks.{i}.{leaf}"] = sd[f"controlnet_blocks.{i}.{leaf}"]
        state[f"pos_embed_input.{leaf}"] = sd[f"controlnet_x_embedder.{leaf}"]
        for index, name in enumerate(names):
            state[f"input_hint_block.{2 * index}.{leaf}"] = sd[f"input_hint_block.{name}.{leaf}"]
    return state


class FluxSetup:
    def __init__(self, ctx: StubContext, seed: int) -> None:
        self.ctx = ctx
        self.transformer = tiny_flux_for_text(seed, guidance=True)
        self.vae = flux_vae(seed + 1)
        save_state(flux_original(self.transformer), folder(ctx.env, "diffusion_models") / "flux1-dev.safetensors")
        save_state(convert.vae_to_ldm(self.vae.state_dict()), folder(ctx.env, "vae") / "ae.safetensors")
        (self.model,) = run_node(UNETLoader, ctx, unet_name="flux1-dev.safetensors", weight_dtype="default")
        (self.vae_node,) = run_node(VAELoader, ctx, vae_name="ae.safetensors")
        generator = torch.Generator().manual_seed(seed + 2)
        self.cond, self.pooled = torch.randn(1, 7, 96, generator=generator), torch.randn(1, 32, generator=generator)
        self.positive = [[self.cond, {"pooled_output": self.pooled, "guidance": 3.5}]]
        self.negative = [[torch.zeros(1, 7, 96), {"pooled_output": torch.zeros(1, 32)}]]

    def sample(self, positive, negative, seed: int, steps: int = 3) -> torch.Tensor:
        (out,) = run_node(KSampler, self.ctx, model=self.model, seed=seed, steps=steps, cfg=1.0, sampler_name="euler",
                          scheduler="simple", positive=positive, negative=negative,
                          latent_image={"samples": torch.zeros(1, 16, 8, 8)}, denoise=1.0)
        return dit_flux.pack(FLUX_LATENT.process_in(out["samples"]))

    def pipeline_latents(self, net, image: torch.Tensor, strength: float, seed: int, steps: int = 3, **extra):
        from diffusers import FlowMatchEulerDiscreteScheduler, FluxControlNetPipeline

        (sigmas,) = run_node(BasicScheduler, self.ctx, model=self.model, scheduler="simple", steps=steps, denoise=1.0)
        pipe = FluxControlNetPipeline(
            scheduler=FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=False), vae=self.vae,
            text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None, transformer=self.transformer,
            controlnet=net)
        noise = comfy_noise((1, 16, 8, 8), seed)
        with torch.no_grad():
            return pipe(prompt_embeds=self.cond, pooled_prompt_embeds=self.pooled, guidance_scale=3.5, height=64,
                        width=64, num_inference_steps=steps, sigmas=sigmas[:-1].numpy().astype(np.float32),
                        latents=dit_flux.pack(noise), control_image=image.movedim(-1, 1) * 2 - 1,
                        controlnet_conditioning_scale=strength, output_type="latent", **extra).images


@pytest.mark.parametrize("kind", ["instantx", "union", "xlabs"])
def test_flux_controlnet_sampling_matches_the_controlnet_pipeline(ctx, kind):
    from latentloom.nodes.control_extras import SetUnionControlNetType

    setup = FluxSetup(ctx, 70)
    net = flux_controlnet(71, xlabs=kind == "xlabs", **({"num_mode": 10} if kind == "union" else {}))
    state = xlabs_file(net) if kind == "xlabs" else net.state_dict()
    save_state(state, folder(ctx.env, "controlnet") / f"flux_{kind}.safetensors")
    (control_net,) = run_node(ControlNetLoader, ctx, control_net_name=f"flux_{kind}.safetensors")
    assert (control_net.family, control_net.kind) == ("flux", "flux_xlabs" if kind == "xlabs" else "flux_instantx")
    extra = {}
    if kind == "union":
        (control_net,) = run_node(SetUnionControlNetType, ctx, control_net=control_net, type="depth")
        extra["control_mode"] = 1  # depth
    image = hint_image(64, 64, 72)
    plain = setup.sample(setup.positive, setup.negative, 73)
    pos, neg = run_node(ControlNetApplyAdvanced, ctx, positive=setup.positive, negative=setup.negative,
                        control_net=control_net, image=image, strength=0.9, start_percent=0.0, end_percent=1.0,
                        vae=setup.vae_node)
    ours = setup.sample(pos, neg, 73)
    theirs = setup.pipeline_latents(net, image, 0.9, 73, **extra)
    print(f"Flux {kind} ControlNet: max |latent difference| {max_diff(ours, theirs):.2e}")
    assert max_diff(ours, plain) > 1e-2
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-4)
    off = run_node(ControlNetApplyAdvanced, ctx, positive=setup.positive, negative=setup.negative,
                   control_net=control_net, image=image, strength=0.0, start_percent=0.0, end_percent=1.0,
                   vae=setup.vae_node)
    torch.testing.assert_close(setup.sample(*off, 73), plain, rtol=0, atol=0)


def test_flux_controlnet_residuals_follow_comfyuis_block_mapping(ctx):
    """Two double / two single ControlNet blocks on a two-block model: one output per block; and the chained
    ControlNets' residuals add up."""
    from latentloom.nodes.diffusion.dit_controlnet import _consecutive, _sd3_blocks

    a, b, c = (torch.full((1,), float(i)) for i in range(3))
    assert [float(t) for t in _consecutive([a, b], 19)] == [0.0] * 10 + [1.0] * 9  # ComfyUI's Flux 19 blocks
    assert [float(t) for t in _consecutive([a, b, c], 38)] == [0.0] * 13 + [1.0] * 13 + [2.0] * 12
    # SD3 (24 joint blocks, 6 outputs): four blocks each, the last block none.
    per_block = _sd3_blocks([torch.full((1,), float(i)) for i in range(6)], 24)
    assert [float(t) for t in per_block] == [float(i // 4) for i in range(23)] + [0.0]

    setup = FluxSetup(ctx, 74)
    save_state(flux_controlnet(75, num_layers=2).state_dict(), folder(ctx.env, "controlnet") / "cn.safetensors")
    (control_net,) = run_node(ControlNetLoader, ctx, control_net_name="cn.safetensors")
    image = hint_image(64, 64, 76)
    first = run_node(ControlNetApplyAdvanced, ctx, positive=setup.positive, negative=setup.negative,
                     control_net=control_net, image=image, strength=0.5, start_percent=0.0, end_percent=1.0,
                     vae=setup.vae_node)
    both = run_node(ControlNetApplyAdvanced, ctx, positive=first[0], negative=first[1], control_net=control_net,
                    image=image.flip(1), strength=0.7, start_percent=0.0, end_percent=1.0, vae=setup.vae_node)
    applied = both[0][0][1]["control"]
    assert applied.previous is first[0][0][1]["control"]
    x = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(77))
    sigma = torch.tensor([0.6])
    extra = dit_flux.conditioning(setup.positive[0][1], x.shape, torch.device("cpu"))
    args = (x, sigma, sigma, setup.cond, setup.model, extra, 1)
    total = applied.transformer_residuals(*args)
    own = [link.own_transformer_residuals(*args) for link in (applied, applied.previous)]
    assert len(total["input"]) == 2 and len(total["output"]) == 2
    for key in ("input", "output"):
        for i in range(2):
            torch.testing.assert_close(total[key][i], own[0][key][i] + own[1][key][i], rtol=0, atol=1e-6)
    assert max_diff(own[0]["input"][0], own[0]["input"][1]) > 1e-3  # block i gets output i


# Loading errors ----------------------------------------------------------------------------------------------------

def test_unknown_and_unsupported_transformer_controlnets_are_refused_clearly(ctx):
    root = folder(ctx.env, "controlnet")
    save_state({"controlnet_blocks.0.weight": torch.zeros(4, 4), "foo.weight": torch.zeros(2)},
               root / "odd.safetensors")
    save_state({"controlnet_blocks.0.weight": torch.zeros(4, 4),
                "transformer_blocks.0.adaLN_modulation.1.bias": torch.zeros(4)}, root / "sd35_large.safetensors")
    with pytest.raises(ValueError, match=r"ControlNetLoader \(#1\): input 'control_net_name': .*odd.safetensors.*"
                                         r"unknown layout"):
        run_node(ControlNetLoader, ctx, control_net_name="odd.safetensors")
    with pytest.raises(ValueError, match=r"Stability SD3.5 Large ControlNet.*not supported"):
        run_node(ControlNetLoader, ctx, control_net_name="sd35_large.safetensors")
