"""The custom-sampling nodes of nodes.samplers_custom: schedulers against their formulas, k-diffusion 0.1.1 and the
published tables' own structure; sigma operations exactly; every sampler node against our sampler function called
directly with the node's options and, where k-diffusion 0.1.1 has the sampler, against k-diffusion; AddNoise on
its formula; and one SamplerCustomAdvanced graph through the engine on a tiny checkpoint."""

from __future__ import annotations

import math
import os
import shutil
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from node_context import run_node  # noqa: E402
from test_samplers_kdiffusion import SEED, Denoiser, K, SeededNoise, assert_same, brownian, karras  # noqa: E402

from latentloom.engine.inputs import InputError  # noqa: E402
from latentloom.nodes import samplers_custom as nodes  # noqa: E402
from latentloom.nodes.diffusion import dpm_solver, multistep, sa_solver, samplers, sigma_tables  # noqa: E402
from latentloom.nodes.diffusion.models import DiffusionModel  # noqa: E402
from latentloom.nodes.diffusion.schedules import DiscreteSchedule, calculate_sigmas  # noqa: E402
from latentloom.nodes.sampling import RandomNoiseSource  # noqa: E402

SCHEDULE = DiscreteSchedule()
MODEL = DiffusionModel(unet=torch.nn.Linear(1, 1), family="sd1")  # the schedule nodes only read model.sampling


def output(node_cls, **inputs):
    return run_node(node_cls, **inputs)


# --- schedulers ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("steps, sigma_max, sigma_min, rho", [(20, 14.614642, 0.0291675, 1.0), (7, 80.0, 0.002, 2.5),
                                                               (1, 10.0, 0.1, 0.5)])
def test_polyexponential_is_kdiffusions(steps, sigma_max, sigma_min, rho):
    (sigmas,) = output(nodes.PolyexponentialScheduler, steps=steps, sigma_max=sigma_max, sigma_min=sigma_min, rho=rho)
    assert torch.equal(sigmas, K.get_sigmas_polyexponential(steps, sigma_min, sigma_max, rho))


def test_polyexponential_with_rho_1_is_the_exponential_schedule():
    (sigmas,) = output(nodes.PolyexponentialScheduler, steps=12, sigma_max=14.6, sigma_min=0.03, rho=1.0)
    assert torch.allclose(sigmas, K.get_sigmas_exponential(12, 0.03, 14.6), rtol=1e-5)


@pytest.mark.parametrize("steps, beta_d, beta_min, eps_s", [(20, 19.9, 0.1, 0.001), (5, 10.0, 0.5, 0.01)])
def test_vp_is_kdiffusions(steps, beta_d, beta_min, eps_s):
    """k-diffusion 0.1.1 computes exp(·) − 1, ComfyUI expm1(·) (exact near t = eps_s): equal but for float32
    cancellation at the small end; in float64 the formula is matched closely everywhere."""
    (sigmas,) = output(nodes.VPScheduler, steps=steps, beta_d=beta_d, beta_min=beta_min, eps_s=eps_s)
    assert torch.allclose(sigmas, K.get_sigmas_vp(steps, beta_d, beta_min, eps_s), rtol=1e-3)
    t = np.linspace(1, eps_s, steps)
    expected = np.sqrt(np.expm1(beta_d * t ** 2 / 2 + beta_min * t))
    assert np.allclose(sigmas[:-1].numpy(), expected, rtol=2e-6) and sigmas[-1] == 0


def test_laplace_follows_the_laplace_quantiles():
    mu, beta, steps = 0.3, 0.8, 9
    (sigmas,) = output(nodes.LaplaceScheduler, steps=steps, sigma_max=1e6, sigma_min=1e-6, mu=mu, beta=beta)
    assert len(sigmas) == steps  # no appended zero
    u = np.linspace(0, 1, steps)
    # log σ = μ − β·sign(½ − u)·log(1 − 2|½ − u|): the Laplace quantile at 1 − u, with ε = 1e-5 against log 0.
    expected = np.exp(mu - beta * np.sign(0.5 - u) * np.log(1 - 2 * np.abs(0.5 - u) + 1e-5))
    assert np.allclose(sigmas.numpy(), expected, rtol=1e-5)
    # Symmetric around μ: σ_i · σ_(n−1−i) = e^(2μ).
    assert torch.allclose(sigmas * sigmas.flip(0), torch.full((steps,), math.exp(2 * mu)), rtol=1e-4)
    (clamped,) = output(nodes.LaplaceScheduler, steps=steps, sigma_max=3.0, sigma_min=0.5, mu=mu, beta=beta)
    assert clamped.max() == 3.0 and clamped[-1] == 0.5


def test_beta_sampling_scheduler():
    (default,) = output(nodes.BetaSamplingScheduler, model=MODEL, steps=10, alpha=0.6, beta=0.6)
    assert torch.equal(default, calculate_sigmas(SCHEDULE, "beta", 10))
    # Beta(1, 1) is uniform: its quantiles are the probabilities, so the timesteps are evenly spaced.
    (uniform,) = output(nodes.BetaSamplingScheduler, model=MODEL, steps=5, alpha=1.0, beta=1.0)
    expected = [float(SCHEDULE.sigmas[t]) for t in (999, 799, 599, 400, 200)] + [0.0]
    assert uniform.tolist() == pytest.approx(expected, rel=1e-6)


SD1_AYS = [14.6146412293, 6.4745760956, 3.8636745985, 2.6946151520, 1.8841921177, 1.3943805092, 0.9642583904,
           0.6523686016, 0.3977456272, 0.1515232662, 0.0291671582]  # NVIDIA's published 10-step SD1.5 schedule


def test_align_your_steps_ten_steps_is_the_published_schedule():
    (sigmas,) = output(nodes.AlignYourStepsScheduler, model_type="SD1", steps=10, denoise=1.0)
    assert sigmas.tolist() == pytest.approx(SD1_AYS[:-1] + [0.0], rel=1e-7)
    assert sigmas.dtype == torch.float32


@pytest.mark.parametrize("model_type", ["SD1", "SDXL"])
def test_align_your_steps_levels_are_sd_timesteps(model_type):
    """The SD tables were optimised over the discrete SD schedule: every level is one of its 1000 sigmas."""
    (sigmas,) = output(nodes.AlignYourStepsScheduler, model_type=model_type, steps=10, denoise=1.0)
    table = SCHEDULE.sigmas.double()
    for sigma in sigmas[:-1].double():
        assert ((table - sigma).abs() / sigma).min() < 1e-6


@pytest.mark.parametrize("node, model_type, table_steps", [(nodes.AlignYourStepsScheduler, "SDXL", 10),
                                                           (nodes.AlignYourStepsScheduler, "SVD", 10),
                                                           (nodes.OptimalStepsScheduler, "FLUX", 10),
                                                           (nodes.OptimalStepsScheduler, "Wan", 20)])
def test_doubling_the_steps_inserts_geometric_means(node, model_type, table_steps):
    """Log-linear interpolation at twice the steps: the table's levels at even places, the geometric mean of each
    neighbouring pair between them, and 0 last."""
    (table,) = output(node, model_type=model_type, steps=table_steps, denoise=1.0)
    (doubled,) = output(node, model_type=model_type, steps=2 * table_steps, denoise=1.0)
    (levels,) = [sigma_tables.loglinear_interp(sigma_tables._tables()[key][model_type], table_steps + 1)
                 for key in ("align_your_steps", "optimal_steps") if model_type in sigma_tables._tables()[key]]
    levels = torch.tensor(levels.copy())
    assert torch.allclose(table[:-1].double(), levels[:-1], rtol=1e-6) and table[-1] == 0
    assert torch.allclose(doubled[0:-1:2].double(), levels[:-1], rtol=1e-6)
    assert torch.allclose(doubled[1:-1:2].double(), (levels[:-1] * levels[1:]).sqrt(), rtol=1e-6)
    assert doubled[-1] == 0 and len(doubled) == 2 * table_steps + 1


@pytest.mark.parametrize("node, extra", [(nodes.AlignYourStepsScheduler, {"model_type": "SD1"}),
                                         (nodes.GITSScheduler, {"coeff": 1.2}),
                                         (nodes.OptimalStepsScheduler, {"model_type": "Chroma"})])
def test_table_schedules_with_denoise_keep_the_tail(node, extra):
    (full,) = output(node, steps=12, denoise=1.0, **extra)
    (tail,) = output(node, steps=12, denoise=0.5, **extra)
    assert len(tail) == 7 and torch.equal(tail[:-1], full[-7:-1]) and tail[-1] == 0
    (none,) = output(node, steps=12, denoise=0.0, **extra)
    assert none.numel() == 0


# Published 10-step schedules: GITS at coeff 1.20 (SD1.5) and OptimalSteps for FLUX (flow time, σ ∈ [0, 1]).
GITS_1_20_TEN = [14.61464119, 5.85520077, 2.84484982, 1.67050016, 1.08895338, 0.74807048, 0.50118381, 0.32104823,
                 0.19894916, 0.09824532, 0.02916753]
FLUX_OPTIMAL_TEN = [0.9968, 0.9886, 0.9819, 0.975, 0.966, 0.9471, 0.9158, 0.8287, 0.5512, 0.2808, 0.001]


def test_ten_step_schedules_are_the_published_ones():
    (gits,) = output(nodes.GITSScheduler, coeff=1.2, steps=10, denoise=1.0)
    assert gits.tolist() == pytest.approx(GITS_1_20_TEN[:-1] + [0.0], rel=1e-7)
    (flux,) = output(nodes.OptimalStepsScheduler, model_type="FLUX", steps=10, denoise=1.0)
    assert flux.tolist() == pytest.approx(FLUX_OPTIMAL_TEN[:-1] + [0.0], rel=1e-7)


def test_gits_schedules():
    for steps in (2, 10, 20):
        (sigmas,) = output(nodes.GITSScheduler, coeff=1.2, steps=steps, denoise=1.0)
        assert len(sigmas) == steps + 1 and sigmas[-1] == 0
        assert sigmas[0] == pytest.approx(14.61464119) and bool((sigmas[:-1] > sigmas[1:]).all())
        table = SCHEDULE.sigmas.double()
        for sigma in sigmas[:-1].double():  # searched among (nearly) the SD timesteps' sigmas
            assert ((table - sigma).abs() / sigma).min() < 2e-3
    (long,) = output(nodes.GITSScheduler, coeff=1.2, steps=40, denoise=1.0)
    (twenty,) = output(nodes.GITSScheduler, coeff=1.2, steps=20, denoise=1.0)
    assert len(long) == 41 and long[0] == twenty[0] and 0.02916753 < long[-2] < twenty[-2]
    (other,) = output(nodes.GITSScheduler, coeff=0.8, steps=10, denoise=1.0)
    assert not torch.equal(other, output(nodes.GITSScheduler, coeff=1.2, steps=10, denoise=1.0)[0])


def test_schedule_inputs_that_cannot_work_are_named():
    with pytest.raises(InputError, match="coeff"):
        output(nodes.GITSScheduler, coeff=1.23, steps=10, denoise=1.0)
    with pytest.raises(InputError, match="sigma_min"):
        output(nodes.PolyexponentialScheduler, steps=10, sigma_max=14.6, sigma_min=0.0, rho=1.0)
    with pytest.raises(InputError, match="alpha"):
        output(nodes.BetaSamplingScheduler, model=MODEL, steps=10, alpha=0.0, beta=0.6)


# --- operations on SIGMAS --------------------------------------------------------------------------------------

SIGMAS = torch.tensor([10.0, 5.0, 2.0, 1.0, 0.5, 0.0])


def test_split_sigmas():
    high, low = output(nodes.SplitSigmas, sigmas=SIGMAS, step=2)
    assert high.tolist() == [10.0, 5.0, 2.0] and low.tolist() == [2.0, 1.0, 0.5, 0.0]
    high, low = output(nodes.SplitSigmas, sigmas=SIGMAS, step=99)
    assert torch.equal(high, SIGMAS) and low.numel() == 0


@pytest.mark.parametrize("denoise, high, low", [(0.4, [10.0, 5.0, 2.0, 1.0], [1.0, 0.5, 0.0]),
                                                 (1.0, [10.0], [10.0, 5.0, 2.0, 1.0, 0.5, 0.0]),
                                                 (0.5, [10.0, 5.0, 2.0, 1.0], [1.0, 0.5, 0.0]),  # round(2.5) = 2
                                                 (0.0, [], [0.0])])  # ComfyUI: no low steps → empty high too
def test_split_sigmas_denoise(denoise, high, low):
    got_high, got_low = output(nodes.SplitSigmasDenoise, sigmas=SIGMAS, denoise=denoise)
    assert got_high.tolist() == high and got_low.tolist() == low


def test_flip_and_set_first_sigma():
    (flipped,) = output(nodes.FlipSigmas, sigmas=SIGMAS)
    assert flipped.tolist() == pytest.approx([0.0001, 0.5, 1.0, 2.0, 5.0, 10.0]) and SIGMAS[-1] == 0
    (empty,) = output(nodes.FlipSigmas, sigmas=torch.zeros(0))
    assert empty.numel() == 0
    (first,) = output(nodes.SetFirstSigma, sigmas=SIGMAS, sigma=136.0)
    assert first.tolist() == [136.0] + SIGMAS[1:].tolist() and SIGMAS[0] == 10.0
    with pytest.raises(InputError, match="sigmas"):
        output(nodes.SetFirstSigma, sigmas=torch.zeros(0), sigma=1.0)


def test_extend_intermediate_sigmas():
    sigmas = torch.tensor([16.0, 8.0, 4.0, 0.0])
    (linear,) = output(nodes.ExtendIntermediateSigmas, sigmas=sigmas, steps=4, start_at_sigma=-1.0,
                       end_at_sigma=5.0, spacing="linear")
    assert linear.tolist() == [16.0, 14.0, 12.0, 10.0, 8.0, 7.0, 6.0, 5.0, 4.0, 0.0]
    (cosine,) = output(nodes.ExtendIntermediateSigmas, sigmas=sigmas, steps=2, start_at_sigma=10.0,
                       end_at_sigma=0.0, spacing="cosine")
    assert cosine.tolist() == pytest.approx([16.0, 8.0, 8 - 4 * math.sin(math.pi / 4), 4.0,
                                             4 - 4 * math.sin(math.pi / 4), 0.0])
    (sine,) = output(nodes.ExtendIntermediateSigmas, sigmas=sigmas, steps=2, start_at_sigma=20.0,
                     end_at_sigma=10.0, spacing="sine")
    assert sine.tolist() == pytest.approx([16.0, 16 - 8 * (1 - math.cos(math.pi / 4)), 8.0, 4.0, 0.0])
    assert linear.dtype == torch.float32


def test_sampling_percent_to_sigma():
    (middle,) = output(nodes.SamplingPercentToSigma, model=MODEL, sampling_percent=0.5, return_actual_sigma=False)
    assert middle == pytest.approx(float(SCHEDULE.sigma(torch.tensor(499.5))))
    assert output(nodes.SamplingPercentToSigma, model=MODEL, sampling_percent=0.0,
                  return_actual_sigma=False) == (999999999.9,)
    assert output(nodes.SamplingPercentToSigma, model=MODEL, sampling_percent=1.0,
                  return_actual_sigma=False) == (0.0,)
    assert output(nodes.SamplingPercentToSigma, model=MODEL, sampling_percent=0.0,
                  return_actual_sigma=True) == (float(SCHEDULE.sigma_max),)
    assert output(nodes.SamplingPercentToSigma, model=MODEL, sampling_percent=1.0,
                  return_actual_sigma=True) == (float(SCHEDULE.sigma_min),)


# --- sampler nodes ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def start() -> torch.Tensor:
    return torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(5)) * karras(8)[0]


def run_sampler(sampler, start, sigmas, denoiser=None):
    return sampler(denoiser or Denoiser(), start.clone(), sigmas, extra_args={"seed": SEED})


def direct(function, start, sigmas, **options):
    return function(Denoiser(), start.clone(), sigmas, extra_args={"seed": SEED}, **options)


@pytest.mark.filterwarnings("ignore:Should have t:UserWarning")
@pytest.mark.parametrize("node_cls, inputs, function, options", [
    (nodes.SamplerEulerAncestral, {"eta": 0.7, "s_noise": 0.9}, samplers.euler_ancestral,
     {"eta": 0.7, "s_noise": 0.9}),
    (nodes.SamplerEulerAncestralCFGPP, {"eta": 0.5, "s_noise": 1.2}, samplers.euler_ancestral_cfg_pp,
     {"eta": 0.5, "s_noise": 1.2}),
    (nodes.SamplerLMS, {"order": 2}, multistep.lms, {"order": 2}),
    (nodes.SamplerDPMPP_2S_Ancestral, {"eta": 0.6, "s_noise": 0.8}, samplers.dpmpp_2s_ancestral,
     {"eta": 0.6, "s_noise": 0.8}),
    (nodes.SamplerDPMPP_SDE, {"eta": 0.6, "s_noise": 0.9, "r": 0.3, "noise_device": "cpu"}, samplers.dpmpp_sde,
     {"eta": 0.6, "s_noise": 0.9, "r": 0.3}),
    (nodes.SamplerDPMPP_2M_SDE, {"solver_type": "heun", "eta": 0.5, "s_noise": 0.7, "noise_device": "cpu"},
     samplers.dpmpp_2m_sde, {"solver_type": "heun", "eta": 0.5, "s_noise": 0.7}),
    (nodes.SamplerDPMPP_3M_SDE, {"eta": 0.4, "s_noise": 1.1, "noise_device": "gpu"}, samplers.dpmpp_3m_sde,
     {"eta": 0.4, "s_noise": 1.1, "noise_on_cpu": False}),
    (nodes.SamplerDPMAdaptative, {"order": 2, "rtol": 0.03, "atol": 0.01, "h_init": 0.1, "pcoeff": 0.2,
                                  "icoeff": 0.8, "dcoeff": 0.1, "accept_safety": 0.9, "eta": 0.5, "s_noise": 0.8},
     dpm_solver.dpm_adaptive, {"order": 2, "rtol": 0.03, "atol": 0.01, "h_init": 0.1, "pcoeff": 0.2, "icoeff": 0.8,
                               "dcoeff": 0.1, "accept_safety": 0.9, "eta": 0.5, "s_noise": 0.8}),
    (nodes.SamplerER_SDE, {"solver_type": "ER-SDE", "max_stage": 2, "eta": 1.0, "s_noise": 0.5}, multistep.er_sde,
     {"max_stage": 2, "s_noise": 0.5}),
    (nodes.SamplerER_SDE, {"solver_type": "Reverse-time SDE", "max_stage": 3, "eta": 0.5, "s_noise": 1.0},
     multistep.er_sde, {"noise_scaler": lambda v: v ** 1.5}),
    (nodes.SamplerER_SDE, {"solver_type": "ODE", "max_stage": 3, "eta": 0.5, "s_noise": 1.0},
     multistep.er_sde, {"noise_scaler": lambda v: v, "s_noise": 0.0}),
])
def test_sampler_node_runs_our_function_with_its_options(node_cls, inputs, function, options, start):
    (sampler,) = output(node_cls, **inputs)
    sigmas = karras(8)
    ours = run_sampler(sampler, start, sigmas)
    assert torch.isfinite(ours).all()
    assert torch.equal(ours, direct(function, start, sigmas, **options))


def test_option_changes_change_the_result(start):
    """Guards the comparison above: the options really reach the function."""
    sigmas = karras(8)
    results = [run_sampler(output(nodes.SamplerEulerAncestral, eta=eta, s_noise=1.0)[0], start, sigmas)
               for eta in (1.0, 0.5)]
    assert (results[0] - results[1]).abs().max() > 1e-2
    ode, sde = (run_sampler(output(nodes.SamplerER_SDE, solver_type=kind, max_stage=3, eta=1.0, s_noise=1.0)[0],
                            start, sigmas) for kind in ("ODE", "Reverse-time SDE"))
    assert (ode - sde).abs().max() > 1e-2


@pytest.mark.filterwarnings("ignore:Should have t:UserWarning")
@pytest.mark.parametrize("node_cls, inputs, reference, reference_options", [
    (nodes.SamplerEulerAncestral, {"eta": 0.7, "s_noise": 0.9}, "sample_euler_ancestral", {"eta": 0.7, "s_noise": 0.9}),
    (nodes.SamplerDPMPP_2S_Ancestral, {"eta": 0.6, "s_noise": 0.8}, "sample_dpmpp_2s_ancestral",
     {"eta": 0.6, "s_noise": 0.8}),
    (nodes.SamplerLMS, {"order": 3}, "sample_lms", {"order": 3}),
    (nodes.SamplerDPMPP_2M_SDE, {"solver_type": "heun", "eta": 0.5, "s_noise": 0.7, "noise_device": "cpu"},
     "sample_dpmpp_2m_sde", {"solver_type": "heun", "eta": 0.5, "s_noise": 0.7}),
    (nodes.SamplerDPMPP_3M_SDE, {"eta": 0.4, "s_noise": 1.1, "noise_device": "cpu"}, "sample_dpmpp_3m_sde",
     {"eta": 0.4, "s_noise": 1.1}),
    (nodes.SamplerDPMPP_SDE, {"eta": 0.6, "s_noise": 0.9, "r": 0.3, "noise_device": "cpu"}, "sample_dpmpp_sde",
     {"eta": 0.6, "s_noise": 0.9, "r": 0.3}),
])
def test_sampler_node_matches_kdiffusion(node_cls, inputs, reference, reference_options, start):
    (sampler,) = output(node_cls, **inputs)
    sigmas = karras(8)
    if reference == "sample_lms":  # ComfyUI's LMS ends on D instead of a last multistep step: compare before it
        sigmas = sigmas[:-1]
    ours = run_sampler(sampler, start, sigmas)
    noise = brownian(start, sigmas) if "sde" in reference else SeededNoise(start, SEED)
    extra = {"noise_sampler": noise} if reference != "sample_lms" else {}
    with torch.random.fork_rng():
        theirs = getattr(K, reference)(Denoiser(), start.clone(), sigmas, disable=True, **reference_options, **extra)
    # dpmpp_sde: k-diffusion queries the Brownian tree at σ recomputed as exp(−(−log σ)); a path moves like √Δt,
    # so a float32 rounding of σ shows as ~1e-4 (test_samplers_kdiffusion compares our function more closely).
    assert_same(ours, theirs, atol=1e-3 if reference == "sample_dpmpp_sde" else 1e-6)


@pytest.mark.parametrize("inputs", [
    {"order": 2, "rtol": 0.05, "atol": 0.0078, "h_init": 0.05, "pcoeff": 0.0, "icoeff": 1.0, "dcoeff": 0.0,
     "accept_safety": 0.81, "eta": 0.0, "s_noise": 1.0},
    {"order": 3, "rtol": 0.03, "atol": 0.01, "h_init": 0.1, "pcoeff": 0.3, "icoeff": 0.7, "dcoeff": 0.2,
     "accept_safety": 0.9, "eta": 0.0, "s_noise": 1.0},
    {"order": 3, "rtol": 0.05, "atol": 0.0078, "h_init": 0.05, "pcoeff": 0.0, "icoeff": 1.0, "dcoeff": 0.0,
     "accept_safety": 0.81, "eta": 0.7, "s_noise": 0.9},
])
def test_dpm_adaptive_node_matches_kdiffusion(inputs, start):
    (sampler,) = output(nodes.SamplerDPMAdaptative, **inputs)
    sigmas = karras(8)
    ours_model, reference_model = Denoiser(), Denoiser()
    ours = run_sampler(sampler, start, sigmas, ours_model)
    reference, info = K.sample_dpm_adaptive(reference_model, start.clone(), float(sigmas[-2]), float(sigmas[0]),
                                            disable=True, noise_sampler=SeededNoise(start, SEED), return_info=True,
                                            **inputs)
    assert ours_model.calls == reference_model.calls == info["nfe"]
    assert_same(ours, reference)


def test_dpm_adaptive_inputs_that_cannot_work_are_named():
    base = {"order": 3, "rtol": 0.05, "atol": 0.0078, "h_init": 0.05, "pcoeff": 0.0, "icoeff": 1.0, "dcoeff": 0.0,
            "accept_safety": 0.81, "eta": 0.0, "s_noise": 1.0}
    for name, value in (("h_init", 0.0), ("accept_safety", 3.0)):
        with pytest.raises(InputError, match=name):
            output(nodes.SamplerDPMAdaptative, **{**base, name: value})
    with pytest.raises(InputError, match="rtol"):
        output(nodes.SamplerDPMAdaptative, **{**base, "rtol": 0.0, "atol": 0.0})
    with pytest.raises(InputError, match="'r'"):
        output(nodes.SamplerDPMPP_SDE, eta=1.0, s_noise=1.0, r=0.0, noise_device="cpu")


def test_er_sde_ode_solves_the_probability_flow_ode(start):
    """ODE: noise scaler v ↦ v and no noise. On data N(μ, s²) the exact denoiser makes the ODE solution known:
    x(σ) = μ + (x − μ)·√((s² + σ²)/(s² + σ_0²)). Twice the steps, well under a third of the error (its
    200-point Riemann sums keep it near second order)."""
    mean, spread = 0.3, 0.5

    def exact(x, sigma, **_):
        s = sigma.reshape(-1, 1, 1, 1)
        return mean + spread ** 2 / (spread ** 2 + s ** 2) * (x - mean)

    (sampler,) = output(nodes.SamplerER_SDE, solver_type="ODE", max_stage=3, eta=1.0, s_noise=1.0)
    x = start / karras(8)[0] * 10.0
    target = mean + (x - mean) * ((spread ** 2 + 0.1 ** 2) / (spread ** 2 + 10.0 ** 2)) ** 0.5
    errors = [(sampler(exact, x.clone(), K.get_sigmas_exponential(n, 0.1, 10.0)[:-1], extra_args={"seed": 1})
               - target).abs().max().item() for n in (12, 24)]
    assert errors[1] < errors[0] / 3.5 and errors[1] < 0.01, errors


def test_sa_solver_node(start):
    (sampler,) = output(nodes.SamplerSASolver, model=MODEL, eta=0.8, sde_start_percent=0.1, sde_end_percent=0.6,
                        s_noise=0.9, predictor_order=2, corrector_order=3, use_pece=True, simple_order_2=True)
    tau = sa_solver.tau_interval(SCHEDULE.percent_to_sigma(0.1), SCHEDULE.percent_to_sigma(0.6), eta=0.8)
    sigmas = karras(8)
    expected = direct(sa_solver.sa_solver, start, sigmas, tau_func=tau, s_noise=0.9, predictor_order=2,
                      corrector_order=3, use_pece=True, simple_order_2=True)
    assert torch.equal(run_sampler(sampler, start, sigmas), expected)
    # τ = η inside [σ(0.6), σ(0.1)], else 0; η = 0 is the ODE everywhere.
    inside = (SCHEDULE.percent_to_sigma(0.1) + SCHEDULE.percent_to_sigma(0.6)) / 2
    assert tau(torch.tensor(inside)) == 0.8 and tau(SCHEDULE.percent_to_sigma(0.1) * 1.01) == 0.0
    assert sa_solver.tau_interval(100.0, 0.0, eta=0.0)(torch.tensor(5.0)) == 0.0


def test_sa_solver_simple_order_2_approximates_the_exact_weights():
    """The simplified weights are the Taylor form of the exact Adams integrals: the weights are O(h) and their
    difference O(h²) as the step h (in λ) shrinks, halving h quarters it."""
    differences = []
    for h in (0.2, 0.1):
        lambdas = torch.tensor([0.0, h, 2 * h], dtype=torch.float64)
        sigma_next = torch.exp(-lambdas[2])
        exact = sa_solver._adams_coefficients(sigma_next, lambdas[:2], lambdas[1], lambdas[2], 0.5)
        simple = sa_solver._adams_coefficients(sigma_next, lambdas[:2], lambdas[1], lambdas[2], 0.5,
                                               simple_order_2=True)
        differences.append((exact - simple).abs().max().item())
        assert torch.allclose(exact.sum(), simple.sum())  # both integrate a constant exactly
    assert 3.5 < differences[0] / differences[1] < 4.5


def test_lcm_upscale_grows_the_latent_step_by_step():
    shapes = []

    def denoiser(x, sigma, **_):
        shapes.append(tuple(x.shape[-2:]))
        return torch.full_like(x, 0.5)

    (sampler,) = output(nodes.SamplerLCMUpscale, scale_ratio=2.0, scale_steps=-1, upscale_method="nearest-exact")
    sigmas = torch.tensor([8.0, 4.0, 2.0, 1.0, 0.0])  # 4 steps: upscales at steps 1 and 2, by 1.5 then 2
    result = sampler(denoiser, torch.zeros(1, 4, 8, 8), sigmas, extra_args={"seed": 3})
    assert shapes == [(8, 8), (12, 12), (16, 16), (16, 16)]
    assert torch.equal(result, torch.full((1, 4, 16, 16), 0.5))  # the last step lands on D, no noise added
    (sampler,) = output(nodes.SamplerLCMUpscale, scale_ratio=1.5, scale_steps=3, upscale_method="bislerp")
    shapes.clear()
    again = [sampler(denoiser, torch.zeros(1, 4, 8, 8), sigmas[:-1], extra_args={"seed": 3}) for _ in range(2)]
    assert shapes[:3] == [(8, 8), (9, 9), (11, 11)] and again[0].shape[-1] == 12
    assert torch.equal(again[0], again[1])  # seeded: reproducible


def test_euler_cfg_pp_versions():
    def denoiser(x, sigma, return_uncond=False, **_):
        guided, unguided = x * 0.25 + 1.0, x * 0.5 - 1.0
        return (guided, unguided) if return_uncond else guided

    x, sigmas = torch.ones(1, 1, 2, 2) * 3.0, torch.tensor([2.0, 1.0])
    (alternative,) = output(nodes.SamplerEulerCFGpp, version="alternative")
    result = alternative(denoiser, x.clone(), sigmas, extra_args={})
    d = (x - 2 * (x * 0.25 + 1.0) + (x * 0.5 - 1.0)) / 2.0
    assert torch.allclose(result, x + d * (1.0 - 2.0))
    (regular,) = output(nodes.SamplerEulerCFGpp, version="regular")
    assert regular.function is samplers.euler_cfg_pp
    # CFG++: x_next = D + σ_next · (x − D_uncond)/σ.
    assert torch.allclose(regular(denoiser, x.clone(), sigmas, extra_args={}),
                          (x * 0.25 + 1.0) + 1.0 * (x - (x * 0.5 - 1.0)) / 2.0, atol=1e-6)


# --- AddNoise --------------------------------------------------------------------------------------------------

def test_add_noise():
    latent = {"samples": torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1)), "batch_index": [0]}
    noise = RandomNoiseSource(7).generate_noise(latent)
    sigmas = torch.tensor([10.0, 3.0, 1.0])
    (noisy,) = output(nodes.AddNoise, model=MODEL, noise=RandomNoiseSource(7), sigmas=sigmas, latent_image=latent)
    scale = 0.18215
    assert torch.allclose(noisy["samples"], (latent["samples"] * scale + noise * 9.0) / scale, atol=1e-5)
    assert noisy["batch_index"] == [0]
    empty = {"samples": torch.zeros(1, 4, 8, 8)}
    (single,) = output(nodes.AddNoise, model=MODEL, noise=RandomNoiseSource(7), sigmas=sigmas[:1], latent_image=empty)
    assert torch.allclose(single["samples"], noise * 10.0 / scale)
    (unchanged,) = output(nodes.AddNoise, model=MODEL, noise=RandomNoiseSource(7), sigmas=torch.zeros(0),
                          latent_image=latent)
    assert unchanged is latent


# --- end to end ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    from tiny_models import write_tiny_checkpoint

    from latentloom.nodes import create_engine

    root = tmp_path_factory.mktemp("custom_sampling")
    write_tiny_checkpoint(root / "models" / "checkpoints" / "sd1.safetensors", family="sd1", seed=0)
    (root / "custom_nodes").mkdir()
    shutil.copy(Path(__file__).parent / "sd_probe_nodes.py", root / "custom_nodes" / "sd_probe_nodes.py")
    return create_engine(models_dir=root / "models", input_dir=root / "input", output_dir=root / "output",
                         temp_dir=root / "temp", custom_nodes_dir=root / "custom_nodes", entry_points=False)


def base_graph(sampler: dict, sigmas: dict) -> dict:
    return {
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd1.safetensors"}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a lighthouse", "clip": ["4", 1]}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["4", 1]}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "30": {"class_type": "RandomNoise", "inputs": {"noise_seed": 11}},
        "31": {"class_type": "CFGGuider", "inputs": {"model": ["4", 0], "positive": ["6", 0], "negative": ["7", 0],
                                                     "cfg": 6.0}},
        "32": sampler,
        **sigmas,
        "34": {"class_type": "SamplerCustomAdvanced", "inputs": {
            "noise": ["30", 0], "guider": ["31", 0], "sampler": ["32", 0], "sigmas": ["33", 0],
            "latent_image": ["5", 0]}},
        "90": {"class_type": "LatentProbe", "inputs": {"samples": ["34", 0], "label": "out"}},
    }


def latent_of(engine, graph: dict) -> torch.Tensor:
    import json

    result = engine.run(graph)
    assert result.ok, result.error
    return torch.tensor(json.loads(result.outputs["90"]["text"][0])["samples"])


@pytest.mark.slow
def test_custom_sampling_graph(engine):
    """AYS sigmas, split, the second half extended, sampled by the ancestral node: the same as KSamplerSelect's
    euler_ancestral (its defaults are the node's) on the same sigmas, and another eta gives another latent."""
    sigmas = {
        "40": {"class_type": "AlignYourStepsScheduler", "inputs": {"model_type": "SD1", "steps": 4, "denoise": 1.0}},
        "41": {"class_type": "SplitSigmas", "inputs": {"sigmas": ["40", 0], "step": 2}},
        "33": {"class_type": "ExtendIntermediateSigmas", "inputs": {
            "sigmas": ["41", 1], "steps": 2, "start_at_sigma": -1.0, "end_at_sigma": 0.5, "spacing": "linear"}},
    }
    node = base_graph({"class_type": "SamplerEulerAncestral", "inputs": {"eta": 1.0, "s_noise": 1.0}}, sigmas)
    select = base_graph({"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler_ancestral"}}, sigmas)
    other = base_graph({"class_type": "SamplerEulerAncestral", "inputs": {"eta": 0.3, "s_noise": 1.0}}, sigmas)
    from_node, from_select, from_other = (latent_of(engine, graph) for graph in (node, select, other))
    assert from_node.shape == (1, 4, 8, 8) and torch.isfinite(from_node).all()
    assert torch.equal(from_node, from_select)
    assert (from_node - from_other).abs().max() > 1e-3
