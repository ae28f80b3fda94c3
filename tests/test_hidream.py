"""HiDream-I1 (MoE DiT + CLIP-L, CLIP-G, T5-XXL, Llama-3.1) against diffusers' HiDreamImagePipeline built from the
same weights.

A tiny random HiDreamImageTransformer2DModel (2 routed experts, 1 double + 2 single blocks) is written in ComfyUI's
single-file layout (which uses diffusers' names), tiny long CLIP-L / CLIP-G (128 positions, with projections), a
tiny T5 and a tiny Llama (LlamaForCausalLM's file, lm_head included) as ComfyUI's text-encoder files, a tiny T5
Unigram tokenizer and a tiny Llama BPE tokenizer.json trained here (the real vocabularies are not available
offline); the CLIP tokenizer is the shipped one. The Llama uses ComfyUI's numerics (plain rotary, θ 500000), and
the pipeline gets the very same modules, so everything is comparable:

* the transformer call: the loaded network vs the original module (the pipeline's llama_layers = ComfyUI's
  min(i, L − 1) rule), and ModelCall's x0 vs the pipeline's (velocity = −output at timestep σ·1000);
* text: CLIPTextEncode and CLIPTextEncodeHiDream vs HiDreamImagePipeline.encode_prompt (T5 states, Llama states
  of every layer, pooled CLIP-L ‖ CLIP-G) from the same prompts and tokenizers;
* final latents of KSampler euler with ModelSamplingSD3 (shift 3) vs the pipeline (same noise; the schedule's own
  sigmas handed to an unshifted scheduler; output_type="latent"), compared in the network's space
  ((z − 0.1159)·0.3611);
* a ComfyUI-style API workflow through `latentloom run`.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from node_context import StubContext, make_env, run_node  # noqa: E402
from test_family_loading import _perturbed, clip_file_state, folder, prefixed, t5_file_state, tiny_t5, tiny_vae16  # noqa: E402
from test_flux_sampling import pipeline_clip_tokenizer, write_t5_tokenizer  # noqa: E402
from tiny_models import VOCAB_SIZE, save_state  # noqa: E402

from latentloom.nodes.conditioning import CLIPTextEncode  # noqa: E402
from latentloom.nodes.diffusion import convert, dit_hidream, families  # noqa: E402
from latentloom.nodes.diffusion.denoiser import ModelCall  # noqa: E402
from latentloom.nodes.diffusion.family_clip import TokenizerUnavailable  # noqa: E402
from latentloom.nodes.diffusion.latent_formats import FLUX_LATENT  # noqa: E402
from latentloom.nodes.diffusion.schedules import calculate_sigmas, schedule_for  # noqa: E402
from latentloom.nodes.family_hidream import CLIPTextEncodeHiDream, QuadrupleCLIPLoader  # noqa: E402
from latentloom.nodes.loaders import CheckpointLoaderSimple, CLIPLoader, UNETLoader  # noqa: E402
from latentloom.nodes.model_families import EmptySD3LatentImage, ModelSamplingSD3  # noqa: E402
from latentloom.nodes.sampling import KSampler  # noqa: E402

T5_WIDTH, LLAMA_WIDTH, CLIP_L_WIDTH, CLIP_G_WIDTH = 96, 32, 32, 64
LLAMA_LAYERS = 2
PROMPT = "a photo of a red cat sitting on the table"
NEGATIVE = "blurry dog"
STEPS = 3
TEXT_FILES = ("clip_l_hidream.safetensors", "clip_g_hidream.safetensors", "t5xxl_fp16.safetensors",
              "llama_3.1_8b_instruct.safetensors")


# Tiny models and files -------------------------------------------------------------------------------------------

# Each test builds tiny diffusers/transformers models and compares with their pipeline: seconds apiece.
pytestmark = pytest.mark.slow


def tiny_hidream(seed: int) -> torch.nn.Module:
    """ComfyUI's llama_layers rule for a 2-layer Llama: block i reads layer min(i, 1)."""
    from diffusers import HiDreamImageTransformer2DModel

    torch.manual_seed(seed)
    return _perturbed(HiDreamImageTransformer2DModel(
        patch_size=2, in_channels=16, out_channels=16, num_layers=1, num_single_layers=2, attention_head_dim=128,
        num_attention_heads=2, caption_channels=[T5_WIDTH, LLAMA_WIDTH], text_emb_dim=CLIP_L_WIDTH + CLIP_G_WIDTH,
        num_routed_experts=2, num_activated_experts=2, axes_dims_rope=(64, 32, 32), max_resolution=(128, 128),
        llama_layers=[0, 1, 1]), seed)


def tiny_llama(seed: int) -> torch.nn.Module:
    """Llama with ComfyUI's numerics: 128-wide heads, plain rotary embedding, θ 500000, ε 1e-5."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=300, hidden_size=LLAMA_WIDTH, intermediate_size=64,
                         num_hidden_layers=LLAMA_LAYERS, num_attention_heads=2, num_key_value_heads=1, head_dim=128,
                         rms_norm_eps=1e-5, rope_theta=500000.0, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    return _perturbed(LlamaForCausalLM(config), seed)


def tiny_long_clip(width: int, openai: bool, seed: int) -> torch.nn.Module:
    """HiDream's CLIPs are long CLIPs with projections; 128 positions hold the pipeline's 128-token prompts."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    config = CLIPTextConfig(vocab_size=VOCAB_SIZE, hidden_size=width, intermediate_size=2 * width,
                            num_hidden_layers=2, num_attention_heads=1, max_position_embeddings=128,
                            hidden_act="quick_gelu" if openai else "gelu", projection_dim=width,
                            bos_token_id=49406, eos_token_id=49407, pad_token_id=1 if openai else 0)
    return _perturbed(CLIPTextModelWithProjection(config), seed)


def tiny_llama_tokenizer():
    """A byte-free BPE over the test's texts with Llama 3's special tokens (<|begin_of_text|> prepended)."""
    from tokenizers import Tokenizer, models, normalizers, processors, trainers

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.normalizer = normalizers.Replace(" ", "Ġ")
    trainer = trainers.BpeTrainer(vocab_size=200, special_tokens=["<|begin_of_text|>", "<|eot_id|>", "<unk>"],
                                  show_progress=False)
    tokenizer.train_from_iterator([PROMPT, NEGATIVE, "a cat on a mat, in (the garden:1.3)"] * 4, trainer)
    tokenizer.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A",
                                                             special_tokens=[("<|begin_of_text|>", 0)])
    return tokenizer


class HiDreamFiles:
    """The tiny originals and a models/ folder holding them in ComfyUI's layout."""

    def __init__(self, root: Path, seed: int = 0) -> None:
        self.ctx = StubContext(make_env(root, models_dir=root / "models"))
        self.transformer = tiny_hidream(seed)
        self.clip_l = tiny_long_clip(CLIP_L_WIDTH, True, seed + 1)
        self.clip_g = tiny_long_clip(CLIP_G_WIDTH, False, seed + 2)
        self.t5 = tiny_t5(seed + 3)
        self.llama = tiny_llama(seed + 4)
        self.vae = tiny_vae16(seed + 5)
        self.vae.register_to_config(scaling_factor=FLUX_LATENT.scale_factor, shift_factor=FLUX_LATENT.shift_factor)
        text = folder(self.ctx.env, "text_encoders")
        save_state(self.transformer.state_dict(), folder(self.ctx.env, "diffusion_models") / "hidream_tiny.safetensors")
        for name, state in zip(TEXT_FILES, (clip_file_state(self.clip_l), clip_file_state(self.clip_g),
                                            t5_file_state(self.t5), self.llama.state_dict()), strict=True):
            save_state(state, text / name)
        save_state(convert.vae_to_ldm(self.vae.state_dict()), folder(self.ctx.env, "vae") / "ae.safetensors")
        self.t5_tokenizer_dir = write_t5_tokenizer(text / "t5_tokenizer")
        (text / "llama_tokenizer").mkdir()
        tiny_llama_tokenizer().save(str(text / "llama_tokenizer" / "tokenizer.json"))

    def load(self):
        (model,) = run_node(UNETLoader, self.ctx, unet_name="hidream_tiny.safetensors", weight_dtype="default")
        # The files in another order than L, G, T5, Llama: each is recognised by its content.
        names = dict(zip(("clip_name1", "clip_name2", "clip_name3", "clip_name4"),
                         (TEXT_FILES[3], TEXT_FILES[1], TEXT_FILES[2], TEXT_FILES[0]), strict=True))
        (clip,) = run_node(QuadrupleCLIPLoader, self.ctx, **names)
        return model, clip

    def pipeline(self):
        from diffusers import FlowMatchEulerDiscreteScheduler, HiDreamImagePipeline
        from transformers import PreTrainedTokenizerFast, T5TokenizerFast

        llama_tokenizer = PreTrainedTokenizerFast(tokenizer_object=tiny_llama_tokenizer(),
                                                  bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
                                                  unk_token="<unk>")
        return HiDreamImagePipeline(
            scheduler=FlowMatchEulerDiscreteScheduler(shift=1.0), vae=self.vae, text_encoder=self.clip_l,
            tokenizer=pipeline_clip_tokenizer(), text_encoder_2=self.clip_g, tokenizer_2=pipeline_clip_tokenizer(),
            text_encoder_3=self.t5, tokenizer_3=T5TokenizerFast.from_pretrained(str(self.t5_tokenizer_dir)),
            text_encoder_4=self.llama, tokenizer_4=llama_tokenizer, transformer=self.transformer)


@pytest.fixture
def files(tmp_path) -> HiDreamFiles:
    return HiDreamFiles(tmp_path)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def _single(conditioning):
    ((cond, options),) = conditioning
    return cond, options


# The transformer -------------------------------------------------------------------------------------------------

def test_detection_reads_the_config_from_shapes():
    original = tiny_hidream(0).state_dict()
    found = families.detect_transformer(prefixed(original, "model.diffusion_model."))
    assert (found.family, found.variant, found.prefix) == ("hidream", "hidream", "model.diffusion_model.")
    config = found.config
    assert (config["num_attention_heads"], config["num_layers"], config["num_single_layers"]) == (2, 1, 2)
    assert config["caption_channels"] == (T5_WIDTH, LLAMA_WIDTH)
    assert (config["text_emb_dim"], config["num_routed_experts"], config["in_channels"]) == (96, 2, 16)
    assert config["llama_layers"] == [0, 1, 2]
    assert families.default_sampling(found) == {"prediction": "const", "schedule": "discrete_flow", "shift": 1.0,
                                                "multiplier": 1000.0}
    del original["caption_projection.3.linear.weight"]
    with pytest.raises(families.UnknownTransformer, match="caption projections"):
        families.detect_transformer(original)


def test_unet_file_builds_the_same_transformer_and_the_model_call_follows_the_pipeline(files):
    model, _ = files.load()
    assert model.family == "hidream" and model.latent_format is FLUX_LATENT
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(2, 16, 8, 8, generator=generator)
    t5 = torch.randn(2, 9, T5_WIDTH, generator=generator)
    llama = torch.randn(2, LLAMA_LAYERS, 7, LLAMA_WIDTH, generator=generator)
    pooled = torch.randn(2, CLIP_L_WIDTH + CLIP_G_WIDTH, generator=generator)
    sigma = torch.tensor([0.9, 0.35])
    options = {"conditioning_llama3": llama, "pooled_output": pooled}
    extra = dit_hidream.conditioning(options, x.shape, torch.device("cpu"))
    with torch.no_grad():
        expected = files.transformer(x, sigma * 1000, t5, llama.movedim(1, 0), pooled, return_dict=False)[0]
        ours = dit_hidream.forward(model.unet, x, sigma * 1000, t5, extra, {})
        raw = max_diff(ours, -expected)
        # The pipeline's step uses velocity = −output at timestep σ·1000; x0 = x − σ·velocity.
        call = ModelCall(model, model.unet, schedule_for(model.sampling))
        x0 = call(x, sigma, t5, added=extra)
        pipeline_x0 = x + sigma[:, None, None, None] * expected
    print(f"HiDream transformer max |difference|: raw {raw:.3g}, x0 {max_diff(x0, pipeline_x0):.3g}")
    assert raw <= 1e-6
    assert max_diff(x0, pipeline_x0) <= 1e-5


def test_non_square_and_odd_latents_are_patched_as_comfyui_does(files):
    """No padding to 64×64 patches (diffusers' own non-square path): a latent's tokens are its own patches."""
    model, _ = files.load()
    generator = torch.Generator().manual_seed(4)
    context = torch.randn(1, 5, T5_WIDTH, generator=generator)
    extra = {"llama3": torch.randn(1, LLAMA_LAYERS, 4, LLAMA_WIDTH, generator=generator),
             "pooled_embeds": torch.randn(1, 96, generator=generator)}
    odd = torch.randn(1, 16, 5, 7, generator=generator)
    t = torch.tensor([600.0])
    with torch.no_grad():
        out = dit_hidream.forward(model.unet, odd, t, context, extra, {})
        padded = dit_hidream.forward(model.unet, torch.nn.functional.pad(odd, (0, 1, 0, 1), mode="circular"), t,
                                     context, extra, {})
        # A square latent through diffusers' own patching gives the same as ours.
        square = torch.randn(1, 16, 6, 6, generator=generator)
        ours = dit_hidream.forward(model.unet, square, t, context, extra, {})
        theirs = files.transformer(square, t, context, dit_hidream.llama_per_block(extra["llama3"], 3),
                                   extra["pooled_embeds"], return_dict=False)[0]
    assert out.shape == odd.shape and torch.allclose(out, padded[..., :5, :7], atol=1e-6)
    assert max_diff(ours, -theirs) <= 1e-6


def test_sampling_without_llama_states_is_a_clear_error():
    with pytest.raises(dit_hidream.MissingLlamaStates, match="QuadrupleCLIPLoader"):
        dit_hidream.conditioning({"pooled_output": torch.zeros(1, 2048)}, torch.Size([1, 16, 8, 8]),
                                 torch.device("cpu"))


# Text encoding ---------------------------------------------------------------------------------------------------

def _compare_with_encode_prompt(files, conditioning, prompts):
    cond, options = _single(conditioning)
    with torch.no_grad():
        t5, _, llama, _, pooled, _ = files.pipeline().encode_prompt(
            prompt=prompts[0], prompt_2=prompts[1], prompt_3=prompts[2], prompt_4=prompts[3],
            do_classifier_free_guidance=False, max_sequence_length=128)
    ours_llama = options["conditioning_llama3"]
    assert cond.shape == t5.shape == (1, 128, T5_WIDTH)
    assert ours_llama.shape == (1, LLAMA_LAYERS, 128, LLAMA_WIDTH) and llama.shape == (LLAMA_LAYERS, 1, 128,
                                                                                          LLAMA_WIDTH)
    differences = (max_diff(cond, t5), max_diff(ours_llama, llama.movedim(0, 1)), max_diff(options["pooled_output"],
                                                                                           pooled))
    return differences


def test_clip_text_encode_matches_the_pipelines_encode_prompt(files):
    _, clip = files.load()
    assert clip.family == "hidream" and sorted(clip.encoders) == ["g", "l", "llama", "t5xxl"]
    differences = _compare_with_encode_prompt(files, run_node(CLIPTextEncode, files.ctx, text=PROMPT, clip=clip)[0],
                                              [PROMPT] * 4)
    print(f"HiDream text encoding max |difference| (T5, Llama, pooled): {differences}")
    assert max(differences) <= 1e-5


def test_clip_text_encode_hidream_gives_each_encoder_its_prompt(files):
    _, clip = files.load()
    prompts = ["a red cat", "a cat on the table", "a photo of a cat", "a cat in the garden"]
    conditioning = run_node(CLIPTextEncodeHiDream, files.ctx, clip=clip, clip_l=prompts[0], clip_g=prompts[1],
                            t5xxl=prompts[2], llama=prompts[3])[0]
    differences = _compare_with_encode_prompt(files, conditioning, prompts)
    assert max(differences) <= 1e-5
    same = _single(run_node(CLIPTextEncode, files.ctx, text=prompts[0], clip=clip)[0])[1]["pooled_output"]
    assert max_diff(_single(conditioning)[1]["pooled_output"], same) > 1e-3  # CLIP-G read its own prompt


def test_llama_tokens_and_weights(files):
    _, clip = files.load()
    tokens = clip.tokenize("a cat on a mat, in (the garden:1.3)")["llama"]
    reference = tiny_llama_tokenizer()
    ids = [t for t, _ in tokens]
    # BOS, each segment's ids, padded with <|eot_id|> to 128 (ComfyUI's HiDream LLAMA3Tokenizer).
    segments = reference.encode("a cat on a mat, in ", add_special_tokens=False).ids + \
        reference.encode("the garden", add_special_tokens=False).ids
    assert ids == [0] + segments + [1] * (127 - len(segments))
    weighted = [i for i, (_, w) in enumerate(tokens) if w != 1.0]
    assert weighted and all(w == pytest.approx(1.3) for _, w in (tokens[i] for i in weighted))
    cond = clip.encode_tokens({"t5xxl": clip.tokenize("a cat")["t5xxl"], "llama": tokens}).options
    plain = clip.encode_tokens({"t5xxl": clip.tokenize("a cat")["t5xxl"],
                                "llama": [(t, 1.0) for t, _ in tokens]}).options
    empty = torch.tensor([[0] + [1] * (len(tokens) - 1)])
    with torch.no_grad():
        z_empty = torch.stack(files.llama.model(empty, attention_mask=(torch.arange(len(tokens)) < 1).long()[None],
                                                output_hidden_states=True).hidden_states[1:], dim=1)
    z, z_weighted = plain["conditioning_llama3"], cond["conditioning_llama3"]
    expected = (z[:, :, weighted] - z_empty[:, :, weighted]) * 1.3 + z_empty[:, :, weighted]
    assert max_diff(z_weighted[:, :, weighted], expected) <= 1e-5
    assert torch.equal(z_weighted[:, :, :weighted[0]], z[:, :, :weighted[0]])


def test_missing_llama_tokenizer_names_the_folders(files):
    tokenizer_dir = folder(files.ctx.env, "text_encoders") / "llama_tokenizer"
    (tokenizer_dir / "tokenizer.json").unlink()
    (clip,) = run_node(CLIPLoader, files.ctx, clip_name=TEXT_FILES[3], type="hidream")
    assert sorted(clip.encoders) == ["llama"]
    with pytest.raises(TokenizerUnavailable, match="llama_tokenizer") as error:
        run_node(CLIPTextEncode, files.ctx, text=PROMPT, clip=clip)
    assert str(tokenizer_dir) in str(error.value)


def test_missing_encoders_give_comfyuis_zeros(files):
    (clip,) = run_node(CLIPLoader, files.ctx, clip_name=TEXT_FILES[1], type="hidream")
    assert sorted(clip.encoders) == ["g"]
    cond, options = _single(run_node(CLIPTextEncode, files.ctx, text=PROMPT, clip=clip)[0])
    assert torch.equal(cond, torch.zeros(1, 128, 4096))
    assert torch.equal(options["conditioning_llama3"], torch.zeros(1, 32, 1, 4096))
    pooled = options["pooled_output"]
    assert pooled.shape == (1, 768 + CLIP_G_WIDTH) and torch.equal(pooled[:, :768], torch.zeros(1, 768))
    assert pooled[:, 768:].abs().max().item() > 0


def test_scaled_fp8_llama_files_are_dequantized(files):
    """ComfyUI's llama_3.1_8b_instruct_fp8_scaled: fp8 Linear weights, a scale_weight each, a scaled_fp8 marker."""
    state = dict(files.llama.state_dict())
    expected = {}
    for key in [k for k in state if k.startswith("model.layers.") and k.endswith("proj.weight")]:
        scale = state[key].abs().max() / 400
        state[key] = (state[key] / scale).to(torch.float8_e4m3fn)
        state[key[:-len("weight")] + "scale_weight"] = scale.reshape(())
        expected[key[len("model."):]] = state[key].float() * scale
    state["scaled_fp8"] = torch.empty(0, dtype=torch.float8_e4m3fn)
    save_state(state, folder(files.ctx.env, "text_encoders") / "llama_fp8_scaled.safetensors")
    (clip,) = run_node(CLIPLoader, files.ctx, clip_name="llama_fp8_scaled.safetensors", type="hidream")
    loaded = clip.encoders["llama"].state_dict()
    assert expected and all(torch.equal(loaded[key], value) for key, value in expected.items())


def test_all_in_one_checkpoint_loads_the_model_and_vae(tmp_path):
    """ComfyUI's HiDream model config has no text encoders for checkpoints (clip_target None)."""
    ctx = StubContext(make_env(tmp_path, models_dir=tmp_path / "models"))
    state = prefixed(tiny_hidream(8).state_dict(), "model.diffusion_model.")
    state |= prefixed(convert.vae_to_ldm(tiny_vae16(9).state_dict()), "vae.")
    save_state(state, folder(ctx.env, "checkpoints") / "hidream_i1.safetensors")
    model, clip, vae = run_node(CheckpointLoaderSimple, ctx, ckpt_name="hidream_i1.safetensors")
    assert model.family == "hidream" and clip is None and vae is not None


# Sampling against the pipeline -----------------------------------------------------------------------------------

@pytest.mark.parametrize("cfg", [1.0, 3.5])
def test_ksampler_latents_match_the_pipeline(files, cfg):
    model, clip = files.load()
    (model,) = run_node(ModelSamplingSD3, files.ctx, model=model, shift=3.0)
    positive = run_node(CLIPTextEncode, files.ctx, text=PROMPT, clip=clip)[0]
    negative = run_node(CLIPTextEncode, files.ctx, text=NEGATIVE, clip=clip)[0]
    (latent,) = run_node(EmptySD3LatentImage, files.ctx, width=64, height=64, batch_size=1)
    seed = 21
    (out,) = run_node(KSampler, files.ctx, model=model, seed=seed, steps=STEPS, cfg=cfg, sampler_name="euler",
                      scheduler="simple", positive=positive, negative=negative, latent_image=latent, denoise=1.0)
    noise = torch.randn(latent["samples"].shape, generator=torch.manual_seed(seed))
    # The schedule's own sigmas (ComfyUI's 1000-entry flow table, shift 3) handed to an unshifted scheduler.
    sigmas = calculate_sigmas(schedule_for(model.sampling), "simple", STEPS)[:-1].tolist()
    pipe = files.pipeline()
    # The tiny VAE downsamples by 2, not 8, and the pipeline resizes to its default area: make both fit 64×64.
    pipe.vae_scale_factor, pipe.default_sample_size = 8, 8
    with torch.no_grad():
        theirs = pipe(prompt=PROMPT, negative_prompt=NEGATIVE, guidance_scale=cfg, latents=noise, height=64,
                      width=64, sigmas=sigmas, max_sequence_length=128,
                      output_type="latent").images
    difference = max_diff(FLUX_LATENT.process_in(out["samples"]), theirs)
    print(f"HiDream (cfg {cfg}) max |latent difference| vs HiDreamImagePipeline: {difference:.3g}")
    assert difference <= 1e-4


# Workflow ---------------------------------------------------------------------------------------------------------

def test_hidream_workflow_runs_through_the_cli(tmp_path, capsys):
    from latentloom.server.cli import main

    HiDreamFiles(tmp_path, seed=7)
    graph = {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": "hidream_tiny.safetensors",
                                                     "weight_dtype": "default"}},
        "2": {"class_type": "QuadrupleCLIPLoader", "inputs": dict(zip(
            ("clip_name1", "clip_name2", "clip_name3", "clip_name4"), TEXT_FILES, strict=True))},
        "3": {"class_type": "VAELoader", "inputs": {"vae_name": "ae.safetensors"}},
        "4": {"class_type": "ModelSamplingSD3", "inputs": {"model": ["1", 0], "shift": 3.0}},
        "5": {"class_type": "CLIPTextEncodeHiDream", "inputs": {"clip": ["2", 0], "clip_l": PROMPT,
                                                                "clip_g": PROMPT, "t5xxl": PROMPT, "llama": PROMPT}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": NEGATIVE, "clip": ["2", 0]}},
        "7": {"class_type": "EmptySD3LatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "8": {"class_type": "KSampler", "inputs": {
            "model": ["4", 0], "seed": 3, "steps": 2, "cfg": 5.0, "sampler_name": "euler", "scheduler": "simple",
            "positive": ["5", 0], "negative": ["6", 0], "latent_image": ["7", 0], "denoise": 1.0}},
        "9": {"class_type": "VAEDecode", "inputs": {"samples": ["8", 0], "vae": ["3", 0]}},
        "10": {"class_type": "SaveImage", "inputs": {"images": ["9", 0], "filename_prefix": "hidream"}},
    }
    (tmp_path / "graph.json").write_text(json.dumps(graph))
    code = main(["run", str(tmp_path / "graph.json"), "--json", "--models-dir", str(tmp_path / "models"),
                 "--input-dir", str(tmp_path / "input"), "--output-dir", str(tmp_path / "output"),
                 "--temp-dir", str(tmp_path / "temp"), "--custom-nodes", str(tmp_path / "none")])
    summary = json.loads(capsys.readouterr().out)
    assert code == 0 and summary["status"] == "success", summary
    assert len(summary["outputs"]) == 1
