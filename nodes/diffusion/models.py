"""The objects that flow through MODEL links, and the latent formats.

Contract shared by the loaders (which build these), the samplers (which call them) and LoRA (which patches
them). CLIP objects live in nodes.diffusion.clip, VAE objects in nodes.diffusion.vae.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from . import patches as patch_api


@dataclass(frozen=True)
class LatentFormat:
    channels: int = 4
    scale_factor: float = 0.18215
    shift_factor: float = 0.0
    # Latent -> RGB projection for live previews: one row per latent channel, three columns (R, G, B).
    rgb_factors: tuple[tuple[float, float, float], ...] | None = None
    rgb_bias: tuple[float, float, float] | None = None

    def process_in(self, latent: torch.Tensor) -> torch.Tensor:
        """Raw VAE latent -> the scaled space the UNet works in."""
        return (latent - self.shift_factor) * self.scale_factor

    def process_out(self, latent: torch.Tensor) -> torch.Tensor:
        return latent / self.scale_factor + self.shift_factor


SD15_LATENT = LatentFormat(
    channels=4, scale_factor=0.18215,
    rgb_factors=((0.3512, 0.2297, 0.3227), (0.3250, 0.4974, 0.2350),
                 (-0.2829, 0.1762, 0.2721), (-0.2120, -0.2616, -0.7177)),
)
SDXL_LATENT = LatentFormat(
    channels=4, scale_factor=0.13025,
    rgb_factors=((0.3651, 0.4232, 0.4341), (-0.2533, -0.0042, 0.1068),
                 (0.1076, 0.1111, -0.0362), (-0.3165, -0.2492, -0.2188)),
    rgb_bias=(0.1084, -0.0175, -0.0011),
)


@dataclass(frozen=True)
class ChannelLatentFormat(LatentFormat):
    """A latent space normalised per channel: (latent − mean)·scale_factor / std (Playground v2.5)."""

    latents_mean: tuple[float, ...] = ()
    latents_std: tuple[float, ...] = ()

    def _per_channel(self, values: tuple[float, ...], like: torch.Tensor) -> torch.Tensor:
        return torch.tensor(values, device=like.device, dtype=like.dtype).view(1, -1, 1, 1)

    def process_in(self, latent: torch.Tensor) -> torch.Tensor:
        mean, std = self._per_channel(self.latents_mean, latent), self._per_channel(self.latents_std, latent)
        return (latent - mean) * self.scale_factor / std

    def process_out(self, latent: torch.Tensor) -> torch.Tensor:
        mean, std = self._per_channel(self.latents_mean, latent), self._per_channel(self.latents_std, latent)
        return latent * std / self.scale_factor + mean


PLAYGROUND_V25_LATENT = ChannelLatentFormat(
    channels=4, scale_factor=0.5,
    latents_mean=(-1.6574, 1.886, -1.383, 2.5155), latents_std=(8.4927, 5.9022, 6.5498, 5.2299),
    rgb_factors=((0.3920, 0.4054, 0.4549), (-0.2634, -0.0196, 0.0653),
                 (0.0568, 0.1687, -0.0755), (-0.3112, -0.2359, -0.2076)),
)


class WeightPatch(Protocol):
    """A reversible change to a module's weights (LoRA). apply() returns a function that restores exactly."""

    def apply(self, module: torch.nn.Module) -> Any: ...


@dataclass(frozen=True)
class SamplingConfig:
    """How the model reads noise levels and what it predicts (ComfyUI's model_sampling), as a hashable value.
    nodes.diffusion.schedules.schedule_for builds the schedule object from it.

    SD1/SD2/SDXL: the discrete scaled-linear-beta schedule with eps or v prediction. The ModelSampling* nodes
    choose other kinds: "discrete_distilled" (LCM's 50-step grid), "continuous_edm", "continuous_v" and
    "cosmos_rflow" (log-uniform tables between sigma_min and sigma_max), and the flow-matching kinds with the
    "const" prediction: "discrete_flow" (SD3 / AuraFlow: σ(t) shifted by `shift`, network timestep σ·multiplier)
    and "flux" (σ(t) shifted by exp(shift), `shift` being Flux's μ); "stable_cascade" is Stable Cascade's
    cosine schedule with its SNR shift."""

    beta_start: float = 0.00085
    beta_end: float = 0.012
    timesteps: int = 1000
    prediction: str = "eps"  # "eps" | "v" | "edm" | "x0" | "img_to_img" | "lcm" | "cosmos_rflow" | "const"
    # "discrete" | "discrete_distilled" | "continuous_edm" | "continuous_v" | "cosmos_rflow" | "discrete_flow" |
    # "flux" | "stable_cascade"
    schedule: str = "discrete"
    zsnr: bool = False  # discrete kinds: rescale the betas to zero terminal SNR
    sigma_min: float = 0.002  # continuous kinds only
    sigma_max: float = 120.0
    sigma_data: float = 1.0
    shift: float = 1.0  # flow and Stable Cascade kinds only (for "flux": μ)
    multiplier: float = 1000.0  # "discrete_flow" only: network timestep = σ·multiplier


@dataclass(frozen=True)
class DiffusionModel:
    """What a MODEL link carries: the denoising network plus how to drive it (the patch API: nodes.diffusion.patches).

    Every clone shares the network weights; only the patches differ, and every patching method returns a new
    model, so a patch never shows in another branch or graph. Weight patches are applied inside `prepared()`
    (kept on the module by the memory manager while the same set is asked for again), hooks in `options` act
    only on the calls of this model.
    """

    unet: torch.nn.Module                    # diffusers UNet2DConditionModel
    family: str                              # "sd1" | "sd2" | "sdxl" | "sdxl_refiner"
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    latent_format: LatentFormat = SD15_LATENT
    source: str = ""                         # file the weights came from (identity for caches and affinity)
    patches: tuple[WeightPatch, ...] = ()
    # ComfyUI-shaped model_options: sampler hooks, the UNet wrapper, transformer_options (attention / block
    # patches) and loader facts such as "variant". Copied level by level on clone; never written in place.
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def prediction(self) -> str:
        return self.sampling.prediction

    # Cloning and weight patches -------------------------------------------------------------------------------

    def clone(self, **changes: Any) -> DiffusionModel:
        """A model sharing the weights, with its own copy of the patch set (`changes` replace fields)."""
        changes.setdefault("options", patch_api.copy_options(self.options))
        return dataclasses.replace(self, **changes)

    def with_patches(self, *patches: WeightPatch) -> DiffusionModel:
        return self.clone(patches=self.patches + tuple(patches))

    def add_patches(self, diffs: Mapping[str, torch.Tensor | None], strength_patch: float = 1.0,
                    strength_model: float = 1.0) -> DiffusionModel:
        """ComfyUI's add_patches for plain diffs: W ← strength_model·W + strength_patch·diff for each named UNet
        parameter (a diff of None only scales). Unknown names raise KeyError naming them."""
        names = dict(self.unet.named_parameters())
        unknown = [name for name in diffs if name not in names]
        if unknown:
            raise KeyError(f"no such UNet parameter(s): {', '.join(unknown[:5])}")
        entries = tuple((name, diff, float(strength_patch), float(strength_model)) for name, diff in diffs.items())
        return self.with_patches(patch_api.WeightDiffPatch(entries))

    def with_sampling(self, sampling: SamplingConfig) -> DiffusionModel:
        """The same model sampled with another schedule / prediction type (ModelSamplingDiscrete & co.)."""
        return self.clone(sampling=sampling)

    def with_option(self, key: str, value: Any) -> DiffusionModel:
        return self.clone(options=patch_api.with_option(self.options, key, value))

    # Sampler hooks (ComfyUI's argument dicts; see nodes.diffusion.patches) --------------------------------------

    def set_sampler_cfg_function(self, function: Callable[[dict[str, Any]], torch.Tensor],
                                 disable_cfg1_optimization: bool = False) -> DiffusionModel:
        return self.clone(options=patch_api.with_cfg_function(self.options, function, disable_cfg1_optimization))

    def add_sampler_pre_cfg_function(self, function: Callable[[dict[str, Any]], list[torch.Tensor]],
                                     disable_cfg1_optimization: bool = False) -> DiffusionModel:
        return self.clone(options=patch_api.with_listed_function(
            self.options, patch_api.PRE_CFG_FUNCTIONS, function, disable_cfg1_optimization))

    def add_sampler_post_cfg_function(self, function: Callable[[dict[str, Any]], torch.Tensor],
                                      disable_cfg1_optimization: bool = False) -> DiffusionModel:
        return self.clone(options=patch_api.with_listed_function(
            self.options, patch_api.POST_CFG_FUNCTIONS, function, disable_cfg1_optimization))

    def set_model_unet_function_wrapper(self, wrapper: Callable[[Callable, dict[str, Any]], torch.Tensor]) \
            -> DiffusionModel:
        return self.with_option(patch_api.FUNCTION_WRAPPER, wrapper)

    def set_model_denoise_mask_function(self, function: Callable[..., torch.Tensor]) -> DiffusionModel:
        return self.with_option(patch_api.DENOISE_MASK_FUNCTION, function)

    # UNet patches (ComfyUI's transformer_options layout and block numbering) ------------------------------------

    def set_model_patch(self, patch: Callable[..., Any], name: str) -> DiffusionModel:
        return self.clone(options=patch_api.with_transformer_patch(self.options, name, patch))

    def set_model_patch_replace(self, patch: Callable[..., Any], name: str, block_name: str, number: int,
                                transformer_index: int | None = None) -> DiffusionModel:
        return self.clone(options=patch_api.with_transformer_replace(self.options, name, patch, block_name, number,
                                                                     transformer_index))

    def set_model_attn1_patch(self, patch: Callable[..., Any]) -> DiffusionModel:
        return self.set_model_patch(patch, "attn1_patch")

    def set_model_attn2_patch(self, patch: Callable[..., Any]) -> DiffusionModel:
        return self.set_model_patch(patch, "attn2_patch")

    def set_model_attn1_output_patch(self, patch: Callable[..., Any]) -> DiffusionModel:
        return self.set_model_patch(patch, "attn1_output_patch")

    def set_model_attn2_output_patch(self, patch: Callable[..., Any]) -> DiffusionModel:
        return self.set_model_patch(patch, "attn2_output_patch")

    def set_model_attn1_replace(self, patch: Callable[..., Any], block_name: str, number: int,
                                transformer_index: int | None = None) -> DiffusionModel:
        return self.set_model_patch_replace(patch, "attn1", block_name, number, transformer_index)

    def set_model_attn2_replace(self, patch: Callable[..., Any], block_name: str, number: int,
                                transformer_index: int | None = None) -> DiffusionModel:
        return self.set_model_patch_replace(patch, "attn2", block_name, number, transformer_index)

    def set_model_input_block_patch(self, patch: Callable[..., Any]) -> DiffusionModel:
        return self.set_model_patch(patch, "input_block_patch")

    def set_model_input_block_patch_after_skip(self, patch: Callable[..., Any]) -> DiffusionModel:
        return self.set_model_patch(patch, "input_block_patch_after_skip")

    def set_model_output_block_patch(self, patch: Callable[..., Any]) -> DiffusionModel:
        return self.set_model_patch(patch, "output_block_patch")

    # Running ---------------------------------------------------------------------------------------------------

    def cache_nbytes(self) -> int:
        # The weights are owned (and counted) by the model memory manager, not by the output cache.
        return 0

    @contextlib.contextmanager
    def prepared(self, manager: Any = None) -> Iterator[torch.nn.Module]:
        """The network ready to call: on its compute device with this model's weight patches applied.

        Through the memory manager, the patch set stays on the module after the block (and is swapped only when
        a call asks for another set, restoring exactly first); without one, it is applied here and restored on
        exit."""
        if manager is not None:
            with manager.use(self.unet, self.patches) as module:
                yield module
            return
        with applied_patches(self.unet, self.patches) as module:
            yield module


@contextlib.contextmanager
def applied_patches(module: torch.nn.Module, patches: tuple[WeightPatch, ...]) -> Iterator[torch.nn.Module]:
    """`module` with `patches` applied in order for the block; restored in reverse order on exit."""
    restores = []
    try:
        for patch in patches:
            restores.append(patch.apply(module))
        yield module
    finally:
        for restore in reversed(restores):
            restore()
