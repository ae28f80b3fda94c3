"""The model-patch API (nodes.diffusion.patches): clones share weights and never share patches, CFG hooks get
ComfyUI's argument dicts and compose in order, UNet patches reach the diffusers UNet at ComfyUI's points, weight
patches are exact and kept on the module by the memory manager only while the same set is asked for."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from adapter_support import tiny_objects  # noqa: E402

from latentloom.engine.memory import ModelManager  # noqa: E402
from latentloom.nodes.diffusion.denoiser import GuidedDenoiser, ModelCall  # noqa: E402
from latentloom.nodes.diffusion.models import SamplingConfig  # noqa: E402
from latentloom.nodes.diffusion.patches import WeightDiffPatch  # noqa: E402
from latentloom.nodes.diffusion.sampling_conds import prepare_conditioning  # noqa: E402
from latentloom.nodes.diffusion.schedules import DiscreteSchedule  # noqa: E402
from latentloom.nodes.diffusion.unet_hooks import block_layout, default_attention  # noqa: E402

SCHEDULE = DiscreteSchedule()
SHAPE = (1, 4, 8, 8)


@pytest.fixture(scope="module")
def model():
    return tiny_objects("sd1", 0)[0]


def context(value, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn((1, 77, 32), generator=g) * value, {}]


def guided(model, cfg=5.0):
    prepared = prepare_conditioning({"positive": [context(1.0, 1)], "negative": [context(1.0, 2)]},
                                    torch.Size(SHAPE), SCHEDULE, torch.device("cpu"), model.unet.config, "sd1")
    return GuidedDenoiser(ModelCall(model, model.unet, SCHEDULE), prepared["positive"], prepared["negative"], cfg)


def inputs():
    g = torch.Generator().manual_seed(0)
    return torch.randn(SHAPE, generator=g) * 3.0, torch.tensor([3.0])


def predictions(model):
    """(cond, uncond) denoised predictions of the plain model, each evaluated on its own."""
    x, sigma = inputs()
    denoiser = guided(model)
    return [denoiser.weighted_predictions(x, sigma, [entries])[0] for entries in (denoiser.positive,
                                                                                   denoiser.negative)]


# Cloning -------------------------------------------------------------------------------------------------------

def test_clone_shares_weights_and_patching_never_changes_the_receiver(model):
    def cfg_a(args):
        return args["uncond"]

    patched = model.set_sampler_cfg_function(cfg_a).set_model_attn1_patch(lambda n, c, v, e: (n, c, v))
    assert patched.unet is model.unet
    assert model.options == {} and "sampler_cfg_function" in patched.options
    branch_a = patched.add_sampler_post_cfg_function(lambda args: args["denoised"])
    branch_b = patched.set_model_attn1_patch(lambda n, c, v, e: (n, c, v))
    # The two branches of one parent are independent at every level of the nested options.
    assert "sampler_post_cfg_function" not in branch_b.options and "sampler_post_cfg_function" not in patched.options
    assert len(branch_a.options["transformer_options"]["patches"]["attn1_patch"]) == 1
    assert len(branch_b.options["transformer_options"]["patches"]["attn1_patch"]) == 2
    assert len(patched.options["transformer_options"]["patches"]["attn1_patch"]) == 1
    assert branch_a.with_sampling(SamplingConfig(prediction="v")).prediction == "v" and branch_a.prediction == "eps"


# CFG hooks -----------------------------------------------------------------------------------------------------

def test_cfg_function_gets_comfyui_arguments_and_replaces_the_formula(model):
    cond, uncond = predictions(model)
    x, sigma = inputs()
    seen = {}

    def half_cfg(args):
        seen.update(args)
        return args["uncond"] + (args["cond"] - args["uncond"]) * args["cond_scale"] * 0.5

    out = guided(model.set_sampler_cfg_function(half_cfg))(x, sigma)
    plain = guided(model)(x, sigma)
    assert {"cond", "uncond", "cond_scale", "timestep", "input", "sigma", "cond_denoised", "uncond_denoised",
            "model", "model_options"} <= set(seen)
    # The denoised predictions are the model's (batched together, so equal to separate calls up to float noise).
    torch.testing.assert_close(seen["cond_denoised"], cond, atol=2e-3, rtol=0)
    torch.testing.assert_close(seen["uncond_denoised"], uncond, atol=2e-3, rtol=0)
    c, u = seen["cond_denoised"], seen["uncond_denoised"]
    torch.testing.assert_close(seen["cond"], x - c)           # noise predictions: x − D
    torch.testing.assert_close(seen["uncond"], x - u)
    assert seen["cond_scale"] == 5.0 and torch.equal(seen["sigma"], sigma) and torch.equal(seen["input"], x)
    torch.testing.assert_close(out, u + (c - u) * 2.5, atol=1e-5, rtol=0)
    torch.testing.assert_close(plain, u + (c - u) * 5.0, atol=1e-5, rtol=0)


def test_pre_and_post_cfg_functions_compose_in_order(model):
    x, sigma = inputs()
    order = []

    def swap(args):
        order.append("pre")
        assert set(args) >= {"conds_out", "cond_scale", "timestep", "input", "sigma", "model", "model_options"}
        return [args["conds_out"][1], args["conds_out"][0]]

    def times_two(args):
        order.append("post×2")
        assert set(args) >= {"denoised", "cond", "uncond", "model", "uncond_denoised", "cond_denoised", "sigma",
                             "model_options", "input"}
        return args["denoised"] * 2.0

    def plus_input(args):
        order.append("post+x")
        return args["denoised"] + args["input"]

    patched = (model.add_sampler_post_cfg_function(times_two).add_sampler_pre_cfg_function(swap)
               .add_sampler_post_cfg_function(plus_input))
    out = guided(patched)(x, sigma)
    seen = {}
    guided(model.set_sampler_cfg_function(lambda args: seen.update(args) or args["cond"]))(x, sigma)
    cond, uncond = seen["cond_denoised"], seen["uncond_denoised"]
    swapped = cond + (uncond - cond) * 5.0
    torch.testing.assert_close(out, swapped * 2.0 + x, atol=1e-5, rtol=0)
    assert order == ["pre", "post×2", "post+x"]


def test_hook_model_reruns_the_unet_with_other_options(model):
    """What PAG / SAG do: a post-CFG function evaluates the positive again with an attention replaced (here
    input block 1: at this latent size the middle block sees a single token, where attention is the identity)."""
    x, sigma = inputs()
    identity_attention = []

    def pag_like(args):
        options = args["model"].model_options
        from latentloom.nodes.diffusion.patches import with_transformer_replace

        def value_only(q, k, v, extra):
            identity_attention.append(extra["block"])
            return v

        changed = with_transformer_replace(options, "attn1", value_only, "input", 1, 0)
        (perturbed,) = args["model"].calc_cond_batch([args["cond"]], args["input"], args["sigma"], changed)
        return perturbed

    out = guided(model.add_sampler_post_cfg_function(pag_like))(x, sigma)
    assert identity_attention and set(identity_attention) == {("input", 1)}
    assert "patches_replace" not in model.options.get("transformer_options", {})
    cond, _ = predictions(model)
    assert (out - cond).abs().max() > 1e-2   # the middle attention really changed


# UNet patches --------------------------------------------------------------------------------------------------

def unet_output(model, options=None, latent=None):
    """One denoised prediction through ModelCall with the model's (or the given) options."""
    x = latent if latent is not None else inputs()[0]
    g = torch.Generator().manual_seed(5)
    ctx = torch.randn((x.shape[0], 77, 32), generator=g)
    return ModelCall(model, model.unet, SCHEDULE)(x, torch.tensor([3.0] * x.shape[0]), ctx, options=options)


def copy_model(model):
    import copy
    return model.clone(unet=copy.deepcopy(model.unet))


def test_identity_patches_change_nothing_and_leave_no_processor_behind(model):
    plain = unet_output(model)
    before = {name: type(p) for name, p in model.unet.attn_processors.items()}
    identity = (model.set_model_attn1_patch(lambda n, c, v, e: (n, c, v))
                .set_model_attn2_output_patch(lambda out, e: out)
                .set_model_input_block_patch(lambda h, to: h)
                .set_model_output_block_patch(lambda h, skip, to: (h, skip)))
    assert torch.equal(unet_output(identity), plain)
    assert {name: type(p) for name, p in model.unet.attn_processors.items()} == before
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.unet.modules())


@pytest.mark.slow
def test_attention_patches_match_the_equivalent_weight_edits(model):
    # attn1 output × 0 everywhere == every attn1.to_out.0 weight and bias zeroed.
    reference = copy_model(model)
    with torch.no_grad():
        for name, module in reference.unet.named_modules():
            if name.endswith("attn1.to_out.0"):
                module.weight.zero_()
                module.bias.zero_()
    torch.testing.assert_close(unet_output(model.set_model_attn1_output_patch(lambda out, e: out * 0.0)),
                               unet_output(reference), atol=1e-5, rtol=0)
    # attn2's value input × 2 (key unchanged) == every attn2.to_v weight doubled (SD's to_v has no bias).
    reference = copy_model(model)
    with torch.no_grad():
        for name, module in reference.unet.named_modules():
            if name.endswith("attn2.to_v"):
                module.weight.mul_(2.0)
    torch.testing.assert_close(unet_output(model.set_model_attn2_patch(lambda n, c, v, e: (n, c, v * 2.0))),
                               unet_output(reference), atol=1e-5, rtol=0)


def test_attention_replace_receives_projections_per_block(model):
    seen = []

    def plain_attention(q, k, v, extra):
        seen.append((extra["block"], extra["block_index"], extra["n_heads"], tuple(extra["original_shape"])))
        return default_attention(q, k, v, extra["n_heads"])

    patched = model.set_model_attn2_replace(plain_attention, "output", 4).set_model_attn2_replace(
        plain_attention, "input", 1, 0)
    torch.testing.assert_close(unet_output(patched), unet_output(model), atol=1e-5, rtol=0)
    assert sorted({s[0] for s in seen}) == [("input", 1), ("output", 4)]
    assert all(s[1] == 0 and s[3] == SHAPE for s in seen)


def test_block_ids_follow_ldm_numbering(model):
    layout = block_layout(model.unet)
    # SD1 layout: 12 input blocks (conv_in, 3 levels × (2 resnets + downsampler), 2 resnets), 12 output blocks.
    assert [block_id for block_id, _, _ in layout.inputs] == list(range(12))
    assert layout.inputs[3][1] is model.unet.down_blocks[0].downsamplers[0]
    assert [block_id for block_id, _, _ in layout.outputs] == list(range(12))
    assert layout.outputs[3][1] is model.unet.up_blocks[1].resnets[0]


def test_input_block_patch_on_conv_in_equals_a_scaled_conv_in(model):
    def double_first(h, to):
        return h * 2.0 if to["block"] == ("input", 0) else h

    reference = copy_model(model)
    with torch.no_grad():
        reference.unet.conv_in.weight.mul_(2.0)
        reference.unet.conv_in.bias.mul_(2.0)
    torch.testing.assert_close(unet_output(model.set_model_input_block_patch(double_first)),
                               unet_output(reference), atol=1e-5, rtol=0)


def test_output_block_patch_reproduces_diffusers_freeu(model):
    """The output-block patch point sits exactly where diffusers applies FreeU (before the skip concatenation)."""
    from diffusers.utils.torch_utils import apply_freeu

    factors = {"b1": 1.3, "b2": 1.4, "s1": 0.9, "s2": 0.2}
    per_level = len(model.unet.up_blocks[0].resnets)

    def diffusers_rule(h, skip, to):
        return apply_freeu(to["block"][1] // per_level, h.clone(), skip, **factors)

    latent = torch.randn((1, 4, 16, 16), generator=torch.Generator().manual_seed(3))
    ours = unet_output(model.set_model_output_block_patch(diffusers_rule), latent=latent)
    reference = copy_model(model)
    reference.unet.enable_freeu(**factors)
    torch.testing.assert_close(ours, unet_output(reference, latent=latent), atol=1e-5, rtol=0)


def test_function_wrapper_wraps_each_call(model):
    calls = []

    def wrapper(apply_model, args):
        calls.append((sorted(args), args["cond_or_uncond"]))
        return apply_model(args["input"], args["timestep"], **args["c"]) * 0.5

    x, sigma = inputs()
    plain = guided(model)(x, sigma)
    out = guided(model.set_model_unet_function_wrapper(wrapper))(x, sigma)
    assert calls == [(["c", "cond_or_uncond", "input", "timestep"], [1, 0])]  # ComfyUI's order: negative first
    torch.testing.assert_close(out, plain * 0.5, atol=1e-5, rtol=0)


# Weight patches and the memory manager --------------------------------------------------------------------------

def test_add_patches_is_exact_and_restored_bit_exactly(model):
    name = "down_blocks.0.resnets.0.conv1.weight"
    original = model.unet.get_parameter(name).detach().clone()
    diff = torch.randn(original.shape, generator=torch.Generator().manual_seed(1))
    patched = model.add_patches({name: diff}, strength_patch=0.25, strength_model=0.5)
    with patched.prepared() as unet:
        inside = unet.get_parameter(name).detach().clone()
    torch.testing.assert_close(inside.double(), original.double() * 0.5 + 0.25 * diff.double(), atol=1e-6, rtol=0)
    assert torch.equal(model.unet.get_parameter(name), original)
    with pytest.raises(KeyError, match="no_such"):
        model.add_patches({"no_such.weight": diff})


def test_manager_keeps_the_applied_set_until_another_is_asked_for(model):
    name = "conv_in.weight"
    original = model.unet.get_parameter(name).detach().clone()
    applied = []

    class Counting:
        def __init__(self, scale):
            self.inner = WeightDiffPatch(((name, None, 0.0, scale),))

        def apply(self, module):
            applied.append(self)
            return self.inner.apply(module)

    first, second = Counting(2.0), Counting(3.0)
    a, b = model.with_patches(first), model.with_patches(second)
    manager = ModelManager(device="cpu")
    for _ in range(3):
        with a.prepared(manager) as unet:
            assert torch.equal(unet.get_parameter(name), original * 2.0)
    assert applied == [first]                                  # warm: applied once, kept between calls
    assert torch.equal(model.unet.get_parameter(name), original * 2.0)
    with b.prepared(manager) as unet:                        # another set: restore exactly, then apply
        assert torch.equal(unet.get_parameter(name), original * 3.0)
    with model.prepared(manager) as unet:                    # the plain model: pristine weights
        assert torch.equal(unet.get_parameter(name), original)
    assert applied == [first, second] and manager.applied_changes(model.unet) == ()
    with a.prepared(manager):
        pass
    manager.free_all()                                          # forgetting the module restores it
    assert torch.equal(model.unet.get_parameter(name), original)
