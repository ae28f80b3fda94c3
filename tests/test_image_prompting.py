"""Image prompting nodes (nodes/image_prompting.py): CLIP vision files against transformers' own
CLIPVisionModelWithProjection on tiny random weights (both file layouts), ComfyUI's preprocessing written out,
unCLIP / SDXL Revision conditioning against the noise-augmentation formula, style models against their networks
written out, and the SDXL Revision template from ComfyUI's corpus run end to end on tiny models."""

from __future__ import annotations

import copy
import json
import math
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from adapter_support import save_safetensors  # noqa: E402
from node_context import StubContext, make_env, run_node  # noqa: E402
from PIL import Image  # noqa: E402
from tiny_models import TEXT_WIDTH, checkpoint_state, save_state, tiny_components  # noqa: E402

from latentloom.engine.inputs import InputError  # noqa: E402
from latentloom.nodes.diffusion.clip_vision import (  # noqa: E402
    CLIP_IMAGE_MEAN,
    CLIP_IMAGE_STD,
    clip_preprocess,
    revision_pooled,
)
from latentloom.nodes.diffusion.sampling_conds import prepare_conditioning  # noqa: E402
from latentloom.nodes.diffusion.schedules import schedule_for  # noqa: E402
from latentloom.nodes.image_prompting import (  # noqa: E402
    CLIPVisionEncode,
    CLIPVisionLoader,
    StyleModelApply,
    StyleModelLoader,
    unCLIPCheckpointLoader,
    unCLIPConditioning,
)

VISION_WIDTH = 64
IMAGE_SIZE = 28
TEMPLATE = "sdxl_revision_text_prompts"


# Each test builds tiny diffusers/transformers models and compares with their pipeline: seconds apiece.
pytestmark = pytest.mark.slow


def tiny_vision_model(seed: int = 0, projection_dim: int = TEXT_WIDTH) -> torch.nn.Module:
    """transformers' model with the configuration ComfyUI's rules give these shapes (16 heads, gelu)."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    config = CLIPVisionConfig(hidden_size=VISION_WIDTH, intermediate_size=2 * VISION_WIDTH, num_hidden_layers=3,
                              num_attention_heads=16, image_size=IMAGE_SIZE, patch_size=14,
                              projection_dim=projection_dim, hidden_act="gelu", layer_norm_eps=1e-5)
    torch.manual_seed(seed)
    model = CLIPVisionModelWithProjection(config).eval()
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.05)
    return model


def to_open_clip(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """transformers vision names → OpenCLIP's visual tower names (the layout ComfyUI converts)."""
    renames = {"vision_model.embeddings.class_embedding": "class_embedding",
               "vision_model.embeddings.patch_embedding.weight": "conv1.weight",
               "vision_model.embeddings.position_embedding.weight": "positional_embedding",
               "vision_model.pre_layrnorm.weight": "ln_pre.weight", "vision_model.pre_layrnorm.bias": "ln_pre.bias",
               "vision_model.post_layernorm.weight": "ln_post.weight",
               "vision_model.post_layernorm.bias": "ln_post.bias"}
    out = {prefix + new: state[old] for old, new in renames.items()}
    out[prefix + "proj"] = state["visual_projection.weight"].t().contiguous()
    layer = 0
    while f"vision_model.encoder.layers.{layer}.layer_norm1.weight" in state:
        src, dst = f"vision_model.encoder.layers.{layer}.", f"{prefix}transformer.resblocks.{layer}."
        for kind in ("weight", "bias"):
            out[f"{dst}attn.in_proj_{kind}"] = torch.cat([state[f"{src}self_attn.{p}_proj.{kind}"]
                                                          for p in ("q", "k", "v")])
            out[f"{dst}attn.out_proj.{kind}"] = state[f"{src}self_attn.out_proj.{kind}"]
            out[f"{dst}ln_1.{kind}"] = state[f"{src}layer_norm1.{kind}"]
            out[f"{dst}ln_2.{kind}"] = state[f"{src}layer_norm2.{kind}"]
            out[f"{dst}mlp.c_fc.{kind}"] = state[f"{src}mlp.fc1.{kind}"]
            out[f"{dst}mlp.c_proj.{kind}"] = state[f"{src}mlp.fc2.{kind}"]
        layer += 1
    return out


def reference_pixels(image: torch.Tensor) -> torch.Tensor:
    """ComfyUI's preprocessing of an image already at the model's size: 8-bit rounding, CLIP mean/std."""
    mean = torch.tensor(CLIP_IMAGE_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_IMAGE_STD).view(1, 3, 1, 1)
    return (torch.round(image.movedim(-1, 1).clamp(0, 1) * 255) / 255 - mean) / std


def random_image(height: int, width: int, seed: int, batch: int = 1) -> torch.Tensor:
    return torch.rand((batch, height, width, 3), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def vision_reference():
    return tiny_vision_model(0)


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory, vision_reference) -> Path:
    root = tmp_path_factory.mktemp("image_prompting_models")
    state = {k: v for k, v in vision_reference.state_dict().items() if not k.endswith("position_ids")}
    save_safetensors(state, root / "clip_vision" / "tiny_hf.safetensors")
    save_safetensors(to_open_clip(state, "visual."), root / "clip_vision" / "tiny_open_clip.safetensors")
    save_safetensors({"something.else": torch.zeros(3)}, root / "clip_vision" / "not_vision.safetensors")
    sdxl = checkpoint_state(tiny_components("sdxl", 0))
    save_state(sdxl, root / "checkpoints" / "sdxl.safetensors")
    save_state(checkpoint_state(tiny_components("sd1", 0)), root / "checkpoints" / "sd1.safetensors")
    save_state({**sdxl, **to_open_clip(state, "embedder.model.visual.")},
               root / "checkpoints" / "sdxl_with_vision.safetensors")
    return root


@pytest.fixture
def ctx(models_dir) -> StubContext:
    return StubContext(make_env(models_dir=models_dir))


# --- CLIP vision ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["tiny_hf.safetensors", "tiny_open_clip.safetensors"])
def test_clip_vision_encode_equals_transformers_forward(ctx, vision_reference, name):
    (vision,) = run_node(CLIPVisionLoader, ctx, clip_name=name)
    image = random_image(IMAGE_SIZE, IMAGE_SIZE, seed=3, batch=2)
    (output,) = run_node(CLIPVisionEncode, ctx, clip_vision=vision, image=image, crop="center")
    with torch.no_grad():
        expected = vision_reference(pixel_values=reference_pixels(image), output_hidden_states=True)
    torch.testing.assert_close(output.image_embeds, expected.image_embeds)
    torch.testing.assert_close(output["last_hidden_state"], expected.last_hidden_state)
    torch.testing.assert_close(output.penultimate_hidden_states, expected.hidden_states[-2])
    assert output.image_embeds.shape == (2, TEXT_WIDTH) and output.mm_projected is None


def test_preprocess_center_crop_cuts_the_middle_and_none_stretches():
    wide = random_image(IMAGE_SIZE, 2 * IMAGE_SIZE, seed=4)  # the short side is already the model's size
    cropped = clip_preprocess(wide, IMAGE_SIZE, crop=True)
    torch.testing.assert_close(cropped, reference_pixels(wide[:, :, IMAGE_SIZE // 2: IMAGE_SIZE // 2 + IMAGE_SIZE]))
    stretched = clip_preprocess(wide, IMAGE_SIZE, crop=False)
    resized = torch.nn.functional.interpolate(wide.movedim(-1, 1), size=(IMAGE_SIZE, IMAGE_SIZE), mode="bicubic",
                                              antialias=True).movedim(1, -1)
    torch.testing.assert_close(stretched, reference_pixels(resized))
    assert not torch.allclose(cropped, stretched)
    small = random_image(14, 21, seed=5)  # scaled up by 2 (short side 14 → 28), then 42 wide cropped to 28
    assert clip_preprocess(small, IMAGE_SIZE, crop=True).shape == (1, 3, IMAGE_SIZE, IMAGE_SIZE)


def test_encode_ignores_alpha_and_uses_the_crop_option(ctx):
    (vision,) = run_node(CLIPVisionLoader, ctx, clip_name="tiny_hf.safetensors")
    image = random_image(IMAGE_SIZE, 2 * IMAGE_SIZE, seed=6)
    rgba = torch.cat([image, torch.zeros_like(image[..., :1])], dim=-1)
    (center,) = run_node(CLIPVisionEncode, ctx, clip_vision=vision, image=rgba, crop="center")
    (same,) = run_node(CLIPVisionEncode, ctx, clip_vision=vision, image=image, crop="center")
    (stretched,) = run_node(CLIPVisionEncode, ctx, clip_vision=vision, image=image, crop="none")
    torch.testing.assert_close(center.image_embeds, same.image_embeds)
    assert not torch.allclose(center.image_embeds, stretched.image_embeds)


def test_clip_vision_loader_errors_name_the_input(ctx):
    with pytest.raises(InputError, match=r"CLIPVisionLoader .*input 'clip_name'.*not a CLIP vision model"):
        run_node(CLIPVisionLoader, ctx, clip_name="not_vision.safetensors")
    with pytest.raises(InputError, match="clip_name"):
        run_node(CLIPVisionLoader, ctx, clip_name="missing.safetensors")


def test_unclip_checkpoint_loader_returns_the_embedded_vision_tower(ctx, vision_reference):
    model, clip, vae, vision = run_node(unCLIPCheckpointLoader, ctx, ckpt_name="sdxl_with_vision.safetensors")
    assert model.family == "sdxl" and clip is not None and vae is not None
    image = random_image(IMAGE_SIZE, IMAGE_SIZE, seed=7)
    with torch.no_grad():
        expected = vision_reference(pixel_values=reference_pixels(image)).image_embeds
    torch.testing.assert_close(vision.encode_image(image).image_embeds, expected)
    outputs = run_node(unCLIPCheckpointLoader, ctx, ckpt_name="sdxl.safetensors")
    assert outputs[3] is None and any("no CLIP vision" in w for w in ctx.warnings)


# --- unCLIP conditioning / SDXL Revision ------------------------------------------------------------------------

def squaredcos_alphas_cumprod() -> np.ndarray:
    alpha_bar = [math.cos((t / 1000 + 0.008) / 1.008 * math.pi / 2) ** 2 for t in range(1001)]
    betas = np.minimum(1 - np.array(alpha_bar[1:]) / np.array(alpha_bar[:-1]), 0.999)
    return np.cumprod(1 - betas)


def vision_output(embeds: torch.Tensor) -> dict:
    return {"image_embeds": embeds, "last_hidden_state": torch.zeros(embeds.shape[0], 5, VISION_WIDTH)}


def test_unclip_conditioning_appends_entries_without_touching_its_input():
    text = [[torch.ones(1, 77, 64), {"pooled_output": torch.ones(1, TEXT_WIDTH)}]]
    first_output, second_output = vision_output(torch.ones(1, TEXT_WIDTH)), vision_output(torch.zeros(1, TEXT_WIDTH))
    (once,) = run_node(unCLIPConditioning, conditioning=text, clip_vision_output=first_output, strength=0.75,
                       noise_augmentation=0.1)
    (twice,) = run_node(unCLIPConditioning, conditioning=once, clip_vision_output=second_output, strength=0.5,
                        noise_augmentation=0.0)
    assert "unclip_conditioning" not in text[0][1] and len(once[0][1]["unclip_conditioning"]) == 1
    assert [e["strength"] for e in twice[0][1]["unclip_conditioning"]] == [0.75, 0.5]
    assert twice[0][1]["unclip_conditioning"][1]["clip_vision_output"] is second_output
    assert twice[0][0] is text[0][0]
    (unchanged,) = run_node(unCLIPConditioning, conditioning=text, clip_vision_output=first_output, strength=0.0,
                            noise_augmentation=0.0)
    assert unchanged is text


@pytest.mark.parametrize(("augmentation", "strength"), [(0.0, 1.0), (0.5, 0.75), (1.0, -2.0)])
def test_revision_pooled_is_the_noise_augmented_image_embedding(augmentation, strength):
    embeds = torch.randn((1, TEXT_WIDTH), generator=torch.Generator().manual_seed(8))
    seed = 1234
    entries = [{"clip_vision_output": vision_output(embeds), "strength": strength,
                "noise_augmentation": augmentation}]
    pooled = revision_pooled(entries, seed, TEXT_WIDTH, torch.device("cpu"))
    level = round(999 * augmentation)
    alpha = float(squaredcos_alphas_cumprod()[level])
    noise = torch.randn((1, TEXT_WIDTH), generator=torch.manual_seed(seed - 10))
    expected = (math.sqrt(alpha) * embeds + math.sqrt(1 - alpha) * noise) * strength
    torch.testing.assert_close(pooled, expected)


def test_revision_pooled_rejects_embeds_of_another_width():
    entries = [{"clip_vision_output": vision_output(torch.ones(1, 16)), "strength": 1.0, "noise_augmentation": 0.0}]
    with pytest.raises(ValueError, match="width 16.*pooled conditioning has width 32"):
        revision_pooled(entries, 0, TEXT_WIDTH, torch.device("cpu"))


def test_sdxl_sampling_uses_the_image_embedding_as_pooled_output():
    unet = tiny_components("sdxl", 0).unet
    text_pooled = torch.full((1, TEXT_WIDTH), 5.0)
    entry = {"clip_vision_output": vision_output(torch.randn((1, TEXT_WIDTH), generator=torch.manual_seed(9))),
             "strength": 1.0, "noise_augmentation": 0.2}
    conds = {"positive": [[torch.zeros(1, 77, 2 * TEXT_WIDTH), {"pooled_output": text_pooled,
                                                               "unclip_conditioning": [entry]}]],
             "negative": [[torch.zeros(1, 77, 2 * TEXT_WIDTH), {"pooled_output": text_pooled}]]}
    schedule = schedule_for(tiny_models_sampling())
    prepared = prepare_conditioning(conds, torch.Size((1, 4, 8, 8)), schedule, torch.device("cpu"), unet.config,
                                    "sdxl", seed=77)
    expected = revision_pooled([entry], 77, TEXT_WIDTH, torch.device("cpu"))
    torch.testing.assert_close(prepared["positive"][0].added["text_embeds"], expected)
    torch.testing.assert_close(prepared["negative"][0].added["text_embeds"], text_pooled)


def tiny_models_sampling():
    from latentloom.nodes.diffusion.models import SamplingConfig

    return SamplingConfig(prediction="eps")


# --- style models -----------------------------------------------------------------------------------------------

def style_adapter_state(width: int, context: int, layers: int, tokens: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape: int, scale: float = 0.1) -> torch.Tensor:
        return torch.randn(shape, generator=g) * scale

    state = {"style_embedding": rnd(1, tokens, width, scale=1.0), "proj": rnd(width, context),
             "ln_pre.weight": 1 + rnd(width), "ln_pre.bias": rnd(width),
             "ln_post.weight": 1 + rnd(width), "ln_post.bias": rnd(width)}
    for i in range(layers):
        p = f"transformer_layes.{i}."
        state.update({p + "attn.in_proj_weight": rnd(3 * width, width), p + "attn.in_proj_bias": rnd(3 * width),
                      p + "attn.out_proj.weight": rnd(width, width), p + "attn.out_proj.bias": rnd(width),
                      p + "ln_1.weight": 1 + rnd(width), p + "ln_1.bias": rnd(width),
                      p + "ln_2.weight": 1 + rnd(width), p + "ln_2.bias": rnd(width),
                      p + "mlp.c_fc.weight": rnd(4 * width, width), p + "mlp.c_fc.bias": rnd(4 * width),
                      p + "mlp.c_proj.weight": rnd(width, 4 * width), p + "mlp.c_proj.bias": rnd(width)})
    return state


def style_adapter_reference(state: dict, x: torch.Tensor, layers: int, heads: int = 8) -> torch.Tensor:
    """The T2I-Adapter style network written out: pre-norm attention blocks over [vision tokens, style tokens]."""
    def norm(t, name):
        return torch.nn.functional.layer_norm(t, t.shape[-1:], state[name + ".weight"], state[name + ".bias"])

    tokens = state["style_embedding"].shape[1]
    h = norm(torch.cat([x, state["style_embedding"].expand(x.shape[0], -1, -1)], dim=1), "ln_pre")
    width = h.shape[-1]
    for i in range(layers):
        p = f"transformer_layes.{i}."
        y = norm(h, p + "ln_1")
        q, k, v = (y @ state[p + "attn.in_proj_weight"].t() + state[p + "attn.in_proj_bias"]).chunk(3, dim=-1)
        split = [t.reshape(t.shape[0], t.shape[1], heads, width // heads).transpose(1, 2) for t in (q, k, v)]
        weights = torch.softmax(split[0] @ split[1].transpose(-1, -2) / math.sqrt(width // heads), dim=-1)
        attended = (weights @ split[2]).transpose(1, 2).reshape(h.shape)
        h = h + attended @ state[p + "attn.out_proj.weight"].t() + state[p + "attn.out_proj.bias"]
        y = norm(h, p + "ln_2") @ state[p + "mlp.c_fc.weight"].t() + state[p + "mlp.c_fc.bias"]
        h = h + (y * torch.sigmoid(1.702 * y)) @ state[p + "mlp.c_proj.weight"].t() + state[p + "mlp.c_proj.bias"]
    return norm(h[:, -tokens:], "ln_post") @ state["proj"]


@pytest.fixture(scope="module")
def style_files(models_dir) -> dict[str, dict]:
    adapter = style_adapter_state(VISION_WIDTH, TEXT_WIDTH, layers=2, tokens=4, seed=10)
    g = torch.Generator().manual_seed(11)
    redux = {"redux_up.weight": torch.randn((3 * TEXT_WIDTH, VISION_WIDTH), generator=g) * 0.1,
             "redux_up.bias": torch.randn(3 * TEXT_WIDTH, generator=g) * 0.1,
             "redux_down.weight": torch.randn((TEXT_WIDTH, 3 * TEXT_WIDTH), generator=g) * 0.1,
             "redux_down.bias": torch.randn(TEXT_WIDTH, generator=g) * 0.1}
    save_safetensors(adapter, models_dir / "style_models" / "style.safetensors")
    save_safetensors(redux, models_dir / "style_models" / "redux.safetensors")
    save_safetensors({"unrelated": torch.ones(2)}, models_dir / "style_models" / "bad.safetensors")
    return {"adapter": adapter, "redux": redux}


def test_style_adapter_apply_multiply_appends_scaled_style_tokens(ctx, style_files):
    (style,) = run_node(StyleModelLoader, ctx, style_model_name="style.safetensors")
    hidden = torch.randn((2, 5, VISION_WIDTH), generator=torch.Generator().manual_seed(12))
    output = {"last_hidden_state": hidden, "image_embeds": torch.zeros(2, TEXT_WIDTH)}
    text = torch.randn((1, 77, TEXT_WIDTH), generator=torch.Generator().manual_seed(13))
    conditioning = [[text, {"pooled_output": torch.ones(1, TEXT_WIDTH)}]]
    (result,) = run_node(StyleModelApply, ctx, conditioning=conditioning, style_model=style,
                         clip_vision_output=output, strength=0.6, strength_type="multiply")
    expected_tokens = style_adapter_reference(style_files["adapter"], hidden, layers=2).reshape(1, 8, TEXT_WIDTH)
    cond, options = result[0]
    assert cond.shape == (1, 77 + 8, TEXT_WIDTH) and "attention_mask" not in options
    torch.testing.assert_close(cond[:, :77], text)
    torch.testing.assert_close(cond[:, 77:], expected_tokens * 0.6, atol=1e-5, rtol=1e-4)
    assert conditioning[0][0] is text and len(conditioning[0][1]) == 1


def test_style_apply_attn_bias_builds_comfyui_attention_mask(ctx, style_files):
    (style,) = run_node(StyleModelLoader, ctx, style_model_name="redux.safetensors")
    hidden = torch.randn((1, 5, VISION_WIDTH), generator=torch.Generator().manual_seed(14))
    output = {"last_hidden_state": hidden, "image_embeds": torch.zeros(1, TEXT_WIDTH)}
    text = torch.zeros((1, 10, TEXT_WIDTH))
    (result,) = run_node(StyleModelApply, ctx, conditioning=[[text, {}]], style_model=style,
                         clip_vision_output=output, strength=0.5, strength_type="attn_bias")
    redux = style_files["redux"]
    up = torch.nn.functional.silu(hidden @ redux["redux_up.weight"].t() + redux["redux_up.bias"])
    expected = up @ redux["redux_down.weight"].t() + redux["redux_down.bias"]
    cond, options = result[0]
    torch.testing.assert_close(cond[:, 10:], expected)  # attn_bias leaves the tokens unscaled
    mask = options["attention_mask"]
    n = 10 + 5 + 1  # text, style tokens, one reference cell
    assert mask.shape == (1, n, n) and options["attention_mask_img_shape"] == (1, 1)
    log_half = torch.log(torch.tensor(0.5)).half()
    assert torch.all(mask[:, :10, 10:15] == log_half) and torch.all(mask[:, 15:, 10:15] == log_half)
    assert torch.all(mask[:, 10:15, :] == 0) and torch.all(mask[:, :, 15:] == 0) and torch.all(mask[:, :10, :10] == 0)
    # A second style on top extends the existing mask (and keeps its bias block).
    (again,) = run_node(StyleModelApply, ctx, conditioning=result, style_model=style, clip_vision_output=output,
                        strength=1.0, strength_type="multiply")
    mask2 = again[0][1]["attention_mask"]
    assert mask2.shape == (1, n + 5, n + 5)
    assert torch.all(mask2[:, :10, 10:15] == log_half) and torch.all(mask2[:, :10, 15:20] == 0)


def test_style_model_errors_name_the_input(ctx, style_files):
    with pytest.raises(InputError, match=r"input 'style_model_name'.*not a style model"):
        run_node(StyleModelLoader, ctx, style_model_name="bad.safetensors")
    (style,) = run_node(StyleModelLoader, ctx, style_model_name="style.safetensors")
    narrow = {"last_hidden_state": torch.zeros(1, 5, 16), "image_embeds": torch.zeros(1, 8)}
    with pytest.raises(InputError, match=r"input 'clip_vision_output'.*width 16"):
        run_node(StyleModelApply, ctx, conditioning=[[torch.zeros(1, 77, TEXT_WIDTH), {}]], style_model=style,
                 clip_vision_output=narrow, strength=1.0, strength_type="multiply")
    output = {"last_hidden_state": torch.zeros(1, 5, VISION_WIDTH), "image_embeds": torch.zeros(1, TEXT_WIDTH)}
    with pytest.raises(InputError, match=r"input 'style_model'.*width 32.*width 48"):
        run_node(StyleModelApply, ctx, conditioning=[[torch.zeros(1, 77, 48), {}]], style_model=style,
                 clip_vision_output=output, strength=1.0, strength_type="multiply")


# --- the SDXL Revision template end to end -----------------------------------------------------------------------

def revision_template() -> dict:
    templates = pytest.importorskip("comfyui_workflow_templates_json")
    path = Path(templates.__file__).resolve().parent / "templates" / f"{TEMPLATE}.json"
    if not path.is_file():
        pytest.skip(f"{TEMPLATE} is not in this template corpus")
    return json.loads(path.read_text(encoding="utf-8"))


def shrunk(document: dict, reference_images: tuple[str, str], strength: float | None = None) -> dict:
    """The template on tiny models: file names, a 64² latent and 3 steps; everything else as published."""
    document = copy.deepcopy(document)
    images = iter(reference_images)
    for node in document["nodes"]:
        values = node.get("widgets_values")
        if node["type"] == "CheckpointLoaderSimple":
            values[0] = "sdxl.safetensors"
        elif node["type"] == "CLIPVisionLoader":
            values[0] = "tiny_hf.safetensors"
        elif node["type"] == "LoadImage":
            values[0] = next(images)
        elif node["type"] == "EmptyLatentImage":
            values[:2] = [64, 64]
        elif node["type"] == "KSampler":
            values[2] = 3
        elif node["type"] == "unCLIPConditioning" and strength is not None:
            values[0] = strength
    return document


def test_revision_template_runs_and_the_reference_images_steer_the_result(models_dir, tmp_path):
    from latentloom.nodes import create_engine

    document = revision_template()
    (tmp_path / "input").mkdir()
    for index in range(3):
        pixels = (np.random.default_rng(index).random((40, 56, 3)) * 255).astype(np.uint8)
        Image.fromarray(pixels).save(tmp_path / "input" / f"ref{index}.png")
    engine = create_engine(models_dir=models_dir, input_dir=tmp_path / "input", output_dir=tmp_path / "output",
                           temp_dir=tmp_path / "temp", entry_points=False)

    def run(images: tuple[str, str], strength: float | None = None) -> np.ndarray:
        prompt = engine.load(shrunk(document, images, strength))
        assert {"CLIPVisionLoader", "CLIPVisionEncode", "unCLIPConditioning"} <= \
            {entry["class_type"] for entry in prompt.values()}
        assert engine.validate(prompt).ok
        result = engine.run(prompt)
        assert result.status == "success", result.error
        (saved,) = [image for ui in result.outputs.values() for image in ui.get("images", [])]
        with Image.open(tmp_path / "output" / saved.get("subfolder", "") / saved["filename"]) as picture:
            return np.asarray(picture.convert("RGB"), dtype=np.float32)

    first = run(("ref0.png", "ref1.png"))
    assert first.shape == (64, 64, 3) and first.std() > 1.0
    np.testing.assert_array_equal(run(("ref0.png", "ref1.png")), first)  # same inputs, same picture
    assert np.abs(run(("ref0.png", "ref2.png")) - first).mean() > 0.5   # another reference image, another picture
    assert np.abs(run(("ref0.png", "ref1.png"), strength=1.5) - first).mean() > 0.5


UNCLIP_IMAGE_WIDTH = 1024  # SD2.1-unCLIP-H: image embeds 1024 + noise-level embedding 1024 = class input 2048


def tiny_unclip_unet(seed: int = 0) -> torch.nn.Module:
    """A tiny UNet shaped like SD2.1-unCLIP-H's: OpenCLIP-H context width (1024), linear projections, and a
    projection class embedding of width 2048 (the shapes ComfyUI tells the variant by)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 32, 64, 64), layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, cross_attention_dim=1024, norm_num_groups=32,
        attention_head_dim=(1, 1, 1, 1), use_linear_projection=True, class_embed_type="projection",
        projection_class_embeddings_input_dim=2 * UNCLIP_IMAGE_WIDTH).eval()
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for parameter in unet.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.02)
    return unet


@pytest.fixture(scope="module")
def unclip_checkpoint(models_dir):
    from latentloom.nodes.diffusion import convert

    unet = tiny_unclip_unet()
    ldm = convert.unet_to_ldm(unet.state_dict(), unet.config.layers_per_block)
    vision = tiny_vision_model(seed=30, projection_dim=UNCLIP_IMAGE_WIDTH)
    vision_state = {k: v for k, v in vision.state_dict().items() if not k.endswith("position_ids")}
    state = {**{convert.UNET_PREFIX + k: v for k, v in ldm.items()},
             **to_open_clip(vision_state, "embedder.model.visual.")}
    save_state(state, models_dir / "checkpoints" / "sd21_unclip_tiny.safetensors")
    return unet, vision


def test_sd21_unclip_checkpoint_loads_as_a_v_model_with_its_vision_tower(ctx, unclip_checkpoint):
    reference_unet, reference_vision = unclip_checkpoint
    model, clip, vae, vision = run_node(unCLIPCheckpointLoader, ctx, ckpt_name="sd21_unclip_tiny.safetensors")
    assert model.family == "sd2" and model.sampling.prediction == "v" and clip is None and vae is None
    assert model.unet.config.class_embed_type == "projection"
    image = random_image(IMAGE_SIZE, IMAGE_SIZE, seed=31)
    with torch.no_grad():
        expected = reference_vision(pixel_values=reference_pixels(image)).image_embeds
    torch.testing.assert_close(vision.encode_image(image).image_embeds, expected)


def test_sd21_unclip_sampling_feeds_the_noise_augmented_embedding_as_class_labels(ctx, unclip_checkpoint):
    from latentloom.nodes.diffusion.denoiser import ModelCall

    reference_unet, _ = unclip_checkpoint
    model = run_node(unCLIPCheckpointLoader, ctx, ckpt_name="sd21_unclip_tiny.safetensors")[0]
    g = torch.Generator().manual_seed(32)
    embeds = torch.randn((2, UNCLIP_IMAGE_WIDTH), generator=g)  # two images: summed, then re-noised at 0.05
    entries = [{"clip_vision_output": vision_output(embeds), "strength": 0.8, "noise_augmentation": 0.3}]
    context = torch.randn((1, 77, 1024), generator=g) * 0.1
    conds = {"positive": [[context, {"unclip_conditioning": entries}]], "negative": [[context, {}]]}
    schedule = schedule_for(model.sampling)
    prepared = prepare_conditioning(conds, torch.Size((1, 4, 8, 8)), schedule, torch.device("cpu"),
                                    model.unet.config, model.family, seed=50)
    labels = prepared["positive"][0].added["class_labels"]
    torch.testing.assert_close(prepared["negative"][0].added["class_labels"], torch.zeros(1, 2048))

    # The formula written out: each image noised to level round(999·0.3) with noise from seed − 10, its level
    # embedding appended, weighted; the sum's image part noised again at round(999·0.05) (our seeded draw).
    alphas = squaredcos_alphas_cumprod()

    def augment(x, level, noise):
        half = UNCLIP_IMAGE_WIDTH // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
        level_embedding = torch.cat([torch.cos(level * freqs), torch.sin(level * freqs)]).unsqueeze(0)
        noised = math.sqrt(alphas[level]) * x + math.sqrt(1 - alphas[level]) * noise
        return torch.cat([noised, level_embedding], dim=1)

    noise = torch.randn((1, UNCLIP_IMAGE_WIDTH), generator=torch.manual_seed(40))
    summed = sum(augment(row.unsqueeze(0), 300, noise) * 0.8 for row in embeds)
    merge_noise = torch.randn((1, UNCLIP_IMAGE_WIDTH), generator=torch.manual_seed(41))
    expected = augment(summed[:, :UNCLIP_IMAGE_WIDTH], 50, merge_noise)
    torch.testing.assert_close(labels, expected, atol=1e-5, rtol=1e-5)

    # The UNet gets them as its class labels.
    x = torch.randn((1, 4, 8, 8), generator=g)
    sigma = torch.tensor([2.0])
    call = ModelCall(model, model.unet, schedule)
    ours = call(x, sigma, context, added={"class_labels": labels})
    with torch.no_grad():
        x_in = x / math.sqrt(2.0 ** 2 + 1)
        v = reference_unet(x_in, schedule.timestep(sigma), context, class_labels=labels).sample
    expected_denoised = x / (2.0 ** 2 + 1) - v * 2.0 / math.sqrt(2.0 ** 2 + 1)
    torch.testing.assert_close(ours, expected_denoised, atol=1e-4, rtol=1e-4)
    other = call(x, sigma, context, added={"class_labels": torch.zeros_like(labels)})
    assert not torch.allclose(ours, other, atol=1e-4)


# --- PhotoMaker -------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def photomaker_file(models_dir, vision_reference) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(20)
    width = 2 * TEXT_WIDTH  # the tiny SDXL conditioning: CLIP-L 32 + CLIP-G 32

    def rnd(*shape: int, scale: float = 0.1) -> torch.Tensor:
        return torch.randn(shape, generator=g) * scale

    head = {"visual_projection_2.weight": rnd(width - TEXT_WIDTH, VISION_WIDTH),
            "fuse_module.layer_norm.weight": 1 + rnd(width), "fuse_module.layer_norm.bias": rnd(width)}
    for name, in_dim in (("mlp1", 2 * width), ("mlp2", width)):
        p = f"fuse_module.{name}."
        head.update({p + "layernorm.weight": 1 + rnd(in_dim), p + "layernorm.bias": rnd(in_dim),
                     p + "fc1.weight": rnd(width, in_dim), p + "fc1.bias": rnd(width),
                     p + "fc2.weight": rnd(width, width), p + "fc2.bias": rnd(width)})
    vision = {k: v for k, v in vision_reference.state_dict().items() if not k.endswith("position_ids")}
    (models_dir / "photomaker").mkdir(exist_ok=True)
    # The published layout: a .bin whose id_encoder part is the ID encoder (the LoRA part is not used here).
    torch.save({"id_encoder": {**vision, **head}, "lora_weights": {"x.lora_up.weight": torch.zeros(2, 2)}},
               models_dir / "photomaker" / "photomaker-tiny.bin")
    return head


def fused_reference(head: dict, vision_reference, image: torch.Tensor, word: torch.Tensor) -> torch.Tensor:
    """PhotoMaker's fuse written out: [word, id] → MLP1 (+ word) → MLP2 (+ residual) → layer norm."""
    def layer_norm(x, name):
        return torch.nn.functional.layer_norm(x, x.shape[-1:], head[name + ".weight"], head[name + ".bias"])

    def mlp(x, name, residual):
        y = layer_norm(x, name + ".layernorm") @ head[name + ".fc1.weight"].t() + head[name + ".fc1.bias"]
        y = torch.nn.functional.gelu(y) @ head[name + ".fc2.weight"].t() + head[name + ".fc2.bias"]
        return y + x if residual else y

    with torch.no_grad():
        pooled = vision_reference.vision_model(pixel_values=reference_pixels(image)).pooler_output
        identity = torch.cat([vision_reference.visual_projection(pooled),
                              pooled @ head["visual_projection_2.weight"].t()], dim=-1)
    fused = mlp(torch.cat([word, identity], dim=-1), "fuse_module.mlp1", False) + word
    return layer_norm(mlp(fused, "fuse_module.mlp2", True), "fuse_module.layer_norm")


def test_photomaker_fuses_the_first_image_into_the_class_word(ctx, photomaker_file, vision_reference):
    from adapter_support import tiny_objects

    from latentloom.nodes.image_prompting import PhotoMakerEncode, PhotoMakerLoader

    _, clip = tiny_objects("sdxl", 0)
    (photomaker,) = run_node(PhotoMakerLoader, ctx, photomaker_model_name="photomaker-tiny.bin")
    images = random_image(IMAGE_SIZE, IMAGE_SIZE, seed=21, batch=2)
    text = "a photo of a man photomaker"  # the trigger is word 6: token 5 (BOS, a, photo, of, a, man) is fused
    (conditioning,) = run_node(PhotoMakerEncode, ctx, photomaker=photomaker, image=images, clip=clip, text=text)
    cond, options = conditioning[0]
    plain, pooled = clip.encode(text)  # a plain prompt is one token group: ComfyUI 0.3.64 drops no token
    torch.testing.assert_close(options["pooled_output"], pooled)
    expected = plain.clone()
    expected[0, 5] = fused_reference(photomaker_file, vision_reference, images[:1], plain[0, 5:6])[0]
    torch.testing.assert_close(cond, expected, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(cond[0, 5], plain[0, 5])
    (without,) = run_node(PhotoMakerEncode, ctx, photomaker=photomaker, image=images, clip=clip,
                          text="a photo of a man")
    torch.testing.assert_close(without[0][0], clip.encode("a photo of a man")[0])


def test_photomaker_drops_the_token_group_numbered_like_the_trigger(ctx, photomaker_file):
    from adapter_support import tiny_objects

    from latentloom.nodes.image_prompting import PhotoMakerEncode, PhotoMakerLoader

    _, clip = tiny_objects("sdxl", 0)
    (photomaker,) = run_node(PhotoMakerLoader, ctx, photomaker_model_name="photomaker-tiny.bin")
    image = random_image(IMAGE_SIZE, IMAGE_SIZE, seed=22)
    # Word 1 is the trigger; the first token group (the unweighted "photomaker " segment) is dropped and the start
    # token (position 0) is fused.
    (conditioning,) = run_node(PhotoMakerEncode, ctx, photomaker=photomaker, image=image, clip=clip,
                               text="photomaker (a man:1.2)")
    cond = conditioning[0][0]
    plain = clip.encode("(a man:1.2)")[0]
    torch.testing.assert_close(cond[:, 1:], plain[:, 1:])
    assert not torch.allclose(cond[:, 0], plain[:, 0])
    wrong_clip = tiny_objects("sd1", 0)[1]
    with pytest.raises(InputError, match=r"input 'clip'.*width 32.*fuses width 64"):
        run_node(PhotoMakerEncode, ctx, photomaker=photomaker, image=image, clip=wrong_clip, text="a photomaker")


def saved_pixels(result, output_dir: Path) -> np.ndarray:
    (saved,) = [image for ui in result.outputs.values() for image in ui.get("images", [])]
    with Image.open(output_dir / saved.get("subfolder", "") / saved["filename"]) as picture:
        return np.asarray(picture.convert("RGB"), dtype=np.float32)


def test_style_model_graph_runs_on_sd1_and_the_style_tokens_steer_the_result(models_dir, style_files, tmp_path):
    """CLIPVisionLoader → CLIPVisionEncode → StyleModelApply → KSampler on a tiny SD1 checkpoint (positive 77 + 8
    tokens against a 77-token negative)."""
    from latentloom.nodes import create_engine

    (tmp_path / "input").mkdir()
    for index in range(2):
        pixels = (np.random.default_rng(10 + index).random((32, 32, 3)) * 255).astype(np.uint8)
        Image.fromarray(pixels).save(tmp_path / "input" / f"style{index}.png")
    engine = create_engine(models_dir=models_dir, input_dir=tmp_path / "input", output_dir=tmp_path / "output",
                           temp_dir=tmp_path / "temp", entry_points=False)

    def run(image: str, strength: float) -> np.ndarray:
        prompt = {
            "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd1.safetensors"}},
            "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "a house", "clip": ["1", 1]}},
            "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["1", 1]}},
            "4": {"class_type": "CLIPVisionLoader", "inputs": {"clip_name": "tiny_hf.safetensors"}},
            "5": {"class_type": "LoadImage", "inputs": {"image": image}},
            "6": {"class_type": "CLIPVisionEncode", "inputs": {"clip_vision": ["4", 0], "image": ["5", 0],
                                                              "crop": "center"}},
            "7": {"class_type": "StyleModelLoader", "inputs": {"style_model_name": "style.safetensors"}},
            "8": {"class_type": "StyleModelApply", "inputs": {
                "conditioning": ["2", 0], "style_model": ["7", 0], "clip_vision_output": ["6", 0],
                "strength": strength, "strength_type": "multiply"}},
            "9": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
            "10": {"class_type": "KSampler", "inputs": {
                "seed": 3, "steps": 2, "cfg": 5.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0,
                "model": ["1", 0], "positive": ["8", 0], "negative": ["3", 0], "latent_image": ["9", 0]}},
            "11": {"class_type": "VAEDecode", "inputs": {"samples": ["10", 0], "vae": ["1", 2]}},
            "12": {"class_type": "SaveImage", "inputs": {"images": ["11", 0], "filename_prefix": "style"}},
        }
        result = engine.run(prompt)
        assert result.status == "success", result.error
        return saved_pixels(result, tmp_path / "output")

    first = run("style0.png", 1.0)
    assert first.shape == (64, 64, 3) and first.std() > 1.0
    np.testing.assert_array_equal(run("style0.png", 1.0), first)
    assert np.abs(run("style1.png", 1.0) - first).mean() > 0.5
    assert np.abs(run("style0.png", 3.0) - first).mean() > 0.5
