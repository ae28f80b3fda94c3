"""Flux dev / schnell / Kontext through the nodes against diffusers' FluxPipeline and FluxKontextPipeline.

Tiny random Flux transformers are written in ComfyUI's original single-file layout, CLIP-L and T5 as ComfyUI's
text-encoder files, and a tiny Unigram T5 tokenizer (built with the `tokenizers` library: T5's real vocabulary is
not available offline) as models/text_encoders/t5_tokenizer/tokenizer.json. They load through UNETLoader /
DualCLIPLoader(type flux) / VAELoader; the pipelines are built from the same weights (CLIPTokenizer from the
shipped BPE vocabulary, T5TokenizerFast from the same tokenizer.json). Compared: the text encoding (with
encode_prompt), the transformer call, and the final latents of KSampler (euler, cfg 1) against the pipelines run
with the same packed noise and sigmas (output_type="latent": packed, in the model's scaled space).
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from node_context import StubContext, make_env, run_node  # noqa: E402
from test_family_loading import _perturbed, clip_file_state, flux_original, t5_file_state, tiny_t5, tiny_vae16  # noqa: E402
from tiny_models import _text_encoder, save_state  # noqa: E402

from latentloom.nodes.conditioning import CLIPTextEncode  # noqa: E402
from latentloom.nodes.diffusion import convert, dit_flux  # noqa: E402
from latentloom.nodes.diffusion.family_clip import TokenizerUnavailable  # noqa: E402
from latentloom.nodes.diffusion.latent_formats import FLUX_LATENT  # noqa: E402
from latentloom.nodes.diffusion.schedules import calculate_sigmas, schedule_for  # noqa: E402
from latentloom.nodes.diffusion.t5 import find_t5_tokenizer, t5_tokenize  # noqa: E402
from latentloom.nodes.diffusion.tokenizer import BPE_VOCAB_FILE, TOKENIZER_CONFIG_FILE, build_clip_vocab  # noqa: E402
from latentloom.nodes.family_flux import CLIPTextEncodeFlux, ModelMergeFlux1, flux_block_name  # noqa: E402
from latentloom.nodes.loaders import DualCLIPLoader, UNETLoader, VAELoader  # noqa: E402
from latentloom.nodes.model_families import (  # noqa: E402
    FluxDisableGuidance,
    FluxGuidance,
    FluxKontextMultiReferenceLatentMethod,
    ModelSamplingFlux,
    ReferenceLatent,
)
from latentloom.nodes.sampling import KSampler  # noqa: E402

PROMPT = "a photo of a red cat sitting on the table"
T5_WORDS = "a photo of cat dog red blue on the table in with and sitting garden".split()


# Tiny files ----------------------------------------------------------------------------------------------------

# Each test builds tiny diffusers/transformers models and compares with their pipeline: seconds apiece.
pytestmark = pytest.mark.slow


def write_t5_tokenizer(folder: Path) -> Path:
    """A tiny T5-style Unigram tokenizer.json (ids 0 <pad>, 1 </s>, 2 <unk>; Metaspace; "$A </s>" template)."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -3.0)]
    vocab += [(char, -6.0) for char in "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789,.:;!?()'-"]
    vocab += [("▁" + word, -2.0) for word in T5_WORDS]
    tokenizer = Tokenizer(models.Unigram(vocab, unk_id=2, byte_fallback=False))
    # The pipeline of T5's real tokenizer.json (as ComfyUI bundles it), without its precompiled NFKC map.
    tokenizer.normalizer = normalizers.Sequence([normalizers.Strip(left=False, right=True),
                                                 normalizers.Replace(Regex(" {2,}"), "▁")])
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tokenizer.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    tokenizer.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                             special_tokens=[("</s>", 1)])
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(folder / "tokenizer.json"))
    return folder


def tiny_flux_for_text(seed: int, guidance: bool) -> torch.nn.Module:
    """tiny_flux's layout with the text widths of tiny_t5 (96) and the tiny CLIP-L (32)."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    return _perturbed(FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=2, num_single_layers=2, attention_head_dim=128,
        num_attention_heads=2, joint_attention_dim=96, pooled_projection_dim=32, guidance_embeds=guidance,
        axes_dims_rope=(16, 56, 56)), seed)


def pipeline_clip_tokenizer():
    """CLIP-L's tokenizer from the shipped BPE vocabulary, 77 tokens long as the pipelines expect."""
    import json

    from transformers import CLIPTokenizer

    config = json.loads(TOKENIZER_CONFIG_FILE.read_text())
    vocab, merges = build_clip_vocab(BPE_VOCAB_FILE, int(config.pop("merge_count")))
    return CLIPTokenizer(vocab=vocab, merges=merges, **{**config, "model_max_length": 77})


def flux_vae(seed: int) -> torch.nn.Module:
    vae = tiny_vae16(seed)
    vae.register_to_config(scaling_factor=FLUX_LATENT.scale_factor, shift_factor=FLUX_LATENT.shift_factor)
    return vae


class FluxFiles:
    """The tiny originals and the env whose models/ folder holds them in ComfyUI's layout."""

    def __init__(self, root: Path, guidance: bool = True, seed: int = 0) -> None:
        self.env = make_env(models_dir=root / "models")
        self.ctx = StubContext(self.env)
        self.transformer = tiny_flux_for_text(seed, guidance)
        self.clip_l = _text_encoder(open_clip=False, projection=False, seed=seed + 1)
        self.t5 = tiny_t5(seed + 2)
        self.vae = flux_vae(seed + 3)
        models = root / "models"
        self.unet_name = "flux1-dev.safetensors" if guidance else "flux1-schnell.safetensors"
        save_state(flux_original(self.transformer), models / "diffusion_models" / self.unet_name)
        save_state(clip_file_state(self.clip_l), models / "text_encoders" / "clip_l.safetensors")
        save_state(t5_file_state(self.t5), models / "text_encoders" / "t5xxl_fp16.safetensors")
        save_state(convert.vae_to_ldm(self.vae.state_dict()), models / "vae" / "ae.safetensors")
        self.tokenizer_dir = write_t5_tokenizer(models / "text_encoders" / "t5_tokenizer")

    def load(self):
        (model,) = UNETLoader.model_construct(unet_name=self.unet_name, weight_dtype="default").run(self.ctx)
        (clip,) = DualCLIPLoader.model_construct(clip_name1="clip_l.safetensors", clip_name2="t5xxl_fp16.safetensors",
                                                 type="flux").run(self.ctx)
        (vae,) = VAELoader.model_construct(vae_name="ae.safetensors").run(self.ctx)
        return model, clip, vae

    def pipeline(self, kontext: bool = False):
        from diffusers import FlowMatchEulerDiscreteScheduler, FluxKontextPipeline, FluxPipeline
        from transformers import T5TokenizerFast

        # The sigmas are passed as they are: no shift inside the scheduler.
        scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=False)
        cls = FluxKontextPipeline if kontext else FluxPipeline
        return cls(scheduler=scheduler, vae=self.vae, text_encoder=self.clip_l, tokenizer=pipeline_clip_tokenizer(),
                   text_encoder_2=self.t5, tokenizer_2=T5TokenizerFast.from_pretrained(str(self.tokenizer_dir)),
                   transformer=self.transformer)


@pytest.fixture
def dev(tmp_path) -> FluxFiles:
    return FluxFiles(tmp_path, guidance=True)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


# T5 tokenization -----------------------------------------------------------------------------------------------

def test_t5_tokens_follow_comfyui_rules_and_prompt_weights(dev):
    model, clip, _ = dev.load()
    tokenizer = find_t5_tokenizer(clip.t5_tokenizer_dirs)
    assert tokenizer.path == dev.tokenizer_dir / "tokenizer.json"
    from tokenizers import Tokenizer

    # What ComfyUI's T5TokenizerFast (transformers 4) runs: the tokenizer.json pipeline as written. (transformers 5
    # replaces T5's normalizer and pre-tokenizer with its own, which differ on trailing / repeated spaces.)
    backend = Tokenizer.from_file(str(dev.tokenizer_dir / "tokenizer.json"))

    def reference(text: str):
        return backend.encode(text)

    words = reference(PROMPT).ids  # ends in </s>
    tokens = clip.tokenize(PROMPT)["t5xxl"]
    # Flux: the prompt, EOS, padded with 0 to 256; all weights 1.
    assert [t for t, _ in tokens] == words + [0] * (256 - len(words))
    assert {w for _, w in tokens} == {1.0}

    weighted = t5_tokenize("a photo of a (red cat:1.3), (dog)", tokenizer, min_length=12)
    parts = [("a photo of a ", 1.0), ("red cat", 1.3), (", ", 1.0), ("dog", 1.1)]
    expected = [(t, w) for text, w in parts for t in reference(text).ids[:-1]]
    expected += [(1, 1.0)] + [(0, 1.0)] * (12 - len(expected) - 1)
    assert [(t, pytest.approx(w)) for t, w in expected] == weighted

    # Weights move T5 states away from the empty prompt's (ComfyUI's z = (z - z_empty)·w + z_empty).
    cond, _ = clip.encode_tokens({"t5xxl": weighted})
    ids = torch.tensor([[t for t, _ in weighted]])
    empty = torch.tensor([[1] + [0] * (ids.shape[1] - 1)])
    with torch.no_grad():
        z, z_empty = dev.t5(input_ids=ids).last_hidden_state, dev.t5(input_ids=empty).last_hidden_state
    w = torch.tensor([w for _, w in weighted])[None, :, None]
    torch.testing.assert_close(cond, torch.where(w != 1, (z - z_empty) * w + z_empty, z), rtol=0, atol=1e-5)
    assert max_diff(cond, z) > 1e-3

    # T5TokenizerOptions' min_length / min_padding (SD3 pads to 77 by default).
    options = {"tokenizer_options": {"t5xxl_min_length": 4, "t5xxl_min_padding": 2}}
    short = clip.__class__(**{**clip.__dict__, "options": options}).tokenize("a cat")
    assert [t for t, _ in short["t5xxl"]] == reference("a cat").ids + [0, 0]


def test_missing_t5_tokenizer_names_the_folders_looked_in(dev):
    for name in os.listdir(dev.tokenizer_dir):
        os.remove(dev.tokenizer_dir / name)
    _, clip, _ = dev.load()
    with pytest.raises(TokenizerUnavailable) as error:
        run_node(CLIPTextEncode, dev.ctx, text="a cat", clip=clip)
    message = str(error.value)
    assert "T5 prompts cannot be tokenized" in message and "SentencePiece" in message
    assert str(dev.tokenizer_dir) in message


# Text encoding ------------------------------------------------------------------------------------------------

def test_text_encoding_matches_flux_pipeline_encode_prompt(dev):
    _, clip, _ = dev.load()
    pipe = dev.pipeline()
    with torch.no_grad():
        prompt_embeds, pooled, text_ids = pipe.encode_prompt(PROMPT, prompt_2=None, max_sequence_length=256)
    ((cond, options),) = run_node(CLIPTextEncode, dev.ctx, text=PROMPT, clip=clip)[0]
    assert cond.shape == prompt_embeds.shape == (1, 256, 96) and torch.equal(text_ids, torch.zeros(256, 3))
    torch.testing.assert_close(cond, prompt_embeds, rtol=0, atol=1e-5)
    torch.testing.assert_close(options["pooled_output"], pooled, rtol=0, atol=1e-5)
    print(f"text encoding max|Δ|: t5 {max_diff(cond, prompt_embeds):.2e}, "
          f"pooled {max_diff(options['pooled_output'], pooled):.2e}")

    # CLIPTextEncodeFlux: CLIP-L reads clip_l, T5 reads t5xxl, and the guidance goes into the options.
    ((flux_cond, flux_options),) = run_node(CLIPTextEncodeFlux, dev.ctx, clip=clip, clip_l="a blue dog",
                                            t5xxl=PROMPT, guidance=2.5)[0]
    with torch.no_grad():
        embeds_2, pooled_2, _ = pipe.encode_prompt("a blue dog", prompt_2=PROMPT, max_sequence_length=256)
    torch.testing.assert_close(flux_cond, embeds_2, rtol=0, atol=1e-5)
    torch.testing.assert_close(flux_options["pooled_output"], pooled_2, rtol=0, atol=1e-5)
    assert flux_options["guidance"] == 2.5


# The transformer call --------------------------------------------------------------------------------------------

def _call_inputs(seed: int, height: int, width: int):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 16, height, width, generator=generator)
    context = torch.randn(2, 7, 96, generator=generator)
    pooled = torch.randn(2, 32, generator=generator)
    return x, context, pooled


def test_transformer_call_packs_pads_and_places_reference_latents(dev):
    from diffusers import FluxPipeline

    model, _, _ = dev.load()
    network = model.unet
    x, context, pooled = _call_inputs(4, 6, 8)
    sigma = torch.tensor([0.7, 0.7])
    extra = {"pooled_projections": pooled, "guidance": torch.tensor([3.5, 3.5])}
    out = dit_flux.forward(network, x, sigma, context, extra, {})
    # The pipeline's own call: its packing and ids, timestep σ (×1000 inside), guidance.
    ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(3.0), torch.arange(4.0), indexing="ij"), -1)
    with torch.no_grad():
        expected = dev.transformer(
            hidden_states=FluxPipeline._pack_latents(x, 2, 16, 6, 8), encoder_hidden_states=context,
            pooled_projections=pooled, timestep=sigma, img_ids=ids.reshape(-1, 3), txt_ids=torch.zeros(7, 3),
            guidance=torch.tensor([3.5, 3.5]), return_dict=False)[0]
    torch.testing.assert_close(out, dit_flux.unpack(expected, 3, 4), rtol=0, atol=1e-5)

    # Odd sizes: circular padding to even, the output cropped back.
    odd = x[..., :5, :7]
    out_odd = dit_flux.forward(network, odd, sigma, context, extra, {})
    padded = torch.nn.functional.pad(odd, (0, 1, 0, 1), mode="circular")
    torch.testing.assert_close(out_odd, dit_flux.forward(network, padded, sigma, context, extra, {})[..., :5, :7],
                               rtol=0, atol=1e-5)

    # Reference latents (ComfyUI's Flux._forward written out): "offset" puts the second reference beside the
    # first; "index" numbers them 1, 2 at offset 0; their output tokens are dropped.
    refs = [torch.randn(1, 16, 4, 6, generator=torch.Generator().manual_seed(5)),
            torch.randn(1, 16, 6, 2, generator=torch.Generator().manual_seed(6))]
    for method, placements in (("offset", [(1, 0, 0), (1, 0, 6)]), ("index", [(1, 0, 0), (2, 0, 0)]),
                               ("uxo", [(0, 6, 8), (0, 10, 14)])):
        values = dit_flux.conditioning({"pooled_output": pooled[:1], "reference_latents": refs,
                                        "reference_latents_method": method}, x.shape, torch.device("cpu"))
        batched = {k: v.repeat(2, *([1] * (v.dim() - 1))) for k, v in values.items()}
        out_ref = dit_flux.forward(network, x, sigma, context, {**batched, "pooled_projections": pooled}, {})
        tokens = [FluxPipeline._pack_latents(FLUX_LATENT.process_in(r), 1, 16, *r.shape[-2:]).repeat(2, 1, 1)
                  for r in refs]
        ref_ids = [dit_flux.position_ids(r.shape[-2], r.shape[-1], *place)
                   for r, place in zip(refs, placements, strict=True)]
        for r, place, got in zip(refs, placements, ref_ids, strict=True):
            rows, cols = r.shape[-2] // 2, r.shape[-1] // 2
            assert got[0].tolist() == [place[0], place[1] // 2, place[2] // 2]
            assert got[-1].tolist() == [place[0], place[1] // 2 + rows - 1, place[2] // 2 + cols - 1]
        with torch.no_grad():
            full = dev.transformer(
                hidden_states=torch.cat([FluxPipeline._pack_latents(x, 2, 16, 6, 8)] + tokens, 1),
                encoder_hidden_states=context, pooled_projections=pooled, timestep=sigma,
                img_ids=torch.cat([ids.reshape(-1, 3)] + ref_ids), txt_ids=torch.zeros(7, 3),
                guidance=torch.tensor([3.5, 3.5]), return_dict=False)[0]
        torch.testing.assert_close(out_ref, dit_flux.unpack(full[:, :12], 3, 4), rtol=0, atol=1e-5)
        assert max_diff(out_ref, out) > 1e-3

    # FluxDisableGuidance: no guidance embedding at all (the embedder's term left out of the sum).
    no_guidance = dit_flux.conditioning({"pooled_output": pooled[:1], "guidance": None}, x.shape, torch.device("cpu"))
    assert "guidance" not in no_guidance
    out_free = dit_flux.forward(network, x, sigma, context, {"pooled_projections": pooled}, {})
    temb = {}
    embed = network.time_text_embed
    handle = embed.register_forward_hook(lambda module, args, output: temb.setdefault("value", output))
    with torch.no_grad():
        dit_flux.forward(network, x, sigma, context, {"pooled_projections": pooled}, {})
        handle.remove()
        t_proj = embed.time_proj(sigma * 1000)
        expected_temb = embed.timestep_embedder(t_proj) + embed.text_embedder(pooled)
    torch.testing.assert_close(temb["value"], expected_temb, rtol=0, atol=1e-5)
    assert max_diff(out_free, out) > 1e-3


# Whole runs: KSampler against the pipelines ----------------------------------------------------------------------

def _sample(files: FluxFiles, model, positive, negative, latent, seed: int, steps: int, sigmas_out: list):
    (model,) = ModelSamplingFlux.model_construct(model=model, max_shift=1.15, base_shift=0.5, width=64,
                                                 height=64).run(files.ctx) if model.options["variant"] == "flux_dev" \
        else (model,)
    sigmas_out.append(calculate_sigmas(schedule_for(model.sampling), "simple", steps))
    (out,) = KSampler.model_construct(model=model, seed=seed, steps=steps, cfg=1.0, sampler_name="euler",
                                      scheduler="simple", positive=positive, negative=negative,
                                      latent_image={"samples": latent}, denoise=1.0).run(files.ctx)
    return out["samples"]


@pytest.mark.parametrize("guidance", [True, False], ids=["dev", "schnell"])
def test_ksampler_matches_flux_pipeline(tmp_path, guidance):
    files = FluxFiles(tmp_path, guidance=guidance, seed=10)
    model, clip, _ = files.load()
    ((positive,),) = run_node(CLIPTextEncode, files.ctx, text=PROMPT, clip=clip)
    positive = [positive]
    if guidance:
        (positive,) = run_node(FluxGuidance, files.ctx, conditioning=positive, guidance=4.0)
    (negative,) = run_node(CLIPTextEncode, files.ctx, text="", clip=clip)
    seed, steps = 7, 4
    sigmas: list = []
    samples = _sample(files, model, positive, negative, torch.zeros(1, 16, 8, 8), seed, steps, sigmas)

    pipe = files.pipeline()
    noise = torch.randn(1, 16, 8, 8, generator=torch.manual_seed(seed))
    with torch.no_grad():
        packed = pipe(prompt=PROMPT, height=16, width=16, guidance_scale=4.0, num_inference_steps=steps,
                      sigmas=sigmas[0][:-1].numpy().astype(np.float32), latents=pipe._pack_latents(noise, 1, 16, 8, 8),
                      max_sequence_length=256, output_type="latent").images
    ours = pipe._pack_latents(FLUX_LATENT.process_in(samples), 1, 16, 8, 8)
    delta = max_diff(ours, packed)
    print(f"flux {'dev' if guidance else 'schnell'} final latents max|Δ| = {delta:.2e} "
          f"(|x| max {packed.abs().max():.2f})")
    assert packed.abs().max() > 0.5 and max_diff(packed, pipe._pack_latents(noise, 1, 16, 8, 8)) > 0.1
    assert delta < 1e-4


def test_kontext_reference_image_matches_flux_kontext_pipeline(dev):
    from PIL import Image

    from latentloom.nodes.vae_nodes import VAEEncode

    model, clip, vae = dev.load()
    pixels = torch.rand(1, 16, 16, 3, generator=torch.Generator().manual_seed(21))
    pixels = (pixels * 255).round() / 255  # exactly what the PIL image holds
    (reference,) = run_node(VAEEncode, dev.ctx, pixels=pixels, vae=vae)
    ((positive,),) = run_node(CLIPTextEncode, dev.ctx, text=PROMPT, clip=clip)
    (positive,) = run_node(ReferenceLatent, dev.ctx, conditioning=[positive], latent=reference)
    (positive,) = run_node(FluxGuidance, dev.ctx, conditioning=positive, guidance=2.5)
    (negative,) = run_node(CLIPTextEncode, dev.ctx, text="", clip=clip)
    seed, steps = 3, 3
    sigmas: list = []
    samples = _sample(dev, model, positive, negative, torch.zeros(1, 16, 8, 8), seed, steps, sigmas)

    pipe = dev.pipeline(kontext=True)
    image = Image.fromarray((pixels[0].numpy() * 255).round().astype(np.uint8))
    noise = torch.randn(1, 16, 8, 8, generator=torch.manual_seed(seed))
    with torch.no_grad():
        packed = pipe(image=image, prompt=PROMPT, height=16, width=16, max_area=16 * 16, _auto_resize=False,
                      guidance_scale=2.5, num_inference_steps=steps, sigmas=sigmas[0][:-1].numpy(),
                      latents=pipe._pack_latents(noise, 1, 16, 8, 8), max_sequence_length=256,
                      output_type="latent").images
    ours = pipe._pack_latents(FLUX_LATENT.process_in(samples), 1, 16, 8, 8)
    delta = max_diff(ours, packed)
    print(f"flux kontext final latents max|Δ| = {delta:.2e}")
    assert delta < 1e-4
    # The reference image matters: without it the run differs.
    (plain,) = run_node(FluxGuidance, dev.ctx, conditioning=run_node(CLIPTextEncode, dev.ctx, text=PROMPT,
                                                                      clip=clip)[0], guidance=2.5)
    without = _sample(dev, model, plain, negative, torch.zeros(1, 16, 8, 8), seed, steps, [])
    assert max_diff(without, samples) > 1e-3
    (indexed,) = run_node(FluxKontextMultiReferenceLatentMethod, dev.ctx, conditioning=positive,
                          reference_latents_method="index")
    assert indexed[0][1]["reference_latents_method"] == "index"


def test_flux_disable_guidance_runs_without_the_guidance_embedding(dev):
    model, clip, _ = dev.load()
    ((positive,),) = run_node(CLIPTextEncode, dev.ctx, text=PROMPT, clip=clip)
    (free,) = run_node(FluxDisableGuidance, dev.ctx, conditioning=[positive])
    (guided,) = run_node(FluxGuidance, dev.ctx, conditioning=[positive], guidance=0.0)
    latent = torch.zeros(1, 16, 4, 4)
    out_free = _sample(dev, model, free, free, latent, 1, 2, [])
    out_zero = _sample(dev, model, guided, guided, latent, 1, 2, [])
    # guidance 0 still adds the embedder's output of 0; disabled guidance adds nothing.
    assert max_diff(out_free, out_zero) > 1e-4


# ModelMergeFlux1 ------------------------------------------------------------------------------------------------

def test_model_merge_flux1_uses_comfyui_block_names(tmp_path):
    first, second = FluxFiles(tmp_path / "a", seed=30), FluxFiles(tmp_path / "b", seed=31)
    model1, _, _ = first.load()
    model2, _, _ = second.load()
    names = {n: flux_block_name(n) for n, _ in model1.unet.named_parameters()}
    assert names["transformer_blocks.1.attn.to_q.weight"].startswith("double_blocks.1.")
    assert names["single_transformer_blocks.0.proj_out.weight"].startswith("single_blocks.0.")
    assert names["time_text_embed.guidance_embedder.linear_1.weight"].startswith("guidance_in")
    assert names["x_embedder.weight"] == "img_in.weight" and names["proj_out.bias"] == "final_layer.proj_out.bias"
    ratios = {"double_blocks.1.": 0.25, "single_blocks.0.": 0.0, "txt_in.": 0.5}
    (merged,) = run_node(ModelMergeFlux1, first.ctx, model1=model1, model2=model2, **ratios)
    from latentloom.nodes.diffusion.merge import MergePatch

    (patch,) = merged.patches
    assert isinstance(patch, MergePatch)
    strengths = {name: (patch_strength, model_strength) for name, patch_strength, model_strength in patch.entries}
    assert strengths["transformer_blocks.1.attn.to_q.weight"] == pytest.approx((0.75, 0.25))
    assert strengths["single_transformer_blocks.0.attn.to_k.weight"] == pytest.approx((1.0, 0.0))
    assert strengths["context_embedder.weight"] == pytest.approx((0.5, 0.5))
    assert strengths["transformer_blocks.0.attn.to_q.weight"] == pytest.approx((0.0, 1.0))

