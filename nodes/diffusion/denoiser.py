"""The model wrapper the samplers call: D = f(x, σ), with CFG, conditioning weights, inpainting and ControlNet.

Numerics follow ComfyUI (docs/comfyui-reference.md#denoiser): x stays float32; the UNet gets x/√(σ²+1) in its own dtype
and the *integer* timestep nearest to σ; its output is cast back to float32 and turned into a denoised
estimate (eps: x − ε̂σ; v: x/(σ²+1) − v̂σ/√(σ²+1)); CFG runs on the denoised estimates in float32, and is skipped
(no negative evaluation) when cfg ≈ 1.

ControlNet protocol. A conditioning entry may carry `options["control"]`: any object with

    residuals(x_in, sigma, timestep, context, model, **kwargs)
        -> (down_block_additional_residuals: tuple[Tensor, ...], mid_block_additional_residual: Tensor) | None

called once per UNet call with the batched UNet inputs: `x_in` the c_in-scaled latent [N, C, h, w] (float32),
`sigma` [N] (float32), `timestep` [N] the integer timesteps the UNet receives (as float), `context` [N, T, D]
(float32), `model` the DiffusionModel, and the keyword `batched_number` (how many conditioning chunks share the
batch, for broadcasting a hint batch as ComfyUI does). For SDXL models `added_cond_kwargs={"text_embeds",
"time_ids"}` is also passed as a keyword. The object applies its own strength, σ-range gating (return None when
inactive) and chain of previous ControlNets (summing their residuals). Entries batch together only when they share
the very same control object. The residuals are cast to the UNet's dtype and handed to diffusers' UNet2DConditionModel.

Sampler hooks in `DiffusionModel.options` (ComfyUI's model_options keys, same argument dicts):
`sampler_cfg_function(args) -> noise` replaces the CFG formula (RescaleCFG & co.), each
`sampler_post_cfg_function(args) -> denoised` runs after it, `disable_cfg1_optimization` keeps the negative
evaluated at cfg 1.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from .models import DiffusionModel
from .noise import seeded_randn
from .samplers import Sampler, is_max_denoise
from .sampling_conds import CondEntry, inpaint_concat, prepare_conditioning, repeat_to_batch
from .schedules import DiscreteSchedule

# Contexts of different token counts share a UNet call by repetition up to their LCM, if that is ≤ 4× the shorter.
_MAX_CONTEXT_REPEAT = 4


def unet_dtype(unet: torch.nn.Module) -> torch.dtype:
    return next(unet.parameters()).dtype


def unet_device(unet: torch.nn.Module) -> torch.device:
    return next(unet.parameters()).device


class ModelCall:
    """One UNet evaluation turned into a denoised prediction (ComfyUI's BaseModel.apply_model)."""

    def __init__(self, model: DiffusionModel, unet: torch.nn.Module, schedule: DiscreteSchedule):
        self.model = model
        self.unet = unet
        self.schedule = schedule
        self.dtype = unet_dtype(unet)

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, context: torch.Tensor,
                 added: dict[str, torch.Tensor] | None = None, control: Any = None,
                 concat: torch.Tensor | None = None, chunks: int = 1) -> torch.Tensor:
        sigma_b = sigma.reshape((-1,) + (1,) * (x.ndim - 1))
        x_in = x / (sigma_b ** 2 + 1.0) ** 0.5
        timestep = self.schedule.timestep(sigma)
        kwargs: dict[str, Any] = {}
        if added:
            kwargs["added_cond_kwargs"] = added
        if control is not None:
            control_kwargs: dict[str, Any] = {"batched_number": chunks}
            if added:
                control_kwargs["added_cond_kwargs"] = added
            residuals = control.residuals(x_in, sigma, timestep, context, self.model, **control_kwargs)
            if residuals is not None:
                down, mid = residuals
                kwargs["down_block_additional_residuals"] = tuple(r.to(self.dtype) for r in down)
                kwargs["mid_block_additional_residual"] = mid.to(self.dtype) if mid is not None else None
        if concat is not None:  # inpainting UNets: mask + masked latent, not c_in-scaled
            x_in = torch.cat([x_in, concat], dim=1)
        output = self.unet(x_in.to(self.dtype), timestep, encoder_hidden_states=context.to(self.dtype),
                           return_dict=False, **kwargs)[0].float()
        if self.model.prediction == "v":
            return x * 1.0 / (sigma_b ** 2 + 1.0) - output * sigma_b / (sigma_b ** 2 + 1.0) ** 0.5
        return x - output * sigma_b


class _Chunk:
    """One conditioning entry's share of a model call: input slice, weights and inputs."""

    def __init__(self, entry: CondEntry, x: torch.Tensor, owner: int):
        self.owner = owner  # 0 = positive, 1 = negative
        self.entry = entry
        area = entry.area
        batch = x.shape[0]
        input_x = x
        if area is not None:
            h = min(x.shape[2] - area[2], area[0])
            w = min(x.shape[3] - area[3], area[1])
            area = (h, w, area[2], area[3])
            input_x = x[:, :, area[2]:area[2] + h, area[3]:area[3] + w]
        self.area = area
        self.input_x = input_x
        if entry.mask is not None:
            mask = entry.mask[:batch]
            if area is not None:
                mask = mask[:, area[2]:area[2] + area[0], area[3]:area[3] + area[1]]
            mask = mask * entry.mask_strength
            mask = mask.unsqueeze(1).repeat(batch // mask.shape[0], input_x.shape[1], 1, 1)
        else:
            mask = torch.ones_like(input_x)
        mult = mask * entry.strength
        if entry.mask is None and area is not None:
            _feather_area_edges(mult, area, x.shape)
        self.mult = mult
        self.context = repeat_to_batch(entry.context, batch)
        self.added = {k: repeat_to_batch(v, batch) for k, v in entry.added.items()}
        self.concat = entry.concat
        if self.concat is not None and area is not None:
            self.concat = self.concat[:, :, area[2]:area[2] + area[0], area[3]:area[3] + area[1]]

    def can_join(self, other: _Chunk) -> bool:
        if self.input_x.shape != other.input_x.shape or self.entry.control is not other.entry.control:
            return False
        a, b = self.context.shape, other.context.shape
        if a[0] != b[0] or a[2] != b[2]:
            return False
        if math.lcm(a[1], b[1]) // min(a[1], b[1]) > _MAX_CONTEXT_REPEAT:
            return False
        if (self.concat is None) != (other.concat is None):
            return False
        return self.added.keys() == other.added.keys() and all(
            self.added[k].shape == other.added[k].shape for k in self.added)


def _feather_area_edges(mult: torch.Tensor, area: tuple[int, int, int, int], full_shape: torch.Size) -> None:
    """Area prompts fade in over 8 latent cells along edges that are inside the image (in place)."""
    ramp = 8
    for dim in range(2):
        size, offset = area[dim], area[2 + dim]
        if offset != 0:
            for t in range(ramp):
                mult.narrow(dim + 2, t, 1).mul_((1.0 / ramp) * (t + 1))
        if size + offset < full_shape[dim + 2]:
            for t in range(ramp):
                mult.narrow(dim + 2, size - 1 - t, 1).mul_((1.0 / ramp) * (t + 1))


def _concat_contexts(contexts: list[torch.Tensor]) -> torch.Tensor:
    length = 1
    for c in contexts:
        length = math.lcm(length, c.shape[1])
    return torch.cat([c.repeat(1, length // c.shape[1], 1) if c.shape[1] < length else c for c in contexts])


class GuidedDenoiser:
    """ComfyUI's sampling_function: weighted conditioning sums for cond and uncond, then CFG on x0."""

    def __init__(self, call: ModelCall, positive: list[CondEntry], negative: list[CondEntry] | None, cfg: float):
        self.call = call
        self.positive = positive
        self.negative = negative
        self.cfg = cfg
        self.schedule = call.schedule  # samplers that need percent_to_sigma (sa_solver) read it here

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, return_uncond: bool = False, **_: Any):
        options = self.call.model.options
        skip_uncond = (math.isclose(self.cfg, 1.0) and not return_uncond
                       and not options.get("disable_cfg1_optimization", False))
        negative = None if skip_uncond else self.negative
        cond, uncond = self.weighted_predictions(x, sigma, [self.positive, negative])
        denoised = self.combine(x, sigma, cond, uncond, options)
        return (denoised, uncond) if return_uncond else denoised

    def combine(self, x, sigma, cond, uncond, options) -> torch.Tensor:
        """CFG on x0, or the model's `sampler_cfg_function` hook (which works on noise: x − D), then every
        `sampler_post_cfg_function` hook, with ComfyUI's argument dicts."""
        model = self.call.model
        hook = options.get("sampler_cfg_function")
        if hook is not None:
            result = x - hook({"cond": x - cond, "uncond": x - uncond, "cond_scale": self.cfg, "timestep": sigma,
                               "input": x, "sigma": sigma, "cond_denoised": cond, "uncond_denoised": uncond,
                               "model": model, "model_options": options})
        else:
            result = uncond + (cond - uncond) * self.cfg
        for post in options.get("sampler_post_cfg_function", ()):
            result = post({"denoised": result, "cond": self.positive, "uncond": self.negative,
                           "cond_scale": self.cfg, "model": model, "uncond_denoised": uncond,
                           "cond_denoised": cond, "sigma": sigma, "model_options": options, "input": x})
        return result

    def weighted_predictions(self, x: torch.Tensor, sigma: torch.Tensor,
                             groups: list[list[CondEntry] | None]) -> list[torch.Tensor]:
        totals = [torch.zeros_like(x) for _ in groups]
        weights = [torch.ones_like(x) * 1e-37 for _ in groups]
        sigma_now = float(sigma[0])
        pending = [_Chunk(entry, x, owner) for owner, entries in enumerate(groups) if entries
                   for entry in entries if entry.active_at(sigma_now)]
        while pending:
            first = pending[0]
            # Like ComfyUI, the joinable chunks run in reverse order: [negative..., positive...].
            batch = [c for c in pending if c is first or first.can_join(c)][::-1]
            pending = [c for c in pending if all(c is not b for b in batch)]
            n = batch[0].input_x.shape[0]
            added = {k: torch.cat([c.added[k] for c in batch]) for k in batch[0].added}
            concat = torch.cat([c.concat for c in batch]) if batch[0].concat is not None else None
            outputs = self.call(torch.cat([c.input_x for c in batch]), sigma[:1].repeat(n * len(batch)),
                                _concat_contexts([c.context for c in batch]), added or None,
                                batch[0].entry.control, concat, len(batch)).chunk(len(batch))
            for chunk, output in zip(batch, outputs, strict=False):
                total, weight = totals[chunk.owner], weights[chunk.owner]
                if chunk.area is not None:
                    h, w, y, x0 = chunk.area
                    total = total[:, :, y:y + h, x0:x0 + w]
                    weight = weight[:, :, y:y + h, x0:x0 + w]
                total += output * chunk.mult
                weight += chunk.mult
        return [total / weight for total, weight in zip(totals, weights, strict=False)]


def prepare_mask(mask: torch.Tensor, shape: torch.Size, device: torch.device) -> torch.Tensor:
    """A noise_mask of any resolution → bilinear to the latent size, repeated over channels and batch."""
    mask = mask.to(device=device, dtype=torch.float32)
    mask = torch.nn.functional.interpolate(mask.reshape((-1, 1, mask.shape[-2], mask.shape[-1])),
                                           size=(shape[2], shape[3]), mode="bilinear")
    return repeat_to_batch(torch.cat([mask] * shape[1], dim=1), shape[0])


class InpaintDenoiser:
    """ComfyUI's KSamplerX0Inpaint: outside the mask the model sees the original latent noised to σ, and the
    prediction there is replaced by the original latent, so unmasked cells end exactly on the input."""

    def __init__(self, inner: Callable, mask: torch.Tensor, latent: torch.Tensor, noise: torch.Tensor):
        self.inner = inner
        self.schedule = getattr(inner, "schedule", None)
        self.mask = mask
        self.keep = 1.0 - mask
        self.latent = latent
        self.noise = noise

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, return_uncond: bool = False, **kwargs: Any):
        sigma_b = sigma.reshape((-1,) + (1,) * (x.ndim - 1))
        x = x * self.mask + (self.noise * sigma_b + self.latent) * self.keep
        result = self.inner(x, sigma, return_uncond=return_uncond, **kwargs)
        denoised, uncond = result if return_uncond else (result, None)
        denoised = denoised * self.mask + self.latent * self.keep
        return (denoised, uncond) if return_uncond else denoised


StepCallback = Callable[[int, torch.Tensor, torch.Tensor, int], None]


class Guider:
    """What a GUIDER link carries: model + conditioning + cfg; `sample` runs one whole sampling pass.

    CFGGuider = Guider(model, {"positive": p, "negative": n}, cfg); BasicGuider = Guider(model, {"positive": c}).
    """

    def __init__(self, model: DiffusionModel, conds: dict[str, list | None], cfg: float = 1.0):
        self.model = model
        self.conds = conds
        self.cfg = cfg

    def sample(self, noise: torch.Tensor, latent: torch.Tensor, sampler: Sampler, sigmas: torch.Tensor,
               denoise_mask: torch.Tensor | None = None, callback: StepCallback | None = None,
               seed: int | None = None, manager: Any = None) -> torch.Tensor:
        """Returns the sampled latent, unscaled, float32 on CPU (`latent` itself when sigmas is empty)."""
        if sigmas.numel() == 0:
            return latent
        schedule = DiscreteSchedule(self.model.sampling)
        fmt = self.model.latent_format
        with torch.no_grad(), self.model.prepared(manager) as unet:
            device = unet_device(unet)
            noise = noise.to(device)
            latent = latent.to(device=device, dtype=torch.float32)
            sigmas = sigmas.to(device=device, dtype=torch.float32)
            if torch.count_nonzero(latent) > 0:  # an empty latent stays exactly 0
                latent = fmt.process_in(latent)
            mask = prepare_mask(denoise_mask, noise.shape, device) if denoise_mask is not None else None
            concat_fn = self._inpaint_channels(unet, noise.shape, latent, mask)
            prepared = prepare_conditioning(self.conds, noise.shape, schedule, device, unet.config,
                                            self.model.family, concat_fn)
            denoiser: Callable = GuidedDenoiser(ModelCall(self.model, unet, schedule), prepared.get("positive", []),
                                                prepared.get("negative"), self.cfg)
            if denoise_mask is not None:
                inpaint_noise = noise
                if sampler.inpaint_random_noise:
                    inpaint_noise = seeded_randn(noise.shape, (41 if seed is None else seed) + 1).to(device)
                denoiser = InpaintDenoiser(denoiser, mask, latent, inpaint_noise)
            if is_max_denoise(float(schedule.sigma_max), float(sigmas[0])):
                x = noise * torch.sqrt(1.0 + sigmas[0] ** 2.0) + latent
            else:
                x = noise * sigmas[0] + latent
            total = len(sigmas) - 1
            step_callback = None
            if callback is not None:
                def step_callback(i: int, denoised: torch.Tensor, current: torch.Tensor) -> None:
                    callback(i, denoised, current, total)
            samples = sampler(denoiser, x, sigmas, extra_args={"seed": seed}, callback=step_callback)
            return fmt.process_out(samples.float()).cpu()

    def _inpaint_channels(self, unet: torch.nn.Module, shape: torch.Size, latent: torch.Tensor,
                          mask: torch.Tensor | None) -> Callable | None:
        """For inpainting UNets (2·C + 1 input channels): how each conditioning entry builds its extra channels."""
        in_channels = getattr(unet.config, "in_channels", shape[1])
        if in_channels == shape[1]:
            return None
        if in_channels != shape[1] * 2 + 1:
            raise ValueError(f"the model takes {in_channels} input channels for {shape[1]}-channel latents; only "
                             f"inpainting models (mask + masked image) are supported")
        process_in = self.model.latent_format.process_in
        return lambda options: inpaint_concat(options, shape, latent, mask, process_in)
