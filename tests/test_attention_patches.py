"""Attention / guidance patch nodes (nodes/attention_patches.py) against independent references: diffusers' SAG
pipeline and PAG attention processor on a tiny UNet, the FreSca and Differential Diffusion formulas written out,
HyperTile as explicit per-tile attention, ToMe's matching by brute force; and a tiny-checkpoint graph per node
where a patched branch and a plain branch of one model run side by side."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import math  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from adapter_support import tiny_objects  # noqa: E402
from branch_graphs import branches_graph, probe_engine, probed_latents  # noqa: E402
from node_context import StubContext, make_env  # noqa: E402

from latentloom.nodes.attention_patches import (  # noqa: E402
    DifferentialDiffusion,
    FreSca,
    HyperTile,
    PerturbedAttentionGuidance,
    SelfAttentionGuidance,
    TomePatchModel,
)
from latentloom.nodes.diffusion import attention_guidance, token_patches  # noqa: E402
from latentloom.nodes.diffusion.denoiser import GuidedDenoiser, InpaintDenoiser, ModelCall  # noqa: E402
from latentloom.nodes.diffusion.sampling_conds import prepare_conditioning  # noqa: E402
from latentloom.nodes.diffusion.schedules import DiscreteSchedule  # noqa: E402

SCHEDULE = DiscreteSchedule()
CFG = 5.0


# Each test builds and runs tiny diffusers UNets (or whole graphs on them): seconds apiece.
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def model():
    return tiny_objects("sd1", 0)[0]


@pytest.fixture
def ctx():
    return StubContext(make_env())


def contexts():
    g = torch.Generator().manual_seed(1)
    return torch.randn((1, 77, 32), generator=g), torch.randn((1, 77, 32), generator=g)  # positive, negative


def guided(model, shape):
    positive, negative = contexts()
    prepared = prepare_conditioning({"positive": [[positive, {}]], "negative": [[negative, {}]]}, torch.Size(shape),
                                    SCHEDULE, torch.device("cpu"), model.unet.config, "sd1")
    return GuidedDenoiser(ModelCall(model, model.unet, SCHEDULE), prepared["positive"], prepared["negative"], CFG)


def step_inputs(shape, t=500):
    sigma = SCHEDULE.sigmas[t:t + 1]
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0)) * sigma
    return x, sigma, t


def eps(unet, x_vp, t, context):
    return unet(x_vp, t, encoder_hidden_states=context, return_dict=False)[0]


class swapped_processor:
    """The middle block's self-attention processor replaced for the block."""

    def __init__(self, unet, processor):
        self.attn = unet.mid_block.attentions[0].transformer_blocks[0].attn1
        self.processor = processor

    def __enter__(self):
        self.original = self.attn.processor
        self.attn.set_processor(self.processor)

    def __exit__(self, *exc):
        self.attn.set_processor(self.original)


# Self-attention guidance ---------------------------------------------------------------------------------------

def test_sag_step_matches_diffusers_sag_pipeline(model, ctx):
    """One guided step against diffusers' StableDiffusionSAGPipeline maths (its masking, blur and re-noising, in
    VP form: x_vp = x/√(σ²+1)); diffusers blurs with σ = 1, so blur_sigma is 1 here."""
    from types import SimpleNamespace

    from diffusers import DDIMScheduler
    from diffusers.pipelines.deprecated.stable_diffusion_sag.pipeline_stable_diffusion_sag import (
        CrossAttnStoreProcessor,
        StableDiffusionSAGPipeline,
    )

    shape, scale = (1, 4, 32, 32), 0.75
    x, sigma, t = step_inputs(shape)
    (patched,) = SelfAttentionGuidance.model_construct(model=model, scale=scale, blur_sigma=1.0).run(ctx)
    ours = guided(patched, shape)(x, sigma)

    unet, (positive, negative) = model.unet, contexts()
    x_vp = x / (sigma ** 2 + 1) ** 0.5
    store = CrossAttnStoreProcessor()
    with torch.no_grad(), swapped_processor(unet, store):
        eps_u, eps_c = eps(unet, torch.cat([x_vp, x_vp]), t, torch.cat([negative, positive])).chunk(2)
        uncond_map = store.attention_probs.chunk(2)[0]
    mass = uncond_map.reshape(1, 8, 16, 16).mean(1).sum(1) > 1.0
    assert 0 < int(mass.sum()) < 16, "the test should blur some cells and keep others"
    pipeline = SimpleNamespace(unet=unet, scheduler=DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000))
    with torch.no_grad():
        degraded_vp = StableDiffusionSAGPipeline.sag_masking(pipeline, x - sigma * eps_u, uncond_map, (4, 4),
                                                             torch.tensor(t), eps_u)
        eps_degraded = eps(unet, degraded_vp, t, negative)
    noise = eps_u + CFG * (eps_c - eps_u) + scale * (eps_u - eps_degraded)
    torch.testing.assert_close(ours, x - sigma * noise, atol=2e-4, rtol=1e-4)
    assert "transformer_options" not in model.options


def test_sag_attention_map_and_blur_map():
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn((2, 16, 24), generator=g) for _ in range(3))
    out, probabilities = attention_guidance.attention_with_probabilities(q, k, v, heads=3)
    torch.testing.assert_close(out, torch.nn.functional.scaled_dot_product_attention(
        *(t.reshape(2, 16, 3, 8).transpose(1, 2) for t in (q, k, v))).transpose(1, 2).reshape(2, 16, 24))
    # Rows of image 1, head 2: softmax(q kᵀ / √d) written out.
    qh, kh = q[1].reshape(16, 3, 8)[:, 2], k[1].reshape(16, 3, 8)[:, 2]
    torch.testing.assert_close(probabilities[1 * 3 + 2], torch.softmax(qh @ kh.T / math.sqrt(8), dim=-1))
    # The blur map: key cells with attention mass > 1 (summed over queries, averaged over heads), nearest-upsampled.
    x0 = torch.randn((2, 4, 16, 16), generator=g)
    cells = attention_guidance.attended_cells(x0, probabilities)
    mass = probabilities.reshape(2, 3, 16, 16).mean(1).sum(1) > 1.0
    expected = mass.reshape(2, 1, 4, 4).float().repeat_interleave(4, 2).repeat_interleave(4, 3)
    assert torch.equal(cells, expected)
    assert torch.equal(attention_guidance.gaussian_blur(x0, 9, 0.0), x0)


# Perturbed-attention guidance ----------------------------------------------------------------------------------

def test_pag_step_matches_diffusers_pag_processor(model, ctx):
    """diffusers' PAG: the second half of a doubled batch runs the middle self-attention as its value projection;
    ε = ε_u + cfg·(ε_c − ε_u) + scale·(ε_c − ε_perturbed)."""
    from diffusers.models.attention_processor import PAGIdentitySelfAttnProcessor2_0

    shape, scale = (1, 4, 16, 16), 2.5
    x, sigma, t = step_inputs(shape)
    (patched,) = PerturbedAttentionGuidance.model_construct(model=model, scale=scale).run(ctx)
    ours = guided(patched, shape)(x, sigma)

    unet, (positive, negative) = model.unet, contexts()
    x_vp = x / (sigma ** 2 + 1) ** 0.5
    with torch.no_grad():
        eps_u = eps(unet, x_vp, t, negative)
        with swapped_processor(unet, PAGIdentitySelfAttnProcessor2_0()):
            eps_c, eps_perturbed = eps(unet, torch.cat([x_vp, x_vp]), t, torch.cat([positive, positive])).chunk(2)
    noise = eps_u + CFG * (eps_c - eps_u) + scale * (eps_c - eps_perturbed)
    torch.testing.assert_close(ours, x - sigma * noise, atol=2e-4, rtol=1e-4)
    assert (eps_perturbed - eps_c).abs().max() > 1e-3  # the perturbation is real


# FreSca ----------------------------------------------------------------------------------------------------------

def test_fresca_scales_the_guidance_spectrum(model, ctx):
    g = torch.Generator().manual_seed(2)
    cond, uncond = torch.randn((2, 4, 12, 10), generator=g), torch.randn((2, 4, 12, 10), generator=g)
    scale_low, scale_high, cutoff = 0.5, 1.75, 2
    (patched,) = FreSca.model_construct(model=model, scale_low=scale_low, scale_high=scale_high,
                                        freq_cutoff=cutoff).run(ctx)
    (pre_cfg,) = patched.options["sampler_pre_cfg_function"]
    out = pre_cfg({"conds_out": [cond, uncond]})
    # Written out with numpy on the unshifted spectrum: frequency index u sits at (u + n//2) mod n after fftshift.
    weights = np.full((12, 10), scale_high)
    for u in range(12):
        for v in range(10):
            if abs((u + 6) % 12 - 6 + 0.5) < cutoff and abs((v + 5) % 10 - 5 + 0.5) < cutoff:
                weights[u, v] = scale_low
    guidance = (cond - uncond).numpy()
    expected = np.fft.ifft2(np.fft.fft2(guidance) * weights).real + uncond.numpy()
    torch.testing.assert_close(out[0], torch.from_numpy(expected).float(), atol=1e-5, rtol=1e-5)
    assert out[1] is uncond
    identity = attention_guidance.fresca(1.0, 1.0, cutoff)({"conds_out": [cond, uncond]})
    torch.testing.assert_close(identity[0], cond, atol=1e-5, rtol=0)


# Differential diffusion ------------------------------------------------------------------------------------------

def timestep_of(sigma: float) -> int:
    """The integer timestep whose sigma is nearest in log space, from SD's beta schedule written out."""
    betas = np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000) ** 2
    sigmas = np.sqrt((1 - np.cumprod(1 - betas)) / np.cumprod(1 - betas))
    return int(np.abs(np.log(sigmas) - math.log(sigma)).argmin())


@pytest.mark.parametrize("strength", [1.0, 0.4])
def test_differential_diffusion_thresholds_the_mask_per_step(model, ctx, strength):
    (patched,) = DifferentialDiffusion.model_construct(model=model, strength=strength).run(ctx)
    function = patched.options["denoise_mask_function"]
    sigmas = torch.tensor([14.6, 6.0, 2.5, 0.9, 0.0])
    soft = torch.linspace(0, 1, 4 * 6 * 6).reshape(1, 4, 6, 6)
    latent, noise = torch.randn((1, 4, 6, 6)), torch.randn((1, 4, 6, 6))
    seen = []

    def inner(x, sigma, return_uncond=False, **_):
        seen.append(x)
        return x * 0.5

    inner.schedule = SCHEDULE
    denoiser = InpaintDenoiser(inner, soft, latent, noise, sigmas, function)
    t_start, t_end = timestep_of(14.6), timestep_of(float(SCHEDULE.sigma_min))
    for sigma in sigmas[:-1]:
        x = torch.randn((1, 4, 6, 6))
        out = denoiser(x, sigma.reshape(1))
        threshold = (timestep_of(float(sigma)) - t_end) / (t_start - t_end)
        mask = (soft >= threshold).float()
        if strength < 1:
            mask = strength * mask + (1 - strength) * soft
        torch.testing.assert_close(seen[-1], x * mask + (noise * sigma + latent) * (1 - mask))
        torch.testing.assert_close(out, seen[-1] * 0.5 * mask + latent * (1 - mask))
    assert "denoise_mask_function" not in model.options


# HyperTile -------------------------------------------------------------------------------------------------------

class TiledSelfAttention:
    """ComfyUI's HyperTile self-attention at full resolution, written out: the queries of tile (i, j) of an
    nh × nw grid attend to the (i·nw + j)-th contiguous run of N/(nh·nw) key / value tokens."""

    def __init__(self, original, height, width, tiles):
        self.original, self.height, self.width, self.tiles = original, height, width, tiles

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kwargs):
        b, n, c = hidden_states.shape
        if encoder_hidden_states is not None or n != self.height * self.width:
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, **kwargs)
        q, k, v = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        grid_q = q.reshape(b, self.height, self.width, c)
        out = torch.zeros_like(grid_q)
        th, tw = self.height // self.tiles, self.width // self.tiles
        run = n // (self.tiles * self.tiles)
        heads, d = attn.heads, c // attn.heads
        for i in range(self.tiles):
            for j in range(self.tiles):
                tile_q = grid_q[:, i * th:(i + 1) * th, j * tw:(j + 1) * tw].reshape(b, th * tw, heads, d)
                index = i * self.tiles + j
                tile_k = k[:, index * run:(index + 1) * run].reshape(b, run, heads, d)
                tile_v = v[:, index * run:(index + 1) * run].reshape(b, run, heads, d)
                weights = torch.einsum("bqhd,bkhd->bhqk", tile_q, tile_k).mul(d ** -0.5).softmax(-1)
                tile_out = torch.einsum("bhqk,bkhd->bqhd", weights, tile_v)
                out[:, i * th:(i + 1) * th, j * tw:(j + 1) * tw] = tile_out.reshape(b, th, tw, c)
        return attn.to_out[1](attn.to_out[0](out.reshape(b, n, c)))


def test_hypertile_equals_explicit_tiled_attention(model, ctx):
    shape = (1, 4, 16, 16)
    x, sigma, _ = step_inputs(shape)
    context = contexts()[0]
    # tile_size 32 → tiles of ≥ 4 latent cells: 16 = 4 × 4; of the candidates (4, 2), ComfyUI draws only the first.
    (patched,) = HyperTile.model_construct(model=model, tile_size=32, swap_size=2, max_depth=0,
                                           scale_depth=False).run(ctx)
    ours = ModelCall(patched, model.unet, SCHEDULE)(x, sigma, context)
    unet = model.unet
    originals = dict(unet.attn_processors)
    reference = {name: TiledSelfAttention(p, 16, 16, 4) if name.endswith("attn1.processor") else p
                 for name, p in originals.items()}
    unet.set_attn_processor(reference)
    try:
        expected = ModelCall(model, unet, SCHEDULE)(x, sigma, context)
    finally:
        unet.set_attn_processor(originals)
    plain = ModelCall(model, unet, SCHEDULE)(x, sigma, context)
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)
    assert (ours - plain).abs().max() > 1e-4


def test_hypertile_tile_counts():
    g = torch.Generator().manual_seed(0)
    assert token_patches.tile_count(16, 4, 1, g) == 4
    assert token_patches.tile_count(16, 4, 2, g) == 4          # candidates 4, 2: the last is never drawn
    assert {token_patches.tile_count(24, 4, 3, torch.Generator().manual_seed(s)) for s in range(20)} == {6, 4}
    assert token_patches.tile_count(8, 32, 2, g) == 1          # smaller than a tile: one tile


# ToMe ------------------------------------------------------------------------------------------------------------

def test_token_merge_matches_brute_force_matching():
    """Without randomness each 2×2 cell's top-left token is the destination; written out: every source's most
    similar destination (cosine), the r best-matching sources averaged into theirs, unmerge copies back."""
    h, w, r, c = 6, 8, 9, 5
    x = torch.randn((2, h * w, c), generator=torch.Generator().manual_seed(3))
    merge, unmerge = token_patches.bipartite_merge(x, w, h, r, generator=None)
    merged = merge(x)
    restored = unmerge(merged)
    assert merged.shape == (2, h * w - r, c) and restored.shape == x.shape
    positions = [(i, j) for i in range(h) for j in range(w)]
    dests = [p for p, (i, j) in enumerate(positions) if i % 2 == 0 and j % 2 == 0]
    sources = [p for p in range(h * w) if p not in dests]
    for image in range(2):
        unit = x[image] / x[image].norm(dim=-1, keepdim=True)
        best = {s: max(dests, key=lambda d, s=s: float(unit[s] @ unit[d])) for s in sources}
        score = {s: float(unit[s] @ unit[best[s]]) for s in sources}
        moving = sorted(sources, key=lambda s: -score[s])[:r]
        expected = x[image].clone()
        for d in dests:
            members = [d] + [s for s in moving if best[s] == d]
            expected[members] = x[image][members].mean(0)
        for s in sources:
            if s not in moving:
                expected[s] = x[image][s]
        torch.testing.assert_close(restored[image], expected)


def test_tome_merges_only_at_full_resolution(model, ctx):
    (patched,) = TomePatchModel.model_construct(model=model, ratio=0.5).run(ctx)
    patches = patched.options["transformer_options"]["patches"]
    (split,), (restore,) = patches["attn1_patch"], patches["attn1_output_patch"]
    extra = {"original_shape": [1, 4, 8, 8], "sigmas": torch.tensor([3.0]), "block": ("input", 1),
             "block_index": 0}
    full, quarter = torch.randn((2, 64, 8)), torch.randn((2, 16, 8))
    assert split(full, full, full, extra)[0].shape == (2, 32, 8)
    assert restore(torch.zeros((2, 32, 8)), extra).shape == (2, 64, 8)
    assert split(quarter, quarter, quarter, extra)[0] is quarter
    assert restore(quarter, extra) is quarter


# End to end --------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    return probe_engine(tmp_path_factory, "attention_patches")


def branches(patch: dict | None, size: int, mask_value: float | None = None) -> dict:
    if patch is None:
        return branches_graph({}, None, size, mask_value)
    node = {"class_type": patch["class_type"], "inputs": {"model": ["ckpt", 0], **patch["inputs"]}}
    return branches_graph({"patch": node}, "patch", size, mask_value)


# node, inputs that change the result, inputs that should not, whether "should not" is bit-exact, image size,
# noise mask value (changing, identity).
CASES = [
    ("SelfAttentionGuidance", {"scale": 0.8, "blur_sigma": 2.0}, {"scale": 0.0, "blur_sigma": 2.0}, False, 128,
     None),
    ("PerturbedAttentionGuidance", {"scale": 2.0}, {"scale": 0.0}, True, 128, None),
    ("FreSca", {"scale_low": 1.0, "scale_high": 1.5, "freq_cutoff": 3},
     {"scale_low": 1.0, "scale_high": 1.0, "freq_cutoff": 3}, False, 128, None),
    ("DifferentialDiffusion", {"strength": 1.0}, {"strength": 1.0}, True, 128, (0.5, 1.0)),
    ("HyperTile", {"tile_size": 32, "swap_size": 2, "max_depth": 1, "scale_depth": False},
     {"tile_size": 256, "swap_size": 2, "max_depth": 1, "scale_depth": False}, True, 128, None),
    ("TomePatchModel", {"ratio": 0.5}, {"ratio": 0.0}, True, 128, None),
]


@pytest.mark.parametrize("node, changing, identity, exact, size, mask", CASES, ids=[c[0] for c in CASES])
def test_patched_branch_changes_and_the_plain_branch_does_not(engine, node, changing, identity, exact, size, mask):
    change_mask, identity_mask = mask if mask is not None else (None, None)
    graph = branches({"class_type": node, "inputs": changing}, size, change_mask)
    both = probed_latents(engine.run(graph))
    plain = probed_latents(engine.run(branches(None, size, change_mask)))["plain"]
    assert torch.equal(both["plain"], plain)              # the unpatched branch is bit-identical
    assert (both["patched"] - plain).abs().max() > 1e-3 * plain.abs().max()
    assert torch.equal(probed_latents(engine.run(graph))["patched"], both["patched"])  # runs reproduce exactly
    neutral = probed_latents(engine.run(branches({"class_type": node, "inputs": identity}, size, identity_mask)))
    if exact:
        assert torch.equal(neutral["patched"], neutral["plain"])
    else:
        # Float rounding only (another attention kernel, an FFT round trip): these latents reach a few hundred.
        scale = float(neutral["plain"].abs().max())
        torch.testing.assert_close(neutral["patched"], neutral["plain"], atol=1e-5 * scale, rtol=0)
