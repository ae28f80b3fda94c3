"""Model-patch nodes (nodes/model_patches.py) against independent references: diffusers' FreeU maths, the
formulas written out, weight edits made by hand, and a tiny-checkpoint graph where a patched branch and a plain
branch of one model run side by side."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from adapter_support import tiny_objects  # noqa: E402
from branch_graphs import branches_graph, probe_engine, probed_latents  # noqa: E402
from node_context import StubContext, make_env  # noqa: E402

from latentloom.nodes.diffusion import unet_patches  # noqa: E402
from latentloom.nodes.model_patches import (  # noqa: E402
    CLIPAttentionMultiply,
    EpsilonScaling,
    FreeU,
    FreeU_V2,
    UNetCrossAttentionMultiply,
    UNetSelfAttentionMultiply,
)

# Each test builds and runs tiny diffusers UNets (or whole graphs on them): seconds apiece.
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def objects():
    return tiny_objects("sd1", 0)


@pytest.fixture
def ctx():
    return StubContext(make_env())


def test_fourier_filter_matches_diffusers():
    from diffusers.utils.torch_utils import fourier_filter

    x = torch.randn((2, 6, 8, 12), generator=torch.Generator().manual_seed(0))
    for scale in (0.2, 0.9, 1.7):
        torch.testing.assert_close(unet_patches.fourier_filter(x, 1, scale), fourier_filter(x, 1, scale))


def test_freeu_scales_by_channel_width_as_comfyui_does(objects, ctx):
    from diffusers.utils.torch_utils import apply_freeu

    model = objects[0]
    (patched,) = FreeU.model_construct(model=model, b1=1.5, b2=1.2, s1=0.7, s2=0.3).run(ctx)
    (patch,) = patched.options["transformer_options"]["patches"]["output_block_patch"]
    assert "transformer_options" not in model.options
    g = torch.Generator().manual_seed(1)
    width = model.unet.config.block_out_channels[0]  # ComfyUI's model_channels
    for channels, stage in ((4 * width, 0), (2 * width, 1)):
        h, skip = torch.randn((1, channels, 4, 4), generator=g), torch.randn((1, channels, 4, 4), generator=g)
        ours = patch(h, skip, {})
        reference = apply_freeu(stage, h.clone(), skip.clone(), b1=1.5, b2=1.2, s1=0.7, s2=0.3)
        torch.testing.assert_close(ours[0], reference[0])
        torch.testing.assert_close(ours[1], reference[1])
    other = torch.randn((1, 3 * width, 4, 4), generator=g)
    assert patch(other, other, {})[0] is other  # widths other than 2× / 4× pass through


def test_freeu_v2_scales_by_the_normalised_mean(objects, ctx):
    model = objects[0]
    (patched,) = FreeU_V2.model_construct(model=model, b1=1.3, b2=1.6, s1=0.9, s2=0.5).run(ctx)
    (patch,) = patched.options["transformer_options"]["patches"]["output_block_patch"]
    channels = 2 * model.unet.config.block_out_channels[0]
    h = torch.randn((2, channels, 4, 4), generator=torch.Generator().manual_seed(2))
    out, _ = patch(h, h, {})
    for image in range(2):
        mean = h[image].mean(0)
        m = (mean - mean.min()) / (mean.max() - mean.min())
        expected = h[image, : channels // 2] * (0.6 * m + 1)
        torch.testing.assert_close(out[image, : channels // 2], expected)
        torch.testing.assert_close(out[image, channels // 2:], h[image, channels // 2:])


def test_epsilon_scaling_divides_the_guided_noise(objects, ctx):
    (patched,) = EpsilonScaling.model_construct(model=objects[0], scaling_factor=1.25).run(ctx)
    (post,) = patched.options["sampler_post_cfg_function"]
    x, denoised = torch.full((1, 4, 2, 2), 3.0), torch.full((1, 4, 2, 2), 1.0)
    torch.testing.assert_close(post({"input": x, "denoised": denoised}), torch.full((1, 4, 2, 2), 3.0 - 2.0 / 1.25))


@pytest.mark.parametrize("node, attention", [(UNetSelfAttentionMultiply, "attn1"),
                                             (UNetCrossAttentionMultiply, "attn2")])
def test_unet_attention_multiply_scales_the_projections(objects, ctx, node, attention):
    model = objects[0]
    original = {k: v.clone() for k, v in model.unet.state_dict().items()}
    (patched,) = node.model_construct(model=model, q=2.0, k=1.0, v=0.5, out=3.0).run(ctx)
    with patched.prepared() as unet:
        inside = {k: v.clone() for k, v in unet.state_dict().items()}
    factors = {"to_q": 2.0, "to_v": 0.5, "to_out.0": 3.0}
    changed = 0
    for key, value in inside.items():
        factor = next((f for proj, f in factors.items() if f".{attention}.{proj}." in key), 1.0)
        torch.testing.assert_close(value, original[key] * factor, atol=1e-6, rtol=0)
        changed += factor != 1.0
    assert changed > 0 and all(torch.equal(model.unet.state_dict()[k], original[k]) for k in original)


def test_clip_attention_multiply_scales_the_text_encoder(objects, ctx):
    clip = objects[1]
    original = {k: v.clone() for k, v in clip.encoders.state_dict().items()}
    (patched,) = CLIPAttentionMultiply.model_construct(clip=clip, q=1.0, k=0.0, v=1.0, out=1.0).run(ctx)
    with patched.prepared() as modules:
        inside = {k: v.clone() for k, v in modules.state_dict().items()}
    keys = [k for k in original if ".self_attn.k_proj." in k]
    assert keys and all(torch.count_nonzero(inside[k]) == 0 for k in keys)
    assert all(torch.equal(inside[k], original[k]) for k in original if k not in keys)


# End to end ----------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    return probe_engine(tmp_path_factory, "model_patches")


@pytest.mark.parametrize("node", ["FreeU", "FreeU_V2", "Epsilon Scaling", "UNetSelfAttentionMultiply"])
def test_patched_branch_changes_and_the_plain_branch_of_the_same_model_does_not(engine, node):
    inputs = {"model": ["ckpt", 0]}
    if node.startswith("FreeU"):
        inputs.update(b1=1.5, b2=1.6, s1=0.5, s2=0.3)
    elif node == "Epsilon Scaling":
        inputs.update(scaling_factor=1.2)
    elif node == "UNetSelfAttentionMultiply":
        inputs.update(q=1.0, k=1.0, v=2.0, out=1.0)
    graph = branches_graph({"patch": {"class_type": node, "inputs": inputs}}, "patch")
    both = probed_latents(engine.run(graph))
    # The plain branch alone, in a graph with no patch node at all.
    alone = {k: v for k, v in graph.items() if k not in ("patch", "patched", "probe_patched")}
    plain = probed_latents(engine.run(alone))["plain"]
    assert torch.equal(both["plain"], plain)
    assert (both["patched"] - plain).abs().max() > 1e-3
    # Running the patched graph again gives the same latent (the patch set is re-applied or kept exactly).
    rerun = probed_latents(engine.run({**graph, "patched": {**graph["patched"], "inputs": {
        **graph["patched"]["inputs"], "seed": 3}}, "plain": {**graph["plain"], "inputs": {
            **graph["plain"]["inputs"], "seed": 4}}}))
    assert torch.equal(rerun["patched"], both["patched"])
