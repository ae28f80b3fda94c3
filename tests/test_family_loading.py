"""SD3 / SD3.5 and Flux files in ComfyUI's original single-file layouts, loaded through the loader nodes.

Tiny random diffusers / transformers models are written in the original names (the inverse mappings below are
this test's own, written from the original layouts), loaded through UNETLoader / CheckpointLoaderSimple /
VAELoader / CLIPLoader / DualCLIPLoader / TripleCLIPLoader, and must compute exactly what the original modules do.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from node_context import StubContext, make_env, run_node  # noqa: E402
from tiny_models import _text_encoder, save_state  # noqa: E402

from latentloom.nodes.diffusion import convert, families  # noqa: E402
from latentloom.nodes.diffusion.family_clip import FamilyClip, TokenizerUnavailable  # noqa: E402
from latentloom.nodes.diffusion.latent_formats import FLUX_LATENT, SD3_LATENT  # noqa: E402
from latentloom.nodes.diffusion.tokenizer import OPENCLIP_CHUNKS, SD1_CHUNKS, empty_chunk  # noqa: E402
from latentloom.nodes.loaders import (  # noqa: E402
    CheckpointLoaderSimple,
    CLIPLoader,
    DualCLIPLoader,
    TripleCLIPLoader,
    UNETLoader,
    VAELoader,
)

# Each test builds tiny diffusers/transformers models and compares with their pipeline: seconds apiece.
pytestmark = pytest.mark.slow


def _perturbed(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.05)
    return module.eval()


# Tiny models ------------------------------------------------------------------------------------------------

def tiny_sd3(seed: int = 0, sd35: bool = False) -> torch.nn.Module:
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    return _perturbed(SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=16, num_layers=3, attention_head_dim=64, num_attention_heads=2,
        joint_attention_dim=40, caption_projection_dim=128, pooled_projection_dim=48, out_channels=16,
        pos_embed_max_size=12, qk_norm="rms_norm" if sd35 else None, dual_attention_layers=(0,) if sd35 else ()),
        seed)


def tiny_flux(seed: int = 0, guidance: bool = True) -> torch.nn.Module:
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    return _perturbed(FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=2, num_single_layers=2, attention_head_dim=128,
        num_attention_heads=2, joint_attention_dim=40, pooled_projection_dim=24, guidance_embeds=guidance,
        axes_dims_rope=(16, 56, 56)), seed)


def tiny_vae16(seed: int = 0) -> torch.nn.Module:
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return _perturbed(AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        norm_num_groups=32, use_quant_conv=False, use_post_quant_conv=False), seed)


def tiny_t5(seed: int = 0) -> torch.nn.Module:
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    config = T5Config(vocab_size=300, d_model=96, d_kv=16, d_ff=80, num_layers=2, num_heads=3,
                      relative_attention_num_buckets=16, feed_forward_proj="gated-gelu", is_encoder_decoder=False,
                      use_cache=False)
    return _perturbed(T5EncoderModel(config), seed)


# Inverse mappings: diffusers names -> the original single-file names ----------------------------------------------

def _swap(weight: torch.Tensor) -> torch.Tensor:
    scale, shift = weight.chunk(2, dim=0)
    return torch.cat([shift, scale], dim=0)


def sd3_original(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    sd = model.state_dict()
    out = {"pos_embed": sd["pos_embed.pos_embed"], "x_embedder.proj.weight": sd["pos_embed.proj.weight"],
           "x_embedder.proj.bias": sd["pos_embed.proj.bias"], "final_layer.linear.weight": sd["proj_out.weight"],
           "final_layer.linear.bias": sd["proj_out.bias"],
           "final_layer.adaLN_modulation.1.weight": _swap(sd["norm_out.linear.weight"]),
           "final_layer.adaLN_modulation.1.bias": _swap(sd["norm_out.linear.bias"])}
    for leaf in ("weight", "bias"):
        out[f"context_embedder.{leaf}"] = sd[f"context_embedder.{leaf}"]
        for source, target in (("timestep_embedder", "t_embedder"), ("text_embedder", "y_embedder")):
            out[f"{target}.mlp.0.{leaf}"] = sd[f"time_text_embed.{source}.linear_1.{leaf}"]
            out[f"{target}.mlp.2.{leaf}"] = sd[f"time_text_embed.{source}.linear_2.{leaf}"]
    last = model.config.num_layers - 1
    for i in range(model.config.num_layers):
        d, o = f"transformer_blocks.{i}.", f"joint_blocks.{i}."
        for leaf in ("weight", "bias"):
            out[f"{o}x_block.attn.qkv.{leaf}"] = torch.cat([sd[f"{d}attn.to_{x}.{leaf}"] for x in "qkv"])
            out[f"{o}context_block.attn.qkv.{leaf}"] = torch.cat([sd[f"{d}attn.add_{x}_proj.{leaf}"] for x in "qkv"])
            out[f"{o}x_block.attn.proj.{leaf}"] = sd[f"{d}attn.to_out.0.{leaf}"]
            out[f"{o}x_block.adaLN_modulation.1.{leaf}"] = sd[f"{d}norm1.linear.{leaf}"]
            context_mod = sd[f"{d}norm1_context.linear.{leaf}"]
            out[f"{o}context_block.adaLN_modulation.1.{leaf}"] = _swap(context_mod) if i == last else context_mod
            out[f"{o}x_block.mlp.fc1.{leaf}"] = sd[f"{d}ff.net.0.proj.{leaf}"]
            out[f"{o}x_block.mlp.fc2.{leaf}"] = sd[f"{d}ff.net.2.{leaf}"]
            if i != last:
                out[f"{o}context_block.attn.proj.{leaf}"] = sd[f"{d}attn.to_add_out.{leaf}"]
                out[f"{o}context_block.mlp.fc1.{leaf}"] = sd[f"{d}ff_context.net.0.proj.{leaf}"]
                out[f"{o}context_block.mlp.fc2.{leaf}"] = sd[f"{d}ff_context.net.2.{leaf}"]
            if f"{d}attn2.to_q.weight" in sd:
                out[f"{o}x_block.attn2.qkv.{leaf}"] = torch.cat([sd[f"{d}attn2.to_{x}.{leaf}"] for x in "qkv"])
                out[f"{o}x_block.attn2.proj.{leaf}"] = sd[f"{d}attn2.to_out.0.{leaf}"]
        if f"{d}attn.norm_q.weight" in sd:
            for source, target in (("norm_q", "x_block.attn.ln_q"), ("norm_k", "x_block.attn.ln_k"),
                                   ("norm_added_q", "context_block.attn.ln_q"),
                                   ("norm_added_k", "context_block.attn.ln_k"),
                                   ("attn2.norm_q", "x_block.attn2.ln_q"), ("attn2.norm_k", "x_block.attn2.ln_k")):
                key = f"{d}{source}.weight" if source.startswith("attn2") else f"{d}attn.{source}.weight"
                if key in sd:
                    out[f"{o}{target}.weight"] = sd[key]
    return out


def flux_original(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    sd = model.state_dict()
    out: dict[str, torch.Tensor] = {}
    top = {"time_in.in_layer": "time_text_embed.timestep_embedder.linear_1",
           "time_in.out_layer": "time_text_embed.timestep_embedder.linear_2",
           "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
           "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
           "txt_in": "context_embedder", "img_in": "x_embedder", "final_layer.linear": "proj_out"}
    if model.config.guidance_embeds:
        top.update({"guidance_in.in_layer": "time_text_embed.guidance_embedder.linear_1",
                    "guidance_in.out_layer": "time_text_embed.guidance_embedder.linear_2"})
    for leaf in ("weight", "bias"):
        for target, source in top.items():
            out[f"{target}.{leaf}"] = sd[f"{source}.{leaf}"]
        out[f"final_layer.adaLN_modulation.1.{leaf}"] = _swap(sd[f"norm_out.linear.{leaf}"])
    for i in range(model.config.num_layers):
        d, o = f"transformer_blocks.{i}.", f"double_blocks.{i}."
        for leaf in ("weight", "bias"):
            out[f"{o}img_attn.qkv.{leaf}"] = torch.cat([sd[f"{d}attn.to_{x}.{leaf}"] for x in "qkv"])
            out[f"{o}txt_attn.qkv.{leaf}"] = torch.cat([sd[f"{d}attn.add_{x}_proj.{leaf}"] for x in "qkv"])
            for target, source in (("img_mod.lin", "norm1.linear"), ("txt_mod.lin", "norm1_context.linear"),
                                   ("img_mlp.0", "ff.net.0.proj"), ("img_mlp.2", "ff.net.2"),
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
            out[f"{o}modulation.lin.{leaf}"] = sd[f"{d}norm.linear.{leaf}"]
        out[f"{o}norm.query_norm.scale"] = sd[f"{d}attn.norm_q.weight"]
        out[f"{o}norm.key_norm.scale"] = sd[f"{d}attn.norm_k.weight"]
    return out


def prefixed(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {prefix + key: value for key, value in state.items()}


def clip_file_state(encoder: torch.nn.Module) -> dict[str, torch.Tensor]:
    return convert.clip_to_hf_legacy(encoder.state_dict())


def t5_file_state(encoder: torch.nn.Module) -> dict[str, torch.Tensor]:
    """As ComfyUI's t5xxl files: transformers names, the embedding only as shared.weight."""
    return {k: v for k, v in encoder.state_dict().items() if k != "encoder.embed_tokens.weight"}


# Fixtures ------------------------------------------------------------------------------------------------------

@pytest.fixture
def env(tmp_path):
    return make_env(models_dir=tmp_path / "models")


@pytest.fixture
def ctx(env) -> StubContext:
    return StubContext(env)


def folder(env, name: str):
    """models/<name>; ComfyUI's diffusion_models and text_encoders are aliases of unet and clip."""
    kind = {"diffusion_models": "unet", "text_encoders": "clip"}.get(name, name)
    path = next(p for p in env.model_dirs[kind] if p.name == name)
    path.mkdir(parents=True, exist_ok=True)
    return path


# Detection -----------------------------------------------------------------------------------------------------

def test_detection_reads_family_variant_and_config_from_shapes():
    sd3, sd35 = tiny_sd3(0), tiny_sd3(0, sd35=True)
    found = families.detect_transformer(sd3_original(sd3))
    assert (found.family, found.variant, found.prefix) == ("sd3", "sd3", "")
    assert {k: found.config[k] for k in sd3.config if k in found.config and k != "sample_size"} == \
        {k: (tuple(v) if isinstance(v, list) else v) for k, v in sd3.config.items()
         if k in found.config and k != "sample_size"}
    found35 = families.detect_transformer(prefixed(sd3_original(sd35), "model.diffusion_model."))
    assert (found35.variant, found35.prefix) == ("sd3.5", "model.diffusion_model.")
    assert found35.config["qk_norm"] == "rms_norm" and found35.config["dual_attention_layers"] == (0,)
    for guidance, variant in ((True, "flux_dev"), (False, "flux_schnell")):
        flux = tiny_flux(1, guidance)
        found = families.detect_transformer(flux_original(flux))
        assert (found.family, found.variant) == ("flux", variant)
        for key, value in found.config.items():
            expected = flux.config[key]
            if key == "out_channels" and expected is None:  # diffusers' None: as many as in_channels
                expected = flux.config["in_channels"]
            assert (tuple(expected) if isinstance(expected, list) else expected) == value, key


def test_unknown_layouts_get_an_error_naming_what_was_found(env, ctx):
    save_state({"blocks.0.attn.weight": torch.zeros(4, 4), "head.weight": torch.zeros(2, 4)},
               folder(env, "diffusion_models") / "mystery.safetensors")
    with pytest.raises(ValueError, match=r"UNETLoader \(#1\): input 'unet_name': mystery.safetensors: .*"
                                         r"joint_blocks.*double_blocks.*found 2 tensors; key groups blocks, head"):
        run_node(UNETLoader, ctx, unet_name="mystery.safetensors", weight_dtype="default")
    flux = flux_original(tiny_flux(0))
    flux["distilled_guidance_layer.norms.0.scale"] = torch.ones(4)
    with pytest.raises(families.UnknownTransformer, match="Chroma"):
        families.detect_transformer(flux)
    odd = flux_original(tiny_flux(0))
    odd["double_blocks.0.img_attn.norm.key_norm.scale"] = torch.ones(64)
    with pytest.raises(families.UnknownTransformer, match="128-wide heads"):
        families.detect_transformer(odd)


# Transformers --------------------------------------------------------------------------------------------------

def _assert_same_sd3_output(original: torch.nn.Module, loaded: torch.nn.Module) -> None:
    generator = torch.Generator().manual_seed(3)
    hidden = torch.randn(2, 16, 8, 10, generator=generator)
    context = torch.randn(2, 7, 40, generator=generator)
    pooled = torch.randn(2, 48, generator=generator)
    timestep = torch.tensor([500.0, 20.0])
    with torch.no_grad():
        expected = original(hidden, context, pooled, timestep).sample
        actual = loaded(hidden, context, pooled, timestep).sample
    assert expected.abs().max() > 0.1
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-6)


def test_sd3_and_sd35_unet_files_build_the_same_transformer(env, ctx):
    for name, sd35 in (("sd3_medium.safetensors", False), ("sd3.5_medium.safetensors", True)):
        original = tiny_sd3(4, sd35)
        save_state(sd3_original(original), folder(env, "diffusion_models") / name)
        (model,) = UNETLoader.model_construct(unet_name=name, weight_dtype="default").run(ctx)
        assert (model.family, model.options["variant"]) == ("sd3", "sd3.5" if sd35 else "sd3")
        assert model.latent_format is SD3_LATENT
        assert (model.sampling.prediction, model.sampling.schedule, model.sampling.shift) == \
            ("const", "discrete_flow", 3.0)
        assert type(model.unet).__name__ == "SD3Transformer2DModel"
        _assert_same_sd3_output(original, model.unet)
    # The loaded model samples (tests/test_sd3_sampling.py compares whole runs with diffusers' pipeline): one euler
    # step from σ = 1 to 0 is x = noise − v(noise, t = 1000), in the network's latent space.
    from latentloom.nodes.sampling import KSampler

    generator = torch.Generator().manual_seed(25)
    cond = [[torch.randn(1, 7, 40, generator=generator), {"pooled_output": torch.randn(1, 48, generator=generator)}]]
    sampler = KSampler.model_construct(model=model, seed=1, steps=1, cfg=1.0, sampler_name="euler",
                                       scheduler="simple", positive=cond, negative=cond,
                                       latent_image={"samples": torch.zeros(1, 16, 8, 8)}, denoise=1.0)
    (out,) = sampler.run(ctx)
    noise = torch.randn((1, 16, 8, 8), generator=torch.manual_seed(1))
    with torch.no_grad():
        velocity = original(noise, cond[0][0], cond[0][1]["pooled_output"], torch.tensor([1000.0])).sample
    torch.testing.assert_close(SD3_LATENT.process_in(out["samples"]), noise - velocity, rtol=0, atol=1e-5)


def _flux_inputs(guidance: bool):
    generator = torch.Generator().manual_seed(5)
    height, width = 4, 6
    tokens = torch.randn(1, height * width, 64, generator=generator)
    context = torch.randn(1, 5, 40, generator=generator)
    pooled = torch.randn(1, 24, generator=generator)
    img_ids = torch.zeros(height, width, 3)
    img_ids[..., 1] = torch.arange(height)[:, None]
    img_ids[..., 2] = torch.arange(width)[None, :]
    return dict(hidden_states=tokens, encoder_hidden_states=context, pooled_projections=pooled,
                timestep=torch.tensor([0.7]), img_ids=img_ids.reshape(-1, 3), txt_ids=torch.zeros(5, 3),
                guidance=torch.tensor([3.5]) if guidance else None)


def test_flux_dev_and_schnell_files_build_the_same_transformer(env, ctx):
    for name, guidance in (("flux1-dev.safetensors", True), ("flux1-schnell.safetensors", False)):
        original = tiny_flux(6, guidance)
        save_state(flux_original(original), folder(env, "unet") / name)
        (model,) = UNETLoader.model_construct(unet_name=name, weight_dtype="default").run(ctx)
        assert (model.family, model.options["variant"]) == ("flux", "flux_dev" if guidance else "flux_schnell")
        assert model.latent_format is FLUX_LATENT
        # ComfyUI: dev samples on Flux's schedule (μ 1.15), schnell on the plain flow schedule (shift 1: σ = t).
        expected_sampling = ("flux", 1.15, 1.0) if guidance else ("discrete_flow", 1.0, 1.0)
        assert (model.sampling.schedule, model.sampling.shift, model.sampling.multiplier) == expected_sampling
        inputs = _flux_inputs(guidance)
        with torch.no_grad():
            expected = original(**inputs).sample
            actual = model.unet(**inputs).sample
        assert expected.abs().max() > 0.1
        torch.testing.assert_close(actual, expected, rtol=0, atol=1e-6)


# VAE -----------------------------------------------------------------------------------------------------------

def test_sixteen_channel_vaes_encode_and_decode_as_the_original(env, ctx):
    original = tiny_vae16(7)
    for name, latent_format in (("ae.safetensors", FLUX_LATENT), ("sd3_vae.safetensors", SD3_LATENT)):
        save_state(convert.vae_to_ldm(original.state_dict()), folder(env, "vae") / name)
        (vae,) = VAELoader.model_construct(vae_name=name).run(ctx)
        assert vae.latent_format is latent_format
        pixels = torch.rand(1, 3, 16, 24, generator=torch.Generator().manual_seed(8)) * 2 - 1
        with torch.no_grad():
            expected_latent = original.encode(pixels).latent_dist.mean
            latent = vae.autoencoder.encode(pixels).latent_dist.mean
            assert latent.shape == (1, 16, 8, 12)
            torch.testing.assert_close(latent, expected_latent, rtol=0, atol=1e-6)
            torch.testing.assert_close(vae.autoencoder.decode(latent).sample, original.decode(latent).sample,
                                       rtol=0, atol=1e-6)


def test_latent_formats_shift_and_scale():
    raw = torch.randn(1, 16, 2, 2)
    torch.testing.assert_close(SD3_LATENT.process_in(raw), (raw - 0.0609) * 1.5305)
    torch.testing.assert_close(FLUX_LATENT.process_in(raw), (raw - 0.1159) * 0.3611)
    torch.testing.assert_close(FLUX_LATENT.process_out(FLUX_LATENT.process_in(raw)), raw)
    assert len(SD3_LATENT.rgb_factors or ()) == len(FLUX_LATENT.rgb_factors or ()) == 16


# Text encoders -------------------------------------------------------------------------------------------------

def _t5_ids() -> torch.Tensor:
    return torch.tensor([[5, 17, 299, 42, 1]])


def test_flux_dual_clip_encodes_like_t5_and_clip_l(env, ctx):
    clip_l, t5 = _text_encoder(open_clip=False, projection=False, seed=9), tiny_t5(10)
    save_state(clip_file_state(clip_l), folder(env, "clip") / "clip_l.safetensors")
    save_state(t5_file_state(t5), folder(env, "clip") / "t5xxl_fp16.safetensors")
    (clip,) = DualCLIPLoader.model_construct(clip_name1="t5xxl_fp16.safetensors", clip_name2="clip_l.safetensors",
                                             type="flux").run(ctx)
    assert isinstance(clip, FamilyClip) and clip.family == "flux" and set(clip.encoders) == {"l", "t5xxl"}
    cond, pooled = clip.encode_tokens({"t5xxl": _t5_ids()})
    ids = torch.tensor([[token for token, _ in empty_chunk(SD1_CHUNKS)]])
    with torch.no_grad():
        torch.testing.assert_close(cond, t5(input_ids=_t5_ids()).last_hidden_state, rtol=0, atol=1e-6)
        torch.testing.assert_close(pooled, clip_l(ids).pooler_output, rtol=0, atol=1e-6)
    with pytest.raises(TokenizerUnavailable, match="SentencePiece"):
        clip.tokenize("a photo of a cat")


def test_sd3_triple_clip_combines_l_g_and_t5(env, ctx):
    clip_l = _text_encoder(open_clip=False, projection=False, seed=11)
    clip_g = _text_encoder(open_clip=True, projection=True, seed=12)
    t5 = tiny_t5(13)
    save_state(clip_file_state(clip_l), folder(env, "clip") / "clip_l.safetensors")
    save_state(clip_file_state(clip_g), folder(env, "clip") / "clip_g.safetensors")
    save_state(t5_file_state(t5), folder(env, "clip") / "t5xxl.safetensors")
    (clip,) = TripleCLIPLoader.model_construct(clip_name1="clip_g.safetensors", clip_name2="t5xxl.safetensors",
                                               clip_name3="clip_l.safetensors").run(ctx)
    assert clip.family == "sd3" and set(clip.encoders) == {"l", "g", "t5xxl"}
    cond, pooled = clip.encode_tokens({"t5xxl": _t5_ids()})
    l_ids = torch.tensor([[token for token, _ in empty_chunk(SD1_CHUNKS)]])
    g_ids = torch.tensor([[token for token, _ in empty_chunk(OPENCLIP_CHUNKS)]])
    with torch.no_grad():
        l_out = clip_l(l_ids, output_hidden_states=True)
        g_out = clip_g(g_ids, output_hidden_states=True)
        t5_out = t5(input_ids=_t5_ids()).last_hidden_state
    lg = torch.cat([l_out.hidden_states[-2], g_out.hidden_states[-2]], dim=-1)  # penultimate, no final norm
    expected = torch.cat([torch.nn.functional.pad(lg, (0, 96 - lg.shape[-1])), t5_out], dim=1)
    assert cond.shape == (1, 77 + 5, 96)
    torch.testing.assert_close(cond, expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(pooled, torch.cat([l_out.pooler_output, g_out.text_embeds], dim=-1),
                               rtol=0, atol=1e-5)
    (single,) = CLIPLoader.model_construct(clip_name="t5xxl.safetensors", type="sd3").run(ctx)
    cond_t5, pooled_t5 = single.encode_tokens({"t5xxl": _t5_ids()})
    torch.testing.assert_close(cond_t5, t5_out, rtol=0, atol=1e-6)
    assert torch.equal(pooled_t5, torch.zeros(1, 2048))
    with pytest.raises(ValueError, match=r"DualCLIPLoader \(#1\): input 'clip_name1/clip_name2': .*clip_g.safetensors: "
                                         r"a CLIP-G encoder is not part of a flux CLIP"):
        run_node(DualCLIPLoader, ctx, clip_name1="clip_g.safetensors", clip_name2="clip_l.safetensors",
                 type="flux")


# All-in-one checkpoint -----------------------------------------------------------------------------------------

def test_sd35_all_in_one_checkpoint_loads_model_clip_and_vae(env, ctx):
    transformer, vae = tiny_sd3(14, sd35=True), tiny_vae16(15)
    clip_l = _text_encoder(open_clip=False, projection=False, seed=16)
    clip_g = _text_encoder(open_clip=True, projection=True, seed=17)
    t5 = tiny_t5(18)
    state = prefixed(sd3_original(transformer), "model.diffusion_model.")
    state |= prefixed(convert.vae_to_ldm(vae.state_dict()), "first_stage_model.")
    state |= prefixed(clip_file_state(clip_l), "text_encoders.clip_l.transformer.")
    state |= prefixed(clip_file_state(clip_g), "text_encoders.clip_g.transformer.")
    state |= prefixed(t5_file_state(t5), "text_encoders.t5xxl.transformer.")
    save_state(state, folder(env, "checkpoints") / "sd3.5_medium_incl_clips_t5xxl.safetensors")
    model, clip, loaded_vae = CheckpointLoaderSimple.model_construct(
        ckpt_name="sd3.5_medium_incl_clips_t5xxl.safetensors").run(ctx)
    assert (model.family, model.options["variant"], clip.family) == ("sd3", "sd3.5", "sd3")
    assert set(clip.encoders) == {"l", "g", "t5xxl"} and loaded_vae.latent_format is SD3_LATENT
    _assert_same_sd3_output(transformer, model.unet)
    pixels = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(19)) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(loaded_vae.autoencoder.encode(pixels).latent_dist.mean,
                                   vae.encode(pixels).latent_dist.mean, rtol=0, atol=1e-6)
        torch.testing.assert_close(clip.encoders["t5xxl"](input_ids=_t5_ids()).last_hidden_state,
                                   t5(input_ids=_t5_ids()).last_hidden_state, rtol=0, atol=1e-6)


def test_clip_text_encode_runs_on_an_sd3_clip_and_refuses_t5_prompts_clearly(env, ctx):
    from latentloom.nodes.conditioning import CLIPTextEncode
    from latentloom.nodes.diffusion.tokenizer import clip_tokenizer

    clip_l = _text_encoder(open_clip=False, projection=False, seed=20)
    clip_g = _text_encoder(open_clip=True, projection=True, seed=21)
    save_state(clip_file_state(clip_l), folder(env, "text_encoders") / "clip_l.safetensors")
    save_state(clip_file_state(clip_g), folder(env, "text_encoders") / "clip_g.safetensors")
    save_state(t5_file_state(tiny_t5(22)), folder(env, "text_encoders") / "t5xxl.safetensors")
    (clip,) = DualCLIPLoader.model_construct(clip_name1="clip_l.safetensors", clip_name2="clip_g.safetensors",
                                             type="sd3").run(ctx)
    ((cond, options),) = run_node(CLIPTextEncode, ctx, text="a photo of a cat", clip=clip)[0]
    words = clip_tokenizer()("a photo of a cat").input_ids
    l_ids = torch.tensor([words + [49407] * (77 - len(words))])
    g_ids = torch.tensor([words + [0] * (77 - len(words))])
    with torch.no_grad():
        l_out, g_out = clip_l(l_ids, output_hidden_states=True), clip_g(g_ids, output_hidden_states=True)
    lg = torch.cat([l_out.hidden_states[-2], g_out.hidden_states[-2]], dim=-1)
    torch.testing.assert_close(cond, torch.nn.functional.pad(lg, (0, 4096 - lg.shape[-1])), rtol=0, atol=1e-5)
    torch.testing.assert_close(options["pooled_output"], torch.cat([l_out.pooler_output, g_out.text_embeds], -1),
                               rtol=0, atol=1e-5)
    (with_t5,) = TripleCLIPLoader.model_construct(clip_name1="clip_l.safetensors", clip_name2="clip_g.safetensors",
                                                  clip_name3="t5xxl.safetensors").run(ctx)
    with pytest.raises(TokenizerUnavailable, match="T5 prompts cannot be tokenized.*SentencePiece"):
        run_node(CLIPTextEncode, ctx, text="a photo of a cat", clip=with_t5)


def test_qwen_image_file_builds_the_same_transformer(env, ctx):
    from diffusers import QwenImageTransformer2DModel

    from latentloom.nodes.diffusion.latent_formats import WAN21_LATENT

    torch.manual_seed(23)
    original = _perturbed(QwenImageTransformer2DModel(
        patch_size=2, in_channels=64, out_channels=16, num_layers=2, attention_head_dim=128, num_attention_heads=2,
        joint_attention_dim=40, axes_dims_rope=(16, 56, 56)), 23)
    save_state(original.state_dict(), folder(env, "diffusion_models") / "qwen_image_fp8.safetensors")
    (model,) = UNETLoader.model_construct(unet_name="qwen_image_fp8.safetensors", weight_dtype="default").run(ctx)
    assert (model.family, model.latent_format, model.sampling.schedule, model.sampling.shift) == \
        ("qwen_image", WAN21_LATENT, "flux", 1.15)
    generator = torch.Generator().manual_seed(24)
    inputs = dict(hidden_states=torch.randn(1, 12, 64, generator=generator),
                  encoder_hidden_states=torch.randn(1, 5, 40, generator=generator),
                  encoder_hidden_states_mask=torch.ones(1, 5), timestep=torch.tensor([0.6]), img_shapes=[(1, 3, 4)])
    with torch.no_grad():
        expected = original(**inputs).sample
        actual = model.unet(**inputs).sample
    assert expected.abs().max() > 0.1
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-6)
    raw = torch.randn(1, 16, 2, 2)
    mean = torch.tensor(WAN21_LATENT.latents_mean).view(1, -1, 1, 1)
    std = torch.tensor(WAN21_LATENT.latents_std).view(1, -1, 1, 1)
    torch.testing.assert_close(WAN21_LATENT.process_in(raw), (raw - mean) / std)
