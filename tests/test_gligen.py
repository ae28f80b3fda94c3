"""GLIGEN (nodes/gligen.py, nodes/diffusion/gligen.py): ComfyUI's file layout read into diffusers' GLIGEN modules,
one denoising call against diffusers' own gated UNet, the text-box node, and the editor-format workflow end to end.

Reference: diffusers' UNet2DConditionModel(attention_type="gated") called with cross_attention_kwargs["gligen"] =
{boxes, positive_embeddings, masks}, which is what StableDiffusionGLIGENPipeline does at each step. Where ComfyUI's
numerics differ from that pipeline (and this engine follows ComfyUI): the pipeline stops running the gated blocks
after gligen_scheduled_sampling_beta (0.3) of the steps and gives the negative prompt zero masks, while ComfyUI
runs them at every step and gives the negative prompt the positive's boxes (apply_empty_x_to_equal_area). The
reference calls below therefore pass the same boxes to both halves, at every call.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from adapter_support import save_safetensors, tiny_objects  # noqa: E402
from node_context import StubContext, make_env, run_node  # noqa: E402

from latentloom.engine.inputs import InputError  # noqa: E402
from latentloom.nodes.diffusion import convert  # noqa: E402
from latentloom.nodes.diffusion.denoiser import GuidedDenoiser, ModelCall  # noqa: E402
from latentloom.nodes.diffusion.gligen import Gligen, GligenNetwork  # noqa: E402
from latentloom.nodes.diffusion.models import DiffusionModel, SamplingConfig  # noqa: E402
from latentloom.nodes.diffusion.sampling_conds import prepare_conditioning  # noqa: E402
from latentloom.nodes.diffusion.schedules import DiscreteSchedule  # noqa: E402
from latentloom.nodes.gligen import GLIGENLoader, GLIGENTextBoxApply  # noqa: E402

# The classic GLIGEN workflow (no GLIGEN template in the template corpus): the editor file and its API prompt
# (written by hand). In a folder of its own: tests/test_workflow_convert.py's catalogue has no GLIGEN nodes.
FIXTURES = Path(__file__).parent / "workflow_fixtures" / "gligen"
FIXTURE = FIXTURES / "gligen.ui.json"
REFERENCE = Path(__file__).parent / "data" / "comfyui-0.3.64-nodes.json"
TEXT_WIDTH = 32

# A small gated UNet: 64-wide heads at most (one head per block here), as ComfyUI picks them for a GLIGEN whose
# grounding tokens are not 768 wide, so diffusers' fusers and the loaded ones split heads the same way.
SMALL_GATED = dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
                   down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                   up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=TEXT_WIDTH,
                   norm_num_groups=32, attention_head_dim=(1, 1))


# Each test builds tiny diffusers/transformers models and compares with their pipeline: seconds apiece.
pytestmark = pytest.mark.slow


def gated_unet(config: dict, seed: int = 0) -> torch.nn.Module:
    """A diffusers gated UNet with every weight perturbed and the gates open (GLIGEN starts with tanh(0) = 0)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**{**config, "attention_type": "gated"}).eval().requires_grad_(False)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, parameter in unet.named_parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.05)
            if name.endswith(("alpha_attn", "alpha_dense")):
                parameter.fill_(0.6 if name.endswith("alpha_attn") else -0.45)
    return unet


def gligen_file_state(unet: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The gated UNet's GLIGEN weights in ComfyUI's file layout: LDM block names for the fusers (diffusers
    down_blocks.0.attentions.0.transformer_blocks.0.fuser.* -> input_blocks.1.1.transformer_blocks.0.fuser.*),
    position_net.* as it is."""
    state = unet.state_dict()
    fusers = {k: v for k, v in state.items() if ".fuser." in k}
    out = convert.unet_to_ldm(fusers, unet.config.layers_per_block)
    out.update({k: v for k, v in state.items() if k.startswith("position_net.")})
    return out


def plain_unet(gated: torch.nn.Module, config: dict) -> torch.nn.Module:
    """The same UNet without its GLIGEN parts: what a checkpoint loader gives."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel(**config).eval().requires_grad_(False)
    base = {k: v for k, v in gated.state_dict().items() if ".fuser." not in k and not k.startswith("position_net.")}
    unet.load_state_dict(base, strict=True)
    return unet


@pytest.fixture(scope="module")
def small():
    unet = gated_unet(SMALL_GATED)
    return unet, plain_unet(unet, SMALL_GATED)


@pytest.fixture
def env(tmp_path):
    return make_env(models_dir=tmp_path / "models")


def write_gligen(env, name: str, state: dict[str, torch.Tensor]) -> str:
    save_safetensors(state, env.model_dirs["gligen"][0] / name)
    return name


def load(env, name: str) -> Gligen:
    (gligen,) = run_node(GLIGENLoader, StubContext(env), gligen_name=name)
    return gligen


# Loading -------------------------------------------------------------------------------------------------------

def test_loader_lists_and_reads_every_tensor_of_the_comfyui_layout(env, small):
    gated, _ = small
    state = gligen_file_state(gated)
    assert "input_blocks.1.1.transformer_blocks.0.fuser.attn.to_q.weight" in state
    assert "middle_block.1.transformer_blocks.0.fuser.alpha_attn" in state
    name = write_gligen(env, "tiny_gligen.safetensors", state)
    assert GLIGENLoader.input_specs()["gligen_name"].choices(env) == [name]
    gligen = load(env, name)
    assert gligen.phrase_width == TEXT_WIDTH
    loaded = gligen.network.state_dict()
    # fusers by LDM block: input 1 and 3 (one resnet per level, a downsampler between), middle, output 0..3
    expected = {"input_1_0", "input_3_0", "middle_0_0", "output_0_0", "output_1_0", "output_2_0", "output_3_0"}
    assert set(gligen.network.fusers) == expected
    for key, value in state.items():
        if key.startswith("position_net."):
            assert torch.equal(loaded[key], value)
        elif key.startswith("middle_block.1."):
            _, _, _, index, _, rest = key.split(".", 5)
            assert torch.equal(loaded[f"fusers.middle_0_{index}.{rest}"], value)
        else:
            section, block, _, _, index, _, rest = key.split(".", 6)
            short = {"input_blocks": "input", "output_blocks": "output"}[section]
            assert torch.equal(loaded[f"fusers.{short}_{block}_{index}.{rest}"], value)
    # A second loader node on the same file shares the loaded weights (the memory manager's entry).
    assert load(env, name) is gligen


def test_heads_follow_comfyui_rule(env):
    """8 heads for 768-wide grounding tokens (SD1), else 64-wide heads (SD2's 1024)."""
    def gated_state(query: int, tokens: int) -> dict[str, torch.Tensor]:
        from diffusers.models.attention import GatedSelfAttentionDense
        from diffusers.models.embeddings import GLIGENTextBoundingboxProjection

        fuser = GatedSelfAttentionDense(query, tokens, 1, query)
        net = GLIGENTextBoundingboxProjection(positive_len=tokens, out_dim=tokens)
        state = {f"input_blocks.1.1.transformer_blocks.0.fuser.{k}": v for k, v in fuser.state_dict().items()}
        state.update({f"position_net.{k}": v for k, v in net.state_dict().items()})
        return state

    sd1 = load(env, write_gligen(env, "sd1.safetensors", gated_state(320, 768)))
    sd2 = load(env, write_gligen(env, "sd2.safetensors", gated_state(320, 1024)))
    assert sd1.network.fusers["input_1_0"].attn.heads == 8
    assert sd2.network.fusers["input_1_0"].attn.heads == 5


def test_files_that_are_not_gligen_give_a_clear_node_error(env, small):
    state = gligen_file_state(small[0])
    write_gligen(env, "no_position.safetensors", {k: v for k, v in state.items() if "position_net" not in k})
    write_gligen(env, "no_fuser.safetensors", {k: v for k, v in state.items() if "fuser" not in k})
    with pytest.raises(InputError, match=r"GLIGENLoader .*'gligen_name'.*no_position.safetensors.*position_net"):
        load(env, "no_position.safetensors")
    with pytest.raises(InputError, match=r"'gligen_name'.*no_fuser.safetensors.*fuser"):
        load(env, "no_fuser.safetensors")
    with pytest.raises(InputError, match=r"'gligen_name'"):
        load(env, "missing.safetensors")


# The text-box node ---------------------------------------------------------------------------------------------

def test_text_box_apply_appends_boxes_in_latent_cells_with_the_unprojected_pooled_output(env, small):
    gligen = load(env, write_gligen(env, "g.safetensors", gligen_file_state(small[0])))
    _, clip = tiny_objects("sd2")   # an encoder with a text projection: GLIGEN takes the pooled output before it
    ctx = StubContext(env)
    cond = [[torch.zeros((1, 77, TEXT_WIDTH)), {"pooled_output": torch.zeros((1, TEXT_WIDTH)), "strength": 0.5}]]
    (first,) = run_node(GLIGENTextBoxApply, ctx, conditioning_to=cond, clip=clip, gligen_textbox_model=gligen,
                        text="a cat", width=100, height=64, x=12, y=40)
    (second,) = run_node(GLIGENTextBoxApply, ctx, conditioning_to=first, clip=clip, gligen_textbox_model=gligen,
                         text="a dog", width=64, height=200, x=0, y=8)
    assert "gligen" not in cond[0][1] and len(first[0][1]["gligen"][2]) == 1  # inputs are never changed
    kind, model, boxes = second[0][1]["gligen"]
    assert kind == "position" and model is gligen and second[0][1]["strength"] == 0.5
    assert [box[1:] for box in boxes] == [(8, 12, 5, 1), (25, 8, 1, 0)]
    encoder = clip.encoders["h"]
    ids = torch.tensor([[token for token, _ in clip.tokenize("a cat")["h"][0]]])
    with torch.no_grad():
        projected = encoder(input_ids=ids).text_embeds[0]
        unprojected = encoder.text_model(input_ids=ids).pooler_output[0]
    assert boxes[0][0].shape == (1, TEXT_WIDTH)
    torch.testing.assert_close(boxes[0][0][0], unprojected, atol=1e-5, rtol=1e-5)
    assert (boxes[0][0][0] - projected).abs().max() > 1e-3


def test_text_box_apply_rejects_a_clip_of_another_width_and_too_many_boxes(env, small):
    gligen = load(env, write_gligen(env, "g.safetensors", gligen_file_state(small[0])))
    _, clip = tiny_objects("sd1")
    ctx = StubContext(env)
    cond = [[torch.zeros((1, 77, TEXT_WIDTH)), {}]]
    fake_pooled = torch.zeros((1, TEXT_WIDTH))
    full = [[cond[0][0], {"gligen": ("position", gligen, [(fake_pooled, 1, 1, 0, 0)] * 30)}]]
    with pytest.raises(InputError, match=r"GLIGENTextBoxApply .*'conditioning_to'.*30 GLIGEN boxes"):
        run_node(GLIGENTextBoxApply, ctx, conditioning_to=full, clip=clip, gligen_textbox_model=gligen, text="x",
                 width=8, height=8, x=0, y=0)
    wide = Gligen(GligenNetwork(_position_net(TEXT_WIDTH * 2), dict(gligen.network.fusers)), gligen.source)
    with pytest.raises(InputError, match=r"'clip'.*32-wide pooled.*64-wide"):
        run_node(GLIGENTextBoxApply, ctx, conditioning_to=cond, clip=clip, gligen_textbox_model=wide,
                 text="x", width=8, height=8, x=0, y=0)
    with pytest.raises(InputError, match=r"'gligen_textbox_model'.*GLIGEN model"):
        run_node(GLIGENTextBoxApply, ctx, conditioning_to=cond, clip=clip, gligen_textbox_model="not a model",
                 text="x", width=8, height=8, x=0, y=0)


def _position_net(width: int) -> torch.nn.Module:
    from diffusers.models.embeddings import GLIGENTextBoundingboxProjection

    return GLIGENTextBoundingboxProjection(positive_len=width, out_dim=TEXT_WIDTH)


# The middle_patch hook point ------------------------------------------------------------------------------------

def test_middle_patch_runs_between_self_and_cross_attention_of_every_transformer_block(small):
    """A middle patch x -> x + c must equal adding c to the residual stream right after attn1 (a forward hook on
    attn1 adding c to its output does exactly that), and it sees ComfyUI's block / transformer_index."""
    _, plain = small
    model = DiffusionModel(unet=plain, family="sd1", sampling=SamplingConfig(prediction="eps"))
    schedule = DiscreteSchedule(model.sampling)
    generator = torch.Generator().manual_seed(2)
    x, context = torch.randn((1, 4, 8, 8), generator=generator), torch.randn((1, 77, TEXT_WIDTH), generator=generator)
    sigma = torch.tensor([1.5])
    seen = []

    def shift(hidden, extra):
        seen.append((extra["block"], extra["block_index"], extra["transformer_index"]))
        return hidden + 0.25

    with torch.no_grad():
        patched = ModelCall(model.set_model_patch(shift, "middle_patch"), plain, schedule)(x, sigma, context)
        handles = [basic.attn1.register_forward_hook(lambda _m, _a, out: out + 0.25)
                   for name, basic in plain.named_modules() if name.endswith("transformer_blocks.0")]
        try:
            expected = ModelCall(model, plain, schedule)(x, sigma, context)
        finally:
            for handle in handles:
                handle.remove()
        plain_result = ModelCall(model, plain, schedule)(x, sigma, context)
    assert len(handles) == len(seen) == 7
    torch.testing.assert_close(patched, expected, atol=2e-5, rtol=1e-5)  # (a + x) + c vs (a + c) + x
    assert (patched - plain_result).abs().max() > 1e-3
    assert seen == [(("input", 1), 0, 0), (("input", 3), 0, 1), (("middle", 0), 0, 2), (("output", 0), 0, 3),
                    (("output", 1), 0, 4), (("output", 2), 0, 5), (("output", 3), 0, 6)]
    assert not any("fuser" in vars(module) for module in plain.modules())  # nothing left on the UNet


# One denoising call against diffusers' gated UNet -------------------------------------------------------------

def reference_boxes(boxes_px: list[tuple[int, int, int, int]], latent_h: int, latent_w: int,
                    phrases: torch.Tensor) -> dict[str, torch.Tensor]:
    """diffusers' gligen kwargs for boxes given as (width, height, x, y) in pixels: ComfyUI's latent-cell boxes
    (pixels // 8) as x1, y1, x2, y2 fractions of the latent, padded to 30 objects."""
    boxes = torch.zeros((1, 30, 4))
    masks = torch.zeros((1, 30))
    embeddings = torch.zeros((1, 30, phrases.shape[-1]))
    for n, (w, h, x, y) in enumerate(boxes_px):
        w, h, x, y = w // 8, h // 8, x // 8, y // 8
        boxes[0, n] = torch.tensor([x / latent_w, y / latent_h, (x + w) / latent_w, (y + h) / latent_h])
        masks[0, n] = 1.0
        embeddings[0, n] = phrases[n]
    return {"boxes": boxes, "masks": masks, "positive_embeddings": embeddings}


def test_one_denoising_call_matches_diffusers_gated_unet(env, small):
    gated, plain = small
    gligen = load(env, write_gligen(env, "g.safetensors", gligen_file_state(gated)))
    _, clip = tiny_objects("sd1")
    ctx = StubContext(env)
    generator = torch.Generator().manual_seed(5)
    positive = [[torch.randn((1, 77, TEXT_WIDTH), generator=generator), {}]]
    negative = [[torch.randn((1, 77, TEXT_WIDTH), generator=generator), {}]]
    boxes_px = [(32, 24, 8, 16), (16, 40, 40, 0)]
    conditioning = positive
    for (w, h, x, y), text in zip(boxes_px, ("a red ball", "a tree"), strict=True):
        (conditioning,) = run_node(GLIGENTextBoxApply, ctx, conditioning_to=conditioning, clip=clip,
                                   gligen_textbox_model=gligen, text=text, width=w, height=h, x=x, y=y)
    phrases = []
    for text in ("a red ball", "a tree"):
        ids = torch.tensor([[token for token, _ in clip.tokenize(text)["l"][0]]])
        with torch.no_grad():
            phrases.append(clip.encoders["l"](input_ids=ids).pooler_output[0])
    gligen_kwargs = reference_boxes(boxes_px, 8, 8, torch.stack(phrases))

    model = DiffusionModel(unet=plain, family="sd1", sampling=SamplingConfig(prediction="eps"))
    schedule = DiscreteSchedule(model.sampling)
    x = torch.randn((2, 4, 8, 8), generator=generator) * 3.0
    sigma = torch.tensor([2.5, 2.5])
    prepared = prepare_conditioning({"positive": conditioning, "negative": negative}, x.shape, schedule,
                                    torch.device("cpu"), plain.config, "sd1")
    assert prepared["negative"][0].unet_patches is prepared["positive"][0].unet_patches  # ComfyUI's rule
    cfg = 3.0
    with torch.no_grad():
        ours = GuidedDenoiser(ModelCall(model, plain, schedule), prepared["positive"], prepared["negative"], cfg)(
            x, sigma)

        def reference(context: torch.Tensor, with_boxes: bool) -> torch.Tensor:
            kwargs = {"gligen": {k: v.repeat(2, *([1] * (v.ndim - 1))) for k, v in gligen_kwargs.items()}} \
                if with_boxes else None
            eps = gated(x / (sigma[0] ** 2 + 1) ** 0.5, schedule.timestep(sigma), encoder_hidden_states=context.repeat(
                2, 1, 1), cross_attention_kwargs=kwargs, return_dict=False)[0]
            return x - eps * sigma[0]

        cond, uncond = reference(positive[0][0], True), reference(negative[0][0], True)
        expected = uncond + (cond - uncond) * cfg
        cond_plain = reference(positive[0][0], False)
    assert (cond - cond_plain).abs().max() > 1e-2  # the gated blocks really change the prediction
    torch.testing.assert_close(ours, expected, atol=2e-5, rtol=1e-5)
    # The plain model is untouched afterwards: no patch is left on the UNet.
    with torch.no_grad():
        after = plain(x / (sigma[0] ** 2 + 1) ** 0.5, schedule.timestep(sigma),
                      encoder_hidden_states=positive[0][0].repeat(2, 1, 1), return_dict=False)[0]
    torch.testing.assert_close(x - after * sigma[0], cond_plain, atol=1e-6, rtol=0)


def test_area_entry_boxes_are_fractions_of_the_area(env, small):
    """ComfyUI normalises boxes by the shape of the input the entry denoises: an area entry's crop."""
    gligen = load(env, write_gligen(env, "g.safetensors", gligen_file_state(small[0])))
    from latentloom.nodes.diffusion.gligen import boxes_from_option

    pooled = torch.randn((1, TEXT_WIDTH))
    source = boxes_from_option(("position", gligen, [(pooled, 2, 4, 1, 2)]))
    captured = {}
    original = gligen.network.position_net.forward

    def record(boxes, masks, positive_embeddings):
        captured["boxes"] = boxes
        return original(boxes, masks, positive_embeddings)

    gligen.network.position_net.forward = record
    try:
        source.patches_for(torch.Size((1, 4, 4, 8)), torch.device("cpu"))
    finally:
        del gligen.network.position_net.forward
    assert torch.equal(captured["boxes"][0, 0], torch.tensor([2 / 8, 1 / 4, 6 / 8, 3 / 4]))
    assert torch.count_nonzero(captured["boxes"][0, 1:]) == 0


# The editor-format workflow, end to end --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    from diffusers import UNet2DConditionModel
    from tiny_models import tiny_components, write_tiny_checkpoint

    from latentloom.nodes import create_engine

    root = tmp_path_factory.mktemp("gligen")
    write_tiny_checkpoint(root / "models" / "checkpoints" / "tiny_sd1.safetensors", family="sd1", seed=0)
    config = {k: v for k, v in dict(tiny_components("sd1").unet.config).items() if not k.startswith("_")}
    gated = gated_unet(config, seed=3)
    assert isinstance(gated, UNet2DConditionModel)
    save_safetensors(gligen_file_state(gated), root / "models" / "gligen" / "tiny_gligen.safetensors")
    return create_engine(models_dir=root / "models", output_dir=root / "out", temp_dir=root / "temp",
                         entry_points=False)


def saved_pixels(engine, result) -> np.ndarray:
    from PIL import Image

    assert result.status == "success", (result.error, result.node_errors)
    (ui,) = [ui for ui in result.outputs.values() if "images" in ui]
    image = ui["images"][0]
    folder = engine.env.output_dir if image["type"] == "output" else engine.env.temp_dir
    with Image.open(folder / image["subfolder"] / image["filename"]) as picture:
        return np.asarray(picture, dtype=np.float32)


def test_editor_workflow_converts_validates_and_runs(engine):
    prompt = engine.load(FIXTURE)
    kinds = sorted(entry["class_type"] for entry in prompt.values())
    assert kinds.count("GLIGENTextBoxApply") == 2 and "GLIGENLoader" in kinds and "KSampler" in kinds
    boxes = {entry["inputs"]["text"]: entry["inputs"] for entry in prompt.values()
             if entry["class_type"] == "GLIGENTextBoxApply"}
    assert {k: (v["width"], v["height"], v["x"], v["y"]) for k, v in boxes.items()} == {
        "a red ball": (32, 32, 0, 0), "a green tree": (24, 40, 32, 16)}
    validation = engine.validate(prompt)
    assert validation.ok and not validation.node_errors, validation.as_response()
    with_boxes = saved_pixels(engine, engine.run(prompt))
    sampler_id, sampler = next((k, v) for k, v in prompt.items() if v["class_type"] == "KSampler")
    text_encode = sampler["inputs"]["positive"]
    while prompt[text_encode[0]]["class_type"] == "GLIGENTextBoxApply":
        text_encode = prompt[text_encode[0]]["inputs"]["conditioning_to"]
    without = {k: v for k, v in prompt.items() if v["class_type"] not in ("GLIGENTextBoxApply", "GLIGENLoader")}
    without[sampler_id] = {**sampler, "inputs": {**sampler["inputs"], "positive": text_encode}}
    plain = saved_pixels(engine, engine.run(without))
    assert with_boxes.shape == plain.shape == (64, 64, 3)
    assert np.abs(with_boxes - plain).mean() > 0.5  # the boxes change the picture
    again = saved_pixels(engine, engine.run(prompt))
    assert np.array_equal(again, with_boxes)


def test_fixture_converts_with_comfyuis_own_catalogue_and_ours_alike(engine):
    from latentloom.engine.workflow import ui_to_api

    workflow = json.loads(FIXTURE.read_text())
    assert sum(node["type"] == "GLIGENTextBoxApply" for node in workflow["nodes"]) == 2
    expected = json.loads((FIXTURES / "gligen.api.json").read_text())
    comfyui = ui_to_api(workflow, json.loads(REFERENCE.read_text())["nodes"])
    ours = engine.load(FIXTURE)
    for prompt in (comfyui, ours):
        assert {k: (v["class_type"], v["inputs"]) for k, v in prompt.items()} == \
            {k: (v["class_type"], v["inputs"]) for k, v in expected.items()}
