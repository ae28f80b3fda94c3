"""T2I-Adapters through the ControlNet nodes, InstructPix2Pix, CLIPTextEncodeControlnet, SetUnionControlNetType and
SD_4XUpscale_Conditioning (nodes/control_extras.py, nodes/diffusion/t2i_adapter.py), against diffusers' T2IAdapter
+ UNet2DConditionModel and StableDiffusionInstructPix2PixPipeline on tiny random weights, ComfyUI's formulas written
out, and graphs run through the engine."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from adapter_support import save_safetensors, tiny_controlnet, tiny_objects, write_controlnet  # noqa: E402
from node_context import StubContext, make_env, run_node  # noqa: E402

from latentloom.nodes.control_extras import (  # noqa: E402
    CLIPTextEncodeControlnet,
    InstructPixToPixConditioning,
    SD_4XUpscale_Conditioning,
    SetUnionControlNetType,
)
from latentloom.nodes.controlnet import ControlNetApplyAdvanced, ControlNetLoader  # noqa: E402
from latentloom.nodes.diffusion.checkpoint import latent_format_for  # noqa: E402
from latentloom.nodes.diffusion.controlnet import load_controlnet  # noqa: E402
from latentloom.nodes.diffusion.denoiser import Guider, ModelCall  # noqa: E402
from latentloom.nodes.diffusion.models import DiffusionModel  # noqa: E402
from latentloom.nodes.diffusion.samplers import SAMPLERS  # noqa: E402
from latentloom.nodes.diffusion.sampling_conds import ip2p_concat  # noqa: E402
from latentloom.nodes.diffusion.schedules import DiscreteSchedule, calculate_sigmas  # noqa: E402
from latentloom.nodes.diffusion.t2i_adapter import EdgePaddedAvgPool, T2IAdapter  # noqa: E402
from latentloom.nodes.diffusion.vae import VAEModel  # noqa: E402

# Adapter kinds: (diffusers T2IAdapter arguments, the tiny model family it fits).
ADAPTERS = {
    "full": (dict(in_channels=3, channels=[32, 32, 64, 64], num_res_blocks=2, downscale_factor=8,
                  adapter_type="full_adapter"), "sd1"),
    "gray": (dict(in_channels=1, channels=[32, 32, 64, 64], num_res_blocks=2, downscale_factor=8,
                  adapter_type="full_adapter"), "sd1"),
    "light": (dict(in_channels=3, channels=[32, 32, 64], num_res_blocks=2, downscale_factor=8,
                   adapter_type="light_adapter"), "sd1"),
    "xl": (dict(in_channels=3, channels=[32, 64, 64, 64], num_res_blocks=2, downscale_factor=16,
                adapter_type="full_adapter_xl"), "sdxl"),
}


# Each test builds and runs tiny diffusers UNets (or whole graphs on them): seconds apiece.
pytestmark = pytest.mark.slow


@pytest.fixture
def env(tmp_path):
    return make_env(models_dir=tmp_path / "models")


@pytest.fixture
def ctx(env):
    return StubContext(env)


def controlnet_dir(env):
    return env.model_dirs["controlnet"][0]


def image(seed=0, height=64, width=64, batch=1):
    return torch.rand((batch, height, width, 3), generator=torch.Generator().manual_seed(seed))


def tiny_adapter(kind: str, seed: int = 0) -> torch.nn.Module:
    from diffusers import T2IAdapter as DiffusersT2IAdapter

    torch.manual_seed(seed)
    adapter = DiffusersT2IAdapter(**ADAPTERS[kind][0])
    generator = torch.Generator().manual_seed(seed + 50)
    with torch.no_grad():
        for parameter in adapter.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.05)
    return adapter.eval().requires_grad_(False)


def original_layout(state: dict[str, torch.Tensor], light: bool) -> dict[str, torch.Tensor]:
    """diffusers names → the TencentARC names ComfyUI loads (two resnets per level for full adapters)."""
    out = {}
    for key, value in state.items():
        parts = key.split(".")[1:]  # drop "adapter"
        if parts[0] == "body" and parts[2] == "resnets":
            level, resnet = int(parts[1]), int(parts[3])
            if light:
                parts = ["body", str(level), "body", str(resnet)] + parts[4:]
            else:
                parts = ["body", str(2 * level + resnet)] + parts[4:]
        elif parts[0] == "body" and parts[2] == "in_conv" and not light:
            parts = ["body", str(2 * int(parts[1]))] + parts[2:]
        out[".".join(parts)] = value.clone()
    return out


def write_adapter(path, adapter: torch.nn.Module, layout: str = "original"):
    state = dict(adapter.state_dict())
    if layout == "original":
        state = original_layout(state, adapter.config.adapter_type == "light_adapter")
    return save_safetensors(state, path)


def comfy_pool(x: torch.Tensor) -> torch.Tensor:
    """ComfyUI's adapter Downsample written out: zero-pad an odd side on both ends, 2×2 mean counting the pads."""
    padded = F.pad(x, (x.shape[3] % 2, x.shape[3] % 2, x.shape[2] % 2, x.shape[2] % 2))
    h, w = padded.shape[2] // 2 * 2, padded.shape[3] // 2 * 2
    return padded[:, :, :h, :w].unflatten(3, (-1, 2)).unflatten(2, (-1, 2)).mean(dim=(3, 5))


# T2I-Adapter loading ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", list(ADAPTERS))
@pytest.mark.parametrize("layout", ["original", "diffusers"])
def test_every_adapter_layout_loads_the_same_weights(env, kind, layout):
    adapter = tiny_adapter(kind)
    loaded = load_controlnet(write_adapter(controlnet_dir(env) / f"{kind}.safetensors", adapter, layout))
    assert isinstance(loaded, T2IAdapter)
    assert loaded.xl == (kind == "xl") and loaded.input_channels == ADAPTERS[kind][0]["in_channels"]
    ours, theirs = loaded.module.state_dict(), adapter.state_dict()
    assert set(ours) == set(theirs) and all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_adapter_pooling_is_comfyuis_on_odd_sides_and_diffusers_on_even(env):
    x = torch.randn((1, 2, 7, 6), generator=torch.Generator().manual_seed(0))
    pooled = EdgePaddedAvgPool()(x)
    assert pooled.shape == (1, 2, 4, 3)
    torch.testing.assert_close(pooled, comfy_pool(x))
    assert torch.allclose(pooled[0, 0, 0, 0], (x[0, 0, 0, 0] + x[0, 0, 0, 1]) / 4)  # the pads count
    even = x[:, :, :6]
    torch.testing.assert_close(EdgePaddedAvgPool()(even), torch.nn.AvgPool2d(2, 2, ceil_mode=True)(even))


def test_unsupported_adapter_files_give_clear_loader_errors(env, ctx):
    state = original_layout(dict(tiny_adapter("full").state_dict()), light=False)
    save_safetensors({**state, "body.2.down_opt.op.weight": torch.zeros(32, 32, 3, 3)},
                     controlnet_dir(env) / "conv_down.safetensors")
    with pytest.raises(ValueError, match=r"ControlNetLoader \(#1\): input 'control_net_name': conv_down.*"
                                         r"convolution downsampling"):
        run_node(ControlNetLoader, ctx, control_net_name="conv_down.safetensors")
    save_safetensors({"backbone.0.0.weight": torch.zeros(4, 4, 1, 1), "backbone.1.weight": torch.zeros(4)},
                     controlnet_dir(env) / "cascade.safetensors")
    with pytest.raises(ValueError, match=r"input 'control_net_name': cascade.*Stable Cascade controlnets are not "
                                         r"supported"):
        run_node(ControlNetLoader, ctx, control_net_name="cascade.safetensors")


# T2I-Adapter application ------------------------------------------------------------------------------------------

def _unet_inputs(family: str, batch: int = 1, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    width = 64 if family == "sdxl" else 32
    x = torch.randn((batch, 4, 8, 8), generator=g) * 3
    context = torch.randn((batch, 77, width), generator=g)
    added = None
    if family == "sdxl":
        added = {"text_embeds": torch.randn((batch, 32), generator=g),
                 "time_ids": torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]] * batch)}
    return x, context, added


@pytest.mark.parametrize("kind", list(ADAPTERS))
def test_adapter_denoise_step_matches_diffusers_through_the_apply_node(env, ctx, kind):
    adapter = tiny_adapter(kind)
    family = ADAPTERS[kind][1]
    write_adapter(controlnet_dir(env) / "adapter.safetensors", adapter)
    (net,) = run_node(ControlNetLoader, ctx, control_net_name="adapter.safetensors")
    hint = image(3)
    x, context, added = _unet_inputs(family)
    positive, _ = run_node(ControlNetApplyAdvanced, ctx, positive=[[context, {}]], negative=[[context, {}]],
                           control_net=net, image=hint, strength=0.8, start_percent=0.0, end_percent=1.0)
    model, _ = tiny_objects(family)
    schedule = DiscreteSchedule(model.sampling)
    sigma = torch.tensor([2.5])
    denoised = ModelCall(model, model.unet, schedule)(x, sigma, context, added, control=positive[0][1]["control"])

    pixels = hint.movedim(-1, 1)
    if kind == "gray":
        pixels = pixels.mean(dim=1, keepdim=True)
    with torch.no_grad():
        features = [f * 0.8 for f in adapter(pixels)]
        eps = model.unet(x / (sigma ** 2 + 1) ** 0.5, schedule.timestep(sigma), encoder_hidden_states=context,
                         added_cond_kwargs=added, down_intrablock_additional_residuals=features).sample
        plain = model.unet(x / (sigma ** 2 + 1) ** 0.5, schedule.timestep(sigma), encoder_hidden_states=context,
                           added_cond_kwargs=added).sample
    torch.testing.assert_close(denoised, x - eps * sigma, atol=1e-5, rtol=1e-5)
    assert float((eps - plain).abs().max()) > 1e-3  # the adapter really changes the prediction


def test_adapter_chained_with_a_controlnet_adds_both(env):
    adapter = load_controlnet(write_adapter(controlnet_dir(env) / "a.safetensors", tiny_adapter("full", 1)))
    cn_module = tiny_controlnet("sd1", seed=2)
    controlnet = load_controlnet(write_controlnet(controlnet_dir(env) / "cn.safetensors", cn_module))
    h1, h2 = image(4), image(5)
    chained = adapter.applied(h2, 0.6, previous=controlnet.applied(h1, 0.4))
    model, _ = tiny_objects("sd1")
    schedule = DiscreteSchedule(model.sampling)
    x, context, _ = _unet_inputs("sd1", batch=2)
    sigma = torch.tensor([4.0, 4.0])
    denoised = ModelCall(model, model.unet, schedule)(x, sigma, context, control=chained)
    x_in, timestep = x / (sigma[0] ** 2 + 1) ** 0.5, schedule.timestep(sigma)
    with torch.no_grad():
        down, mid = cn_module(x_in, timestep, context, h1.movedim(-1, 1).expand(2, -1, -1, -1),
                              conditioning_scale=0.4, return_dict=False)
        features = [f.expand(2, -1, -1, -1) * 0.6 for f in adapter.module(h2.movedim(-1, 1))]
        eps = model.unet(x_in, timestep, encoder_hidden_states=context, down_block_additional_residuals=down,
                         mid_block_additional_residual=mid, down_intrablock_additional_residuals=features).sample
    torch.testing.assert_close(denoised, x - eps * 4.0, atol=1e-5, rtol=1e-5)


def test_adapter_hint_size_window_and_model_check(env):
    xl = load_controlnet(write_adapter(controlnet_dir(env) / "xl.safetensors", tiny_adapter("xl")))
    gray = load_controlnet(write_adapter(controlnet_dir(env) / "gray.safetensors", tiny_adapter("gray")))
    hint = image(7, height=40, width=100)
    # ComfyUI: the latent size × 8 rounded up to the unshuffle factor, nearest-exact after a centre crop.
    resized = xl.applied(hint, 1.0).adapter_hint(5, 6)
    expected = F.interpolate(hint.movedim(-1, 1)[:, :, :, 30:70], size=(48, 48), mode="nearest-exact")
    assert torch.equal(resized, expected)
    grey = gray.applied(hint, 1.0).adapter_hint(5, 5)
    torch.testing.assert_close(grey, F.interpolate(hint.movedim(-1, 1)[:, :, :, 30:70], size=(40, 40),
                                                   mode="nearest-exact").mean(dim=1, keepdim=True))
    # The σ window gates the features like a ControlNet's residuals.
    model, _ = tiny_objects("sd1")
    windowed = gray.applied(image(1), 1.0, 0.5, 1.0)
    x = torch.zeros((1, 4, 8, 8))
    assert windowed.intrablock_residuals(x, torch.tensor([14.0]), model) is None
    assert len(windowed.intrablock_residuals(x, torch.tensor([0.5]), model)) == 4
    assert windowed.residuals(x, torch.tensor([0.5]), torch.tensor([10.0]), torch.zeros(1, 77, 32), model) is None
    with pytest.raises(ValueError, match="another model architecture"):
        xl.applied(image(1), 1.0).intrablock_residuals(x, torch.tensor([1.0]), model)


# InstructPix2Pix -------------------------------------------------------------------------------------------------

def ip2p_unet(seed: int = 0) -> torch.nn.Module:
    """The tiny SD1 UNet with 8 input channels (latent + image latent), every weight perturbed."""
    from diffusers import UNet2DConditionModel
    from tiny_models import tiny_components

    config = dict(tiny_components("sd1", seed).unet.config)
    config["in_channels"] = 8
    torch.manual_seed(seed)
    unet = UNet2DConditionModel.from_config(config)
    generator = torch.Generator().manual_seed(seed + 7)
    with torch.no_grad():
        for parameter in unet.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.02)
    return unet.eval().requires_grad_(False)


def test_ip2p_node_encodes_the_cropped_image_onto_both_conditionings(ctx):
    from tiny_models import tiny_components

    vae = VAEModel(autoencoder=tiny_components("sd1").vae, latent_format=latent_format_for("sd1"))
    pixels = image(2, height=70, width=67)
    positive, negative = [[torch.ones(1, 77, 32), {"strength": 0.5}]], [[torch.zeros(1, 77, 32), {}]]
    pos, neg, latent = run_node(InstructPixToPixConditioning, ctx, positive=positive, negative=negative, vae=vae,
                                pixels=pixels)
    expected = vae.encode(pixels[:, 3:67, 1:65])  # centred crop to multiples of 8
    assert torch.equal(pos[0][1]["concat_latent_image"], expected)
    assert neg[0][1]["concat_latent_image"] is pos[0][1]["concat_latent_image"]
    assert pos[0][1]["strength"] == 0.5 and positive[0][1] == {"strength": 0.5}
    assert latent["samples"].shape == (1, 4, 8, 8) and torch.count_nonzero(latent["samples"]) == 0
    with pytest.raises(ValueError, match=r"input 'pixels': .*smaller than 8x8"):
        run_node(InstructPixToPixConditioning, ctx, positive=positive, negative=negative, vae=vae,
                 pixels=image(1, height=6, width=30))


def test_ip2p_unet_input_and_prediction_match_the_diffusers_pipeline(ctx):
    from diffusers import EulerDiscreteScheduler, StableDiffusionInstructPix2PixPipeline
    from tiny_models import tiny_components

    parts = tiny_components("sd1")
    unet = ip2p_unet()
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       num_train_timesteps=1000, timestep_spacing="leading", steps_offset=1)
    pipe = StableDiffusionInstructPix2PixPipeline(vae=parts.vae, text_encoder=parts.text_encoders["l"],
                                                  tokenizer=None, unet=unet, scheduler=scheduler,
                                                  safety_checker=None, feature_extractor=None,
                                                  requires_safety_checker=False)
    steps: list = []
    original_scale = scheduler.scale_model_input
    scheduler.scale_model_input = lambda sample, t: (
        steps.append([sample.clone(), scheduler.sigmas[scheduler.step_index or 0].clone()])
        or original_scale(sample, t))
    recording = unet.register_forward_hook(lambda m, args, out: steps[-1].extend([args[0].clone(), out[0].clone()]))
    generator = torch.Generator().manual_seed(1)
    context = torch.randn((1, 77, 32), generator=generator)
    latents = torch.randn((1, 4, 8, 8), generator=generator)
    pixels = image(2)
    # guidance_scale 1: one UNet call per step, like ComfyUI at cfg 1 (ComfyUI has no 3-way image guidance).
    pipe(prompt_embeds=context, image=pixels.movedim(-1, 1), num_inference_steps=3, guidance_scale=1.0,
         image_guidance_scale=1.5, output_type="latent", latents=latents)
    recording.remove()
    assert [len(s) for s in steps] == [4, 4, 4]  # (x, σ, UNet input, UNet output) per step

    vae = VAEModel(autoencoder=parts.vae, latent_format=latent_format_for("sd1"))
    (pos, _, _) = run_node(InstructPixToPixConditioning, ctx, positive=[[context, {}]], negative=[[context, {}]],
                           vae=vae, pixels=pixels)
    model = DiffusionModel(unet=unet, family="sd1", latent_format=latent_format_for("sd1"),
                           options={"variant": "instruct_pix2pix"})
    schedule = DiscreteSchedule(model.sampling)
    seen: list[torch.Tensor] = []
    handle = unet.register_forward_pre_hook(lambda m, args: seen.append(args[0].clone()))
    for x, sigma, unet_input, eps_ref in steps:
        sigma = sigma.reshape(1)
        concat = ip2p_concat(pos[0][1], x.shape, x.device)
        denoised = ModelCall(model, unet, schedule)(x, sigma, context, concat=concat)
        torch.testing.assert_close(seen[-1], unet_input, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(denoised, x - eps_ref * sigma, atol=1e-5, rtol=1e-5)
    handle.remove()


def test_ip2p_cfg_gives_the_image_to_both_sides(ctx):
    unet = ip2p_unet(3)
    model = DiffusionModel(unet=unet, family="sd1", latent_format=latent_format_for("sd1"))
    image_latent = torch.randn((1, 4, 4, 4), generator=torch.Generator().manual_seed(0))  # upscaled to 8x8
    conds = {"positive": [[torch.randn((1, 77, 32)), {"concat_latent_image": image_latent}]],
             "negative": [[torch.zeros((1, 77, 32)), {"concat_latent_image": image_latent}]]}
    seen: list[torch.Tensor] = []
    unet.register_forward_pre_hook(lambda m, args: seen.append(args[0][:, 4:].clone()))
    sigmas = calculate_sigmas(DiscreteSchedule(model.sampling), "normal", 2)
    Guider(model, conds, 5.0).sample(torch.randn((1, 4, 8, 8)), torch.zeros((1, 4, 8, 8)), SAMPLERS["euler"],
                                     sigmas)
    expected = F.interpolate(image_latent, size=(8, 8), mode="bilinear", align_corners=False)
    assert len(seen) == 2 and all(s.shape[0] == 2 for s in seen)  # one batched call: negative + positive
    assert all(torch.allclose(s, expected.expand(2, -1, -1, -1), atol=1e-6) for s in seen)
    seen.clear()
    Guider(model, {"positive": [[torch.zeros((1, 77, 32)), {}]]}, 1.0).sample(
        torch.randn((1, 4, 8, 8)), torch.zeros((1, 4, 8, 8)), SAMPLERS["euler"], sigmas)
    assert all(torch.count_nonzero(s) == 0 for s in seen)  # no image: zeros, as ComfyUI


# CLIPTextEncodeControlnet, SetUnionControlNetType, SD_4XUpscale_Conditioning -------------------------------------

def test_controlnet_text_goes_to_the_controlnet_only(env, ctx):
    model, clip = tiny_objects("sd1")
    cn_module = tiny_controlnet("sd1")
    net = load_controlnet(write_controlnet(controlnet_dir(env) / "cn.safetensors", cn_module))
    base = [[torch.randn((1, 77, 32), generator=torch.Generator().manual_seed(0)), {"strength": 1.0}]]
    (with_text,) = run_node(CLIPTextEncodeControlnet, ctx, clip=clip, conditioning=base, text="a red square")
    cond, pooled = clip.encode_tokens(clip.tokenize("a red square"))
    options = with_text[0][1]
    assert torch.equal(options["cross_attn_controlnet"], cond) and torch.equal(options["pooled_output_controlnet"],
                                                                                pooled)
    assert with_text[0][0] is base[0][0] and "cross_attn_controlnet" not in base[0][1]
    negative = [[torch.zeros((1, 77, 32)), {}]]
    positive, negative = run_node(ControlNetApplyAdvanced, ctx, positive=with_text, negative=negative, control_net=net,
                                  image=image(), strength=1.0, start_percent=0.0, end_percent=1.0)
    controlnet_texts, unet_texts = [], []
    cn_module_loaded = net.module
    cn_module_loaded.register_forward_pre_hook(
        lambda m, args, kwargs: controlnet_texts.append(kwargs["encoder_hidden_states"].clone()), with_kwargs=True)
    model.unet.register_forward_pre_hook(
        lambda m, args, kwargs: unet_texts.append(kwargs["encoder_hidden_states"].clone()), with_kwargs=True)
    sigmas = calculate_sigmas(DiscreteSchedule(model.sampling), "normal", 1)
    Guider(model, {"positive": positive, "negative": negative}, 3.0).sample(
        torch.randn((1, 4, 8, 8)), torch.zeros((1, 4, 8, 8)), SAMPLERS["euler"], sigmas)
    # Positive and negative run apart (only one has a ControlNet text): the positive's ControlNet reads the
    # ControlNet text while its UNet reads the prompt; the negative's both read the negative prompt.
    assert len(controlnet_texts) == 2 and len(unet_texts) == 2
    by_unet = {float(u.sum()): c for u, c in zip(unet_texts, controlnet_texts, strict=True)}
    assert torch.equal(by_unet[float(base[0][0].sum())], cond)
    assert torch.count_nonzero(by_unet[0.0]) == 0


def test_set_union_type_records_the_choice_and_changes_nothing_else(env, ctx):
    net = load_controlnet(write_controlnet(controlnet_dir(env) / "cn.safetensors", tiny_controlnet("sd1")))
    (typed,) = run_node(SetUnionControlNetType, ctx, control_net=net, type="depth")
    (auto,) = run_node(SetUnionControlNetType, ctx, control_net=typed, type="auto")
    assert typed.control_type == (1,) and auto.control_type == () and net.control_type == ()
    assert typed.module is net.module and typed is not net
    model, _ = tiny_objects("sd1")
    x, context, _ = _unet_inputs("sd1")
    args = (x, torch.tensor([2.0]), torch.tensor([500.0]), context, model)
    a, b = net.applied(image(), 1.0).residuals(*args), typed.applied(image(), 1.0).residuals(*args)
    assert all(torch.equal(p, q) for p, q in zip(a[0] + (a[1],), b[0] + (b[1],), strict=True))
    adapter = load_controlnet(write_adapter(controlnet_dir(env) / "t2i.safetensors", tiny_adapter("full")))
    assert run_node(SetUnionControlNetType, ctx, control_net=adapter, type="tile")[0].control_type == (6,)


def test_sd_4x_upscale_conditioning_follows_comfyui(ctx):
    images = image(3, height=10, width=12, batch=2)
    positive, negative = [[torch.ones(1, 77, 32), {"strength": 0.7}]], [[torch.zeros(1, 77, 32), {}]]
    pos, neg, latent = run_node(SD_4XUpscale_Conditioning, ctx, images=images, positive=positive,
                                negative=negative, scale_ratio=2.5, noise_augmentation=0.25)
    # 12x10 × 2.5 = 30x25 pixels; the latent and the low-resolution image are a quarter of that: 7x6.
    expected = F.interpolate(images.movedim(-1, 1) * 2 - 1, size=(6, 7), mode="bilinear", align_corners=False)
    for cond in (pos, neg):
        torch.testing.assert_close(cond[0][1]["concat_image"], expected)
        assert cond[0][1]["noise_augmentation"] == 0.25
    assert pos[0][1]["strength"] == 0.7 and "concat_image" not in positive[0][1]
    assert latent["samples"].shape == (2, 4, 6, 7) and torch.count_nonzero(latent["samples"]) == 0
    with pytest.raises(ValueError, match=r"input 'scale_ratio'"):
        run_node(SD_4XUpscale_Conditioning, ctx, images=images, positive=positive, negative=negative,
                 scale_ratio=0.0, noise_augmentation=0.0)


# End to end ------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    import numpy as np
    from PIL import Image
    from sd_probe_nodes import LatentProbe
    from tiny_models import checkpoint_state, save_state, tiny_components, write_tiny_checkpoint

    from latentloom.nodes import create_engine

    root = tmp_path_factory.mktemp("control_extras")
    models = root / "models"
    write_tiny_checkpoint(models / "checkpoints" / "sd1.safetensors", family="sd1", seed=0)
    parts = tiny_components("sd1", 0)
    parts.unet = ip2p_unet()
    save_state(checkpoint_state(parts), models / "checkpoints" / "ip2p.safetensors")
    write_adapter(models / "controlnet" / "t2i_depth.safetensors", tiny_adapter("full", 4))
    (root / "input").mkdir()
    for name, seed in (("a.png", 1), ("b.png", 2)):
        pixels = (np.random.default_rng(seed).random((64, 64, 3)) * 255).astype(np.uint8)
        Image.fromarray(pixels).save(root / "input" / name)
    built = create_engine(models_dir=models, input_dir=root / "input", output_dir=root / "out",
                          temp_dir=root / "temp", entry_points=False)
    built.registry.register(LatentProbe)
    return built


def sampled(engine, graph: dict) -> torch.Tensor:
    import json

    result = engine.run(graph)
    assert result.status == "success" and not result.node_errors, (result.error, result.node_errors)
    (ui,) = [ui for ui in result.outputs.values() if ui.get("text")]
    return torch.tensor(json.loads(ui["text"][0])["samples"])


def base_graph(checkpoint: str, positive: list, negative: list, latent: list) -> dict:
    return {
        "ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": checkpoint}},
        "pos": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["ckpt", 1], "text": "make it snowy"}},
        "neg": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["ckpt", 1], "text": "blurry"}},
        "empty": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "sample": {"class_type": "KSampler", "inputs": {
            "model": ["ckpt", 0], "positive": positive, "negative": negative, "latent_image": latent, "seed": 5,
            "steps": 3, "cfg": 4.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        "probe": {"class_type": "LatentProbe", "inputs": {"samples": ["sample", 0], "label": "out"}},
    }


def test_ip2p_graph_edits_the_given_image(engine):
    def run(picture: str) -> torch.Tensor:
        graph = base_graph("ip2p.safetensors", ["ip2p", 0], ["ip2p", 1], ["ip2p", 2])
        graph["load"] = {"class_type": "LoadImage", "inputs": {"image": picture}}
        graph["ip2p"] = {"class_type": "InstructPixToPixConditioning", "inputs": {
            "positive": ["pos", 0], "negative": ["neg", 0], "vae": ["ckpt", 2], "pixels": ["load", 0]}}
        return sampled(engine, graph)

    a, b = run("a.png"), run("b.png")
    assert a.shape == (1, 4, 8, 8) and torch.isfinite(a).all()
    assert float((a - b).abs().max()) > 1e-3  # the result depends on the image to edit
    assert torch.equal(run("a.png"), a)


def test_t2i_adapter_graph_through_the_controlnet_nodes(engine):
    def run(strength: float | None) -> torch.Tensor:
        if strength is None:
            return sampled(engine, base_graph("sd1.safetensors", ["pos", 0], ["neg", 0], ["empty", 0]))
        graph = base_graph("sd1.safetensors", ["apply", 0], ["apply", 1], ["empty", 0])
        graph["load"] = {"class_type": "LoadImage", "inputs": {"image": "a.png"}}
        graph["adapter"] = {"class_type": "ControlNetLoader", "inputs": {"control_net_name": "t2i_depth.safetensors"}}
        graph["apply"] = {"class_type": "ControlNetApplyAdvanced", "inputs": {
            "positive": ["pos", 0], "negative": ["neg", 0], "control_net": ["adapter", 0], "image": ["load", 0],
            "strength": strength, "start_percent": 0.0, "end_percent": 1.0}}
        return sampled(engine, graph)

    plain, adapted = run(None), run(0.9)
    assert float((adapted - plain).abs().max()) > 1e-3
    assert torch.equal(run(0.0), plain)  # strength 0 passes the conditioning through
