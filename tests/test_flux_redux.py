"""Flux Redux: a SigLIP vision file through CLIPVisionLoader / CLIPVisionEncode, a Redux file through
StyleModelLoader / StyleModelApply, against diffusers' FluxPriorReduxPipeline (SiglipVisionModel image encoder,
ReduxImageEncoder image embedder) built from the same weights; then KSampler on the Redux conditioning against
FluxPipeline fed the pipeline's own prompt embeddings with the Redux tokens appended (ComfyUI's attn_bias strength
as the pipeline's joint attention mask).

The tiny SigLIP is built with ComfyUI's layer-norm eps (torch's default 1e-5: ComfyUI's SigLIP config leaves it
out) so that both sides run the same network; its file keeps the attention-pooling head ComfyUI does not load.
The tiny Redux reads the tiny SigLIP's 64-wide tokens and writes the tiny T5's 96-wide text tokens. The pipeline's
__call__ concatenates its image tokens to 4096-wide T5 zeros when it has no text encoders, which a tiny model
cannot match, so its own encode_image and image_embedder give the Redux tokens.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import math  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from node_context import run_node  # noqa: E402
from PIL import Image  # noqa: E402
from test_family_loading import _perturbed  # noqa: E402
from test_flux_sampling import PROMPT, FluxFiles  # noqa: E402
from tiny_models import save_state  # noqa: E402

from latentloom.engine.inputs import InputError  # noqa: E402
from latentloom.nodes.conditioning import CLIPTextEncode  # noqa: E402
from latentloom.nodes.diffusion import dit_flux  # noqa: E402
from latentloom.nodes.diffusion.latent_formats import FLUX_LATENT  # noqa: E402
from latentloom.nodes.diffusion.schedules import calculate_sigmas, schedule_for  # noqa: E402
from latentloom.nodes.image_prompting import (  # noqa: E402
    CLIPVisionEncode,
    CLIPVisionLoader,
    StyleModelApply,
    StyleModelLoader,
    unCLIPConditioning,
)
from latentloom.nodes.model_families import FluxGuidance  # noqa: E402
from latentloom.nodes.sampling import KSampler  # noqa: E402

IMAGE_SIZE, PATCH = 32, 8  # 16 SigLIP tokens
VISION_WIDTH, TEXT_WIDTH = 64, 96


# Each test builds tiny diffusers/transformers models and compares with their pipeline: seconds apiece.
pytestmark = pytest.mark.slow


def tiny_siglip(seed: int) -> torch.nn.Module:
    from transformers import SiglipVisionConfig, SiglipVisionModel

    torch.manual_seed(seed)
    config = SiglipVisionConfig(hidden_size=VISION_WIDTH, intermediate_size=80, num_hidden_layers=3,
                                num_attention_heads=16, image_size=IMAGE_SIZE, patch_size=PATCH,
                                layer_norm_eps=1e-5, vision_use_head=True)
    return _perturbed(SiglipVisionModel(config), seed)


def siglip_file_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """ComfyUI's sigclip_vision file layout: transformers' names under vision_model."""
    return {(key if key.startswith("vision_model.") else "vision_model." + key): value.clone()
            for key, value in model.state_dict().items() if not key.endswith("position_ids")}


def tiny_redux(seed: int) -> torch.nn.Module:
    from diffusers.pipelines.flux.modeling_flux import ReduxImageEncoder

    torch.manual_seed(seed)
    return _perturbed(ReduxImageEncoder(redux_dim=VISION_WIDTH, txt_in_features=TEXT_WIDTH), seed)


class ReduxFiles(FluxFiles):
    """FluxFiles (tiny Flux dev, CLIP-L, T5) plus the SigLIP and Redux files and a picture."""

    def __init__(self, root, seed: int = 0) -> None:
        super().__init__(root, guidance=True, seed=seed)
        self.siglip, self.redux = tiny_siglip(seed + 5), tiny_redux(seed + 6)
        models = root / "models"
        save_state(siglip_file_state(self.siglip), models / "clip_vision" / "sigclip_vision_patch14_384.safetensors")
        save_state({k: v.clone() for k, v in self.redux.state_dict().items()},
                   models / "style_models" / "flux1-redux-dev.safetensors")
        rgb = np.random.default_rng(seed + 7).integers(0, 256, size=(IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
        self.picture = Image.fromarray(rgb)
        self.pixels = torch.from_numpy(rgb.astype(np.float32) / 255.0)[None]  # what LoadImage gives

    def redux_pipeline(self):
        from diffusers import FluxPriorReduxPipeline
        from transformers import SiglipImageProcessor

        processor = SiglipImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
        return FluxPriorReduxPipeline(image_encoder=self.siglip, feature_extractor=processor,
                                      image_embedder=self.redux)

    def redux_tokens(self, crop: str = "center"):
        (vision,) = run_node(CLIPVisionLoader, self.ctx, clip_name="sigclip_vision_patch14_384.safetensors")
        (output,) = run_node(CLIPVisionEncode, self.ctx, clip_vision=vision, image=self.pixels, crop=crop)
        (style,) = run_node(StyleModelLoader, self.ctx, style_model_name="flux1-redux-dev.safetensors")
        return vision, output, style


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


@pytest.fixture
def files(tmp_path) -> ReduxFiles:
    return ReduxFiles(tmp_path)


def test_siglip_and_redux_tokens_match_flux_prior_redux_pipeline(files):
    vision, output, style = files.redux_tokens()
    pipe = files.redux_pipeline()
    with torch.no_grad():
        hidden = pipe.encode_image(files.picture, torch.device("cpu"), 1)
        expected = pipe.image_embedder(hidden).image_embeds
        with_all = files.siglip(pixel_values=pipe.feature_extractor(files.picture, return_tensors="pt")
                                .pixel_values, output_hidden_states=True)
    assert vision.image_size == IMAGE_SIZE and output.last_hidden_state.shape == (1, 16, VISION_WIDTH)
    print(f"siglip last_hidden_state max|Δ| = {max_diff(output.last_hidden_state, hidden):.2e}")
    torch.testing.assert_close(output.last_hidden_state, hidden, rtol=0, atol=1e-5)
    # ComfyUI's SigLIP output: image_embeds = the token sequence, penultimate = the second-to-last layer's output.
    torch.testing.assert_close(output.image_embeds, hidden, rtol=0, atol=1e-5)
    torch.testing.assert_close(output.penultimate_hidden_states, with_all.hidden_states[-2], rtol=0, atol=1e-5)

    (conditioning,) = run_node(CLIPTextEncode, files.ctx, text=PROMPT, clip=files.load()[1])
    text = conditioning[0][0]
    for strength in (1.0, 0.4):
        (result,) = run_node(StyleModelApply, files.ctx, conditioning=conditioning, style_model=style,
                             clip_vision_output=output, strength=strength, strength_type="multiply")
        ((cond, new_options),) = result
        assert cond.shape == (1, 256 + 16, TEXT_WIDTH) and torch.equal(cond[:, :256], text)
        delta = max_diff(cond[:, 256:], expected * strength)
        print(f"redux tokens (multiply {strength}) max|Δ| = {delta:.2e}")
        assert delta < 1e-5 and "attention_mask" not in new_options

    # SigLIP has no image embedding vector: unCLIP conditioning refuses it by name.
    with pytest.raises(InputError, match="clip_vision_output"):
        run_node(unCLIPConditioning, files.ctx, conditioning=conditioning, clip_vision_output=output)


def test_attn_bias_mask_is_resized_to_the_flux_token_grid(files):
    """StyleModelApply's attn_bias mask (one image cell) becomes the call's [text + image] bias: log(strength) on
    the Redux keys for the text and image queries, 0 elsewhere."""
    _, output, style = files.redux_tokens()
    text = torch.randn(1, 7, TEXT_WIDTH, generator=torch.Generator().manual_seed(1))
    (result,) = run_node(StyleModelApply, files.ctx, conditioning=[[text, {}]], style_model=style,
                         clip_vision_output=output, strength=0.25, strength_type="attn_bias")
    extra = dit_flux.conditioning(result[0][1], torch.Size((1, 16, 6, 7)), torch.device("cpu"))
    mask = extra["attention_mask"]
    tokens = 7 + 16 + 3 * 4  # text, Redux tokens, ceil(6 / 2) × ceil(7 / 2) image tokens
    assert mask.shape == (1, tokens, tokens)
    expected = torch.zeros(1, tokens, tokens)
    log_bias = float(torch.log(torch.tensor(0.25)).half())
    expected[:, :7, 7:23] = expected[:, 23:, 7:23] = log_bias  # (the Redux tokens' own queries: no bias)
    torch.testing.assert_close(mask, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("strength_type", ["multiply", "attn_bias"])
def test_ksampler_with_redux_matches_flux_pipeline(tmp_path, strength_type):
    files = ReduxFiles(tmp_path, seed=50)
    model, clip, _ = files.load()
    _, output, style = files.redux_tokens()
    strength, guidance, seed, steps = 0.5, 3.0, 11, 3
    ((positive,),) = run_node(CLIPTextEncode, files.ctx, text=PROMPT, clip=clip)
    (positive,) = run_node(StyleModelApply, files.ctx, conditioning=[positive], style_model=style,
                           clip_vision_output=output, strength=strength, strength_type=strength_type)
    (positive,) = run_node(FluxGuidance, files.ctx, conditioning=positive, guidance=guidance)
    (negative,) = run_node(CLIPTextEncode, files.ctx, text="", clip=clip)
    sigmas = calculate_sigmas(schedule_for(model.sampling), "simple", steps)
    (out,) = run_node(KSampler, files.ctx, model=model, seed=seed, steps=steps, cfg=1.0, sampler_name="euler",
                      scheduler="simple", positive=positive, negative=negative,
                      latent_image={"samples": torch.zeros(1, 16, 8, 8)}, denoise=1.0)

    redux, pipe = files.redux_pipeline(), files.pipeline()
    with torch.no_grad():
        tokens = redux.image_embedder(redux.encode_image(files.picture, torch.device("cpu"), 1)).image_embeds
        prompt_embeds, pooled, _ = pipe.encode_prompt(PROMPT, prompt_2=None, max_sequence_length=256)
        attention = None
        if strength_type == "multiply":
            tokens = tokens * strength
        else:  # the bias on the Redux keys from the text and image queries (text + Redux + 16 image tokens)
            bias = torch.zeros(1, 1, 256 + 16 + 16, 256 + 16 + 16)
            bias[..., :256, 256:272] = bias[..., 272:, 256:272] = math.log(strength)
            attention = {"attention_mask": bias.half().float()}  # ComfyUI keeps the mask in float16
        noise = torch.randn(1, 16, 8, 8, generator=torch.manual_seed(seed))
        packed = pipe(prompt_embeds=torch.cat([prompt_embeds, tokens], dim=1), pooled_prompt_embeds=pooled,
                      height=16, width=16, guidance_scale=guidance, num_inference_steps=steps,
                      sigmas=sigmas[:-1].numpy().astype(np.float32), latents=pipe._pack_latents(noise, 1, 16, 8, 8),
                      joint_attention_kwargs=attention, output_type="latent").images
    ours = pipe._pack_latents(FLUX_LATENT.process_in(out["samples"]), 1, 16, 8, 8)
    delta = max_diff(ours, packed)
    print(f"flux redux ({strength_type} {strength}) final latents max|Δ| = {delta:.2e}")
    assert delta < 1e-4
    # The Redux tokens matter.
    (plain,) = run_node(FluxGuidance, files.ctx, guidance=guidance,
                        conditioning=run_node(CLIPTextEncode, files.ctx, text=PROMPT, clip=clip)[0])
    (without,) = run_node(KSampler, files.ctx, model=model, seed=seed, steps=steps, cfg=1.0, sampler_name="euler",
                          scheduler="simple", positive=plain, negative=negative,
                          latent_image={"samples": torch.zeros(1, 16, 8, 8)}, denoise=1.0)
    assert max_diff(without["samples"], out["samples"]) > 1e-3
    if strength_type == "attn_bias":  # the bias matters: the same tokens unbiased give another result
        (unbiased,) = run_node(StyleModelApply, files.ctx, conditioning=plain, style_model=style,
                               clip_vision_output=output, strength=1.0, strength_type="attn_bias")
        (full,) = run_node(KSampler, files.ctx, model=model, seed=seed, steps=steps, cfg=1.0, sampler_name="euler",
                           scheduler="simple", positive=unbiased, negative=negative,
                           latent_image={"samples": torch.zeros(1, 16, 8, 8)}, denoise=1.0)
        assert "attention_mask" not in unbiased[0][1] and max_diff(full["samples"], out["samples"]) > 1e-4
