"""LoRA loading and patching: formulas per file format, name spellings, exact restore, stacking, errors."""

from __future__ import annotations

import json

import pytest
import torch
from adapter_support import kohya_lora_for_all, save_safetensors, tiny_objects
from node_context import StubContext, make_env, run_node

from latentloom.nodes.diffusion import lora as lora_math
from latentloom.nodes.lora import LoraLoader, LoraLoaderModelOnly

pytestmark = pytest.mark.slow

# The same layers of the tiny SD1 UNet in LDM (openaimodel) and diffusers module paths, written out by hand from
# the two layouts (block_out_channels 32/32/64/64, 2 res blocks per level, attention on levels 0-2).
LDM_TO_DIFFUSERS = {
    "input_blocks_1_1_transformer_blocks_0_attn1_to_q": "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
    "input_blocks_5_1_proj_in": "down_blocks.1.attentions.1.proj_in",
    "input_blocks_4_0_in_layers_2": "down_blocks.1.resnets.0.conv1",
    "input_blocks_7_0_skip_connection": "down_blocks.2.resnets.0.conv_shortcut",
    "input_blocks_3_0_op": "down_blocks.0.downsamplers.0.conv",
    "middle_block_1_transformer_blocks_0_attn2_to_k": "mid_block.attentions.0.transformer_blocks.0.attn2.to_k",
    "middle_block_0_emb_layers_1": "mid_block.resnets.0.time_emb_proj",
    "output_blocks_2_1_conv": "up_blocks.0.upsamplers.0.conv",
    "output_blocks_5_2_conv": "up_blocks.1.upsamplers.0.conv",
    "output_blocks_4_1_transformer_blocks_0_ff_net_0_proj":
        "up_blocks.1.attentions.1.transformer_blocks.0.ff.net.0.proj",
    "output_blocks_4_1_transformer_blocks_0_attn1_to_out_0":
        "up_blocks.1.attentions.1.transformer_blocks.0.attn1.to_out.0",
    "time_embed_0": "time_embedding.linear_1",
}
TE_LAYER = "encoder.layers.1.self_attn.q_proj"


@pytest.fixture
def env(tmp_path):
    return make_env(models_dir=tmp_path / "models")


@pytest.fixture
def ctx(env):
    return StubContext(env)


def write_lora(env, name, tensors, metadata=None):
    save_safetensors(tensors, env.model_dirs["loras"][0] / name, metadata)
    return name


def patched_state(model, owner="model"):
    """The weights as the sampler sees them (inside prepared()), and after it exits."""
    target = model.unet if owner == "model" else model.encoders
    with model.prepared() as module:
        inside = {k: v.clone() for k, v in module.state_dict().items()}
    return inside, {k: v.clone() for k, v in target.state_dict().items()}


def random_factors(shape, rank, seed):
    g = torch.Generator().manual_seed(seed)
    if len(shape) == 4:
        return (torch.randn((shape[0], rank, 1, 1), generator=g), torch.randn((rank, *shape[1:]), generator=g))
    return torch.randn((shape[0], rank), generator=g), torch.randn((rank, shape[1]), generator=g)


def lora_delta64(up, down, shape):
    return (up.double().flatten(1) @ down.double().flatten(1)).reshape(shape)


# Formulas per format -----------------------------------------------------------------------------------------

def test_kohya_lora_and_locon_follow_the_formula(env, ctx):
    model, clip = tiny_objects("sd1")
    original = {k: v.clone() for k, v in model.unet.state_dict().items()}
    original_clip = {k: v.clone() for k, v in clip.encoders.state_dict().items()}
    tensors, expected = {}, {}
    rank, alpha, strength = 4, 3.0, 0.7
    for n, (ldm, diffusers_name) in enumerate(LDM_TO_DIFFUSERS.items()):
        shape = original[diffusers_name + ".weight"].shape
        up, down = random_factors(shape, rank, n)
        tensors.update({f"lora_unet_{ldm}.lora_up.weight": up, f"lora_unet_{ldm}.lora_down.weight": down,
                        f"lora_unet_{ldm}.alpha": torch.tensor(alpha)})
        expected[diffusers_name + ".weight"] = (original[diffusers_name + ".weight"].double()
                                                + strength * alpha / rank * lora_delta64(up, down, shape))
    te_shape = original_clip[f"l.{TE_LAYER}.weight"].shape
    up, down = random_factors(te_shape, 2, 99)  # no alpha: scale 1
    tensors.update({"lora_te_text_model_encoder_layers_1_self_attn_q_proj.lora_up.weight": up,
                    "lora_te_text_model_encoder_layers_1_self_attn_q_proj.lora_down.weight": down})
    name = write_lora(env, "kohya.safetensors", tensors)
    new_model, new_clip = LoraLoader.model_construct(model=model, clip=clip, lora_name=name, strength_model=strength,
                                                     strength_clip=-1.5).run(ctx)
    assert ctx.warnings == []
    inside, after = patched_state(new_model)
    for key, value in inside.items():
        if key in expected:
            assert torch.allclose(value.double(), expected[key], atol=1e-5, rtol=0), key
        else:
            assert torch.equal(value, original[key]), key
    assert all(torch.equal(after[k], original[k]) for k in original)
    clip_inside, _ = patched_state(new_clip, owner="clip")
    want = original_clip[f"l.{TE_LAYER}.weight"].double() - 1.5 * lora_delta64(up, down, te_shape)
    assert torch.allclose(clip_inside[f"l.{TE_LAYER}.weight"].double(), want, atol=1e-5, rtol=0)


def test_locon_with_tucker_mid_kernel(env, ctx):
    model, _ = tiny_objects("sd1")
    layer = "down_blocks.1.resnets.0.conv1"
    weight = model.unet.get_parameter(layer + ".weight").detach().clone()  # [32, 32, 3, 3]
    g = torch.Generator().manual_seed(3)
    rank = 4
    down = torch.randn((rank, 32, 1, 1), generator=g)
    mid = torch.randn((rank, rank, 3, 3), generator=g)
    up = torch.randn((32, rank, 1, 1), generator=g)
    key = "lora_unet_" + layer.replace(".", "_")
    name = write_lora(env, "tucker.safetensors", {f"{key}.lora_down.weight": down, f"{key}.lora_mid.weight": mid,
                                                  f"{key}.lora_up.weight": up, f"{key}.alpha": torch.tensor(2.0)})
    (patched,) = LoraLoaderModelOnly.model_construct(model=model, lora_name=name, strength_model=1.0).run(ctx)
    # Composite kernel of 1x1 down -> kxk mid -> 1x1 up: K[o,i] = sum_a,b up[o,a] mid[a,b] down[b,i].
    composite = torch.einsum("oa,abhw,bi->oihw", up.double().flatten(1), mid.double(), down.double().flatten(1))
    inside, _ = patched_state(patched)
    assert torch.allclose(inside[layer + ".weight"].double(), weight.double() + 0.5 * composite, atol=1e-5)


def test_loha_and_lokr_follow_their_formulas(env, ctx):
    model, _ = tiny_objects("sd1")
    q = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"   # [32, 32]
    ff = "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.2"     # [32, 128]
    wq = model.unet.get_parameter(q + ".weight").detach().double().clone()
    wf = model.unet.get_parameter(ff + ".weight").detach().double().clone()
    g = torch.Generator().manual_seed(5)
    r = 4
    w1a, w1b, w2a, w2b = (torch.randn(s, generator=g) for s in ((32, r), (r, 32), (32, r), (r, 32)))
    k1 = torch.randn((4, 8), generator=g)
    k2a, k2b = torch.randn((8, 2), generator=g), torch.randn((2, 16), generator=g)
    lq, lf = "lora_unet_" + q.replace(".", "_"), "lora_unet_" + ff.replace(".", "_")
    name = write_lora(env, "lyco.safetensors", {
        f"{lq}.hada_w1_a": w1a, f"{lq}.hada_w1_b": w1b, f"{lq}.hada_w2_a": w2a, f"{lq}.hada_w2_b": w2b,
        f"{lq}.alpha": torch.tensor(1.0),
        f"{lf}.lokr_w1": k1, f"{lf}.lokr_w2_a": k2a, f"{lf}.lokr_w2_b": k2b, f"{lf}.alpha": torch.tensor(1.0)})
    (patched,) = LoraLoaderModelOnly.model_construct(model=model, lora_name=name, strength_model=0.5).run(ctx)
    inside, _ = patched_state(patched)
    loha = (w1a.double() @ w1b.double()) * (w2a.double() @ w2b.double()) * (1.0 / r)
    lokr = torch.kron(k1.double(), k2a.double() @ k2b.double()) * (1.0 / 2)  # alpha / dim of the w2 factors
    assert torch.allclose(inside[q + ".weight"].double(), wq + 0.5 * loha, atol=1e-5)
    assert torch.allclose(inside[ff + ".weight"].double(), wf + 0.5 * lokr, atol=1e-5)


def test_peft_alpha_comes_from_the_metadata(env, ctx):
    model, clip = tiny_objects("sd1")
    q = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_v"
    weight = model.unet.get_parameter(q + ".weight").detach().double().clone()
    te_weight = clip.encoders.get_parameter(f"l.{TE_LAYER}.weight").detach().double().clone()
    up, down = random_factors(weight.shape, 4, 1)
    te_up, te_down = random_factors(te_weight.shape, 4, 2)
    tensors = {f"unet.{q}.lora_A.weight": down, f"unet.{q}.lora_B.weight": up,
               f"text_encoder.text_model.{TE_LAYER}.lora_A.weight": te_down,
               f"text_encoder.text_model.{TE_LAYER}.lora_B.weight": te_up}
    metadata = {"unet.r": 4, "unet.lora_alpha": 8, "text_encoder.r": 4, "text_encoder.lora_alpha": 2}
    with_meta = write_lora(env, "peft.safetensors", tensors, {"lora_adapter_metadata": json.dumps(metadata)})
    without = write_lora(env, "peft_plain.safetensors", tensors)
    m1, c1 = LoraLoader.model_construct(model=model, clip=clip, lora_name=with_meta, strength_model=1.0,
                                        strength_clip=1.0).run(ctx)
    m2, _ = LoraLoader.model_construct(model=model, clip=clip, lora_name=without, strength_model=1.0,
                                       strength_clip=1.0).run(ctx)
    delta = lora_delta64(up, down, weight.shape)
    assert torch.allclose(patched_state(m1)[0][q + ".weight"].double(), weight + 2.0 * delta, atol=1e-5)
    assert torch.allclose(patched_state(m2)[0][q + ".weight"].double(), weight + delta, atol=1e-5)  # alpha = r
    te_inside = patched_state(c1, "clip")[0][f"l.{TE_LAYER}.weight"].double()
    assert torch.allclose(te_inside, te_weight + 0.5 * lora_delta64(te_up, te_down, te_weight.shape), atol=1e-5)


def test_same_lora_in_three_namings_gives_identical_weights(env, ctx):
    model, _ = tiny_objects("sd1")
    rank, alpha = 4, 2.0
    kohya_ldm, kohya_diffusers, peft = {}, {}, {}
    for n, (ldm, diffusers_name) in enumerate(LDM_TO_DIFFUSERS.items()):
        up, down = random_factors(model.unet.get_parameter(diffusers_name + ".weight").shape, rank, n)
        for key, book in ((f"lora_unet_{ldm}", kohya_ldm),
                          ("lora_unet_" + diffusers_name.replace(".", "_"), kohya_diffusers)):
            book.update({f"{key}.lora_up.weight": up, f"{key}.lora_down.weight": down,
                         f"{key}.alpha": torch.tensor(alpha)})
        peft.update({f"unet.{diffusers_name}.lora_B.weight": up, f"unet.{diffusers_name}.lora_A.weight": down})
    meta = {"lora_adapter_metadata": json.dumps({"unet.r": rank, "unet.lora_alpha": alpha})}
    names = [write_lora(env, "ldm.safetensors", kohya_ldm), write_lora(env, "diff.safetensors", kohya_diffusers),
             write_lora(env, "peft.safetensors", peft, meta)]
    states = []
    for name in names:
        (patched,) = LoraLoaderModelOnly.model_construct(model=model, lora_name=name, strength_model=0.8).run(ctx)
        states.append(patched_state(patched)[0])
    assert ctx.warnings == []
    changed = [k for k in states[0] if not torch.equal(states[0][k], model.unet.state_dict()[k])]
    assert len(changed) == len(LDM_TO_DIFFUSERS)
    for other in states[1:]:
        assert all(torch.equal(states[0][k], other[k]) for k in states[0])


def test_sdxl_te1_te2_address_clip_l_and_clip_g(env, ctx):
    model, clip = tiny_objects("sdxl")
    layer_l = f"l.{TE_LAYER}.weight"
    layer_g = f"g.text_model.{TE_LAYER}.weight"
    originals = {k: clip.encoders.get_parameter(k).detach().double().clone() for k in (layer_l, layer_g)}
    up1, down1 = random_factors(originals[layer_l].shape, 2, 1)
    up2, down2 = random_factors(originals[layer_g].shape, 2, 2)
    key = "text_model_encoder_layers_1_self_attn_q_proj"
    name = write_lora(env, "xl.safetensors", {f"lora_te1_{key}.lora_up.weight": up1,
                                              f"lora_te1_{key}.lora_down.weight": down1,
                                              f"lora_te2_{key}.lora_up.weight": up2,
                                              f"lora_te2_{key}.lora_down.weight": down2})
    _, patched = LoraLoader.model_construct(model=model, clip=clip, lora_name=name, strength_model=1.0,
                                            strength_clip=1.0).run(ctx)
    inside = patched_state(patched, "clip")[0]
    assert torch.allclose(inside[layer_l].double(), originals[layer_l] + lora_delta64(up1, down1, (32, 32)), atol=1e-5)
    assert torch.allclose(inside[layer_g].double(), originals[layer_g] + lora_delta64(up2, down2, (32, 32)), atol=1e-5)


# Restore, strength 0, stacking, isolation ----------------------------------------------------------------------

def test_restore_is_bit_exact_over_many_cycles_and_fp16(env, ctx):
    model, clip = tiny_objects("sd1")
    model = type(model)(**{**model.__dict__, "unet": model.unet.half()})
    original = {k: v.clone() for k, v in model.unet.state_dict().items()}
    name = write_lora(env, "all.safetensors", kohya_lora_for_all(model, clip))
    (patched,) = LoraLoaderModelOnly.model_construct(model=model, lora_name=name, strength_model=1.3).run(ctx)
    for _ in range(20):
        with patched.prepared() as unet:
            q = unet.get_parameter("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight")
            assert q.dtype == torch.float16
            assert not torch.equal(q, original["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight"])
    assert all(torch.equal(v, original[k]) for k, v in model.unet.state_dict().items())


def test_strength_zero_is_a_no_op(env, ctx):
    model, clip = tiny_objects("sd1")
    name = write_lora(env, "all.safetensors", kohya_lora_for_all(model, clip))
    same_model, same_clip = LoraLoader.model_construct(model=model, clip=clip, lora_name=name, strength_model=0.0,
                                                       strength_clip=0.0).run(ctx)
    assert same_model is model and same_clip is clip
    patched_model, untouched_clip = LoraLoader.model_construct(model=model, clip=clip, lora_name=name,
                                                               strength_model=1.0, strength_clip=0.0).run(ctx)
    assert untouched_clip is clip and patched_model.patches
    (only,) = LoraLoaderModelOnly.model_construct(model=model, lora_name=name, strength_model=0.0).run(ctx)
    assert only is model


def test_stacked_loras_add_in_order_and_share_one_patch(env, ctx):
    model, clip = tiny_objects("sd1")
    a = write_lora(env, "a.safetensors", kohya_lora_for_all(model, clip, seed=1))
    b = write_lora(env, "b.safetensors", kohya_lora_for_all(model, clip, rank=2, alpha=1.0, seed=2))
    key = "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_out.0.weight"
    base = model.unet.state_dict()[key].double().clone()
    m1, c1 = LoraLoader.model_construct(model=model, clip=clip, lora_name=a, strength_model=0.6,
                                        strength_clip=1.0).run(ctx)
    m2, _ = LoraLoader.model_construct(model=m1, clip=c1, lora_name=b, strength_model=-0.4,
                                       strength_clip=1.0).run(ctx)
    assert len(m2.patches) == 1 and len(m1.patches) == 1
    module_key = "lora_unet_" + key[: -len(".weight")].replace(".", "_")
    ta, tb = kohya_lora_for_all(model, clip, seed=1), kohya_lora_for_all(model, clip, rank=2, alpha=1.0, seed=2)

    def delta(t, rank, alpha):
        return alpha / rank * lora_delta64(t[f"{module_key}.lora_up.weight"], t[f"{module_key}.lora_down.weight"],
                                           base.shape)
    want = base + 0.6 * delta(ta, 4, 2.0) - 0.4 * delta(tb, 2, 1.0)
    assert torch.allclose(patched_state(m2)[0][key].double(), want, atol=1e-5)
    # The first clone still sees only its own LoRA, the original none.
    assert torch.allclose(patched_state(m1)[0][key].double(), base + 0.6 * delta(ta, 4, 2.0), atol=1e-5)
    with model.prepared() as unet:
        assert torch.equal(unet.state_dict()[key].double(), base)


def test_changing_strength_never_reloads_the_file_or_the_model(env, ctx):
    model, clip = tiny_objects("sd1")
    name = write_lora(env, "all.safetensors", kohya_lora_for_all(model, clip))
    manager = env.models
    for strength in (0.5, 1.0, 0.25):
        patched, _ = LoraLoader.model_construct(model=model, clip=clip, lora_name=name, strength_model=strength,
                                                strength_clip=strength).run(ctx)
        assert patched.unet is model.unet
    stats = manager.stats()
    assert stats.loads == 1 and stats.hits == 2


# Errors and warnings -----------------------------------------------------------------------------------------

def test_unmatched_keys_are_warned(env, ctx):
    model, clip = tiny_objects("sd1")
    tensors = kohya_lora_for_all(model, clip)
    tensors["lora_unet_no_such_block_0_proj.lora_up.weight"] = torch.zeros(4, 2)
    tensors["lora_unet_no_such_block_0_proj.lora_down.weight"] = torch.zeros(2, 4)
    name = write_lora(env, "partial.safetensors", tensors)
    LoraLoader.model_construct(model=model, clip=clip, lora_name=name, strength_model=1.0,
                               strength_clip=1.0).run(ctx)
    assert len(ctx.warnings) == 1 and "lora_unet_no_such_block_0_proj" in ctx.warnings[0]


def test_model_only_ignores_text_encoder_keys_quietly(env, ctx):
    model, clip = tiny_objects("sd1")
    name = write_lora(env, "all.safetensors", kohya_lora_for_all(model, clip))
    (patched,) = LoraLoaderModelOnly.model_construct(model=model, lora_name=name, strength_model=1.0).run(ctx)
    assert ctx.warnings == [] and patched.patches


def test_lora_of_another_architecture_is_a_clear_node_error(env, ctx):
    model, clip = tiny_objects("sd1")
    xl_model, xl_clip = tiny_objects("sdxl")
    name = write_lora(env, "xl.safetensors", kohya_lora_for_all(xl_model, xl_clip))
    with pytest.raises(ValueError,
                       match=r"LoraLoader \(#1\): input 'lora_name': xl.safetensors: does not fit this sd1 model"):
        run_node(LoraLoader, ctx, model=model, clip=clip, lora_name=name, strength_model=1.0, strength_clip=1.0)
    junk = write_lora(env, "junk.safetensors", {"some.other.weight": torch.zeros(3)})
    with pytest.raises(ValueError, match=r"LoraLoaderModelOnly \(#1\): input 'lora_name': junk.safetensors: "
                                         r".*another architecture"):
        run_node(LoraLoaderModelOnly, ctx, model=model, lora_name=junk, strength_model=1.0)
    with pytest.raises(FileNotFoundError, match=r"LoraLoader \(#1\): input 'lora_name': loras file "
                                                r"'missing.safetensors' not found"):
        run_node(LoraLoader, ctx, model=model, clip=clip, lora_name="missing.safetensors", strength_model=1.0,
                 strength_clip=1.0)
    with pytest.raises(ValueError, match=r"LoraLoader \(#1\): input 'clip': must be a CLIP model"):
        run_node(LoraLoader, ctx, model=model, clip=None, lora_name=name, strength_model=1.0, strength_clip=1.0)


def test_key_split_prefers_longest_suffix():
    assert lora_math.split_key("a.attn1.processor.to_q_lora.up.weight") == ("a.attn1.processor.to_q", "up")
    assert lora_math.split_key("x.lora_linear_layer.down.weight") == ("x", "down")
    assert lora_math.split_key("x.lokr_w1_a") == ("x", "lokr_w1_a")
    assert lora_math.split_key("x.weight") is None


@pytest.mark.parametrize("kind, shapes", [
    ("lora", {"up": (8, 4), "down": (4, 6)}),
    ("lora", {"up": (8, 4, 1, 1), "down": (4, 6, 3, 3)}),
    ("lora", {"up": (8, 4, 1, 1), "down": (4, 6, 1, 1), "mid": (4, 4, 3, 3)}),
    ("loha", {"hada_w1_a": (8, 2), "hada_w1_b": (2, 6), "hada_w2_a": (8, 2), "hada_w2_b": (2, 6)}),
    ("loha", {"hada_w1_a": (8, 2), "hada_w1_b": (2, 6, 3, 3), "hada_w2_a": (8, 2), "hada_w2_b": (2, 6, 3, 3)}),
    ("loha", {"hada_w1_a": (2, 8), "hada_w1_b": (2, 6), "hada_t1": (2, 2, 3, 3), "hada_w2_a": (2, 8),
              "hada_w2_b": (2, 6), "hada_t2": (2, 2, 3, 3)}),
    ("lokr", {"lokr_w1": (2, 3), "lokr_w2_a": (4, 2), "lokr_w2_b": (2, 5)}),
    ("lokr", {"lokr_w1_a": (2, 1), "lokr_w1_b": (1, 3), "lokr_w2": (4, 5, 3, 3)}),
    ("lokr", {"lokr_w1": (2, 3), "lokr_w2_a": (2, 4), "lokr_w2_b": (2, 5), "lokr_t2": (2, 2, 3, 3)}),
])
def test_shape_check_agrees_with_the_computed_change(kind, shapes):
    g = torch.Generator().manual_seed(0)
    adapter = lora_math.Adapter("k", kind, {name: torch.randn(shape, generator=g) for name, shape in shapes.items()})
    count = adapter.change_numel()
    change, _ = adapter.delta(torch.Size([count]), torch.device("cpu"))
    assert change.numel() == count
    with pytest.raises(lora_math.LoraFormatError):
        adapter.delta(torch.Size([count + 1]), torch.device("cpu"))


# SDXL's layout (no attention on level 0; two transformer blocks on the last level) and SD2's single encoder.
SDXL_LDM_TO_DIFFUSERS = {
    "input_blocks_4_1_transformer_blocks_0_attn1_to_q": "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
    "input_blocks_7_1_transformer_blocks_1_ff_net_2": "down_blocks.2.attentions.0.transformer_blocks.1.ff.net.2",
    "output_blocks_0_1_transformer_blocks_1_attn2_to_k": "up_blocks.0.attentions.0.transformer_blocks.1.attn2.to_k",
    "middle_block_1_proj_in": "mid_block.attentions.0.proj_in",
    "label_emb_0_0": "add_embedding.linear_1",
}


def test_sdxl_ldm_names_and_sd2_text_encoder(env, ctx):
    model, _ = tiny_objects("sdxl")
    tensors, expected = {}, {}
    for n, (ldm, diffusers_name) in enumerate(SDXL_LDM_TO_DIFFUSERS.items()):
        weight = model.unet.get_parameter(diffusers_name + ".weight").detach().double().clone()
        up, down = random_factors(weight.shape, 2, n)
        tensors.update({f"lora_unet_{ldm}.lora_up.weight": up, f"lora_unet_{ldm}.lora_down.weight": down})
        expected[diffusers_name + ".weight"] = weight + lora_delta64(up, down, weight.shape)
    (patched,) = LoraLoaderModelOnly.model_construct(model=model, lora_name=write_lora(env, "xl.safetensors", tensors),
                                                     strength_model=1.0).run(ctx)
    inside = patched_state(patched)[0]
    for key, want in expected.items():
        assert torch.allclose(inside[key].double(), want, atol=1e-5), key
    sd2_model, sd2_clip = tiny_objects("sd2")
    key = f"h.text_model.{TE_LAYER}.weight"
    weight = sd2_clip.encoders.get_parameter(key).detach().double().clone()
    up, down = random_factors(weight.shape, 2, 7)
    name = write_lora(env, "sd2.safetensors", {
        "lora_te_text_model_encoder_layers_1_self_attn_q_proj.lora_up.weight": up,
        "lora_te_text_model_encoder_layers_1_self_attn_q_proj.lora_down.weight": down})
    _, clip = LoraLoader.model_construct(model=sd2_model, clip=sd2_clip, lora_name=name, strength_model=1.0,
                                         strength_clip=2.0).run(ctx)
    want = weight + 2 * lora_delta64(up, down, weight.shape)
    assert torch.allclose(patched_state(clip, "clip")[0][key].double(), want, atol=1e-5)


@pytest.mark.parametrize("on_output_axis", [True, False])
def test_dora_rescales_to_the_stored_magnitude(env, ctx, on_output_axis):
    model, _ = tiny_objects("sd1")
    q = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k"
    weight = model.unet.get_parameter(q + ".weight").detach().double().clone()   # [32, 32]
    up, down = random_factors(weight.shape, 4, 11)
    g = torch.Generator().manual_seed(12)
    magnitude = torch.rand((32, 1) if on_output_axis else (1, 32), generator=g) + 0.5
    key = "lora_unet_" + q.replace(".", "_")
    name = write_lora(env, f"dora{on_output_axis}.safetensors", {
        f"{key}.lora_up.weight": up, f"{key}.lora_down.weight": down, f"{key}.alpha": torch.tensor(2.0),
        f"{key}.dora_scale": magnitude})
    (patched,) = LoraLoaderModelOnly.model_construct(model=model, lora_name=name, strength_model=0.7).run(ctx)
    combined = weight + 0.5 * lora_delta64(up, down, weight.shape)
    if on_output_axis:   # norm of each output row of the weight before the adapter
        norm = weight.norm(dim=1, keepdim=True)
    else:                # norm of each input column of the adapted weight
        norm = combined.norm(dim=0, keepdim=True)
    rescaled = combined * magnitude.double() / (norm + torch.finfo(torch.float32).eps)
    want = weight + 0.7 * (rescaled - weight)
    assert ctx.warnings == []
    assert torch.allclose(patched_state(patched)[0][q + ".weight"].double(), want, atol=1e-5)
