"""Merging and saving nodes (nodes/merging.py, nodes/model_saving.py, CheckpointLoader) against formulas written
out here: ComfyUI's merge conventions per parameter, block ratios on hand-picked LDM names, inputs left untouched,
bit-exact save → load round trips through our loaders, LoRA extraction (SVD written out) read back by LoraLoader,
a hypernetwork file against a hand-built MLP, and one graph that merges two checkpoints, saves, reloads and
samples."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json  # noqa: E402
import shutil  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from adapter_support import tiny_objects  # noqa: E402
from node_context import StubContext, make_env  # noqa: E402
from safetensors import safe_open  # noqa: E402
from tiny_models import tiny_components, write_tiny_checkpoint  # noqa: E402

from latentloom.engine.inputs import InputError  # noqa: E402
from latentloom.nodes.diffusion import checkpoint, lora_extract  # noqa: E402
from latentloom.nodes.diffusion.hypernetwork import HypernetworkPatch, read_hypernetwork  # noqa: E402
from latentloom.nodes.diffusion.vae import VAEModel  # noqa: E402
from latentloom.nodes.loaders import CheckpointLoader  # noqa: E402
from latentloom.nodes.lora import LoraLoader  # noqa: E402
from latentloom.nodes.merging import (  # noqa: E402
    CLIPMergeAdd,
    CLIPMergeSimple,
    CLIPMergeSubtract,
    HypernetworkLoader,
    ModelMergeAdd,
    ModelMergeBlocks,
    ModelMergeSD1,
    ModelMergeSimple,
    ModelMergeSubtract,
)
from latentloom.nodes.model_saving import CheckpointSave, CLIPSave, LoraSave, ModelSave, VAESave  # noqa: E402

# Each test builds and runs tiny diffusers UNets (or whole graphs on them): seconds apiece.
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def pair():
    (model_a, clip_a), (model_b, clip_b) = tiny_objects("sd1", 0), tiny_objects("sd1", 1)
    return model_a, clip_a, model_b, clip_b


@pytest.fixture
def ctx(tmp_path):
    context = StubContext(make_env(tmp_path, models_dir=tmp_path / "models"), prompt={"1": {"class_type": "X"}})
    yield context
    context.models.free_all()  # undo the patch sets the manager keeps applied on the shared tiny modules


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: value.detach().clone() for name, value in module.state_dict().items()}


def effective(model, manager) -> dict[str, torch.Tensor]:
    with model.prepared(manager) as module:
        return snapshot(module)


def clip_effective(clip, manager) -> dict[str, torch.Tensor]:
    with clip.prepared(manager) as modules:
        return snapshot(modules)


def assert_same(first: dict[str, torch.Tensor], second: dict[str, torch.Tensor]) -> None:
    assert first.keys() == second.keys()
    different = [name for name in first if not torch.equal(first[name], second[name])]
    assert not different, different[:5]


# Merge formulas -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("node", "inputs", "formula"), [
    (ModelMergeSimple, {"ratio": 0.3}, lambda w1, w2: w1 * 0.3 + 0.7 * w2),
    (ModelMergeSubtract, {"multiplier": 1.5}, lambda w1, w2: w1 * 1.5 + (-1.5) * w2),
    (ModelMergeAdd, {}, lambda w1, w2: w1 + w2),
])
def test_model_merges_follow_comfyui_conventions_and_leave_inputs_alone(pair, ctx, node, inputs, formula):
    model_a, _, model_b, _ = pair
    before_a, before_b = snapshot(model_a.unet), snapshot(model_b.unet)
    (merged,) = node.model_construct(model1=model_a, model2=model_b, **inputs).run(ctx)
    assert model_a.patches == () and model_b.patches == ()
    assert_same(snapshot(model_a.unet), before_a)  # nothing is computed until the merged model runs
    weights = effective(merged, ctx.models)
    for name, value in weights.items():
        assert torch.equal(value, formula(before_a[name], before_b[name])), name
    ctx.models.restore(model_a.unet)
    assert_same(snapshot(model_a.unet), before_a)
    assert_same(snapshot(model_b.unet), before_b)


def test_ratio_one_keeps_model1_and_zero_gives_model2(pair, ctx):
    model_a, _, model_b, _ = pair
    (keep,) = ModelMergeSimple.model_construct(model1=model_a, model2=model_b, ratio=1.0).run(ctx)
    assert_same(effective(keep, ctx.models), snapshot(model_a.unet))
    (take,) = ModelMergeSimple.model_construct(model1=model_a, model2=model_b, ratio=0.0).run(ctx)
    assert_same(effective(take, ctx.models), snapshot(model_b.unet))


def test_the_other_side_contributes_its_patched_weights_even_on_a_shared_module(pair, ctx):
    model_a = pair[0]
    base = snapshot(model_a.unet)
    g = torch.Generator().manual_seed(5)
    d1, d2 = (torch.randn(base["conv_in.weight"].shape, generator=g) for _ in range(2))
    first = model_a.add_patches({"conv_in.weight": d1})
    second = model_a.add_patches({"conv_in.weight": d2}, strength_patch=0.5)
    (merged,) = ModelMergeSimple.model_construct(model1=first, model2=second, ratio=0.25).run(ctx)
    weights = effective(merged, ctx.models)
    expected = (base["conv_in.weight"] + d1) * 0.25 + 0.75 * (base["conv_in.weight"] + 0.5 * d2)
    torch.testing.assert_close(weights["conv_in.weight"], expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(weights["conv_out.weight"], base["conv_out.weight"], rtol=0, atol=1e-7)
    ctx.models.restore(model_a.unet)
    assert_same(snapshot(model_a.unet), base)


def test_patches_the_manager_left_on_model2_are_not_counted_twice(pair, ctx):
    model_a, _, model_b, _ = pair
    b = snapshot(model_b.unet)
    diff = torch.full(b["conv_out.weight"].shape, 0.5)
    patched_b = model_b.add_patches({"conv_out.weight": diff})
    effective(patched_b, ctx.models)  # the manager keeps this patch applied on model_b's UNet afterwards
    (merged,) = ModelMergeSimple.model_construct(model1=model_a, model2=patched_b, ratio=0.0).run(ctx)
    weights = effective(merged, ctx.models)
    torch.testing.assert_close(weights["conv_out.weight"], b["conv_out.weight"] + diff, rtol=0, atol=1e-6)


def test_a_different_architecture_is_a_clear_input_error(pair, ctx):
    sdxl_model, _ = tiny_objects("sdxl", 0)
    with pytest.raises(InputError) as error:
        ModelMergeSimple.model_construct(model1=pair[0], model2=sdxl_model, ratio=0.5).run(ctx)
    assert error.value.input_name == "model2"


# Block-wise ratios ------------------------------------------------------------------------------------------

def _ratio_of(merged_weight, w1, w2) -> float:
    """The ratio r with merged = r·w1 + (1 − r)·w2, read back from one weight."""
    return float(((merged_weight - w2) * (w1 - w2)).sum() / ((w1 - w2) ** 2).sum())


def test_block_ratios_hit_the_ldm_blocks(pair, ctx):
    model_a, _, model_b, _ = pair
    a, b = snapshot(model_a.unet), snapshot(model_b.unet)
    (merged,) = ModelMergeBlocks.model_construct(model1=model_a, model2=model_b, input=0.2, middle=0.5,
                                                 out=0.9).run(ctx)
    weights = effective(merged, ctx.models)
    expected = {
        "conv_in.weight": 0.2,                                   # input_blocks.0.0
        "down_blocks.0.resnets.0.conv1.weight": 0.2,             # input_blocks.1.0.in_layers.2
        "time_embedding.linear_1.weight": 0.2,                   # time_embed.0: no prefix -> the first ratio
        "mid_block.attentions.0.proj_in.weight": 0.5,            # middle_block.1
        "up_blocks.0.resnets.0.conv1.weight": 0.9,               # output_blocks.0
        "conv_out.weight": 0.9,                                  # out.2 ("out" is a prefix of it too)
    }
    for name, ratio in expected.items():
        assert _ratio_of(weights[name], a[name], b[name]) == pytest.approx(ratio, abs=1e-5), name


def test_model_merge_sd1_per_block_inputs(pair, ctx):
    model_a, _, model_b, _ = pair
    a, b = snapshot(model_a.unet), snapshot(model_b.unet)
    ratios = {"time_embed.": 0.1, "input_blocks.1.": 0.3, "input_blocks.11.": 0.7, "middle_block.1.": 0.4,
              "output_blocks.2.": 0.6, "out.": 0.8}
    (merged,) = ModelMergeSD1.model_construct(model1=model_a, model2=model_b, **ratios).run(ctx)
    weights = effective(merged, ctx.models)
    expected = {
        "time_embedding.linear_2.weight": 0.1,
        "down_blocks.0.resnets.0.conv1.weight": 0.3,          # input_blocks.1
        "down_blocks.1.resnets.0.conv1.weight": 1.0,          # input_blocks.4 (default 1.0)
        "down_blocks.3.resnets.1.conv1.weight": 0.7,          # input_blocks.11, not taken by "input_blocks.1."
        "mid_block.attentions.0.proj_out.weight": 0.4,
        "mid_block.resnets.0.conv1.weight": 1.0,              # middle_block.0
        "up_blocks.0.upsamplers.0.conv.weight": 0.6,          # output_blocks.2.1.conv
        "conv_norm_out.weight": 0.8,                          # out.0
    }
    for name, ratio in expected.items():
        if ratio == 1.0:
            assert torch.equal(weights[name], a[name]), name
        else:
            assert _ratio_of(weights[name], a[name], b[name]) == pytest.approx(ratio, abs=1e-5), name


# CLIP merges --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("node", "inputs", "formula"), [
    (CLIPMergeSimple, {"ratio": 0.4}, lambda w1, w2: w1 * 0.4 + 0.6 * w2),
    (CLIPMergeSubtract, {"multiplier": 2.0}, lambda w1, w2: w1 * 2.0 + (-2.0) * w2),
    (CLIPMergeAdd, {}, lambda w1, w2: w1 + w2),
])
def test_clip_merges(pair, ctx, node, inputs, formula):
    _, clip_a, _, clip_b = pair
    a, b = snapshot(clip_a.encoders), snapshot(clip_b.encoders)
    (merged,) = node.model_construct(clip1=clip_a, clip2=clip_b, **inputs).run(ctx)
    assert clip_a.patches == ()
    weights = clip_effective(merged, ctx.models)
    for name, value in weights.items():
        if name.endswith("position_ids"):
            assert torch.equal(value, a[name])
        else:
            assert torch.equal(value, formula(a[name], b[name])), name
    assert_same(snapshot(clip_a.encoders), a)


# Saving -------------------------------------------------------------------------------------------------------

def _only_file(folder) -> str:
    (name,) = sorted(p.name for p in folder.iterdir())
    return name


def test_checkpoint_save_round_trip_is_bit_exact(pair, ctx):
    model_a, clip_a, model_b, clip_b = pair
    vae = VAEModel(autoencoder=tiny_components("sd1", 0).vae)
    (model,) = ModelMergeSimple.model_construct(model1=model_a, model2=model_b, ratio=0.6).run(ctx)
    (clip,) = CLIPMergeSimple.model_construct(clip1=clip_a, clip2=clip_b, ratio=0.6).run(ctx)
    CheckpointSave.model_construct(model=model, clip=clip, vae=vae, filename_prefix="checkpoints/merged").run(ctx)
    CheckpointSave.model_construct(model=model, clip=clip, vae=vae, filename_prefix="checkpoints/merged").run(ctx)
    folder = ctx.env.output_dir / "checkpoints"
    assert sorted(p.name for p in folder.iterdir()) == ["merged_00001_.safetensors", "merged_00002_.safetensors"]
    path = folder / "merged_00001_.safetensors"
    with safe_open(str(path), "pt") as handle:
        metadata = handle.metadata()
    assert json.loads(metadata["prompt"]) == ctx.prompt and metadata["modelspec.predict_key"] == "epsilon"
    loaded = checkpoint.load_checkpoint(path)
    assert loaded.model.family == "sd1" and loaded.model.prediction == "eps"
    assert_same(snapshot(loaded.model.unet), effective(model, ctx.models))
    assert_same({k: v for k, v in snapshot(loaded.clip.encoders).items() if not k.endswith("position_ids")},
                {k: v for k, v in clip_effective(clip, ctx.models).items() if not k.endswith("position_ids")})
    assert_same(snapshot(loaded.vae.autoencoder), snapshot(vae.autoencoder))


def test_sdxl_checkpoint_gets_modelspec_and_v_marker(ctx):
    model, clip = tiny_objects("sdxl", 0)
    model = model.with_sampling(model.sampling.__class__(prediction="v"))
    ModelSave.model_construct(model=model, filename_prefix="diffusion_models/xl").run(ctx)
    path = ctx.env.output_dir / "diffusion_models" / "xl_00001_.safetensors"
    with safe_open(str(path), "pt") as handle:
        metadata, keys = handle.metadata(), set(handle.keys())
    assert metadata["modelspec.architecture"] == "stable-diffusion-xl-v1-base"
    assert metadata["modelspec.title"] == "xl 1" and metadata["modelspec.predict_key"] == "v"
    assert "v_pred" in keys
    loaded = checkpoint.load_unet_file(path)
    assert loaded.family == "sdxl" and loaded.prediction == "v"
    assert_same(snapshot(loaded.unet), snapshot(model.unet))


def test_clip_and_vae_save_round_trips(ctx):
    _, clip = tiny_objects("sdxl", 0)
    CLIPSave.model_construct(clip=clip, filename_prefix="clip/xl").run(ctx)
    folder = ctx.env.output_dir / "clip"
    assert sorted(p.name for p in folder.iterdir()) == ["xl_clip_g_00001_.safetensors",
                                                        "xl_clip_l_00001_.safetensors"]
    loaded = checkpoint.load_clip_files([folder / "xl_clip_l_00001_.safetensors",
                                         folder / "xl_clip_g_00001_.safetensors"], "sdxl")
    strip = {k: v for k, v in snapshot(clip.encoders).items() if not k.endswith("position_ids")}
    assert_same({k: v for k, v in snapshot(loaded.encoders).items() if not k.endswith("position_ids")}, strip)
    vae = VAEModel(autoencoder=tiny_components("sd1", 3).vae)
    VAESave.model_construct(vae=vae, filename_prefix="vae/ComfyUI_vae").run(ctx)
    name = _only_file(ctx.env.output_dir / "vae")
    assert name == "ComfyUI_vae_00001_.safetensors"
    assert_same(snapshot(checkpoint.load_vae_file(ctx.env.output_dir / "vae" / name).autoencoder),
                snapshot(vae.autoencoder))


def test_saving_outside_the_output_folder_is_refused(pair, ctx):
    with pytest.raises(InputError) as error:
        ModelSave.model_construct(model=pair[0], filename_prefix="../escape/x").run(ctx)
    assert error.value.input_name == "filename_prefix"


# LoRA extraction ----------------------------------------------------------------------------------------------

def reference_factors(diff: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """ComfyUI's extraction written out: truncated SVD, both factors clamped at the 0.99 quantile."""
    matrix = diff.flatten(1).float()
    u, s, vh = torch.linalg.svd(matrix)
    rank = min(rank, diff.shape[0], diff.shape[1])  # channels, not the flattened kernel, bound the rank
    up, down = u[:, :rank] * s[:rank], vh[:rank]
    high = torch.quantile(torch.cat([up.flatten(), down.flatten()]), 0.99)
    return up.clamp(-high, high), down.clamp(-high, high)


def test_extracted_factors_match_the_written_out_svd():
    g = torch.Generator().manual_seed(0)
    for shape in ((24, 16), (8, 6, 3, 3), (8, 6, 1, 1)):
        diff = torch.randn(shape, generator=g)
        up, down = lora_extract.extract_factors(diff, 4)
        ref_up, ref_down = reference_factors(diff, 4)
        torch.testing.assert_close((up.flatten(1) @ down.flatten(1)), ref_up @ ref_down, rtol=1e-5, atol=1e-5)
        assert up.shape[:2] == (shape[0], 4) and down.shape == (4, *shape[1:])


@pytest.mark.parametrize("lora_type", ["full_diff", "standard"])
def test_lora_save_reproduces_the_difference_through_lora_loader(pair, ctx, lora_type):
    model_a, clip_a, model_b, clip_b = pair
    a, b = snapshot(model_a.unet), snapshot(model_b.unet)
    clip_a_weights, clip_b_weights = snapshot(clip_a.encoders), snapshot(clip_b.encoders)
    (diff_model,) = ModelMergeSubtract.model_construct(model1=model_a, model2=model_b, multiplier=1.0).run(ctx)
    (diff_clip,) = CLIPMergeSubtract.model_construct(clip1=clip_a, clip2=clip_b, multiplier=1.0).run(ctx)
    LoraSave.model_construct(filename_prefix="loras/extracted", rank=4096, lora_type=lora_type, bias_diff=True,
                             model_diff=diff_model, text_encoder_diff=diff_clip).run(ctx)
    name = _only_file(ctx.env.output_dir / "loras")
    assert name == "extracted_00001_.safetensors"
    loras = ctx.env.model_dirs["loras"][0]
    loras.mkdir(parents=True, exist_ok=True)
    shutil.copy(ctx.env.output_dir / "loras" / name, loras / name)
    model, clip = LoraLoader.model_construct(model=model_b, clip=clip_b, lora_name=name, strength_model=1.0,
                                             strength_clip=1.0).run(ctx)
    diff = effective(diff_model, ctx.models)
    weights = effective(model, ctx.models)
    for key in ("conv_in.weight", "down_blocks.0.attentions.0.proj_in.weight", "mid_block.resnets.0.conv1.weight",
                "up_blocks.3.attentions.2.transformer_blocks.0.attn2.to_k.weight", "conv_norm_out.weight"):
        if lora_type == "full_diff" or diff[key].ndim < 2:
            expected = b[key] + diff[key].half().float()
        else:
            up, down = reference_factors(diff[key], 4096)
            expected = b[key] + (up.half().float() @ down.half().float()).reshape(diff[key].shape)
        torch.testing.assert_close(weights[key], expected, rtol=1e-4, atol=1e-4)
        if lora_type == "full_diff":  # the difference itself, stored in float16: model_b + diff ≈ model_a
            torch.testing.assert_close(weights[key], a[key], rtol=0, atol=1e-3)
    for key in ("conv_in.bias", "down_blocks.0.attentions.0.proj_in.bias", "conv_norm_out.bias"):
        # bias_diff: the bias offsets (diff_b) come back too
        torch.testing.assert_close(weights[key], b[key] + diff[key].half().float(), rtol=1e-4, atol=1e-4)
        assert not torch.equal(weights[key], b[key])
    text = clip_effective(clip, ctx.models)
    checked = [key for key in clip_a_weights if ".encoder.layers.0.self_attn.q_proj.weight" in key]
    assert checked
    for key in checked:
        wanted = clip_a_weights[key] - clip_b_weights[key]
        if lora_type == "standard":
            up, down = reference_factors(wanted, 4096)
            wanted = up.half().float() @ down.half().float()
        torch.testing.assert_close(text[key] - clip_b_weights[key], wanted, rtol=0, atol=1e-3)


def test_lora_save_with_nothing_to_save_writes_nothing(ctx):
    LoraSave.model_construct(filename_prefix="loras/x", rank=8, lora_type="standard", bias_diff=True).run(ctx)
    assert not (ctx.env.output_dir / "loras").exists()


# Hypernetworks ------------------------------------------------------------------------------------------------

def _mlp_state(width: int, hidden: int, g: torch.Generator, layer_norm: bool) -> dict:
    state = {"linear.0.weight": torch.randn(hidden, width, generator=g) * 0.1,
             "linear.0.bias": torch.randn(hidden, generator=g) * 0.1}
    if layer_norm:
        state.update({"linear.1.weight": 1 + torch.randn(hidden, generator=g) * 0.1,
                      "linear.1.bias": torch.randn(hidden, generator=g) * 0.1})
    index = 2 if layer_norm else 1
    state.update({f"linear.{index}.weight": torch.randn(width, hidden, generator=g) * 0.1,
                  f"linear.{index}.bias": torch.randn(width, generator=g) * 0.1})
    if layer_norm:
        state.update({"linear.3.weight": 1 + torch.randn(width, generator=g) * 0.1,
                      "linear.3.bias": torch.randn(width, generator=g) * 0.1})
    return state


def _reference_mlp(state: dict, x: torch.Tensor, layer_norm: bool) -> torch.Tensor:
    """The network ComfyUI builds from such a file, in torch.nn modules: Linear, ReLU(, LayerNorm) per layer; the
    last linear without ReLU unless layer norms are present."""
    layers: list[torch.nn.Module] = []
    names = [k[:-7] for k in state if k.endswith(".weight")]
    step = 2 if layer_norm else 1
    for position in range(0, len(names), step):
        weight = state[f"{names[position]}.weight"]
        linear = torch.nn.Linear(weight.shape[1], weight.shape[0])
        linear.load_state_dict({"weight": weight, "bias": state[f"{names[position]}.bias"]})
        layers.append(linear)
        if position != len(names) - 1:
            layers.append(torch.nn.ReLU())
        if layer_norm:
            norm = torch.nn.LayerNorm(weight.shape[0])
            norm.load_state_dict({"weight": state[f"{names[position + 1]}.weight"],
                                  "bias": state[f"{names[position + 1]}.bias"]})
            layers.append(norm)
    with torch.no_grad():
        return torch.nn.Sequential(*layers)(x)


@pytest.mark.parametrize("layer_norm", [False, True])
def test_hypernetwork_patch_matches_the_formula(tmp_path, pair, ctx, layer_norm):
    g = torch.Generator().manual_seed(7)
    states = {width: [_mlp_state(width, 16, g, layer_norm), _mlp_state(width, 16, g, layer_norm)]
              for width in (32, 64)}
    folder = ctx.env.model_dirs["hypernetworks"][0]
    folder.mkdir(parents=True, exist_ok=True)
    torch.save({**states, "activation_func": "relu", "is_layer_norm": layer_norm, "use_dropout": True,
                "activate_output": False, "last_layer_dropout": False}, folder / "tiny.pt")
    (model,) = HypernetworkLoader.model_construct(model=pair[0], hypernetwork_name="tiny.pt", strength=0.7).run(ctx)
    patches = model.options["transformer_options"]["patches"]
    (attn1,), (attn2,) = patches["attn1_patch"], patches["attn2_patch"]
    assert "transformer_options" not in pair[0].options
    q, k, v = (torch.randn((2, 5, 64), generator=g) for _ in range(3))
    out_q, out_k, out_v = attn1(q, k, v, {})
    assert out_q is q
    torch.testing.assert_close(out_k, k + 0.7 * _reference_mlp(states[64][0], k, layer_norm))
    torch.testing.assert_close(out_v, v + 0.7 * _reference_mlp(states[64][1], v, layer_norm))
    other = torch.randn((2, 5, 48), generator=g)
    assert attn2(q, other, other, {})[1] is other  # widths without a network pass through
    assert isinstance(attn1, HypernetworkPatch) and set(read_hypernetwork(folder / "tiny.pt").nets) == {32, 64}


def test_hypernetwork_loader_rejects_a_file_without_layers(pair, ctx):
    folder = ctx.env.model_dirs["hypernetworks"][0]
    folder.mkdir(parents=True, exist_ok=True)
    torch.save({"activation_func": "relu"}, folder / "empty.pt")
    with pytest.raises(InputError) as error:
        HypernetworkLoader.model_construct(model=pair[0], hypernetwork_name="empty.pt", strength=1.0).run(ctx)
    assert error.value.input_name == "hypernetwork_name"


# CheckpointLoader (with config) -------------------------------------------------------------------------------

def test_checkpoint_loader_applies_the_config(ctx):
    write_tiny_checkpoint(ctx.env.model_dirs["checkpoints"][0] / "sd1.safetensors", family="sd1", seed=0)
    configs = ctx.env.model_dirs["configs"][0]
    configs.mkdir(parents=True, exist_ok=True)
    (configs / "v.yaml").write_text("model:\n  params:\n    parameterization: \"v\"\n    cond_stage_config:\n"
                                    "      params:\n        layer: hidden\n        layer_idx: -2\n")
    (configs / "plain.yaml").write_text("model:\n  params:\n    cond_stage_config:\n      target: x\n")
    assert ctx.env.list_models("configs") == ["plain.yaml", "v.yaml"]
    model, clip, vae = CheckpointLoader.model_construct(config_name="v.yaml", ckpt_name="sd1.safetensors").run(ctx)
    assert model.prediction == "v" and clip.layer_idx == -2 and vae is not None
    plain, plain_clip, _ = CheckpointLoader.model_construct(config_name="plain.yaml",
                                                            ckpt_name="sd1.safetensors").run(ctx)
    assert plain.prediction == "eps" and plain_clip.layer_idx is None
    assert plain.unet is model.unet  # one load through the memory manager
    (configs / "bad.yaml").write_text("just text")
    with pytest.raises(InputError) as error:
        CheckpointLoader.model_construct(config_name="bad.yaml", ckpt_name="sd1.safetensors").run(ctx)
    assert error.value.input_name == "config_name"


# End to end ---------------------------------------------------------------------------------------------------

def sampler_graph(model_link, clip_link) -> dict:
    return {
        "pos": {"class_type": "CLIPTextEncode", "inputs": {"clip": clip_link, "text": "a red square"}},
        "neg": {"class_type": "CLIPTextEncode", "inputs": {"clip": clip_link, "text": "blurry"}},
        "latent": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "sample": {"class_type": "KSampler", "inputs": {
            "model": model_link, "positive": ["pos", 0], "negative": ["neg", 0], "latent_image": ["latent", 0],
            "seed": 1, "steps": 2, "cfg": 4.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        "probe": {"class_type": "LatentProbe", "inputs": {"samples": ["sample", 0], "label": "x"}},
    }


def probed(result) -> list:
    assert result.status == "success" and not result.node_errors, (result.error, result.node_errors)
    return json.loads(result.outputs["probe"]["text"][0])["samples"]


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    from sd_probe_nodes import LatentProbe

    from latentloom.nodes import create_engine

    root = tmp_path_factory.mktemp("merging_saving")
    write_tiny_checkpoint(root / "models" / "checkpoints" / "a.safetensors", family="sd1", seed=0)
    write_tiny_checkpoint(root / "models" / "checkpoints" / "b.safetensors", family="sd1", seed=1)
    engine = create_engine(models_dir=root / "models", output_dir=root / "out", temp_dir=root / "temp",
                           entry_points=False)
    engine.registry.register(LatentProbe)
    return engine


def test_merge_save_reload_and_sample_through_the_engine(engine):
    checkpoints = engine.env.model_dirs["checkpoints"][0]
    merge_graph = {
        "a": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "a.safetensors"}},
        "b": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "b.safetensors"}},
        "merge": {"class_type": "ModelMergeSimple", "inputs": {"model1": ["a", 0], "model2": ["b", 0], "ratio": 0.3}},
        "clip": {"class_type": "CLIPMergeSimple", "inputs": {"clip1": ["a", 1], "clip2": ["b", 1], "ratio": 0.3}},
        "save": {"class_type": "CheckpointSave", "inputs": {"model": ["merge", 0], "clip": ["clip", 0],
                                                             "vae": ["a", 2], "filename_prefix": "checkpoints/mix"}},
        **sampler_graph(["merge", 0], ["clip", 0]),
    }
    merged_latent = probed(engine.run(merge_graph))
    saved = engine.env.output_dir / "checkpoints" / "mix_00001_.safetensors"
    assert saved.is_file()
    shutil.copy(saved, checkpoints / "mix.safetensors")
    reload_graph = {"mix": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "mix.safetensors"}},
                    **sampler_graph(["mix", 0], ["mix", 1])}
    assert probed(engine.run(reload_graph)) == merged_latent  # the saved file is the merged model, bit for bit
    # Model a sampled after the merge ran on its UNet: the merge is not left in its weights.
    plain_a = probed(engine.run({"a": merge_graph["a"], **sampler_graph(["a", 0], ["a", 1])}))
    assert plain_a != merged_latent
    from sd_probe_nodes import LatentProbe

    from latentloom.nodes import create_engine

    fresh = create_engine(models_dir=checkpoints.parent, output_dir=engine.env.output_dir,
                          temp_dir=engine.env.temp_dir, entry_points=False)
    fresh.registry.register(LatentProbe)
    assert probed(fresh.run({"a": merge_graph["a"], **sampler_graph(["a", 0], ["a", 1])})) == plain_a


def test_hypernetwork_changes_sampling_through_the_engine(engine):
    g = torch.Generator().manual_seed(3)
    folder = engine.env.model_dirs["hypernetworks"][0]
    folder.mkdir(parents=True, exist_ok=True)
    torch.save({32: [_mlp_state(32, 8, g, False), _mlp_state(32, 8, g, False)],
                64: [_mlp_state(64, 8, g, False), _mlp_state(64, 8, g, False)],
                "activation_func": "tanh"}, folder / "h.pt")
    loader = {"a": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "a.safetensors"}}}
    hyper = {"hn": {"class_type": "HypernetworkLoader",
                    "inputs": {"model": ["a", 0], "hypernetwork_name": "h.pt", "strength": 2.0}}}
    patched = probed(engine.run({**loader, **hyper, **sampler_graph(["hn", 0], ["a", 1])}))
    plain = probed(engine.run({**loader, **sampler_graph(["a", 0], ["a", 1])}))
    assert torch.tensor(patched).sub(torch.tensor(plain)).abs().max() > 1e-3
