"""AuraFlow and Chroma from ComfyUI's single-file layouts: loading, the model call, text encoding, sampling.

Tiny random diffusers transformers are written in the ORIGINAL names (the inverse maps below are this test's own,
from ComfyUI's comfy/ldm/aura/mmdit.py and comfy/ldm/chroma layouts), loaded through the loader nodes, and must
compute what the diffusers modules compute; KSampler must reproduce AuraFlowPipeline / ChromaPipeline (same
weights, noise and sigmas; prompt embeddings given directly: no Pile-T5 / T5 vocabulary is available offline).
"""

from __future__ import annotations

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from node_context import StubContext, make_env  # noqa: E402
from test_family_loading import _perturbed, folder, prefixed, t5_file_state, tiny_t5  # noqa: E402
from tiny_models import save_state  # noqa: E402

from latentloom.engine.inputs import InputError  # noqa: E402
from latentloom.nodes.diffusion import convert, dit_auraflow, dit_chroma, families  # noqa: E402
from latentloom.nodes.diffusion.latent_formats import FLUX_LATENT  # noqa: E402
from latentloom.nodes.diffusion.models import SDXL_LATENT  # noqa: E402
from latentloom.nodes.loaders import CLIPLoader, UNETLoader  # noqa: E402
from latentloom.nodes.sampling import BasicScheduler, KSampler  # noqa: E402

# Each test builds tiny diffusers/transformers models and compares with their pipeline: seconds apiece.
pytestmark = pytest.mark.slow


def tiny_auraflow(seed: int = 0) -> torch.nn.Module:
    from diffusers import AuraFlowTransformer2DModel

    torch.manual_seed(seed)
    return _perturbed(AuraFlowTransformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_mmdit_layers=1, num_single_dit_layers=1,
        attention_head_dim=256, num_attention_heads=2, joint_attention_dim=40, caption_projection_dim=512,
        out_channels=4, pos_embed_max_size=64), seed).requires_grad_(False)  # as the engine keeps networks


def tiny_chroma(seed: int = 0, text_width: int = 40) -> torch.nn.Module:
    from diffusers import ChromaTransformer2DModel

    torch.manual_seed(seed)
    return _perturbed(ChromaTransformer2DModel(
        patch_size=1, in_channels=64, out_channels=64, num_layers=2, num_single_layers=2, attention_head_dim=128,
        num_attention_heads=2, joint_attention_dim=text_width, approximator_num_channels=64, approximator_hidden_dim=48,
        approximator_layers=2), seed).requires_grad_(False)


def tiny_pile_t5(seed: int = 0) -> torch.nn.Module:
    from transformers import UMT5Config, UMT5EncoderModel

    torch.manual_seed(seed)
    config = UMT5Config(vocab_size=300, d_model=40, d_kv=8, d_ff=56, num_layers=2, num_heads=5,
                        relative_attention_num_buckets=16, feed_forward_proj="gated-gelu", is_encoder_decoder=False,
                        use_cache=False, pad_token_id=1, eos_token_id=2)
    return _perturbed(UMT5EncoderModel(config), seed)


# Inverse maps: diffusers names -> ComfyUI's original names --------------------------------------------------------

def _swap(weight: torch.Tensor) -> torch.Tensor:
    scale, shift = weight.chunk(2, dim=0)
    return torch.cat([shift, scale], dim=0)


def auraflow_original(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    sd = model.state_dict()
    out = {"register_tokens": sd["register_tokens"], "positional_encoding": sd["pos_embed.pos_embed"],
           "init_x_linear.weight": sd["pos_embed.proj.weight"], "init_x_linear.bias": sd["pos_embed.proj.bias"],
           "cond_seq_linear.weight": sd["context_embedder.weight"], "final_linear.weight": sd["proj_out.weight"],
           "modF.1.weight": _swap(sd["norm_out.linear.weight"])}
    for leaf in ("weight", "bias"):
        out[f"t_embedder.mlp.0.{leaf}"] = sd[f"time_step_proj.linear_1.{leaf}"]
        out[f"t_embedder.mlp.2.{leaf}"] = sd[f"time_step_proj.linear_2.{leaf}"]
    mlp = {"c_fc1": "linear_1", "c_fc2": "linear_2", "c_proj": "out_projection"}
    for i in range(model.config.num_mmdit_layers):
        d, o = f"joint_transformer_blocks.{i}.", f"double_layers.{i}."
        for name, target in mlp.items():
            out[f"{o}mlpX.{name}.weight"] = sd[f"{d}ff.{target}.weight"]
            out[f"{o}mlpC.{name}.weight"] = sd[f"{d}ff_context.{target}.weight"]
        out[f"{o}modX.1.weight"] = sd[f"{d}norm1.linear.weight"]
        out[f"{o}modC.1.weight"] = sd[f"{d}norm1_context.linear.weight"]
        for name, target in (("w2q", "to_q"), ("w2k", "to_k"), ("w2v", "to_v"), ("w2o", "to_out.0"),
                             ("w1q", "add_q_proj"), ("w1k", "add_k_proj"), ("w1v", "add_v_proj"),
                             ("w1o", "to_add_out")):
            out[f"{o}attn.{name}.weight"] = sd[f"{d}attn.{target}.weight"]
    for i in range(model.config.num_single_dit_layers):
        d, o = f"single_transformer_blocks.{i}.", f"single_layers.{i}."
        for name, target in mlp.items():
            out[f"{o}mlp.{name}.weight"] = sd[f"{d}ff.{target}.weight"]
        out[f"{o}modCX.1.weight"] = sd[f"{d}norm1.linear.weight"]
        for name, target in (("w1q", "to_q"), ("w1k", "to_k"), ("w1v", "to_v"), ("w1o", "to_out.0")):
            out[f"{o}attn.{name}.weight"] = sd[f"{d}attn.{target}.weight"]
    return out


def chroma_original(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    sd = model.state_dict()
    out: dict[str, torch.Tensor] = {}
    for leaf in ("weight", "bias"):
        for target, source in (("txt_in", "context_embedder"), ("img_in", "x_embedder"),
                               ("final_layer.linear", "proj_out"),
                               ("distilled_guidance_layer.in_proj", "distilled_guidance_layer.in_proj"),
                               ("distilled_guidance_layer.out_proj", "distilled_guidance_layer.out_proj")):
            out[f"{target}.{leaf}"] = sd[f"{source}.{leaf}"]
        for i in range(model.config.approximator_layers):
            layer = f"distilled_guidance_layer.layers.{i}."
            out[f"{layer}in_layer.{leaf}"] = sd[f"{layer}linear_1.{leaf}"]
            out[f"{layer}out_layer.{leaf}"] = sd[f"{layer}linear_2.{leaf}"]
    for i in range(model.config.approximator_layers):
        out[f"distilled_guidance_layer.norms.{i}.scale"] = sd[f"distilled_guidance_layer.norms.{i}.weight"]
    for i in range(model.config.num_layers):
        d, o = f"transformer_blocks.{i}.", f"double_blocks.{i}."
        for leaf in ("weight", "bias"):
            out[f"{o}img_attn.qkv.{leaf}"] = torch.cat([sd[f"{d}attn.to_{x}.{leaf}"] for x in "qkv"])
            out[f"{o}txt_attn.qkv.{leaf}"] = torch.cat([sd[f"{d}attn.add_{x}_proj.{leaf}"] for x in "qkv"])
            for target, source in (("img_mlp.0", "ff.net.0.proj"), ("img_mlp.2", "ff.net.2"),
                                   ("txt_mlp.0", "ff_context.net.0.proj"), ("txt_mlp.2", "ff_context.net.2"),
                                   ("img_attn.proj", "attn.to_out.0"), ("txt_attn.proj", "attn.to_add_out")):
                out[f"{o}{target}.{leaf}"] = sd[f"{d}{source}.{leaf}"]
        for target, source in (("img_attn.norm.query_norm", "norm_q"), ("img_attn.norm.key_norm", "norm_k"),
                               ("txt_attn.norm.query_norm", "norm_added_q"),
                               ("txt_attn.norm.key_norm", "norm_added_k")):
            out[f"{o}{target}.scale"] = sd[f"{d}attn.{source}.weight"]
    for i in range(model.config.num_single_layers):
        d, o = f"single_transformer_blocks.{i}.", f"single_blocks.{i}."
        for leaf in ("weight", "bias"):
            out[f"{o}linear1.{leaf}"] = torch.cat([sd[f"{d}attn.to_{x}.{leaf}"] for x in "qkv"]
                                                  + [sd[f"{d}proj_mlp.{leaf}"]])
            out[f"{o}linear2.{leaf}"] = sd[f"{d}proj_out.{leaf}"]
        out[f"{o}norm.query_norm.scale"] = sd[f"{d}attn.norm_q.weight"]
        out[f"{o}norm.key_norm.scale"] = sd[f"{d}attn.norm_k.weight"]
    return out


@pytest.fixture
def env(tmp_path):
    return make_env(models_dir=tmp_path / "models")


@pytest.fixture
def ctx(env) -> StubContext:
    return StubContext(env)


def _load(ctx, env, state, name: str):
    save_state(state, folder(env, "diffusion_models") / name)
    (model,) = UNETLoader.model_construct(unet_name=name, weight_dtype="default").run(ctx)
    return model


# Detection and the model call -------------------------------------------------------------------------------------

def test_detection_reads_both_configs_from_shapes():
    aura, chroma = tiny_auraflow(), tiny_chroma()
    found = families.detect_transformer(prefixed(auraflow_original(aura), "model."))
    assert (found.family, found.prefix) == ("auraflow", "model.")
    # sample_size only sizes diffusers' unused default grid: any value builds the same network
    assert all(found.config[k] == aura.config[k] for k in found.config if k != "sample_size")
    found = families.detect_transformer(prefixed(chroma_original(chroma), "model.diffusion_model."))
    assert found.family == "chroma"
    assert all(tuple(v) == tuple(chroma.config[k]) if isinstance(v, tuple) else v == chroma.config[k]
               for k, v in found.config.items())


def test_auraflow_file_computes_the_original_transformer(env, ctx):
    original = tiny_auraflow(1)
    model = _load(ctx, env, prefixed(auraflow_original(original), "model."), "aura.safetensors")
    assert model.family == "auraflow" and model.latent_format is SDXL_LATENT
    assert (model.sampling.schedule, model.sampling.shift, model.sampling.multiplier) == ("discrete_flow", 1.73, 1.0)
    generator = torch.Generator().manual_seed(2)
    x, context = torch.randn(2, 4, 12, 8, generator=generator), torch.randn(2, 5, 40, generator=generator)
    t = torch.tensor([0.7, 0.25])
    with torch.no_grad():
        ours = dit_auraflow.forward(model.unet, x, t, context, {}, {})
        reference = original(hidden_states=x, encoder_hidden_states=context, timestep=t, return_dict=False)[0]
        assert (ours - reference).abs().max().item() <= 1e-6
        # 10 x 6 latent = 5 x 3 tokens: ComfyUI crops its 8 x 8 position table at (8 - n) // 2, diffusers at
        # 4 - n // 2, one row / column further; a table shifted by one cell makes diffusers pick ComfyUI's rows.
        odd = torch.randn(1, 4, 10, 6, generator=generator)
        ours = dit_auraflow.forward(model.unet, odd, t[:1], context[:1], {}, {})
        shifted = tiny_auraflow(1)
        table = shifted.pos_embed.pos_embed.data.reshape(8, 8, -1)
        shifted.pos_embed.pos_embed.data = table.roll((1, 1), dims=(0, 1)).reshape(1, 64, -1)
        reference = shifted(hidden_states=odd, encoder_hidden_states=context[:1], timestep=t[:1],
                            return_dict=False)[0]
        assert (ours - reference).abs().max().item() <= 1e-6


def test_chroma_file_computes_the_original_transformer(env, ctx):
    from diffusers import ChromaPipeline

    original = tiny_chroma(3)
    model = _load(ctx, env, prefixed(chroma_original(original), "model.diffusion_model."), "chroma.safetensors")
    assert model.family == "chroma" and model.latent_format is FLUX_LATENT
    assert (model.sampling.schedule, model.sampling.shift, model.sampling.multiplier) == ("flux", 1.15, 1.0)
    generator = torch.Generator().manual_seed(4)
    x, context = torch.randn(2, 16, 6, 10, generator=generator), torch.randn(2, 7, 40, generator=generator)
    t = torch.tensor([0.9, 0.3])
    extra = dit_chroma.conditioning({}, x.shape, torch.device("cpu"))
    with torch.no_grad():
        ours = dit_chroma.forward(model.unet, x, t, context, extra, {})
        packed = ChromaPipeline._pack_latents(x, 2, 16, 6, 10)
        ids = ChromaPipeline._prepare_latent_image_ids(2, 3, 5, "cpu", torch.float32)
        out = original(hidden_states=packed, encoder_hidden_states=context, timestep=t, img_ids=ids,
                       txt_ids=torch.zeros(7, 3), return_dict=False)[0]
        reference = ChromaPipeline._unpack_latents(out, 48, 80, 8)
        assert (ours - reference).abs().max().item() <= 1e-6
        # FluxGuidance on Chroma: ComfyUI embeds the guidance value in the approximator input; it changes the output
        guided = dit_chroma.forward(model.unet, x, t, context, {"guidance": torch.tensor([4.0])}, {})
        assert (guided - ours).abs().max().item() > 1e-3
        again = dit_chroma.forward(model.unet, x, t, context, extra, {})
        assert torch.equal(again, ours)  # the guidance hook is gone after the call


# Text encoders ---------------------------------------------------------------------------------------------------

def test_pile_t5_and_chroma_t5_encode_as_comfyui(env, ctx):
    pile, t5 = tiny_pile_t5(5), tiny_t5(6)
    save_state(t5_file_state(pile), folder(env, "text_encoders") / "pile_t5xl.safetensors")
    save_state(t5_file_state(t5), folder(env, "text_encoders") / "t5xxl.safetensors")
    (aura_clip,) = CLIPLoader.model_construct(clip_name="pile_t5xl.safetensors", type="stable_diffusion").run(ctx)
    (chroma_clip,) = CLIPLoader.model_construct(clip_name="t5xxl.safetensors", type="chroma").run(ctx)
    assert (aura_clip.family, chroma_clip.family) == ("auraflow", "chroma")
    ids = [17, 45, 201, 9, 2] + [1] * 251  # prompt, end token 2, padded with 1 to 256
    cond, pooled = aura_clip.encode_tokens({"pile_t5xl": ids})
    mask = torch.tensor([[1] * 5 + [0] * 251])
    with torch.no_grad():  # AuraFlowPipeline's rule: the masked encoder output, zeroed at the padding
        reference = pile(input_ids=torch.tensor([ids]), attention_mask=mask).last_hidden_state * mask[..., None]
    assert pooled is None and cond.shape == (1, 256, 40)
    assert (cond - reference).abs().max().item() <= 1e-6
    cond, pooled = chroma_clip.encode_tokens({"t5xxl": [17, 45, 201, 1]})
    with torch.no_grad():
        reference = t5(input_ids=torch.tensor([[17, 45, 201, 1]])).last_hidden_state
    assert pooled is None and (cond - reference).abs().max().item() <= 1e-6


# Sampling against the diffusers pipelines ------------------------------------------------------------------------

def _sample(ctx, model, positive, negative, latent, steps: int, cfg: float):
    (sigmas,) = BasicScheduler.model_construct(model=model, scheduler="simple", steps=steps, denoise=1.0).run(ctx)
    sampler = KSampler.model_construct(model=model, seed=11, steps=steps, cfg=cfg, sampler_name="euler",
                                       scheduler="simple", positive=[[positive, {"pooled_output": None}]],
                                       negative=[[negative, {"pooled_output": None}]],
                                       latent_image={"samples": latent}, denoise=1.0)
    (out,) = sampler.run(ctx)
    noise = torch.randn(latent.shape, generator=torch.manual_seed(11))
    return out["samples"], sigmas, noise


def _scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(shift=1.0)


def test_auraflow_ksampler_matches_auraflow_pipeline(env, ctx):
    from diffusers import AuraFlowPipeline

    original = tiny_auraflow(7)
    model = _load(ctx, env, prefixed(auraflow_original(original), "model."), "aura.safetensors")
    generator = torch.Generator().manual_seed(8)
    positive, negative = torch.randn(1, 6, 40, generator=generator), torch.randn(1, 6, 40, generator=generator)
    latent = torch.zeros(1, 4, 8, 8)
    ours, sigmas, noise = _sample(ctx, model, positive, negative, latent, steps=3, cfg=3.5)
    assert sigmas[0].item() == 1.0  # the initial latent is the noise itself, as the pipeline's `latents`
    pipe = AuraFlowPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=original, scheduler=_scheduler())
    pipe.vae_scale_factor = 8
    mask = torch.ones(1, 6, dtype=torch.long)
    theirs = pipe(prompt_embeds=positive, prompt_attention_mask=mask, negative_prompt_embeds=negative,
                  negative_prompt_attention_mask=mask, latents=noise, sigmas=sigmas[:-1].tolist(),
                  num_inference_steps=3, guidance_scale=3.5, height=64, width=64, output_type="latent").images
    difference = (SDXL_LATENT.process_in(ours) - theirs).abs().max().item()
    print(f"AuraFlow max |latent difference| vs AuraFlowPipeline: {difference:.3g}")
    assert difference <= 1e-4


def test_chroma_ksampler_matches_chroma_pipeline(env, ctx):
    from diffusers import ChromaPipeline

    original = tiny_chroma(9)
    model = _load(ctx, env, prefixed(chroma_original(original), "model.diffusion_model."), "chroma.safetensors")
    generator = torch.Generator().manual_seed(10)
    positive, negative = torch.randn(1, 5, 40, generator=generator), torch.randn(1, 5, 40, generator=generator)
    latent = torch.zeros(1, 16, 8, 6)
    ours, sigmas, noise = _sample(ctx, model, positive, negative, latent, steps=3, cfg=4.0)
    assert sigmas[0].item() == 1.0
    pipe = ChromaPipeline(scheduler=_scheduler(), vae=None, text_encoder=None, tokenizer=None, transformer=original)
    pipe.vae_scale_factor = 8
    mask = torch.ones(1, 5, dtype=torch.bool)  # ComfyUI's Chroma attends to every text token it is given
    packed = ChromaPipeline._pack_latents(noise, 1, 16, 8, 6)
    theirs = pipe(prompt_embeds=positive, prompt_attention_mask=mask, negative_prompt_embeds=negative,
                  negative_prompt_attention_mask=mask, latents=packed, sigmas=sigmas[:-1].tolist(),
                  num_inference_steps=3, guidance_scale=4.0, height=64, width=48, output_type="latent").images
    theirs = ChromaPipeline._unpack_latents(theirs, 64, 48, 8)
    difference = (FLUX_LATENT.process_in(ours) - theirs).abs().max().item()
    print(f"Chroma max |latent difference| vs ChromaPipeline: {difference:.3g}")
    assert difference <= 1e-4


# Workflows through `latentloom run` ------------------------------------------------------------------------------

def _toy_tokenizer(folder_path, eos: str) -> None:
    """A word-level tokenizer.json over a few words (the real SentencePiece vocabularies are not available)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["<pad>", "</s>", "<unk>", "a", "red", "fox", "in", "snow", "blurry"]
    vocab = {word: index for index, word in enumerate(words)}
    vocab[eos] = vocab.pop("</s>")
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    folder_path.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(folder_path / "tokenizer.json"))


def _tiny_vae(latent_channels: int, seed: int) -> torch.nn.Module:
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return _perturbed(AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=latent_channels, block_out_channels=(32, 32, 32, 32),
        layers_per_block=1, down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        norm_num_groups=32, use_quant_conv=latent_channels == 4, use_post_quant_conv=latent_channels == 4), seed)


def _workflow(loaders: dict, sampling: str, width: int, height: int) -> dict:
    graph = dict(loaders)
    graph |= {
        "10": {"class_type": sampling, "inputs": {"model": ["1", 0], "shift": 1.73} if sampling ==
               "ModelSamplingAuraFlow" else {"model": ["1", 0], "max_shift": 1.15, "base_shift": 0.5,
                                             "width": width, "height": height}},
        "11": {"class_type": "CLIPTextEncode", "inputs": {"text": "a red fox in snow", "clip": ["2", 0]}},
        "12": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["2", 0]}},
        "13": {"class_type": "EmptySD3LatentImage" if sampling != "ModelSamplingAuraFlow" else "EmptyLatentImage",
               "inputs": {"width": width, "height": height, "batch_size": 1}},
        "14": {"class_type": "KSampler", "inputs": {
            "model": ["10", 0], "seed": 3, "steps": 2, "cfg": 3.0, "sampler_name": "euler", "scheduler": "simple",
            "positive": ["11", 0], "negative": ["12", 0], "latent_image": ["13", 0], "denoise": 1.0}},
        "15": {"class_type": "VAEDecode", "inputs": {"samples": ["14", 0], "vae": ["3", 0]}},
        "16": {"class_type": "SaveImage", "inputs": {"images": ["15", 0], "filename_prefix": "family"}},
    }
    return graph


def _run_cli(tmp_path, graph: dict, capsys) -> dict:
    from latentloom.server.cli import main

    (tmp_path / "graph.json").write_text(json.dumps(graph))
    code = main(["run", str(tmp_path / "graph.json"), "--json", "--models-dir", str(tmp_path / "models"),
                 "--input-dir", str(tmp_path / "input"), "--output-dir", str(tmp_path / "output"),
                 "--temp-dir", str(tmp_path / "temp"), "--custom-nodes", str(tmp_path / "none")])
    summary = json.loads(capsys.readouterr().out)
    assert code == 0, json.dumps(summary)[:1500]
    return summary


def test_auraflow_checkpoint_workflow_runs(tmp_path, capsys):
    models = tmp_path / "models"
    state = prefixed(auraflow_original(tiny_auraflow(12)), "model.")
    state |= prefixed(convert.vae_to_ldm(_tiny_vae(4, 13).state_dict()), "vae.")
    state |= prefixed(t5_file_state(tiny_pile_t5(14)), "text_encoders.pile_t5xl.transformer.")
    save_state(state, models / "checkpoints" / "aura_flow_tiny.safetensors")
    _toy_tokenizer(models / "text_encoders" / "pile_t5_tokenizer", eos="</s>")
    loaders = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "aura_flow_tiny.safetensors"}}}
    graph = _workflow(loaders, "ModelSamplingAuraFlow", 64, 64)
    graph["11"]["inputs"]["clip"] = graph["12"]["inputs"]["clip"] = ["1", 1]  # the checkpoint's Pile-T5
    graph["15"]["inputs"]["vae"] = ["1", 2]
    summary = _run_cli(tmp_path, graph, capsys)
    assert summary["status"] == "success" and len(summary["outputs"]) == 1


def test_chroma_workflow_runs(tmp_path, capsys):
    models = tmp_path / "models"
    save_state(chroma_original(tiny_chroma(15, text_width=96)), models / "diffusion_models" / "chroma_tiny.safetensors")
    save_state(t5_file_state(tiny_t5(16)), models / "text_encoders" / "t5xxl_tiny.safetensors")
    save_state(convert.vae_to_ldm(_tiny_vae(16, 17).state_dict()), models / "vae" / "ae.safetensors")
    _toy_tokenizer(models / "text_encoders" / "t5_tokenizer", eos="</s>")
    loaders = {"1": {"class_type": "UNETLoader", "inputs": {"unet_name": "chroma_tiny.safetensors",
                                                            "weight_dtype": "default"}},
               "2": {"class_type": "CLIPLoader", "inputs": {"clip_name": "t5xxl_tiny.safetensors", "type": "chroma"}},
               "3": {"class_type": "VAELoader", "inputs": {"vae_name": "ae.safetensors"}}}
    summary = _run_cli(tmp_path, _workflow(loaders, "ModelSamplingFlux", 64, 64), capsys)
    assert summary["status"] == "success" and len(summary["outputs"]) == 1


# ModelMergeAuraflow ----------------------------------------------------------------------------------------------

def test_model_merge_auraflow_ratios_follow_the_original_block_names(env, ctx):
    from test_merging_saving import effective, snapshot

    from latentloom.nodes.family_auraflow import ModelMergeAuraflow

    model_a = _load(ctx, env, prefixed(auraflow_original(tiny_auraflow(20)), "model."), "a.safetensors")
    model_b = _load(ctx, env, prefixed(auraflow_original(tiny_auraflow(21)), "model."), "b.safetensors")
    a, b = snapshot(model_a.unet), snapshot(model_b.unet)
    ratios = {"double_layers.0.": 0.25, "single_layers.0.": 0.6, "modF.": 0.1, "positional_encoding": 0.4}
    (merged,) = ModelMergeAuraflow.model_construct(model1=model_a, model2=model_b, **ratios).run(ctx)
    weights = effective(merged, ctx.models)
    expected = {"joint_transformer_blocks.0.attn.to_q.weight": 0.25, "single_transformer_blocks.0.ff.linear_1.weight":
                0.6, "norm_out.linear.weight": 0.1, "pos_embed.pos_embed": 0.4, "proj_out.weight": 1.0,
                "time_step_proj.linear_1.weight": 1.0}
    for name, ratio in expected.items():
        assert torch.allclose(weights[name], ratio * a[name] + (1 - ratio) * b[name], atol=1e-6), name
    with pytest.raises(InputError, match="ModelMergeAuraflow merges AuraFlow models"):
        ModelMergeAuraflow.model_construct(model1=model_a.clone(family="sd3"), model2=model_b).run(ctx)
