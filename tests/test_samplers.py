"""Samplers on a synthetic problem with a known answer.

Data ~ N(μ, s²) per element, so the exact denoiser is D(x, σ) = μ + s²/(s²+σ²)·(x − μ) and the probability-flow
ODE has the closed-form solution x(σ_b) = μ + (x(σ_a) − μ)·√(s²+σ_b²)/√(s²+σ_a²). Deterministic samplers must
follow it (and get closer with more steps); stochastic ones must end with samples distributed as N(μ, s²).
"""

import pytest
import torch

from latentloom.nodes.diffusion.samplers import SAMPLER_NAMES, SAMPLERS, ancestral_step, sampler_for_name
from latentloom.nodes.diffusion.schedules import DiscreteSchedule, calculate_sigmas, karras_sigmas

MU, S = 0.3, 0.5

DETERMINISTIC = ["euler", "euler_cfg_pp", "heun", "heunpp2", "dpm_2", "lms", "dpmpp_2m", "dpmpp_2m_cfg_pp", "ipndm",
                 "ipndm_v", "deis", "res_multistep", "res_multistep_cfg_pp", "gradient_estimation",
                 "gradient_estimation_cfg_pp", "ddim", "uni_pc", "uni_pc_bh2"]
STOCHASTIC = ["euler_ancestral", "euler_ancestral_cfg_pp", "dpm_2_ancestral", "dpmpp_2s_ancestral", "dpmpp_sde",
              "dpmpp_2m_sde", "dpmpp_2m_sde_heun", "dpmpp_3m_sde", "ddpm", "res_multistep_ancestral",
              "res_multistep_ancestral_cfg_pp", "er_sde", "seeds_2", "seeds_3", "dpmpp_2s_ancestral_cfg_pp",
              "sa_solver", "sa_solver_pece"]
SECOND_ORDER = ["heun", "dpm_2", "lms", "dpmpp_2m", "dpmpp_2m_cfg_pp", "ipndm_v", "deis", "res_multistep", "uni_pc",
                "uni_pc_bh2"]


class ExactDenoiser:
    def __init__(self):
        self.calls = 0

    def __call__(self, x, sigma, return_uncond=False, **_):
        self.calls += 1
        s = sigma.reshape(-1, 1, 1, 1)
        denoised = MU + S ** 2 / (S ** 2 + s ** 2) * (x - MU)
        return (denoised, denoised) if return_uncond else denoised


def ode_solution(x, sigma_from, sigma_to):
    return MU + (x - MU) * ((S ** 2 + sigma_to ** 2) / (S ** 2 + sigma_from ** 2)) ** 0.5


@pytest.fixture(scope="module")
def start():
    return torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))


def test_names_in_comfy_order():
    required = {"euler", "euler_ancestral", "heun", "dpm_2", "dpm_2_ancestral", "lms", "dpmpp_2s_ancestral",
                "dpmpp_sde", "dpmpp_2m", "dpmpp_2m_sde", "dpmpp_3m_sde", "ddpm", "lcm", "ddim", "uni_pc",
                "uni_pc_bh2", "deis"}
    assert required <= set(SAMPLER_NAMES)
    assert SAMPLER_NAMES[:5] == ("euler", "euler_cfg_pp", "euler_ancestral", "euler_ancestral_cfg_pp", "heun")
    assert SAMPLER_NAMES[-3:] == ("ddim", "uni_pc", "uni_pc_bh2")
    assert len(SAMPLER_NAMES) == 42  # every name ComfyUI lists (KSAMPLER_NAMES + ddim, uni_pc, uni_pc_bh2)
    assert set(SAMPLER_NAMES) == set(SAMPLERS)
    drops = {name for name in SAMPLER_NAMES if SAMPLERS[name].drops_penultimate}
    assert drops == {"dpm_2", "dpm_2_ancestral", "uni_pc", "uni_pc_bh2"}
    with pytest.raises(ValueError, match="unknown sampler"):
        sampler_for_name("dpm_fast_nonexistent")


@pytest.mark.parametrize("name", DETERMINISTIC)
def test_deterministic_samplers_follow_the_ode(name, start):
    sigma_max, sigma_end = 14.6, 0.5
    x = start * sigma_max
    exact = ode_solution(x, sigma_max, sigma_end)
    errors = []
    for steps in (8, 32):
        sigmas = karras_sigmas(steps, sigma_end, sigma_max)[:-1]  # stop at sigma_end, no final zero
        out = SAMPLERS[name](ExactDenoiser(), x.clone(), sigmas, {"seed": 0})
        errors.append((out - exact).abs().max().item())
    assert errors[1] < 0.05, errors
    if not name.startswith("gradient_estimation"):  # extrapolates d; not monotone in the step count
        assert errors[1] < errors[0] / 1.9, errors
    if name in SECOND_ORDER:
        assert errors[1] < 0.01 and errors[1] < errors[0] / 3.5, errors


@pytest.mark.parametrize("name", DETERMINISTIC)
def test_deterministic_samplers_reach_the_data(name, start):
    sigmas = calculate_sigmas(DiscreteSchedule(), "karras", 20)
    x = start * sigmas[0]
    out = SAMPLERS[name](ExactDenoiser(), x, sigmas, {"seed": 0})
    assert (out - ode_solution(x, sigmas[0], 0.0)).abs().max().item() < 0.2


@pytest.mark.slow
@pytest.mark.parametrize("name", STOCHASTIC)
def test_stochastic_samplers_sample_the_distribution(name):
    noise = torch.randn(1, 4, 64, 64, generator=torch.Generator().manual_seed(1))
    sigmas = calculate_sigmas(DiscreteSchedule(), "karras", 40)
    sampler = SAMPLERS[name]
    out = sampler(ExactDenoiser(), noise * sigmas[0], sigmas, {"seed": 5})
    assert abs(out.mean().item() - MU) < 0.02
    assert 0.44 < out.std().item() < 0.53
    again = sampler(ExactDenoiser(), noise * sigmas[0], sigmas, {"seed": 5})
    other = sampler(ExactDenoiser(), noise * sigmas[0], sigmas, {"seed": 6})
    assert torch.equal(out, again)
    assert (out - other).abs().max().item() > 0.1


@pytest.mark.parametrize("name", ["dpmpp_sde", "dpmpp_2m_sde", "dpmpp_2m_sde_heun", "dpmpp_3m_sde"])
def test_gpu_variants_differ_only_in_tree_device(name, start):
    sigmas = calculate_sigmas(DiscreteSchedule(), "karras", 5)
    x = start * sigmas[0]
    on_cpu = SAMPLERS[name](ExactDenoiser(), x, sigmas, {"seed": 3})
    assert torch.equal(SAMPLERS[name + "_gpu"](ExactDenoiser(), x, sigmas, {"seed": 3}), on_cpu)  # x is on CPU


def test_lcm_renoises_to_each_sigma():
    seen = []

    def record(x, sigma, **_):
        seen.append(x.clone())
        return torch.full_like(x, MU)

    sigmas = torch.tensor([10.0, 4.0, 0.0])
    out = SAMPLERS["lcm"](record, torch.zeros(1, 4, 8, 8), sigmas, {"seed": 2})
    draw = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(2))
    assert torch.allclose(seen[1], MU + draw * 4.0)
    assert torch.equal(out, torch.full_like(out, MU))


def test_sde_with_eta_zero_is_the_ode_solver(start):
    from latentloom.nodes.diffusion.samplers import dpmpp_2m, dpmpp_2m_sde, dpmpp_2s_ancestral, dpmpp_sde  # noqa: I001

    sigmas = calculate_sigmas(DiscreteSchedule(), "normal", 12)
    x = start * sigmas[0]
    ode = dpmpp_2m(ExactDenoiser(), x, sigmas)
    assert torch.allclose(dpmpp_2m_sde(ExactDenoiser(), x, sigmas, eta=0.0), ode, atol=1e-5)
    assert torch.allclose(dpmpp_sde(ExactDenoiser(), x, sigmas, {"seed": 0}, eta=0.0),
                          dpmpp_2s_ancestral(ExactDenoiser(), x, sigmas, eta=0.0), atol=1e-4)


def test_ancestral_step_splits_the_variance():
    sigma, sigma_next = torch.tensor(3.0), torch.tensor(1.5)
    down, up = ancestral_step(sigma, sigma_next)
    assert (down ** 2 + up ** 2).item() == pytest.approx(1.5 ** 2, rel=1e-6)
    assert ancestral_step(sigma, sigma_next, eta=0.0) == (sigma_next, 0.0)
    down0, up0 = ancestral_step(sigma, torch.tensor(0.0))
    assert down0 == 0 and up0 == 0


@pytest.mark.parametrize("name", ["euler", "heun", "dpmpp_2m", "dpmpp_sde", "uni_pc", "deis", "lms"])
def test_one_callback_per_step(name, start):
    sigmas = calculate_sigmas(DiscreteSchedule(), "normal", 6)
    steps = []
    SAMPLERS[name](ExactDenoiser(), start * sigmas[0], sigmas, {"seed": 0},
                   callback=lambda i, denoised, x: steps.append(i))
    assert steps == list(range(6))


def test_model_evaluation_counts(start):
    sigmas = calculate_sigmas(DiscreteSchedule(), "normal", 6)
    counts = {}
    for name in ("euler", "heun", "dpm_2", "dpmpp_sde", "uni_pc", "dpmpp_2m"):
        model = ExactDenoiser()
        SAMPLERS[name](model, start * sigmas[0], sigmas, {"seed": 0})
        counts[name] = model.calls
    # Two evaluations per step except the final step to sigma 0; UniPC evaluates once per step.
    assert counts == {"euler": 6, "heun": 11, "dpm_2": 11, "dpmpp_sde": 11, "uni_pc": 6, "dpmpp_2m": 6}


def test_cfg_pp_with_equal_predictions_is_euler(start):
    sigmas = calculate_sigmas(DiscreteSchedule(), "normal", 8)
    x = start * sigmas[0]
    euler = SAMPLERS["euler"](ExactDenoiser(), x, sigmas, {})
    assert torch.allclose(SAMPLERS["euler_cfg_pp"](ExactDenoiser(), x, sigmas, {}), euler, atol=1e-5)
    assert torch.equal(SAMPLERS["ddim"](ExactDenoiser(), x, sigmas, {}), euler)


def test_cfg_pp_samplers_step_along_the_unguided_prediction():
    """x_next = D + (x − D_uncond)/σ · σ_next for the first (Euler) step of every CFG++ sampler."""
    def guided(x, sigma, return_uncond=False, **_):
        denoised, uncond = torch.full_like(x, 0.5), torch.full_like(x, -0.5)
        return (denoised, uncond) if return_uncond else denoised

    x = torch.full((1, 4, 4, 4), 10.0)
    sigmas = torch.tensor([10.0, 4.0])
    expected = 0.5 + (10.0 + 0.5) / 10.0 * 4.0
    for name in ("euler_cfg_pp", "dpmpp_2m_cfg_pp", "res_multistep_cfg_pp", "gradient_estimation_cfg_pp"):
        out = SAMPLERS[name](guided, x, sigmas, {"seed": 0})
        assert torch.allclose(out, torch.full_like(out, expected), rtol=1e-5), name
        plain = SAMPLERS[name.removesuffix("_cfg_pp")](guided, x, sigmas, {"seed": 0})
        assert not torch.allclose(out, plain), name


def test_dpm_solver_steps_have_orders_one_to_three(start):
    from latentloom.nodes.diffusion.dpm_solver import _Solver

    solver = _Solver(ExactDenoiser(), {}, None)
    x = (start * 14.6).double()
    a, b = torch.tensor(14.6, dtype=torch.float64), torch.tensor(0.5, dtype=torch.float64)
    exact = ode_solution(x, a, b)
    for order, step in ((1, solver.step_1), (2, solver.step_2), (3, solver.step_3)):
        errors = []
        for count in (4, 8):
            ts = torch.linspace(float(-a.log()), float(-b.log()), count + 1, dtype=torch.float64)
            y = x
            for i in range(count):
                y = step(y, ts[i], ts[i + 1], {})
            errors.append((y - exact).abs().max().item())
        assert errors[0] / errors[1] > 2 ** order * 0.85, (order, errors)


def test_dpm_fast_and_adaptive_end_at_the_last_nonzero_sigma(start):
    sigmas = karras_sigmas(20, 0.5, 14.6)  # ends 0.5, 0
    x = start * sigmas[0]
    exact = ode_solution(x, sigmas[0], 0.5)
    model = ExactDenoiser()
    fast = SAMPLERS["dpm_fast"](model, x, sigmas, {})
    assert model.calls == 20  # the step count is the evaluation budget
    assert (fast - exact).abs().max().item() < 0.03
    adaptive = SAMPLERS["dpm_adaptive"](ExactDenoiser(), x, sigmas, {})
    assert (adaptive - exact).abs().max().item() < 0.1


@pytest.mark.parametrize("name", ["seeds_2", "seeds_3"])
def test_seeds_without_noise_solve_the_ode(name, start):
    from latentloom.nodes.diffusion import samplers

    x = start * 14.6
    exact = ode_solution(x, 14.6, 0.5)
    errors = [(getattr(samplers, name)(ExactDenoiser(), x, karras_sigmas(n, 0.5, 14.6)[:-1], eta=0.0) - exact)
              .abs().max().item() for n in (4, 8)]
    assert errors[1] < errors[0] / 3.5 and errors[1] < 0.05, errors


@pytest.mark.parametrize("use_pece", [False, True])
def test_sa_solver_without_noise_is_a_high_order_ode_solver(use_pece, start):
    from latentloom.nodes.diffusion.sa_solver import sa_solver

    x = start * 14.6
    exact = ode_solution(x, 14.6, 0.0)
    # Sigmas ending at 0: the last step returns D at σ_min = 0.002, where D and the ODE's end differ by ~σ_min².
    errors = [(sa_solver(ExactDenoiser(), x, karras_sigmas(n, 0.002, 14.6), {}, tau_func=lambda s: 0.0,
                         use_pece=use_pece) - exact).abs().max().item() for n in (16, 32)]
    assert errors[1] < errors[0] / 4 and errors[1] < 0.005, errors


def test_sa_solver_on_sigmas_not_ending_at_0_returns_the_last_corrected_state(start):
    """ComfyUI's rule: sample_sa_solver returns its corrected state x, which on the high half of a split
    schedule sits at sigmas[-2] (the prediction for sigmas[-1] is computed, then dropped)."""
    from latentloom.nodes.diffusion.sa_solver import sa_solver

    x = start * 14.6
    sigmas = karras_sigmas(10, 0.5, 14.6)
    # One step: the only state ever corrected is the input itself.
    assert torch.equal(sa_solver(ExactDenoiser(), x, sigmas[:2], {}, tau_func=lambda s: 0.0), x)
    high = sigmas[:6]
    result = sa_solver(ExactDenoiser(), x, high, {}, tau_func=lambda s: 0.0)
    at_last_corrected = (result - ode_solution(x, 14.6, float(high[-2]))).abs().max().item()
    at_end = (result - ode_solution(x, 14.6, float(high[-1]))).abs().max().item()
    assert at_last_corrected < 1e-3 and at_end > 1.0, (at_last_corrected, at_end)
