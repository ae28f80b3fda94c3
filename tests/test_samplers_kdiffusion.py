"""Our samplers against an independent reference: k-diffusion 0.1.1.post1's `sampling.py` (the code ComfyUI forked).

Every sampler k-diffusion has is run on the same denoiser, sigmas, start latent and noise by both implementations,
and the final latents must agree to float32 rounding. The denoiser is a small fixed analytic function, non-linear
in x and mixing channels, so a wrong coefficient anywhere shows up.

Noise: ancestral samplers get our default source (a generator on the latent's device seeded with
`extra_args["seed"]`, one randn per call) against k-diffusion with a noise sampler that draws from a generator
seeded the same way; SDE samplers get our default Brownian tree against k-diffusion's `BrownianTreeNoiseSampler`
with the same seed. So the comparison also checks that our noise sources are k-diffusion's/ComfyUI's.

Where ComfyUI changed a sampler after forking k-diffusion, the difference is stated and the part that is the
same is compared (see test_lms_last_step_is_comfyui_denoising_step).

k-diffusion's package `__init__` imports its training stack (clean-fid, scikit-image, ...), which is not installed,
so `k_diffusion/sampling.py` and `utils.py` are loaded straight from their files. `utils.py` imports torchvision at
module level but sampling only uses its `append_dims`: when torchvision is already imported (transformers' model
classes import it) the real one serves; otherwise a stub stands in during that one import (importing the real one
costs seconds) and is gone afterwards.
"""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path

import pytest
import torch

from latentloom.nodes.diffusion import dpm_solver, multistep, samplers

SEED = 1234


def _load_kdiffusion_sampling() -> types.ModuleType:
    spec = importlib.util.find_spec("k_diffusion")  # locates the package without running its __init__
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("k-diffusion is not installed: the Makefile installs it with "
                           "`pip install --no-deps k-diffusion==0.1.1.post1`")
    package_dir = Path(next(iter(spec.submodule_search_locations)))
    # A private package name, so the real `k_diffusion` entry of sys.modules is never touched.
    package = types.ModuleType("_kdiffusion_reference")
    package.__path__ = [str(package_dir)]
    stubs: dict[str, types.ModuleType] = {"_kdiffusion_reference": package}
    if "torchvision" not in sys.modules:
        torchvision_stub = types.ModuleType("torchvision")
        transforms_stub = types.ModuleType("torchvision.transforms")
        functional_stub = types.ModuleType("torchvision.transforms.functional")
        torchvision_stub.transforms = transforms_stub  # type: ignore[attr-defined]
        transforms_stub.functional = functional_stub  # type: ignore[attr-defined]
        stubs.update({"torchvision": torchvision_stub, "torchvision.transforms": transforms_stub,
                      "torchvision.transforms.functional": functional_stub})
    assert not set(stubs) & set(sys.modules)
    # Only these names come and go: the real modules imported meanwhile (scipy, torchsde, ...) must stay, as
    # some extension modules cannot be loaded twice in one process.
    added = list(stubs)
    sys.modules.update(stubs)
    try:
        loaded = {}
        for name in ("utils", "sampling"):
            module_spec = importlib.util.spec_from_file_location(f"_kdiffusion_reference.{name}",
                                                                 package_dir / f"{name}.py")
            assert module_spec is not None and module_spec.loader is not None
            module = importlib.util.module_from_spec(module_spec)
            sys.modules[module_spec.name] = module
            added.append(module_spec.name)
            setattr(package, name, module)
            module_spec.loader.exec_module(module)
            loaded[name] = module
    finally:
        for name in added:
            sys.modules.pop(name, None)
    return loaded["sampling"]


K = _load_kdiffusion_sampling()


def test_reference_loaded_without_side_effects():
    # The stubs (module objects without a spec) are gone again: transformers probes for a real torchvision.
    assert all(module.__spec__ is not None for name, module in sys.modules.items()
               if name.split(".")[0] == "torchvision")
    assert not any(name.startswith("_kdiffusion_reference") for name in sys.modules)
    assert K.sample_euler.__module__ == "_kdiffusion_reference.sampling"


class Denoiser:
    """D(x, σ) = c(σ)·tanh(W ⋆ x) + (1 − c(σ))·μ with c = s²/(s²+σ²): a fixed 1×1 channel mix, then tanh."""

    def __init__(self, channels: int = 4):
        generator = torch.Generator().manual_seed(0)
        self.mix = torch.randn(channels, channels, generator=generator) / channels ** 0.5
        self.mean = torch.linspace(-0.4, 0.4, channels).reshape(1, channels, 1, 1)
        self.calls = 0

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, **_) -> torch.Tensor:
        self.calls += 1
        assert sigma.shape == (x.shape[0],)
        c = (0.25 / (0.25 + sigma ** 2)).reshape(-1, 1, 1, 1)
        mixed = torch.einsum("oc,bchw->bohw", self.mix, x)
        return c * torch.tanh(mixed) + (1 - c) * self.mean


class SeededNoise:
    """k-diffusion's noise_sampler protocol, drawing from a private CPU generator (ComfyUI's noise source A)."""

    def __init__(self, like: torch.Tensor, seed: int):
        self.like = like
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, sigma, sigma_next):
        return torch.randn(self.like.shape, dtype=self.like.dtype, generator=self.generator)


def karras(steps: int) -> torch.Tensor:
    return K.get_sigmas_karras(steps, 0.0292, 14.6146, rho=7.0).float()


@pytest.fixture(scope="module")
def start() -> torch.Tensor:
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    return noise * karras(12)[0]


def assert_same(ours: torch.Tensor, reference: torch.Tensor, atol: float = 1e-6) -> None:
    assert torch.isfinite(reference).all()
    difference = (ours - reference).abs().max().item()
    scale = reference.abs().max().item()
    assert difference <= atol * max(1.0, scale), f"max |ours − k-diffusion| = {difference:.3g} (scale {scale:.3g})"


def run_both(ours_fn, reference_fn, start: torch.Tensor, sigmas: torch.Tensor, ours_options=None,
             reference_options=None) -> tuple[torch.Tensor, torch.Tensor]:
    ours_model, reference_model = Denoiser(), Denoiser()
    ours = ours_fn(ours_model, start.clone(), sigmas, extra_args={"seed": SEED}, **(ours_options or {}))
    with torch.random.fork_rng():  # k-diffusion draws (and discards) global randn in euler/heun/dpm_2
        reference = reference_fn(reference_model, start.clone(), sigmas, disable=True, **(reference_options or {}))
    assert ours_model.calls == reference_model.calls
    return ours, reference


# --- deterministic samplers --------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["euler", "heun", "dpm_2", "dpmpp_2m"])
@pytest.mark.parametrize("steps", [1, 2, 12])
def test_deterministic_sampler_matches(name, steps, start):
    sigmas = karras(steps)
    ours, reference = run_both(getattr(samplers, name), getattr(K, f"sample_{name}"), start, sigmas)
    assert_same(ours, reference)


def test_lms_matches_while_sigma_stays_positive(start):
    """On a schedule that does not end at 0 both do the same linear multistep steps (orders 1, 2, 3, 4, 4, ...)."""
    sigmas = karras(12)[:-1]
    ours, reference = run_both(multistep.lms, K.sample_lms, start, sigmas)
    assert_same(ours, reference)


def test_lms_last_step_is_comfyui_denoising_step(start):
    """ComfyUI (after forking) replaced LMS's final step to σ = 0 by the denoised estimate, x ← D(x, σ_last);
    k-diffusion 0.1.1 still takes a 4th-order multistep step there. So: ours to σ = 0 equals k-diffusion up to the
    last positive sigma followed by one evaluation of D."""
    sigmas = karras(12)
    ours = multistep.lms(Denoiser(), start.clone(), sigmas, extra_args={})
    before_last = K.sample_lms(Denoiser(), start.clone(), sigmas[:-1], disable=True)
    expected = Denoiser()(before_last, sigmas[-2] * torch.ones(start.shape[0]))
    assert_same(ours, expected)
    # ... and it is a real difference, not rounding, so the choice is deliberate.
    kdiffusion_final = K.sample_lms(Denoiser(), start.clone(), sigmas, disable=True)
    assert (ours - kdiffusion_final).abs().max() > 1e-3


@pytest.mark.parametrize("steps", [3, 7, 10])  # nfe % 3 == 0 gives orders 3…, 2, 1; otherwise 3…, nfe % 3
def test_dpm_fast_matches(steps, start):
    """ComfyUI calls k-diffusion's dpm_fast with σ_max = sigmas[0], σ_min = the last non-zero sigma, n = steps."""
    sigmas = karras(steps)
    model = Denoiser()
    ours = dpm_solver.dpm_fast(model, start.clone(), sigmas, extra_args={})
    reference_model = Denoiser()
    reference = K.sample_dpm_fast(reference_model, start.clone(), float(sigmas[-2]), float(sigmas[0]), steps,
                                  disable=True, noise_sampler=SeededNoise(start, SEED))
    assert model.calls == reference_model.calls == steps
    assert_same(ours, reference)


def test_dpm_adaptive_matches(start):
    sigmas = karras(12)
    model = Denoiser()
    ours = dpm_solver.dpm_adaptive(model, start.clone(), sigmas, extra_args={})
    reference_model = Denoiser()
    reference, info = K.sample_dpm_adaptive(reference_model, start.clone(), float(sigmas[-2]), float(sigmas[0]),
                                            disable=True, noise_sampler=SeededNoise(start, SEED), return_info=True)
    assert info["n_reject"] > 0  # the step-size controller's reject branch is exercised too
    assert model.calls == reference_model.calls == info["nfe"]
    assert_same(ours, reference)


# --- ancestral samplers (noise source A) -------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["euler_ancestral", "dpm_2_ancestral", "dpmpp_2s_ancestral"])
@pytest.mark.parametrize("eta, s_noise", [(1.0, 1.0), (0.5, 0.8)])
def test_ancestral_sampler_matches(name, eta, s_noise, start):
    sigmas = karras(12)
    ours, reference = run_both(getattr(samplers, name), getattr(K, f"sample_{name}"), start, sigmas,
                               {"eta": eta, "s_noise": s_noise},
                               {"eta": eta, "s_noise": s_noise, "noise_sampler": SeededNoise(start, SEED)})
    assert_same(ours, reference)


def test_ancestral_noise_matters(start):
    """Guards the comparison above: another seed gives another result."""
    sigmas = karras(12)
    ours, reference = run_both(samplers.euler_ancestral, K.sample_euler_ancestral, start, sigmas, {},
                               {"noise_sampler": SeededNoise(start, SEED + 1)})
    assert (ours - reference).abs().max() > 1e-2


# --- SDE samplers (noise source B: Brownian tree) ----------------------------------------------------------------

def brownian(start: torch.Tensor, sigmas: torch.Tensor, seed: int = SEED):
    return K.BrownianTreeNoiseSampler(start, sigmas[sigmas > 0].min(), sigmas.max(), seed=seed)


# k-diffusion's tree gets float32 tensor ends; torchsde compares them with its float copies and warns.
@pytest.mark.filterwarnings("ignore:Should have t:UserWarning")
@pytest.mark.parametrize("name, ours_options, reference_options", [
    ("dpmpp_sde", {}, {}),
    ("dpmpp_sde", {"eta": 0.6, "s_noise": 0.9, "r": 0.4}, {"eta": 0.6, "s_noise": 0.9, "r": 0.4}),
    ("dpmpp_2m_sde", {}, {}),
    ("dpmpp_2m_sde", {"solver_type": "heun"}, {"solver_type": "heun"}),
    ("dpmpp_2m_sde", {"eta": 0.5, "s_noise": 0.7}, {"eta": 0.5, "s_noise": 0.7}),
    ("dpmpp_3m_sde", {}, {}),
    ("dpmpp_3m_sde", {"eta": 0.5, "s_noise": 0.7}, {"eta": 0.5, "s_noise": 0.7}),
])
def test_sde_sampler_matches(name, ours_options, reference_options, start):
    sigmas = karras(12)
    ours, reference = run_both(getattr(samplers, name), getattr(K, f"sample_{name}"), start, sigmas, ours_options,
                               {**reference_options, "noise_sampler": brownian(start, sigmas)})
    # dpmpp_sde: k-diffusion queries the tree at σ recomputed as exp(−(−log σ)) (ours at σ itself, as ComfyUI
    # does) and ComfyUI's form carries α = σ·e^λ factors; both are float32 rounding, about 1e-5 here.
    assert_same(ours, reference, atol=5e-5 if name == "dpmpp_sde" else 1e-6)


@pytest.mark.filterwarnings("ignore:Should have t:UserWarning")
def test_sde_noise_matters(start):
    sigmas = karras(12)
    ours, reference = run_both(samplers.dpmpp_2m_sde, K.sample_dpmpp_2m_sde, start, sigmas, {},
                               {"noise_sampler": brownian(start, sigmas, SEED + 1)})
    assert (ours - reference).abs().max() > 1e-2


def test_every_kdiffusion_sampler_is_compared():
    """A new sampler in the reference (or a renamed one) must get a comparison above."""
    compared = {"euler", "heun", "dpm_2", "dpmpp_2m", "lms", "dpm_fast", "dpm_adaptive", "euler_ancestral",
                "dpm_2_ancestral", "dpmpp_2s_ancestral", "dpmpp_sde", "dpmpp_2m_sde", "dpmpp_3m_sde"}
    reference_samplers = {name.removeprefix("sample_") for name in vars(K) if name.startswith("sample_")}
    assert reference_samplers == compared
    assert compared <= set(samplers.SAMPLER_NAMES)
