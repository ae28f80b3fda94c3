"""SD3 / SD3.5 (MMDiT) sampling against diffusers' StableDiffusion3Pipeline built from the same weights.

Tiny random SD3, SD3.5 Medium (qk-norm + dual attention) and SD3.5 Large-shaped (qk-norm) transformers, CLIP-L,
CLIP-G and a 16-channel VAE are written in ComfyUI's original single-file layouts, loaded through the loader
nodes, and compared with the pipeline (its transformer, FlowMatchEulerDiscreteScheduler with shift 3, its VAE and
CLIP text encoders with CLIPTokenizers over the vocabulary the engine ships):

* text: CLIPTextEncode / CLIPTextEncodeSD3 vs pipeline.encode_prompt. Without T5 the two differ by design:
  ComfyUI's SD3 clip returns the 77 CLIP tokens (L ‖ G, zero-padded to T5-XXL's 4096), diffusers appends 256
  all-zero "T5" tokens. The first 77 tokens and the pooled vector are compared, and the 256 zeros asserted; the
  zero tokens are not inert in joint attention, so the sampling comparisons give the pipeline our embeddings.
* the model call: ModelCall (σ·1000 timesteps, pooled projections, x0 = x − σ·v) vs the transformer called as the
  pipeline calls it;
* final latents of KSampler euler (cfg > 1 with a negative prompt, and cfg 1) vs the pipeline with the same initial
  noise and sigmas, compared in the network's latent space (SD3: (z − 0.0609)·1.5305);
* SkipLayerGuidanceSD3 vs the pipeline's skip_guidance_layers, SkipLayerGuidanceDiT (with rescaling) and
  SkipLayerGuidanceDiTSimple vs ComfyUI's formulas written out here around the transformer's own `skip_layers`.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json  # noqa: E402
from dataclasses import dataclass  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from node_context import StubContext, make_env, run_node  # noqa: E402
from test_family_loading import (  # noqa: E402
    _perturbed,
    clip_file_state,
    folder,
    prefixed,
    sd3_original,
    tiny_flux,
    tiny_vae16,
)
from tiny_models import _text_encoder, save_state, write_tiny_checkpoint  # noqa: E402

from latentloom.nodes.conditioning import CLIPTextEncode  # noqa: E402
from latentloom.nodes.diffusion import convert, dit_calls, dit_sd3  # noqa: E402
from latentloom.nodes.diffusion.denoiser import ModelCall  # noqa: E402
from latentloom.nodes.diffusion.latent_formats import SD3_LATENT  # noqa: E402
from latentloom.nodes.diffusion.schedules import schedule_for  # noqa: E402
from latentloom.nodes.diffusion.tokenizer import BPE_VOCAB_FILE, TOKENIZER_CONFIG_FILE, build_clip_vocab  # noqa: E402
from latentloom.nodes.family_sd3 import (  # noqa: E402
    CLIPTextEncodeSD3,
    ModelMergeSD3_2B,
    SkipLayerGuidanceDiT,
    SkipLayerGuidanceDiTSimple,
    SkipLayerGuidanceSD3,
)
from latentloom.nodes.loaders import (  # noqa: E402
    CheckpointLoaderSimple,
    CLIPLoader,
    DualCLIPLoader,
    UNETLoader,
    VAELoader,
)
from latentloom.nodes.model_families import EmptySD3LatentImage  # noqa: E402
from latentloom.nodes.sampling import BasicScheduler, KSampler  # noqa: E402
from latentloom.nodes.vae_nodes import VAEDecode  # noqa: E402

JOINT_WIDTH = 4096   # ComfyUI pads the CLIP states to T5-XXL's width even when no T5 is loaded
POOLED_WIDTH = 64    # tiny CLIP-L (32, unprojected) ‖ CLIP-G (32, projected)
STEPS = 4
PROMPT, NEGATIVE = "a photo of a cat", "blurry, low quality"


# Tiny models ------------------------------------------------------------------------------------------------

# Each test builds tiny diffusers/transformers models and compares with their pipeline: seconds apiece.
pytestmark = pytest.mark.slow


def sd3_transformer(seed: int, variant: str) -> torch.nn.Module:
    """variant: "sd3" (no qk-norm), "sd3.5_medium" (qk-norm, dual attention in block 0), "sd3.5_large" (qk-norm)."""
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    return _perturbed(SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=16, num_layers=3, attention_head_dim=64, num_attention_heads=2,
        joint_attention_dim=JOINT_WIDTH, caption_projection_dim=128, pooled_projection_dim=POOLED_WIDTH,
        out_channels=16, pos_embed_max_size=12, qk_norm=None if variant == "sd3" else "rms_norm",
        dual_attention_layers=(0,) if variant == "sd3.5_medium" else ()), seed)


@dataclass
class Parts:
    transformer: torch.nn.Module
    vae: torch.nn.Module
    clip_l: torch.nn.Module    # CLIPTextModel (ComfyUI's SD3 reads CLIP-L's unprojected pooled output)
    clip_g: torch.nn.Module    # CLIPTextModelWithProjection


def tiny_parts(seed: int, variant: str) -> Parts:
    vae = tiny_vae16(seed + 1)
    vae.register_to_config(scaling_factor=SD3_LATENT.scale_factor, shift_factor=SD3_LATENT.shift_factor)
    return Parts(sd3_transformer(seed, variant), vae, _text_encoder(open_clip=False, projection=False, seed=seed + 2),
                 _text_encoder(open_clip=True, projection=True, seed=seed + 3))


def clip_tokenizer(pad_token: str):
    """transformers' CLIPTokenizer over the shipped vocabulary; CLIP-G pads with "!" (id 0) as open_clip does."""
    from transformers import CLIPTokenizer

    config = json.loads(TOKENIZER_CONFIG_FILE.read_text())
    vocab, merges = build_clip_vocab(BPE_VOCAB_FILE, int(config.pop("merge_count")))
    config.update(pad_token=pad_token, model_max_length=77)
    return CLIPTokenizer(vocab=vocab, merges=merges, **config)


def pipeline(parts: Parts):
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection

    # diffusers' SD3 reads CLIP-L's projected pooled output; an identity projection makes it the unprojected one
    # ComfyUI uses, so the two pooled vectors are comparable.
    clip_l = CLIPTextModelWithProjection(parts.clip_l.config).eval()
    state = {f"text_model.{key}": value for key, value in parts.clip_l.state_dict().items()}
    state["text_projection.weight"] = torch.eye(parts.clip_l.config.hidden_size)
    clip_l.load_state_dict(state)
    return StableDiffusion3Pipeline(
        transformer=parts.transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=parts.vae,
        text_encoder=clip_l, tokenizer=clip_tokenizer("<|endoftext|>"), text_encoder_2=parts.clip_g,
        tokenizer_2=clip_tokenizer("!"), text_encoder_3=None, tokenizer_3=None)


def write_files(env, parts: Parts, name: str) -> None:
    save_state(sd3_original(parts.transformer), folder(env, "diffusion_models") / name)
    save_state(convert.vae_to_ldm(parts.vae.state_dict()), folder(env, "vae") / "sd3_vae.safetensors")
    save_state(clip_file_state(parts.clip_l), folder(env, "text_encoders") / "clip_l.safetensors")
    save_state(clip_file_state(parts.clip_g), folder(env, "text_encoders") / "clip_g.safetensors")


@dataclass
class Loaded:
    model: object
    clip: object
    vae: object


def load(ctx, name: str) -> Loaded:
    (model,) = run_node(UNETLoader, ctx, unet_name=name, weight_dtype="default")
    (clip,) = run_node(DualCLIPLoader, ctx, clip_name1="clip_g.safetensors", clip_name2="clip_l.safetensors",
                       type="sd3")
    (vae,) = run_node(VAELoader, ctx, vae_name="sd3_vae.safetensors")
    return Loaded(model, clip, vae)


@pytest.fixture
def ctx(tmp_path) -> StubContext:
    return StubContext(make_env(tmp_path, models_dir=tmp_path / "models"))


def encode(ctx, clip, text: str):
    return run_node(CLIPTextEncode, ctx, text=text, clip=clip)[0]


def embeds(conditioning) -> tuple[torch.Tensor, torch.Tensor]:
    ((cond, options),) = conditioning
    return cond, options["pooled_output"]


def comfy_noise(shape, seed: int) -> torch.Tensor:
    """ComfyUI's prepare_noise: one CPU randn over the whole latent from torch.manual_seed(seed)."""
    return torch.randn(shape, generator=torch.manual_seed(seed))


def unshifted_sigmas(steps: int) -> list[float]:
    """The pipeline shifts the sigmas it is given (σ' = 3σ / (1 + 2σ)); these become ComfyUI's "simple" ones."""
    return [1.0 - i / steps for i in range(steps)]


def ksample(ctx, model, positive, negative, cfg: float, seed: int, latent) -> torch.Tensor:
    (out,) = run_node(KSampler, ctx, model=model, seed=seed, steps=STEPS, cfg=cfg, sampler_name="euler",
                      scheduler="simple", positive=positive, negative=negative, latent_image=latent, denoise=1.0)
    return out["samples"]


def pipe_latents(pipe, positive, negative, cfg: float, noise: torch.Tensor, **extra) -> torch.Tensor:
    cond, pooled = embeds(positive)
    uncond, uncond_pooled = embeds(negative)
    with torch.no_grad():
        return pipe(prompt_embeds=cond, pooled_prompt_embeds=pooled, negative_prompt_embeds=uncond,
                    negative_pooled_prompt_embeds=uncond_pooled, guidance_scale=cfg, sigmas=unshifted_sigmas(STEPS),
                    latents=noise, height=noise.shape[-2] * pipe.vae_scale_factor,
                    width=noise.shape[-1] * pipe.vae_scale_factor, output_type="latent", **extra).images


# Text encoding -------------------------------------------------------------------------------------------------

def test_clip_text_encode_matches_the_pipelines_clip_part(ctx):
    parts = tiny_parts(30, "sd3.5_medium")
    write_files(ctx.env, parts, "sd3.5_medium.safetensors")
    loaded, pipe = load(ctx, "sd3.5_medium.safetensors"), pipeline(parts)
    cond, pooled = embeds(encode(ctx, loaded.clip, PROMPT))
    with torch.no_grad():
        expected, _, expected_pooled, _ = pipe.encode_prompt(PROMPT, None, None, do_classifier_free_guidance=False)
    assert cond.shape == (1, 77, JOINT_WIDTH) and expected.shape == (1, 77 + 256, JOINT_WIDTH)
    torch.testing.assert_close(cond, expected[:, :77], rtol=0, atol=1e-5)
    assert not expected[:, 77:].any()  # diffusers' stand-in for the missing T5: 256 zero tokens
    torch.testing.assert_close(pooled, expected_pooled, rtol=0, atol=1e-5)
    assert cond[..., :64].abs().max() > 0.1 and not cond[..., 64:].any()  # L ‖ G, then zero padding

    # CLIPTextEncodeSD3: CLIP-L and CLIP-G get their own prompts (diffusers' prompt / prompt_2).
    sd3_cond, sd3_pooled = embeds(run_node(CLIPTextEncodeSD3, ctx, clip=loaded.clip, clip_l="a red fox",
                                           clip_g=PROMPT, t5xxl="", empty_padding="none")[0])
    with torch.no_grad():
        expected, _, expected_pooled, _ = pipe.encode_prompt("a red fox", PROMPT, None,
                                                             do_classifier_free_guidance=False)
    torch.testing.assert_close(sd3_cond, expected[:, :77], rtol=0, atol=1e-5)
    torch.testing.assert_close(sd3_pooled, expected_pooled, rtol=0, atol=1e-5)


def test_clip_text_encode_sd3_empty_padding(ctx):
    parts = tiny_parts(31, "sd3")
    write_files(ctx.env, parts, "sd3.safetensors")
    clip = load(ctx, "sd3.safetensors").clip

    def sd3_encode(clip_l: str, clip_g: str, padding: str):
        return embeds(run_node(CLIPTextEncodeSD3, ctx, clip=clip, clip_l=clip_l, clip_g=clip_g, t5xxl="",
                               empty_padding=padding)[0])

    # "none" with both CLIP prompts empty: ComfyUI's SD3 clip encodes no CLIP part (zeros, 77 tokens, pooled 2048).
    cond, pooled = sd3_encode("", "", "none")
    assert cond.shape == (1, 77, JOINT_WIDTH) and not cond.any()
    assert pooled.shape == (1, 2048) and not pooled.any()
    # "empty_prompt": the empty texts are encoded, as CLIPTextEncode("") does.
    padded = sd3_encode("", "", "empty_prompt")
    for ours, plain in zip(padded, embeds(encode(ctx, clip, "")), strict=True):
        torch.testing.assert_close(ours, plain, rtol=0, atol=0)
    # One side empty: it is filled with the empty prompt's chunk, so the result is CLIP-L("") ‖ CLIP-G(prompt).
    one_sided, _ = sd3_encode("", PROMPT, "none")
    l_empty, g_prompt = embeds(encode(ctx, clip, ""))[0], embeds(encode(ctx, clip, PROMPT))[0]
    torch.testing.assert_close(one_sided[..., :32], l_empty[..., :32], rtol=0, atol=0)
    torch.testing.assert_close(one_sided[..., 32:64], g_prompt[..., 32:64], rtol=0, atol=0)
    (sd1_clip,) = run_node(CLIPLoader, ctx, clip_name="clip_l.safetensors", type="stable_diffusion")
    with pytest.raises(ValueError, match=r"CLIPTextEncodeSD3 \(#1\): input 'clip': must be an SD3 CLIP .*got a "
                                         r"SD1/SD2/SDXL one"):
        run_node(CLIPTextEncodeSD3, ctx, clip=sd1_clip, clip_l="", clip_g="", t5xxl="", empty_padding="none")


def test_clip_text_encode_sd3_with_t5_needs_its_tokenizer_only_for_t5_text(ctx):
    from test_family_loading import t5_file_state, tiny_t5

    from latentloom.nodes.diffusion.family_clip import TokenizerUnavailable
    from latentloom.nodes.loaders import TripleCLIPLoader

    parts, t5 = tiny_parts(46, "sd3"), tiny_t5(47)
    write_files(ctx.env, parts, "sd3.safetensors")
    save_state(t5_file_state(t5), folder(ctx.env, "text_encoders") / "t5xxl_tiny.safetensors")
    (clip,) = run_node(TripleCLIPLoader, ctx, clip_name1="clip_l.safetensors", clip_name2="clip_g.safetensors",
                       clip_name3="t5xxl_tiny.safetensors")
    # An empty T5 prompt with "none": T5 encodes its end token alone (ComfyUI's empty token list); no tokenizer.
    cond, pooled = embeds(run_node(CLIPTextEncodeSD3, ctx, clip=clip, clip_l=PROMPT, clip_g=PROMPT, t5xxl="",
                                   empty_padding="none")[0])
    clip_cond, clip_pooled = embeds(encode(ctx, load(ctx, "sd3.safetensors").clip, PROMPT))
    with torch.no_grad():
        t5_end = t5(input_ids=torch.tensor([[1]])).last_hidden_state
    assert cond.shape == (1, 78, 96)
    torch.testing.assert_close(cond, torch.cat([clip_cond[..., :96], t5_end], dim=1), rtol=0, atol=1e-5)
    torch.testing.assert_close(pooled, clip_pooled, rtol=0, atol=0)
    with pytest.raises(TokenizerUnavailable):  # T5 text, and no T5 tokenizer file beside the encoder
        run_node(CLIPTextEncodeSD3, ctx, clip=clip, clip_l=PROMPT, clip_g=PROMPT, t5xxl=PROMPT,
                 empty_padding="none")


# The model call ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("variant", ["sd3", "sd3.5_medium"])
def test_model_call_is_the_pipelines_transformer_call(ctx, variant):
    parts = tiny_parts(32, variant)
    write_files(ctx.env, parts, f"{variant}.safetensors")
    model = load(ctx, f"{variant}.safetensors").model
    assert model.options["variant"] == ("sd3" if variant == "sd3" else "sd3.5")
    call = ModelCall(model, model.unet, schedule_for(model.sampling))
    generator = torch.Generator().manual_seed(33)
    x = torch.randn(2, 16, 8, 10, generator=generator)
    context = torch.randn(2, 77, JOINT_WIDTH, generator=generator)
    pooled = torch.randn(2, POOLED_WIDTH, generator=generator)
    sigma = torch.tensor([0.8, 0.8])
    added = dit_sd3.conditioning({"pooled_output": pooled}, x.shape, torch.device("cpu"))
    with torch.no_grad():
        denoised = call(x, sigma, context, added, chunks=2)
        velocity = parts.transformer(hidden_states=x, timestep=sigma * 1000, encoder_hidden_states=context,
                                     pooled_projections=pooled, return_dict=False)[0]
    assert velocity.abs().max() > 0.1
    torch.testing.assert_close(denoised, x - 0.8 * velocity, rtol=0, atol=1e-5)
    # Odd latent sizes: ComfyUI pads circularly to the patch size and crops the output back.
    odd = x[..., :7, :9]
    with torch.no_grad():
        padded = torch.nn.functional.pad(odd, (0, 1, 0, 1), mode="circular")
        expected = parts.transformer(hidden_states=padded, timestep=sigma * 1000, encoder_hidden_states=context,
                                     pooled_projections=pooled, return_dict=False)[0][..., :7, :9]
        torch.testing.assert_close(call(odd, sigma, context, added, chunks=2), odd - 0.8 * expected,
                                   rtol=0, atol=1e-5)


# Final latents -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("variant", ["sd3", "sd3.5_medium"])
def test_ksampler_euler_matches_the_pipeline(ctx, variant):
    parts = tiny_parts(34, variant)
    write_files(ctx.env, parts, f"{variant}.safetensors")
    loaded, pipe = load(ctx, f"{variant}.safetensors"), pipeline(parts)
    positive, negative = encode(ctx, loaded.clip, PROMPT), encode(ctx, loaded.clip, NEGATIVE)
    (latent,) = run_node(EmptySD3LatentImage, ctx, width=64, height=64, batch_size=1)
    (sigmas,) = run_node(BasicScheduler, ctx, model=loaded.model, scheduler="simple", steps=STEPS, denoise=1.0)
    pipe.scheduler.set_timesteps(sigmas=unshifted_sigmas(STEPS))
    torch.testing.assert_close(pipe.scheduler.sigmas, sigmas, rtol=0, atol=1e-6)  # same schedule, both ways
    noise = comfy_noise(latent["samples"].shape, seed=35)
    differences = []
    for cfg in (4.5, 1.0):
        ours = SD3_LATENT.process_in(ksample(ctx, loaded.model, positive, negative, cfg, 35, latent))
        theirs = pipe_latents(pipe, positive, negative, cfg, noise)
        differences.append(float((ours - theirs).abs().max()))
        assert theirs.abs().max() > 0.5
        torch.testing.assert_close(ours, theirs, rtol=0, atol=2e-5)
    print(f"{variant}: max |latent difference| cfg 4.5 / 1.0: {differences}")
    # The decoded image too (the pipeline undoes the scale and shift itself).
    samples = ksample(ctx, loaded.model, positive, negative, 4.5, 35, latent)
    (image,) = run_node(VAEDecode, ctx, samples={"samples": samples}, vae=loaded.vae)
    cond, pooled = embeds(positive)
    uncond, uncond_pooled = embeds(negative)
    with torch.no_grad():
        expected = pipe(prompt_embeds=cond, pooled_prompt_embeds=pooled, negative_prompt_embeds=uncond,
                        negative_pooled_prompt_embeds=uncond_pooled, guidance_scale=4.5,
                        sigmas=unshifted_sigmas(STEPS), latents=noise, height=16, width=16, output_type="pt").images
    torch.testing.assert_close(image, expected.permute(0, 2, 3, 1), rtol=0, atol=1e-4)


def test_sd35_large_all_in_one_checkpoint_samples_like_the_pipeline(ctx):
    parts = tiny_parts(36, "sd3.5_large")
    state = prefixed(sd3_original(parts.transformer), "model.diffusion_model.")
    state |= prefixed(convert.vae_to_ldm(parts.vae.state_dict()), "first_stage_model.")
    state |= prefixed(clip_file_state(parts.clip_l), "text_encoders.clip_l.transformer.")
    state |= prefixed(clip_file_state(parts.clip_g), "text_encoders.clip_g.transformer.")
    save_state(state, folder(ctx.env, "checkpoints") / "sd3.5_large_tiny.safetensors")
    model, clip, _ = run_node(CheckpointLoaderSimple, ctx, ckpt_name="sd3.5_large_tiny.safetensors")
    assert (model.family, model.options["variant"]) == ("sd3", "sd3.5")
    pipe = pipeline(parts)
    positive, negative = encode(ctx, clip, PROMPT), encode(ctx, clip, NEGATIVE)
    with torch.no_grad():
        expected, _, _, _ = pipe.encode_prompt(PROMPT, None, None, do_classifier_free_guidance=False)
    torch.testing.assert_close(embeds(positive)[0], expected[:, :77], rtol=0, atol=1e-5)
    latent = {"samples": torch.zeros(1, 16, 8, 6)}
    ours = SD3_LATENT.process_in(ksample(ctx, model, positive, negative, 3.0, 37, latent))
    theirs = pipe_latents(pipe, positive, negative, 3.0, comfy_noise((1, 16, 8, 6), 37))
    print(f"sd3.5 large (checkpoint): max |latent difference| {float((ours - theirs).abs().max())}")
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-4)


# Skip layer guidance -------------------------------------------------------------------------------------------

def shifted(t: float, shift: float = 3.0) -> float:
    return shift * t / (1 + (shift - 1) * t)


def reference_euler(transformer, noise, positive, negative, cfg: float, slg=None, simple=None) -> torch.Tensor:
    """ComfyUI's euler sampler and SLG formulas written out on the diffusers transformer (its `skip_layers`).
    slg = (layers, scale, σ_start, σ_end, rescaling): after CFG on x0, x0 += scale·(x0_cond − x0_cond,skipped),
    then × (r·std(x0_cond)/std(x0) + 1 − r). simple = (layers, σ_start, σ_end): the negative pass skips layers."""
    cond, pooled = embeds(positive)
    uncond, uncond_pooled = embeds(negative)
    sigmas = [shifted(s) for s in unshifted_sigmas(STEPS)] + [0.0]
    x = noise.clone()

    def x0(context, pooled_, sigma, skip=None):
        v = transformer(hidden_states=x, timestep=torch.tensor([sigma * 1000]), encoder_hidden_states=context,
                        pooled_projections=pooled_, skip_layers=skip, return_dict=False)[0]
        return x - sigma * v

    with torch.no_grad():
        for sigma, following in zip(sigmas[:-1], sigmas[1:], strict=True):
            skip_negative = simple is not None and simple[2] <= sigma <= simple[1]
            positive_x0 = x0(cond, pooled, sigma)
            negative_x0 = x0(uncond, uncond_pooled, sigma, simple[0] if skip_negative else None)
            denoised = negative_x0 + (positive_x0 - negative_x0) * cfg
            if slg is not None and slg[2] >= sigma >= slg[3]:
                denoised = denoised + (positive_x0 - x0(cond, pooled, sigma, slg[0])) * slg[1]
                if slg[4]:
                    factor = positive_x0.std() / denoised.std()
                    denoised = denoised * (slg[4] * factor + 1 - slg[4])
            x = x + (x - denoised) / sigma * (following - sigma)
    return x


def test_skip_layer_guidance_matches_the_pipeline_and_comfyuis_formulas(ctx):
    parts = tiny_parts(38, "sd3")
    write_files(ctx.env, parts, "sd3.safetensors")
    loaded, pipe = load(ctx, "sd3.safetensors"), pipeline(parts)
    positive, negative = encode(ctx, loaded.clip, PROMPT), encode(ctx, loaded.clip, NEGATIVE)
    latent = {"samples": torch.zeros(1, 16, 8, 8)}
    noise = comfy_noise((1, 16, 8, 8), 39)
    plain = SD3_LATENT.process_in(ksample(ctx, loaded.model, positive, negative, 4.0, 39, latent))

    # ComfyUI's window is σ ∈ [σ(end_percent), σ(start_percent)], diffusers' is the steps i with
    # steps·start < i < steps·stop: 0.2 / 0.6 select steps 1 and 2 (σ = 0.9, 0.75) in both.
    sigmas = [shifted(s) for s in unshifted_sigmas(STEPS)]
    assert [i for i, s in enumerate(sigmas) if shifted(0.4) <= s <= shifted(0.8)] == \
        [i for i in range(STEPS) if STEPS * 0.2 < i < STEPS * 0.6] == [1, 2]
    (slg_model,) = run_node(SkipLayerGuidanceSD3, ctx, model=loaded.model, layers="1", scale=2.5, start_percent=0.2,
                            end_percent=0.6)
    ours = SD3_LATENT.process_in(ksample(ctx, slg_model, positive, negative, 4.0, 39, latent))
    theirs = pipe_latents(pipe, positive, negative, 4.0, noise, skip_guidance_layers=[1],
                          skip_layer_guidance_scale=2.5, skip_layer_guidance_start=0.2, skip_layer_guidance_stop=0.6)
    print(f"SkipLayerGuidanceSD3: max |latent difference| {float((ours - theirs).abs().max())}")
    assert (ours - plain).abs().max() > 1e-2  # the guidance did something
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-4)

    # SkipLayerGuidanceDiT with rescaling (diffusers has none): ComfyUI's formula.
    (dit_model,) = run_node(SkipLayerGuidanceDiT, ctx, model=loaded.model, double_layers="0, 2", single_layers="5",
                            scale=1.5, start_percent=0.0, end_percent=0.5, rescaling_scale=0.7)
    ours = SD3_LATENT.process_in(ksample(ctx, dit_model, positive, negative, 4.0, 39, latent))
    expected = reference_euler(parts.transformer, noise, positive, negative, 4.0,
                               slg=([0, 2], 1.5, 1.0, shifted(0.5), 0.7))
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-4)

    # SkipLayerGuidanceDiTSimple: the negative pass skips the blocks (σ window 0.3-0.8 of the way: steps 2, 3).
    (simple_model,) = run_node(SkipLayerGuidanceDiTSimple, ctx, model=loaded.model, double_layers="1",
                               single_layers="", start_percent=0.3, end_percent=0.8)
    ours = SD3_LATENT.process_in(ksample(ctx, simple_model, positive, negative, 4.0, 39, latent))
    expected = reference_euler(parts.transformer, noise, positive, negative, 4.0,
                               simple=([1], shifted(0.7), shifted(0.2)))
    assert (ours - plain).abs().max() > 1e-2
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-4)
    # No layers: the model is returned as it was.
    assert run_node(SkipLayerGuidanceDiT, ctx, model=loaded.model, double_layers="", single_layers="none",
                    scale=3.0, start_percent=0.01, end_percent=0.15, rescaling_scale=0.0)[0] is loaded.model


def test_block_patches_skip_and_wrap_flux_double_and_single_blocks():
    """dit_calls.block_patches on Flux's two block lists: a skip equals running without the block, a patch that
    calls original_block changes nothing, and the blocks are restored afterwards."""
    network = tiny_flux(40)
    generator = torch.Generator().manual_seed(41)
    inputs = dict(hidden_states=torch.randn(2, 12, 64, generator=generator),
                  encoder_hidden_states=torch.randn(2, 5, 40, generator=generator),
                  pooled_projections=torch.randn(2, 24, generator=generator), timestep=torch.tensor([0.7, 0.7]),
                  img_ids=torch.zeros(12, 3), txt_ids=torch.zeros(5, 3), guidance=torch.tensor([3.5, 3.5]))

    class Identity(torch.nn.Module):
        def forward(self, hidden_states, encoder_hidden_states, temb, *args, **kwargs):
            return encoder_hidden_states, hidden_states

    def skip(args, extra):
        return args

    def passthrough(args, extra):
        return extra["original_block"](args)

    with torch.no_grad():
        plain = network(**inputs).sample
        blocks = (network.transformer_blocks, network.single_transformer_blocks)
        originals = (blocks[0][0], blocks[1][1])
        blocks[0][0], blocks[1][1] = Identity(), Identity()
        without = network(**inputs).sample
        blocks[0][0], blocks[1][1] = originals
        options = {"patches_replace": {"dit": {("double_block", 0): skip, ("single_block", 1): skip,
                                               ("double_block", 9): skip}}}
        with dit_calls.block_patches(network, options):
            skipped = network(**inputs).sample
        wrapped = {"patches_replace": {"dit": {("double_block", 1): passthrough, ("single_block", 0): passthrough}}}
        with dit_calls.block_patches(network, wrapped):
            passed = network(**inputs).sample
    assert (without - plain).abs().max() > 1e-2
    torch.testing.assert_close(skipped, without, rtol=0, atol=1e-6)
    torch.testing.assert_close(passed, plain, rtol=0, atol=1e-6)
    assert all("forward" not in block.__dict__ for block in [*blocks[0], *blocks[1]])


# Merging -------------------------------------------------------------------------------------------------------

def test_model_merge_sd3_block_ratios(ctx):
    first, second = sd3_transformer(42, "sd3"), sd3_transformer(43, "sd3")
    save_state(sd3_original(first), folder(ctx.env, "diffusion_models") / "a.safetensors")
    save_state(sd3_original(second), folder(ctx.env, "diffusion_models") / "b.safetensors")
    (model_a,) = run_node(UNETLoader, ctx, unet_name="a.safetensors", weight_dtype="default")
    (model_b,) = run_node(UNETLoader, ctx, unet_name="b.safetensors", weight_dtype="default")
    ratios = {"pos_embed.": 0.2, "x_embedder.": 0.3, "y_embedder.": 0.4, "joint_blocks.1.": 0.6,
              "final_layer.": 0.9}
    (merged,) = run_node(ModelMergeSD3_2B, ctx, model1=model_a, model2=model_b, **ratios)
    a, b = first.state_dict(), second.state_dict()
    with merged.prepared(ctx.models) as module:
        weights = {name: value.detach().clone() for name, value in module.state_dict().items()}
    expected = {"pos_embed.pos_embed": 0.2, "pos_embed.proj.weight": 0.3,
                "time_text_embed.text_embedder.linear_1.weight": 0.4,
                "time_text_embed.timestep_embedder.linear_1.weight": 1.0,
                "transformer_blocks.1.attn.to_q.weight": 0.6, "transformer_blocks.2.ff.net.2.weight": 1.0,
                "norm_out.linear.weight": 0.9, "proj_out.bias": 0.9}
    for name, ratio in expected.items():
        torch.testing.assert_close(weights[name], ratio * a[name] + (1 - ratio) * b[name], rtol=0, atol=1e-6)
    ctx.models.free_all()
    write_tiny_checkpoint(folder(ctx.env, "checkpoints") / "sd1.safetensors", "sd1", 0)
    sd1 = run_node(CheckpointLoaderSimple, ctx, ckpt_name="sd1.safetensors")[0]
    with pytest.raises(ValueError, match=r"ModelMergeSD3_2B \(#1\): input 'model2': is a sd1 model"):
        run_node(ModelMergeSD3_2B, ctx, model1=model_a, model2=sd1)


# Workflow ------------------------------------------------------------------------------------------------------

WORKFLOW = {
    "1": {"class_type": "UNETLoader", "inputs": {"unet_name": "sd3.5_medium.safetensors", "weight_dtype": "default"}},
    "2": {"class_type": "DualCLIPLoader", "inputs": {"clip_name1": "clip_l.safetensors",
                                                     "clip_name2": "clip_g.safetensors", "type": "sd3"}},
    "3": {"class_type": "VAELoader", "inputs": {"vae_name": "sd3_vae.safetensors"}},
    "4": {"class_type": "ModelSamplingSD3", "inputs": {"model": ["1", 0], "shift": 3.0}},
    "5": {"class_type": "CLIPTextEncode", "inputs": {"text": PROMPT, "clip": ["2", 0]}},
    "6": {"class_type": "CLIPTextEncode", "inputs": {"text": NEGATIVE, "clip": ["2", 0]}},
    "7": {"class_type": "EmptySD3LatentImage", "inputs": {"width": 64, "height": 48, "batch_size": 1}},
    "8": {"class_type": "KSampler", "inputs": {"model": ["4", 0], "seed": 44, "steps": 3, "cfg": 4.0,
                                               "sampler_name": "euler", "scheduler": "simple", "positive": ["5", 0],
                                               "negative": ["6", 0], "latent_image": ["7", 0], "denoise": 1.0}},
    "9": {"class_type": "VAEDecode", "inputs": {"samples": ["8", 0], "vae": ["3", 0]}},
    "10": {"class_type": "SaveImage", "inputs": {"images": ["9", 0], "filename_prefix": "sd35"}},
}


def test_sd35_workflow_through_latentloom_run(tmp_path, capsys):
    from PIL import Image

    from latentloom.nodes.model_families import ModelSamplingSD3
    from latentloom.server.cli import main

    ctx = StubContext(make_env(tmp_path, models_dir=tmp_path / "models"))
    parts = tiny_parts(45, "sd3.5_medium")
    write_files(ctx.env, parts, "sd3.5_medium.safetensors")
    (tmp_path / "graph.json").write_text(json.dumps(WORKFLOW))
    code = main(["run", str(tmp_path / "graph.json"), "--json", "--models-dir", str(tmp_path / "models"),
                 "--input-dir", str(tmp_path / "input"), "--output-dir", str(tmp_path / "output"),
                 "--temp-dir", str(tmp_path / "temp"), "--custom-nodes", str(tmp_path / "none")])
    summary = json.loads(capsys.readouterr().out)
    assert code == 0 and summary["status"] == "success", summary
    (png,) = sorted((tmp_path / "output").glob("sd35*.png"))
    saved = np.asarray(Image.open(png).convert("RGB"))
    assert saved.shape == (12, 16, 3)  # 48×64 asked: a 6×8 latent, ×2 by the tiny VAE

    # The same graph run in-process, node by node.
    loaded = load(ctx, "sd3.5_medium.safetensors")
    (model,) = run_node(ModelSamplingSD3, ctx, model=loaded.model, shift=3.0)
    (latent,) = run_node(EmptySD3LatentImage, ctx, width=64, height=48, batch_size=1)
    (samples,) = run_node(KSampler, ctx, model=model, seed=44, steps=3, cfg=4.0, sampler_name="euler",
                          scheduler="simple", positive=encode(ctx, loaded.clip, PROMPT),
                          negative=encode(ctx, loaded.clip, NEGATIVE), latent_image=latent, denoise=1.0)
    (image,) = run_node(VAEDecode, ctx, samples=samples, vae=loaded.vae)
    pixels = np.clip(255.0 * image[0].numpy(), 0, 255).astype(np.uint8)
    assert pixels.std() > 1.0
    assert np.array_equal(saved, pixels)
