"""Lumina 2 (NextDiT + Gemma 2) against diffusers' Lumina2Pipeline built from the same weights.

A tiny random Lumina2Transformer2DModel is written in ComfyUI's original NextDiT names (the inverse map below), a
tiny Gemma2Model in ComfyUI's gemma_2_2b layout (`model.*`), with a tiny BPE tokenizer.json trained here (Gemma's
real SentencePiece vocabulary is not available offline) or a tiny SentencePiece model inside the file as ComfyUI's
own files carry it. Gemma is built with ComfyUI's numerics (no attention soft-capping, full attention), and the
pipeline gets the very same model, so text encodings are comparable.

* the transformer call: the loaded network vs the original module, and ModelCall's x0 vs the pipeline's formula
  (timestep 1 − σ, velocity = −output); a right-padded, masked caption equals the unpadded one;
* text: CLIPTextEncodeLumina2 vs Lumina2Pipeline.encode_prompt (same system prompt and " <Prompt Start> ");
* final latents of KSampler euler with ModelSamplingAuraFlow (shift 6) vs the pipeline (same noise, the same
  shifted sigmas, plain CFG: cfg_normalization=False, and cfg_trunc_ratio 1, which never truncates — ComfyUI's
  default Lumina 2 workflow has no RenormCFG), compared in the network's space ((z − 0.1159)·0.3611);
* a ComfyUI-style API workflow through `latentloom run`, and an all-in-one checkpoint through CheckpointLoaderSimple.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json  # noqa: E402
import re  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from node_context import StubContext, make_env, run_node  # noqa: E402
from test_family_loading import _perturbed, folder, prefixed, tiny_vae16  # noqa: E402
from tiny_models import save_state  # noqa: E402

from latentloom.nodes.conditioning import CLIPTextEncode  # noqa: E402
from latentloom.nodes.diffusion import convert, dit_lumina2, families  # noqa: E402
from latentloom.nodes.diffusion.denoiser import ModelCall  # noqa: E402
from latentloom.nodes.diffusion.family_clip import TokenizerUnavailable  # noqa: E402
from latentloom.nodes.diffusion.latent_formats import FLUX_LATENT  # noqa: E402
from latentloom.nodes.diffusion.schedules import schedule_for  # noqa: E402
from latentloom.nodes.family_lumina2 import SYSTEM_PROMPTS, CLIPTextEncodeLumina2  # noqa: E402
from latentloom.nodes.loaders import CheckpointLoaderSimple, CLIPLoader, UNETLoader  # noqa: E402
from latentloom.nodes.model_families import EmptySD3LatentImage, ModelSamplingAuraFlow, RenormCFG  # noqa: E402
from latentloom.nodes.sampling import KSampler  # noqa: E402

CAPTION_WIDTH = 32   # Gemma's width = the transformer's cap_feat_dim
PROMPT = "a red fox sitting in deep snow"
STEPS = 4


# Tiny models and their original layouts -------------------------------------------------------------------------

# Each test builds tiny diffusers/transformers models and compares with their pipeline: seconds apiece.
pytestmark = pytest.mark.slow


def tiny_lumina2(seed: int) -> torch.nn.Module:
    from diffusers import Lumina2Transformer2DModel

    torch.manual_seed(seed)
    return _perturbed(Lumina2Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=16, hidden_size=48, num_layers=2, num_refiner_layers=1,
        num_attention_heads=2, num_kv_heads=1, multiple_of=16, axes_dim_rope=(8, 8, 8),
        cap_feat_dim=CAPTION_WIDTH), seed)


def tiny_gemma(seed: int, vocab_size: int = 300) -> torch.nn.Module:
    """Gemma 2 with ComfyUI's numerics: 256-wide heads, no soft-capping, full attention in every layer."""
    from transformers import Gemma2Config, Gemma2Model

    torch.manual_seed(seed)
    config = Gemma2Config(vocab_size=vocab_size, hidden_size=CAPTION_WIDTH, intermediate_size=64, num_hidden_layers=3,
                          num_attention_heads=2, num_key_value_heads=1, head_dim=256, query_pre_attn_scalar=256,
                          attn_logit_softcapping=None, final_logit_softcapping=None,
                          layer_types=["full_attention"] * 3, pad_token_id=0, bos_token_id=2, eos_token_id=1)
    return _perturbed(Gemma2Model(config), seed)


_TOP = {"x_embedder": "x_embedder", "time_caption_embed.timestep_embedder.linear_1": "t_embedder.mlp.0",
        "time_caption_embed.timestep_embedder.linear_2": "t_embedder.mlp.2",
        "time_caption_embed.caption_embedder.0": "cap_embedder.0",
        "time_caption_embed.caption_embedder.1": "cap_embedder.1",
        "norm_out.linear_1": "final_layer.adaLN_modulation.1", "norm_out.linear_2": "final_layer.linear"}
_BLOCK = {"attn.to_out.0": "attention.out", "attn.norm_q": "attention.q_norm", "attn.norm_k": "attention.k_norm",
          "feed_forward.linear_1": "feed_forward.w1", "feed_forward.linear_2": "feed_forward.w2",
          "feed_forward.linear_3": "feed_forward.w3", "norm1.linear": "adaLN_modulation.1",
          "norm1.norm": "attention_norm1", "norm1": "attention_norm1", "norm2": "attention_norm2",
          "ffn_norm1": "ffn_norm1", "ffn_norm2": "ffn_norm2"}


def lumina2_original(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """diffusers names -> ComfyUI's NextDiT names (fused qkv, plus the unused norm_final the files carry)."""
    sd = model.state_dict()
    out = {"norm_final.weight": torch.ones(model.config.hidden_size)}
    for key, value in sd.items():
        stem, _, leaf = key.rpartition(".")
        block = re.match(r"((?:noise_refiner|context_refiner|layers)\.\d+)\.(.+)$", stem)
        if block is None:
            out[f"{_TOP[stem]}.{leaf}"] = value
        elif block.group(2) == "attn.to_q":
            name = block.group(1)
            out[f"{name}.attention.qkv.weight"] = torch.cat([sd[f"{name}.attn.to_{x}.weight"] for x in "qkv"])
        elif block.group(2) not in ("attn.to_k", "attn.to_v"):
            out[f"{block.group(1)}.{_BLOCK[block.group(2)]}.{leaf}"] = value
    return out


def gemma_file_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return prefixed(model.state_dict(), "model.")


def tiny_tokenizer():
    """A byte-free BPE over the test's texts, in Gemma's conventions: spaces as "▁", no dummy prefix, ids
    <pad> 0, <eos> 1, <bos> 2, <unk> 3, and <bos> prepended when special tokens are added."""
    from tokenizers import Tokenizer, models, normalizers, processors, trainers

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.normalizer = normalizers.Replace(" ", "▁")
    trainer = trainers.BpeTrainer(vocab_size=260, special_tokens=["<pad>", "<eos>", "<bos>", "<unk>"],
                                  show_progress=False)
    texts = list(SYSTEM_PROMPTS.values()) + [PROMPT, "blurry, low quality", "<Prompt Start>"]
    tokenizer.train_from_iterator(texts * 4, trainer)
    tokenizer.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
    return tokenizer


def write_tokenizer(path) -> None:
    path.mkdir(parents=True, exist_ok=True)
    tiny_tokenizer().save(str(path / "tokenizer.json"))


def pipeline(transformer, gemma):
    from diffusers import FlowMatchEulerDiscreteScheduler, Lumina2Pipeline
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tiny_tokenizer(), bos_token="<bos>", eos_token="<eos>",
                                        pad_token="<pad>", unk_token="<unk>")
    vae = tiny_vae16(5)
    vae.register_to_config(scaling_factor=FLUX_LATENT.scale_factor, shift_factor=FLUX_LATENT.shift_factor)
    return Lumina2Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=6.0), vae=vae,
                           text_encoder=gemma, tokenizer=tokenizer)


@pytest.fixture
def ctx(tmp_path) -> StubContext:
    return StubContext(make_env(tmp_path, models_dir=tmp_path / "models"))


def write_files(ctx, transformer, gemma) -> None:
    save_state(lumina2_original(transformer), folder(ctx.env, "diffusion_models") / "lumina_2_tiny.safetensors")
    save_state(gemma_file_state(gemma), folder(ctx.env, "text_encoders") / "gemma_2_2b_tiny.safetensors")
    write_tokenizer(folder(ctx.env, "text_encoders") / "gemma_tokenizer")


def load(ctx):
    (model,) = run_node(UNETLoader, ctx, unet_name="lumina_2_tiny.safetensors", weight_dtype="default")
    (clip,) = run_node(CLIPLoader, ctx, clip_name="gemma_2_2b_tiny.safetensors", type="lumina2")
    return model, clip


# The transformer ---------------------------------------------------------------------------------------------

def test_detection_reads_the_config_from_shapes():
    original = lumina2_original(tiny_lumina2(0))
    found = families.detect_transformer(prefixed(original, "model.diffusion_model."))
    assert (found.family, found.prefix) == ("lumina2", "model.diffusion_model.")
    config = found.config
    assert (config["hidden_size"], config["num_attention_heads"], config["num_kv_heads"]) == (48, 2, 1)
    assert (config["num_layers"], config["num_refiner_layers"], config["cap_feat_dim"]) == (2, 1, CAPTION_WIDTH)
    assert config["axes_dim_rope"] == (8, 8, 8) and config["in_channels"] == 16
    assert families.default_sampling(found) == {"prediction": "const", "schedule": "discrete_flow", "shift": 6.0,
                                                "multiplier": 1.0}
    del original["layers.0.attention.q_norm.weight"]
    with pytest.raises(families.UnknownTransformer, match="q_norm"):
        families.detect_transformer(original)


def test_unet_file_builds_the_same_transformer_and_the_model_call_follows_the_pipeline(ctx):
    transformer, gemma = tiny_lumina2(1), tiny_gemma(2)
    write_files(ctx, transformer, gemma)
    model, _ = load(ctx)
    assert model.family == "lumina2" and model.latent_format is FLUX_LATENT
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(2, 16, 8, 12, generator=generator)
    context = torch.randn(2, 7, CAPTION_WIDTH, generator=generator)
    sigma = torch.tensor([0.9, 0.35])
    mask = torch.ones(2, 7, dtype=torch.bool)
    with torch.no_grad():
        expected = transformer(x, 1 - sigma, context, mask, return_dict=False)[0]
        ours = model.unet(x, 1 - sigma, context, mask, return_dict=False)[0]
        raw = (ours - expected).abs().max().item()
        # The pipeline's step uses velocity = −output at timestep 1 − σ; x0 = x − σ·velocity.
        call = ModelCall(model, model.unet, schedule_for(model.sampling))
        x0 = call(x, sigma, context)
        pipeline_x0 = x + sigma[:, None, None, None] * expected
    print(f"Lumina 2 transformer max |difference|: raw {raw:.3g}, x0 {(x0 - pipeline_x0).abs().max().item():.3g}")
    assert raw <= 1e-6
    assert (x0 - pipeline_x0).abs().max().item() <= 1e-5


def test_a_masked_padded_caption_equals_the_unpadded_one(ctx):
    transformer = tiny_lumina2(4)
    generator = torch.Generator().manual_seed(5)
    x = torch.randn(1, 16, 6, 6, generator=generator)
    context = torch.randn(1, 5, CAPTION_WIDTH, generator=generator)
    padded = torch.cat([context, torch.randn(1, 3, CAPTION_WIDTH, generator=generator)], dim=1)
    sigma = torch.tensor([0.6])
    extra = dit_lumina2.conditioning({"attention_mask": torch.tensor([[1, 1, 1, 1, 1, 0, 0, 0]])}, x.shape,
                                     torch.device("cpu"))
    with torch.no_grad():
        plain = dit_lumina2.forward(transformer, x, sigma, context, {}, {})
        masked = dit_lumina2.forward(transformer, x, sigma, padded, extra, {})
        unmasked = dit_lumina2.forward(transformer, x, sigma, padded, {}, {})
    assert (plain - masked).abs().max().item() <= 1e-5
    assert (plain - unmasked).abs().max().item() > 1e-3  # the padding tokens do matter when not masked
    odd = torch.randn(1, 16, 5, 7, generator=generator)  # padded to the 2×2 patches (circular) and cropped back
    with torch.no_grad():
        out = dit_lumina2.forward(transformer, odd, sigma, context, {}, {})
        padded_out = dit_lumina2.forward(transformer, torch.nn.functional.pad(odd, (0, 1, 0, 1), mode="circular"),
                                         sigma, context, {}, {})
    assert out.shape == odd.shape and torch.allclose(out, padded_out[..., :5, :7], atol=1e-6)


# Text encoding -------------------------------------------------------------------------------------------------

def _cond(conditioning):
    ((cond, options),) = conditioning
    return cond, options


def test_clip_text_encode_lumina2_matches_the_pipelines_encode_prompt(ctx):
    transformer, gemma = tiny_lumina2(6), tiny_gemma(7)
    write_files(ctx, transformer, gemma)
    _, clip = load(ctx)
    pipe = pipeline(transformer, gemma)
    for system_prompt in SYSTEM_PROMPTS:
        cond, options = _cond(run_node(CLIPTextEncodeLumina2, ctx, system_prompt=system_prompt, user_prompt=PROMPT,
                                       clip=clip)[0])
        with torch.no_grad():
            expected, expected_mask, _, _ = pipe.encode_prompt(PROMPT, do_classifier_free_guidance=False,
                                                               system_prompt=SYSTEM_PROMPTS[system_prompt],
                                                               max_sequence_length=128)
        length = int(expected_mask.sum())
        assert cond.shape == (1, length, CAPTION_WIDTH) and options["pooled_output"] is None
        assert torch.equal(options["attention_mask"], torch.ones(1, length))
        difference = (cond - expected[:, :length]).abs().max().item()
        print(f"Lumina 2 text encoding ({system_prompt}) max |difference|: {difference:.3g}")
        assert difference <= 1e-5


def test_token_weights_and_the_last_layer_option(ctx):
    transformer, gemma = tiny_lumina2(8), tiny_gemma(9)
    write_files(ctx, transformer, gemma)
    _, clip = load(ctx)
    plain = _cond(run_node(CLIPTextEncode, ctx, text="a red fox", clip=clip)[0])[0]
    weighted = _cond(run_node(CLIPTextEncode, ctx, text="a red (fox:1.5)", clip=clip)[0])[0]
    ids = clip.tokenize("a red fox")["gemma2_2b"]
    empty = torch.tensor([[2] + [0] * (len(ids) - 1)])
    hidden = gemma(empty, attention_mask=(empty != 0).long(), output_hidden_states=True).hidden_states[-2]
    changed = [i for i, (_, w) in enumerate(clip.tokenize("a red (fox:1.5)")["gemma2_2b"]) if w != 1.0]
    assert changed and weighted.shape == plain.shape
    expected = (plain[0, changed] - hidden[0, changed]) * 1.5 + hidden[0, changed]
    assert (weighted[0, changed] - expected).abs().max().item() <= 1e-5
    unchanged = [i for i in range(len(ids)) if i not in changed]
    assert torch.equal(weighted[0, unchanged], plain[0, unchanged])
    last = _cond(run_node(CLIPTextEncode, ctx, text="a red fox", clip=clip.clone_with_layer(-1))[0])[0]
    with torch.no_grad():
        token_ids = torch.tensor([[t for t, _ in ids]])
        expected_last = gemma(token_ids, output_hidden_states=True).hidden_states[-2]
    assert (plain - expected_last).abs().max().item() <= 1e-5 and (last - plain).abs().max().item() > 1e-3


def test_missing_tokenizer_is_a_clear_error(ctx):
    save_state(gemma_file_state(tiny_gemma(10)), folder(ctx.env, "text_encoders") / "gemma_alone.safetensors")
    (clip,) = run_node(CLIPLoader, ctx, clip_name="gemma_alone.safetensors", type="lumina2")
    with pytest.raises(TokenizerUnavailable, match="gemma_tokenizer"):
        run_node(CLIPTextEncodeLumina2, ctx, system_prompt="superior", user_prompt=PROMPT, clip=clip)


def test_the_files_own_sentencepiece_model_is_used(ctx):
    """ComfyUI's gemma files carry the SentencePiece model as a uint8 tensor `spiece_model`."""
    pytest.importorskip("google.protobuf")
    from transformers.convert_slow_tokenizer import import_protobuf

    proto = import_protobuf().ModelProto()
    proto.trainer_spec.model_type = 2  # BPE, as Gemma's
    proto.trainer_spec.bos_id, proto.trainer_spec.eos_id, proto.trainer_spec.pad_id = 2, 1, 0
    proto.trainer_spec.unk_id = 3
    proto.normalizer_spec.name = "identity"
    proto.normalizer_spec.add_dummy_prefix = False
    proto.normalizer_spec.escape_whitespaces = True
    pieces = [("<pad>", 3), ("<eos>", 3), ("<bos>", 3), ("<unk>", 2), ("a", 1), ("▁", 1), ("c", 1), ("t", 1),
              ("▁c", 1), ("at", 1), ("▁cat", 1)]
    for index, (text, kind) in enumerate(pieces):
        piece = proto.pieces.add()
        piece.piece, piece.type, piece.score = text, kind, -float(index)
    state = gemma_file_state(tiny_gemma(11))
    state["spiece_model"] = torch.tensor(list(proto.SerializeToString()), dtype=torch.uint8)
    save_state(state, folder(ctx.env, "text_encoders") / "gemma_with_vocab.safetensors")
    (clip,) = run_node(CLIPLoader, ctx, clip_name="gemma_with_vocab.safetensors", type="lumina2")
    ids = [token for token, _ in clip.tokenize("a cat")["gemma2_2b"]]
    assert ids == [2, 4, 10]  # <bos>, "a", "▁cat"


# Sampling against the pipeline -------------------------------------------------------------------------------------

@pytest.mark.parametrize("cfg", [1.0, 4.0])
def test_ksampler_latents_match_the_pipeline(ctx, cfg):
    transformer, gemma = tiny_lumina2(12), tiny_gemma(13)
    write_files(ctx, transformer, gemma)
    model, clip = load(ctx)
    (model,) = run_node(ModelSamplingAuraFlow, ctx, model=model, shift=6.0)
    positive = run_node(CLIPTextEncodeLumina2, ctx, system_prompt="superior", user_prompt=PROMPT, clip=clip)[0]
    negative = run_node(CLIPTextEncode, ctx, text="", clip=clip)[0]
    (latent,) = run_node(EmptySD3LatentImage, ctx, width=96, height=64, batch_size=1)
    seed = 21
    (out,) = run_node(KSampler, ctx, model=model, seed=seed, steps=STEPS, cfg=cfg, sampler_name="euler",
                      scheduler="simple", positive=positive, negative=negative, latent_image=latent, denoise=1.0)
    noise = torch.randn(latent["samples"].shape, generator=torch.manual_seed(seed))
    pipe = pipeline(transformer, gemma)
    with torch.no_grad():
        theirs = pipe(prompt=PROMPT, negative_prompt="", guidance_scale=cfg, latents=noise,
                      sigmas=[1.0 - i / STEPS for i in range(STEPS)], height=64, width=96,
                      cfg_normalization=False, cfg_trunc_ratio=1.0, max_sequence_length=128,
                      output_type="latent").images
    difference = (FLUX_LATENT.process_in(out["samples"]) - theirs).abs().max().item()
    print(f"Lumina 2 (cfg {cfg}) max |latent difference| vs Lumina2Pipeline: {difference:.3g}")
    assert difference <= 1e-4


def test_renorm_cfg_truncation_gives_the_positive_prediction(ctx):
    """RenormCFG with cfg_trunc 0 never guides (σ < 0 never holds): the result is that of cfg 1."""
    write_files(ctx, tiny_lumina2(22), tiny_gemma(23))
    model, clip = load(ctx)
    (model,) = run_node(ModelSamplingAuraFlow, ctx, model=model, shift=6.0)
    (truncated,) = run_node(RenormCFG, ctx, model=model, cfg_trunc=0.0, renorm_cfg=1.0)
    positive = run_node(CLIPTextEncodeLumina2, ctx, system_prompt="alignment", user_prompt=PROMPT, clip=clip)[0]
    negative = run_node(CLIPTextEncode, ctx, text="blurry", clip=clip)[0]
    (latent,) = run_node(EmptySD3LatentImage, ctx, width=64, height=64, batch_size=1)

    def sample(sampled_model, cfg):
        return run_node(KSampler, ctx, model=sampled_model, seed=4, steps=2, cfg=cfg, sampler_name="euler",
                        scheduler="simple", positive=positive, negative=negative, latent_image=latent,
                        denoise=1.0)[0]["samples"]

    plain = sample(model, 1.0)
    assert torch.allclose(sample(truncated, 4.0), plain, atol=1e-6)
    assert (sample(model, 4.0) - plain).abs().max().item() > 1e-3


# Workflows -----------------------------------------------------------------------------------------------------

def test_all_in_one_checkpoint_loads_model_clip_and_vae(ctx):
    transformer, gemma = tiny_lumina2(14), tiny_gemma(15)
    state = prefixed(lumina2_original(transformer), "model.diffusion_model.")
    state |= prefixed(convert.vae_to_ldm(tiny_vae16(16).state_dict()), "vae.")
    state |= prefixed(gemma.state_dict(), "text_encoders.gemma2_2b.transformer.model.")
    save_state(state, folder(ctx.env, "checkpoints") / "lumina_2.safetensors")
    write_tokenizer(folder(ctx.env, "checkpoints") / "gemma_tokenizer")
    model, clip, vae = run_node(CheckpointLoaderSimple, ctx, ckpt_name="lumina_2.safetensors")
    assert model.family == "lumina2" and clip.family == "lumina2" and vae is not None
    ours = _cond(run_node(CLIPTextEncode, ctx, text=PROMPT, clip=clip)[0])[0]
    ids = torch.tensor([[t for t, _ in clip.tokenize(PROMPT)["gemma2_2b"]]])
    with torch.no_grad():
        expected = gemma(ids, output_hidden_states=True).hidden_states[-2]
    assert (ours - expected).abs().max().item() <= 1e-5


def test_lumina2_workflow_runs_through_the_cli(tmp_path, capsys):
    from latentloom.server.cli import main

    models = tmp_path / "models"
    save_state(lumina2_original(tiny_lumina2(17)), models / "diffusion_models" / "lumina_2_tiny.safetensors")
    save_state(gemma_file_state(tiny_gemma(18)), models / "text_encoders" / "gemma_2_2b_tiny.safetensors")
    write_tokenizer(models / "text_encoders" / "gemma_tokenizer")
    save_state(convert.vae_to_ldm(tiny_vae16(19).state_dict()), models / "vae" / "ae.safetensors")
    graph = {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": "lumina_2_tiny.safetensors",
                                                     "weight_dtype": "default"}},
        "2": {"class_type": "CLIPLoader", "inputs": {"clip_name": "gemma_2_2b_tiny.safetensors", "type": "lumina2"}},
        "3": {"class_type": "VAELoader", "inputs": {"vae_name": "ae.safetensors"}},
        "4": {"class_type": "ModelSamplingAuraFlow", "inputs": {"model": ["1", 0], "shift": 6.0}},
        "5": {"class_type": "CLIPTextEncodeLumina2", "inputs": {"system_prompt": "superior", "user_prompt": PROMPT,
                                                                "clip": ["2", 0]}},
        "6": {"class_type": "CLIPTextEncodeLumina2", "inputs": {"system_prompt": "superior",
                                                                "user_prompt": "blurry, low quality",
                                                                "clip": ["2", 0]}},
        "7": {"class_type": "EmptySD3LatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "8": {"class_type": "KSampler", "inputs": {
            "model": ["4", 0], "seed": 3, "steps": 2, "cfg": 4.0, "sampler_name": "euler", "scheduler": "simple",
            "positive": ["5", 0], "negative": ["6", 0], "latent_image": ["7", 0], "denoise": 1.0}},
        "9": {"class_type": "VAEDecode", "inputs": {"samples": ["8", 0], "vae": ["3", 0]}},
        "10": {"class_type": "SaveImage", "inputs": {"images": ["9", 0], "filename_prefix": "lumina2"}},
    }
    (tmp_path / "graph.json").write_text(json.dumps(graph))
    code = main(["run", str(tmp_path / "graph.json"), "--json", "--models-dir", str(models),
                 "--input-dir", str(tmp_path / "input"), "--output-dir", str(tmp_path / "output"),
                 "--temp-dir", str(tmp_path / "temp"), "--custom-nodes", str(tmp_path / "none")])
    summary = json.loads(capsys.readouterr().out)
    assert code == 0 and summary["status"] == "success", summary
    assert len(summary["outputs"]) == 1
