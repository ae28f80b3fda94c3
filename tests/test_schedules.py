"""Sigma tables, schedulers and noise against ComfyUI's reference numbers
(docs/comfyui-reference.md#noise-and-schedules)."""

import math

import numpy as np
import pytest
import torch

from latentloom.nodes.diffusion.models import SamplingConfig
from latentloom.nodes.diffusion.noise import BrownianNoise, DeviceNoise, initial_noise
from latentloom.nodes.diffusion.schedules import (
    SCHEDULER_NAMES,
    DiscreteSchedule,
    advanced_sigmas,
    basic_scheduler_sigmas,
    calculate_sigmas,
    denoise_sigmas,
    karras_sigmas,
    sampler_sigmas,
    sd_turbo_sigmas,
)

NORMAL_20 = [14.61464, 10.74680, 8.08152, 6.20494, 4.85565, 3.86538, 3.12376, 2.55717, 2.11566, 1.76482, 1.48058,
             1.24581, 1.04814, 0.87843, 0.72972, 0.59643, 0.47358, 0.35555, 0.23216, 0.02917, 0.0]
NORMAL_20_TIMESTEPS = [999, 946, 894, 841, 789, 736, 684, 631, 578, 526, 473, 421, 368, 315, 263, 210, 158, 105,
                       53, 0]


@pytest.fixture(scope="module")
def schedule():
    return DiscreteSchedule()


def _reference_table() -> np.ndarray:
    """An independent float64 sigma table (numpy), for checks beyond the printed digits."""
    betas = np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=np.float64) ** 2
    alphas_cumprod = np.cumprod(1.0 - betas)
    return np.sqrt((1 - alphas_cumprod) / alphas_cumprod)


def test_table_is_float64_derived_float32(schedule):
    assert schedule.sigmas.dtype == torch.float32 and schedule.sigmas.shape == (1000,)
    reference = _reference_table()
    assert np.array_equal(schedule.sigmas.numpy(), reference.astype(np.float32))
    assert np.array_equal(schedule.log_sigmas.numpy(), np.log(reference).astype(np.float32))
    assert schedule.sigma_min.item() == pytest.approx(0.0291672, abs=1e-6)
    assert schedule.sigma_max.item() == pytest.approx(14.614641, abs=1e-6)
    assert math.sqrt(1 + schedule.sigma_max.item() ** 2) == pytest.approx(14.648814, abs=1e-6)


def test_sigma_and_timestep_round_trip(schedule):
    steps = torch.tensor([0.0, 1.0, 500.0, 999.0])
    # exp(log σ) in float32: equal to the table up to rounding, as in ComfyUI.
    assert torch.allclose(schedule.sigma(steps), schedule.sigmas[[0, 1, 500, 999]], rtol=1e-6, atol=0)
    # Fractional t interpolates in log sigma.
    half = schedule.sigma(torch.tensor(10.5)).log()
    assert half.item() == pytest.approx((schedule.log_sigmas[10] + schedule.log_sigmas[11]).item() / 2, rel=1e-6)
    # The UNet only sees the nearest integer timestep.
    assert schedule.timestep(schedule.sigmas[[3, 700]]).tolist() == [3.0, 700.0]
    between = schedule.sigma(torch.tensor(700.4))
    assert schedule.timestep(between).item() == 700.0


def test_percent_to_sigma(schedule):
    assert schedule.percent_to_sigma(0.0) == 999999999.9
    assert schedule.percent_to_sigma(1.0) == 0.0
    assert schedule.percent_to_sigma(0.25) == pytest.approx(4.0861, abs=1e-4)
    assert schedule.percent_to_sigma(0.5) == pytest.approx(1.6156, abs=1e-4)
    assert schedule.percent_to_sigma(0.75) == pytest.approx(0.6951, abs=1e-4)


def test_normal_20_matches_reference(schedule):
    sigmas = calculate_sigmas(schedule, "normal", 20)
    assert sigmas.dtype == torch.float32
    assert sigmas.tolist() == pytest.approx(NORMAL_20, abs=6e-6)
    assert schedule.timestep(sigmas[:-1]).int().tolist() == NORMAL_20_TIMESTEPS
    # Against an independent float64 evaluation of the same rule.
    log_table = np.log(_reference_table())
    t = np.linspace(999, 0, 20)
    low, high = np.floor(t).astype(int), np.ceil(t).astype(int)
    expected = np.exp((1 - (t - low)) * log_table[low] + (t - low) * log_table[high])
    assert np.allclose(sigmas[:-1].numpy(), expected, rtol=1e-6, atol=0)


def test_karras_20(schedule):
    sigmas = calculate_sigmas(schedule, "karras", 20)
    assert sigmas[:3].tolist() == pytest.approx([14.61464, 11.72537, 9.34020], abs=6e-6)
    assert sigmas[-3:].tolist() == pytest.approx([0.04848, 0.02917, 0.0], abs=6e-6)
    assert torch.equal(sigmas, karras_sigmas(20, float(schedule.sigma_min), float(schedule.sigma_max)))


def test_simple_is_trailing_table_values(schedule):
    sigmas = calculate_sigmas(schedule, "simple", 20)
    assert torch.equal(sigmas[:-1], schedule.sigmas[[999 - 50 * i for i in range(20)]])
    assert sigmas[-1] == 0


def test_ddim_uniform_counts_and_start(schedule):
    twenty = calculate_sigmas(schedule, "ddim_uniform", 20)
    assert twenty[0].item() == pytest.approx(11.028, abs=1e-3)
    assert twenty[0] == schedule.sigmas[951] and len(twenty) == 21
    assert len(calculate_sigmas(schedule, "ddim_uniform", 30)) == 32  # 31 steps for 30 asked


def test_exponential_sgm_and_beta(schedule):
    exponential = calculate_sigmas(schedule, "exponential", 10)
    ratios = exponential[1:-1] / exponential[:-2]
    assert torch.allclose(ratios, ratios[0].expand_as(ratios), rtol=1e-5)
    sgm = calculate_sigmas(schedule, "sgm_uniform", 10)
    assert len(sgm) == 11 and sgm[-2] > schedule.sigma_min
    assert sgm[0].item() == pytest.approx(schedule.sigma_max.item(), rel=1e-6)
    beta = calculate_sigmas(schedule, "beta", 10)
    assert beta[0] == schedule.sigma_max and beta[-1] == 0
    assert bool((beta[1:] < beta[:-1]).all())
    assert all(v in schedule.sigmas.tolist() for v in beta[:-1].tolist())
    # Many steps: rounding makes timesteps repeat, and repeats are dropped.
    assert len(calculate_sigmas(schedule, "beta", 1000)) < 1001


def test_every_scheduler_is_decreasing_to_zero(schedule):
    assert SCHEDULER_NAMES == ("simple", "sgm_uniform", "karras", "exponential", "ddim_uniform", "beta", "normal",
                               "linear_quadratic", "kl_optimal")
    for name in SCHEDULER_NAMES:
        sigmas = calculate_sigmas(schedule, name, 12)
        assert sigmas[-1] == 0, name
        assert bool((sigmas[1:] < sigmas[:-1]).all()), name
    with pytest.raises(ValueError, match="unknown scheduler"):
        calculate_sigmas(schedule, "nope", 10)


def test_denoise_keeps_tail_of_longer_schedule(schedule):
    sigmas = denoise_sigmas(schedule, "normal", 20, 0.5)
    assert len(sigmas) == 21
    assert torch.equal(sigmas, calculate_sigmas(schedule, "normal", 40)[-21:])
    assert sigmas[0].item() == pytest.approx(1.54816, abs=6e-6)
    assert sigmas[-2:].tolist() == pytest.approx([0.02917, 0.0], abs=6e-6)
    # int() truncation: 20 / 0.3 = 66.67 -> 66 steps.
    assert torch.equal(denoise_sigmas(schedule, "karras", 20, 0.3), calculate_sigmas(schedule, "karras", 66)[-21:])
    assert torch.equal(denoise_sigmas(schedule, "normal", 20, 0.99995), calculate_sigmas(schedule, "normal", 20))
    assert denoise_sigmas(schedule, "normal", 20, 0.0).numel() == 0
    assert torch.equal(basic_scheduler_sigmas(schedule, "normal", 20, 0.5), sigmas)


def test_penultimate_drop(schedule):
    dropped = sampler_sigmas(schedule, "normal", 10, drops_penultimate=True)
    longer = calculate_sigmas(schedule, "normal", 11)
    assert len(dropped) == 11
    assert torch.equal(dropped, torch.cat([longer[:-2], longer[-1:]]))


def test_advanced_truncation(schedule):
    full = calculate_sigmas(schedule, "normal", 20)
    first = advanced_sigmas(full, 0, 10, force_full_denoise=False)
    assert torch.equal(first, full[:11])
    forced = advanced_sigmas(full, 0, 10, force_full_denoise=True)
    assert forced[-1] == 0 and torch.equal(forced[:-1], full[:10]) and full[10] != 0
    assert torch.equal(advanced_sigmas(full, 10, 10000, True), full[10:])
    assert advanced_sigmas(full, 20, 10000, True) is None


def test_sd_turbo(schedule):
    one = sd_turbo_sigmas(schedule, 1, 1.0)
    assert one.tolist() == pytest.approx([schedule.sigmas[999].item(), 0.0], rel=1e-6)
    four = sd_turbo_sigmas(schedule, 4, 1.0)
    assert torch.allclose(four[:-1], schedule.sigmas[[999, 899, 799, 699]], rtol=1e-6, atol=0)
    half = sd_turbo_sigmas(schedule, 2, 0.5)
    assert torch.allclose(half[:-1], schedule.sigmas[[499, 399]], rtol=1e-6, atol=0) and half[-1] == 0


def test_other_training_schedule():
    custom = DiscreteSchedule(SamplingConfig(beta_start=0.0001, beta_end=0.02, timesteps=500))
    assert custom.sigmas.shape == (500,)
    assert calculate_sigmas(custom, "normal", 5)[0] == custom.sigmas[-1]


# --- noise ---------------------------------------------------------------------------------------------------

def test_seed_zero_noise_reference_values():
    noise = initial_noise(torch.zeros(1, 4, 64, 64), 0)
    assert noise.dtype == torch.float32 and noise.device.type == "cpu"
    assert noise.flatten()[:4].tolist() == pytest.approx([-1.1258398, -1.1523602, -0.2505786, -0.4338788],
                                                          abs=1e-7)


def test_batch_is_one_stream_and_global_rng_untouched():
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    batch = initial_noise(torch.zeros(2, 4, 8, 8), 5)
    assert torch.equal(torch.random.get_rng_state(), before)
    single = initial_noise(torch.zeros(1, 4, 8, 8), 5)
    assert torch.equal(batch[:1], single)
    assert not torch.equal(batch[1:], initial_noise(torch.zeros(1, 4, 8, 8), 6))


def test_batch_index_draws_sequentially():
    latent = torch.zeros(3, 4, 8, 8)
    stream = initial_noise(torch.zeros(4, 4, 8, 8), 7)  # 4·8·8 is a multiple of 16: same as separate draws
    picked = initial_noise(latent, 7, batch_index=[3, 1, 1])
    assert torch.equal(picked, stream[[3, 1, 1]])
    odd = initial_noise(torch.zeros(2, 4, 3, 3), 7, batch_index=[0, 1])
    assert odd.shape == (2, 4, 3, 3)
    assert torch.equal(odd[0], initial_noise(torch.zeros(1, 4, 3, 3), 7)[0])


def test_device_noise_is_seeded_and_sequential():
    like = torch.zeros(2, 4, 4, 4)
    a, b = DeviceNoise(like, 3), DeviceNoise(like, 3)
    first, second = a(), a()
    assert torch.equal(first, b()) and not torch.equal(first, second)
    assert torch.equal(first, torch.randn(like.shape, generator=torch.Generator().manual_seed(3)))


def test_brownian_noise_is_order_independent_and_unit_variance():
    like = torch.zeros(1, 4, 32, 32)
    lo, hi = torch.tensor(0.03), torch.tensor(14.6)
    one, two = BrownianNoise(like, lo, hi, seed=9), BrownianNoise(like, lo, hi, seed=9)
    a1 = one(torch.tensor(5.0), torch.tensor(3.0))
    b1 = one(torch.tensor(1.0), torch.tensor(0.5))
    b2 = two(torch.tensor(1.0), torch.tensor(0.5))
    a2 = two(torch.tensor(5.0), torch.tensor(3.0))
    assert torch.allclose(a1, a2, atol=1e-6) and torch.allclose(b1, b2, atol=1e-6)
    assert 0.9 < a1.std().item() < 1.1 and abs(a1.mean().item()) < 0.1
    # Increments over adjacent intervals add up (a Brownian path, not independent draws).
    whole = one(torch.tensor(5.0), torch.tensor(1.0)) * 2.0
    parts = a1 * math.sqrt(2.0) + one(torch.tensor(3.0), torch.tensor(1.0)) * math.sqrt(2.0)
    assert torch.allclose(whole, parts, atol=1e-4)
    other = BrownianNoise(like, lo, hi, seed=10)(torch.tensor(5.0), torch.tensor(3.0))
    assert not torch.allclose(a1, other)
