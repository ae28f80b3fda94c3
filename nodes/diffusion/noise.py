"""Noise exactly as ComfyUI draws it.

* Initial noise: a CPU generator seeded with the seed, one float32 randn call for the whole batch (sample b is
  the b-th slice of one stream, not seed + b). With `batch_index`, [1, C, H, W] tensors are drawn one after
  another up to the largest index and the listed ones are picked.
* Ancestral noise ("A"): a generator on the sampling device seeded with the same seed; each call draws randn
  for the whole batch, consumed in call order.
* SDE noise ("B"): a torchsde Brownian tree between the smallest non-zero and the largest sigma, seeded with
  the seed (entropy), on CPU (or on the sampling device for the `_gpu` samplers); queries are order-independent.

Every generator here is private: nothing touches torch's global RNG.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Protocol

import torch


def initial_noise(latent: torch.Tensor, seed: int, batch_index: Sequence[int] | None = None) -> torch.Tensor:
    """ComfyUI's prepare_noise: float32 CPU noise shaped like `latent`."""
    generator = torch.Generator("cpu").manual_seed(seed)
    shape = tuple(latent.shape)
    if batch_index is None:
        return torch.randn(shape, dtype=torch.float32, generator=generator, device="cpu")
    indices = [int(i) for i in batch_index]
    if not indices:
        return torch.zeros((0,) + shape[1:], dtype=torch.float32)
    wanted = set(indices)
    drawn: dict[int, torch.Tensor] = {}
    for index in range(max(indices) + 1):
        one = torch.randn((1,) + shape[1:], dtype=torch.float32, generator=generator, device="cpu")
        if index in wanted:
            drawn[index] = one
    return torch.cat([drawn[i] for i in indices], dim=0)


def seeded_randn(shape: Sequence[int], seed: int) -> torch.Tensor:
    """One float32 CPU randn call from a fresh generator (the "ddim" sampler's inpaint noise uses seed + 1)."""
    return torch.randn(tuple(shape), dtype=torch.float32, generator=torch.Generator("cpu").manual_seed(seed))


class NoiseSource(Protocol):
    """noise(sigma, sigma_next) -> unit-variance noise shaped like the latent."""

    def __call__(self, sigma: torch.Tensor, sigma_next: torch.Tensor) -> torch.Tensor: ...


class DeviceNoise:
    """Source A: a generator on the latent's device; every call draws the next batch-sized randn."""

    def __init__(self, like: torch.Tensor, seed: int | None):
        self.shape = like.shape
        self.dtype = like.dtype
        self.device = like.device
        self.generator = None
        if seed is not None:
            self.generator = torch.Generator(device=like.device)
            self.generator.manual_seed(seed)

    def __call__(self, sigma: torch.Tensor | None = None, sigma_next: torch.Tensor | None = None) -> torch.Tensor:
        return torch.randn(self.shape, dtype=self.dtype, device=self.device, generator=self.generator)


class BrownianNoise:
    """Source B: increments of one Brownian motion over sigma, W(σa, σb)/√|σb − σa|, from a torchsde tree."""

    def __init__(self, like: torch.Tensor, sigma_min: torch.Tensor, sigma_max: torch.Tensor, seed: int | None,
                 on_cpu: bool = True):
        import torchsde

        if seed is None:
            seed = int(torch.randint(0, 2 ** 63 - 1, []).item())
        self.on_cpu = on_cpu
        t0, t1 = sorted((torch.as_tensor(sigma_min), torch.as_tensor(sigma_max)), key=float)
        w0 = torch.zeros_like(like)
        if on_cpu:
            self.tree = torchsde.BrownianTree(t0.cpu(), w0.cpu(), t1.cpu(), entropy=seed)
        else:
            self.tree = torchsde.BrownianTree(t0, w0, t1, entropy=seed)

    def _increment(self, t_a: torch.Tensor, t_b: torch.Tensor) -> torch.Tensor:
        sign = 1.0
        if t_a > t_b:
            t_a, t_b, sign = t_b, t_a, -1.0
        with warnings.catch_warnings():
            # torchsde keeps its ends as Python floats; float32 sigmas at the ends trip its range check.
            warnings.filterwarnings("ignore", message="Should have t[ab]")
            if self.on_cpu:
                w = self.tree(t_a.cpu().float(), t_b.cpu().float()).to(t_a.dtype).to(t_a.device)
            else:
                w = self.tree(t_a, t_b)
        return w * sign

    def __call__(self, sigma: torch.Tensor, sigma_next: torch.Tensor) -> torch.Tensor:
        t_a, t_b = torch.as_tensor(sigma), torch.as_tensor(sigma_next)
        return self._increment(t_a, t_b) / (t_b - t_a).abs().sqrt()


def brownian_noise_for(x: torch.Tensor, sigmas: torch.Tensor, seed: int | None, on_cpu: bool = True) -> BrownianNoise:
    """The tree ComfyUI's SDE samplers build: from the smallest non-zero sigma to the largest."""
    positive = sigmas[sigmas > 0]
    return BrownianNoise(x, positive.min(), sigmas.max(), seed, on_cpu=on_cpu)
