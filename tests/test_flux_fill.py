"""Flux Fill (inpainting / outpainting) through the nodes against diffusers' FluxFillPipeline.

A tiny Flux Fill transformer (img_in reads 384 = 4 × (16 latent + 16 masked-picture + 64 mask) packed features) is
written in ComfyUI's original single-file layout next to the tiny CLIP-L / T5 / tokenizer of test_flux_sampling,
with a VAE that compresses 8× (Flux Fill folds each latent cell's 8×8 pixel block of the mask into 64 channels,
and the pipeline folds vae_scale_factor² pixels). The VAE's posterior is made (near) deterministic — its log-variance
output is clamped at −30, σ ≈ 3e-7 — because the pipeline samples the masked picture's latent where ComfyUI takes
the mean. Compared: the transformer call with the picture and mask channels, and the final latents of
LoadImage → InpaintModelConditioning → KSampler (euler, cfg 1) against the pipeline run with the same image, mask,
packed noise, sigmas and guidance (output_type="latent": packed, in the model's scaled space).
"""

from __future__ import annotations

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from node_context import StubContext, make_env, run_node  # noqa: E402
from PIL import Image  # noqa: E402
from test_family_loading import _perturbed, clip_file_state, flux_original, t5_file_state, tiny_t5  # noqa: E402
from test_flux_sampling import PROMPT, pipeline_clip_tokenizer, write_t5_tokenizer  # noqa: E402
from tiny_models import _text_encoder, save_state  # noqa: E402

from latentloom.nodes.attention_patches import DifferentialDiffusion  # noqa: E402
from latentloom.nodes.conditioning import CLIPTextEncode, InpaintModelConditioning  # noqa: E402
from latentloom.nodes.diffusion import convert, dit_flux, flux_fill  # noqa: E402
from latentloom.nodes.diffusion.latent_formats import FLUX_LATENT  # noqa: E402
from latentloom.nodes.diffusion.schedules import calculate_sigmas, schedule_for  # noqa: E402
from latentloom.nodes.image import LoadImage  # noqa: E402
from latentloom.nodes.loaders import DualCLIPLoader, UNETLoader, VAELoader  # noqa: E402
from latentloom.nodes.model_families import FluxGuidance  # noqa: E402
from latentloom.nodes.sampling import KSampler  # noqa: E402
from latentloom.nodes.vae_nodes import VAEDecode  # noqa: E402
from latentloom.server.cli import main  # noqa: E402

SIZE = 64  # pixels; latent 8×8 (the 8× VAE), 4×4 tokens
IMAGE_NAME = "photo.png"


# Each test builds tiny diffusers/transformers models and compares with their pipeline: seconds apiece.
pytestmark = pytest.mark.slow


def tiny_flux_fill(seed: int, in_channels: int = 384) -> torch.nn.Module:
    """Flux's tiny layout (text widths of tiny_t5 and the tiny CLIP-L) reading the extra packed channels."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    return _perturbed(FluxTransformer2DModel(
        patch_size=1, in_channels=in_channels, out_channels=64, num_layers=2, num_single_layers=2,
        attention_head_dim=128, num_attention_heads=2, joint_attention_dim=96, pooled_projection_dim=32,
        guidance_embeds=True, axes_dims_rope=(16, 56, 56)), seed)


def deterministic_vae8(seed: int) -> torch.nn.Module:
    """A 16-channel AutoencoderKL compressing 8× (four levels), Flux's scale / shift, log-variance clamped at −30."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    vae = _perturbed(AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(32, 32, 32, 32), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        norm_num_groups=32, use_quant_conv=False, use_post_quant_conv=False,
        scaling_factor=FLUX_LATENT.scale_factor, shift_factor=FLUX_LATENT.shift_factor), seed)
    with torch.no_grad():  # the second half of conv_out is the log-variance
        vae.encoder.conv_out.weight[16:] = 0
        vae.encoder.conv_out.bias[16:] = -100.0
    return vae


def photo_and_mask(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """An RGB photo (uint8) and a binary hole (1 = repaint): a rectangle of whole and split 8×8 pixel blocks."""
    rng = np.random.default_rng(seed)
    rgb = rng.integers(0, 256, size=(SIZE, SIZE, 3), dtype=np.uint8)
    hole = np.zeros((SIZE, SIZE), dtype=np.uint8)
    hole[12:44, 20:52] = 1
    return rgb, hole


class FillFiles:
    """Tiny Flux Fill, CLIP-L, T5 (+ tokenizer), VAE in a models folder, and the photo with its hole as an RGBA
    PNG in the input folder (alpha 0 = the hole: LoadImage's mask is 1 − alpha)."""

    def __init__(self, root: Path, seed: int = 0) -> None:
        models = root / "models"
        self.env = make_env(root, models_dir=models)
        self.ctx = StubContext(self.env)
        self.transformer = tiny_flux_fill(seed)
        self.clip_l = _text_encoder(open_clip=False, projection=False, seed=seed + 1)
        self.t5 = tiny_t5(seed + 2)
        self.vae = deterministic_vae8(seed + 3)
        save_state(flux_original(self.transformer), models / "diffusion_models" / "flux1-fill-dev.safetensors")
        save_state(clip_file_state(self.clip_l), models / "text_encoders" / "clip_l.safetensors")
        save_state(t5_file_state(self.t5), models / "text_encoders" / "t5xxl_fp16.safetensors")
        save_state(convert.vae_to_ldm(self.vae.state_dict()), models / "vae" / "ae.safetensors")
        self.tokenizer_dir = write_t5_tokenizer(models / "text_encoders" / "t5_tokenizer")
        self.rgb, self.hole = photo_and_mask(seed + 4)
        alpha = (255 * (1 - self.hole)).astype(np.uint8)
        Image.fromarray(np.dstack([self.rgb, alpha]), "RGBA").save(self.env.input_dir / IMAGE_NAME)

    def load(self):
        (model,) = run_node(UNETLoader, self.ctx, unet_name="flux1-fill-dev.safetensors", weight_dtype="default")
        (clip,) = run_node(DualCLIPLoader, self.ctx, clip_name1="clip_l.safetensors",
                           clip_name2="t5xxl_fp16.safetensors", type="flux")
        (vae,) = run_node(VAELoader, self.ctx, vae_name="ae.safetensors")
        return model, clip, vae

    def pipeline(self):
        from diffusers import FlowMatchEulerDiscreteScheduler, FluxFillPipeline
        from transformers import T5TokenizerFast

        scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=False)  # sigmas as given
        return FluxFillPipeline(scheduler=scheduler, vae=self.vae, text_encoder=self.clip_l,
                                tokenizer=pipeline_clip_tokenizer(), text_encoder_2=self.t5,
                                tokenizer_2=T5TokenizerFast.from_pretrained(str(self.tokenizer_dir)),
                                transformer=self.transformer)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


@pytest.fixture
def files(tmp_path) -> FillFiles:
    return FillFiles(tmp_path)


# The transformer call ---------------------------------------------------------------------------------------------

def test_fill_call_appends_the_masked_picture_and_the_folded_mask(files):
    from diffusers import FluxPipeline

    model, _, _ = files.load()
    assert model.family == "flux" and model.unet.config.in_channels == 384
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(2, 16, 6, 8, generator=generator)
    context, pooled = torch.randn(2, 7, 96, generator=generator), torch.randn(2, 32, generator=generator)
    picture = torch.randn(1, 16, 6, 8, generator=generator)  # a raw VAE latent
    mask = (torch.rand(1, 1, 48, 64, generator=generator) > 0.5).float()  # pixels
    values = dit_flux.conditioning({"pooled_output": pooled[:1], "concat_latent_image": picture,
                                    "concat_mask": mask}, x.shape, torch.device("cpu"))
    extra = {**values, "pooled_projections": pooled, "guidance": torch.tensor([30.0, 30.0])}
    sigma = torch.tensor([0.6, 0.6])
    out = dit_flux.forward(model.unet, x, sigma, context, extra, {})

    # FluxFillPipeline's inputs: packed latents, packed processed picture, the mask's 8×8 blocks as 64 channels.
    folded = mask[:, 0].view(1, 6, 8, 8, 8).permute(0, 2, 4, 1, 3).reshape(1, 64, 6, 8)
    hidden = torch.cat([FluxPipeline._pack_latents(x, 2, 16, 6, 8),
                        FluxPipeline._pack_latents(FLUX_LATENT.process_in(picture).repeat(2, 1, 1, 1), 2, 16, 6, 8),
                        FluxPipeline._pack_latents(folded.repeat(2, 1, 1, 1), 2, 64, 6, 8)], dim=2)
    ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(3.0), torch.arange(4.0), indexing="ij"), -1)
    with torch.no_grad():
        expected = files.transformer(hidden_states=hidden, encoder_hidden_states=context, pooled_projections=pooled,
                                     timestep=sigma, img_ids=ids.reshape(-1, 3), txt_ids=torch.zeros(7, 3),
                                     guidance=torch.tensor([30.0, 30.0]), return_dict=False)[0]
    delta = max_diff(out, dit_flux.unpack(expected, 3, 4))
    print(f"flux fill transformer call max|Δ| = {delta:.2e}")
    assert delta < 1e-5

    # The mask matters, and without picture and mask the model gets ComfyUI's defaults: a zero latent
    # (processed) and an all-ones mask.
    flipped = flux_fill.conditioning_inputs({"concat_latent_image": picture, "concat_mask": 1 - mask}, x.shape,
                                            torch.device("cpu"))
    assert max_diff(dit_flux.forward(model.unet, x, sigma, context, {**extra, **flipped}, {}), out) > 1e-3
    bare = {"pooled_projections": pooled, "guidance": extra["guidance"]}
    defaults = flux_fill.conditioning_inputs({"concat_latent_image": torch.zeros(1, 16, 6, 8),
                                             "concat_mask": torch.ones(1, 1, 48, 64)}, x.shape, torch.device("cpu"))
    torch.testing.assert_close(dit_flux.forward(model.unet, x, sigma, context, bare, {}),
                               dit_flux.forward(model.unet, x, sigma, context, {**bare, **defaults}, {}),
                               rtol=0, atol=0)

    # An area prompt's cropped latent cannot take the whole picture's channels: a clear error.
    with pytest.raises(ValueError, match="area conditioning"):
        dit_flux.forward(model.unet, x[..., :4, :4], sigma, context, extra, {})


def test_mask_folding_follows_comfyui_resizing():
    # The mask's channels are averaged, and it is resized (bilinear) to 8× the latent before folding.
    mask = torch.rand(2, 3, 12, 16, generator=torch.Generator().manual_seed(5))
    folded = flux_fill.fold_mask(mask, 3, 4)
    assert folded.shape == (2, 64, 3, 4)
    resized = torch.nn.functional.interpolate(mask.mean(dim=1, keepdim=True), size=(24, 32), mode="bilinear")
    # channel 8·row + col of cell (y, x) = pixel (8y + row, 8x + col)
    torch.testing.assert_close(folded[:, 8 * 2 + 5, 1, 3], resized[:, 0, 8 + 2, 24 + 5], rtol=0, atol=1e-6)
    torch.testing.assert_close(folded[:, 8 * 7 + 0, 2, 0], resized[:, 0, 16 + 7, 0], rtol=0, atol=1e-6)
    # A plain Flux (64 input features) reads no extra channels; a Depth / Canny one (128) the picture only.
    plain, control = tiny_flux_fill(1, in_channels=64), tiny_flux_fill(1, in_channels=128)
    x = torch.zeros(1, 16, 2, 2)
    extra = flux_fill.conditioning_inputs({"concat_mask": torch.ones(1, 16, 16)}, x.shape, torch.device("cpu"))
    assert flux_fill.channels(plain, extra, x) is None
    torch.testing.assert_close(flux_fill.channels(control, extra, x), extra["fill_image"])


# Whole runs ---------------------------------------------------------------------------------------------------

def _inpaint_inputs(files: FillFiles, clip, vae, guidance: float, noise_mask: bool):
    (pixels, mask) = run_node(LoadImage, files.ctx, image=IMAGE_NAME)
    ((positive,),) = run_node(CLIPTextEncode, files.ctx, text=PROMPT, clip=clip)
    ((negative,),) = run_node(CLIPTextEncode, files.ctx, text="", clip=clip)
    (positive,) = run_node(FluxGuidance, files.ctx, conditioning=[positive], guidance=guidance)
    return run_node(InpaintModelConditioning, files.ctx, positive=positive, negative=[negative], vae=vae,
                    pixels=pixels, mask=mask, noise_mask=noise_mask)


def test_ksampler_matches_flux_fill_pipeline(files):
    model, clip, vae = files.load()
    guidance, seed, steps = 30.0, 9, 3
    positive, negative, latent = _inpaint_inputs(files, clip, vae, guidance, noise_mask=False)
    sigmas = calculate_sigmas(schedule_for(model.sampling), "simple", steps)
    assert float(sigmas[0]) == 1.0  # the encoded picture does not leak into the starting noise
    (out,) = run_node(KSampler, files.ctx, model=model, seed=seed, steps=steps, cfg=1.0, sampler_name="euler",
                      scheduler="simple", positive=positive, negative=negative, latent_image=latent, denoise=1.0)

    pipe = files.pipeline()
    noise = torch.randn(1, 16, 8, 8, generator=torch.manual_seed(seed))
    with torch.no_grad():
        packed = pipe(prompt=PROMPT, image=Image.fromarray(files.rgb), mask_image=Image.fromarray(255 * files.hole),
                      height=SIZE, width=SIZE, guidance_scale=guidance, num_inference_steps=steps,
                      sigmas=sigmas[:-1].numpy().astype(np.float32), latents=pipe._pack_latents(noise, 1, 16, 8, 8),
                      max_sequence_length=256, output_type="latent").images
    ours = pipe._pack_latents(FLUX_LATENT.process_in(out["samples"]), 1, 16, 8, 8)
    delta = max_diff(ours, packed)
    print(f"flux fill final latents max|Δ| = {delta:.2e} (|x| max {packed.abs().max():.2f})")
    assert packed.abs().max() > 0.5 and max_diff(packed, pipe._pack_latents(noise, 1, 16, 8, 8)) > 0.1
    assert delta < 1e-4


def workflow(seed: int, differential: bool) -> dict:
    """ComfyUI's Flux Fill inpainting template, shrunk: LoadImage's mask into InpaintModelConditioning."""
    graph = {
        "31": {"class_type": "UNETLoader", "inputs": {"unet_name": "flux1-fill-dev.safetensors",
                                                      "weight_dtype": "default"}},
        "34": {"class_type": "DualCLIPLoader", "inputs": {"clip_name1": "clip_l.safetensors",
                                                          "clip_name2": "t5xxl_fp16.safetensors", "type": "flux"}},
        "32": {"class_type": "VAELoader", "inputs": {"vae_name": "ae.safetensors"}},
        "17": {"class_type": "LoadImage", "inputs": {"image": IMAGE_NAME}},
        "23": {"class_type": "CLIPTextEncode", "inputs": {"text": PROMPT, "clip": ["34", 0]}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["34", 0]}},
        "26": {"class_type": "FluxGuidance", "inputs": {"conditioning": ["23", 0], "guidance": 30.0}},
        "38": {"class_type": "InpaintModelConditioning",
               "inputs": {"positive": ["26", 0], "negative": ["7", 0], "vae": ["32", 0], "pixels": ["17", 0],
                          "mask": ["17", 1], "noise_mask": True}},
        "39": {"class_type": "DifferentialDiffusion", "inputs": {"model": ["31", 0]}},
        "3": {"class_type": "KSampler", "inputs": {"model": ["39", 0] if differential else ["31", 0], "seed": seed,
                                                   "steps": 3, "cfg": 1.0, "sampler_name": "euler",
                                                   "scheduler": "normal", "positive": ["38", 0],
                                                   "negative": ["38", 1], "latent_image": ["38", 2],
                                                   "denoise": 1.0}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["32", 0]}},
        "9": {"class_type": "SaveImage", "inputs": {"images": ["8", 0], "filename_prefix": "flux_fill"}},
    }
    if not differential:
        del graph["39"]
    return graph


@pytest.mark.parametrize("differential", [True, False], ids=["differential", "plain"])
def test_inpaint_workflow_through_the_cli(tmp_path, capsys, differential):
    files = FillFiles(tmp_path, seed=20)
    document = tmp_path / "flux_fill.json"
    document.write_text(json.dumps(workflow(seed=4, differential=differential)))
    code = main(["run", str(document), "--models-dir", str(tmp_path / "models"), "--output-dir",
                 str(tmp_path / "cli_output"), "--input-dir", str(files.env.input_dir), "--temp-dir",
                 str(tmp_path / "cli_temp"), "--json"])
    summary = json.loads(capsys.readouterr().out)
    assert code == 0 and summary["status"] == "success", summary
    (png,) = summary["outputs"]
    with Image.open(png) as saved:
        from_cli = np.asarray(saved.convert("RGB"))

    # The same nodes in process.
    model, clip, vae = files.load()
    if differential:
        (model,) = run_node(DifferentialDiffusion, files.ctx, model=model)
    positive, negative, latent = _inpaint_inputs(files, clip, vae, 30.0, noise_mask=True)
    (out,) = run_node(KSampler, files.ctx, model=model, seed=4, steps=3, cfg=1.0, sampler_name="euler",
                      scheduler="normal", positive=positive, negative=negative, latent_image=latent, denoise=1.0)
    (image,) = run_node(VAEDecode, files.ctx, samples=out, vae=vae)
    expected = np.clip(255.0 * image[0].numpy(), 0, 255).astype(np.uint8)
    assert from_cli.shape == expected.shape == (SIZE, SIZE, 3) and np.array_equal(from_cli, expected)

    # The denoise mask keeps the latent cells outside the hole (mask 0 over their whole 8×8 block) as encoded,
    # and the hole is repainted.
    cells = torch.from_numpy(files.hole).float().reshape(8, 8, 8, 8).amax(dim=(1, 3)) > 0
    kept, painted = out["samples"][..., ~cells], latent["samples"][..., ~cells]
    torch.testing.assert_close(kept, painted, rtol=0, atol=1e-5)
    assert max_diff(out["samples"][..., cells], latent["samples"][..., cells]) > 0.1
