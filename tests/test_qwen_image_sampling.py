"""Qwen-Image end to end on tiny random-weight files in ComfyUI's layouts (transformer, Wan 2.1 VAE, Qwen2.5-VL
text encoder + a tiny BPE tokenizer), compared with diffusers' QwenImagePipeline built from the same weights."""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).parent))

from node_context import StubContext, make_env, run_node  # noqa: E402
from qwen_image_support import (  # noqa: E402
    qwen_text_original,
    tiny_qwen_text_encoder,
    tiny_qwen_transformer,
    tiny_qwen_vae,
    tokenizer_vocab_size,
    wan_vae_original,
    write_tiny_tokenizer,
)
from tiny_models import save_state  # noqa: E402

from latentloom.nodes.conditioning import CLIPTextEncode  # noqa: E402
from latentloom.nodes.diffusion import dit_qwen_image  # noqa: E402
from latentloom.nodes.diffusion.family_clip import TokenizerUnavailable  # noqa: E402
from latentloom.nodes.diffusion.latent_formats import WAN21_LATENT  # noqa: E402
from latentloom.nodes.family_qwen_image import (  # noqa: E402
    ModelMergeQwenImage,
    TextEncodeQwenImageEdit,
    TextEncodeQwenImageEditPlus,
)
from latentloom.nodes.loaders import CLIPLoader, UNETLoader, VAELoader  # noqa: E402
from latentloom.nodes.model_families import EmptySD3LatentImage, ModelSamplingAuraFlow  # noqa: E402
from latentloom.nodes.sampling import KSampler  # noqa: E402
from latentloom.nodes.vae_nodes import VAEDecode, VAEEncode  # noqa: E402

PROMPT = "a photo of a cat"
SHIFT = 3.1  # ModelSamplingAuraFlow's shift in the official Qwen-Image workflows


# Each test builds tiny diffusers/transformers models and compares with their pipeline: seconds apiece.
pytestmark = pytest.mark.slow


class Tiny:
    """The tiny diffusers components and where their ComfyUI-layout files were written."""

    def __init__(self, models: Path):
        self.models = models
        self.tokenizer_dir = write_tiny_tokenizer(models / "text_encoders" / "qwen25_tokenizer")
        self.transformer = tiny_qwen_transformer(31)
        self.vae = tiny_qwen_vae(32)
        self.text_encoder = tiny_qwen_text_encoder(tokenizer_vocab_size(self.tokenizer_dir), 33)
        save_state(self.transformer.state_dict(), models / "diffusion_models" / "qwen_image_tiny.safetensors")
        save_state(wan_vae_original(self.vae), models / "vae" / "qwen_image_vae.safetensors")
        save_state(qwen_text_original(self.text_encoder), models / "text_encoders" / "qwen_2.5_vl_7b.safetensors")

    def pipeline(self):
        from diffusers import FlowMatchEulerDiscreteScheduler, QwenImagePipeline
        from transformers import Qwen2Tokenizer

        tokenizer = Qwen2Tokenizer.from_pretrained(str(self.tokenizer_dir), local_files_only=True)
        # Plain Euler over exactly the sigmas given (no resolution-dependent shift on top).
        scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=False, shift=1.0)
        return QwenImagePipeline(scheduler=scheduler, vae=self.vae, text_encoder=self.text_encoder,
                                 tokenizer=tokenizer, transformer=self.transformer)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Tiny:
    return Tiny(tmp_path_factory.mktemp("qwen") / "models")


@pytest.fixture
def ctx(tiny) -> StubContext:
    return StubContext(make_env(models_dir=tiny.models))


def _load(ctx):
    (model,) = run_node(UNETLoader, ctx, unet_name="qwen_image_tiny.safetensors", weight_dtype="default")
    (clip,) = run_node(CLIPLoader, ctx, clip_name="qwen_2.5_vl_7b.safetensors", type="qwen_image")
    (vae,) = run_node(VAELoader, ctx, vae_name="qwen_image_vae.safetensors")
    return model, clip, vae


def test_text_encoding_matches_the_pipeline(tiny, ctx):
    _, clip, _ = _load(ctx)
    tokens = clip.tokenize(PROMPT)
    # The template's head is cut where ComfyUI cuts it: 34 tokens, as diffusers' prompt_template_encode_start_idx.
    assert tokens["template_end"] == 34
    (conditioning,) = run_node(CLIPTextEncode, ctx, text=PROMPT, clip=clip)
    cond = conditioning[0][0]
    expected, mask = tiny.pipeline().encode_prompt(PROMPT, device=torch.device("cpu"))
    assert cond.shape == expected.shape and mask is None  # all ones: dropped, as ComfyUI drops it
    difference = (cond - expected).abs().max().item()
    print(f"qwen text encoding max |diff| = {difference:.3g}")
    assert difference <= 1e-5 and expected.abs().max() > 0.1
    (edit,) = run_node(TextEncodeQwenImageEdit, ctx, clip=clip, prompt=PROMPT)
    torch.testing.assert_close(edit[0][0], cond, rtol=0, atol=0)
    (plus,) = run_node(TextEncodeQwenImageEditPlus, ctx, clip=clip, prompt=PROMPT)
    assert plus[0][0].shape[1] == cond.shape[1]  # the edit template's head is cut the same way
    assert not torch.equal(plus[0][0], cond)     # ... but the system prompt differs, so the states do


def test_missing_tokenizer_is_refused_clearly(tiny, ctx, tmp_path):
    # (Edit images: tests/test_qwen_image_edit.py)
    lonely = tmp_path / "models"
    save_state(qwen_text_original(tiny.text_encoder), lonely / "text_encoders" / "qwen_2.5_vl_7b.safetensors")
    other = StubContext(make_env(models_dir=lonely))
    (clip,) = run_node(CLIPLoader, other, clip_name="qwen_2.5_vl_7b.safetensors", type="qwen_image")
    with pytest.raises(TokenizerUnavailable, match=r"Qwen2's BPE vocabulary.*qwen25_tokenizer"):
        run_node(CLIPTextEncode, other, text=PROMPT, clip=clip)


def test_transformer_call_matches_diffusers_with_and_without_reference_latents(tiny, ctx):
    model, _, _ = _load(ctx)
    generator = torch.Generator().manual_seed(5)
    x = torch.randn(2, 16, 8, 12, generator=generator)
    context = torch.randn(2, 7, 256, generator=generator)
    sigma = torch.tensor([0.7, 0.7])
    with torch.no_grad():
        ours = dit_qwen_image.forward(model.unet, x, sigma, context, {}, {})
        expected = tiny.transformer(hidden_states=dit_qwen_image.pack(x), encoder_hidden_states=context,
                                    encoder_hidden_states_mask=torch.ones(2, 7), timestep=sigma,
                                    img_shapes=[[(1, 4, 6)]] * 2).sample
    expected = dit_qwen_image.unpack(expected, 16, 8, 12)
    difference = (ours - expected).abs().max().item()
    print(f"qwen transformer call max |diff| = {difference:.3g}")
    assert difference <= 1e-5 and expected.abs().max() > 0.1

    # Edit: a reference latent becomes extra image tokens at frame index 1 (diffusers' edit pipeline places its
    # condition image the same way); only the image's own tokens come back.
    reference = torch.randn(1, 16, 8, 12, generator=generator)
    extra = dit_qwen_image.conditioning({"reference_latents": [reference]}, x.shape, torch.device("cpu"))
    extra = {key: value.repeat(2, *([1] * (value.ndim - 1))) for key, value in extra.items()}
    with torch.no_grad():
        ours = dit_qwen_image.forward(model.unet, x, sigma, context, extra, {})
        tokens = torch.cat([dit_qwen_image.pack(x), dit_qwen_image.pack(WAN21_LATENT.process_in(reference))
                            .repeat(2, 1, 1)], dim=1)
        expected = tiny.transformer(hidden_states=tokens, encoder_hidden_states=context, timestep=sigma,
                                    img_shapes=[[(1, 4, 6), (1, 4, 6)]] * 2).sample[:, :24]
    difference = (ours - dit_qwen_image.unpack(expected, 16, 8, 12)).abs().max().item()
    print(f"qwen transformer call with a reference latent max |diff| = {difference:.3g}")
    assert difference <= 1e-5
    assert (ours - dit_qwen_image.forward(model.unet, x, sigma, context, {}, {})).abs().max() > 1e-3


def test_rotary_positions_follow_comfyui():
    # ComfyUI centres a grid of n patches at −(n//2) ... n−1−n//2 (diffusers: −(n−n//2) ... n//2−1 on odd n).
    ids = dit_qwen_image.image_positions(6, 10)  # 3 x 5 patches
    assert ids[:, 1].unique().tolist() == [-1.0, 0.0, 1.0] and ids[:, 2].unique().tolist() == [-2, -1, 0, 1, 2]
    assert dit_qwen_image.image_positions(5, 8, index=2)[:, 0].unique().tolist() == [2.0]  # 5 rows pad to 3 patches
    table = dit_qwen_image.rotary_table(torch.tensor([[0.0, 3.0, -2.0]], dtype=torch.float64), (16, 56, 56))
    assert table.shape == (1, 64)
    angle = 3.0 / 10000 ** (2 / 56)  # the second frequency of the row axis
    torch.testing.assert_close(table[0, 9], torch.polar(torch.tensor(1.0), torch.tensor(angle)))


def _ksampler(ctx, model, positive, negative, latent, seed, steps, cfg):
    (sampled,) = run_node(KSampler, ctx, model=model, seed=seed, steps=steps, cfg=cfg, sampler_name="euler",
                          scheduler="simple", positive=positive, negative=negative, latent_image=latent, denoise=1.0)
    return sampled["samples"]


def _aura_sigmas(steps: int) -> list[float]:
    """ComfyUI's "simple" schedule on ModelSamplingAuraFlow (σ(t) = s·t / (1 + (s−1)·t) over t = i/1000)."""
    table = [SHIFT * (i / 1000) / (1 + (SHIFT - 1) * (i / 1000)) for i in range(1, 1001)]
    return [table[-(1 + int(i * 1000 / steps))] for i in range(steps)] + [0.0]


def test_ksampler_matches_the_pipeline(tiny, ctx):
    model, clip, vae = _load(ctx)
    (model,) = run_node(ModelSamplingAuraFlow, ctx, model=model, shift=SHIFT)
    (positive,) = run_node(CLIPTextEncode, ctx, text=PROMPT, clip=clip)
    (latent,) = run_node(EmptySD3LatentImage, ctx, width=96, height=64, batch_size=1)
    steps, seed = 3, 11
    ours = _ksampler(ctx, model, positive, positive, latent, seed, steps, 1.0)

    noise = torch.randn((1, 16, 8, 12), generator=torch.Generator("cpu").manual_seed(seed))
    sigmas = _aura_sigmas(steps)
    with torch.no_grad():
        packed = tiny.pipeline()(prompt=PROMPT, height=64, width=96, num_inference_steps=steps, sigmas=sigmas[:-1],
                                 latents=dit_qwen_image.pack(noise), true_cfg_scale=1.0, output_type="latent",
                                 return_dict=False)[0]
    expected = dit_qwen_image.unpack(packed, 16, 8, 12)  # the pipeline's latents are in the normalised space
    difference = (WAN21_LATENT.process_in(ours) - expected).abs().max().item()
    print(f"qwen final latents max |diff| = {difference:.3g}")
    assert difference <= 1e-4 and (expected - noise).abs().max() > 0.1

    (image,) = run_node(VAEDecode, ctx, samples={"samples": ours}, vae=vae)
    with torch.no_grad():
        decoded = tiny.vae.decode(WAN21_LATENT.process_out(expected).unsqueeze(2)).sample[:, :, 0]
    expected_image = ((decoded + 1) / 2).clamp(0, 1).movedim(1, -1)
    assert image.shape == (1, 64, 96, 3)
    assert (image - expected_image).abs().max() <= 1e-4


def test_reference_latent_and_cfg_reach_the_model(tiny, ctx):
    from latentloom.nodes.model_families import ReferenceLatent

    model, clip, vae = _load(ctx)
    (positive,) = run_node(CLIPTextEncode, ctx, text=PROMPT, clip=clip)
    (negative,) = run_node(CLIPTextEncode, ctx, text="", clip=clip)
    (latent,) = run_node(EmptySD3LatentImage, ctx, width=48, height=48, batch_size=1)
    (reference,) = run_node(VAEEncode, ctx, pixels=torch.rand(1, 48, 48, 3), vae=vae)
    (edited,) = run_node(ReferenceLatent, ctx, conditioning=positive, latent=reference)
    plain = _ksampler(ctx, model, positive, negative, latent, 3, 2, 2.5)
    with_reference = _ksampler(ctx, model, edited, negative, latent, 3, 2, 2.5)
    assert plain.shape == with_reference.shape == (1, 16, 6, 6)  # 6 x 6 latent: odd 3 x 3 patch grid
    assert torch.isfinite(plain).all() and (plain - with_reference).abs().max() > 1e-3


def test_model_merge_qwen_image_mixes_blocks(tiny, ctx, tmp_path):
    model1, _, _ = _load(ctx)
    other = tmp_path / "models"
    save_state(tiny_qwen_transformer(77).state_dict(), other / "diffusion_models" / "other.safetensors")
    (model2,) = run_node(UNETLoader, StubContext(make_env(models_dir=other)), unet_name="other.safetensors",
                         weight_dtype="default")
    ratios = {"transformer_blocks.0.": 0.25, "proj_out.": 0.0}
    (merged,) = run_node(ModelMergeQwenImage, ctx, model1=model1, model2=model2, **ratios)
    # (clones: the merged model patches model1's network in place while it runs)
    first = {name: p.detach().clone() for name, p in model1.unet.named_parameters()}
    second = {name: p.detach().clone() for name, p in model2.unet.named_parameters()}
    with merged.prepared(ctx.models) as network:
        weights = {name: p.detach().clone() for name, p in network.named_parameters()}
    for name, ratio in (("transformer_blocks.0.attn.to_q.weight", 0.25), ("proj_out.weight", 0.0),
                        ("transformer_blocks.1.attn.to_q.weight", 1.0), ("img_in.weight", 1.0)):
        torch.testing.assert_close(weights[name], ratio * first[name] + (1 - ratio) * second[name])
    assert not math.isclose(float((first["proj_out.weight"] - second["proj_out.weight"]).abs().max()), 0.0)


def test_all_in_one_checkpoint_loads_model_clip_and_vae(tiny, ctx):
    from latentloom.nodes.loaders import CheckpointLoaderSimple

    state = {f"model.diffusion_model.{k}": v for k, v in tiny.transformer.state_dict().items()}
    state |= {f"vae.{k}": v for k, v in wan_vae_original(tiny.vae).items()}
    state |= {f"text_encoders.qwen25_7b.transformer.{k}": v for k, v in qwen_text_original(tiny.text_encoder).items()}
    save_state(state, tiny.models / "checkpoints" / "qwen_image_aio.safetensors")
    model, clip, vae = run_node(CheckpointLoaderSimple, ctx, ckpt_name="qwen_image_aio.safetensors")
    _, own_clip, own_vae = _load(ctx)
    assert model.family == "qwen_image" and clip is not None and vae is not None
    (together,) = run_node(CLIPTextEncode, ctx, text=PROMPT, clip=clip)
    (apart,) = run_node(CLIPTextEncode, ctx, text=PROMPT, clip=own_clip)
    torch.testing.assert_close(together[0][0], apart[0][0], rtol=0, atol=0)
    latent = torch.randn(1, 16, 4, 4, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(vae.decode(latent), own_vae.decode(latent), rtol=0, atol=0)


def test_qwen_image_workflow_runs_through_the_cli(tiny, tmp_path, capsys):
    from latentloom.server.cli import main

    graph = {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": "qwen_image_tiny.safetensors",
                                                     "weight_dtype": "default"}},
        "2": {"class_type": "CLIPLoader", "inputs": {"clip_name": "qwen_2.5_vl_7b.safetensors", "type": "qwen_image"}},
        "3": {"class_type": "VAELoader", "inputs": {"vae_name": "qwen_image_vae.safetensors"}},
        "4": {"class_type": "ModelSamplingAuraFlow", "inputs": {"model": ["1", 0], "shift": SHIFT}},
        "5": {"class_type": "CLIPTextEncode", "inputs": {"text": PROMPT, "clip": ["2", 0]}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["2", 0]}},
        "7": {"class_type": "EmptySD3LatentImage", "inputs": {"width": 64, "height": 48, "batch_size": 1}},
        "8": {"class_type": "KSampler", "inputs": {"model": ["4", 0], "seed": 1, "steps": 2, "cfg": 2.5,
                                                   "sampler_name": "euler", "scheduler": "simple",
                                                   "positive": ["5", 0], "negative": ["6", 0],
                                                   "latent_image": ["7", 0], "denoise": 1.0}},
        "9": {"class_type": "VAEDecode", "inputs": {"samples": ["8", 0], "vae": ["3", 0]}},
        "10": {"class_type": "SaveImage", "inputs": {"images": ["9", 0], "filename_prefix": "qwen"}},
    }
    (tmp_path / "graph.json").write_text(json.dumps(graph))
    code = main(["run", str(tmp_path / "graph.json"), "--json", "--models-dir", str(tiny.models),
                 "--input-dir", str(tmp_path / "input"), "--output-dir", str(tmp_path / "output"),
                 "--temp-dir", str(tmp_path / "temp"), "--custom-nodes", str(tmp_path / "none")])
    summary = json.loads(capsys.readouterr().out)
    assert code == 0 and summary["status"] == "success", summary
    saved = list((tmp_path / "output").glob("qwen*.png"))
    assert len(saved) == 1
    from PIL import Image

    assert Image.open(saved[0]).size == (64, 48)
