"""Flow matching and the other schedules of the current model families (CONST prediction, ModelSamplingSD3 /
AuraFlow / Flux / StableCascade) and the model-free nodes of nodes/model_families.py: sigma / timestep / shift
maths against ComfyUI's formulas written out in float64 and against diffusers' FlowMatchEulerDiscreteScheduler,
the CONST prediction against its formulas, whole KSampler runs on a tiny UNet against hand-written flow loops,
and each node's output."""

import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from branch_graphs import branches_graph, probe_engine, probed_latents  # noqa: E402
from node_context import StubContext, make_env  # noqa: E402

from latentloom.engine.inputs import InputError  # noqa: E402
from latentloom.nodes import model_families as nodes  # noqa: E402
from latentloom.nodes.diffusion import samplers  # noqa: E402
from latentloom.nodes.diffusion.clip import ClipModel  # noqa: E402
from latentloom.nodes.diffusion.models import DiffusionModel, SamplingConfig  # noqa: E402
from latentloom.nodes.diffusion.predictions import ConstPrediction  # noqa: E402
from latentloom.nodes.diffusion.schedules import (  # noqa: E402
    SCHEDULER_NAMES,
    calculate_sigmas,
    flux_mu,
    schedule_for,
)
from latentloom.nodes.sampling import KSampler  # noqa: E402

SD3 = SamplingConfig(prediction="const", schedule="discrete_flow", shift=3.0)
AURA = SamplingConfig(prediction="const", schedule="discrete_flow", shift=1.73, multiplier=1.0)


def flux_config(mu: float) -> SamplingConfig:
    return SamplingConfig(prediction="const", schedule="flux", shift=mu, multiplier=1.0)


@pytest.fixture
def ctx():
    return StubContext(make_env())


def run(node_class, ctx, **inputs):
    return node_class.model_construct(**inputs).run(ctx)


# --- the schedules against ComfyUI's formulas (written out in float64) ------------------------------------------

def shifted(shift: float, t: np.ndarray) -> np.ndarray:
    return shift * t / (1 + (shift - 1) * t)


@pytest.mark.parametrize(("config", "shift", "multiplier"), [(SD3, 3.0, 1000.0), (AURA, 1.73, 1.0)])
def test_discrete_flow_table_timestep_and_percent(config, shift, multiplier):
    schedule = schedule_for(config)
    t = np.arange(1, 1001, dtype=np.float64) / 1000
    np.testing.assert_allclose(schedule.sigmas.numpy(), shifted(shift, t), rtol=1e-6)
    assert schedule.sigma_max.item() == 1.0 and schedule.sigma_min.item() == pytest.approx(shifted(shift, 0.001))
    sigma = torch.tensor([0.25, 0.5, 0.9])
    torch.testing.assert_close(schedule.timestep(sigma), sigma * multiplier)
    # σ(t) inverts the shift at the network's timestep scale
    torch.testing.assert_close(schedule.sigma(torch.tensor([0.5 * multiplier])),
                               torch.tensor([shifted(shift, 0.5)], dtype=torch.float32))
    assert schedule.percent_to_sigma(0.0) == 1.0 and schedule.percent_to_sigma(1.0) == 0.0
    assert schedule.percent_to_sigma(0.3) == pytest.approx(shifted(shift, 0.7), rel=1e-12)


def test_flux_mu_and_schedule():
    # μ is linear in the 2×2-patch token count: base_shift at 256 tokens (256²), max_shift at 4096 (1024²).
    slope = (1.15 - 0.5) / (4096 - 256)
    for width, height in ((1024, 1024), (256, 256), (768, 1344)):
        expected = width * height / 256 * slope + 0.5 - slope * 256
        assert flux_mu(1.15, 0.5, width, height) == pytest.approx(expected, rel=1e-12)
    assert flux_mu(1.15, 0.5, 1024, 1024) == pytest.approx(1.15)
    mu = 0.8
    schedule = schedule_for(flux_config(mu))
    t = np.arange(1, 10001, dtype=np.float64) / 10000
    np.testing.assert_allclose(schedule.sigmas.numpy(), math.exp(mu) / (math.exp(mu) + 1 / t - 1), rtol=2e-6)
    sigma = torch.tensor([0.1, 0.7])
    assert torch.equal(schedule.timestep(sigma), sigma)  # Flux scales σ itself inside the network
    assert schedule.percent_to_sigma(0.25) == pytest.approx(math.exp(mu) / (math.exp(mu) + 1 / 0.75 - 1))


def test_stable_cascade_schedule():
    shift = 2.0
    schedule = schedule_for(SamplingConfig(prediction="eps", schedule="stable_cascade", shift=shift))
    s = 0.008
    t = np.arange(1, 10001, dtype=np.float64) / 10000
    alpha_bar = np.cos((t + s) / (1 + s) * np.pi / 2) ** 2 / np.cos(s / (1 + s) * np.pi / 2) ** 2
    log_snr = np.log(alpha_bar / (1 - alpha_bar)) - 2 * np.log(shift)
    alpha_bar = np.clip(1 / (1 + np.exp(-log_snr)), 1e-4, 0.9999)
    expected = np.sqrt((1 - alpha_bar) / alpha_bar)
    # (float32, as ComfyUI computes it: 1 − ᾱ cancels near t = 0, the first 1 % agrees to 2e-3, the rest to 2e-4)
    np.testing.assert_allclose(schedule.sigmas[100:].numpy(), expected[100:], rtol=2e-4)
    np.testing.assert_allclose(schedule.sigmas[:100].numpy(), expected[:100], rtol=2e-3)
    # timestep(σ) inverts σ(t) inside the unclamped range (shift 1: the plain cosine schedule)
    plain = schedule_for(SamplingConfig(prediction="eps", schedule="stable_cascade", shift=1.0))
    times = torch.tensor([0.2, 0.5, 0.8])
    torch.testing.assert_close(plain.timestep(plain.sigma(times)), times, atol=1e-4, rtol=0)
    assert schedule.percent_to_sigma(0.5) == pytest.approx(float(schedule.sigma(torch.tensor(0.5))))


FLOW_CASES = {"sd3": SD3, "auraflow": AURA, "flux": flux_config(1.15),
              "stable cascade": SamplingConfig(prediction="eps", schedule="stable_cascade", shift=2.0)}


@pytest.mark.parametrize("case", FLOW_CASES)
@pytest.mark.parametrize("scheduler", SCHEDULER_NAMES)
def test_every_scheduler_works_on_the_flow_schedules(case, scheduler):
    schedule = schedule_for(FLOW_CASES[case])
    sigmas = calculate_sigmas(schedule, scheduler, 10)
    assert torch.isfinite(sigmas).all() and sigmas[-1] == 0 and len(sigmas) >= 10
    assert (sigmas[:-1] > 0).all() and (torch.diff(sigmas) <= 0).all(), sigmas
    if scheduler not in ("ddim_uniform", "kl_optimal"):
        assert sigmas[0].item() == pytest.approx(schedule.sigma_max.item(), rel=1e-3)


def test_simple_scheduler_on_sd3_is_the_shifted_uniform_grid():
    sigmas = calculate_sigmas(schedule_for(SD3), "simple", 4)
    np.testing.assert_allclose(sigmas.numpy(), list(shifted(3.0, np.array([1.0, 0.75, 0.5, 0.25]))) + [0.0],
                               rtol=1e-6)


# --- the schedules against diffusers' FlowMatchEulerDiscreteScheduler -------------------------------------------

def test_sd3_table_and_normal_scheduler_match_diffusers():
    from diffusers import FlowMatchEulerDiscreteScheduler

    reference = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    schedule = schedule_for(SD3)
    # diffusers keeps the training table from the top: σ descending, timesteps σ·1000
    np.testing.assert_allclose(schedule.sigmas.flip(0).numpy(), reference.sigmas.numpy(), rtol=1e-6)
    np.testing.assert_allclose(schedule.timestep(schedule.sigmas).flip(0).numpy(), reference.timesteps.numpy(),
                               rtol=1e-6)
    # set_timesteps (StableDiffusion3Pipeline's default) spaces timesteps linearly between the table's ends and
    # shifts again: ComfyUI's "normal" scheduler on ModelSamplingSD3
    reference.set_timesteps(num_inference_steps=7)
    ours = calculate_sigmas(schedule, "normal", 7)
    np.testing.assert_allclose(ours.numpy(), reference.sigmas.numpy(), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(schedule.timestep(ours[:-1]).numpy(), reference.timesteps.numpy(), rtol=1e-5)


def test_flux_dynamic_shift_matches_diffusers():
    from diffusers import FlowMatchEulerDiscreteScheduler

    mu = 0.93
    reference = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    steps = 8
    # FluxPipeline: σ = linspace(1, 1/steps) shifted by μ — ComfyUI's "simple" scheduler on ModelSamplingFlux
    reference.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
    schedule = schedule_for(flux_config(mu))
    ours = calculate_sigmas(schedule, "simple", steps)
    np.testing.assert_allclose(ours.numpy(), reference.sigmas.numpy(), rtol=2e-6, atol=1e-7)
    np.testing.assert_allclose(schedule.timestep(ours[:-1]).numpy() * 1000, reference.timesteps.numpy(), rtol=2e-6)



def test_flux_mu_matches_diffusers_calculate_shift():
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    for width, height in ((1024, 1024), (512, 768), (1344, 768)):
        tokens = (height // 16) * (width // 16)  # FluxPipeline's packed 2×2 latent patches
        expected = calculate_shift(tokens, base_seq_len=256, max_seq_len=4096, base_shift=0.5, max_shift=1.15)
        assert flux_mu(1.15, 0.5, width, height) == pytest.approx(expected, rel=1e-12)


# --- the CONST prediction ----------------------------------------------------------------------------------------

def test_const_prediction_formulas():
    prediction = ConstPrediction()
    g = torch.Generator().manual_seed(0)
    x, v, latent, noise = (torch.randn(2, 3, 4, 4, generator=g) for _ in range(4))
    sigma = torch.tensor([0.25, 0.8])
    s = sigma.view(2, 1, 1, 1)
    assert torch.equal(prediction.calculate_input(sigma, x), x)
    torch.testing.assert_close(prediction.calculate_denoised(sigma, v, x), x - s * v)
    for max_denoise in (False, True):  # an interpolation either way
        torch.testing.assert_close(prediction.noise_scaling(sigma, noise, latent, max_denoise),
                                   s * noise + (1 - s) * latent)
    torch.testing.assert_close(prediction.inverse_noise_scaling(sigma, latent), latent / (1 - s))
    # the schedule object delegates to it (ComfyUI's model_sampling interface)
    schedule = schedule_for(SD3)
    torch.testing.assert_close(schedule.calculate_denoised(sigma, v, x), x - s * v)


# --- samplers on a flow model --------------------------------------------------------------------------------------

class LinearFlowDenoiser:
    """A denoiser D(x, σ) = a·x + b(σ) carrying a flow schedule, as the engine's denoisers do."""

    def __init__(self, config: SamplingConfig = SD3):
        self.schedule = schedule_for(config)
        self.bias = torch.linspace(-1, 1, 16).view(1, 1, 4, 4)

    def __call__(self, x, sigma, return_uncond=False, **_):
        denoised = 0.3 * x + self.bias * (1 + sigma.view(-1, 1, 1, 1))
        return (denoised, denoised) if return_uncond else denoised


class FixedNoise:
    def __init__(self):
        self.draws = 0

    def __call__(self, sigma, sigma_next):
        self.draws += 1
        return torch.full((1, 2, 4, 4), 0.1 * self.draws)


def test_euler_ancestral_takes_the_rectified_flow_step():
    model = LinearFlowDenoiser()
    sigmas = calculate_sigmas(model.schedule, "simple", 4)
    x0 = torch.randn(1, 2, 4, 4, generator=torch.Generator().manual_seed(1))
    eta, s_noise = 0.7, 0.9
    ours = samplers.euler_ancestral(model, x0, sigmas, {}, eta=eta, s_noise=s_noise, noise=FixedNoise())
    # ComfyUI's sample_euler_ancestral_RF, written out
    x, noise = x0, FixedNoise()
    for i in range(len(sigmas) - 1):
        s, s_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, s * torch.ones(1))
        if s_next == 0:
            x = denoised
            continue
        s_down = s_next * (1 + (s_next / s - 1) * eta)
        renoise = (s_next ** 2 - s_down ** 2 * (1 - s_next) ** 2 / (1 - s_down) ** 2) ** 0.5
        x = (s_down / s) * x + (1 - s_down / s) * denoised
        x = ((1 - s_next) / (1 - s_down)) * x + noise(s, s_next) * s_noise * renoise
    torch.testing.assert_close(ours, x)
    # without noise it is the flow-matching Euler method
    no_noise = samplers.euler_ancestral(model, x0, sigmas, {}, eta=0.0, noise=FixedNoise())
    torch.testing.assert_close(no_noise, samplers.euler(model, x0, sigmas, {}), rtol=1e-5, atol=1e-6)


def test_dpm_2_ancestral_rescales_and_renoises_as_rectified_flow():
    model = LinearFlowDenoiser()
    sigmas = calculate_sigmas(model.schedule, "simple", 3)
    x0 = torch.randn(1, 2, 4, 4, generator=torch.Generator().manual_seed(4))
    ours = samplers.dpm_2_ancestral(model, x0, sigmas, {}, eta=1.0, noise=FixedNoise())
    # ComfyUI's sample_dpm_2_ancestral_RF, written out
    x, noise, ones = x0, FixedNoise(), torch.ones(1)
    for i in range(len(sigmas) - 1):
        s, s_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, s * ones)
        s_down = s_next * (1 + (s_next / s - 1) * 1.0)
        renoise = (s_next ** 2 - s_down ** 2 * (1 - s_next) ** 2 / (1 - s_down) ** 2) ** 0.5
        d = (x - denoised) / s
        if s_down == 0:
            x = x + d * (s_down - s)
            continue
        s_mid = torch.exp((torch.log(s) + torch.log(s_down)) / 2)
        x_2 = x + d * (s_mid - s)
        x = x + (x_2 - model(x_2, s_mid * ones)) / s_mid * (s_down - s)
        x = (1 - s_next) / (1 - s_down) * x + noise(s, s_next) * renoise
    torch.testing.assert_close(ours, x, rtol=1e-5, atol=1e-6)

def test_sde_samplers_use_the_flow_half_log_snr():
    """dpmpp_2m_sde with eta 0 is an exponential integrator in λ = log((1 − σ)/σ); with the first σ = 1 moved to
    percent_to_sigma(1e-4), as ComfyUI does."""
    model = LinearFlowDenoiser()
    sigmas = calculate_sigmas(model.schedule, "simple", 3)
    x0 = torch.randn(1, 2, 4, 4, generator=torch.Generator().manual_seed(2))
    ours = samplers.dpmpp_2m_sde(model, x0, sigmas, {}, eta=0.0, noise=FixedNoise())
    walked = sigmas.clone()
    walked[0] = model.schedule.percent_to_sigma(1e-4)
    x, old, h_last = x0, None, None
    for i in range(len(walked) - 1):
        denoised = model(x, walked[i] * torch.ones(1))
        if walked[i + 1] == 0:
            x = denoised
        else:
            lam_s = torch.log((1 - walked[i]) / walked[i])
            lam_t = torch.log((1 - walked[i + 1]) / walked[i + 1])
            h = lam_t - lam_s
            alpha_t = 1 - walked[i + 1]
            x = walked[i + 1] / walked[i] * x + alpha_t * (1 - torch.exp(-h)) * denoised
            if old is not None:
                x = x + 0.5 * alpha_t * (1 - torch.exp(-h)) * (h / h_last) * (denoised - old)
            h_last = h
        old = denoised
    torch.testing.assert_close(ours, x, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", samplers.SAMPLER_NAMES)
def test_every_sampler_runs_on_a_flow_model(name):
    model = LinearFlowDenoiser()
    sampler = samplers.sampler_for_name(name)
    sigmas = calculate_sigmas(model.schedule, "simple", 4)
    x = model.schedule.noise_scaling(sigmas[0], torch.randn(1, 2, 4, 4, generator=torch.Generator().manual_seed(3)),
                                     torch.zeros(1, 2, 4, 4))
    out = sampler(model, x, sigmas, extra_args={"seed": 5})
    assert out.shape == x.shape and torch.isfinite(out).all(), name


# --- whole KSampler runs on a tiny UNet --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_model():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=32)
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return DiffusionModel(unet=unet.eval(), family="sd1")


@pytest.fixture(scope="module")
def prompts():
    g = torch.Generator().manual_seed(3)
    return ([[torch.randn(1, 77, 32, generator=g), {"pooled_output": torch.randn(1, 32, generator=g)}]],
            [[torch.randn(1, 77, 32, generator=g), {"pooled_output": torch.randn(1, 32, generator=g)}]])


def hand_flow_euler(unet, x, sigmas, positive, negative, cfg, multiplier):
    """Flow-matching Euler written straight against the UNet: v = network(x, σ·multiplier), CFG on v,
    x ← x + (σ_next − σ)·v."""
    context = torch.cat([negative, positive])
    with torch.no_grad():
        for i in range(len(sigmas) - 1):
            t = (sigmas[i] * multiplier).reshape(1).repeat(2)
            v_uncond, v_cond = unet(torch.cat([x, x]), t, encoder_hidden_states=context).sample.chunk(2)
            x = x + (sigmas[i + 1] - sigmas[i]) * (v_uncond + cfg * (v_cond - v_uncond))
    return x


@pytest.mark.parametrize(("node", "inputs", "multiplier"), [
    (nodes.ModelSamplingSD3, {"shift": 3.0}, 1000.0),
    (nodes.ModelSamplingAuraFlow, {"shift": 1.73}, 1.0),
])
def test_ksampler_euler_equals_a_hand_written_flow_loop(tiny_model, prompts, ctx, node, inputs, multiplier):
    positive, negative = prompts
    (model,) = run(node, ctx, model=tiny_model, **inputs)
    assert model.sampling.prediction == "const" and tiny_model.sampling == SamplingConfig()
    start = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(9))
    latent = {"samples": start}
    out = KSampler.model_construct(model=model, seed=42, steps=5, cfg=3.0, sampler_name="euler", scheduler="simple",
                                   positive=positive, negative=negative, latent_image=latent,
                                   denoise=0.6).run(ctx)[0]["samples"]
    schedule = schedule_for(model.sampling)
    sigmas = calculate_sigmas(schedule, "simple", int(5 / 0.6))[-6:]
    noise = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(42))
    scaled = start * 0.18215
    x = sigmas[0] * noise + (1 - sigmas[0]) * scaled  # img2img: interpolate towards the noise
    reference = hand_flow_euler(tiny_model.unet, x, sigmas, positive[0][0], negative[0][0], 3.0, multiplier)
    reference = reference / 0.18215
    assert (reference - start).abs().max() > 0.1
    torch.testing.assert_close(out, reference, rtol=1e-4, atol=1e-4 * reference.abs().max().item())


def test_flux_sampling_feeds_sigma_as_the_timestep(tiny_model, prompts, ctx):
    positive, negative = prompts
    (model,) = run(nodes.ModelSamplingFlux, ctx, model=tiny_model, max_shift=1.15, base_shift=0.5, width=512,
                   height=512)
    assert model.sampling.schedule == "flux" and model.sampling.shift == pytest.approx(
        flux_mu_written(1.15, 0.5, 512, 512))
    out = KSampler.model_construct(model=model, seed=1, steps=3, cfg=2.0, sampler_name="euler", scheduler="simple",
                                   positive=positive, negative=negative,
                                   latent_image={"samples": torch.zeros(1, 4, 8, 8)}, denoise=1.0).run(ctx)[0]
    sigmas = calculate_sigmas(schedule_for(model.sampling), "simple", 3)
    noise = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(1))
    reference = hand_flow_euler(tiny_model.unet, noise, sigmas, positive[0][0], negative[0][0], 2.0, 1.0) / 0.18215
    torch.testing.assert_close(out["samples"], reference, rtol=1e-4, atol=1e-4 * reference.abs().max().item())


def flux_mu_written(max_shift, base_shift, width, height):
    slope = (max_shift - base_shift) / (4096 - 256)
    return width * height / 256 * slope + base_shift - 256 * slope


@pytest.mark.slow
def test_inpainting_on_a_flow_model_keeps_the_unmasked_latent(tiny_model, prompts, ctx):
    positive, negative = prompts
    (model,) = run(nodes.ModelSamplingSD3, ctx, model=tiny_model, shift=3.0)
    source = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    mask = torch.zeros(1, 1, 16, 16)
    mask[..., :, :8] = 1.0
    for sampler_name in ("euler", "euler_ancestral", "dpmpp_2m_sde"):
        out = KSampler.model_construct(model=model, seed=3, steps=4, cfg=2.0, sampler_name=sampler_name,
                                       scheduler="simple", positive=positive, negative=negative,
                                       latent_image={"samples": source, "noise_mask": mask},
                                       denoise=0.8).run(ctx)[0]["samples"]
        torch.testing.assert_close(out[..., 5:], source[..., 5:], rtol=1e-4, atol=1e-4)
        assert (out[..., :3] - source[..., :3]).abs().max() > 1e-2


def test_bad_shift_is_an_input_error(tiny_model, ctx):
    for node in (nodes.ModelSamplingSD3, nodes.ModelSamplingAuraFlow, nodes.ModelSamplingStableCascade):
        with pytest.raises(InputError) as error:
            run(node, ctx, model=tiny_model, shift=0.0)
        assert error.value.input_name == "shift"


def test_stable_cascade_node_sets_its_schedule(tiny_model, ctx):
    (model,) = run(nodes.ModelSamplingStableCascade, ctx, model=tiny_model, shift=2.0)
    assert (model.sampling.prediction, model.sampling.schedule, model.sampling.shift) == ("eps", "stable_cascade", 2.0)
    assert model.unet is tiny_model.unet and tiny_model.sampling == SamplingConfig()


# --- the other nodes -------------------------------------------------------------------------------------------------

def test_empty_latents(ctx):
    (sd3,) = run(nodes.EmptySD3LatentImage, ctx, width=1024, height=768, batch_size=2)
    assert sd3["samples"].shape == (2, 16, 96, 128) and not sd3["samples"].any()
    (hunyuan,) = run(nodes.EmptyHunyuanImageLatent, ctx, width=2048, height=1024, batch_size=1)
    assert hunyuan["samples"].shape == (1, 64, 32, 64)
    stage_c, stage_b = run(nodes.StableCascade_EmptyLatentImage, ctx, width=1024, height=1024, compression=42,
                           batch_size=3)
    assert stage_c["samples"].shape == (3, 16, 24, 24) and stage_b["samples"].shape == (3, 4, 256, 256)
    (radiance,) = run(nodes.EmptyChromaRadianceLatentImage, ctx, width=64, height=32, batch_size=1)
    assert radiance["samples"].shape == (1, 3, 32, 64)


def conditioning():
    return [[torch.ones(1, 4, 8), {"pooled_output": torch.zeros(1, 8)}], [torch.zeros(1, 4, 8), {"guidance": 1.0}]]


def test_flux_guidance_and_options(ctx):
    source = conditioning()
    (guided,) = run(nodes.FluxGuidance, ctx, conditioning=source, guidance=4.5)
    assert [entry[1]["guidance"] for entry in guided] == [4.5, 4.5]
    assert guided[0][0] is source[0][0] and "guidance" not in source[0][1] and source[1][1]["guidance"] == 1.0
    (disabled,) = run(nodes.FluxDisableGuidance, ctx, conditioning=guided)
    assert [entry[1]["guidance"] for entry in disabled] == [None, None]
    (method,) = run(nodes.FluxKontextMultiReferenceLatentMethod, ctx, conditioning=source,
                    reference_latents_method="uxo/uno")
    assert [entry[1]["reference_latents_method"] for entry in method] == ["uxo", "uxo"]
    (method,) = run(nodes.FluxKontextMultiReferenceLatentMethod, ctx, conditioning=source,
                    reference_latents_method="index")
    assert method[0][1]["reference_latents_method"] == "index"


def test_reference_latent_appends(ctx):
    first, second = torch.randn(1, 16, 4, 4), torch.randn(1, 16, 6, 6)
    (once,) = run(nodes.ReferenceLatent, ctx, conditioning=conditioning(), latent={"samples": first})
    (twice,) = run(nodes.ReferenceLatent, ctx, conditioning=once, latent={"samples": second})
    assert [len(entry[1]["reference_latents"]) for entry in once] == [1, 1]
    assert all(a is first and b is second for a, b in (entry[1]["reference_latents"] for entry in twice))
    assert len(once[0][1]["reference_latents"]) == 1  # the input's list is left alone
    (untouched,) = run(nodes.ReferenceLatent, ctx, conditioning=once, latent=None)
    assert untouched is once


def test_kontext_image_scale_picks_the_nearest_aspect(ctx):
    image = torch.rand(1, 90, 160, 3)  # 16:9 → 1392×752 is the nearest Kontext resolution
    (scaled,) = run(nodes.FluxKontextImageScale, ctx, image=image)
    assert scaled.shape == (1, 752, 1392, 3) and 0 <= scaled.min() and scaled.max() <= 1
    (square,) = run(nodes.FluxKontextImageScale, ctx, image=torch.rand(2, 50, 50, 3))
    assert square.shape == (2, 1024, 1024, 3)


def test_t5_tokenizer_options_are_set_on_a_clone():
    from adapter_support import tiny_objects

    clip: ClipModel = tiny_objects("sd1", 0)[1]
    (changed,) = run(nodes.T5TokenizerOptions, None, clip=clip, min_padding=5, min_length=77)
    options = changed.options["tokenizer_options"]
    for name in ("t5xxl", "pile_t5xl", "t5base", "mt5xl", "umt5xxl"):
        assert options[f"{name}_min_padding"] == 5 and options[f"{name}_min_length"] == 77
    assert "tokenizer_options" not in clip.options and changed.encoders is clip.encoders


def test_renorm_cfg(tiny_model, ctx):
    (model,) = run(nodes.RenormCFG, ctx, model=tiny_model, cfg_trunc=0.5, renorm_cfg=1.0)
    hook = model.options["sampler_cfg_function"]
    g = torch.Generator().manual_seed(4)
    x, cond, uncond = (torch.randn(1, 4, 3, 3, generator=g) for _ in range(3))
    args = {"cond_denoised": cond, "uncond_denoised": uncond, "cond_scale": 4.0, "input": x}
    guided = uncond + 4.0 * (cond - uncond)  # its norm exceeds cond's here: capped at it
    capped = guided * cond.norm() / guided.norm()
    torch.testing.assert_close(x - hook({**args, "timestep": torch.tensor([0.3])}), capped)
    torch.testing.assert_close(x - hook({**args, "timestep": torch.tensor([0.7])}), cond)  # past cfg_trunc
    (plain,) = run(nodes.RenormCFG, ctx, model=tiny_model, cfg_trunc=100.0, renorm_cfg=0.0)
    torch.testing.assert_close(x - plain.options["sampler_cfg_function"]({**args, "timestep": torch.tensor([0.3])}),
                               guided)


def test_chroma_radiance_options_wrapper(tiny_model, ctx):
    (same,) = run(nodes.ChromaRadianceOptions, ctx, model=tiny_model, preserve_wrapper=True, start_sigma=1.0,
                  end_sigma=0.0, nerf_tile_size=-1)
    assert same is tiny_model
    (model,) = run(nodes.ChromaRadianceOptions, ctx, model=tiny_model, preserve_wrapper=True, start_sigma=0.8,
                   end_sigma=0.2, nerf_tile_size=16)
    wrapper = model.options["model_function_wrapper"]
    seen = []

    def apply_model(x, timestep, **c):
        seen.append(c["transformer_options"].get("chroma_radiance_options"))
        return x

    for sigma in (0.9, 0.5):
        wrapper(apply_model, {"input": torch.zeros(1), "timestep": torch.tensor([sigma]),
                              "c": {"transformer_options": {}}})
    assert seen == [None, {"nerf_tile_size": 16}]


# --- through the engine ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    return probe_engine(tmp_path_factory, "flow_sampling")


@pytest.mark.slow
@pytest.mark.parametrize(("node", "inputs", "sampler"), [
    ("ModelSamplingSD3", {"shift": 3.0}, "euler"),
    ("ModelSamplingFlux", {"max_shift": 1.15, "base_shift": 0.5, "width": 128, "height": 128}, "dpmpp_2s_ancestral"),
    ("ModelSamplingAuraFlow", {"shift": 1.73}, "dpmpp_2m"),
])
def test_graph_samples_with_the_flow_node_in_its_branch_only(engine, node, inputs, sampler):
    patch = {"patch": {"class_type": node, "inputs": {"model": ["ckpt", 0], **inputs}}}
    found = probed_latents(engine.run(branches_graph(patch, "patch", sampler=sampler, scheduler="simple")))
    plain, patched = found["plain"], found["patched"]
    assert torch.isfinite(patched).all() and patched.shape == plain.shape == (1, 4, 16, 16)
    assert (patched - plain).abs().max() > 1e-3
